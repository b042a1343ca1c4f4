"""The language-modelling loss and its one ignore label: `linear_cross_entropy` (the fused LM head and loss that
pretraining, SFT and PPO-ptx train with), `linear_logprobs` (the fused LM head and per-token log-probs that PPO's
and GRPO's policy losses read), and the plain versions over materialised logits (`lm_loss`, `token_nll`:
per-token values for evaluation and the reference the fused one is tested against).

Log-softmax runs in fp32 even under bf16 autocast: the loss of a large vocabulary loses precision otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

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


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i scale * CE(hidden_i @ weight.T, target_i), with the gradients computed in the forward pass.

    The loss is a scalar, so its gradients are known up to the one number backward multiplies them by: each
    chunk of rows computes its logits, log-sum-exp and softmax, turns them into its gradient (softmax - one-hot)
    and folds that into d(hidden) and d(weight) while the chunk is still in cache, then drops it. The full
    (N, V) logits, their log-softmax and the gradient of both are never stored (Liger-Kernel's "fused linear
    cross-entropy"; Wijmans et al. 2024, "Cut your losses"): less memory for large vocabularies, and on a CPU
    the LM head stops being the memory-bound third of a small model's step.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, chunk_rows):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        cast = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
            else weight.dtype
        acc = torch.promote_types(weight.dtype, torch.float32)  # softmax and sums: fp32 at least
        w, scale = weight.to(cast), scale.to(acc)
        d_hidden = torch.empty_like(hidden) if need_h else None
        d_weight = torch.zeros_like(weight, dtype=acc) if need_w else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk_rows):
                h, t = hidden[s:s + chunk_rows].to(cast), targets[s:s + chunk_rows, None]
                weight_of_row = (t != IGNORE).to(acc) * scale   # 0 for unlabelled rows
                t = t.clamp(min=0)
                z = (h @ w.t()).to(acc)
                picked = z.gather(1, t)
                top = z.amax(dim=-1, keepdim=True)
                z = z.sub_(top).exp_()                          # in place: the logits are not needed again
                sum_exp = z.sum(dim=-1, keepdim=True)
                total += ((top + sum_exp.log() - picked) * weight_of_row).sum()  # log-sum-exp - target logit
                if need_h or need_w:
                    grad = z.mul_(weight_of_row / sum_exp)      # scale * softmax ...
                    grad.scatter_add_(1, t, -weight_of_row)     # ... - scale * one-hot
                    grad = grad.to(cast)
                    if need_h:
                        d_hidden[s:s + chunk_rows] = grad @ w
                    if need_w:
                        if cast == acc:
                            d_weight.addmm_(grad.t(), h)
                        else:
                            d_weight += (grad.t() @ h).to(acc)
        ctx.save_for_backward(d_hidden, d_weight.to(weight.dtype) if need_w else None)
        return total

    @staticmethod
    @once_differentiable  # the gradients were computed in the forward: they have no graph of their own
    def backward(ctx, grad_out):
        d_hidden, d_weight = ctx.saved_tensors
        return (d_hidden * grad_out if d_hidden is not None else None,
                d_weight * grad_out if d_weight is not None else None, None, None, None)


def _chunk_rows(hidden: torch.Tensor, weight: torch.Tensor, chunk_rows: int) -> int:
    """Rows of logits per chunk: chunk_rows, or about 8 MB of fp32 logits on a CPU (they stay in cache), 256 MB on
    a GPU (fewer, larger kernels)."""
    return chunk_rows or max(64, (1 << (21 if hidden.device.type == "cpu" else 26)) // weight.shape[0])


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         reduction: str = "mean", chunk_rows: int = 0) -> torch.Tensor:
    """Cross-entropy of the LM head `weight` (V, d) applied to `hidden` (..., d) against `labels` (...), over the
    labelled positions (not IGNORE): their mean or sum. The same value and gradients as
    `lm_loss(hidden @ weight.T, labels)` without materialising the logits (see _LinearCrossEntropy).
    chunk_rows: rows per chunk (0: about 8 MB of fp32 logits per chunk on a CPU, where they stay in cache; 256 MB
    on a GPU, where fewer, larger kernels matter more)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    if not torch.is_grad_enabled():  # evaluation: no gradients to fold in (needs_input_grad ignores no_grad)
        hidden, weight = hidden.detach(), weight.detach()
    labels, hidden = labels.reshape(-1), hidden.reshape(-1, hidden.shape[-1])
    keep = labels != IGNORE
    n = keep.sum()
    # Only labelled rows go through the head (SFT: the responses). Under torch.compile the rows stay (a
    # data-dependent shape would break the graph); the loss masks them.
    if not torch.compiler.is_compiling() and int(n) < len(labels):
        hidden, labels = hidden[keep], labels[keep]
    scale = (1.0 / n.clamp(min=1).float()) if reduction == "mean" else torch.ones((), device=hidden.device)
    chunk = _chunk_rows(hidden, weight, chunk_rows)
    return _LinearCrossEntropy.apply(hidden, weight, labels, scale, chunk)


# linear_logprobs keeps the logits for backward up to this size, and recomputes them chunk by chunk above it
KEEP_LOGITS_BYTES = 256 << 20


