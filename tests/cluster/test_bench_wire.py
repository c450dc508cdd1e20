"""`python -m cluster.bench_wire` runs on its own two raylets and times every size both ways on both nodes, and a few
rows in each form of a call (its numbers are measurements, not checked)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cluster.bench_wire import FEW_ROWS, ROWS


@pytest.mark.slow
@pytest.mark.ray  # its own cluster, not the shared one's fixture: marked here
def test_bench_wire_prints_a_row_of_timings_per_size(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "cluster.bench_wire"], capture_output=True, text=True, timeout=600,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    by_size, few = ([line.split() for line in table.splitlines() if "|" in line][1:]
                    for table in out.stdout.split("\n\n"))
    assert [int(r[0]) for r in by_size] == list(ROWS)
    assert all(float(r[i]) > 0 for r in by_size for i in (3, 4, 6, 7))
    assert [int(r[0]) for r in few] == list(FEW_ROWS)
    assert all(float(r[i]) > 0 for r in few for i in (2, 3, 4)) and all(len(r) == 5 for r in few)
