"""GRPO: group advantages by hand, the first ratio and KL at the reference, token-level normalisation, learning on
a toy reward, reward sources (reward model, module:function, their weighted sum), CLI with exact resume, and the
world's verifiable rewards."""

import json
import math
import random
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmforge.checkpoint import load_model, load_training_state, read_config, save_checkpoint
from lmforge.cli import main
from lmforge.config import load_config
from lmforge.errors import LmforgeError
from lmforge.lora import LoRALinear
from lmforge.model import Transformer
from lmforge.rl_utils import clipped_surrogate, group_advantages
from lmforge.rollout import load_prompts
from lmforge.scoring import RewardScorer
from lmforge.rollout import load_reward_fn
from lmforge.stages.grpo import GRPOConfig, build_trainer, run_grpo
from lmforge.training import read_metrics
from lmforge.world import flawed_response, ideal_response, prompt_family, rewards
from lmforge.world.generate import sample_questions
from tests.conftest import tiny_config, tiny_sft_policy

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "grpo_tiny.yaml")


# ---------------------------------------------------------------------------------------------- fixtures

def _write(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def ck(tok, tmp_path_factory):
    """A tiny SFT policy, a decoder and an encoder reward model (same tokenizer), toy prompts and world prompts."""
    d = tmp_path_factory.mktemp("grpo")
    save_checkpoint(d / "sft", tiny_sft_policy(tok), tok, {"stage": "sft"})
    torch.manual_seed(1)
    save_checkpoint(d / "rm", Transformer(tiny_config(), head="scalar"), tok,
                    {"stage": "rm", "backbone": "decoder", "pooling": "last", "reward_mean": 0.25, "reward_std": 2.0})
    save_checkpoint(d / "rm_enc", Transformer(tiny_config(causal=False), head="scalar"), tok,
                    {"stage": "rm", "backbone": "encoder", "pooling": "first", "reward_mean": -0.5})
    toy = _write(d / "prompts.jsonl", [{"Instruction": f"say {i}", "Input": "fox " * (i % 3)} for i in range(8)])
    world = [q.prompt for q in sample_questions("rl", 40, random.Random(0))]
    world = [p for p in world if len(tok.encode(p)) <= 40][:8]  # tiny context: 64 positions
    assert len(world) == 8
    return SimpleNamespace(sft=str(d / "sft"), rm=str(d / "rm"), rm_enc=str(d / "rm_enc"), prompts=toy,
                           world=_write(d / "world.jsonl", [{"instruction": p} for p in world]), world_texts=world)


def _cfg(ck, tmp_path, **kw) -> GRPOConfig:
    base = dict(sft_model=ck.sft, reward_model=ck.rm, prompts=ck.prompts, out=str(tmp_path / "out"), iterations=2,
                prompts_per_iteration=2, group_size=4, minibatch_size=8, micro_batch_size=4, max_new_tokens=8,
                device="cpu")
    base.update(kw)
    return load_config(GRPOConfig, base=base)


def _prompts(ck, tok, path=None, n=2):
    return load_prompts(path or ck.prompts, tok, 8, {"policy": 64})[:n]


def _grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


# ---------------------------------------------------------------------------------------------- the math

def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    std = math.sqrt((4 + 1 + 0 + 9) / 3)  # unbiased (Bessel) std of group 1, as torch.std, DeepSeekMath, TRL
    a = group_advantages(r, 4, scale=True, eps=1e-4)
    expected = torch.tensor([-2.0, -1.0, 0.0, 3.0]) / (std + 1e-4)
    assert torch.allclose(a[:4], expected, atol=1e-6)
    assert torch.equal(a[4:], torch.zeros(4))  # all equal: no signal, exactly 0, no NaN
    dr = group_advantages(r, 4, scale=False)  # Dr. GRPO: centred only
    assert torch.equal(dr, torch.tensor([-2.0, -1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0]))
    pair = group_advantages(torch.tensor([0.0, 1.0, 0.3, 0.3]), 2, eps=0.0)
    assert torch.allclose(pair, torch.tensor([-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0, 0.0]))
    one_value = group_advantages(torch.full((4,), 1 / 3), 4, eps=0.0)  # rounding must not make 0/0
    assert torch.equal(one_value, torch.zeros(4))
    for bad in (1, 3):
        with pytest.raises(ValueError):
            group_advantages(r, bad)


def test_decoupled_clip_by_hand():
    logp, old = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5, 1.25])), torch.zeros(5)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    sym = clipped_surrogate(logp, old, adv, 0.2)
    same = clipped_surrogate(logp, old, adv, 0.2, clip_high=0.2)
    assert all(torch.equal(a, b) for a, b in zip(sym, same))
    loss, _, clipped = clipped_surrogate(logp, old, adv, 0.2, clip_high=0.28)  # DAPO's clip-higher
    assert torch.allclose(loss, torch.tensor([-1.28, 1.5, -0.5, 0.8, -1.25]))
    assert clipped.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]


