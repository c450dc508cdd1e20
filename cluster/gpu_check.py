"""`make gpu-check`: on a machine with an NVIDIA GPU, the CUDA parity tests (float32 and bfloat16, against
transformers on the same GPU), one sparse layer timed stacked and by expert (cluster.bench_experts), a decoding step's
kernels and reads back counted (cluster.bench_step), and the benchmark with transformers, the front and the expert
actors on the GPU, appended to docs/BENCHMARKS.md under the GPU's name.

    python -m cluster.gpu_check               # what make gpu-check runs
    python -m cluster.gpu_check --no-record   # print only
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import io
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "docs" / "BENCHMARKS.md"
CUDA_TESTS = ["tests/router_service/test_cuda.py", "tests/experts/test_int8.py"]  # their tests marked gpu
# A short sweep, one workload: on an H200 this took about 6 minutes, the parity tests under 2.
WORKLOADS = ["default"]
CONCURRENCY = [1, 8, 32]


def parity_tests() -> tuple[int, str]:
    """(exit status, pytest's summary lines) of the CUDA tests: the tests that failed, errored or were skipped by
    name, and what went to stderr (an import error before any test, say)."""
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", "-m", "gpu",
                          *CUDA_TESTS],
                         cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    summary = lines[next((i for i, line in enumerate(lines) if "short test summary info" in line), -12):]
    errors = [line for line in out.stderr.splitlines() if line.strip()]
    return out.returncode, "\n".join(summary + (["stderr:", *errors[-12:]] if errors else []))


# What the Ray-bound parts say where this interpreter lacks Ray (a GPU machine's own Python may).
NO_RAY = "not run: Ray is not installed for this interpreter"


def stacked_layer() -> str:
    """cluster.bench_experts' timing of one of switch-base-8's sparse layers on the GPU, stacked and by expert, or
    why it did not run (the expert dispatcher's module imports Ray)."""
    if importlib.util.find_spec("ray") is None:
        return NO_RAY
    from cluster.bench_experts import stacked_layer_on_gpu
    from cluster.workloads import SHAPES

    shape, out = SHAPES["base-8"], io.StringIO()
    with contextlib.redirect_stdout(out):
        stacked_layer_on_gpu(shape["num_experts"], shape["d_model"], shape["d_ff"])
    return out.getvalue().strip()


def step_work() -> str:
    """cluster.bench_step's count of a decoding step's kernels and reads back, the front's and transformers', in
    float32 and bfloat16, or why it did not run (the expert dispatcher's module imports Ray)."""
    if importlib.util.find_spec("ray") is None:
        return NO_RAY
    import torch

    from cluster.bench_step import report

    return "\n".join(report([1, 32], dtype) for dtype in (torch.float32, torch.bfloat16))


def benchmark() -> str:
    """The benchmark's table on the GPU, or why it did not run."""
    if importlib.util.find_spec("ray") is None:
        return NO_RAY
    from cluster.bench import checkpoint, run, table
    from cluster.workloads import BENCH_SHAPE, REQUESTS
    from router_service.config import DEFAULT_INGRESS

    folder = checkpoint(BENCH_SHAPE)
    return table(run(folder, WORKLOADS, CONCURRENCY, REQUESTS, {}, "cuda", DEFAULT_INGRESS))


def attempted(part) -> str:
    """What the part `part()` returned, or that it failed and why: recorded, and the parts after it still run."""
    try:
        return part()
    except Exception as e:
        return f"failed: {e!r}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-record", action="store_true",
                        help="print the results without appending them to docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device here (torch {torch.__version__} sees none); run it where there is an "
              "NVIDIA GPU", file=sys.stderr)
        return 2
    gpu = f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"

    def record(text: str) -> None:  # each part as it is done: a run cut short keeps what it measured
        print(text, flush=True)
        if not args.no_record:
            with open(RECORD, "a") as f:
                f.write(text)

    status, tests = parity_tests()
    record(f"\n## GPU check, {gpu}, {datetime.date.today()} (`make gpu-check`)\n\n"
           f"Parity tests ({CUDA_TESTS}), exit status {status}:\n\n```\n{tests}\n```\n")
    layer = attempted(stacked_layer)
    record(f"\nOne sparse layer on the GPU (`python -m cluster.bench_experts`):\n\n```\n{layer}\n```\n")
    step = attempted(step_work)
    record(f"\nA decoding step's kernels and reads back (`python -m cluster.bench_step`):\n\n```\n{step}\n```\n")
    table = attempted(benchmark)
    record(f"\nBenchmark (switch-base-8's shape, random float32 weights, workload {', '.join(WORKLOADS)}, "
           f"concurrency {', '.join(map(str, CONCURRENCY))}):\n\n```\n{table}\n```\n")
    missed = shortfalls(status, tests, {"the sparse layer": layer, "the step's count": step, "the benchmark": table})
    record(f"\ngpu-check: {'; '.join(missed) if missed else 'every part ran, and the parity tests passed'}\n")
    if not args.no_record:
        print(f"gpu-check: results appended to {RECORD}")
    return 1 if missed else 0


def shortfalls(status: int, tests: str, parts: dict[str, str]) -> list[str]:
    """What kept the check from being whole: parity tests that failed or were skipped (a test of Ray's parts, where
    this interpreter lacks it), and parts that failed or did not run."""
    missed = [f"the parity tests failed (exit status {status})"] if status else []
    if skipped := re.search(r"(\d+) skipped", tests):
        missed.append(f"{skipped.group(1)} parity tests skipped")
    missed += [f"{name} {text}" for name, text in parts.items() if text.startswith(("failed", "not run"))]
    return missed


if __name__ == "__main__":
    sys.exit(main())
