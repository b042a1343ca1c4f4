"""Tokenizers (Hugging Face `tokenizers`): lmforge's own byte-level BPE, or a pretrained model's, and corpus readers.

Byte-level BPE starts from the 256 byte values, so any UTF-8 text (English, Chinese, emoji, runs of
whitespace) round-trips losslessly: decode(encode(text)) == text.

A tokenizer directory holds tokenizer.json and tokenizer_config.json, in Hugging Face's layout: the special
tokens (bos, eos, pad) and the Jinja `chat_template` live in the config, so transformers' AutoTokenizer loads
the directory and a pretrained model's tokenizer loads here unchanged. A directory with tokenizer.json alone is
an lmforge tokenizer from before the config existed, and gets lmforge's template.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lmforge.errors import LmforgeError

# One fixed set of special tokens. PAD is its own token and never EOS (a model must learn to emit EOS,
# and masks must never be derived from `ids != pad`). <|end|> closes a chat turn.
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SEP, MASK = "<|sep|>", "<|mask|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, END, SEP, MASK]
BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, CHAT_TEMPLATE_FILE = "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"
# lmforge's chat template in Jinja (what transformers' apply_chat_template runs):
#   <|bos|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>
LMFORGE_CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
                         "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def _lines(path: Path, read: list[int] | None = None) -> Iterator[tuple[int, str]]:
    """(line number, text) pairs, decoding each line strictly so a UTF-8 error names its line."""
    with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as f:
        for lineno, raw in enumerate(f, 1):
            if read is not None:
                read[0] += len(raw)
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise LmforgeError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def iter_documents(paths: list[str | Path], read: list[int] | None = None) -> Iterator[str]:
    """Stream documents from .txt (documents separated by blank lines), .jsonl (field `text`)
    and their .gz forms. Never loads a whole file; errors name the file and line.

    `read`: a one-element list to which the (decompressed) bytes of every line read are added, for a progress bar."""
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise LmforgeError(f"{path}: input file not found")
        name = path.name[:-3] if path.name.endswith(".gz") else path.name
        is_jsonl = name.endswith(".jsonl") or name.endswith(".json")
        n_docs, block = 0, []
        try:
            for lineno, line in _lines(path, read):
                if is_jsonl:
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise LmforgeError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                        raise LmforgeError(f"{path}:{lineno}: expected an object with a string field 'text'")
                    if rec["text"]:
                        n_docs += 1
                        yield rec["text"]
                elif line.strip():
                    block.append(line)
                elif block:  # a blank line ends a .txt document
                    n_docs += 1
                    yield "".join(block).rstrip("\n")
                    block = []
            if block:
                n_docs += 1
                yield "".join(block).rstrip("\n")
        except (OSError, EOFError) as e:
            raise LmforgeError(f"{path}: cannot read ({e})") from None
        if n_docs == 0:
            raise LmforgeError(f"{path}: input is empty")


@dataclass
class SpecialIds:
    """Special-token ids. `end` closes a chat turn (lmforge <|end|>, ChatML <|im_end|>, Llama 3 <|eot_id|>) and
    is where generation stops and the reward is read. `pad` only fills padded positions (masks are always
    explicit), so a tokenizer without a PAD token pads with EOS and nothing is resized. Role, SEP and MASK
    tokens exist in lmforge's own tokenizer only (the encoder layout and masked LM need them)."""
    pad: int
    bos: int | None
    eos: int
    end: int
    system: int | None = None
    user: int | None = None
    assistant: int | None = None
    sep: int | None = None
    mask: int | None = None


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _has_lmforge_specials(hf_tokenizer) -> bool:
    """Whether a `tokenizers.Tokenizer` is lmforge's own (it holds every lmforge special token)."""
    return all(hf_tokenizer.token_to_id(t) is not None for t in SPECIAL_TOKENS)


