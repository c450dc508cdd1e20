"""The chaos soak (`switch-serve soak --chaos`): mixed load while an expert actor, the expert fleet and a front
replica are killed in turn, for a minute; and, slow, on a cluster of raylets whose worker nodes are replaced."""

from __future__ import annotations

import pytest

from cluster.demo import DEMO_MODEL
from cluster.soak import (
    FAULT_WINDOW_S,
    FAULTS,
    NODE_FAULT,
    PROMPTS,
    Report,
    faults,
    one_request,
    ray_for_soak,
    run_soak,
    soak_config,
)


def test_a_minute_of_chaos_loses_and_corrupts_nothing(ray_cluster):
    """Fails on any wrong answer (a retried expert call computed on the wrong tokens, a restarted fleet serving
    other weights), any request hung past two minutes, or any that ended without a retryable status."""
    report = run_soak(soak_config(str(DEMO_MODEL), replicas=2), duration=60, concurrency=4,
                      chaos_interval=(8.0, 12.0), progress=False)
    print("\n" + report.summary())
    assert {kind for _, kind in report.faults} == set(FAULTS)
    assert report.wrong == 0 and report.hung == 0 and report.lost == 0 and report.passed()
    for kind, outcome in [("unary", "OK"), ("stream", "OK"), ("cancelled stream", "CANCELLED_BY_CLIENT"),
                          ("bad input", "REFUSED")]:
        assert report.count(kind, outcome) > 0, (kind, outcome)


NODES_SOAK_S = 100


@pytest.fixture
def soak_nodes():
    """A head and two worker raylets for the soak, standing in for the shared local cluster while the test runs."""
    from conftest import instead_of_shared_ray

    with instead_of_shared_ray(), ray_for_soak(workers=2) as nodes:
        yield nodes


@pytest.mark.ray
@pytest.mark.slow
def test_chaos_with_a_node_replaced_loses_and_corrupts_nothing(soak_nodes):
    """The same faults and, in turn with them, a worker node holding expert actors removed (every process on it
    killed) and a new one added: the actors come back on the new node. Fails like the test above, and if a node's
    loss leaves a request hung or lost."""
    report = run_soak(soak_config(str(DEMO_MODEL), replicas=2, workers=2), duration=NODES_SOAK_S, concurrency=4,
                      chaos_interval=(8.0, 12.0), progress=False, nodes=soak_nodes)
    print("\n" + report.summary())
    assert {kind for _, kind in report.faults} == set(faults(soak_nodes))
    assert report.wrong == 0 and report.hung == 0 and report.lost == 0 and report.passed()  # no failure far from one
    assert report.count("unary", "OK") > 0 and report.count("stream", "OK") > 0
    # Served again after every node lost with time left to come back (a node's experts take about 20 s).
    with_time_left = [at for at, kind in report.faults
                      if kind == NODE_FAULT and at < report.started + NODES_SOAK_S - 30]
    assert len(report.served_again().get(NODE_FAULT, [])) >= len(with_time_left) > 0


def test_a_soak_passes_only_with_answers_and_failures_near_faults():
    """A run in which nothing was answered, or a request failed (even retryable) with no fault near it, fails; wrong
    and hung answers are counted once each, not as lost too. Fails if `soak` would pass a server that answered
    nothing."""
    report = Report(started=0.0, load_s=10.4, elapsed=130.0)  # a request hung after the load stopped
    report.outcomes.update({("unary", "UNAVAILABLE"): 2, ("stream", "INTERNAL"): 1})
    report.failures += [(1.0, 1.5), (2.0, 2.1), (3.0, 3.2)]
    assert report.lost == 0 and report.failed_unprovoked == 3 and not report.passed()
    report.faults.append((0.5, "expert fleet"))  # every failure in its window
    assert report.failed_unprovoked == 0 and not report.passed()  # and still nothing answered
    report.outcomes[("unary", "OK")] += 5
    report.latencies += [(t, t + 0.5) for t in range(10)] + [(10.0, 11.2)]  # the last ends after the load stopped
    assert report.passed() and report.serving_share() == 1.0
    report.failures.append((1.0 + FAULT_WINDOW_S, 1.5 + FAULT_WINDOW_S))
    assert report.failed_unprovoked == 1 and not report.passed()
    report.failures.pop()
    report.outcomes.update({("unary", "WRONG"): 1, ("stream", "HUNG"): 1})
    assert (report.wrong, report.hung, report.lost) == (1, 1, 0) and not report.passed()


def test_the_soak_command_exits_1_unless_its_run_passed(monkeypatch, capsys):
    """`switch-serve soak` exits with the run's verdict (CI reads it): 0 where Report.passed, else 1, after the
    summary. Fails if a failed run exits 0."""
    import contextlib

    import cluster.soak
    from cluster.cli import main

    passed = Report(started=0.0, load_s=10.0, elapsed=10.0)
    passed.outcomes[("unary", "OK")] += 1
    passed.latencies.append((0.0, 1.0))
    failed = Report(started=0.0, load_s=10.0, elapsed=10.0)
    failed.outcomes.update({("unary", "OK"): 1, ("unary", "WRONG"): 1})
    failed.latencies.append((0.0, 1.0))
    monkeypatch.setattr(cluster.soak, "ray_for_soak", lambda workers: contextlib.nullcontext())
    for report, code in ((passed, 0), (failed, 1)):
        assert report.passed() == (code == 0)
        monkeypatch.setattr(cluster.soak, "run_soak", lambda *args, report=report, **kwargs: report)
        with pytest.raises(SystemExit) as exit_info:
            main(["soak", "--duration", "1"])
        assert exit_info.value.code == code and "requests" in capsys.readouterr().out


def test_a_stream_the_server_cancelled_is_lost_and_chaos_without_a_fault_fails():
    """CANCELLED from the server (no retryable status) is a lost request, unlike a stream the client cancelled after
    two right tokens; a chaos run that injected no fault tested nothing. Fails if either passes."""
    report = Report(started=0.0, load_s=10.0, elapsed=10.0, chaos=True)
    report.outcomes.update({("unary", "OK"): 3, ("cancelled stream", "CANCELLED_BY_CLIENT"): 2})
    report.latencies += [(0.0, 1.0)]
    assert report.lost == 0 and not report.passed()  # no fault injected
    report.faults.append((0.5, "expert fleet"))
    assert report.passed()
    report.outcomes[("stream", "CANCELLED")] += 1
    assert report.lost == 1 and not report.passed()


def test_a_cancelled_streams_tokens_are_checked_before_it_is_cancelled():
    """The tokens a client cancels a stream after are compared with the clean run's: wrong ones are WRONG, not a
    fine cancel. Fails if a cancelled stream's tokens go unchecked."""
    from types import SimpleNamespace

    class Stream:
        def __init__(self, tokens):
            self.chunks, self.cancelled = [SimpleNamespace(token_ids=[t]) for t in tokens], False

        def __iter__(self):
            return iter(self.chunks)

        def cancel(self):
            self.cancelled = True

    for sent, outcome in [([1, 2, 3], "CANCELLED_BY_CLIENT"), ([999, 998, 3], "WRONG")]:
        stream = Stream(sent)
        stub = SimpleNamespace(GenerateStream=lambda request, timeout, stream=stream: stream)
        assert one_request(stub, "cancelled stream", PROMPTS[0], [1, 2, 3], 100) == outcome
        assert stream.cancelled == (outcome == "CANCELLED_BY_CLIENT")
