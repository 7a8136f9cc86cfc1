"""Turns a sequence's token bytes into text deltas that are safe to send.

Two things hold text back: a UTF-8 character split across tokens (sent once whole) and text
that may be the start of a stop string (sent once it cannot be, or dropped when it is one).
Invalid bytes become U+FFFD instead of failing the stream.
"""

import codecs


class TextStream:
    """Feed token bytes in order; get back the text that may be sent now."""

    def __init__(self, stop: list[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = [s for s in stop if s]
        self._held = ""
        self.stopped = False
        self.matched = ""  # the stop string that stopped it

    def feed(self, piece: bytes) -> str:
        """Adds one token's bytes; returns the text now safe to send. After a stop string is
        seen, `stopped` is True and the text before it is the last returned."""
        if self.stopped:
            return ""
        self._held += self._decoder.decode(piece)
        if not self._stop:
            text, self._held = self._held, ""
            return text
        found = [(i, s) for s in self._stop if (i := self._held.find(s)) >= 0]
        if found:
            cut, self.matched = min(found, key=lambda hit: hit[0])
            self.stopped = True
            text, self._held = self._held[:cut], ""
            return text
        keep = self._longest_stop_prefix_suffix()
        split = len(self._held) - keep
        text, self._held = self._held[:split], self._held[split:]
        return text

    def flush(self) -> str:
        """The text still held when generation ends for another reason than a stop string."""
        if self.stopped:
            return ""
        text = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return text

    def _longest_stop_prefix_suffix(self) -> int:
        """Length of the longest end of the held text that begins some stop string."""
        held = self._held
        best = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(held)), best, -1):
                if held.endswith(stop[:n]):
                    best = n
                    break
        return best
