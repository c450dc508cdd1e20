"""Experts' weights as a process holds them to compute: the front's own experts and an expert actor's, on the CPU
or a GPU. Apart from the actor's module so that what needs no Ray (the front's math, the CUDA parity tests on a
GPU machine's own Python) imports none."""

from __future__ import annotations

import torch

from experts import int8
from experts.checkpoint import SwitchCheckpoint
from experts.ffn import Weight, pack
from experts.spec import ExpertKey, LayerKey, expert_tensor_names


def held_weight(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype, quantize: str) -> Weight:
    """A checkpoint's expert tensor as it is held for computing: quantized from the checkpoint's own values with
    int8, cast to `dtype` otherwise (no copy when it already is, on the CPU)."""
    if quantize == "int8":
        return int8.quantize(tensor.to(device))
    return tensor.to(device, dtype)


def held_experts(checkpoint: SwitchCheckpoint, keys: list[ExpertKey], quantize: str, packed: bool = True,
                 device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None) -> tuple[dict[ExpertKey, tuple], dict[LayerKey, tuple]]:
    """The (wi, wo) of these experts on `device` in `dtype` (default: the checkpoint's), as a front computes them.
    On the CPU in the checkpoint's dtype, the checkpoint's mapped pages (`packed`: with a packed copy,
    experts.ffn.pack); else a copy, cast to `dtype` or quantized with int8. On a GPU, unquantized, each layer whose
    every expert is among `keys` is held stacked, one [experts, ...] tensor of each weight (the second dict, for
    experts.ffn.stacked_ffn), and its experts' weights are views of those."""
    dtype, experts, wanted = dtype or checkpoint.dtype, checkpoint.config.num_experts, set(keys)
    stacking = torch.device(device).type == "cuda" and quantize != "int8"
    stacked = {key[:2] for key in keys if stacking and all((*key[:2], e) in wanted for e in range(experts))}
    stacks = {layer: stacked_experts(checkpoint, layer, device, dtype) for layer in stacked}
    rest = [key for key in keys if key[:2] not in stacked]
    tensors = checkpoint.read([name for key in rest for name in expert_tensor_names(*key)])
    held = {name: held_weight(tensors[name], device, dtype, quantize) for name in tensors}
    weights = {key: tuple(pack(held[name]) if packed else held[name] for name in expert_tensor_names(*key))
               for key in rest}
    weights |= {(*layer, e): (wi[e], wo[e]) for layer, (wi, wo) in stacks.items() for e in range(experts)}
    return weights, stacks


def stacked_experts(checkpoint: SwitchCheckpoint, layer: LayerKey, device: torch.device | str,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Every expert's wi and wo of one sparse layer, each stacked [experts, ...] (experts.ffn.stacked_ffn) on `device`
    in `dtype`: each tensor read and copied into its place in turn, so that neither the host nor the device holds a
    second copy of the layer."""
    where = {name: (e, i) for e in range(checkpoint.config.num_experts)
             for i, name in enumerate(expert_tensor_names(*layer, e))}
    stacks: list[torch.Tensor | None] = [None, None]
    for name, tensor in checkpoint.iter_tensors(list(where)):
        e, i = where[name]
        if stacks[i] is None:
            stacks[i] = torch.empty((len(where) // 2, *tensor.shape), device=device, dtype=dtype)
        stacks[i][e].copy_(tensor)
    return stacks[0], stacks[1]


def gpu_uuid(device: torch.device) -> str | None:
    """The physical GPU a CUDA device is (the same whatever CUDA_VISIBLE_DEVICES numbers it); None off the GPU."""
    return str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else None


def gpu_bytes(device: torch.device) -> int | None:
    """The memory of a CUDA device's GPU; None off the GPU."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
