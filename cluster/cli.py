"""The `switch-serve` command line.

Flags that set a config field are made from the field (router_service.config, experts.placement,
router_service.requests), so a default or a help text is written once, beside the field. Each subcommand imports
the heavy libraries it uses (torch, transformers, Ray, Serve, gRPC) only when it runs, so that `--help` and
`plan` answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from cluster.workloads import BENCH_SHAPE, BENCH_WORKLOADS, CONCURRENCY, REQUESTS, SHAPES, WORKLOADS
from experts.checkpoint import INDEX_FILE, SINGLE_FILE, SwitchCheckpoint, has_tokenizer, read_config
from experts.placement import PlacementConfig, PlacementError
from experts.plan import PLAN_DTYPE
from experts.spec import CONFIG_FILE, EXPERT_FORMATS
from router_service.auth import API_KEY_ENV, API_KEY_FILE_DEFAULT, load_api_key
from router_service.config import (
    CLIENT_TIMEOUT_S,
    DEFAULT_INGRESS,
    GRPC_PORT,
    HTTP_PORT,
    INGRESSES,
    LOCAL_HTTP_HOST,
    EngineConfig,
    ServerConfig,
)
from router_service.requests import SamplingParams, check_prompt, make_sampling_params
from router_service.text import check_stop_strings

# Flags named otherwise than their field.
FLAG_NAMES = {"num_replicas": "--replicas", "actor_resources": "--actor-resource",
              "fleet_resources": "--fleet-resource", "front_resources": "--front-resource"}
PLANNER_FIELDS = ("gpu_memory", "nodes", "replicate_hot", "stats")  # with --gpus, plan's flags
CHAOS_EVERY_S = (15.0, 30.0)  # soak --chaos: the range the seconds between faults are drawn from


def fail(message: str) -> typing.NoReturn:
    print(f"switch-serve: error: {message}", file=sys.stderr)
    sys.exit(2)


def _finite(text: str) -> float | None:
    """`text` as a finite number; None where it is none (not a number, infinity, NaN)."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _resource(text: str) -> tuple[str, float]:
    name, _, amount = text.partition("=")
    value = _finite(amount)
    if not name or value is None:
        raise argparse.ArgumentTypeError(f"expected NAME=AMOUNT, got {text!r}")
    return name, value


def _seconds(text: str) -> float:
    value = _finite(text)
    if value is None or value <= 0:
        raise argparse.ArgumentTypeError(f"expected seconds above 0, got {text!r}")
    return value


def _whole(text: str, least: int, most: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < least or (most is not None and value > most):
        raise argparse.ArgumentTypeError(f"must be at least {least}" + (f" and at most {most}" if most else "")
                                         + f", got {text!r}")
    return value


def _positive(text: str) -> int:
    return _whole(text, 1)


def _count(text: str) -> int:
    return _whole(text, 0)


def _port(text: str) -> int:
    return _whole(text, 1, 65535)


def _file(text: str) -> str:
    """A file on this machine that can be read: checked as the flags are parsed, so that the error names the flag."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: not a file")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text}: cannot be read")
    return text


def _output(text: str) -> str:
    """A file to write, in a folder that is there and may be written."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: a folder, not a file")
    if not path.resolve().parent.is_dir():
        raise argparse.ArgumentTypeError(f"{path.parent} is not a folder")
    if not os.access(path if path.exists() else path.resolve().parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text}: cannot be written")
    return text


def _int_list(text: str) -> list[int]:
    """Whole numbers of at least 1, separated by commas."""
    return [_positive(part) for part in text.split(",")]


def _json_ids(text: str) -> list:
    try:
        return json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None


