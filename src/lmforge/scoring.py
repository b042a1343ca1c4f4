"""Scoring with a trained reward model: pooling, normalisation, and `RewardScorer`, the one object that PPO,
evaluation, `lmforge rm score` (and DPO / GRPO) use to score responses without importing the reward-model
training stage.

A decoder reward model reads its score at the last real token (the closing <|end|> of the response), whatever
the padding side; an encoder reads the first token or the mean over real tokens. The normalisation (mean, std
of the reference responses' raw scores, InstructGPT sec. 3.5) is stored in the checkpoint's metadata and
applied by every consumer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.chat import render_completion, render_encoder_pair
from lmforge.checkpoint import load_model, read_config
from lmforge.errors import LmforgeError
from lmforge.generation import left_pad
from lmforge.model import Transformer, last_token_index
from lmforge.packing import pack_batch
from lmforge.tokenizer import check_same_tokenizer
from lmforge.training import autocast


def render_example(tok, prompt: list[dict], response: str, encoder: bool = False) -> list[int]:
    """Token ids the RM scores: the SFT chat template ending with the response's end-of-turn token (decoder), or
    the seed's `[BOS] prompt [SEP] candidate [EOS]` (encoder). Training and every consumer render through here."""
    if encoder:
        return render_encoder_pair(tok, "\n".join(m["content"] for m in prompt), response)
    return render_completion(tok, prompt, response)


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
    """Un-normalised reward of each row (B,): the model runs on the rows packed end to end (packing.pack_batch),
    the same scores as `pool_scores` over the padded batch (tested) without computing its padding; the scalar
    head only where the pooling reads it ("last", "first")."""
    if pooling not in ("last", "first", "mean"):
        raise ValueError(f"unknown pooling {pooling!r}")
    packed = pack_batch(input_ids, attention_mask, getattr(model, "module", model).config.max_position_embeddings)
    if pooling == "mean":
        return packed.segment_mean(model(packed.input_ids, **packed.inputs).float())
    return model(packed.input_ids, **packed.inputs, head_at=packed.ends(pooling)).float()


def normalize(raw: torch.Tensor, meta: dict) -> torch.Tensor:
    """Apply the checkpoint's reward normalisation: (raw - reward_mean) / reward_std (identity if absent)."""
    return (raw - float(meta.get("reward_mean", 0.0))) / float(meta.get("reward_std", 1.0))


