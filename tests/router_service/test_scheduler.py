"""The batching thread's death (what no `except Exception` in its loop catches) fails its requests instead of
hanging them, refuses later ones, and turns the replica's health checks, gRPC's and Serve's, to not serving.
Without the thread's `finally` in Scheduler._run, the first request here would wait forever. And the batching
thread's OpenMP team is the process's only one."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import threading
import time
import traceback
from types import SimpleNamespace

import pytest
import torch
from grpc_health.v1 import health_pb2

from router_service.batching import ContinuousBatcher, Sequence
from router_service.requests import InvalidRequest
from router_service.scheduler import BatcherStopped, QueueFull, Scheduler
from router_service.server import SwitchServer


class Crash(BaseException):
    """Stands for what escapes the loop: a bug in the loop itself, an interpreter error."""


class CrashingFront:
    config = SimpleNamespace(eos_token_id=1, decoder_start_token_id=0)
    dtype, device = torch.float32, torch.device("cpu")

    def encode(self, prompts):
        raise Crash("the front crashed")


async def generate(scheduler: Scheduler) -> list:
    (updates,) = scheduler.queue([Sequence([5, 1])])
    return [seq async for seq in updates]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_stopped_batching_thread_fails_requests_and_health():
    scheduler = Scheduler(ContinuousBatcher(CrashingFront(), max_sequences=4), max_waiting=4)
    with pytest.raises(BatcherStopped):
        asyncio.run(asyncio.wait_for(generate(scheduler), timeout=10))  # the request the thread was working on
    assert not scheduler.alive
    scheduler._thread.join(10)  # its exception is reported within this test, where it is expected
    for _ in range(12):  # later ones, more than the batch and the queue hold, each refused at once and alike
        with pytest.raises(BatcherStopped):
            asyncio.run(asyncio.wait_for(generate(scheduler), timeout=10))
    assert scheduler.num_waiting == 0  # none left queued for a thread that is gone

    replica = SwitchServer.func_or_class  # the class, without Serve
    server = SimpleNamespace(scheduler=scheduler, cluster=SimpleNamespace(experts_ready=True))
    server.status = lambda: replica.status(server)
    assert server.status() == "not serving: the batching thread has stopped"
    health = asyncio.run(replica.Check(server, health_pb2.HealthCheckRequest(), None))
    assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(BatcherStopped):
        replica.check_health(server)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_request_queued_as_the_batching_thread_stops_is_refused_and_counts_nowhere(monkeypatch):
    """The thread may stop, failing what it has queued, between a request's look at it and its queueing: the
    request is refused, and its sequences count neither as waiting nor against the room (the health check's status
    and ModelInfo say what waits). Fails if they stay queued, counted, for a thread that is gone."""
    scheduler = Scheduler(ContinuousBatcher(CrashingFront(), max_sequences=4), max_waiting=4)
    with pytest.raises(BatcherStopped):
        asyncio.run(asyncio.wait_for(generate(scheduler), timeout=10))
    scheduler._thread.join(10)
    looks = iter([True, False])  # alive at the request's first look, stopped at its second
    monkeypatch.setattr(Scheduler, "alive", property(lambda self: next(looks)))
    with pytest.raises(BatcherStopped):
        asyncio.run(asyncio.wait_for(generate(scheduler), timeout=10))
    assert scheduler.num_waiting == 0 and scheduler.batcher.room() == (0, 4)


class FailingFront(CrashingFront):
    def encode(self, prompts):
        raise RuntimeError("expert actors lost")


def test_one_error_ending_many_requests_carries_each_raises_frames_alone():
    """A failed step hands every sequence it ends one error: each request's raise of it holds its own frames, not
    those of every request that raised it before. Fails if the traceback grows from one raise to the next."""
    scheduler = Scheduler(ContinuousBatcher(FailingFront(), max_sequences=4), max_waiting=4)

    async def raised() -> list[BaseException]:
        errors = []
        for updates in scheduler.queue([Sequence([5, 1]), Sequence([6, 1])]):  # admitted, and failed, together
            with pytest.raises(RuntimeError, match="expert actors lost") as info:
                async for _ in updates:
                    pass
            errors.append((info.value, len(traceback.extract_tb(info.value.__traceback__))))
        return errors

    (first, first_depth), (second, second_depth) = asyncio.run(asyncio.wait_for(raised(), timeout=10))
    assert first is second and first_depth == second_depth


class IdleBatcher(ContinuousBatcher):
    """Never has work for its thread, which waits: its queue stays as the test leaves it."""

    has_work = False


def test_a_request_of_several_sequences_is_let_in_whole_or_not_at_all():
    """Room is checked for all of a request's choices or inputs before any queues; more than the batch and the
    queue together ever hold is bad input, not a full queue (which a retry could get past)."""
    batcher = IdleBatcher(CrashingFront(), max_sequences=4)
    scheduler = Scheduler(batcher, max_waiting=4)
    with pytest.raises(InvalidRequest, match="^n: 9 sequences in one request"):
        scheduler.check_count(9, "n")
    scheduler.check_count(8, "n")
    scheduler.check_room(8)
    for _ in range(3):
        batcher.add(Sequence([5, 1]))
    with pytest.raises(QueueFull, match="3 sequences already waiting, room for .*; this request has 6"):
        scheduler.check_room(6)
    scheduler.check_room(5)


def test_the_queue_depth_is_set_as_sequences_queue_and_leave_not_only_at_a_step():
    """A step may wait long (on expert actors that restart): the gauge follows the callers arriving and leaving
    meanwhile. Fails if only the batching thread's steps set it (here, a thread that never steps)."""
    depth = []
    batcher = IdleBatcher(CrashingFront(), max_sequences=4)
    batcher.metrics = SimpleNamespace(waiting=depth.append)
    scheduler = Scheduler(batcher, max_waiting=4)

    async def queue_and_leave():
        first, second = Sequence([5, 1]), Sequence([6, 1])
        scheduler.queue([first, second])
        queued = depth[-1]
        scheduler.cancel([first])
        return queued, depth[-1]

    assert asyncio.run(queue_and_leave()) == (2, 1)


