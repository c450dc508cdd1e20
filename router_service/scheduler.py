"""Runs the continuous batcher on a thread of its own and lets asyncio callers stream from it.

The model step blocks (it waits on the expert actors), so it stays off the event loop that serves requests;
the loop only queues sequences and relays their progress.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from functools import partial

import torch

from router_service.batching import ContinuousBatcher, Sequence, frameless, use_threads
from router_service.requests import InvalidRequest

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests are waiting than the configured limit: maps to RESOURCE_EXHAUSTED / HTTP 429."""


STOPPED = "this replica's batching thread has stopped; Serve replaces the replica"


class BatcherStopped(RuntimeError):
    """The batching thread has stopped, so this replica cannot decode (UNAVAILABLE, retryable elsewhere); its
    health check fails and Serve replaces it."""


def math_here_on_one_thread() -> None:
    """Keep this thread's math on one OpenMP thread, for the batching thread's team to be the process's only one:
    while libgomp manages more threads than there are CPUs, idle OpenMP threads sleep after every op instead of
    spinning until the next, which makes every op wait for them to wake. A team of the thread that builds the model
    (where OMP_NUM_THREADS > 1 in the replica's environment) did that: on 2 vCPUs, 40 ms a step of one sequence
    instead of 29 (docs/BENCHMARKS.md). Threads started before the batching thread's first step begin with one
    too; it sets its own count at every step."""
    use_threads(1)


class Scheduler:
    def __init__(self, batcher: ContinuousBatcher, max_waiting: int, threads: int | None = None):
        self.batcher = batcher
        self.max_waiting = max_waiting
        if threads is not None:  # the cores of the front's math, on the thread started here (else the batcher's own)
            batcher.threads = threads
        self._wake = threading.Event()
        self._stopped = threading.Event()  # set as the thread stops, before it fails what it has queued
        self._thread = threading.Thread(target=self._run, name="switch-serve-batcher", daemon=True)
        self._thread.start()

    @property
    def num_active(self) -> int:
        return len(self.batcher.active)

    @property
    def num_waiting(self) -> int:
        return self.batcher.num_waiting

    def check_count(self, count: int, field: str) -> None:
        """Refuse as bad input (`field`) a request of more sequences (choices, inputs) than could ever queue, which a
        retry would not get past either."""
        most = self.max_waiting + self.batcher.max_sequences
        if count > most:
            raise InvalidRequest(field, f"{count} sequences in one request, more than this server takes at once "
                                        f"({most}); send them in parts")

    def check_room(self, count: int = 1) -> None:
        """Raise QueueFull unless `count` more sequences may queue: a request of several (choices, inputs) checks
        for all of them before it queues any."""
        waiting, free_slots = self.batcher.room()
        if waiting + count > self.max_waiting + free_slots:
            raise QueueFull(f"{waiting} sequences already waiting, room for {self.max_waiting + free_slots} "
                            "(max_waiting and the batch's free places)"
                            + (f"; this request has {count}" if count > 1 else ""))

    def queue(self, seqs: list[Sequence]) -> list[AsyncIterator[Sequence]]:
        """Queue a request's sequences (its choices, its inputs) together, now: room for all of them, or QueueFull
        and none queued, with no other request's between the check and them (had it waited, a request that found
        room could be refused once others took it). Returns an iterator of each one's updates: it yields the
        sequence each time it has new tokens, until it is done; closed before (a cancelled request, a stop string),
        it takes the sequence out of the batch before the next step. One never started does not: a request's
        caller `cancel`s all of its sequences as it ends."""
        if not self.alive:  # a stopped thread takes nothing more: nothing queued that no one would ever fail
            raise BatcherStopped(STOPPED)
        self.check_room(len(seqs))
        loop = asyncio.get_running_loop()
        updates = []
        for seq in seqs:
            updated = asyncio.Event()
            seq.on_update = partial(loop.call_soon_threadsafe, updated.set)  # before the batching thread can step it
            updates.append(self._updates(seq, updated))
            self.batcher.add(seq)
        self.batcher.count_waiting()
        self._wake.set()
        if not self.alive:  # checked after queueing: a thread that stops from now on fails what it has queued,
            self.cancel(seqs)  # and those queued after it failed the rest count nowhere
            raise BatcherStopped(STOPPED)
        return updates

    async def _updates(self, seq: Sequence, updated: asyncio.Event) -> AsyncIterator[Sequence]:
        try:
            while True:
                await updated.wait()
                updated.clear()
                if seq.error is not None:  # one error for many requests: each raise's frames its own
                    raise seq.error.with_traceback(None)
                # Read before yielding: if it finishes while the caller looks, another update follows.
                finished = seq.finish_reason is not None
                yield seq
                if finished:
                    return
        finally:
            self.cancel([seq])

    def cancel(self, seqs: list[Sequence]) -> None:
        """Take those of `seqs` that are not done out of the batch, or the queue, before the next step."""
        unfinished = [seq for seq in seqs if not seq.done]
        for seq in unfinished:
            seq.cancelled = True
        if unfinished:
            self.batcher.count_waiting()
            self._wake.set()

    @property
    def alive(self) -> bool:
        return not self._stopped.is_set() and self._thread.is_alive()

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    if not self.batcher.has_work:
                        self._wake.wait()
                        self._wake.clear()
                        continue
                    self._notify(self._step())  # no name left holding the step's sequences while the thread waits
        finally:  # whatever stopped the thread, no request waits on it
            self._stopped.set()
            log.error("the batching thread has stopped")
            self._notify(self.batcher.fail(BatcherStopped("this replica's batching thread stopped")))

    def _step(self) -> list[Sequence]:
        try:
            return self.batcher.step()
        except Exception as e:  # keep the thread alive: the batch fails, later requests start afresh
            log.exception("batching step failed")
            return self.batcher.fail(frameless(e))

    @staticmethod
    def _notify(changed: list[Sequence]) -> None:
        now = time.monotonic()
        for seq in changed:
            try:
                seq.notify(now)
            except RuntimeError:  # its caller's event loop is gone
                pass
