"""The served API: gRPC (generated client, reflection-only client, health) and HTTP, on one Serve app."""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import patch

import grpc
import pytest
import torch
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from reference import hf_generate, hf_routing, wait_until
from transformers import AutoTokenizer

from cluster.app import APP_NAME, local_serve
from cluster.demo import WORDS
from cluster.testing import (
    environment,
    free_port,
    processes,
    replica_class,
    resident_memory,
    wait_until_decoding,
    write_random_checkpoint_with_tokenizer,
)
from experts.checkpoint import SwitchCheckpoint
from experts.ffn import KEPT_HEAP_ENV
from experts.placement import PlacementConfig
from router_service.batching import Route, Sequence
from router_service.config import ServerConfig
from router_service.engine import SwitchCluster
from router_service.proto import switch_serve_pb2 as pb
from router_service.proto import switch_serve_pb2_grpc as pb_grpc
from router_service.requests import SamplingParams
from router_service.server import FRONT_DEPLOYMENT, SwitchServer, follow, sse_events, stream_interval_s
from router_service.text import TextStream

MAX_SEQUENCES, MAX_WAITING, MAX_NEW_LIMIT = 4, 16, 256


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    """One Serve app on a small checkpoint with a tokenizer; small batch and queue limits to test them."""
    path = tmp_path_factory.mktemp("served")
    write_random_checkpoint_with_tokenizer(path, WORDS)
    config = ServerConfig(model=str(path), placement=PlacementConfig(experts_per_actor=4),
                          max_sequences=MAX_SEQUENCES, max_waiting=MAX_WAITING, max_new_tokens=MAX_NEW_LIMIT)
    with local_serve(config, http_port=free_port(), grpc_port=free_port()) as served:
        with grpc.insecure_channel(served.grpc) as channel:
            yield {"path": path, "stub": pb_grpc.SwitchServeStub(channel), "channel": channel, "http": served.http,
                   "grpc": served.grpc, "started": time.monotonic()}


@pytest.fixture(scope="module")
def hf_model(server):
    from transformers import SwitchTransformersForConditionalGeneration

    return SwitchTransformersForConditionalGeneration.from_pretrained(server["path"]).eval()


PROMPTS = [[5, 9, 23, 4, 17, 1], [30, 3, 1], [14, 15, 16, 20, 27, 8, 9, 10, 1], [28, 1]]


def test_greedy_over_grpc_matches_transformers(server, hf_model):
    reference = hf_generate(hf_model, PROMPTS, 8)
    for prompt, (tokens, logprobs) in zip(PROMPTS, reference):
        r = server["stub"].Generate(pb.GenerateRequest(input_ids=prompt, max_new_tokens=8, return_logprobs=True))
        assert list(r.token_ids) == tokens
        assert list(r.logprobs) == pytest.approx(logprobs, abs=1e-4)
        assert r.prompt_tokens == len(prompt) and r.finish_reason == ("eos" if tokens[-1] == 1 else "length")


def test_text_in_text_out(server, hf_model):
    tokenizer = AutoTokenizer.from_pretrained(server["path"])
    text = "sort : 9 2 7"
    r = server["stub"].Generate(pb.GenerateRequest(text=text, max_new_tokens=6))
    (tokens, _), = hf_generate(hf_model, [tokenizer(text)["input_ids"]], 6)
    assert list(r.token_ids) == tokens
    assert r.text == tokenizer.decode(tokens, skip_special_tokens=True)


def test_reflection_only_client(server, hf_model):
    """A client that has no generated code: it learns the service from the server's reflection."""
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(server["channel"]))
    service = pool.FindServiceByName("switchserve.v1.SwitchServe")
    method = service.methods_by_name["Generate"]
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    call = server["channel"].unary_unary(f"/{service.full_name}/{method.name}",
                                         request_serializer=request_class.SerializeToString,
                                         response_deserializer=response_class.FromString)
    response = call(request_class(input_ids=PROMPTS[0], max_new_tokens=8))
    assert list(response.token_ids) == hf_generate(hf_model, PROMPTS[:1], 8)[0][0]


def test_concurrent_requests_get_the_tokens_they_get_alone(server):
    """16 requests of different lengths at once (more than the batch holds, so they join as others leave)."""
    prompts = [[(7 * i + j) % 30 + 3 for j in range(2 + i % 7)] + [1] for i in range(16)]
    alone = [list(server["stub"].Generate(pb.GenerateRequest(input_ids=p, max_new_tokens=4 + i % 9)).token_ids)
             for i, p in enumerate(prompts)]
    calls = [server["stub"].Generate.future(pb.GenerateRequest(input_ids=p, max_new_tokens=4 + i % 9))
             for i, p in enumerate(prompts)]
    assert [list(c.result(timeout=120).token_ids) for c in calls] == alone


def test_sampling_is_reproducible_with_a_seed(server):
    request = pb.GenerateRequest(input_ids=PROMPTS[2], max_new_tokens=12, temperature=1.5, top_k=20, top_p=0.95,
                                 seed=1234)
    first = list(server["stub"].Generate(request).token_ids)
    # The same seed among other traffic, leaving it room in the batch: still the same tokens.
    others = [server["stub"].Generate.future(pb.GenerateRequest(input_ids=p, max_new_tokens=40, temperature=1.0))
              for p in PROMPTS[:MAX_SEQUENCES - 1]]
    assert list(server["stub"].Generate(request).token_ids) == first
    for c in others:
        c.result(timeout=60)
    request.seed = 4321
    different = {tuple(server["stub"].Generate(request).token_ids) for _ in range(3)}
    assert len(different) == 1 and first != list(different.pop())  # another seed, another sample


def test_stop_token_ends_with_stop(server):
    free = list(server["stub"].Generate(pb.GenerateRequest(input_ids=PROMPTS[0], max_new_tokens=8)).token_ids)
    stop = free[2]
    r = server["stub"].Generate(pb.GenerateRequest(input_ids=PROMPTS[0], max_new_tokens=8, stop_token_ids=[stop]))
    assert r.finish_reason == "stop" and list(r.token_ids) == free[:free.index(stop) + 1]


def test_stream_equals_unary(server):
    request = pb.GenerateRequest(input_ids=PROMPTS[2], max_new_tokens=10, return_logprobs=True)
    unary = server["stub"].Generate(request)
    chunks = list(server["stub"].GenerateStream(request))
    # At most one chunk a step; the last may hold no token, where the step that ends it finished after its token
    # was read (test_a_stream_sends_every_step_without_pacing).
    assert all(c.token_ids for c in chunks[:-1]) and len(chunks) <= len(unary.token_ids) + 1
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    assert [x for c in chunks for x in c.logprobs] == pytest.approx(list(unary.logprobs))
    assert "".join(c.text for c in chunks) == unary.text
    assert [c.finish_reason for c in chunks[:-1]] == [""] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == unary.finish_reason and chunks[-1].prompt_tokens == len(PROMPTS[2])


class ScriptedBatcher:
    """Stands in for the scheduler and the clock: each step of STEP_S adds one token to the sequence (its logprob,
    top logprobs and decoder route too), with `decoding[i]` sequences decoding at step i; the last one ends it. A
    step is an update where the sequence wants it (Sequence.notify); `wakeups` counts them."""

    STEP_S = 0.02

    def __init__(self, tokens: list[int], decoding: list[int], error: Exception | None = None,
                 finish_apart: bool = False, behind: int = 1):
        self.tokens, self.decoding, self.num_active, self.now = tokens, decoding, decoding[0], 0.0
        self.behind = behind  # the stream sees every `behind`-th step's update only, as an event loop behind does
        self.error = error  # raised at the last token's step instead of making it, as a failed batch does
        # The last token seen by one update and its finish by the next, as when the batching thread sets the finish
        # between the stream's two reads.
        self.finish_apart = finish_apart
        self.wakeups = 0

    async def updates(self, seq: Sequence):
        seq.routes[("decoder", 1)] = Route()
        woken = []
        seq.on_update = lambda: woken.append(self.now)  # called by Sequence.notify, as the batching thread calls it
        for i, token in enumerate(self.tokens):
            self.now += self.STEP_S
            if i == len(self.tokens) - 1 and self.error is not None:
                raise self.error
            self.num_active = self.decoding[i]
            seq.routes[("decoder", 1)].experts.append(token % 8)
            seq.decoder_dropped.append(i % 2)  # every second token over an expert's capacity
            seq.token_ids.append(token)
            seq.top_logprobs.append([(token, -0.5 * i)])
            seq.logprobs.append(-0.5 * i)
            if i == len(self.tokens) - 1:
                if self.finish_apart:
                    yield seq
                seq.finish_reason = "length"
            seq.notify(self.now)
            if ((i + 1) % self.behind == 0 and woken and woken[-1] == self.now) or seq.finish_reason is not None:
                self.wakeups += 1
                yield seq


