"""Soak: serve a checkpoint locally under mixed load for a set time and report what happened to every request.

The load mixes greedy unary calls and streams (each answer checked against a clean run before the load), streams
cancelled part way, and bad input (which must be refused). With `--chaos`, processes are killed at random
meanwhile: an expert actor's (Ray restarts it), the expert fleet's and a front replica's (Serve starts them
again), each in turn. With `--nodes N`, the soak runs on a Ray cluster of raylets on this machine, a head for the
fronts and the fleet and N workers for the expert actors, and the faults include a node: a worker holding expert
actors is removed, and a new one joins a few seconds later. Printed: requests by outcome, faults injected, wrong
answers, hung requests, how soon each kind of fault is served again, latency with and without a fault nearby,
and memory by kind of process at the start and the end.

    switch-serve soak --duration 600 --chaos [--nodes 2]
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc

from cluster.app import APP_NAME, FLEET_APP, local_serve
from cluster.demo import DEMO_MODEL, PROMPTS
from cluster.testing import free_port, percentile, replica_class, replica_names, resident_memory
from experts.placement import PlacementConfig
from router_service.config import ServerConfig
from router_service.proto import switch_serve_pb2 as pb
from router_service.proto import switch_serve_pb2_grpc as pb_grpc
from router_service.server import FLEET_DEPLOYMENT, FRONT_DEPLOYMENT

GREEDY_NEW_TOKENS = 12  # the length of every checked answer
KINDS = ("unary", "stream", "cancelled stream", "bad input")
FAULTS = ("expert actor", "expert fleet", "front replica")
NODE_FAULT = "node"  # with worker nodes: one holding expert actors removed, a new one added back
NODE_DOWN_S = 5.0  # how long the cluster runs a node short
# Ray resources that keep the fronts and the fleet on the head, and the expert actors on the workers.
HEAD_RESOURCE, WORKER_RESOURCE = "soak_head", "soak_worker"
# What a request may end with while its experts or its replica are down: UNAVAILABLE from the server, INTERNAL
# from Serve's gRPC proxy for a replica that died (see the README's failure table).
RETRYABLE = {"UNAVAILABLE", "INTERNAL"}
HUNG_S = 120.0  # a request not answered within this is counted as hung
BACKOFF_S = 0.5  # a client's pause after a retryable failure before its next request
FAULT_WINDOW_S = 30.0  # requests that overlap the time from a fault to this much after it count as "with faults"
PROCESSES = {"front replicas": f"ray::{replica_class(APP_NAME, FRONT_DEPLOYMENT)}",
             "expert fleet": f"ray::{replica_class(FLEET_APP, FLEET_DEPLOYMENT)}", "expert actors": "ray::ExpertActor"}


@dataclass
class Report:
    outcomes: Counter = field(default_factory=Counter)  # (kind, outcome) -> requests
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (began, ended) of answered requests
    failures: list[tuple[float, float]] = field(default_factory=list)  # (began, ended) of those failed, retryable
    started: float = 0.0
    faults: list[tuple[float, str]] = field(default_factory=list)
    memory_start: dict[str, int] = field(default_factory=dict)
    memory_end: dict[str, int] = field(default_factory=dict)
    chaos: bool = False  # whether faults were to be injected
    elapsed: float = 0.0  # from the start to the last request's end
    load_s: float = 0.0  # from the start to the load's stop (requests still in flight then end after it)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, kind: str, outcome: str) -> int:
        return sum(n for (k, o), n in self.outcomes.items() if o == outcome and kind in (k, "any"))

    @property
    def wrong(self) -> int:
        return self.count("any", "WRONG")

    @property
    def hung(self) -> int:
        return self.count("any", "HUNG")

    @property
    def lost(self) -> int:
        """Requests that ended in a way a client could not have handled: neither answered, nor refused as they
        should be, nor failed with a retryable status."""
        # A stream the server ended CANCELLED is lost; one the client cancelled is CANCELLED_BY_CLIENT.
        fine = {"OK", "CANCELLED_BY_CLIENT", "REFUSED", "WRONG", "HUNG", *RETRYABLE}  # WRONG, HUNG: on their own
        return sum(n for (_, outcome), n in self.outcomes.items() if outcome not in fine)

    def near_fault(self, began: float, ended: float) -> bool:
        """Whether a request overlapped a fault's window."""
        return any(began < at + FAULT_WINDOW_S and ended > at for at, _ in self.faults)

    @property
    def failed_unprovoked(self) -> int:
        """Requests that failed, retryable, with no fault near them: the service failing by itself."""
        return sum(not self.near_fault(began, ended) for began, ended in self.failures)

    def passed(self) -> bool:
        """Every request answered right, refused as it should be, or failed retryable near a fault; some answered;
        and, with chaos asked for, some fault injected (a run too short for one tested none)."""
        return (not (self.wrong or self.hung or self.lost or self.failed_unprovoked)
                and self.count("any", "OK") > 0 and (self.faults or not self.chaos))

    def serving_share(self) -> float:
        """The share of the load's whole seconds in which some request was answered (the time after the load
        stopped, while the requests in flight then end, left out)."""
        seconds = max(1, int(self.load_s))
        answered = {int(ended - self.started) for _, ended in self.latencies}
        return len(answered & set(range(seconds))) / seconds

    def latency(self, near_fault: bool) -> tuple[float, float] | None:
        """(p50, p99) in seconds of the answered requests that did (or did not) overlap a fault's window."""
        values = [ended - began for began, ended in self.latencies if self.near_fault(began, ended) == near_fault]
        if not values:
            return None
        return statistics.median(values), percentile(values, 99)

    def served_again(self) -> dict[str, list[float]]:
        """Seconds from each fault to the end of the first request begun after it and answered, by kind of fault
        (none for a fault that no later request was answered after)."""
        after: dict[str, list[float]] = {}
        for at, kind in self.faults:
            ends = [ended for began, ended in self.latencies if began >= at]
            if ends:
                after.setdefault(kind, []).append(min(ends) - at)
        return after

    def summary(self) -> str:
        lines = [f"{sum(self.outcomes.values())} requests in {self.elapsed:.0f} s; faults injected: "
                 f"{dict(Counter(kind for _, kind in self.faults)) or 'none'}"]
        for kind in KINDS:
            by_outcome = {o: n for (k, o), n in sorted(self.outcomes.items()) if k == kind}
            lines.append(f"  {kind:<17} {by_outcome}")
        lines.append(f"wrong answers: {self.wrong}; hung: {self.hung}; lost (no retryable status): {self.lost}; "
                     f"failed with no fault near: {self.failed_unprovoked}")
        lines.append(f"seconds in which a request was answered: {self.serving_share():.0%}")
        for kind, seconds in sorted(self.served_again().items()):
            lines.append(f"served again after a fault of the {kind}: median {statistics.median(seconds):.1f} s, "
                         f"at most {max(seconds):.1f} s, {sum(seconds):.0f} s in all")
        for label, near in (("without faults", False), ("with faults", True)):
            p = self.latency(near)
            lines.append(f"latency {label}: " + (f"p50 {p[0]:.2f} s, p99 {p[1]:.2f} s" if p else "no requests"))
        for name in PROCESSES:
            lines.append(f"memory of the {name}: {self.memory_start.get(name, 0) / 2**20:.0f} MiB at the start, "
                         f"{self.memory_end.get(name, 0) / 2**20:.0f} MiB at the end")
        return "\n".join(lines)


