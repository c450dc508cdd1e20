"""The service's metrics, exported through Ray's metrics agent (Prometheus format, on every node's metrics
export port; names get Ray's `ray_` prefix there). Recorded by the Serve replicas; the expert actors record
their tokens per expert themselves (experts/actor.py), and a replica those it computed itself."""

from __future__ import annotations

import logging
import math
import threading
import time
from contextlib import contextmanager

log = logging.getLogger(__name__)
# A metric that fails keeps failing at every step: failures said with a traceback at most this often, with a count of
# those left unsaid since.
FAILURE_LOG_S = 60.0
_failure_logged_at, _failures_unsaid = -math.inf, 0

# Ray's metrics agent drops a gauge's series that the process has not exported again within two of its report
# intervals (10 s by default), and a process exports a gauge only where it was set since: set once, as the experts per
# layer are at the start, a series was gone within a minute (the dashboard's load panel empty). So every gauge is set
# again, at its last value, this often.
GAUGE_REFRESH_S = 4.0
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
# A sparse layer's experts take from a fraction of a millisecond (a GPU's) to tens of them: with the requests' buckets,
# whose first ends at 5 ms, every p99 under it read 4.95 ms.
DISPATCH_BUCKETS = [0.00025, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


@contextmanager
def metrics_updated():
    """Where the serving path updates metrics: one that fails is logged, not raised, so that a step's requests are
    still answered and told how they ended (a metric is not worth a request)."""
    global _failure_logged_at, _failures_unsaid
    try:
        yield
    except Exception:
        if time.monotonic() - _failure_logged_at < FAILURE_LOG_S:
            _failures_unsaid += 1
            return
        log.exception("updating the serving metrics failed (%d failures more since the last said; one said every "
                      "%.0f s at most)", _failures_unsaid, FAILURE_LOG_S)
        _failure_logged_at, _failures_unsaid = time.monotonic(), 0


class ServingMetrics:
    def __init__(self, model: str, gauges_every_s: float = GAUGE_REFRESH_S):
        # Ray's, imported here: the batcher imports this module for `metrics_updated`, and the front's math (the CUDA
        # checks in a Python without Ray) imports no Ray.
        from ray.util.metrics import Counter, Gauge, Histogram

        from experts.actor import expert_token_counter

        self.tags = {"model": model}
        keys = ("model",)
        self.requests = Counter("switch_serve_requests", "Requests finished, by status",
                                tag_keys=("model", "status"))
        self.generated_tokens = Counter("switch_serve_generated_tokens", "Tokens generated", tag_keys=keys)
        self.dropped_tokens = Counter("switch_serve_dropped_tokens", "Tokens over an expert's capacity",
                                      tag_keys=keys)
        self.time_to_first_token = Histogram("switch_serve_time_to_first_token_seconds",
                                             "From arrival to the first generated token", LATENCY_BUCKETS, keys)
        self.time_per_output_token = Histogram("switch_serve_time_per_output_token_seconds",
                                               "Between generated tokens, per request", LATENCY_BUCKETS, keys)
        self.queue_depth = Gauge("switch_serve_queue_depth",
                                 "Sequences waiting for a place in the batch (each of a request's choices counts)",
                                 tag_keys=keys)
        self.batch_size = Histogram("switch_serve_batch_size", "Sequences in each decoding step", BATCH_BUCKETS,
                                    keys)
        self.dispatch = Histogram("switch_serve_dispatch_seconds",
                                  "A sparse layer's experts as the front spends on them: sending to the actors, "
                                  "computing its node's experts itself, waiting for the actors",
                                  DISPATCH_BUCKETS, ("model", "stack", "layer"))
        self.embedded_inputs = Counter("switch_serve_embedded_inputs", "Inputs embedded (encoded, no generation)",
                                       tag_keys=keys)
        self.expert_tokens = expert_token_counter()
        self.experts_per_layer = Gauge("switch_serve_experts_per_layer", "Experts in each sparse layer (the mean "
                                       "of an expert's tokens divides by it: an expert given none has no series)",
                                       tag_keys=keys)
        self._gauges: dict = {}  # gauge -> its last value, set again every `gauges_every_s` (GAUGE_REFRESH_S)
        # Held across a value's note and its set: a value set again must not overwrite a newer one set meanwhile.
        self._gauges_lock = threading.Lock()
        threading.Thread(target=self._gauges_again_every, args=(gauges_every_s,), name="switch-serve-gauges",
                         daemon=True).start()

    def _set(self, gauge, value: float) -> None:
        with self._gauges_lock:
            self._gauges[gauge] = value
            gauge.set(value, tags=self.tags)

    def set_gauges_again(self) -> None:
        """Every gauge set again at its last value."""
        with self._gauges_lock:
            for gauge, value in self._gauges.items():
                gauge.set(value, tags=self.tags)

    def _gauges_again_every(self, every_s: float) -> None:
        while True:
            time.sleep(every_s)
            with metrics_updated():
                self.set_gauges_again()

    def serving(self, experts_per_layer: int) -> None:
        self._set(self.experts_per_layer, experts_per_layer)

    def request_done(self, status: str) -> None:
        self.requests.inc(1, tags={**self.tags, "status": status})

    def step(self, batch: int) -> None:
        self.batch_size.observe(batch, tags=self.tags)
        self.generated_tokens.inc(batch, tags=self.tags)

    def waiting(self, requests: int) -> None:
        self._set(self.queue_depth, requests)

    def sequence_done(self, first_token_s: float | None, per_token_s: float | None, dropped: int) -> None:
        """A generation request's latencies (None: it left before that token) and its tokens over capacity."""
        if first_token_s is not None:
            self.time_to_first_token.observe(first_token_s, tags=self.tags)
        if per_token_s is not None:
            self.time_per_output_token.observe(per_token_s, tags=self.tags)
        if dropped:
            self.dropped_tokens.inc(dropped, tags=self.tags)

    def embedded(self, inputs: int, dropped: int) -> None:
        self.embedded_inputs.inc(inputs, tags=self.tags)
        if dropped:
            self.dropped_tokens.inc(dropped, tags=self.tags)

    def dispatched(self, stack: str, layer: int, seconds: float) -> None:
        self.dispatch.observe(seconds, tags={**self.tags, "stack": stack, "layer": str(layer)})

    def computed_here(self, stack: str, layer: int, expert: int, tokens: int) -> None:
        self.expert_tokens.inc(tokens, tags={**self.tags, "stack": stack, "layer": str(layer), "expert": str(expert)})