def streamed(tokens: list[int], decoding: int | list[int] = 1, stop: tuple[str, ...] = (),
             error: Exception | None = None, decoded: list | None = None, finish_apart: bool = False,
             behind: int = 1, whole: bool = False, wakeups: list | None = None, **pacing) -> list:
    """The pieces `follow` yields for these tokens, one a step of ScriptedBatcher.STEP_S, with the text "<t>" per
    token; `decoding`: the sequences decoding, at every step or step by step. With `error`, the batch fails at the
    last token's step: the pieces before it, then the error as the last item. `decoded` gets the tokens of each
    decoding of the text, `wakeups` the count of updates the follower was woken for."""
    config = ServerConfig(model="unused", **pacing)

    def decode(ids: list[int]) -> str:
        if decoded is not None:
            decoded.append(list(ids))
        return "".join(f"<{t}>" for t in ids)

    text = TextStream(decode, stop)
    batcher = ScriptedBatcher(tokens, decoding if isinstance(decoding, list) else [decoding] * len(tokens), error,
                              finish_apart, behind)
    seq = Sequence([5, 1], SamplingParams(routing=True, top_logprobs=1))

    async def pieces() -> list:
        out = []
        try:
            async for p in follow(batcher, seq, batcher.updates(seq), text, config, whole):
                out.append(p)
        except Exception as e:
            out.append(e)
        if wakeups is not None:
            wakeups.append(batcher.wakeups)
        return out

    with patch("router_service.server.time.monotonic", lambda: batcher.now):
        return asyncio.run(pieces())


def test_a_stream_waits_longer_between_chunks_the_more_sequences_decode():
    config = ServerConfig(model="unused", stream_interval_ms=50, stream_chunks_per_s=100)
    assert stream_interval_s(config, 1) == stream_interval_s(config, 5) == pytest.approx(0.05)
    assert stream_interval_s(config, 32) == pytest.approx(0.32)  # 100 chunks/s over 32 streams
    assert stream_interval_s(config.model_copy(update={"stream_chunks_per_s": 0}), 32) == pytest.approx(0.05)
    assert stream_interval_s(config.model_copy(update={"stream_interval_ms": 0, "stream_chunks_per_s": 0}), 32) == 0


@pytest.mark.parametrize("pacing", [{"stream_interval_ms": 1e9, "stream_chunks_per_s": 0},
                                    {"stream_interval_ms": 0, "stream_chunks_per_s": 1e-9}])
def test_a_stream_holds_its_tokens_between_chunks(pacing):
    """Held by the interval, or by the replica's chunk budget: the first token goes at once, the rest with the last."""
    tokens = [11, 12, 13, 14, 15]
    pieces = streamed(tokens, **pacing)
    assert [p.token_ids for p in pieces] == [[11], [12, 13, 14, 15]]
    assert [p.logprobs for p in pieces] == [[0.0], [-0.5, -1.0, -1.5, -2.0]]
    assert [p.text for p in pieces] == ["<11>", "<12><13><14><15>"]
    assert [p.finish_reason for p in pieces] == [None, "length"]


def test_a_stream_sends_every_step_without_pacing():
    tokens = [11, 12, 13, 14, 15]
    assert [p.token_ids for p in streamed(tokens, stream_interval_ms=0, stream_chunks_per_s=0)] == [[t] for t in tokens]
    # A finish that comes after its token was sent still ends the stream, with a last piece of no tokens.
    pieces = streamed(tokens, finish_apart=True, stream_interval_ms=0, stream_chunks_per_s=0)
    assert [p.token_ids for p in pieces] == [[t] for t in tokens] + [[]]
    assert [p.finish_reason for p in pieces] == [None] * 5 + ["length"]
    # The budget is shared by the sequences decoding: with none counted, it holds nothing.
    assert [p.token_ids for p in streamed(tokens, 0, stream_interval_ms=0, stream_chunks_per_s=1e-9)] == [
        [t] for t in tokens]


def test_a_stream_sends_what_it_holds_once_the_interval_has_passed():
    tokens = list(range(11, 20))
    pieces = streamed(tokens, stream_interval_ms=50, stream_chunks_per_s=0)  # steps of 20 ms: a piece every third
    assert [p.token_ids for p in pieces] == [[11], [12, 13, 14], [15, 16, 17], [18, 19]]
    # Everything a step records goes with its token, whichever piece carries it.
    assert [p.top_logprobs for p in pieces] == [[[(t, -0.5 * (t - 11))] for t in p.token_ids] for p in pieces]
    assert [p.routing[0]["experts"] for p in pieces] == [[t % 8 for t in p.token_ids] for p in pieces]
    assert [p.text for p in pieces] == ["".join(f"<{t}>" for t in p.token_ids) for p in pieces]
    # The budget's share is the load's as each piece goes: 5 sequences decoding hold a stream 50 ms, one alone 10 ms.
    pieces = streamed(tokens, [5] * 5 + [1] * 4, stream_interval_ms=0, stream_chunks_per_s=100)
    assert [p.token_ids for p in pieces] == [[11], [12, 13, 14], [15, 16, 17], [18], [19]]


def test_a_follower_is_woken_only_for_the_steps_it_looks_at():
    """The batching thread wakes the event loop for a paced stream once a piece is due, for a unary call at its end,
    and at every step only where a stop string may end the text. Fails if a step wakes a follower with nothing to
    send (with 32 streams, a wake-up a step each took the cores' time from the decoding), or a wanted one is missed."""
    tokens, wakeups = list(range(11, 20)), []
    paced = streamed(tokens, stream_interval_ms=50, stream_chunks_per_s=0, wakeups=wakeups)
    assert [p.token_ids for p in paced] == [[11], [12, 13, 14], [15, 16, 17], [18, 19]] and wakeups == [4]
    whole = streamed(tokens, stream_interval_ms=50, stream_chunks_per_s=0, whole=True, wakeups=wakeups)
    assert [(p.token_ids, p.text, p.finish_reason) for p in whole] == [
        (tokens, "".join(f"<{t}>" for t in tokens), "length")]
    assert wakeups[-1] == 1
    stopped = streamed(tokens, stop=("<16>",), whole=True, wakeups=wakeups)
    assert [(p.token_ids, p.finish_reason) for p in stopped] == [([11, 12, 13, 14, 15, 16], "stop")]
    assert wakeups[-1] == 6  # every step up to the one that completed it


def test_a_held_stream_decodes_its_text_once_a_piece_unless_a_stop_string_may_end_it():
    """Decoding a sequence's whole text at every step, for every stream, takes the event loop's time (and the GIL)
    from the batching thread; only a stop string needs it."""
    decoded = []
    streamed([11, 12, 13, 14, 15], decoded=decoded, stream_interval_ms=1e9)
    assert decoded == [[11], [11, 12, 13, 14, 15]]
    decoded.clear()
    streamed([11, 12, 13, 14, 15], stop=("<99>",), decoded=decoded, stream_interval_ms=1e9)
    assert len(decoded) == 5


def test_a_stop_string_ends_a_held_stream_at_once():
    pieces = streamed([11, 12, 13, 14, 15], stop=("<14>",), stream_interval_ms=1e9)
    assert [p.token_ids for p in pieces] == [[11], [12, 13, 14]]  # the token that completes it, as unary
    assert [p.text for p in pieces] == ["<11>", "<12><13>"]
    assert [p.finish_reason for p in pieces] == [None, "stop"]


