"""What each of the service's metrics records, Ray's metric classes replaced by recorders."""

from __future__ import annotations

import pytest

from router_service import metrics


class Recorder:
    """A ray.util.metrics Counter, Gauge or Histogram that records its calls: (name, value, tags)."""

    calls: list = []

    def __init__(self, name, *args, **kwargs):
        self.name = name

    def _record(self, value, tags):
        Recorder.calls.append((self.name, value, tags))

    inc = observe = set = _record


@pytest.fixture
def recorders(monkeypatch):
    """Ray's metric classes, and the actors' counter, replaced by Recorders, their calls so far none."""
    import ray.util.metrics

    import experts.actor

    for kind in ("Counter", "Gauge", "Histogram"):  # imported as ServingMetrics is made
        monkeypatch.setattr(ray.util.metrics, kind, Recorder)
    monkeypatch.setattr(experts.actor, "expert_token_counter", lambda: Recorder("switch_serve_expert_tokens"))
    monkeypatch.setattr(Recorder, "calls", [])


def test_each_metric_records_what_its_name_says(recorders):
    """Fails if a metric records another value than its own: tokens by the step rather than by the sequence, the
    queue's depth, the time per token rather than to the first."""
    served = metrics.ServingMetrics("m", gauges_every_s=3600)
    served.serving(8)
    served.step(3)
    served.waiting(5)
    served.sequence_done(0.2, 0.03, 2)
    served.sequence_done(None, None, 0)  # left before its first token: nothing recorded
    served.embedded(4, 1)
    served.request_done("OK")
    served.request_done("UNAVAILABLE")
    served.dispatched("decoder", 3, 0.004)
    served.computed_here("encoder", 1, 6, 9)
    model = {"model": "m"}
    assert Recorder.calls == [
        ("switch_serve_experts_per_layer", 8, model),
        ("switch_serve_batch_size", 3, model), ("switch_serve_generated_tokens", 3, model),
        ("switch_serve_queue_depth", 5, model),
        ("switch_serve_time_to_first_token_seconds", 0.2, model),
        ("switch_serve_time_per_output_token_seconds", 0.03, model), ("switch_serve_dropped_tokens", 2, model),
        ("switch_serve_embedded_inputs", 4, model), ("switch_serve_dropped_tokens", 1, model),
        ("switch_serve_requests", 1, {"model": "m", "status": "OK"}),
        ("switch_serve_requests", 1, {"model": "m", "status": "UNAVAILABLE"}),
        ("switch_serve_dispatch_seconds", 0.004, {"model": "m", "stack": "decoder", "layer": "3"}),
        ("switch_serve_expert_tokens", 9, {"model": "m", "stack": "encoder", "layer": "1", "expert": "6"})]


def test_the_gauges_are_set_again_at_their_last_values(recorders):
    """Ray's agent drops a gauge's series that is not exported again within two report intervals, and a process
    exports only what was set since: fails if a gauge set once (the experts per layer, at the start) is not set
    again (test_server scrapes Ray's endpoint for it, with the thread that sets them again every few seconds)."""
    served = metrics.ServingMetrics("m", gauges_every_s=3600)  # set again here, at once
    served.serving(8)
    served.waiting(5)
    served.waiting(2)
    del Recorder.calls[:]
    served.set_gauges_again()
    assert Recorder.calls == [("switch_serve_experts_per_layer", 8, {"model": "m"}),
                              ("switch_serve_queue_depth", 2, {"model": "m"})]
    assert metrics.GAUGE_REFRESH_S < 10 / 2  # within Ray's default report interval, twice over


def test_the_queue_depth_follows_every_step_and_a_failed_batch():
    """Set after each step, whether it decoded, only encoded (embeddings) or failed, and after a batch failed outside
    a step: a batch that fails with requests waiting empties the queue, and the gauge says so at once. Fails if only
    a decoding step sets it."""
    from types import SimpleNamespace

    import torch

    from router_service.batching import ContinuousBatcher, Sequence

    def encode(prompts):
        raise RuntimeError("the expert fleet died")

    depth = []
    front = SimpleNamespace(config=SimpleNamespace(eos_token_id=1), device=torch.device("cpu"), dtype=torch.float32,
                            encode=encode)
    metrics = SimpleNamespace(waiting=depth.append, sequence_done=lambda first_token_s, per_token_s, dropped: None)
    batcher = ContinuousBatcher(front, max_sequences=2, metrics=metrics)
    for prompt in ([5, 1], [6, 1], [7, 1]):
        batcher.add(Sequence(prompt))
    assert len(batcher.step()) == 3 and depth[-1] == 0  # the two admitted and the one left waiting, failed
    batcher.add(Sequence([8, 1]))
    assert len(batcher.fail(RuntimeError("the expert fleet died"))) == 1 and depth[-1] == 0
