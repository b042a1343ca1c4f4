"""Transformer: causality, bidirectionality, KV cache, padding invariance, parameter names."""

import pytest
import torch

from lmforge.generation import SamplingParams, generate, left_pad
from lmforge.model import (
    KVCache,
    RMSNorm,
    Transformer,
    apply_rotary,
    build_attention_mask,
    last_token_index,
    rotary_cos_sin,
)
from tests.conftest import tiny_config


def _model(causal=True, **kw):
    torch.manual_seed(0)
    return Transformer(tiny_config(causal=causal, **kw)).eval()


def _rms_norm_by_autograd(x, weight, eps):
    """The formula as autograd sees it (the reference for the hand-written backward)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def _rotary_by_autograd(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def test_rms_norm_backward_is_the_derivative():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    norm = RMSNorm(5, 1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(5, dtype=torch.float64, generator=g))
    assert torch.autograd.gradcheck(norm, (x,))
    y, ref = norm(x), _rms_norm_by_autograd(x, norm.weight, 1e-5)
    assert torch.allclose(y, ref, atol=1e-12)
    up = torch.randn(2, 3, 5, dtype=torch.float64, generator=g)
    ours = torch.autograd.grad(y, (x, norm.weight), up)
    theirs = torch.autograd.grad(ref, (x, norm.weight), up)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-12)
    norm.weight.requires_grad_(False)  # a frozen norm (reference model, LoRA's base): only d(x)
    d_x, = torch.autograd.grad(norm(x), x, up)
    assert torch.allclose(d_x, theirs[0], atol=1e-12) and norm.weight.grad is None


def test_rms_norm_in_bf16_normalises_in_fp32_and_returns_the_promoted_dtype():
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1)).bfloat16().requires_grad_()
    norm = RMSNorm(8, 1e-5)
    y, ref = norm(x), _rms_norm_by_autograd(x, norm.weight, 1e-5)
    assert y.dtype == ref.dtype == torch.float32 and torch.equal(y, ref)
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and norm.weight.grad.dtype == torch.float32


def test_rotary_matches_rotate_half_and_its_backward_is_the_derivative():
    g = torch.Generator().manual_seed(0)
    positions = torch.arange(7)[None].expand(2, 7)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2).double() / 8))
    cos, sin = rotary_cos_sin(positions, inv_freq, torch.float64)
    q = torch.randn(2, 7, 3, 8, dtype=torch.float64, generator=g).transpose(1, 2).requires_grad_()  # strided
    assert torch.autograd.gradcheck(lambda t: apply_rotary(t, cos, sin), (q,))
    assert torch.allclose(apply_rotary(q, cos, sin), _rotary_by_autograd(q, cos, sin), atol=1e-12)
    up = torch.randn(2, 3, 7, 8, dtype=torch.float64, generator=g)
    ours, = torch.autograd.grad(apply_rotary(q, cos, sin), q, up)
    theirs, = torch.autograd.grad(_rotary_by_autograd(q, cos, sin), q, up)
    assert torch.allclose(ours, theirs, atol=1e-12)


def test_the_rotary_table_holds_the_computed_values_in_a_fresh_and_a_loaded_model(tok, tmp_path):
    """The forward looks cos and sin up (Transformer.rope) instead of computing them: bit-identical values, also
    after a checkpoint load, which builds the model on the meta device and fills the table afterwards."""
    from lmforge.checkpoint import load_model, save_checkpoint

    cfg = tiny_config(tok.vocab_size, rope_scaling={"rope_type": "linear", "factor": 2.0})
    model = Transformer(cfg)
    positions = torch.randint(0, cfg.max_position_embeddings, (3, 11), generator=torch.Generator().manual_seed(0))
    cos, sin = rotary_cos_sin(positions, model.inv_freq, torch.float32)
    looked_up = model.rope[:, positions].unsqueeze(2)
    assert torch.equal(looked_up[0], cos) and torch.equal(looked_up[1], sin)
    save_checkpoint(tmp_path / "ck", model, tok)
    loaded, _, _ = load_model(tmp_path / "ck")
    assert torch.equal(loaded.rope, model.rope) and torch.equal(loaded.inv_freq, model.inv_freq)


def test_decoder_is_causal():
    model = _model()
    x = torch.randint(0, 400, (2, 16))
    base = model(x)
    for t in (3, 9, 15):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % 400
        out = model(y)
        assert torch.allclose(out[:, :t], base[:, :t], atol=1e-5)
        assert not torch.allclose(out[:, t:], base[:, t:], atol=1e-5)


def test_encoder_is_bidirectional():
    model = _model(causal=False)
    x = torch.randint(0, 400, (2, 16))
    base = model(x)
    y = x.clone()
    y[:, 10] = (y[:, 10] + 1) % 400
    out = model(y)
    assert not torch.allclose(out[:, :10], base[:, :10], atol=1e-5)  # earlier positions see the change


def test_left_padded_batch_matches_each_sequence_alone():
    model = _model()
    seqs = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15]]
    ids, mask = left_pad(seqs, pad_id=0)
    batched = model(ids, attention_mask=mask)
    for i, s in enumerate(seqs):
        alone = model(torch.tensor([s]))
        assert torch.allclose(batched[i, -len(s):], alone[0], atol=1e-5)


def test_right_padded_batch_matches_and_last_index():
    torch.manual_seed(0)
    model = Transformer(tiny_config(), head="scalar").eval()
    seqs = [[5, 6, 7, 8], [9, 10]]
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    out = model(ids, attention_mask=mask)
    assert last_token_index(mask).tolist() == [3, 1]
    assert last_token_index(torch.tensor([[0, 0, 1, 1]])).tolist() == [3]
    for i, s in enumerate(seqs):
        alone = model(torch.tensor([s]))
        assert torch.allclose(out[i, :len(s)], alone[0], atol=1e-5)


def test_kv_cache_logits_equal_full_forward():
    model = _model()
    x = torch.randint(0, 400, (1, 12))
    full = model(x)
    cache = KVCache(model.config, 1, 12, "cpu", torch.float32)
    first = model(x[:, :5], cache=cache)
    steps = [model(x[:, t:t + 1], cache=cache) for t in range(5, 12)]
    assert torch.allclose(torch.cat([first] + steps, 1), full, atol=1e-5)


def test_kv_cache_greedy_equals_no_cache_greedy():
    model = _model()
    prompts = [[1, 5, 9, 33], [1, 7]]
    out = generate(model, prompts, SamplingParams(max_new_tokens=12, temperature=0), stop_ids=[2], pad_id=0)
    for p, toks in zip(prompts, out.tokens):
        seq = list(p)
        for _ in range(len(toks)):  # recompute the whole context each step, no cache, no padding
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert seq[len(p):] == toks



def test_rows_that_stop_early_leave_the_batch_without_changing_any_row():
    """generate drops finished rows from the batch (and the KV cache) as it goes: each row's tokens, log-probs
    and streamed tokens must be what that row gives alone with the same uniforms."""
    model = _model()
    torch.manual_seed(1)
    prompts = [[1, 5, 9, 33], [1, 7], [1, 40, 41, 42, 43, 44], [1, 8, 8], [1, 3, 300, 2, 5], [1, 60]]
    stops = [int(t) for t in torch.randperm(400)[:40]]  # many stop ids: rows end at many different steps
    params = SamplingParams(max_new_tokens=16, temperature=1.0)
    uniforms = torch.rand(len(prompts), 16, dtype=torch.float64)
    streamed = {i: [] for i in range(len(prompts))}

    def on_tokens(t, toks, active):
        for i in range(len(prompts)):
            if active[i]:
                streamed[i].append(int(toks[i]))

    out = generate(model, prompts, params, stops, pad_id=0, uniforms=uniforms, on_tokens=on_tokens)
    lengths = sorted(len(t) for t in out.tokens)
    assert lengths[0] < 8 and lengths[-1] > lengths[0]  # some rows left early while others went on
    for i, p in enumerate(prompts):
        alone = generate(model, [p], params, stops, pad_id=0, uniforms=uniforms[i:i + 1])
        assert out.tokens[i] == alone.tokens[0] == streamed[i]
        assert out.finished[i] == alone.finished[0]
        assert torch.allclose(torch.tensor(out.logprobs[i]), torch.tensor(alone.logprobs[0]), atol=1e-5)

def test_segment_mask_blocks_cross_record_attention():
    seg = torch.tensor([[0, 0, 1, 1, 1]])
    m = build_attention_mask(None, 5, 0, True, seg)[0, 0]
    assert m[3].tolist() == [False, False, True, True, False]
    assert m[1].tolist() == [True, True, False, False, False]


def test_parameter_names_follow_hf_llama():
    names = set(Transformer(tiny_config(), head="both").state_dict())
    for n in ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
              "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight",
              "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight",
              "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
              "model.norm.weight", "lm_head.weight", "score.weight"]:
        assert n in names
    assert not any(n.endswith("bias") for n in names)


def test_scalar_head_init():
    torch.manual_seed(0)
    m = Transformer(tiny_config(hidden_size=256, num_attention_heads=4, num_key_value_heads=4), head="scalar")
    assert m.score.bias is None  # no bias, as transformers' LlamaForSequenceClassification
    assert abs(m.score.weight.std().item() - 1 / 257 ** 0.5) < 0.02


def test_generate_cli_streams_text(tok, tmp_path, capsys):
    from lmforge.checkpoint import save_checkpoint
    from lmforge.cli import main

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m", Transformer(tiny_config()), tok)
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "你好", "--max-new-tokens", "8", "--seed", "1"]) == 0
    first = capsys.readouterr().out
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "你好", "--max-new-tokens", "8", "--seed", "1"]) == 0
    assert capsys.readouterr().out == first and first.endswith("\n")
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 1
    assert "not a checkpoint directory" in capsys.readouterr().err


def test_a_truncated_or_tampered_checkpoint_is_one_error_before_use(tok, tmp_path):
    import json

    from lmforge.checkpoint import load_model, load_training_state, save_checkpoint
    from lmforge.errors import LmforgeError

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ck", Transformer(tiny_config(tok.vocab_size)), tok,
                    training_state={"step": 3, "note": torch.zeros(4)})
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())["files"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "training_state.pt"} <= set(manifest)
    load_model(tmp_path / "ck")  # intact: loads
    assert load_training_state(tmp_path / "ck")["step"] == 3

    weights = tmp_path / "ck" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])  # truncated
    with pytest.raises(LmforgeError, match="model.safetensors: .* bytes, but the checkpoint wrote .*truncated"):
        load_model(tmp_path / "ck")
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF  # same size, one byte changed inside a tensor
    weights.write_bytes(bytes(flipped))
    with pytest.raises(LmforgeError, match="model.safetensors: sha256 differs"):
        load_model(tmp_path / "ck")
    weights.write_bytes(data)
    state = tmp_path / "ck" / "training_state.pt"
    state.write_bytes(state.read_bytes()[:50])
    with pytest.raises(LmforgeError, match="training_state.pt: .* bytes"):
        load_training_state(tmp_path / "ck")
    load_model(tmp_path / "ck")  # the weights themselves are intact again


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_kept_positions_equal_the_full_forward_and_its_gradients(checkpointing):
    """hidden_states(keep=...) runs the last block on a few positions: the same states as every position's
    then indexed, the same gradients for every parameter (packed rows with segments, an LM and a scalar head)."""
    model = _model(dropout=0.0).train()
    model.gradient_checkpointing = checkpointing
    ids = torch.randint(0, 400, (3, 10))
    seg = torch.tensor([[1] * 4 + [2] * 6, [1] * 10, [1] * 7 + [0] * 3])
    pos = torch.tensor([list(range(4)) + list(range(6)), list(range(10)), list(range(7)) + [0] * 3])
    mask = (seg > 0).long()
    keep = torch.tensor([3, 9, 12, 19, 20, 26, 5])  # any order, any rows
    full = model.hidden_states(ids, mask, pos, seg)
    (full.reshape(-1, full.shape[-1])[keep] ** 2).sum().backward()
    want = _grads(model)
    model.zero_grad()
    kept = model.hidden_states(ids, mask, pos, seg, keep=keep)
    assert kept.shape == (len(keep), model.config.hidden_size)
    torch.testing.assert_close(kept, full.reshape(-1, full.shape[-1])[keep], atol=1e-6, rtol=1e-5)
    (kept ** 2).sum().backward()
    got = _grads(model)
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-5, msg=n)


def test_head_at_and_labels_run_the_last_block_on_their_positions_only():
    """forward's head_at and labels keep only the positions they read: the same logits / scores / loss as the
    head over every position, and fewer rows through the last block's MLP (counted)."""
    model = _model()
    ids = torch.randint(0, 400, (2, 9))
    rows, cols = torch.tensor([0, 1, 1]), torch.tensor([8, 2, 5])
    torch.testing.assert_close(model(ids, head_at=(rows, cols)), model(ids)[rows, cols], atol=1e-6, rtol=1e-5)
    seen = []
    hook = model.model.layers[-1].mlp.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    labels = torch.full((2, 9), -100)
    labels[0, 3:6], labels[1, 7] = ids[0, 4:7], ids[1, 8]
    loss = model(ids, labels=labels)
    hook.remove()
    assert seen == [4]  # the 4 labelled positions, not 18
    logits = model(ids)
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-5)
    critic = Transformer(tiny_config(), head="scalar").eval()
    torch.testing.assert_close(critic(ids, head_at=(rows, cols)), critic(ids)[rows, cols], atol=1e-6, rtol=1e-5)


