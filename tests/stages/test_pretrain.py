"""Pretraining: BERT masking statistics, loss and bits-per-byte arithmetic, overfitting, exact resume, errors."""

import math

import numpy as np
import pytest
import torch

from lmforge.checkpoint import load_model, read_config
from lmforge.cli import main
from lmforge.config import load_config
from lmforge.data import TokenShards, prepare_data, read_manifest
from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.losses import IGNORE, lm_loss
from lmforge.stages.pretrain import (PretrainConfig, evaluate, mlm_mask, run_pretrain, special_table,
                              token_byte_lengths)
from lmforge.training import read_metrics
from tests.conftest import tiny_config

TINY_MODEL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64)




@pytest.fixture(scope="module")
def data_dir(tok, corpus_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    tok.save(root / "tok")
    prepare_data([corpus_file], root / "tok", root / "data", val_fraction=0.2)
    return root / "data"


def _cfg(data_dir, out, **kw):
    base = dict(data=str(data_dir), out=str(out), model=dict(TINY_MODEL), batch_size=4, seq_len=32,
                eval_every=0, eval_batches=2, log_every=1, device="cpu", seed=0,
                optim=dict(lr=3e-3, warmup_steps=2, max_steps=8))
    for k, v in kw.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return load_config(PretrainConfig, base=base)


# ----------------------------------------------------------------------------------------------------------
# BERT masking


def test_mlm_mask_proportions(tok):
    special = special_table(tok)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tok.vocab_size, (400, 500), generator=g)
    ids[:, ::10] = tok.special.bos  # plenty of special tokens in the input
    ids[:, 5::10] = tok.special.eos
    inputs, labels = mlm_mask(ids, special, tok.special.mask, 0.15, g)
    is_special = special[ids]
    chosen = labels != IGNORE
    assert not chosen[is_special].any()                                  # specials are never chosen
    assert torch.equal(inputs[is_special], ids[is_special])                # nor changed
    assert torch.equal(labels[chosen], ids[chosen])                        # labels: the original token
    assert torch.equal(inputs[~chosen], ids[~chosen])                      # unchosen positions untouched
    frac = chosen.sum().item() / (~is_special).sum().item()
    assert abs(frac - 0.15) < 0.005
    n = chosen.sum().item()
    masked = (inputs[chosen] == tok.special.mask).sum().item() / n
    kept = (inputs[chosen] == ids[chosen]).sum().item() / n
    replaced = inputs[chosen][(inputs[chosen] != ids[chosen]) & (inputs[chosen] != tok.special.mask)]
    n_normal = (~special).sum().item()
    assert abs(masked - 0.8) < 0.01
    # a random replacement equals the original with probability 1/n_normal
    assert abs(kept - (0.1 + 0.1 / n_normal)) < 0.01
    assert abs(len(replaced) / n - 0.1 * (1 - 1 / n_normal)) < 0.01
    assert not special[replaced].any()                                     # replacements are never specials
    again = mlm_mask(ids, special, tok.special.mask, 0.15, torch.Generator().manual_seed(0))
    inputs0, labels0 = mlm_mask(ids, special, tok.special.mask, 0.15, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], inputs0) and torch.equal(again[1], labels0)


def test_mlm_mask_never_returns_an_all_ignored_batch(tok):
    special = special_table(tok)
    ids = torch.tensor([[tok.special.bos, 50, 60, tok.special.eos]])
    for seed in range(20):
        _, labels = mlm_mask(ids, special, tok.special.mask, 0.01, torch.Generator().manual_seed(seed))
        assert (labels != IGNORE).sum() >= 1
        assert (labels[0, [0, 3]] == IGNORE).all()


# ----------------------------------------------------------------------------------------------------------
# Loss and evaluation arithmetic