def _flag_options(annotation) -> dict:
    """argparse options for a field's type: its choices, its element type and how many values it takes."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return {"choices": typing.get_args(annotation)}
    if origin is dict:  # Ray resources: NAME=AMOUNT, repeatable
        return {"type": _resource, "action": "append", "metavar": "NAME=AMOUNT"}
    if origin is tuple:
        return {"type": typing.get_args(annotation)[0], "nargs": "+"}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    return {"type": annotation}


def _help(field: FieldInfo, required: bool) -> str:
    shown = not required and field.default not in (None, (), "") and not field.default_factory
    text = (field.description or "") + (f" (default: {field.default})" if shown else "")
    return text.replace("%", "%%")  # argparse formats help with %


def add_fields(parser: argparse.ArgumentParser, model: type[BaseModel], names: typing.Iterable[str],
               required: tuple[str, ...] = ()) -> None:
    """A flag for each named field of `model`, with the field's type, help and default. An absent flag sets
    nothing, so the config gets the field's own default."""
    for name in names:
        field = model.model_fields[name]
        extra = {"required": True} if name in required else {"default": argparse.SUPPRESS}
        options = _flag_options(field.annotation)
        if "choices" not in options and "metavar" not in options and "action" not in options:
            options["metavar"] = name.upper()  # the default would show the dest, which names the config too
        parser.add_argument(flag_name(name), dest=f"{model.__name__}.{name}",
                            help=_help(field, name in required), **options, **extra)


def flag_name(field: str) -> str:
    """The flag of a config field: its name with dashes, unless FLAG_NAMES says otherwise."""
    return FLAG_NAMES.get(field, "--" + field.replace("_", "-"))


def given(args: argparse.Namespace, model: type[BaseModel]) -> dict:
    """The fields of `model` that its flags set."""
    values = {name: getattr(args, f"{model.__name__}.{name}") for name in model.model_fields
              if hasattr(args, f"{model.__name__}.{name}")}
    return {name: dict(value) if typing.get_origin(model.model_fields[name].annotation) is dict else value
            for name, value in values.items()}  # Ray resources come as NAME=AMOUNT pairs


def add_engine_options(parser: argparse.ArgumentParser, config: type[EngineConfig], skip: tuple[str, ...]) -> None:
    """The fields of `config` and of its placement, as flags."""
    add_fields(parser, config, [n for n in config.model_fields if n not in ("model", "placement", *skip)])
    add_fields(parser, PlacementConfig, PlacementConfig.model_fields)


def engine_config(args: argparse.Namespace, config: type[EngineConfig], model: str) -> EngineConfig:
    return config(model=model, placement=PlacementConfig(**given(args, PlacementConfig)), **given(args, config))


def add_api_key_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--api-key-file", default=None, metavar="API_KEY_FILE",
                        help=f"file holding {what} ({API_KEY_FILE_DEFAULT})")


def add_ingress_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ingress", choices=INGRESSES, default=DEFAULT_INGRESS,
                        help="what takes the calls on the ports of the Ray cluster started here: Serve's proxy, "
                             "or HAProxy, passing each call straight to a front replica (a "
                             f"front's death ends its streams CANCELLED, not UNAVAILABLE; default: {DEFAULT_INGRESS})")


def add_port_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grpc-port", type=_port, default=GRPC_PORT, help=f"(default: {GRPC_PORT})")
    parser.add_argument("--http-port", type=_port, default=HTTP_PORT, help=f"(default: {HTTP_PORT})")


def check_ports(args: argparse.Namespace) -> None:
    if args.http_port == args.grpc_port:
        raise ValueError(f"--http-port: {args.http_port} is --grpc-port's too; the two proxies need a port each")


def resolve_model(model: str, weights: bool = True) -> str:
    from cluster.convert import resolve_model  # torch and huggingface_hub: only for the commands that need them

    return str(resolve_model(model, weights))


def open_checkpoint(model: str) -> tuple[str, SwitchCheckpoint]:
    """`model` as a checkpoint folder's absolute path (what the processes Ray starts read, wherever their working
    folder is; a link's own name kept, as the model's default id), and that checkpoint opened: a bad one fails
    here, naming the file, before anything starts."""
    folder = Path(resolve_model(model)).absolute()
    return str(folder), SwitchCheckpoint.open(folder)


