"""RL rollouts: read prompts, sample responses with the KV cache, and score them (policy and reference
log-probs, critic values, reward-model scores), all on one padded batch layout:

    input_ids = [left-padded prompt (P columns)] + [right-padded response (R columns)]

Response token t sits at column P + t and is predicted from column P + t - 1, so log-probs and values of the
response are read from columns P - 1 .. P + R - 2. Masks come from lengths, never from `ids != pad`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from lmforge import cpu_threads
from lmforge.chat import turn_stop_ids
from lmforge.errors import LmforgeError
from lmforge.generation import SamplingParams, generate, left_pad
from lmforge.losses import linear_logprobs
from lmforge.model import Transformer
from lmforge.packing import pack_batch
from lmforge.prompts import Prompt, encode_prompts, read_prompts
from lmforge.rl_utils import logprobs_from_logits
from lmforge.tokenizer import Tokenizer
from lmforge.distributed import DistInfo
from lmforge.training import autocast, step_generator, synced_time

# reward_fn(prompt_texts, response_texts, response_ids) -> one float per response. prompt_texts are the last
# user turns, response_texts the decoded responses (without the stop token), response_ids the sampled ids.
RewardFn = Callable[[list[str], list[str], list[list[int]]], Sequence[float]]


def load_prompts(path: str | Path, tok: Tokenizer, max_new_tokens: int, contexts: dict[str, int]) -> list[Prompt]:
    """Read and render the RL prompts, checking that prompt + max_new_tokens fits each model's context."""
    prompts = read_prompts(path)
    encode_prompts(tok, prompts, path, contexts, new_tokens=max_new_tokens)
    return prompts


