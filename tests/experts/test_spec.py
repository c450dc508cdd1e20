"""The Switch spec reads config.json as transformers does, and corrects configs that disagree with the weights
by one rule."""

from __future__ import annotations

import dataclasses
import json

import pytest
from reference import MODEL_CONFIGS
from transformers import SwitchTransformersConfig

from experts.checkpoint import read_config
from experts.spec import CONFIG_ALIASES, SwitchConfig, expected_tensors, follow_weights, sparse_layers

CONFIGS = MODEL_CONFIGS
FIELDS = [f.name for f in dataclasses.fields(SwitchConfig) if f.name != "decoder_start_token_id"]


@pytest.mark.parametrize("raw", [{}, {"num_layers": 6, "num_sparse_encoder_layers": 0, "num_decoder_layers": None},
                                 {"num_layers": 4, "num_sparse_encoder_layers": 3, "num_sparse_decoder_layers": 1},
                                 *[json.loads(p.read_text()) for p in sorted(CONFIGS.glob("*.json"))]])
def test_fields_and_defaults_are_transformers(raw):
    ours, theirs = SwitchConfig.from_dict(raw), SwitchTransformersConfig.from_dict(raw)
    assert {f: getattr(ours, f) for f in FIELDS} == {f: getattr(theirs, f) for f in FIELDS}
    assert SwitchConfig.of(theirs) == ours
    assert ours.decoder_start_token_id == raw.get("decoder_start_token_id", ours.pad_token_id)  # T5's convention


def test_without_a_decoder_start_token_the_decoder_starts_at_the_pad_token():
    """T5's convention, whatever the pad token is: fails if the default is 0 rather than the pad token (every
    released config pads with 0)."""
    assert SwitchConfig.from_dict({"pad_token_id": 3}).decoder_start_token_id == 3
    assert SwitchConfig.from_dict({"pad_token_id": 3, "decoder_start_token_id": 5}).decoder_start_token_id == 5


