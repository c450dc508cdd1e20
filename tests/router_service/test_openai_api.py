"""OpenAI's API's requests and answers as router_service.openai_api reads and writes them, without a server (the
served routes are tests/router_service/test_openai.py's)."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from router_service.openai_api import (
    OpenAIError,
    completion,
    each_prompt,
    embeddings,
    from_invalid_request,
    legacy_logprobs,
    parse_completion_request,
    parse_embedding_request,
)
from router_service.requests import InvalidRequest

MODEL = "switch-base-8"


def refused(param: str, parse, *args) -> OpenAIError:
    with pytest.raises(OpenAIError) as e:
        parse(*args)
    assert e.value.status == 400 and e.value.param == param and e.value.message.startswith(f"{param}: ")
    return e.value


def test_a_completion_request_takes_null_for_a_default_and_refuses_what_it_would_ignore():
    request = parse_completion_request({"model": MODEL, "prompt": "a", "max_tokens": None, "temperature": None,
                                        "n": None, "echo": None}, MODEL)
    assert (request.max_tokens, request.temperature, request.n, request.echo) == (None, 1.0, 1, False)
    assert parse_completion_request({"model": MODEL, "prompt": "a", "n": 2, "best_of": 2}, MODEL).n == 2
    # OpenAI's range, 0 to 2: one too small to sample by (the native API refuses it) is greedy
    assert parse_completion_request({"model": MODEL, "prompt": "a", "temperature": 0.005}, MODEL).temperature == 0.0
    refused("best_of", parse_completion_request, {"model": MODEL, "prompt": "a", "n": 2, "best_of": 3}, MODEL)
    refused("stream_options", parse_completion_request,
            {"model": MODEL, "prompt": "a", "stream_options": {"include_usage": True}}, MODEL)
    refused("echo", parse_completion_request, {"model": MODEL, "prompt": "a", "echo": True}, MODEL)


def test_values_that_ask_for_nothing_are_taken_and_the_rest_refused():
    """An empty suffix and biases of 0 change nothing, and generic clients send them: taken. Fails if they are
    refused as the fields' other values are."""
    request = parse_completion_request({"model": MODEL, "prompt": "a", "suffix": "", "logit_bias": {"5": 0}}, MODEL)
    assert request.suffix == "" and request.logit_bias == {"5": 0}
    refused("suffix", parse_completion_request, {"model": MODEL, "prompt": "a", "suffix": "b"}, MODEL)
    refused("logit_bias", parse_completion_request,
            {"model": MODEL, "prompt": "a", "logit_bias": {"5": 0, "6": -100}}, MODEL)


def test_an_embedding_request_asks_for_the_models_own_dimensions_or_none():
    assert parse_embedding_request({"model": MODEL, "input": "a", "dimensions": 8}, MODEL, 8).dimensions == 8
    refused("dimensions", parse_embedding_request, {"model": MODEL, "input": "a", "dimensions": 3}, MODEL, 8)


def test_prompts_are_one_or_many_and_never_none():
    assert each_prompt("a", "prompt") == ["a"] and each_prompt([5, 1], "prompt") == [[5, 1]]
    assert each_prompt(["a", "b"], "prompt") == ["a", "b"] and each_prompt([[5], [6]], "prompt") == [[5], [6]]
    refused("prompt", each_prompt, [], "prompt")


def test_base64_embeddings_are_the_float_ones_as_little_endian_float32():
    vectors = [np.array([0.5, -1.25, 3.0e-8], dtype=np.float32), np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)]
    floats = embeddings(MODEL, vectors, "float", 7)
    encoded = embeddings(MODEL, vectors, "base64", 7)
    for plain, packed in zip(floats["data"], encoded["data"]):
        decoded = np.frombuffer(base64.b64decode(packed["embedding"]), dtype="<f4")
        assert decoded.tolist() == np.asarray(plain["embedding"], np.float32).reshape(-1).tolist()
    assert floats["usage"] == {"prompt_tokens": 7, "total_tokens": 7}


def test_a_streams_chunks_carry_usage_null_only_with_include_usage():
    assert completion("c", 1, MODEL, [], None, with_usage=True)["usage"] is None
    assert "usage" not in completion("c", 1, MODEL, [], None, with_usage=False)
    assert completion("c", 1, MODEL, [], {"total_tokens": 3}, with_usage=False)["usage"] == {"total_tokens": 3}


def decode_each(decode):
    """A `decode_many` from a decode of one list."""
    return lambda lists: [decode(ids) for ids in lists]


def test_legacy_logprobs_give_each_token_the_text_it_adds_after_those_before_it():
    """With a SentencePiece-like decode (a word's leading space dropped at the start of a text), a token's text is
    what it adds to the choice's text so far: the tokens joined are the text, the offsets run on from `offset`,
    and each token's alternatives include it. Fails if the tokens before are left out of each token's context."""
    words = {1: "▁hello", 2: "▁world", 3: "!"}

    def decode(ids: list[int]) -> str:
        return "".join(words[i] for i in ids).replace("▁", " ").removeprefix(" ")

    out = legacy_logprobs(decode_each(decode), set(), [1], [2, 3], [-0.1, -0.2], [[(3, -1.0)], [(2, -2.0)]], 5)
    assert out["tokens"] == [" world", "!"] and "hello" + "".join(out["tokens"]) == decode([1, 2, 3])
    assert out["text_offset"] == [5, 11] and out["token_logprobs"] == [-0.1, -0.2]
    assert out["top_logprobs"] == [{"!": -1.0, " world": -0.1}, {" world": -2.0, "!": -0.2}]


