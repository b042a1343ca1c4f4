"""PPO: the RL math against hand computations and brute force, rollout/scoring invariants, gradient identities
(micro-batching, PPO-ptx, EMA), learning on a toy reward, resume, and bad-input errors."""

import json
import math
import re
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmforge.chat import render, render_completion, stop_ids, turn_stop_ids
from lmforge.checkpoint import load_model, load_training_state, read_config, save_checkpoint
from lmforge.cli import main
from lmforge.config import load_config
from lmforge.errors import LmforgeError
from lmforge.losses import lm_loss
from lmforge.generation import SamplingParams, generate
from lmforge.lora import LoraConfig, LoRALinear, apply_lora, load_trainable_state_dict, plain_model
from lmforge.model import Transformer
from lmforge.rollout import prompt_indices
from lmforge.stages.ppo import PPOConfig, PtxSource, build_trainer, run_ppo
from lmforge.scoring import RewardScorer, fold_normalization, normalize
from lmforge.rl_utils import (KLController, clipped_surrogate, clipped_value_loss, gae, kl_estimate, masked_mean,
                              masked_var, masked_whiten, token_rewards)
from lmforge.rollout import load_prompts, policy_logprobs, sample_responses
from lmforge.tokenizer import train_tokenizer
from lmforge.training import read_metrics
from tests.conftest import tiny_config, tiny_sft_policy



# ---------------------------------------------------------------------------------------------- fixtures



@pytest.fixture(scope="module")
def ck(tok, tmp_path_factory):
    """Paths of a tiny SFT policy, a tiny reward model (same tokenizer) and a prompt file of mixed lengths."""
    d = tmp_path_factory.mktemp("ppo")
    save_checkpoint(d / "sft", tiny_sft_policy(tok), tok, {"stage": "sft"})
    torch.manual_seed(1)
    save_checkpoint(d / "rm", Transformer(tiny_config(), head="scalar"), tok,
                    {"stage": "rm", "pooling": "last", "reward_mean": 0.25, "reward_std": 2.0})
    prompts = d / "prompts.jsonl"
    with open(prompts, "w", encoding="utf-8") as f:
        for i in range(12):
            if i % 3 == 0:
                rec = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"say {i}"}]}
            else:
                rec = {"Instruction": f"say {i}", "Input": "fox " * (i % 4)}
            f.write(json.dumps(rec) + "\n")
    return SimpleNamespace(dir=d, sft=str(d / "sft"), rm=str(d / "rm"), prompts=str(prompts))


def _cfg(ck, tmp_path, **kw) -> PPOConfig:
    base = dict(sft_model=ck.sft, reward_model=ck.rm, prompts=ck.prompts, out=str(tmp_path / "out"),
                iterations=2, batch_size=8, minibatch_size=4, micro_batch_size=2, max_new_tokens=8, device="cpu")
    base.update(kw)
    return load_config(PPOConfig, base=base)


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def _prompts(ck, tok, n=8):
    return load_prompts(ck.prompts, tok, 8, {"policy": 64})[:n]


# ---------------------------------------------------------------------------------------------- pure math

