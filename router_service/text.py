"""Generated tokens as text, piece by piece, ended by stop strings.

A stop string may be split across tokens, and across the pieces a stream sends: text that could still turn out
to be the start of one is held back until it is known not to be, so a stream never sends text that is cut later.
A trailing U+FFFD (a multi-byte character whose remaining bytes are in the next token) is held back the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from router_service.requests import InvalidRequest, is_list, sized

MAX_STOP_STRINGS = 4  # as OpenAI's API allows
# Characters a stop string may have: each is looked for at every step of its sequence, on the replica's event loop.
MAX_STOP_STRING_CHARS = 1000
INCOMPLETE = "\ufffd"


def check_stop_strings(stop: str | Iterable[str] | None, has_tokenizer: bool) -> tuple[str, ...]:
    """A stop string, or several (None: none), checked; for a checkpoint that `has_tokenizer` (they end text)."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if not is_list(stop):
        raise InvalidRequest("stop", f"a string or a list of strings, got {type(stop).__name__}")
    stop = sized(stop)  # counted before it is copied
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequest("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    stop = tuple(stop)
    if not all(isinstance(s, str) for s in stop):
        raise InvalidRequest("stop", f"stop strings must be strings, got {list(stop)!r:.80}")
    if any(not s for s in stop):
        raise InvalidRequest("stop", "a stop string is empty")
    if longest := max((len(s) for s in stop if len(s) > MAX_STOP_STRING_CHARS), default=0):
        raise InvalidRequest("stop", f"a stop string of {longest} characters, more than {MAX_STOP_STRING_CHARS}")
    if stop and not has_tokenizer:
        raise InvalidRequest("stop", "stop strings need the checkpoint's tokenizer; use stop_token_ids")
    return stop


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

    def advance(self, token_ids: list[int], checked: int, count: int, finished: bool) -> tuple[str, int]:
        """The text that is safe to send once tokens [checked, count) of `token_ids` are made, each looked at in
        turn for a stop string (a step may bring several to a reader that fell behind), and how many tokens the
        answer keeps: those up to the one that completed a stop string, else `count`."""
        new = ""
        for end in range(checked + 1, count + 1):
            new += self.update(token_ids[:end], finished and end == count)
            if self.stopped:
                return new, end
        if finished and checked == count:  # it finished without a new token: what was held goes now
            new += self.update(token_ids[:count], True)
        return new, count

    def _held_back(self, text: str) -> int:
        """How many characters at the end of `text` may still change: an incomplete character, and a proper prefix
        of a stop string before it (the incomplete character may be the stop string's next)."""
        complete = text.rstrip(INCOMPLETE)
        return len(text) - len(complete) + max((prefix_at_end(complete, s) for s in self.stop), default=0)


def prefix_at_end(text: str, stop: str) -> int:
    """The length of the longest proper prefix of `stop` that `text` ends with (0 for none). Only where the text's
    last len(stop) - 1 characters hold the stop string's first is a prefix tried, the longest first."""
    tail = text[max(0, len(text) - len(stop) + 1):]
    start = tail.find(stop[0])
    while start >= 0:
        if stop.startswith(tail[start:]):
            return len(tail) - start
        start = tail.find(stop[0], start + 1)
    return 0
