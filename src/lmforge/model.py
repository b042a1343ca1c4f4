"""The Transformer: Llama-style blocks (RMSNorm, rotary positions, SwiGLU, grouped-query attention).

Parameter names follow Hugging Face's LlamaForCausalLM (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`,
`model.norm`, `lm_head`, ...), so a checkpoint maps onto transformers without renaming tricks. The same blocks
run causal (decoder, GPT-style) or bidirectional (encoder, BERT-style). Two heads: the LM head (vocabulary
logits) and a scalar head `score` (reward and value models).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from lmforge.errors import LmforgeError
from lmforge.losses import IGNORE, linear_cross_entropy


@dataclass
class ModelConfig:
    """Architecture hyper-parameters, named as in Hugging Face's LlamaConfig."""
    vocab_size: int = 4096
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    intermediate_size: int = 0          # 0 -> SwiGLU default, about 8/3 * hidden rounded up to 64
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None    # None, {"rope_type": "linear", "factor"} or Llama 3's {"rope_type": "llama3", ...}
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    head_dim: int = 0                   # 0 -> hidden_size // num_attention_heads (some models set it apart)
    qkv_bias: bool = False              # Qwen2: biases on q/k/v projections
    o_proj_bias: bool = False           # Llama's attention_bias=True: biases on q/k/v and o
    mlp_bias: bool = False
    is_causal: bool = True              # False: bidirectional encoder (BERT-style MLM, encoder reward model)
    dropout: float = 0.0
    init_std: float = 0.02

    def validate(self) -> None:
        if self.head_dim == 0 and self.hidden_size % self.num_attention_heads:
            raise LmforgeError("config key 'model.hidden_size' must be divisible by model.num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise LmforgeError("config key 'model.num_key_value_heads' must divide model.num_attention_heads")
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:
            raise LmforgeError("config key 'model.hidden_size': head dim must be even for rotary embeddings")
        for k in ("vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings"):
            if getattr(self, k) <= 0:
                raise LmforgeError(f"config key 'model.{k}' must be positive")
        if self.intermediate_size == 0:
            self.intermediate_size = 64 * math.ceil(8 * self.hidden_size / 3 / 64)
        rope_inv_freq(self)  # an unsupported rope_scaling fails here, naming the key


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies theta^(-2i/d), rescaled as `rope_scaling` asks.

    "linear" divides every frequency by `factor` (position interpolation, Chen et al. 2023). "llama3" (Llama 3.1)
    leaves high frequencies alone, divides low ones (wavelength > original_max / low_freq_factor) by `factor`
    and blends smoothly in between. Other types (dynamic NTK, YaRN, LongRoPE) change attention too and are refused.
    """
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    sc = cfg.rope_scaling
    kind = (sc or {}).get("rope_type", (sc or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    try:
        factor = float(sc["factor"])
        if kind == "linear":
            return inv_freq / factor
        if kind == "llama3":
            low, high = float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
            old_ctx = float(sc["original_max_position_embeddings"])
            wavelen = 2 * math.pi / inv_freq
            scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
            smooth = (old_ctx / wavelen - low) / (high - low)
            blended = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
            return torch.where(medium, blended, scaled)
    except (KeyError, TypeError, ValueError) as e:
        raise LmforgeError(f"config key 'model.rope_scaling': {kind} scaling needs {e}") from None
    raise LmforgeError(f"config key 'model.rope_scaling': rope type {kind!r} is not supported "
                       "(supported: default, linear, llama3)")


def _rms_norm(x, weight, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * x / rms(x), 1 / rms(x)), normalised in fp32."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))   # 1 / rms, one per row
    return (xf * r).to(x.dtype) * weight, r


def _needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will record an op on these tensors. When not (sampling, scoring: no_grad), the functions
    below skip their autograd.Function: its Python bookkeeping was about half of a decode step's norm and rotary
    time (profiled)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class _RMSNormFunction(torch.autograd.Function):
    """weight * x / rms(x), normalised in fp32 (stable under bf16 autocast, as Llama does), with the backward
    written out: autograd's version of the same formula makes ~10 passes over x, this one 4 and two matrix-vector
    products, which is most of the norm's cost in a small model's step on a CPU."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        y, r = _rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, r)
        return y

    @staticmethod
    def backward(ctx, grad):
        # y = w * x * r with r = (mean(x^2) + eps)^-1/2, so dr/dx_j = -r^3 x_j / d and
        # dL/dx = r * (g * w) - x * r^3 * sum_j(g_j w_j x_j) / d;   dL/dw = sum over rows of g * x * r.
        x, weight, r = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            acc = r.dtype
            xf, g, w = x.to(acc), grad.to(acc), weight.to(acc)
            gx = g * xf
            d_weight = None
            if ctx.needs_input_grad[1]:  # not for a frozen norm (reference model, LoRA's base)
                d_weight = (gx.reshape(-1, gx.shape[-1]).mT @ r.reshape(-1, 1)).squeeze(-1).to(weight.dtype)
            dot = (gx @ w).unsqueeze(-1)                                   # sum_j g_j w_j x_j
            d_x = (g * w).mul_(r).addcmul_(xf, r.pow(3) * dot / x.shape[-1], value=-1)
        return d_x.to(x.dtype), d_weight, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if _needs_grad(x, self.weight):
            return _RMSNormFunction.apply(x, self.weight, self.eps)
        return _rms_norm(x, self.weight, self.eps)[0]


def rotary_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (B, 1, T, head_dim) for the given positions (HF Llama's half-split layout)."""
    freqs = position_ids.float()[..., None] * inv_freq.to(position_ids.device)   # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]           # (B, 1, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotary_table(inv_freq: torch.Tensor, max_positions: int) -> torch.Tensor:
    """(2, max_positions, head_dim): rotary_cos_sin's cos and sin of every position, the same values. Looked up,
    not recomputed, in the forward: torch.compile would otherwise fold the cos and sin into every kernel that
    reads them (each layer's q and k, forward and backward), ~5% of a small model's compiled step on a CPU."""
    cos, sin = rotary_cos_sin(torch.arange(max_positions, device=inv_freq.device)[None], inv_freq, torch.float32)
    return torch.stack((cos[0, 0], sin[0, 0]))


class _RotaryFunction(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1): in place on the halves, 2 passes over x
    forward and back instead of autograd's 5 (neg, cat, two products, sum). The backward is the rotation by -angle:
    g * cos + (g2, -g1) * sin. cos and sin repeat their halves (rotary_cos_sin), so one half of sin serves both."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.dtype = x.dtype
        return _rotate(x, cos, sin, 1)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, -1).to(ctx.dtype), None, None


def _rotate(x, cos, sin, sign: int):
    h = x.shape[-1] // 2
    out, s = x * cos, sin[..., :h]
    out[..., :h].addcmul_(x[..., h:], s, value=-sign)
    out[..., h:].addcmul_(x[..., :h], s, value=sign)
    return out


def apply_rotary(x, cos, sin):
    """Rotary positions (RoFormer; HF Llama's half-split layout) on (B, heads, T, head_dim) queries or keys."""
    if _needs_grad(x):
        return _RotaryFunction.apply(x, cos, sin)
    return _rotate(x, cos, sin, 1)


class KVCache:
    """Pre-allocated keys/values per layer for incremental decoding. `length` = positions filled so far.

    All layers' keys and values live in one buffer (layer, k/v, batch, kv-head, position, head-dim), so moving
    rows or columns (continuous batching) is one copy, not one per layer."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (cfg.num_hidden_layers, 2, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self._set(torch.zeros(shape, device=device, dtype=dtype))
        self.length = 0
        self.max_len = max_len

    def _set(self, buf: torch.Tensor) -> None:
        self.buf = buf
        self.k = [buf[i, 0] for i in range(buf.shape[0])]
        self.v = [buf[i, 1] for i in range(buf.shape[0])]

    def update(self, layer: int, k, v):
        t0, t1 = self.length, self.length + k.shape[2]
        if t1 > self.max_len:
            raise LmforgeError(f"KV cache overflow: {t1} > {self.max_len} positions")
        self.k[layer][:, :, t0:t1] = k
        self.v[layer][:, :, t0:t1] = v
        return self.k[layer][:, :, :t1], self.v[layer][:, :, :t1]

    def attend(self, layer: int, q, k, v, mask, causal: bool, dropout: float = 0.0):
        """Store this forward's keys and values, then attend over every filled position (Attention calls this;
        lmforge.engine's mixed prefill-and-decode step replaces it)."""
        k, v = self.update(layer, k, v)
        return attention(q, k, v, mask, causal, dropout)

    def select(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (drop finished sequences)."""
        self._set(self.buf[:, :, index])

    # Continuous batching (lmforge.engine) keeps a fixed-size cache and moves rows and columns inside it.

    def rows(self, start: int, stop: int, first_column: int = 0) -> KVCache:
        """A cache over batch rows [start, stop) and the columns from `first_column` on, sharing this one's
        storage (its writes land here); its length counts from first_column. Attention through it skips the
        columns left of first_column."""
        view = KVCache.__new__(KVCache)
        view._set(self.buf[:, :, start:stop, :, first_column:])
        view.length, view.max_len = self.length - first_column, self.max_len - first_column
        return view

    def copy_row(self, src: int, dst: int, first_column: int = 0) -> None:
        """Overwrite batch row `dst` with row `src` from first_column on (re-packing rows when one leaves; the
        columns left of a row's first are never read, and skipping them makes the copy ~10x smaller)."""
        self.buf[:, :, dst, :, first_column:self.length] = self.buf[:, :, src, :, first_column:self.length]

    def shift(self, n: int) -> None:
        """Move the filled positions n columns right (n > 0: free columns on the left) or drop the first -n
        (n < 0); `length` follows. Every row moves; attention masks must move with them."""
        if n == 0:
            return
        if self.length + n > self.max_len or self.length + n < 0:
            raise LmforgeError(f"KV cache shift by {n} leaves [0, {self.max_len}) ({self.length} filled)")
        b, L = self.buf, self.length
        if n > 0:
            b[..., n:n + L, :] = b[..., :L, :].clone()
        else:
            b[..., :L + n, :] = b[..., -n:L, :].clone()
        self.length += n


# torch >= 2.5: SDPA takes fewer K/V heads than query heads (enable_gqa). On the CPU (SmolLM2's 9/3 heads) it gave
# the same outputs as repeating K/V, 2.7x faster for a decode step and ~15% for forward + backward.
SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def attention(q, k, v, mask, causal: bool, dropout: float = 0.0):
    """Scaled dot-product attention of (B, heads, T, hd) queries over (B, kv_heads, S, hd) keys and values;
    mask: build_attention_mask's (None: plain causal or full attention, SDPA's fastest kernel)."""
    nh, nkv = q.shape[1], k.shape[1]
    gqa = {}
    if nkv != nh:  # grouped-query attention: each K/V head serves nh/nkv query heads
        if SDPA_GQA and q.device.type == "cpu":  # SDPA's own GQA: same result, no K/V copies (CPU measured)
            gqa = {"enable_gqa": True}
        else:
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal, **gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, **gqa)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        hd, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        qkv_bias = cfg.qkv_bias or cfg.o_proj_bias
        self.q_proj = nn.Linear(cfg.hidden_size, nh * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, nkv * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, nkv * hd, bias=qkv_bias)
        self.o_proj = nn.Linear(nh * hd, cfg.hidden_size, bias=cfg.o_proj_bias)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, keep: torch.Tensor | None = None):
        B, T, _ = x.shape
        hd, nh, nkv = self.cfg.head_dim, self.cfg.num_attention_heads, self.cfg.num_key_value_heads
        q = self.q_proj(x).view(B, T, nh, hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, nkv, hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, nkv, hd).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        p = self.cfg.dropout if self.training else 0.0
        if cache is not None:
            y = cache.attend(self.layer, q, k, v, mask, self.cfg.is_causal, p)
        else:
            y = attention(q, k, v, mask, self.cfg.is_causal, p)
        y = y.transpose(1, 2).reshape(B, T, nh * hd)
        return self.o_proj(y if keep is None else y.reshape(B * T, -1)[keep])


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, mask, cache, keep: torch.Tensor | None = None):
        """keep: flat indices (into B * T) of the only positions whose outputs are wanted, (N, d) then. Every
        position's keys and values are still computed (the kept queries attend to them); the attention output
        projection, the MLP and the residuals run on the kept rows only."""
        a = self.drop(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, keep))
        x = x + a if keep is None else x.reshape(-1, x.shape[-1])[keep] + a
        return x + self.drop(self.mlp(self.post_attention_layernorm(x)))


