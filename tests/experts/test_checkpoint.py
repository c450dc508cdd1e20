"""A damaged checkpoint fails at load time, naming the file and the tensor."""

from __future__ import annotations

import json
import re
import shutil
import struct

import pytest
import torch
from reference import edit_config
from safetensors.torch import load_file, save_file

from cluster.testing import tiny_config
from experts.checkpoint import CheckpointError, SwitchCheckpoint, read_config, unapplied_generation_settings
from experts.spec import expert_tensor_names, sparse_layers

EXPERT = "encoder.block.1.layer.1.mlp.experts.expert_2.wi.weight"


@pytest.fixture
def checkpoint(checkpoint_factory, tmp_path):
    """A private copy of a small single-file checkpoint, free to damage."""
    source, _ = checkpoint_factory("plain")
    shutil.copytree(source, tmp_path / "ckpt")
    return tmp_path / "ckpt"


@pytest.fixture
def sharded(checkpoint_factory, tmp_path):
    source, _ = checkpoint_factory("plain-sharded", max_shard_size="20KB")
    shutil.copytree(source, tmp_path / "sharded")
    return tmp_path / "sharded"


def rewrite(path, change) -> None:
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_valid_checkpoint_opens(checkpoint, sharded):
    single, many = SwitchCheckpoint.open(checkpoint), SwitchCheckpoint.open(sharded)
    assert single.tensors.keys() == many.tensors.keys()
    assert len({info.file for info in many.tensors.values()}) > 1
    assert single.dtype == torch.float32
    assert not single.names_read  # opening reads headers only


def test_truncated_file_names_file_and_tensor(checkpoint):
    file = checkpoint / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor \S+ is cut off"):
        SwitchCheckpoint.open(checkpoint)


def test_truncated_shard_names_the_shard(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    shard = sharded / index[EXPERT]
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: tensor \S+ is cut off"):
        SwitchCheckpoint.open(sharded)


def rewrite_header(path, change) -> None:
    """The file's header changed by `change(header)`, its data as it was."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])


@pytest.mark.parametrize("damage, message", [
    (lambda h: h[EXPERT].update(dtype="F16"), rf"tensor {EXPERT} has \d+ bytes, its shape \[\d+, \d+\] and dtype F16 "),
    (lambda h: h[EXPERT].pop("data_offsets"), rf"tensor {EXPERT} has a malformed header entry"),
    (lambda h: h[EXPERT].update(shape=[-1, 4]), rf"tensor {EXPERT} has a malformed header entry"),
    (lambda h: h[EXPERT].update(data_offsets=[0, h[EXPERT]["data_offsets"][1] - h[EXPERT]["data_offsets"][0]]),
     r"tensor \S+'s bytes \d+\.\.\d+ overlap another tensor's"),
    (lambda h: h[EXPERT].update(data_offsets=h[EXPERT]["data_offsets"][::-1]),
     rf"tensor {EXPERT} has a malformed header entry"),
], ids=["dtype of another size", "no offsets", "negative shape", "overlap", "offsets reversed"])
def test_a_damaged_header_names_the_file_and_tensor(checkpoint, damage, message):
    """Offsets, shapes and dtypes that disagree, as safetensors itself would refuse them when an actor reads the
    tensor: refused as the checkpoint opens, before anything starts."""
    rewrite_header(checkpoint / "model.safetensors", damage)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: {message}"):
        SwitchCheckpoint.open(checkpoint)


def test_bytes_after_the_last_tensor_are_refused(checkpoint):
    file = checkpoint / "model.safetensors"
    file.write_bytes(file.read_bytes() + bytes(64))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: 64 bytes after its last tensor's data"):
        SwitchCheckpoint.open(checkpoint)


@pytest.mark.parametrize("damage, message", [
    (lambda path: path.write_bytes(path.read_bytes()[:-100]), r"tensor \S+ is cut off"),
    (lambda path: rewrite(path, lambda t: t.update({EXPERT: t[EXPERT][:, :4].contiguous()})),
     rf"tensor {EXPERT} is F32 \[\d+, 4\] on node .*, F32 \[\d+, \d+\] where the checkpoint was opened"),
    (lambda path: rewrite(path, lambda t: t.pop(EXPERT)), rf"tensor {EXPERT} is missing on node"),
    (lambda path: path.unlink(), "missing on node"),
])
def test_weights_read_where_they_differ_from_those_opened_name_the_file_and_tensor(sharded, damage, message):
    """A checkpoint is opened (its headers checked) where the front starts, and read where each actor runs: another
    node's copy of it, truncated, of another model or missing, fails as it is read, naming the file and the tensor,
    instead of with safetensors' own error or a wrong shape at the first request."""
    checkpoint = SwitchCheckpoint.open(sharded)
    shard = sharded / checkpoint.tensors[EXPERT].file
    damage(shard)
    with pytest.raises(CheckpointError, match=rf"{shard.name}: {message}"):
        checkpoint.read([EXPERT])


@pytest.mark.parametrize("metadata", [{"format": 1}, ["pt"], "pt"])
def test_a_header_whose_metadata_is_not_strings_names_the_file(checkpoint, metadata):
    """safetensors refuses such a header as a tensor is read, with an error that names no file: refused as the
    checkpoint opens instead."""
    rewrite_header(checkpoint / "model.safetensors", lambda h: h.update(__metadata__=metadata))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: the safetensors header's __metadata__ is not a "
                                              "JSON object of strings"):
        SwitchCheckpoint.open(checkpoint)