def lmforge_tokenizer_config() -> dict:
    """tokenizer_config.json of an lmforge tokenizer (the fields transformers reads)."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
            "mask_token": MASK, "sep_token": SEP, "chat_template": LMFORGE_CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000}


class Tokenizer:
    """A `tokenizers.Tokenizer` plus its special-token ids and chat template (see the module docstring)."""

    def __init__(self, hf_tokenizer, config: dict | None = None, source: str = "tokenizer"):
        self.hf = hf_tokenizer
        self.config = dict(config) if config is not None else lmforge_tokenizer_config()
        self.chat_template = self.config.get("chat_template")
        if isinstance(self.chat_template, list):  # several named templates: use "default"
            named = {t.get("name"): t.get("template") for t in self.chat_template if isinstance(t, dict)}
            self.chat_template = named.get("default")
        if not isinstance(self.chat_template, str) or not self.chat_template.strip():
            raise LmforgeError(f"{source}: tokenizer has no chat template (tokenizer_config.json 'chat_template' "
                               "or chat_template.jinja)")
        self.vocab_size = hf_tokenizer.get_vocab_size()
        self.is_lmforge = _has_lmforge_specials(hf_tokenizer)

        def tid(key: str) -> int | None:
            text = _token_text(self.config.get(key))
            if text is None:
                return None
            i = hf_tokenizer.token_to_id(text)
            if i is None:
                raise LmforgeError(f"{source}: {key} {text!r} is not in the vocabulary")
            return i

        eos = tid("eos_token")
        if eos is None:
            raise LmforgeError(f"{source}: tokenizer_config.json names no eos_token")
        if self.is_lmforge:
            ids = dict(zip(["pad", "bos", "eos", "system", "user", "assistant", "end", "sep", "mask"],
                           (hf_tokenizer.token_to_id(t) for t in SPECIAL_TOKENS)))
            self.special = SpecialIds(**ids)
        else:
            self.special = SpecialIds(pad=eos, bos=tid("bos_token"), eos=eos, end=eos)
            from lmforge.chat import end_of_turn_token  # the template decides which token closes a turn

            end = end_of_turn_token(self)
            self.special.end = eos if end is None else end
            self.special.pad = self._pad_id(tid("pad_token"), tid("unk_token"))
        self.special_ids = {i for i, t in hf_tokenizer.get_added_tokens_decoder().items() if t.special}
        self.special_ids |= {self.special.eos, self.special.end}

    def _pad_id(self, pad: int | None, unk: int | None) -> int:
        """The id that fills padded positions: the model's PAD unless it is a stop token (SmolLM2 pads with
        <|im_end|>, Llama 3 has none), then UNK or another special token that never ends a turn, else EOS.
        Masks are always explicit, so the choice never changes what lmforge computes; it matters to
        transformers' sequence classifier, which reads a reward model's score at the last non-PAD token."""
        stops = {self.special.end, self.special.eos}
        added = sorted(i for i, t in self.hf.get_added_tokens_decoder().items() if t.special)
        for candidate in [pad, unk, *added]:
            if candidate is not None and candidate not in stops and candidate != self.special.bos:
                return candidate
        return self.special.eos

    def token_text(self, key: str) -> str | None:
        """The text of special token `key` ('bos_token', 'eos_token', ...), as the chat template sees it."""
        return _token_text(self.config.get(key))

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load a tokenizer directory (tokenizer.json + tokenizer_config.json [+ chat_template.jinja]), or a
        tokenizer.json file of lmforge's own."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise LmforgeError(f"{file}: tokenizer not found")
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as e:  # the library raises plain Exceptions on malformed files
            raise LmforgeError(f"{file}: cannot load tokenizer ({e})") from None
        config_file, template_file = file.parent / TOKENIZER_CONFIG_FILE, file.parent / CHAT_TEMPLATE_FILE
        config = None
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise LmforgeError(f"{config_file}: invalid JSON ({e})") from None
            if not isinstance(config, dict):
                raise LmforgeError(f"{config_file}: expected a JSON object")
        elif not _has_lmforge_specials(hf):
            raise LmforgeError(f"{config_file}: not found (a tokenizer other than lmforge's needs it for its "
                               "special tokens and chat template)")
        if template_file.is_file():  # transformers >= 4.43 may keep the template in its own file
            config = {**(config or lmforge_tokenizer_config()),
                      "chat_template": template_file.read_text(encoding="utf-8")}
        return cls(hf, config, source=str(file.parent))

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (with the chat template) into `directory`."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(d / TOKENIZER_FILE))
        keep = ("tokenizer_class", "bos_token", "eos_token", "pad_token", "unk_token", "mask_token", "sep_token",
                "additional_special_tokens", "clean_up_tokenization_spaces", "model_max_length",
                "add_bos_token", "add_eos_token", "add_prefix_space", "padding_side")
        config = {k: v for k, v in self.config.items() if k in keep}
        if config.get("tokenizer_class") not in ("PreTrainedTokenizerFast", None):
            config["tokenizer_class"] = "PreTrainedTokenizerFast"  # tokenizer.json is all a fast tokenizer needs
        config["pad_token"] = self.hf.id_to_token(self.special.pad)  # the pad we use, so transformers pads alike
        config["chat_template"] = self.chat_template
        (d / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")

    def document_ids(self, text: str) -> list[int]:
        """A pretraining document: [BOS] text [EOS] (no BOS where the tokenizer has none, as Qwen2)."""
        bos = [] if self.special.bos is None else [self.special.bos]
        return bos + self.encode(text) + [self.special.eos]

    def encode(self, text: str) -> list[int]:
        """Token ids of text, with no BOS/EOS added (special-token strings in the text do become those tokens)."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Parallel batch encoding (Rust threads inside `tokenizers`)."""
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def fast_encoder(self) -> "FastEncoder | None":
        """The same ids as `encode`, from tiktoken's BPE (~4x less CPU, and picklable for worker processes), or
        None where that is not proven: see `FastEncoder`. lmforge's own tokenizers qualify; imported ones (with a
        normalizer, another pre-tokenizer or a post-processor, as Qwen2's, Llama 3's, SmolLM2's) are declined."""
        tables = _fast_encoder_tables(json.loads(self.hf.to_str()), self.hf)
        return None if tables is None else FastEncoder(*tables)

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (for streaming decode without splitting UTF-8 characters)."""
        tok = self.hf.id_to_token(token_id)
        if tok is None or token_id in self.special_ids:
            return b""
        table = _byte_decoder()
        if all(c in table for c in tok):  # byte-level BPE (GPT-2, Llama 3, SmolLM, Qwen2, lmforge)
            return bytes(table[c] for c in tok)
        if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):  # SentencePiece byte fallback
            return bytes([int(tok[3:5], 16)])
        return tok.replace("\u2581", " ").encode("utf-8")  # SentencePiece word marker

    def fingerprint(self) -> str:
        """Hash of the tokenizer definition and chat template: stages refuse to mix models of different ones.
        (lmforge's own template is left out of the hash, so fingerprints written before templates existed hold.)"""
        template = "" if self.chat_template == LMFORGE_CHAT_TEMPLATE else self.chat_template
        return hashlib.sha256((self.hf.to_str() + template).encode()).hexdigest()[:16]


_BYTE_DECODER: dict[str, int] | None = None


def check_same_tokenizer(fingerprint_a: str | None, fingerprint_b: str | None, a: str, b: str) -> None:
    """The one tokenizer-compatibility check: `a` and `b` (what the user set, e.g. "config key 'data' (runs/x)")
    must share a tokenizer, or their token ids mean different things. A missing fingerprint is not checked."""
    if fingerprint_a and fingerprint_b and fingerprint_a != fingerprint_b:
        raise LmforgeError(f"tokenizer mismatch: {a} and {b} use different tokenizers "
                           f"(fingerprints {fingerprint_a[:12]} != {fingerprint_b[:12]})")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte<->unicode table (what the ByteLevel pre-tokenizer uses), inverted."""
    global _BYTE_DECODER
    if _BYTE_DECODER is None:
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        _BYTE_DECODER = {chr(c): b for b, c in zip(bs, cs)}
    return _BYTE_DECODER


def train_tokenizer(inputs: list[str | Path], vocab_size: int, out_dir: str | Path | None = None,
                    min_frequency: int = 2) -> Tokenizer:
    """Train byte-level BPE on the documents of `inputs`; save DIR/tokenizer.json when out_dir is given."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB_SIZE:
        raise LmforgeError(f"config key 'vocab_size': {vocab_size} is smaller than the byte alphabet plus special tokens "
                           f"({BYTE_ALPHABET_SIZE} + {len(SPECIAL_TOKENS)} = {MIN_VOCAB_SIZE})")
    # Validate every input (exists, UTF-8, non-empty) before training so errors name the file.
    for p in inputs:
        for _ in iter_documents([p]):
            pass
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(iter_documents(inputs), trainer=trainer)
    tok = Tokenizer(hf)
    if out_dir is not None:
        tmp = Path(out_dir) / ".tokenizer.tmp"
        tok.save(tmp)
        for name in (TOKENIZER_CONFIG_FILE, TOKENIZER_FILE):  # tokenizer.json last: its presence means done
            (tmp / name).replace(Path(out_dir) / name)
        tmp.rmdir()
    return tok


# ----------------------------------------------------------------------------------------------------------
# Fast exact encoding for `lmforge data prepare`

# GPT-2's pre-tokenization regex, how the ByteLevel pre-tokenizer (use_regex=True) of `tokenizers` splits text:
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# written as tiktoken writes it for GPT-2: the same matches (no contraction is a prefix of another), ~25% faster.
BYTE_LEVEL_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class FastEncoder:
    """tiktoken's byte-level BPE over a tokenizer's own vocabulary: `Tokenizer.encode`'s ids for ~1/4 of the CPU.

    Both libraries split out added (special) tokens first, then split the rest with the same GPT-2 regex, then
    merge each piece from its bytes by repeatedly joining the best adjacent pair, the leftmost among equals.
    They differ in what "best" means: `tokenizers` takes the pair with the lowest merge rule; tiktoken the pair
    whose joined bytes have the lowest id, accepting any pair that joins into a token (not only by its merge
    rule), and it takes a piece that is one token whole. `Tokenizer.fast_encoder` builds one only where this
    changes nothing: ids grow with the merge rules (as the BPE trainer assigns them), so on merge rules the two
    orders agree; and `tokenizers` encodes every token's own bytes as that one token. Then a piece that is a
    token comes out whole either way, and a pair x, y that joins into a token t without being t's merge rule
    never arises: had it arisen in some piece, encoding t alone would make the same merges (at each step it
    offers a subset of the same pairs) up to [x, y], and stop there, not at [t].

    The two regex engines (Oniguruma in `tokenizers`, Rust's regex in tiktoken) could in principle class a
    newly assigned Unicode character differently: tests fuzz the equality, and `lmforge data prepare` checks the
    first documents of every corpus against `tokenizers`.
    """

    def __init__(self, ranks: dict[bytes, int], specials: dict[str, int]):
        import tiktoken

        self.ranks, self.specials = ranks, specials
        self.enc = tiktoken.Encoding("lmforge", pat_str=BYTE_LEVEL_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=specials)
        self.first_chars = sorted({s[0] for s in specials})  # a text without them holds no special token

    def __reduce__(self):  # a worker process rebuilds the encoder from its tables
        return FastEncoder, (self.ranks, self.specials)

    def encode(self, text: str) -> list[int]:
        """Token ids of text; special-token strings become those tokens, as in `Tokenizer.encode`."""
        return self.enc.encode(text, allowed_special="all")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """One thread: tiktoken's own batch threads share the GIL; `lmforge data prepare` uses processes."""
        # encode_ordinary gives the same ids for a text without special tokens, ~10% faster (no search for them)
        may_hold = self.first_chars
        return [self.enc.encode(t, allowed_special="all") if any(c in t for c in may_hold)
                else self.enc.encode_ordinary(t) for t in texts]


def _fast_encoder_tables(spec: dict, hf) -> tuple[dict[bytes, int], dict[str, int]] | None:
    """tiktoken's (mergeable ranks, special tokens) for a tokenizer.json `spec`, or None unless the tokenizer is
    the kind `train_tokenizer` makes, for which FastEncoder's ids provably equal those of `tokenizers` (`hf`)."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if (getattr(hf, "encode_special_tokens", False)  # special-token strings encoded as text
            or spec.get("normalizer") or spec.get("post_processor") or spec.get("truncation") or spec.get("padding")
            or pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or pre.get("use_regex") is not True
            or model.get("type") != "BPE" or model.get("dropout") or model.get("continuing_subword_prefix")
            or model.get("end_of_word_suffix") or model.get("byte_fallback") or model.get("ignore_merges")):
        return None
    added = spec.get("added_tokens") or []
    specials = {t.get("content"): t.get("id") for t in added}
    if len(specials) != len(added) or any(t.get("single_word") or t.get("lstrip") or t.get("rstrip")
                                          or t.get("normalized") or not t.get("content") for t in added):
        return None
    # tokenizers matches added tokens leftmost-longest, tiktoken leftmost-first in no set order: the same
    # unless one token is a prefix of another (then it is a prefix of the next one in sorted order).
    names = sorted(specials)
    if any(b.startswith(a) for a, b in zip(names, names[1:])):
        return None
    table, vocab, merges = _byte_decoder(), model.get("vocab") or {}, model.get("merges") or []
    if not all(c in vocab for c in table) or not all(c in table for s in vocab if s not in specials for c in s):
        return None
    ranks = {bytes(table[c] for c in s): i for s, i in vocab.items() if s not in specials}
    special_ids = set(specials.values())
    if special_ids & set(ranks.values()) or any(vocab.get(s, i) != i for s, i in specials.items()):
        return None
    # The merge rules' results: ordinary tokens, with ids that grow with the rule's rank (so distinct).
    results = [vocab.get("".join(m) if isinstance(m, list) else m.replace(" ", "", 1)) for m in merges]
    if any(r is None or r in special_ids for r in results) or any(a >= b for a, b in zip(results, results[1:])):
        return None
    # Every token's own bytes encode as that one token (tokenizers' own BPE, without pre-tokenization).
    if any([t.value for t in hf.model.tokenize(s)] != [s] for s in vocab if s not in specials):
        return None
    return ranks, specials


def encode_documents(encode_batch, texts: list[str], bos: int | None, eos: int, dtype):
    """Documents as [BOS] ids [EOS] back to back in one numpy array of `dtype` (no BOS where bos is None), with
    each one's token count and UTF-8 byte count: what `lmforge data prepare` writes, ready from a worker."""
    import numpy as np

    head = [] if bos is None else [bos]
    flat, lengths = [], []
    for ids in encode_batch(texts):
        flat += head
        flat += ids
        flat.append(eos)
        lengths.append(len(head) + len(ids) + 1)
    n_bytes = [len(t.encode("utf-8")) for t in texts]
    return np.array(flat, dtype=dtype), np.array(lengths, dtype=np.int64), np.array(n_bytes, dtype=np.int64)


def tokenizing_worker(conn, encoder: FastEncoder, bos: int | None, eos: int, dtype) -> None:
    """A `lmforge data prepare` worker process: encode each list of texts received on `conn` and send back
    `encode_documents` of it (or the exception, its traceback text attached), until None arrives or the parent
    is gone. A thread takes the chunks in as they come, so the parent never blocks sending one while this process
    blocks sending it a result (a deadlock), and the next chunk is here when one is done. This module imports no
    torch, so a spawned worker starts in ~0.3 s."""
    import queue
    import signal
    import threading
    import traceback

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it kills the workers
    chunks: queue.SimpleQueue = queue.SimpleQueue()

    def take_in():
        try:
            while (texts := conn.recv()) is not None:
                chunks.put(texts)
        except BaseException:  # the parent is gone (EOF), or sent what cannot be read: end, so that it shows
            pass
        chunks.put(None)

    threading.Thread(target=take_in, daemon=True).start()
    while (texts := chunks.get()) is not None:
        try:
            result = encode_documents(encoder.encode_batch, texts, bos, eos, dtype)
        except Exception as e:  # the parent raises it; a worker that died instead would look killed
            e.worker_traceback = traceback.format_exc()  # pickled with the exception (its __dict__)
            result = e
        try:
            conn.send(result)
        except OSError:  # the parent is gone
            return
