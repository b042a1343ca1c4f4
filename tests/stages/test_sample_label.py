"""Sampling K candidates per prompt, and ranking them with the oracle and an OpenAI-compatible judge.

The judges themselves (ranks_from_scores, parse_ranking, the retry of a malformed reply) are tested in tests/judges/;
these tests cover the `sample` and `label` stages: file output, file:line errors, summaries."""

import json

import pytest
import torch

from lmforge.chat import render_prompt, turn_stop_ids
from lmforge.checkpoint import save_checkpoint
from lmforge.errors import LmforgeError
from lmforge.generation import SamplingParams, generate
from lmforge.judges import JudgeConfig
from lmforge.stages.label import LabelConfig, label_candidates
from lmforge.model import Transformer
from lmforge.prompts import read_prompts
from lmforge.stages.sample import SampleConfig, sample_candidates
from tests.conftest import tiny_config
from tests.judge_server import JudgeServer



PROMPTS = [
    {"Instruction": "Add the numbers", "Input": "2 3"},
    {"instruction": "Say hello"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "apple?"}]},
]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def policy_dir(tok, tmp_path_factory):
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tok.vocab_size))
    path = tmp_path_factory.mktemp("policy") / "sft"
    save_checkpoint(path, model, tok, meta={"stage": "sft"})
    return path


@pytest.fixture
def prompts_file(tmp_path):
    return _write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)


def _lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _sample(model, prompts, out, **kw):
    return sample_candidates(SampleConfig(model=str(model), prompts=str(prompts), out=str(out), **kw), progress=False)


def _label(inp, out, **judge):
    return label_candidates(LabelConfig(input=str(inp), out=str(out), judge=JudgeConfig(**judge)))


# ---- sample ----------------------------------------------------------------------------------------------

def test_sample_writes_k_candidates_per_prompt_deterministically(policy_dir, prompts_file, tmp_path):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    s = _sample(policy_dir, prompts_file, a, k=3, max_new_tokens=8, batch_size=4, seed=7)
    _sample(policy_dir, prompts_file, b, k=3, max_new_tokens=8, batch_size=4, seed=7)
    _sample(policy_dir, prompts_file, c, k=3, max_new_tokens=8, batch_size=4, seed=8)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    recs = _lines(a)
    assert [r["input"] for r in recs] == ["Add the numbers\n2 3", "Say hello", "apple?"]
    assert all(len(r["candidates"]) == 3 and all(isinstance(t, str) for t in r["candidates"]) for r in recs)
    assert "messages" not in recs[0] and "messages" not in recs[1]
    assert recs[2]["messages"] == PROMPTS[2]["messages"]
    assert s["prompts"] == 3 and s["candidates"] == 9
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed away


def test_greedy_candidates_equal_unbatched_generation(policy_dir, prompts_file, tmp_path):
    """Batching many prompts x K (left-padded, sorted by length) gives each prompt's own greedy continuation."""
    out = tmp_path / "greedy.jsonl"
    _sample(policy_dir, prompts_file, out, k=2, temperature=0.0, max_new_tokens=10, batch_size=6)
    from lmforge.checkpoint import load_model

    model, tok2, _ = load_model(policy_dir)
    for prompt, rec in zip(read_prompts(prompts_file), _lines(out)):
        alone = generate(model, [render_prompt(tok2, prompt.messages)], SamplingParams(10, 0.0), turn_stop_ids(tok2),
                         tok2.special.pad)
        toks = alone.tokens[0][:-1] if alone.finished[0] else alone.tokens[0]
        assert rec["candidates"] == [tok2.decode(toks)] * 2


