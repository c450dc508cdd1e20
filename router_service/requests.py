"""What a caller may ask for, and checking it before any work starts. Every error names the field it is about."""

from __future__ import annotations

import numbers
import operator
import typing

from pydantic import BaseModel, ConfigDict, Field

from router_service.config import EngineConfig, ServerConfig


class InvalidRequest(ValueError):
    """Bad input: maps to gRPC INVALID_ARGUMENT / HTTP 400. The message starts with the field's name."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message

    def __reduce__(self):  # crosses Ray's process boundaries intact
        return InvalidRequest, (self.field, self.message)


POOLINGS = ("mean", "none")  # an embedding: the mean over the input's tokens, or every token's vector
DEFAULT_POOLING = "mean"
MIN_TEMPERATURE = 0.01  # below it sampling is greedy in all but name
MAX_TEMPERATURE = 100.0  # above it sampling is uniform in all but name
FLOAT32_ROUNDING = 1e-7  # relative: the proto's floats are float32, in which 0.01 arrives as 0.0099999998
MAX_TOP_LOGPROBS = 5  # alternatives per token, as OpenAI's completions API allows
# Each is looked for at every step of its sequence, on the batching thread the whole batch shares.
MAX_STOP_TOKEN_IDS = 64
# A prompt's text of more characters than this a token of max_prompt_tokens is refused before it is tokenized, which
# runs on the replica's event loop (13 MB of text took 7 s of it to be refused): a bound on the work a request may
# cause, whatever its text tokenizes to (a run of spaces or of unknown characters may be one token).
MAX_CHARS_PER_PROMPT_TOKEN = 64
# The most bytes a character of a prompt's text takes in a JSON body: escaped, as json.dumps writes any but ASCII,
# one beyond the Basic Multilingual Plane (an emoji) as two escapes of a surrogate pair.
JSON_BYTES_PER_CHAR = 12


class SamplingParams(BaseModel):
    """How one request decodes; the defaults are what a request that says nothing gets."""

    model_config = ConfigDict(frozen=True)

    max_new_tokens: int = Field(32, description="the most tokens to generate")
    temperature: float = Field(0.0, description=f"0: greedy; otherwise sample ({MIN_TEMPERATURE:g} to "
                                                f"{MAX_TEMPERATURE:g})")
    top_k: int = Field(0, description="sample among the k most likely tokens (0: off)")
    top_p: float = Field(1.0, description="sample among the most likely tokens whose probability adds up to p "
                                          "(1: off; 0: the most likely alone); applied after temperature and top_k, "
                                          "as transformers does")
    seed: int | None = Field(None, description="makes sampling reproducible (default: a fresh random seed)")
    stop_token_ids: tuple[int, ...] = Field((), description="end on any of these (finish_reason stop)")
    top_logprobs: int = Field(0, description="record this many most likely tokens and their log-probabilities at "
                                             f"each step (0 to {MAX_TOP_LOGPROBS})")
    routing: bool = Field(False, description="record where each sparse layer sent each of the request's positions")


def check_seed(seed) -> int:
    """A seed as the proto's uint64 carries it, what torch's generators take."""
    seed = _whole("seed", seed)
    if not 0 <= seed < 2**64:
        raise InvalidRequest("seed", f"must be between 0 and 2**64 - 1, got {seed}")
    return seed


def nth_seed(seed: int | None, n: int) -> int | None:
    """The seed of the nth of the samplings one `seed` asks for (a call's prompts, OpenAI's choices): seed + n, past
    the largest from 0 again, so that they differ and the call is reproducible."""
    return None if seed is None else (check_seed(seed) + n) % 2**64


def check_pooling(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise InvalidRequest("pooling", f"must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    return pooling


def check_prompt_text(text, limits: EngineConfig, field: str) -> str:
    """A prompt's text, before it is tokenized: a non-empty string not longer than any prompt the limits take."""
    if not isinstance(text, str):
        raise InvalidRequest(field, f"must be a string, got {type(text).__name__}")
    if not text:
        raise InvalidRequest(field, "empty prompt")
    most = limits.max_prompt_tokens * MAX_CHARS_PER_PROMPT_TOKEN
    if len(text) > most:
        raise InvalidRequest(field, f"{len(text)} characters, more than a prompt of at most {limits.max_prompt_tokens} "
                                    f"tokens can have here ({most})")
    return text


