"""Reward model: K-way pairs with ties, the score token under any padding, losses against hand computations,
learning a synthetic preference rule (decoder and encoder), regression, normalisation, scoring, bad input."""

import dataclasses
import json
import math
import random
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import load_model, load_training_state, read_config, save_checkpoint
from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.generation import left_pad
from lmforge.lora import LoraConfig, apply_lora, load_trainable_state_dict
from lmforge.model import Transformer
from lmforge.preferences import Example, comparison_pairs, kendall_tau, parse_record, split_by_prompt
from lmforge.records import read_records
from lmforge.scoring import RewardScorer, pool_scores, raw_scores, render_example
from lmforge.stages.rm import RMConfig, labels_of, reward_loss, run_rm
from lmforge.training import OptimConfig, read_metrics
from tests.conftest import tiny_config

FILL = ["fox", "dog", "quick", "lazy", "brown", "red", "jumps"]


def _response(rng, apples: int, n: int = 5) -> str:
    """n words of which `apples` are "apple": the synthetic rule is "more apples is better"."""
    words = ["apple"] * apples + [rng.choice(FILL) for _ in range(n - apples)]
    rng.shuffle(words)
    return " ".join(words)


def _ranked(n: int, seed: int = 0, k: int = 3) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        counts = rng.sample(range(4), k)
        order = sorted(counts, reverse=True)
        out.append({"input": f"{rng.choice(FILL)} {rng.choice(FILL)} {i}",
                    "choices": [{"text": _response(rng, c), "rank": order.index(c) + 1} for c in counts]})
    return out


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def _init(path, tok, causal=True) -> str:
    torch.manual_seed(0)
    meta = {"stage": "sft"} if causal else {"stage": "pretrain", "objective": "mlm"}
    save_checkpoint(path, Transformer(tiny_config(tok.vocab_size, causal=causal)), tok, meta=meta)
    return str(path)


def _cfg(init, data, out, **kw) -> RMConfig:
    base = dict(init=str(init), data=str(data), out=str(out), val_fraction=0.25, batch_size=8,
                device="cpu", optim=OptimConfig(lr=3e-3, warmup_steps=3, weight_decay=0.0))
    base.update(kw)
    return RMConfig(**base)


@pytest.fixture(scope="module")
def decoder_run(tok, tmp_path_factory):
    """One tiny decoder RM trained for one epoch on K=3 ranked data, with SFT-format reference demonstrations."""
    d = tmp_path_factory.mktemp("rm_decoder")
    records = _ranked(96)
    refs = [{"instruction": r["input"], "output": _response(random.Random(i), i % 3)} for i, r in enumerate(records[:40])]
    cfg = _cfg(_init(d / "sft", tok), _write(d / "ranked.jsonl", records), d / "rm",
               reference_data=_write(d / "sft.jsonl", refs), eval_every=4)
    return cfg, run_rm(cfg), refs


# ------------------------------------------------------------------------------------------- pairs and losses


def test_comparison_pairs_with_ties_hand_computed():
    # ranks of choices 0..3: 2, 1, 2, 3 -> choice 1 beats all, 0 and 2 tie (no pair), 3 loses to all
    assert comparison_pairs([2, 1, 2, 3]) == [(1, 0), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert comparison_pairs([1, 2, 3, 4]) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]  # C(4,2) = 6
    assert comparison_pairs([3, 3]) == []


def test_labels_lay_out_every_prompts_pairs_in_one_batch():
    exs = [Example([], ["a", "b", "c"], ranks=[2, 1, 3]), Example([], ["d", "e"], ranks=[1, 2])]
    labels = labels_of(exs)
    assert labels["pairs"].tolist() == [[1, 0], [0, 2], [1, 2], [3, 4]]
    assert labels["pair_group"].tolist() == [0, 0, 0, 1] and labels["n_groups"] == 2


def _softplus(x):
    return math.log1p(math.exp(x))


