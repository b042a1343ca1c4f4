"""Self-instruct against a real local OpenAI-compatible server with scripted replies: valid records in the seed's
format, near-duplicates dropped by ROUGE-L (checked by hand), malformed and filtered replies counted, resume
after an interruption (and a torn last line); and a local checkpoint as the generator."""

import json

import pytest

from lmforge.cli import main
from lmforge.stages.selfinstruct import (GeneratorConfig, SelfInstructConfig, WordTokenizer, filter_reason,
                                         parse_task, rouge_l, self_instruct)
from tests.judge_server import JudgeServer

SEEDS = [{"Instruction": "Write the word in uppercase", "Input": "cat", "Output": "CAT"},
         {"Instruction": "请帮我翻译一句话", "Input": "hello", "Output": "你好"}]
REPLIES = ["Instruction: Translate the word into Chinese\nInput: cat\nOutput: 猫",
           "Instruction: Write the word in uppercase letters\nInput: dog\nOutput: DOG",  # ROUGE-L 10/11 with a seed
           "Sorry, I cannot help with that.",                                          # malformed
           "Instruction: Describe the picture of a cat\nInput: <none>\nOutput: A cat.",  # keyword
           "<think>hmm</think>**Instruction:** Add the two numbers together\n**Input:** 2 and 3\n**Output:** 5",
           "Instruction: Hi\nOutput: hello",                                           # too short
           None,                                                                       # not a chat answer
           "Instruction: 请说出一种水果的名字\nInput: <none>\nOutput: 苹果"]


class ScriptedServer(JudgeServer):
    """/v1/chat/completions answering `replies` in order (None: a JSON body that is not a chat completion)."""

    def __init__(self, replies):
        super().__init__()
        self.replies = list(replies)

    def reply(self, body: dict) -> dict:
        with self.lock:
            reply = self.replies.pop(0) if self.replies else "Nothing more."
        return {"oops": True} if reply is None else {"choices": [{"message": {"role": "assistant", "content": reply}}]}

    @property
    def prompts(self) -> list[str]:
        return [r["body"]["messages"][-1]["content"] for r in self.requests]


def _cfg(tmp_path, url, n, **kw):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in SEEDS), encoding="utf-8")
    cfg = SelfInstructConfig(seed_tasks=str(seeds), out=str(tmp_path / "gen.jsonl"), n=n,
                             generator=GeneratorConfig(name="openai", url=url, model="m", workers=1), **kw)
    cfg.validate()
    return cfg


def test_rouge_l_hand_computed():
    # LCS(write the word in uppercase, write the word in uppercase letters) = 5 tokens: F1 = 2*5 / (5 + 6)
    assert rouge_l("Write the word in uppercase", "Write the word in uppercase letters") == pytest.approx(10 / 11)
    # the cat sat on the mat / the cat lay on a mat: LCS the cat on mat = 4 of 6 and 6: F1 = 4/6
    assert rouge_l("the cat sat on the mat", "the cat lay on a mat") == pytest.approx(4 / 6)
    # CJK by character: 请帮我翻译一句话 / 请帮我翻译这句话: LCS 7 of 8 and 8
    assert rouge_l("请帮我翻译一句话", "请帮我翻译这句话") == pytest.approx(7 / 8)
    assert rouge_l("Name a fruit", "请帮我翻译一句话") == 0.0
    assert WordTokenizer().tokenize("Add 2 and 3: 二加三") == ["add", "2", "and", "3", "二", "加", "三"]


def test_parse_and_filter():
    assert parse_task(REPLIES[4]) == {"Instruction": "Add the two numbers together", "Input": "2 and 3", "Output": "5"}
    assert parse_task(REPLIES[2]) is None and parse_task("Instruction: only this") is None
    cfg = SelfInstructConfig()
    assert filter_reason(parse_task(REPLIES[3]), cfg) == "keyword"
    assert filter_reason(parse_task(REPLIES[5]), cfg) == "too_short"
    assert filter_reason({"Instruction": "... and then what", "Input": "", "Output": "x"}, cfg) == "punctuation"
    assert filter_reason(parse_task(REPLIES[7]), cfg) is None  # 12 CJK characters count as 12 words
    assert filter_reason({"Instruction": "Draw a map of the town", "Input": "", "Output": "x"}, cfg) == "keyword"


def test_generates_deduplicates_counts_and_resumes(tmp_path):
    with ScriptedServer(REPLIES) as server:
        first = self_instruct(_cfg(tmp_path, server.url, 2), progress=False)
        assert first == {**first, "kept": 2, "resumed": 0, "requests": 5, "malformed": 1, "duplicate": 1,
                         "keyword": 1, "total": 2}
        out = tmp_path / "gen.jsonl"
        with open(out, "a", encoding="utf-8") as f:  # an interruption in the middle of an append
            f.write('{"Instruction": "Half a rec')
        second = self_instruct(_cfg(tmp_path, server.url, 3), progress=False)
        assert second == {**second, "kept": 1, "resumed": 2, "requests": 3, "too_short": 1, "malformed": 1,
                          "total": 3}
        prompts = server.prompts
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [r["Instruction"] for r in rows] == ["Translate the word into Chinese", "Add the two numbers together",
                                                 "请说出一种水果的名字"]
    assert all(set(r) == {"Instruction", "Input", "Output"} for r in rows) and rows[2]["Input"] == ""
    # in-context examples: seed tasks, then (once there are some) one generated task
    assert "Task 1\nInstruction:" in prompts[0] and "Translate the word into Chinese" not in prompts[0]
    assert all(sum(r["Instruction"] in p for r in rows[:2]) == 1 for p in prompts[5:])
    from lmforge.stages.sft import read_sft_records  # the seed's SFT format: lmforge sft reads the records

    convs, skipped = read_sft_records(out)
    assert len(convs) == 3 and skipped == 0


def test_a_local_checkpoint_that_writes_no_usable_task_ends_with_one_line(tmp_path, tok, capsys):
    from lmforge.checkpoint import save_checkpoint
    from tests.conftest import tiny_sft_policy

    save_checkpoint(tmp_path / "policy", tiny_sft_policy(tok), tok)
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in SEEDS), encoding="utf-8")
    rc = main(["selfinstruct", "--seed-tasks", str(seeds), "--out", str(tmp_path / "g.jsonl"), "--n", "2",
               "--generator", "lmforge", "--model", str(tmp_path / "policy"), "max_requests=4",
               "generator.max_tokens=16"])
    captured = capsys.readouterr()
    assert rc == 1 and "malformed 4" in captured.out
    last = captured.err.strip().splitlines()[-1]  # below the progress bar
    assert last.startswith("lmforge selfinstruct: error: only 0 of 2 records after 4 requests")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"Instruction": "x"}\n')
    assert main(["selfinstruct", "--seed-tasks", str(bad), "--out", str(tmp_path / "g.jsonl"), "--generator",
                 "openai", "--url", "http://127.0.0.1:9/v1", "--model", "m"]) == 1
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert main(["selfinstruct", "--seed-tasks", str(seeds), "--out", str(tmp_path / "g2.jsonl"), "--generator",
                 "openai", "--url", "http://127.0.0.1:9/v1", "--model", "m"]) == 1
    assert "cannot reach http://127.0.0.1:9/v1" in capsys.readouterr().err