@pytest.mark.parametrize("pacing", [{"stream_interval_ms": 0}, {"stream_interval_ms": 1e9}])
def test_a_stop_string_ends_the_answer_at_its_token_though_the_stream_saw_several_at_once(pacing):
    """Where the event loop falls behind the steps, an update brings several tokens: the answer still ends with the
    token that completed the stop string, not with the others that came with it. Fails if the tokens after it go
    out (in token_ids, logprobs, routing, the dropped tokens and the usage counts)."""
    pieces = streamed([11, 12, 13, 14, 15, 16], stop=("<13>",), behind=4, **pacing)
    assert [t for p in pieces for t in p.token_ids] == [11, 12, 13]
    assert [x for p in pieces for x in p.logprobs] == [0.0, -0.5, -1.0]
    assert pieces[-1].dropped_tokens == 1  # of the three tokens sent, not of the four made
    assert pieces[-1].routing[-1]["experts"][-1] == 13 % 8  # the stop token's route is the last one sent
    assert "".join(p.text for p in pieces) == "<11><12>" and pieces[-1].finish_reason == "stop"


def test_calls_their_clients_cancelled_are_counted_as_cancelled():
    """A deadline passed or a client gone cancels the call's task (or closes its stream): the request metric counts
    it as CANCELLED. Fails if such calls go uncounted (only failures that are Exceptions were)."""
    replica, counted = SwitchServer.func_or_class, []
    server = SimpleNamespace(metrics=SimpleNamespace(request_done=counted.append), _authorize=lambda metadata: None)
    server._finished = lambda error=None: replica._finished(server, error)

    async def cancelled(request):
        raise asyncio.CancelledError

    async def cancelled_stream(request):
        yield pb.GenerateChunk(token_ids=[4])
        raise asyncio.CancelledError

    server._generate, server._stream = cancelled, cancelled_stream
    context = SimpleNamespace(invocation_metadata=lambda: [], set_code=lambda code: None)

    async def stream() -> list:
        return [chunk async for chunk in replica.GenerateStream(server, pb.GenerateRequest(), context)]

    async def closed_early() -> None:
        chunks = replica.GenerateStream(server, pb.GenerateRequest(), context)
        await anext(chunks)
        await chunks.aclose()  # as Serve closes a stream whose client went away

    for call in (replica.Generate(server, pb.GenerateRequest(), context), stream()):
        with pytest.raises(asyncio.CancelledError):
            asyncio.run(call)
    asyncio.run(closed_early())
    assert counted == ["CANCELLED"] * 3


def test_an_http_stream_is_counted_once_by_how_it_ends():
    """A server-sent events stream is counted when it ends: OK after its last chunk, by the error's status when its
    batch fails (sent as the last event), CANCELLED when its client goes away, even at the first event (and what it
    streams is closed with it). Fails if a way of ending goes uncounted or is counted twice."""

    async def chunks(error: BaseException | None):
        yield pb.GenerateChunk(token_ids=[5])
        if error is not None:
            raise error
        yield pb.GenerateChunk(token_ids=[6], finish_reason="length")

    async def read(error: BaseException | None) -> tuple[list[str], list]:
        finished, events = [], []
        stream = sse_events(pb.GenerateChunk(token_ids=[4]), chunks(error), finished.append)
        try:
            async for event in stream:
                events.append(event)
        except asyncio.CancelledError:
            pass
        return events, finished

    events, finished = asyncio.run(read(None))
    assert len(events) == 3 and finished == [None]
    lost = RuntimeError("expert actor lost")
    events, finished = asyncio.run(read(lost))
    assert len(events) == 3 and finished == [lost]
    assert json.loads(events[-1].removeprefix("data: ")) == {"error": "expert actor lost", "status": 503}
    events, finished = asyncio.run(read(asyncio.CancelledError()))
    assert len(events) == 2 and len(finished) == 1 and isinstance(finished[0], asyncio.CancelledError)

    async def closed_at_the_first_event() -> tuple[list, object]:
        finished, rest = [], chunks(None)
        stream = sse_events(pb.GenerateChunk(token_ids=[4]), rest, finished.append)
        await anext(stream)
        await stream.aclose()  # as Serve closes a stream whose client went away
        return finished, rest

    finished, rest = asyncio.run(closed_at_the_first_event())
    assert len(finished) == 1 and isinstance(finished[0], GeneratorExit)
    assert rest.ag_frame is None  # closed with it: its sequence leaves the batch at once


def test_a_failed_batch_sends_what_the_stream_holds_before_the_error():
    """The steps before the failure made their tokens: a held stream sends them, then ends with the error."""
    error = RuntimeError("expert actor lost")
    pieces = streamed([11, 12, 13, 14, 15], error=error, stream_interval_ms=1e9)
    assert [p.token_ids for p in pieces[:-1]] == [[11], [12, 13, 14]]  # the failed step's token was never made
    assert [p.text for p in pieces[:-1]] == ["<11>", "<12><13><14>"]
    assert [p.routing[0]["experts"] for p in pieces[:-1]] == [[3], [4, 5, 6]]
    assert pieces[-1] is error and pieces[-2].finish_reason is None
    # One token held: it goes before the error too.
    assert [p.token_ids for p in streamed([11, 12, 13], error=error, stream_interval_ms=1e9)[:-1]] == [[11], [12]]
    # Nothing held: the error alone.
    assert [p.token_ids for p in streamed([11, 12], error=error, stream_interval_ms=0)[:-1]] == [[11]]


def test_a_failed_batch_sends_the_tokens_made_that_the_stream_had_yet_to_see():
    """The event loop behind the steps (it saw 13, then the steps made 14 and failed): 14 goes out before the error,
    and where it completed a stop string, the answer is whole and ends with it, without the error. Fails if the
    stream sends only the tokens it had seen."""
    error = RuntimeError("expert actor lost")
    pieces = streamed([11, 12, 13, 14, 15], error=error, behind=3, stream_interval_ms=0)
    assert [p.token_ids for p in pieces[:-1]] == [[11, 12, 13], [14]] and pieces[-1] is error
    assert pieces[-2].text == "<14>" and pieces[-2].finish_reason is None
    stopped = streamed([11, 12, 13, 14, 15], stop=("<14>",), error=error, behind=3, stream_interval_ms=0)
    assert [(p.token_ids, p.finish_reason) for p in stopped] == [([11, 12, 13], None), ([14], "stop")]


def test_routing_over_grpc_streams_and_http(server, hf_model):
    """The unary answer's routing, the stream's (the encoder's on the first chunk, each chunk's decoder positions on
    it) and HTTP's are the same, and equal transformers' routers."""
    request = pb.GenerateRequest(input_ids=PROMPTS[2], max_new_tokens=10, return_routing=True)
    unary = server["stub"].Generate(request)
    routing = [json_format.MessageToDict(r, preserving_proto_field_name=True) for r in unary.routing]
    stacks = [r["stack"] for r in routing]
    assert stacks == sorted(stacks, key=lambda s: s != "encoder") and set(stacks) == {"encoder", "decoder"}
    for r in routing:
        n = len(PROMPTS[2]) if r["stack"] == "encoder" else len(unary.token_ids)
        assert len(r["experts"]) == len(r["probs"]) == len(r["dropped"]) == n
        assert all(0 < p <= 1 for p in r["probs"])
    chunks = list(server["stub"].GenerateStream(request))
    assert {r.stack for r in chunks[0].routing} == {"encoder", "decoder"}
    assert all({r.stack for r in c.routing} == {"decoder"} for c in chunks[1:])
    for layer in unary.routing:
        parts = [r for c in chunks for r in c.routing if (r.stack, r.layer) == (layer.stack, layer.layer)]
        assert [e for r in parts for e in r.experts] == list(layer.experts)
        assert [p for r in parts for p in r.probs] == pytest.approx(list(layer.probs))
    for c in chunks:
        assert all(len(r.experts) == len(c.token_ids) for r in c.routing if r.stack == "decoder")
    status, body = post(f"{server['http']}/v1/generate",
                        {"input_ids": PROMPTS[2], "max_new_tokens": 10, "return_routing": True})
    assert status == 200 and [{k: r[k] for k in ("stack", "layer", "experts")} for r in body["routing"]] == [
        {k: r[k] for k in ("stack", "layer", "experts")} for r in routing]
    expected = hf_routing(hf_model, [PROMPTS[2]], 10)[0]
    assert {(r["stack"], r["layer"]): r["experts"] for r in routing} == {k: v[0] for k, v in expected.items()}
    for r in routing:  # the probabilities and drops as the proto and the JSON carry them
        _, probs, dropped = expected[(r["stack"], r["layer"])]
        assert r["probs"] == pytest.approx(probs, abs=1e-5) and r["dropped"] == dropped
    for r, sent in zip(body["routing"], routing):
        assert r["probs"] == pytest.approx(sent["probs"], abs=1e-6) and r["dropped"] == sent["dropped"]
    assert not server["stub"].Generate(pb.GenerateRequest(input_ids=PROMPTS[2], max_new_tokens=3)).routing