def test_kway_loss_is_mean_over_prompts_of_mean_pairwise_loss():
    r = torch.tensor([0.5, -1.0, 2.0, 0.3, 0.1])
    labels = labels_of([Example([], ["a", "b", "c"], ranks=[2, 1, 3]), Example([], ["d", "e"], ranks=[1, 2])])
    # pairs (better, worse): (1,0) d=-1.5, (0,2) d=-1.5, (1,2) d=-3.0 | (3,4) d=0.2; -log sigmoid(d) = log(1 + e^-d)
    group0 = (_softplus(1.5) + _softplus(1.5) + _softplus(3.0)) / 3
    expected = (group0 + _softplus(-0.2)) / 2
    assert reward_loss(r, labels).item() == pytest.approx(expected, rel=1e-6)
    m = 0.5  # margin shifts every difference
    expected_m = ((_softplus(2.0) * 2 + _softplus(3.5)) / 3 + _softplus(0.3)) / 2
    assert reward_loss(r, labels, margin=m).item() == pytest.approx(expected_m, rel=1e-6)
    hinge = ((2.5 + 2.5 + 4.0) / 3 + 0.8) / 2  # max(0, 1 - d)
    assert reward_loss(r, labels, loss="hinge", margin=1.0).item() == pytest.approx(hinge, rel=1e-6)
    centred = expected + 0.01 * (0.25 + 1 + 4 + 0.09 + 0.01) / 5
    assert reward_loss(r, labels, center_coef=0.01).item() == pytest.approx(centred, rel=1e-6)


def test_mse_loss_uses_standardised_targets():
    labels = labels_of([Example([], ["a"], score=4.0), Example([], ["b"], score=2.0)])
    r = torch.tensor([1.0, 0.0])
    # targets (4 - 3) / 1 = 1 and (2 - 3) / 1 = -1 -> errors 0 and 1
    assert reward_loss(r, labels, loss="mse", target_mean=3.0, target_std=1.0).item() == pytest.approx(0.5)


def test_kendall_tau_b_hand_values():
    assert kendall_tau([3, 1, 2], [3, 2, 1]) == pytest.approx(1 / 3)  # +1 +1 -1 over 3 pairs
    assert kendall_tau([1, 2, 3], [1, 1, 2]) == pytest.approx(2 / math.sqrt(3 * 2))  # one pair tied in y
    assert kendall_tau([1, 2], [2, 1]) == -1.0
    assert math.isnan(kendall_tau([1, 1], [1, 2]))


# ------------------------------------------------------------------------------------------- the score token


def test_pool_scores_hand_indices_left_and_right_padding():
    values = torch.arange(15, dtype=torch.float32).view(3, 5)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert pool_scores(values, right, "last").tolist() == [2.0, 9.0, 10.0]  # indices 2, 4, 0
    assert pool_scores(values, left, "last").tolist() == [4.0, 9.0, 14.0]   # indices 4, 4, 4
    assert pool_scores(values, left, "first").tolist() == [2.0, 5.0, 14.0]  # indices 2, 0, 4
    assert pool_scores(values, right, "mean").tolist() == [1.0, 7.0, 10.0]