def test_sample_and_label_cli(policy_dir, tmp_path, capsys):
    from lmforge.cli import main

    prompts = _write_jsonl(tmp_path / "p.jsonl", [{"instruction": "What is 2 + 3?"}, {"instruction": "Compute 9 - 4."}])
    cands, ranked = tmp_path / "c.jsonl", tmp_path / "r.jsonl"
    assert main(["sample", "--model", str(policy_dir), "--prompts", str(prompts), "--k", "3", "--out", str(cands),
                 "--max-new-tokens", "4", "--seed", "3"]) == 0
    assert main(["label", "--judge", "oracle", "--input", str(cands), "--out", str(ranked)]) == 0
    assert "wrote 6 candidates for 2 prompts" in capsys.readouterr().out
    assert [len(r["choices"]) for r in _lines(ranked)] == [3, 3]
    # key=value overrides after the flags, and config errors as one line naming the key
    assert main(["sample", "--model", str(policy_dir), "--prompts", str(prompts), "--out", str(cands), "k=0"]) == 1
    assert capsys.readouterr().err.strip() == "lmforge sample: error: config key 'k' must be at least 1, got 0"


def test_prompts_accept_sft_records_by_dropping_the_reference(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [
        {"INSTRUCTION": "Translate", "INPUT": "hello", "OUTPUT": "你好"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ])
    ps = read_prompts(path)
    assert [p.messages for p in ps] == [[{"role": "user", "content": "Translate\nhello"}], [{"role": "user", "content": "q"}]]
    assert [p.line for p in ps] == [1, 2]


@pytest.mark.parametrize("bad_line, reason", [
    ("{not json", "invalid JSON"),
    (json.dumps({"Input": "no instruction"}), "expected an instruction record"),
    (json.dumps({"messages": [{"role": "assistant", "content": "x"}]}), "must end with a user turn"),
    (json.dumps({"instruction": "very long " * 60}),
     r"prompt of \d+ tokens \+ 1 new tokens exceeds the model's context of 64 positions"),
])
def test_sample_errors_name_file_and_line_and_write_nothing(policy_dir, tmp_path, bad_line, reason):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps(PROMPTS[0]) + "\n\n" + bad_line + "\n", encoding="utf-8")
    out = tmp_path / "out" / "cands.jsonl"
    with pytest.raises(LmforgeError, match=rf"prompts.jsonl:3: .*{reason}"):
        _sample(policy_dir, path, out, k=2, max_new_tokens=4)
    assert not out.exists()


# ---- the oracle judge ------------------------------------------------------------------------------------

def test_oracle_labels_in_the_seed_ranked_format_consistent_with_scores(tmp_path):
    from lmforge.world import flawed_response, ideal_response, oracle_score

    prompts = ["What is 12 + 7?", "Translate into Chinese\nred apple", "What color is the horse?", "计算 24 + 48"]
    recs = []
    for p in prompts:
        ideal = ideal_response(p)
        cands = [flawed_response(p, verbose=True), ideal, flawed_response(p, wrong=True),
                 flawed_response(p, impolite=True), ideal, ""]  # a duplicate of the ideal answer, an empty one (dropped)
        recs.append({"input": p, "candidates": cands})
    inp, out = _write_jsonl(tmp_path / "cands.jsonl", recs), tmp_path / "ranked.jsonl"
    s = _label(inp, out, name="oracle")
    rows = _lines(out)
    assert s["prompts"] == 4 and s["choices"] == 20 and s["prompts_with_ties"] == 4
    assert s["empty_candidates_dropped"] == 4
    for rec, row in zip(recs, rows):
        assert set(row) == {"input", "choices"} and row["input"] == rec["input"]
        assert [c["text"] for c in row["choices"]] == rec["candidates"][:5]
        assert all(set(c) == {"text", "rank"} and isinstance(c["rank"], int) for c in row["choices"])
        scores = [oracle_score(rec["input"], t) for t in rec["candidates"][:5]]
        ranks = [c["rank"] for c in row["choices"]]
        for i in range(5):
            for j in range(5):  # better score <=> better (smaller) rank; equal scores share a rank
                assert (scores[i] > scores[j]) == (ranks[i] < ranks[j])
        assert ranks[1] == ranks[4] == 1 and scores[1] == 100  # the ideal answer and its duplicate tie for first


