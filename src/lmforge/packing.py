"""Packing: the real tokens of a padded batch laid end to end in fewer, fuller rows.

A padded batch is as wide as its longest sequence, so batches of mixed lengths (RL rollouts, reward-model
responses, DPO pairs) spend much of their compute on padding: in the default run one long PPO response sets the
width of every rollout's row, and 73% of a batch's tokens were padding once the policy answered briefly. `pack_batch` moves each
row's real tokens (one contiguous span, left or right padded) into rows of `capacity` tokens; segment ids keep
attention within a sequence and positions restart at 0, so the model computes exactly what it computes on the
padded batch (tests/test_packing.py), on fewer tokens. `locate` maps (row, column) of the padded batch to the
packed one, for the LM or scalar head at the positions a loss needs.

SFT packs its records in the same layout (stages/sft.py packs while it batches, keeping the epoch's order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_WIDTH = 128  # rows this wide (if the model's context allows) when that packs into fewer slots: BENCHMARKS.md


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[tuple[int, int]]:
    """(row, offset) of each sequence of `lengths`: longest first, each into the first row with room (within
    11/9 of the fewest rows). Deterministic, so the same batch always packs the same way."""
    place: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        k = next((k for k, u in enumerate(used) if u + lengths[i] <= capacity), len(used))
        if k == len(used):
            used.append(0)
        place[i] = (k, used[k])
        used[k] += lengths[i]
    return place


def packed_width(lengths: list[int], max_positions: int) -> int:
    """Row width for packing `lengths`: the longest sequence, or MIN_WIDTH (at most the model's context) when its
    rows hold fewer slots (rows x width) in all. Mixed lengths (RL rollouts) pack densely into wide rows;
    similar lengths (batches sorted by length) already fill rows of the longest, where wider rows would hold one
    sequence each and add padding. Attention within a row costs width², so no wider than MIN_WIDTH."""
    longest = max(lengths)
    wide = min(max_positions, max(longest, MIN_WIDTH))
    if wide == longest:
        return longest

    def slots(width: int) -> int:
        return width * (1 + max(row for row, _ in first_fit_decreasing(lengths, width)))

    return wide if slots(wide) < slots(longest) else longest


@dataclass
class PackedBatch:
    """A padded (N, W) batch packed into (K, C) rows. `inputs` are the model's keyword arguments."""
    input_ids: torch.Tensor       # (K, C)
    attention_mask: torch.Tensor  # (K, C) 1 on real tokens
    position_ids: torch.Tensor    # (K, C) restarting at 0 for every sequence
    segment_ids: torch.Tensor     # (K, C) 1, 2, ... per sequence, 0 on padding
    first: torch.Tensor           # (N,) first real column of each padded row
    start: torch.Tensor           # (N,) flat index (k * C + c) of each sequence's first token
    lengths: torch.Tensor         # (N,) real tokens per sequence

    @property
    def inputs(self) -> dict:
        return {"attention_mask": self.attention_mask, "position_ids": self.position_ids,
                "segment_ids": self.segment_ids}

    def flat_index(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Flat packed index (k * C + c) of padded positions (rows, cols), which must be real tokens."""
        return self.start[rows] + cols - self.first[rows]

    def locate(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed rows, packed columns) of padded positions (rows, cols), which must be real tokens: e.g.
        `head_at` for Transformer.forward."""
        return self._rows_cols(self.flat_index(rows, cols))

    def ends(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed rows, packed columns) of each sequence's "first" or "last" token."""
        return self._rows_cols(self.start + (self.lengths - 1 if which == "last" else 0))

    def _rows_cols(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return flat // self.input_ids.shape[1], flat % self.input_ids.shape[1]

    def segment_mean(self, values: torch.Tensor) -> torch.Tensor:
        """(K, C) per-position values -> (N,) the mean over each sequence's tokens."""
        sums = values.new_zeros(len(self.lengths) + 1).index_add(0, self.segment_ids.reshape(-1), values.reshape(-1))
        return sums[1:] / self.lengths.clamp(min=1).to(values.dtype)


def pack_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, max_positions: int,
               capacity: int | None = None) -> PackedBatch:
    """Pack a padded batch whose real tokens form one contiguous span per row (left padding, right padding or
    both, as RL rollouts have) into rows of `capacity` tokens (default: packed_width)."""
    dev, (N, W) = input_ids.device, input_ids.shape
    real = attention_mask.bool()
    lengths = real.sum(1)
    first = real.long().argmax(1)  # first real column (0 for an empty row)
    if capacity is None:
        capacity = packed_width(lengths.tolist(), max_positions)
    place = torch.tensor(first_fit_decreasing(lengths.tolist(), capacity), dtype=torch.long, device=dev)
    start = place[:, 0] * capacity + place[:, 1]
    K = int(place[:, 0].max()) + 1
    j = torch.arange(int(lengths.max()), device=dev)[None]  # offset within a sequence
    keep = j < lengths[:, None]
    src = (torch.arange(N, device=dev)[:, None] * W + first[:, None] + j)[keep]
    dst = (start[:, None] + j)[keep]
    ids, mask, pos, seg = (torch.zeros(K * capacity, dtype=torch.long, device=dev) for _ in range(4))
    ids[dst] = input_ids.reshape(-1)[src]
    mask[dst] = 1
    pos[dst] = j.expand(N, -1)[keep]
    seg[dst] = (torch.arange(N, device=dev) + 1)[:, None].expand(N, j.shape[1])[keep]
    shape = (K, capacity)
    return PackedBatch(ids.view(shape), mask.view(shape), pos.view(shape), seg.view(shape), first, start, lengths)