def test_score_at_last_real_token_for_left_and_right_padded_mixed_lengths(tok):
    torch.manual_seed(0)
    model = Transformer(tiny_config(), head="scalar").eval()
    seqs = [[1, 5, 9, 33, 40, 41, 6], [1, 7, 6], [1, 8, 12, 13, 6]]
    alone = torch.stack([model(torch.tensor([s]))[0, -1] for s in seqs])
    left_ids, left_mask = left_pad(seqs, pad_id=0)
    right_ids = torch.zeros_like(left_ids)
    right_mask = torch.zeros_like(left_mask)
    for i, s in enumerate(seqs):
        right_ids[i, :len(s)], right_mask[i, :len(s)] = torch.tensor(s), 1
    for ids, mask in ((left_ids, left_mask), (right_ids, right_mask)):
        assert torch.allclose(raw_scores(model, ids, mask), alone, atol=1e-5)
    per_position = model(right_ids, attention_mask=right_mask)
    assert torch.allclose(raw_scores(model, right_ids, right_mask), per_position[[0, 1, 2], [6, 2, 4]], atol=1e-6)
    rm = RewardScorer(model, tok, {"stage": "rm", "reward_mean": 0.5, "reward_std": 2.0})
    assert torch.allclose(rm.score_ids(left_ids, left_mask), (alone - 0.5) / 2.0, atol=1e-5)
    assert torch.allclose(rm.score_ids(right_ids, right_mask), (alone - 0.5) / 2.0, atol=1e-5)


def test_packed_scores_equal_pooling_over_the_padded_batch():
    """raw_scores runs the model on packed rows: the same scores as pool_scores over the padded batch."""
    seqs = [[1, 5, 9, 33, 40, 41, 6], [1, 7, 6], [1, 8, 12, 13, 6], [2], [3, 4, 5, 6, 7, 8, 9, 10, 11]]
    ids, mask = left_pad(seqs, pad_id=0)
    for is_causal in (True, False):
        torch.manual_seed(0)
        model = Transformer(dataclasses.replace(tiny_config(), is_causal=is_causal), head="scalar").double().eval()
        per_position = model(ids, attention_mask=mask)
        for pooling in ("last", "first", "mean"):
            expected = pool_scores(per_position, mask, pooling)
            assert torch.allclose(raw_scores(model, ids, mask, pooling).double(), expected, atol=1e-10), pooling


def test_rendering_is_the_chat_template_ending_with_end_or_the_encoder_pair(tok):
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    ids = render_example(tok, prompt, "Paris.")
    sp = tok.special
    assert ids == [sp.bos, sp.user] + tok.encode(prompt[0]["content"]) + [sp.end, sp.assistant] + tok.encode("Paris.") + [sp.end]
    enc = render_example(tok, prompt, "Paris.", encoder=True)
    assert enc == [sp.bos] + tok.encode(prompt[0]["content"]) + [sp.sep] + tok.encode("Paris.") + [sp.eos]


# ------------------------------------------------------------------------------------------- data


def test_read_records_json_array_names_element_lines(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n  {"input": "a", "chosen": "x", "rejected": "y"},\n\n  {"input": "b",\n   "chosen": "z", '
                    '"rejected": "w"}\n]\n', encoding="utf-8")
    assert [(line, rec["input"]) for line, rec in read_records(path)] == [(2, "a"), (4, "b")]


def test_parse_formats():
    assert parse_record({"prompt": "p", "chosen": "a", "rejected": "b"}).ranks == [1, 2]
    scored = parse_record({"input": "p", "output": "o", "score": 4.5})
    assert scored.kind == "scored" and scored.score == 4.5 and scored.prompt == [{"role": "user", "content": "p"}]
    sft = parse_record({"Instruction": "say hi", "Input": "", "Output": "hi"}, require_labels=False)
    assert sft.kind == "unlabelled" and sft.responses == ["hi"]
    unranked = parse_record({"input": "p", "choices": [{"text": "a"}, {"text": "b"}]}, require_labels=False)
    assert unranked.ranks is None and unranked.responses == ["a", "b"]


def test_ranked_chat_records_train_on_the_rendering_ppo_samples_from(tok, tmp_path):
    """`lmforge label` writes chat prompts as {"input", "messages", "choices"}: the reader takes the whole
    conversation (the system turn too), so every rendered response starts with exactly the prompt ids PPO
    renders for that prompt file record (before: read as an SFT demonstration and rejected)."""
    from lmforge.chat import render_prompt
    from lmforge.preferences import load_data

    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say fox"},
            {"role": "assistant", "content": "fox"}, {"role": "user", "content": "again"}]
    rec = {"input": "again", "messages": msgs, "choices": [{"text": "fox", "rank": 1}, {"text": "dog dog", "rank": 2}]}
    path = _write(tmp_path / "ranked.jsonl", [rec, {**rec, "input": "once more"}])
    examples, skipped = load_data(path, tok, encoder=False, max_len=128)
    assert skipped == 0 and examples[0].prompt == msgs and examples[0].ranks == [1, 2]
    prompt_ids = render_prompt(tok, msgs)
    for ids, text in zip(examples[0].ids, ["fox", "dog dog"]):
        assert ids == prompt_ids + tok.encode(text) + [tok.special.end]
    with pytest.raises(LmforgeError, match=r"bad.jsonl:1: .*must end with a user turn"):
        load_data(_write(tmp_path / "bad.jsonl", [{**rec, "messages": msgs[:3]}]), tok, encoder=False, max_len=128)


