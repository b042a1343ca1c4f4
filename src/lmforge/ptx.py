"""PPO-ptx (InstructGPT, Ouyang et al. 2022, sec. 3.5): pretraining batches mixed into the RL update, so the
policy keeps its language-modelling ability while it optimises the reward (gamma * E_pretrain[log pi(x)]).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmforge.chat import record_to_messages, render
from lmforge.errors import LmforgeError, where
from lmforge.records import read_records
from lmforge.tokenizer import Tokenizer, iter_documents


@dataclass
class PtxConfig:
    """PPO-ptx: gamma * pretraining LM loss, mixed into the same optimizer step (InstructGPT: gamma = 27.8)."""
    coef: float = 0.0                                  # gamma; 0 = plain PPO
    data: list[str] = field(default_factory=list)     # .txt/.gz documents, .jsonl with "text" or SFT records
    batch_size: int = 4                                # sequences per micro-batch
    seq_len: int = 64


class PtxSource:
    """Pretraining batches for PPO-ptx: random windows of `seq_len` tokens from one token stream.

    The interface is one method, `batch(generator) -> LongTensor (batch_size, seq_len)`: any object with it
    (e.g. a reader of prepared token shards) can be passed to run_ppo(ptx_source=...).
    """

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int):
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len

    @classmethod
    def from_files(cls, paths: list[str], tok: Tokenizer, batch_size: int, seq_len: int) -> "PtxSource":
        """Text documents (.txt/.gz; .jsonl with "text") get BOS/EOS; SFT records are rendered by the chat template."""
        stream: list[int] = []
        for path in paths:
            if str(path).endswith(".jsonl"):
                for lineno, rec in read_records(path):
                    if isinstance(rec, dict) and isinstance(rec.get("text"), str):
                        stream += tok.document_ids(rec["text"])
                        continue
                    try:
                        stream += render(tok, record_to_messages(rec))[0]
                    except ValueError as e:
                        raise LmforgeError(f"{where(path, lineno)}: {e}") from None
            else:
                for doc in iter_documents([path]):
                    stream += tok.document_ids(doc)
        if len(stream) < seq_len:
            raise LmforgeError(f"{', '.join(map(str, paths))}: only {len(stream)} pretraining tokens, "
                               f"fewer than ptx.seq_len={seq_len}")
        return cls(torch.tensor(stream, dtype=torch.long), batch_size, seq_len)

    def batch(self, generator: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, len(self.tokens) - self.seq_len + 1, (self.batch_size,), generator=generator)
        return torch.stack([self.tokens[s:s + self.seq_len] for s in starts.tolist()])