def test_grpc_embed_equals_transformers_encoder(server, hf_model):
    stub = server["stub"]
    inputs = [pb.EmbedInput(input_ids=ids) for ids in PROMPTS] + [pb.EmbedInput(text="sort : 3 1 2")]
    mean = stub.Embed(pb.EmbedRequest(inputs=inputs))
    each = stub.Embed(pb.EmbedRequest(inputs=inputs[:2], pooling="none"))
    d_model = hf_model.config.d_model
    text_ids = AutoTokenizer.from_pretrained(server["path"])("sort : 3 1 2")["input_ids"]
    with torch.no_grad():  # each input alone: transformers' capacity would count another input's padding
        reference = [hf_model.get_encoder()(input_ids=torch.tensor([ids])).last_hidden_state[0]
                     for ids in [*PROMPTS, text_ids]]
    assert mean.dimensions == d_model and mean.prompt_tokens == sum(map(len, reference))
    for expected, got in zip(reference, mean.embeddings, strict=True):
        assert got.tokens == len(expected)
        assert torch.allclose(torch.tensor(list(got.values)), expected.mean(dim=0), atol=1e-4)
    for expected, got in zip(reference, each.embeddings):
        assert torch.allclose(torch.tensor(list(got.values)).view(-1, d_model), expected, atol=1e-4)


def test_an_answer_over_grpcs_default_4_mib_comes_through_the_proxy(server):
    """Serve's proxy takes a front's answer over gRPC, whose default limit is 4 MiB: 16 prompts of 500 tokens
    embedded token by token are a 10 MiB answer. Fails if the proxy refuses it (a 500 and no embedding)."""
    ids = [[3 + (i * 7 + j) % 40 for j in range(499)] + [1] for i in range(16)]
    status, body = post(f"{server['http']}/v1/embeddings",
                        {"model": server["path"].name, "input": ids, "pooling": "none"})
    assert status == 200, body
    assert [len(d["embedding"]) for d in body["data"]] == [500] * 16
    alone = server["stub"].Embed(pb.EmbedRequest(inputs=[pb.EmbedInput(input_ids=ids[5])], pooling="none"))
    assert torch.allclose(torch.tensor(body["data"][5]["embedding"]).view(-1),
                          torch.tensor(list(alone.embeddings[0].values)), atol=1e-5)


@pytest.mark.parametrize("request_fields, field", [
    ({}, "inputs"),
    ({"inputs": [{"input_ids": [5, 1]}], "pooling": "max"}, "pooling"),
    ({"inputs": [{"input_ids": [5, 1]}, {"input_ids": [5, 10**6]}]}, "inputs[1].input_ids"),
    ({"inputs": [{}]}, "inputs[0]"),
    ({"inputs": [{"text": "sort", "input_ids": [5, 1]}]}, "inputs[0]"),
    # More than could ever queue: refused by their count before any is read.
    ({"inputs": [{}] * (MAX_SEQUENCES + MAX_WAITING + 1)}, "inputs"),
])
def test_bad_embed_input_is_invalid_argument(server, request_fields, field):
    with pytest.raises(grpc.RpcError) as refused:
        server["stub"].Embed(json_format.ParseDict(request_fields, pb.EmbedRequest()))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith(field + ":"), refused.value.details()


def wait_for_idle(stub, timeout: float = 30.0) -> pb.ModelInfoResponse:
    deadline = time.monotonic() + timeout
    while True:
        info = stub.ModelInfo(pb.ModelInfoRequest())
        if info.active_sequences == 0 and info.waiting_requests == 0 or time.monotonic() > deadline:
            return info
        time.sleep(0.05)


def long_request(stub) -> pb.GenerateRequest:
    """A greedy request that runs all MAX_NEW_LIMIT steps when left alone (never reaches EOS)."""
    for prompt in PROMPTS:
        request = pb.GenerateRequest(input_ids=prompt, max_new_tokens=MAX_NEW_LIMIT)
        if stub.Generate(request).finish_reason == "length":
            return request
    raise AssertionError("every prompt reaches EOS")


# A request left alone would decode all MAX_NEW_LIMIT steps; one that stops as it should, a few more at most.
STEPS_AFTER_CANCEL = 10


def test_cancelled_stream_stops_within_a_few_steps_and_frees_its_slot(server):
    """Fails if a cancelled stream goes on decoding (its updates from Scheduler.queue not marking it cancelled, or
    the batcher not dropping cancelled rows): its ~250 remaining steps would show in the step counter."""
    stub = server["stub"]
    long_running = long_request(stub)
    stream = stub.GenerateStream(long_running)
    next(stream), next(stream)
    assert stub.ModelInfo(pb.ModelInfoRequest()).active_sequences == 1
    stream.cancel()
    steps = stub.ModelInfo(pb.ModelInfoRequest()).decode_steps
    info = wait_for_idle(stub)
    assert info.decode_steps - steps <= STEPS_AFTER_CANCEL, (steps, info.decode_steps)
    assert info.active_sequences == 0 and info.waiting_requests == 0 and info.cache_rows == 0


def test_a_streamed_completion_whose_client_goes_stops_every_choice(server):
    """OpenAI's API, two choices streamed: the client reads the first event and closes the connection. Fails if the
    choices go on decoding (the task following them outliving the stream that reads them)."""
    stub = server["stub"]
    prompt = list(long_request(stub).input_ids)
    url = urllib.parse.urlsplit(server["http"])
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    body = {"model": server["path"].name, "prompt": prompt, "max_tokens": MAX_NEW_LIMIT, "temperature": 0, "n": 2,
            "stream": True}
    connection.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    # Told to pass each event on as it comes: a buffering proxy (nginx) would hold them back
    assert (response.getheader("cache-control"), response.getheader("x-accel-buffering")) == ("no-cache", "no")
    assert stub.ModelInfo(pb.ModelInfoRequest()).active_sequences == 2
    connection.close()
    steps = stub.ModelInfo(pb.ModelInfoRequest()).decode_steps
    info = wait_for_idle(stub)
    assert info.decode_steps - steps <= STEPS_AFTER_CANCEL, (steps, info.decode_steps)
    assert info.active_sequences == 0 and info.cache_rows == 0


def test_a_unary_completion_whose_client_goes_stops_every_choice(server):
    """As the test above, the completion unary: the client closes the connection while its two choices decode. Fails
    if they go on decoding to their end (Serve's cancellation of the call not reaching the choices)."""
    stub = server["stub"]
    prompt = list(long_request(stub).input_ids)
    url = urllib.parse.urlsplit(server["http"])
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    body = {"model": server["path"].name, "prompt": prompt, "max_tokens": MAX_NEW_LIMIT, "temperature": 0, "n": 2}
    connection.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    wait_until(lambda: stub.ModelInfo(pb.ModelInfoRequest()).active_sequences == 2, "the choices to decode", 60)
    connection.close()
    steps = stub.ModelInfo(pb.ModelInfoRequest()).decode_steps
    info = wait_for_idle(stub)
    assert info.decode_steps - steps <= STEPS_AFTER_CANCEL, (steps, info.decode_steps)
    assert info.active_sequences == 0 and info.cache_rows == 0


