"""Helpers for tests, the benchmark and the soak run: small randomly initialised Switch checkpoints written by
transformers itself, free ports, the memory of running processes, the replicas Serve runs, waits on a server and
percentiles."""

from __future__ import annotations

import math
import os
import random
import socket
import time
from pathlib import Path

import torch
from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

TINY = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=4, num_decoder_layers=4,
            num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, num_experts=4, expert_capacity=64,
            decoder_start_token_id=0)


def word_tokenizer(words: list[str]):
    """A whitespace word-level tokenizer with T5's special ids (pad 0, eos 1, unk 2) that appends </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def write_random_checkpoint_with_tokenizer(path: str | os.PathLike, words: list[str], **overrides):
    """A random model over a word-level vocabulary, with its tokenizer saved beside it, so text goes in and out."""
    tokenizer = word_tokenizer(words)
    tokenizer.save_pretrained(path)
    config = tiny_config(**{"vocab_size": len(tokenizer), "d_model": 64, "d_ff": 128, "num_experts": 8,
                            "expert_capacity": 4, **overrides})
    return write_random_checkpoint(path, config, max_shard_size="100KB")


# Text for a small SentencePiece model: multi-byte characters (2, 3 bytes), words split into several pieces.
T5_CORPUS = ["The capital of France is Paris.", "Berlin is the capital of Germany.", "Grüße aus Zürich!",
             "東京は日本の首都です。", "Ünïcödé wörds and café crème.", "A quick brown fox jumps over the lazy dog.",
             "Snowman ☃ and music ♫ in Kraków."]


def write_t5_tokenizer(path: str | os.PathLike, extra_ids: int = 100):
    """T5's tokenizer over a small SentencePiece unigram model trained here (pad 0, eos 1, unk 2, as T5's), with
    T5's `extra_ids` sentinels <extra_id_N>, saved in `path` as transformers saves it; returns it."""
    import sentencepiece
    from transformers import T5Tokenizer

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(T5_CORPUS * 20), model_prefix=str(Path(path) / "spiece"), vocab_size=200,
        hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        character_coverage=1.0, minloglevel=2)
    (Path(path) / "spiece.vocab").unlink()
    tokenizer = T5Tokenizer.from_pretrained(path, extra_ids=extra_ids)
    tokenizer.save_pretrained(path)
    return tokenizer


def tiny_config(**overrides) -> SwitchTransformersConfig:
    return SwitchTransformersConfig(**{**TINY, **overrides})


def write_random_checkpoint(path: str | os.PathLike, config: SwitchTransformersConfig, seed: int = 0,
                            max_shard_size: str | None = None) -> SwitchTransformersForConditionalGeneration:
    """Save a randomly initialised model (safetensors; sharded when max_shard_size is given); return it."""
    torch.manual_seed(seed)
    model = SwitchTransformersForConditionalGeneration(config).eval()
    with torch.no_grad():
        # transformers' own init makes tiny models emit one token forever; spread the weights out so that
        # outputs vary with the prompt and parity tests compare something.
        for name, param in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, param.shape[-1] ** -0.5 if param.dim() > 1 else 1.0)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(Path(path), **kwargs)
    return model


def free_port() -> int:
    """A port free on all addresses, chosen between Ray's worker ports (10002-19999) and the kernel's
    ephemeral range, so that processes starting meanwhile are unlikely to take it first."""
    while True:
        port = random.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port


def replica_class(app: str, deployment: str) -> str:
    """The Ray actor class of a deployment's replicas (`ray::` and this name their processes)."""
    return f"ServeReplica:{app}:{deployment}"


def serve_actor_names(prefix: str) -> list[str]:
    """The live named actors of Serve's namespace whose names start with `prefix`."""
    import ray
    from ray.serve._private.constants import SERVE_NAMESPACE

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == SERVE_NAMESPACE and a["name"].startswith(prefix))


def replica_names(app: str, deployment: str) -> list[str]:
    """The named actors (namespace "serve") Serve runs a deployment's live replicas in."""
    return serve_actor_names(f"SERVE_REPLICA::{app}#{deployment}#")


