"""The Python API: serve a checkpoint folder as one model whose experts live in Ray actors.

    with SwitchCluster("path/to/checkpoint", experts_per_actor=2) as model:
        outputs = model.generate(input_ids=[[13, 7, 1]], max_new_tokens=16)
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import ray

from cluster.checkpoint import SwitchCheckpoint, expert_tensor_names
from cluster.placement import Placement
from experts.actor import ExpertActor
from router_service.dispatch import ExpertDispatcher
from router_service.batching import ContinuousBatcher, Sequence, run_to_completion
from router_service.model import SwitchFront
from router_service.requests import InvalidRequest, Limits, check_prompt, make_sampling_params

log = logging.getLogger(__name__)

SHARED_NAMESPACE = "switch-serve"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")


def actor_cpus(num_actors: int) -> float:
    """CPUs each expert actor asks Ray for: a fair share of what the cluster has free, at most one.

    An actor asking for more than the cluster has free stays pending forever, so small machines get fractions."""
    free = ray.available_resources().get("CPU", 0.0)
    return max(0.01, min(1.0, round(free / (num_actors + 1), 2)))


def launch_expert_actors(checkpoint: SwitchCheckpoint, placement: Placement, shared: bool = False) -> list:
    """Start one actor per placement entry and wait until every one has loaded its weights.

    Shared actors are named and detached: every front serving the same checkpoint and placement (each Serve
    replica) finds the same actors instead of starting its own, and they outlive any one front."""
    remote = ray.remote(ExpertActor)
    cpus = actor_cpus(len(placement.actors))
    actors = []
    for i, keys in enumerate(placement.actors):
        options = {"num_cpus": cpus}
        if shared:
            options.update(name=shared_actor_name(checkpoint, placement, i), namespace=SHARED_NAMESPACE,
                           lifetime="detached", get_if_exists=True)
        actors.append(remote.options(**options).remote(checkpoint, {key: expert_tensor_names(*key) for key in keys}))
    ray.get([actor.info.remote() for actor in actors])  # surfaces a load failure here, not mid-request
    return actors


def shared_actor_name(checkpoint: SwitchCheckpoint, placement: Placement, index: int) -> str:
    digest = hashlib.sha1(repr((str(checkpoint.path), placement.actors)).encode()).hexdigest()[:12]
    return f"experts-{digest}-{index}"


def kill_shared_actors(model_dir: str | os.PathLike, experts_per_actor: int) -> None:
    """Stop the shared expert actors of a checkpoint and placement (when its Serve app is taken down)."""
    checkpoint = SwitchCheckpoint.open(model_dir)
    placement = Placement.packed(checkpoint.config, experts_per_actor)
    for i in range(len(placement.actors)):
        try:
            ray.kill(ray.get_actor(shared_actor_name(checkpoint, placement, i), namespace=SHARED_NAMESPACE))
        except ValueError:  # not running
            pass


def count_expert_tokens(per_actor: list[dict], num_experts: int) -> dict[tuple[str, int], list[int]]:
    """{(stack, layer): tokens per expert} from the actors' own counts."""
    table: dict[tuple[str, int], list[int]] = {}
    for counts in per_actor:
        for (stack, layer, expert), n in counts.items():
            table.setdefault((stack, layer), [0] * num_experts)[expert] += n
    return dict(sorted(table.items(), key=lambda item: (item[0][0] != "encoder", item[0][1])))


class SwitchCluster:
    """A checkpoint served with expert parallelism: the front here, the experts in Ray actors.

    Starts a local Ray cluster unless one is running or `address` names one to join."""

    def __init__(self, model_dir: str | os.PathLike, *, experts_per_actor: int = 1, capacity: str = "hf",
                 address: str | None = None, limits: Limits = Limits(), shared_actors: bool = False):
        self.checkpoint = SwitchCheckpoint.open(model_dir)
        self.limits, self.capacity, self.shared_actors = limits, capacity, shared_actors
        self._tokenizer = None
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(address=address, logging_level=logging.WARNING, include_dashboard=False)
        self.placement = Placement.packed(self.checkpoint.config, experts_per_actor)
        try:
            self.actors = launch_expert_actors(self.checkpoint, self.placement, shared_actors)
            dispatch = ExpertDispatcher(self.actors, self.placement.owners(), self.checkpoint.config.num_experts)
            self.front = SwitchFront(self.checkpoint, dispatch, capacity)
        except BaseException:
            self.shutdown()
            raise
        self.batcher = ContinuousBatcher(self.front, limits.max_sequences)

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
        if not self.shared_actors:
            for actor in getattr(self, "actors", []):
                ray.kill(actor)
        self.actors = []
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> "SwitchCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