class Backbone(nn.Module):
    """Embeddings, blocks and final norm: HF's `LlamaModel` (prefix `model.`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def build_attention_mask(attention_mask: torch.Tensor | None, q_len: int, past_len: int, causal: bool,
                         segment_ids: torch.Tensor | None = None, device=None) -> torch.Tensor | None:
    """Boolean (B, 1, q_len, past_len + q_len) mask, True = may attend.

    attention_mask: (B, past_len + q_len), 1 for real tokens, 0 for padding (left or right).
    segment_ids: (B, q_len) packed-record ids; attention never crosses records.
    Each query may always attend to itself, so rows of padding never become all-False (NaN in softmax).
    Returns None when no masking beyond plain causality is needed (fast SDPA path).
    """
    if attention_mask is None and segment_ids is None and past_len == 0:
        return None
    if attention_mask is None and segment_ids is None and not causal:
        return None
    if device is None:
        device = (attention_mask if attention_mask is not None else segment_ids).device
    k_len = past_len + q_len
    q_pos = torch.arange(past_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    mask = (k_pos <= q_pos) if causal else torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    mask = mask[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return mask | (k_pos == q_pos)[None, None]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids cumsum(mask) - 1 (clamped at 0), so left padding does not shift real positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class Transformer(nn.Module):
    """A decoder or encoder with an LM head (`head="lm"`), a scalar head (`head="scalar"`), or both."""

    def __init__(self, cfg: ModelConfig, head: str = "lm"):
        super().__init__()
        if head not in ("lm", "scalar", "both"):
            raise ValueError(f"unknown head {head!r}")
        cfg.validate()
        self.config, self.head = cfg, head
        self.model = Backbone(cfg)
        if head in ("lm", "both"):
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            if cfg.tie_word_embeddings:
                self.lm_head.weight = self.model.embed_tokens.weight
        if head in ("scalar", "both"):
            # No bias, as in transformers' *ForSequenceClassification, OpenRLHF and DeepSpeed-Chat: a pairwise
            # loss cannot see it, and the exported reward model then scores exactly as lmforge does.
            self.score = nn.Linear(cfg.hidden_size, 1, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2L)
            if name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                nn.init.normal_(p, 0.0, cfg.init_std / math.sqrt(2 * cfg.num_hidden_layers))
        if head in ("scalar", "both"):
            self.init_scalar_head()
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.register_buffer("rope", rotary_table(self.inv_freq, cfg.max_position_embeddings), persistent=False)
        self.gradient_checkpointing = False  # True: recompute each block's activations in backward (less memory)

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, self.config.init_std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def init_scalar_head(self) -> None:
        """Reward/value head init N(0, 1/sqrt(d_model + 1)) (as in the N+ implementation details)."""
        nn.init.normal_(self.score.weight, 0.0, 1.0 / math.sqrt(self.config.hidden_size + 1))

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        return n

    def rotary(self, position_ids: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, (B, 1, T, head_dim) each, of `position_ids` (B, T), looked up in the rotary table."""
        return self.rope[:, position_ids].unsqueeze(2).to(dtype).unbind(0)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None,
                      cache: KVCache | None = None, keep: torch.Tensor | None = None):
        """Final normalised hidden states (B, T, d); with `keep` (flat indices into B * T) only those positions',
        (N, d), in keep's order.

        attention_mask covers past + new positions when a cache is used. position_ids default to
        cumsum(mask) - 1 so left-padded rows give the same results as the row alone. With `keep` the last block
        runs its output projection and MLP on the kept positions only: a head that reads a few positions (a
        reward at the last token, log-probs of a response, SFT's response tokens) does not pay for the rest's
        (the same values, tested; ~15% of a 2-layer PPO update's matmul FLOPs).
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if past + T > self.config.max_position_embeddings:
            raise LmforgeError(f"sequence length {past + T} exceeds the model's maximum "
                               f"{self.config.max_position_embeddings}")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_mask(attention_mask)[:, past:]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device)[None].expand(B, T)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(position_ids, x.dtype)
        mask = build_attention_mask(attention_mask, T, past, self.config.is_causal, segment_ids, input_ids.device)
        recompute = self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        last = len(self.model.layers) - 1
        for i, block in enumerate(self.model.layers):
            k = keep if i == last else None
            if recompute:  # keep only block inputs; activations inside are recomputed in backward
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, None, k, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, k)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)

    def forward(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None, cache=None,
                head_at: tuple[torch.Tensor, torch.Tensor] | None = None, labels: torch.Tensor | None = None,
                reduction: str = "mean"):
        """LM logits (B, T, V) for an LM head, else scalar scores (B, T). head_at=(rows, cols): the head only at
        those positions (negative columns count from the end), (N, V) or (N,) (a wide LM head on every position is
        wasted work when few are needed; through forward, unlike hidden_states, DDP sees the call). labels (B, T),
        already aligned with the positions that predict them (IGNORE elsewhere): instead of logits, the LM head's
        cross-entropy over the labelled positions, their mean or sum, without materialising the logits
        (losses.linear_cross_entropy)."""
        T = input_ids.shape[1]
        keep = None
        if labels is not None:
            if self.head == "scalar":
                raise ValueError("labels need an LM head")
            # Only labelled positions reach the head (SFT: the responses; MLM: the masked tokens), so the last
            # block runs on those alone. Under torch.compile the rows stay (a data-dependent shape would break
            # the graph): linear_cross_entropy masks them.
            labelled = labels.reshape(-1) != IGNORE
            if not torch.compiler.is_compiling() and not bool(labelled.all()):
                keep = labelled.nonzero()[:, 0]
                labels = labels.reshape(-1)[keep]
        elif head_at is not None:
            rows, cols = head_at
            if not torch.compiler.is_compiling() and bool(((cols >= T) | (cols < -T)).any()):
                raise IndexError(f"head_at column out of range for {T} positions")
            keep = rows * T + torch.where(cols < 0, cols + T, cols)  # -1: each row's last position, as h[rows, cols]
        h = self.hidden_states(input_ids, attention_mask, position_ids, segment_ids, cache, keep)
        if labels is not None:
            return linear_cross_entropy(h, self.lm_head.weight, labels, reduction)
        if self.head == "scalar":
            return self.score(h).squeeze(-1)
        return self.lm_head(h)

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scalar head on hidden states: (B, T, d) -> (B, T)."""
        return self.score(hidden).squeeze(-1)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, 6N + 12*L*H*Q*T (PaLM appendix B; N without the embedding lookup)."""
        c = self.config
        n = self.num_params(exclude_embeddings=True)
        if c.tie_word_embeddings and self.head != "scalar":
            n += self.lm_head.weight.numel()  # tied: one tensor, but the LM head's matmul still costs FLOPs
        return 6 * n + 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len


def gather_last(values: torch.Tensor, lengths_or_index: torch.Tensor) -> torch.Tensor:
    """values (B, T[, ...]) at index (B,) per row: e.g. the reward at the last real token."""
    idx = lengths_or_index.long()
    return values[torch.arange(values.shape[0], device=values.device), idx]


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token in each row, for left- or right-padded (or unpadded) batches."""
    T = attention_mask.shape[1]
    pos = torch.arange(T, device=attention_mask.device)[None].expand_as(attention_mask)
    return torch.where(attention_mask.bool(), pos, torch.full_like(pos, -1)).max(dim=1).values
