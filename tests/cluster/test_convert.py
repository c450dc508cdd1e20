"""`switch-serve convert`: sharded .bin checkpoints to safetensors, and Hub ids where there is no network."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from reference import hf_generate
from safetensors import safe_open

from cluster.cli import main
from cluster.convert import BIN_INDEX_FILE, convert
from experts.checkpoint import CheckpointError
from experts.placement import PlacementConfig
from router_service.engine import SwitchCluster

PROMPTS = [[5, 9, 23, 4, 17, 60, 33, 2, 11, 48, 1], [71, 3, 1], [14, 15, 16, 90, 27, 1]]
EXPERT = "decoder.block.1.layer.2.mlp.experts.expert_5.wi.weight"


def save_bin_shards(model, folder, shards: int) -> None:
    """The released checkpoints' layout: pickled state dicts in shards (tied weights sharing storage, as
    transformers' own .bin files had them), an index naming each tensor's shard, config.json beside them."""
    folder.mkdir()
    model.config.to_json_file(str(folder / "config.json"))
    state = model.state_dict()
    names = list(state)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[i::shards]}
        torch.save(part, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    (folder / BIN_INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def cut_short_at_the_third_shard(monkeypatch, src, dst) -> list[int]:
    """Convert `src` to `dst` as a run interrupted at its third shard (Ctrl-C; SIGTERM or SIGKILL leave the same),
    then put the conversion back as it was; returns the shards it converted."""
    from cluster import convert as converting

    real, converted = converting.convert_shard, []

    def cut_at_the_third(path, number, *args):
        if number == 3:
            raise KeyboardInterrupt
        converted.append(number)
        return real(path, number, *args)

    monkeypatch.setattr(converting, "convert_shard", cut_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        convert(src, dst)
    monkeypatch.setattr(converting, "convert_shard", real)
    return converted


def test_sharded_bin_converts_to_the_same_model(ray_cluster, checkpoint_factory, tmp_path):
    _, hf_model = checkpoint_factory("convert", num_experts=8, expert_capacity=64)
    src, dst = tmp_path / "bin", tmp_path / "safetensors"
    save_bin_shards(hf_model, src, shards=3)
    main(["convert", str(src), str(dst)])
    # Each file holds the front's tensors or one sparse layer's experts, those in expert order.
    for file in dst.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            names = list(f.keys())
        layers = {n.split(".mlp.experts.")[0] for n in names if ".mlp.experts." in n}
        assert len(layers) <= 1 and (not layers or len(layers) == 1 and all(".mlp.experts." in n for n in names))
    with SwitchCluster(dst, placement=PlacementConfig(experts_per_actor=4)) as model:
        outputs = model.generate(PROMPTS, max_new_tokens=8)
    assert [o.token_ids for o in outputs] == [t for t, _ in hf_generate(hf_model, PROMPTS, 8)]


def test_config_that_disagrees_with_the_weights_follows_them(checkpoint_factory, tmp_path, caplog):
    """switch-c-2048's case: config.json says fewer decoder layers than the weights hold, all sparse."""
    _, hf_model = checkpoint_factory("convert-all-sparse", num_layers=2, num_sparse_encoder_layers=2,
                                     num_decoder_layers=3, num_sparse_decoder_layers=3)
    src = tmp_path / "bin"
    save_bin_shards(hf_model, src, shards=2)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "num_decoder_layers": 2, "decoder_sparse_step": 0}))
    with caplog.at_level(logging.WARNING):
        checkpoint = convert(src, tmp_path / "out")
    assert "the weights hold 3 blocks, 3 sparse; following the weights" in caplog.text
    assert checkpoint.config.num_decoder_layers == 3 and checkpoint.config.decoder_sparse_step == 1
    # Written so: transformers (or anyone) loading the converted folder builds the model its weights are.
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (written["num_decoder_layers"], written["decoder_sparse_step"]) == (3, 1)