def checkpoint_with_tokenizer(model: str, command: str) -> str:
    """`open_checkpoint`'s folder for a command that sends text prompts: one without a tokenizer is refused before
    anything starts (the server would refuse each prompt)."""
    folder, _ = open_checkpoint(model)
    if not has_tokenizer(folder):
        raise ValueError(f"--model: {folder} holds no tokenizer, and {command} sends text prompts")
    return folder


def free_ports(**ports: int) -> None:
    """Fail, naming the flag, where a port is taken (Ray would fail later, with a traceback)."""
    import socket

    for flag, port in ports.items():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: a port in TIME_WAIT is free
            try:
                s.bind(("", port))
            except OSError as e:
                raise ValueError(f"--{flag.replace('_', '-')}: port {port} is not free ({e.strerror})") from None


def cmd_generate(args: argparse.Namespace) -> None:
    prompts = args.text if args.text is not None else args.input_ids
    if args.text is None and (not isinstance(prompts, list) or not prompts or not all(
            isinstance(p, list) and all(type(t) is int for t in p) for p in prompts)):
        raise ValueError("--input-ids: must be a JSON list of lists of token ids, e.g. [[13, 7, 1]]")
    sampling = given(args, SamplingParams)
    if args.address is not None:
        from cluster.client import RemoteError, generate_remote

        local_only = [*given(args, EngineConfig), *given(args, PlacementConfig)]
        if local_only:
            flag = flag_name(local_only[0])
            raise ValueError(f"{flag}: sets up the cluster that --model starts; the server at --address has its "
                             "own")

        try:
            results = generate_remote(args.address, prompts, logprobs=args.logprobs,
                                      timeout=args.request_timeout_s or CLIENT_TIMEOUT_S,
                                      api_key=load_api_key(args.api_key_file), stop=args.stop, **sampling)
        except RemoteError as e:
            fail(str(e))
    else:  # argparse asks for --model or --address
        for flag, value in (("--request-timeout-s", args.request_timeout_s), ("--api-key-file", args.api_key_file)):
            if value is not None:
                raise ValueError(f"{flag}: for a call to a server (--address); the cluster --model starts takes none")
        folder, checkpoint = open_checkpoint(args.model)
        config = engine_config(args, EngineConfig, folder)
        # The cluster started here serves this request alone: its limit is the request's.
        config = config.model_copy(update={"max_new_tokens": max(config.max_new_tokens,
                                                                 sampling.get("max_new_tokens", 0))})
        # Checked before the cluster starts (minutes, for a large checkpoint), as the cluster checks them again.
        vocab = checkpoint.config.vocab_size
        make_sampling_params(vocab, config, **sampling)
        if args.text is None:
            for i, ids in enumerate(prompts):
                check_prompt(ids, vocab, config, f"input_ids[{i}]")
        else:
            from router_service.engine import load_tokenizer, text_prompt_ids

            tokenizer = load_tokenizer(folder, "texts")
            for i, text in enumerate(prompts):
                text_prompt_ids(tokenizer, text, vocab, config, f"texts[{i}]")
        stop = check_stop_strings(args.stop, has_tokenizer(folder))
        with stdout_for_json(args.json):
            results = generate_local(config, prompts, args.text is not None, args.logprobs, sampling, stop)
    if args.json:
        print(json.dumps({"outputs": results}))
        return
    for i, r in enumerate(results):
        shown = repr(r["text"]) if "text" in r else r["token_ids"]
        print(f"[{i}] {shown}  ({r['finish_reason']}, {len(r['token_ids'])} tokens, {r['dropped_tokens']} dropped)")
        if "logprobs" in r:
            print(f"    logprobs: {' '.join(f'{lp:.4f}' for lp in r['logprobs'])}")
        if "routing" in r:
            print(f"    routing: {json.dumps(r['routing'])}")