def test_deadline_stops_within_a_few_steps_and_frees_its_slot(server):
    """Fails as the test above does, for a unary call whose deadline passes."""
    stub = server["stub"]
    long_running = long_request(stub)
    began = time.monotonic()
    stub.Generate(long_running)
    alone_s = time.monotonic() - began  # the deadline falls a quarter of the way through, however fast the steps
    steps = stub.ModelInfo(pb.ModelInfoRequest()).decode_steps
    began = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(long_running, timeout=alone_s / 4)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    steps_by_deadline = stub.ModelInfo(pb.ModelInfoRequest()).decode_steps - steps
    info = wait_for_idle(stub)
    print(f"\n{steps_by_deadline} steps by the deadline ({time.monotonic() - began:.2f} s), "
          f"{info.decode_steps - steps} in all")
    assert info.decode_steps - steps <= steps_by_deadline + STEPS_AFTER_CANCEL < MAX_NEW_LIMIT
    assert info.active_sequences == 0 and info.cache_rows == 0


BAD_REQUESTS = [
    (dict(), "text"),
    (dict(text="count", input_ids=[3, 1]), "text"),
    (dict(input_ids=[3, 5000]), "input_ids"),
    (dict(input_ids=[3, -2]), "input_ids"),
    (dict(input_ids=[3] * 600), "input_ids"),
    (dict(input_ids=[3, 1], max_new_tokens=0), "max_new_tokens"),
    (dict(input_ids=[3, 1], max_new_tokens=MAX_NEW_LIMIT + 1), "max_new_tokens"),
    (dict(input_ids=[3, 1], temperature=-0.5), "temperature"),
    (dict(input_ids=[3, 1], temperature=float("nan")), "temperature"),
    (dict(input_ids=[3, 1], temperature=1e-30), "temperature"),
    (dict(input_ids=[3, 1], top_k=-1), "top_k"),
    (dict(input_ids=[3, 1], top_p=-0.1), "top_p"),
    (dict(input_ids=[3, 1], top_p=1.5), "top_p"),
    (dict(input_ids=[3, 1], stop_token_ids=[9999]), "stop_token_ids"),
]


@pytest.mark.parametrize("fields, field", BAD_REQUESTS)
def test_bad_input_is_invalid_argument(server, fields, field):
    for call in (server["stub"].Generate, lambda r: list(server["stub"].GenerateStream(r))):
        with pytest.raises(grpc.RpcError) as error:
            call(pb.GenerateRequest(**fields))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details().startswith(field + ":")
    # ... and the server goes on serving.
    assert server["stub"].Generate(pb.GenerateRequest(input_ids=[3, 1], max_new_tokens=2)).token_ids


@pytest.mark.parametrize("method, data", [
    ("switchserve.v1.SwitchServe/Generate", bytes.fromhex("0a02fffe")),  # text, not UTF-8
    ("switchserve.v1.SwitchServe/GenerateStream", bytes.fromhex("5201ff")),  # a stop string, not UTF-8
    ("switchserve.v1.SwitchServe/Embed", bytes.fromhex("0a040a02fffe")),  # inputs[0].text, not UTF-8
    ("switchserve.v1.SwitchServe/ModelInfo", b"\x0a\x05ab"),  # cut short
    ("grpc.health.v1.Health/Check", b"\x0a\x05ab"),
])
def test_bytes_that_are_no_valid_request_are_invalid_argument(server, method, data):
    """A request protobuf cannot read is bad input, as any other: gRPC alone would answer UNKNOWN before the method
    ran. Fails if the server's registration reads requests as the generated code does."""
    channel = server["channel"]
    call = (channel.unary_stream if method.endswith("Stream") else channel.unary_unary)(
        f"/{method}", request_serializer=lambda raw: raw, response_deserializer=lambda raw: raw)
    with pytest.raises(grpc.RpcError) as error:
        answer = call(data, timeout=30)
        if method.endswith("Stream"):
            list(answer)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith("body: not a valid "), error.value.details()


def test_health_follows_the_health_protocol(server):
    """Check names the server ("") or the API, else NOT_FOUND as grpcio's own health servicer answers; Watch is not
    served (UNIMPLEMENTED: poll Check). Fails if an unknown service reads SERVING, or Watch fails as INTERNAL."""
    health = health_pb2_grpc.HealthStub(server["channel"])
    for service in ("", "switchserve.v1.SwitchServe"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as error:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and "no.such.Service" in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        next(iter(health.Watch(health_pb2.HealthCheckRequest(), timeout=10)))
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_health_and_model_info_answer_while_generating(server):
    stub = server["stub"]
    request = long_request(stub)  # a few hundred steps each: still running while we look
    calls = [stub.Generate.future(request) for _ in range(3)]
    wait_until_decoding(stub, timeout_s=30)
    health = health_pb2_grpc.HealthStub(server["channel"]).Check(health_pb2.HealthCheckRequest(), timeout=10)
    info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=10)
    busy = not all(c.done() for c in calls)
    for c in calls:
        c.result(timeout=120)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert busy and info.active_sequences + info.waiting_requests > 0
    assert info.num_experts == 8 and len(info.actors) == 2
    hosted = sorted((e.stack, e.layer, e.expert) for a in info.actors for e in a.experts)
    assert hosted == sorted((s, layer, e) for s in ("encoder", "decoder") for layer in (1, 3) for e in range(8))
    assert all(a.device == "cpu" and a.node_id for a in info.actors)
    assert sum(sum(load.tokens) for load in info.expert_tokens) > 0
    config = SwitchCheckpoint.open(server["path"]).config
    assert (info.encoder_layers, info.decoder_layers) == (config.num_layers, config.num_decoder_layers)
    assert (info.vocab_size, info.d_model, info.d_ff) == (config.vocab_size, config.d_model, config.d_ff)
    assert info.expert_capacity == config.expert_capacity > 0 and info.capacity_mode == "hf"
    held = 4 * 4 * 2 * config.d_model * config.d_ff * 4  # 4 experts of 4 sparse layers, wi and wo, float32
    assert all(a.expert_bytes == held and a.pid > 0 for a in info.actors)
    assert info.decode_steps > 0 and info.cache_rows == info.active_sequences > 0


def overload(stub, total: int) -> list[grpc.StatusCode]:
    """Send `total` requests at once; the status each ends with."""
    calls = [stub.Generate.future(pb.GenerateRequest(input_ids=PROMPTS[i % 4], max_new_tokens=30, temperature=1.0,
                                                     seed=i)) for i in range(total)]
    codes = []
    for c in calls:
        try:
            c.result(timeout=180)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            codes.append(e.code())
            assert e.details()
    return codes


def test_full_queue_is_resource_exhausted(server):
    """Far more requests at once than the batch and queue hold, in waves: the excess is refused, the rest
    complete, and the server's memory after the last wave is about what it was after the first."""
    stub, total, memory = server["stub"], MAX_SEQUENCES + MAX_WAITING + 24, []
    for wave in range(4):
        codes = overload(stub, total)
        refused = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        memory.append(resident_memory("ray::ServeReplica:switch-serve", "ray::ExpertActor"))
        print(f"wave {wave}: {total} concurrent requests, {codes.count(grpc.StatusCode.OK)} served, {refused} "
              f"refused; server and actors hold {memory[-1] / 2**20:.0f} MiB")
        assert refused > 0 and codes.count(grpc.StatusCode.OK) + refused == total
        # At least a full queue's worth is accepted (requests count as waiting until the batcher admits them).
        assert codes.count(grpc.StatusCode.OK) >= MAX_WAITING
    # The first wave warms the allocator; a request that left anything behind would add up over the others.
    assert memory[-1] - memory[0] < 0.05 * memory[0], memory
    assert stub.Generate(pb.GenerateRequest(input_ids=[3, 1], max_new_tokens=2)).token_ids