def test_transformers_other_names_of_fields_are_read_as_theirs():
    """config.json may say hidden_size for d_model (and so on), which transformers reads as d_model: fails if they
    are ignored (the defaults served, 768 wide) or one that contradicts its field is taken."""
    assert CONFIG_ALIASES == SwitchTransformersConfig.attribute_map
    raw = {"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 4, "num_sparse_encoder_layers": 2}
    ours, theirs = SwitchConfig.from_dict(raw), SwitchTransformersConfig.from_dict(raw)
    assert (ours.d_model, ours.num_heads, ours.num_layers) == (theirs.d_model, theirs.num_heads, theirs.num_layers)
    assert (ours.d_model, ours.num_heads, ours.num_layers) == (32, 2, 4)
    assert SwitchConfig.from_dict({"hidden_size": 32, "d_model": 32}).d_model == 32
    with pytest.raises(ValueError, match="hidden_size: 32, but d_model .the same field. is 64"):
        SwitchConfig.from_dict({"hidden_size": 32, "d_model": 64})


def test_a_field_of_the_wrong_type_is_named():
    with pytest.raises(ValueError, match="num_experts: expected int, got 'eight'"):
        SwitchConfig.from_dict({"num_experts": "eight"})
    with pytest.raises(ValueError, match="d_model: expected int, got True"):
        SwitchConfig.from_dict({"d_model": True})


@pytest.mark.parametrize("raw, message", [({"d_model": 0}, "d_model: must be at least 1, got 0"),
                                          ({"num_experts": -8}, "num_experts: must be at least 1, got -8"),
                                          ({"num_sparse_decoder_layers": -1}, "must be at least 0, got -1"),
                                          ({"relative_attention_num_buckets": 2},
                                           "relative_attention_num_buckets: must be at least 4, got 2"),
                                          ({"relative_attention_num_buckets": 32,
                                            "relative_attention_max_distance": 16},
                                           r"relative_attention_max_distance: must be more than 16 \(half the"),
                                          ({"decoder_start_token_id": 32128},
                                           r"decoder_start_token_id: 32128 is not a token id of the vocabulary \[0, "
                                           r"32128\)"),
                                          ({"eos_token_id": [1, -1]}, "eos_token_id: -1 is not a token id"),
                                          ({"eos_token_id": [1, "2"]}, "eos_token_id: '2' is not a token id"),
                                          ({"pad_token_id": 40000}, "pad_token_id: 40000 is not a token id")])
def test_a_size_a_model_cannot_have_is_named(raw, message):
    """Rather than a division by zero, or a plan of no experts, further on; a special token outside the vocabulary
    rather than an index error at the first request (or an end of sequence that never comes)."""
    with pytest.raises(ValueError, match=message):
        SwitchConfig.from_dict(raw)
    assert SwitchConfig.from_dict({"num_sparse_decoder_layers": 0, "num_decoder_layers": None}).num_decoder_layers == 12


def test_switch_c_2048_config_alone_reads_as_its_weights():
    published = read_config(CONFIGS / "switch-c-2048.json")
    assert sparse_layers(published, "decoder") == []  # a literal reading: 12 decoder layers, none sparse
    config, warnings = follow_weights(published)
    assert config.num_decoder_layers == 15 and sparse_layers(config, "decoder") == list(range(15))
    assert warnings == ["config.json: the decoder has 12 layers but 15 sparse; reading it as 15 blocks, all sparse, "
                        "as the released weights hold"]
    # The weights themselves say the same, by the same rule.
    from_weights, _ = follow_weights(published, list(expected_tensors(config)[0]))
    assert from_weights == config


def test_a_config_that_holds_together_stands_and_one_that_does_not_follows_the_weights():
    """A config of as many sparse layers as layers or fewer is read as transformers reads it, whatever the weights
    hold (a block missing, or one more: the checkpoint's check names them). One of more sparse layers than layers
    (switch-c-2048's decoder) takes the weights' blocks, and a layout of them transformers cannot build is refused.
    Fails if weights short of their last block are read as a shallower model."""
    config = SwitchConfig(num_layers=4, num_sparse_encoder_layers=2, num_decoder_layers=4,
                          num_sparse_decoder_layers=2)
    deeper = list(expected_tensors(dataclasses.replace(config, num_decoder_layers=6, decoder_sparse_step=3))[0])
    shallower = [n for n in expected_tensors(config)[0] if not n.startswith("decoder.block.3.")]
    assert follow_weights(config, deeper) == follow_weights(config, shallower) == (config, [])
    claims = dataclasses.replace(config, num_sparse_decoder_layers=6)  # 4 layers, of which 6 sparse
    followed, warnings = follow_weights(claims, deeper, "ckpt/config.json")
    assert (followed.num_decoder_layers, sparse_layers(followed, "decoder")) == (6, [1, 4])
    assert warnings == ["ckpt/config.json: the decoder has 4 layers but 6 sparse; the weights hold 6 blocks, "
                        "2 sparse; following the weights"]
    # The last block alone sparse: a step as long as the stack (2 here) is one transformers supports.
    last = dataclasses.replace(config, num_layers=2, encoder_sparse_step=2, num_sparse_encoder_layers=1)
    followed, _ = follow_weights(dataclasses.replace(last, num_sparse_encoder_layers=3),
                                 list(expected_tensors(last)[0]))
    assert (followed.num_layers, sparse_layers(followed, "encoder")) == (2, [1])
    odd = [n.replace("block.1.", "block.2.") for n in expected_tensors(config)[0] if n.startswith("encoder.block.1.")]
    with pytest.raises(ValueError, match=r"the encoder sparse blocks in the weights, \[2, 3\], follow no sparse step"):
        follow_weights(dataclasses.replace(config, num_sparse_encoder_layers=5),
                       [n for n in expected_tensors(config)[0] if not n.startswith("encoder.block.1.")] + odd)


def test_a_sparse_count_that_transformers_reads_as_the_weights_hold_is_written_as_they_hold_it():
    """2 decoder layers of which 3 sparse: transformers' step is then 0, a dense decoder, as the weights hold it.
    Read with the weights, the config says so in its counts, so that a reading without them (the GPU planner's)
    does not take it for 3 blocks, all sparse. Fails if the planner would place experts the weights do not hold."""
    config = SwitchConfig(num_layers=2, num_sparse_encoder_layers=1, num_decoder_layers=2,
                          num_sparse_decoder_layers=3)
    assert sparse_layers(config, "decoder") == []
    followed, warnings = follow_weights(config, list(expected_tensors(config)[0]))
    assert warnings == [] and sparse_layers(followed, "decoder") == [] and followed.num_decoder_layers == 2
    assert follow_weights(followed)[0] == followed  # the planner's reading, after it


def test_a_config_made_otherwise_than_from_json_is_checked_too():
    """The checks are the config's own: made in code, or by replacing a field, not only read from config.json. Fails
    if they are made in from_dict alone."""
    with pytest.raises(ValueError, match="relative_attention_num_buckets: must be at least 4"):
        SwitchConfig(relative_attention_num_buckets=2)
    with pytest.raises(ValueError, match="eos_token_id: 32128 is not a token id"):
        dataclasses.replace(SwitchConfig(), eos_token_id=32128)
