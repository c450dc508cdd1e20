"""cluster.bench_step counts what a decoding step asks of the device: ops that make or write a tensor, not views or
casts to the dtype a tensor has; and it counts both systems' steps (the counts are measurements, not checked)."""

from __future__ import annotations

import torch

from cluster.bench_step import DeviceWork, count


def test_device_work_counts_new_and_written_tensors_only():
    x = torch.randn(4, 6)
    with DeviceWork() as work:
        x.view(6, 4)
        x.transpose(0, 1)
        x.to(torch.float32)
        y = x + 1
        y.mul_(2)
        x.to(torch.bfloat16)
    assert work.ops["aten.add"] == work.ops["aten.mul_"] == 1
    assert sum(work.ops.values()) == 3  # and the cast to bfloat16 (`to` or `_to_copy`, by autograd's mode)
    assert work.reads == 0  # nothing on a device to read back


def test_counts_a_step_of_each_system_and_batch():
    rows = count([1, 3], "cpu", torch.float32)
    assert [row["batch"] for row in rows] == [1, 3]
    for row in rows:
        assert row["front_ops"] == sum(row["front_by_op"].values()) > 0 and row["transformers_ops"] > 0
        assert "aten.rms_norm" in row["front_by_op"]