def _gae_brute(r, v, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, V after the end = 0."""
    L, out = len(r), []
    for t in range(L):
        a = 0.0
        for k in range(t, L):
            v_next = v[k + 1] if k + 1 < L else 0.0
            a += (gamma * lam) ** (k - t) * (r[k] + gamma * v_next - v[k])
        out.append(a)
    return out


def test_gae_matches_brute_force_on_padded_batch():
    g = torch.Generator().manual_seed(0)
    lengths, T = [5, 2, 7, 1], 7
    rewards = torch.randn(4, T, generator=g, dtype=torch.float64)
    values = torch.randn(4, T, generator=g, dtype=torch.float64)  # garbage in the padding must not leak
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).double()
    for gamma, lam in [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)]:
        adv, ret = gae(rewards, values, mask, gamma, lam)
        for i, L in enumerate(lengths):
            expected = torch.tensor(_gae_brute(rewards[i, :L].tolist(), values[i, :L].tolist(), gamma, lam),
                                    dtype=torch.float64)
            assert torch.allclose(adv[i, :L], expected, atol=1e-12)
            assert torch.allclose(ret[i, :L], adv[i, :L] + values[i, :L], atol=1e-12)
            assert (adv[i, L:] == 0).all() and (ret[i, L:] == 0).all()
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)  # no discount, lambda 1: returns are the rewards-to-go
    togo = (rewards * mask).flip(1).cumsum(1).flip(1) * mask
    assert torch.allclose(ret, togo, atol=1e-12)


def test_score_lands_on_last_real_response_token_both_padding_sides():
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5], [0.5, 0.4, 0.3, 0.2, 0.1], [1.0, 1.0, 1.0, 1.0, 1.0]])
    scores = torch.tensor([1.0, 2.0, 3.0])
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).float()
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]]).float()
    r = token_rewards(scores, kl * right, right, beta=0.5)
    assert torch.allclose(r, torch.tensor([[-0.05, -0.10, 1.0 - 0.15, 0.0, 0.0],
                                           [-0.25, -0.20, -0.15, -0.10, 2.0 - 0.05],
                                           [3.0 - 0.5, 0.0, 0.0, 0.0, 0.0]]), atol=1e-7)
    r = token_rewards(scores, kl * left, left, beta=0.5)
    assert torch.allclose(r, torch.tensor([[0.0, 0.0, -0.15, -0.20, 1.0 - 0.25],
                                           [-0.25, -0.20, -0.15, -0.10, 2.0 - 0.05],
                                           [0.0, 0.0, 0.0, 0.0, 3.0 - 0.5]]), atol=1e-7)


def test_kl_estimators_by_hand():
    logp, ref = torch.log(torch.tensor([0.5, 0.25])), torch.log(torch.tensor([0.25, 0.5]))
    assert torch.allclose(kl_estimate(logp, ref, "k1"), torch.tensor([0.693147, -0.693147]), atol=1e-6)
    # k3 = r - 1 - log r with r = pi_ref / pi: 0.5 - 1 + log 2 and 2 - 1 - log 2; never negative
    assert torch.allclose(kl_estimate(logp, ref, "k3"), torch.tensor([0.193147, 0.306853]), atol=1e-6)
    assert (kl_estimate(logp, logp, "k1") == 0).all() and (kl_estimate(logp, logp, "k3") == 0).all()


def test_adaptive_kl_controller_moves_beta_the_right_way():
    ctl = KLController(0.1, target=6.0, horizon=10000)
    assert ctl.update(12.0, 256) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))    # error clipped at +0.2
    ctl = KLController(0.1, target=6.0, horizon=10000)
    assert ctl.update(3.0, 256) == pytest.approx(0.1 * (1 - 0.2 * 256 / 10000))     # clipped at -0.2
    ctl = KLController(0.1, target=6.0, horizon=1000)
    assert ctl.update(6.6, 100) == pytest.approx(0.1 * (1 + 0.1 * 100 / 1000))      # proportional inside
    for _ in range(50):
        ctl.update(0.0, 100)
    assert ctl.value < 0.1
    assert KLController(0.1).update(100.0, 256) == 0.1                               # no target: fixed


def test_masked_whitening():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 5.0, -99.0, -99.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    valid = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert masked_mean(x, m) == pytest.approx(3.0) and masked_var(x, m) == pytest.approx(valid.var().item())
    w = masked_whiten(x, m)
    assert masked_mean(w, m) == pytest.approx(0.0, abs=1e-6) and masked_var(w, m) == pytest.approx(1.0, abs=1e-5)
    assert (w[m == 0] == 0).all()
    w = masked_whiten(x, m, shift_mean=False)  # reward whitening: spread rescaled, mean kept
    assert masked_mean(w, m) == pytest.approx(3.0, abs=1e-6)
    one = torch.tensor([[0.0, 1.0, 0.0]])
    assert torch.equal(masked_whiten(torch.tensor([[5.0, 7.0, 9.0]]), one), torch.tensor([[0.0, 7.0, 0.0]]))


def test_clipped_losses_by_hand():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, ratio, clipped = clipped_surrogate(logp, old, adv, clip=0.2)
    assert torch.allclose(ratio, torch.tensor([1.5, 1.5, 0.5, 0.5]))
    assert torch.allclose(loss, torch.tensor([-1.2, 1.5, -0.5, 0.8]))
    assert clipped.tolist() == [1.0, 0.0, 0.0, 1.0]
    _, ratio, _ = clipped_surrogate(torch.tensor([100.0]), torch.tensor([0.0]), torch.tensor([1.0]), 0.2)
    assert torch.isfinite(ratio).all() and ratio.item() == pytest.approx(torch.exp(torch.tensor(20.0)).item())
    v, v_old, ret = torch.tensor([1.0, 0.1, -1.0]), torch.zeros(3), torch.tensor([0.5, 1.0, -1.0])
    loss, vclip = clipped_value_loss(v, v_old, ret, clip=0.2)
    assert torch.allclose(loss, torch.tensor([0.125, 0.405, 0.32]))
    assert vclip.tolist() == [0.0, 0.0, 1.0]


def test_prompt_indices_cover_every_prompt_once_per_pass():
    seen = [i for it in range(5) for i in prompt_indices(10, it, 4, seed=3)]  # 20 draws = 2 passes over 10
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != list(range(10))
    assert prompt_indices(10, 2, 4, seed=3) == prompt_indices(10, 2, 4, seed=3)


# ---------------------------------------------------------------------------------------------- rollouts

def test_rollout_logprobs_equal_teacher_forced_recompute(ck, tok):
    actor, _, _ = load_model(ck.sft)
    prompts = _prompts(ck, tok)
    assert len({len(p.ids) for p in prompts}) > 2
    for temperature in (1.0, 0.7):
        samples = sample_responses(actor, tok, prompts, SamplingParams(8, temperature),
                                   torch.Generator().manual_seed(0))
        lengths = [len(t) for t in samples.responses]
        assert len(set(lengths)) > 1
        with torch.no_grad():
            recomputed = policy_logprobs(actor, samples.experience, temperature)
            untempered = policy_logprobs(actor, samples.experience, 1.0)
        for i, lp in enumerate(samples.gen_logprobs):
            assert torch.allclose(recomputed[i, :len(lp)], torch.tensor(lp), atol=1e-4)
            mask = samples.experience.mask[i]
            assert (mask[:len(lp)] == 1).all() and (mask[len(lp):] == 0).all()
        if temperature != 1.0:
            assert not torch.allclose(recomputed, untempered, atol=1e-3)


def test_reward_model_scores_the_full_sequence_at_its_last_token(ck, tok, tmp_path):
    trainer = build_trainer(_cfg(ck, tmp_path, kl_coef=0.0, no_eos_penalty=0.0), tok)
    prompts = _prompts(ck, tok)
    exp, samples, stats = trainer.make_experience(prompts, torch.Generator().manual_seed(1))
    rm, _, meta = load_model(ck.rm)
    for i, p in enumerate(prompts):
        alone = normalize(rm(torch.tensor([p.ids + samples.responses[i]]))[0, -1], meta)
        assert exp.scores[i].item() == pytest.approx(alone.item(), abs=1e-5)
        L = len(samples.responses[i])  # beta = 0: the only reward is the score, on the last response token
        expected = torch.zeros(exp.rewards.shape[1])
        expected[L - 1] = exp.scores[i]
        assert torch.equal(exp.rewards[i], expected)
    assert stats["score"] == pytest.approx(exp.scores.mean().item(), abs=1e-6)


def test_kl_is_exactly_zero_and_first_ratio_one_when_actor_equals_reference(ck, tok, tmp_path):
    for estimator in ("k1", "k3"):
        trainer = build_trainer(_cfg(ck, tmp_path, kl_estimator=estimator, kl_coef=0.5, old_logprobs="recompute"), tok)
        exp, _, stats = trainer.make_experience(_prompts(ck, tok), torch.Generator().manual_seed(2))
        assert torch.equal(exp.logprobs, exp.ref_logprobs)
        assert stats["kl"] == 0.0 and stats["non_score_reward"] == 0.0
        st = trainer.minibatch_backward(exp, torch.arange(8))  # before any update: pi == pi_old
        assert st["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and st["clipfrac"] == 0.0
        assert abs(st["approx_kl"]) < 1e-10 and abs(st["ratio_var"]) < 1e-6


def test_sampler_old_logprobs_give_the_same_experience_to_rounding(ck, tok, tmp_path):
    """old_logprobs "sampler" (what "auto" picks on a CPU) skips the policy's teacher-forced pass: the same
    rollouts, old log-probs within 1e-5 of the recomputed ones, a KL of ~0 and a first ratio of ~1."""
    runs = {}
    for choice in ("recompute", "sampler"):
        trainer = build_trainer(_cfg(ck, tmp_path, kl_coef=0.5, old_logprobs=choice), tok)
        runs[choice] = trainer.make_experience(_prompts(ck, tok), torch.Generator().manual_seed(2)) + (trainer,)
    (exp_r, samples_r, _, _), (exp_s, samples_s, stats, trainer) = runs["recompute"], runs["sampler"]
    assert samples_s.responses == samples_r.responses
    m = exp_s.mask.bool()
    assert torch.allclose(exp_s.logprobs[m], exp_r.logprobs[m], atol=1e-5) and (exp_s.logprobs[~m] == 0).all()
    assert abs(stats["kl"]) < 1e-4
    st = trainer.minibatch_backward(exp_s, torch.arange(8))
    assert st["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and st["clipfrac"] == 0.0


def test_no_eos_penalty_is_judged_on_the_response_only(ck, tok, tmp_path):
    ones = lambda prompts, texts, ids: [1.0] * len(texts)  # noqa: E731
    for kw, expected_unfinished in (({"no_eos_penalty": 0.75}, 0.25), ({"no_eos_score": -1.0}, -1.0)):
        trainer = build_trainer(_cfg(ck, tmp_path, max_new_tokens=5, critic_init="sft", **kw), tok, reward_fn=ones)
        prompts = _prompts(ck, tok)
        assert all(tok.special.end in p.ids for p in prompts)  # every prompt holds <|end|> (closing its user turn)
        exp, samples, stats = trainer.make_experience(prompts, torch.Generator().manual_seed(4))  # some rows stop, some do not
        stops = set(turn_stop_ids(tok))
        assert samples.ended == [t[-1] in stops for t in samples.responses]
        assert 0 < sum(samples.ended) < len(prompts)
        for i, ended in enumerate(samples.ended):
            assert exp.scores[i].item() == (1.0 if ended else expected_unfinished)
        assert stats["eos_frac"] == sum(samples.ended) / len(prompts)


def _biased_head(model: Transformer, tok, favoured: int) -> Transformer:
    """The model with an LM head that puts almost all probability on one token (weights 0, bias +20 there)."""
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[favoured] = 20.0
    model.lm_head = head
    return model


def test_rollouts_end_only_at_the_end_of_turn_token_the_reward_model_saw(ck, tok):
    """<|eos|> never ends a rollout: the reward model only ever saw responses closed by <|end|> (one stop layout
    for RM training, rollouts and scoring)."""
    assert turn_stop_ids(tok) == [tok.special.end] and tok.special.eos != tok.special.end
    prompts = _prompts(ck, tok, 4)
    for favoured, ended, length in ((tok.special.eos, False, 6), (tok.special.end, True, 1)):
        model = _biased_head(load_model(ck.sft)[0], tok, favoured)
        samples = sample_responses(model, tok, prompts, SamplingParams(6), torch.Generator().manual_seed(0))
        assert samples.ended == [ended] * 4
        assert [len(r) for r in samples.responses] == [length] * 4
        if ended:  # the RM's training layout ends exactly where the rollout ended
            for p, r in zip(prompts, samples.responses):
                assert p.ids + r == render_completion(tok, p.messages, "")[:len(p.ids) + 1]


def test_critic_from_the_reward_model_starts_in_normalised_units(ck, tok, tmp_path):
    """The copied value head folds the RM's normalisation (mean 0.25, std 2 here): at the last response token
    the critic's initial value equals the normalised reward the RM gives that sequence."""
    trainer = build_trainer(_cfg(ck, tmp_path, kl_coef=0.0, no_eos_penalty=0.0), tok)
    exp, samples, _ = trainer.make_experience(_prompts(ck, tok), torch.Generator().manual_seed(4))
    for i, r in enumerate(samples.responses):
        # the value at the column that predicts the last token sees everything but that token; compare the head on
        # the full sequence instead: critic(prompt + response)[-1] == normalised RM score
        full = torch.tensor([_prompts(ck, tok)[i].ids + r])
        assert trainer.critic(full)[0, -1].item() == pytest.approx(exp.scores[i].item(), abs=1e-5)
    raw_rm = load_model(ck.rm)[0]
    assert not torch.allclose(raw_rm(full)[0, -1], trainer.critic(full)[0, -1])  # the fold did change the head


def test_ppo_iteration_with_an_encoder_reward_model(ck, tok, tmp_path, capsys):
    """The seed's BERT-style reward model scores PPO's rollouts by re-encoding the text in its own layout
    ([BOS] prompt [SEP] response [EOS]); the critic then starts from the SFT model."""
    torch.manual_seed(5)
    enc_dir = tmp_path / "enc_rm"
    save_checkpoint(enc_dir, Transformer(tiny_config(causal=False), head="scalar"), tok,
                    {"stage": "rm", "backbone": "encoder", "pooling": "first", "reward_mean": 0.1, "reward_std": 1.0})
    cfg = _cfg(ck, tmp_path, reward_model=str(enc_dir), iterations=1)
    summary = run_ppo(cfg, progress=False)
    assert "critic starts from the SFT model" in capsys.readouterr().out
    assert math.isfinite(summary["score_last"])
    trainer = build_trainer(cfg, tok)
    prompts = _prompts(ck, tok)
    exp, samples, _ = trainer.make_experience(prompts, torch.Generator().manual_seed(6))
    scorer = RewardScorer.load(enc_dir)
    texts = [tok.decode(r[:-1] if e else r) for r, e in zip(samples.responses, samples.ended)]
    single = [i for i, p in enumerate(prompts) if len(p.messages) == 1]  # single-turn: the seed's layout exactly
    expected = scorer.score([prompts[i].text for i in single], [texts[i] for i in single])
    penalty = [0.0 if samples.ended[i] else cfg.no_eos_penalty for i in single]
    assert [exp.scores[i].item() for i in single] == pytest.approx([e - p for e, p in zip(expected, penalty)], abs=1e-5)
    assert trainer.critic.score.bias is None  # a fresh value head on the SFT model, not a fold of the encoder


# ---------------------------------------------------------------------------------------------- gradients

def _grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def test_minibatch_gradient_does_not_depend_on_micro_batching(ck, tok, tmp_path):
    trainer = build_trainer(_cfg(ck, tmp_path, minibatch_size=8, micro_batch_size=8), tok)
    exp, _, _ = trainer.make_experience(_prompts(ck, tok), torch.Generator().manual_seed(4))
    rows = torch.tensor([5, 0, 3, 6, 1, 7, 2, 4])
    results = []
    for micro in (8, 2, 1):
        trainer.cfg.micro_batch_size = micro
        trainer.minibatch_backward(exp, rows)
        results.append((_grads(trainer.actor), _grads(trainer.critic)))
        trainer.actor.zero_grad(set_to_none=True)
        trainer.critic.zero_grad(set_to_none=True)
    for actor_g, critic_g in results[1:]:
        for a, b in zip(actor_g + critic_g, results[0][0] + results[0][1]):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in results[0][0])


