"""Text as it streams: stop strings found across token and chunk boundaries, and nothing sent that is cut later."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from router_service.requests import InvalidRequest
from router_service.text import MAX_STOP_STRING_CHARS, TextStream, check_stop_strings, prefix_at_end

PIECES = ["The", " cap", "ital", " of", " Fr", "ance", " is", " Par", "is", ".", " \ufffd"]


def stream(pieces: list[str], stop: tuple[str, ...]) -> tuple[list[str], TextStream]:
    """Decode one more piece per step, as a tokenizer would one more token."""
    text = TextStream(lambda ids: "".join(pieces[i] for i in ids), stop)
    sent = [text.update(list(range(n)), finished=n == len(pieces)) for n in range(1, len(pieces) + 1)]
    return sent, text


def test_a_stop_string_split_across_tokens_ends_the_text_before_it():
    sent, text = stream(PIECES[:-1], ("Paris",))
    assert "".join(sent) == "The capital of France is " and text.stopped
    assert all("P" not in piece for piece in sent)  # " Par" was held back, never sent and then cut


def test_the_earliest_stop_string_wins_and_no_stop_sends_everything():
    sent, text = stream(PIECES[:-1], ("is", "of"))
    assert "".join(sent) == "The capital " and text.stopped
    sent, text = stream(PIECES[:-1], ())
    assert "".join(sent) == "".join(PIECES[:-1]) and not text.stopped


def test_an_incomplete_character_waits_for_its_next_token():
    text = TextStream(lambda ids: ["a", "a\ufffd", "a\u00e9"][len(ids) - 1])
    assert [text.update([0] * n, finished=False) for n in (1, 2, 3)] == ["a", "", "\u00e9"]


def test_a_stop_strings_start_waits_behind_an_incomplete_character():
    """A byte-level tokenizer decodes a character split over tokens as U+FFFD until its last byte comes: the start of
    a stop string before it is held back too, since that character may be the stop string's next. Fails if "東京"
    is sent before "は" ends the text at its start."""
    decoded = ["東", "東\ufffd", "東京\ufffd", "東京は", "東京は日本"]
    text = TextStream(lambda ids: decoded[len(ids) - 1], ("東京は",))
    assert [text.update([0] * n, finished=False) for n in range(1, 5)] == ["", "", "", ""] and text.stopped
    text = TextStream(lambda ids: decoded[len(ids) - 1], ("京都",))
    assert [text.update([0] * n, finished=n == 5) for n in range(1, 6)] == ["東", "", "", "京は", "日本"]


def test_text_that_decodes_otherwise_once_more_tokens_come_is_not_sent_in_pieces_that_do_not_join():
    """Where decoding more tokens changes text already sent (a tokenizer whose earlier characters depend on later
    tokens), no piece is sent that would join into text the tokens never decoded to: what was sent stays the stream's
    text. Fails if the rest is cut at the length already sent regardless."""
    text = TextStream(lambda ids: ["ab", "xbc", "xbcd"][len(ids) - 1])
    sent = [text.update([0] * n, finished=n == 3) for n in (1, 2, 3)]
    assert sent == ["ab", "", ""] and "".join(sent) == text.text


@given(st.lists(st.text(alphabet="ab \ufffd", min_size=1, max_size=3), min_size=1, max_size=12),
       st.lists(st.text(alphabet="ab ", min_size=1, max_size=3), max_size=4))
@example(pieces=["a", "b", " "], stop=["b", "ab "])  # "b" ends it at the second piece: "ab " never comes
def test_what_is_sent_is_always_a_prefix_of_the_final_text(pieces, stop):
    sent, text = stream(pieces, tuple(stop))
    # Decoding ends at the first piece after which the text holds a stop string, cut where the earliest one begins.
    texts = ["".join(pieces[:n]) for n in range(1, len(pieces) + 1)]
    final = next((t for t in texts if any(s in t for s in stop)), texts[-1])
    hits = [final.find(s) for s in stop if s in final]
    assert "".join(sent) == (final[:min(hits)] if hits else final)
    assert text.stopped == bool(hits)


def test_stop_strings_are_checked():
    assert check_stop_strings(["a", "b"], True) == ("a", "b")
    assert check_stop_strings(["a", "b", "c", "d"], True) == ("a", "b", "c", "d")  # OpenAI's most
    with pytest.raises(InvalidRequest, match="^stop: at most 4"):
        check_stop_strings(["a"] * 5, True)
    with pytest.raises(InvalidRequest, match="^stop: a stop string is empty"):
        check_stop_strings([""], True)
    assert check_stop_strings(["a" * MAX_STOP_STRING_CHARS], True) == ("a" * MAX_STOP_STRING_CHARS,)
    with pytest.raises(InvalidRequest, match=f"^stop: a stop string of {MAX_STOP_STRING_CHARS + 1} characters"):
        check_stop_strings(["a", "b" * (MAX_STOP_STRING_CHARS + 1)], True)
    # One string is one stop string, not its characters; what is not strings is refused.
    assert check_stop_strings("\n\n", True) == ("\n\n",) and check_stop_strings(iter(["a"]), True) == ("a",)
    assert check_stop_strings(None, False) == check_stop_strings([], False) == ()  # none: no tokenizer needed
    with pytest.raises(InvalidRequest, match="^stop: a string or a list of strings, got int"):
        check_stop_strings(5, True)
    with pytest.raises(InvalidRequest, match="^stop: stop strings must be strings"):
        check_stop_strings(["a", 5], True)


@given(st.text(alphabet="ab", max_size=12), st.text(alphabet="ab", min_size=1, max_size=6))
def test_the_prefix_held_back_is_the_longest_the_text_ends_with(text, stop):
    longest = max((n for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)
    assert prefix_at_end(text, stop) == longest
