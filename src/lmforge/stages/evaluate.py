"""Evaluate policies on held-out prompts, in the spirit of InstructGPT's tables (Ouyang et al. 2022, section 4).

For each policy (base, SFT, PPO, ...), against a baseline policy (SFT in `lmforge run`), with any judge
(lmforge.judges; the built-in world's oracle by default):
  judge_score       mean 0..100 score of the judge on the policy's responses (plus the judge's `parts`, e.g.
                    the oracle's correctness / politeness / concision, as InstructGPT reports per attribute)
  win_rate_vs_sft   win 1, tie 1/2, loss 0 against the SFT policy's response to the same prompt; the SFT row is
                    1/2 by definition. A scoring judge (the oracle) compares its two scores. A judge that compares
                    natively (an LLM shown both answers, `Judge.compare`) is asked in both orders, A/B and B/A,
                    to cancel its position bias, as AlpacaEval does; identical answers tie without asking, and a
                    verdict it could not give is counted as unparseable, not as a win or a loss. With
                    `--judge human` people vote on a web page, each pair shown once in a random order.
  rm_score          mean normalised reward-model score (if a reward model is given), scored exactly as PPO scores
                    its rollouts (RewardScorer.score_rollouts): comparing it with the judge exposes reward hacking (Gao et al. 2022, "Scaling laws for reward model overoptimization")
  kl_to_sft         mean over prompts of sum_t [log pi(y_t|x,y_<t) - log pi_sft(y_t|x,y_<t)] on responses SAMPLED
                    from the policy at temperature 1 (the k1 estimator of KL(pi || pi_sft), as logged in PPO).
                    Greedy responses are not samples of pi, so the KL pass is a separate temperature-1 sampling pass
                    (reused when the scored responses are themselves temperature-1 samples). Both log-probs are
                    teacher-forced over the same token ids, in fp32.
  mean_length       tokens of the scored responses (without the closing stop token)
  by_category       judge score and parts per group of prompts, when the judge groups them (the oracle: task
                    family), so a gain can be traced to what improved, e.g. facts correctness or concision

The scored responses are greedy by default (temperature 0), so scores are deterministic.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.checkpoint import load_causal_lm, read_config
from lmforge.cli import Command, Flag
from lmforge.errors import ConfigError, LmforgeError, where
from lmforge.generation import SamplingParams, generate_batched, response_text
from lmforge.judges import JudgeConfig, make_judge
from lmforge.prompts import encode_prompts, read_prompts
from lmforge.rundir import check_output_file
from lmforge.scoring import RewardScorer
from lmforge.stage import POLICIES, Stage, StageContext
from lmforge.tokenizer import check_same_tokenizer


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


def significant_drop(scores: list[float], baseline: list[float], z: float = 1.645) -> bool:
    """True when `scores` are lower than `baseline` on the same prompts beyond chance: a one-sided paired t-test
    at 5% (t = mean(d) / (sd(d) / sqrt(n)) < -1.645 for the per-prompt differences d, normal approximation)."""
    d = [a - b for a, b in zip(scores, baseline, strict=True)]
    n = len(d)
    if n < 2:
        return False
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    if sd == 0:
        return mean < 0
    return mean / (sd / math.sqrt(n)) < -z


def reward_hacking_flag(rows: dict[str, dict], per_prompt: dict[str, list[float]], baseline: str) -> list[str]:
    """Policies whose reward-model score rose above the baseline's while their judge score fell significantly
    below it (`significant_drop`): the signature of over-optimising the reward model (Gao et al. 2022)."""
    base = rows.get(baseline)
    if base is None or base.get("rm_score") is None:
        return []
    return [name for name, r in rows.items()
            if name != baseline and r.get("rm_score") is not None and r["rm_score"] > base["rm_score"]
            and significant_drop(per_prompt[name], per_prompt[baseline])]


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


@dataclass
class EvalConfig:
    """`lmforge eval` settings."""
    policies: list[str] = field(default_factory=list)  # checkpoints as name=DIR (or DIR: named by its folder)
    prompts: str = ""               # held-out prompts (JSONL); the oracle judge needs the built-in world's
    baseline: str = ""              # the policy others are compared with (win rate, KL); default: the first
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    reward_model: str = ""          # also report each policy's mean reward-model score
    out: str = ""                   # write the results here as JSON (optional)
    max_new_tokens: int = 64
    temperature: float = 0.0        # of the judged responses; 0 = greedy, deterministic
    batch_size: int = 64
    n_examples: int = 3             # example responses kept per policy
    votes: str = ""                 # judge human: where the votes are saved (default: votes.jsonl beside `out`)
    host: str = "127.0.0.1"         # judge human: address of the vote page
    port: int = 8008                # judge human: its port
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        if not self.policies:
            raise ConfigError("policies", "must name at least one checkpoint (name=DIR)")
        if not self.prompts:
            raise ConfigError("prompts", "is required")
        names = list(self.named_policies())
        if len(set(names)) != len(names):
            raise ConfigError("policies", f"names must be unique, got {names}")
        if self.baseline and self.baseline not in names:
            raise ConfigError("baseline", f"must be one of the policies ({', '.join(names)}), got '{self.baseline}'")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("max_new_tokens", "and batch_size must be positive")

    def named_policies(self) -> dict[str, str]:
        """name -> checkpoint directory, in the given order."""
        out = {}
        for item in self.policies:
            name, sep, path = item.partition("=")
            out[name if sep else Path(item).name] = path if sep else item
        return out


def evaluate_policies(cfg: EvalConfig, progress: bool = True) -> dict:
    """Evaluate each policy checkpoint on cfg.prompts with cfg.judge (see the module docstring).

    Returns {"judge": name, "baseline": name, "policies": {name: {judge_score, win_rate_vs_<baseline>, rm_score,
    kl_to_<baseline>, mean_length, finished_frac, parts, by_category, examples}}, "reward_hacking": [names], "prompts": n,
    "seconds": s}; written to cfg.out as JSON when set.
    """
    from tqdm import tqdm

    from lmforge.training import pick_device

    t0 = time.perf_counter()
    if cfg.out:
        check_output_file(cfg.out)
    human = cfg.judge.name == "human"
    judge = None if human else make_judge(cfg.judge)
    pairwise = human or judge.compares_natively
    policies = cfg.named_policies()
    base_name = cfg.baseline or next(iter(policies))
    prompts = read_prompts(cfg.prompts)
    dev = pick_device(cfg.device)
    base, tok, _ = load_causal_lm(policies[base_name], "lmforge eval", device=dev)
    # Check every checkpoint before generating anything: same tokenizer (token-level KL needs it), prompts fit.
    max_len = base.config.max_position_embeddings
    for name, d in policies.items():
        meta = read_config(d)
        check_same_tokenizer(meta.get("lmforge", {}).get("tokenizer_fingerprint"), tok.fingerprint(),
                             f"policy '{name}' ({d})", f"the baseline policy '{base_name}' ({policies[base_name]})")
        max_len = min(max_len, int(meta.get("max_position_embeddings", max_len)))
    scorer = RewardScorer.load(cfg.reward_model, device=dev) if cfg.reward_model else None
    contexts = {"policies": max_len}
    if scorer is not None and not scorer.encoder:  # it reads the policies' token ids, as PPO's reward does
        check_same_tokenizer(scorer.meta.get("tokenizer_fingerprint"), tok.fingerprint(),
                             f"config key 'reward_model' ({cfg.reward_model})",
                             f"the baseline policy '{base_name}' ({policies[base_name]})")
    ids = encode_prompts(tok, prompts, cfg.prompts, contexts)
    if scorer is not None and not scorer.encoder:  # it scores prompt + the whole response: both must fit it
        rm_context = scorer.model.config.max_position_embeddings
        for p in prompts:
            new = min(cfg.max_new_tokens, max_len - len(p.ids))  # generation stops at the policies' context
            if len(p.ids) + new > rm_context:
                raise LmforgeError(f"{where(cfg.prompts, p.line)}: prompt of {len(p.ids)} tokens + {new} new tokens "
                                   f"exceeds the reward model's context of {rm_context} positions")
    texts_of = [p.text for p in prompts]
    for p in prompts:  # fail before generating anything if the judge cannot judge these prompts
        try:
            if judge is not None:
                judge.check(p.text)
        except LmforgeError as e:
            raise LmforgeError(f"{where(cfg.prompts, p.line)}: {e}") from None
    categories = [None if judge is None else judge.category(t) for t in texts_of]
    texts_by: dict[str, list[str]] = {}
    scored = SamplingParams(cfg.max_new_tokens, cfg.temperature)
    kl_params = SamplingParams(cfg.max_new_tokens, 1.0)
    rows: dict[str, dict] = {}
    per_prompt: dict[str, list[float]] = {}
    names = [base_name] + [n for n in policies if n != base_name]  # the baseline first: the others compare with it
    for name in tqdm(names, desc="evaluate", disable=not progress, leave=False):
        model = base if name == base_name else load_causal_lm(policies[name], "lmforge eval", device=dev)[0]
        model.eval()
        tokens, finished = generate_batched(model, tok, ids, scored, cfg.batch_size, cfg.seed)
        texts = texts_by[name] = [response_text(tok, t) for t in tokens]
        scores = None if human else [float(s) for s in judge.score_many(texts_of, texts)]
        per_prompt[name] = scores
        win = None if pairwise else \
            _mean(1.0 if s > b else 0.5 if s == b else 0.0 for s, b in zip(scores, per_prompt[base_name]))
        if name == base_name:
            kl = 0.0  # KL(pi || pi) = 0 exactly; no need to estimate it
        else:
            samples = tokens if cfg.temperature == 1.0 else \
                generate_batched(model, tok, ids, kl_params, cfg.batch_size, cfg.seed + 1)[0]
            lp = response_logprobs(model, ids, samples, tok.special.pad, cfg.batch_size)
            lp_base = response_logprobs(base, ids, samples, tok.special.pad, cfg.batch_size)
            kl = float((lp - lp_base).mean())
        parts = [] if judge is None else [judge.parts(p, t) for p, t in zip(texts_of, texts)]
        groups: dict[str, list[int]] = {}
        for i, c in enumerate(categories):
            if c is not None:
                groups.setdefault(c, []).append(i)
        rows[name] = {
            "judge_score": None if scores is None else _mean(scores),
            f"win_rate_vs_{base_name}": win,
            # exactly the reward PPO optimised: the sampled ids as they are (cut-off responses stay cut off), the
            # whole conversation as the prompt, read at the last real token (before PPO's no-EOS penalty)
            "rm_score": float(scorer.score_rollouts(prompts, tokens, tok, cfg.batch_size).mean())
            if scorer is not None else None,
            f"kl_to_{base_name}": kl,
            "mean_length": _mean(len(t) - f for t, f in zip(tokens, finished)),
            "finished_frac": _mean(finished),
            "parts": {k: _mean(p[k] for p in parts) for k in parts[0]} if parts and parts[0] else {},
            # per group of prompts (the oracle: task family): the judge score and its parts, as InstructGPT
            # breaks results down by prompt category
            "by_category": {c: {"prompts": len(rows_), "judge_score": _mean(scores[i] for i in rows_),
                                **{k: _mean(parts[i][k] for i in rows_) for k in parts[0]}}
                            for c, rows_ in sorted(groups.items())} if parts else {},
            "examples": [{"prompt": p, "response": t, "judge_score": None if scores is None else scores[i]}
                         for i, (p, t) in enumerate(list(zip(texts_of, texts))[:cfg.n_examples])],
        }
        if model is not base:
            del model
    if pairwise:
        others = [n for n in names if n != base_name]
        votes = human_votes(cfg, texts_of, texts_by, base_name, others) if human else \
            judge_votes(judge, texts_of, texts_by, base_name, others)
        rows[base_name][f"win_rate_vs_{base_name}"] = 0.5
        for n in others:
            valid = [v for per in votes[n] for v in per if v is not None]
            rows[n][f"win_rate_vs_{base_name}"] = _mean(valid) if valid else None
            rows[n]["votes"] = {"wins": sum(v == 1.0 for v in valid), "ties": sum(v == 0.5 for v in valid),
                                "losses": sum(v == 0.0 for v in valid),
                                "unparseable": sum(v is None for per in votes[n] for v in per)}
    ordered = {n: rows[n] for n in policies}  # the caller's order
    method = ("people's votes on the A/B page" if human else
              f"the {cfg.judge.name} judge shown both answers, in both orders" if pairwise else
              f"the {cfg.judge.name} judge's scores of the two answers")
    result = {"judge": cfg.judge.name, "baseline": base_name, "win_method": method, "policies": ordered,
              "reward_hacking": [] if human else reward_hacking_flag(ordered, per_prompt, base_name),
              "prompts": len(prompts), "seconds": time.perf_counter() - t0}
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    return result


def judge_votes(judge, prompts: list[str], texts_by: dict[str, list[str]], base: str,
                others: list[str]) -> dict[str, list[list[float | None]]]:
    """Per policy and prompt, the judge's votes for the policy's answer against the baseline's: asked with the
    policy's answer first and again second (1 - verdict), so position bias cancels; identical answers tie."""
    out = {}
    for name in others:
        ask = [i for i, (x, b) in enumerate(zip(texts_by[name], texts_by[base])) if x != b]
        ps = [prompts[i] for i in ask]
        xs, bs = [texts_by[name][i] for i in ask], [texts_by[base][i] for i in ask]
        forward = judge.compare_many(ps, xs, bs)
        backward = judge.compare_many(ps, bs, xs)
        votes: list[list[float | None]] = [[0.5, 0.5] for _ in prompts]
        for i, f, r in zip(ask, forward, backward):
            votes[i] = [f, None if r is None else 1.0 - r]
        out[name] = votes
    return out


