"""rollout.py: the packed layout of an RL batch against the padded batch it replaces (values and gradients),
the first-fit packing, and the response-column bookkeeping."""

import torch

from lmforge.model import ModelConfig, Transformer
from lmforge.rollout import (Experience, critic_values, pack_experience, pack_rows_first_fit, policy_logprobs,
                             response_hidden)

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


def test_first_fit_decreasing_fills_rows_without_overlap():
    lengths = [30, 50, 20, 70, 10, 40, 60, 25]
    place = pack_rows_first_fit(lengths, 100)
    rows = {}
    for n, (k, o) in zip(lengths, place):
        rows.setdefault(k, []).append((o, o + n))
    for spans in rows.values():
        spans.sort()
        assert spans[0][0] == 0 and spans[-1][1] <= 100
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous, no overlap
    assert len(rows) == 4  # 305 tokens: 4 rows of 100 is the fewest possible
    assert place == pack_rows_first_fit(lengths, 100)  # deterministic


def test_packed_layout_puts_every_real_token_once_with_restarting_positions():
    prompt_lens, resp_lens = [3, 7, 5, 2], [4, 1, 6, 0]
    exp = _experience(prompt_lens, resp_lens)
    packed = pack_experience(exp, 16)
    real = packed.attention_mask.bool()
    assert int(real.sum()) == sum(prompt_lens) + sum(resp_lens)
    for i, (p, r) in enumerate(zip(prompt_lens, resp_lens)):
        seg = packed.segment_ids == i + 1
        assert int(seg.sum()) == p + r
        assert torch.equal(packed.input_ids[seg], exp.input_ids[i][exp.attention_mask[i].bool()])
        assert torch.equal(packed.position_ids[seg], torch.arange(p + r))
    assert (packed.segment_ids[~real] == 0).all()
    # the response index points at the token before each response token (in the packed ids), padding at the end
    flat_ids = torch.cat([packed.input_ids.reshape(-1), torch.tensor([-1])])
    idx = packed.response_index.view(len(prompt_lens), -1)
    for i, (p, r) in enumerate(zip(prompt_lens, resp_lens)):
        resp = exp.input_ids[i, exp.prompt_len:exp.prompt_len + r]
        before = torch.cat([exp.input_ids[i, exp.prompt_len - 1:exp.prompt_len], resp])[:r]
        assert torch.equal(flat_ids[idx[i, :r]], before)
        assert (idx[i, r:] == packed.input_ids.numel()).all()


def test_packed_hidden_states_and_gradients_equal_the_padded_batch():
    exp = _experience([3, 9, 5, 2, 6], [4, 1, 8, 2, 7], seed=1)
    for head, is_causal in (("lm", True), ("scalar", True), ("scalar", False)):
        model = _model(head, is_causal=is_causal).double()
        padded = _padded_response_hidden(model, exp)
        packed = response_hidden(model, exp)
        m = exp.mask.bool()
        assert torch.allclose(packed[m], padded[m], atol=1e-10)
        assert (packed[~m] == 0).all()
        # gradients of a masked loss through either layout agree
        w = torch.randn(packed.shape[-1], dtype=torch.float64)
        grads = []
        for h_fn in (_padded_response_hidden, response_hidden):
            model.zero_grad()
            ((h_fn(model, exp) @ w) * exp.mask).sum().backward()
            grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        for a, b in zip(*grads):
            assert torch.allclose(a, b, atol=1e-10)


def test_policy_logprobs_and_values_from_packed_rows_match_the_padded_batch():
    exp = _experience([4, 8, 6], [5, 2, 7], seed=2)
    actor, critic = _model("lm", seed=3), _model("scalar", seed=4)
    with torch.no_grad():
        logp = policy_logprobs(actor, exp, 0.7)
        ref = torch.log_softmax(actor.lm_head(_padded_response_hidden(actor, exp)) / 0.7, -1)
        ref = ref.gather(-1, exp.input_ids[:, exp.prompt_len:, None]).squeeze(-1)
        m = exp.mask.bool()
        assert torch.allclose(logp[m], ref[m], atol=1e-5)
        values = critic_values(critic, exp)
        assert torch.allclose(values[m], critic.scores(_padded_response_hidden(critic, exp))[m], atol=1e-5)
