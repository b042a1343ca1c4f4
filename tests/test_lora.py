"""LoRA: start at the base model, train only the adapters, merge exactly into a plain checkpoint."""

import json

import pytest
import torch

from lmforge.checkpoint import load_model, save_checkpoint
from lmforge.config import load_config
from lmforge.errors import LmforgeError
from lmforge.lora import (LINEAR_NAMES, LoraConfig, LoRALinear, apply_lora, check_resume_rank, has_lora,
                          load_trainable_state_dict, merge_lora, merged_copy,
                          plain_model, trainable_state_dict)
from lmforge.training import OptimConfig, build_optimizer
from lmforge.model import Transformer
from lmforge.stages.sft import SFTConfig, run_sft
from tests.conftest import tiny_config


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(tiny_config(**kw)).eval()


def _randomise_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lora_A", "lora_B")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)  # B != 0: the update is really there


IDS = torch.randint(9, 300, (3, 12), generator=torch.Generator().manual_seed(0))
MASK = torch.tensor([[1] * 12, [0] * 3 + [1] * 9, [1] * 7 + [0] * 5])


def test_layer_is_base_plus_scaled_low_rank_update():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5, bias=False)
    layer = LoRALinear(base, rank=2, alpha=8.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 6)
    want = x @ base.weight.T + 4.0 * (x @ layer.lora_A.T @ layer.lora_B.T)  # alpha / r = 4
    torch.testing.assert_close(layer(x), want)
    torch.testing.assert_close(x @ layer.merged_weight().T, want, atol=1e-6, rtol=1e-5)


def test_zero_B_starts_at_the_base_model_and_only_adapters_train():
    model = _model()
    before = model(IDS, attention_mask=MASK)
    wrapped = apply_lora(model, LoraConfig(rank=4, targets=["q_proj", "v_proj"]))
    assert wrapped == [f"model.layers.{i}.self_attn.{n}" for i in range(2) for n in ("q_proj", "v_proj")]
    torch.testing.assert_close(model(IDS, attention_mask=MASK), before, atol=0, rtol=0)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    d, kv = 32, 2 * 8  # hidden 32; 2 KV heads of dim 8
    assert trainable == {**{f"model.layers.{i}.self_attn.q_proj.lora_{m}": 4 * d for i in range(2) for m in "AB"},
                         **{f"model.layers.{i}.self_attn.v_proj.lora_A": 4 * d for i in range(2)},
                         **{f"model.layers.{i}.self_attn.v_proj.lora_B": 4 * kv for i in range(2)}}


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["all-linear"]])
def test_merge_gives_the_same_logits_as_the_adapter(targets):
    model = _model(tie_word_embeddings=True)
    wrapped = apply_lora(model, LoraConfig(rank=4, alpha=8.0, targets=targets))
    assert len(wrapped) == 2 * (len(LINEAR_NAMES) if targets == ["all-linear"] else 2)
    _randomise_adapters(model)
    with torch.no_grad():
        adapted = model(IDS, attention_mask=MASK)
        base = _model(tie_word_embeddings=True)(IDS, attention_mask=MASK)
        assert (adapted - base).abs().max() > 0.1  # the adapters do change the model
        copy = merged_copy(model)
        assert not any(isinstance(m, LoRALinear) for m in copy.modules())
        torch.testing.assert_close(copy(IDS, attention_mask=MASK), adapted, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(IDS, attention_mask=MASK), adapted, atol=0, rtol=0)  # model untouched
        merged = merge_lora(model)
        torch.testing.assert_close(merged(IDS, attention_mask=MASK), adapted, atol=1e-5, rtol=1e-5)


def test_merged_checkpoint_round_trip_and_adapter_state(tmp_path, tok):
    model = _model(vocab_size=tok.vocab_size)
    apply_lora(model, LoraConfig(rank=2, targets=["all-linear"]))
    _randomise_adapters(model)
    save_checkpoint(tmp_path / "ckpt", merged_copy(model), tok)
    loaded, _, _ = load_model(tmp_path / "ckpt")
    assert not any("lora" in k or ".base." in k for k in loaded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(IDS, attention_mask=MASK), model(IDS, attention_mask=MASK),
                                   atol=1e-5, rtol=1e-5)
    other = _model(vocab_size=tok.vocab_size)
    apply_lora(other, LoraConfig(rank=2, targets=["all-linear"]))
    load_trainable_state_dict(other, trainable_state_dict(model))
    torch.testing.assert_close(other(IDS, attention_mask=MASK), model(IDS, attention_mask=MASK), atol=0, rtol=0)
    with pytest.raises(LmforgeError, match="does not match"):
        load_trainable_state_dict(_lora(rank=2, targets=["q_proj"]), trainable_state_dict(model))


def _lora(**kw):
    m = _model()
    apply_lora(m, LoraConfig(**kw))
    return m