@torch.no_grad()
def score_sequences(model: Transformer, seqs: list[list[int]], pad_id: int, pooling: str = "last",
                    batch_size: int = 32) -> torch.Tensor:
    """Raw rewards (N,) of token sequences, in input order; batched by length so there is little padding."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.empty(len(seqs))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, mask = left_pad([seqs[i] for i in idx], pad_id, device)
        with autocast(device):
            out[idx] = raw_scores(model, ids, mask, pooling).float().cpu()
    model.train(was_training)
    return out


def fold_normalization(model: Transformer, meta: dict) -> None:
    """Make the scalar head output normalised rewards directly: weight / std and bias -mean / std, so that
    head(h) = (raw - reward_mean) / reward_std. A critic copied from the reward model then starts in the units
    of the rewards PPO optimises (normalised), not in raw units (InstructGPT initialises the value function
    from the RM; without the fold its first values are off by the RM's mean)."""
    mean, std = float(meta.get("reward_mean", 0.0)), float(meta.get("reward_std", 1.0))
    old = model.score
    head = torch.nn.Linear(old.in_features, 1, bias=True, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        head.weight.copy_(old.weight / std)
        head.bias.fill_(-mean / std + (float(old.bias) / std if old.bias is not None else 0.0))
    model.score = head


def is_encoder(config: dict) -> bool:
    """Whether a checkpoint's config.json describes a bidirectional (BERT-style) reward model."""
    return config.get("lmforge", {}).get("backbone") == "encoder" or not config.get("is_causal", True)


def check_reward_model(path: str, policy_fingerprint: str | None, policy: str, contexts: dict[str, int]) -> bool:
    """Check that the checkpoint at `path` (config key 'reward_model') can score a policy's rollouts, before
    anything is loaded; returns whether it is an encoder. A decoder scores the very ids the policy wrote, so it
    must share the policy's tokenizer (`policy` names it in the error) and read the last token, and its context
    joins `contexts`; an encoder re-encodes the text with its own tokenizer (`RewardScorer.score_rollouts`)."""
    config = read_config(path)
    meta = config.get("lmforge", {})
    if meta.get("stage") != "rm" or meta.get("head") not in ("scalar", "both"):
        raise LmforgeError(f"{path}: not a reward model checkpoint (stage {meta.get('stage')!r}); "
                           "train one with `lmforge rm`")
    if is_encoder(config):
        return True
    if meta.get("pooling", "last") != "last":
        raise LmforgeError(f"{path}: a decoder reward model must score the last token "
                           f"(this one uses pooling '{meta.get('pooling')}')")
    check_same_tokenizer(meta.get("tokenizer_fingerprint"), policy_fingerprint, f"config key 'reward_model' ({path})",
                         policy)
    contexts["reward model"] = int(config["max_position_embeddings"])
    return False


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off: it makes rewards noisy, and an RM must score identically in training and in use (N+ details)."""
    model.config.dropout = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


class RewardScorer:
    """A trained reward model ready to score, with the layout, pooling and normalisation it was trained with.

    >>> rm = RewardScorer.load("runs/rm")
    >>> rm.score(["What is 2+2?"], ["4."])          # normalised rewards, one per (prompt, response)
    """

    def __init__(self, model: Transformer, tokenizer, meta: dict):
        self.model, self.tokenizer, self.meta = model.eval(), tokenizer, meta
        self.encoder = meta.get("backbone") == "encoder"
        self.pooling = meta.get("pooling", "last")

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "RewardScorer":
        """Load a checkpoint written by `lmforge rm`."""
        model, tok, meta = load_model(path, head="scalar", device=device)
        if meta.get("stage") != "rm":
            raise LmforgeError(f"{path}: not a reward model checkpoint (stage {meta.get('stage')!r}); train one with `lmforge rm`")
        disable_dropout(model)
        return cls(model, tok, meta)

    def encode(self, prompt: str, response: str) -> list[int]:
        """Token ids of (prompt as the user turn, response) exactly as in training."""
        return render_example(self.tokenizer, [{"role": "user", "content": prompt}], response, self.encoder)

    def score(self, prompts: list[str], responses: list[str], batch_size: int = 32) -> list[float]:
        """Normalised rewards of (prompt, response) pairs."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        seqs, limit = [self.encode(p, r) for p, r in zip(prompts, responses)], self.model.config.max_position_embeddings
        for i, s in enumerate(seqs):
            if len(s) > limit:
                raise LmforgeError(f"response {i}: {len(s)} tokens exceed the reward model's context of {limit}")
        raw = score_sequences(self.model, seqs, self.tokenizer.special.pad, self.pooling, batch_size)
        return normalize(raw, self.meta).tolist()

    def score_rollouts(self, prompts: list, responses: list[list[int]], policy_tokenizer,
                       batch_size: int = 32) -> torch.Tensor:
        """Normalised rewards (N,) of sampled responses, scored exactly as PPO, GRPO and evaluation score them.

        prompts are `lmforge.prompts.Prompt`s (rendered: `ids` set), responses the sampled token ids as they
        came out of the sampler (ending with the end-of-turn token when the response stopped, cut off
        otherwise), in the policy's tokenizer. A decoder reads its score at the last real token of prompt ids +
        response ids: the very sequence the policy wrote. An encoder (the seed's BERT-style reward model)
        re-encodes the text in its own layout with its own tokenizer, [BOS] prompt [SEP] response [EOS]: the
        whole conversation (system and earlier turns too) as the prompt, the response without its end-of-turn
        token; past the encoder's context the prompt loses its oldest tokens (after [BOS]), so the response and
        [EOS] are always seen. Identical sequences are scored once, so a GRPO group of identical responses gets
        identical rewards (padding widths may differ between chunks, and bf16 would make that a difference).
        """
        from lmforge.chat import turn_stop_ids

        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if self.encoder:
            end = set(turn_stop_ids(policy_tokenizer))
            texts = [policy_tokenizer.decode(r[:-1] if r and r[-1] in end else r) for r in responses]
            limit = self.model.config.max_position_embeddings
            seqs = [render_example(self.tokenizer, p.messages, t, encoder=True) for p, t in zip(prompts, texts)]
            seqs = [s if len(s) <= limit else s[:1] + s[len(s) - limit + 1:] for s in seqs]
        else:
            seqs = [list(p.ids) + list(r) for p, r in zip(prompts, responses)]
        index: dict[tuple, int] = {}
        rows = [index.setdefault(tuple(s), len(index)) for s in seqs]
        raw = score_sequences(self.model, [list(s) for s in index], self.tokenizer.special.pad, self.pooling,
                              batch_size)
        return normalize(raw[torch.tensor(rows, dtype=torch.long)], self.meta)

    @torch.no_grad()
    def score_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised rewards (B,) of chat-template token ids (left or right padded), read at each row's last
        real token. For PPO: the rows should end with the response's <|end|>. Decoder reward models only."""
        if self.encoder:
            raise LmforgeError("score_ids needs a decoder reward model (this one is an encoder: use score())")
        with autocast(input_ids.device):
            raw = raw_scores(self.model, input_ids, attention_mask, "last")
        return normalize(raw.float(), self.meta)
