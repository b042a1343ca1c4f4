"""DPO: the losses against hand computations, pair construction, response log-probs against brute force, the
policy-equals-reference identity, learning a toy preference, CLI with exact resume, LoRA, and bad input."""

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch

from lmforge.chat import render_prompt
from lmforge.checkpoint import load_model, load_training_state, save_checkpoint
from lmforge.cli import COMMANDS, main, usage
from lmforge.errors import LmforgeError
from lmforge.lora import LoraConfig, apply_lora, load_trainable_state_dict
from lmforge.model import Transformer
from lmforge.preferences import load_data, preference_pairs
from lmforge.rl_utils import dpo_loss
from lmforge.stage import StageContext
from lmforge.stages.dpo import (STAGE, DPOBatches, DPOConfig, EncodedPair, collate, dpo_batch_loss, evaluate,
                                load_dpo_data, pair_logprobs, response_logprobs, response_start, run_dpo)
from lmforge.training import OptimConfig, read_metrics
from tests.conftest import tiny_config

FILL = ["fox", "dog", "quick", "lazy", "brown", "red", "jumps"]
CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "dpo_tiny.yaml")


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def _init(path, tok, head="lm") -> str:
    torch.manual_seed(0)
    save_checkpoint(path, Transformer(tiny_config(tok.vocab_size), head=head), tok, meta={"stage": "sft"})
    return str(path)


def _pairwise(n: int, seed: int = 0) -> list[dict]:
    """The synthetic rule: the chosen response mentions an apple, the rejected one does not."""
    rng = random.Random(seed)
    words = lambda k: [rng.choice(FILL) for _ in range(k)]  # noqa: E731
    return [{"input": f"say {i}", "chosen": " ".join(["apple"] + words(rng.randint(1, 4))),
             "rejected": " ".join(words(rng.randint(1, 5)))} for i in range(n)]


def _ranked(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"input": f"{rng.choice(FILL)} {i}",
             "choices": [{"text": " ".join(["apple"] * (3 - r) + [rng.choice(FILL)] * r), "rank": r}
                         for r in rng.sample([1, 2, 3], 3)]} for i in range(n)]


def _cfg(init, data, out, **kw) -> DPOConfig:
    base = dict(init=str(init), data=str(data), out=str(out), val_fraction=0.25, batch_size=4, device="cpu",
                log_every=1, optim=OptimConfig(lr=3e-3, warmup_steps=2, weight_decay=0.0))
    base.update(kw)
    return DPOConfig(**base)


@pytest.fixture(scope="module")
def sft(tok, tmp_path_factory):
    return _init(tmp_path_factory.mktemp("dpo") / "sft", tok)


# ------------------------------------------------------------------------------------------- the losses


def test_dpo_losses_match_hand_computation():
    # chosen log-ratio -3 - (-4) = 1, rejected -5 - (-4.5) = -0.5: margin m = 1.5; with beta = 0.5, beta m = 0.75
    pc, pr, rc, rr = (torch.tensor([v, v]) for v in (-3.0, -5.0, -4.0, -4.5))
    pc[1] = 0.5  # second pair: chosen log-ratio 4.5, m = 5, beta m = 2.5
    args = (pc, pr, rc, rr, 0.5)
    loss, r_c, r_r = dpo_loss(*args)
    torch.testing.assert_close(loss, torch.tensor([math.log(1 + math.exp(-0.75)), math.log(1 + math.exp(-2.5))]))
    torch.testing.assert_close(r_c, torch.tensor([0.5, 2.25]))     # beta * (logp - logp_ref)
    torch.testing.assert_close(r_r, torch.tensor([-0.25, -0.25]))
    cdpo = dpo_loss(*args, loss="sigmoid", label_smoothing=0.1)[0]  # 0.9 * -log s(0.75) + 0.1 * -log s(-0.75)
    assert cdpo[0].item() == pytest.approx(0.9 * math.log(1 + math.exp(-0.75)) + 0.1 * math.log(1 + math.exp(0.75)))
    ipo = dpo_loss(*args, loss="ipo")[0]                            # (m - 1 / (2 beta))^2 = (1.5 - 1)^2, (5 - 1)^2
    torch.testing.assert_close(ipo, torch.tensor([0.25, 16.0]))
    hinge = dpo_loss(*args, loss="hinge")[0]                        # max(0, 1 - beta m)
    torch.testing.assert_close(hinge, torch.tensor([0.25, 0.0]))
    # the reference is a constant: gradients reach the policy's log-probs only
    pc, rc = pc.clone().requires_grad_(), rc.clone().requires_grad_()
    dpo_loss(pc, pr, rc, rr, 0.5)[0].sum().backward()
    assert rc.grad is None and pc.grad[0].item() == pytest.approx(-0.5 / (1 + math.exp(0.75)))