def test_pickles_that_are_not_plain_weights_are_refused(checkpoint_factory, tmp_path):
    _, hf_model = checkpoint_factory("convert", num_experts=8, expert_capacity=64)
    src = tmp_path / "bin"
    save_bin_shards(hf_model, src, shards=1)
    torch.save({"weights": hf_model.state_dict(), "code": print}, src / "pytorch_model-00001-of-00001.bin")
    with pytest.raises(CheckpointError, match="pytorch_model-00001-of-00001.bin: cannot be loaded as weights only"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["bin"]


def test_a_bad_config_fails_before_any_shard_is_converted(checkpoint_factory, tmp_path, monkeypatch):
    """switch-c-2048's 364 shards take hours to convert: a config.json that cannot be served fails first, naming
    the file. Fails if it is read only after the shards."""
    from cluster import convert as converting

    _, hf_model = checkpoint_factory("convert", num_experts=8, expert_capacity=64)
    src = tmp_path / "bin"
    save_bin_shards(hf_model, src, shards=2)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(config | {"dense_act_fn": "gated-gelu"}))
    monkeypatch.setattr(converting, "load_shard", lambda path: pytest.fail(f"converted {path.name} first"))
    with pytest.raises(CheckpointError, match=r"bin/config\.json: dense_act_fn 'gated-gelu' is not an activation"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


EXTRA = "encoder.block.9.layer.0.SelfAttention.q.weight"  # a block the tiny models have not


def edit_index(src, change) -> None:
    """Rewrite the `.bin` index's weight_map with `change` (a function of it)."""
    index = json.loads((src / BIN_INDEX_FILE).read_text())
    (src / BIN_INDEX_FILE).write_text(json.dumps(index | {"weight_map": change(index["weight_map"])}))


@pytest.mark.parametrize("damage, message", [
    (lambda src: edit_index(src, lambda m: m | {EXTRA: m["shared.weight"]}),
     rf"bin/pytorch_model\.bin\.index\.json: tensor {re.escape(EXTRA)} is not part of the model config\.json "
     "describes$"),
    (lambda src: edit_index(src, lambda m: {k: v for k, v in m.items() if k != "encoder.final_layer_norm.weight"}),
     r"bin/pytorch_model\.bin\.index\.json: tensor encoder\.final_layer_norm\.weight is missing \(config\.json "
     "expects shape"),
    (lambda src: (src / "pytorch_model-00002-of-00003.bin").unlink(),
     r"bin/pytorch_model-00002-of-00003\.bin: listed in pytorch_model\.bin\.index\.json but missing$"),
    (lambda src: [(src / f"pytorch_model-0000{i}-of-00003.bin").unlink() for i in (2, 3)],
     r"bin/pytorch_model-00002-of-00003\.bin: listed in .* but missing \(2 shards missing in all\)$"),
    (lambda src: (src / BIN_INDEX_FILE).write_text(json.dumps({"weight_map": ["shared.weight"]})),
     r"pytorch_model\.bin\.index\.json: not a checkpoint index \(its weight_map maps no tensor names"),
    (lambda src: (src / BIN_INDEX_FILE).write_text(json.dumps({"weight_map": {"shared.weight": 3}})),
     r"pytorch_model\.bin\.index\.json: not a checkpoint index \(its weight_map maps no tensor names"),
])
def test_a_bad_index_or_a_missing_shard_fails_before_any_shard_is_converted(checkpoint_factory, tmp_path,
                                                                           monkeypatch, damage, message):
    """An index that lists no files (a traceback before), shards it lists that are not there, or tensors that are
    not the model's config.json describes (both found only after the shards before them were converted, hours into
    switch-c-2048's), fail at once, naming the file."""
    from cluster import convert as converting

    _, hf_model = checkpoint_factory("convert", num_experts=8, expert_capacity=64)
    src = tmp_path / "bin"
    save_bin_shards(hf_model, src, shards=3)
    damage(src)
    monkeypatch.setattr(converting, "load_shard", lambda path: pytest.fail(f"converted {path.name} first"))
    with pytest.raises(CheckpointError, match=message):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.update({EXPERT: t[EXPERT][:, :4].clone()}), rf"tensor {EXPERT} has shape \[\d+, 4\], config\.json "),
    (lambda t: t.update({EXPERT: t[EXPERT].double()}), rf"tensor {EXPERT} has dtype float64, expected one of F32"),
    (lambda t: t[EXPERT].view(-1)[:3].fill_(float("nan")), rf"tensor {EXPERT} holds 3 NaN or infinite values"),
    (lambda t: t.update({"extra.weight": torch.zeros(2)}), r"tensor extra\.weight is not part of the model"),
], ids=["shape", "dtype", "nan", "not the index's"])
def test_a_bad_tensor_is_named_in_its_shard_before_the_shard_is_converted(checkpoint_factory, tmp_path, damage,
                                                                          message):
    """A tensor of the wrong shape or dtype, one that holds a NaN, or one the index does not list (none of the
    model's) in a sharded checkpoint: named in its source .bin shard as that shard is read, nothing written for it
    (found only by the converted folder's check before, after every shard was converted, and named in the converted
    file). Fails if the shard is converted first."""
    _, hf_model = checkpoint_factory("convert", num_experts=8, expert_capacity=64)
    src = tmp_path / "bin"
    save_bin_shards(hf_model, src, shards=3)
    shard = src / json.loads((src / BIN_INDEX_FILE).read_text())["weight_map"][EXPERT]
    state = torch.load(shard, weights_only=True)
    damage(state)
    torch.save(state, shard)
    number = int(shard.name.split("-")[1])
    with pytest.raises(CheckpointError, match=rf"bin/{shard.name}: {message}"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list((tmp_path / ".out.partial").glob(f"model-{number:05d}-*"))  # (shards before it kept)


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_hub_id_without_network_fails_in_one_line(env):
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "plan", "--model", "google/switch-base-8",
                             "--gpus", "1"], capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert result.returncode == 2
    assert result.stderr.startswith("switch-serve: error: model: google/switch-base-8 is not a folder here, and "
                                    "downloading it from the Hugging Face Hub failed (")
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_tokenizer_and_generation_config_come_along(checkpoint_factory, tmp_path):
    """The files beside the weights (tokenizer, generation config) are copied into the converted folder as they
    are; the .bin weights are not, nor other frameworks' weights or stray shards (gigabytes, of no use there). Fails
    if conversion leaves the tokenizer behind (the converted model could not decode)."""
    _, hf_model = checkpoint_factory("convert", num_experts=8, expert_capacity=64)
    src = tmp_path / "bin"
    save_bin_shards(hf_model, src, shards=1)
    others = {"tokenizer.json": '{"version": "1.0"}', "generation_config.json": '{"decoder_start_token_id": 0}'}
    for name, text in others.items():
        (src / name).write_text(text)
    for name in ("flax_model.msgpack", "tf_model.h5", "model-00001-of-00002.safetensors"):  # other weights: left
        (src / name).write_bytes(b"\0" * 16)
    convert(src, tmp_path / "out")
    for name, text in others.items():
        assert (tmp_path / "out" / name).read_text() == text
    assert not list((tmp_path / "out").glob("*.bin")) and not (tmp_path / "out" / BIN_INDEX_FILE).exists()
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.suffix in (".msgpack", ".h5")]
    assert not (tmp_path / "out" / "model-00001-of-00002.safetensors").exists()


