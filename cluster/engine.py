"""The Python API: serve a checkpoint folder as one model whose experts live in Ray actors.

    with SwitchCluster("path/to/checkpoint", experts_per_actor=2) as model:
        outputs = model.generate(input_ids=[[13, 7, 1]], max_new_tokens=16)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ray
import torch

from cluster.checkpoint import SwitchCheckpoint
from cluster.convert import resolve_model
from cluster.fleet import start_fleet, stop_fleet
from cluster.placement import PlacementConfig
from experts.actor import DTYPES
from router_service.dispatch import ExpertDispatcher
from router_service.batching import ContinuousBatcher, Sequence, run_to_completion
from router_service.model import SwitchFront
from router_service.requests import InvalidRequest, Limits, check_prompt, make_sampling_params

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")


def dtype_name(checkpoint: SwitchCheckpoint, dtype: str | None) -> str:
    """The dtype to serve in: the one asked for, else the checkpoint's own."""
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        return dtype
    return next(name for name, t in DTYPES.items() if t == checkpoint.dtype)


def count_expert_tokens(per_actor: list[dict], num_experts: int) -> dict[tuple[str, int], list[int]]:
    """{(stack, layer): tokens per expert} from the actors' own counts."""
    table: dict[tuple[str, int], list[int]] = {}
    for counts in per_actor:
        for (stack, layer, expert), n in counts.items():
            table.setdefault((stack, layer), [0] * num_experts)[expert] += n
    return dict(sorted(table.items(), key=lambda item: (item[0][0] != "encoder", item[0][1])))


class SwitchCluster:
    """A checkpoint served with expert parallelism: the front here, the experts in Ray actors placed as
    `placement` says, both in `dtype` (default: the checkpoint's). The front runs on the GPU when this process
    has one.

    `model_dir` is a checkpoint folder or a Hugging Face Hub id. Starts a local Ray cluster unless one is
    running or `address` names one to join. `metrics` (a router_service.metrics.ServingMetrics) records the
    batches and the expert round trips."""

    def __init__(self, model_dir: str | os.PathLike, *, placement: PlacementConfig = PlacementConfig(),
                 dtype: str | None = None, capacity: str = "hf", address: str | None = None,
                 limits: Limits = Limits(), shared_actors: bool = False, metrics=None, micro_batches: int = 1):
        self.checkpoint = SwitchCheckpoint.open(resolve_model(model_dir))
        self.dtype = dtype_name(self.checkpoint, dtype)
        self.limits, self.capacity, self.shared_actors = limits, capacity, shared_actors
        self._tokenizer = None
        self.fleet, self.actors = None, []
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(address=address, logging_level=logging.WARNING, include_dashboard=False)
        try:
            placement = placement.for_cluster()
            self.placement = placement.place(self.checkpoint.config, self.dtype)
            self.fleet, self.actors = start_fleet(self.checkpoint, self.placement, self.dtype, shared=shared_actors,
                                                  actor_resources=placement.actor_resources,
                                                  timeout_s=placement.timeout_s)
            dispatch = ExpertDispatcher(self.actors, self.placement.owners(), self.checkpoint.config.num_experts,
                                        metrics, placement.restart_timeout_s)
            device = "cuda" if torch.cuda.is_available() else "cpu"
            self.front = SwitchFront(self.checkpoint, dispatch, capacity, DTYPES[self.dtype], device, micro_batches)
        except BaseException:
            self.shutdown()
            raise
        self.batcher = ContinuousBatcher(self.front, limits.max_sequences, metrics)

    @property
    def tokenizer(self):
        """The tokenizer saved in the checkpoint folder (loaded on first use)."""
        if self._tokenizer is None:
            path = Path(self.checkpoint.path)
            if not any((path / f).is_file() for f in TOKENIZER_FILES):
                raise InvalidRequest("text", f"{path} holds no tokenizer; pass token ids instead")
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(path))
        return self._tokenizer

    def encode_text(self, text: str, field: str = "text") -> list[int]:
        if not text:
            raise InvalidRequest(field, "empty prompt")
        return self.tokenizer(text)["input_ids"]

    def generate(self, input_ids: list[list[int]] | None = None, *, texts: list[str] | None = None,
                 **sampling) -> list[Sequence]:
        """Generate for a batch of prompts, given as token ids or as text (exactly one of them).
        `sampling`: max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids (greedy by default)."""
        if (input_ids is None) == (texts is None):
            raise InvalidRequest("input_ids, texts", "give exactly one of them")
        if texts is not None:
            input_ids = [self.encode_text(t, f"texts[{i}]") for i, t in enumerate(texts)]
        if not input_ids:
            raise InvalidRequest("input_ids", "at least one prompt is needed")
        vocab = self.checkpoint.config.vocab_size
        prompts = [check_prompt(ids, vocab, self.limits, f"input_ids[{i}]") for i, ids in enumerate(input_ids)]
        params = make_sampling_params(vocab, self.limits, **sampling)
        return run_to_completion(self.batcher, [Sequence(p, params) for p in prompts])

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def expert_token_counts(self) -> dict[tuple[str, int], list[int]]:
        """Tokens each expert of each sparse layer has computed since its actor started, counted by the actors
        (so every front that shares them is included)."""
        return count_expert_tokens(ray.get([actor.token_counts.remote() for actor in self.actors]),
                                   self.checkpoint.config.num_experts)

    def actor_info(self) -> list[dict]:
        return ray.get([actor.info.remote() for actor in self.actors])

    def shutdown(self) -> None:
        """Stop the actors this object started (shared ones stay for the other fronts) and Ray if it started it."""
        if self.fleet is not None and not self.shared_actors:
            stop_fleet(self.fleet)
        self.fleet, self.actors = None, []
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> "SwitchCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
