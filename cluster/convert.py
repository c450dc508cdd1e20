"""Released checkpoints as servable safetensors: `.bin` conversion and Hugging Face Hub downloads.

    switch-serve convert /models/switch-c-2048-bin /models/switch-c-2048

Conversion goes one `.bin` shard at a time (loaded with `weights_only`, memory-mapped), so memory stays near one
shard's size. Each shard's tensors are written grouped: the front's in one file, and each sparse layer's experts in
files of their own, one for each count of digits of their numbers (0-9, 10-99, ...). safetensors lays a file's
tensors out in the order of their names, which is the experts' order among numbers of as many digits (10 before 2,
but 2 before 3), so an actor hosting a range of a layer's experts reads one contiguous run of each file. A
conversion cut short goes on, run again, from the shards it finished.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from experts.checkpoint import (
    INDEX_FILE,
    CheckpointError,
    SwitchCheckpoint,
    TensorInfo,
    check_tensor_names,
    check_tensor_shapes,
    config_of_weights,
    read_config,
)
from experts.spec import (
    CONFIG_FILE,
    DTYPE_OF_TORCH,
    DTYPES,
    EXPERT_TENSOR,
    GENERATION_CONFIG_FILE,
    LAYER_FIELDS,
    TOKENIZER_FILES,
    SwitchConfig,
)

log = logging.getLogger(__name__)

BIN_FILE = "pytorch_model.bin"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"
WEIGHT_FILES = (BIN_FILE, BIN_INDEX_FILE, "model.safetensors", INDEX_FILE)
# Weights a source folder may hold besides those converted (other shards, other frameworks'): never copied over.
OTHER_WEIGHTS = (".bin", ".safetensors", ".msgpack", ".h5", ".ckpt", ".pt", ".pth", ".onnx", ".gguf")
HUB_FILES = [CONFIG_FILE, GENERATION_CONFIG_FILE, *TOKENIZER_FILES, "special_tokens_map.json"]
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
PARTIAL = ".{name}.partial"  # where a conversion to NAME is written, beside it, until it is whole
SOURCE_RECORD = ".source.json"  # in PARTIAL: what it converts (a run for another source starts it again)
# The layout of the files written (see the module's doc), in SOURCE_RECORD: a conversion begun with another is begun
# again, not finished in two layouts.
LAYOUT = "experts by layer and digits"


def bin_shards(src: Path) -> tuple[list[str], list[str] | None]:
    """The `.bin` files of a folder, each there: checked before any is converted (switch-c-2048's 364 take hours);
    and the tensors its index names (None for a single file, which has none)."""
    index = src / BIN_INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise ValueError("its weight_map maps no tensor names to file names")
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a checkpoint index ({e})") from None
        shards = sorted(set(weight_map.values()))
        if missing := [shard for shard in shards if not (src / shard).is_file()]:
            raise CheckpointError(f"{src / missing[0]}: listed in {BIN_INDEX_FILE} but missing"
                                  + (f" ({len(missing)} shards missing in all)" if len(missing) > 1 else ""))
        return shards, list(weight_map)
    if (src / BIN_FILE).is_file():
        return [BIN_FILE], None
    raise CheckpointError(f"{src}: no {BIN_FILE} or {BIN_INDEX_FILE} to convert")


def group_of(name: str) -> tuple:
    """The file group of a tensor: the front's, or a sparse layer's experts whose numbers have as many digits as its
    expert's (see the module's doc)."""
    match = EXPERT_TENSOR.match(name)
    if not match:
        return ("front",)
    stack, layer, expert = match.groups()
    return stack, int(layer), "experts", 10 ** (len(expert) - 1) if len(expert) > 1 else 0, 10 ** len(expert) - 1


def safetensors_dtype(dtype: torch.dtype) -> str:
    """The safetensors header's code of a dtype switch-serve serves (F32, BF16, F16), else torch's name of it."""
    name = str(dtype).removeprefix("torch.")
    return DTYPES[DTYPE_OF_TORCH[name]].safetensors if name in DTYPE_OF_TORCH else name


def check_finite(tensor: torch.Tensor, name: str, file: Path) -> None:
    """A tensor that holds a NaN or an infinity is a CheckpointError naming `file` and it: served, every answer its
    layer touches would be NaN. Checked here, not as a served process reads its weights, which safetensors maps
    lazily: there the check would read every page at load."""
    if not (finite := tensor.isfinite()).all():
        raise CheckpointError(f"{file}: tensor {name} holds {finite.numel() - int(finite.sum())} NaN or infinite "
                              "values")


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a damaged or unsafe file
        raise CheckpointError(f"{path}: cannot be loaded as weights only ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return state


def write_record(path: Path, record: dict) -> None:
    """A conversion's record, written whole or not at all (a full disk, a kill mid-write)."""
    path.with_suffix(".tmp").write_text(json.dumps(record))
    os.replace(path.with_suffix(".tmp"), path)


