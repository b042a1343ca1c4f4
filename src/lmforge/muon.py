"""Muon for the Transformer blocks' weight matrices, AdamW for everything else, in one optimizer.

Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks") is SGD with Nesterov momentum
whose update for each weight matrix is replaced by the nearest semi-orthogonal matrix, computed with a few
Newton-Schulz iterations: every direction of the update moves the weights by the same amount, instead of a few
dominant directions taking all of it. modded-nanogpt and nanochat train their matrices with it; embeddings, the LM
head, norms and biases stay on AdamW (they are not linear maps between hidden states).

Each Muon update is scaled by 0.2 * sqrt(max(rows, cols)), which gives it the RMS of a typical AdamW update, so
the same learning rate, schedule and decoupled weight decay carry over (Liu et al. 2025, "Muon is Scalable for LLM
Training", the Moonlight recipe).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch.optim.adamw import adamw

NEWTON_SCHULZ_COEFFS = (3.4445, -4.7750, 2.0315)  # Jordan 2024: fast, maps singular values into ~[0.7, 1.2]


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """About U V^T for a batch (..., m, n) of matrices U S V^T: a quintic Newton-Schulz iteration on the matrix
    scaled to spectral norm <= 1. It does not converge to exactly 1 (singular values end in ~[0.7, 1.2]): for an
    update direction that is enough, and 5 steps of 3 matmuls are cheap next to an SVD. fp32 on CPU (bf16 matmul
    is slow there), bf16 on CUDA as in modded-nanogpt."""
    a, b, c = NEWTON_SCHULZ_COEFFS
    x = g.to(torch.bfloat16 if g.device.type == "cuda" else torch.float32).reshape(-1, *g.shape[-2:])
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = (x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)).contiguous()  # Frobenius >= spectral norm
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)    # b * gram + c * gram @ gram
        x = torch.baddbmm(x, poly, x, beta=a)                      # a * x + poly @ x
    return (x.mT if tall else x).reshape(g.shape).to(g.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Param groups with `muon=True` take Muon steps (2-D parameters only), the others AdamW steps (the fused
    kernel where the device has one). Every group has lr and weight_decay, so schedules and weight-decay groups
    work as with AdamW; state_dict and load_state_dict are the standard ones."""

    def __init__(self, groups: list[dict], lr: float, betas=(0.9, 0.95), eps: float = 1e-8, momentum: float = 0.95,
                 ns_steps: int = 5):
        for g in groups:
            if g.get("muon") and any(p.dim() != 2 for p in g["params"]):
                raise ValueError("Muon groups take 2-D weight matrices only")
        super().__init__(groups, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0, "momentum": momentum,
                                  "ns_steps": ns_steps, "muon": False})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (self._muon_step if group["muon"] else self._adamw_step)(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        by_shape: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mu)                       # EMA of the gradients
            by_shape[p.shape].append((p, p.grad.lerp(buf, mu)))  # Nesterov: look one momentum step ahead
        for shape, items in by_shape.items():  # same-shaped matrices orthogonalized as one batched iteration
            ortho = orthogonalize(torch.stack([u for _, u in items]), group["ns_steps"])
            scale = 0.2 * math.sqrt(max(shape))
            for (p, _), o in zip(items, ortho):
                p.mul_(1 - lr * wd)
                p.add_(o, alpha=-lr * scale)

    def _adamw_step(self, group: dict) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        fused = params[0].device.type in ("cuda", "cpu") and not params[0].is_sparse
        beta1, beta2 = group["betas"]
        adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, fused=fused, amsgrad=False, beta1=beta1,
              beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