def test_lm_loss_matches_brute_force():
    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    x = torch.randint(9, 400, (2, 6))
    labels = torch.randint(9, 400, (2, 6))
    labels[0, 2] = labels[1, 5] = IGNORE
    logits = model(x)
    terms = []
    for b in range(2):
        for t in range(6):
            if labels[b, t] != IGNORE:
                row = logits[b, t].double()
                terms.append(-(row[labels[b, t]] - torch.logsumexp(row, 0)))
    want = torch.stack(terms).mean()
    assert torch.allclose(lm_loss(model(x), labels).double(), want, atol=1e-5)


def test_token_bytes_sum_to_the_utf8_bytes_of_the_split(tok, data_dir):
    nbytes = token_byte_lengths(tok)
    assert nbytes[special_table(tok)].sum() == 0
    for split in ("train", "val"):
        ts = TokenShards(data_dir, split)
        total = sum(int(nbytes[torch.from_numpy(np.asarray(a, dtype=np.int64))].sum()) for a in ts.shards)
        assert total == read_manifest(data_dir)["splits"][split]["bytes"]


def test_evaluate_a_uniform_model_gives_log_vocab(tok, data_dir, tmp_path):
    cfg = _cfg(data_dir, tmp_path / "o", eval_batches=10_000)
    cfg.model.vocab_size = tok.vocab_size
    model = Transformer(cfg.model)
    torch.nn.init.zeros_(model.lm_head.weight)  # logits all 0: uniform over the vocabulary
    val = TokenShards(data_dir, "val")
    nbytes = token_byte_lengths(tok)
    m = evaluate(model, val, cfg, special_table(tok), tok.special.mask, nbytes, torch.device("cpu"))
    V = tok.vocab_size
    assert m["val_loss"] == pytest.approx(math.log(V), rel=1e-6)
    assert m["val_ppl"] == pytest.approx(V, rel=1e-5)
    targets = np.concatenate([np.asarray(a[1:], dtype=np.int64) for a in val.shards])
    n_scored = int((nbytes[torch.from_numpy(targets)] > 0).sum())  # bpb scores non-special targets
    want_bpb = n_scored * math.log2(V) / read_manifest(data_dir)["splits"]["val"]["bytes"]
    assert m["val_bpb"] == pytest.approx(want_bpb, rel=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Learning


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_tiny_model_overfits_one_batch(tok, objective):
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tok.vocab_size, causal=objective == "clm", hidden_size=64))
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(9, tok.vocab_size, (4, 33), generator=g)
    if objective == "clm":
        inputs, labels = seq[:, :-1], seq[:, 1:]
    else:
        inputs, labels = mlm_mask(seq[:, :-1], special_table(tok), tok.special.mask, 0.15, g)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(150):
        loss = lm_loss(model(inputs), labels)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 5.0  # ~ln(400) at init
    assert lm_loss(model(inputs), labels).item() < 0.05


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_resume_reproduces_the_uninterrupted_run(data_dir, tmp_path, objective):
    full = run_pretrain(_cfg(data_dir, tmp_path / "full", objective=objective), progress=False)
    run_pretrain(_cfg(data_dir, tmp_path / "half", objective=objective, stop_step=4), progress=False)
    assert read_config(tmp_path / "half")["lmforge"]["step"] == 4
    resumed = run_pretrain(_cfg(data_dir, tmp_path / "half", objective=objective), resume=True, progress=False)
    losses = lambda d: [(r["step"], r["loss"]) for r in read_metrics(d) if "loss" in r]
    assert losses(tmp_path / "full") == losses(tmp_path / "half")
    assert [s for s, _ in losses(tmp_path / "full")] == list(range(1, 9))
    assert resumed["val_loss"] == full["val_loss"]
    a, _, meta = load_model(tmp_path / "full")
    b, _, _ = load_model(tmp_path / "half")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert meta["stage"] == "pretrain" and meta["objective"] == objective and meta["step"] == 8
    assert meta["data_fingerprint"] == read_manifest(data_dir)["fingerprint"]
    assert a.config.is_causal == (objective == "clm")