def generate_local(config: EngineConfig, prompts: list, as_text: bool, logprobs: bool, sampling: dict,
                   stop: tuple[str, ...]) -> list[dict]:
    """The answers, in the shape generate_remote gives them: with their text where the Python API gives it (prompts
    given as text, or stop strings)."""
    from router_service.engine import SwitchCluster

    with SwitchCluster(config) as model:
        inputs = {"texts": prompts} if as_text else {"input_ids": prompts}
        outputs = model.generate(**inputs, stop=stop, **sampling)
    return [o.to_dict(logprobs=logprobs) | ({"text": o.text} if o.text is not None else {}) for o in outputs]


def cmd_serve(args: argparse.Namespace) -> None:
    import signal
    import threading

    from cluster.app import EVERY_ADDRESS, check_placement, grpc_listens_on, local_serve
    from router_service.engine import load_tokenizer

    check_ports(args)
    if args.address is not None and args.ingress != DEFAULT_INGRESS:
        raise ValueError("--ingress: sets up the Ray cluster started here; a cluster joined with --address takes "
                         "RAY_SERVE_ENABLE_HA_PROXY=1 in the environment of every node instead")
    if args.ingress == "haproxy" and args.host not in (LOCAL_HTTP_HOST, *EVERY_ADDRESS):
        # Each front binds its own HTTP port to --host, and HAProxy calls it at the node's address (127.0.0.1 here).
        raise ValueError(f"--host: behind HAProxy, {LOCAL_HTTP_HOST} or every address ({' or '.join(EVERY_ADDRESS)}), "
                         f"got {args.host}: the fronts' own HTTP ports, bound to it, would be out of HAProxy's reach")
    if args.address is None:  # a cluster joined serves on its own nodes' ports, not this machine's
        free_ports(grpc_port=args.grpc_port, http_port=args.http_port)
    folder, checkpoint = open_checkpoint(args.model)
    if has_tokenizer(folder):  # a broken one fails here, naming its files, not as each front starts
        load_tokenizer(folder)
    config = engine_config(args, ServerConfig, folder)
    if config.served_model_name is None and not Path(args.model).exists():  # a Hub id, whose folder is a commit hash
        config = config.model_copy(update={"served_model_name": args.model})
    # Files the replicas read, wherever their working folder is.
    if config.api_key_file is not None:
        config = config.model_copy(update={"api_key_file": str(Path(config.api_key_file).resolve())})
    if config.placement.stats is not None:
        placement = config.placement.model_copy(update={"stats": str(Path(config.placement.stats).resolve())})
        config = config.model_copy(update={"placement": placement})
    for warning in check_placement(config, checkpoint.config, checkpoint.dtype_name):  # before anything starts
        print(f"switch-serve: warning: {warning}", file=sys.stderr)
    key = load_api_key(config.api_key_file)  # an unreadable or empty key file fails here
    grpc_host = grpc_listens_on(args.ingress, args.host)
    anyone = (f"anyone who can reach gRPC port {args.grpc_port} ({grpc_host}) or HTTP port {args.http_port} can "
              "call the model")
    if args.address is not None and config.api_key_file is None:
        print(f"switch-serve: warning: the replicas read ${API_KEY_ENV} on the nodes they run on, not here: where it "
              f"is not set there, {anyone}; --api-key-file (a file every node reads) makes sure", file=sys.stderr)
    elif key is None:
        print(f"switch-serve: warning: no API key, so {anyone}; set ${API_KEY_ENV} or --api-key-file", file=sys.stderr)
    stopping = threading.Event()
    with local_serve(config, http_host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                     address=args.address, dashboard=True, ingress=args.ingress):
        # After Ray has started: its own handler would end the process at once, cutting every request.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stopping.set())
        print(f"switch-serve: serving {args.model}\n"
              f"  gRPC  port {args.grpc_port}, {grpc_host}  (switchserve.v1.SwitchServe, grpc.health.v1.Health, "
              "reflection)\n"
              f"  HTTP  http://{args.host}:{args.http_port}/v1/generate, /v1/model, /v1/completions, /v1/embeddings, "
              "/v1/models\n"
              "Ctrl-C to stop.", flush=True)
        stopping.wait()
        print("switch-serve: stopping", flush=True)