def post(url: str, body, timeout_s: float = 60) -> tuple[int, dict | str]:
    """The status and the answer: JSON parsed, anything else (a stream's events, Serve's own refusals) as text."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        r = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as e:
        r = e
    with r:
        raw = r.read().decode()
        return r.status, json.loads(raw) if r.headers.get_content_type() == "application/json" else raw


def test_http_generate_equals_grpc(server):
    unary = server["stub"].Generate(pb.GenerateRequest(input_ids=PROMPTS[0], max_new_tokens=6, return_logprobs=True))
    status, body = post(f"{server['http']}/v1/generate",
                        {"input_ids": PROMPTS[0], "max_new_tokens": 6, "return_logprobs": True, "stream": None})
    assert status == 200 and body["token_ids"] == list(unary.token_ids)  # null: the default, as for every field
    assert body["logprobs"] == pytest.approx(list(unary.logprobs))
    assert body["finish_reason"] == unary.finish_reason and body["prompt_tokens"] == len(PROMPTS[0])
    # Every field is there, empty or zero ones too, as the README says.
    assert set(body) == {f.name for f in pb.GenerateResponse.DESCRIPTOR.fields}
    assert body["routing"] == [] and body["dropped_tokens"] == unary.dropped_tokens
    # A field null in one spelling and given in the other is given once, whichever comes first.
    for spellings in ({"max_new_tokens": None, "maxNewTokens": 6}, {"max_new_tokens": 6, "maxNewTokens": None}):
        status, body = post(f"{server['http']}/v1/generate", {"input_ids": PROMPTS[0], **spellings})
        assert status == 200 and body["token_ids"] == list(unary.token_ids), spellings


def test_http_stream_is_server_sent_events(server):
    unary = server["stub"].Generate(pb.GenerateRequest(text="spell : 4 2", max_new_tokens=6))
    status, raw = post(f"{server['http']}/v1/generate", {"text": "spell : 4 2", "max_new_tokens": 6, "stream": True})
    events = [json.loads(line[len("data: "):]) for line in raw.splitlines() if line.startswith("data: ")]
    assert status == 200 and [t for e in events for t in e["token_ids"]] == list(unary.token_ids)
    assert events[-1]["finish_reason"] == unary.finish_reason


@pytest.mark.parametrize("body, field", [
    ({"input_ids": [3, 5000]}, "input_ids"),
    ({"input_ids": [3, 1], "top_p": 2}, "top_p"),
    ({"input_ids": [3, 1], "top_k": "many"}, "top_k"),
    ({"input_ids": [3, 1], "temperature": "hot"}, "temperature"),
    ({"input_ids": [3, 1], "max_new_tokens": 1.5}, "max_new_tokens"),
    ({"input_ids": [3, 1], "no_such_field": 1}, "no_such_field"),
    ({"input_ids": [3, 1], "no_such_field": None}, "no_such_field"),  # a null does not hide an unknown field
    ({"input_ids": [3, 1], "stream": "yes"}, "stream"),
    ({"input_ids": [3, 1], "max_new_tokens": 2, "maxNewTokens": 3}, "max_new_tokens"),  # given twice
    ({"input_ids": [3, 1], "inputIds": [3]}, "input_ids"),
    (b"{not json", "body"),
    (b"[" * 100_000, "body"),  # nested deeper than Python's stack
    ({"text": "sort : 3 \ud800 1"}, "text"),  # half of a UTF-16 surrogate pair: no text, for any tokenizer
    ({"input_ids": [3, 1], "stop": ["b", "\udc00"]}, "stop[1]"),
])
def test_http_bad_input_is_400(server, body, field):
    status, answer = post(f"{server['http']}/v1/generate", body)
    assert status == 400 and answer["field"] == field and answer["error"]


def test_the_lowest_temperature_sent_as_a_float32_is_taken(server):
    """The proto's floats are float32, in which the documented least temperature, 0.01, arrives a little below."""
    assert server["stub"].Generate(pb.GenerateRequest(input_ids=[3, 1], max_new_tokens=2, temperature=0.01)).token_ids


def test_fastapis_own_pages_are_not_served(server):
    """FastAPI's own /docs, /redoc and /openapi.json would answer without the API key: there are none."""
    for page in ("/docs", "/redoc", "/openapi.json"):
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(f"{server['http']}{page}", timeout=30)
        assert error.value.code == 404, page


@pytest.mark.parametrize("route, fields, param", [
    ("/v1/completions", {"prompt": "sort : 3 \ud800 1"}, "prompt"),
    ("/v1/completions", {"prompt": ["sort : 3 1", "x\udfff"]}, "prompt[1]"),
    ("/v1/completions", {"prompt": "sort : 3 1", "stream_options": {"\ud800": True}}, "stream_options"),
    ("/v1/embeddings", {"input": ["sort : 3 1", "\ud800"]}, "input[1]"),
    ("/v1/embeddings", {"input": "sort : 3 1", "model": "m\ud800"}, "model"),
    ("/v1/completions", {"prompt": "sort : 3 \ud800 1", "encoding": "utf-8"}, "prompt"),
    ("/v1/completions", {"prompt": "sort : 3 \ud800 1", "encoding": "utf-16"}, "prompt"),
    ("/v1/embeddings", {"input": ["\ud800"], "encoding": "utf-32"}, "input[0]"),
])
def test_openai_text_that_is_not_unicode_is_a_400_naming_the_field(server, route, fields, param):
    """A JSON string may hold half of a surrogate pair ("\\ud800"), which no tokenizer takes: refused as bad
    input naming where it is. (The tokenizer's TypeError was a 503, which OpenAI's client retries; a model's name
    holding one broke the 404's JSON.)"""
    encoding = fields.pop("encoding", None)  # else escaped ("\\ud800"); json.loads reads UTF-16 and UTF-32 too
    body = {"model": server["path"].name, **fields}
    if encoding is not None:
        body = json.dumps(body, ensure_ascii=False).encode(encoding, "surrogatepass")
    status, answer = post(f"{server['http']}{route}", body)
    assert status == 400 and answer["error"]["param"] == param, answer
    assert answer["error"]["message"] == f"{param}: not valid Unicode (half of a UTF-16 surrogate pair)"


ITEMS_OVER = "1025 items, more than any list or object of a request here may hold (1024)"


@pytest.mark.parametrize("route, fields, param, why", [
    ("/v1/generate", {"input_ids": [5] * 1025}, "input_ids", ITEMS_OVER),
    ("/v1/completions", {"prompt": [[5, 1], [5] * 1025]}, "prompt[1]", ITEMS_OVER),
    ("/v1/completions", {"prompt": [[[5] * 1025]]}, "prompt[0][0]", ITEMS_OVER),  # at any depth
    ("/v1/completions", {"prompt": "sort", "logit_bias": {str(i): 0 for i in range(1025)}}, "logit_bias",
     ITEMS_OVER),
    ("/v1/embeddings", {"input": [[5]] * 1025}, "input", ITEMS_OVER),
    ("/v1/generate", {"input_ids": [[]] * 200}, "body",  # 20 sequences a request: 104 lists and objects at most
     "more than 104 lists and objects, more than a request here may hold"),
    ("/v1/completions", {"prompt": "sort " * 2**21}, "body", None),
    ("/v1/generate", {"text": "sort " * 2**21}, "body", None),
])
def test_a_body_beyond_any_request_the_server_takes_is_refused_before_it_is_parsed(server, route, fields, param, why):
    """A list or object of more items than twice any limit (512 prompt tokens here) at any depth, more lists and
    objects than two for each sequence a request may queue and 64, or more bytes than the most sequences a request may
    queue with the longest prompts (8912896 here), is a 400 naming it, before protobuf or pydantic parse the body (2
    million token ids took them 1-4 s of the replica's event loop before the prompt's length was checked). Fails if
    a body is parsed whole first (the message then names the prompt's limit, or the field's type)."""
    body = {"model": server["path"].name, **fields} if route != "/v1/generate" else fields
    size = len(json.dumps(body).encode())
    status, answer = post(f"{server['http']}{route}", body)
    assert status == 400, answer
    error, field = (answer["error"], answer["field"]) if route == "/v1/generate" else (
        answer["error"]["message"], answer["error"]["param"] or "body")
    assert field == param
    assert error.endswith(why or f"{size} bytes, more than a request this server takes can have (8912896)")