def test_short_run_learns_and_reports(data_dir, tmp_path):
    s = run_pretrain(_cfg(data_dir, tmp_path / "o", eval_every=20, sample_every=20, sample_tokens=8,
                          optim=dict(max_steps=40)), progress=False)
    assert s["steps"] == 40 and s["seconds"] > 0 and s["tokens_per_s"] > 0
    assert s["val_loss"] < math.log(400) - 1.0  # well below the uniform model's log V
    assert s["val_ppl"] == pytest.approx(math.exp(s["val_loss"]))
    assert 0 < s["val_bpb"] < 8
    records = read_metrics(tmp_path / "o")
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert all(isinstance(t, str) for r in evals for t in r["samples"])


# ----------------------------------------------------------------------------------------------------------
# Errors


def test_config_errors_name_the_key(data_dir, tmp_path):
    with pytest.raises(LmforgeError, match="unknown config key 'batch_sise'"):
        _cfg(data_dir, tmp_path / "o", batch_sise=3)
    with pytest.raises(LmforgeError, match="unknown config key 'model.hidden'"):
        _cfg(data_dir, tmp_path / "o", model=dict(hidden=3))
    with pytest.raises(LmforgeError, match="config key 'seq_len': expected int"):
        _cfg(data_dir, tmp_path / "o", seq_len="long")
    with pytest.raises(LmforgeError, match="config key 'objective': expected one of"):
        _cfg(data_dir, tmp_path / "o", objective="gpt")
    with pytest.raises(LmforgeError, match=r"config key 'seq_len' \(65\) exceeds model.max_position_embeddings \(64\)"):
        _cfg(data_dir, tmp_path / "o", seq_len=65)
    with pytest.raises(LmforgeError, match="config key 'sample_every' needs objective clm"):
        _cfg(data_dir, tmp_path / "o", objective="mlm", eval_every=5, sample_every=5)
    assert _cfg(data_dir, tmp_path / "o", objective="mlm").model.is_causal is False


