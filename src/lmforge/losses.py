"""The language-modelling loss, shared by pretraining, SFT and PPO-ptx, and its one ignore label.

Log-softmax runs in fp32 even under bf16 autocast: the loss of a large vocabulary loses precision otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # the label of positions without a loss (F.cross_entropy's ignore_index)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of (B, T, V) logits against (B, T) labels over the labelled positions.

    Next-token prediction passes labels already shifted (logits at t score token t + 1); masked-token
    prediction passes the original ids at masked positions and IGNORE elsewhere.
    """
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T) negative log-likelihood of each labelled token under the logits of the position before it
    (0 elsewhere and at t = 0). Only labelled positions go through log-softmax, so a long prompt's logits are
    never materialised in fp32 (SFT, where most tokens are prompt)."""
    targets = labels[:, 1:]  # the logits at t predict token t + 1
    sel = targets != IGNORE
    nll = torch.zeros(targets.shape, device=logits.device, dtype=torch.float32)
    nll[sel] = F.cross_entropy(logits[:, :-1][sel].float(), targets[sel], reduction="none")
    return F.pad(nll, (1, 0))
