"""Generated tokens as text, piece by piece, ended by stop strings.

A stop string may be split across tokens, and across the pieces a stream sends: text that could still turn out
to be the start of one is held back until it is known not to be, so a stream never sends text that is cut later.
A trailing U+FFFD (a multi-byte character whose remaining bytes are in the next token) is held back the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from router_service.requests import InvalidRequest

MAX_STOP_STRINGS = 4  # as OpenAI's API allows
INCOMPLETE = "\ufffd"


def check_stop_strings(stop: Sequence[str]) -> tuple[str, ...]:
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequest("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    if any(not s for s in stop):
        raise InvalidRequest("stop", "a stop string is empty")
    return tuple(stop)


class TextStream:
    """Feed it a sequence's tokens after each step (`update`); it answers the text that is now safe to send."""

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()):
        self.decode, self.stop = decode, stop
        self.text = ""  # sent so far
        self.stopped = False  # a stop string ended the text

    def update(self, token_ids: list[int], finished: bool) -> str:
        """The text to send after this step (maybe empty). Once a stop string is found, `stopped` is set, the text
        ends just before it, and later calls add nothing."""
        if self.stopped:
            return ""
        full = self.decode(token_ids)
        hits = [i for i in (full.find(s) for s in self.stop) if i >= 0]
        if hits:
            safe, self.stopped = full[:min(hits)], True
        elif finished:
            safe = full
        else:
            safe = full[:len(full) - self._held_back(full)]
        if len(safe) <= len(self.text) or not safe.startswith(self.text):  # nothing new that is safe to send
            return ""
        new, self.text = safe[len(self.text):], safe
        return new

    def _held_back(self, text: str) -> int:
        """How many characters at the end of `text` may still change: an incomplete character, and a proper prefix
        of a stop string before it (the incomplete character may be the stop string's next)."""
        complete = text.rstrip(INCOMPLETE)
        prefix = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(complete)), 0, -1):
                if complete.endswith(s[:n]):
                    prefix = max(prefix, n)
                    break
        return len(text) - len(complete) + prefix