def test_a_requests_sequences_queue_together_at_once_and_leave_together():
    """A request's sequences queue all at once, with no await between the room's check and the queueing, or none
    do; as the request ends, every one not done leaves, those whose updates were never read too (a choice's task
    cancelled before it ran). Fails if they queue as each is first followed (a request of four that found room was
    refused once another's sequence had queued meanwhile, three of its own queued), or if the unread stay queued."""
    from router_service.server import SwitchServer

    scheduler = Scheduler(IdleBatcher(CrashingFront(), max_sequences=4), max_waiting=4)
    server = SimpleNamespace(scheduler=scheduler)
    sequences = [Sequence([5, 1]) for _ in range(4)]

    async def request() -> None:
        with SwitchServer.func_or_class._queued(server, sequences) as updates:
            assert len(updates) == 4 and scheduler.num_waiting == 4  # before any of them is read
            with pytest.raises(QueueFull):  # room for 4 more, not 5: none of them queues
                scheduler.queue([Sequence([5, 1]) for _ in range(5)])
            assert scheduler.num_waiting == 4
            assert not any(seq.cancelled for seq in sequences)

    asyncio.run(request())
    assert all(seq.cancelled for seq in sequences)


class SlowFront(CrashingFront):
    """An encoder pass that lasts until the test lets it end, then fails its batch."""

    def __init__(self):
        self.encoding, self.release = threading.Event(), threading.Event()

    def encode(self, prompts):
        self.encoding.set()
        self.release.wait(10)
        raise RuntimeError("this front encodes nothing")


def test_requests_being_encoded_keep_their_rooms_in_the_batch():
    """While a pass encodes the requests joining the batch, they are neither waiting nor decoding, but they hold
    their rows: the queue lets in no more than its limit. Fails if they are counted nowhere (requests let in beyond
    the limit would wait out a whole batch, instead of being refused and retried on another replica)."""
    front = SlowFront()
    scheduler = Scheduler(ContinuousBatcher(front, max_sequences=4), max_waiting=2)
    for _ in range(4):
        scheduler.batcher.add(Sequence([5, 1]))
    scheduler._wake.set()
    assert front.encoding.wait(10)
    try:
        with pytest.raises(QueueFull):
            scheduler.check_room(3)
        scheduler.check_room(2)
    finally:
        front.release.set()



