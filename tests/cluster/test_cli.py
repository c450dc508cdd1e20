"""`switch-serve generate` prints one JSON object whose outputs equal transformers'."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference import hf_dropped_tokens, hf_generate

from cluster import cli
from cluster.cli import main
from cluster.demo import WORDS
from cluster.testing import free_port, write_random_checkpoint_with_tokenizer
from experts.checkpoint import SwitchCheckpoint

PROMPTS = [[5, 9, 23, 4, 1], [71, 3, 1]]


def run_cli(capsys, *argv) -> dict:
    main(["generate", *argv])
    return json.loads(capsys.readouterr().out)


def test_generate_json_matches_transformers(ray_cluster, checkpoint_factory, capsys):
    path, hf_model = checkpoint_factory("cli", num_experts=4, expert_capacity=2)
    out = run_cli(capsys, "--model", str(path), "--input-ids", json.dumps(PROMPTS), "--max-new-tokens", "6",
                  "--experts-per-actor", "2", "--micro-batches", "2", "--logprobs", "--json")
    reference = hf_generate(hf_model, PROMPTS, 6)
    assert len(out["outputs"]) == len(PROMPTS)
    dropped = hf_dropped_tokens(hf_model, PROMPTS)  # an expert takes 2 tokens of a prompt: some go over
    assert [o["dropped_tokens"] for o in out["outputs"]] == dropped and sum(dropped) > 0
    for got, (tokens, logprobs) in zip(out["outputs"], reference):
        assert set(got) == {"token_ids", "logprobs", "finish_reason", "dropped_tokens"}
        assert got["token_ids"] == tokens
        assert got["logprobs"] == pytest.approx(logprobs, abs=1e-4)
        assert got["finish_reason"] == ("eos" if tokens[-1] == 1 else "length")


def test_generate_text_uses_the_checkpoint_tokenizer(ray_cluster, tmp_path, capsys):
    from transformers import AutoTokenizer

    write_random_checkpoint_with_tokenizer(tmp_path, WORDS)
    out = run_cli(capsys, "--model", str(tmp_path), "--text", "sort : 2 1", "spell : 4 7 2",
                  "--max-new-tokens", "4", "--experts-per-actor", "4", "--capacity", "dropless", "--json")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert [len(o["token_ids"]) for o in out["outputs"]] == [4, 4]
    for o in out["outputs"]:
        assert "logprobs" not in o and o["dropped_tokens"] == 0
        assert o["text"] == tokenizer.decode(o["token_ids"], skip_special_tokens=True)
    # Each text encoded by the checkpoint's tokenizer: the same tokens as its ids given.
    ids = [tokenizer(text)["input_ids"] for text in ("sort : 2 1", "spell : 4 7 2")]
    by_ids = run_cli(capsys, "--model", str(tmp_path), "--input-ids", json.dumps(ids), "--max-new-tokens", "4",
                     "--experts-per-actor", "4", "--capacity", "dropless", "--json")
    assert [o["token_ids"] for o in by_ids["outputs"]] == [o["token_ids"] for o in out["outputs"]]
    assert out["outputs"][0]["token_ids"] != out["outputs"][1]["token_ids"]  # each prompt's own answer


@pytest.mark.parametrize("argv, message", [
    (["--input-ids", "[[5, 1000]]"], "input_ids[0]: token ids [1000] outside the vocabulary"),
    (["--input-ids", "[[]]"], "input_ids[0]: empty prompt"),
    (["--text", "hello"], "holds no tokenizer"),
    (["--input-ids", "[[5, 1]]", "--stop", "x"], "stop: stop strings need the checkpoint's tokenizer"),
    (["--input-ids", "[[5, 1]]", "--replicate-hot", "2"], "error: replicate_hot needs gpus"),
    (["--input-ids", "[[5, 1]]", "--nodes", "3"], "error: nodes: 1 actors cannot be spread over 3 nodes"),
])
def test_bad_input_exits_with_a_message(ray_cluster, checkpoint_factory, capsys, argv, message):
    path, _ = checkpoint_factory("cli", num_experts=4, expert_capacity=2)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", str(path), "--experts-per-actor", "4", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_checkpoint_exits_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(tmp_path), "--input-ids", "[[1]]"])
    assert f"{tmp_path}/config.json: missing" in capsys.readouterr().err


def test_console_script_help():
    script = Path(sys.executable).parent / "switch-serve"
    out = subprocess.run([str(script), "generate", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--model", "--input-ids", "--text", "--max-new-tokens", "--experts-per-actor", "--capacity",
                 "--logprobs", "--json", "--gpus", "--nodes", "--gpu-memory", "--actors-per-gpu", "--replicate-hot",
                 "--stats", "--dtype", "--routing"):
        assert flag in out
    assert "--top-logprobs" not in out  # the OpenAI API's alone


@pytest.mark.parametrize("argv, message", [
    (["generate", "--address", "localhost:1", "--input-ids", '[["a"]]'], "--input-ids: must be a JSON list of lists"),
    (["demo", "--model", "/no/such/model"], "/no/such/model/config.json: missing"),
    (["soak", "--model", "/no/such/model", "--duration", "1"], "/no/such/model/config.json: missing"),
    (["bench", "--model", "/no/such/model"], "/no/such/model/config.json: missing"),
    (["bench", "--requests", "2", "--concurrency", "4,8"], "--concurrency: at least one must be at most --requests"),
    (["bench", "--requests", "0"], "argument --requests: must be at least 1, got '0'"),
    (["quality", "--requests", "x"], "argument --requests: expected a whole number, got 'x'"),
    (["generate", "--input-ids", "[[5, 1]]"], "one of the arguments --model --address is required"),
    (["generate", "--address", "localhost:1", "--input-ids", "[[5, 1]]", "--dtype", "bf16"],
     "--dtype: sets up the cluster that --model starts; the server at --address has its own"),
    (["build", "--model", "/no/such/model", "--front-resource", "switch_front"],
     "argument --front-resource: expected NAME=AMOUNT, got 'switch_front'"),
    (["build", "--model", "/no/such/model", "--actor-resource", "expert_slot=one"],
     "argument --actor-resource: expected NAME=AMOUNT, got 'expert_slot=one'"),
    (["build", "--model", "demo/model", "--front-resource", "GPU=1"],
     "front_resources: GPU is Ray's own resource, which the processes ask for by themselves"),
    (["build", "--model", "demo/model", "--actor-resource", "expert_slot=-1"],
     "actor_resources: expert_slot: a negative amount, -1"),
    (["build", "--model", "demo/model", "--cpus", "4", "--experts-per-actor", "2"],
     "cpus: sets how many experts each actor packs, which experts_per_actor sets already"),
    (["serve", "--model", "demo/model", "--http-port", "70000"], "argument --http-port: must be at least 1 and at"),
    (["serve", "--model", "demo/model", "--grpc-port", "65536"], "argument --grpc-port: must be at least 1 and at"),
    (["generate", "--address", "localhost:1", "--input-ids", "[[true, 1]]"],
     "--input-ids: must be a JSON list of lists of token ids"),
    (["build", "--model", "demo/model", "--http-port", "9000"], "--http-port: 9000 is --grpc-port's too"),
    (["serve", "--model", "demo/model", "--nodes", "20"], "nodes: 8 actors cannot be spread over 20 nodes"),
    (["generate", "--address", "localhost:1", "--input-ids", "[[5, 1]]", "--actor-resource", "slot=1"],
     "--actor-resource: sets up the cluster that --model starts"),
    (["generate", "--address", "localhost:1", "--input-ids", "[]"], "--input-ids: must be a JSON list of lists"),
    (["soak", "--nodes", "-1"], "argument --nodes: must be at least 0, got '-1'"),
    (["soak", "--chaos-every", "5", "9"], "--chaos-every: sets how often --chaos injects faults"),
    (["plan", "--config", "README.md", "--gpus", "1"], "README.md: not a valid Switch Transformers config"),
    (["plan", "--config", "tests/data/model-configs/switch-c-2048.json", "--gpus", "1", "--gpu-memory", "40MiB"],
     "gpu_memory: 40 MiB (90% usable) holds no expert of 49 MiB"),
    (["generate", "--model", "demo/model", "--input-ids", "[[5, 1]]", "--request-timeout-s", "5"],
     "--request-timeout-s: for a call to a server (--address); the cluster --model starts takes none"),
    (["generate", "--model", "demo/model", "--input-ids", "[[5, 1]]", "--api-key-file", "key.txt"],
     "--api-key-file: for a call to a server (--address)"),
    (["generate", "--address", "localhost:1", "--input-ids", "[[5, 1]]", "--request-timeout-s", "-5"],
     "argument --request-timeout-s: expected seconds above 0, got '-5'"),
    (["generate", "--address", "localhost:1", "--input-ids", "[[5, 1]]", "--request-timeout-s", "nan"],
     "argument --request-timeout-s: expected seconds above 0, got 'nan'"),
    (["build", "--model", "demo/model", "--actor-resource", "=1"], "argument --actor-resource: expected NAME=AMOUNT"),
    (["build", "--model", "demo/model", "--front-resource", "slot=nan"],
     "argument --front-resource: expected NAME=AMOUNT, got 'slot=nan'"),
    (["build", "--model", "demo/model", "--front-gpus", "inf"], "front_gpus: Input should be a finite number"),
    (["build", "--model", "demo/model", "--drain-timeout-s", "inf"], "drain_timeout_s: Input should be a finite"),
    (["build", "--model", "demo/model", "--served-model-name", ""], "served_model_name: String should have at least"),
    (["soak", "--duration", "0"], "argument --duration: expected seconds above 0, got '0'"),
    (["soak", "--chaos", "--chaos-every", "0", "0"], "argument --chaos-every: expected seconds above 0, got '0'"),
    (["soak", "--chaos", "--chaos-every", "9", "5"], "--chaos-every: MIN_S 9 is more than MAX_S 5"),
    (["serve", "--model", "demo/model", "--address", "auto", "--ingress", "haproxy"],
     "--ingress: sets up the Ray cluster started here; a cluster joined with --address takes"),
    (["plan", "--config", "/no/such/config.json", "--gpus", "1"], "argument --config: /no/such/config.json: no such"),
    (["build", "--model", "demo/model", "--config", "demo"], "argument --config: demo: not a file"),
    (["build", "--model", "demo/model", "-o", "/no/such/folder/app.yaml"],
     "argument -o/--output: /no/such/folder is not a folder"),
    (["build", "--model", "demo/model", "-o", "demo"], "argument -o/--output: demo: a folder, not a file"),
    (["stats", "--address", "localhost:1", "-o", "/no/such/folder/stats.json"],
     "argument -o/--output: /no/such/folder is not a folder"),
    (["generate", "--address", "localhost:1", "--input-ids", "[[5, 1]]", "--api-key-file", "/no/such/key"],
     "api_key_file: /no/such/key: No such file or directory"),
    (["serve", "--model", "demo/model", "--api-key-file", "demo"], f"api_key_file: {Path('demo').resolve()}: Is a"),
    (["serve", "--model", "demo/model", "--ingress", "haproxy", "--host", "127.0.0.2"],
     "--host: behind HAProxy, 127.0.0.1 or every address (0.0.0.0 or ::), got 127.0.0.2: the fronts' own HTTP"),
])
def test_bad_flags_exit_with_one_line_before_anything_starts(capsys, argv, message):
    """Before Ray or a benchmark starts (each case here would have run for a minute first, or ended in a
    traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err and err.splitlines()[-1].startswith("switch-serve")


@pytest.mark.parametrize("argv, message", [
    (["--input-ids", "[[5, 1000000000]]"], "input_ids[0]: token ids [1000000000] outside the vocabulary"),
    (["--input-ids", "[[5, 1], []]"], "input_ids[1]: empty prompt"),
    (["--input-ids", "[[5, 1]]", "--temperature", "500"], "temperature: must be 0 (greedy) or between"),
    (["--text", "sort : 2 1", ""], "texts[1]: empty prompt"),
    (["--text", "sort : 2 1 4 3", "--max-prompt-tokens", "4"], "texts[0]: 7 tokens, more than the limit of 4"),
    (["--text", "sort : 2 1", "--stop", "1", "--stop", ""], "stop: a stop string is empty"),
])
def test_generate_here_checks_its_request_before_the_cluster_starts(monkeypatch, capsys, argv, message):
    """A bad prompt or sampling flag is refused before the cluster starts (minutes, for a large checkpoint), not
    once it has. Fails if the cluster starts first."""
    import router_service.engine

    monkeypatch.setattr(router_service.engine, "SwitchCluster", lambda config: pytest.fail("the cluster started"))
    with pytest.raises(SystemExit):
        main(["generate", "--model", "demo/model", *argv])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", [["serve"], ["generate", "--text", "sort : 2 1"]])
def test_a_broken_tokenizer_fails_before_anything_starts_naming_its_files(monkeypatch, capsys, tmp_path, command):
    """A tokenizer.json cut short: refused as the command starts, naming the folder and its tokenizer files, not
    as each front replica starts (Serve trying again until the deploy failed). Fails if the cluster starts."""
    import shutil

    import cluster.app
    import router_service.engine

    model = tmp_path / "model"
    shutil.copytree("demo/model", model)
    (model / "tokenizer.json").write_text((Path("demo/model/tokenizer.json").read_text())[:100])
    monkeypatch.setattr(cluster.app, "local_serve", lambda *args, **kwargs: pytest.fail("the server started"))
    monkeypatch.setattr(router_service.engine, "SwitchCluster", lambda config: pytest.fail("the cluster started"))
    ports = ["--grpc-port", str(free_port()), "--http-port", str(free_port())] if command == ["serve"] else []
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--model", str(model), *ports])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"{model}: its tokenizer (tokenizer.json, tokenizer_config.json) does not load: " in err


def test_a_plot_that_could_not_be_drawn_is_refused_before_the_bench_runs(monkeypatch, capsys):
    """Without matplotlib, or into a folder that is not there: refused before a run of many minutes, not after it.
    Fails if the bench starts first."""
    import types

    import cluster.bench

    monkeypatch.setattr(cluster.bench, "checkpoint", lambda *args: pytest.fail("the checkpoint was written"))
    monkeypatch.setattr(cluster.bench, "run", lambda *args: pytest.fail("the bench ran"))
    for matplotlib, path, message in [(None, "plot.png", "--plot: needs matplotlib"),
                                      (types.ModuleType("matplotlib"), "/no/such/folder/plot.png",
                                       "--plot: /no/such/folder is not a folder")]:
        monkeypatch.setitem(sys.modules, "matplotlib", matplotlib)  # None: not installed
        with pytest.raises(SystemExit):
            main(["bench", "--shape", "tiny", "--plot", path])
        assert message in capsys.readouterr().err


def test_generate_here_takes_as_many_new_tokens_as_asked(checkpoint_factory, monkeypatch):
    """The cluster `generate --model` starts serves that one request: its limit on new tokens (a server's, 256 by
    default) follows the request's. Fails if a request for more is refused."""
    path, _ = checkpoint_factory("plain")
    configs = []
    monkeypatch.setattr(cli, "generate_local", lambda config, *args: configs.append(config) or [])
    main(["generate", "--model", str(path), "--input-ids", "[[5, 1]]", "--max-new-tokens", "300"])
    main(["generate", "--model", str(path), "--input-ids", "[[5, 1]]", "--max-new-tokens", "3"])
    assert [config.max_new_tokens for config in configs] == [300, 256]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for a machine without CUDA")
def test_bench_on_cuda_without_it_says_so(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--device", "cuda"])
    assert "--device: cuda, but this machine's torch sees no CUDA GPU" in capsys.readouterr().err


def test_bench_on_cuda_refuses_a_packing_for_cpus(capsys):
    """The GPU run places two actors a GPU: a packing it would not use is refused, not ignored."""
    with pytest.raises(SystemExit):
        main(["bench", "--device", "cuda", "--experts-per-actor", "2"])
    assert "--experts-per-actor: packs experts for CPUs" in capsys.readouterr().err


def test_a_taken_port_is_named_before_serving_starts(capsys, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("", 0))
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit):
            main(["serve", "--model", "demo/model", "--grpc-port", str(port)])
        assert f"--grpc-port: port {port} is not free" in capsys.readouterr().err
        # Joining a cluster, whose proxies listen on its nodes: this machine's ports are not asked about.
        with pytest.raises(SystemExit):
            main(["serve", "--model", str(tmp_path), "--grpc-port", str(port), "--address", "auto"])
        err = capsys.readouterr().err
        assert "is not free" not in err and "config.json" in err, err


def test_plan_of_a_hub_id_downloads_its_config_alone(monkeypatch, tmp_path, capsys):
    """Planning needs no weights: switch-c-2048's would be 3.1 TB. Fails if `plan` asks the Hub for more than the
    config and tokenizer files."""
    import huggingface_hub
    from reference import MODEL_CONFIGS

    asked = []

    def snapshot_download(repo_id, allow_patterns):
        asked.extend(allow_patterns)
        (tmp_path / "config.json").write_text((MODEL_CONFIGS / "switch-c-2048.json").read_text())
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: pytest.fail("listed the repo's weights"))
    main(["plan", "--model", "google/switch-c-2048", "--gpus", "48"])
    assert "config.json" in asked and not [p for p in asked if p.endswith((".bin", ".safetensors")) or "index" in p]
    assert capsys.readouterr().out.startswith("48 expert actors on 48 GPUs")


