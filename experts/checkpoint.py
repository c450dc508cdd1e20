"""Reading a Hugging Face Switch Transformers checkpoint folder.

A checkpoint is `config.json` plus either `model.safetensors` or `model.safetensors.index.json` with its
shards. `SwitchCheckpoint.open` checks the config against every tensor header before anything runs, so a
damaged checkpoint fails at load time with the file and tensor named. Tensor data is read lazily, one named
tensor at a time, so each process reads only the bytes it needs; the names it read are recorded.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import struct
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path

from experts.spec import (
    ACTIVATIONS,
    CONFIG_FILE,
    DECODING_DEFAULTS,
    DTYPE_OF_SAFETENSORS,
    DTYPE_OF_TORCH,
    DTYPES,
    GENERATION_CONFIG_FILE,
    GENERATION_TOKEN_FIELDS,
    ROUTER_DTYPES,
    TIED_COPIES,
    TOKENIZER_FILES,
    SwitchConfig,
    expected_tensors,
    follow_weights,
)

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def has_tokenizer(folder: str | Path) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be served as it is; the message names the file and the tensor."""


@dataclass(frozen=True)
class TensorInfo:
    file: str
    shape: tuple[int, ...]
    dtype: str


def _read_header(path: Path) -> dict:
    """The JSON header of a safetensors file (names, dtypes, shapes, byte offsets), checked as safetensors checks it
    before reading any tensor: every entry well-formed, its bytes as many as its shape and dtype take, and the
    tensors' bytes covering the data exactly, without gaps or overlaps. Checked here rather than by `safe_open`,
    whose errors name no tensor for most of these ("invalid shape, data type, or offset for tensor", "file not
    fully covered")."""
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
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: unreadable safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(value, str) for value in metadata.values())):
        raise CheckpointError(f"{path}: the safetensors header's __metadata__ is not a JSON object of strings "
                              f"({json.dumps(metadata)[:200]})")
    data_size = size - 8 - header_len
    for name, entry in header.items():
        if not _well_formed(entry):
            raise CheckpointError(f"{path}: tensor {name} has a malformed header entry ({json.dumps(entry)[:200]})")
        start, end = entry["data_offsets"]
        if end > data_size:
            raise CheckpointError(
                f"{path}: tensor {name} is cut off (needs bytes {start}..{end} of the data, file holds {data_size})")
        dtype = DTYPES.get(DTYPE_OF_SAFETENSORS.get(entry["dtype"], ""))
        taken = None if dtype is None else math.prod(entry["shape"]) * dtype.bytes
        if taken is not None and end - start != taken:
            raise CheckpointError(f"{path}: tensor {name} has {end - start} bytes, its shape {entry['shape']} and "
                                  f"dtype {entry['dtype']} take {taken}")
    covered = 0
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
        start, end = entry["data_offsets"]
        if start != covered:
            raise CheckpointError(f"{path}: tensor {name}'s bytes {start}..{end} "
                                  f"{'overlap another' if start < covered else 'leave a gap after another'} tensor's")
        covered = end
    if covered != data_size:
        raise CheckpointError(f"{path}: {data_size - covered} bytes after its last tensor's data (a damaged file)")
    return header


def _shard_tensors(folder: Path, file: str) -> dict[str, TensorInfo]:
    """The tensors of the shard `file` of `folder`, as its checked header describes them."""
    return {name: TensorInfo(file, tuple(entry["shape"]), entry["dtype"])
            for name, entry in _read_header(folder / file).items()}


def _well_formed(entry) -> bool:
    """A safetensors header entry: {"dtype": str, "shape": [int >= 0, ...], "data_offsets": [start, end]}."""
    def counts(values) -> bool:
        return isinstance(values, list) and all(type(v) is int and v >= 0 for v in values)

    return (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and counts(entry.get("shape"))
            and counts(entry.get("data_offsets")) and len(entry["data_offsets"]) == 2
            and entry["data_offsets"][0] <= entry["data_offsets"][1])


def generation_config(config_file: Path) -> dict | None:
    """The fields of the generation_config.json beside a config.json (None where there is none), or a
    CheckpointError naming it."""
    file = config_file.parent / GENERATION_CONFIG_FILE
    if not file.is_file():
        return None
    try:
        raw = json.loads(file.read_text())
    except ValueError as e:  # a JSONDecodeError, bytes that are not UTF-8
        raise CheckpointError(f"{file}: not JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: expected a JSON object of fields, got {type(raw).__name__}")
    return raw