def memory_by_process() -> dict[str, int]:
    return {name: resident_memory(pattern) for name, pattern in PROCESSES.items()}


def one_request(stub, kind: str, prompt: str, expected: list[int], vocab_size: int) -> str:
    """Send one request of `kind`; its outcome: OK, WRONG, CANCELLED_BY_CLIENT (the tokens before it right), REFUSED,
    HUNG or a gRPC status name."""
    request = pb.GenerateRequest(text=prompt, max_new_tokens=GREEDY_NEW_TOKENS)
    try:
        if kind == "unary":
            return "OK" if list(stub.Generate(request, timeout=HUNG_S).token_ids) == expected else "WRONG"
        if kind == "bad input":
            stub.Generate(pb.GenerateRequest(input_ids=[3, vocab_size + 5]), timeout=HUNG_S)
            return "WRONG"  # served: it should have been refused
        stream = stub.GenerateStream(request, timeout=HUNG_S)
        tokens = []
        for chunk in stream:
            tokens += chunk.token_ids
            if kind == "cancelled stream" and len(tokens) >= 2:
                if tokens != expected[:len(tokens)]:
                    return "WRONG"
                stream.cancel()
                return "CANCELLED_BY_CLIENT"
        return "OK" if tokens == expected else "WRONG"
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return "HUNG"
        if kind == "bad input" and e.code() == grpc.StatusCode.INVALID_ARGUMENT:
            return "REFUSED"
        return e.code().name