# ------------------------------------------------------------------------------------------- pairs


def test_pairs_from_ranked_with_a_tie_pairwise_and_scored_records(tok, tmp_path):
    prefs = _write(tmp_path / "prefs.jsonl", [
        {"input": "q", "choices": [{"text": "x", "rank": 2}, {"text": "y", "rank": 1}, {"text": "z", "rank": 2}]},
        {"prompt": "r", "chosen": "good", "rejected": "bad"}])
    examples, _ = load_data(prefs, tok, encoder=False, max_len=64)
    pairs = preference_pairs(examples)
    assert [(p.chosen, p.rejected) for p in pairs] == [("y", "x"), ("y", "z"), ("good", "bad")]  # x, z tie: no pair
    assert pairs[0].chosen_ids == examples[0].ids[1] and pairs[0].rejected_ids == examples[0].ids[0]
    assert pairs[2].origin == pairs[2].rejected_origin == f"{prefs}:2"
    scored = _write(tmp_path / "scored.jsonl", [
        {"input": "p1", "output": "o1", "score": 3}, {"input": "p2", "output": "lonely", "score": 9},
        {"input": "p1", "output": "o2", "score": 5.5}, {"input": "p1", "output": "o3", "score": 3}])
    pairs = preference_pairs(load_data(scored, tok, encoder=False, max_len=64)[0])
    # within p1: o2 beats o1 and o3, o1 = o3 gives no pair; p2 has one response, so no pair
    assert [(p.chosen, p.rejected, p.origin, p.rejected_origin) for p in pairs] == [
        ("o2", "o1", f"{scored}:3", f"{scored}:1"), ("o2", "o3", f"{scored}:3", f"{scored}:4")]


def test_response_tokens_follow_the_prompt_rendering_and_end_with_the_end_of_turn_token(tok, sft, tmp_path):
    data = _write(tmp_path / "p.jsonl", _pairwise(4))
    d = load_dpo_data(_cfg(sft, data, tmp_path / "out", val_fraction=0.0))
    prompt = render_prompt(tok, [{"role": "user", "content": "say 0"}])
    p = d.train[0]
    assert p.start == len(prompt) and p.chosen[:p.start] == p.rejected[:p.start] == prompt
    assert p.chosen[-1] == p.rejected[-1] == tok.special.end
    assert tok.decode(p.chosen[p.start:]) == _pairwise(4)[0]["chosen"]
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]  # a chat prompt record
    d = load_dpo_data(_cfg(sft, _write(tmp_path / "c.jsonl", [{"messages": chat, "chosen": "a", "rejected": "b"}]),
                           tmp_path / "out", val_fraction=0.0))
    assert d.train[0].start == len(render_prompt(tok, chat)) and d.train[0].chosen[d.train[0].start:] == \
        tok.encode("a") + [tok.special.end]
    with pytest.raises(LmforgeError, match=r"^data.jsonl:7: the chat template's prompt rendering .* is not a prefix"):
        response_start([1, 2, 3], [1, 2, 4, 5], "data.jsonl:7")
    with pytest.raises(LmforgeError, match="not a prefix"):  # no response token after the prompt
        response_start([1, 2, 3], [1, 2, 3], "data.jsonl:7")