def cmd_build(args: argparse.Namespace) -> None:
    import yaml

    from cluster.app import check_placement, serve_config

    check_ports(args)
    config = engine_config(args, ServerConfig, args.model)
    if args.config is not None:
        model_config, dtype = read_config(Path(args.config)), None
    elif (Path(args.model) / CONFIG_FILE).is_file():
        checkpoint = SwitchCheckpoint.open(args.model)
        model_config, dtype = checkpoint.config, checkpoint.dtype_name
    else:
        raise ValueError(f"--config: {args.model} is not a folder here; give its config.json to check the placement "
                         "(a Serve config names a folder every node reads: a Hub id is downloaded by serve and "
                         "generate alone)")
    for warning in check_placement(config, model_config, dtype):
        print(f"switch-serve: warning: {warning}", file=sys.stderr)
    text = yaml.safe_dump(serve_config(config, http_port=args.http_port, grpc_port=args.grpc_port), sort_keys=False)
    if args.output is None:
        print(text, end="")
    else:
        Path(args.output).write_text(text)


def cmd_plan(args: argparse.Namespace) -> None:
    folder = Path(resolve_model(args.model, weights=False)) if args.model is not None else None
    dtype = args.dtype
    if folder is not None and any((folder / name).is_file() for name in (SINGLE_FILE, INDEX_FILE)):
        checkpoint = SwitchCheckpoint.open(folder)  # the weights' tensor names checked against config.json
        config, dtype = checkpoint.config, checkpoint.served_dtype(dtype)  # as `serve` holds them
    else:  # config.json alone (a Hub id's is all that is downloaded)
        config = read_config(Path(args.config) if folder is None else folder / CONFIG_FILE)
    plan = PlacementConfig(**given(args, PlacementConfig)).plan(config, dtype or PLAN_DTYPE)
    for warning in plan.warnings:
        print(f"switch-serve: warning: {warning}", file=sys.stderr)
    summary = plan.to_json()
    if args.json:
        print(json.dumps(summary))
        return
    print(f"{summary['num_actors']} expert actors on {summary['num_gpus']} GPUs; "
          f"expert {plan.expert_bytes / 2**20:.1f} MiB, front {plan.front_bytes / 2**30:.2f} GiB; "
          f"fullest GPU {summary['max_gpu_bytes'] / 2**30:.1f} of {plan.budget_bytes / 2**30:.1f} GiB usable; "
          f"load imbalance {summary['load_imbalance']:.3f}; every expert fits on {plan.min_gpus} such GPUs")


def cmd_convert(args: argparse.Namespace) -> None:
    from cluster.convert import convert

    checkpoint = convert(args.src, args.dst)
    print(f"switch-serve: wrote {len(checkpoint.tensors)} tensors in "
          f"{len({t.file for t in checkpoint.tensors.values()})} safetensors files to {checkpoint.path}")


def cmd_stats(args: argparse.Namespace) -> None:
    from cluster.client import RemoteError, model_info
    from experts.plan import stats_json

    try:
        info = model_info(args.address, api_key=load_api_key(args.api_key_file))
    except RemoteError as e:
        fail(str(e))
    text = json.dumps(stats_json({(load.stack, load.layer): load.tokens for load in info.expert_tokens}))
    if args.output is None:
        print(text)
    else:
        Path(args.output).write_text(text + "\n")


