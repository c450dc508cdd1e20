"""Reading a Hugging Face Switch Transformers checkpoint folder.

A checkpoint is `config.json` plus either `model.safetensors` or `model.safetensors.index.json` with its
shards. `SwitchCheckpoint.open` checks the config against every tensor header before anything runs, so a
damaged checkpoint fails at load time with the file and tensor named. Tensor data is read lazily, one named
tensor at a time, so each process reads only the bytes it needs; the names it read are recorded.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import SwitchTransformersConfig
from transformers.activations import ACT2FN

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
STACKS = ("encoder", "decoder")
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be served as it is; the message names the file and the tensor."""


@dataclass(frozen=True)
class TensorInfo:
    file: str
    shape: tuple[int, ...]
    dtype: str


def sparse_layers(config: SwitchTransformersConfig, stack: str) -> list[int]:
    """Indices of the sparse (mixture-of-experts) blocks of one stack, by transformers' rule."""
    num_layers = config.num_layers if stack == "encoder" else config.num_decoder_layers
    step = config.encoder_sparse_step if stack == "encoder" else config.decoder_sparse_step
    if step <= 0:
        return []
    return [i for i in range(num_layers) if i % step == 1 or step == 1]


def num_layers(config: SwitchTransformersConfig, stack: str) -> int:
    return config.num_layers if stack == "encoder" else config.num_decoder_layers


def ffn_prefix(stack: str, layer: int) -> str:
    """Name prefix of a block's feed-forward sub-layer (index 1 in the encoder, 2 in the decoder)."""
    return f"{stack}.block.{layer}.layer.{1 if stack == 'encoder' else 2}"


def expert_tensor_names(stack: str, layer: int, expert: int) -> tuple[str, str]:
    prefix = f"{ffn_prefix(stack, layer)}.mlp.experts.expert_{expert}"
    return f"{prefix}.wi.weight", f"{prefix}.wo.weight"


def expected_tensors(config: SwitchTransformersConfig) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(required, optional) tensor shapes of a checkpoint for `config`.

    With tied embeddings transformers uses `shared.weight` for both embeddings and the LM head, so the other
    copies are optional (released checkpoints carry them); untied, each stack has its own.
    """
    d, v, inner, ff = config.d_model, config.vocab_size, config.num_heads * config.d_kv, config.d_ff
    required: dict[str, tuple[int, ...]] = {}
    optional: dict[str, tuple[int, ...]] = {}
    embeddings = {"shared.weight": (v, d), "encoder.embed_tokens.weight": (v, d),
                  "decoder.embed_tokens.weight": (v, d), "lm_head.weight": (v, d)}
    if config.tie_word_embeddings:
        required["shared.weight"] = (v, d)
        optional.update({k: s for k, s in embeddings.items() if k != "shared.weight"})
    else:
        optional["shared.weight"] = (v, d)
        required.update({k: s for k, s in embeddings.items() if k != "shared.weight"})
    for stack in STACKS:
        sparse = set(sparse_layers(config, stack))
        required[f"{stack}.final_layer_norm.weight"] = (d,)
        for i in range(num_layers(config, stack)):
            attentions = ["layer.0.SelfAttention"] + (["layer.1.EncDecAttention"] if stack == "decoder" else [])
            for attn in attentions:
                p = f"{stack}.block.{i}.{attn}"
                required.update({f"{p}.q.weight": (inner, d), f"{p}.k.weight": (inner, d),
                                 f"{p}.v.weight": (inner, d), f"{p}.o.weight": (d, inner)})
                required[f"{stack}.block.{i}.{attn.rsplit('.', 1)[0]}.layer_norm.weight"] = (d,)
            if i == 0:
                required[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
                    config.relative_attention_num_buckets, config.num_heads)
            ffn = ffn_prefix(stack, i)
            required[f"{ffn}.layer_norm.weight"] = (d,)
            if i in sparse:
                required[f"{ffn}.mlp.router.classifier.weight"] = (config.num_experts, d)
                if config.router_bias:
                    required[f"{ffn}.mlp.router.classifier.bias"] = (config.num_experts,)
                for e in range(config.num_experts):
                    wi, wo = expert_tensor_names(stack, i, e)
                    required[wi], required[wo] = (ff, d), (d, ff)
            else:
                required[f"{ffn}.mlp.wi.weight"] = (ff, d)
                required[f"{ffn}.mlp.wo.weight"] = (d, ff)
    return required, optional


def follow_weights(config: SwitchTransformersConfig, names: list[str], where: Path | str) -> list[str]:
    """Where config.json's layer counts disagree with the blocks the weights hold, change `config` to follow
    the weights; returns one warning per stack changed.

    switch-c-2048's published config says 12 decoder layers of which 15 are sparse; its weights hold 15 decoder
    blocks, all sparse."""
    warnings = []
    for stack in STACKS:
        blocks, sparse = set(), set()
        for name in names:
            match = re.match(rf"{stack}\.block\.(\d+)\.", name)
            if match:
                blocks.add(int(match.group(1)))
                if ".mlp.router." in name or ".mlp.experts." in name:
                    sparse.add(int(match.group(1)))
        if not blocks:
            continue
        total, sparse = max(blocks) + 1, sorted(sparse)
        if total == num_layers(config, stack) and sparse == sparse_layers(config, stack):
            continue
        steps = [s for s in range(1, total + 1) if [i for i in range(total) if i % s == 1 or s == 1] == sparse]
        if sparse and not steps:
            raise CheckpointError(f"{where}: the {stack} sparse blocks in the weights, {sparse}, follow no sparse "
                                  "step transformers supports")
        was = f"{num_layers(config, stack)} layers of which {getattr(config, f'num_sparse_{stack}_layers')} sparse"
        setattr(config, "num_layers" if stack == "encoder" else "num_decoder_layers", total)
        setattr(config, f"num_sparse_{stack}_layers", len(sparse))
        setattr(config, f"{stack}_sparse_step", steps[0] if sparse else 0)
        warnings.append(f"{where}: config.json says the {stack} has {was}; the weights hold {total} blocks, "
                        f"{len(sparse)} sparse; following the weights")
    return warnings


def _read_header(path: Path) -> dict:
    """The JSON header of a safetensors file (names, dtypes, shapes, byte offsets), checked against its size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", raw)
        if 8 + header_len > size:
            raise CheckpointError(f"{path}: truncated safetensors file (header of {header_len} bytes, file {size})")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:
            raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
    header.pop("__metadata__", None)
    data_size = size - 8 - header_len
    for name, entry in header.items():
        start, end = entry["data_offsets"]
        if end > data_size:
            raise CheckpointError(
                f"{path}: tensor {name} is cut off (needs bytes {start}..{end} of the data, file holds {data_size})")
    return header


