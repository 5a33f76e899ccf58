"""Per-sequence text output: detokenized deltas with stop strings applied.

A suffix that could still become a stop string is held back, so a client never sees part of a stop
string; on a match the text is cut just before it.
"""

from __future__ import annotations

from grokserve.model.tokenizer import IncrementalDetokenizer


class TextStream:
    def __init__(self, detokenizer: IncrementalDetokenizer | None, stop: tuple[str, ...] = ()):
        self.detokenizer = detokenizer
        self.stop = tuple(s for s in stop if s)
        self.pending = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the text that is now safe to send. Sets `stopped` on a stop-string match."""
        if self.detokenizer is None or self.stopped:
            return ""
        return self._release(self.pending + self.detokenizer.push(token_id), final=False)

    def finish(self) -> str:
        """End of sequence: release what was held back (incomplete bytes included)."""
        if self.detokenizer is None or self.stopped:
            return ""
        return self._release(self.pending + self.detokenizer.flush(), final=True)

    def _release(self, text: str, final: bool) -> str:
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            self.pending = ""
            return text[:min(hits)]
        hold = 0 if final else self._partial_stop_suffix(text)
        self.pending = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold]

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
