"""An expert actor reads its own experts' bytes from the disk, and little else; the weights a front holds to compute
experts itself."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import ray
import torch

from cluster.testing import tiny_config, write_random_checkpoint
from experts import actor as actor_module
from experts.actor import ExpertActor
from experts.checkpoint import SwitchCheckpoint
from experts.fleet import start_fleet, stop_fleet
from experts.held import held_experts
from experts.placement import PlacementConfig
from experts.spec import expert_tensor_names, sparse_layers
from experts.wire import call_to_wire, from_wire


def evict_from_page_cache(folder) -> None:
    """Drop a checkpoint's pages from the OS cache so that reading it again goes to the disk."""
    for file in folder.glob("*.safetensors"):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_ahead_bytes(file) -> int:
    """The kernel's read-ahead window for the block device holding `file` (128 KiB when unknown)."""
    device = os.stat(file).st_dev
    try:
        with open(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}/queue/read_ahead_kb") as f:
            return int(f.read()) * 1024
    except OSError:
        try:  # a partition: the setting is on its disk
            with open(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}/../queue/read_ahead_kb") as f:
                return int(f.read()) * 1024
        except OSError:
            return 128 * 1024


def process_bytes_read(pid: int) -> int:
    """What the kernel counts a process as having read from storage over its life (Linux /proc/PID/io)."""
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


def test_each_actor_reads_about_its_own_bytes(ray_cluster, tmp_path):
    """Measured at the disk, by the kernel's count of each actor process's reads, read from outside it: with the
    checkpoint dropped from the page cache before each, an actor hosting one expert index of 16 reads its own
    experts' bytes plus at most the kernel's read-ahead around them, a small part of the file. (Actors run one at
    a time here: at once, one actor's read-ahead lands in the cache and another's reads of those pages never reach
    the disk.) Fails if an actor reads the whole checkpoint, e.g. safetensors' load_file instead of get_tensor."""
    config = tiny_config(d_model=512, d_ff=2048, num_experts=16, num_layers=2, num_decoder_layers=2,
                         num_sparse_encoder_layers=1, num_sparse_decoder_layers=1)
    write_random_checkpoint(tmp_path, config)
    checkpoint = SwitchCheckpoint.open(tmp_path)
    file = tmp_path / "model.safetensors"
    own = 2 * 2 * 512 * 2048 * 4  # 2 sparse layers x (wi + wo) in fp32
    # Faults on a memory-mapped file read a window around them and, once the access looks sequential, windows
    # ahead of it: allow four windows per run of the actor's tensors (it has two: one per sparse layer).
    slack = 2 * 4 * read_ahead_bytes(file)
    remote = ray.remote(ExpertActor)
    for expert in (0, 7, 15):
        experts = {(s, 1, expert): expert_tensor_names(s, 1, expert) for s in ("encoder", "decoder")}
        evict_from_page_cache(tmp_path)
        actor = remote.remote(checkpoint, experts)
        info = ray.get(actor.info.remote())
        outside = process_bytes_read(info["pid"])  # by the kernel, read here: not the actor's own account
        ray.kill(actor)
        print(f"expert {expert}: own {own / 2**20:.0f} MiB, read from disk {outside / 2**20:.1f} MiB by the actor's "
              f"process ({info['disk_bytes_read'] / 2**20:.1f} MiB while loading, by its own count) of the "
              f"{file.stat().st_size / 2**20:.0f} MiB file (read-ahead {slack / 8 / 2**20:.2f} MiB)")
        assert info["tensor_bytes"] == info["held_bytes"] == own  # unquantized: held as read
        if outside == 0:
            pytest.skip("this system does not report reads from the disk (/proc/PID/io read_bytes)")
        # The process's whole life: its imports come from the page cache (this process made the same ones).
        assert own <= outside <= own + slack
        assert outside < file.stat().st_size / 3
        assert info["disk_bytes_read"] <= outside


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_a_front_holds_experts_in_the_checkpoints_dtype_or_the_one_it_computes_in(tmp_path, dtype):
    """The weights a front computes experts from: the checkpoint's values, in `dtype` where one is given (a front
    serving another dtype, or on a GPU). That those in the checkpoint's dtype are its mapped pages: test_parity."""
    write_random_checkpoint(tmp_path, tiny_config())
    checkpoint = SwitchCheckpoint.open(tmp_path)
    key = ("encoder", 1, 2)
    (wi, wo), = held_experts(checkpoint, [key], "none", packed=False, dtype=dtype)[0].values()
    mapped = checkpoint.read(list(expert_tensor_names(*key)))
    for held, tensor in zip((wi, wo), mapped.values()):
        assert held.dtype == (dtype or checkpoint.dtype) and held.device.type == "cpu"
        assert torch.equal(held, tensor.to(held.dtype))


