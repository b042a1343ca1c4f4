"""The human ranking page (`lmforge label --judge human`) in headless Chromium against the real command in a
subprocess: two prompts ranked by dragging with the mouse, one with the keyboard including a tie, a reload that
resumes at the next prompt, the server killed (SIGKILL) between two rankings and restarted with nothing lost, and
the output read by the reward-model reader and trained on by `lmforge rm` for one step. Then the A/B vote page."""

import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.browser import CHROMIUM, start_chromium

if not CHROMIUM.exists():
    pytest.skip("Chromium is not installed (/usr/bin/chromium; apt-get install chromium chromium-driver)",
                allow_module_level=True)
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from lmforge.judges.human import Item, LabelSession, create_label_app  # noqa: E402
from lmforge.preferences import parse_record  # noqa: E402
from tests import http_server  # noqa: E402

PROMPTS = [("Name a red fruit.", ["apple", "a red apple", "banana"]),
           ("大象是大的还是小的?", ["大象是大的。", "小的", "大象很大。"]),
           ("What is 2 + 3?", ["5", "2 + 3 = 5", "six"]),
           ("Say hello.", ["hello", "hi", "goodbye"])]


def _start(inp, out, port, labelers=1) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "label", "--judge", "human", "--input", str(inp),
                             "--out", str(out), "--port", str(port), "--labelers", str(labelers)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/progress", timeout=1):
                return proc
        except OSError:
            if proc.poll() == 0:  # it had nothing left to rank: done at once
                return proc
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "slow"
            time.sleep(0.1)


