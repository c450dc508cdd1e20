"""`switch-serve serve` starts its own Ray cluster and Serve app, answers, and stops cleanly on SIGINT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.demo import DEMO_MODEL
from cluster.testing import finish_streams, free_port
from router_service.proto import switch_serve_pb2 as pb
from router_service.proto import switch_serve_pb2_grpc as pb_grpc


def wait_until_up(server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 180
    while "Ctrl-C to stop" not in log.read_text():
        assert server.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(0.5)


@pytest.mark.ray  # in the subprocess
def test_serve_until_interrupted(tmp_path):
    """With an API key from a file: calls with it in either header form are served, calls without it are
    refused, the health check is not. The experts are held as int8 (the demo model answers the same)."""
    grpc_port, http_port = free_port(), free_port()
    log = open(tmp_path / "serve.log", "w+")
    (tmp_path / "key").write_text("s3cret\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SWITCH_SERVE_API_KEY")}
    server = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--model", str(DEMO_MODEL),
                               "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--api-key-file",
                               str(tmp_path / "key"), "--experts-per-actor", "4", "--quantize", "int8"],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    env["SWITCH_SERVE_API_KEY"] = "s3cret"  # for the client
    try:
        wait_until_up(server, tmp_path / "serve.log")
        out = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "--address", f"127.0.0.1:{grpc_port}",
                              "--text", "sort : 3 1 2", "--json"], capture_output=True, text=True, check=True,
                             env=env).stdout  # the client reads the key from the same variable
        assert json.loads(out)["outputs"][0]["text"] == "1 2 3"
        body = json.dumps({"text": "reverse : 1 2 3"}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/generate", data=body,
                                         headers={"Authorization": "Bearer s3cret"})
        with urllib.request.urlopen(request, timeout=30) as r:
            assert json.loads(r.read())["text"] == "3 2 1"
        request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/generate", data=body,
                                         headers={"x-api-key": "s3cret"})
        with urllib.request.urlopen(request, timeout=30) as r:
            assert json.loads(r.read())["text"] == "3 2 1"
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/generate", data=body, headers=headers)
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=30)
            assert refused.value.code == 401
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.SwitchServeStub(channel).Generate(pb.GenerateRequest(text="sort : 2 1"), timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "api key" in refused.value.details()
            answer = pb_grpc.SwitchServeStub(channel).Generate(pb.GenerateRequest(text="sort : 2 1"), timeout=30,
                                                               metadata=[("x-api-key", "s3cret")])
            assert answer.text == "1 2"
            info = pb_grpc.SwitchServeStub(channel).ModelInfo(pb.ModelInfoRequest(), timeout=30,
                                                             metadata=[("x-api-key", "s3cret")])
            assert info.quantize == "int8" and info.dtype == "float32" and len(info.actors) == 2
            layers = len(info.encoder_sparse_layers) + len(info.decoder_sparse_layers)
            float32_bytes = 4 * layers * 2 * info.d_model * info.d_ff * 4  # 4 experts a layer, wi and wo, 4 bytes
            assert all(0.25 * float32_bytes < a.expert_bytes <= 0.3 * float32_bytes for a in info.actors)
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=120) == 0
        assert "switch-serve: stopping" in (tmp_path / "serve.log").read_text()
    finally:
        if server.poll() is None:
            server.kill()


@pytest.mark.ray  # in the subprocess
def test_sigterm_drains_then_ends_what_is_left_with_unavailable(tmp_path):
    """SIGTERM (what Kubernetes sends) while 8 streams of 4,000 tokens run, with a 3 s drain timeout: each stream
    completes or ends with UNAVAILABLE once the timeout has passed; none hangs or is cut without a status, and the
    server exits cleanly. Fails if Ray's own SIGTERM handler ends the server at once (the handlers installed
    before ray.init in cmd_serve), or if the server waits past its drain timeout."""
    from cluster.demo import PROMPTS, WORDS
    from cluster.testing import write_random_checkpoint_with_tokenizer

    write_random_checkpoint_with_tokenizer(tmp_path / "model", WORDS)  # rarely emits EOS: streams run long
    grpc_port, http_port = free_port(), free_port()
    log = open(tmp_path / "serve.log", "w+")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SWITCH_SERVE_API_KEY")}
    server = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--model", str(tmp_path / "model"),
                               "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--drain-timeout-s", "3",
                               "--experts-per-actor", "4", "--max-new-tokens", "4000"],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until_up(server, tmp_path / "serve.log")
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.SwitchServeStub(channel)
            # Greedy: this random model rarely picks EOS, so each stream would run its 4,000 tokens.
            streams = [stub.GenerateStream(pb.GenerateRequest(text=PROMPTS[i % len(PROMPTS)], max_new_tokens=4000),
                                           timeout=120) for i in range(8)]
            for s in streams:
                next(s)
            server.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            outcomes, _ = finish_streams(streams)
            ended = time.monotonic() - signalled
        print(f"\nstreams after SIGTERM: {outcomes}, all ended {ended:.1f} s after it")
        assert set(outcomes) <= {"OK", "UNAVAILABLE"} and "UNAVAILABLE" in outcomes, outcomes
        assert 3 <= ended < 60
        assert server.wait(timeout=120) == 0
        assert "switch-serve: stopping" in (tmp_path / "serve.log").read_text()
    finally:
        if server.poll() is None:
            server.kill()
