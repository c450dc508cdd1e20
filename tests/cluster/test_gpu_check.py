"""`make gpu-check` stops with a clear message, and records nothing, where there is no CUDA; where there is, it
records each part as it is done."""

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


def test_gpu_check_records_a_part_that_fails_and_goes_on(capsys, tmp_path, monkeypatch):
    """A part that breaks is recorded as failed, with why, and the parts after it still run; the check fails.
    Fails if a part's exception ends the run (the results after it lost, no last line)."""
    record = tmp_path / "BENCHMARKS.md"
    monkeypatch.setattr(gpu_check, "RECORD", record)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _: "NVIDIA Test GPU")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(gpu_check, "parity_tests", lambda: (1, "1 failed, 9 passed"))

    def broken_layer():
        raise RuntimeError("the GPU went away")

    monkeypatch.setattr(gpu_check, "stacked_layer", broken_layer)
    monkeypatch.setattr(gpu_check, "step_work", lambda: "cuda float32, a step of 32: the front 389 ops")
    monkeypatch.setattr(gpu_check, "benchmark", lambda: "concurrency | ...")
    assert gpu_check.main([]) == 1
    text = record.read_text()
    assert "## GPU check, NVIDIA Test GPU x1" in text and "exit status 1" in text and "1 failed, 9 passed" in text
    assert "failed: RuntimeError('the GPU went away')" in text and "the front 389 ops" in text
    assert "concurrency | ..." in text
    assert text.rstrip().splitlines()[-1] == ("gpu-check: the parity tests failed (exit status 1); the sparse layer "
                                              "failed: RuntimeError('the GPU went away')")


@pytest.mark.parametrize("tests, step, table, status, said", [
    ("12 passed in 40.1s", "the front 389 ops", "concurrency | ...", 0, "every part ran, and the parity tests passed"),
    ("9 passed, 3 skipped in 20.0s", "the front 389 ops", "concurrency | ...", 1, "3 parity tests skipped"),
    ("12 passed in 40.1s", "failed: RuntimeError('no')", "concurrency | ...", 1, "the step's count failed"),
    ("12 passed in 40.1s", "the front 389 ops", gpu_check.NO_RAY, 1, "the benchmark not run: Ray is not installed"),
])
def test_gpu_check_passes_only_where_every_part_ran(capsys, tmp_path, monkeypatch, tests, step, table, status, said):
    """Its exit status and its last recorded line say whether the whole check ran: parity tests skipped, or a part
    that failed or did not run, make it fail. Fails if an incomplete check exits 0."""
    record = tmp_path / "BENCHMARKS.md"
    monkeypatch.setattr(gpu_check, "RECORD", record)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _: "NVIDIA Test GPU")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(gpu_check, "parity_tests", lambda: (0, tests))
    monkeypatch.setattr(gpu_check, "stacked_layer", lambda: "tokens   stacked   by expert")
    monkeypatch.setattr(gpu_check, "step_work", lambda: step)
    monkeypatch.setattr(gpu_check, "benchmark", lambda: table)
    assert gpu_check.main([]) == status
    assert record.read_text().rstrip().splitlines()[-1].startswith(f"gpu-check: {said}")


def test_the_parity_tests_record_names_what_failed(tmp_path, monkeypatch):
    """The record of the parity tests names each test that failed, not only the skipped ones (pytest's -rs)."""
    module = tmp_path / "test_on_the_gpu.py"
    module.write_text("import pytest\n\n\n@pytest.mark.gpu\ndef test_tokens_match():\n    assert 1 == 2\n\n\n"
                      "@pytest.mark.gpu\ndef test_bf16_matches():\n    pytest.skip('needs CUDA')\n")
    monkeypatch.setattr(gpu_check, "CUDA_TESTS", [str(module)])
    status, summary = gpu_check.parity_tests()
    assert status == 1
    assert "FAILED" in summary and "test_tokens_match" in summary and "needs CUDA" in summary


def test_the_parity_tests_record_keeps_what_pytest_wrote_to_stderr(tmp_path, monkeypatch):
    """A run that stops before any test (a conftest that fails to import) is recorded with what pytest wrote to
    stderr, not as an empty block and an exit status."""
    (tmp_path / "conftest.py").write_text("raise ImportError('no module named cuda_helpers')\n")
    (tmp_path / "test_on_the_gpu.py").write_text("def test_tokens_match():\n    pass\n")
    monkeypatch.setattr(gpu_check, "CUDA_TESTS", [str(tmp_path / "test_on_the_gpu.py")])
    status, summary = gpu_check.parity_tests()
    assert status != 0 and "no module named cuda_helpers" in summary
