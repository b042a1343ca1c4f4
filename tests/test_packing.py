"""packing.py: first-fit placement, and the packed layout of a padded batch (every real token once, positions
restarting, segments per sequence) against the padded batch, for left, right and two-sided padding."""

import torch

from lmforge.model import ModelConfig, Transformer
from lmforge.packing import MIN_WIDTH, first_fit_decreasing, pack_batch, packed_width


def test_first_fit_decreasing_fills_rows_without_overlap():
    lengths = [30, 50, 20, 70, 10, 40, 60, 25]
    place = first_fit_decreasing(lengths, 100)
    rows = {}
    for n, (k, o) in zip(lengths, place):
        rows.setdefault(k, []).append((o, o + n))
    for spans in rows.values():
        spans.sort()
        assert spans[0][0] == 0 and spans[-1][1] <= 100
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous, no overlap
    assert len(rows) == 4  # 305 tokens: 4 rows of 100 is the fewest possible
    assert place == first_fit_decreasing(lengths, 100)  # deterministic


def _batch(spans, width, seed=0):
    """(ids, mask) with row i real on columns spans[i] = (first, length)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(spans), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (f, n) in enumerate(spans):
        ids[i, f:f + n] = torch.randint(1, 50, (n,), generator=g)
        mask[i, f:f + n] = 1
    return ids, mask


def test_every_real_token_lands_once_with_restarting_positions():
    spans = [(5, 3), (0, 12), (2, 6), (7, 5), (0, 1)]  # left, right and two-sided padding
    ids, mask = _batch(spans, 12)
    packed = pack_batch(ids, mask, max_positions=64, capacity=16)
    assert packed.input_ids.shape == (2, 16)  # 27 tokens
    assert int(packed.attention_mask.sum()) == sum(n for _, n in spans)
    for i, (f, n) in enumerate(spans):
        seg = packed.segment_ids == i + 1
        assert torch.equal(packed.input_ids[seg], ids[i, f:f + n])
        assert torch.equal(packed.position_ids[seg], torch.arange(n))
        rows, cols = packed.locate(torch.full((n,), i), torch.arange(f, f + n))
        assert torch.equal(packed.input_ids[rows, cols], ids[i, f:f + n])
        lr, lc = packed.ends("last")
        fr, fc = packed.ends("first")
        assert packed.input_ids[lr[i], lc[i]] == ids[i, f + n - 1] and packed.input_ids[fr[i], fc[i]] == ids[i, f]
    assert (packed.segment_ids[packed.attention_mask == 0] == 0).all()


def test_packed_rows_compute_what_the_padded_batch_computes():
    spans = [(4, 6), (0, 10), (1, 3), (6, 4), (2, 8)]
    ids, mask = _batch(spans, 10, seed=1)
    for is_causal in (True, False):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=64, is_causal=is_causal))
        model = model.double()
        padded = model.hidden_states(ids, attention_mask=mask)
        packed = pack_batch(ids, mask, 64, capacity=20)
        h = model.hidden_states(packed.input_ids, **packed.inputs)
        rows, cols = mask.nonzero(as_tuple=True)
        assert torch.allclose(h[packed.locate(rows, cols)], padded[rows, cols], atol=1e-10)


def test_width_is_at_least_the_longest_sequence_and_at_most_the_context():
    ids, mask = _batch([(0, 40), (0, 3), (0, 30), (0, 35), (0, 20)], 40)  # 128 tokens
    assert pack_batch(ids, mask, max_positions=256).input_ids.shape == (1, 128)  # against 4 rows of 40
    assert pack_batch(ids, mask, max_positions=64).input_ids.shape == (4, 40)  # 3 rows of 64 hold more slots
    ids, mask = _batch([(0, 200), (0, 100)], 200)
    assert pack_batch(ids, mask, max_positions=512).input_ids.shape == (2, 200)


def test_width_is_the_one_that_leaves_fewer_slots():
    """Sequences of similar length (a batch sorted by length) fill rows of the longest; rows of MIN_WIDTH would
    hold one each and add padding. Mixed lengths pack into fewer slots in wide rows."""
    similar = [70, 72, 75, 71]
    assert packed_width(similar, 256) == 75  # 4 x 75 = 300 slots against 4 x 128 = 512
    mixed = [60, 20, 58, 25, 61, 22]
    assert packed_width(mixed, 256) == MIN_WIDTH  # 2 x 128 = 256 slots against 5 x 61 = 305
    assert packed_width(mixed, 100) == 100  # capped by the context: 3 x 100 = 300 slots, still fewer