def test_missing_expert(checkpoint):
    rewrite(checkpoint / "model.safetensors", lambda t: t.pop(EXPERT))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor {EXPERT} is missing"):
        SwitchCheckpoint.open(checkpoint)


@pytest.mark.parametrize("blocks", [1, 2])
def test_weights_short_of_their_last_blocks_name_the_first_missing_tensor(checkpoint, blocks):
    """A download cut short of the decoder's last block(s): the config (4 decoder layers) stands, as transformers
    reads it, and the load fails naming a tensor of the first block missing. Fails if the weights are read as a
    shallower model."""
    config = SwitchCheckpoint.open(checkpoint).config
    first = config.num_decoder_layers - blocks
    cut = tuple(f"decoder.block.{i}." for i in range(first, config.num_decoder_layers))
    rewrite(checkpoint / "model.safetensors", lambda t: [t.pop(n) for n in list(t) if n.startswith(cut)])
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor decoder\.block\.{first}\.\S+ is missing"):
        SwitchCheckpoint.open(checkpoint)


def test_wrong_shape(checkpoint):
    rewrite(checkpoint / "model.safetensors", lambda t: t.update({EXPERT: torch.zeros(3, 3)}))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor {EXPERT} has shape \[3, 3\]"):
        SwitchCheckpoint.open(checkpoint)


def test_unexpected_tensor(checkpoint):
    extra = "encoder.block.1.layer.1.mlp.experts.expert_9.wi.weight"
    rewrite(checkpoint / "model.safetensors", lambda t: t.update({extra: torch.zeros(3, 3)}))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor {extra} is not part of the model"):
        SwitchCheckpoint.open(checkpoint)


def test_integer_tensor_rejected(checkpoint):
    rewrite(checkpoint / "model.safetensors", lambda t: t.update({EXPERT: t[EXPERT].to(torch.int32)}))
    with pytest.raises(CheckpointError, match=rf"tensor {EXPERT} has dtype I32"):
        SwitchCheckpoint.open(checkpoint)


def test_shard_listed_but_absent(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    (sharded / index[EXPERT]).unlink()
    listed = rf"{index[EXPERT]}: listed in model\.safetensors\.index\.json but missing"
    with pytest.raises(CheckpointError, match=listed):
        SwitchCheckpoint.open(sharded)


def test_an_index_that_lists_a_tensor_in_another_shard_names_both(sharded):
    """The index says where each tensor is: a tensor in another shard than it says (a shard swapped for another
    one's copy, an index edited by hand) fails at load time rather than when a worker reads the wrong file."""
    index_file = sharded / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][EXPERT])
    index["weight_map"][EXPERT] = other
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{other}: tensor {EXPERT} is listed in"):
        SwitchCheckpoint.open(sharded)