class _LinearLogprobs(torch.autograd.Function):
    """log softmax(hidden @ weight.T / temperature) at `targets`, and optionally that distribution's entropy as a
    statistic (no gradient).

    RL's counterpart of _LinearCrossEntropy. PPO's and GRPO's losses are per-token functions of these log-probs, so
    their gradients arrive only in backward, and backward needs the softmax. The plain path (logits, a tempered
    copy, log-softmax, and the softmax autograd keeps) peaks at ~3.4 x N x V x 4 bytes. Here:
    - keep_logits: one (N, V) buffer holds the tempered logits; the log-sum-exp, picked log-prob and entropy run
      over it in cache-sized chunks, and backward turns it in place into the gradient g * (one-hot - softmax)
      for two full-size matmuls. ~1 x N x V, and faster than the plain path on a CPU (fewer passes over memory).
    - otherwise nothing of size N x V is kept: backward recomputes each chunk's logits (one more LM-head matmul)
      for large vocabularies whose logits would not fit.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_rows, with_entropy, keep_logits):
        cast = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
            else weight.dtype
        acc = torch.promote_types(weight.dtype, torch.float32)  # softmax and sums: fp32 at least
        w, n = weight.to(cast), hidden.shape[0]
        logp = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        entropy = torch.empty(n if with_entropy else 0, dtype=acc, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            kept = (hidden.to(cast) @ w.t()).to(acc) if keep_logits else None
            if kept is not None and temperature != 1.0:
                kept.div_(temperature)
            for s in range(0, n, chunk_rows):
                if kept is not None:
                    z = kept[s:s + chunk_rows]
                else:
                    z = (hidden[s:s + chunk_rows].to(cast) @ w.t()).to(acc)
                    if temperature != 1.0:
                        z.div_(temperature)
                top = z.amax(dim=-1, keepdim=True)
                e = (z - top).exp_()
                sum_e = e.sum(dim=-1, keepdim=True)
                row_lse = (top + sum_e.log()).squeeze(1)
                lse[s:s + chunk_rows] = row_lse
                logp[s:s + chunk_rows] = z.gather(1, targets[s:s + chunk_rows, None]).squeeze(1) - row_lse
                if with_entropy:  # H = -sum p (z - lse) = lse - sum p z
                    entropy[s:s + chunk_rows] = row_lse - (e.mul_(z).sum(dim=-1) / sum_e.squeeze(1))
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.kept = kept  # an intermediate, not an input or output: on ctx (PyTorch's rule), freed by backward
        ctx.temperature, ctx.chunk_rows, ctx.cast, ctx.keep_logits = temperature, chunk_rows, cast, keep_logits
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        kept, ctx.kept = ctx.kept, None
        if grad_logp is None or not (need_h or need_w):
            return None, None, None, None, None, None, None
        if ctx.keep_logits and kept is None:
            raise RuntimeError("linear_logprobs with keep_logits: backward runs once (its logits became the gradient)")
        cast, acc, rows, n = ctx.cast, lse.dtype, ctx.chunk_rows, hidden.shape[0]
        w = weight.to(cast)
        d_hidden = torch.empty_like(hidden) if need_h else None
        d_weight = torch.zeros_like(weight, dtype=acc) if need_w else None

        def to_grad(z, s):  # tempered logits -> g * (one-hot - softmax) / T, in place
            g = grad_logp[s:s + rows, None].to(acc) / ctx.temperature
            z.sub_(lse[s:s + rows, None]).exp_().mul_(-g)
            return z.scatter_add_(1, targets[s:s + rows, None], g)

        def fold(grad, h, s):  # into d(hidden) and d(weight)
            if need_h:
                d_hidden[s:s + len(grad)] = grad @ w
            if need_w:
                if cast == acc:
                    d_weight.addmm_(grad.t(), h)
                else:
                    d_weight.add_((grad.t() @ h).to(acc))

        with torch.autocast(hidden.device.type, enabled=False):
            if kept is not None:
                for s in range(0, n, rows):
                    to_grad(kept[s:s + rows], s)
                fold(kept.to(cast), hidden.to(cast), 0)
            else:
                for s in range(0, n, rows):
                    h = hidden[s:s + rows].to(cast)
                    z = (h @ w.t()).to(acc)
                    if ctx.temperature != 1.0:
                        z.div_(ctx.temperature)
                    fold(to_grad(z, s).to(cast), h, s)
        return d_hidden, d_weight.to(weight.dtype) if need_w else None, None, None, None, None, None


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                    with_entropy: bool = False, chunk_rows: int = 0, keep_logits: bool | None = None):
    """Log-probs (N,) of `targets` (N,) under softmax(hidden @ weight.T / temperature), hidden (N, d), weight
    (V, d); with_entropy: also the entropy (N,) of that distribution, without a gradient (a statistic). The same
    values and gradients as `rl_utils.logprobs_from_logits(hidden @ weight.T, ...)` without materialising the
    logits more than once (see _LinearLogprobs). chunk_rows as in linear_cross_entropy. keep_logits: one (N, V)
    buffer of logits for backward, or recompute them chunk by chunk (None: keep them when a gradient is wanted and
    they take at most KEEP_LOGITS_BYTES)."""
    chunk = _chunk_rows(hidden, weight, chunk_rows)
    if keep_logits is None:
        wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
        keep_logits = wants_grad and hidden.shape[0] * weight.shape[0] * 4 <= KEEP_LOGITS_BYTES
    logp, entropy = _LinearLogprobs.apply(hidden, weight, targets, float(temperature), chunk, with_entropy,
                                          keep_logits)
    return (logp, entropy) if with_entropy else logp
