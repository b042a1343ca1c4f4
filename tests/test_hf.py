"""Hugging Face in and out, against transformers itself: models built and randomly initialised by transformers'
own classes (Llama with grouped-query attention, tied and untied embeddings, rope scaling; Qwen2 with biases),
saved locally, imported, compared logit for logit and token for token, and exported back."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the optional extra: pip install -e '.[test]'")
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402

from lmforge.chat import render, render_completion, render_prompt, render_text, stop_ids  # noqa: E402
from lmforge.checkpoint import load_model, save_checkpoint  # noqa: E402
from lmforge.cli import main  # noqa: E402
from lmforge.generation import SamplingParams, generate  # noqa: E402
from lmforge.hf import export_hf, import_hf  # noqa: E402
from lmforge.model import Transformer  # noqa: E402
from lmforge.scoring import raw_scores  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
               r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
TEXT = ["Hello world, this is a test of the tokenizer. 你好世界, what is 2 + 3? The answer is 5. Be brief.\n"] * 50
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "content": "The answer is 5."}, {"role": "user", "content": "你好世界"},
                {"role": "assistant", "content": "Hello world!"}]


def _tokenizer(style: str):
    """A small BPE in the layout of a real model family, wrapped as transformers' fast tokenizer."""
    hf = HFTokenizer(models.BPE())
    if style == "qwen2":  # Qwen2's own pre-tokenizer (transformers rebuilds it from the class, so it must match)
        hf.normalizer = normalizers.NFC()
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    specials = {"chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}[style]
    hf.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if style == "llama3":  # no PAD token, as Llama 3
        return transformers.PreTrainedTokenizerFast(tokenizer_object=hf, bos_token="<|begin_of_text|>",
                                                    eos_token="<|end_of_text|>", chat_template=LLAMA3)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=hf, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                                chat_template=CHATML)


def _hf_model(kind: str, vocab: int):
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=True))
        with torch.no_grad():  # make the q/k/v biases matter
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.5)
        return model
    if kind == "llama_tied":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, tie_word_embeddings=True,
                                                                       rope_theta=50000.0))
    if kind == "llama_untied_scaled":  # untied, Llama 3.1 rope scaling
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 32}
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, tie_word_embeddings=False,
                                                                       rope_theta=10000.0, rope_scaling=scaling))
    if kind == "llama_linear":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **common, tie_word_embeddings=False, rope_scaling={"rope_type": "linear", "factor": 2.0}))
    raise ValueError(kind)


CASES = {"llama_tied": "chatml", "llama_untied_scaled": "llama3", "llama_linear": "chatml", "qwen2": "qwen2"}


