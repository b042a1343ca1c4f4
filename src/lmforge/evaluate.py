"""Evaluate policies on held-out prompts, in the spirit of InstructGPT's tables (Ouyang et al. 2022, section 4).

For each policy (base, SFT, PPO, ...):
  oracle_score      mean 0..100 score of the built-in world's judge on the policy's responses
  win_rate_vs_sft   per prompt, the oracle compares the response with the SFT policy's (win 1, tie 1/2, loss 0);
                    the SFT row is 1/2 by definition
  rm_score          mean normalised reward-model score (if a reward model is given): comparing it with the oracle
                    exposes reward hacking (Gao et al. 2022, "Scaling laws for reward model overoptimization")
  kl_to_sft         mean over prompts of sum_t [log pi(y_t|x,y_<t) - log pi_sft(y_t|x,y_<t)] on responses SAMPLED
                    from the policy at temperature 1 (the k1 estimator of KL(pi || pi_sft), as logged in PPO).
                    Greedy responses are not samples of pi, so the KL pass is a separate temperature-1 sampling pass
                    (reused when the scored responses are themselves temperature-1 samples). Both log-probs are
                    teacher-forced over the same token ids, in fp32.
  mean_length       tokens of the scored responses (without the closing stop token)

The scored responses are greedy by default (temperature 0), so scores are deterministic.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.checkpoint import load_model, read_config
from lmforge.errors import LmforgeError
from lmforge.generation import SamplingParams
from lmforge.sample import encode_prompts, generate_batched, read_prompts, response_text


@torch.no_grad()
def response_logprobs(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                      batch_size: int = 32) -> torch.Tensor:
    """Teacher-forced sum of log pi(response token | prefix) over each response's tokens, (N,) float64.

    Sequences are right-padded (positions cumsum(mask) - 1) and the LM head runs only on response positions,
    so memory is (response tokens x vocab) rather than (batch x length x vocab).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.zeros(len(prompts), dtype=torch.float64)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        seqs = [prompts[i] + responses[i] for i in idx]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), T), dtype=torch.long)
        rows, cols = [], []
        for j, (i, s) in enumerate(zip(idx, seqs)):
            ids[j, :len(s)] = torch.tensor(s)
            mask[j, :len(s)] = 1
            rows += [j] * len(responses[i])
            cols += range(len(prompts[i]), len(s))
        if not rows:
            continue
        ids, mask = ids.to(device), mask.to(device)
        rows_t, cols_t = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
        h = model.hidden_states(ids, attention_mask=mask)
        logits = model.lm_head(h[rows_t, cols_t - 1]).float()  # the token at t is predicted at t - 1
        lp = F.log_softmax(logits, dim=-1).gather(-1, ids[rows_t, cols_t][:, None]).squeeze(-1)
        owner = torch.tensor(idx)[rows_t.cpu()]
        out.index_add_(0, owner, lp.double().cpu())
    model.train(was_training)
    return out