def busiest_replica(app: str, deployment: str):
    """The actor of the deployment's live replica with the most requests under way (one, where it carries any)."""
    import ray

    replicas = [ray.get_actor(name, namespace="serve") for name in replica_names(app, deployment)]
    carried = ray.get([replica.get_num_ongoing_requests.remote() for replica in replicas], timeout=60)
    assert max(carried) > 0, f"no replica carries a request: {carried}"
    return replicas[carried.index(max(carried))]


def wait_until_decoding(stub, timeout_s: float = 60.0) -> None:
    """Until a front replica says it decodes a sequence (ModelInfo's active_sequences); fails after `timeout_s`."""
    from router_service.proto import switch_serve_pb2 as pb

    deadline = time.monotonic() + timeout_s
    while stub.ModelInfo(pb.ModelInfoRequest(), timeout=30).active_sequences == 0:
        assert time.monotonic() < deadline, f"no request reached a batch within {timeout_s:g} s"
        time.sleep(0.01)


def serve_controller():
    """The running Serve controller's actor."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    return ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)


def serve_proxies() -> list:
    """The running Serve proxies' actors, one per node."""
    import ray
    from ray.serve._private.constants import SERVE_NAMESPACE, SERVE_PROXY_NAME

    return [ray.get_actor(name, namespace=SERVE_NAMESPACE) for name in serve_actor_names(SERVE_PROXY_NAME)]


def serve_constant(actor, name: str):
    """One of Serve's settings (ray.serve._private.constants) as the Serve process of `actor` (its controller, a
    proxy or a replica) read it when it started."""
    import ray

    def read(_):
        from ray.serve._private import constants
        return getattr(constants, name)

    return ray.get(actor.__ray_call__.remote(read), timeout=60)


def processes(*patterns: str) -> list[Path]:
    """The /proc folders of the processes on this machine whose command line holds one of `patterns` (Linux)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # not a process, or gone
            continue
        if any(p in cmdline for p in patterns):
            found.append(proc)
    return found


def resident_memory(*patterns: str) -> int:
    """Resident memory, in bytes, of the processes on this machine whose command line holds one of `patterns`
    (Linux /proc)."""
    total = 0
    for proc in processes(*patterns):
        try:
            rss = next(line for line in (proc / "status").read_text().splitlines() if line.startswith("VmRSS:"))
            total += int(rss.split()[1]) * 1024
        except (OSError, StopIteration, ValueError):  # gone, or a kernel thread
            continue
    return total


def environment(proc: Path) -> dict[str, str]:
    """The environment a process started with (its /proc folder's `environ`)."""
    pairs = (proc / "environ").read_bytes().decode(errors="replace").split("\0")
    return dict(pair.split("=", 1) for pair in pairs if "=" in pair)


def finish_streams(streams, tokens: list | None = None) -> tuple[list[str], set[str]]:
    """Read each gRPC stream of GenerateChunks to its end: each one's outcome ("OK", "CUT" for a stream that ended
    without a status but before its last chunk, or its status code's name), and the first lines of the errors'
    messages; into `tokens`, where given, each stream's token ids (those read since the caller's last `next`; None
    for one that failed)."""
    import grpc

    outcomes, details = [], set()
    for stream in streams:
        try:
            chunks = list(stream)
            outcomes.append("OK" if chunks and chunks[-1].finish_reason else "CUT")
            read = [t for chunk in chunks for t in chunk.token_ids]
        except grpc.RpcError as e:
            outcomes.append(e.code().name)
            details.add((e.details() or "").splitlines()[0] if e.details() else "")
            read = None
        if tokens is not None:
            tokens.append(read)
    return outcomes, details


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile: the smallest value that at least q% of them do not exceed (with 99 values or
    fewer, p99 is the largest)."""
    values = sorted(values)
    if not values:
        return float("nan")
    return values[max(0, math.ceil(q * len(values) / 100) - 1)]
