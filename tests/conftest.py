"""Shared fixtures: a small tokenizer trained once per session and tiny model configs."""

import os

# Hypothesis runs every installed package's "hypothesis" entry point when imported; trio 0.35 (pulled in by
# selenium, for the browser test) registers one that no longer exists and crashes the session's end. lmforge's
# tests use no third-party Hypothesis plugins.
os.environ.setdefault("HYPOTHESIS_NO_PLUGINS", "1")
# Fixed thread counts, in this process and the lmforge commands tests start: a test that compares two runs must not
# see one of them change its thread count (and rounding) because the test machine was busy (lmforge.cpu_threads;
# tests/test_cpu_threads.py turns it on).
os.environ.setdefault("LMFORGE_ADAPT_THREADS", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from lmforge.model import ModelConfig  # noqa: E402

torch.set_num_threads(1)  # small ops: one thread is faster and immune to a busy second core

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。\n\n"
    "12 + 7 = 19. The apple is red. 苹果是红色的。 🍎🚀 Emoji and   spaces\tand tabs.\n\n"
) * 40


@pytest.fixture
def busy_cpu(monkeypatch):
    """The process's ThreadGovernor as on 2 CPUs with one kept busy by another program (its measurement fixed at
    1 free CPU): training loops that can split their batches run them in 2 lanes."""
    from lmforge import cpu_threads

    start = torch.get_num_threads()
    torch.set_num_threads(2)
    gov = cpu_threads.ThreadGovernor(enabled=True)
    gov.allowed = True  # also where /proc/stat is unreadable: the measurement is fixed below
    def one_cpu_free(self):  # what measure() concludes after two agreeing windows beside one busy program
        self.free = 1
        return 1

    monkeypatch.setattr(cpu_threads.ThreadGovernor, "measure", one_cpu_free)
    monkeypatch.setattr(cpu_threads, "_GOVERNOR", gov)
    yield gov
    torch.set_num_threads(start)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(SAMPLE_TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tok(corpus_file, tmp_path_factory):
    from lmforge.tokenizer import train_tokenizer

    return train_tokenizer([corpus_file], 400, tmp_path_factory.mktemp("tok"))


def tiny_config(vocab_size=400, causal=True, **kw):
    base = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, is_causal=causal)
    base.update(kw)
    return ModelConfig(**base)


SFT_WORDS = "the quick brown fox jumps over the lazy dog apple red".split()


def tiny_sft_policy(tok):
    """A tiny policy taught (in ~1 s) to answer 'say N' with 1-4 words and <|end|>, so responses stop at
    mixed lengths like a real SFT model's."""
    from lmforge.chat import render
    from lmforge.model import Transformer

    torch.manual_seed(0)
    model = Transformer(tiny_config())
    recs = [[{"role": "user", "content": f"say {i}"},
             {"role": "assistant", "content": " ".join(SFT_WORDS[i % 5: i % 5 + 1 + i % 4])}] for i in range(16)]
    rendered = [render(tok, m) for m in recs]
    T = max(len(ids) for ids, _ in rendered)
    ids = torch.full((16, T), tok.special.pad)
    loss_mask, attn = torch.zeros(16, T), torch.zeros(16, T, dtype=torch.long)
    for i, (x, m) in enumerate(rendered):
        ids[i, :len(x)], loss_mask[i, :len(x)], attn[i, :len(x)] = torch.tensor(x), torch.tensor(m).float(), 1
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        logits = model(ids, attention_mask=attn)[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="none")
        loss = (nll * loss_mask[:, 1:].reshape(-1)).sum() / loss_mask[:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def write_stage_inputs(root, tok, corpus_file):
    """Tiny inputs of every training stage under `root` (for runs in subprocesses): tok/ and data/ (token shards),
    init/ (an SFT policy), rm/ (a random reward model), sft.jsonl, ranked.jsonl (three responses per prompt, more
    apples rank higher) and prompts.jsonl. Returns root."""
    import json
    import random

    from lmforge.checkpoint import save_checkpoint
    from lmforge.data import prepare_data
    from lmforge.model import Transformer

    tok.save(root / "tok")
    prepare_data([corpus_file], root / "tok", root / "data", val_fraction=0.2)
    save_checkpoint(root / "init", tiny_sft_policy(tok), tok, {"stage": "sft"})
    torch.manual_seed(1)
    save_checkpoint(root / "rm", Transformer(tiny_config(), head="scalar"), tok,
                    {"stage": "rm", "backbone": "decoder", "pooling": "last", "reward_mean": 0.25, "reward_std": 2.0})
    words = "the quick brown fox jumps over the lazy dog".split()
    (root / "sft.jsonl").write_text("".join(
        json.dumps({"instruction": f"say {i}", "output": " ".join(words[i % 5:i % 5 + 1 + i % 4])}) + "\n"
        for i in range(32)))
    rng, ranked = random.Random(0), []
    for i in range(48):
        apples = rng.sample(range(4), 3)
        ranked.append({"input": f"pick {i}", "choices": [
            {"text": " ".join(["apple"] * a + ["fox"] * (4 - a)), "rank": sorted(apples, reverse=True).index(a) + 1}
            for a in apples]})
    (root / "ranked.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ranked))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"instruction": f"say {i}"}) + "\n" for i in range(12)))
    return root