# ------------------------------------------------------------------------------------------- log-probs


def _brute_force(model, ids: list[int], start: int) -> float:
    """Full forward of the sequence alone, fp32 log-softmax, summed over the response positions."""
    logp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    return sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids)))


def test_response_logprobs_equal_brute_force_on_a_padded_batch_of_mixed_lengths(tok):
    torch.manual_seed(3)
    model = Transformer(tiny_config(tok.vocab_size)).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [(torch.randint(5, 300, (n,), generator=g).tolist(), s) for n, s in ((9, 4), (3, 2), (17, 5), (6, 1))]
    batch = collate(seqs, tok.special.pad)
    assert batch["ids"].shape == (4, 17) and batch["rows"].numel() == 5 + 1 + 12 + 5
    with torch.no_grad():
        got = response_logprobs(model, batch)
    torch.testing.assert_close(got, torch.tensor([_brute_force(model, s, st) for s, st in seqs]), atol=1e-5, rtol=1e-5)
    # pairs in chunks sorted by length come back in order, [chosen, rejected]
    pairs = [EncodedPair(2, seqs[i][0][:2] + seqs[i][0], seqs[j][0][:2] + seqs[j][0])
             for i, j in ((0, 1), (2, 3), (1, 2))]
    lp = pair_logprobs(model, pairs, tok.special.pad, batch_size=2)
    want = [[_brute_force(model, p.chosen, 2), _brute_force(model, p.rejected, 2)] for p in pairs]
    torch.testing.assert_close(lp, torch.tensor(want), atol=1e-5, rtol=1e-5)


def test_policy_equal_to_reference_has_zero_margin_and_loss_log2(tok, sft, tmp_path):
    cfg = _cfg(sft, _write(tmp_path / "r.jsonl", _ranked(12)), tmp_path / "out", val_fraction=0.0)
    d = load_dpo_data(cfg)
    assert len(d.train) == 36  # 12 prompts x C(3, 2) pairs
    model = load_model(sft)[0]
    ref = pair_logprobs(model, d.train, tok.special.pad, cfg.eval_batch_size)
    m = evaluate(model, d.train, ref, cfg, tok.special.pad)
    assert m["margin"] == 0.0 and m["chosen_drift"] == m["rejected_drift"] == 0.0 and m["accuracy"] == 0.5
    assert m["loss"] == pytest.approx(math.log(2), rel=1e-6)
    # the training path (shuffled micro-batches of whole prompts, each response forwarded once, or of single
    # pairs): the same up to float rounding
    for grouped, n_pairs, n_rows in ((True, 24, 24), (False, 8, 16)):
        batch = DPOBatches(d.train, ref, 8, 1, tok.special.pad, 0, "cpu", grouped)(0, 0)
        assert len(batch["chosen"]) == n_pairs and batch["n_rows"] <= n_rows  # 8 prompts x 3 responses
        loss, stats, _ = dpo_batch_loss(model.train(), batch, cfg)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-5) and abs(stats["margin"]) < 1e-6


# ------------------------------------------------------------------------------------------- learning


def test_dpo_learns_a_toy_preference(tok, sft, tmp_path):
    data = _write(tmp_path / "p.jsonl", _pairwise(24))
    cfg = _cfg(sft, data, tmp_path / "out", val_data=data, epochs=6.0, batch_size=8, eval_every=6)
    s = run_dpo(cfg, progress=False)
    val = [r for r in read_metrics(cfg.out) if "val_accuracy" in r]
    assert val[0]["step"] == 6 and s["steps"] == 18
    assert s["heldout_accuracy"] > 0.9 and s["heldout_margin"] > 0.5
    first = read_metrics(cfg.out)[0]
    assert first["accuracy"] == 0.5 and first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    # chosen minus rejected log-prob of the trained policy rose against the reference's
    d = load_dpo_data(cfg)
    before = pair_logprobs(load_model(sft)[0], d.train, tok.special.pad)
    after = pair_logprobs(load_model(cfg.out)[0], d.train, tok.special.pad)
    gain = (after[:, 0] - after[:, 1]) - (before[:, 0] - before[:, 1])
    assert gain.mean() > 5.0 and (gain > 0).float().mean() > 0.9
    assert s["chosen_drift"] - s["rejected_drift"] == pytest.approx(gain.mean().item(), rel=1e-4)