# ---------------------------------------------------------------------------------------------- trainer

def test_sampler_old_logprobs_match_the_recomputed_ones(ck, tok, tmp_path):
    """old_logprobs "sampler" (what "auto" picks on a CPU): the same rollouts and, to rounding, the same old
    log-probs, KL and first ratio as the teacher-forced recompute."""
    exps = {}
    for choice in ("recompute", "sampler"):
        trainer = build_trainer(_cfg(ck, tmp_path, kl_coef=0.5, old_logprobs=choice), tok)
        exps[choice] = trainer.make_experience(_prompts(ck, tok), torch.Generator().manual_seed(2))
    (exp_r, samples_r, _), (exp_s, samples_s, stats) = exps["recompute"], exps["sampler"]
    assert samples_s.responses == samples_r.responses
    m = exp_s.mask.bool()
    assert torch.allclose(exp_s.logprobs[m], exp_r.logprobs[m], atol=1e-5) and abs(stats["kl"]) < 1e-4
    st = trainer.minibatch_backward(exp_s, torch.arange(8))
    assert st["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and st["clipfrac"] == 0.0


def test_first_ratio_is_one_and_kl_zero_at_the_reference(ck, tok, tmp_path):
    for kw in ({}, {"lora": {"rank": 2, "targets": ["all-linear"]}}):
        trainer = build_trainer(_cfg(ck, tmp_path, kl_coef=0.5, old_logprobs="recompute", **kw), tok)
        assert not any(isinstance(m, LoRALinear) for m in trainer.ref.modules())
        exp, samples, stats = trainer.make_experience(_prompts(ck, tok), torch.Generator().manual_seed(2))
        assert exp.input_ids.shape[0] == 8 and len({len(t) for t in samples.responses}) > 1
        assert torch.equal(exp.logprobs, exp.ref_logprobs) and stats["kl"] == 0.0
        rows = torch.arange(8)
        st = trainer.minibatch_backward(exp, rows)  # the same rows and chunks as the recompute: ratio exactly 1
        # Every token's ratio is exactly 1 (approx_kl sums r - 1 - log r: exactly 0 only then); their weighted
        # mean is 1 up to the rounding of the fp32 token weights 1/n, which depends on the sampled count.
        assert st["approx_kl"] == 0.0 and st["clipfrac"] == 0.0 and st["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
        assert st["kl_loss"] == 0.0
        with_kl = _grads(trainer.policy)
        trainer.policy.zero_grad(set_to_none=True)
        trainer.cfg.kl_coef = 0.0  # k3's gradient vanishes at pi = pi_ref: the KL term adds nothing yet
        trainer.minibatch_backward(exp, rows)
        for a, b in zip(with_kl, _grads(trainer.policy)):
            assert torch.allclose(a, b, atol=1e-7)
        assert any(g.abs().sum() > 0 for g in with_kl)


def test_rewards_penalty_and_advantages_per_group(ck, tok, tmp_path):
    ones = lambda prompts, texts, ids: [1.0] * len(texts)  # noqa: E731
    trainer = build_trainer(_cfg(ck, tmp_path, reward_model="", max_new_tokens=4, no_eos_penalty=0.75,
                                 prompts_per_iteration=4), tok, reward_fn=ones)
    exp, samples, stats = trainer.make_experience(_prompts(ck, tok, n=4), torch.Generator().manual_seed(3))
    assert 0 < sum(samples.ended) < 16
    expected = torch.tensor([1.0 if e else 0.25 for e in samples.ended])
    assert torch.equal(exp.scores, expected)
    adv = group_advantages(expected, 4)
    assert torch.equal(exp.advantages, adv[:, None] * exp.mask)  # one advantage on every response token
    groups = expected.view(4, 4)
    assert stats["zero_std_frac"] == (groups == groups[:, :1]).all(1).float().mean().item()
    assert stats["eos_frac"] == sum(samples.ended) / 16 and stats["reward"] == pytest.approx(expected.mean().item())


def test_minibatch_gradient_does_not_depend_on_micro_batching(ck, tok, tmp_path):
    grads = {}
    for norm in ("token", "sequence"):
        trainer = build_trainer(_cfg(ck, tmp_path, loss_norm=norm, reward_model="", max_new_tokens=6), tok,
                                reward_fn=lambda p, t, ids: [float(len(x)) for x in ids])
        exp, _, _ = trainer.make_experience(_prompts(ck, tok), torch.Generator().manual_seed(4))
        rows = torch.tensor([5, 0, 3, 6, 1, 7, 2, 4])
        results = []
        for micro in (8, 2, 1):
            trainer.cfg.micro_batch_size = micro
            st = trainer.minibatch_backward(exp, rows)
            results.append(_grads(trainer.policy))
            trainer.policy.zero_grad(set_to_none=True)
        for g in results[1:]:
            for a, b in zip(g, results[0]):
                assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
        # ratio 1: the surrogate is -A per token; token: sum over all tokens / their count; sequence: mean of means
        lengths, a = exp.mask.sum(1), exp.advantages[:, 0]
        by_hand = -(a * lengths).sum() / lengths.sum() if norm == "token" else -a.mean()
        assert st["pg_loss"] == pytest.approx(by_hand.item(), abs=1e-6)
        grads[norm] = results[0]
    assert len(set(lengths.tolist())) > 1
    assert any(not torch.allclose(a, b) for a, b in zip(grads["token"], grads["sequence"]))


def _toy_run(ck, tok, tmp_path, kl_coef):
    """GRPO on the share of the token ' fox' among the response tokens (about 0.1 for the SFT policy), as in
    test_ppo.py; 16 responses (4 prompts x 4) per iteration, 20 iterations."""
    fox = tok.encode(" fox")
    assert len(fox) == 1

    def fox_share(prompts, texts, ids):
        return [sum(t == fox[0] for t in r) / len(r) for r in ids]
    optim = {"lr": 2e-3, "eps": 1e-5, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0}
    cfg = _cfg(ck, tmp_path, out=str(tmp_path / f"kl{kl_coef}"), iterations=20, prompts_per_iteration=4,
               group_size=4, minibatch_size=8, micro_batch_size=8, max_new_tokens=8, kl_coef=kl_coef,
               no_eos_penalty=0.0, reward_model="", optim=optim)
    return run_grpo(cfg, progress=False, reward_fn=fox_share), read_metrics(cfg.out)


def _mean(rows, key):
    return sum(r[key] for r in rows) / len(rows)


def test_grpo_learns_a_toy_reward_and_kl_coef_holds_it_near_the_reference(ck, tok, tmp_path):
    summary, m = _toy_run(ck, tok, tmp_path, kl_coef=0.0)
    first, last = _mean(m[:5], "reward"), _mean(m[-5:], "reward")
    assert last > first + 0.3 and last > 3 * first, (first, last)  # ~0.11 -> ~0.8
    assert all(r["skipped_steps"] == 0 for r in m) and 0.8 < _mean(m, "ratio_mean") < 1.2
    assert {"zero_std_frac", "kl", "kl_loss", "clipfrac", "entropy", "response_len", "eos_frac", "time_generate",
            "time_update", "reward_fn", "grad_norm"} <= set(m[0])
    assert summary["reward_last"] == m[-1]["reward"] and summary["kl_last"] == m[-1]["kl"] > 10
    assert set(summary) >= {"iterations", "seconds", "out", "reward_first", "eos_frac_last", "zero_std_frac_last"}
    _, m = _toy_run(ck, tok, tmp_path, kl_coef=1.0)  # the k3 term in the loss: KL stays ~1 nat, not ~30
    assert _mean(m[-5:], "kl") < 3.0


# ---------------------------------------------------------------------------------------------- rewards

def test_weighted_sum_of_a_reward_model_and_a_world_reward_fn(ck, tok, tmp_path):
    for rm in (ck.rm, ck.rm_enc):  # decoder and encoder reward models both score the rollouts
        cfg = _cfg(ck, tmp_path, prompts=ck.world, reward_model=rm, reward_fn="lmforge.world.rewards:oracle",
                   reward_model_weight=0.5, reward_fn_weight=2.0, no_eos_penalty=0.0)
        trainer = build_trainer(cfg, tok)
        prompts = _prompts(ck, tok, ck.world)
        exp, samples, stats = trainer.make_experience(prompts, torch.Generator().manual_seed(5))
        batch = [p for p in prompts for _ in range(4)]
        bodies = [tok.decode(t[:-1] if e else t) for t, e in zip(samples.responses, samples.ended)]
        rm_scores = RewardScorer.load(rm).score_rollouts(batch, samples.responses, tok)
        if rm == ck.rm_enc:  # the encoder re-encodes (prompt, response text) in its own layout
            assert torch.allclose(rm_scores, torch.tensor(RewardScorer.load(rm).score([p.text for p in batch], bodies)))
        fn_scores = torch.tensor(rewards.oracle([p.text for p in batch], bodies, samples.responses))
        assert torch.allclose(exp.scores, 0.5 * rm_scores + 2.0 * fn_scores, atol=1e-5)
        assert stats["reward_rm"] == pytest.approx(rm_scores.mean().item(), abs=1e-5)
        assert stats["reward_fn"] == pytest.approx(fn_scores.mean().item(), abs=1e-6)


def test_reward_fn_from_module_and_bad_names(ck, tok, tmp_path):
    assert load_reward_fn("lmforge.world.rewards:correctness") is rewards.correctness
    trainer = build_trainer(_cfg(ck, tmp_path, prompts=ck.world, reward_model="",
                                 reward_fn="lmforge.world.rewards:correctness"), tok)
    assert set(trainer.rewards) == {"fn"}
    _, _, stats = trainer.make_experience(_prompts(ck, tok, ck.world), torch.Generator().manual_seed(6))
    assert 0.0 <= stats["reward_fn"] <= 1.0
    with pytest.raises(LmforgeError, match="scores only the built-in world's prompts"):  # toy prompts: no world
        trainer.make_experience(_prompts(ck, tok), torch.Generator().manual_seed(6))


# ---------------------------------------------------------------------------------------------- recipe

def _args(ck, out, *extra):
    return ["grpo", "--config", CONFIG, f"sft_model={ck.sft}", f"reward_model={ck.rm}", f"prompts={ck.world}",
            f"out={out}", "prompts_per_iteration=2", "group_size=2", "minibatch_size=2", "micro_batch_size=1",
            "max_new_tokens=6", "device=cpu", "optim.lr=1e-3", "kl_coef=0.1", *extra]


def _weights(path):
    model, _, meta = load_model(path, head="lm")
    return model.state_dict(), meta


def test_cli_end_to_end_and_exact_resume(ck, tok, tmp_path, capsys):
    for lora in ([], ["lora.rank=2"]):
        straight, resumed = tmp_path / f"straight{len(lora)}", tmp_path / f"resumed{len(lora)}"
        assert main(_args(ck, straight, "iterations=4", "save_every=2", *lora)) == 0
        assert "grpo: 4 iterations" in capsys.readouterr().out
        assert main(_args(ck, resumed, "iterations=2", *lora)) == 0
        assert main(_args(ck, resumed, "iterations=2", *lora)) == 1  # a rerun needs overwrite=true
        assert "already holds a run" in capsys.readouterr().err
        assert main(_args(ck, resumed, *lora, "iterations=4", "--resume")) == 0
        a, meta = _weights(straight)
        b, _ = _weights(resumed)
        assert meta["stage"] == "grpo" and meta["iteration"] == 4 and meta["lora_rank"] == (2 if lora else 0)
        assert not any("lora" in k for k in a) and all(torch.equal(a[k], b[k]) for k in a)
        sft = _weights(ck.sft)[0]
        assert any(not torch.equal(sft[k], a[k]) for k in a)
        assert ("policy_trainable" in load_training_state(resumed)) == bool(lora)
        assert [r["step"] for r in read_metrics(resumed)] == [1, 2, 3, 4]
        assert read_metrics(resumed)[-1]["reward"] == read_metrics(straight)[-1]["reward"]
        samples = [json.loads(line) for line in (resumed / "samples.jsonl").read_text().splitlines()]
        assert [s["iteration"] for s in samples] == [1, 1, 2, 2, 3, 3, 4, 4]
        assert {"prompt", "response", "reward", "advantage", "ended"} <= set(samples[0])
        run = json.loads((resumed / "run.json").read_text())
        assert run["stage"] == "grpo" and run["summary"]["iterations"] == 4
    assert main(_args(ck, tmp_path / "x", "iterations=2", "--resume")) == 1
    assert "no checkpoint to resume" in capsys.readouterr().err
    assert main(_args(ck, resumed, "lora.rank=4", "iterations=6", "--resume")) == 1
    assert "config key 'lora.rank' differs" in capsys.readouterr().err
    assert read_config(resumed)["lmforge"]["reward_fn"] == "lmforge.world.rewards:correctness"


def test_bad_inputs_fail_before_training(ck, tok, tmp_path, capsys):
    cases = [
        ({"reward_fn": "no_such_module_xyz:f"}, r"config key 'reward_fn': cannot import module 'no_such_module_xyz' "
                                                r"\(ModuleNotFoundError"),
        ({"reward_fn": "lmforge.world.rewards:nothing"}, r"config key 'reward_fn': module 'lmforge.world.rewards' "
                                                         r"has no attribute 'nothing'"),
        ({"reward_fn": "lmforge.world.rewards"}, r"config key 'reward_fn' must be 'module:function'"),
        ({"reward_fn": "", "reward_model": ""}, r"config key 'reward_model' or 'reward_fn' is required"),
        ({"reward_model": ck.sft}, "not a reward model checkpoint"),
        ({"group_size": 1}, r"config key 'group_size' must be >= 2"),
        ({"minibatch_size": 3}, r"'minibatch_size' \(3\) must divide the batch, prompts_per_iteration \* "
                                r"group_size \(4\)"),
        ({"micro_batch_size": 3, "minibatch_size": 4}, r"'micro_batch_size' \(3\) must divide minibatch_size \(4\)"),
        ({"loss_norm": "mean"}, r"config key 'loss_norm': expected one of \['token', 'sequence'\]"),
        ({"lora.rank": 2, "lora.dropout": 0.1}, "config key 'lora.dropout' must be 0"),
        ({"prompts": str(tmp_path / "nope.jsonl")}, "nope.jsonl: file not found"),
        # the world's verifiable reward on prompts the world did not write: refused before any model is loaded
        ({"reward_fn": "lmforge.world.rewards:correctness", "prompts": _write(tmp_path / "own.jsonl", [{"instruction": "say 1"}])},
         r"config key 'reward_fn' \(lmforge.world.rewards:correctness\) cannot score the prompts of .*own.jsonl: "
         r".*'say 1'.*built-in world"),
    ]
    for i, (overrides, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert main(_args(ck, out) + [f"{k}={v}" for k, v in overrides.items()]) == 1, overrides
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert re.search(message, err), (message, err)
        assert not out.exists()


def test_identical_responses_score_identically_and_encoder_cuts_the_prompt(ck, tok):
    """A group of identical responses must get identical rewards (no advantage from padding noise), and an
    encoder past its context loses the prompt's oldest tokens, never the response."""
    from lmforge.prompts import Prompt
    from lmforge.scoring import RewardScorer, render_example

    rm = RewardScorer.load(ck.rm)
    p = Prompt([{"role": "user", "content": "say 1"}], "say 1")
    p.ids = load_prompts(ck.prompts, tok, 8, {"policy": 64})[0].ids
    same, other = tok.encode("fox fox") + [tok.special.end], tok.encode("dog") + [tok.special.end]
    long = tok.encode("the quick brown fox jumps over the lazy dog " * 3) + [tok.special.end]
    scores = rm.score_rollouts([p] * 6, [same, long, same, other, long, same], tok, batch_size=2)
    assert scores[0] == scores[2] == scores[5] and scores[1] == scores[4]
    enc = RewardScorer.load(ck.rm_enc)
    limit = enc.model.config.max_position_embeddings
    chat_prompt = Prompt([{"role": "user", "content": "apple " * 80}], "apple " * 80)
    full = render_example(enc.tokenizer, chat_prompt.messages, "dog", encoder=True)
    assert len(full) > limit
    cut = full[:1] + full[len(full) - limit + 1:]
    assert cut[-3:] == tok.encode("dog") + [tok.special.eos] and len(cut) == limit
    got = enc.score_rollouts([chat_prompt], [other], tok)
    expected = enc.score_rollouts([chat_prompt], [other], tok)  # deterministic, and equal to scoring `cut` directly
    from lmforge.scoring import normalize, score_sequences
    direct = normalize(score_sequences(enc.model, [cut], tok.special.pad, enc.pooling), enc.meta)
    assert torch.allclose(got, expected) and torch.allclose(got, direct, atol=1e-6)


def test_stage_declaration():
    from lmforge.stage import StageContext
    from lmforge.stages.grpo import STAGE

    ctx = StageContext(Path("/r"), 0, "cpu", {"sft_model": "s", "reward_model": "m", "rl_prompts": "p.jsonl"}, {})
    assert STAGE.wire(ctx) == {"sft_model": "s", "reward_model": "m", "prompts": "p.jsonl", "out": "/r/grpo",
                               "device": "cpu", "overwrite": True}
    assert STAGE.policy == "grpo" and STAGE.branch and STAGE.outputs == {"grpo_model": ""}


# ---------------------------------------------------------------------------------------------- world rewards

def test_world_rewards_score_ideal_and_wrong_answers():
    prompts = [q.prompt for q in sample_questions("rl", 30, random.Random(1))]
    ideal = [ideal_response(p) for p in prompts]
    wrong = [flawed_response(p, wrong=True) for p in prompts]
    assert rewards.correctness(prompts, ideal, []) == [1.0] * 30
    assert rewards.oracle(prompts, ideal, []) == [1.0] * 30
    exact = [prompt_family(p) in ("arithmetic", "facts", "translate") for p in prompts]
    assert sum(exact) > 10
    for is_exact, c in zip(exact, rewards.correctness(prompts, wrong, [])):
        assert c == 0.0 if is_exact else 0.0 <= c < 1.0  # a word list echoed unchanged earns partial credit
    assert all(0.0 <= s < 1.0 for s in rewards.oracle(prompts, wrong, []))
    assert rewards.correctness(["Reverse the word order\ncat dog bird"], ["cat dog bird"], [[]]) == [20 / 60]
    with pytest.raises(LmforgeError, match=r"^oracle: prompt of no known task family: 'say 1'; "
                                           r"lmforge.world.rewards scores only the built-in world's prompts"):
        rewards.correctness(["say 1"], ["fox"], [[1]])