def load(stub, stop: threading.Event, report: Report, reference: dict[str, list[int]], vocab_size: int,
         seed: int) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        kind, prompt = rng.choice(KINDS), rng.choice(PROMPTS)
        began = time.monotonic()
        outcome = one_request(stub, kind, prompt, reference[prompt], vocab_size)
        with report.lock:
            report.outcomes[kind, outcome] += 1
            if outcome == "OK":
                report.latencies.append((began, time.monotonic()))
            elif outcome in RETRYABLE:
                report.failures.append((began, time.monotonic()))
        if outcome in RETRYABLE:
            stop.wait(BACKOFF_S)


class LocalNodes:
    """A Ray cluster of raylets on this machine, joined by this process: a head that offers HEAD_RESOURCE, and
    `workers` nodes that offer WORKER_RESOURCE."""

    def __init__(self, workers: int):
        import logging

        import ray
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "resources": {HEAD_RESOURCE: 100}, "include_dashboard": False})
        self.workers = [self.add_worker() for _ in range(workers)]
        self.rejoin_at: list[float] = []  # when each worker removed is replaced
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, logging_level=logging.WARNING, log_to_driver=False)

    def add_worker(self):
        return self.cluster.add_node(num_cpus=1, resources={WORKER_RESOURCE: 100}, object_store_memory=100 * 2**20)

    def replace(self, node_id: str) -> None:
        """Remove the worker `node_id` (all its processes killed, as when a machine is lost); `rejoin` adds a new
        one NODE_DOWN_S later."""
        node = next(n for n in self.workers if n.node_id == node_id)
        self.cluster.remove_node(node, allow_graceful=False)
        self.workers.remove(node)
        self.rejoin_at.append(time.monotonic() + NODE_DOWN_S)

    def rejoin(self) -> None:
        """Add the workers that are due. Only the main thread can start a node (it sets signal handlers)."""
        while self.rejoin_at and self.rejoin_at[0] <= time.monotonic():
            self.rejoin_at.pop(0)
            self.workers.append(self.add_worker())

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()


@contextmanager
def ray_for_soak(workers: int) -> Iterator[LocalNodes | None]:
    """With workers, a LocalNodes cluster for the soak's run; without, none (local_serve starts Ray)."""
    nodes = LocalNodes(workers) if workers else None
    try:
        yield nodes
    finally:
        if nodes is not None:
            nodes.shutdown()


