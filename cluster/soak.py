"""Soak test: serve a checkpoint locally and keep a bounded load on it for a set time, then report requests
served, errors by status and memory at the start and the end. Not part of the test run:

    .venv/bin/python -m cluster.soak --duration 600 --concurrency 8
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from collections import Counter

import grpc

from cluster.app import local_serve
from cluster.demo import DEMO_MODEL, PROMPTS
from cluster.testing import free_port, resident_memory
from router_service.config import ServerConfig
from router_service.proto import switch_serve_pb2 as pb
from router_service.proto import switch_serve_pb2_grpc as pb_grpc


def ray_memory() -> int:
    """Resident memory of the Ray processes on this machine (the server, the actors, Ray's own), in bytes."""
    return resident_memory("ray::", "/ray/")


def load(stub, stop: threading.Event, outcomes: Counter, lock: threading.Lock, max_new_tokens: int) -> None:
    rng = random.Random()
    while not stop.is_set():
        request = pb.GenerateRequest(text=rng.choice(PROMPTS), max_new_tokens=rng.randint(1, max_new_tokens),
                                     temperature=rng.choice([0.0, 0.8]), seed=rng.randrange(2**32))
        try:
            stub.Generate(request, timeout=60)
            outcome = "OK"
        except grpc.RpcError as e:
            outcome = e.code().name
        with lock:
            outcomes[outcome] += 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEMO_MODEL))
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args(argv)

    config = ServerConfig(model=args.model)
    with local_serve(config, http_port=free_port(), grpc_port=free_port(), worker_logs=False) as served:
        with grpc.insecure_channel(served.grpc) as channel:
            stub = pb_grpc.SwitchServeStub(channel)
            stub.Generate(pb.GenerateRequest(text=PROMPTS[0], max_new_tokens=2), timeout=60)  # warm
            memory_start, started = ray_memory(), time.monotonic()
            outcomes, lock, stop = Counter(), threading.Lock(), threading.Event()
            workers = [threading.Thread(target=load, args=(stub, stop, outcomes, lock, args.max_new_tokens))
                       for _ in range(args.concurrency)]
            for w in workers:
                w.start()
            while time.monotonic() - started < args.duration:
                time.sleep(min(10.0, args.duration))
                print(f"{time.monotonic() - started:6.0f} s  {dict(outcomes)}  memory "
                      f"{ray_memory() / 2**20:.0f} MiB", flush=True)
            stop.set()
            for w in workers:
                w.join()
            elapsed, memory_end = time.monotonic() - started, ray_memory()
    served = outcomes["OK"]
    errors = {k: v for k, v in outcomes.items() if k != "OK"}
    print(f"\n{served} requests served in {elapsed:.0f} s ({served / elapsed:.1f}/s) at concurrency "
          f"{args.concurrency}; errors by status: {errors or 'none'}")
    print(f"memory of the Ray processes: {memory_start / 2**20:.0f} MiB at the start, "
          f"{memory_end / 2**20:.0f} MiB at the end")


if __name__ == "__main__":
    main()
