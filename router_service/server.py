"""The Ray Serve deployments: the front model behind gRPC (`switchserve.v1.SwitchServe` and the standard
`grpc.health.v1.Health`, through Serve's gRPC proxy) and HTTP JSON (`POST /v1/generate`, `GET /v1/model`, and
OpenAI's `POST /v1/completions`, `POST /v1/embeddings` and `GET /v1/models`), and the expert fleet.

Every front replica runs its own front and continuous batcher and shares the expert actors with the others. The
actors belong to one `ExpertFleet` replica, in an application of its own beside the fronts', which Serve starts
again (with new actors) if its process dies and stops (releasing them) when that application is deleted or its
placement changes.
"""

import asyncio
import gc
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Iterable, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from google.protobuf import json_format
from grpc_health.v1 import health_pb2
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from experts.checkpoint import SwitchCheckpoint
from experts.fleet import ExpertFleet, compute_threads, created_groups
from experts.placement import PlacementConfig
from experts.spec import CONFIG_FILE, sparse_layers
from router_service.auth import CHALLENGE, Unauthenticated, is_authorized, load_api_key
from router_service.batching import Sequence
from router_service.config import ServerConfig
from router_service.engine import SwitchCluster, count_expert_tokens, first_line
from router_service.metrics import ServingMetrics, metrics_updated
from router_service.openai_api import (
    DEFAULT_MAX_TOKENS,
    NOT_CHAT,
    CompletionRequest,
    OpenAIError,
    check_model,
    choice,
    completion,
    completion_id,
    embeddings,
    finish_reason,
    from_invalid_request,
    legacy_logprobs,
    model_card,
    models_list,
    parse_completion_request,
    parse_embedding_request,
    usage,
)
from router_service.proto import UndecodableRequest
from router_service.proto import switch_serve_pb2 as pb
from router_service.requests import (
    DEFAULT_POOLING,
    BodyLimits,
    InvalidRequest,
    check_pooling,
    check_prompt,
    make_sampling_params,
    nth_seed,
)
from router_service.scheduler import BatcherStopped, QueueFull, Scheduler, math_here_on_one_thread
from router_service.text import TextStream, check_stop_strings

log = logging.getLogger(__name__)
# No /docs, /redoc or /openapi.json: they would answer without the API key (the API is in the README and the proto).
http_app = FastAPI(title="switch-serve", description="Switch Transformers with experts in Ray actors", docs_url=None,
                   redoc_url=None, openapi_url=None)


# The native API's HTTP routes; the others are OpenAI's.
GENERATE_PATH, MODEL_INFO_PATH = "/v1/generate", "/v1/model"


@http_app.exception_handler(StarletteHTTPException)
async def no_such_route(request: Request, e: StarletteHTTPException) -> JSONResponse:
    """A path or method no route takes: in the native API's error shape on its paths, OpenAI's elsewhere (which
    OpenAI's clients read), not FastAPI's `detail`."""
    message = f"{request.method} {request.url.path}: {e.detail}"
    native = request.url.path in (GENERATE_PATH, MODEL_INFO_PATH)
    body = {"error": message} if native else OpenAIError(e.status_code, message).body()
    return JSONResponse(body, status_code=e.status_code, headers=e.headers)