def test_the_walks_over_a_body_make_no_path_for_a_number(monkeypatch):
    """A body of many token ids in lists of lists is walked without a path made for each id (the surrogate walk made
    one for every item: seconds and gigabytes for a body at the byte limit). Fails if either walk makes them."""
    import router_service.server as server_module
    from router_service.requests import BodyLimits

    made, nested = [], server_module.nested
    monkeypatch.setattr(server_module, "nested", lambda *args: made.extend(out := nested(*args)) or out)
    body = {"prompt": [[5] * 1000 for _ in range(90)], "stop": ["a", "\udc00"]}
    assert server_module.oversized(body, BodyLimits(bytes=2**30, items=1000, containers=100)) is None
    assert server_module.unpaired_surrogate(body) == "stop[1]"
    assert len(made) == 2 * 92  # by each walk: the 90 lists of ids, and the top's two lists or stop's two strings


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_body_beyond_the_limit_is_refused_before_it_is_read_whole(declared):
    """Behind HAProxy a replica reads the body from the client: one of more bytes than any request may have is
    refused by its Content-Length, and one sent in chunks as soon as the chunks read pass the limit, the rest read
    (the client then gets the 400, not a reset connection) but not kept, and no more of it than the limit again.
    Fails if the body is read whole first (a body of gigabytes would take the replica's memory)."""
    from router_service.requests import InvalidRequest
    from router_service.server import body_within

    read = []

    async def body() -> bytes:
        pytest.fail("the body read whole")

    async def stream():
        for _ in range(1000):
            read.append(100)
            yield b"x" * 100

    request = SimpleNamespace(headers={"content-length": "100000"} if declared else {}, body=body, stream=stream)
    with pytest.raises(InvalidRequest) as e:
        asyncio.run(body_within(request, InvalidRequest, 250))
    size = "100000" if declared else "at least 300"  # where the chunks read passed the limit: kept no further
    assert (e.value.field, str(e.value)) == ("body", f"body: {size} bytes, more than a request this server takes "
                                                     "can have (250)")
    # The rest read (not left for the connection to be reset), up to as much again: a body of gigabytes is not.
    assert len(read) == (3 if declared else 6)
    request = SimpleNamespace(headers={}, stream=stream)  # a chunked body within the limit, read whole
    assert asyncio.run(body_within(request, InvalidRequest, 10**6)) == b"x" * 100_000


def test_a_lone_surrogate_is_found_at_any_depth_and_named_by_its_path():
    """Found at a depth json.loads takes but Python's stack would not, with a key named `body` at the top told apart
    from the top itself; a surrogate pair is text. Fails if the walk recurses (a RecursionError, a 503)."""
    from router_service.server import SURROGATE, unpaired_surrogate

    deep = b'{"prompt": ' + b"[" * 900 + b'"\\ud800"' + b"]" * 900 + b"}"
    assert unpaired_surrogate(json.loads(deep)) == "prompt" + "[0]" * 900
    assert unpaired_surrogate(json.loads(b'{"body": {"x": "\\udc00"}}')) == "body.x"
    assert unpaired_surrogate(json.loads(b'{"\\ud800": 1}')) == "body"
    pair = b'{"prompt": "\\ud83d\\ude00"}'
    assert SURROGATE.search(pair) and unpaired_surrogate(json.loads(pair)) is None
    assert unpaired_surrogate(json.loads(b'[{"x": "\\ud800"}]')) == "body[0].x"
    assert not SURROGATE.search('{"prompt": "caf\u00e9 \u00e9t\u00e9"}'.encode())


def test_openai_requests_refused_for_a_full_queue_get_429(server):
    """Far more completions at once than the batch and queue hold, half of them streamed: each the replica refuses
    gets 429 and OpenAI's rate-limit error, a streamed one too (refused before its headers, not as an event of a 200
    stream); the others complete. One of more choices than the server ever takes is bad input (400)."""
    model, total = server["path"].name, MAX_SEQUENCES + MAX_WAITING + 24

    completions = f"{server['http']}/v1/completions"

    def one(i: int) -> tuple[bool, int, dict | str]:
        body = {"model": model, "prompt": PROMPTS[i % 4], "max_tokens": 30, "seed": i, "stream": i % 2 == 0}
        return (i % 2 == 0, *post(completions, body, timeout_s=180))

    with ThreadPoolExecutor(total) as pool:
        answers = list(pool.map(one, range(total)))
    for streamed, status, answer in answers:
        if status == 503:  # Serve's proxy, whose own queue (max_queued_requests) was full first
            assert answer.startswith("Request dropped due to backpressure"), answer
            continue
        assert status in (200, 429), (status, answer)
        if status == 429:
            assert answer["error"]["type"] == "rate_limit_error"
        elif streamed:
            assert '"error"' not in answer and answer.endswith("data: [DONE]\n\n")
    assert {streamed for streamed, status, _ in answers if status == 429} == {True, False}
    for stream in (False, True):
        status, answer = post(completions, {"model": model, "prompt": [PROMPTS[0]] * 2, "n": 11, "max_tokens": 2,
                                            "stream": stream})
        error = answer["error"]
        assert status == 400 and error["param"] == "prompt" and "22 sequences in one request" in error["message"]


def test_http_model_info(server):
    server["stub"].Generate(pb.GenerateRequest(input_ids=PROMPTS[0], max_new_tokens=2))
    with urllib.request.urlopen(f"{server['http']}/v1/model", timeout=30) as r:
        info = json.loads(r.read())
    assert info["num_experts"] == 8 and info["capacity_mode"] == "hf" and len(info["actors"]) == 2
    # Every field, and 64-bit integers as strings, as protobuf's JSON mapping writes them.
    assert set(info) == {f.name for f in pb.ModelInfoResponse.DESCRIPTOR.fields}
    served = server["stub"].ModelInfo(pb.ModelInfoRequest())  # after it: its steps as many or more
    assert isinstance(info["decode_steps"], str) and 0 < int(info["decode_steps"]) <= served.decode_steps


def test_cli_generate_is_a_client_of_the_server(server, capsys):
    from cluster.cli import main

    main(["generate", "--address", server["grpc"], "--input-ids", json.dumps(PROMPTS[:2]), "--max-new-tokens", "5",
          "--logprobs", "--routing", "--json"])
    remote = json.loads(capsys.readouterr().out)["outputs"]
    with SwitchCluster(server["path"], placement=PlacementConfig(experts_per_actor=4)) as model:
        local = [o.to_dict() for o in model.generate(PROMPTS[:2], max_new_tokens=5, routing=True)]
        stop = " ".join(model.decode(local[0]["token_ids"]).split()[1:3])
        cut_here = model.generate(PROMPTS[:2], max_new_tokens=5, stop=[stop])
    # Stop strings: the server cuts its answers where the Python API cuts them, at a token before the last.
    main(["generate", "--address", server["grpc"], "--input-ids", json.dumps(PROMPTS[:2]), "--max-new-tokens", "5",
          "--stop", stop, "--json"])
    cut_there = json.loads(capsys.readouterr().out)["outputs"]
    assert [(r["text"], r["token_ids"], r["finish_reason"]) for r in cut_there] == [
        (o.text, o.token_ids, o.finish_reason) for o in cut_here]
    assert cut_here[0].finish_reason == "stop" and len(cut_here[0].token_ids) < len(local[0]["token_ids"])
    assert [r["token_ids"] for r in remote] == [r["token_ids"] for r in local]
    assert [r["finish_reason"] for r in remote] == [r["finish_reason"] for r in local]
    def routes(output: dict) -> list[dict]:  # less the probabilities, float32 on the wire
        return [{k: layer[k] for k in ("stack", "layer", "experts", "dropped")} for layer in output["routing"]]

    for r, here in zip(remote, local):
        assert r["logprobs"] == pytest.approx(here["logprobs"], abs=1e-5)
        assert routes(r) == routes(here)
    with pytest.raises(SystemExit):
        main(["generate", "--address", server["grpc"], "--input-ids", "[[3, 5000]]"])
    assert "INVALID_ARGUMENT: input_ids" in capsys.readouterr().err