def cmd_bench(args: argparse.Namespace) -> None:
    from cluster.bench import checkpoint, plot, print_report, run

    if not any(c <= args.requests for c in args.concurrency):
        raise ValueError(f"--concurrency: at least one must be at most --requests ({args.requests}), the run the "
                         "targets are measured at")
    if args.device == "cuda" and given(args, PlacementConfig):  # the GPUs' placement is cluster.bench.gpu_setup's
        raise ValueError("--experts-per-actor: packs experts for CPUs; with --device cuda two actors share a GPU")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device: cuda, but this machine's torch sees no CUDA GPU")
    if args.plot:  # before the checkpoint is written and the run of many minutes, not after them
        check_plot(args.plot)
    if args.model is not None:
        folder = Path(open_checkpoint(args.model)[0])
    else:
        folder = checkpoint(args.shape)
    options = given(args, PlacementConfig) | given(args, EngineConfig) | given(args, ServerConfig)
    with stdout_for_json(args.json):
        report = run(folder, args.workload or list(BENCH_WORKLOADS), args.concurrency, args.requests, options,
                     args.device, args.ingress)
    print_report(report, args.json)
    if args.plot:
        plot(report, args.plot)


def stdout_for_json(as_json: bool) -> contextlib.AbstractContextManager:
    """With --json, what is printed meanwhile (Ray's word of an actor's task retried as a cluster stops, say) goes to
    stderr: stdout is the one JSON object, for a pipe or a file."""
    return contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()


def check_plot(path: str) -> None:
    """Refuse a plot that could not be drawn, or saved where asked."""
    try:
        import matplotlib  # noqa: F401 (an optional dependency)
    except ImportError:
        raise ValueError("--plot: needs matplotlib: .venv/bin/pip install -e '.[bench]'") from None


def cmd_quality(args: argparse.Namespace) -> None:
    from cluster.quality import print_report, run

    with stdout_for_json(args.json):
        report = run(args.shape, args.requests, demo=not args.no_demo)
    print_report(report, args.json)


def cmd_soak(args: argparse.Namespace) -> None:
    from cluster.soak import main

    if args.chaos_every is not None and not args.chaos:
        raise ValueError("--chaos-every: sets how often --chaos injects faults; without --chaos there are none")
    if args.chaos_every is not None and args.chaos_every[0] > args.chaos_every[1]:
        raise ValueError(f"--chaos-every: MIN_S {args.chaos_every[0]:g} is more than MAX_S {args.chaos_every[1]:g}")
    model = args.model and checkpoint_with_tokenizer(args.model, "soak")
    sys.exit(main(model, args.duration, args.concurrency, tuple(args.chaos_every or CHAOS_EVERY_S) if args.chaos
                  else None, args.replicas, args.nodes))


