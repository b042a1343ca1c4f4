"""Muon: the Newton-Schulz orthogonalization against an SVD, one and two steps by hand, the AdamW groups against
torch's AdamW, which parameters get which update, and an exact resume from the state dict."""

import copy
import math

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.model import ModelConfig, Transformer
from lmforge.muon import MuonAdamW, orthogonalize
from lmforge.training import OptimConfig, build_optimizer


@pytest.mark.parametrize("shape", [(6, 6), (5, 9), (12, 4), (3, 7, 5)])
def test_orthogonalize_keeps_the_singular_vectors_and_pulls_the_values_near_one(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = orthogonalize(g)
    assert out.shape == g.shape and out.dtype == g.dtype
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    inner = u.mT @ out @ vh.mT  # U^T O V: diagonal when O = U f(S) V^T, the polar factor's singular vectors
    diag = torch.diagonal(inner, dim1=-2, dim2=-1)
    assert (inner - torch.diag_embed(diag)).abs().max() < 1e-5
    assert diag.min() > 0.6 and diag.max() < 1.25  # the tuned quintic's range, not exactly 1 (Jordan 2024)
    assert torch.allclose(orthogonalize(3.7 * g), out, atol=1e-5)  # scale-free: only the direction matters


def test_two_muon_steps_by_hand():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 6))
    p0 = p.detach().clone()
    g1, g2 = torch.randn(4, 6), torch.randn(4, 6)
    lr, wd, mu = 0.1, 0.2, 0.9
    opt = MuonAdamW([{"params": [p], "weight_decay": wd, "muon": True}], lr=lr, momentum=mu)
    scale = 0.2 * math.sqrt(6)  # RMS-matched to AdamW (Moonlight)
    p.grad = g1.clone()
    opt.step()
    buf = (1 - mu) * g1                       # momentum buffer after step 1
    nesterov = g1 + mu * (buf - g1)           # grad.lerp(buf, mu)
    p1 = p0 * (1 - lr * wd) - lr * scale * orthogonalize(nesterov)
    assert torch.allclose(p.detach(), p1, atol=1e-6)
    p.grad = g2.clone()
    opt.step()
    buf = mu * buf + (1 - mu) * g2
    p2 = p1 * (1 - lr * wd) - lr * scale * orthogonalize(g2 + mu * (buf - g2))
    assert torch.allclose(p.detach(), p2, atol=1e-6)


def test_adamw_groups_step_exactly_as_torch_adamw():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    b = [torch.nn.Parameter(x.detach().clone()) for x in a]
    ours = MuonAdamW([{"params": a[:1], "weight_decay": 0.1}, {"params": a[1:], "weight_decay": 0.0}], lr=1e-2)
    ref = torch.optim.AdamW([{"params": b[:1], "weight_decay": 0.1}, {"params": b[1:], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=True)
    for _ in range(5):
        grads = [torch.randn_like(x) for x in a]
        for x, y, g in zip(a, b, grads):
            x.grad, y.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def _tiny():
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, intermediate_size=24, max_position_embeddings=16))


def test_build_optimizer_gives_muon_the_blocks_matrices_only():
    model = _tiny()
    opt = build_optimizer(model, OptimConfig(optimizer="muon", weight_decay=0.1))
    assert isinstance(opt, MuonAdamW)
    name = {id(p): n for n, p in model.named_parameters()}
    muon = {name[id(p)] for g in opt.param_groups if g["muon"] for p in g["params"]}
    other = {name[id(p)] for g in opt.param_groups if not g["muon"] for p in g["params"]}
    assert muon == {n for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("model.layers.")}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= other
    assert len(muon) == 2 * 7 and not muon & other
    assert all(g["weight_decay"] == 0.1 for g in opt.param_groups if g["muon"])
    assert type(build_optimizer(model, OptimConfig())) is torch.optim.AdamW  # the default is unchanged


def _loss(model, step):
    x = torch.randint(0, 32, (4, 9), generator=torch.Generator().manual_seed(step % 2))  # two batches, alternating
    return model(x[:, :-1], labels=x[:, 1:])


def test_muon_trains_and_resumes_exactly_from_its_state_dict():
    cfg = OptimConfig(optimizer="muon", lr=2e-2)
    model = _tiny()
    opt = build_optimizer(model, cfg)
    losses = []
    for step in range(6):
        if step == 3:
            saved_model = {k: v.clone() for k, v in model.state_dict().items()}
            saved_opt = copy.deepcopy(opt.state_dict())  # its tensors are the live state
        loss = _loss(model, step)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert losses[-1] < losses[0]
    resumed = _tiny()
    resumed.load_state_dict(saved_model)
    opt2 = build_optimizer(resumed, cfg)
    opt2.load_state_dict(saved_opt)
    for step in range(3, 6):
        _loss(resumed, step).backward()
        opt2.step()
        opt2.zero_grad(set_to_none=True)
    for (k, v), w in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(v, w), k


def test_muon_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="'optimizer'.*fsdp"):
        OptimConfig(optimizer="muon", fsdp=True).validate()
    with pytest.raises(ConfigError, match="'muon_momentum'"):
        OptimConfig(optimizer="muon", muon_momentum=1.0).validate()
    with pytest.raises(ValueError, match="2-D"):
        MuonAdamW([{"params": [torch.nn.Parameter(torch.ones(3))], "muon": True}], lr=1e-3)