def test_cli_stats_writes_what_the_planner_reads(server, tmp_path):
    from cluster.cli import main
    from experts.plan import read_stats

    server["stub"].Generate(pb.GenerateRequest(input_ids=PROMPTS[0], max_new_tokens=4))
    info = server["stub"].ModelInfo(pb.ModelInfoRequest())
    out = tmp_path / "stats.json"
    main(["stats", "--address", server["grpc"], "-o", str(out)])
    stats = read_stats(str(out))
    assert len(stats) == len(info.expert_tokens) * info.num_experts
    for load in info.expert_tokens:  # tokens only grow: at least what ModelInfo said just before
        assert all(stats[(load.stack, load.layer, e)] >= n for e, n in enumerate(load.tokens))
    assert sum(stats.values()) > 0


def scrape_ray_metrics() -> str:
    """Every node's Prometheus metrics, from Ray's metrics agent."""
    import ray

    pages = []
    for node in ray.nodes():
        if node["Alive"]:
            url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            with urllib.request.urlopen(url, timeout=10) as r:
                pages.append(r.read().decode())
    return "\n".join(pages)


def metric_total(page: str, name: str) -> float:
    """The sum of a metric's samples over all its label sets."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in page.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def test_the_front_and_the_expert_actors_keep_the_memory_their_tensors_free(server):
    """Their processes start with KEPT_HEAP_ENV, which glibc reads as a process starts: fails if the fronts' or the
    actors' Ray runtime environment goes without it."""
    actors = {a.pid for a in server["stub"].ModelInfo(pb.ModelInfoRequest(), timeout=30).actors}
    fronts = processes(f"ray::{replica_class(APP_NAME, FRONT_DEPLOYMENT)}")
    assert actors and fronts
    for proc in fronts + [Path(f"/proc/{pid}") for pid in actors]:
        assert KEPT_HEAP_ENV.items() <= environment(proc).items(), proc


def test_metrics_reach_rays_prometheus_endpoint(server):
    """Every metric the service records, on Ray's endpoint; the experts per layer too, a gauge set once as the
    replica starts, which Ray's agent drops where it is not exported again within two of its report intervals (10 s
    by default): looked at once the replica is older than that."""
    time.sleep(max(0.0, server["started"] + 2 * 10 + 5 - time.monotonic()))
    for prompt in PROMPTS:
        server["stub"].Generate(pb.GenerateRequest(input_ids=prompt, max_new_tokens=4))
    server["stub"].Embed(pb.EmbedRequest(inputs=[pb.EmbedInput(input_ids=PROMPTS[0])]))
    names = ["ray_switch_serve_requests_total", "ray_switch_serve_generated_tokens_total",
             "ray_switch_serve_time_to_first_token_seconds_count", "ray_switch_serve_time_per_output_token_seconds_sum",
             "ray_switch_serve_batch_size_count", "ray_switch_serve_dispatch_seconds_count",
             "ray_switch_serve_expert_tokens_total", "ray_switch_serve_embedded_inputs_total",
             "ray_switch_serve_experts_per_layer"]
    deadline = time.monotonic() + 60  # the agent exports every few seconds
    while True:
        page = scrape_ray_metrics()
        totals = {name: metric_total(page, name) for name in names}
        # The dashboard's expert actor restarts: Ray's gauge of actors per state, as its GCS reports them, by class.
        actor_states = any('Name="ExpertActor"' in line and 'Source="gcs"' in line
                           for line in page.splitlines() if line.startswith("ray_actors{"))
        if (all(totals.values()) and actor_states) or time.monotonic() > deadline:
            break
        time.sleep(2)
    print("\n" + "\n".join(f"{name} {value:g}" for name, value in totals.items()))
    assert all(totals.values()), totals
    assert "ray_switch_serve_queue_depth{" in page
    assert 'status="OK"' in page and 'stack="encoder"' in page
    assert actor_states


# -- fuzzing: any request gets an answer or the right error, never INTERNAL ---------------------------------

REQUEST_FIELDS = {"text", "input_ids", "max_new_tokens", "temperature", "top_k", "top_p", "seed",
                  "stop_token_ids", "return_logprobs", "body", "stream"}
int32 = st.integers(-2**31, 2**31 - 1)
fuzzed_fields = st.fixed_dictionaries({}, optional={
    "text": st.text(max_size=30),
    "input_ids": st.one_of(st.lists(st.integers(3, 90), min_size=1, max_size=12), st.lists(int32, max_size=12)),
    "max_new_tokens": st.one_of(st.integers(1, 6), int32),
    "temperature": st.floats(width=32),
    "top_k": st.one_of(st.integers(0, 50), int32),
    "top_p": st.floats(width=32),
    "seed": st.integers(0, 2**64 - 1),
    "stop_token_ids": st.lists(st.one_of(st.integers(0, 120), int32), max_size=3),
})


# Random draws may all be refused (or all served); these two make sure each run sees both answers.
VALID_FIELDS = {"input_ids": [5, 6, 7], "max_new_tokens": 2}
REFUSED_FIELDS = {**VALID_FIELDS, "top_k": -1}


def tally(counts: dict, key) -> None:
    counts[key] = counts.get(key, 0) + 1


def test_fuzzed_grpc_requests_get_the_right_status(server):
    seen: dict = {}

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
    @given(fuzzed_fields)
    @example(VALID_FIELDS).via("a request that must be served")
    @example(REFUSED_FIELDS).via("a request that must be refused")
    def check(fields):
        try:
            server["stub"].Generate(pb.GenerateRequest(**fields), timeout=60)
            tally(seen, "OK")
            assert fields != REFUSED_FIELDS
        except grpc.RpcError as e:
            tally(seen, e.code().name)
            assert fields != VALID_FIELDS, e.details()
            assert fields != REFUSED_FIELDS or (e.code(), e.details().split(":")[0]) == (
                grpc.StatusCode.INVALID_ARGUMENT, "top_k")
            # One at a time to an idle server: never a full queue, which a bad field must not pass for either.
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                assert e.details().split(":")[0] in REQUEST_FIELDS and "\n" not in e.details()

    check()
    print(f"\ngRPC Generate fuzzed with {sum(seen.values())} requests: {seen}")
    assert seen.get("OK") and seen.get("INVALID_ARGUMENT")


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                      max_size=4), max_leaves=8)
fuzzed_bodies = st.one_of(
    fuzzed_fields.map(lambda f: {k: v for k, v in f.items() if not (isinstance(v, float) and v != v)}),
    st.dictionaries(st.sampled_from(sorted(REQUEST_FIELDS - {"body"}) + ["other"]), json_values,
                    max_size=4),
    json_values)


def test_fuzzed_http_requests_get_the_right_status(server):
    seen: dict = {}

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
    @given(fuzzed_bodies)
    @example(VALID_FIELDS).via("a request that must be served")
    @example(REFUSED_FIELDS).via("a request that must be refused")
    def check(body):
        request = urllib.request.Request(f"{server['http']}/v1/generate", data=json.dumps(body).encode())
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                tally(seen, r.status)
                r.read()
            assert body != REFUSED_FIELDS
        except urllib.error.HTTPError as e:
            tally(seen, e.code)
            assert e.code == 400, e.read()  # one at a time to an idle server: never a full queue
            answer = json.loads(e.read())
            assert body != VALID_FIELDS, answer
            assert body != REFUSED_FIELDS or (e.code, answer["field"]) == (400, "top_k"), answer
            if e.code == 400:  # a field of the API, or the unknown one sent
                named = REQUEST_FIELDS | (set(body) if isinstance(body, dict) else set())
                assert answer["field"] in named and "\n" not in answer["error"]

    check()
    print(f"\nHTTP /v1/generate fuzzed with {sum(seen.values())} requests: {seen}")
    assert seen.get(200) and seen.get(400)
