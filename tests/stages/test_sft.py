"""SFT: data formats and errors, the loss mask (with truncation), packing, batching order, loss normalisation,
resume, and an end-to-end run that learns held-out instances of small tasks."""

import itertools
import json
import random

import pytest
import torch

from lmforge.chat import record_to_messages, render, render_prompt
from lmforge.checkpoint import load_model, save_checkpoint
from lmforge.cli import main
from lmforge.config import load_config
from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.losses import IGNORE
from lmforge.stages.sft import (SFTBatches, SFTConfig, answer, encode_example, encode_records, evaluate_loss,
                         pack_rows, packed_batch, pad_batch, read_sft_records, run_sft, sft_loss, batch_nll, batch_nll_sum)
from lmforge.training import split_rows
from tests.conftest import tiny_config


def _write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records),
                    encoding="utf-8")
    return path


def _init_checkpoint(path, tok, seed=0, **kw):
    torch.manual_seed(seed)
    save_checkpoint(path, Transformer(tiny_config(tok.vocab_size, **kw)), tok, meta={"stage": "pretrain"})
    return path


def _brute_force_labels(tok, ids):
    """Labels by scanning tokens: inside an assistant turn (after its role token, through <|end|>) = the token."""
    out, inside = [], False
    for t in ids:
        if t == tok.special.assistant and not inside:
            inside = True
            out.append(IGNORE)
            continue
        out.append(t if inside else IGNORE)
        if inside and t == tok.special.end:
            inside = False
    return out


MULTI = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"},
         {"role": "assistant", "content": "你好 🎉"}, {"role": "user", "content": "The quick brown fox?"},
         {"role": "assistant", "content": "jumps over the lazy dog."}]


# ------------------------------------------------------------------------------------------------- data


def test_formats_jsonl_and_json_array(tmp_path):
    recs = [{"Instruction": "请帮我翻译一句话", "Input": "hello", "Output": "你好"},
            {"instruction": "Say hi", "output": "hi"},
            {"messages": MULTI}]
    a, skipped = read_sft_records(_write_jsonl(tmp_path / "a.jsonl", recs))
    arr = tmp_path / "b.json"
    arr.write_text(json.dumps(recs, ensure_ascii=False, indent=2), encoding="utf-8")
    b, _ = read_sft_records(arr)
    assert skipped == 0 and a == b == [record_to_messages(r) for r in recs]
    assert a[0] == [{"role": "user", "content": "请帮我翻译一句话\nhello"}, {"role": "assistant", "content": "你好"}]


def test_capitalized_and_lowercase_keys_give_identical_examples(tmp_path, tok):
    upper = [{"Instruction": "请帮我翻译一句话", "Input": "hello", "Output": "你好"}, {"INSTRUCTION": "x", "OUTPUT": "y"}]
    lower = [{k.lower(): v for k, v in r.items()} for r in upper]
    a, _ = read_sft_records(_write_jsonl(tmp_path / "u.jsonl", upper))
    b, _ = read_sft_records(_write_jsonl(tmp_path / "l.jsonl", lower))
    assert encode_records(tok, a, 64) == encode_records(tok, b, 64)


@pytest.mark.parametrize("lines, line, reason", [
    (['{"instruction": "a", "output": "b"}', '{"instruction": "a", "output": }'], 2, "invalid JSON"),
    (['{"instruction": "a", "output": "b"}', "", '{"instruction": "only"}'], 3, "no 'output'"),
    (['{"messages": [{"role": "user", "content": "x"}]}'], 1, "no assistant turn"),
    (['{"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}'], 1, "unknown role"),
    (['{"instruction": "a", "output": "b"}', '{"instruction": "a", "output": 7}'], 2, "must be a string"),
    (['{"instruction": null, "output": "b"}'], 1, "empty 'instruction'"),
    (['[{"instruction": "a", "output": "b"},', ' {"instruction": "a",', '  "input": 3, "output": "c"}]'], 2, "must be a string"),
    (['[{"instruction": "a", "output": "b"},', ' {"instruction": "a" "output": "c"}]'], 2, "invalid JSON"),
])
def test_bad_input_names_file_and_line(tmp_path, lines, line, reason):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(LmforgeError) as e:
        read_sft_records(path)
    assert str(e.value).startswith(f"{path}:{line}: ") and reason in str(e.value)