def test_requests_cancelled_while_a_step_waits_give_their_room_back_at_once():
    """While a step waits (here an encoder pass; in service, most often on expert actors that restart), the requests
    whose callers gave up, queued or joining the batch, no longer count against the queue's limit or the batch's
    rows. Fails if they keep counting until the next step (callers retrying were refused RESOURCE_EXHAUSTED)."""
    front = SlowFront()
    scheduler = Scheduler(ContinuousBatcher(front, max_sequences=4), max_waiting=2)
    joining = [Sequence([5, 1]) for _ in range(4)]
    for seq in joining:
        scheduler.batcher.add(seq)
    scheduler._wake.set()
    assert front.encoding.wait(10)
    try:
        queued = [Sequence([5, 1]) for _ in range(2)]
        for seq in queued:
            scheduler.batcher.add(seq)
        with pytest.raises(QueueFull):
            scheduler.check_room(1)
        scheduler.cancel(queued)
        assert scheduler.num_waiting == 0
        scheduler.check_room(2)
        with pytest.raises(QueueFull):
            scheduler.check_room(3)
        scheduler.cancel(joining)
        scheduler.check_room(6)
    finally:
        front.release.set()

# In a process of its own, so that no other test's OpenMP threads are counted: the native threads that are not
# Python's (OpenMP's workers) after the model's building and after a batching thread's step.
OPENMP_TEAMS = """
import os, threading, torch
from router_service.batching import use_threads
from router_service.scheduler import math_here_on_one_thread

def native_threads():
    return len(os.listdir("/proc/self/task")) - len(threading.enumerate())

math_here_on_one_thread()
before = native_threads()
weights = torch.randn(1024, 1024)
weights @ weights  # the model's building, on the thread that builds the replica
built = native_threads()
stepped, done = threading.Event(), threading.Event()

def batching():
    use_threads(2)
    weights @ weights
    stepped.set()
    done.wait()

thread = threading.Thread(target=batching)
thread.start()
stepped.wait()
print(before, built, native_threads())
done.set()
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in Linux's /proc")
def test_the_batching_threads_openmp_team_is_the_only_one():
    """Where OMP_NUM_THREADS asks for several threads, the replica's building thread still starts no OpenMP team
    of its own (math_here_on_one_thread); the batching thread's team of two is counted (one worker)."""
    out = subprocess.run([sys.executable, "-c", OPENMP_TEAMS], env={**os.environ, "OMP_NUM_THREADS": "2"},
                         capture_output=True, text=True, check=True, timeout=120).stdout
    before, built, stepped = map(int, out.split())
    assert built == before
    assert stepped == built + 1


def test_a_stream_its_client_closes_closes_what_it_follows_at_once():
    """A gRPC stream closed by its client (Serve closes the replica's generator) closes the generator it reads at
    once (`follow`'s, a stand-in here; its own chain down to the scheduler is the next test's). Fails if it is left to
    the garbage collector, which closes it only some loop turns later."""
    from router_service.proto import switch_serve_pb2 as pb
    from router_service.server import SwitchServer

    replica, closed = SwitchServer.func_or_class, []

    async def follow(seq, updates, stop):
        try:
            yield SimpleNamespace(token_ids=[5], text="", logprobs=[], routing=[], finish_reason=None)
            await asyncio.Event().wait()
        finally:
            closed.append(seq)

    scheduler = SimpleNamespace(queue=lambda seqs: [None] * len(seqs), cancel=lambda seqs: None)
    server = SimpleNamespace(api_key=None, _finished=lambda error=None: None, _follow=follow, scheduler=scheduler,
                             _sequence=lambda request: (Sequence(list(request.input_ids)), ()))
    server._queued = lambda seqs: replica._queued(server, seqs)
    server._authorize = lambda metadata: replica._authorize(server, metadata)
    server._stream = lambda request: replica._stream(server, request)
    context = SimpleNamespace(invocation_metadata=lambda: [], set_code=lambda code: None,
                              set_details=lambda details: None)

    async def first_chunk_then_close() -> int:
        stream = replica.GenerateStream(server, pb.GenerateRequest(input_ids=[5, 1]), context)
        assert list((await anext(stream)).token_ids) == [5]
        await stream.aclose()
        return len(closed)

    assert asyncio.run(first_chunk_then_close()) == 1


def test_a_followed_stream_closed_after_its_first_piece_leaves_the_batch_at_once():
    """The real chain under a closed stream: router_service.server.follow over the scheduler's own updates. Closing
    it after its first piece cancels the sequence at once (the batching thread takes it out at its next step). Fails
    if `follow` leaves the updates to the garbage collector, or their `finally` does not cancel."""
    from router_service.config import ServerConfig
    from router_service.server import follow
    from router_service.text import TextStream

    scheduler = Scheduler(IdleBatcher(CrashingFront(), max_sequences=4), max_waiting=4)
    seq = Sequence([5, 1])

    async def first_piece_then_close():
        (updates,) = scheduler.queue([seq])
        pieces = follow(scheduler, seq, updates, TextStream(lambda ids: "", ()), ServerConfig(model="unused"))
        first = asyncio.ensure_future(anext(pieces))
        await asyncio.sleep(0.05)  # queued, and waiting for its first token
        seq.token_ids.append(7)  # as the batching thread makes it
        seq.logprobs.append(-0.1)
        seq.top_logprobs.append([])
        seq.on_update()
        assert (await first).token_ids == [7] and not seq.cancelled
        await pieces.aclose()
        return seq.cancelled

    assert asyncio.run(first_piece_then_close())


