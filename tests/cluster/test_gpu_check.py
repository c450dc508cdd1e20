"""`make gpu-check` stops with a clear message, and records nothing, where there is no CUDA."""

from __future__ import annotations

import pytest
import torch

from cluster import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: make gpu-check runs for real")
def test_gpu_check_stops_where_there_is_no_cuda(capsys, tmp_path, monkeypatch):
    record = tmp_path / "BENCHMARKS.md"
    monkeypatch.setattr(gpu_check, "RECORD", record)
    assert gpu_check.main([]) == 2
    assert "gpu-check: no CUDA device here" in capsys.readouterr().err
    assert not record.exists()