def test_converting_into_an_existing_folder_is_refused(checkpoint_factory, tmp_path):
    """`dst` must not exist: what is there stays as it was. Fails if conversion goes ahead (replacing an empty
    folder, or failing half-way with an OSError on a full one)."""
    _, hf_model = checkpoint_factory("convert", num_experts=8, expert_capacity=64)
    src = tmp_path / "bin"
    save_bin_shards(hf_model, src, shards=1)
    for contents in ([], ["notes.txt"]):
        dst = tmp_path / f"out-{len(contents)}"
        dst.mkdir()
        for name in contents:
            (dst / name).write_text("keep")
        with pytest.raises(CheckpointError, match=f"{dst}: already exists"):
            convert(src, dst)
        assert sorted(p.name for p in dst.iterdir()) == contents
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "out-0", "out-1"]


def test_a_conversion_cut_short_goes_on_from_the_shards_it_finished(checkpoint_factory, tmp_path, monkeypatch):
    """Interrupted at its third shard (Ctrl-C; SIGTERM or SIGKILL leave the same), a conversion keeps the two it
    finished beside `dst`, which does not appear; run again, it converts the third alone, and the result holds every
    tensor as a conversion in one go writes it. Fails if a run starts over, or leaves its work where the next cannot
    find it."""
    from cluster import convert as converting

    _, hf_model = checkpoint_factory("convert", num_experts=8, expert_capacity=64)
    src = tmp_path / "bin"
    save_bin_shards(hf_model, src, shards=3)
    whole = convert(src, tmp_path / "whole")
    real, converted = converting.convert_shard, cut_short_at_the_third_shard(monkeypatch, src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.partial").is_dir() and converted == [1, 2]
    monkeypatch.setattr(converting, "convert_shard", lambda *args: converted.append(args[1]) or real(*args))
    resumed = convert(src, tmp_path / "out")
    assert converted == [1, 2, 3] and not (tmp_path / ".out.partial").exists()
    assert resumed.tensors.keys() == whole.tensors.keys()
    assert sorted(p.name for p in resumed.path.iterdir()) == sorted(p.name for p in whole.path.iterdir())
    for name in whole.tensors:
        assert torch.equal(resumed.read([name])[name], whole.read([name])[name]), name


def test_a_conversion_cut_short_is_not_taken_up_by_another_sources(checkpoint_factory, tmp_path, monkeypatch):
    """Another checkpoint of the same shapes converted to the same `dst` after a run was cut short starts again: its
    shards have the same names and sizes, but not its weights. Fails if the first run's shards are kept."""
    _, first = checkpoint_factory("convert", num_experts=8, expert_capacity=64)
    _, second = checkpoint_factory("convert-other", num_experts=8, expert_capacity=64, seed=1)
    save_bin_shards(first, tmp_path / "first", shards=3)
    save_bin_shards(second, tmp_path / "second", shards=3)
    cut_short_at_the_third_shard(monkeypatch, tmp_path / "first", tmp_path / "out")
    out = convert(tmp_path / "second", tmp_path / "out")
    state = second.state_dict()
    for name in out.tensors:
        assert torch.equal(out.read([name])[name], state[name]), name


def test_a_conversion_cut_short_in_another_layout_starts_again(checkpoint_factory, tmp_path, monkeypatch):
    """A conversion begun by a version that wrote another layout of files (its record names none) is not finished in
    this one: the files of the two would mix in one checkpoint. Fails if its shards are kept."""
    from cluster import convert as converting

    _, hf_model = checkpoint_factory("convert", num_experts=8, expert_capacity=64)
    src = tmp_path / "bin"
    save_bin_shards(hf_model, src, shards=3)
    real, converted = converting.convert_shard, cut_short_at_the_third_shard(monkeypatch, src, tmp_path / "out")
    record = tmp_path / ".out.partial" / converting.SOURCE_RECORD
    record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "layout"}))
    monkeypatch.setattr(converting, "convert_shard", lambda *args: converted.append(args[1]) or real(*args))
    convert(src, tmp_path / "out")
    assert converted == [1, 2, 1, 2, 3]


