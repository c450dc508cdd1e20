"""OpenAI's completions and embeddings APIs (`POST /v1/completions`, `POST /v1/embeddings`, `GET /v1/models`),
for the tools that speak them: the requests with OpenAI's fields and defaults (temperature 1, 16 tokens), answers
in its layout (the legacy logprobs included; embeddings as floats or base64), and failures as its error object
with the status OpenAI would use. The server maps them onto the same batcher as the native API."""

from __future__ import annotations

import base64
import math
import typing
import uuid
from collections import deque
from collections.abc import Callable, Collection
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from router_service.requests import DEFAULT_POOLING, MAX_TOP_LOGPROBS, MIN_TEMPERATURE, InvalidRequest

DEFAULT_MAX_TOKENS = 16  # OpenAI's, where a request gives none (at most the server's own limit)
# Tokens decoded before one to find the text it adds: enough for its word's leading space (which SentencePiece drops
# from a token decoded alone) and the other bytes of a character it ends.
CONTEXT_TOKENS = 8
MAX_CHOICES = 16  # n: completions per prompt
NOT_CHAT = ("Switch Transformers are not chat models, so there is no /v1/chat/completions: send a prompt to "
            "/v1/completions")
# Fields named otherwise in the native API, for the errors it raises.
FIELD_NAMES = {"max_new_tokens": "max_tokens", "top_logprobs": "logprobs"}
Prompts = str | list[str] | list[int] | list[list[int]]  # one text, texts, one token-id list, token-id lists
# What a field of several types takes, for its errors (pydantic's name the first type alone).
PROMPTS_TAKE = "a string, a list of strings, a list of token ids (whole numbers) or a list of such lists"
UNION_FIELDS = {"prompt": PROMPTS_TAKE, "input": PROMPTS_TAKE, "stop": "a string or a list of strings"}


def each_prompt(prompts: Prompts, param: str) -> list[str | list[int]]:
    """Each prompt of a request's `prompt` or `input`: a string, or token ids."""
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        return [prompts]
    if not prompts:
        raise OpenAIError(400, f"{param}: at least one is needed", param)
    return list(prompts)


class OpenAIError(Exception):
    """A failed call, as OpenAI reports it: `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# Fields of another type are refused, not converted ("8" to 8, true to 1), as OpenAI's API does. (The native HTTP API
# reads its JSON as protobuf's JSON mapping does, which takes "8" for a number.)
STRICT = ConfigDict(extra="forbid", strict=True)


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False  # a last chunk with the usage; every chunk before it has "usage": null
    include_obfuscation: bool = False  # accepted and unused: chunks carry no padding against length side channels


class CompletionRequest(BaseModel):
    """POST /v1/completions. What Switch cannot do (echo, suffix, penalties, logit_bias, best_of above n) is
    refused by name rather than ignored."""

    model_config = STRICT

    model: str
    prompt: Prompts
    max_tokens: int | None = Field(None, ge=1)  # None: DEFAULT_MAX_TOKENS
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    seed: int | None = None
    stop: str | list[str] | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted and unused, as a tag for the caller's own logs

    @field_validator("temperature")
    @classmethod
    def sampled_or_greedy(cls, temperature: float) -> float:
        """OpenAI takes any temperature from 0 to 2; one below MIN_TEMPERATURE, which the native API refuses, is
        greedy here (some evaluation tools send 0.001 for it)."""
        return 0.0 if temperature < MIN_TEMPERATURE else temperature

    @field_validator("seed")
    @classmethod
    def unsigned_seed(cls, seed: int | None) -> int | None:
        """OpenAI's seed is a signed 64-bit integer, the native API's (and torch's) an unsigned one: a negative one
        is taken as its two's complement."""
        if seed is not None and not -2**63 <= seed < 2**64:
            raise ValueError(f"must be a 64-bit integer, got {seed}")
        return None if seed is None else seed % 2**64

    def prompts(self) -> list[str | list[int]]:
        return each_prompt(self.prompt, "prompt")


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings, with `pooling` besides OpenAI's fields."""

    model_config = STRICT

    model: str
    input: Prompts
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)  # only the model's own (d_model): there is no shorter form
    pooling: str = DEFAULT_POOLING  # requests.POOLINGS
    user: str | None = None  # accepted and unused, as a tag for the caller's own logs

    def inputs(self) -> list[str | list[int]]:
        return each_prompt(self.input, "input")


def validated(body: object, kind: type[BaseModel], model_id: str):
    """The request in `body`, checked against `kind`'s fields and the served model's id."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "the body must be a JSON object")
    try:
        request = kind.model_validate(without_nulls(body, kind))
    except ValidationError as e:
        first = e.errors()[0]
        loc = first["loc"]
        param = str(loc[0]) if loc else None
        if param in UNION_FIELDS and len(loc) > 1:  # a value of none of its types (not one missing, or unknown)
            where, message = param, f"must be {UNION_FIELDS[param]}"
        else:  # a nested field by its path: stream_options.include_usage
            where = ".".join(str(part) for part in loc)
            message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"].removeprefix(
                "Value error, ")
        raise OpenAIError(400, f"{where}: {message}" if where else message, where or None) from None
    check_model(request.model, model_id)
    return request


def without_nulls(body: dict, kind: type[BaseModel]) -> dict:
    """A request's body without the fields of `kind` sent as null, its own and those of the objects it nests
    (stream_options): OpenAI's optional fields take null for their default, as its client sends them. (An unknown
    field stays, null or not, and is refused; so does a null among a map's values, logit_bias's, or in a list.)"""
    out = {}
    for name, value in body.items():
        field = kind.model_fields.get(name)
        if value is None and field is not None:
            continue
        nested = field is not None and next((t for t in (field.annotation, *typing.get_args(field.annotation))
                                             if isinstance(t, type) and issubclass(t, BaseModel)), None)
        out[name] = without_nulls(value, nested) if nested and isinstance(value, dict) else value
    return out


def check_model(model: str, model_id: str) -> None:
    """A request for another model than the one served here is OpenAI's 404 `model_not_found`."""
    if model != model_id:
        raise OpenAIError(404, f"model: '{model}' is not served here; this server serves '{model_id}'", "model",
                          "model_not_found")


