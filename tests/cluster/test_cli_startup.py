"""`switch-serve --help`, each subcommand's `--help` and `plan --config` load none of the heavy libraries (the
times they take are measured in the README, not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from reference import MODEL_CONFIGS

CONFIGS = MODEL_CONFIGS
HEAVY = ("torch", "transformers", "ray", "grpc", "fastapi", "numpy", "safetensors", "huggingface_hub")
SUBCOMMANDS = ("generate", "serve", "build", "plan", "convert", "stats", "bench", "quality", "soak", "demo")


def run_and_list_modules(argv: list[str]) -> tuple[str, list[str]]:
    """What `switch-serve ARGV` prints, run in a fresh interpreter, and the heavy top-level modules it loaded."""
    script = ("import contextlib, io, json, sys\n"
              "from cluster.cli import main\n"
              "out = io.StringIO()\n"
              "with contextlib.redirect_stdout(out):\n"
              "    try:\n"
              f"        main({argv!r})\n"
              "    except SystemExit as e:\n"
              "        assert e.code == 0, e.code\n"
              f"print(json.dumps([out.getvalue(), sorted(m for m in {HEAVY!r} if m in sys.modules)]))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return tuple(json.loads(result.stdout.splitlines()[-1]))


@pytest.mark.parametrize("argv", [["--help"], *[[command, "--help"] for command in SUBCOMMANDS],
                                  ["plan", "--config", str(CONFIGS / "switch-c-2048.json"), "--gpus", "48", "--json"]],
                         ids=" ".join)
def test_loads_nothing_heavy(argv):
    printed, heavy = run_and_list_modules(argv)
    assert heavy == []
    if argv[0] == "plan" and "--json" in argv:
        assert json.loads(printed)["num_gpus"] == 48
    else:
        assert printed.startswith("usage: switch-serve")
