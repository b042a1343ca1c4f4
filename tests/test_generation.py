"""generation.filter_logits: top-k and the top-p nucleus against a brute-force reference."""

import math

import torch

from lmforge.generation import NUCLEUS_CANDIDATES, filter_logits


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