def test_a_fleets_actors_return_activations_of_up_to_a_mib_inside_rays_messages(ray_cluster, tmp_path):
    """200 KiB of activations, over Ray's default bound of 100 KiB, come back in the call's reply, not through the
    object store (a put, a fetch and a release more per call): fails without INLINE_ACTIVATIONS_ENV in the actors'
    environment."""
    config = tiny_config(num_layers=2, num_decoder_layers=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1)
    write_random_checkpoint(tmp_path, config)
    checkpoint = SwitchCheckpoint.open(tmp_path)
    fleet = start_fleet(checkpoint, PlacementConfig(experts_per_actor=config.num_experts), checkpoint.dtype_name)
    try:
        view = ray.get(fleet.actors.remote(120))
        actor, = view.actors
        # Sent the places of its own experts' tensors alone (SwitchCheckpoint.with_only), not the whole checkpoint's.
        own = {name for key in view.placement.actors[0].experts for name in expert_tensor_names(*key)}
        assert ray.get(actor.__ray_call__.remote(lambda actor: set(actor.checkpoint.tensors))) == own
        layer = sparse_layers(checkpoint.config, "encoder")[0]
        rows = (200 << 10) // (4 * config.d_model)
        out = actor.forward.remote(call_to_wire("encoder", layer, [0], [rows], torch.ones(rows, config.d_model)))
        assert from_wire(ray.get(out), torch.float32, config.d_model).shape == (rows, config.d_model)
        assert ray.experimental.get_object_locations([out])[out]["node_ids"] == []  # in no node's store
    finally:
        stop_fleet(fleet)


def test_an_actor_logs_each_calls_compute_while_asked_to(ray_cluster, tmp_path):
    """The benchmark's breakdown reads each call's compute time from the actors (cluster.bench.trips_compute_s)."""
    config = tiny_config(num_layers=2, num_decoder_layers=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1)
    write_random_checkpoint(tmp_path, config)
    key = ("encoder", sparse_layers(config, "encoder")[0], 1)
    actor = ExpertActor(SwitchCheckpoint.open(tmp_path), {key: expert_tensor_names(*key)})
    x = call_to_wire(*key[:2], [key[2]], [3], torch.ones(3, config.d_model))

    def call():
        return actor.forward(x)

    call()
    assert actor.log_calls(True) == []  # nothing logged before
    call(), call()
    logged = actor.log_calls(False)
    assert len(logged) == 2 and min(logged) > 0
    call()
    assert actor.log_calls(False) == []


def test_an_actor_counts_the_tokens_it_computed_per_expert(tmp_path, monkeypatch):
    """`token_counts` (the stats the planner balances by, `switch-serve stats`) adds up each expert's tokens over the
    calls, however many a call holds. In this process, without Ray (told of no GPU). Fails if it counts calls
    instead of tokens, or mixes the experts up."""
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    config = tiny_config(num_layers=2, num_decoder_layers=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1)
    write_random_checkpoint(tmp_path, config)
    layer = sparse_layers(config, "encoder")[0]
    keys = [("encoder", layer, e) for e in (0, 1)]
    recorded = []
    monkeypatch.setattr(actor_module, "expert_token_counter",
                        lambda: SimpleNamespace(inc=lambda n, tags: recorded.append((n, tags["model"]))))
    actor = ExpertActor(SwitchCheckpoint.open(tmp_path), {key: expert_tensor_names(*key) for key in keys},
                        model_id="served-id")
    assert actor.token_counts() == dict.fromkeys(keys, 0)
    actor.forward(call_to_wire("encoder", layer, [0, 1], [3, 5], torch.ones(8, config.d_model)))
    actor.forward(call_to_wire("encoder", layer, [1], [2], torch.ones(2, config.d_model)))
    assert actor.token_counts() == {keys[0]: 3, keys[1]: 7}
    # Its metric is labelled with the served model's id, as the fronts' are, so that a dashboard filtered by model
    # finds it (a Hub download's folder is named by a commit hash).
    assert recorded == [(3, "served-id"), (5, "served-id"), (2, "served-id")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a torch without CUDA does")
def test_an_actor_given_a_gpu_its_torch_cannot_use_says_so(tmp_path, monkeypatch, caplog):
    """Ray gave the actor a GPU, but its torch is a CPU build: its experts compute on the CPU (as the multi-node
    tests' actors with GPU resources alone do), taking host memory, and the log says why. Fails if that is silent."""
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [0])
    config = tiny_config(num_layers=2, num_decoder_layers=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1)
    write_random_checkpoint(tmp_path, config)
    key = ("encoder", sparse_layers(config, "encoder")[0], 0)
    with caplog.at_level("WARNING", logger="experts.actor"):
        actor = ExpertActor(SwitchCheckpoint.open(tmp_path), {key: expert_tensor_names(*key)})
    assert actor.device.type == "cpu"
    assert "given GPU [0], but its torch" in caplog.text and "has no CUDA" in caplog.text