def test_plan_sizes_a_checkpoints_experts_in_its_own_dtype_as_serve_does(checkpoint_factory, capsys):
    """A float32 checkpoint is served in float32 unless told otherwise: `plan --model` sizes it so (bfloat16 only
    where there are no weights to say). Fails if `plan` says it fits where `serve --gpus` would refuse."""
    path, _ = checkpoint_factory("plain")

    def expert_bytes(*flags) -> int:
        main(["plan", "--model", str(path), "--gpus", "1", "--json", *flags])
        return json.loads(capsys.readouterr().out)["expert_bytes"]

    assert expert_bytes() == expert_bytes("--dtype", "fp32") == 2 * expert_bytes("--dtype", "bf16")


@pytest.mark.parametrize("model, served_as", [("google/switch-base-8", "google/switch-base-8"), ("demo/model", None)])
def test_a_hub_id_is_the_served_models_id(monkeypatch, model, served_as):
    """A Hub id's download is a folder named by its commit hash: the id the API lists, and the metrics' label, is the
    Hub id itself; a folder keeps its name (the server's default)."""
    import contextlib

    import cluster.app
    import cluster.cli

    served = []

    @contextlib.contextmanager
    def local_serve(config, **_):
        served.append(config)
        raise KeyboardInterrupt  # served: stop here

    downloaded = ("demo/model", SwitchCheckpoint.open("demo/model"))  # what the download gives
    monkeypatch.setattr(cluster.cli, "open_checkpoint", lambda m: downloaded)
    monkeypatch.setattr(cluster.app, "local_serve", local_serve)
    with pytest.raises(KeyboardInterrupt):
        main(["serve", "--model", model, "--grpc-port", str(free_port()), "--http-port", str(free_port())])
    assert served[0].model == "demo/model" and served[0].served_model_name == served_as