def test_alpaca_style_labelled_records_keep_their_instruction():
    rec = {"instruction": "Translate into Chinese", "input": "red apple", "chosen": "红苹果", "rejected": "苹果"}
    assert parse_record(rec).prompt == [{"role": "user", "content": "Translate into Chinese\nred apple"}]
    scored = parse_record({"Instruction": "Say hi", "output": "hi", "score": 3})
    assert scored.prompt == [{"role": "user", "content": "Say hi"}] and scored.score == 3.0


def test_split_by_prompt_keeps_each_prompt_on_one_side():
    exs = [Example([{"role": "user", "content": f"p{i % 10}"}], ["a", "b"], ranks=[1, 2]) for i in range(40)]
    train, val = split_by_prompt(exs, 0.3, seed=0)
    val_prompts = {e.prompt[0]["content"] for e in val}
    assert len(val_prompts) == 3 and len(val) == 12 and len(train) == 28
    assert not val_prompts & {e.prompt[0]["content"] for e in train}


# ------------------------------------------------------------------------------------------- training


def test_decoder_learns_ranked_rule_and_checkpoint_meta(decoder_run):
    cfg, summary, _ = decoder_run
    assert summary["heldout_accuracy"] >= 0.9
    assert summary["kendall_tau"] >= 0.8 and summary["mean_margin"] > 0
    assert summary["val_examples"] == 24 and summary["train_examples"] == 72 and summary["steps"] == 9  # 72 / 8
    meta = read_config(cfg.out)["lmforge"]
    assert meta["stage"] == "rm" and meta["backbone"] == "decoder" and meta["pooling"] == "last"
    assert meta["reward_mean"] == summary["reward_mean"] and meta["reward_std"] == 1.0
    assert len(meta["tokenizer_fingerprint"]) == 16
    logged = read_metrics(cfg.out)
    assert any("val_accuracy" in rec for rec in logged) and logged[-1]["heldout_accuracy"] == summary["heldout_accuracy"]


def test_normalisation_makes_reference_responses_score_mean_zero(decoder_run):
    cfg, summary, refs = decoder_run
    rm = RewardScorer.load(cfg.out)
    rewards = rm.score([r["instruction"] for r in refs], [r["output"] for r in refs], batch_size=7)
    assert abs(sum(rewards) / len(rewards)) < 1e-4
    assert abs(summary["reward_mean"]) > 0.1  # the shift was real, not a no-op