@pytest.mark.parametrize("loss, extra", [("ipo", {"beta": 0.5}), ("hinge", {}), ("sigmoid", {"label_smoothing": 0.1,
                                                                                            "rpo_alpha": 1.0})])
def test_loss_variants_train(tok, sft, tmp_path, loss, extra):
    data = _write(tmp_path / "p.jsonl", _pairwise(16))
    s = run_dpo(_cfg(sft, data, tmp_path / "out", val_data=data, epochs=3.0, loss=loss, **extra), progress=False)
    assert s["heldout_accuracy"] > 0.8
    if extra.get("rpo_alpha"):
        assert "nll_chosen" in read_metrics(tmp_path / "out")[0]


# ------------------------------------------------------------------------------------------- CLI, resume, LoRA


def _args(sft, data, out, *extra):
    return ["dpo", "--config", CONFIG, "--init", sft, "--data", data, "--out", str(out), "device=cpu", "epochs=2",
            "batch_size=4", "log_every=1", "eval_every=2", *extra]


@pytest.mark.parametrize("rank, grouping, steps", [(0, "group_by_prompt=true", 6), (2, "group_by_prompt=false", 9)])
def test_cli_end_to_end_and_exact_resume(tok, sft, tmp_path, capsys, rank, grouping, steps):
    # 6 train prompts x 3 pairs = 18 pairs: in 2 epochs, 6 steps of 2 prompts or 9 steps of 4 pairs
    data = _write(tmp_path / "r.jsonl", _ranked(8, seed=1))
    lora = [f"lora.rank={rank}", "lora.targets=all-linear", grouping, f"batch_size={2 if steps == 6 else 4}"]
    assert main(_args(sft, data, tmp_path / "full", *lora)) == 0
    assert re.match(r"dpo: heldout_accuracy [\d.]+, heldout_margin -?[\d.]+; log-prob drift chosen .*; 18 train / "
                    rf"6 val pairs, {steps} steps", capsys.readouterr().out)
    assert main(_args(sft, data, tmp_path / "half", *lora, "stop_step=3")) == 0
    assert f"dpo: stopped after step 3 of {steps}" in capsys.readouterr().out
    assert main(_args(sft, data, tmp_path / "half", *lora)) == 1  # not without --resume (or overwrite=true)
    assert "already holds a run" in capsys.readouterr().err
    assert main(_args(sft, data, tmp_path / "half", *lora, "--resume")) == 0
    a, _, meta = load_model(tmp_path / "full", head="lm")
    b = load_model(tmp_path / "half", head="lm")[0]
    assert meta["stage"] == "dpo" and meta["lora_rank"] == rank and meta["step"] == steps
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not any("lora" in k for k in sa)  # a plain policy checkpoint either way
    timing = ("tokens_per_s", "mfu")
    strip = lambda d: [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(d)]  # noqa: E731
    assert strip(tmp_path / "full") == strip(tmp_path / "half")
    runs = [json.loads((tmp_path / d / "run.json").read_text())["summary"] for d in ("full", "half")]
    assert {k: v for k, v in runs[0].items() if "seconds" not in k and k != "out"} == \
           {k: v for k, v in runs[1].items() if "seconds" not in k and k != "out"}


