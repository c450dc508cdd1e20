"""A minute of the chaos soak (`switch-serve soak --chaos`): mixed load while an expert actor, the expert fleet
and a front replica are killed in turn."""

from __future__ import annotations

from cluster.demo import DEMO_MODEL
from cluster.soak import FAULTS, run_soak, soak_config


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