def test_a_conversion_whose_records_were_cut_short_starts_again(checkpoint_factory, tmp_path, monkeypatch):
    """A record left empty (a full disk as it was written): the conversion starts again, or converts that shard
    again, rather than failing every later run on a JSON error that names no file. Fails if the record is read as
    it is."""
    from cluster import convert as converting

    _, hf_model = checkpoint_factory("convert", num_experts=8, expert_capacity=64)
    src = tmp_path / "bin"
    save_bin_shards(hf_model, src, shards=3)
    real, converted = converting.convert_shard, cut_short_at_the_third_shard(monkeypatch, src, tmp_path / "out")
    partial = tmp_path / ".out.partial"
    (partial / ".shard-00002.json").write_text("")
    monkeypatch.setattr(converting, "convert_shard", lambda *args: converted.append(args[1]) or real(*args))
    convert(src, tmp_path / "out")
    assert converted == [1, 2, 2, 3]  # the second shard's record cut short: that shard again
    shutil.rmtree(tmp_path / "out")
    cut_short_at_the_third_shard(monkeypatch, src, tmp_path / "out")
    (partial / converting.SOURCE_RECORD).write_text("")
    converted.clear()
    monkeypatch.setattr(converting, "convert_shard", lambda *args: converted.append(args[1]) or real(*args))
    convert(src, tmp_path / "out")
    assert converted == [1, 2, 3]  # the source's record cut short: from the start


