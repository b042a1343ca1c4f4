"""generation: filter_logits (top-k, top-p) and inverse_cdf against brute-force references; generate's draws
and log-probs."""

import math

import torch
import torch.nn.functional as F

from lmforge.generation import (
    NUCLEUS_CANDIDATES,
    SamplingParams,
    filter_logits,
    generate,
    generate_batched,
    inverse_cdf,
)
from lmforge.model import Transformer
from tests.conftest import tiny_config


def _nucleus_by_hand(row: torch.Tensor, top_p: float) -> set[int]:
    """The most likely tokens, one at a time, while the mass already kept is at most top_p."""
    probs = row.double().softmax(-1)
    kept, mass = set(), 0.0
    for i in sorted(range(len(row)), key=lambda i: -float(row[i])):
        if mass > top_p:
            return kept
        kept.add(i)
        mass += float(probs[i])
    return kept


def test_top_p_keeps_the_smallest_prefix_reaching_p_narrow_and_wide_nuclei():
    gen = torch.Generator().manual_seed(0)
    vocab = 4 * NUCLEUS_CANDIDATES
    # Peaked rows: the nucleus lies among the first candidates. Flat rows: it is wider, so the full sort runs.
    for scale in (8.0, 0.1):
        logits = torch.randn(6, vocab, generator=gen) * scale
        for top_p in (0.3, 0.9, 0.99):
            out = filter_logits(logits, top_p=top_p)
            for row, filtered in zip(logits, out):
                kept = set(torch.isfinite(filtered).nonzero()[:, 0].tolist())
                assert kept == _nucleus_by_hand(row, top_p)
                assert torch.equal(filtered[list(kept)], row[list(kept)])  # kept logits unchanged
    # Logits near 1e4 (float32's spacing there is 1e-3): the nucleus still holds top_p of the mass, to 1e-6.
    large = torch.randn(500, 1024, generator=torch.Generator().manual_seed(0)) * 5 + 1e4
    kept = torch.isfinite(filter_logits(large, top_p=0.9))
    probs = large.double().softmax(-1)
    mass = (probs * kept).sum(-1)
    smallest = probs.masked_fill(~kept, 1.0).amin(-1)
    assert (mass >= 0.9 - 1e-6).all() and (mass - smallest <= 0.9 + 1e-6).all()
    wide = torch.zeros(1, vocab)  # uniform: top_p 0.9 keeps ceil(90%) of the tokens, far beyond the candidates
    assert torch.isfinite(filter_logits(wide, top_p=0.9)).sum() == math.ceil(0.9 * vocab)


def test_top_k_then_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isfinite(filter_logits(logits, top_k=3)).tolist() == [[True, True, True, False, False]]
    # Within the top 3, p = (0.665, 0.245, 0.090): top_p 0.8 keeps two.
    assert torch.isfinite(filter_logits(logits, top_k=3, top_p=0.8)).tolist() == [[True, True, False, False, False]]


def test_inverse_cdf_is_the_search_over_the_whole_running_sum():
    gen = torch.Generator().manual_seed(3)
    for vocab in (5, 64, 200, 4096):  # within one block, exactly blocks, a padded last block, many blocks
        weights = torch.rand(50, vocab, generator=gen) * (torch.rand(50, vocab, generator=gen) < 0.3)
        weights[:, vocab // 2] += 0.01  # no all-zero row
        weights[0] = 0.0
        weights[0, -1] = 1.0  # all the mass on the last token (a padded block's only non-zero weight)
        u = torch.rand(50, generator=gen, dtype=torch.float64)
        u[1], u[2] = 0.0, 1.0 - 2.0**-53  # the ends of [0, 1)
        index, total = inverse_cdf(weights, u)
        running = weights.double().cumsum(-1)
        brute = torch.searchsorted(running, (u * running[:, -1])[:, None], right=True)[:, 0].clamp(max=vocab - 1)
        assert torch.allclose(total, running[:, -1])
        assert (weights.gather(1, index[:, None]) > 0).all()  # a zero weight is never drawn
        assert index[0] == vocab - 1
        # Equal to the brute-force search except where the two running sums round differently at a boundary.
        mismatch = (index != brute).nonzero()[:, 0]
        for i in mismatch.tolist():
            edge = running[i, min(index[i], brute[i]).item()]
            assert abs(edge - u[i] * running[i, -1]) < 1e-9 * running[i, -1]


def _model():
    torch.manual_seed(0)
    return Transformer(tiny_config()).eval()


def test_generate_logprobs_are_the_models_log_softmax_at_the_drawn_tokens():
    """Sampled (plain and top-k) and greedy rows: each stored log-prob is log softmax(logits / T) of a full
    forward over prompt + response, at the token the row drew (unfiltered, as training recomputes it)."""
    model = _model()
    prompts = [[5, 9, 3], [7], [2, 8, 8, 4, 6]]
    for params in (SamplingParams(6, 0.7), SamplingParams(6, 1.3, top_k=5), SamplingParams(6, 0.0)):
        out = generate(model, prompts, params, stop_ids=[], pad_id=0, generator=torch.Generator().manual_seed(1))
        for prompt, tokens, logps in zip(prompts, out.tokens, out.logprobs):
            assert len(tokens) == 6
            logits = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1:-1].float()
            expect = F.log_softmax(logits / (params.temperature or 1.0), -1).gather(-1, torch.tensor(tokens)[:, None])
            assert torch.allclose(torch.tensor(logps), expect[:, 0], atol=1e-4)
            if params.top_k:  # every draw is among the row's top k
                assert all(logits[t].topk(5).indices.tolist().count(tok) for t, tok in enumerate(tokens))
            if not params.temperature:
                assert tokens == logits.argmax(-1).tolist()