def reward_hacking_flag(rows: dict[str, dict], sft_name: str = "sft") -> list[str]:
    """Policies whose reward-model score rose above the SFT policy's while their oracle score fell below it."""
    base = rows.get(sft_name)
    if base is None or base.get("rm_score") is None or base.get("oracle_score") is None:
        return []
    return [name for name, r in rows.items()
            if name != sft_name and r.get("rm_score") is not None and r.get("oracle_score") is not None
            and r["rm_score"] > base["rm_score"] and r["oracle_score"] < base["oracle_score"]]


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def evaluate_policies(policies: dict[str, str | Path], prompts_file: str | Path, sft_name: str = "sft",
                      rm_dir: str | Path | None = None, max_new_tokens: int = 64, temperature: float = 0.0,
                      seed: int = 0, batch_size: int = 64, n_examples: int = 3, device: str = "auto",
                      progress: bool = True) -> dict:
    """Evaluate each policy checkpoint on the prompts of `prompts_file` (see the module docstring).

    Returns {"policies": {name: {oracle_score, win_rate_vs_sft, rm_score, kl_to_sft, mean_length,
    finished_frac, examples}}, "reward_hacking": [names], "prompts": n, "seconds": s}.
    """
    from tqdm import tqdm

    from lmforge.training import pick_device
    from lmforge.world import oracle_score, prompt_family

    t0 = time.perf_counter()
    if sft_name not in policies:
        raise LmforgeError(f"evaluation needs the SFT policy '{sft_name}' among the policies ({', '.join(policies)})")
    prompts = read_prompts(prompts_file)
    for p in prompts:
        try:
            prompt_family(p.text)
        except ValueError as e:
            raise LmforgeError(f"{prompts_file}:{p.line}: {e}; evaluation needs the built-in world's prompts "
                               "(its oracle is the judge)") from None
    dev = pick_device(device)
    sft, tok, _ = load_model(policies[sft_name], head="lm", device=dev)
    # Check every checkpoint before generating anything: same tokenizer (token-level KL needs it), prompts fit.
    max_len = sft.config.max_position_embeddings
    for name, d in policies.items():
        cfg = read_config(d)
        if cfg.get("lmforge", {}).get("tokenizer_fingerprint") != tok.fingerprint():
            raise LmforgeError(f"{d}: policy '{name}' uses a different tokenizer than the SFT policy {policies[sft_name]}")
        max_len = min(max_len, int(cfg.get("max_position_embeddings", max_len)))
    ids = encode_prompts(tok, prompts, max_len, prompts_file)
    scorer = None
    if rm_dir is not None:
        from lmforge.reward import RewardScorer

        scorer = RewardScorer.load(rm_dir, device=dev)
    scored = SamplingParams(max_new_tokens, temperature)
    kl_params = SamplingParams(max_new_tokens, 1.0)
    rows: dict[str, dict] = {}
    sft_scores: list[float] = []
    names = [sft_name] + [n for n in policies if n != sft_name]  # SFT first: the others compare with it
    for name in tqdm(names, desc="evaluate", disable=not progress, leave=False):
        model = sft if name == sft_name else load_model(policies[name], head="lm", device=dev)[0]
        model.eval()
        tokens, finished = generate_batched(model, tok, ids, scored, batch_size, seed)
        texts = [response_text(tok, t) for t in tokens]
        scores = [float(oracle_score(p.text, t)) for p, t in zip(prompts, texts)]
        if name == sft_name:
            sft_scores = scores
        win = _mean(1.0 if s > b else 0.5 if s == b else 0.0 for s, b in zip(scores, sft_scores))
        if name == sft_name:
            kl = 0.0  # KL(pi_sft || pi_sft) = 0 exactly; no need to estimate it
        else:
            samples = tokens if temperature == 1.0 else generate_batched(model, tok, ids, kl_params, batch_size, seed + 1)[0]
            lp = response_logprobs(model, ids, samples, tok.special.pad, batch_size)
            lp_sft = response_logprobs(sft, ids, samples, tok.special.pad, batch_size)
            kl = float((lp - lp_sft).mean())
        rm = None
        if scorer is not None:
            rm = _mean(scorer.score([p.text for p in prompts], texts, batch_size))
        rows[name] = {
            "oracle_score": _mean(scores),
            "win_rate_vs_sft": win,
            "rm_score": rm,
            "kl_to_sft": kl,
            "mean_length": _mean(len(t) - f for t, f in zip(tokens, finished)),
            "finished_frac": _mean(finished),
            "examples": [{"prompt": p.text, "response": t, "oracle_score": s}
                         for p, t, s in list(zip(prompts, texts, scores))[:n_examples]],
        }
        if model is not sft:
            del model
    ordered = {n: rows[n] for n in policies}  # the caller's order
    return {"policies": ordered, "reward_hacking": reward_hacking_flag(ordered, sft_name),
            "prompts": len(prompts), "seconds": time.perf_counter() - t0}
