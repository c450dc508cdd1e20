"""The chaos soak (`switch-serve soak --chaos`): mixed load while an expert actor, the expert fleet and a front
replica are killed in turn, for a minute; and, slow, on a cluster of raylets whose worker nodes are replaced."""

from __future__ import annotations

import pytest

from cluster.demo import DEMO_MODEL
from cluster.soak import FAULTS, NODE_FAULT, faults, ray_for_soak, run_soak, soak_config


def test_a_minute_of_chaos_loses_and_corrupts_nothing(ray_cluster):
    """Fails on any wrong answer (a retried expert call computed on the wrong tokens, a restarted fleet serving
    other weights), any request hung past two minutes, or any that ended without a retryable status."""
    report = run_soak(soak_config(str(DEMO_MODEL), replicas=2), duration=60, concurrency=4,
                      chaos_interval=(8.0, 12.0), progress=False)
    print("\n" + report.summary())
    assert {kind for _, kind in report.faults} == set(FAULTS)
    assert report.wrong == 0 and report.hung == 0 and report.lost == 0
    for kind, outcome in [("unary", "OK"), ("stream", "OK"), ("cancelled stream", "CANCELLED"),
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
    assert report.wrong == 0 and report.hung == 0 and report.lost == 0
    assert report.count("unary", "OK") > 0 and report.count("stream", "OK") > 0
    # Served again after every node lost with time left to come back (a node's experts take about 20 s).
    with_time_left = [at for at, kind in report.faults
                      if kind == NODE_FAULT and at < report.started + NODES_SOAK_S - 30]
    assert len(report.served_again().get(NODE_FAULT, [])) >= len(with_time_left) > 0