def test_serve_hands_the_replicas_absolute_paths_and_says_where_they_read_the_key(monkeypatch, capsys, tmp_path):
    """The replicas run in folders of Ray's: a relative checkpoint or stats file is made absolute (`--model .` would
    otherwise serve a model named ''); joining a cluster, the replicas read the key from their own nodes'
    environment, not this shell's, which the warning says; without a key at all, it says anyone may call. Fails if a
    relative path reaches the replicas."""
    import contextlib

    import cluster.app

    served = []

    @contextlib.contextmanager
    def local_serve(config, **_):
        served.append(config)
        raise KeyboardInterrupt

    root = Path.cwd()
    monkeypatch.setattr(cluster.app, "local_serve", local_serve)
    monkeypatch.setenv("SWITCH_SERVE_API_KEY", "here-only")
    monkeypatch.chdir(root / "demo/model")
    ports = ["--grpc-port", str(free_port()), "--http-port", str(free_port())]
    with pytest.raises(KeyboardInterrupt):
        main(["serve", "--model", ".", "--address", "auto", *ports])
    assert served[0].model == str(root / "demo/model")
    assert "the replicas read $SWITCH_SERVE_API_KEY on the nodes they run on" in capsys.readouterr().err
    monkeypatch.chdir(root / "demo")
    with pytest.raises(KeyboardInterrupt):
        main(["serve", "--model", "model", *ports])
    assert served[1].model == str(root / "demo/model") and "warning" not in capsys.readouterr().err
    monkeypatch.delenv("SWITCH_SERVE_API_KEY")
    with pytest.raises(KeyboardInterrupt):
        main(["serve", "--model", "model", *ports])
    err = capsys.readouterr().err
    assert f"warning: no API key, so anyone who can reach gRPC port {ports[1]} (every address)" in err
    with pytest.raises(KeyboardInterrupt):  # behind HAProxy, gRPC listens where HTTP does
        main(["serve", "--model", "model", *ports, "--ingress", "haproxy"])
    assert f"reach gRPC port {ports[1]} (127.0.0.1, and each front's own gRPC port" in capsys.readouterr().err
    # A link keeps its own name, the model's default id: `current` is not served as what it points to.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "current").symlink_to(root / "demo/model")
    with pytest.raises(KeyboardInterrupt):
        main(["serve", "--model", "current", *ports])
    assert served[4].model == str(tmp_path / "current") and served[4].model_id == "current"