def test_score_cli_adds_normalised_rewards(decoder_run, tmp_path, capsys):
    cfg, _, refs = decoder_run
    sft = _write(tmp_path / "refs.jsonl", refs)
    out = tmp_path / "scored.jsonl"
    assert main(["rm", "score", "--model", cfg.out, "--input", sft, "--out", str(out), "device=cpu"]) == 0
    rewards = [json.loads(line)["reward"] for line in out.read_text().splitlines()]
    assert len(rewards) == len(refs) and abs(sum(rewards) / len(rewards)) < 1e-4
    ranked = _write(tmp_path / "ranked.jsonl", _ranked(3, seed=9))
    assert main(["rm", "score", "--model", cfg.out, "--input", ranked, "device=cpu"]) == 0
    captured = capsys.readouterr()
    recs = [json.loads(line) for line in captured.out.splitlines()]
    assert len(recs) == 3 and all("reward" in c for r in recs for c in r["choices"])
    assert "accuracy" in captured.err
    rm = RewardScorer.load(cfg.out)
    expected = rm.score([recs[0]["input"]] * 3, [c["text"] for c in recs[0]["choices"]])
    assert [c["reward"] for c in recs[0]["choices"]] == pytest.approx(expected, abs=1e-5)


def test_pairwise_data_with_unit_std_normalisation(tok, tmp_path):
    rng = random.Random(1)
    records = [{"prompt": f"{rng.choice(FILL)} {i}", "chosen": _response(rng, 2), "rejected": _response(rng, 0)} for i in range(64)]
    cfg = _cfg(_init(tmp_path / "sft", tok), _write(tmp_path / "pairs.jsonl", records[:48]), tmp_path / "rm",
               val_data=_write(tmp_path / "val.jsonl", records[48:]), normalize="mean_std", epochs=1.0)
    summary = run_rm(cfg)
    assert summary["train_examples"] == 48 and summary["val_examples"] == 16 and summary["reward_std"] != 1.0
    # no reference_data: the chosen responses of the training data score mean 0 and std 1
    rewards = torch.tensor(RewardScorer.load(cfg.out).score([r["prompt"] for r in records[:48]],
                                                                 [r["chosen"] for r in records[:48]]))
    assert abs(rewards.mean().item()) < 1e-4 and rewards.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)


def test_reference_limit_centres_on_a_fixed_sample(tok, tmp_path):
    from lmforge.stages.rm import load_rm_data

    rng = random.Random(2)
    records = [{"prompt": f"{rng.choice(FILL)} {i}", "chosen": _response(rng, 2), "rejected": _response(rng, 0)}
               for i in range(20)]
    data = _write(tmp_path / "pairs.jsonl", records)
    init = _init(tmp_path / "sft", tok)
    every = load_rm_data(_cfg(init, data, tmp_path / "rm", val_fraction=0.0))
    some = load_rm_data(_cfg(init, data, tmp_path / "rm", val_fraction=0.0, reference_limit=5))
    assert len(every.references) == 20 and len(some.references) == 5
    assert all(r in every.references for r in some.references)  # a subset, the same one every time
    assert some.references == load_rm_data(_cfg(init, data, tmp_path / "rm", val_fraction=0.0,
                                                 reference_limit=5)).references


def test_regression_recovers_scores(tok, tmp_path):
    rng = random.Random(2)
    records = []
    for i in range(128):
        apples = rng.randrange(5)
        records.append({"input": f"{rng.choice(FILL)} {i}", "output": _response(rng, apples, 6), "score": 1.0 + 0.5 * apples})
    cfg = _cfg(_init(tmp_path / "sft", tok), _write(tmp_path / "scored.jsonl", records), tmp_path / "rm", epochs=2.0)
    summary = run_rm(cfg)
    assert summary["pearson"] >= 0.9
    assert summary["mse"] < 0.1  # in score units, a fifth of the scores' variance (0.5^2 * var(0..4) = 0.5)
    meta = read_config(cfg.out)["lmforge"]
    assert meta["loss"] == "mse" and meta["target_std"] > 0


def test_encoder_backbone_trains_from_mlm_checkpoint(tok, tmp_path):
    cfg = _cfg(_init(tmp_path / "mlm", tok, causal=False), _write(tmp_path / "ranked.jsonl", _ranked(96, seed=3)),
               tmp_path / "rm", epochs=2.0)
    summary = run_rm(cfg)
    assert summary["heldout_accuracy"] >= 0.8
    rm = RewardScorer.load(cfg.out)
    assert rm.meta["backbone"] == "encoder" and rm.meta["pooling"] == "first"
    with pytest.raises(LmforgeError, match="decoder"):
        rm.score_ids(torch.tensor([[1, 2]]), torch.tensor([[1, 1]]))