def test_a_tensor_in_two_shards_names_both(sharded):
    """Which of two copies a loader reads would depend on the order of the shards: refused at load time, naming
    both files, whichever one the index lists."""
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    other = next(f for f in sorted(set(index.values())) if f != index[EXPERT])
    copy = load_file(sharded / index[EXPERT])[EXPERT]
    rewrite(sharded / other, lambda t: t.update({EXPERT: copy}))
    first, second = sorted([index[EXPERT], other])
    with pytest.raises(CheckpointError, match=rf"{second}: tensor {EXPERT} is also in .*{first} "):
        SwitchCheckpoint.open(sharded)


def test_gated_activation_rejected(checkpoint):
    edit_config(checkpoint, dense_act_fn="gated-gelu")
    with pytest.raises(CheckpointError, match=r"config\.json: dense_act_fn 'gated-gelu'"):
        SwitchCheckpoint.open(checkpoint)


def test_a_config_whose_position_buckets_or_start_token_cannot_be_used_is_rejected(checkpoint):
    """At load, naming the file and the field, not at the first request (a division by zero, an index error). The
    start token config.json's, with no generation config to give it."""
    (checkpoint / "generation_config.json").unlink()
    original = (checkpoint / "config.json").read_text()
    for fields, message in [({"relative_attention_num_buckets": 2}, "relative_attention_num_buckets: must be"),
                            ({"decoder_start_token_id": 10**6}, "decoder_start_token_id: 1000000 is not a token id")]:
        edit_config(checkpoint, **fields)
        with pytest.raises(CheckpointError, match=r"config\.json: not a valid Switch Transformers config \(" + message):
            SwitchCheckpoint.open(checkpoint)
        (checkpoint / "config.json").write_text(original)


def test_generation_config_gives_the_decoding_token_ids_and_a_bad_one_is_named(checkpoint):
    """generation_config.json's EOS and start tokens over config.json's (transformers' generate reads it); one that
    cannot be used, or a file that is no JSON object, names that file at load."""
    edit_config(checkpoint, "generation_config.json", eos_token_id=[7, 1], decoder_start_token_id=None, bos_token_id=4)
    config = SwitchCheckpoint.open(checkpoint).config
    assert (config.eos_token_id, config.decoder_start_token_id) == ([7, 1], 4)
    file = checkpoint / "generation_config.json"
    for text, message in [('{"eos_token_id": 1000000}', "eos_token_id: 1000000 is not a token id"),
                          ('{"bos_token_id": "<s>"}', "bos_token_id: expected"),
                          ("[1]", "expected a JSON object of fields, got list"), ("{", "not JSON")]:
        file.write_text(text)
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(file))}: {message}"):
            SwitchCheckpoint.open(checkpoint)
    # A config file of another name (as `plan --config` takes) stands alone.
    shutil.copy(checkpoint / "config.json", checkpoint / "other.json")
    assert read_config(checkpoint / "other.json").eos_token_id == 1
    file.unlink()  # then config.json's
    assert SwitchCheckpoint.open(checkpoint).config.eos_token_id == 1


def test_without_generation_config_the_decoding_token_ids_are_config_jsons_own(checkpoint):
    """Where there is no generation_config.json, transformers builds its generation config from config.json's own
    fields: one it lacks is unset, not the architecture's default (no EOS: an answer ends at its length). A null
    pad token loads, as in transformers; with no start, BOS or pad token the decoder has none to start with,
    refused at load. Fails if a missing EOS is taken as token 1."""
    from transformers import SwitchTransformersForConditionalGeneration

    (checkpoint / "generation_config.json").unlink()
    edit_config(checkpoint, eos_token_id=None)
    config = SwitchCheckpoint.open(checkpoint).config
    hf = SwitchTransformersForConditionalGeneration.from_pretrained(checkpoint).generation_config
    assert config.eos_token_id is None and hf.eos_token_id is None
    assert config.decoder_start_token_id == hf.decoder_start_token_id == 0
    raw = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps(raw | {"pad_token_id": None, "bos_token_id": 4,
                                                              "decoder_start_token_id": None}))
    config = SwitchCheckpoint.open(checkpoint).config
    assert (config.pad_token_id, config.decoder_start_token_id) == (None, 4)
    (checkpoint / "config.json").write_text(json.dumps(raw | {"pad_token_id": None, "decoder_start_token_id": None}))
    with pytest.raises(CheckpointError, match="config.json: not a valid Switch Transformers config "
                                              r"\(decoder_start_token_id: none, nor bos_token_id or pad_token_id"):
        SwitchCheckpoint.open(checkpoint)
    # The start token from a generation config (where transformers 5 saves it), the pad token null: served.
    (checkpoint / "generation_config.json").write_text('{"decoder_start_token_id": 2, "eos_token_id": 1}')
    config = SwitchCheckpoint.open(checkpoint).config
    assert (config.pad_token_id, config.decoder_start_token_id, config.eos_token_id) == (None, 2, 1)
    (checkpoint / "generation_config.json").write_text('{"eos_token_id": 1}')  # none there either: named
    with pytest.raises(CheckpointError, match=r"generation_config\.json: decoder_start_token_id: none"):
        SwitchCheckpoint.open(checkpoint)


