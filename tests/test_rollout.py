"""rollout.py: the policy, reference and critic passes over packed rollouts against the padded batch they
replace (hidden states, log-probs, values and gradients), with responses of every length (0 included); the
sampler's log-probs against the teacher-forced ones they stand in for."""

import pytest
import torch

from lmforge.chat import turn_stop_ids
from lmforge.generation import SamplingParams
from lmforge.model import ModelConfig, Transformer
from lmforge.prompts import Prompt
from lmforge.rollout import (Experience, critic_values, policy_logprobs, response_hidden, sample_responses,
                             sampler_logprobs, use_sampler_logprobs)
from tests.conftest import tiny_config

PAD = 0


def _experience(prompt_lens, resp_lens, vocab=50, seed=0) -> Experience:
    """A padded batch as sample_responses lays it out: left-padded prompts, right-padded responses."""
    g = torch.Generator().manual_seed(seed)
    P, R = max(prompt_lens), max(resp_lens)
    ids = torch.full((len(prompt_lens), P + R), PAD, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, (p, r) in enumerate(zip(prompt_lens, resp_lens)):
        ids[i, P - p:P + r] = torch.randint(1, vocab, (p + r,), generator=g)
        am[i, P - p:P + r] = 1
    return Experience(ids, am, am[:, P:].float(), P)


def _padded_response_hidden(model, exp):
    """The padded computation that pack_experience replaces."""
    return model.hidden_states(exp.input_ids, attention_mask=exp.attention_mask)[:, exp.prompt_len - 1:-1]


def _model(head, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=64)
    cfg.update(kw)
    return Transformer(ModelConfig(**cfg), head=head)


def test_packed_hidden_states_and_gradients_equal_the_padded_batch():
    exp = _experience([3, 9, 5, 2, 6], [4, 1, 8, 0, 7], seed=1)
    m = exp.mask.bool()
    for head, is_causal in (("lm", True), ("scalar", True), ("scalar", False)):
        model = _model(head, is_causal=is_causal).double()
        padded = _padded_response_hidden(model, exp)[m]
        packed = response_hidden(model, exp)
        assert packed.shape == (int(exp.mask.sum()), model.config.hidden_size)
        assert torch.allclose(packed, padded, atol=1e-10)
        # gradients of a loss through either layout agree
        w = torch.randn(packed.shape[-1], dtype=torch.float64)
        grads = []
        for h_fn in (lambda mod, e: _padded_response_hidden(mod, e)[m], response_hidden):
            model.zero_grad()
            (h_fn(model, exp) @ w).sum().backward()
            grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        for a, b in zip(*grads):
            assert torch.allclose(a, b, atol=1e-10)


def test_policy_logprobs_and_values_from_packed_rows_match_the_padded_batch():
    """Log-probs, entropies and values at every real response token equal the padded batch's; zeros past each
    response's end (a response of length 0 included); gradients agree too."""
    exp = _experience([4, 8, 6, 3], [5, 2, 7, 0], seed=2)
    actor, critic = _model("lm", seed=3).double(), _model("scalar", seed=4).double()
    m = exp.mask.bool()
    logp, entropy = policy_logprobs(actor, exp, 0.7, with_entropy=True, entropy_grad=True)
    ref_all = torch.log_softmax(actor.lm_head(_padded_response_hidden(actor, exp)).float() / 0.7, -1)  # fp32, as used
    ref = ref_all.gather(-1, exp.input_ids[:, exp.prompt_len:, None]).squeeze(-1)
    ref_entropy = -(ref_all.exp() * ref_all).sum(-1)
    assert logp.shape == entropy.shape == exp.mask.shape
    assert torch.allclose(logp[m], ref[m], atol=1e-6) and torch.allclose(entropy[m], ref_entropy[m], atol=1e-6)
    assert (logp[~m] == 0).all() and (entropy[~m] == 0).all()
    g_packed = torch.autograd.grad(((logp + entropy) * exp.mask).sum(), list(actor.parameters()))
    g_padded = torch.autograd.grad(((ref + ref_entropy) * exp.mask).sum(), list(actor.parameters()))
    for a, b in zip(g_packed, g_padded):
        assert torch.allclose(a, b, atol=1e-6)
    values = critic_values(critic, exp)
    assert values.shape == exp.mask.shape and (values[~m] == 0).all()
    assert torch.allclose(values[m], critic.scores(_padded_response_hidden(critic, exp))[m].float(), atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_policy_logprobs_match_the_materialised_logits(temperature):
    """The default path (the LM head fused with the log-softmax, chunk by chunk; the entropy a statistic) gives
    the log-probs, entropies and log-prob gradients of the path that materialises the logits (an entropy bonus)."""
    exp = _experience([4, 8, 6, 3], [5, 2, 7, 0], seed=5)
    actor = _model("lm", seed=6).double()
    logp, entropy = policy_logprobs(actor, exp, temperature, with_entropy=True)
    ref, ref_entropy = policy_logprobs(actor, exp, temperature, with_entropy=True, entropy_grad=True)
    assert not entropy.requires_grad and ref_entropy.requires_grad and logp.requires_grad
    assert torch.allclose(logp, ref, atol=1e-6) and torch.allclose(entropy, ref_entropy.detach(), atol=1e-6)
    assert torch.equal(policy_logprobs(actor, exp, temperature), logp.detach())
    weights = torch.rand(exp.mask.shape, generator=torch.Generator().manual_seed(0)) * exp.mask
    params = [p for p in actor.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad((logp * weights).sum(), params, allow_unused=True),
                    torch.autograd.grad((ref * weights).sum(), params, allow_unused=True)):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6)


def test_sampler_logprobs_are_the_teacher_forced_logprobs(tok):
    """The log-probs the KV-cache decode computed for its draws equal a teacher-forced pass over the rollouts
    (fp32, to ~1e-6) at every response token, the closing <|end|> included, zeros past each response's end;
    rows that stopped early and rows that ran to max_new_tokens, at two temperatures and under top-k."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tok.vocab_size))
    with torch.no_grad():  # make <|end|> likely enough that some rows stop early
        model.lm_head.weight[turn_stop_ids(tok)[0]] = model.lm_head.weight.mean(0) + 0.5
    prompts = [Prompt([], t, ids=tok.encode(t)) for t in ("the quick", "a", "brown fox jumps over", "lazy dog", "the")]
    ended = set()
    for params in (SamplingParams(12, 0.7), SamplingParams(12, 1.0), SamplingParams(12, 1.0, top_k=20)):
        samples = sample_responses(model, tok, prompts, params, torch.Generator().manual_seed(1))
        with torch.no_grad():
            recomputed = policy_logprobs(model, samples.experience, params.temperature)
        from_sampler = sampler_logprobs(samples)
        m = samples.experience.mask.bool()
        assert torch.allclose(from_sampler[m], recomputed[m], atol=1e-5)
        assert (from_sampler[~m] == 0).all()
        ended.update(samples.ended)
    assert ended == {True, False}


def test_old_logprobs_auto_takes_the_samplers_for_an_fp32_policy_on_cpu_only():
    fp32, bf16 = _model("lm"), _model("lm").to(torch.bfloat16)
    assert use_sampler_logprobs("auto", fp32) and use_sampler_logprobs("sampler", bf16)
    assert not use_sampler_logprobs("auto", bf16) and not use_sampler_logprobs("recompute", fp32)
