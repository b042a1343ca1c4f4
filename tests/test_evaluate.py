"""Policy evaluation: teacher-forced log-probs, KL to SFT, win rates, the reward-hacking flag."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from lmforge.checkpoint import save_checkpoint
from lmforge.errors import LmforgeError
from lmforge.evaluate import evaluate_policies, response_logprobs, reward_hacking_flag
from lmforge.model import Transformer
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


def test_reward_hacking_flag():
    rows = {
        "sft": {"rm_score": 0.0, "oracle_score": 50.0},
        "hacker": {"rm_score": 2.0, "oracle_score": 40.0},     # RM up, oracle down: flagged
        "good": {"rm_score": 1.0, "oracle_score": 60.0},       # both up
        "worse": {"rm_score": -1.0, "oracle_score": 30.0},     # both down: bad, but not hacking
        "flat": {"rm_score": 0.0, "oracle_score": 10.0},       # RM did not rise
        "no_rm": {"rm_score": None, "oracle_score": 10.0},
    }
    assert reward_hacking_flag(rows) == ["hacker"]
    assert reward_hacking_flag({"sft": {"rm_score": None, "oracle_score": 1.0}, "x": {"rm_score": 3.0, "oracle_score": 0.0}}) == []


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


def test_evaluate_policies_kl_to_itself_is_zero_and_sft_wins_half(policies, prompts_file):
    from lmforge.world import oracle_score

    res = evaluate_policies(policies, prompts_file, max_new_tokens=12, batch_size=4, n_examples=2, progress=False)
    rows = res["policies"]
    assert list(rows) == ["sft", "copy", "other"] and res["prompts"] == 6
    assert rows["sft"]["win_rate_vs_sft"] == 0.5 and rows["sft"]["kl_to_sft"] == 0.0
    # A copy of the SFT weights: the KL estimate is computed (not special-cased) and is exactly zero.
    assert rows["copy"]["kl_to_sft"] == 0.0
    assert rows["copy"]["win_rate_vs_sft"] == 0.5
    assert rows["copy"]["oracle_score"] == rows["sft"]["oracle_score"]
    assert rows["copy"]["mean_length"] == rows["sft"]["mean_length"]
    # KL(pi || pi_sft) of a peaked policy against a near-uniform one is large and positive.
    assert rows["other"]["kl_to_sft"] > 1.0
    assert 0.0 <= rows["other"]["win_rate_vs_sft"] <= 1.0
    for row in rows.values():
        assert row["rm_score"] is None
        assert 0 < row["mean_length"] <= 12
        assert len(row["examples"]) == 2
        for ex in row["examples"]:
            assert ex["oracle_score"] == oracle_score(ex["prompt"], ex["response"])
    assert res["reward_hacking"] == []


def test_evaluate_checks_inputs_before_generating(policies, prompts_file, tmp_path):
    with pytest.raises(LmforgeError, match="needs the SFT policy 'sft'"):
        evaluate_policies({"ppo": policies["other"]}, prompts_file, progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "What is 1 + 1?"}\n{"messages": []}\n')
    with pytest.raises(LmforgeError, match=r"bad.jsonl:2: 'messages' must be a non-empty list"):
        evaluate_policies(policies, bad, progress=False)
    bad.write_text('{"instruction": "What is 1 + 1?"}\n{"instruction": "Write a poem"}\n')
    with pytest.raises(LmforgeError, match=r"bad.jsonl:2: .*no known task family.*built-in world"):
        evaluate_policies(policies, bad, progress=False)
    other_tok = tmp_path / "other_tok"
    torch.manual_seed(0)
    from lmforge.tokenizer import train_tokenizer

    (tmp_path / "c.txt").write_text("a different corpus gives a different tokenizer " * 50)
    tok2 = train_tokenizer([tmp_path / "c.txt"], 300, tmp_path / "tok2")
    save_checkpoint(other_tok, Transformer(tiny_config(vocab_size=tok2.vocab_size)), tok2)
    with pytest.raises(LmforgeError, match="policy 'odd' uses a different tokenizer"):
        evaluate_policies({"sft": policies["sft"], "odd": other_tok}, prompts_file, progress=False)


def test_rm_score_is_the_mean_normalised_reward(policies, prompts_file, tmp_path, tok):
    """A reward model whose head ignores the input (weight 0, bias 3) scores every response (3 - 1) / 0.5 = 4."""
    torch.manual_seed(0)
    rm = Transformer(tiny_config(vocab_size=tok.vocab_size), head="scalar")
    with torch.no_grad():
        rm.score.weight.zero_()
        rm.score.bias.fill_(3.0)
    save_checkpoint(tmp_path / "rm", rm, tok, meta={"stage": "rm", "reward_mean": 1.0, "reward_std": 0.5})
    res = evaluate_policies({"sft": policies["sft"], "ppo": policies["other"]}, prompts_file, rm_dir=tmp_path / "rm",
                            max_new_tokens=6, progress=False)
    assert [r["rm_score"] for r in res["policies"].values()] == [pytest.approx(4.0, abs=1e-5)] * 2