def test_lora_trains_only_adapters_and_saves_a_plain_model(tok, sft, tmp_path):
    lora = LoraConfig(rank=2, alpha=4.0, targets=["q_proj", "v_proj"])
    cfg = _cfg(sft, _write(tmp_path / "p.jsonl", _pairwise(16)), tmp_path / "out", lora=lora, stop_step=2,
               gradient_checkpointing=True)
    assert run_dpo(cfg, progress=False)["stopped_at"] == 2
    state = load_training_state(cfg.out)
    adapters = {f"model.layers.{i}.self_attn.{n}.lora_{m}" for i in range(2) for n in ("q_proj", "v_proj")
                for m in "AB"}
    assert set(state["trainable"]) == adapters
    assert sum(len(g["params"]) for g in state["optimizer"]["param_groups"]) == len(adapters)
    assert state["reference"]["train"].shape == (12, 2) and state["reference"]["val"].shape == (4, 2)
    plain, _, meta = load_model(cfg.out, head="lm")
    assert meta["lora_rank"] == 2 and not any("lora" in k or ".base." in k for k in plain.state_dict())
    base = load_model(sft)[0]
    before, after = base.state_dict(), plain.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"model.layers.{i}.self_attn.{n}.weight" for i in range(2) for n in ("q_proj", "v_proj")}
    apply_lora(base, lora)  # the in-training model, rebuilt from the training state, scores as the merged one
    load_trainable_state_dict(base, state["trainable"])
    pairs = load_dpo_data(cfg).train
    pad = tok.special.pad
    torch.testing.assert_close(pair_logprobs(plain, pairs, pad), pair_logprobs(base, pairs, pad), atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_fail_with_one_line_before_any_output(tok, sft, tmp_path, capsys):
    good = _pairwise(4)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in good[:2]) + '{"input": "q", "chosen": "a"}\n',
                   encoding="utf-8")
    rm_init = _init(tmp_path / "rm", tok, head="scalar")
    data = _write(tmp_path / "p.jsonl", good)
    cases = [
        ([f"data={tmp_path / 'missing.jsonl'}"], r"missing.jsonl: file not found"),
        ([f"data={bad}"], rf"{re.escape(str(bad))}:3: missing 'rejected'"),
        ([f"data={_write(tmp_path / 'solo.jsonl', [{'input': 'q', 'output': 'o', 'score': 1}] * 3)}"],
         r"no preference pairs to train on .*same prompt and different scores"),
        ([f"init={rm_init}"], "scalar-head"),
        (["loss=ipo", "label_smoothing=0.1"], r"config key 'label_smoothing' applies to loss=sigmoid only"),
        (["beta=0"], r"config key 'beta' must be positive"),
        (["lora.rank=2", "lora.dropout=0.1"], r"config key 'lora.dropout' must be 0"),
        (["loss=kto"], r"config key 'loss': expected one of"),
    ]
    for i, (extra, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert main(["dpo", f"init={sft}", f"data={data}", f"out={out}", "device=cpu", *extra]) == 1, extra
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and err.startswith("lmforge dpo: error: ")
        assert re.search(message, err), (message, err)
        assert not out.exists()
    # resume refuses other pairs: its cached reference log-probs belong to the old ones
    assert main(["dpo", f"init={sft}", f"data={data}", f"out={tmp_path / 'run'}", "device=cpu", "stop_step=1",
                 "val_fraction=0", "batch_size=2"]) == 0
    other = _write(tmp_path / "other.jsonl", _pairwise(4, seed=9))
    assert main(["dpo", f"init={sft}", f"data={other}", f"out={tmp_path / 'run'}", "device=cpu", "val_fraction=0",
                 "batch_size=2", "--resume"]) == 1
    assert "cannot resume: the preference pairs differ" in capsys.readouterr().err


def test_registered_as_a_command_and_a_pipeline_branch(tmp_path):
    assert COMMANDS["dpo"] == "lmforge.stages.dpo:COMMAND" and "dpo " in usage()
    ctx = StageContext(tmp_path, 0, "cpu", artifacts={"sft_model": "S", "preferences": "P"}, policies={})
    assert STAGE.wire(ctx) == {"init": "S", "data": "P", "out": str(tmp_path / "dpo"), "device": "cpu",
                               "overwrite": True}
    assert (STAGE.name, STAGE.policy, STAGE.branch, STAGE.inputs) == ("dpo", "dpo", True, ("sft_model", "preferences"))
