"""SentencePiece tokenizer and the incremental detokenizer that turns a token stream into UTF-8 text deltas.

Encoding adds no BOS by default (as run.py). The detokenizer emits text only once its bytes are complete,
so the concatenated deltas always equal `decode()` of the whole sequence.
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    def __init__(self, model_file: str | Path):
        self.path = Path(model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"{model_file}: not a SentencePiece model ({exc})") from None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    def detokenizer(self, prompt_ids: list[int] | None = None) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, prompt_ids)


class IncrementalDetokenizer:
    """Emits the text each new token adds, holding back incomplete UTF-8 (byte-fallback pieces).

    Decodes a short window [prefix_offset, end) and diffs it against [prefix_offset, read_offset): whatever
    SentencePiece does at the start of a window (dropping the dummy-prefix space) cancels out.
    `prompt_ids` give the first window context so the first generated word keeps its leading space.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids or [])[-6:]
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, token_id: int) -> str:
        """Add one token; return the new text (possibly empty while bytes are incomplete)."""
        self.ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """At end of stream: return whatever is still held back (incomplete bytes decode as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith(REPLACEMENT_CHAR)):
            delta = new_text[len(prefix_text):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return delta
        return ""
