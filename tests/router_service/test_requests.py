"""A request's checks at their limits: the value at a limit is taken, the one past it refused, naming the field."""

from __future__ import annotations

import pytest

from router_service.config import EngineConfig
from router_service.requests import (
    MAX_STOP_TOKEN_IDS,
    MAX_TOP_LOGPROBS,
    InvalidRequest,
    SamplingParams,
    check_pooling,
    check_prompt,
    make_sampling_params,
    nth_seed,
)

VOCAB = 100
LIMITS = EngineConfig(model="unused", max_prompt_tokens=8, max_new_tokens=20)


def refused(field: str, check, *args, **kwargs) -> None:
    with pytest.raises(InvalidRequest) as e:
        check(*args, **kwargs)
    assert e.value.field == field and str(e.value).startswith(f"{field}: ")


def test_a_prompt_of_the_limit_is_taken_and_one_token_more_refused():
    assert check_prompt([VOCAB - 1] * 8, VOCAB, LIMITS) == [VOCAB - 1] * 8
    refused("input_ids", check_prompt, [1] * 9, VOCAB, LIMITS)
    refused("input_ids", check_prompt, [], VOCAB, LIMITS)
    refused("prompt", check_prompt, [VOCAB], VOCAB, LIMITS, "prompt")  # the field named as the caller calls it
    refused("input_ids", check_prompt, [-1], VOCAB, LIMITS)
    refused("input_ids", check_prompt, [True], VOCAB, LIMITS)


class Endless:
    """A list-like of a huge count, as a protobuf message's repeated field of millions: reading any item fails."""

    def __len__(self):
        return 10**8

    def __iter__(self):
        raise AssertionError("read before its count was checked")


def test_a_list_over_its_limit_is_refused_by_its_count_before_it_is_read():
    refused("input_ids", check_prompt, Endless(), VOCAB, LIMITS)
    refused("stop_token_ids", make_sampling_params, VOCAB, LIMITS, stop_token_ids=Endless())
    assert check_prompt(iter([3, 4]), VOCAB, LIMITS) == [3, 4]  # an iterator of no count is read first


def test_a_request_that_gives_no_length_gets_the_default_within_the_servers_limit():
    assert make_sampling_params(VOCAB, LIMITS).max_new_tokens == min(SamplingParams().max_new_tokens, 20) == 20
    roomy = EngineConfig(model="unused", max_new_tokens=256)
    assert make_sampling_params(VOCAB, roomy).max_new_tokens == SamplingParams().max_new_tokens
    assert make_sampling_params(VOCAB, LIMITS, max_new_tokens=20).max_new_tokens == 20
    refused("max_new_tokens", make_sampling_params, VOCAB, LIMITS, max_new_tokens=21)
    refused("max_new_tokens", make_sampling_params, VOCAB, LIMITS, max_new_tokens=0)


@pytest.mark.parametrize("field, taken, past", [
    ("temperature", [0.0, 0.01, 100.0], [0.009, 100.1, -1.0]),
    ("top_k", [0, 1], [-1]),
    ("top_p", [1.0, 1e-6, 0.0], [-0.01, 1.01, float("nan")]),
    ("seed", [0, 2**63, 2**64 - 1], [-1, 2**64]),
    ("stop_token_ids", [(0, VOCAB - 1), (3,) * MAX_STOP_TOKEN_IDS], [(VOCAB,), (-1,), (3,) * (MAX_STOP_TOKEN_IDS + 1)]),
    ("top_logprobs", [0, MAX_TOP_LOGPROBS], [-1, MAX_TOP_LOGPROBS + 1]),
])
def test_sampling_limits(field, taken, past):
    for value in taken:
        assert getattr(make_sampling_params(VOCAB, LIMITS, **{field: value}), field) == value
    for value in past:
        refused(field, make_sampling_params, VOCAB, LIMITS, **{field: value})


@pytest.mark.parametrize("field, value", [("max_new_tokens", 2.5), ("top_k", "5"), ("seed", 1.0), ("temperature", "1"),
                                          ("top_p", "0.5"), ("stop_token_ids", [3.5]), ("top_logprobs", True),
                                          ("routing", "yes"), ("routing", 1)])
def test_a_value_of_the_wrong_type_is_refused_naming_its_field(field, value):
    """From the Python API, where nothing typed the values before: fails if one gets through to a TypeError or a
    pydantic error that names no field of the call."""
    refused(field, make_sampling_params, VOCAB, LIMITS, **{field: value})


def test_a_field_given_as_none_gets_its_default():
    """None is "not given", for every field alike: the defaults are SamplingParams' own, capped by the server's
    limit on new tokens."""
    from router_service.requests import SamplingParams

    fields = SamplingParams.model_fields
    given = make_sampling_params(VOCAB, LIMITS, **dict.fromkeys(fields))
    assert given == SamplingParams(max_new_tokens=min(SamplingParams().max_new_tokens, LIMITS.max_new_tokens))


def test_numpys_and_torchs_numbers_are_taken_as_python_ones():
    """What a Python caller may hold from a tokenizer or an array: taken, and made Python's own."""
    import numpy as np
    import torch

    params = make_sampling_params(VOCAB, LIMITS, max_new_tokens=np.int64(5), top_k=torch.tensor(3),
                                  top_p=np.float32(0.5), seed=np.uint64(2**63), stop_token_ids=np.array([3, 4]),
                                  routing=np.True_)
    assert (params.max_new_tokens, params.top_k, params.top_p, params.seed, params.stop_token_ids) == \
        (5, 3, 0.5, 2**63, (3, 4))
    assert all(type(v) is int for v in (params.max_new_tokens, params.top_k, params.seed, *params.stop_token_ids))
    assert params.routing is True
    assert check_prompt(np.array([5, 1]), VOCAB, LIMITS) == [5, 1]
    refused("stop_token_ids", make_sampling_params, VOCAB, LIMITS, stop_token_ids=5)
    refused("input_ids", check_prompt, 5, VOCAB, LIMITS)


def test_pooling():
    assert check_pooling("mean") == "mean" and check_pooling("none") == "none"
    refused("pooling", check_pooling, "max")


def test_the_nth_seed_of_a_call_is_its_seed_plus_n_and_a_bad_seed_is_refused():
    """A call's prompts (OpenAI's choices) sample with seed + n, past the largest from 0 again; a seed no request
    could carry is refused, not wrapped into one (-1 would become 2**64 - 1). Fails if a bad seed is taken."""
    import numpy as np

    assert nth_seed(None, 3) is None and nth_seed(7, 0) == 7 and nth_seed(np.int64(7), 2) == 9
    assert nth_seed(2**64 - 1, 1) == 0
    for bad in (-1, 2**64, 1.5, "7"):
        with pytest.raises(InvalidRequest, match="^seed: must be"):
            nth_seed(bad, 1)