def test_input_errors_before_any_output(tok, data_dir, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(LmforgeError, match="config key 'data'"):
        run_pretrain(_cfg(tmp_path / "missing", out), progress=False)
    other = tmp_path / "other_tok"
    from lmforge.tokenizer import train_tokenizer
    from tests.conftest import SAMPLE_TEXT
    (tmp_path / "c.txt").write_text(SAMPLE_TEXT[:3000], encoding="utf-8")
    train_tokenizer([tmp_path / "c.txt"], 300, other)
    with pytest.raises(LmforgeError, match=r"tokenizer mismatch: config key 'tokenizer' \(.*other_tok\) and config key 'data' \(.*\) use different tokenizers \(fingerprints \w+ != \w+\)"):
        run_pretrain(_cfg(data_dir, out, tokenizer=str(other)), progress=False)
    longest = TokenShards(data_dir, "train").max_window()
    with pytest.raises(LmforgeError, match="config key 'seq_len'.*no train shard longer"):
        run_pretrain(_cfg(data_dir, out, seq_len=longest + 1,
                          model=dict(max_position_embeddings=longest + 1)), progress=False)
    with pytest.raises(LmforgeError, match="no checkpoint to resume"):
        run_pretrain(_cfg(data_dir, out), resume=True, progress=False)
    assert not out.exists()


def test_gradient_checkpointing_gives_the_same_training(data_dir, tmp_path):
    """The config key reaches the model (blocks run twice per step) and changes memory only, not the losses."""
    from lmforge.model import Block

    calls = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, _: calls.append(1) if isinstance(m, Block) else None)
    try:
        losses = {}
        for flag in (False, True):
            calls.clear()
            run_pretrain(_cfg(data_dir, tmp_path / str(flag), gradient_checkpointing=flag,
                              optim=dict(max_steps=3)), progress=False)
            losses[flag] = [r["loss"] for r in read_metrics(tmp_path / str(flag)) if "loss" in r]
            losses[f"calls {flag}"] = len(calls)
    finally:
        hook.remove()
    assert len(losses[False]) == 3 and losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert losses["calls True"] - losses["calls False"] == 3 * 2  # 3 steps x 2 blocks recomputed in backward


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_a_busy_cpu_runs_the_batches_in_lanes_with_the_same_training(data_dir, tmp_path, objective, request):
    """On 2 CPUs with one busy, each batch runs as 2 single-threaded parts (split_rows weights them by their share of
    the counted labels: all tokens for clm, the masked ones for mlm): the losses of the quiet run, to rounding."""
    losses = {}
    for busy in (False, True):
        if busy:
            request.getfixturevalue("busy_cpu")
        out = tmp_path / str(busy)
        result = run_pretrain(_cfg(data_dir, out, objective=objective, optim=dict(max_steps=4)), progress=False)
        rows = [r for r in read_metrics(out) if "loss" in r]
        assert all(("cpu_lanes" in r) == busy for r in rows)
        losses[busy] = [r["loss"] for r in rows] + [result["val_loss"]]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_incompatible_resume_names_what_differs(data_dir, tmp_path):
    out = tmp_path / "o"
    run_pretrain(_cfg(data_dir, out, optim=dict(max_steps=2)), progress=False)
    with pytest.raises(LmforgeError, match="config key 'model.hidden_size' differs \\(checkpoint 32, config 64\\)"):
        run_pretrain(_cfg(data_dir, out, model=dict(hidden_size=64)), resume=True, progress=False)
    with pytest.raises(LmforgeError, match="config key 'objective' differs"):
        run_pretrain(_cfg(data_dir, out, objective="mlm"), resume=True, progress=False)
    from lmforge.tokenizer import train_tokenizer
    from tests.conftest import SAMPLE_TEXT
    (tmp_path / "c.txt").write_text(SAMPLE_TEXT, encoding="utf-8")
    train_tokenizer([tmp_path / "c.txt"], 300, tmp_path / "tok300")
    prepare_data([tmp_path / "c.txt"], tmp_path / "tok300", tmp_path / "data300", val_fraction=0.2)
    with pytest.raises(LmforgeError, match=r"tokenizer mismatch: the checkpoint in .* and the tokenizer of config key 'data' use different tokenizers \(fingerprints \w+ != \w+\)"):
        run_pretrain(_cfg(tmp_path / "data300", out), resume=True, progress=False)
    with pytest.raises(LmforgeError, match="already holds a run; pass --resume"):
        run_pretrain(_cfg(data_dir, out), progress=False)
    s = run_pretrain(_cfg(data_dir, out, overwrite=True, optim=dict(max_steps=3)), progress=False)
    assert s["steps"] == 3 and [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3]


def test_cli_error_is_one_line_and_leaves_no_output(data_dir, tmp_path, capsys):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"data: {data_dir}\nout: {tmp_path / 'o'}\nmodel:\n  max_position_embeddings: 64\n", encoding="utf-8")
    assert main(["pretrain", "--config", str(cfg), "seq_len=128"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "config key 'seq_len'" in err
    assert main(["pretrain", "--config", str(cfg), "optim.warmup=3"]) == 1
    assert "unknown config key 'optim.warmup'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["pretrain", "--config", str(cfg), "seq_len=32", "batch_size=2", "device=cpu", "eval_batches=1",
                 "optim.max_steps=2", "optim.warmup_steps=1", "model.hidden_size=32", "model.num_hidden_layers=1",
                 "model.num_attention_heads=2", "model.num_key_value_heads=2"]) == 0
    out = capsys.readouterr().out
    assert "pretrain clm: 2 steps" in out and "bpb" in out
    assert (tmp_path / "o" / "model.safetensors").is_file()


def test_flops_per_token_hand_count_tied_or_not():
    # hidden 32, 2 layers, 4 heads of 8, 2 KV heads, SwiGLU 128, vocab 400. Per layer: q,o 32*32; k,v 32*16;
    # MLP 3*32*128; two norms 32. Plus final norm and the LM head 400*32 (a matmul even when tied).
    n = 2 * (2 * 1024 + 2 * 512 + 3 * 32 * 128 + 64) + 32 + 400 * 32
    want = 6 * n + 12 * 2 * 4 * 8 * 64
    for tie in (False, True):
        assert Transformer(tiny_config(tie_word_embeddings=tie)).flops_per_token(64) == want