def test_skip_invalid_counts_and_empty_is_error(tmp_path):
    path = _write_jsonl(tmp_path / "mixed.jsonl", [{"instruction": "a", "output": "b"}, "{not json", {"instruction": "c"},
                                                   {"messages": [{"role": "robot", "content": "x"}]},
                                                   {"instruction": "d", "output": "e"}])
    records, skipped = read_sft_records(path, skip_invalid=True)
    assert skipped == 3 and [m[0]["content"] for m in records] == ["a", "d"]
    with pytest.raises(LmforgeError, match="no valid records"):
        read_sft_records(_write_jsonl(tmp_path / "allbad.jsonl", ["{", {"x": 1}]), skip_invalid=True)
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(LmforgeError, match="empty.jsonl: no valid records"):
        read_sft_records(tmp_path / "empty.jsonl")


# -------------------------------------------------------------------------------------- mask, truncation


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."}],
    MULTI,
    MULTI + [{"role": "user", "content": "a trailing question carries no loss"}],
])
def test_labels_are_exactly_assistant_tokens_and_end(tok, messages):
    ids, labels = encode_example(tok, messages, 256)
    assert labels == _brute_force_labels(tok, ids)
    n_assistant = sum(m["role"] == "assistant" for m in messages)
    assert [t for t in labels if t != IGNORE].count(tok.special.end) == n_assistant
    assert ids[-1] == tok.special.end and labels[-1] == tok.special.end  # trailing user turn dropped


def test_truncation_keeps_bos_and_last_response_and_drops_what_cannot_fit(tok):
    full, full_mask = render(tok, MULTI)
    response = len(tok.encode(MULTI[-1]["content"])) + 1  # content + <|end|>
    for max_len in (len(full) - 1, len(full) - 9, response + 2):
        ids, labels = encode_example(tok, MULTI, max_len)
        assert len(ids) == max_len and ids[0] == tok.special.bos
        assert ids[1:] == full[len(full) - (max_len - 1):]  # the prompt lost tokens from the left
        want = [t if m else IGNORE for t, m in zip(full, full_mask)]
        assert labels == [IGNORE] + want[len(full) - (max_len - 1):]
        assert ids[-response - 1] == tok.special.assistant  # the whole last response survived
    # The kept window starting inside the user turn: the brute-force scan sees the same mask.
    ids, labels = encode_example(tok, MULTI, response + 5)
    assert labels == _brute_force_labels(tok, ids)
    assert encode_example(tok, MULTI, response + 1) is None  # BOS + role + response does not fit: dropped


# -------------------------------------------------------------------------------------- packing, batching


def test_pack_rows_first_fit():
    assert pack_rows([5, 3, 4, 2], [0, 1, 2, 3], capacity=8) == [[0, 1], [2, 3]]
    assert pack_rows([5, 3, 4, 2], [3, 2, 1, 0], capacity=8) == [[3, 2], [1, 0]]
    lengths = [random.Random(i).randint(1, 10) for i in range(50)]
    rows = pack_rows(lengths, list(range(50)), capacity=12)
    assert sorted(i for r in rows for i in r) == list(range(50)) and all(sum(lengths[i] for i in r) <= 12 for r in rows)


def _examples(tok, n=6):
    recs = [[{"role": "user", "content": f"question {i}: " + "fox " * (i % 3)}, {"role": "assistant", "content": "dog " * (1 + i)}]
            for i in range(n - 1)] + [MULTI]
    return [encode_example(tok, m, 64) for m in recs]