def test_generate_prints_logprobs_and_routing_without_json(monkeypatch, capsys):
    """Asked for, they are asked of the cluster and shown, not dropped. Fails if either is not passed on, or the
    plain output leaves them out."""
    result = {"token_ids": [4, 1], "finish_reason": "eos", "dropped_tokens": 0, "logprobs": [-0.25, -1.5],
              "routing": [{"stack": "decoder", "layer": 1, "experts": [3]}]}
    calls = []
    monkeypatch.setattr(cli, "generate_local", lambda *args: calls.append(args) or [result])
    main(["generate", "--model", "demo/model", "--input-ids", "[[5, 1]]", "--logprobs", "--routing"])
    (_, prompts, as_text, logprobs, sampling, stop), = calls
    assert (prompts, as_text, logprobs, sampling, stop) == ([[5, 1]], False, True, {"routing": True}, ())
    out = capsys.readouterr().out.splitlines()
    assert out == ["[0] [4, 1]  (eos, 2 tokens, 0 dropped)", "    logprobs: -0.2500 -1.5000",
                   '    routing: [{"stack": "decoder", "layer": 1, "experts": [3]}]']


def test_generate_passes_every_request_flag_on_here_and_to_a_server(monkeypatch):
    """The sampling and stop flags reach the cluster `--model` starts and the calls to `--address` alike, and
    `--request-timeout-s` the calls (600 s unless given, at most 32 in flight). Fails if one is dropped or renamed on
    the way."""
    import cluster.client

    flags = ["--max-new-tokens", "5", "--temperature", "0.5", "--top-k", "3", "--top-p", "0.9", "--seed", "7",
             "--stop-token-ids", "4", "9", "--stop", "1 2", "--stop", "x"]
    sampling = {"max_new_tokens": 5, "temperature": 0.5, "top_k": 3, "top_p": 0.9, "seed": 7, "stop_token_ids": [4, 9]}
    here, there = [], []
    monkeypatch.setattr(cli, "generate_local", lambda *args: here.append(args) or [])
    monkeypatch.setattr(cluster.client, "generate_remote", lambda *args, **kwargs: there.append(kwargs) or [])
    main(["generate", "--model", "demo/model", "--text", "sort : 2 1", *flags])
    assert here[0][4] == sampling and here[0][5] == ("1 2", "x")
    for timeout, expected in (([], cluster.client.CLIENT_TIMEOUT_S), (["--request-timeout-s", "20"], 20.0)):
        main(["generate", "--address", "localhost:1", "--text", "sort : 2 1", *flags, *timeout])
        assert there[-1] == {**sampling, "stop": ["1 2", "x"], "logprobs": False, "timeout": expected, "api_key": None}
    assert cluster.client.CLIENT_TIMEOUT_S == 600 and cluster.client.MAX_IN_FLIGHT == 32