def test_config_errors_name_the_key():
    with pytest.raises(LmforgeError, match="config key 'lora.targets' names an unknown layer 'qkv'"):
        load_config(SFTConfig, None, ["init=a", "data=b", "lora.rank=4", "lora.targets=q_proj,qkv"])
    with pytest.raises(LmforgeError, match="'lora.rank' must be >= 0"):
        load_config(SFTConfig, None, ["init=a", "data=b", "lora.rank=-1"])


def test_lora_sft_changes_only_the_target_layers(tmp_path, tok):
    torch.manual_seed(0)
    init = tmp_path / "init"
    save_checkpoint(init, Transformer(tiny_config(tok.vocab_size)), tok)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"say {w}", "output": w}) + "\n" for w in ["fox", "dog", "red"] * 4))
    s = run_sft(load_config(SFTConfig, None, [f"init={init}", f"data={data}", f"out={tmp_path / 'out'}", "lora.rank=4",
                                              "lora.targets=q_proj,v_proj", "optim.max_steps=5", "optim.lr=0.05",
                                              "batch_size=4", "eval_every=0", "n_samples=0", "val_fraction=0.25"]),
                progress=False)
    assert s["trainable_params"] == 2 * (4 * 32 + 4 * 32) + 2 * (4 * 32 + 4 * 16)
    assert s["val_loss"] < s["val_loss_before"]
    a, b = load_model(init)[0].state_dict(), load_model(tmp_path / "out")[0].state_dict()
    assert a.keys() == b.keys()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed == {f"model.layers.{i}.self_attn.{n}.weight" for i in range(2) for n in ("q_proj", "v_proj")}


def test_scalar_head_stays_trainable_and_alone_with_the_adapters_gets_gradients():
    torch.manual_seed(0)
    model = Transformer(tiny_config(), head="scalar")
    apply_lora(model, LoraConfig(rank=2, targets=["q_proj", "v_proj"]), keep_trainable=("score.",))
    model(IDS, attention_mask=MASK).pow(2).mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == {f"model.layers.{i}.self_attn.{n}.lora_{m}" for i in range(2) for n in ("q_proj", "v_proj")
                         for m in "AB"} | {"score.weight"}
    opt = build_optimizer(model, OptimConfig())
    in_optimizer = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    # The resume state holds exactly the trainable tensors; it restores them into an identically set-up model.
    _randomise_adapters(model)
    state = trainable_state_dict(model)
    assert state.keys() == with_grad
    torch.manual_seed(5)  # other random adapters and head: all overwritten by the load
    other = Transformer(tiny_config(), head="scalar")
    apply_lora(other, LoraConfig(rank=2, targets=["q_proj", "v_proj"]), keep_trainable=("score.",))
    with pytest.raises(LmforgeError, match="do not match"):
        load_trainable_state_dict(_lora(rank=2, targets=["q_proj"]), state)
    load_trainable_state_dict(other, state)
    assert all(torch.equal(state[k], p) for k, p in other.named_parameters() if p.requires_grad)


def test_plain_model_merges_only_when_there_are_adapters():
    model = _model()
    assert plain_model(model) is model and not has_lora(model)
    apply_lora(model, LoraConfig(rank=2))
    _randomise_adapters(model)
    plain = plain_model(model)
    assert has_lora(model) and not has_lora(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(IDS, attention_mask=MASK), model(IDS, attention_mask=MASK),
                                   atol=1e-5, rtol=1e-5)


def test_resume_rank_check_and_nested_validation_name_the_key():
    check_resume_rank("out", {"actor_lora_rank": 4}, "actor_lora", 4)
    check_resume_rank("out", {}, "lora", 0)  # a run saved before LoRA existed is rank 0
    with pytest.raises(LmforgeError, match=r"out: cannot resume: config key 'lora.rank' differs \(checkpoint 0\)"):
        check_resume_rank("out", {}, "lora", 2)
    with pytest.raises(LmforgeError, match="config key 'critic_lora.alpha' must be positive"):
        LoraConfig(rank=2, alpha=0.0).validate_as("critic_lora")


def test_layers_limits_adapters_to_the_last_blocks_and_backward_stops_there():
    torch.manual_seed(0)
    model = Transformer(tiny_config(num_hidden_layers=3), head="lm")
    wrapped = apply_lora(model, LoraConfig(rank=2, targets=["q_proj"], layers=1))
    assert wrapped == ["model.layers.2.self_attn.q_proj"]
    seen = []  # per block: does its input / output carry a gradient path?
    for block in model.model.layers:
        block.register_forward_hook(lambda m, inp, out: seen.append((inp[0].requires_grad, out.requires_grad)))
    model(torch.randint(0, 400, (2, 8))).sum().backward()
    assert seen == [(False, False), (False, False), (False, True)]  # backward never enters blocks 0 and 1
