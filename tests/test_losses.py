"""The fused LM-head cross-entropy and log-probs against the plain paths (logits, then F.cross_entropy or
log-softmax) and hand computations."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.losses import IGNORE, linear_cross_entropy, linear_logprobs, lm_loss
from lmforge.model import ModelConfig, Transformer


def _inputs(n=37, d=8, v=29, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, d, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = IGNORE
    return hidden, weight, labels


def test_value_is_the_hand_computed_mean_nll():
    hidden, weight, labels = _inputs(n=6, d=3, v=5)
    terms = []
    for i in range(6):
        if labels[i] != IGNORE:
            z = hidden[i] @ weight.T
            terms.append(torch.log(torch.exp(z).sum()) - z[labels[i]])
    want = torch.stack(terms).mean()
    assert torch.allclose(linear_cross_entropy(hidden, weight, labels), want, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_rows", [1, 4, 7, 64])   # chunks of one row, uneven last chunk, one chunk
def test_value_and_gradients_equal_the_unfused_path(reduction, chunk_rows):
    hidden, weight, labels = _inputs()
    ref = F.cross_entropy(hidden @ weight.T, labels, ignore_index=IGNORE, reduction=reduction)
    g_ref = torch.autograd.grad(ref * 0.37, (hidden, weight))  # a grad_output other than 1 (grad accumulation)
    got = linear_cross_entropy(hidden, weight, labels, reduction, chunk_rows=chunk_rows)
    g_got = torch.autograd.grad(got * 0.37, (hidden, weight))
    assert torch.allclose(got, ref, atol=1e-12)
    for a, b in zip(g_got, g_ref):
        assert torch.allclose(a, b, atol=1e-12)
    assert (g_got[0][labels == IGNORE] == 0).all()  # unlabelled rows get no gradient


def test_fp32_matches_fp64_reference_and_extreme_logits_stay_finite():
    hidden, weight, labels = _inputs(n=64, d=16, v=50, dtype=torch.float32)
    with torch.no_grad():
        hidden.mul_(30)  # logits in the hundreds: exp() would overflow without the max subtraction
    got = linear_cross_entropy(hidden, weight, labels, chunk_rows=16)
    gh, gw = torch.autograd.grad(got, (hidden, weight))
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = F.cross_entropy(h64 @ w64.T, labels, ignore_index=IGNORE)
    rh, rw = torch.autograd.grad(ref, (h64, w64))
    assert torch.isfinite(got) and torch.allclose(got.double(), ref, rtol=1e-5)
    assert torch.allclose(gh.double(), rh, atol=1e-5) and torch.allclose(gw.double(), rw, atol=1e-5)


def _matmuls(fn) -> int:
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm_", "aten::addmm"))


def test_gradient_matmuls_run_only_for_inputs_that_need_them():
    """Per chunk: one matmul for the logits, one per input that needs a gradient; none for gradients under
    no_grad (evaluation), although autograd's needs_input_grad does not see no_grad."""
    hidden, weight, labels = _inputs(n=32, d=8, v=29, dtype=torch.float32)
    labels[:] = 3  # every row labelled: 4 chunks of 8
    run = lambda h, w: linear_cross_entropy(h, w, labels, chunk_rows=8)  # noqa: E731
    assert _matmuls(lambda: run(hidden, weight)) == 4 * 3
    assert _matmuls(lambda: run(hidden, weight.detach())) == 4 * 2
    with torch.no_grad():
        assert _matmuls(lambda: run(hidden, weight)) == 4


def test_frozen_weight_or_no_grad_computes_only_what_is_needed():
    hidden, weight, labels = _inputs()
    frozen = weight.detach()
    loss = linear_cross_entropy(hidden, frozen, labels)
    (gh,) = torch.autograd.grad(loss, hidden)
    ref = torch.autograd.grad(F.cross_entropy(hidden @ frozen.T, labels, ignore_index=IGNORE), hidden)[0]
    assert torch.allclose(gh, ref, atol=1e-12)
    with torch.no_grad():
        value = linear_cross_entropy(hidden, weight, labels)
    assert not value.requires_grad and torch.allclose(value, loss, atol=1e-12)


def test_all_positions_unlabelled_gives_zero_and_no_nan():
    hidden, weight, _ = _inputs(n=5)
    labels = torch.full((5,), IGNORE)
    loss = linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    assert loss.item() == 0 and (hidden.grad == 0).all() and (weight.grad == 0).all()


@pytest.mark.parametrize("tied", [False, True])
def test_transformer_labels_path_equals_logits_then_lm_loss(tied):
    cfg = ModelConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = Transformer(cfg)
    x = torch.randint(0, 61, (3, 12))
    labels = torch.randint(0, 61, (3, 12))
    labels[0, :4] = IGNORE
    ref = lm_loss(model(x), labels)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    got = model(x, labels=labels)
    got_grads = torch.autograd.grad(got, list(model.parameters()))
    assert torch.allclose(got, ref, atol=1e-6)
    for (name, _), a, b in zip(model.named_parameters(), got_grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-6), name


