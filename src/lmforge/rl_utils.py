"""The pure math of RLHF, shared by PPO (and later DPO/GRPO): masked statistics, KL estimators, the adaptive
KL controller, per-token rewards, GAE and the clipped PPO losses.

Every function works on padded (B, T) tensors of response tokens with a 0/1 `mask` of the real ones, and
never lets padding leak into a statistic. References: Ziegler et al. 2019 ("Fine-Tuning Language Models from
Human Preferences", arXiv 1909.08593), Ouyang et al. 2022 (InstructGPT, arXiv 2203.02155), Huang et al. 2023
("The N Implementation Details of RLHF with PPO"), Schulman et al. 2016/2017 (GAE, PPO).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from lmforge.model import last_token_index


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the positions where mask is 1 (0 when there are none)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased (Bessel-corrected) variance over the masked positions; needs at least 2 of them."""
    n = mask.sum()
    mean = masked_mean(x, mask)
    return (((x - mean) * mask) ** 2).sum() / (n - 1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the valid positions; padding is returned as 0.

    shift_mean=False adds the mean back, so only the spread is rescaled (reward whitening in OpenAI's
    lm-human-preferences, kept by "The N Implementation Details of RLHF with PPO": rewards keep their sign).
    Fewer than 2 valid positions have no variance: x is returned unchanged (masked) instead of NaN.
    """
    if mask.sum() < 2:
        return x * mask
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                         with_entropy: bool = False):
    """Log-prob of `tokens` (B, T) under softmax(logits / temperature), in fp32; optionally the entropy
    of that same tempered distribution (B, T). The same T must be used by rollout, reference and update."""
    logp_all = F.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: Literal["k1", "k3"] = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman, "Approximating KL").

    k1 = log pi - log pi_ref: unbiased, can be negative per token (what InstructGPT's reward uses).
    k3 = (r - 1) - log r with r = pi_ref / pi: unbiased, never negative, lower variance.
    """
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}")


class KLController:
    """The KL coefficient beta: fixed, or adaptive towards a target KL (Ziegler et al. 2019, section 2.2):

        err = clip(KL / target - 1, -0.2, 0.2);   beta <- beta * (1 + err * n_steps / horizon)

    KL is the mean per-sequence KL of the last batch and n_steps the number of sequences in it.
    """

    def __init__(self, init: float, target: float | None = None, horizon: int = 10000):
        self.value, self.target, self.horizon = float(init), target, horizon

    def update(self, kl: float, n_steps: int) -> float:
        if self.target is not None:
            err = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + err * n_steps / self.horizon
        return self.value


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token rewards: -beta * KL on every response token, plus the sequence score on the LAST REAL response
    token (its end-of-turn token when it stopped). Works for left- or right-padded masks.

    TRL and DeepSpeed-Chat add the score one position after the last token (on padding, or cut off): the
    off-by-one that "The N Implementation Details" and our checklist warn about.
    """
    rewards = -beta * kl * mask
    last = last_token_index(mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1},
    with V and A beyond the last real token masked to 0 (the episode ends there). Returns
    (advantages, returns = advantages + values), both 0 on padding.
    """
    rewards, values = rewards * mask, values * mask
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    running = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        adv[:, t] = running
    return adv, (adv + values) * mask


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip: float,
                      log_ratio_clip: float = 20.0,
                      clip_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped policy loss per token: max(-A * r, -A * clip(r, 1 - eps, 1 + eps_high)), eps_high = eps
    unless `clip_high` is set (DAPO's clip-higher, Yu et al. 2025, arXiv 2503.14476, 0.2 / 0.28: unlikely tokens
    of good responses may grow, against entropy collapse).

    r = exp(logp - old_logp) with old = the rollout's log-probs (detached). The log-ratio is clamped so a
    stray token cannot overflow exp(). Returns (loss, ratio, was_clipped) per token; reduce with a mask.
    """
    log_ratio = (logp - old_logp.detach()).clamp(-log_ratio_clip, log_ratio_clip)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + (clip if clip_high is None else clip_high))
    return torch.maximum(unclipped, clipped), ratio, (clipped > unclipped).float()


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * max((v - R)^2, (clip(v, v_old - eps, v_old + eps) - R)^2) per token, and where the clip won."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    a, b = (values - returns) ** 2, (v_clipped - returns) ** 2
    return 0.5 * torch.maximum(a, b), (b > a).float()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over valid tokens: 1 = perfect critic, 0 = no better than a constant."""
    if mask.sum() < 2:
        return math.nan
    var_r = float(masked_var(returns, mask))
    if var_r <= 0:
        return math.nan
    return 1.0 - float(masked_var(returns - values, mask)) / var_r


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses of the DPO family from summed response log-probs (B,), and the implicit rewards
    beta * (logp - logp_ref) of chosen and rejected (detached). The reference log-probs are constants.

    With the log-ratio margin m = (logp_c - logp_ref_c) - (logp_r - logp_ref_r):
        sigmoid   -(1 - ls) * log sigmoid(beta * m) - ls * log sigmoid(-beta * m)
                  DPO (Rafailov et al. 2023, arXiv 2305.18290); ls > 0 is conservative DPO (cDPO, Mitchell 2023):
                  each label is taken as flipped with probability ls
        ipo       (m - 1 / (2 * beta))^2        IPO (Azar et al. 2023, arXiv 2310.12036)
        hinge     max(0, 1 - beta * m)          SLiC-HF (Zhao et al. 2023, arXiv 2305.10425)
    """
    chosen = policy_chosen - ref_chosen.detach()
    rejected = policy_rejected - ref_rejected.detach()
    m = chosen - rejected
    if loss == "sigmoid":
        out = -(1.0 - label_smoothing) * F.logsigmoid(beta * m) - label_smoothing * F.logsigmoid(-beta * m)
    elif loss == "ipo":
        out = (m - 1.0 / (2.0 * beta)) ** 2
    elif loss == "hinge":
        out = F.relu(1.0 - beta * m)
    else:
        raise ValueError(f"unknown DPO loss {loss!r}")
    return out, (beta * chosen).detach(), (beta * rejected).detach()


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's outcome advantage (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300): each response's reward
    against the other responses to the same prompt, A_i = (r_i - mean(group)) / (std(group) + eps).

    rewards (N,) hold the G = group_size responses of one prompt consecutively (N = prompts * G). std is the
    unbiased (Bessel-corrected) one, torch.std's default, as in DeepSeekMath's and TRL's code. scale=False drops
    the division (Dr. GRPO, Liu et al. 2025, arXiv 2503.20783): dividing by std up-weights prompts that are too
    easy or too hard. A group whose rewards are all equal carries no signal: its advantages are exactly 0.
    """
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"group_size {group_size} must be >= 2 and divide the {rewards.numel()} rewards")
    r = rewards.reshape(-1, group_size)
    same = (r == r[:, :1]).all(1, keepdim=True)  # tested on the values: rounding in the mean must not leak
    centred = torch.where(same, torch.zeros_like(r), r - r.mean(1, keepdim=True))
    if scale:
        centred = centred / torch.where(same, torch.ones_like(r[:, :1]), r.std(1, keepdim=True) + eps)
    return centred.reshape(rewards.shape)