def _shown(driver):
    """(prompt, [answer texts top to bottom]) on the page."""
    return (driver.find_element(By.ID, "prompt").text,
            [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#cards .card .text")])


def _wait_prompt(driver, wait, not_prompt=None):
    wait.until(lambda d: d.find_element(By.ID, "work").is_displayed()
               and d.find_element(By.ID, "prompt").text not in ("", not_prompt))
    return _shown(driver)


def _rows(out):
    return [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]


def _ranks(row):
    return {c["text"]: c["rank"] for c in row["choices"]}


def test_rank_with_mouse_and_keyboard_resume_and_survive_a_kill(tmp_path, tok):
    inp, out = tmp_path / "candidates.jsonl", tmp_path / "ranked.jsonl"
    inp.write_text("".join(json.dumps({"input": p, "candidates": c}, ensure_ascii=False) + "\n" for p, c in PROMPTS),
                   encoding="utf-8")
    port = http_server.free_port()
    server = _start(inp, out, port)
    driver = start_chromium(tmp_path / "profile")
    wait = WebDriverWait(driver, 20)
    try:
        driver.get(f"http://127.0.0.1:{port}/?labeler=ana")
        for n in range(2):  # two prompts with the mouse: drag the bottom answer onto the top one
            prompt, answers = _wait_prompt(driver, wait)
            cards = driver.find_elements(By.CSS_SELECTOR, "#cards .card")
            ActionChains(driver).drag_and_drop(cards[2], cards[0]).perform()
            wait.until(lambda d: _shown(d)[1] == [answers[2], answers[0], answers[1]])
            driver.find_element(By.ID, "submit").click()
            wait.until(lambda d: len(_rows(out)) == n + 1 if out.exists() else False)
            row = _rows(out)[-1]
            assert row["input"] == prompt and row["labeler"] == "ana"
            assert _ranks(row) == {answers[2]: 1, answers[0]: 2, answers[1]: 3}
        _wait_prompt(driver, wait, not_prompt=prompt)

        server.send_signal(signal.SIGKILL)  # between two rankings
        server.wait(10)
        server = _start(inp, out, port)
        driver.refresh()
        prompt, answers = _wait_prompt(driver, wait)
        assert prompt == PROMPTS[2][0]  # resumes at the next prompt, nothing submitted lost
        assert [r["input"] for r in _rows(out)] == [PROMPTS[0][0], PROMPTS[1][0]]
        assert "2 / 4 done" in driver.find_element(By.ID, "progress").text

        # the keyboard: 3 selects the third answer, two ArrowUps take it to the top, 2 selects the second answer
        # (the former first), = ties it with the one above, Enter submits
        body = driver.find_element(By.TAG_NAME, "body")
        for key in ("3", "\ue013", "\ue013", "2", "=", "\ue007"):  # ArrowUp = \ue013, Enter = \ue007
            body.send_keys(key)
        wait.until(lambda d: len(_rows(out)) == 3)
        assert _ranks(_rows(out)[-1]) == {answers[2]: 1, answers[0]: 1, answers[1]: 3}

        prompt, _ = _wait_prompt(driver, wait, not_prompt=PROMPTS[2][0])
        driver.refresh()  # a reload shows the same next prompt
        assert _wait_prompt(driver, wait)[0] == prompt == PROMPTS[3][0]
        driver.save_screenshot(str(tmp_path / "rank.png"))
        if os.environ.get("LMFORGE_KEEP_SCREENSHOT"):
            driver.save_screenshot(os.environ["LMFORGE_KEEP_SCREENSHOT"])
        assert (tmp_path / "rank.png").stat().st_size > 5000
    finally:
        driver.quit()
        server.kill()
        server.wait(10)

    for row in _rows(out):  # the reward model's reader takes every record
        ex = parse_record(row)
        assert len(ex.responses) == 3 and ex.ranks == [c["rank"] for c in row["choices"]]
    _train_rm_one_step(tok, tmp_path, out)


def _train_rm_one_step(tok, tmp_path, data):
    from lmforge.checkpoint import save_checkpoint
    from lmforge.model import Transformer
    from tests.conftest import tiny_config

    save_checkpoint(tmp_path / "sft", Transformer(tiny_config(tok.vocab_size)), tok)
    proc = subprocess.run([sys.executable, "-m", "lmforge.cli", "rm", "train", "--init", str(tmp_path / "sft"),
                           "--data", str(data), "--out", str(tmp_path / "rm"), "optim.max_steps=1", "val_fraction=0.25",
                           "batch_size=2", "device=cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = [json.loads(x) for x in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m for m in metrics)


def test_ab_vote_page(tmp_path):
    pairs = [("Name a red fruit.", ["apple", "banana"]), ("Say hello.", ["goodbye", "hello"]),
             ("What is 2 + 3?", ["5", "five"])]
    items = [Item(f"v{i}", p, c, extra={"policies": ["ppo", "sft"]}) for i, (p, c) in enumerate(pairs)]
    session = LabelSession(items, tmp_path / "votes.jsonl", mode="vote")
    driver = start_chromium(tmp_path / "profile", width=400, height=800)  # phone width: A above B
    wait = WebDriverWait(driver, 20)
    try:
        with http_server.Server(create_label_app(session, title="lmforge: which answer is better?")) as srv:
            driver.get(srv.base + "/?labeler=cy")
            shown = []
            for action in ("click-B", "key-1", "key-="):
                wait.until(lambda d: d.find_element(By.ID, "votemode").is_displayed()
                           and d.find_element(By.ID, "prompt").text not in [s[0] for s in shown])
                a = driver.find_element(By.CSS_SELECTOR, "#answerA .text").text
                b = driver.find_element(By.CSS_SELECTOR, "#answerB .text").text
                shown.append((driver.find_element(By.ID, "prompt").text, a, b))
                if action == "click-B":
                    driver.find_element(By.ID, "voteB").click()
                else:
                    driver.find_element(By.TAG_NAME, "body").send_keys(action[-1])
                wait.until(lambda d: session.progress()["done"] == len(shown))
            wait.until(lambda d: d.find_element(By.ID, "empty").is_displayed())
    finally:
        driver.quit()
    rows = [json.loads(x) for x in (tmp_path / "votes.jsonl").read_text().splitlines()]
    expect = [{shown[0][2]: 1, shown[0][1]: 2}, {shown[1][1]: 1, shown[1][2]: 2}, {shown[2][1]: 1, shown[2][2]: 1}]
    assert [_ranks(r) for r in rows] == expect
    assert all(r["policies"] == ["ppo", "sft"] and r["labeler"] == "cy" for r in rows)


def test_killing_the_page_server_during_submissions_loses_and_duplicates_nothing(tmp_path):
    """Two labellers submit as fast as they can through the page's API while the server is SIGKILLed three times
    at random moments; each retries what was not acknowledged after a restart (as the page does: "Not saved, try
    again"). Every acknowledged ranking is in the file exactly once, and so is every prompt x labeller."""
    import random
    import threading

    n = 300
    inp, out = tmp_path / "candidates.jsonl", tmp_path / "ranked.jsonl"
    inp.write_text("".join(json.dumps({"input": f"prompt {i}", "candidates": [f"a{i}", f"b{i}", f"c{i}"]}) + "\n"
                           for i in range(n)))
    port = http_server.free_port()
    server = _start(inp, out, port, labelers=2)
    acked: list[tuple[str, str]] = []
    stop = threading.Event()

    def labeller(name: str) -> None:
        rng = random.Random(name)
        while not stop.is_set():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/task?labeler={name}", timeout=5) as r:
                    answer = json.loads(r.read())
                task = answer["task"]
                if task is None and answer["remaining"]:  # the rest is leased to the other labeller for now
                    time.sleep(0.05)
                    continue
                if task is None:
                    return
                keys = [c["key"] for c in task["candidates"]]
                rng.shuffle(keys)
                body = json.dumps({"labeler": name, "id": task["id"], "groups": [[k] for k in keys]}).encode()
                req = urllib.request.Request(f"http://127.0.0.1:{port}/api/submit", body,
                                             {"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=5) as r:
                    if not json.loads(r.read())["duplicate"]:
                        acked.append((name, task["id"]))
            except (OSError, http.client.HTTPException, ValueError):  # the server is down (or died mid-reply):
                time.sleep(0.05)                                        # retry once it is back

    workers = [threading.Thread(target=labeller, args=(name,)) for name in ("ana", "bo")]
    for w in workers:
        w.start()
    try:
        kills = 0
        while kills < 3 and any(w.is_alive() for w in workers):
            time.sleep(random.uniform(0.05, 0.3))
            server.send_signal(signal.SIGKILL)
            server.wait(10)
            kills += 1
            server = _start(inp, out, port, labelers=2)
        assert kills == 3
        for w in workers:
            w.join(120)
        assert not any(w.is_alive() for w in workers)
    finally:
        stop.set()
        if server.poll() is None:
            server.kill()
        server.wait(10)
    rows = _rows(out)
    pairs = [(r["labeler"], r["id"]) for r in rows]
    assert len(pairs) == len(set(pairs)) == 2 * n  # every prompt ranked once by each labeller, no duplicates
    assert set(acked) <= set(pairs)  # nothing acknowledged was lost