def test_unlabelled_rows_inside_the_fused_function_are_masked():
    """Under torch.compile linear_cross_entropy keeps unlabelled rows (no data-dependent shapes): the
    autograd function itself must give them no loss and no gradient."""
    from lmforge.losses import _LinearCrossEntropy

    hidden, weight, labels = _inputs()
    n = (labels != IGNORE).sum()
    got = _LinearCrossEntropy.apply(hidden, weight, labels, 1.0 / n.double(), 8)
    ref = F.cross_entropy(hidden @ weight.T, labels, ignore_index=IGNORE)
    assert torch.allclose(got, ref, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, (hidden, weight)), torch.autograd.grad(ref, (hidden, weight))):
        assert torch.allclose(a, b, atol=1e-12)


def test_under_bf16_autocast_matmuls_run_in_bf16_and_softmax_and_gradients_stay_fp32():
    """The CUDA path (bf16 autocast), exercised with CPU autocast: the head's matmuls in bf16 as autocast would
    run them, log-sum-exp and softmax in fp32, gradients returned in the parameters' fp32."""
    hidden, weight, labels = _inputs(n=300, d=64, v=500, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(hidden, weight, labels, chunk_rows=128)
    gh, gw = torch.autograd.grad(got, (hidden, weight))
    ref = F.cross_entropy((hidden.bfloat16() @ weight.bfloat16().T).float(), labels, ignore_index=IGNORE)
    rh, rw = torch.autograd.grad(ref, (hidden, weight))
    assert got.dtype == gh.dtype == gw.dtype == torch.float32
    assert torch.allclose(got, ref, rtol=1e-5)
    assert torch.allclose(gh, rh, atol=1e-3 * rh.abs().max().item())
    assert torch.allclose(gw, rw, atol=1e-2 * rw.abs().max().item())  # bf16 outputs per chunk vs one matmul


def test_linear_logprobs_are_the_hand_computed_tempered_logprobs_and_entropies():
    hidden, weight, _ = _inputs(n=5, d=3, v=4)
    targets = torch.tensor([0, 3, 1, 1, 2])
    logp, entropy = linear_logprobs(hidden, weight, targets, temperature=0.5, with_entropy=True, chunk_rows=2)
    for i in range(5):
        z = (hidden[i] @ weight.T) / 0.5
        p = torch.exp(z) / torch.exp(z).sum()
        assert torch.allclose(logp[i], torch.log(p[targets[i]]), atol=1e-12)
        assert torch.allclose(entropy[i], -(p * torch.log(p)).sum(), atol=1e-12)
    assert not entropy.requires_grad  # a statistic


@pytest.mark.parametrize("keep_logits", [True, False])  # backward from kept logits, or recomputing them
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_rows", [1, 4, 7, 64])   # chunks of one row, uneven last chunk, one chunk
def test_linear_logprobs_values_and_gradients_equal_the_unfused_path(temperature, chunk_rows, keep_logits):
    hidden, weight, targets = _inputs()
    targets = targets.clamp(min=0)
    upstream = torch.randn(len(targets), generator=torch.Generator().manual_seed(1), dtype=hidden.dtype)
    ref = torch.log_softmax(hidden @ weight.T / temperature, -1).gather(1, targets[:, None]).squeeze(1)
    g_ref = torch.autograd.grad((ref * upstream).sum(), (hidden, weight))  # per-token upstream gradients, as PPO's
    got = linear_logprobs(hidden, weight, targets, temperature, chunk_rows=chunk_rows, keep_logits=keep_logits)
    g_got = torch.autograd.grad((got * upstream).sum(), (hidden, weight))
    assert torch.allclose(got, ref, atol=1e-12)
    for a, b in zip(g_got, g_ref):
        assert torch.allclose(a, b, atol=1e-12)


def test_linear_logprobs_in_fp32_match_fp64_with_extreme_logits_and_a_frozen_head():
    hidden, weight, targets = _inputs(n=64, d=16, v=50, dtype=torch.float32)
    targets = targets.clamp(min=0)
    with torch.no_grad():
        hidden.mul_(30)  # logits in the hundreds: exp() would overflow without the max subtraction
    got, entropy = linear_logprobs(hidden, weight.detach(), targets, 0.7, with_entropy=True, chunk_rows=16,
                                   keep_logits=False)
    (gh,) = torch.autograd.grad(got.sum(), (hidden,))
    h64 = hidden.detach().double().requires_grad_()
    ref_all = torch.log_softmax(h64 @ weight.detach().double().T / 0.7, -1)
    ref = ref_all.gather(1, targets[:, None]).squeeze(1)
    (rh,) = torch.autograd.grad(ref.sum(), (h64,))
    assert torch.isfinite(got).all() and torch.isfinite(entropy).all()
    assert torch.allclose(got.double(), ref, atol=1e-4) and torch.allclose(gh.double(), rh, atol=1e-4)
    assert torch.allclose(entropy.double(), -(ref_all.exp() * ref_all).sum(-1), atol=1e-4)