@pytest.mark.parametrize("micro", [8, 4])
def test_actor_and_critic_side_by_side_give_the_same_gradients_and_statistics(ck, tok, tmp_path, monkeypatch, micro):
    """On a 2-core CPU the actor's and the critic's forward and backward run at once, one thread each
    (cpu_threads.side_by_side): the same gradients and statistics as one after the other, really in two lanes."""
    from lmforge import cpu_threads

    trainer = build_trainer(_cfg(ck, tmp_path, minibatch_size=8, micro_batch_size=micro), tok)
    exp, _, _ = trainer.make_experience(_prompts(ck, tok), torch.Generator().manual_seed(4))
    rows = torch.tensor([5, 0, 3, 6, 1, 7, 2, 4])
    runs = []
    for lanes in (False, True):
        monkeypatch.setattr(cpu_threads, "side_by_side", lambda device, on=lanes: on)
        threads = []
        hooks = [m.register_forward_pre_hook(lambda *_: threads.append(threading.current_thread().name))
                 for m in (trainer.actor.model.layers[0], trainer.critic.model.layers[0])]
        stats = trainer.minibatch_backward(exp, rows)
        for h in hooks:
            h.remove()
        runs.append((stats, _grads(trainer.actor) + _grads(trainer.critic), set(threads)))
        trainer.actor.zero_grad(set_to_none=True)
        trainer.critic.zero_grad(set_to_none=True)
    (serial, g_serial, t_serial), (lanes, g_lanes, t_lanes) = runs
    assert t_serial == {threading.current_thread().name}
    assert len(t_lanes) == 2 and all(n.startswith("lmforge-lane") for n in t_lanes)
    assert serial.keys() == lanes.keys() and {"pg_loss", "vf_loss", "ratio_var", "vf_clipfrac"} <= serial.keys()
    for k in serial:
        assert lanes[k] == pytest.approx(serial[k], rel=1e-6, abs=1e-9), k
    assert any(g.abs().sum() > 0 for g in g_serial)
    for a, b in zip(g_lanes, g_serial):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_ptx_adds_exactly_gamma_times_the_lm_gradient(ck, tok, tmp_path):
    gamma = 2.5
    cfg = _cfg(ck, tmp_path, ptx={"coef": gamma, "data": ["unused"], "batch_size": 2, "seq_len": 12})
    trainer = build_trainer(cfg, tok)
    exp, _, _ = trainer.make_experience(_prompts(ck, tok), torch.Generator().manual_seed(5))
    rows = torch.tensor([1, 3, 5, 7])
    g = torch.Generator().manual_seed(0)
    ptx = [torch.randint(0, tok.vocab_size, (2, 12), generator=g) for _ in range(2)]  # one per micro-batch
    trainer.minibatch_backward(exp, rows)
    plain_actor, plain_critic = _grads(trainer.actor), _grads(trainer.critic)
    trainer.actor.zero_grad(set_to_none=True)
    trainer.critic.zero_grad(set_to_none=True)
    stats = trainer.minibatch_backward(exp, rows, ptx)
    mixed_actor, mixed_critic = _grads(trainer.actor), _grads(trainer.critic)
    trainer.actor.zero_grad(set_to_none=True)
    with torch.no_grad():  # the value against the plain loss over materialised logits
        lm = sum(lm_loss(trainer.actor(b)[:, :-1], b[:, 1:]) for b in ptx) / len(ptx)
    assert stats["ptx_loss"] == pytest.approx(lm.item(), rel=1e-5)
    # The gradient against the same (fused) loss on its own: a fused-vs-plain comparison would test the kernels'
    # fp32 rounding (tests/test_losses.py does), not the mixing. Gradients of tokens that only the LM batches
    # touch differ from the plain loss's by up to ~2e-4 relative.
    (sum(trainer.ptx_loss(b) for b in ptx) / len(ptx)).backward()
    lm_grad = _grads(trainer.actor)
    for mixed, plain, lg in zip(mixed_actor, plain_actor, lm_grad):
        assert torch.allclose(mixed - plain, gamma * lg, atol=1e-6, rtol=1e-4)
    assert any(lg.abs().sum() > 0 for lg in lm_grad)
    for a, b in zip(mixed_critic, plain_critic):  # the critic's gradient is untouched
        assert torch.equal(a, b)


