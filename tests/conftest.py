"""Shared fixtures: one local Ray cluster per test run, small checkpoints written by transformers itself.

A test that uses a Ray fixture is marked `ray` here; one that starts Ray another way (a subprocess) carries the
mark itself. `make test-fast` runs the others."""

from __future__ import annotations

import logging
from contextlib import contextmanager

import pytest
from transformers.utils import logging as hf_logging

from cluster.testing import tiny_config, write_random_checkpoint

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()


RAY_FIXTURES = {"ray_cluster", "multi_node_cluster"}


def pytest_collection_modifyitems(items):
    for item in items:
        if RAY_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.ray)


def start_local_ray() -> None:
    import ray  # here, not above: `make gpu-check` runs its Ray-free tests where Ray is not installed

    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level=logging.WARNING)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole run (starting one costs several seconds)."""
    import ray

    start_local_ray()
    yield
    ray.shutdown()


@contextmanager
def instead_of_shared_ray():
    """Stops the shared local Ray cluster, if it runs, while the block starts and uses one of its own; starts it
    again after."""
    import ray

    was_running = ray.is_initialized()
    ray.shutdown()
    try:
        yield
    finally:
        if was_running:
            start_local_ray()


@pytest.fixture(scope="module")
def multi_node_cluster():
    """A Ray cluster of three raylets on this machine: a head with one CPU and no GPU, and two workers with two
    CPUs and two GPUs each (GPU resources only: the actors given them run on the CPU). Stands in for the
    shared local cluster while a module runs, which is restarted after."""
    import ray
    from ray.cluster_utils import Cluster

    with instead_of_shared_ray():
        small = {"object_store_memory": 200 * 2**20}
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False, **small})
        workers = [cluster.add_node(num_cpus=2, num_gpus=2, **small) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level=logging.WARNING)
        yield cluster, workers
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """make(name, max_shard_size=None, **config) -> (folder, transformers model), cached per name: a name asked for
    again with other arguments fails."""
    made: dict[str, tuple] = {}

    def make(name: str, max_shard_size: str | None = None, seed: int = 0, **overrides):
        asked = (max_shard_size, seed, overrides)
        if name not in made:
            path = tmp_path_factory.mktemp(name)
            model = write_random_checkpoint(path, tiny_config(**overrides), seed=seed, max_shard_size=max_shard_size)
            made[name] = (path, model, asked)
        path, model, first = made[name]
        assert asked == first, f"checkpoint {name!r} made with {first}, asked for with {asked}"
        return path, model

    return make

