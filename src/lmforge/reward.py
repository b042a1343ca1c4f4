"""Reward model: a Transformer with a scalar head, trained on ranked, scored or pairwise human feedback.

Scores are read at the last real token (the closing <|end|> of the response) for a decoder backbone, whatever
the padding side; an encoder backbone reads the first token or the mean over real tokens. After training, a
normalisation (mean, std) is stored in the checkpoint's metadata and applied by every consumer.
"""

from __future__ import annotations

import torch

from lmforge.model import Transformer, last_token_index


def pool_scores(values: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "last") -> torch.Tensor:
    """(B, T) per-position head outputs -> (B,) scores: at the last real token, the first token, or the mean."""
    if pooling == "last":
        idx = last_token_index(attention_mask)
        return values[torch.arange(values.shape[0], device=values.device), idx]
    if pooling == "first":
        first = attention_mask.long().argmax(dim=1)  # first real token (left padding aware)
        return values[torch.arange(values.shape[0], device=values.device), first]
    if pooling == "mean":
        m = attention_mask.to(values.dtype)
        return (values * m).sum(1) / m.sum(1).clamp(min=1)
    raise ValueError(f"unknown pooling {pooling!r}")


def raw_scores(model: Transformer, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "last") -> torch.Tensor:
    """Un-normalised reward of each row (B,)."""
    values = model(input_ids, attention_mask=attention_mask)
    return pool_scores(values.float(), attention_mask, pooling)


def normalize(raw: torch.Tensor, meta: dict) -> torch.Tensor:
    """Apply the checkpoint's reward normalisation: (raw - reward_mean) / reward_std (identity if absent)."""
    return (raw - float(meta.get("reward_mean", 0.0))) / float(meta.get("reward_std", 1.0))