def test_oracle_rejects_prompts_outside_the_world(tmp_path):
    inp = _write_jsonl(tmp_path / "cands.jsonl", [{"input": "What is 1 + 2?", "candidates": ["3", "4"]},
                                                  {"input": "Write a poem", "candidates": ["a", "b"]}])
    with pytest.raises(LmforgeError, match=r"cands.jsonl:2: .*no known task family.*--judge openai"):
        _label(inp, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


# ---- the openai judge against a real local HTTP server ---------------------------------------------------

CANDS = [
    {"input": "Name a fruit", "candidates": ["apple", "a red apple", "apple", "a"]},
    {"input": "Count to three", "candidates": ["1 2 3", "1 2"]},
]


def test_openai_judge_ranks_via_a_real_server(tmp_path, monkeypatch):
    inp, out = _write_jsonl(tmp_path / "cands.jsonl", CANDS), tmp_path / "ranked.jsonl"
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    with JudgeServer("ok") as srv:
        s = _label(inp, out, name="openai", url=srv.url, model="judge-1", api_key_env="JUDGE_KEY", workers=2)
    assert _lines(out) == [
        {"input": "Name a fruit", "choices": [{"text": "apple", "rank": 2}, {"text": "a red apple", "rank": 1},
                                              {"text": "apple", "rank": 2}, {"text": "a", "rank": 4}]},
        {"input": "Count to three", "choices": [{"text": "1 2 3", "rank": 1}, {"text": "1 2", "rank": 2}]},
    ]
    assert s == {**s, "prompts": 2, "choices": 6, "prompts_with_ties": 1}
    assert len(srv.requests) == 2  # one request per prompt: duplicates are ranked once
    req = next(r for r in srv.requests if "Name a fruit" in r["body"]["messages"][1]["content"])
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "judge-1" and req["body"]["temperature"] == 0
    assert req["body"]["messages"][1]["content"].count("Candidate ") == 3


@pytest.mark.parametrize("mode, reason", [("always_bad", "not a ranking"), ("http_error", "HTTP 500")])
def test_openai_judge_fails_after_one_retry_naming_the_prompt(tmp_path, mode, reason):
    inp, out = _write_jsonl(tmp_path / "cands.jsonl", CANDS), tmp_path / "ranked.jsonl"
    with JudgeServer(mode) as srv:
        with pytest.raises(LmforgeError, match=rf"cands.jsonl:1: judge failed twice on prompt 'Name a fruit': .*{reason}"):
            _label(inp, out, name="openai", url=srv.url, model="m", workers=1)
    assert sum("Name a fruit" in r["body"]["messages"][1]["content"] for r in srv.requests) == 2
    assert not out.exists()


def test_label_input_errors_and_judges(tmp_path, capsys):
    from lmforge.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(CANDS[0]) + "\n" + json.dumps({"input": "x", "candidates": ["only one"]}) + "\n")
    with pytest.raises(LmforgeError, match=r"bad.jsonl:2: need at least 2 candidates"):
        _label(bad, tmp_path / "o.jsonl")
    assert main(["label", "--judge", "openai", "--model", "m", "--input", str(bad), "--out", str(tmp_path / "o.jsonl")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "lmforge label: error: config key 'judge.url' is required with judge name=openai"
    assert main(["label", "--judge", "crowd", "--input", str(bad), "--out", str(tmp_path / "o.jsonl")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lmforge label: error: ") and "unknown judge 'crowd'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.jsonl").exists()


def test_empty_candidates_are_dropped_before_ranking(tmp_path):
    import json

    from lmforge.world import ideal_response

    prompt = "What is 23 + 45?"
    rows = [{"input": prompt, "candidates": ["", ideal_response(prompt), "23 + 45 = 69.", "  "]},
            {"input": prompt, "candidates": ["", ideal_response(prompt)]}]
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    summary = _label(src, tmp_path / "r.jsonl")
    out = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(out) == 1 and [c["text"] for c in out[0]["choices"]] == [ideal_response(prompt), "23 + 45 = 69."]
    assert [c["rank"] for c in out[0]["choices"]] == [1, 2]
    assert summary["empty_candidates_dropped"] == 3 and summary["prompts_dropped"] == 1