def test_ptx_source_reads_text_and_sft_records(ck, tok, tmp_path):
    text = tmp_path / "pre.txt"
    text.write_text("the quick brown fox\n\njumps over the lazy dog\n", encoding="utf-8")
    sft = tmp_path / "sft.jsonl"
    _write(sft, [json.dumps({"instruction": "say 1", "output": "fox"}), json.dumps({"text": "red apple"})])
    src = PtxSource.from_files([str(text), str(sft)], tok, batch_size=3, seq_len=6)
    expected = ([tok.special.bos] + tok.encode("the quick brown fox") + [tok.special.eos]
                + [tok.special.bos] + tok.encode("jumps over the lazy dog") + [tok.special.eos]
                + render(tok, [{"role": "user", "content": "say 1"}, {"role": "assistant", "content": "fox"}])[0]
                + [tok.special.bos] + tok.encode("red apple") + [tok.special.eos])
    assert src.tokens.tolist() == expected
    batch = src.batch(torch.Generator().manual_seed(0))
    assert batch.shape == (3, 6)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"instruction": "no output"}) + "\n")
    with pytest.raises(LmforgeError, match=r"bad.jsonl:2: instruction record has no 'output'"):
        PtxSource.from_files([str(bad)], tok, 2, 4)


def test_ema_of_policy_weights(ck, tok, tmp_path):
    trainer = build_trainer(_cfg(ck, tmp_path, ema_decay=0.9, minibatch_size=8, micro_batch_size=4,
                                 actor_optim={"lr": 1e-2, "eps": 1e-5, "warmup_steps": 0, "schedule": "constant"}), tok)
    exp, _, _ = trainer.make_experience(_prompts(ck, tok), torch.Generator().manual_seed(6))
    before = [p.detach().clone() for p in trainer.actor.parameters()]
    trainer.minibatch_backward(exp, torch.arange(8))
    trainer.optimizer_step()
    after = list(trainer.actor.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    for e, a, b in zip(trainer.ema.parameters(), after, before):
        assert torch.allclose(e, 0.9 * b + 0.1 * a, atol=1e-7)


# ---------------------------------------------------------------------------------------------- LoRA

LORA = {"actor_lora": {"rank": 2, "targets": ["all-linear"]}, "critic_lora": {"rank": 2, "alpha": 4.0}}


def _optimized(opt):
    return {id(p) for g in opt.param_groups for p in g["params"]}


def test_lora_trains_only_adapters_and_the_value_head(ck, tok, tmp_path):
    trainer = build_trainer(_cfg(ck, tmp_path, **LORA, minibatch_size=8, micro_batch_size=4, old_logprobs="recompute",
                                 actor_optim={"lr": 1e-2, "eps": 1e-5, "warmup_steps": 0}), tok)
    actor_trainable = {n for n, p in trainer.actor.named_parameters() if p.requires_grad}
    critic_trainable = {n for n, p in trainer.critic.named_parameters() if p.requires_grad}
    assert actor_trainable and all(n.endswith(("lora_A", "lora_B")) for n in actor_trainable)
    assert len(actor_trainable) == 2 * 2 * 7  # 2 layers x all 7 linear layers x (A, B)
    assert critic_trainable == {f"model.layers.{i}.self_attn.{n}.lora_{m}" for i in range(2)
                                for n in ("q_proj", "v_proj") for m in "AB"} | {"score.weight", "score.bias"}
    for model, opt in ((trainer.actor, trainer.actor_opt), (trainer.critic, trainer.critic_opt)):
        assert _optimized(opt) == {id(p) for p in model.parameters() if p.requires_grad}
    assert not any(isinstance(m, LoRALinear) for m in trainer.ref.modules())  # the reference is the SFT model
    exp, _, stats = trainer.make_experience(_prompts(ck, tok), torch.Generator().manual_seed(8))
    assert stats["kl"] == 0.0 and torch.equal(exp.logprobs, exp.ref_logprobs)  # B = 0: starts at the SFT model
    trainer.minibatch_backward(exp, torch.arange(8))
    for model, trainable in ((trainer.actor, actor_trainable), (trainer.critic, critic_trainable)):
        assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
    ref_before = {k: v.clone() for k, v in trainer.ref.state_dict().items()}
    trainer.optimizer_step()
    assert all(torch.equal(v, trainer.ref.state_dict()[k]) for k, v in ref_before.items())
    ids = exp.input_ids[:3]
    mask = exp.attention_mask[:3]
    with torch.no_grad():
        for model in (trainer.actor, trainer.critic):
            torch.testing.assert_close(plain_model(model)(ids, attention_mask=mask), model(ids, attention_mask=mask),
                                       atol=1e-5, rtol=1e-5)


def test_lora_ema_averages_the_merged_weights(ck, tok, tmp_path):
    trainer = build_trainer(_cfg(ck, tmp_path, **LORA, ema_decay=0.9, minibatch_size=8, micro_batch_size=4,
                                 actor_optim={"lr": 1e-2, "eps": 1e-5, "warmup_steps": 0}), tok)
    exp, _, _ = trainer.make_experience(_prompts(ck, tok), torch.Generator().manual_seed(6))
    before = plain_model(trainer.actor).state_dict()
    assert not any(isinstance(m, LoRALinear) for m in trainer.ema.modules())
    assert all(torch.equal(v, trainer.ema.state_dict()[k]) for k, v in before.items())
    for _ in range(2):
        trainer.minibatch_backward(exp, torch.arange(8))
        trainer.optimizer_step()
        after = plain_model(trainer.actor).state_dict()
        expected = {k: 0.9 * before[k] + 0.1 * after[k] for k in before}
        for k, v in trainer.ema.state_dict().items():
            torch.testing.assert_close(v, expected[k], atol=1e-6, rtol=1e-5)
        before = expected
    assert any(not torch.equal(trainer.ema.state_dict()[k], plain_model(trainer.actor).state_dict()[k])
               for k in before)


def test_lora_resume_reproduces_the_uninterrupted_run_bit_for_bit(ck, tok, tmp_path):
    optim = {"lr": 1e-2, "eps": 1e-5, "warmup_steps": 0, "schedule": "constant"}  # as if stopped after 2 of 4
    common = dict(**LORA, ema_decay=0.5, batch_size=4, minibatch_size=2, micro_batch_size=1, max_new_tokens=6,
                  gradient_checkpointing=True, actor_optim=optim, critic_optim=dict(optim))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_ppo(_cfg(ck, tmp_path, out=str(straight), iterations=4, save_every=2, **common), progress=False)
    run_ppo(_cfg(ck, tmp_path, out=str(resumed), iterations=2, **common), progress=False)
    state = load_training_state(resumed)
    assert {"actor_trainable", "critic_trainable"} <= state.keys() and not {"actor", "critic"} & state.keys()
    with pytest.raises(LmforgeError, match="cannot resume: config key 'critic_lora.rank' differs"):
        run_ppo(_cfg(ck, tmp_path, out=str(resumed), iterations=4, **{**common, "critic_lora": {"rank": 4}}),
                resume=True, progress=False)
    run_ppo(_cfg(ck, tmp_path, out=str(resumed), iterations=4, **common), resume=True, progress=False)
    for sub, head in (("", "lm"), ("critic", "scalar")):
        a, _ = _weights(straight / sub, head)
        b, _ = _weights(resumed / sub, head)
        assert not any("lora" in k or ".base." in k for k in a)  # plain checkpoints
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    assert read_config(straight)["lmforge"]["actor_lora_rank"] == 2
    sft, policy = _weights(ck.sft)[0], _weights(straight)[0]
    changed = {k for k in sft if not torch.equal(sft[k], policy[k])}  # the adapted layers only: all linear ones
    assert changed == {f"model.layers.{i}.{n}.weight" for i in range(2) for n in
                       ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    # the in-training models, rebuilt from the training state, are what the critic checkpoint holds
    state = load_training_state(straight)
    critic, _, rm_meta = load_model(ck.rm, head="scalar")
    fold_normalization(critic, rm_meta)
    apply_lora(critic, LoraConfig(**LORA["critic_lora"]), keep_trainable=("score.",))
    load_trainable_state_dict(critic, state["critic_trainable"])
    saved, _, saved_meta = load_model(straight / "critic")  # its head's bias is read into the normalisation
    ids = torch.tensor([[1, 5, 9, 33, 40, 6], [1, 7, 6, 8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(normalize(saved.eval()(ids), saved_meta), critic.eval()(ids), atol=1e-5, rtol=1e-5)


def test_lora_and_checkpointing_config_keys(ck, tok, tmp_path):
    with pytest.raises(LmforgeError, match="config key 'actor_lora.dropout' must be 0"):
        _cfg(ck, tmp_path, actor_lora={"rank": 2, "dropout": 0.1})
    with pytest.raises(LmforgeError, match="config key 'critic_lora.targets' names an unknown layer"):
        _cfg(ck, tmp_path, critic_lora={"rank": 2, "targets": ["qkv"]})
    trainer = build_trainer(_cfg(ck, tmp_path, gradient_checkpointing=True), tok)
    assert trainer.actor.gradient_checkpointing and trainer.critic.gradient_checkpointing


def test_gradient_checkpointing_gives_the_same_gradients(ck, tok, tmp_path):
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)  # the same random adapter matrices A in both
        trainer = build_trainer(_cfg(ck, tmp_path, **LORA, gradient_checkpointing=flag), tok)
        exp, _, _ = trainer.make_experience(_prompts(ck, tok), torch.Generator().manual_seed(9))
        calls = []
        for model in (trainer.actor, trainer.critic):
            model.train()  # as in `update`
            model.model.layers[0].register_forward_pre_hook(lambda *_, c=calls: c.append(1))
        stats = trainer.minibatch_backward(exp, torch.arange(8))
        assert len(calls) == 2 * 4 * (2 if flag else 1)  # actor and critic, 4 micro-batches, recomputed or not
        grads.append((stats, _grads(trainer.actor) + _grads(trainer.critic)))
    (stats_off, off), (stats_on, on) = grads
    assert stats_on["pg_loss"] == pytest.approx(stats_off["pg_loss"], rel=1e-6, abs=1e-9)
    assert stats_on["vf_loss"] == pytest.approx(stats_off["vf_loss"], rel=1e-6)
    assert any(g.abs().sum() > 0 for g in off)
    for a, b in zip(on, off):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- learning

def _toy_run(ck, tok, tmp_path, kl_coef, iterations):
    """PPO on a toy reward: the share of the token ' fox' among the response tokens (about 0.07 for the SFT
    policy; the reference answers rarely contain it)."""
    fox = tok.encode(" fox")
    assert len(fox) == 1

    def share(prompts, texts, ids):
        return [sum(t == fox[0] for t in r) / len(r) for r in ids]
    optim = {"lr": 1e-3, "eps": 1e-5, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0}
    cfg = _cfg(ck, tmp_path, iterations=iterations, batch_size=16, minibatch_size=8, micro_batch_size=8,
               max_new_tokens=8, ppo_epochs=2, kl_coef=kl_coef, critic_init="sft", no_eos_penalty=0.0,
               reward_model="", actor_optim=optim, critic_optim=dict(optim))
    run_ppo(cfg, progress=False, reward_fn=share)
    return read_metrics(cfg.out)


def _mean(rows, key):
    return sum(r[key] for r in rows) / len(rows)


def test_policy_learns_a_toy_reward_with_bounded_kl(ck, tok, tmp_path):
    m = _toy_run(ck, tok, tmp_path, kl_coef=0.05, iterations=50)
    first, last = _mean(m[:5], "score"), _mean(m[-5:], "score")
    assert last > first + 0.1 and last > 2 * first, (first, last)
    assert _mean(m[-10:], "kl") < 5.0 and max(r["kl"] for r in m) < 15.0
    assert 0.8 < _mean(m, "ratio_mean") < 1.2 and all(r["skipped_steps"] == 0 for r in m)  # a trust region


def test_large_beta_keeps_the_policy_close_to_the_reference(ck, tok, tmp_path):
    m = _toy_run(ck, tok, tmp_path, kl_coef=5.0, iterations=20)
    assert _mean(m[-5:], "kl") < 0.5  # with beta = 0.05 the same run drifts to ~2 nats per sequence


# ---------------------------------------------------------------------------------------------- recipe

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "ppo_tiny.yaml")


def _args(ck, out, *extra):
    return ["ppo", "--config", CONFIG, f"sft_model={ck.sft}", f"reward_model={ck.rm}", f"prompts={ck.prompts}",
            f"out={out}",
            "batch_size=4", "minibatch_size=2", "micro_batch_size=1", "max_new_tokens=6", "device=cpu",
            "actor_optim.lr=1e-3", "critic_optim.lr=1e-3", *extra]


def _weights(path, head="lm"):
    model, _, meta = load_model(path, head=head)
    return model.state_dict(), meta


def test_cli_end_to_end_and_exact_resume(ck, tok, tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(_args(ck, straight, "iterations=4", "save_every=2")) == 0
    assert "ppo: 4 iterations" in capsys.readouterr().out
    assert main(_args(ck, resumed, "iterations=2")) == 0
    assert main(_args(ck, resumed, "iterations=2")) == 1  # a rerun into an existing run needs overwrite=true
    assert "already holds a run" in capsys.readouterr().err
    assert main(_args(ck, resumed, "iterations=4", "--resume")) == 0
    for sub, head in (("", "lm"), ("critic", "scalar")):
        a, meta = _weights(straight / sub, head)
        b, _ = _weights(resumed / sub, head)
        assert meta["stage"] == ("ppo" if head == "lm" else "ppo_critic") and meta["iteration"] == 4
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_metrics(resumed)] == [1, 2, 3, 4]
    assert read_metrics(resumed)[-1]["score"] == read_metrics(straight)[-1]["score"]
    samples = [json.loads(line) for line in (resumed / "samples.jsonl").read_text().splitlines()]
    assert [s["iteration"] for s in samples] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert {"prompt", "response", "score", "ended"} <= set(samples[0])
    # the policy is a normal checkpoint: generation loads it
    policy, ptok, _ = load_model(straight)
    out = generate(policy, [_prompts(ck, ptok, 1)[0].ids], SamplingParams(4), stop_ids(ptok), ptok.special.pad)
    assert 1 <= len(out.tokens[0]) <= 4


def test_adaptive_beta_is_logged_and_saved(ck, tok, tmp_path):
    out = tmp_path / "adaptive"
    assert main(_args(ck, out, "iterations=2", "kl_coef=0.1", "kl_target=0.001", "kl_horizon=100",
                      "kl_estimator=k3", "old_logprobs=recompute")) == 0
    m = read_metrics(out)
    assert m[0]["beta"] == 0.1 and m[0]["kl"] == 0.0  # iteration 1: policy == reference, KL 0 < target
    beta1 = 0.1 * (1 - 0.2 * 4 / 100)                  # ... so beta shrinks by the clipped error -0.2
    assert m[1]["beta"] == pytest.approx(beta1)
    err = min(max(m[1]["kl"] / 0.001 - 1, -0.2), 0.2)
    _, meta = _weights(out)
    assert meta["kl_coef"] == pytest.approx(beta1 * (1 + err * 4 / 100))


def test_bad_inputs_fail_before_training(ck, tok, tmp_path, capsys):
    other_tok = train_tokenizer([_write(tmp_path / "other.txt", ["completely different words here"] * 50)],
                                300, tmp_path / "other_tok")
    save_checkpoint(tmp_path / "other_rm", Transformer(tiny_config(vocab_size=other_tok.vocab_size), head="scalar"),
                    other_tok, {"stage": "rm", "pooling": "last"})
    long_prompt = json.dumps({"instruction": "fox " * 80})
    cases = [
        ({"prompts": _write(tmp_path / "empty.jsonl", [])}, "empty.jsonl: no prompt records"),
        ({"prompts": _write(tmp_path / "bad.jsonl", ['{"instruction": "say 1"}', "{oops"])},
         r"bad.jsonl:2: invalid JSON"),
        ({"prompts": _write(tmp_path / "asst.jsonl", [json.dumps({"messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "assistant", "content": "again"}]})])},  # one trailing answer is dropped; two are an error
         r"asst.jsonl:1: a prompt record must end with a user turn"),
        ({"prompts": _write(tmp_path / "long.jsonl", ['{"instruction": "say 1"}', long_prompt])},
         r"long.jsonl:2: prompt of \d+ tokens \+ 6 new tokens exceeds the policy's context of 64 positions"),
        ({"reward_model": str(tmp_path / "other_rm")}, r"tokenizer mismatch: config key 'reward_model' \(.*other_rm\) and config key 'sft_model' \(.*\) "
                                                     r"use different tokenizers \(fingerprints \w+ != \w+\)"),
        ({"reward_model": ck.sft}, "not a reward model checkpoint"),
        ({"minibatch_size": 3}, r"'minibatch_size' \(3\) must divide batch_size \(4\)"),
        ({"micro_batch_size": 3}, r"'micro_batch_size' \(3\) must divide minibatch_size \(2\)"),
        ({"ptx.coef": 1.0}, "'ptx.data' must list pretraining files"),
        ({"ptx.coef": 1.0, "ptx.data": str(tmp_path / "missing.txt")}, "missing.txt: input file not found"),
        ({"reward_model": "", "critic_init": "sft"}, "'reward_model' is required"),
        ({"prompts": str(tmp_path / "nope.jsonl")}, "nope.jsonl: file not found"),
    ]
    for i, (overrides, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        args = _args(ck, out) + [f"{k}={v}" for k, v in overrides.items()]
        assert main(args) == 1, overrides
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert re.search(message, err), (message, err)
        assert not out.exists()
    # --resume without a checkpoint is an error (it no longer starts fresh), and leaves no output
    assert main(_args(ck, tmp_path / "fresh", "--resume")) == 1
    assert "no checkpoint to resume" in capsys.readouterr().err and not (tmp_path / "fresh").exists()