class TokenBatcher(ContinuousBatcher):
    """Makes a token a step (STEP_S apart) for every queued sequence, without a model, the last at `length`; the
    step `fail_at` (counted from 1) fails instead. Its first step waits for `go`: the test's hook on the sequence is in
    place by then."""

    STEP_S = 0.01

    def __init__(self, length: int, fail_at: int | None = None):
        super().__init__(CrashingFront(), max_sequences=4)
        self.length, self.fail_at, self.go = length, fail_at, threading.Event()

    def step(self) -> list[Sequence]:
        self.go.wait(10)
        time.sleep(self.STEP_S)
        self.steps += 1
        if self.steps == self.fail_at:
            raise RuntimeError("expert actors lost")
        with self.counting:
            self.active += [seq for seq in self.waiting if not seq.cancelled]
            self.waiting.clear()
        for seq in self.active:
            seq.token_ids.append(7)
            seq.logprobs.append(-0.1)
            if len(seq.token_ids) == self.length:
                seq.finish_reason = "length"
        stepped, self.active = self.active, [seq for seq in self.active if not seq.done]
        return stepped


def followed(batcher: TokenBatcher, seq: Sequence, follower=None) -> tuple[list, list]:
    """The updates of `seq` queued on a Scheduler over `batcher` (or, with `follower`, what it yields from them, as
    router_service.server.follow does), and the batching thread's calls of its `on_update` (its event loop woken)."""
    scheduler, calls = Scheduler(batcher, max_waiting=4), []

    async def run() -> list:
        (updates,) = scheduler.queue([seq])
        wake = seq.on_update
        seq.on_update = lambda: (calls.append(1), wake())
        batcher.go.set()
        return [item async for item in (updates if follower is None else follower(scheduler, updates))]

    return asyncio.run(asyncio.wait_for(run(), timeout=10)), calls


@pytest.mark.parametrize("wake_at, woken", [(0.0, 20), (math.inf, 1)])
def test_the_batching_thread_wakes_a_follower_only_for_the_steps_it_wants(wake_at, woken):
    """Every step, where the follower wants every one; only its end, where it waits for that (a unary call's, or a
    paced stream's until its next piece is due: router_service.server.follow). Fails if the thread wakes the event
    loop at every step whatever its follower wants, or not at the end."""
    seq = Sequence([5, 1], wake_at=wake_at)
    _, calls = followed(TokenBatcher(length=20), seq)
    assert len(calls) == woken and seq.finish_reason == "length"


def test_a_follower_waiting_for_the_end_is_woken_by_a_failed_step():
    """A unary call's follower wants its sequence's end alone: a step that fails ends it too, with the error. Fails
    if the batching thread wakes it only for a finish (the call would wait forever)."""
    seq = Sequence([5, 1], wake_at=math.inf)
    with pytest.raises(RuntimeError, match="expert actors lost"):
        followed(TokenBatcher(length=20, fail_at=3), seq)


def test_a_paced_stream_is_woken_once_a_piece_a_step_apart_on_the_threads_clock():
    """The real follow over the batching thread: a stream paced at 50 ms over steps of 10 ms sends several pieces,
    each after one wake-up, far fewer than the steps. Fails if the batching thread and the follower read different
    clocks (wall time: woken every step; a thread's CPU time: nothing between the first piece and the last)."""
    from router_service.config import ServerConfig
    from router_service.server import follow
    from router_service.text import TextStream

    config = ServerConfig(model="unused", stream_interval_ms=50, stream_chunks_per_s=0)
    seq = Sequence([5, 1])
    pieces, calls = followed(TokenBatcher(length=20), seq, lambda scheduler, updates: follow(
        scheduler, seq, updates, TextStream(lambda ids: "", ()), config))
    assert [t for p in pieces for t in p.token_ids] == [7] * 20 and pieces[-1].finish_reason == "length"
    assert len(pieces) >= 3 and len(calls) <= 12  # of 20 steps
