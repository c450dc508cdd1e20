"""`switch-serve serve` starts its own Ray cluster and Serve app, answers, and stops cleanly on SIGINT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

from cluster.demo import DEMO_MODEL, free_port


def test_serve_until_interrupted(tmp_path):
    grpc_port, http_port = free_port(), free_port()
    log = open(tmp_path / "serve.log", "w+")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    server = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--model", str(DEMO_MODEL),
                               "--grpc-port", str(grpc_port), "--http-port", str(http_port),
                               "--experts-per-actor", "4"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        while "Ctrl-C to stop" not in (tmp_path / "serve.log").read_text():
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.5)
        out = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "--address", f"127.0.0.1:{grpc_port}",
                              "--text", "sort : 3 1 2", "--json"], capture_output=True, text=True, check=True).stdout
        assert json.loads(out)["outputs"][0]["text"] == "1 2 3"
        request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/generate",
                                         data=json.dumps({"text": "reverse : 1 2 3"}).encode())
        with urllib.request.urlopen(request, timeout=30) as r:
            assert json.loads(r.read())["text"] == "3 2 1"
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=120) == 0
        assert "switch-serve: stopping" in (tmp_path / "serve.log").read_text()
    finally:
        if server.poll() is None:
            server.kill()