@dataclass
class Experience:
    """One batch of scored rollouts. Per-token tensors are (B, R) over response tokens."""
    input_ids: torch.Tensor        # (B, P + R)
    attention_mask: torch.Tensor   # (B, P + R)
    mask: torch.Tensor             # (B, R) float, 1 on real response tokens (the stop token included)
    prompt_len: int                # P
    logprobs: torch.Tensor | None = None      # policy at rollout time ("old")
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None         # critic at rollout time
    scores: torch.Tensor | None = None         # (B,) sequence score after penalties and clipping
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def select(self, rows: torch.Tensor) -> "Experience":
        """The sub-batch of `rows` (same columns, so P stays valid)."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v[rows] if isinstance(v, torch.Tensor) else v
        return Experience(**kw)

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len:]


@dataclass
class Samples:
    """What the policy wrote: the padded batch plus per-row token lists and stop flags."""
    experience: Experience
    responses: list[list[int]]
    ended: list[bool]              # the response itself ends with the end-of-turn token (never checked in the prompt)
    gen_logprobs: list[list[float]]


def sample_responses(actor: Transformer, tok: Tokenizer, prompts: list[Prompt], params: SamplingParams,
                     generator: torch.Generator | None = None, uniforms: torch.Tensor | None = None) -> Samples:
    """Sample one response per prompt (batched, left-padded, KV cache) and lay out the padded batch (uniforms:
    one row of random numbers per prompt instead of the generator, see generation.generate)."""
    device = next(actor.parameters()).device
    stops = turn_stop_ids(tok)  # <|end|> only: the layout the reward model was trained on
    gen = generate(actor, [p.ids for p in prompts], params, stops, tok.special.pad, generator, uniforms=uniforms)
    prompt_ids, prompt_mask = left_pad([p.ids for p in prompts], tok.special.pad, device)
    B, R = len(prompts), max(len(t) for t in gen.tokens)
    resp = torch.full((B, R), tok.special.pad, dtype=torch.long)
    resp_mask = torch.zeros((B, R), dtype=torch.long)  # from lengths, never from `ids != pad`
    for i, t in enumerate(gen.tokens):
        resp[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        resp_mask[i, :len(t)] = 1
    resp, resp_mask = resp.to(device), resp_mask.to(device)
    exp = Experience(torch.cat([prompt_ids, resp], 1), torch.cat([prompt_mask, resp_mask], 1),
                     resp_mask.float(), prompt_ids.shape[1])
    stop_set = set(stops)
    ended = [len(t) > 0 and t[-1] in stop_set for t in gen.tokens]
    return Samples(exp, gen.tokens, ended, gen.logprobs)


def sampler_logprobs(samples: Samples) -> torch.Tensor:
    """(B, R) log-probs the sampler computed for the tokens it drew, under softmax(logits / T) whatever top-k or
    top-p chose (generation.generate), zeros past each response's end: the "old" log-probs without a second
    forward pass over the rollouts."""
    m = samples.experience.mask
    out = torch.zeros(m.shape, dtype=torch.float32)
    for i, lp in enumerate(samples.gen_logprobs):
        out[i, :len(lp)] = torch.tensor(lp, dtype=torch.float32)
    return out.to(m.device)


def use_sampler_logprobs(choice: str, policy: Transformer) -> bool:
    """Whether PPO / GRPO take the "old" log-probs from the sampler (`old_logprobs` "sampler") or recompute them
    teacher-forced ("recompute": the update's own kernels, so the first ratio is exactly 1, as TRL and OpenRLHF
    do). "auto": the sampler's for an fp32 policy on a CPU (no autocast there), where the KV-cache decode agrees
    with the teacher-forced pass to ~1e-6 (tests/test_rollout.py), saving one policy forward per rollout;
    recomputed on a GPU, where bf16 autocast makes the two kernels differ by ~1e-2."""
    p = next(policy.parameters())
    return choice == "sampler" or (choice == "auto" and p.device.type == "cpu" and p.dtype == torch.float32)


def response_hidden(model: Transformer, exp: Experience) -> torch.Tensor:
    """Hidden states at the columns that predict the real response tokens: (N, d), N = exp.mask.sum(), in the
    mask's row-major order (`x[exp.mask.bool()]`). The model runs on the rollouts packed end to end
    (packing.pack_batch): the same values as on the padded batch,
    `model.hidden_states(exp.input_ids, exp.attention_mask)[:, P - 1:-1][exp.mask.bool()]` (tested), without its
    padding: one long response no longer sets the width of every row, and the LM head and softmax that follow
    run on real tokens only (a trained policy's replies are a fraction of the longest one). The last block
    runs on those positions alone (Transformer.hidden_states' `keep`): the prompts' are never read."""
    packed = pack_batch(exp.input_ids, exp.attention_mask, model.config.max_position_embeddings)
    rows, t = exp.mask.bool().nonzero(as_tuple=True)
    keep = packed.flat_index(rows, exp.prompt_len - 1 + t)
    return model.hidden_states(packed.input_ids, **packed.inputs, keep=keep)


def scatter_response(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) values at the real response tokens back into the (B, R) layout, zeros past each response's end."""
    out = values.new_zeros(mask.shape)
    out[mask.bool()] = values
    return out


def policy_logprobs(model: Transformer, exp: Experience, temperature: float, with_entropy: bool = False,
                    entropy_grad: bool = False):
    """Teacher-forced log-probs (and entropy) of the response tokens under softmax(logits / temperature): (B, R),
    zeros past each response's end. The LM head and log-softmax run fused (losses.linear_logprobs: one logits
    buffer at most), with the entropy a statistic; entropy_grad=True (an entropy bonus in the loss) takes the plain
    path over materialised logits instead, so the entropy has a gradient too."""
    m = exp.mask.bool()
    hidden = response_hidden(model, exp)
    if with_entropy and entropy_grad:
        out = logprobs_from_logits(model.lm_head(hidden), exp.response_ids[m], temperature, with_entropy=True)
    else:
        out = linear_logprobs(hidden, model.lm_head.weight, exp.response_ids[m], temperature, with_entropy)
        out = tuple(x.float() for x in out) if with_entropy else out.float()  # fp32, as logprobs_from_logits
    return tuple(scatter_response(x, m) for x in out) if with_entropy else scatter_response(out, m)


def critic_values(critic: Transformer, exp: Experience) -> torch.Tensor:
    """V(s_t) for every response token t: the scalar head at the column that predicts token t; (B, R), zeros
    past each response's end."""
    return scatter_response(critic.scores(response_hidden(critic, exp)).float(), exp.mask)


@torch.no_grad()
def in_chunks(fn: Callable[[Experience], torch.Tensor], exp: Experience, chunk: int) -> torch.Tensor:
    """fn over row chunks of `exp` (bounded memory), concatenated."""
    B = exp.input_ids.shape[0]
    return torch.cat([fn(exp.select(torch.arange(i, min(i + chunk, B), device=exp.input_ids.device)))
                      for i in range(0, B, chunk)])


def scores_from_fn(reward_fn: RewardFn, tok: Tokenizer, prompts: list[Prompt], samples: Samples,
                   device) -> torch.Tensor:
    """Scores from a Python reward function (toy experiments, rule-based rewards)."""
    bodies = [t[:-1] if e else t for t, e in zip(samples.responses, samples.ended)]
    texts = [tok.decode(b) for b in bodies]
    out = list(reward_fn([p.text for p in prompts], texts, [list(t) for t in samples.responses]))
    if len(out) != len(prompts):
        raise LmforgeError(f"reward_fn returned {len(out)} scores for {len(prompts)} responses")
    return torch.tensor([float(x) for x in out], dtype=torch.float32, device=device)


def prompt_indices(n_prompts: int, iteration: int, batch_size: int, seed: int) -> list[int]:
    """Prompts of one RL iteration (PPO, GRPO): consecutive slices of a fresh seeded permutation per pass over
    the prompt set, so every prompt is used once per pass and resume is exact."""
    out, perms = [], {}
    for j in range(iteration * batch_size, (iteration + 1) * batch_size):
        epoch, pos = divmod(j, n_prompts)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n_prompts, generator=step_generator(seed, epoch, micro=7)).tolist()
        out.append(perms[epoch][pos])
    return out


def load_reward_fn(spec: str, key: str = "reward_fn") -> RewardFn:
    """The callable that `module:function` names (the function may be a dotted attribute path)."""
    module, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module)
    except Exception as e:  # not found, or failed while importing: one line either way
        msg = (str(e).splitlines() or [""])[0]
        raise LmforgeError(f"config key '{key}': cannot import module {module!r} ({type(e).__name__}: {msg})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise LmforgeError(f"config key '{key}': module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise LmforgeError(f"config key '{key}': {spec} is not callable")
    return obj


def minibatch_epochs(n_rows: int, epochs: int, minibatch_size: int, generator: torch.Generator, device,
                     step: Callable[[torch.Tensor], dict | None]) -> dict:
    """The update phase of PPO and GRPO: `epochs` passes over freshly shuffled minibatches of the batch's rows,
    `step(rows)` (backward + one optimizer step) on each. A step that returns None (a non-finite loss or gradient) is
    dropped and counted. Returns the mean of the steps' stats, plus skipped_steps."""
    totals: dict[str, float] = {}
    n_steps = skipped = 0
    for _ in range(epochs):
        perm = torch.randperm(n_rows, generator=generator).to(device)
        for start in range(0, n_rows, minibatch_size):
            stats = step(perm[start:start + minibatch_size])
            if stats is None:
                skipped += 1
                continue
            n_steps += 1
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v
    out = {k: v / max(n_steps, 1) for k, v in totals.items()}
    out["skipped_steps"] = skipped
    return out


def check_process_split(world: int, batch: tuple[str, int], minibatch_size: int, micro_batch_size: int) -> None:
    """Under torchrun each process takes batch / world prompts and minibatch_size / world rows of each minibatch,
    split further into micro-batches: each must divide. One LmforgeError naming the key."""
    for key, n in (batch, ("minibatch_size", minibatch_size)):
        if n % world:
            raise LmforgeError(f"config key '{key}' ({n}) must be a multiple of the number of processes ({world})")
    if (minibatch_size // world) % micro_batch_size:
        raise LmforgeError(f"config key 'micro_batch_size' ({micro_batch_size}) must divide each process's share "
                           f"of minibatch_size ({minibatch_size} / {world} processes)")


class RLTrainer:
    """What the PPO and GRPO trainers share: an iteration is `make_experience(prompts, uniforms=...)` (sample and
    score) then `update(exp, generator)`, both implemented by the subclass, which also sets `device`,
    `sampling` and, under torchrun, `dist` (each process then takes a contiguous share of the prompts)."""

    device: torch.device
    sampling: SamplingParams
    dist: DistInfo
    tok: Tokenizer
    cfg: object  # the stage's config: old_logprobs, temperature, micro_batch_size are read here
    rows_per_prompt: int = 1  # responses sampled per prompt (GRPO: the group size)

    def iteration(self, prompts: list[Prompt], seed: int, iteration: int) -> tuple[dict, Samples, Experience]:
        """One iteration on `prompts`; its randomness is a function of (seed, iteration), so resume is exact. Each
        response row gets its own random numbers, drawn for the whole batch: N processes sample what one does."""
        threads = cpu_threads.adapt(self.device)  # room for other programs' busy cores
        W, r = self.dist.world_size, self.dist.rank
        share = len(prompts) // W
        rows = share * self.rows_per_prompt
        uniforms = torch.rand(len(prompts) * self.rows_per_prompt, self.sampling.max_new_tokens, dtype=torch.float64,
                              generator=step_generator(seed, iteration, micro=0))
        exp, samples, stats = self.make_experience(prompts[r * share:(r + 1) * share],
                                                   uniforms=uniforms[r * rows:(r + 1) * rows])
        t0 = synced_time(self.device)
        stats.update(self.update(exp, step_generator(seed, iteration, micro=1)))
        stats["time_update"] = synced_time(self.device) - t0
        if threads:
            stats["cpu_threads"] = threads  # fewer while another program kept a core busy
        return stats, samples, exp

    @torch.no_grad()
    def sample_with_logprobs(self, policy: Transformer, ref: Transformer, prompts: list[Prompt],
                             generator: torch.Generator | None, uniforms: torch.Tensor | None
                             ) -> tuple[Samples, list[float]]:
        """Sample one response per prompt, then the log-probs of its tokens under the behaviour policy (the
        sampler's own where use_sampler_logprobs says so) and under the frozen reference, set on the samples'
        experience. Returns (samples, clock readings before sampling, after it, after each log-prob pass)."""
        cfg, dev, mb = self.cfg, self.device, self.cfg.micro_batch_size
        t0 = synced_time(dev)
        with autocast(dev):
            samples = sample_responses(policy, self.tok, prompts, self.sampling, generator, uniforms)
            exp = samples.experience
            t1 = synced_time(dev)
            if use_sampler_logprobs(cfg.old_logprobs, policy):  # what the KV-cache decode computed already
                exp.logprobs = sampler_logprobs(samples)
            else:  # teacher-forced: the same kernels as the update, so the first ratio is exactly 1
                exp.logprobs = in_chunks(lambda e: policy_logprobs(policy, e, cfg.temperature), exp, mb)
            t2 = synced_time(dev)
            exp.ref_logprobs = in_chunks(lambda e: policy_logprobs(ref, e, cfg.temperature), exp, mb)
        return samples, [t0, t1, t2, synced_time(dev)]

    def minibatch_count(self, n: torch.Tensor) -> torch.Tensor:
        """A count over the whole minibatch (every process's rows): the denominator of its token weights."""
        if self.dist.world_size > 1:
            dist.all_reduce(n)
        return n

    def backward_each(self, exp: Experience, micro: tuple[torch.Tensor, ...], keys: tuple[str, ...],
                      loss_and_stats: Callable) -> tuple[dict[str, torch.Tensor], bool]:
        """For each micro-batch (`micro`: rows of `exp`): loss, stats = loss_and_stats(i, sub-batch); backward when
        the loss is finite, the stats summed on the device (one sync per minibatch, not per statistic). Returns
        (sums over `keys`, whether every loss was finite). Every key is there from the start: even a process whose
        every loss was non-finite all-reduces the same keys as the others in minibatch_sums."""
        sums = {k: torch.zeros((), dtype=torch.float64, device=self.device) for k in keys}
        finite = True
        for i, r in enumerate(micro):
            loss, stats = loss_and_stats(i, exp.select(r))
            if not torch.isfinite(loss):  # every process goes on to the same collectives, then all skip the step
                finite = False
                continue
            loss.backward()
            for k, v in stats.items():
                sums[k] += v.detach().double()
        return sums, finite

    def minibatch_sums(self, sums: dict[str, torch.Tensor], finite: bool) -> tuple[dict[str, torch.Tensor], bool]:
        """The weighted sums of a minibatch's statistics over every process, and whether every process's loss was
        finite (one all-reduce): all processes then skip or take the same step."""
        if self.dist.world_size == 1:
            return sums, finite
        keys = sorted(sums)
        flat = torch.stack([*(torch.as_tensor(sums[k], dtype=torch.float64, device=self.device) for k in keys),
                            torch.tensor(float(not finite), dtype=torch.float64, device=self.device)])
        dist.all_reduce(flat)
        return dict(zip(keys, flat[:-1])), bool(flat[-1] == 0)