def check_prompt(ids, vocab_size: int, limits: EngineConfig, field: str = "input_ids") -> list[int]:
    """A prompt's token ids (a list, or numpy's or torch's integers) as a list of ints, checked."""
    if not is_list(ids):
        raise InvalidRequest(field, f"must be a list of token ids, got {type(ids).__name__}")
    ids = sized(ids)
    if not len(ids):
        raise InvalidRequest(field, "empty prompt")
    if len(ids) > limits.max_prompt_tokens:
        raise InvalidRequest(field, f"{len(ids)} tokens, more than the limit of {limits.max_prompt_tokens}")
    tokens = [integer(t) for t in ids]
    bad = [t for t, token in zip(ids, tokens) if token is None or not 0 <= token < vocab_size]
    if bad:
        raise InvalidRequest(field, f"token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
    return tokens


def is_list(value) -> bool:
    """Whether `value` is a list of values (any iterable but a string)."""
    return isinstance(value, typing.Iterable) and not isinstance(value, str | bytes)


def sized(values: typing.Iterable) -> typing.Sized:
    """`values` as they are where their count is known (a list, a protobuf message's repeated field, an array), else
    as a list: a count is checked before the values are copied, which a request of millions would make slow."""
    return values if isinstance(values, typing.Sized) else list(values)


def integer(value) -> int | None:
    """`value` as an int where it is an integer (numpy's, a tensor of one, but no bool), else None."""
    try:
        return None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        return None


def _whole(field: str, value) -> int:
    """`value` as an int (see `integer`), else an InvalidRequest naming `field`."""
    if (whole := integer(value)) is None:
        raise InvalidRequest(field, f"must be a whole number, got {value!r}")
    return whole


def _number(field: str, value) -> float:
    """`value` as a float: any real number (numpy's too) but a bool, else an InvalidRequest naming `field`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidRequest(field, f"must be a number, got {value!r}")
    return float(value)


def make_sampling_params(vocab_size: int, limits: EngineConfig, *, max_new_tokens: int | None = None,
                         temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                         seed: int | None = None, stop_token_ids: list[int] | tuple[int, ...] | None = None,
                         top_logprobs: int | None = None, routing: bool | None = None) -> SamplingParams:
    """Defaults (SamplingParams') for what is not given; range checks for what is."""
    defaults = SamplingParams()
    if max_new_tokens is None:
        max_new_tokens = min(defaults.max_new_tokens, limits.max_new_tokens)
    max_new_tokens = _whole("max_new_tokens", max_new_tokens)
    if not 1 <= max_new_tokens <= limits.max_new_tokens:
        raise InvalidRequest("max_new_tokens", f"must be between 1 and {limits.max_new_tokens}, got {max_new_tokens}")
    temperature = defaults.temperature if temperature is None else _number("temperature", temperature)
    if not (temperature == 0.0 or MIN_TEMPERATURE * (1 - FLOAT32_ROUNDING) <= temperature <= MAX_TEMPERATURE):
        raise InvalidRequest("temperature", f"must be 0 (greedy) or between {MIN_TEMPERATURE:g} and "
                                            f"{MAX_TEMPERATURE:g}, got {temperature:g}")
    top_k = defaults.top_k if top_k is None else _whole("top_k", top_k)
    if top_k < 0:
        raise InvalidRequest("top_k", f"must be 0 (off) or positive, got {top_k}")
    top_p = defaults.top_p if top_p is None else _number("top_p", top_p)
    if not 0.0 <= top_p <= 1.0:  # NaN too
        raise InvalidRequest("top_p", f"must be between 0 and 1, got {top_p:g}")  # :g, not float32's digits
    seed = None if seed is None else check_seed(seed)
    stop_token_ids = defaults.stop_token_ids if stop_token_ids is None else stop_token_ids
    if not is_list(stop_token_ids):
        raise InvalidRequest("stop_token_ids", f"must be a list of token ids, got {stop_token_ids!r}")
    stop_token_ids = sized(stop_token_ids)
    if len(stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequest("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS}, got {len(stop_token_ids)}")
    stop_token_ids = tuple(_whole("stop_token_ids", t) for t in stop_token_ids)
    bad = [t for t in stop_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequest("stop_token_ids", f"token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
    top_logprobs = defaults.top_logprobs if top_logprobs is None else _whole("top_logprobs", top_logprobs)
    if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequest("top_logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}, got {top_logprobs}")
    routing = defaults.routing if routing is None else routing
    if type(routing).__name__ not in ("bool", "bool_"):  # Python's or numpy's (bool_ before numpy 2), not 0 or 1
        raise InvalidRequest("routing", f"must be true or false, got {routing!r}")
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          seed=seed, stop_token_ids=stop_token_ids, top_logprobs=top_logprobs,
                          routing=bool(routing))


class BodyLimits(typing.NamedTuple):
    """Bounds on a JSON request body, checked before the body is parsed into a request (protobuf's and pydantic's
    parsing of 2 million token ids took 1-4 s of the replica's event loop, before the prompt's length was checked):
    none that a request the server takes could exceed."""

    bytes: int  # a request's every sequence with a prompt of the most characters, each escaped, and 1 MiB more
    # In any list (a prompt's token ids, a request's prompts or inputs, its stop token ids) or object (logit_bias),
    # twice the most any takes: one a little over its limit gets the check that names that limit.
    items: int
    # Lists and objects in the whole body: two for each sequence (an input's object and its ids) and some for the
    # request's own (stop, stream_options and the like). Bounds the walks over a body before it is parsed.
    containers: int

    @classmethod
    def of(cls, limits: ServerConfig) -> BodyLimits:
        sequences = limits.max_waiting + limits.max_sequences  # the most one request may queue (Scheduler.check_count)
        prompt_bytes = limits.max_prompt_tokens * MAX_CHARS_PER_PROMPT_TOKEN * JSON_BYTES_PER_CHAR
        return cls(sequences * prompt_bytes + 2**20, 2 * max(limits.max_prompt_tokens, sequences, MAX_STOP_TOKEN_IDS),
                   2 * sequences + 64)