# What goes wrong, as a gRPC status and an HTTP status.
ERRORS = {InvalidRequest: (grpc.StatusCode.INVALID_ARGUMENT, 400),
          QueueFull: (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
          Unauthenticated: (grpc.StatusCode.UNAUTHENTICATED, 401)}
FAILED = (grpc.StatusCode.UNAVAILABLE, 503)  # the batch failed (an expert actor lost, ...): retryable
# What ends a call whose client went away or whose deadline passed: counted, then raised on.
CANCELLED = (asyncio.CancelledError, GeneratorExit)
# The services a health check may name: the server as a whole, and the API.
HEALTH_SERVICES = ("", pb.DESCRIPTOR.services_by_name["SwitchServe"].full_name)
MODEL_INFO_WAIT_S = 2.0  # how long ModelInfo waits for the actors' own figures
FLEET_DEPLOYMENT = "ExpertFleet"
FRONT_DEPLOYMENT = "SwitchServer"
FLEET_APP_SUFFIX = "-experts"  # the fleet's application is named after the fronts'


# An OpenAI API error's HTTP status, as the gRPC status the request metrics count it by: the native API's pairs,
# and a model not served here (OpenAI's 404).
OPENAI_STATUSES = {http: code for code, http in ERRORS.values()} | {404: grpc.StatusCode.NOT_FOUND}


def error_status(e: Exception) -> tuple[grpc.StatusCode, int]:
    if isinstance(e, OpenAIError):
        return OPENAI_STATUSES.get(e.status, FAILED[0]), e.status
    return next((codes for kind, codes in ERRORS.items() if isinstance(e, kind)), FAILED)


@contextmanager
def counting_failures(finished: Callable[[BaseException | None], None]):
    """Count, with `finished`, a call that fails or whose client cancels it, and let the error go on; a call that
    ends well is counted where it ends (a stream at its last chunk)."""
    try:
        yield
    except (Exception, *CANCELLED) as e:
        finished(e)
        raise


def readable(request):
    """A gRPC request, or bad input where its bytes were no valid message (router_service.proto.reader)."""
    if isinstance(request, UndecodableRequest):
        raise InvalidRequest("body", request.reason)
    return request


def set_grpc_error(context, e: Exception) -> None:
    """The status and one-line message of a failed call, set on Serve's gRPC context."""
    code, _ = error_status(e)
    if code == FAILED[0]:
        log.warning("call failed: %s", e)
    context.set_code(code)
    context.set_details(first_line(e))


# OpenAI's error code and type for the native API's errors it has names for; any other failure (the experts or the
# batch failed: retryable) is its server_error.
OPENAI_NAMES = {Unauthenticated: ("invalid_api_key", "invalid_request_error"),
                QueueFull: ("rate_limit_exceeded", "rate_limit_error")}


def as_openai_error(e: Exception) -> OpenAIError:
    """Any failure as OpenAI's error, with the native API's HTTP status."""
    if isinstance(e, OpenAIError):
        return e
    if isinstance(e, InvalidRequest):
        return from_invalid_request(e)
    code, kind = next((names for error, names in OPENAI_NAMES.items() if isinstance(e, error)), (None, "server_error"))
    return OpenAIError(error_status(e)[1], first_line(e), code=code, kind=kind)


def openai_error(e: Exception) -> JSONResponse:
    error = as_openai_error(e)
    return error_response(error.body(), error.status)


def error_response(body: dict, status: int) -> JSONResponse:
    """An error's JSON body with its status; a 401 with the scheme to authenticate by (CHALLENGE)."""
    return JSONResponse(body, status_code=status, headers=CHALLENGE if status == 401 else None)


def prompt_tokens(request: CompletionRequest, choices: list[tuple[Sequence, tuple]]) -> int:
    """Each prompt counted once, however many choices it has."""
    return sum(len(seq.prompt) for seq, _ in choices[::request.n])


@dataclass
class Piece:
    """What the decoding steps since the last piece added to a sequence (one step's, unless the stream held some:
    stream_interval_s)."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    text: str
    finish_reason: str | None  # set on the last piece: "eos", "stop" or "length"
    routing: list[dict]  # when asked: the decoder's routes of these tokens, and on the first piece the encoder's
    dropped_tokens: int | None  # set on the last piece: the answer's (Sequence.dropped_tokens), up to its last token


def http_error(e: Exception) -> JSONResponse:
    _, status = error_status(e)
    body = {"error": first_line(e)}
    if isinstance(e, InvalidRequest):
        body["field"] = e.field
    return error_response(body, status)


# What in a body's UTF-8 bytes can make json.loads return a lone surrogate: the escape of one ("\\ud800", the halves
# of a pair too, which the walk then finds whole), or its UTF-8 bytes, which json.loads lets through. (A body in
# UTF-16 or UTF-32, which json.loads reads too, is walked whatever its bytes.)
SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


async def json_body(request: Request, refused: Callable[[str, str], Exception], limits: BodyLimits) -> object:
    """The request's JSON body; `refused(field, why)` is raised where it is larger than `limits` ("body", or the
    list's path), not JSON ("body"), or where a string of it holds half of a UTF-16 surrogate pair, which is no text:
    no tokenizer takes it, nor any answer that would repeat it."""
    raw = await body_within(request, refused, limits.bytes)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than Python's stack
        raise refused("body", f"not JSON ({e})") from None
    if (over := oversized(body, limits)) is not None:
        raise refused(*over)
    may_hold_one = SURROGATE.search(raw) or not json.detect_encoding(raw).startswith("utf-8")
    if may_hold_one and (where := unpaired_surrogate(body)) is not None:
        raise refused(where, "not valid Unicode (half of a UTF-16 surrogate pair)")
    return body


async def body_within(request: Request, refused: Callable[[str, str], Exception], most: int) -> bytes:
    """The request's body, `refused("body", why)` where it has more than `most` bytes: told by its Content-Length,
    or for a body sent in chunks once those read pass `most`. Behind HAProxy a replica reads the body from the client
    itself: a body of gigabytes would take its memory. The rest is read without being kept, up to `most` bytes more
    (a client that sends its whole body before it reads the answer, as most do, got a reset connection instead of
    the 400 where the rest was left unread; one that sends gigabytes gets that reset)."""
    declared = request.headers.get("content-length")
    declared = int(declared) if declared is not None and declared.isascii() and declared.isdigit() else None
    if declared is not None and declared <= most:
        return await request.body()
    chunks = request.stream()

    async def too_long(size: str) -> Exception:
        drained = 0
        async for chunk in chunks:
            drained += len(chunk)
            if drained > most:
                break
        return refused("body", f"{size} bytes, more than a request this server takes can have ({most})")

    if declared is not None:
        raise await too_long(str(declared))
    raw = bytearray()
    async for chunk in chunks:
        raw += chunk
        if len(raw) > most:
            raise await too_long(f"at least {len(raw)}")
    return bytes(raw)


CONTAINERS = frozenset({list, dict})
TEXT_OR_CONTAINERS = frozenset({str, list, dict})


def nested(value: list | dict, path: str, kinds: frozenset) -> list[tuple[object, str]]:
    """The items of a parsed JSON list or object whose type is one of `kinds`, each with its path (`prompt[2]`,
    `stream_options.include_usage`; "body" at the top), last first (for a walk's stack). A list is looked at item by
    item in Python only where it holds any (a prompt's token ids hold none): a large body costs about what its
    parse did."""
    if isinstance(value, dict):
        prefix = f"{path}." if path else ""
        return [(item, f"{prefix}{key}") for key, item in reversed(value.items()) if type(item) in kinds]
    if kinds.isdisjoint(map(type, value)):
        return []
    return [(item, f"{path or 'body'}[{i}]") for i, item in reversed(list(enumerate(value))) if type(item) in kinds]


def oversized(body: object, limits: BodyLimits) -> tuple[str, str] | None:
    """Where a parsed JSON body exceeds `limits` and why: the path of a list or object of more items than any request
    takes, or "body" where it holds more lists and objects than any; None where it does not. A walk of its own, not
    recursion: a body nested as deep as json.loads takes would exceed Python's stack."""
    stack, seen = [(body, "")], 0
    while stack:
        value, path = stack.pop()
        if not isinstance(value, (list, dict)):
            continue
        if (seen := seen + 1) > limits.containers:
            return "body", f"more than {limits.containers} lists and objects, more than a request here may hold"
        if len(value) > limits.items:
            return path or "body", (f"{len(value)} items, more than any list or object of a request here may hold "
                                    f"({limits.items})")
        stack += nested(value, path, CONTAINERS)
    return None


def unpaired_surrogate(body) -> str | None:
    """The path (`prompt[1]`, `stream_options.include_usage`; "body" at the top) of the first string, or the object
    holding the first key, in a parsed JSON body that UTF-8 cannot encode; None where there is none. A walk of its
    own, not recursion (see oversized)."""
    stack = [(body, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            try:
                value.encode()
            except UnicodeEncodeError:
                return path or "body"
        elif isinstance(value, list):
            stack += nested(value, path, TEXT_OR_CONTAINERS)
        elif isinstance(value, dict):
            prefix = f"{path}." if path else ""
            for key, item in reversed(value.items()):
                stack += [(item, f"{prefix}{key}"), (key, path)]
    return None


def not_openai_json(field: str, why: str) -> OpenAIError:
    return OpenAIError(400, f"the body is {why}") if field == "body" else OpenAIError(400, f"{field}: {why}", field)


async def parse_http_request(request: Request, limits: BodyLimits) -> tuple[pb.GenerateRequest, bool]:
    body = await json_body(request, InvalidRequest, limits)
    if not isinstance(body, dict):
        raise InvalidRequest("body", "must be a JSON object")
    stream = body.pop("stream", None)
    stream = False if stream is None else stream  # null is the default, as for the request's other fields
    if not isinstance(stream, bool):
        raise InvalidRequest("stream", f"must be true or false, got {stream!r}")
    # A null is the field's default, as if it were not there: protobuf would clear with it what the field's other
    # spelling gave before it. A null under an unknown name is refused as that name.
    fields = pb.GenerateRequest.DESCRIPTOR.fields
    known = {name for field in fields for name in (field.name, field.json_name)}
    body = {key: value for key, value in body.items() if value is not None or key not in known}
    for field in fields:  # protobuf takes the last of the two, or names a oneof
        if field.json_name != field.name and field.name in body and field.json_name in body:
            raise InvalidRequest(field.name, f"given twice, as {field.name} and as {field.json_name}")
    try:
        return json_format.ParseDict(body, pb.GenerateRequest()), stream
    except json_format.ParseError as e:
        raise InvalidRequest(field_in_parse_error(str(e)), str(e)) from None


def field_in_parse_error(message: str) -> str:
    """protobuf names the field in quotes ('... field named "foo"'), before its error ('Failed to parse top_k field:
    ...') or, for a number of the wrong kind, after it ("Couldn't parse float: hot at GenerateRequest.temperature")."""
    if 'field named "' in message:  # the name may itself hold quotes
        return message.split('field named "', 1)[1].rsplit('" at "', 1)[0]
    if "Failed to parse " in message:
        return message.split("Failed to parse ")[1].split(" field")[0]
    after = f" at {pb.GenerateRequest.DESCRIPTOR.name}."
    if after in message:
        return message.rsplit(after, 1)[1].split("[")[0]
    return "body"


def to_json(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class EventStream(StreamingResponse):
    """Server-sent events. Where the response ends before its events are read (the client gone as the headers went
    out), their generator never starts, so its own clean-up never runs: `unread` does it then."""

    def __init__(self, events: AsyncIterator[str], unread: Callable[[], Coroutine]):
        self.read, self.unread = False, unread
        # Each event as it comes, through proxies too (an nginx ingress buffers responses unless told not to).
        super().__init__(self._reading(events), media_type="text/event-stream", headers=SSE_HEADERS)

    async def _reading(self, events: AsyncIterator[str]) -> AsyncIterator[str]:
        self.read = True
        async with aclosing(events):
            async for event in events:
                yield event

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.read:
                await self.unread()


async def sse_events(first: pb.GenerateChunk, rest: AsyncIterator[pb.GenerateChunk],
                     finished: Callable[[BaseException | None], None]) -> AsyncIterator[str]:
    try:
        with counting_failures(finished):
            async with aclosing(rest):  # a client gone takes its sequence out of the batch at once
                yield f"data: {json.dumps(to_json(first))}\n\n"
                async for chunk in rest:
                    yield f"data: {json.dumps(to_json(chunk))}\n\n"
    except Exception as e:  # headers are gone: the error becomes the last event
        yield f"data: {json.dumps({'error': first_line(e), 'status': error_status(e)[1]})}\n\n"
        return
    finished(None)


def stream_interval_s(config: ServerConfig, decoding: int) -> float:
    """How long a stream holds its tokens after a piece, with `decoding` sequences in the batch (ServerConfig's
    stream_interval_ms and stream_chunks_per_s). Each chunk costs CPU in the replica, Serve's proxy and the client (the
    last two about 1 ms a chunk with 32 streams on 2 vCPUs), which the decoding on the same cores loses
    (docs/BENCHMARKS.md)."""
    budget = decoding / config.stream_chunks_per_s if config.stream_chunks_per_s else 0.0
    return max(config.stream_interval_ms / 1000, budget)


async def follow(scheduler: Scheduler, seq: Sequence, updates: AsyncIterator[Sequence], text: TextStream,
                 config: ServerConfig, whole: bool = False) -> AsyncIterator[Piece]:
    """What the steps add to `seq` (queued: its `updates`, Scheduler.queue), a piece at most every
    `stream_interval_s` after the first (set by the load as each piece goes), until it ends or a stop string ends its
    `text` (which takes it out of the batch); `whole`: one piece at the end (a unary call's). The batching thread
    wakes this loop only once a piece is due (`seq.wake_at`), or at every step where a stop string may end the text:
    with 32 streams on two vCPUs, a wake-up a step each took the event loop's share of the cores from the decoding."""
    sent, count, checked, new_text = 0, 0, 0, ""

    def next_piece_at(at: float) -> float:
        """`at`, the next piece's due time, told to the batching thread (with stop strings, it wakes this loop at
        every step)."""
        if not text.stop:
            seq.wake_at = at
        return at

    def piece(reason: str | None) -> Piece:
        routing = seq.routing(sent, count, encoder=sent == 0) if seq.params.routing else []
        return Piece(seq.token_ids[sent:count], seq.logprobs[sent:count], seq.top_logprobs[sent:count], new_text,
                     reason, routing, None if reason is None else seq.dropped_in(count))

    def read(finished: bool, due: bool) -> None:
        """Take up the tokens made so far (`count`, cut at a stop string's end) and the text the next piece carries.
        The text is decoded (all of it, on the event loop) at every token only where a stop string may end it there
        (an update may bring several, when the loop falls behind the steps: the answer ends with the token that
        completed the stop string); else once a piece."""
        nonlocal count, checked, new_text
        # The batching thread appends a token, then its logprob, then sets finish_reason: read in reverse order (the
        # caller reads finish_reason first) and every token counted here is complete.
        count = len(seq.logprobs)
        if text.stop:
            added, count = text.advance(seq.token_ids, checked, count, finished)
            new_text += added
            checked = count
        elif due:
            new_text += text.update(seq.token_ids[:count], finished)

    due_at = next_piece_at(math.inf if whole else 0.0)
    async with aclosing(updates):
        try:
            async for _ in updates:
                finished = seq.finish_reason is not None
                if len(seq.logprobs) == sent and not finished:  # an update whose token went out with the one before
                    continue
                # The first piece goes at once, the last when it is made; the others wait for the interval.
                due = finished or time.monotonic() >= due_at
                read(finished, due)
                reason = "stop" if text.stopped else seq.finish_reason if finished else None
                if reason is None and not due:
                    continue
                if reason is None:  # before the piece goes: a step meanwhile need not wake this loop
                    due_at = next_piece_at(time.monotonic() + stream_interval_s(config, scheduler.num_active))
                yield piece(reason)
                sent, new_text = count, ""
                if reason is not None:
                    return
        except Exception:  # the batch failed: the tokens made before it go out, then the error
            read(False, True)  # those of the steps this loop had yet to see too
            if count > sent:
                yield piece("stop" if text.stopped else None)
            if text.stopped:  # a stop string had ended the answer: it is whole
                return
            raise


async def all_or_first_error(calls: Iterable[Coroutine]) -> list:
    """The results of `calls`, run at once; the first to fail ends the others and is raised itself (a full queue
    stays a 429), not their ExceptionGroup."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(call) for call in calls]
    except ExceptionGroup as errors:
        raise errors.exceptions[0] from None
    return [task.result() for task in tasks]


def fronts_changing(app: str) -> tuple[bool, int]:
    """Whether the fronts' application `app` is being built, rolled out or deleted, or has replicas draining; and how
    many are draining."""
    status = serve.status().applications.get(app)
    if status is None:
        return False, 0
    fronts = status.deployments.get(FRONT_DEPLOYMENT)
    stopping = 0 if fronts is None else fronts.replica_states.get("STOPPING", 0)
    return status.status in ("DEPLOYING", "DELETING") or stopping > 0, stopping


def fleet_app_name(app: str) -> str:
    """The application that runs the expert fleet of the fronts' application `app`."""
    return f"{app}{FLEET_APP_SUFFIX}"


# Serve pickles the deployment classes where they are defined: everything they use must be defined above them.
@serve.deployment(name=FLEET_DEPLOYMENT)
class ServedFleet(ExpertFleet):
    """The fleet of a served model, in an application of its own (see cluster.app.build_fleet): a change to the
    fronts' settings leaves it, and the experts it loaded, alone."""

    def __init__(self, model: str, placement: PlacementConfig, dtype: str | None, quantize: str, model_id: str,
                 version: str):
        checkpoint = SwitchCheckpoint.open(model)
        dtype = checkpoint.served_dtype(dtype)
        app = serve.get_replica_context().app_name  # two apps serving one checkpoint keep apart
        # Its placement group's name: see cluster.app.fleet_version.
        super().__init__(checkpoint, placement, dtype, quantize, name=f"{app}-{version}", model_id=model_id,
                         family=app)

    def _predecessor_stopping(self) -> bool:
        """Whether a replica of this fleet's deployment stops while groups of this fleet's name exist: a fleet of the
        same config (the app deployed anew with the same fleet args, another runtime_env say), keeping its actors for
        the fronts draining. Left behind by a fleet whose process died, the groups come with no replica stopping.
        Where Serve does not answer (its controller starting again, say), groups of its name may be a draining
        fleet's: it waits for an answer rather than remove them."""
        if not any(name.startswith(f"{self.name}-node") for name in created_groups()):
            return False
        try:
            status = serve.status().applications.get(serve.get_replica_context().app_name)
        except Exception as e:
            log.warning("the expert fleet could not ask Serve whether the fleet it replaces still stops: %s", e)
            return True
        deployment = None if status is None else status.deployments.get(FLEET_DEPLOYMENT)
        return deployment is not None and deployment.replica_states.get("STOPPING", 0) > 0

    def reconfigure(self, user_config: dict) -> None:
        """Serve's user_config: settings that change without a new fleet."""
        self.drain_timeout_s = user_config["drain_timeout_s"]

    def __del__(self):
        """Serve calls it as it stops the replica (its application deleted, or its placement changed): while the
        fronts' application is deployed anew or deleted, the old fronts keep their actors until they have stopped:
        while any drains (Serve ends each at its drain timeout), and up to the drain timeout between two (Serve rolls
        fronts out a few at a time, so the last may begin well after the fleet stopped). Then the actors and their
        placement group go at once, making room for the new fleet's. A fleet that never handed out loaded actors
        (its load failed, or had yet to end) has no front to wait for: it releases at once, so that Serve's next try
        starts without delay."""
        try:
            fronts = serve.get_replica_context().app_name.removesuffix(FLEET_APP_SUFFIX)
            deadline = time.monotonic() + self.drain_timeout_s
            while self.loaded and time.monotonic() < deadline:
                changing, stopping = fronts_changing(fronts)
                if not changing:
                    break
                if stopping:  # a front drains: the next may begin as it ends
                    deadline = time.monotonic() + self.drain_timeout_s
                time.sleep(0.5)
        finally:  # released even if Serve's controller cannot be asked
            self.release()


@serve.deployment(name=FRONT_DEPLOYMENT)
@serve.ingress(http_app)
class SwitchServer:
    async def __init__(self, config: ServerConfig):
        math_here_on_one_thread()  # before any math: the batching thread's OpenMP team is the only one
        self.config = config
        self.body_limits = BodyLimits.of(config)
        self.model_id = config.model_id
        self.api_key = load_api_key(config.api_key_file)
        if self.api_key is None:
            log.warning("serving without an API key: anyone who can reach Serve's ports can call the model")
        self.metrics = ServingMetrics(self.model_id)
        # The fleet's application may start after this one: a handle waits for it.
        fleet = serve.get_deployment_handle(FLEET_DEPLOYMENT, fleet_app_name(serve.get_replica_context().app_name))
        self.cluster = SwitchCluster(config, fleet=fleet, wait=False, metrics=self.metrics)
        self.metrics.serving(self.cluster.checkpoint.config.num_experts)
        # The model's `created` in /v1/models: its checkpoint's, the same whichever replica answers.
        self.created = int((Path(self.cluster.checkpoint.path) / CONFIG_FILE).stat().st_mtime)
        self.scheduler = Scheduler(self.cluster.batcher, config.max_waiting, compute_threads(config.front_threads))
        try:
            _ = self.cluster.tokenizer  # loaded now rather than on the first request
            self.has_tokenizer = True
        except InvalidRequest:
            self.has_tokenizer = False  # token ids only
        # Up once it can serve: Serve routes calls to a replica, a rolling update stops the next old one, and KubeRay
        # moves traffic to a new cluster, only once its constructor has returned. However long the experts take to
        # load (Serve starts a failed fleet again), unless their fleet waits for room that the fleet it replaces
        # holds for the old fronts: Serve then goes on stopping those, each draining, and the old fleet releases its
        # room once they have stopped. Waited for off the replica's event loop, free to stop the replica meanwhile.
        await asyncio.to_thread(self.cluster.wait_for_experts, None, behind_predecessor=True)

    # -- shared by gRPC and HTTP ---------------------------------------------------------------------------

    def _new_sequence(self, prompt: Collection[int], field: str, stop: str | Iterable[str] | None,
                      **sampling) -> tuple[Sequence, tuple]:
        """A checked sequence and its stop strings; `sampling`: make_sampling_params' keywords. The caller checks
        the experts once every sequence of its request is (bad input is refused as such whatever their state)."""
        vocab = self.cluster.checkpoint.config.vocab_size
        params = make_sampling_params(vocab, self.config, **sampling)
        prompt = check_prompt(prompt, vocab, self.config, field)
        stop = check_stop_strings(stop, self.has_tokenizer)
        return Sequence(prompt, params), stop

    def _sequence(self, request: pb.GenerateRequest) -> tuple[Sequence, tuple]:
        if request.text and request.input_ids:
            raise InvalidRequest("text", "give text or input_ids, not both")
        if not request.text and not request.input_ids:
            raise InvalidRequest("text", "give text or input_ids")
        # The repeated fields go to the checks as they are: their counts are checked before any is copied.
        prompt = self.cluster.encode_text(request.text) if request.text else request.input_ids
        optional = {name: getattr(request, name) for name in ("max_new_tokens", "temperature", "top_k", "top_p", "seed")
                    if request.HasField(name)}
        checked = self._new_sequence(prompt, "text" if request.text else "input_ids", request.stop,
                                     stop_token_ids=request.stop_token_ids, routing=request.return_routing, **optional)
        self.cluster.check_experts()
        return checked

    async def _embed(self, inputs: list[tuple[str | Collection[int], str]], pooling: str, field: str) -> list[Sequence]:
        """Encode each (text or prompt ids, its field) in the batch's encoder passes, beside the prompts of generation
        requests; their sequences, each with its `embedding`, in input order. `field` names the inputs."""
        if not inputs:
            raise InvalidRequest(field, "at least one input is needed")
        pooling = check_pooling(pooling)
        self.scheduler.check_count(len(inputs), field)  # before any is tokenized: a request of too many costs nothing
        vocab = self.cluster.checkpoint.config.vocab_size
        sequences = [Sequence(check_prompt(self.cluster.encode_text(item, name) if isinstance(item, str) else item,
                                           vocab, self.config, name), pooling=pooling) for item, name in inputs]
        self.cluster.check_experts()

        async def run(updates: AsyncIterator[Sequence]) -> None:
            async with aclosing(updates):
                async for _ in updates:
                    pass

        with self._queued(sequences) as updates:  # after the checks: bad input is refused as such, whatever the load
            await all_or_first_error(map(run, updates))
        return sequences

    @contextmanager
    def _queued(self, sequences: list[Sequence]) -> Iterator[list[AsyncIterator[Sequence]]]:
        """A request's sequences queued together (Scheduler.queue), and those not done taken out of the batch as the
        block ends, the sequences of updates never started too (a task cancelled before it ran)."""
        updates = self.scheduler.queue(sequences)
        try:
            yield updates
        finally:
            self.scheduler.cancel(sequences)

    def _follow(self, seq: Sequence, updates: AsyncIterator[Sequence], stop: tuple[str, ...],
                whole: bool = False) -> AsyncIterator[Piece]:
        return follow(self.scheduler, seq, updates, TextStream(self._text, stop), self.config, whole)

    def _authorize(self, metadata) -> None:
        """Every call but the health check presents the API key, when the server has one."""
        if self.api_key is None:
            return
        if not is_authorized(metadata, self.api_key):
            raise Unauthenticated("api key: missing or wrong (send the header authorization: Bearer KEY)")

    def _finished(self, error: BaseException | None = None) -> None:
        """Count a finished call (Generate, Embed, and the HTTP and OpenAI routes) by its gRPC status; one its
        client cancelled, or whose deadline passed, as CANCELLED."""
        if error is None:
            status = "OK"
        elif isinstance(error, CANCELLED):
            status = grpc.StatusCode.CANCELLED.name
        else:
            status = error_status(error)[0].name
        with metrics_updated():
            self.metrics.request_done(status)

    def _text(self, token_ids: list[int]) -> str:
        return self.cluster.decode(token_ids) if self.has_tokenizer else ""

    async def _generate(self, request: pb.GenerateRequest) -> pb.GenerateResponse:
        seq, stop = self._sequence(request)
        with self._queued([seq]) as (updates,):
            pieces = [piece async for piece in self._follow(seq, updates, stop, whole=True)]
        logprobs = [lp for p in pieces for lp in p.logprobs]
        token_ids = [t for p in pieces for t in p.token_ids]
        routing = seq.routing(0, len(token_ids)) if request.return_routing else []
        return pb.GenerateResponse(text="".join(p.text for p in pieces), token_ids=token_ids,
                                   logprobs=logprobs if request.return_logprobs else [],
                                   finish_reason=pieces[-1].finish_reason, prompt_tokens=len(seq.prompt),
                                   dropped_tokens=pieces[-1].dropped_tokens,
                                   routing=[pb.LayerRouting(**r) for r in routing])

    async def _stream(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateChunk]:
        seq, stop = self._sequence(request)
        with self._queued([seq]) as (updates,):  # closed with this stream: its sequence leaves at once
            async with aclosing(self._follow(seq, updates, stop)) as pieces:
                async for piece in pieces:
                    chunk = pb.GenerateChunk(token_ids=piece.token_ids, text=piece.text,
                                             logprobs=piece.logprobs if request.return_logprobs else [],
                                             routing=[pb.LayerRouting(**r) for r in piece.routing])
                    if piece.finish_reason is not None:
                        chunk.finish_reason = piece.finish_reason
                        chunk.prompt_tokens, chunk.dropped_tokens = len(seq.prompt), piece.dropped_tokens
                    yield chunk

    async def _model_info(self) -> pb.ModelInfoResponse:
        cluster, config = self.cluster, self.cluster.checkpoint.config
        actors = cluster.actors
        try:  # an actor restarting answers once it is back: not worth waiting long for
            infos, counts = await asyncio.wait_for(asyncio.gather(
                asyncio.gather(*[a.info.remote() for a in actors]),
                asyncio.gather(*[a.token_counts.remote() for a in actors])), MODEL_INFO_WAIT_S)
        except Exception:  # restarting, or lost (the status says so once the link has noticed)
            infos, counts = [], []
        return pb.ModelInfoResponse(
            model=str(cluster.checkpoint.path), vocab_size=config.vocab_size, d_model=config.d_model,
            d_ff=config.d_ff, num_heads=config.num_heads, num_experts=config.num_experts,
            encoder_layers=config.num_layers, decoder_layers=config.num_decoder_layers,
            encoder_sparse_layers=sparse_layers(config, "encoder"),
            decoder_sparse_layers=sparse_layers(config, "decoder"),
            expert_capacity=config.expert_capacity, capacity_mode=cluster.capacity,
            dtype=str(cluster.front.dtype).removeprefix("torch."), quantize=cluster.config.quantize,
            actors=[pb.ActorPlacement(actor=i, node_id=info["node_id"], device=info["device"], pid=info["pid"],
                                      experts=[pb.ExpertRef(stack=s, layer=i, expert=e) for s, i, e in info["experts"]],
                                      expert_bytes=info["held_bytes"])
                    for i, info in enumerate(infos)],
            expert_tokens=[pb.ExpertLoad(stack=stack, layer=layer, tokens=tokens)
                           for (stack, layer), tokens in count_expert_tokens(
                               counts + [cluster.dispatcher.local_tokens], config.num_experts).items()],
            active_sequences=self.scheduler.num_active, waiting_requests=self.scheduler.num_waiting,
            status=self.status(), decode_steps=cluster.batcher.steps, cache_rows=cluster.batcher.cache_rows)

    # -- gRPC: method names are the RPC names --------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, grpc_context) -> pb.GenerateResponse:
        try:
            with counting_failures(self._finished):
                self._authorize(grpc_context.invocation_metadata())
                response = await self._generate(readable(request))
        except Exception as e:
            set_grpc_error(grpc_context, e)
            return pb.GenerateResponse()
        self._finished()
        return response

    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context) -> AsyncIterator[pb.GenerateChunk]:
        try:
            with counting_failures(self._finished):
                self._authorize(grpc_context.invocation_metadata())
                async with aclosing(self._stream(readable(request))) as chunks:
                    async for chunk in chunks:
                        # Serve ships this context with each chunk and its proxy keeps a code set here. Until the
                        # last chunk the code reads UNAVAILABLE, so a stream cut short by this replica's death ends
                        # with a retryable status instead of the proxy's INTERNAL (the message stays the proxy's).
                        grpc_context.set_code(grpc.StatusCode.OK if chunk.finish_reason
                                              else grpc.StatusCode.UNAVAILABLE)
                        yield chunk
        except Exception as e:
            set_grpc_error(grpc_context, e)
            raise  # a stream's status only sticks when it ends with an exception
        self._finished()

    async def Embed(self, request: pb.EmbedRequest, grpc_context) -> pb.EmbedResponse:
        try:
            with counting_failures(self._finished):
                self._authorize(grpc_context.invocation_metadata())
                self.scheduler.check_count(len(readable(request).inputs), "inputs")  # before the inputs are read
                inputs = []
                for i, item in enumerate(request.inputs):
                    if bool(item.text) == bool(item.input_ids):
                        raise InvalidRequest(f"inputs[{i}]", "give exactly one of text and input_ids")
                    name = f"inputs[{i}].text" if item.text else f"inputs[{i}].input_ids"
                    inputs.append((item.text or item.input_ids, name))  # the ids' count checked before a copy
                sequences = await self._embed(inputs, request.pooling or DEFAULT_POOLING, "inputs")
        except Exception as e:
            set_grpc_error(grpc_context, e)
            return pb.EmbedResponse()
        self._finished()
        return pb.EmbedResponse(
            embeddings=[pb.Embedding(values=seq.embedding.flatten().tolist(), tokens=len(seq.prompt))
                        for seq in sequences],
            dimensions=self.cluster.checkpoint.config.d_model, prompt_tokens=sum(len(s.prompt) for s in sequences))

    async def ModelInfo(self, request: pb.ModelInfoRequest, grpc_context) -> pb.ModelInfoResponse:
        try:
            self._authorize(grpc_context.invocation_metadata())
            readable(request)
        except (Unauthenticated, InvalidRequest) as e:
            set_grpc_error(grpc_context, e)
            return pb.ModelInfoResponse()
        return await self._model_info()

    def live_sequences(self) -> int:
        """The sequences this replica's process still holds, once garbage is collected: with no request in flight,
        none. Reached through a Serve handle alone (tests, an operator's script), never by a request: gRPC routes
        only the proto's methods, HTTP only the routes."""
        gc.collect()
        return sum(isinstance(o, Sequence) for o in gc.get_objects())

    def check_health(self) -> None:
        """Serve's own health check of the replica: one whose batching thread has stopped is replaced (one
        waiting for its experts is not: a new replica would wait for the same ones)."""
        if not self.scheduler.alive:
            raise BatcherStopped("the batching thread has stopped")

    def status(self) -> str:
        """"serving", or one line on why this replica cannot."""
        if not self.scheduler.alive:
            return "not serving: the batching thread has stopped"
        return "serving" if self.cluster.experts_ready else f"not serving: {self.cluster.link.status}"

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context) -> health_pb2.HealthCheckResponse:
        """grpc.health.v1.Health/Check: SERVING while this replica's experts are up and its batching thread
        runs; NOT_FOUND for a service other than the server's ("") or the API's, as grpcio's own health servicer
        answers."""
        try:
            readable(request)
        except InvalidRequest as e:
            set_grpc_error(grpc_context, e)
            return health_pb2.HealthCheckResponse()
        if request.service not in HEALTH_SERVICES:
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"service: {request.service!r} is not served here (one of {HEALTH_SERVICES})")
            return health_pb2.HealthCheckResponse()
        status = health_pb2.HealthCheckResponse.SERVING if self.status() == "serving" else \
            health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)

    # -- HTTP JSON -----------------------------------------------------------------------------------------

    @http_app.post(GENERATE_PATH)
    async def http_generate(self, request: Request):
        """The GenerateRequest fields as JSON; `"stream": true` answers with server-sent events, one
        GenerateChunk each."""
        try:
            with counting_failures(self._finished):
                self._authorize(request.headers.items())
                message, stream = await parse_http_request(request, self.body_limits)
                if not stream:
                    response = JSONResponse(to_json(await self._generate(message)))
                    self._finished()
                    return response
                chunks = self._stream(message)
                first = await anext(chunks)  # bad input and a full queue still get their HTTP status
        except Exception as e:
            return http_error(e)

        async def unread() -> None:
            await chunks.aclose()  # its sequence out of the batch
            self._finished(asyncio.CancelledError())

        return EventStream(sse_events(first, chunks, self._finished), unread)

    @http_app.get(MODEL_INFO_PATH)
    async def http_model(self, request: Request):
        try:
            self._authorize(request.headers.items())
        except Unauthenticated as e:
            return http_error(e)
        return JSONResponse(to_json(await self._model_info()))

    # -- OpenAI's completions API --------------------------------------------------------------------------

    @http_app.get("/v1/models")
    async def openai_models(self, request: Request):
        try:
            self._authorize(request.headers.items())
        except Unauthenticated as e:
            return openai_error(e)
        return JSONResponse(models_list(self.model_id, self.created))

    @http_app.get("/v1/models/{model:path}")  # a Hub id holds a slash
    async def openai_model(self, request: Request, model: str):
        try:
            self._authorize(request.headers.items())
            check_model(model, self.model_id)
        except Exception as e:
            return openai_error(e)
        return JSONResponse(model_card(self.model_id, self.created))

    @http_app.post("/v1/chat/completions")
    async def openai_chat(self, request: Request):
        try:
            self._authorize(request.headers.items())
        except Unauthenticated as e:
            return openai_error(e)
        return openai_error(OpenAIError(404, NOT_CHAT, code="not_a_chat_model"))

    @http_app.post("/v1/completions")
    async def openai_completions(self, request: Request):
        try:
            with counting_failures(self._finished):
                self._authorize(request.headers.items())
                body = await json_body(request, not_openai_json, self.body_limits)
                completion_request = parse_completion_request(body, self.model_id)
                choices = self._completion_choices(completion_request)
                if not completion_request.stream:
                    response = JSONResponse(await self._complete(completion_request, choices))
                    self._finished()
                    return response
                events = asyncio.Queue()
                following = self._follow_choices(choices, events)
                try:
                    first = await events.get()
                except BaseException:  # the client went away before the first piece
                    following.cancel()
                    raise
                if isinstance(first, Exception):  # before any piece: the response's status says it
                    raise first
        except Exception as e:
            return openai_error(e)

        async def unread() -> None:
            following.cancel()  # its choices out of the batch
            self._finished(asyncio.CancelledError())

        return EventStream(self._completion_events(completion_request, choices, events, first, following), unread)

    @http_app.post("/v1/embeddings")
    async def openai_embeddings(self, request: Request):
        try:
            with counting_failures(self._finished):
                self._authorize(request.headers.items())
                d_model = self.cluster.checkpoint.config.d_model
                body = await json_body(request, not_openai_json, self.body_limits)
                embed_request = parse_embedding_request(body, self.model_id, d_model)
                items = embed_request.inputs()
                inputs = [(item, f"input[{i}]" if len(items) > 1 else "input") for i, item in enumerate(items)]
                sequences = await self._embed(inputs, embed_request.pooling, "input")
        except Exception as e:
            return openai_error(e)
        self._finished()
        return JSONResponse(embeddings(self.model_id, [seq.embedding.numpy() for seq in sequences],
                                       embed_request.encoding_format, sum(len(s.prompt) for s in sequences)))

    def _completion_choices(self, request: CompletionRequest) -> list[tuple[Sequence, tuple]]:
        """The sequences of every choice, n per prompt in prompt order, all checked before any starts."""
        if not self.has_tokenizer:
            raise OpenAIError(400, "this model has no tokenizer, so it has no text to complete; use the native API "
                                   "with token ids", "prompt")
        max_tokens = (min(DEFAULT_MAX_TOKENS, self.config.max_new_tokens) if request.max_tokens is None
                      else request.max_tokens)
        prompts, out = request.prompts(), []
        # Before any is tokenized: a request of too many costs nothing.
        self.scheduler.check_count(len(prompts) * request.n, "n" if len(prompts) == 1 else "prompt")
        for i, prompt in enumerate(prompts):
            field = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            ids = self.cluster.encode_text(prompt, field) if isinstance(prompt, str) else prompt
            for j in range(request.n):
                out.append(self._new_sequence(
                    ids, field, request.stop, max_new_tokens=max_tokens, temperature=request.temperature,
                    top_p=request.top_p, seed=nth_seed(request.seed, j),
                    top_logprobs=request.logprobs))
        self.cluster.check_experts()
        return out

    def _first_offsets(self, request: CompletionRequest) -> list[int]:
        """Each choice's first `text_offset`, where logprobs are asked: its prompt's characters (its text, or its
        token ids decoded), as OpenAI's offsets count from the prompt's start, `echo` or not."""
        if request.logprobs is None:
            return [0] * len(request.prompts()) * request.n
        return [len(prompt if isinstance(prompt, str) else self.cluster.decode(prompt))
                for prompt in request.prompts() for _ in range(request.n)]

    def _logprobs(self, request: CompletionRequest, before: list[int], piece: Piece, offset: int) -> dict | None:
        """OpenAI's logprobs object of the piece's tokens, which follow the choice's tokens `before` them, whose
        text takes `offset` characters."""
        if request.logprobs is None:
            return None
        return legacy_logprobs(self.cluster.decode_many, self.cluster.hidden_ids, before, piece.token_ids,
                               piece.logprobs, piece.top_logprobs, offset)

    async def _complete(self, request: CompletionRequest, choices: list[tuple[Sequence, tuple]]) -> dict:
        first_offsets = self._first_offsets(request)

        async def one(index: int, seq: Sequence, updates: AsyncIterator[Sequence], stop: tuple) -> tuple[dict, int]:
            pieces = [piece async for piece in self._follow(seq, updates, stop, whole=True)]
            whole = Piece([t for p in pieces for t in p.token_ids], [lp for p in pieces for lp in p.logprobs],
                          [top for p in pieces for top in p.top_logprobs], "".join(p.text for p in pieces),
                          pieces[-1].finish_reason, [], pieces[-1].dropped_tokens)
            # In a thread: a long answer's logprobs take a while to build, and the replica's other streams go on.
            logprobs = (None if request.logprobs is None else
                        await asyncio.to_thread(self._logprobs, request, [], whole, first_offsets[index]))
            answer = choice(index, whole.text, finish_reason(whole.finish_reason), logprobs)
            return answer, len(whole.token_ids)

        with self._queued([seq for seq, _ in choices]) as updates:
            results = await all_or_first_error(one(i, seq, u, stop)
                                               for i, ((seq, stop), u) in enumerate(zip(choices, updates)))
        return completion(completion_id(), int(time.time()), self.model_id, [c for c, _ in results],
                          usage(prompt_tokens(request, choices), sum(n for _, n in results)))

    def _follow_choices(self, choices: list[tuple[Sequence, tuple]], events: asyncio.Queue) -> asyncio.Task:
        """Queue the choices (Scheduler.queue), and put each one's pieces on `events` as (choice index, piece) in a
        task of its own, which holds its task group from start to end; the first failure ends the others and is put
        last. Returns the task: as it ends, however (cancelled before it ran too), the choices leave the batch."""
        sequences = [seq for seq, _ in choices]
        updates = self.scheduler.queue(sequences)

        async def one(index: int, seq: Sequence, updates: AsyncIterator[Sequence], stop: tuple) -> None:
            async for piece in self._follow(seq, updates, stop):
                events.put_nowait((index, piece))

        async def every() -> None:
            try:
                await all_or_first_error(one(i, seq, u, stop)
                                         for i, ((seq, stop), u) in enumerate(zip(choices, updates)))
            except Exception as e:
                events.put_nowait(e)

        following = asyncio.create_task(every())
        following.add_done_callback(lambda _: self.scheduler.cancel(sequences))
        return following

    async def _completion_events(self, request: CompletionRequest, choices: list[tuple[Sequence, tuple]],
                                 events: asyncio.Queue, first, following: asyncio.Task) -> AsyncIterator[str]:
        """Server-sent events from `_follow_choices`' `events`, the `first` taken already: a chunk per piece and
        choice, the usage if asked, then `data: [DONE]`; a failure is the last event (the headers are gone). A client
        gone ends the choices."""
        cid, created, generated, done = completion_id(), int(time.time()), 0, 0
        with_usage = request.stream_options is not None and request.stream_options.include_usage
        before = [[] for _ in choices]  # each choice's tokens so far
        try:
            with counting_failures(self._finished):
                offsets = self._first_offsets(request)  # each choice's logprobs' next text offset
                event = first
                while True:
                    if isinstance(event, Exception):
                        raise event
                    index, piece = event
                    logprobs = self._logprobs(request, before[index], piece, offsets[index])
                    if logprobs is not None:
                        offsets[index] += sum(len(text) for text in logprobs["tokens"])
                    before[index] += piece.token_ids
                    generated += len(piece.token_ids)
                    body = completion(cid, created, self.model_id,
                                      [choice(index, piece.text, finish_reason(piece.finish_reason), logprobs)], None,
                                      with_usage)
                    yield f"data: {json.dumps(body)}\n\n"
                    done += piece.finish_reason is not None
                    if done == len(choices):
                        break
                    event = await events.get()
                if with_usage:
                    total = usage(prompt_tokens(request, choices), generated)
                    body = completion(cid, created, self.model_id, [], total)
                    yield f"data: {json.dumps(body)}\n\n"
        except Exception as e:  # the headers are gone: the error becomes the last event
            yield f"data: {json.dumps(as_openai_error(e).body())}\n\n"
            return
        finally:
            following.cancel()
        self._finished()
        yield "data: [DONE]\n\n"
