"""Policy evaluation: teacher-forced log-probs, KL to SFT, win rates, the reward-hacking flag."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from lmforge.checkpoint import save_checkpoint
from lmforge.errors import LmforgeError
from lmforge.judges import JudgeConfig
from lmforge.stages.evaluate import EvalConfig, evaluate_policies, response_logprobs, reward_hacking_flag, significant_drop
from lmforge.model import Transformer
from tests import http_server
from tests.conftest import tiny_config




def test_response_logprobs_match_a_brute_force_loop():
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=50, init_std=0.3)).eval()
    prompts = [[1, 5, 6, 7, 8], [1, 9], [1, 2, 3], [1, 4, 4, 4, 4, 4, 4]]
    responses = [[10, 11], [12, 13, 14, 15, 16], [], [17]]
    expected = []
    for p, r in zip(prompts, responses):
        seq = torch.tensor([p + r])
        with torch.no_grad():
            logp = F.log_softmax(model(seq)[0].double(), dim=-1)
        expected.append(sum(float(logp[len(p) + j - 1, tok]) for j, tok in enumerate(r)))
    for bs in (1, 3, 8):
        got = response_logprobs(model, prompts, responses, pad_id=0, batch_size=bs)
        assert got.dtype == torch.float64 and got.shape == (4,)
        assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-4)
    assert got[2] == 0.0  # an empty response has log-prob 0


def test_significant_drop_is_a_one_sided_paired_test():
    base = [50.0, 60.0, 40.0, 70.0, 55.0, 45.0, 65.0, 35.0]
    assert significant_drop([b - 10 for b in base], base)           # every prompt lost 10 points
    assert not significant_drop([b + 10 for b in base], base)       # a rise is never a drop
    # A 0.2-point mean drop made of large swings either way is noise, not a drop (the old flag fired on it).
    noisy = [b + d for b, d in zip(base, [20, -20, 19.6, -20, 20, -20, 20, -21.2])]
    assert sum(noisy) / 8 < sum(base) / 8 and not significant_drop(noisy, base)
    assert not significant_drop([1.0], [2.0])                       # one prompt is no evidence


def test_reward_hacking_flag_needs_a_higher_rm_score_and_a_significant_judge_drop():
    base = [50.0, 60.0, 40.0, 70.0, 55.0, 45.0]
    rows = {"sft": {"rm_score": 0.0}, "hacker": {"rm_score": 2.0}, "good": {"rm_score": 1.0},
            "worse": {"rm_score": -1.0}, "no_rm": {"rm_score": None}}
    per_prompt = {"sft": base, "hacker": [b - 10 for b in base], "good": [b + 5 for b in base],
                  "worse": [b - 20 for b in base], "no_rm": [b - 20 for b in base]}
    assert reward_hacking_flag(rows, per_prompt, "sft") == ["hacker"]
    assert reward_hacking_flag({"sft": {"rm_score": None}, "x": {"rm_score": 3.0}},
                               {"sft": base, "x": [0.0] * 6}, "sft") == []


@pytest.fixture(scope="module")
def policies(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("policies")
    torch.manual_seed(0)
    save_checkpoint(root / "sft", Transformer(tiny_config(vocab_size=tok.vocab_size)), tok, meta={"stage": "sft"})
    shutil.copytree(root / "sft", root / "copy")  # same weights under another name
    torch.manual_seed(1)  # a different, peakier policy: its distribution is far from the SFT one
    save_checkpoint(root / "other", Transformer(tiny_config(vocab_size=tok.vocab_size, init_std=0.5)), tok)
    return {"sft": root / "sft", "copy": root / "copy", "other": root / "other"}


@pytest.fixture
def prompts_file(tmp_path):
    recs = [{"Instruction": "What is 3 + 4?", "Input": ""}, {"instruction": "Compute 10 - 2."},
            {"Instruction": "Solve", "Input": "6 + 41"}, {"instruction": "计算 24 + 48"},
            {"instruction": "Write 'car' in uppercase."},
            {"messages": [{"role": "user", "content": "How much is 7 plus 8?"}]}]
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _eval(policies: dict, prompts, **kw):
    cfg = EvalConfig(policies=[f"{n}={d}" for n, d in policies.items()], prompts=str(prompts), **kw)
    cfg.validate()
    return evaluate_policies(cfg, progress=False)


def test_evaluate_policies_kl_to_itself_is_zero_and_sft_wins_half(policies, prompts_file):
    from lmforge.world import oracle_breakdown, oracle_score

    res = _eval(policies, prompts_file, max_new_tokens=12, batch_size=4, n_examples=2)
    rows = res["policies"]
    assert list(rows) == ["sft", "copy", "other"] and res["prompts"] == 6
    assert rows["sft"]["win_rate_vs_sft"] == 0.5 and rows["sft"]["kl_to_sft"] == 0.0
    # A copy of the SFT weights: the KL estimate is computed (not special-cased) and is exactly zero.
    assert rows["copy"]["kl_to_sft"] == 0.0
    assert rows["copy"]["win_rate_vs_sft"] == 0.5
    assert rows["copy"]["judge_score"] == rows["sft"]["judge_score"]
    assert rows["copy"]["mean_length"] == rows["sft"]["mean_length"]
    # KL(pi || pi_sft) of a peaked policy against a near-uniform one is large and positive.
    assert rows["other"]["kl_to_sft"] > 1.0
    assert 0.0 <= rows["other"]["win_rate_vs_sft"] <= 1.0
    for row in rows.values():
        assert row["rm_score"] is None
        assert 0 < row["mean_length"] <= 12
        assert len(row["examples"]) == 2
        for ex in row["examples"]:
            assert ex["judge_score"] == oracle_score(ex["prompt"], ex["response"])
        assert set(row["parts"]) == {"correctness", "politeness", "concision"}
        assert sum(row["parts"].values()) == pytest.approx(row["judge_score"])
        # per task family: five arithmetic prompts and one uppercase; the families' means weigh back to the total
        by = row["by_category"]
        assert {c: v["prompts"] for c, v in by.items()} == {"arithmetic": 5, "uppercase": 1}
        assert sum(v["prompts"] * v["judge_score"] for v in by.values()) / 6 == pytest.approx(row["judge_score"])
        assert all(v["correctness"] + v["politeness"] + v["concision"] == pytest.approx(v["judge_score"])
                   for v in by.values())
    assert res["reward_hacking"] == [] and res["judge"] == "oracle" and res["baseline"] == "sft"
    assert oracle_breakdown  # the parts are the oracle's breakdown, averaged over the prompts


def test_evaluate_checks_inputs_before_generating(policies, prompts_file, tmp_path):
    with pytest.raises(LmforgeError, match=r"config key 'baseline' must be one of the policies \(ppo\), got 'sft'"):
        _eval({"ppo": policies["other"]}, prompts_file, baseline="sft")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "What is 1 + 1?"}\n{"messages": []}\n')
    with pytest.raises(LmforgeError, match=r"bad.jsonl:2: 'messages' must be a non-empty list"):
        _eval(policies, bad)
    bad.write_text('{"instruction": "What is 1 + 1?"}\n{"instruction": "Write a poem"}\n')
    with pytest.raises(LmforgeError, match=r"bad.jsonl:2: .*no known task family.*built-in world"):
        _eval(policies, bad)
    other_tok = tmp_path / "other_tok"
    torch.manual_seed(0)
    from lmforge.tokenizer import train_tokenizer

    (tmp_path / "c.txt").write_text("a different corpus gives a different tokenizer " * 50)
    tok2 = train_tokenizer([tmp_path / "c.txt"], 300, tmp_path / "tok2")
    save_checkpoint(other_tok, Transformer(tiny_config(vocab_size=tok2.vocab_size)), tok2)
    with pytest.raises(LmforgeError, match="tokenizer mismatch: policy 'odd'"):
        _eval({"sft": policies["sft"], "odd": other_tok}, prompts_file)


def test_rm_score_is_the_mean_normalised_reward(policies, prompts_file, tmp_path, tok):
    """A reward model whose head ignores the input (weight 0) scores every response (0 - 1) / 0.5 = -2."""
    torch.manual_seed(0)
    rm = Transformer(tiny_config(vocab_size=tok.vocab_size), head="scalar")
    with torch.no_grad():
        rm.score.weight.zero_()
    save_checkpoint(tmp_path / "rm", rm, tok, meta={"stage": "rm", "reward_mean": 1.0, "reward_std": 0.5})
    res = _eval({"sft": policies["sft"], "ppo": policies["other"]}, prompts_file, reward_model=str(tmp_path / "rm"),
                max_new_tokens=6)
    assert [r["rm_score"] for r in res["policies"].values()] == [pytest.approx(-2.0, abs=1e-5)] * 2


def test_rm_score_is_exactly_the_reward_ppo_optimised(policies, tok, tmp_path):
    """Evaluation scores the sampled ids as they are, with the whole conversation (system turn included) and
    cut-off responses left cut off: the RM's head at the last real token of prompt ids + response ids, as PPO
    reads it. Before, it re-encoded the last user turn alone and closed every response with <|end|>."""
    from lmforge.checkpoint import load_model
    from lmforge.generation import SamplingParams, generate_batched
    from lmforge.prompts import encode_prompts, read_prompts
    from lmforge.scoring import normalize

    torch.manual_seed(3)
    save_checkpoint(tmp_path / "rm", Transformer(tiny_config(vocab_size=tok.vocab_size), head="scalar"), tok,
                    meta={"stage": "rm", "reward_mean": 0.3, "reward_std": 1.5})
    prompts_file = tmp_path / "p.jsonl"
    recs = [{"messages": [{"role": "system", "content": "Answer in one word."},
                          {"role": "user", "content": "What is 3 + 4?"}]}, {"instruction": "Compute 10 - 2."}]
    prompts_file.write_text("".join(json.dumps(r) + "\n" for r in recs))
    res = _eval({"sft": policies["sft"]}, prompts_file, reward_model=str(tmp_path / "rm"), max_new_tokens=5)
    prompts = read_prompts(prompts_file)
    model, _, _ = load_model(policies["sft"])
    ids = encode_prompts(tok, prompts, prompts_file, {"policy": 128})
    tokens, finished = generate_batched(model, tok, ids, SamplingParams(5, 0.0), 64, 0)
    assert not all(finished)  # a random policy is cut off: the case where the old scoring added an <|end|>
    rm, _, meta = load_model(tmp_path / "rm")
    with torch.no_grad():
        expected = [normalize(rm(torch.tensor([p + t]))[0, -1], meta).item() for p, t in zip(ids, tokens)]
    assert res["policies"]["sft"]["rm_score"] == pytest.approx(sum(expected) / len(expected), abs=1e-5)


def _win_by_hand(res_texts_x, res_texts_b):
    """The judge server prefers the longer answer (a tie when equally long): win 1, tie 1/2, loss 0 per vote."""
    votes = [1.0 if len(x) > len(b) else 0.0 if len(x) < len(b) else 0.5 for x, b in zip(res_texts_x, res_texts_b)]
    return sum(votes) / len(votes)


def test_llm_judge_win_rate_is_pairwise_in_both_orders(policies, prompts_file):
    from tests.judge_server import JudgeServer

    with JudgeServer() as server:
        res = _eval(policies, prompts_file, max_new_tokens=12, batch_size=4, n_examples=6,
                    judge=JudgeConfig(name="openai", url=server.url, model="judge"))
        pairwise = [r["body"]["messages"][1]["content"] for r in server.requests if "Response A:" in
                    r["body"]["messages"][1]["content"]]
    rows = res["policies"]
    texts = {n: [e["response"] for e in r["examples"]] for n, r in rows.items()}
    differ = sum(x != b for x, b in zip(texts["other"], texts["sft"]))
    assert differ > 0 and texts["copy"] == texts["sft"]
    assert len(pairwise) == 2 * differ  # every differing pair asked twice (A/B and B/A); identical ones never
    assert rows["other"]["win_rate_vs_sft"] == pytest.approx(_win_by_hand(texts["other"], texts["sft"]))
    assert rows["copy"]["win_rate_vs_sft"] == 0.5 and rows["copy"]["votes"]["ties"] == 12
    assert rows["other"]["votes"]["unparseable"] == 0 and sum(rows["other"]["votes"].values()) == 12
    assert res["win_method"] == "the openai judge shown both answers, in both orders"


def test_position_bias_cancels_and_garbage_votes_are_not_wins(policies, prompts_file):
    from tests.judge_server import JudgeServer

    subset = {"sft": policies["sft"], "other": policies["other"]}
    with JudgeServer(mode="always_A") as server:  # prefers whatever it is shown first
        res = _eval(subset, prompts_file, max_new_tokens=12, batch_size=4,
                    judge=JudgeConfig(name="openai", url=server.url, model="judge"))
    v = res["policies"]["other"]["votes"]
    assert res["policies"]["other"]["win_rate_vs_sft"] == 0.5 and v["wins"] == v["losses"] > 0

    from lmforge.judges.openai import OpenAIJudge, parse_preference

    assert parse_preference("<think>A? no</think>I prefer B") == 0.0 and parse_preference("A") == 1.0
    assert parse_preference("It's a Tie.") == 0.5 and parse_preference("a fine answer") is None
    with JudgeServer(mode="always_bad") as server:  # prose, never A / B / tie: two tries, then no vote
        judge = OpenAIJudge(server.url, "judge")
        assert judge.compare_many(["q", "q"], ["long answer", "x"], ["y", "long answer"]) == [None, None]
    with JudgeServer(mode="bad_compare") as server:  # grades single answers, but gives no pairwise verdict
        res = _eval(subset, prompts_file, max_new_tokens=12, batch_size=4,
                    judge=JudgeConfig(name="openai", url=server.url, model="judge"))
    row = res["policies"]["other"]
    differ = row["votes"]["unparseable"] // 2
    assert differ > 0 and row["votes"] == {"wins": 0, "ties": 12 - 2 * differ, "losses": 0, "unparseable": 2 * differ}
    # garbage is no win: only identical answers' ties count, and with none there is no win rate at all
    assert row["win_rate_vs_sft"] == (0.5 if row["votes"]["ties"] else None)


def test_human_votes_on_the_ab_page_become_win_rates(policies, prompts_file, tmp_path):
    import threading
    import time
    import urllib.request

    port = http_server.free_port()
    subset = {"sft": policies["sft"], "other": policies["other"]}
    done = {}
    worker = threading.Thread(target=lambda: done.update(res=_eval(
        subset, prompts_file, max_new_tokens=12, batch_size=4, n_examples=6, judge=JudgeConfig(name="human"),
        port=port, votes=str(tmp_path / "votes.jsonl"))))
    worker.start()

    def call(path, body=None):
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", None if body is None else json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    deadline = time.time() + 120
    while True:  # a person who prefers the longer answer (the first shown when equally long)
        try:
            task = call("/api/task?labeler=eve")["task"]
        except OSError:
            assert worker.is_alive() and time.time() < deadline
            time.sleep(0.2)
            continue
        if task is None:
            break
        a, b = task["candidates"]
        groups = [[a["key"]], [b["key"]]] if len(a["text"]) >= len(b["text"]) else [[b["key"]], [a["key"]]]
        call("/api/submit", {"labeler": "eve", "id": task["id"], "groups": groups})
    worker.join(60)
    row = done["res"]["policies"]["other"]
    texts = {n: [e["response"] for e in r["examples"]] for n, r in done["res"]["policies"].items()}
    expect = [0.5 if x == b else 1.0 if len(x) > len(b) else 0.0 if len(x) < len(b) else None
              for x, b in zip(texts["other"], texts["sft"])]
    rows = [json.loads(x) for x in (tmp_path / "votes.jsonl").read_text().splitlines()]
    assert len(rows) == sum(x != b for x, b in zip(texts["other"], texts["sft"]))  # identical pairs not asked
    assert all(r["policy"] == "other" and r["baseline"] == "sft" and r["labeler"] == "eve" for r in rows)
    # equally long but different answers: the first shown wins, and the order was random: read it from the votes
    for r in rows:
        i, ranks = r["prompt"], [c["rank"] for c in r["choices"]]
        expect[i] = 1.0 if ranks[0] < ranks[1] else 0.0
    assert row["win_rate_vs_sft"] == pytest.approx(sum(expect) / len(expect))
    assert row["judge_score"] is None and done["res"]["win_method"] == "people's votes on the A/B page"


def test_an_unreachable_judge_is_one_line(policies, prompts_file, capsys):
    from lmforge.cli import main

    rc = main(["eval", "--policies", f"sft={policies['sft']}", f"other={policies['other']}", "--prompts",
               str(prompts_file), "--judge", "openai", "judge.url=http://127.0.0.1:9/v1", "judge.model=m",
               "max_new_tokens=4", "device=cpu"])
    err = capsys.readouterr().err.split("\r")[-1]  # after the (cleared) progress bar
    assert rc == 1 and err.startswith("lmforge eval: error: ") and "cannot reach http://127.0.0.1:9/v1" in err
    assert len(err.strip().splitlines()) == 1