def human_votes(cfg: EvalConfig, prompts: list[str], texts_by: dict[str, list[str]], base: str,
                others: list[str]) -> dict[str, list[list[float | None]]]:
    """People's votes, from the A/B page (lmforge.judges.human in "vote" mode): each (policy, prompt) pair is
    shown once, the two answers in a random order; identical answers tie without asking. The page serves until
    every pair has a vote (a restart resumes); a pair without a vote counts as no vote."""
    from lmforge.judges.human import Item, LabelSession, serve_label_page

    items, votes = [], {n: [[0.5] for _ in prompts] for n in others}
    for name in others:
        for i, p in enumerate(prompts):
            x, b = texts_by[name][i], texts_by[base][i]
            if x != b:
                votes[name][i] = [None]
                items.append(Item(f"{name}:{i}", p, [x, b], extra={"policy": name, "baseline": base, "prompt": i}))
    path = cfg.votes or (str(Path(cfg.out).with_name("votes.jsonl")) if cfg.out else "votes.jsonl")
    if items:
        session = LabelSession(items, path, mode="vote", seed=cfg.seed)
        serve_label_page(session, cfg.host, cfg.port, what="vote")
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if rec.get("policy") in votes and rec.get("baseline") == base:
                r_policy, r_base = (c["rank"] for c in rec["choices"])
                votes[rec["policy"]][rec["prompt"]] = [1.0 if r_policy < r_base else 0.0 if r_policy > r_base else 0.5]
    return votes