def cmd_demo(args: argparse.Namespace) -> None:
    from cluster.demo import DEMO_MODEL, PROMPTS, run_demo

    right = run_demo(checkpoint_with_tokenizer(args.model, "demo") if args.model else DEMO_MODEL,
                     **given(args, PlacementConfig))
    if args.model is None and right < len(PROMPTS):  # another model was not trained on the demo's tasks
        fail(f"the demo model answered {right} of its {len(PROMPTS)} requests right")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switch-serve", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate for a batch of prompts, on a local Ray cluster or a server",
                       description="Generate for a batch of prompts. With --model: start a local Ray cluster on "
                                   "the checkpoint; with --address: call a running server over gRPC.")
    target = g.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", help="checkpoint folder (config.json + safetensors) or Hugging Face Hub id")
    target.add_argument("--address", metavar="HOST:PORT", help="gRPC address of a running `switch-serve serve`")
    inputs = g.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--input-ids", type=_json_ids, metavar="JSON",
                        help="prompts as a JSON list of lists of token ids")
    inputs.add_argument("--text", nargs="+", metavar="TEXT", help="prompts as text (uses the checkpoint's tokenizer)")
    # The alternatives' log-probabilities are the OpenAI API's (its `logprobs`); the gRPC API does not carry them.
    add_fields(g, SamplingParams, [name for name in SamplingParams.model_fields if name != "top_logprobs"])
    g.add_argument("--stop", action="append", metavar="TEXT",
                   help="end each answer before this text (repeat for several; needs the checkpoint's tokenizer)")
    g.add_argument("--logprobs", action="store_true", help="include each chosen token's log-probability")
    g.add_argument("--json", action="store_true", help="print one JSON object {\"outputs\": [...]}")
    add_api_key_option(g, "the API key of the server at --address")
    g.add_argument("--request-timeout-s", type=_seconds, default=None, metavar="S",
                   help="with --address: the most the calls take, retries of those refused or cut by a server's "
                        f"failure included (default: {CLIENT_TIMEOUT_S:g})")
    add_engine_options(g, EngineConfig, skip=("max_new_tokens",))  # --max-new-tokens is the request's
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="serve a checkpoint over gRPC and HTTP until interrupted")
    s.add_argument("--model", required=True, help="checkpoint folder readable from every node, or Hub id")
    add_port_options(s)
    s.add_argument("--host", default=LOCAL_HTTP_HOST, help=f"HTTP bind address (default: {LOCAL_HTTP_HOST}); Serve's "
                                                        "proxy takes gRPC on every address, HAProxy (--ingress "
                                                        f"haproxy) here too, and takes {LOCAL_HTTP_HOST} or every "
                                                        "address (0.0.0.0, ::) alone")
    s.add_argument("--address", default=None, help="Ray cluster to join (default: start a local one)")
    add_ingress_option(s)
    add_engine_options(s, ServerConfig, skip=())
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("build", help="write the Serve config of an app (serve deploy FILE, a RayService's "
                                     "serveConfigV2)")
    b.add_argument("--model", required=True, help="checkpoint folder as the Ray cluster's nodes see it")
    b.add_argument("--config", type=_file, default=None,
                   help="that checkpoint's config.json on this machine, to check that the placement fits (default: "
                        "--model's, when it is here)")
    add_port_options(b)
    b.add_argument("-o", "--output", type=_output, default=None, help="file to write (default: print)")
    add_engine_options(b, ServerConfig, skip=())
    b.set_defaults(func=cmd_build)

    p = sub.add_parser("plan", help="place every expert on a GPU within a memory budget (no weights needed)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint folder or Hugging Face Hub id")
    source.add_argument("--config", type=_file, help="a config.json alone")
    # Its own --gpus: the field's help speaks of 0 (CPU actors), which a plan over GPUs does not take.
    p.add_argument("--gpus", type=_positive, required=True, dest="PlacementConfig.gpus", metavar="GPUS",
                   help="GPUs to plan the experts over")
    add_fields(p, PlacementConfig, PLANNER_FIELDS)
    p.add_argument("--dtype", choices=EXPERT_FORMATS, default=None,
                   help=f"what the experts are held in; int8: quantized, the front in {PLAN_DTYPE} (default: the "
                        f"checkpoint's own where --model has its weights, as `serve` holds them; else {PLAN_DTYPE})")
    p.add_argument("--json", action="store_true", help="print the whole plan as JSON")
    p.set_defaults(func=cmd_plan)

    c = sub.add_parser("convert", help="convert a .bin checkpoint (one file or shards with an index) to safetensors")
    c.add_argument("src", help="folder with config.json and pytorch_model*.bin")
    c.add_argument("dst", help="folder to create")
    c.set_defaults(func=cmd_convert)

    t = sub.add_parser("stats", help="write a running server's tokens per expert, for `plan --stats`")
    t.add_argument("--address", required=True, metavar="HOST:PORT", help="gRPC address of the server")
    t.add_argument("-o", "--output", type=_output, default=None, help="file to write (default: print)")
    add_api_key_option(t, "the server's API key")
    t.set_defaults(func=cmd_stats)

    n = sub.add_parser("bench", help="benchmark the served cluster against transformers' generate")
    model = n.add_mutually_exclusive_group()
    model.add_argument("--shape", choices=SHAPES, default=BENCH_SHAPE,
                       help="a built-in shape with random float32 weights: base-8 is switch-base-8's, tiny a quick run "
                            "(default: %(default)s)")
    model.add_argument("--model", default=None, help="a checkpoint folder to benchmark instead")
    n.add_argument("--workload", choices=WORKLOADS, action="append",
                   help=f"prompt and output lengths (repeatable; default: {' and '.join(BENCH_WORKLOADS)})")
    n.add_argument("--concurrency", type=_int_list, default=CONCURRENCY, metavar="C,C,...",
                   help=f"concurrent requests, one run each (default: {','.join(map(str, CONCURRENCY))})")
    n.add_argument("--requests", type=_positive, default=REQUESTS,
                   help=f"requests per workload (default: {REQUESTS}); a concurrency above it runs as many as it "
                        "keeps in flight")
    n.add_argument("--plot", type=_output, default=None, metavar="FILE.png",
                   help="draw tokens/s against concurrency (needs matplotlib: pip install '.[bench]')")
    add_fields(n, PlacementConfig, ["experts_per_actor"])
    add_fields(n, EngineConfig, ["dtype", "micro_batches", "local_experts", "packed_weights", "quantize"])
    add_fields(n, ServerConfig, ["front_threads", "stream_interval_ms", "stream_chunks_per_s"])
    n.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="run transformers, the front and the expert actors on the CPU (default) or the GPUs")
    add_ingress_option(n)
    n.add_argument("--json", action="store_true")
    n.set_defaults(func=cmd_bench)

    q = sub.add_parser("quality", help="what int8 experts change: the demo model's held-out accuracy and answers, "
                                       "and log-probabilities on a built-in shape, against float32")
    q.add_argument("--shape", choices=SHAPES, default=BENCH_SHAPE, help="the built-in shape to measure (default: "
                                                                       "%(default)s)")
    q.add_argument("--requests", type=_positive, default=16,
                   help="requests of the default workload (default: %(default)s)")
    q.add_argument("--no-demo", action="store_true", help="skip the demo model")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_quality)

    k = sub.add_parser("soak", help="serve a checkpoint locally under mixed load, optionally killing its processes, "
                                    "and check every answer")
    k.add_argument("--model", default=None, help="checkpoint with a tokenizer (default: the demo model)")
    k.add_argument("--duration", type=_seconds, default=600.0, help="seconds of load (default: %(default)g)")
    k.add_argument("--concurrency", type=_positive, default=8, help="requests in flight at once (default: %(default)s)")
    k.add_argument("--replicas", type=_positive, default=2, help="front replicas (default: %(default)s)")
    k.add_argument("--nodes", type=_count, default=0,
                   help="run on a Ray cluster of raylets on this machine: a head for the fronts and the fleet, and "
                        "this many workers for the expert actors (default: %(default)s, one local Ray node)")
    k.add_argument("--chaos", action="store_true", help="kill an expert actor, the expert fleet and a front replica "
                                                        "in turn, at random times; with --nodes, replace a worker "
                                                        "node as well")
    k.add_argument("--chaos-every", type=_seconds, nargs=2, default=None, metavar=("MIN_S", "MAX_S"),
                   help=f"with --chaos: seconds between faults, drawn between these (default: "
                        f"{' '.join(f'{s:g}' for s in CHAOS_EVERY_S)})")
    k.set_defaults(func=cmd_soak)

    d = sub.add_parser("demo", help="serve the demo checkpoint, call it over gRPC, print the answers")
    d.add_argument("--model", default=None, help="checkpoint to serve (default: the trained demo model in demo/model)")
    add_fields(d, PlacementConfig, ["experts_per_actor"])
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValidationError as e:  # a bad option or combination, e.g. --replicate-hot without --gpus
        first = e.errors()[0]
        where = "".join(f"{part}: " for part in first["loc"][-1:])
        fail(f"{where}{first['msg'].removeprefix('Value error, ')}")
    except (ValueError, PlacementError) as e:  # a bad checkpoint, plan or request: the message names the field
        fail(str(e))
    except OSError as e:  # a file named by a flag that is not there or cannot be read
        fail(str(e))


if __name__ == "__main__":
    main()
