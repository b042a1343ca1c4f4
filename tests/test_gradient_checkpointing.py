"""Gradient checkpointing: recomputing block activations in backward changes memory, not the loss or gradients."""

import json

import pytest
import torch

from lmforge.checkpoint import load_model, save_checkpoint
from lmforge.config import load_config
from lmforge.lora import LoraConfig, apply_lora
from lmforge.model import Transformer
from lmforge.stages.sft import SFTConfig, run_sft
from lmforge.training import read_metrics
from tests.conftest import tiny_config

IDS = torch.randint(9, 300, (3, 12), generator=torch.Generator().manual_seed(0))
MASK = torch.tensor([[1] * 12, [0] * 3 + [1] * 9, [1] * 7 + [0] * 5])


def _loss_and_grads(model, checkpointing: bool, seed: int = 0):
    """Loss of one training forward and the gradients of every trainable parameter; counts block forwards."""
    model.train()
    model.gradient_checkpointing = checkpointing
    calls = []
    hook = model.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    torch.manual_seed(seed)  # the same dropout masks in both runs (checkpoint replays the RNG on recompute)
    out = model(IDS, attention_mask=MASK)
    loss = out.float().pow(2).mean() if model.head == "scalar" else out.logsumexp(-1).mean()
    loss.backward()
    hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads, len(calls)


@pytest.mark.parametrize("head, dropout, lora", [("lm", 0.0, False), ("lm", 0.1, False), ("scalar", 0.0, True),
                                                 ("lm", 0.1, True)])
def test_same_loss_and_gradients_with_and_without_checkpointing(head, dropout, lora):
    torch.manual_seed(0)
    model = Transformer(tiny_config(dropout=dropout), head=head)
    if lora:  # frozen base: the blocks' inputs need no gradient, the adapters inside them do
        apply_lora(model, LoraConfig(rank=2, targets=["all-linear"]), keep_trainable=("score.",))
    loss_off, grads_off, calls_off = _loss_and_grads(model, False)
    loss_on, grads_on, calls_on = _loss_and_grads(model, True)
    assert calls_off == 1 and calls_on == 2  # really recomputed in backward
    assert loss_on == pytest.approx(loss_off, rel=1e-6)
    assert grads_on.keys() == grads_off.keys() and grads_off
    assert grads_off.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    for k in grads_off:
        torch.testing.assert_close(grads_on[k], grads_off[k], atol=1e-6, rtol=1e-5)


def test_no_recompute_in_eval_or_without_grad():
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    model.gradient_checkpointing = True
    calls = []
    model.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    reference = Transformer(tiny_config())
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model.train()(IDS, attention_mask=MASK),
                                   reference.train()(IDS, attention_mask=MASK), atol=0, rtol=0)
    model.eval()(IDS, attention_mask=MASK).sum().backward()
    assert len(calls) == 2  # one plain forward each: nothing to recompute


def test_sft_with_checkpointing_matches_the_plain_run(tmp_path, tok):
    """The config key reaches the trained model and changes nothing but memory: same losses, same weights."""
    torch.manual_seed(0)
    init = tmp_path / "init"
    save_checkpoint(init, Transformer(tiny_config(tok.vocab_size)), tok, {"stage": "pretrain"})
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"say {w}", "output": w}) + "\n"
                            for w in ["fox", "dog", "red"] * 4))
    runs = {}
    for flag in (False, True):
        out = tmp_path / f"out_{flag}"
        run_sft(load_config(SFTConfig, None, [f"init={init}", f"data={data}", f"out={out}", "optim.max_steps=3",
                                              "optim.lr=0.01", "batch_size=4", "eval_every=0", "n_samples=0",
                                              "log_every=1", "val_fraction=0.25", "device=cpu",
                                              f"gradient_checkpointing={str(flag).lower()}"]), progress=False)
        runs[flag] = ([r["loss"] for r in read_metrics(out) if "loss" in r], load_model(out)[0].state_dict())
    assert len(runs[False][0]) == 3
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-6)
    for k, v in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][k], v, atol=1e-6, rtol=1e-5)