def read_config(config_file: Path) -> SwitchConfig:
    """A checkpoint's config.json, checked: one of a model switch-serve serves, or a CheckpointError naming it. Its
    token ids for decoding are those of the generation_config.json beside it where there is one, else its own, a
    field the file lacks unset (not the architecture's default): as transformers' generate reads them."""
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: missing (a Switch checkpoint folder needs config.json)")
    # Beside a checkpoint's config.json (a config file of another name, given to `plan --config`, stands alone).
    generation = generation_config(config_file) if config_file.name == CONFIG_FILE else None
    try:
        raw = json.loads(config_file.read_text())
        if isinstance(raw, dict):  # (else from_dict says what it is)
            raw |= {name: (raw if generation is None else generation).get(name) for name in GENERATION_TOKEN_FIELDS}
        config = SwitchConfig.from_dict(raw)
    except ValueError as e:  # a JSONDecodeError too
        # A token id the generation config gives, or lacks, is its to name; any other field, config.json's.
        if generation is not None and str(e).startswith(GENERATION_TOKEN_FIELDS):
            raise CheckpointError(f"{config_file.parent / GENERATION_CONFIG_FILE}: {e}") from None
        raise CheckpointError(f"{config_file}: not a valid Switch Transformers config ({e})") from None
    if config.dense_act_fn not in ACTIVATIONS:
        raise CheckpointError(f"{config_file}: dense_act_fn {config.dense_act_fn!r} is not an activation "
                              f"switch-serve serves (one of: {', '.join(ACTIVATIONS)})")
    if config.router_dtype not in ROUTER_DTYPES:
        raise CheckpointError(f"{config_file}: router_dtype {config.router_dtype!r} is not one of "
                              f"{', '.join(ROUTER_DTYPES)}")
    return config


def unapplied_generation_settings(config_file: Path) -> list[str]:
    """The settings that change what transformers' generate makes and that switch-serve does not apply
    (spec.DECODING_DEFAULTS), as "name=value": the generation_config.json's beside a config.json, else its own
    (transformers' generate reads them there where there is none)."""
    generation = generation_config(config_file)
    if generation is None:
        generation = json.loads(config_file.read_text())
    # A null is transformers' default too.
    return [f"{name}={generation[name]!r}" for name, default in DECODING_DEFAULTS.items()
            if generation.get(name) is not None and generation[name] != default]


def config_of_weights(config: SwitchConfig, names: list[str], config_file: Path) -> SwitchConfig:
    """The config that describes the weights `names` (follow_weights): a disagreement the weights cannot settle is a
    CheckpointError, the others are logged."""
    try:
        config, warnings = follow_weights(config, names, str(config_file))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    for warning in warnings:
        log.warning(warning)
    return config


def check_tensor_names(config: SwitchConfig, names: Collection[str], listing: Path,
                       file_of: Callable[[str], Path] | None = None) -> None:
    """That `names` holds every tensor the model `config` describes needs, and none it has not: a CheckpointError
    naming the `listing` of the names, or the file that holds a tensor (`file_of`)."""
    required, optional = expected_tensors(config)
    # Tied, any copy of shared.weight stands for it, as transformers ties them.
    tied = config.tie_word_embeddings and any(name in names for name in TIED_COPIES)
    for name, shape in required.items():
        if name not in names and not (tied and name == "shared.weight"):
            raise CheckpointError(f"{listing}: tensor {name} is missing (config.json expects shape {list(shape)})")
    for name in names:
        if name not in required and name not in optional:
            raise CheckpointError(f"{listing if file_of is None else file_of(name)}: tensor {name} is not part of the "
                                  "model config.json describes")