def test_cli_trains_with_the_tiny_yaml(tok, tmp_path, capsys):
    init = _init(tmp_path / "sft", tok)
    data = _write(tmp_path / "ranked.jsonl", _ranked(48, seed=4))
    out = tmp_path / "rm"
    yaml = Path(__file__).resolve().parents[2] / "configs" / "rm_tiny.yaml"
    assert main(["rm", "--config", str(yaml), f"init={init}", f"data={data}", f"out={out}", "device=cpu"]) == 0
    assert "reward model: heldout_accuracy" in capsys.readouterr().out
    assert read_config(out)["lmforge"]["stage"] == "rm"


# ------------------------------------------------------------------------------------------- LoRA and resume


def test_lora_trains_adapters_and_score_head_only_and_saves_a_merged_model(tok, tmp_path):
    init = _init(tmp_path / "sft", tok)
    lora = LoraConfig(rank=2, alpha=4.0, targets=["q_proj", "v_proj"])
    cfg = _cfg(init, _write(tmp_path / "ranked.jsonl", _ranked(48, seed=6)), tmp_path / "rm", lora=lora, stop_step=3,
               gradient_checkpointing=True)
    assert run_rm(cfg)["stopped_at"] == 3  # 36 training prompts / 8 = 5 steps; the checkpoint at 3 resumes
    state = load_training_state(cfg.out)
    adapters = {f"model.layers.{i}.self_attn.{n}.lora_{m}" for i in range(2) for n in ("q_proj", "v_proj")
                for m in "AB"}
    assert set(state["trainable"]) == adapters | {"score.weight"}
    assert sum(len(g["params"]) for g in state["optimizer"]["param_groups"]) == len(adapters) + 1
    torch.manual_seed(cfg.seed)  # what run_rm built: the SFT backbone with a fresh score head
    fresh = load_model(init, head="scalar")[0]
    assert not torch.equal(state["trainable"]["score.weight"], fresh.score.weight)  # the new head trained
    # The checkpoint is a plain model: only the adapted layers moved, by exactly the merged update.
    plain, _, meta = load_model(cfg.out)
    assert meta["lora_rank"] == 2 and plain.head == "scalar"
    assert not any("lora" in k or ".base." in k for k in plain.state_dict())
    before, after = fresh.state_dict(), plain.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    adapted = {f"model.layers.{i}.self_attn.{n}.weight" for i in range(2) for n in ("q_proj", "v_proj")}
    assert changed == adapted | {"score.weight"}
    apply_lora(fresh, lora, keep_trainable=("score.",))  # the in-training model, rebuilt from the training state
    load_trainable_state_dict(fresh, state["trainable"])
    ids, mask = left_pad([[1, 5, 9, 33, 40, 6], [1, 7, 6]], pad_id=0)
    with torch.no_grad():
        torch.testing.assert_close(raw_scores(plain.eval(), ids, mask), raw_scores(fresh.eval(), ids, mask),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rank", [0, 2])
def test_resume_reproduces_the_uninterrupted_run(tok, tmp_path, rank):
    init = _init(tmp_path / "sft", tok)
    data = _write(tmp_path / "ranked.jsonl", _ranked(48, seed=7))
    kw = {"lora": LoraConfig(rank=rank, targets=["all-linear"]), "epochs": 2.0, "save_every": 2, "log_every": 1}
    full = run_rm(_cfg(init, data, tmp_path / "full", **kw))
    assert run_rm(_cfg(init, data, tmp_path / "half", stop_step=3, **kw))["stopped_at"] == 3
    with pytest.raises(LmforgeError, match="cannot resume: config key 'lora.rank' differs"):
        run_rm(_cfg(init, data, tmp_path / "half", **{**kw, "lora": LoraConfig(rank=rank + 1)}), resume=True)
    resumed = run_rm(_cfg(init, data, tmp_path / "half", **kw), resume=True)
    assert full["steps"] == resumed["steps"] == 9
    assert {k: v for k, v in full.items() if k != "seconds"} == {k: v for k, v in resumed.items() if k != "seconds"}
    losses = lambda d: [(r["step"], r["loss"]) for r in read_metrics(d) if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "full") == losses(tmp_path / "half") and len(losses(tmp_path / "full")) == 9
    a, b = load_model(tmp_path / "full")[0].state_dict(), load_model(tmp_path / "half")[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_config(tmp_path / "half")["lmforge"]["lora_rank"] == rank


def test_lora_config_errors_name_the_key(tok, tmp_path):
    init, data = _init(tmp_path / "sft", tok), _write(tmp_path / "r.jsonl", _ranked(8))
    with pytest.raises(LmforgeError, match="config key 'lora.dropout' must be 0"):
        run_rm(_cfg(init, data, tmp_path / "rm", lora=LoraConfig(rank=2, dropout=0.1)))
    with pytest.raises(LmforgeError, match="config key 'lora.targets' names an unknown layer 'qkv'"):
        run_rm(_cfg(init, data, tmp_path / "rm", lora=LoraConfig(rank=2, targets=["qkv"])))
    assert not (tmp_path / "rm").exists()


# ------------------------------------------------------------------------------------------- bad input

GOOD = [{"input": "q", "choices": [{"text": "a", "rank": 1}, {"text": "b", "rank": 2}]},
        {"input": "r", "chosen": "x", "rejected": "y"}]


@pytest.mark.parametrize("bad, reason", [
    ('{"input": "q", "choices": [{"text": "a", "rank": 1}]}', "at least 2 candidates"),
    ('{"input": "q", "choices": [{"text": "a", "rank": 1}, {"text": "b"}]}', "choices[1]: missing 'rank'"),
    ('{"input": "q", "choices": [{"text": "a", "rank": 1}, {"text": "b", "rank": "2"}]}', "'rank' must be a positive integer"),
    ('{"input": "q", "choices": [{"text": "a", "rank": 1}, {"text": "b", "rank": 1.5}]}', "'rank' must be a positive integer"),
    ('{"input": "q", "choices": [{"text": "", "rank": 1}, {"text": "b", "rank": 2}]}', "empty 'choices[0].text'"),
    ('{"input": "q", "chosen": "  ", "rejected": "b"}', "empty 'chosen'"),
    ('{"input": "q", "output": "o", "score": NaN}', "finite number"),
    ('{"input": "q", "output": "o", "score": "high"}', "finite number"),
    ('{"input": "", "chosen": "a", "rejected": "b"}', "empty 'input'"),
    ('{"input": "q", "choices": [', "invalid JSON"),
    ('["not", "an", "object"]', "JSON object"),
    ('{"text": "pretraining?"}', "expected a ranked"),
    ('{"instruction": "q", "output": "o"}', "no label"),
    ('{"input": "q", "chosen": "' + "apple " * 80 + '", "rejected": "b"}', "more than the model's context of 64"),
])
def test_bad_records_name_file_and_line_before_any_output(tok, tmp_path, bad, reason):
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GOOD) + bad + "\n", encoding="utf-8")
    cfg = _cfg(_init(tmp_path / "sft", tok), data, tmp_path / "rm")
    with pytest.raises(LmforgeError) as err:
        run_rm(cfg)
    assert str(err.value).startswith(f"{data}:3: ") and reason in str(err.value)
    assert not (tmp_path / "rm").exists()


