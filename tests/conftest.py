"""Shared fixtures: one local Ray cluster per test run, small checkpoints written by transformers itself."""

from __future__ import annotations

import logging

import pytest
import ray
import torch
from transformers.utils import logging as hf_logging

from cluster.synthetic import tiny_config, write_random_checkpoint

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole run (starting one costs several seconds)."""
    ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """make(name, max_shard_size=None, **config) -> (folder, transformers model), cached per name."""
    made: dict[str, tuple] = {}

    def make(name: str, max_shard_size: str | None = None, seed: int = 0, **overrides):
        if name not in made:
            path = tmp_path_factory.mktemp(name)
            model = write_random_checkpoint(path, tiny_config(**overrides), seed=seed, max_shard_size=max_shard_size)
            made[name] = (path, model)
        return made[name]

    return make