def check_tensor_shapes(config: SwitchConfig, tensors: dict[str, TensorInfo],
                        file_of: Callable[[str], Path]) -> None:
    """That each of `tensors` is one the model `config` describes, with a floating-point dtype switch-serve serves
    and the shape the config gives it: a CheckpointError naming the file that holds it (`file_of`)."""
    required, optional = expected_tensors(config)
    for name, info in tensors.items():
        shape = required.get(name) or optional.get(name)
        if shape is None:  # (found by check_tensor_names first where a checkpoint opens)
            raise CheckpointError(f"{file_of(name)}: tensor {name} is not part of the model config.json describes")
        if info.dtype not in DTYPE_OF_SAFETENSORS:
            raise CheckpointError(f"{file_of(name)}: tensor {name} has dtype {info.dtype}, expected one of "
                                  f"{', '.join(DTYPE_OF_SAFETENSORS)}")
        if info.shape != shape:
            raise CheckpointError(f"{file_of(name)}: tensor {name} has shape {list(info.shape)}, "
                                  f"config.json expects {list(shape)}")


@dataclass
class SwitchCheckpoint:
    """A validated checkpoint folder: its config and where every tensor lives. Pickled, its tensors' places take
    MiBs for a large checkpoint (switch-c-2048's 123,170): a process that reads a few gets `with_only` them."""

    path: Path
    config: SwitchConfig
    tensors: dict[str, TensorInfo]
    names_read: set[str] = field(default_factory=set, compare=False)

    @classmethod
    def open(cls, path: str | os.PathLike) -> SwitchCheckpoint:
        path = Path(path).resolve()
        config_file = path / CONFIG_FILE
        config = read_config(config_file)
        listing = cls._listing(path)
        tensors = cls._index(path, listing)
        config = config_of_weights(config, list(tensors), config_file)
        cls._check(config, tensors, path, listing)
        checkpoint = cls(path=path, config=config, tensors=tensors)
        for warning in checkpoint.dtype_warnings(json.loads(config_file.read_text())):
            log.warning(warning)
        return checkpoint

    @staticmethod
    def _listing(path: Path) -> Path:
        """The file that says which tensors the folder holds: its single file where it has one, else its index, as
        transformers' from_pretrained picks them."""
        for name in (SINGLE_FILE, INDEX_FILE):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are served; "
                              "convert .bin checkpoints first)")

    @staticmethod
    def _index(path: Path, listing: Path) -> dict[str, TensorInfo]:
        """The tensors `listing` (see `_listing`) names: the single file's own, or those of the index's shards."""
        if listing.name == SINGLE_FILE:
            weight_map, files = {}, [SINGLE_FILE]
        else:
            try:
                weight_map: dict[str, str] = json.loads(listing.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{listing}: not a safetensors index ({e})") from None
            if not (isinstance(weight_map, dict) and all(isinstance(f, str) for f in weight_map.values())):
                raise CheckpointError(f"{listing}: not a safetensors index (weight_map must map tensor names to "
                                      "file names)")
            files = sorted(set(weight_map.values()))
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            shard = path / file
            if not shard.is_file():
                raise CheckpointError(f"{shard}: listed in {INDEX_FILE} but missing")
            held = _shard_tensors(path, file)
            for name in sorted(held.keys() & tensors.keys()):
                raise CheckpointError(f"{shard}: tensor {name} is also in {path / tensors[name].file} (one file a "
                                      "tensor)")
            tensors |= held
        for name, file in weight_map.items():
            if name not in tensors or tensors[name].file != file:
                raise CheckpointError(f"{path / file}: tensor {name} is listed in {INDEX_FILE} but not in the file")
        return tensors

    @staticmethod
    def _check(config: SwitchConfig, tensors: dict[str, TensorInfo], path: Path, listing: Path) -> None:
        check_tensor_names(config, tensors, listing, lambda name: path / tensors[name].file)
        check_tensor_shapes(config, tensors, lambda name: path / tensors[name].file)

    @property
    def dtype_name(self) -> str:
        """The checkpoint's floating-point dtype (that of its embedding): "fp32", "bf16" or "fp16"."""
        return DTYPE_OF_SAFETENSORS[self.tensors[self.embedding].dtype]

    @property
    def embedding(self) -> str:
        """The tensor of the tied embedding and LM head: `shared.weight`, else the first copy of it the checkpoint
        holds, which transformers ties in its place (untied, the embedding of the first stack there is)."""
        return next(name for name in ("shared.weight", *TIED_COPIES) if name in self.tensors)

    def dtype_warnings(self, raw_config: dict) -> list[str]:
        """What to say where the tensors' dtypes differ from one another, or from the dtype config.json gives
        (`dtype`, or `torch_dtype` as transformers wrote it before v5), which transformers' default load follows:
        served in the embedding's dtype by default, the outputs are then not those of that load."""
        own, warnings = DTYPES[self.dtype_name], []
        # The routers aside: they compute in their router_dtype, whatever they are held in.
        if other := next((name for name, info in self.tensors.items()
                          if info.dtype != own.safetensors and ".mlp.router." not in name), None):
            info = self.tensors[other]
            warnings.append(f"{self.path / info.file}: tensor {other} is {info.dtype}, the embedding "
                            f"{own.safetensors}: served in {own.torch} unless --dtype says otherwise, each tensor "
                            "cast as it loads")
        said = raw_config.get("dtype") or raw_config.get("torch_dtype")
        if isinstance(said, str) and said in DTYPE_OF_TORCH and said != own.torch:
            warnings.append(f"{self.path / 'config.json'}: dtype {said}, but the tensors are {own.torch}: served in "
                            f"{own.torch} unless --dtype says otherwise (transformers' default load follows the "
                            f"config: --dtype {DTYPE_OF_TORCH[said]} serves as it does)")
        return warnings

    def served_dtype(self, dtype: str | None) -> str:
        """The dtype it is served in: `dtype`, else its own."""
        return dtype or self.dtype_name

    @property
    def dtype(self):
        """The checkpoint's floating-point dtype as a torch.dtype."""
        from experts.wire import torch_dtype  # imports torch: only where tensors are used (see `iter_tensors`)

        return torch_dtype(self.dtype_name)

    def _check_here(self, file: str, names: list[str]) -> None:
        """The shard `file`, where it is read (another node's copy, or the file since changed), checked as `open`
        checked it, and its tensors `names` as they were there: a CheckpointError naming the file and the tensor."""
        path = self.path / file
        if not path.is_file():
            raise CheckpointError(f"{path}: missing on node {platform.node()}, where the checkpoint is read")
        here = _shard_tensors(self.path, file)
        for name in names:
            was, now = self.tensors[name], here.get(name)
            if now != was:
                found = "missing" if now is None else f"{now.dtype} {list(now.shape)}"
                raise CheckpointError(f"{path}: tensor {name} is {found} on node {platform.node()}, "
                                      f"{was.dtype} {list(was.shape)} where the checkpoint was opened")

    def check_tied_copies(self) -> None:
        """With tied embeddings (config.json's tie_word_embeddings), the copies of `shared.weight` a checkpoint may
        also hold (the embeddings of each stack, the LM head) must equal it: transformers would use a copy that
        differs as it is, and warn; serving `shared.weight` for it would give other answers. A CheckpointError
        naming the file and the copy. Reads them: the front's check, at load."""
        embedding = self.embedding
        copies = [name for name in TIED_COPIES if name in self.tensors and name != embedding]
        if not self.config.tie_word_embeddings or not copies:
            return
        tensors = self.read([embedding, *copies])
        for name in copies:
            if not tensors[name].equal(tensors[embedding]):
                raise CheckpointError(f"{self.path / self.tensors[name].file}: tensor {name} differs from "
                                      f"{embedding}, though config.json ties them (tie_word_embeddings): the config "
                                      "is not the weights'")

    def with_only(self, names: Collection[str]) -> SwitchCheckpoint:
        """This checkpoint knowing only the tensors `names`: what an expert actor, which reads its own alone, is
        sent."""
        return replace(self, tensors={name: self.tensors[name] for name in names}, names_read=set())

    def read(self, names: list[str]) -> dict:
        """{name: torch.Tensor} of the named tensors, opening each shard once and reading only their bytes."""
        return dict(self.iter_tensors(names))

    def iter_tensors(self, names: list[str]):
        """(name, tensor) for each named tensor, shard by shard, read as the caller asks for the next one (so a
        caller that moves each to a GPU holds one tensor at a time in host memory)."""
        # Reading tensors needs torch; importing it here keeps commands that only read headers quick.
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self.tensors:  # asked for by a placement of another checkpoint's layout
                raise CheckpointError(f"{self.path}: no tensor {name}")
            by_file.setdefault(self.tensors[name].file, []).append(name)
        for file, file_names in by_file.items():
            self._check_here(file, file_names)
            with safe_open(self.path / file, framework="pt") as f:
                for name in file_names:
                    self.names_read.add(name)
                    yield name, f.get_tensor(name)