def test_weights_whose_tied_copies_differ_are_not_converted(checkpoint_factory, tmp_path):
    """With tied embeddings, an LM head that is not shared.weight: refused as the conversion checks its result, as a
    front would refuse it at load, so that no checkpoint that cannot be served appears. Fails if it is written."""
    _, hf_model = checkpoint_factory("convert", num_experts=8, expert_capacity=64)
    src = tmp_path / "bin"
    save_bin_shards(hf_model, src, shards=1)
    (file,) = src.glob("*.bin")
    state = torch.load(file, weights_only=True)
    state["lm_head.weight"] = state["shared.weight"] + 1  # its own tensor, no longer the shared one
    torch.save(state, file)
    with pytest.raises(CheckpointError, match="tensor lm_head.weight differs from shared.weight"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_conversion_cut_in_its_last_check_keeps_its_shards(checkpoint_factory, tmp_path, monkeypatch):
    """Cut short while the whole result is checked, a conversion keeps every shard it converted for the next run.
    Fails if the shards' records go before that check."""
    from cluster import convert as converting

    _, hf_model = checkpoint_factory("convert", num_experts=8, expert_capacity=64)
    save_bin_shards(hf_model, tmp_path / "bin", shards=2)
    opened = converting.SwitchCheckpoint.open

    def cut_while_checking(path):
        if path.name.endswith(".partial"):
            raise KeyboardInterrupt
        return opened(path)

    monkeypatch.setattr(converting.SwitchCheckpoint, "open", cut_while_checking)
    with pytest.raises(KeyboardInterrupt):
        convert(tmp_path / "bin", tmp_path / "out")
    assert len(list((tmp_path / ".out.partial").glob(".shard-*.json"))) == 2
    monkeypatch.setattr(converting.SwitchCheckpoint, "open", opened)
    monkeypatch.setattr(converting, "convert_shard", lambda *args: pytest.fail("converted a shard again"))
    assert convert(tmp_path / "bin", tmp_path / "out").tensors
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_a_shard_rewritten_since_a_conversion_was_cut_short_is_converted_again(checkpoint_factory, tmp_path,
                                                                              monkeypatch):
    """A source shard changed between the run cut short and the next (re-downloaded, fixed) is converted again;
    the others are kept. Fails if a finished shard is kept whatever its source now holds."""
    from cluster import convert as converting

    _, hf_model = checkpoint_factory("convert", num_experts=8, expert_capacity=64)
    src = tmp_path / "bin"
    save_bin_shards(hf_model, src, shards=3)
    cut_short_at_the_third_shard(monkeypatch, src, tmp_path / "out")
    real, first = converting.convert_shard, src / "pytorch_model-00001-of-00003.bin"
    from experts.checkpoint import TIED_COPIES

    # Its weights changed, its embeddings' copies still equal (a checkpoint that could not be served is refused).
    changed = {name: tensor if name in ("shared.weight", *TIED_COPIES) else tensor * 2
               for name, tensor in torch.load(first, weights_only=True).items()}
    torch.save(changed, first)
    converted = []
    monkeypatch.setattr(converting, "convert_shard", lambda *args: converted.append(args[1]) or real(*args))
    resumed = convert(src, tmp_path / "out")
    assert converted == [1, 3]
    for name, tensor in changed.items():
        assert torch.equal(resumed.read([name])[name], tensor), name


def test_a_layers_experts_lie_in_their_numbers_order(checkpoint_factory, tmp_path):
    """safetensors lays a file out by name (expert_10 before expert_2): each file holds experts of as many digits,
    so that in each, the experts lie in their numbers' order, and an actor's experts (a range of numbers) are one
    contiguous run of each file it reads. Fails if a layer's experts of one and of two digits share a file."""
    _, hf_model = checkpoint_factory("convert-12-experts", num_experts=12, num_layers=2, num_sparse_encoder_layers=1,
                                     num_sparse_decoder_layers=1)
    src, dst = tmp_path / "bin", tmp_path / "safetensors"
    save_bin_shards(hf_model, src, shards=1)
    convert(src, dst)
    layer_files = 0
    for file in dst.glob("*.safetensors"):
        header = json.loads(file.read_bytes()[8:8 + int.from_bytes(file.read_bytes()[:8], "little")])
        laid_out = sorted((entry["data_offsets"][0], name) for name, entry in header.items() if name != "__metadata__")
        experts = [int(name.split("expert_")[1].split(".")[0]) for _, name in laid_out if ".mlp.experts." in name]
        if experts:
            layer_files += 1
            assert experts == sorted(experts) and len({len(str(e)) for e in experts}) == 1, (file.name, experts)
    assert layer_files == 2 * 2  # two sparse layers, experts 0-9 and 10-11 of each


def test_a_hub_id_downloaded_before_is_served_without_the_hub(tmp_path):
    """Offline (HF_HUB_OFFLINE), a Hub id an earlier run downloaded resolves to the copy in the Hub's cache, as the
    Hub's library lays it out: the snapshot, and the listing of every file of the repo at that commit, including
    those a run does not download (the other kind of weights, the README). Fails if every run must reach the Hub, or
    if the cache is asked for files it was never meant to hold."""
    repo = tmp_path / "hub" / "models--google--switch-base-8"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_text("{}")
    listing = {name: {"size": 2, "blob_id": f"{i:040x}"}
               for i, name in enumerate(["config.json", "model.safetensors", "pytorch_model.bin", "README.md"])}
    (repo / "trees").mkdir()
    (repo / "trees" / "0123abcd.json").write_text(json.dumps({"format_version": 1, "files": listing}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = subprocess.run([sys.executable, "-c", "from cluster.convert import resolve_model; "
                                                   "print(resolve_model('google/switch-base-8'))"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(snapshot)


def test_without_the_hub_the_copy_downloaded_before_is_taken_as_it_is(tmp_path, monkeypatch):
    """The Hub unreachable: safetensors weights downloaded before are served, .bin ones through their conversion made
    before; a copy with the config alone (planned, never served) is refused, naming what to do; with nothing
    downloaded, the Hub's own error is the one reported. A repo the Hub lists without weights switch-serve reads is
    said to be so. Fails if a stale or empty copy is taken silently."""
    import huggingface_hub

    from cluster import convert as converting

    class Offline:
        def list_repo_files(self, repo_id):
            if repo_id == "google/no-weights":
                return ["config.json", "flax_model.msgpack"]
            raise ConnectionError("the Hub is unreachable")

    cached = {"google/safe": tmp_path / "safe", "google/bin": tmp_path / "bin" / "snapshots" / "abc",
              "google/config-only": tmp_path / "config-only", "google/no-weights": tmp_path / "no-weights"}
    for folder in cached.values():
        folder.mkdir(parents=True)
    (cached["google/safe"] / "model.safetensors").touch()
    (cached["google/bin"] / "pytorch_model.bin").touch()
    converted = tmp_path / "bin" / "switch-serve-safetensors" / "abc"
    converted.mkdir(parents=True)

    def snapshot_download(repo_id, local_files_only=False, allow_patterns=None):
        assert local_files_only or repo_id == "google/no-weights", "asked the Hub for files after it did not answer"
        if repo_id not in cached:
            raise FileNotFoundError("not in the local cache")
        return str(cached[repo_id])

    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert converting.resolve_model("google/safe") == cached["google/safe"]
    assert converting.resolve_model("google/bin") == converted
    with pytest.raises(CheckpointError, match="config-only: the copy downloaded before .* holds no weights; run once"):
        converting.resolve_model("google/config-only")
    with pytest.raises(CheckpointError, match=r"google/unseen is not a folder here.*\(the Hub is unreachable\)"):
        converting.resolve_model("google/unseen")
    with pytest.raises(CheckpointError, match="google/no-weights has no .safetensors or .bin weights on the Hugging"):
        converting.resolve_model("google/no-weights")  # the Hub answered: nothing to download again


def test_a_shard_that_cannot_be_written_is_named_in_one_line(checkpoint_factory, tmp_path, monkeypatch, capsys):
    """A full disk while writing a shard: one line naming the file and the I/O error, not a traceback, and the
    shards finished before kept for the next run. Fails if safetensors' error escapes as it is."""
    from safetensors import SafetensorError

    from cluster import convert as converting

    _, hf_model = checkpoint_factory("convert", num_experts=8, expert_capacity=64)
    src = tmp_path / "bin"
    save_bin_shards(hf_model, src, shards=2)
    real, written = converting.save_file, []

    def full_disk(tensors, path, metadata):
        if written and path.name.startswith("model-00002"):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        written.append(path.name)
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(converting, "save_file", full_disk)
    with pytest.raises(SystemExit):
        main(["convert", str(src), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"switch-serve: error: {tmp_path}/.out.partial/model-00002")
    assert err.endswith("No space left on device (os error 28)")
    assert any((tmp_path / ".out.partial").glob(".shard-*.json")) and not (tmp_path / "out").exists()