def test_decoding_settings_switch_serve_does_not_apply_are_listed(checkpoint):
    file = checkpoint / "config.json"
    assert unapplied_generation_settings(file) == []  # as transformers saves a model's
    edit_config(checkpoint, "generation_config.json", do_sample=False, temperature=0.5, num_beams=1,
                repetition_penalty=1.2, no_repeat_ngram_size=3, min_new_tokens=None)
    assert unapplied_generation_settings(file) == ["repetition_penalty=1.2", "no_repeat_ngram_size=3"]
    edit_config(checkpoint, "generation_config.json", watermarking_config={"greenlist_ratio": 0.25})
    assert unapplied_generation_settings(file)[-1] == "watermarking_config={'greenlist_ratio': 0.25}"
    (checkpoint / "generation_config.json").write_text('{"num_beams": null, "bad_words_ids": null}')
    assert unapplied_generation_settings(file) == []  # a null is transformers' default too
    (checkpoint / "generation_config.json").unlink()  # then config.json's, as transformers reads them
    edit_config(checkpoint, num_beams=4)
    assert unapplied_generation_settings(file) == ["num_beams=4"]


def test_reading_tensors_reads_those_asked_for_and_no_other(checkpoint, monkeypatch):
    """What an expert actor or a front loads is only its own tensors, each read on its own from the shard (the
    per-process byte counts in test_actor measure it where the kernel counts reads). Fails if a shard is loaded
    whole, or other tensors are read with those asked for."""
    import safetensors
    import safetensors.torch

    opened = safetensors.safe_open
    got = []

    class Recording:
        def __init__(self, *args, **kwargs):
            self.file = opened(*args, **kwargs)

        def __enter__(self):
            self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def get_tensor(self, name):
            got.append(name)
            return self.file.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *args, **kwargs: pytest.fail("a shard loaded whole"))
    model = SwitchCheckpoint.open(checkpoint)
    wanted = [*expert_tensor_names("decoder", sparse_layers(model.config, "decoder")[0], 1), "shared.weight"]
    tensors = model.read(wanted)
    assert sorted(got) == sorted(wanted) == sorted(tensors) and model.names_read == set(wanted)


def test_a_router_dtype_transformers_has_not_is_rejected(checkpoint):
    edit_config(checkpoint, router_dtype="float8")
    with pytest.raises(CheckpointError, match=r"config\.json: router_dtype 'float8' is not one of float32"):
        SwitchCheckpoint.open(checkpoint)


