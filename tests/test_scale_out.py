"""Scale-out on one machine: a switch-c-2048 look-alike planned and served packed, each actor reading only
its own bytes, and serving in another dtype."""

from __future__ import annotations

import logging
import os

import pytest
import ray
import torch

from cluster.checkpoint import SwitchCheckpoint, expert_tensor_names
from cluster.engine import SwitchCluster
from cluster.placement import PlacementConfig
from cluster.plan import make_plan
from cluster.synthetic import tiny_config, write_random_checkpoint
from experts.actor import ExpertActor
from reference import edit_config, hf_generate

PROMPTS = [[5, 9, 23, 4, 17, 60, 33, 2, 11, 48, 1], [7, 3, 1], [14, 15, 16, 50, 27, 1]]


def test_switch_c_2048_look_alike(ray_cluster, tmp_path, caplog):
    """switch-c-2048's structure (15 encoder and 15 decoder blocks, all sparse, 2048 experts each: 61,440
    experts) at tiny widths, with its published config.json, which says 12 decoder layers."""
    config = tiny_config(vocab_size=64, d_model=8, d_kv=4, num_heads=2, d_ff=8, num_experts=2048, num_layers=15,
                         num_sparse_encoder_layers=15, num_decoder_layers=15, num_sparse_decoder_layers=15)
    hf_model = write_random_checkpoint(tmp_path, config)
    edit_config(tmp_path, num_decoder_layers=12, decoder_sparse_step=0)
    with caplog.at_level(logging.WARNING, logger="cluster.checkpoint"):
        checkpoint = SwitchCheckpoint.open(tmp_path)
    assert "the weights hold 15 blocks, 15 sparse; following the weights" in caplog.text
    assert checkpoint.config.num_decoder_layers == 15

    plan = make_plan(checkpoint.config, gpus=48, gpu_memory="80GiB" and 2**20, dtype="bf16")
    placed = [key for gpu in plan.gpus for key in gpu.experts]
    assert len(placed) == len(set(placed)) == 30 * 2048

    with SwitchCluster(tmp_path, placement=PlacementConfig(experts_per_actor=512)) as model:
        assert len(model.actors) == 4
        outputs = model.generate(PROMPTS, max_new_tokens=6)
    assert [o.token_ids for o in outputs] == [tokens for tokens, _ in hf_generate(hf_model, PROMPTS, 6)]


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


def test_each_actor_reads_about_its_own_bytes(ray_cluster, tmp_path):
    """Measured at the disk: with the checkpoint dropped from the page cache before each, an actor hosting one
    expert index of 16 reads its own experts' bytes plus at most the kernel's read-ahead around them, a small
    part of the file. (Actors run one at a time here: at once, one actor's read-ahead lands in the cache and
    another's reads of those pages never reach the disk.)"""
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
        ray.kill(actor)
        print(f"expert {expert}: own {own / 2**20:.0f} MiB, read from disk {info['disk_bytes_read'] / 2**20:.1f} MiB "
              f"of the {file.stat().st_size / 2**20:.0f} MiB file (read-ahead {slack / 8 / 2**20:.2f} MiB)")
        assert info["tensor_bytes"] == own
        if info["disk_bytes_read"] == 0:
            pytest.skip("this system does not report reads from the disk (/proc/self/io read_bytes)")
        assert own <= info["disk_bytes_read"] <= own + slack
        assert info["disk_bytes_read"] < file.stat().st_size / 3


def test_serving_in_bf16(ray_cluster, checkpoint_factory):
    """A float32 checkpoint served in bfloat16 follows transformers' model cast to bfloat16."""
    path, hf_model = checkpoint_factory("relu-tied-step1-2-bf16", num_experts=4, expert_capacity=64)
    with SwitchCluster(path, placement=PlacementConfig(experts_per_actor=2), dtype="bf16") as model:
        assert model.front.dtype == torch.bfloat16
        assert {info["device"] for info in model.actor_info()} == {"cpu"}
        outputs = model.generate(PROMPTS, max_new_tokens=6)
    reference = hf_generate(hf_model.to(torch.bfloat16), PROMPTS, 6)
    hf_model.to(torch.float32)
    for out, (tokens, logprobs) in zip(outputs, reference):
        assert out.token_ids[0] == tokens[0]
        assert out.logprobs[0] == pytest.approx(logprobs[0], abs=0.05)