def read_record(path: Path) -> dict | None:
    """A record `write_record` wrote; None for one that is not (written by another version, damaged)."""
    try:
        record = json.loads(path.read_text())
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def convert(src: str | os.PathLike, dst: str | os.PathLike) -> SwitchCheckpoint:
    """Convert a `.bin` checkpoint folder (one file or shards with an index) to a safetensors folder at `dst`,
    which must not exist yet; returns it opened (and so fully checked). Written shard by shard into a folder beside
    it (PARTIAL) and renamed into place once whole, so `dst` is either complete or absent. A run cut short (an
    error, Ctrl-C, SIGTERM, the OOM killer) leaves the shards it finished there, and the same command run again goes
    on from them: switch-c-2048's 364 shards take hours."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise CheckpointError(f"{dst}: already exists")
    config_file = src / CONFIG_FILE
    config = read_config(config_file)  # a bad one fails before any shard is converted
    shards, names = bin_shards(src)
    if names is not None:  # the weights' names, checked against the config before hours of converting
        config = config_of_weights(config, names, config_file)  # (what it logs, once: the later call finds it so)
        check_tensor_names(config, names, src / BIN_INDEX_FILE)
    work = dst.parent / PARTIAL.format(name=dst.name)
    origin = {"src": str(src.resolve()), "shards": shards, "layout": LAYOUT}
    if (work / SOURCE_RECORD).is_file() and read_record(work / SOURCE_RECORD) != origin:
        log.warning("%s holds a conversion of another source, or in another layout, or a record cut short: "
                    "started again", work)
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    write_record(work / SOURCE_RECORD, origin)
    try:
        weight_map, total = {}, 0
        for number, shard in enumerate(shards, 1):
            done = work / f".shard-{number:05d}.json"
            stat = (src / shard).stat()  # a shard changed since is converted again
            source = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            record = read_record(done) if done.is_file() else None
            if record is None or record.get("source") != source:
                for file in (record or {}).get("files", {}):
                    (work / file).unlink(missing_ok=True)
                record = {"source": source, **convert_shard(src / shard, number, len(shards), work,
                                                            config if names is not None else None)}
                write_record(done, record)  # after the shard's files
            else:
                log.warning("%s: converted by an earlier run, kept from %s", shard, work)
            for file, names in record["files"].items():
                weight_map |= dict.fromkeys(names, file)
            total += record["bytes"]
        (work / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                  indent=2))
        raw = json.loads(config_file.read_text())
        config = config_of_weights(config, list(weight_map), config_file)
        (work / CONFIG_FILE).write_text(json.dumps(raw | {f: getattr(config, f) for f in LAYER_FIELDS}, indent=2))
        for other in src.iterdir():  # the tokenizer's files, the generation config: not weights of any kind
            if other.is_file() and other.name not in WEIGHT_FILES and other.name != CONFIG_FILE \
                    and not other.name.endswith(OTHER_WEIGHTS):
                shutil.copy2(other, work / other.name)
        SwitchCheckpoint.open(work).check_tied_copies()  # every tensor checked before dst appears, as a front would
        os.replace(work, dst)
        for marker in [dst / SOURCE_RECORD, *dst.glob(".shard-*")]:  # kept until dst is whole
            marker.unlink()
    except BaseException:
        finished = len(list(work.glob(".shard-*.json")))
        if finished:
            log.warning("kept the %d shard(s) converted in %s: the same command goes on from them", finished, work)
        else:
            shutil.rmtree(work, ignore_errors=True)
        raise
    return SwitchCheckpoint.open(dst)


def convert_shard(path: Path, number: int, count: int, work: Path, config: SwitchConfig | None) -> dict:
    """Write the tensors of `.bin` shard `path` (number `number` of `count`) into `work`, grouped; returns
    {"files": {file: tensor names}, "bytes": their size}. Each tensor is checked first, its dtype and shape against
    `config` where the weights' names are known before converting (a sharded checkpoint's index), naming the shard:
    else the converted folder's check, at the end, names the file it was written to."""
    state = load_shard(path)
    if config is not None:
        check_tensor_shapes(config, {name: TensorInfo(path.name, tuple(t.shape), safetensors_dtype(t.dtype))
                                     for name, t in state.items()}, lambda name: path)
    for name, t in state.items():
        check_finite(t, name, path)
    groups: dict[tuple, list[str]] = {}
    for name in state:
        groups.setdefault(group_of(name), []).append(name)
    files, total = {}, 0
    for group, names in sorted(groups.items(), key=lambda item: (item[0] != ("front",), item[0])):
        file = f"model-{number:05d}-of-{count:05d}-{'-'.join(map(str, group))}.safetensors"
        tensors, seen = {}, set()
        for name in names:
            t = state[name].contiguous()
            if t.untyped_storage().data_ptr() in seen:  # tied weights share storage in .bin files
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
            tensors[name] = t
            total += t.nbytes
        try:
            save_file(tensors, work / file, metadata={"format": "pt"})
        except SafetensorError as e:  # a full disk, say: one line naming the file, not a traceback
            raise CheckpointError(f"{work / file}: {e}") from None
        files[file] = names
    return {"files": files, "bytes": total}


