"""The engine and the Python API: a checkpoint served as one model whose experts live in Ray actors.

    with SwitchCluster("path/to/checkpoint", placement=PlacementConfig(experts_per_actor=2)) as model:
        outputs = model.generate([[13, 7, 1]], max_new_tokens=16)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ray
import torch

from experts.checkpoint import SwitchCheckpoint
from experts.fleet import served_placement, start_fleet, stop_fleet
from experts.wire import torch_dtype
from router_service.batching import ContinuousBatcher, Sequence, run_to_completion
from router_service.config import EngineConfig
from router_service.dispatch import ExpertDispatcher
from router_service.model import SwitchFront
from router_service.requests import InvalidRequest, check_prompt, make_sampling_params

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")


def count_expert_tokens(per_actor: list[dict], num_experts: int) -> dict[tuple[str, int], list[int]]:
    """{(stack, layer): tokens per expert} from the actors' own counts."""
    table: dict[tuple[str, int], list[int]] = {}
    for counts in per_actor:
        for (stack, layer, expert), n in counts.items():
            table.setdefault((stack, layer), [0] * num_experts)[expert] += n
    return dict(sorted(table.items(), key=lambda item: (item[0][0] != "encoder", item[0][1])))


class SwitchCluster:
    """A checkpoint served with expert parallelism: the front here, the experts in Ray actors placed as
    `config.placement` says, both in `config.dtype` (default: the checkpoint's). The front runs on the GPU when
    this process has one.

    Takes an EngineConfig, or the checkpoint folder and EngineConfig's other fields as keywords. Starts a local
    Ray cluster unless one is running or `address` names one to join. With `shared_actors`, the expert actors
    are named and outlive this object, for every front serving the same checkpoint and placement to share.
    `metrics` (a router_service.metrics.ServingMetrics) records the batches and the expert round trips."""

    def __init__(self, model: str | os.PathLike | EngineConfig, *, address: str | None = None,
                 shared_actors: bool = False, metrics=None, **options):
        self.config = model if isinstance(model, EngineConfig) else EngineConfig(model=str(model), **options)
        self.checkpoint = SwitchCheckpoint.open(self.config.model)
        self.capacity, self.shared_actors = self.config.capacity, shared_actors
        self._tokenizer = None
        self.fleet, self.actors = None, []
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(address=address, logging_level=logging.WARNING, include_dashboard=False)
        try:
            placement = self.config.placement
            self.placement, self.dtype = served_placement(self.checkpoint, placement, self.config.dtype)
            self.fleet, self.actors = start_fleet(self.checkpoint, self.placement, self.dtype, shared=shared_actors,
                                                  actor_resources=placement.actor_resources,
                                                  timeout_s=placement.timeout_s)
            dispatch = ExpertDispatcher(self.actors, self.placement.owners(), self.checkpoint.config.num_experts,
                                        metrics, placement.restart_timeout_s)
            device = "cuda" if torch.cuda.is_available() else "cpu"
            self.front = SwitchFront(self.checkpoint, dispatch, self.capacity, torch_dtype(self.dtype), device,
                                     self.config.micro_batches)
        except BaseException:
            self.shutdown()
            raise
        self.batcher = ContinuousBatcher(self.front, self.config.max_sequences, metrics)

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
        `sampling`: SamplingParams' fields (greedy by default)."""
        if (input_ids is None) == (texts is None):
            raise InvalidRequest("input_ids, texts", "give exactly one of them")
        if texts is not None:
            input_ids = [self.encode_text(t, f"texts[{i}]") for i, t in enumerate(texts)]
        if not input_ids:
            raise InvalidRequest("input_ids", "at least one prompt is needed")
        vocab = self.checkpoint.config.vocab_size
        prompts = [check_prompt(ids, vocab, self.config, f"input_ids[{i}]") for i, ids in enumerate(input_ids)]
        params = make_sampling_params(vocab, self.config, **sampling)
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

    def __enter__(self) -> SwitchCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