def _print_table(cfg: EvalConfig) -> None:
    res = evaluate_policies(cfg)
    b = res["baseline"]
    print(f"{'policy':<12} {res['judge'] + ' score':>14} {'win vs ' + b:>12} {'RM score':>9} {'KL to ' + b:>10} {'length':>7}")
    for name, r in res["policies"].items():
        rm = "-" if r["rm_score"] is None else f"{r['rm_score']:.3f}"
        score = "-" if r["judge_score"] is None else f"{r['judge_score']:.1f}"
        win = r[f"win_rate_vs_{b}"]
        win = "-" if win is None else f"{100 * win:.1f}%"
        v = r.get("votes")
        votes = f"  votes {v['wins']}/{v['ties']}/{v['losses']} win/tie/loss, {v['unparseable']} unparseable" if v else ""
        print(f"{name:<12} {score:>14} {win:>12} {rm:>9} {r[f'kl_to_{b}']:>10.2f} {r['mean_length']:>7.1f}{votes}")
    print(f"win rate: {res['win_method']}")
    if res["reward_hacking"]:
        print(f"reward hacking flagged: {', '.join(res['reward_hacking'])}")


COMMAND = Command(
    "lmforge eval", "Evaluate policy checkpoints on held-out prompts with any judge: judge score, win rate and KL "
    "against a baseline policy, reward-model score, length.", EvalConfig, _print_table,
    flags=(Flag("--policies", "policies", "checkpoints as name=DIR"), Flag("--prompts", "prompts", "JSONL prompts"),
           Flag("--judge", "judge.name", "oracle, openai (pairwise, both orders), human (an A/B vote page) or a "
                                         "registered judge"),
           Flag("--baseline", "baseline", "the policy the others are compared with (default: the first)"),
           Flag("--reward-model", "reward_model", "also report reward-model scores"),
           Flag("--out", "out", "write the results as JSON")),
    examples=("lmforge eval --policies sft=runs/lmforge-tiny/sft ppo=runs/lmforge-tiny/ppo "
              "--prompts runs/lmforge-tiny/world/eval_prompts.jsonl --judge oracle",
              "lmforge eval --policies sft=runs/sft ppo=runs/ppo --prompts my_prompts.jsonl --judge openai "
              "judge.url=http://127.0.0.1:8000/v1 judge.model=my-judge"))


def _wire(ctx: StageContext) -> dict:
    return {"policies": [f"{name}={d}" for name, d in ctx.policies.items()], "baseline": "sft",
            "prompts": ctx.artifact("eval_prompts"), "reward_model": ctx.artifact("reward_model"),
            "out": ctx.artifact("eval_results"), "seed": ctx.seed, "device": ctx.device}


STAGE = Stage("eval", EvalConfig, lambda ctx, cfg: evaluate_policies(cfg),
              inputs=("eval_prompts", "reward_model", POLICIES), outputs={"eval_results": "results.json"}, wire=_wire)