def _save_case(kind: str, d):
    tok = _tokenizer(CASES[kind])
    _hf_model(kind, len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module", params=list(CASES))
def hf_dir(request, tmp_path_factory):
    return _save_case(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return _save_case("llama_tied", tmp_path_factory.mktemp("llama"))


def _ids(x):
    return list(x["input_ids"] if hasattr(x, "keys") else x)


def _logits_equal(ours: Transformer, theirs, ids: list[int]):
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (ours.eval()(x) - theirs.eval()(x).logits).abs().max().item()
    assert diff <= 1e-4, diff


def _greedy_equal(ours: Transformer, theirs, tok, prompt: list[int], n: int = 24):
    mine = generate(ours.eval(), [prompt], SamplingParams(n, temperature=0.0), stop_ids(tok), tok.special.pad).tokens[0]
    ref = theirs.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=n, do_sample=False, eos_token_id=stop_ids(tok), pad_token_id=tok.special.pad)
    assert mine == ref[0, len(prompt):].tolist()


def test_import_matches_transformers_logits_generation_and_template(hf_dir, tmp_path):
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    their_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ours, tok, _ = load_model(f"hf:{hf_dir}")
    assert tok.special.end == their_tok.convert_tokens_to_ids("<|eot_id|>" if "<|eot_id|>" in their_tok.get_vocab()
                                                                else "<|im_end|>")
    # the chat template: with and without a generation prompt, a system turn, several turns
    assert render(tok, CONVERSATION)[0] == _ids(their_tok.apply_chat_template(CONVERSATION, tokenize=True))
    assert render_prompt(tok, CONVERSATION[:4]) == _ids(their_tok.apply_chat_template(
        CONVERSATION[:4], tokenize=True, add_generation_prompt=True))
    assert render_text(tok, CONVERSATION) == their_tok.apply_chat_template(CONVERSATION, tokenize=False)
    prompt = render_prompt(tok, CONVERSATION[:4])
    _logits_equal(ours, theirs, render(tok, CONVERSATION)[0])
    _greedy_equal(ours, theirs, tok, prompt)
    # and back out: an lmforge checkpoint of the imported model loads in transformers
    import_hf(hf_dir, tmp_path / "ckpt")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    again_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    assert type(again).__name__ == type(theirs).__name__
    _logits_equal(ours, again, prompt)
    assert _ids(again_tok.apply_chat_template(CONVERSATION, tokenize=True)) == render(tok, CONVERSATION)[0]


def test_loss_mask_covers_assistant_content_and_end_of_turn(hf_dir):
    _, tok, _ = load_model(f"hf:{hf_dir}")
    ids, mask = render(tok, CONVERSATION)
    learned = tok.decode([i for i, m in zip(ids, mask) if m], skip_special=False)
    end = tok.hf.id_to_token(tok.special.end)
    assert learned == f"The answer is 5.{end}Hello world!{end}"
    # a finished rollout ends at the end-of-turn token: that is where the reward model reads its score
    completion = render_completion(tok, CONVERSATION[:4], "Hello world!")
    assert completion[-1] == tok.special.end and completion == ids[:len(completion)]
    assert render_prompt(tok, CONVERSATION[:4]) == completion[:len(render_prompt(tok, CONVERSATION[:4]))]


def test_no_pad_token_pads_with_a_token_that_never_ends_a_turn_without_resizing(tmp_path):
    tok = _tokenizer("llama3")
    model = _hf_model("llama_untied_scaled", len(tok))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    ours, t, _ = load_model(f"hf:{tmp_path}")
    assert t.special.pad not in stop_ids(t) and t.special.pad != t.special.bos and ours.config.vocab_size == len(tok)
    assert t.hf.id_to_token(t.special.pad) in tok.all_special_tokens + ["<|start_header_id|>", "<|end_header_id|>"]
    assert t.special.bos == tok.bos_token_id and t.special.end == tok.convert_tokens_to_ids("<|eot_id|>")


def test_lmforge_checkpoint_loads_in_transformers(tok, tmp_path):
    """Out: a policy trained here is a transformers folder, template included; a reward model scores alike."""
    torch.manual_seed(0)
    policy = Transformer(tiny_config(vocab_size=tok.vocab_size, tie_word_embeddings=True, max_position_embeddings=256), head="lm")
    save_checkpoint(tmp_path / "policy", policy, tok, {"stage": "sft"})
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    their_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "policy")
    assert type(theirs).__name__ == "LlamaForCausalLM"
    assert _ids(their_tok.apply_chat_template(CONVERSATION, tokenize=True)) == render(tok, CONVERSATION)[0]
    assert _ids(their_tok.apply_chat_template(CONVERSATION[:4], tokenize=True, add_generation_prompt=True)) == \
        render_prompt(tok, CONVERSATION[:4])
    prompt = render_prompt(tok, CONVERSATION[:4])
    _logits_equal(policy, theirs, render(tok, CONVERSATION)[0])
    _greedy_equal(policy, theirs, tok, prompt)

    rm = Transformer(tiny_config(vocab_size=tok.vocab_size), head="scalar")
    save_checkpoint(tmp_path / "rm", rm, tok, {"stage": "rm", "reward_mean": 0.5, "reward_std": 2.0})
    export_hf(tmp_path / "rm", tmp_path / "rm_hf")
    their_rm = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm_hf").eval()
    seqs = [render_completion(tok, CONVERSATION[:4], "Hello world!"), render_completion(tok, CONVERSATION[:2], "5")]
    for s in seqs:
        x = torch.tensor([s])
        mine = raw_scores(rm.eval(), x, torch.ones_like(x))
        with torch.no_grad():
            assert torch.allclose(their_rm(x).logits[:, 0], mine, atol=1e-5)
    norm = json.loads((tmp_path / "rm_hf" / "config.json").read_text())["reward_normalization"]
    assert (norm["mean"], norm["std"]) == (0.5, 2.0)


