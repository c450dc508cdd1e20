"""`switch-serve bench` runs end to end on the tiny shape (its numbers are not checked: they are measurements),
and the three systems generate the same tokens for the same greedy requests."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.ray  # in the subprocess
def test_bench_quick_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "--shape", "tiny", "--requests", "6",
                          "--batch-size", "3", "--json"], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    systems = {r["system"]: r for r in report["results"]}
    assert set(systems) == {"hf-single", "hf-batch-3", "cluster"}
    assert len({r["tokens"] for r in systems.values()}) == 1  # the same greedy outputs everywhere
    assert set(systems["cluster"]["extra"]) == {"tokens_per_s_vs_hf-single", "tokens_per_s_vs_hf-batch-3"}
    breakdown = report["breakdown"]
    assert breakdown["sparse_layer_calls"] > 0 and 0 < breakdown["round_trip_s"] < breakdown["seconds"]
