"""The `switch-serve` command line."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from pydantic import ValidationError

from cluster.checkpoint import CheckpointError, SwitchCheckpoint
from cluster.client import RemoteError, generate_remote, model_info
from cluster.convert import convert, resolve_model
from cluster.placement import PlacementConfig, PlacementError
from experts.actor import DTYPES
from router_service.auth import API_KEY_ENV, load_api_key
from router_service.model import CAPACITY_MODES


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _json_ids(text: str) -> list:
    try:
        return json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None


def _add_planner_options(p: argparse.ArgumentParser, gpus_required: bool) -> None:
    p.add_argument("--gpus", type=_positive_int if gpus_required else int, required=gpus_required,
                   default=None if gpus_required else 0,
                   help="GPUs to plan the experts over" + ("" if gpus_required else " (default 0: CPU actors)"))
    p.add_argument("--gpu-memory", default="80GiB", help="per GPU (default 80GiB; 10%% is kept for activations)")
    p.add_argument("--nodes", type=_positive_int, default=1, help="spread evenly over this many Ray nodes")
    p.add_argument("--replicate-hot", type=int, default=0, metavar="K", help="give the K busiest experts a replica")
    p.add_argument("--stats", help="token counts per expert (`switch-serve stats`) to balance the load by")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experts-per-actor", type=_positive_int, default=None, metavar="K",
                   help="without GPUs: expert indices packed into one actor (default: one actor per CPU of the "
                        "--nodes largest Ray nodes)")
    _add_planner_options(p, gpus_required=False)
    p.add_argument("--actors-per-gpu", type=_positive_int, default=1, help="actors sharing each GPU (default 1)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: the checkpoint's")
    p.add_argument("--micro-batches", type=_positive_int, default=1,
                   help="split each batch into this many parts, so that one part's front math runs while "
                        "another's expert calls are out (default 1)")
    p.add_argument("--capacity", choices=CAPACITY_MODES, default="hf",
                   help="hf: transformers' per-sequence expert capacity, tokens over it are dropped (default); "
                        "dropless: never drop a token")


def _placement(args: argparse.Namespace) -> PlacementConfig:
    return PlacementConfig(experts_per_actor=args.experts_per_actor, gpus=args.gpus, nodes=args.nodes,
                           gpu_memory=args.gpu_memory, actors_per_gpu=args.actors_per_gpu,
                           replicate_hot=args.replicate_hot, stats=args.stats,
                           actor_resources=dict(getattr(args, "actor_resource", None) or []))


def _resource(text: str) -> tuple[str, float]:
    name, _, amount = text.partition("=")
    try:
        return name, float(amount)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=AMOUNT, got {text!r}") from None


def _add_api_key_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--api-key-file", default=None, metavar="FILE",
                   help=f"{what} (default: ${API_KEY_ENV}, if set)")


def _add_server_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replicas", type=_positive_int, default=1, help="front replicas (they share the experts)")
    p.add_argument("--front-gpus", type=float, default=0.0, help="GPUs each front replica asks for (default 0)")
    p.add_argument("--front-threads", type=_positive_int, default=None,
                   help="CPU threads of each front replica's math (default: the CPUs Ray counts on its node)")
    p.add_argument("--actor-resource", type=_resource, action="append", metavar="NAME=AMOUNT",
                   help="a Ray resource each expert actor asks for, e.g. a GPU worker group's (repeatable)")
    p.add_argument("--max-sequences", type=_positive_int, default=32, help="sequences decoding together per replica")
    p.add_argument("--max-waiting", type=int, default=64, help="requests queued per replica before RESOURCE_EXHAUSTED")
    p.add_argument("--max-prompt-tokens", type=_positive_int, default=512)
    p.add_argument("--max-new-tokens", type=_positive_int, default=256, help="the most a request may ask for")
    _add_api_key_option(p, "every call but the health check must present this key")
    _add_model_options(p)


def _server_config(args: argparse.Namespace, model: str):
    from router_service.server import ServerConfig

    return ServerConfig(model=model, placement=_placement(args), dtype=args.dtype, capacity=args.capacity,
                        micro_batches=args.micro_batches,
                        front_gpus=args.front_gpus, front_threads=args.front_threads,
                        max_prompt_tokens=args.max_prompt_tokens,
                        max_new_tokens=args.max_new_tokens, max_sequences=args.max_sequences,
                        max_waiting=args.max_waiting, num_replicas=args.replicas, api_key_file=args.api_key_file)


def _sampling(args: argparse.Namespace) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "seed": args.seed, "stop_token_ids": args.stop_token_ids or ()}


def cmd_generate(args: argparse.Namespace) -> None:
    prompts = args.text if args.text is not None else args.input_ids
    if args.text is None and (not isinstance(prompts, list) or not all(isinstance(p, list) for p in prompts)):
        raise ValueError("--input-ids: must be a JSON list of lists of token ids, e.g. [[13, 7, 1]]")
    if args.address is not None:
        results = generate_remote(args.address, prompts, logprobs=args.logprobs,
                                  api_key=load_api_key(args.api_key_file), **_sampling(args))
    else:
        if args.model is None:
            raise ValueError("--model: needed unless --address names a running server")
        results = generate_local(args, prompts)
    if args.json:
        print(json.dumps({"outputs": results}))
        return
    for i, r in enumerate(results):
        shown = repr(r["text"]) if "text" in r else r["token_ids"]
        print(f"[{i}] {shown}  ({r['finish_reason']}, {len(r['token_ids'])} tokens, {r['dropped_tokens']} dropped)")


def generate_local(args: argparse.Namespace, prompts: list) -> list[dict]:
    from cluster.engine import SwitchCluster

    with SwitchCluster(args.model, placement=_placement(args), dtype=args.dtype, capacity=args.capacity,
                       micro_batches=args.micro_batches) as model:
        if args.text is not None:
            outputs = model.generate(texts=prompts, **_sampling(args))
        else:
            outputs = model.generate(prompts, **_sampling(args))
        results = [o.to_dict(logprobs=args.logprobs) for o in outputs]
        if args.text is not None:
            for r, o in zip(results, outputs):
                r["text"] = model.decode(o.token_ids)
    return results


def cmd_serve(args: argparse.Namespace) -> None:
    import logging

    import ray

    from cluster import app
    from router_service.server import ServerConfig

    model = str(resolve_model(args.model))
    if args.api_key_file is not None:
        args.api_key_file = str(Path(args.api_key_file).resolve())  # the replicas run elsewhere
    load_api_key(args.api_key_file)  # an unreadable or empty key file fails here
    config = _server_config(args, model)
    SwitchCheckpoint.open(model)  # a bad checkpoint fails here, before anything starts
    ray.init(address=args.address, logging_level=logging.WARNING)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        app.start(config, http_host=args.host, http_port=args.http_port, grpc_port=args.grpc_port)
        print(f"switch-serve: serving {args.model}\n"
              f"  gRPC  {args.host}:{args.grpc_port}  (switchserve.v1.SwitchServe, grpc.health.v1.Health, reflection)\n"
              f"  HTTP  http://{args.host}:{args.http_port}/v1/generate, /v1/model\n"
              "Ctrl-C to stop.", flush=True)
        stopping.wait()
        print("switch-serve: stopping", flush=True)
        app.stop(config)
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def cmd_build(args: argparse.Namespace) -> None:
    import yaml
    from transformers import SwitchTransformersConfig

    from cluster import app

    config = _server_config(args, args.model)
    if args.config is not None:
        model_config = SwitchTransformersConfig.from_json_file(args.config)
    elif (Path(args.model) / "config.json").is_file():
        model_config = SwitchCheckpoint.open(args.model).config
    else:
        raise ValueError(f"--config: {args.model} is not a folder here; give its config.json to check the placement")
    for warning in app.check_placement(config, model_config):
        print(f"switch-serve: warning: {warning}", file=sys.stderr)
    text = yaml.safe_dump(app.serve_config(config, http_port=args.http_port, grpc_port=args.grpc_port),
                          sort_keys=False)
    if args.output is None:
        print(text, end="")
    else:
        Path(args.output).write_text(text)


def cmd_plan(args: argparse.Namespace) -> None:
    from transformers import SwitchTransformersConfig

    from cluster.plan import make_plan, parse_bytes, read_stats

    if args.model is not None:
        config = SwitchCheckpoint.open(resolve_model(args.model)).config
    else:
        config = SwitchTransformersConfig.from_json_file(args.config)
    plan = make_plan(config, gpus=args.gpus, gpu_memory=parse_bytes(args.gpu_memory), nodes=args.nodes,
                     dtype=args.dtype, replicate_hot=args.replicate_hot,
                     stats=read_stats(args.stats) if args.stats else None)
    for warning in plan.warnings:
        print(f"switch-serve: warning: {warning}", file=sys.stderr)
    summary = plan.to_json()
    if args.json:
        print(json.dumps(summary))
        return
    print(f"{summary['num_actors']} expert actors on {summary['num_gpus']} GPUs; expert {plan.expert_bytes / 2**20:.1f} "
          f"MiB, front {plan.front_bytes / 2**30:.2f} GiB; fullest GPU {summary['max_gpu_bytes'] / 2**30:.1f} of "
          f"{plan.budget_bytes / 2**30:.1f} GiB usable; load imbalance {summary['load_imbalance']:.3f}")


def cmd_convert(args: argparse.Namespace) -> None:
    checkpoint = convert(args.src, args.dst)
    print(f"switch-serve: wrote {len(checkpoint.tensors)} tensors in "
          f"{len({t.file for t in checkpoint.tensors.values()})} safetensors files to {checkpoint.path}")


def cmd_stats(args: argparse.Namespace) -> None:
    from cluster.plan import stats_json

    info = model_info(args.address, api_key=load_api_key(args.api_key_file))
    text = json.dumps(stats_json({(load.stack, load.layer): load.tokens for load in info.expert_tokens}))
    if args.output is None:
        print(text)
    else:
        with open(args.output, "w") as f:
            f.write(text + "\n")


def cmd_bench(args: argparse.Namespace) -> None:
    from cluster.bench import print_report, run

    print_report(run(args.shape, args.requests, args.rate, args.batch_size, args.experts_per_actor,
                     args.micro_batches), args.json)


def cmd_demo(args: argparse.Namespace) -> None:
    from cluster.demo import DEMO_MODEL, run_demo

    run_demo(args.model or DEMO_MODEL, experts_per_actor=args.experts_per_actor)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switch-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate for a batch of prompts, on a local Ray cluster or a server",
                       description="Generate for a batch of prompts. With --model: start a local Ray cluster on "
                                   "the checkpoint; with --address: call a running server over gRPC.")
    target = g.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", help="checkpoint folder (config.json + safetensors) or Hugging Face Hub id")
    target.add_argument("--address", metavar="HOST:PORT", help="gRPC address of a running `switch-serve serve`")
    inputs = g.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--input-ids", type=_json_ids, metavar="JSON", help="prompts as a JSON list of lists of token ids")
    inputs.add_argument("--text", nargs="+", metavar="TEXT", help="prompts as text (uses the checkpoint's tokenizer)")
    g.add_argument("--max-new-tokens", type=int, default=None, metavar="N", help="default 32")
    g.add_argument("--temperature", type=float, default=None, help="0 (default): greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    g.add_argument("--stop-token-ids", type=int, nargs="+", default=None, metavar="ID")
    g.add_argument("--logprobs", action="store_true", help="include each chosen token's log-probability")
    g.add_argument("--json", action="store_true", help="print one JSON object {\"outputs\": [...]}")
    _add_api_key_option(g, "with --address: the server's API key")
    _add_model_options(g)
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="serve a checkpoint over gRPC and HTTP until interrupted")
    s.add_argument("--model", required=True, help="checkpoint folder readable from every node, or Hub id")
    s.add_argument("--grpc-port", type=int, default=9000)
    s.add_argument("--http-port", type=int, default=8000)
    s.add_argument("--host", default="127.0.0.1", help="HTTP bind address (gRPC listens on all addresses)")
    s.add_argument("--address", default=None, help="Ray cluster to join (default: start a local one)")
    _add_server_options(s)
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("build", help="write the Serve config of an app (serve deploy FILE, a RayService's "
                                     "serveConfigV2)")
    b.add_argument("--model", required=True, help="checkpoint folder as the Ray cluster's nodes see it")
    b.add_argument("--config", default=None, help="that checkpoint's config.json on this machine, to check that "
                                                  "the placement fits (default: --model's, when it is here)")
    b.add_argument("--grpc-port", type=int, default=9000)
    b.add_argument("--http-port", type=int, default=8000)
    b.add_argument("-o", "--output", default=None, help="file to write (default: print)")
    _add_server_options(b)
    b.set_defaults(func=cmd_build)

    p = sub.add_parser("plan", help="place every expert on a GPU within a memory budget (no weights needed)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint folder or Hugging Face Hub id")
    source.add_argument("--config", help="a config.json alone")
    _add_planner_options(p, gpus_required=True)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--json", action="store_true", help="print the whole plan as JSON")
    p.set_defaults(func=cmd_plan)

    c = sub.add_parser("convert", help="convert a .bin checkpoint (one file or shards with an index) to safetensors")
    c.add_argument("src", help="folder with config.json and pytorch_model*.bin")
    c.add_argument("dst", help="folder to create")
    c.set_defaults(func=cmd_convert)

    t = sub.add_parser("stats", help="write a running server's tokens per expert, for `plan --stats`")
    t.add_argument("--address", required=True, metavar="HOST:PORT", help="gRPC address of the server")
    t.add_argument("-o", "--output", default=None, help="file to write (default: print)")
    _add_api_key_option(t, "the server's API key")
    t.set_defaults(func=cmd_stats)

    n = sub.add_parser("bench", help="benchmark the served cluster against transformers' generate")
    n.add_argument("--shape", choices=("base-8", "tiny"), default="base-8",
                   help="base-8: switch-base-8's shape (default); tiny: a quick run")
    n.add_argument("--requests", type=_positive_int, default=32)
    n.add_argument("--rate", type=float, default=None, help="arrivals per second (default: all at once)")
    n.add_argument("--batch-size", type=_positive_int, default=8, help="transformers' static batch size")
    n.add_argument("--experts-per-actor", type=_positive_int, default=None,
                   help="default: one actor per CPU of this machine")
    n.add_argument("--micro-batches", type=_positive_int, default=1, help="the cluster's (default 1)")
    n.add_argument("--json", action="store_true")
    n.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="serve the demo checkpoint, call it over gRPC, print the answers")
    d.add_argument("--model", default=None, help="checkpoint to serve (default: the trained demo model in demo/model)")
    d.add_argument("--experts-per-actor", type=_positive_int, default=None, metavar="K",
                   help="default: one actor per CPU of this machine")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValidationError as e:  # a bad option combination, e.g. --replicate-hot without --gpus
        first = e.errors()[0]
        where = "".join(f"{part}: " for part in first["loc"][:1])
        print(f"switch-serve: error: {where}{first['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        sys.exit(2)
    except (CheckpointError, ValueError, RemoteError, PlacementError) as e:
        print(f"switch-serve: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