@dataclass
class SwitchCheckpoint:
    """A validated checkpoint folder: its config and where every tensor lives. Cheap to pickle."""

    path: Path
    config: SwitchTransformersConfig
    tensors: dict[str, TensorInfo]
    names_read: set[str] = field(default_factory=set, compare=False)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "SwitchCheckpoint":
        path = Path(path).resolve()
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{config_file}: missing (a Switch checkpoint folder needs config.json)")
        try:
            config = SwitchTransformersConfig.from_json_file(str(config_file))
        except Exception as e:  # transformers raises several types for a bad config
            raise CheckpointError(f"{config_file}: not a valid Switch Transformers config ({e})") from None
        if config.dense_act_fn not in ACT2FN:
            raise CheckpointError(
                f"{config_file}: dense_act_fn {config.dense_act_fn!r} is not an activation transformers' Switch "
                f"supports (one of: relu, gelu, gelu_new, ...)")
        if getattr(config, "decoder_start_token_id", None) is None:
            # T5's convention, which the released Switch checkpoints that lack the field rely on.
            config.decoder_start_token_id = config.pad_token_id
        tensors = cls._index(path)
        for warning in follow_weights(config, list(tensors), config_file):
            log.warning(warning)
        cls._check(config, tensors, path)
        return cls(path=path, config=config, tensors=tensors)

    @staticmethod
    def _index(path: Path) -> dict[str, TensorInfo]:
        index_file = path / INDEX_FILE
        if index_file.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index_file}: not a safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif (path / SINGLE_FILE).is_file():
            weight_map, files = {}, [SINGLE_FILE]
        else:
            raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are "
                                  "served; convert .bin checkpoints first)")
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            shard = path / file
            if not shard.is_file():
                raise CheckpointError(f"{shard}: listed in {INDEX_FILE} but missing")
            for name, entry in _read_header(shard).items():
                tensors[name] = TensorInfo(file, tuple(entry["shape"]), entry["dtype"])
        for name, file in weight_map.items():
            if name not in tensors or tensors[name].file != file:
                raise CheckpointError(f"{path / file}: tensor {name} is listed in {INDEX_FILE} but not in the file")
        return tensors

    @staticmethod
    def _check(config: SwitchTransformersConfig, tensors: dict[str, TensorInfo], path: Path) -> None:
        required, optional = expected_tensors(config)
        where = path / (INDEX_FILE if (path / INDEX_FILE).is_file() else SINGLE_FILE)
        for name, shape in required.items():
            if name not in tensors:
                raise CheckpointError(f"{where}: tensor {name} is missing (config.json expects shape {list(shape)})")
        for name, info in tensors.items():
            shape = required.get(name) or optional.get(name)
            if shape is None:
                raise CheckpointError(f"{path / info.file}: tensor {name} is not part of the model config.json "
                                      "describes")
            if info.dtype not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{path / info.file}: tensor {name} has dtype {info.dtype}, expected one of "
                                      f"{', '.join(SAFETENSORS_DTYPES)}")
            if info.shape != shape:
                raise CheckpointError(f"{path / info.file}: tensor {name} has shape {list(info.shape)}, "
                                      f"config.json expects {list(shape)}")

    @property
    def dtype(self) -> torch.dtype:
        """The checkpoint's floating-point dtype (that of its embedding)."""
        name = "shared.weight" if "shared.weight" in self.tensors else "lm_head.weight"
        return SAFETENSORS_DTYPES[self.tensors[name].dtype]

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read the named tensors, opening each shard once and reading only those tensors' bytes."""
        return dict(self.iter_tensors(names))

    def iter_tensors(self, names: list[str]):
        """(name, tensor) for each named tensor, shard by shard, read as the caller asks for the next one (so a
        caller that moves each to a GPU holds one tensor at a time in host memory)."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.tensors[name].file, []).append(name)
        for file, file_names in by_file.items():
            with safe_open(self.path / file, framework="pt") as f:
                for name in file_names:
                    self.names_read.add(name)
                    yield name, f.get_tensor(name)