def test_head_at_columns_index_as_the_full_output_does():
    """head_at's columns follow tensor indexing: -1 is each row's last position (not the row before's), and a
    column past the end raises instead of reading the next row."""
    model = _model()
    ids = torch.randint(0, 400, (3, 6))
    rows = torch.arange(3)
    torch.testing.assert_close(model(ids, head_at=(rows, torch.tensor([-1, -6, 2]))),
                               model(ids)[rows, torch.tensor([-1, -6, 2])], atol=1e-6, rtol=1e-5)
    for col in (6, -7):
        with pytest.raises(IndexError):
            model(ids, head_at=(torch.tensor([0]), torch.tensor([col])))


def test_a_prefill_that_keeps_the_last_position_fills_the_whole_cache():
    """generate's prefill reads one position per row (head_at): every position's keys and values still reach the
    cache, so the decode steps after it see the same cache as after a full prefill."""
    model = _model()
    ids = torch.randint(0, 400, (2, 7))
    full, kept = (KVCache(model.config, 2, 8, "cpu", torch.float32) for _ in range(2))
    logits = model(ids, cache=full)
    last = model(ids, cache=kept, head_at=(torch.arange(2), torch.tensor([6, 6])))
    torch.testing.assert_close(last, logits[:, -1], atol=1e-6, rtol=1e-5)
    assert torch.equal(full.buf, kept.buf) and full.length == kept.length == 7


def test_without_gradients_norm_and_rotary_skip_their_autograd_functions_with_the_same_values(monkeypatch):
    """Under no_grad (sampling, scoring) RMSNorm and the rotary embedding call their formulas directly, without
    the autograd.Function bookkeeping: bit-identical outputs."""
    from lmforge import model as model_module

    calls = []
    for name in ("_RMSNormFunction", "_RotaryFunction"):
        fn = getattr(model_module, name)
        monkeypatch.setattr(fn, "apply", lambda *a, _f=fn.apply, _n=name: calls.append(_n) or _f(*a))
    model = _model()
    x = torch.randint(0, 400, (2, 9))
    with_grad = model(x)
    assert with_grad.grad_fn is not None and set(calls) == {"_RMSNormFunction", "_RotaryFunction"}
    calls.clear()
    with torch.no_grad():
        without = model(x)
    assert calls == [] and torch.equal(with_grad.detach(), without)
