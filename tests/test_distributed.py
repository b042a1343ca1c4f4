"""Several processes on PyTorch's own engine (torchrun, DDP over gloo on this CPU): a 2-process run of pretraining,
SFT, reward-model training and DPO reaches the losses of a 1-process run with the same global batch, and a checkpoint
resumes on another number of processes.

Why the numbers agree: a step's micro-batches are a function of (step, micro-batch index) whichever process runs
them (training.train_loop), and DDP's all-reduce averages the gradients the single process accumulates. At 2
processes they agree bit for bit: each process's gradient is halved (exact in floating point) and a sum of two
terms does not depend on its order. From 3 processes on, the all-reduce adds in another order than the single
process does, so the numbers would agree to rounding (~1e-7 relative per step), not bit for bit.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


pytestmark = pytest.mark.slow  # each case starts several processes

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def inputs(tok, corpus_file, tmp_path_factory):
    """Tiny inputs of every stage (tests.conftest.write_stage_inputs)."""
    from tests.conftest import write_stage_inputs

    return write_stage_inputs(tmp_path_factory.mktemp("dist_inputs"), tok, corpus_file)


STAGES = {
    "pretrain": lambda i: ["pretrain", "--data", i / "data", "model.hidden_size=32", "model.num_hidden_layers=2",
                           "model.num_attention_heads=4", "model.num_key_value_heads=2",
                           "model.max_position_embeddings=64", "batch_size=4", "seq_len=32", "optim.max_steps=8",
                           "optim.warmup_steps=2", "eval_every=4", "eval_batches=2"],
    "sft": lambda i: ["sft", "--init", i / "init", "--data", i / "sft.jsonl", "optim.max_steps=8",
                      "optim.warmup_steps=2", "batch_size=2", "eval_every=4"],
    "rm": lambda i: ["rm", "train", "--init", i / "init", "--data", i / "ranked.jsonl", "epochs=1", "batch_size=4",
                     "optim.warmup_steps=2"],
    "dpo": lambda i: ["dpo", "--init", i / "init", "--data", i / "ranked.jsonl", "epochs=1", "batch_size=4",
                      "optim.warmup_steps=2", "eval_every=3"],
}


def _run(stage, inputs, out, nproc, *extra):
    argv = [*map(str, STAGES[stage](inputs)), "--out", str(out), "optim.grad_accum=2", "log_every=1",
            "device=cpu", "seed=3", *extra]
    launch = [sys.executable, "-m", "lmforge.cli"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "lmforge.cli"]
    done = subprocess.run(launch + argv, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same(a: list[dict], b: list[dict], keys: tuple[str, ...]):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in keys:
            if k in ra or k in rb:
                assert rb[k] == ra[k], (ra["step"], k, ra[k], rb[k])


@pytest.mark.parametrize("stage, keys", [("pretrain", ("loss", "val_loss")),
                                         ("sft", ("loss", "val_loss")),
                                         ("rm", ("loss", "accuracy", "margin", "heldout_accuracy", "mean_margin", "reward_mean")),
                                         ("dpo", ("loss", "accuracy", "margin", "val_loss", "val_accuracy"))])
def test_two_processes_reach_the_losses_of_one_with_the_same_global_batch(inputs, tmp_path, stage, keys):
    one = _run(stage, inputs, tmp_path / "one", 1)
    two = _run(stage, inputs, tmp_path / "two", 2)
    _assert_same(one, two, keys)
    assert len(one) >= 4 and any(keys[-1] in r for r in one)  # the held-out numbers were compared too
    w1, w2 = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # bit for bit (see the module docstring)


def test_a_checkpoint_resumes_on_another_number_of_processes(inputs, tmp_path):
    whole = _run("pretrain", inputs, tmp_path / "whole", 1)
    # 2 processes for 4 steps, then 1 process to the end; and 1 then 2
    for first, second in ((2, 1), (1, 2)):
        out = tmp_path / f"{first}then{second}"
        _run("pretrain", inputs, out, first, "stop_step=4")
        resumed = _run("pretrain", inputs, out, second, "--resume")
        _assert_same(whole, resumed, ("loss", "val_loss"))
        w1, w2 = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(out / "model.safetensors"))
        assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_lmforge_run_spreads_its_training_stages_over_processes(tmp_path):
    """`lmforge run --nproc 2` trains pretrain, SFT, the reward model and DPO under torchrun; with the batch split
    it reports (batch_size / 2 rows, grad_accum x 2), its policies equal bit for bit those of one process given
    those settings."""
    small = ["--preset", "tiny", "--branches", "dpo", "pretrain.optim.max_steps=12", "sft.optim.max_steps=12",
             "sft.eval_every=0", "rm.epochs=1", "dpo.epochs=1", "sample.n_prompts=24", "eval.max_new_tokens=8"]
    two = subprocess.run([sys.executable, "-m", "lmforge.cli", "run", *small, "--out", str(tmp_path / "two"),
                          "--nproc", "2"], env=ENV, capture_output=True, text=True, timeout=900)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    notes = [ln for ln in two.stdout.splitlines() if "processes (the same global batch)" in ln]
    assert [ln.split("]")[1].split(":")[0].strip() for ln in notes] == ["pretrain", "sft", "rm", "dpo"]
    assert "Traceback" not in two.stderr
    split = []
    for stage in ("pretrain", "sft", "rm", "dpo"):
        cfg = json.loads((tmp_path / "two" / stage / "run.json").read_text())["config"]
        assert cfg["optim"]["grad_accum"] == 2
        split += [f"{stage}.batch_size={cfg['batch_size']}", f"{stage}.optim.grad_accum=2"]
    one = subprocess.run([sys.executable, "-m", "lmforge.cli", "run", *small, *split, "--out", str(tmp_path / "one")],
                         env=ENV, capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    for stage in ("pretrain", "sft", "rm", "dpo"):
        a = load_file(str(tmp_path / "one" / stage / "model.safetensors"))
        b = load_file(str(tmp_path / "two" / stage / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), stage


def test_a_stage_that_fails_under_torchrun_is_one_line(tmp_path, inputs):
    done = subprocess.run([sys.executable, "-m", "lmforge.cli", "run", "--preset", "tiny", "--nproc", "2",
                           "--out", str(tmp_path / "run"), "sources.base_model=" + str(inputs / "init"),
                           "sources.sft=" + str(inputs / "sft.jsonl"), "--branches", "dpo",
                           "sft.optim.max_steps=1", "sft.batch_size=2", "sft.max_seq_len=4"],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "lmforge run: error: sft on 2 processes failed (its message is above)"


RL = {
    "ppo": (["iterations=4", "batch_size=8", "minibatch_size=8", "micro_batch_size=2", "ppo_epochs=2",
             "max_new_tokens=6", "actor_optim.lr=1e-3", "critic_optim.lr=1e-3"],
            ("score", "score_std", "reward", "kl", "beta", "explained_var", "value_mean", "pg_loss", "vf_loss",
             "approx_kl", "actor_grad_norm", "critic_grad_norm")),
    "grpo": (["iterations=4", "prompts_per_iteration=4", "group_size=4", "minibatch_size=16", "micro_batch_size=2",
              "max_new_tokens=6", "optim.lr=1e-3"],
             ("reward", "reward_std", "group_std", "zero_std_frac", "reward_rm", "kl", "pg_loss", "kl_loss", "approx_kl",
              "grad_norm")),
}


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_rl_on_two_processes_matches_one(inputs, tmp_path, stage):
    """Each process samples its share of every batch (PPO: prompts, GRPO: whole groups) with the batch's own
    per-row random numbers; rewards, whitening, the KL controller and the statistics are computed on the gathered
    batch; gradients are summed over processes (losses are normalised by the whole minibatch's token count). The
    same responses are sampled and the statistics agree to rounding: the processes run different batch shapes
    (their own padding), which moves the last bits of every forward, and Adam carries such differences on.
    One minibatch per epoch here: with several, each process shuffles its own rows into its share of each
    minibatch, so the minibatches (not the batch) differ from one process's: the same expectation, other numbers."""
    extra, keys = RL[stage]
    argv = [stage, "--sft-model", str(inputs / "init"), "--reward-model", str(inputs / "rm"), "--prompts",
            str(inputs / "prompts.jsonl"), *extra, "device=cpu", "seed=3"]
    runs = {}
    for n in (1, 2):
        launch = [sys.executable, "-m", "lmforge.cli"] if n == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m", "lmforge.cli"]
        out = tmp_path / f"p{n}"
        done = subprocess.run(launch + argv + ["--out", str(out)], env=ENV, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        runs[n] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(runs[1]) == len(runs[2]) == 4
    for a, b in zip(runs[1], runs[2]):
        assert b["response_len"] == a["response_len"] and b["eos_frac"] == a["eos_frac"]  # the same samples
        for k in keys:
            # 1e-5 absolute for the means near 0 (pg_loss: whitened advantages average to 0); measured: 1e-7
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (a["step"], k, a[k], b[k])


def test_fsdp2_saves_a_checkpoint_one_process_loads_and_resumes(inputs, tmp_path):
    """optim.fsdp=true shards parameters, gradients and optimizer state over 2 processes (FSDP2); checkpoints are
    gathered into the usual directory: it loads in one process, and a 1-process --resume continues it. FSDP2
    computes what DDP does up to rounding (the gradient norm is summed from shards), so against one process the
    losses agree to 1e-5, not bit for bit."""
    from lmforge.checkpoint import load_model

    one = _run("pretrain", inputs, tmp_path / "one", 1)
    out = tmp_path / "fsdp"
    first = _run("pretrain", inputs, out, 2, "optim.fsdp=true", "stop_step=4")
    model, _, meta = load_model(out)  # a plain checkpoint, in this (single) process
    assert meta["step"] == 4 and model.num_params() > 0
    resumed = _run("pretrain", inputs, out, 1, "optim.fsdp=true", "--resume")
    assert [r["step"] for r in resumed] == [r["step"] for r in one]
    for a, b in zip(one, resumed):
        for k in ("loss", "val_loss"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-5), (a["step"], k)
    assert first[:4] == resumed[:4]  # the log of the sharded part was kept


FSDP_GENERATE_FIRST = """
import torch, torch.distributed as dist
from lmforge.distributed import shard_model
from lmforge.generation import SamplingParams, generate
from lmforge.model import ModelConfig, Transformer
dist.init_process_group("gloo")
torch.manual_seed(0)
model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=32))
shard_model(model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
out = generate(model, [[1, 2, 3], [4, 5]], SamplingParams(4, temperature=0.0), [0], 0)
ids = torch.randint(0, 64, (2, 9))
model(ids[:, :-1], labels=ids[:, 1:]).backward()
opt.step()
print("trained after sampling", len(out.tokens))
dist.destroy_process_group()
"""


def test_an_fsdp2_model_samples_before_its_first_training_step(tmp_path):
    """generate runs under inference mode, except on an FSDP2-sharded model: there a first forward under inference
    mode would gather the parameters into inference tensors that the training step after it cannot update."""
    script = tmp_path / "fsdp_generate_first.py"
    script.write_text(FSDP_GENERATE_FIRST)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.count("trained after sampling 2") == 2