def test_mixed_kinds_missing_files_and_cli_one_line_error(tok, tmp_path, capsys):
    init = _init(tmp_path / "sft", tok)
    mixed = _write(tmp_path / "mixed.jsonl", GOOD + [{"input": "q", "output": "o", "score": 1}])
    with pytest.raises(LmforgeError, match=r"mixed.jsonl:3: a scored record among preference records"):
        run_rm(_cfg(init, mixed, tmp_path / "rm"))
    with pytest.raises(LmforgeError, match="missing.jsonl: file not found"):
        run_rm(_cfg(init, tmp_path / "missing.jsonl", tmp_path / "rm"))
    with pytest.raises(LmforgeError, match="not a checkpoint"):
        run_rm(_cfg(tmp_path / "nope", mixed, tmp_path / "rm"))
    bad_array = tmp_path / "bad.json"
    bad_array.write_text('[\n {"input": "q", "chosen": "a", "rejected": "b"},\n {"input": }\n]', encoding="utf-8")
    assert main(["rm", f"init={init}", f"data={bad_array}", f"out={tmp_path / 'rm'}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lmforge rm: error: {bad_array}:3: invalid JSON") and "\n" not in err
    assert main(["rm", f"init={init}", f"data={mixed}", "loss=hinge"]) == 1
    assert "config key 'margin' must be > 0 with loss=hinge" in capsys.readouterr().err
    assert not (tmp_path / "rm").exists()


def test_skip_invalid_skips_and_counts(tok, tmp_path):
    lines = [json.dumps(r) for r in _ranked(40, seed=5)]
    lines[3] = '{"input": "q", "choices": ['
    lines[7] = json.dumps({"input": "q", "choices": [{"text": "a", "rank": 1}]})
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = run_rm(_cfg(_init(tmp_path / "sft", tok), data, tmp_path / "rm", skip_invalid=True, epochs=1.0))
    assert summary["skipped"] == 2 and summary["train_examples"] + summary["val_examples"] == 38


def test_fully_tied_record_is_skipped_and_counted(tok, tmp_path):
    from lmforge.preferences import load_data

    p = tmp_path / "tied.jsonl"
    p.write_text('{"input": "q", "choices": [{"text": "a", "rank": 1}, {"text": "b", "rank": 2}]}\n'
                 '{"input": "q2", "choices": [{"text": "a", "rank": 2}, {"text": "b", "rank": 2}]}\n', encoding="utf-8")
    examples, skipped = load_data(p, tok, encoder=False, max_len=64)
    assert len(examples) == 1 and skipped == 1


def test_one_prompt_with_a_held_out_split_says_what_to_change(tok, tmp_path):
    recs = [{"input": "q", "choices": [{"text": f"a{i}", "rank": 1}, {"text": f"b{i}", "rank": 2}]} for i in range(4)]
    data = _write(tmp_path / "one.jsonl", recs)
    with pytest.raises(LmforgeError, match=r"1 distinct prompt\(s\).*set val_fraction=0"):
        run_rm(_cfg(_init(tmp_path / "sft", tok), data, tmp_path / "rm"))


def test_an_existing_run_is_not_overwritten_without_overwrite_true(tok, tmp_path):
    init, data = _init(tmp_path / "sft", tok), _write(tmp_path / "r.jsonl", _ranked(16))
    opt = OptimConfig(lr=3e-3, warmup_steps=1, max_steps=2, weight_decay=0.0)
    run_rm(_cfg(init, data, tmp_path / "rm", optim=opt))
    before = (tmp_path / "rm" / "model.safetensors").read_bytes()
    with pytest.raises(LmforgeError, match="already holds a run; pass --resume to continue it or overwrite=true"):
        run_rm(_cfg(init, data, tmp_path / "rm", optim=opt, seed=1))
    assert (tmp_path / "rm" / "model.safetensors").read_bytes() == before
    run_rm(_cfg(init, data, tmp_path / "rm", optim=opt, seed=1, overwrite=True))
    assert (tmp_path / "rm" / "model.safetensors").read_bytes() != before
