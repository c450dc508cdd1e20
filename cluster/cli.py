"""The `switch-serve` command line."""

from __future__ import annotations

import argparse
import json
import sys

from cluster.checkpoint import CheckpointError
from router_service.model import CAPACITY_MODES


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_cluster_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experts-per-actor", type=_positive_int, default=1, metavar="K",
                   help="expert indices packed into one actor (default 1: one actor per expert index)")
    p.add_argument("--capacity", choices=CAPACITY_MODES, default="hf",
                   help="hf: transformers' per-sequence expert capacity, tokens over it are dropped (default); "
                        "dropless: never drop a token")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: start a local one)")


def _parse_input_ids(text: str) -> list[list[int]]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, list) or not all(isinstance(ids, list) for ids in value):
        raise argparse.ArgumentTypeError("must be a JSON list of lists of token ids, e.g. [[13, 7, 1]]")
    return value


def cmd_generate(args: argparse.Namespace) -> None:
    from cluster.engine import SwitchCluster

    with SwitchCluster(args.model, experts_per_actor=args.experts_per_actor, capacity=args.capacity,
                       address=args.address) as model:
        if args.text is not None:
            outputs = model.generate(texts=args.text, max_new_tokens=args.max_new_tokens)
        else:
            outputs = model.generate(args.input_ids, max_new_tokens=args.max_new_tokens)
        texts = [model.decode(o.token_ids) for o in outputs] if args.text is not None else None
    results = [o.to_dict(logprobs=args.logprobs) for o in outputs]
    for i, text in enumerate(texts or []):
        results[i]["text"] = text
    if args.json:
        print(json.dumps({"outputs": results}))
        return
    for i, r in enumerate(results):
        shown = repr(r["text"]) if "text" in r else r["token_ids"]
        print(f"[{i}] {shown}  ({r['finish_reason']}, {len(r['token_ids'])} tokens, "
              f"{r['dropped_tokens']} dropped)")


def cmd_demo(args: argparse.Namespace) -> None:
    from cluster.demo import run_demo

    run_demo(args.model, experts_per_actor=args.experts_per_actor)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switch-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate greedily for a batch of prompts on a local Ray cluster")
    g.add_argument("--model", required=True, help="checkpoint folder (config.json + safetensors)")
    inputs = g.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--input-ids", type=_parse_input_ids, metavar="JSON",
                        help="prompts as a JSON list of lists of token ids")
    inputs.add_argument("--text", nargs="+", metavar="TEXT", help="prompts as text (uses the checkpoint's tokenizer)")
    g.add_argument("--max-new-tokens", type=_positive_int, default=32, metavar="N")
    g.add_argument("--logprobs", action="store_true", help="include each chosen token's log-probability")
    g.add_argument("--json", action="store_true", help="print one JSON object {\"outputs\": [...]}")
    _add_cluster_options(g)
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="build a small demo checkpoint if needed, serve it, generate, show expert load")
    d.add_argument("--model", default="build/demo-model", help="where the demo checkpoint lives")
    d.add_argument("--experts-per-actor", type=_positive_int, default=2, metavar="K")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CheckpointError, ValueError) as e:
        print(f"switch-serve: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