def test_a_rows_draw_depends_on_its_own_uniforms_not_on_the_batch():
    """Row i's token t inverts its CDF at uniforms[i, t]: the same uniforms give the same response alone or in
    any batch, and u near 0 / near 1 draw the first / last token with mass (here at temperature 1)."""
    model = _model()
    prompts = [[5, 9, 3], [7], [2, 8, 8, 4, 6], [1, 1]]
    u = torch.rand(4, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    batch = generate(model, prompts, SamplingParams(5, 0.9), [], 0, uniforms=u)
    for i, p in enumerate(prompts):
        alone = generate(model, [p], SamplingParams(5, 0.9), [], 0, uniforms=u[i:i + 1])
        assert alone.tokens[0] == batch.tokens[i]
    vocab = model.config.vocab_size
    ends = generate(model, [[5]], SamplingParams(1, 1.0), [], 0, uniforms=torch.tensor([[0.0]], dtype=torch.float64))
    assert ends.tokens[0] == [0]  # softmax gives every token mass: u = 0 draws token 0
    ends = generate(model, [[5]], SamplingParams(1, 1.0), [], 0,
                    uniforms=torch.tensor([[1.0 - 2.0**-53]], dtype=torch.float64))
    assert ends.tokens[0] == [vocab - 1]


def test_rows_that_stop_early_leave_the_batch_and_the_rest_continue_as_alone():
    """A row that draws a stop token leaves the batch (its KV cache rows are dropped in place): every row's tokens
    and log-probs are still those it draws alone with the same uniforms."""
    model = _model()
    prompts = [[5, 9, 3], [7], [2, 8, 8, 4, 6], [1, 1], [4, 2]]
    u = torch.rand(len(prompts), 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    free = generate(model, prompts, SamplingParams(8, 1.0), [], 0, uniforms=u)
    stops = [free.tokens[0][1], free.tokens[3][2]]  # rows 0 and 3 stop at their second and third tokens
    batch = generate(model, prompts, SamplingParams(8, 1.0), stops, 0, uniforms=u)
    lengths = [len(t) for t in batch.tokens]
    # two of five rows left early (generate drops rows once at most 3/4 are live) while others ran to the end
    assert sorted(lengths)[1] <= 3 and max(lengths) == 8
    for i, p in enumerate(prompts):
        alone = generate(model, [p], SamplingParams(8, 1.0), stops, 0, uniforms=u[i:i + 1])
        assert alone.tokens[0] == batch.tokens[i] and alone.finished[0] == batch.finished[i]
        assert torch.allclose(torch.tensor(alone.logprobs[0]), torch.tensor(batch.logprobs[i]), atol=1e-5)


def test_generate_batched_responses_do_not_depend_on_the_batch_size(tok):
    """Each row's uniforms are drawn up front in input order, so batches of 1, 3 or all rows (sorted by length,
    so grouped differently) give every row the same response for one seed, and another seed changes them."""
    model = Transformer(tiny_config(vocab_size=tok.vocab_size)).eval()
    texts = ["The apple is", "A", "Tell me about the red fox and the dog", "Hi there", "What is two plus two"]
    rows = [tok.encode(t) for t in texts for _ in range(2)]
    params = SamplingParams(8, 1.0)
    results = [generate_batched(model, tok, rows, params, batch_size, seed=3) for batch_size in (1, 3, len(rows))]
    assert results[0] == results[1] == results[2]
    assert generate_batched(model, tok, rows, params, 3, seed=4)[0] != results[0][0]