def test_a_header_longer_than_its_file_is_truncation(checkpoint):
    """A file cut inside its header: named as truncated, not as a header that does not parse."""
    file = checkpoint / "model.safetensors"
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    file.write_bytes(raw[:8 + length - 4])
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: truncated safetensors file \(header of {length} "):
        SwitchCheckpoint.open(checkpoint)


def test_an_untied_models_own_lm_head_is_no_copy_to_check(checkpoint):
    """Untied (tie_word_embeddings false), the LM head is a weight of its own: it may differ from shared.weight.
    Fails if the tied copies' check refuses it (test_parity serves untied checkpoints against transformers)."""
    rewrite(checkpoint / "model.safetensors", lambda t: t.update({
        "lm_head.weight": t["shared.weight"] * 2, "encoder.embed_tokens.weight": t["shared.weight"] * 3,
        "decoder.embed_tokens.weight": t["shared.weight"].clone()}))
    edit_config(checkpoint, tie_word_embeddings=False)
    SwitchCheckpoint.open(checkpoint).check_tied_copies()


def test_tied_copies_that_differ_from_shared_weight_are_refused(checkpoint):
    """Tied embeddings may come with copies of `shared.weight` (released checkpoints carry them): equal, they are
    served as one; a copy that differs means config.json is not the weights' (transformers would use the copy as it
    is), which the front's load names. Fails if a differing copy is served as `shared.weight`."""
    def copies(tensors):
        for name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
            tensors[name] = tensors["shared.weight"].clone()

    rewrite(checkpoint / "model.safetensors", copies)
    SwitchCheckpoint.open(checkpoint).check_tied_copies()
    rewrite(checkpoint / "model.safetensors", lambda t: t["lm_head.weight"].mul_(2))
    tied = SwitchCheckpoint.open(checkpoint)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor lm_head\.weight differs from shared"):
        tied.check_tied_copies()


def test_a_tied_checkpoint_without_shared_weight_is_served_from_a_copy_of_it(checkpoint):
    """Tied, a checkpoint may hold a copy of `shared.weight` in its place (the encoder's embedding, say), which
    transformers ties as shared.weight: it opens, and the copy is the embedding (checked against the other copies);
    with neither, shared.weight is missing. Fails if such a checkpoint is refused."""
    def only_the_encoders(tensors):
        tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")
        tensors["lm_head.weight"] = tensors["encoder.embed_tokens.weight"].clone()

    rewrite(checkpoint / "model.safetensors", only_the_encoders)
    tied = SwitchCheckpoint.open(checkpoint)
    assert tied.embedding == "encoder.embed_tokens.weight" and tied.dtype_name == "fp32"
    tied.check_tied_copies()
    rewrite(checkpoint / "model.safetensors", lambda t: t["lm_head.weight"].mul_(2))
    with pytest.raises(CheckpointError, match=r"tensor lm_head\.weight differs from encoder\.embed_tokens\.weight"):
        SwitchCheckpoint.open(checkpoint).check_tied_copies()
    rewrite(checkpoint / "model.safetensors", lambda t: [t.pop(n) for n in ("encoder.embed_tokens.weight",
                                                                            "lm_head.weight")])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor shared\.weight is missing"):
        SwitchCheckpoint.open(checkpoint)


def test_no_weights_or_config(tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        SwitchCheckpoint.open(tmp_path)
    tiny_config().to_json_file(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        SwitchCheckpoint.open(tmp_path)


@pytest.mark.parametrize("text", ["null", "[]", '"switch"'])
def test_a_config_that_is_no_json_object_names_the_file(checkpoint, text):
    (checkpoint / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"config\.json: not a valid Switch Transformers config \(expected a JSON "
                                              r"object"):
        SwitchCheckpoint.open(checkpoint)


@pytest.mark.parametrize("weight_map", [[], {"shared.weight": 3}, None])
def test_an_index_whose_weight_map_is_malformed_names_the_index(sharded, weight_map):
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: not a safetensors index"):
        SwitchCheckpoint.open(sharded)


@pytest.mark.parametrize("layers, sparse, expected", [
    (12, 6, [1, 3, 5, 7, 9, 11]),  # switch-base: every other layer
    (3, 3, [0, 1, 2]),  # step 1: all
    (6, 2, [1, 4]),  # step 3
    (4, 0, [1]),  # transformers' "no sparse layers" setting still builds layer 1 sparse
])
def test_sparse_layers_follow_transformers(layers, sparse, expected):
    from transformers import SwitchTransformersForConditionalGeneration

    config = tiny_config(num_layers=layers, num_sparse_encoder_layers=sparse, num_decoder_layers=1,
                         num_sparse_decoder_layers=1)
    assert sparse_layers(config, "encoder") == expected
    model = SwitchTransformersForConditionalGeneration(config)
    assert [i for i, block in enumerate(model.encoder.block) if block.is_sparse] == expected
    assert expert_tensor_names("encoder", 1, 0)[0] == "encoder.block.1.layer.1.mlp.experts.expert_0.wi.weight"


def test_a_tensor_the_checkpoint_does_not_hold_is_named(checkpoint):
    """Asked for by a placement made for another layout: a CheckpointError naming the folder and the tensor, not a
    bare KeyError."""
    ckpt = SwitchCheckpoint.open(checkpoint)
    missing = expert_tensor_names("decoder", 7, 0)[0]
    with pytest.raises(CheckpointError, match=rf"^{checkpoint}: no tensor {missing}$"):
        ckpt.read([missing])


def test_a_folder_with_a_single_file_and_an_index_serves_the_single_file(checkpoint):
    """As transformers' from_pretrained loads it (the single file first), so that the parity holds. Fails if the
    index's shards are served instead (here, one that is missing)."""
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"shared.weight": "gone"}}))
    assert {info.file for info in SwitchCheckpoint.open(checkpoint).tensors.values()} == {"model.safetensors"}
    rewrite(checkpoint / "model.safetensors", lambda tensors: tensors.pop("encoder.final_layer_norm.weight"))
    with pytest.raises(CheckpointError, match=rf"^{checkpoint}/model.safetensors: tensor encoder.final_layer_norm"):
        SwitchCheckpoint.open(checkpoint)  # the file read named, not the index