def test_the_highest_port_and_as_many_concurrent_as_requests_are_taken(monkeypatch):
    """The edges of what the flags take: port 65535, and a bench whose concurrency equals its requests (every
    request at once, the run the targets are measured at)."""
    from cluster import bench
    from cluster.cli import _port

    assert _port("65535") == 65535
    runs = []
    monkeypatch.setattr(bench, "checkpoint", lambda shape: Path(shape))
    monkeypatch.setattr(bench, "run", lambda *args: runs.append(args) or {})
    monkeypatch.setattr(bench, "print_report", lambda report, as_json: None)
    main(["bench", "--requests", "4", "--concurrency", "4"])
    assert [(r[2], r[3]) for r in runs] == [([4], 4)]


def test_bench_json_is_the_only_thing_on_stdout(monkeypatch, capsys):
    """What is printed during the run (Ray's word of a task retried as the cluster stops, printed on the driver's
    stdout) goes to stderr: stdout parses as the report. Fails if it stays on stdout."""
    from cluster import bench

    def run(*args):
        print("(raylet) Task ServeController.listen_for_change failed.")
        return {"workloads": {}}

    monkeypatch.setattr(bench, "checkpoint", lambda shape: Path(shape))
    monkeypatch.setattr(bench, "run", run)
    main(["bench", "--requests", "4", "--concurrency", "4", "--json"])
    out, err = capsys.readouterr()
    assert json.loads(out) == {"workloads": {}}
    assert "listen_for_change" in err


def test_soak_and_demo_refuse_a_checkpoint_without_a_tokenizer(checkpoint_factory, monkeypatch, capsys):
    """Both send text prompts: a checkpoint without a tokenizer is refused in one line before anything starts, not
    by the server prompt by prompt after the cluster has (a traceback). Fails if either starts."""
    import cluster.demo
    import cluster.soak

    path, _ = checkpoint_factory("plain")
    monkeypatch.setattr(cluster.soak, "main", lambda *args: pytest.fail("the soak started"))
    monkeypatch.setattr(cluster.demo, "run_demo", lambda *args, **kwargs: pytest.fail("the demo started"))
    for command in ("soak", "demo"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--model", str(path)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"holds no tokenizer, and {command} sends text prompts" in err