def resolve_model(model: str | os.PathLike, weights: bool = True) -> Path:
    """A checkpoint folder for `model`: a folder as it is, else a Hugging Face Hub id, downloaded (only the
    config, tokenizer and, with `weights`, the weights) and converted to safetensors on first use; where the Hub
    cannot be reached (offline, HF_HUB_OFFLINE), the copy an earlier run downloaded."""
    path = Path(model)
    if path.exists() or not HUB_ID.fullmatch(str(model)):
        return path
    try:
        folder, online = hub_snapshot(str(model), weights)
    except Exception as e:  # unreachable hub with nothing downloaded before, unknown repo, ...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"model: {model} is not a folder here, and downloading it from the Hugging Face Hub "
                              f"failed ({reason})") from None
    if not weights or any(folder.glob("*.safetensors")):
        return folder
    converted = folder.parent.parent / "switch-serve-safetensors" / folder.name
    if not converted.exists():
        if not any(folder.glob("*.bin")):
            raise CheckpointError(
                f"model: {model} has no .safetensors or .bin weights on the Hugging Face Hub" if online else
                f"model: {model}: the copy downloaded before ({folder}) holds no weights; run once with the Hugging "
                "Face Hub reachable to download them")
        log.warning("%s has only .bin weights; converting them to safetensors in %s (once)", model, converted)
        convert(folder, converted)
    return converted


def hub_snapshot(model: str, weights: bool) -> tuple[Path, bool]:
    """The files of Hub id `model` that serving needs, in the Hub's cache: its config and tokenizer and, with
    `weights`, its safetensors weights, or its .bin ones where it has none; and whether the Hub answered. Where the
    Hub cannot be reached, the snapshot an earlier run downloaded, if any; else the Hub's error."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # its retry notices; the outcome is reported in one line
    try:
        files = HfApi().list_repo_files(model) if weights else []
    except Exception as unreachable:
        try:
            # The config's files alone asked for: the Hub's library refuses a snapshot that lacks any file of the
            # repo's listing asked for, and a run downloads one of its kinds of weights (checked by the caller).
            return Path(snapshot_download(model, local_files_only=True, allow_patterns=HUB_FILES)), False
        except Exception:
            raise unreachable from None
    safetensors = [f for f in files if f.endswith(".safetensors") or f == INDEX_FILE]
    wanted = safetensors or [f for f in files if f.endswith(".bin") or f == BIN_INDEX_FILE]
    return Path(snapshot_download(model, allow_patterns=HUB_FILES + wanted)), True