def test_dtypes_that_differ_are_said_naming_the_file_and_tensor(checkpoint, caplog):
    """A tensor held in another dtype than the embedding's, or a config.json whose `dtype` (which transformers'
    default load follows) is not the tensors': served in the embedding's dtype, each said once as the checkpoint
    opens; a router in float32 beside bfloat16 weights is as transformers computes it, and said nothing of."""
    import logging

    with caplog.at_level(logging.WARNING, logger="experts.checkpoint"):
        SwitchCheckpoint.open(checkpoint)
    assert "dtype" not in caplog.text  # as transformers saved it
    rewrite(checkpoint / "model.safetensors", lambda t: t.update({EXPERT: t[EXPERT].half()}))
    edit_config(checkpoint, dtype="bfloat16")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="experts.checkpoint"):
        assert SwitchCheckpoint.open(checkpoint).dtype_name == "fp32"
    assert f"model.safetensors: tensor {EXPERT} is F16, the embedding F32: served in float32" in caplog.text
    assert "config.json: dtype bfloat16, but the tensors are float32" in caplog.text
    assert "--dtype bf16 serves as it does" in caplog.text


def test_routers_held_in_float32_beside_other_weights_are_said_nothing_of(checkpoint, caplog):
    import logging

    def to_bf16_but_routers(tensors):
        for name, tensor in tensors.items():
            if ".mlp.router." not in name:
                tensors[name] = tensor.to(torch.bfloat16)

    rewrite(checkpoint / "model.safetensors", to_bf16_but_routers)
    edit_config(checkpoint, dtype="bfloat16")
    with caplog.at_level(logging.WARNING, logger="experts.checkpoint"):
        assert SwitchCheckpoint.open(checkpoint).dtype_name == "bf16"
    assert "dtype" not in caplog.text and "F32" not in caplog.text


def test_an_expert_actor_is_sent_the_places_of_its_own_tensors_alone(tmp_path):
    """Every tensor's place, pickled, takes MiBs for a large checkpoint (switch-c-2048's 123,170), and each actor's
    creation sends its checkpoint: `with_only` keeps those it reads, which it reads as the whole would. Fails if the
    others are kept."""
    import pickle

    from cluster.testing import write_random_checkpoint

    write_random_checkpoint(tmp_path, tiny_config())
    checkpoint = SwitchCheckpoint.open(tmp_path)
    names = list(expert_tensor_names("encoder", sparse_layers(checkpoint.config, "encoder")[0], 1))
    own = checkpoint.with_only(names)
    assert sorted(own.tensors) == sorted(names) and own.names_read == set()
    assert len(pickle.dumps(own)) * 5 < len(pickle.dumps(checkpoint))
    read, whole = own.read(names), checkpoint.read(names)
    assert all(torch.equal(read[name], whole[name]) for name in names)
