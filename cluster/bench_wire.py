"""A sparse layer's call with its activations, to a bare actor and back:
- by their size, as numpy arrays: with Ray's default, which carries them inside its messages up to 100 KiB and
  through the object store above, and with experts.wire.INLINE_ACTIVATIONS_ENV in the caller's and the actor's
  environment; the actor on the caller's node and on another;
- a few tokens' worth, inside Ray's messages on one node, in a call as the expert actors took it: with its stack,
  layer, experts and counts as arguments of their own beside the activations as numpy arrays, or as raw bytes
  (experts.wire.to_wire), and all of it in one argument (experts.wire.call_to_wire).
The nodes are two raylets on this machine (ray.cluster_utils), so "another node" has an object store of its own but
no network between.

    .venv/bin/python -m cluster.bench_wire
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import ray
import torch
from ray.cluster_utils import Cluster

from experts.wire import INLINE_ACTIVATIONS_ENV, INLINE_BYTES, call_from_wire, call_to_wire, from_wire, to_wire

D_MODEL = 768  # switch-base-8's, in float32
ROWS = (16, 48, 64, 128, 192, 256, 384, 683)
FEW_ROWS = (1, 4, 16, 64)
FORMS = ("arrays", "bytes", "one argument")  # a call's forms, for a few rows (see the module's doc)
CALLS = 60
WARM = 20  # calls first, not timed: a worker with an environment of its own has just started


@ray.remote(num_cpus=0)
class Echo:
    def echo(self, x: bytes | np.ndarray) -> bytes | np.ndarray:
        return x

    def forward(self, stack: str, layer: int, experts: list[int], counts: list[int],
                x: bytes | np.ndarray) -> bytes | np.ndarray:
        # Taken apart and made again as `call` does, so that the forms differ by their form alone.
        tokens = from_wire(x, torch.float32, D_MODEL)
        return to_wire(tokens) if isinstance(x, bytes) else tokens.numpy()

    def call(self, call: bytes | np.ndarray) -> bytes | np.ndarray:
        *_, tokens = call_from_wire(call, torch.float32, D_MODEL)
        return to_wire(tokens)


def send(echo, t: torch.Tensor, form: str | None):
    """A call carrying `t` in one of FORMS, or (None) as a lone array."""
    if form is None:
        return echo.echo.remote(t.numpy())
    if form == "one argument":
        return echo.call.remote(call_to_wire("decoder", 1, [0], [len(t)], t))
    return echo.forward.remote("decoder", 1, [0], [len(t)], to_wire(t) if form == "bytes" else t.numpy())


@ray.remote(num_cpus=0)
def median_calls_ms(echo, sizes: tuple[int, ...], form: str | None = None) -> list[float]:
    """The median round trip of CALLS calls carrying each of `sizes` rows, made from this task's process: the
    activations from a tensor and back to one, in a call of `form` (see `send`)."""
    medians = []
    for rows in sizes:
        t = torch.ones(rows, D_MODEL)
        times = []
        for _ in range(WARM + CALLS):
            began = time.perf_counter()
            from_wire(ray.get(send(echo, t, form)), t.dtype, D_MODEL)
            times.append(time.perf_counter() - began)
        medians.append(1000 * statistics.median(times[WARM:]))
    return medians


def main() -> None:
    store = {"object_store_memory": 200 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "resources": {"caller": 1}, **store})
    cluster.add_node(num_cpus=1, resources={"other": 1}, **store)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        columns = {}
        for where in ("caller", "other"):
            for inline in (False, True):
                env = {"env_vars": INLINE_ACTIVATIONS_ENV if inline else {}}
                echo = Echo.options(resources={where: 0.01}, runtime_env=env).remote()
                columns[(where, inline)] = ray.get(median_calls_ms.options(resources={"caller": 0.01},
                                                                           runtime_env=env).remote(echo, ROWS))
                ray.kill(echo)
        print(f"a call and its reply carrying rows of {D_MODEL} float32s as numpy arrays, median of {CALLS}, ms")
        bound = f"{INLINE_BYTES >> 10} KiB"
        print(f"rows     KiB | same node: default {bound:>9} | another node: default {bound:>9}")
        for i, rows in enumerate(ROWS):
            same, other = ((columns[(where, False)][i], columns[(where, True)][i]) for where in ("caller", "other"))
            print(f"{rows:4d} {rows * D_MODEL * 4 / 1024:7.0f} | {same[0]:18.2f} {same[1]:9.2f} | "
                  f"{other[0]:21.2f} {other[1]:9.2f}")

        env = {"env_vars": INLINE_ACTIVATIONS_ENV}
        echo = Echo.options(resources={"caller": 0.01}, runtime_env=env).remote()
        timed = median_calls_ms.options(resources={"caller": 0.01}, runtime_env=env)
        forms = [ray.get(timed.remote(echo, FEW_ROWS, form)) for form in FORMS]
        print("\nthe same, a few rows on one node, in a call as the expert actors took it, by its form, ms")
        print("rows | " + "  ".join(FORMS))
        for rows, *medians in zip(FEW_ROWS, *forms):
            print(f"{rows:4d} | " + "  ".join(f"{m:{len(form)}.2f}" for m, form in zip(medians, FORMS)))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