def test_packing_gives_the_same_per_record_loss_as_padding(tok):
    torch.manual_seed(0)
    model = Transformer(tiny_config(tok.vocab_size, init_std=0.3)).eval()  # large init: far-from-uniform logits
    examples = _examples(tok)
    pad_id = tok.special.pad
    with torch.no_grad():
        padded = batch_nll(model, pad_batch(examples, pad_id))
        alone = [batch_nll(model, pad_batch([ex], pad_id))[0] for ex in examples]
        rows = pack_rows([len(x) for x, _ in examples], list(range(len(examples))), capacity=64)
        assert len(rows) < len(examples)  # several records do share a row
        batch = packed_batch(examples, rows, pad_id)
        packed = batch_nll(model, batch)
    for i, (x, y) in enumerate(examples):
        r, s = next((r, s) for r, row in enumerate(rows) for s, j in enumerate(row, 1) if j == i)
        per_token = packed[r][batch["segment_ids"][r] == s]
        assert per_token.shape[0] == len(x) and batch["position_ids"][r][batch["segment_ids"][r] == s].tolist() == list(range(len(x)))
        torch.testing.assert_close(per_token, padded[i, :len(x)], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(per_token, alone[i], atol=1e-5, rtol=1e-5)
        assert float(per_token.sum()) > 0 and (per_token[torch.tensor(y) == IGNORE] == 0).all()


def test_the_training_loss_sums_the_per_token_nll_of_padded_and_packed_batches(tok):
    """sft_loss goes through the fused LM-head cross-entropy (labels shifted by one, head on labelled rows only):
    its sum equals batch_nll's (full logits, then the labelled tokens), and so do the gradients."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(tok.vocab_size, init_std=0.3))
    examples = _examples(tok)
    rows = pack_rows([len(x) for x, _ in examples], list(range(len(examples))), capacity=64)
    for batch in (pad_batch(examples, tok.special.pad), packed_batch(examples, rows, tok.special.pad)):
        fused = batch_nll_sum(model, batch)
        g_fused = torch.autograd.grad(fused, list(model.parameters()))
        plain = batch_nll(model, batch).sum()
        g_plain = torch.autograd.grad(plain, list(model.parameters()))
        torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-5)
        for a, b in zip(g_fused, g_plain):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_the_lanes_parts_of_a_batch_sum_to_its_loss_and_gradients(tok):
    """The split a busy CPU runs side by side (split_rows, weight 1: sft_loss is a sum times the step's scale)."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(tok.vocab_size, init_std=0.3))
    examples = _examples(tok)
    rows = pack_rows([len(x) for x, _ in examples], list(range(len(examples))), capacity=64)
    for batch in (pad_batch(examples, tok.special.pad), packed_batch(examples, rows, tok.special.pad)):
        batch["scale"] = 0.125
        whole, _, ntok = sft_loss(model, batch)
        g_whole = torch.autograd.grad(whole, list(model.parameters()))
        parts = split_rows(batch, 2)
        assert len(parts) == 2 and all(w == 1.0 and p["scale"] == 0.125 for p, w in parts)
        losses = [sft_loss(model, p) for p, _ in parts]
        g_parts = torch.autograd.grad(sum(x[0] for x in losses), list(model.parameters()))
        torch.testing.assert_close(sum(x[0] for x in losses), whole, atol=1e-5, rtol=1e-6)
        assert sum(x[2] for x in losses) == ntok and sum(x[1]["response_tokens"] for x in losses) == int((batch["labels"] != IGNORE).sum())
        for a, b in zip(g_parts, g_whole):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_validation_loss_is_the_mean_over_all_response_tokens_whatever_the_batch_size(tok):
    """evaluate_loss sorts and regroups the examples: the result is still the per-token mean of every example
    scored alone, with the count of their labelled tokens."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(tok.vocab_size, init_std=0.3)).eval()
    examples = _examples(tok)
    with torch.no_grad():
        alone = [batch_nll(model, pad_batch([ex], tok.special.pad))[0] for ex in examples]
    n_labels = sum(sum(t != IGNORE for t in y) for _, y in examples)
    expected = float(sum(a.sum() for a in alone)) / n_labels
    for batch_size in (1, 2, 3, len(examples)):
        loss, count = evaluate_loss(model, examples, batch_size, tok.special.pad)
        assert count == n_labels
        assert loss == pytest.approx(expected, rel=1e-5)


def test_batches_are_epoch_permutations_and_a_function_of_the_step(tok):
    examples = _examples(tok, 10)
    b = SFTBatches(examples, batch_size=2, pad_id=tok.special.pad, seed=3, grad_accum=1)
    stream = [u[0] for p in range(30) for u in [b.unit(p)]]
    for e in range(3):
        assert sorted(stream[10 * e:10 * e + 10]) == list(range(10))
    assert stream[:10] != stream[10:20]  # reshuffled each epoch
    fresh = SFTBatches(examples, batch_size=2, pad_id=tok.special.pad, seed=3)
    for step in (13, 2, 7):  # any order, any object: the same batch (what exact resume needs)
        assert torch.equal(fresh.micro_batch(step)["input_ids"], b.micro_batch(step)["input_ids"])
    four = SFTBatches(examples, batch_size=2, pad_id=tok.special.pad, seed=3, grad_accum=4)
    units = [tuple(four.unit(p)) for m in range(4) for p in four._unit_positions(1, m)]
    assert sorted(u[0] for u in units) == sorted(stream[8:16])  # step 1 = stream positions 8..15, no overlap


@pytest.mark.parametrize("pack", [False, True])
def test_batch_width_is_bucketed_but_never_beyond_capacity(tok, pack):
    examples = _examples(tok, 10)
    plain = SFTBatches(examples, batch_size=3, pad_id=tok.special.pad, seed=0, pack=pack, capacity=48)
    bucketed = SFTBatches(examples, batch_size=3, pad_id=tok.special.pad, seed=0, pack=pack, capacity=48, pad_multiple=32)
    for step in range(4):
        a, b = plain.micro_batch(step), bucketed.micro_batch(step)
        T = a["input_ids"].shape[1]
        assert b["input_ids"].shape[1] == min(48, -(-T // 32) * 32)
        for k in a:
            if torch.is_tensor(a[k]):
                assert torch.equal(b[k][:, :T], a[k]) and not b["attention_mask"][:, T:].any()
                assert (b["labels"][:, T:] == IGNORE).all()


def test_gradient_accumulation_gives_the_step_mean_over_response_tokens(tok):
    torch.manual_seed(0)
    model = Transformer(tiny_config(tok.vocab_size, init_std=0.3))
    examples = _examples(tok, 8)
    accum = SFTBatches(examples, batch_size=2, pad_id=tok.special.pad, seed=1, grad_accum=2)
    whole = SFTBatches(examples, batch_size=4, pad_id=tok.special.pad, seed=1, grad_accum=1)
    step = 1
    loss_a = [sft_loss(model, accum.micro_batch(step, m))[0] / 2 for m in range(2)]
    grads_a = torch.autograd.grad(sum(loss_a), list(model.parameters()))
    loss_w = sft_loss(model, whole.micro_batch(step))[0]
    grads_w = torch.autograd.grad(loss_w, list(model.parameters()))
    # Hand computation: summed NLL of the four records / their response tokens.
    records = [accum.unit(p)[0] for p in range(4, 8)]
    with torch.no_grad():
        nll = sum(float(batch_nll(model, pad_batch([examples[i]], tok.special.pad)).sum()) for i in records)
    n = sum(sum(t != IGNORE for t in examples[i][1]) for i in records)
    assert float(sum(loss_a).detach()) == pytest.approx(nll / n, rel=1e-5) and float(loss_w.detach()) == pytest.approx(nll / n, rel=1e-5)
    for ga, gw in zip(grads_a, grads_w):
        torch.testing.assert_close(ga, gw, atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------------------------------- the recipe


def _cfg(tmp_path, init, data, *overrides):
    return load_config(SFTConfig, None, [f"init={init}", f"data={data}", f"out={tmp_path / 'out'}", "batch_size=4",
                                         "optim.max_steps=6", "optim.warmup_steps=2", "eval_every=3", "n_samples=2",
                                         "sample_max_new_tokens=4", "log_every=1", *overrides])


def _small_data(tmp_path, n=12):
    return _write_jsonl(tmp_path / "train.jsonl", [{"instruction": f"say {w}", "output": w}
                                                  for w in ["fox", "dog", "red", "apple"] * (n // 4)])


def test_config_and_input_errors_before_any_output(tmp_path, tok):
    init, data = _init_checkpoint(tmp_path / "init", tok), _small_data(tmp_path)
    with pytest.raises(LmforgeError, match="'max_seq_len': 65 exceeds the model's context 64"):
        run_sft(_cfg(tmp_path, init, data, "max_seq_len=65"))
    long = _write_jsonl(tmp_path / "long.jsonl", [{"instruction": "x", "output": "fox " * 100}])
    with pytest.raises(LmforgeError, match="all 1 training records were dropped"):
        run_sft(_cfg(tmp_path, init, long, "val_fraction=0"))
    with pytest.raises(LmforgeError, match="unknown config key 'lora.rnak'"):
        _cfg(tmp_path, init, data, "lora.rnak=4")
    assert not (tmp_path / "out").exists()
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": "b"}, {"Instruction": "c"}])
    rc = main(["sft", "--config", "configs/sft_tiny.yaml", f"init={init}", f"data={bad}", f"out={tmp_path / 'out'}"])
    assert rc == 1 and not (tmp_path / "out").exists()


def test_cli_run_skip_invalid_and_output_checkpoint(tmp_path, tok, capsys):
    init = _init_checkpoint(tmp_path / "init", tok)
    recs = [{"instruction": f"say {w}", "output": w} for w in ["fox", "dog", "red", "apple"] * 3]
    recs[3:3] = ["{broken", {"messages": [{"role": "user", "content": "no answer"}]}]
    recs.append({"instruction": "too long", "output": "fox " * 100})
    data = _write_jsonl(tmp_path / "train.jsonl", recs)
    out = tmp_path / "out"
    args = ["sft", "--config", "configs/sft_tiny.yaml", f"init={init}", f"data={data}", f"out={out}", "batch_size=4",
            "optim.max_steps=4", "eval_every=2", "n_samples=2", "sample_max_new_tokens=4", "val_fraction=0.2"]
    assert main(args) == 1  # invalid records stop the run by default
    assert main(args + ["--skip-invalid"]) == 0
    printed = capsys.readouterr().out
    assert "(1 dropped as too long, 2 invalid skipped)" in printed
    n_train, n_val = map(int, printed.split("sft: ")[1].split(" val records")[0].split(" train / "))
    assert n_train + n_val == 12 and n_val >= 2  # 13 valid records, the 100-token answer dropped
    model, tok2, meta = load_model(out)
    assert meta["stage"] == "sft" and meta["n_train"] == n_train and tok2.fingerprint() == tok.fingerprint()
    samples = [json.loads(s) for s in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 0, 2, 2, 4, 4] and all(s["prompt"].endswith("<|assistant|>") for s in samples)
    metrics = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert "val_loss" in metrics[0] and metrics[-1]["step"] == 4 and "val_ppl" in metrics[-1]
    assert main(args + ["--skip-invalid"]) == 1  # `out` holds a run: refuse to overwrite it silently
    assert main(["generate", "--model", str(out), "--prompt", "say fox", "--max-new-tokens", "3"]) == 0


def test_resume_reproduces_the_uninterrupted_run(tmp_path, tok):
    """Packed rows, LoRA adapters with dropout (RNG state) and the optimizer all continue exactly."""
    init, data = _init_checkpoint(tmp_path / "init", tok), _small_data(tmp_path, 16)
    common = ["optim.lr=0.01", "val_fraction=0.25", "save_every=2", "pack=true", "lora.rank=2", "lora.dropout=0.1",
              "device=cpu"]  # bit-exact on CPU; GPU kernels may reduce in a different order
    full = run_sft(_cfg(tmp_path / "a", init, data, *common), progress=False)
    run_sft(_cfg(tmp_path / "b", init, data, *common, "stop_step=3"), progress=False)
    resumed = run_sft(_cfg(tmp_path / "b", init, data, *common), resume=True, progress=False)
    assert resumed["steps"] == full["steps"] == 6 and resumed["val_loss"] == pytest.approx(full["val_loss"], abs=1e-6)
    a, b = load_model(tmp_path / "a" / "out")[0].state_dict(), load_model(tmp_path / "b" / "out")[0].state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("pack", ["false", "true"])
def test_a_busy_cpu_runs_the_batches_in_lanes_with_the_same_training(tmp_path, tok, pack, request):
    """On 2 CPUs with one busy, each batch runs as 2 single-threaded parts (sft_loss is a sum: weight 1 each)."""
    init, data = _init_checkpoint(tmp_path / "init", tok), _small_data(tmp_path, 16)
    runs = {}
    for busy in (False, True):
        if busy:
            request.getfixturevalue("busy_cpu")
        result = run_sft(_cfg(tmp_path / str(busy), init, data, f"pack={pack}", "device=cpu"), progress=False)
        rows = [json.loads(s) for s in (tmp_path / str(busy) / "out" / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "loss" in r]
        assert len(rows) == 6 and all(("cpu_lanes" in r) == busy for r in rows)
        runs[busy] = [r["loss"] for r in rows] + [r["response_tokens"] for r in rows] + [result["val_loss"]]
    assert runs[True] == pytest.approx(runs[False], rel=1e-5)


def test_sft_learns_held_out_instances_of_small_tasks(tmp_path, tok):
    """A tiny model trained from scratch answers unseen prompts of copy / uppercase / reverse tasks exactly."""
    def record(task, word):
        out = {"copy": word, "upper": [c.upper() for c in word], "reverse": word[::-1]}[task]
        return {"instruction": task, "input": " ".join(word), "output": " ".join(out)}

    combos = [(t, w) for t in ("copy", "upper", "reverse") for n in (2, 3) for w in itertools.product("abcdefghijkl", repeat=n)]
    random.Random(0).shuffle(combos)
    held_out, train = [record(*c) for c in combos[:60]], [record(*c) for c in combos[60:1560]]
    init = _init_checkpoint(tmp_path / "init", tok, hidden_size=96)
    data = _write_jsonl(tmp_path / "train.jsonl", train)
    summary = run_sft(load_config(SFTConfig, None, [
        f"init={init}", f"data={data}", f"out={tmp_path / 'out'}", "batch_size=16", "optim.max_steps=300",
        "optim.lr=2e-3", "optim.warmup_steps=10", "eval_every=0", "n_samples=0", "val_fraction=0"]), progress=False)
    prompts = [render_prompt(tok, record_to_messages({"instruction": r["instruction"], "input": r["input"]},
                                                     require_response=False)) for r in held_out]

    def exact(path):
        model = load_model(path)[0]
        return sum(a == r["output"] for a, r in zip(answer(model, tok, prompts, 12), held_out)) / len(held_out)

    before, after = exact(init), exact(tmp_path / "out")
    assert summary["n_train"] == 1500 and summary["steps"] == 300
    # Seed 0 reaches ~0.98; over other seeds the worst seen was 0.62, so 0.5 is a robust "far more often".
    assert before == 0.0 and after >= 0.5, (before, after)