def test_export_to_bfloat16_and_refusals(tok, tmp_path, capsys):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "p", Transformer(tiny_config(vocab_size=tok.vocab_size)), tok, {"stage": "sft"})
    assert main(["export", "hf", str(tmp_path / "p"), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert theirs.dtype == torch.bfloat16
    save_checkpoint(tmp_path / "enc", Transformer(tiny_config(vocab_size=tok.vocab_size, causal=False)), tok,
                    {"stage": "pretrain"})
    capsys.readouterr()
    assert main(["export", "hf", str(tmp_path / "enc"), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "encoder" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def _edit_config(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "unsupported architecture 'gpt2'"),
    ({"model_type": "mistral", "sliding_window": 4096}, "sliding-window attention is not supported"),
    ({"num_local_experts": 8}, "mixture-of-experts models are not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}}, "rope type 'yarn' is not supported"),
    ({"hidden_size": 128}, "weight model.embed_tokens.weight has shape"),
    ({"intermediate_size": 96}, "weight model.layers.0.mlp.down_proj.weight has shape (64, 160), but config.json implies (64, 96)"),
    ({"num_key_value_heads": 4}, "weight model.layers.0.self_attn.k_proj.weight has shape"),
    ({"architectures": ["LlamaForSequenceClassification"], "num_labels": 2}, "num_labels != 1"),
])
def test_unsupported_or_broken_models_are_refused_in_one_line(llama_dir, tmp_path, capsys, changes, message):
    bad = _edit_config(llama_dir, tmp_path / "bad", **changes)
    assert main(["import", "hf", str(bad), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("lmforge import: error:")
    assert not (tmp_path / "out").exists()


def test_missing_tokenizer_is_refused(llama_dir, tmp_path, capsys):
    bad = _edit_config(llama_dir, tmp_path / "bad")
    (bad / "tokenizer.json").unlink()
    assert main(["import", "hf", str(bad), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert "tokenizer not found" in err and len(err.splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch, dtype, message", [
    ("gpt2", "float32", "unsupported GGUF architecture 'gpt2'"),
    ("llama", "float64", "unsupported GGUF quantisation F64 (tensor token_embd.weight)"),
])
def test_unsupported_gguf_is_refused_in_one_line(tmp_path, capsys, arch, dtype, message):
    gguf = pytest.importorskip("gguf", reason="the optional extra: pip install -e '.[interop]'")
    import numpy as np

    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert main(["import", "gguf", str(path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not (tmp_path / "out").exists()


def _chatml_dir(tmp_path, pad_is_end: bool = False, im_end_special: bool = True):
    """A ChatML model folder in SmolLM2's layout (PAD = EOS = <|im_end|> when pad_is_end)."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>"] + (["<|im_end|>"] if im_end_special else [])
    hf.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if not im_end_special:
        from tokenizers import AddedToken

        hf.add_tokens([AddedToken("<|im_end|>", special=False)])
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=hf, eos_token="<|endoftext|>" if not im_end_special else "<|im_end|>",
        pad_token="<|im_end|>" if pad_is_end else "<|endoftext|>", unk_token="<|endoftext|>", chat_template=CHATML)
    _hf_model("llama_tied", len(tok)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return tmp_path


def test_reward_model_with_a_pad_that_is_a_stop_token_scores_alike_in_transformers(tmp_path):
    """SmolLM2 pads with <|im_end|>, its end-of-turn token: lmforge pads with a token that never ends a turn, and
    writes it down, so transformers' sequence classifier reads the score at the end-of-turn token as lmforge."""
    _, tok, _ = load_model(f"hf:{_chatml_dir(tmp_path / 'hf', pad_is_end=True)}")
    assert tok.special.pad not in stop_ids(tok) and tok.hf.id_to_token(tok.special.end) == "<|im_end|>"
    torch.manual_seed(0)
    rm = Transformer(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=256), head="scalar")
    save_checkpoint(tmp_path / "rm", rm, tok, {"stage": "rm"})
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    x = torch.tensor([render_completion(tok, CONVERSATION[:2], "The answer is 5.")])
    with torch.no_grad():
        assert torch.allclose(theirs(x).logits[:, 0], raw_scores(rm.eval(), x, torch.ones_like(x)), atol=1e-5)


def test_end_of_turn_added_without_the_special_flag_is_found(tmp_path):
    _, tok, _ = load_model(f"hf:{_chatml_dir(tmp_path, im_end_special=False)}")
    assert tok.hf.id_to_token(tok.special.end) == "<|im_end|>" and tok.special.end in stop_ids(tok)
    ids, mask = render(tok, CONVERSATION[:3])
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special=False) == "The answer is 5.<|im_end|>"


def test_sft_truncation_keeps_the_assistant_header_under_chatml(tmp_path):
    from lmforge.losses import IGNORE
    from lmforge.stages.sft import encode_example

    _, tok, _ = load_model(f"hf:{_chatml_dir(tmp_path)}")
    long_prompt = [{"role": "user", "content": "Hello world, " * 30}, {"role": "assistant", "content": "The answer is 5."}]
    full, _ = render(tok, long_prompt)
    ids, labels = encode_example(tok, long_prompt, 32)
    assert len(ids) == 32 and tok.special.bos is None  # no BOS to keep in ChatML
    assert ids == full[len(full) - 1 - 32:-1]  # the tail, without the newline after the last <|im_end|>
    assert tok.decode([t for t in labels if t != IGNORE], skip_special=False) == "The answer is 5.<|im_end|>"
    assert "<|im_start|>assistant\n" in tok.decode(ids, skip_special=False)
    long_answer = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello world, " * 30}]
    assert encode_example(tok, long_answer, 32) is None  # the response cannot fit: the record is dropped


def test_pretraining_special_table_and_mlm_refusal_with_a_foreign_tokenizer(tmp_path):
    from lmforge.stages.pretrain import special_table

    _, tok, _ = load_model(f"hf:{_chatml_dir(tmp_path)}")
    table = special_table(tok)
    assert table[tok.special.end] and table[tok.special.pad] and int(table.sum()) == 3


def test_missing_tie_key_means_untied_as_in_transformers(tmp_path):
    tok = _tokenizer("qwen2")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf.pop("tie_word_embeddings")
    (tmp_path / "config.json").write_text(json.dumps(conf))
    ours, t, _ = load_model(f"hf:{tmp_path}")
    _logits_equal(ours, transformers.AutoModelForCausalLM.from_pretrained(tmp_path), render_prompt(t, CONVERSATION[:2]))


def test_mistral_without_sliding_window_matches_transformers(tmp_path):
    tok = _tokenizer("chatml")
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=None)
    transformers.MistralForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    ours, t, _ = load_model(f"hf:{tmp_path}")
    assert ours.config.head_dim == 32
    _logits_equal(ours, transformers.AutoModelForCausalLM.from_pretrained(tmp_path), render(t, CONVERSATION)[0])


def test_reward_model_saved_with_a_score_bias_keeps_its_normalised_scores(tok, tmp_path):
    """Checkpoints from before the bias-free head: the bias is folded into the stored normalisation."""
    from safetensors.torch import load_file, save_file

    from lmforge.scoring import RewardScorer

    torch.manual_seed(0)
    rm = Transformer(tiny_config(vocab_size=tok.vocab_size), head="scalar")
    save_checkpoint(tmp_path / "rm", rm, tok, {"stage": "rm", "reward_mean": 3.5, "reward_std": 2.0})
    state = load_file(str(tmp_path / "rm" / "model.safetensors"))
    save_file({**state, "score.bias": torch.tensor([3.0])}, str(tmp_path / "rm" / "model.safetensors"))
    (tmp_path / "rm" / "manifest.json").unlink()  # checkpoints from then had no manifest
    x = torch.tensor([render_completion(tok, [CONVERSATION[1]], "The answer is 5.")])
    with torch.no_grad():
        expected = (raw_scores(rm.eval(), x, torch.ones_like(x)) + 3.0 - 3.5) / 2.0
    scorer = RewardScorer.load(tmp_path / "rm")
    assert scorer.score([CONVERSATION[1]["content"]], ["The answer is 5."])[0] == pytest.approx(float(expected), abs=1e-5)


def test_lmforge_fingerprint_is_unchanged_by_the_chat_template(tok):
    import hashlib

    assert tok.fingerprint() == hashlib.sha256(tok.hf.to_str().encode()).hexdigest()[:16]