def inject(fault: str, stub, rng: random.Random, nodes: LocalNodes | None) -> bool:
    """Kill one process of the kind `fault` names, as the OOM killer would, or replace a worker node that holds
    expert actors; False if there was none."""
    import ray

    if fault == NODE_FAULT:
        try:
            held = {a.node_id for a in stub.ModelInfo(pb.ModelInfoRequest(), timeout=10).actors}
        except grpc.RpcError:
            return False
        candidates = [n.node_id for n in nodes.workers if n.node_id in held]
        if not candidates:
            return False
        nodes.replace(rng.choice(candidates))
        return True

    if fault == "expert actor":
        try:
            pids = [a.pid for a in stub.ModelInfo(pb.ModelInfoRequest(), timeout=10).actors]
        except grpc.RpcError:
            return False
        if not pids:
            return False
        try:
            os.kill(rng.choice(pids), signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True
    names = (replica_names(FLEET_APP, FLEET_DEPLOYMENT) if fault == "expert fleet"
             else replica_names(APP_NAME, FRONT_DEPLOYMENT))
    if not names:
        return False
    try:
        ray.kill(ray.get_actor(rng.choice(names), namespace="serve"), no_restart=True)  # Serve starts another
    except ValueError:  # gone meanwhile
        return False
    return True


def faults(nodes: LocalNodes | None) -> tuple[str, ...]:
    """The kinds of fault a chaos run injects, in turn."""
    return FAULTS + ((NODE_FAULT,) if nodes else ())


def chaos(stub, stop: threading.Event, report: Report, interval: tuple[float, float], seed: int,
          nodes: LocalNodes | None) -> None:
    """Every `interval` seconds (drawn at random), a fault of the next kind in turn."""
    rng = random.Random(seed)
    turn, kinds = 0, faults(nodes)
    while not stop.wait(rng.uniform(*interval)):
        fault, at = kinds[turn % len(kinds)], time.monotonic()
        if inject(fault, stub, rng, nodes):
            with report.lock:
                report.faults.append((at, fault))
            turn += 1


def run_soak(config: ServerConfig, duration: float, concurrency: int, chaos_interval: tuple[float, float] | None,
             seed: int = 0, progress: bool = True, nodes: LocalNodes | None = None) -> Report:
    """Serve `config` locally (on `nodes` if given, else on the running Ray cluster or one started here) and soak
    it; with `chaos_interval`, inject faults that often."""
    report = Report(chaos=chaos_interval is not None)
    with local_serve(config, http_port=free_port(), grpc_port=free_port(), worker_logs=False) as served:
        with grpc.insecure_channel(served.grpc) as channel:
            stub = pb_grpc.SwitchServeStub(channel)
            vocab_size = stub.ModelInfo(pb.ModelInfoRequest(), timeout=60).vocab_size
            reference = {p: list(stub.Generate(pb.GenerateRequest(text=p, max_new_tokens=GREEDY_NEW_TOKENS),
                                               timeout=60).token_ids) for p in PROMPTS}  # the clean run
            report.memory_start, started = memory_by_process(), time.monotonic()
            report.started = started
            stop = threading.Event()
            threads = [threading.Thread(target=load, args=(stub, stop, report, reference, vocab_size, seed + i))
                       for i in range(concurrency)]
            if chaos_interval:
                threads.append(threading.Thread(target=chaos, args=(stub, stop, report, chaos_interval, seed,
                                                                     nodes)))
            for t in threads:
                t.start()
            reported = started
            while (left := duration - (time.monotonic() - started)) > 0:
                time.sleep(min(1.0, left))
                if nodes is not None:
                    nodes.rejoin()
                if progress and time.monotonic() - reported >= 10.0:
                    reported = time.monotonic()
                    print(f"{reported - started:6.0f} s  {sum(report.outcomes.values())} requests, "
                          f"{len(report.faults)} faults", flush=True)
            stop.set()
            report.load_s = time.monotonic() - started
            for t in threads:
                t.join()
            report.elapsed = time.monotonic() - started
            report.memory_end = memory_by_process()
    return report


def soak_config(model: str, replicas: int, workers: int = 0) -> ServerConfig:
    """The experts computed by their actors, whose failures the soak injects; with worker nodes, the actors spread
    over them and the fronts and the fleet on the head."""
    head = {HEAD_RESOURCE: 1} if workers else {}
    placement = PlacementConfig(experts_per_actor=2, nodes=max(1, workers),
                                actor_resources={WORKER_RESOURCE: 1} if workers else {})
    return ServerConfig(model=model, num_replicas=replicas, placement=placement, local_experts=False,
                        front_resources=head, fleet_resources=head)


def main(model: str | None, duration: float, concurrency: int, chaos_every: tuple[float, float] | None,
         replicas: int, workers: int) -> int:
    """The `switch-serve soak` command: 0 where the run passed (Report.passed), else 1."""
    with ray_for_soak(workers) as nodes:
        report = run_soak(soak_config(model or str(DEMO_MODEL), replicas, workers), duration, concurrency,
                          chaos_every, nodes=nodes)
    print("\n" + report.summary())
    return 0 if report.passed() else 1