def parse_completion_request(body: object, model_id: str) -> CompletionRequest:
    request = validated(body, CompletionRequest, model_id)
    # Values that ask for nothing (an empty suffix, biases of 0) are taken, as generic clients and templates send them.
    unsupported = {"echo": request.echo, "suffix": bool(request.suffix),
                   "presence_penalty": request.presence_penalty != 0,
                   "frequency_penalty": request.frequency_penalty != 0,
                   "logit_bias": any(bias != 0 for bias in (request.logit_bias or {}).values())}
    for name, asked in unsupported.items():
        if asked:
            raise OpenAIError(400, f"{name}: not supported by this server", name)
    if request.best_of is not None and request.best_of != request.n:
        raise OpenAIError(400, f"best_of: only best_of equal to n ({request.n}) is supported", "best_of")
    if request.stream_options is not None and not request.stream:
        raise OpenAIError(400, "stream_options: only allowed with stream true", "stream_options")
    return request


def parse_embedding_request(body: object, model_id: str, dimensions: int) -> EmbeddingRequest:
    request = validated(body, EmbeddingRequest, model_id)
    if request.dimensions not in (None, dimensions):
        raise OpenAIError(400, f"dimensions: this model's embeddings have {dimensions}, got {request.dimensions}",
                          "dimensions")
    return request


def embeddings(model_id: str, vectors: list[np.ndarray], encoding_format: str, prompt_tokens: int) -> dict:
    """The embeddings answer: per input, its vector ([d_model], or [tokens, d_model] without pooling) as floats or
    as base64 of its float32 values (little-endian, token by token), OpenAI's client's default."""
    def encode(v: np.ndarray):
        if encoding_format == "base64":
            return base64.b64encode(v.astype("<f4").tobytes()).decode()
        return v.tolist()

    return {"object": "list", "model": model_id,
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def from_invalid_request(e: InvalidRequest) -> OpenAIError:
    """A native API error, with OpenAI's field names."""
    param = FIELD_NAMES.get(e.field, e.field)
    return OpenAIError(400, f"{param}: {e.message}", param)


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "switch-serve"}


def models_list(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [model_card(model_id, created)]}


def completion(cid: str, created: int, model_id: str, choices: list[dict], usage: dict | None,
               with_usage: bool = True) -> dict:
    """A completion, or a chunk of one (all of a stream's with the same `cid` and `created`); `usage` is left out where
    it is None and not `with_usage` (a stream's chunks without include_usage)."""
    out = {"id": cid, "object": "text_completion", "created": created, "model": model_id, "choices": choices}
    if usage is not None or with_usage:
        out["usage"] = usage
    return out


def choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def legacy_logprobs(decode_many: Callable[[list[list[int]]], list[str]], hidden: Collection[int], before: list[int],
                    token_ids: list[int], token_logprobs: list[float], top: list[list[tuple[int, float]]],
                    offset: int) -> dict:
    """The completions API's logprobs object for some tokens of a choice, which follow its tokens `before` them,
    whose text takes `offset` characters. Each token's text is what it adds to the text before it (`decode_many`,
    which leaves out the `hidden` tokens, decodes every list at once), so the tokens joined are the choice's text
    (and, where a stop string ended it, the text of the tokens that made it up, which the choice's text leaves out);
    each token's alternatives (`top`, where asked) include the token itself, as OpenAI's do. Alternatives that add
    the same text (a word with and without its leading space at the start, the special tokens, which add none) are
    one key, with the likeliest's log-probability (the token itself's, where it is one of them)."""
    shown = deque(last_shown(before, hidden, CONTEXT_TOKENS), maxlen=CONTEXT_TOKENS)
    lists, options = [], []  # per token: its context, then the context and each option (the token, its alternatives)
    for i, token in enumerate(token_ids):
        context = list(shown)
        options.append([(token, token_logprobs[i])] + (top[i] if top else []))
        lists.append(context)
        lists.extend(context + [t] for t, _ in options[-1])
        if token not in hidden:
            shown.append(token)
    decoded = iter(decode_many(lists))
    texts, tops, offsets = [], [], []
    for (_, logprob), *alternatives in options:
        start = len(next(decoded))
        texts.append(next(decoded)[start:])
        added: dict[str, float] = {}
        for _, lp in alternatives:
            text = next(decoded)[start:]
            added[text] = max(lp, added.get(text, -math.inf))
        tops.append(added | {texts[-1]: logprob})
        offsets.append(offset)
        offset += len(texts[-1])
    return {"tokens": texts, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def last_shown(token_ids: list[int], hidden: Collection[int], n: int) -> list[int]:
    """The last `n` of `token_ids` that are not `hidden`: a context of hidden tokens alone decodes to nothing."""
    shown = []
    for token in reversed(token_ids):
        if token not in hidden:
            shown.append(token)
            if len(shown) == n:
                break
    return shown[::-1]


def finish_reason(native: str | None) -> str | None:
    """OpenAI says "stop" for the end of sequence token as well as for a stop string or token."""
    return None if native is None else "length" if native == "length" else "stop"