def test_a_tokens_text_follows_the_shown_tokens_before_it_past_any_hidden_ones():
    """Hidden tokens (<unk>, which decode leaves out) between two words: the second still adds its leading space,
    as in the choice's text. Fails if its context is the last tokens whatever they are (hidden alone, it decodes to
    nothing, and the word loses its space)."""
    words = {1: "▁hello", 2: "▁world", 9: "<unk>"}

    def decode(ids: list[int]) -> str:
        return "".join(words[i] for i in ids if i != 9).replace("▁", " ").removeprefix(" ")

    out = legacy_logprobs(decode_each(decode), {9}, [1] + [9] * 12, [2], [-0.1], [], 5)
    assert out["tokens"] == [" world"] and "hello" + out["tokens"][0] == decode([1] + [9] * 12 + [2])


def test_alternatives_that_add_the_same_text_keep_the_likeliest():
    """At a choice's start "▁o" and "o" both add "o", and special tokens add nothing: one key each, with the likeliest
    alternative's log-probability (the chosen token's own where it is one). Fails if a less likely alternative
    overwrites a likelier one."""
    words = {1: "▁o", 2: "o", 3: "</s>", 4: "<pad>", 5: "x"}

    def decode(ids: list[int]) -> str:
        return "".join("" if words[i].startswith("<") else words[i] for i in ids).replace("▁", " ").removeprefix(" ")

    out = legacy_logprobs(decode_each(decode), set(), [], [5], [-0.5],
                          [[(5, -0.5), (3, -1.0), (4, -2.0), (1, -2.5), (2, -3.0)]], 0)
    assert out["top_logprobs"] == [{"x": -0.5, "": -1.0, "o": -2.5}]
    out = legacy_logprobs(decode_each(decode), set(), [], [2], [-2.0], [[(1, -0.1), (2, -2.0)]], 0)
    assert out["tokens"] == ["o"] and out["top_logprobs"] == [{"o": -2.0}]


def test_the_native_apis_errors_take_openais_field_names():
    for native, param in (("max_new_tokens", "max_tokens"), ("top_logprobs", "logprobs"), ("seed", "seed")):
        error = from_invalid_request(InvalidRequest(native, "bad"))
        assert (error.status, error.param, error.message) == (400, param, f"{param}: bad")


@pytest.mark.parametrize("param, fields, message", [
    ("prompt", {"prompt": [1, True]}, "must be a string, a list of strings, a list of token ids (whole numbers) or a "),
    ("prompt", {"prompt": [[1, 2], [3, 4.0]]}, "must be a string, a list of strings, a list of token ids"),
    ("stop", {"stop": [1]}, "must be a string or a list of strings"),
    ("temperature", {"temperature": 2.5}, "Input should be less than or equal to 2"),
    ("stream_options.include_usage", {"stream": True, "stream_options": {"include_usage": "yes"}},
     "Input should be a valid boolean"),
    ("stream_options.usage", {"stream": True, "stream_options": {"usage": True}}, "unknown field"),
    ("input", {"input": "a"}, "unknown field"),  # not the union's message: an embeddings field sent here
    ("prompt", {"prompt": None}, "Field required"),
    ("colour", {"colour": None}, "unknown field"),  # a null does not hide an unknown field
    ("stream_options.usage", {"stream": True, "stream_options": {"usage": None}}, "unknown field"),
    ("logit_bias.5", {"logit_bias": {"5": None}}, "Input should be a valid number"),  # refused, not emptied
    ("seed", {"seed": 2**64}, "must be a 64-bit integer, got 18446744073709551616"),
    ("seed", {"seed": -2**63 - 1}, "must be a 64-bit integer"),
])
def test_a_refusal_says_what_the_field_takes(param, fields, message):
    """A field of several types names them all (pydantic's first error names the first alone: a string, for token
    ids with a true among them); a nested field is named by its path; the temperature's range is OpenAI's."""
    request = {"model": MODEL, "prompt": "a", **fields}
    assert refused(param, parse_completion_request, request, MODEL).message.startswith(f"{param}: {message}")


def test_a_negative_seed_is_its_twos_complement():
    """OpenAI takes signed seeds; the native API (and torch) unsigned ones."""
    for seed, unsigned in [(-1, 2**64 - 1), (-2**63, 2**63), (0, 0), (2**64 - 1, 2**64 - 1), (None, None)]:
        assert parse_completion_request({"model": MODEL, "prompt": "a", "seed": seed}, MODEL).seed == unsigned


def test_a_nested_field_sent_as_null_takes_its_default():
    request = parse_completion_request({"model": MODEL, "prompt": "a", "stream": True,
                                        "stream_options": {"include_usage": None}}, MODEL)
    assert request.stream_options.include_usage is False
    refused("prompt", parse_completion_request, {"model": MODEL, "prompt": [5, None]}, MODEL)  # a null in a list
