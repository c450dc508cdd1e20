"""Generation through the expert actors, and with the experts computed by the front from their actors' pages,
equals transformers' own generate on the same checkpoint."""

from __future__ import annotations

import pytest
import ray
from reference import edit_config, hf_dropped_tokens, hf_generate, wait_until
from transformers import SwitchTransformersForConditionalGeneration

from experts.ffn import PackedWeight, unpacked
from experts.placement import PlacementConfig
from experts.spec import expert_tensor_names, sparse_layers
from router_service.engine import SwitchCluster
from router_service.model import PRODUCT_WEIGHTS

PROMPTS = [[5, 9, 23, 4, 17, 60, 33, 2, 11, 48, 1], [71, 3, 1], [14, 15, 16, 90, 27, 1], [88, 1]]
MAX_NEW = 10

# Each covers a different corner; together: 4 to 16 experts, sparse steps 1, 2 and 3 in each stack with
# different layer counts, relu and gelu-style activations, router bias on and off, tied and untied embeddings,
# capacities small enough to drop encoder tokens.
CONFIGS = {
    "relu-tied-step1-2": dict(num_experts=4, num_layers=3, num_sparse_encoder_layers=3, num_decoder_layers=4,
                              num_sparse_decoder_layers=2, dense_act_fn="relu", router_bias=False,
                              tie_word_embeddings=True, expert_capacity=2),
    "gelu_new-untied-bias-step3-1": dict(num_experts=8, num_layers=6, num_sparse_encoder_layers=2,
                                         num_decoder_layers=3, num_sparse_decoder_layers=3, dense_act_fn="gelu_new",
                                         router_bias=True, tie_word_embeddings=False, expert_capacity=64),
    "gelu-16experts-step2-3": dict(num_experts=16, num_layers=4, num_sparse_encoder_layers=2, num_decoder_layers=6,
                                   num_sparse_decoder_layers=2, dense_act_fn="gelu", router_bias=True,
                                   tie_word_embeddings=True, expert_capacity=1),
}
PACKING = {"relu-tied-step1-2": 2, "gelu_new-untied-bias-step3-1": 4, "gelu-16experts-step2-3": 4}


def assert_same_as_hf(outputs, reference):
    for out, (tokens, logprobs) in zip(outputs, reference, strict=True):
        assert out.token_ids == tokens
        assert out.logprobs == pytest.approx(logprobs, abs=1e-4)
        assert out.finish_reason == ("eos" if len(tokens) < MAX_NEW or tokens[-1] == 1 else "length")


@pytest.mark.parametrize("name", CONFIGS)
def test_matches_transformers(ray_cluster, checkpoint_factory, name):
    path, hf_model = checkpoint_factory(name, **CONFIGS[name])
    with SwitchCluster(path, placement=PlacementConfig(experts_per_actor=PACKING[name]), local_experts=False) as model:
        outputs = model.generate(PROMPTS, max_new_tokens=MAX_NEW)
    assert_same_as_hf(outputs, hf_generate(hf_model, PROMPTS, MAX_NEW))
    # Encoder drops reported per request equal what transformers' own routers drop (decoder steps are one
    # token per sequence, so they never go over a capacity of at least one).
    assert [o.dropped_tokens for o in outputs] == hf_dropped_tokens(hf_model, PROMPTS)


def test_the_python_api_leaves_a_ray_it_found_running(ray_cluster, checkpoint_factory):
    """As the README says: SwitchCluster uses a Ray already started and leaves it running, its own actors gone.
    Fails if closing shuts Ray down (later tests would start a Ray of their own unseen), or leaves the fleet up."""

    name = "gelu-16experts-step2-3"
    path, _ = checkpoint_factory(name, **CONFIGS[name])
    cluster = ray.get_runtime_context().gcs_address
    with SwitchCluster(path, placement=PlacementConfig(experts_per_actor=PACKING[name])) as model:
        fleet_actor = model.fleet
    assert ray.is_initialized() and ray.get_runtime_context().gcs_address == cluster
    # ray.kill returns before the actor is gone: a call made at once may still be answered.
    wait_until(lambda: fleet_is_gone(fleet_actor), "the fleet actor to be gone after closing")


def fleet_is_gone(fleet_actor) -> bool:
    try:
        ray.get(fleet_actor.node_id.remote(), timeout=30)
    except ray.exceptions.RayActorError:
        return True
    return False


def test_one_sequence_alone_matches_transformers(ray_cluster, checkpoint_factory):
    """Its decoding steps send each sparse layer's lone token to its expert's actor by a path of its own
    (router_service.dispatch): fails if that path computes with another expert or returns another token's output."""
    name = "gelu-16experts-step2-3"
    path, hf_model = checkpoint_factory(name, **CONFIGS[name])
    with SwitchCluster(path, placement=PlacementConfig(experts_per_actor=PACKING[name]), local_experts=False) as model:
        outputs = [model.generate([prompt], max_new_tokens=MAX_NEW)[0] for prompt in PROMPTS[:2]]
    assert_same_as_hf(outputs, hf_generate(hf_model, PROMPTS[:2], MAX_NEW))


def mapped_file(address: int) -> str | None:
    """The file this process maps at `address` (Linux), or None for anonymous memory."""
    for line in open("/proc/self/maps"):
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) > 5 else None
    return None


def test_front_computes_its_nodes_experts_from_the_checkpoints_pages(ray_cluster, checkpoint_factory):
    """Fails if the front computes experts in copies of their weights (not the checkpoint's own mapped pages, which
    its actors use too, with packed copies beside them: experts.ffn.pack), calls the actors when it holds their
    experts, or computes differently from them. One config: the expert math is the actors' (experts.ffn), tested on
    every config above."""
    name = "gelu-16experts-step2-3"
    path, hf_model = checkpoint_factory(name, **CONFIGS[name])
    with SwitchCluster(path, placement=PlacementConfig(experts_per_actor=PACKING[name])) as model:
        outputs = model.generate(PROMPTS, max_new_tokens=MAX_NEW)
        dispatcher = model.dispatcher
        assert dispatcher.calls == 0 and dispatcher.local_calls > 0
        assert {key for actor in model.placement.actors for key in actor.experts} == set(dispatcher.local)
        read = {name for name in model.checkpoint.names_read if ".mlp.experts." in name}
        assert read == {name for key in dispatcher.local for name in expert_tensor_names(*key)}
        assert all(isinstance(w, PackedWeight) for pair in dispatcher.local.values() for w in pair)
        files = {mapped_file(unpacked(w).data_ptr()) for pair in dispatcher.local.values() for w in pair}
        assert files == {str(path / "model.safetensors")}
        assert not any(sum(counts.values()) for counts in ray.get([a.token_counts.remote() for a in model.actors]))
        assert sum(map(sum, model.expert_token_counts().values())) == sum(dispatcher.local_tokens.values()) > 0
    assert_same_as_hf(outputs, hf_generate(hf_model, PROMPTS, MAX_NEW))
    assert [o.dropped_tokens for o in outputs] == hf_dropped_tokens(hf_model, PROMPTS)


@pytest.mark.parametrize("name, packed", [("relu-tied-step1-2", True), ("gelu_new-untied-bias-step3-1", True),
                                          ("gelu_new-untied-bias-step3-1", False)])
def test_the_front_packs_the_weights_of_its_products_unless_told_not_to(ray_cluster, checkpoint_factory, name, packed):
    """packed_weights (the default): every weight the front multiplies by, its own (a tied or untied LM head
    included) and those of the experts it computes, has a packed copy (experts.ffn.pack), and no other weight does;
    without, none has. Generation equals transformers' either way."""
    path, hf_model = checkpoint_factory(name, **CONFIGS[name])
    placement = PlacementConfig(experts_per_actor=PACKING[name])
    with SwitchCluster(path, placement=placement, packed_weights=packed) as model:
        outputs = model.generate(PROMPTS, max_new_tokens=MAX_NEW)
        front, local = model.front, model.dispatcher.local
        products = [front.lm_head, *front.fused.values(), *(w for pair in local.values() for w in pair),
                    *(w for n, w in front.weights.items() if n.endswith(PRODUCT_WEIGHTS))]
        assert local and len(products) > len(front.fused) + 2 * len(local) + 1
        assert all(isinstance(w, PackedWeight) == packed for w in products)
        assert not any(isinstance(w, PackedWeight) for n, w in front.weights.items() if not n.endswith(PRODUCT_WEIGHTS))
    assert_same_as_hf(outputs, hf_generate(hf_model, PROMPTS, MAX_NEW))


def test_a_layers_tokens_split_between_the_front_and_the_actors(ray_cluster, checkpoint_factory):
    """Fails if tokens computed here and by the actors in the same layer are put back in the wrong places."""
    name = "gelu_new-untied-bias-step3-1"
    path, hf_model = checkpoint_factory(name, **CONFIGS[name])
    with SwitchCluster(path, placement=PlacementConfig(experts_per_actor=PACKING[name])) as model:
        dispatcher = model.dispatcher
        dispatcher.use(model.actors, {key: w for key, w in dispatcher.local.items() if key[2] % 2 == 0})
        outputs = model.generate(PROMPTS, max_new_tokens=MAX_NEW)
        by_actors = [key for counts in ray.get([a.token_counts.remote() for a in model.actors])
                     for key, n in counts.items() if n]
        assert by_actors and all(expert % 2 for _, _, expert in by_actors)
        assert dispatcher.local_tokens and all(expert % 2 == 0 for _, _, expert in dispatcher.local_tokens)
    assert_same_as_hf(outputs, hf_generate(hf_model, PROMPTS, MAX_NEW))


def test_one_sequence_computes_its_tokens_expert_straight_away(ray_cluster, checkpoint_factory, monkeypatch):
    """A decoding step of one sequence computes its token's expert without grouping (the dispatcher's one-token path),
    and decodes transformers' tokens. Fails if that path computes another expert, or is not taken."""
    from router_service import dispatch

    name = "gelu_new-untied-bias-step3-1"  # no token over capacity: the encoder's calls all have several tokens
    path, hf_model = checkpoint_factory(name, **CONFIGS[name])
    grouped_rows, one_token_rows = [], []
    grouped_ffn, expert_ffn = dispatch.grouped_ffn, dispatch.expert_ffn
    monkeypatch.setattr(dispatch, "grouped_ffn", lambda x, *a: grouped_rows.append(len(x)) or grouped_ffn(x, *a))
    monkeypatch.setattr(dispatch, "expert_ffn", lambda x, *a: one_token_rows.append(len(x)) or expert_ffn(x, *a))
    with SwitchCluster(path, placement=PlacementConfig(experts_per_actor=PACKING[name])) as model:
        outputs = [model.generate([prompt], max_new_tokens=MAX_NEW)[0] for prompt in PROMPTS]
        steps, sparse = model.batcher.steps, len(sparse_layers(model.checkpoint.config, "decoder"))
    assert_same_as_hf(outputs, hf_generate(hf_model, PROMPTS, MAX_NEW))
    assert one_token_rows == [1] * (steps * sparse) and min(grouped_rows) > 1


def test_small_capacity_drops_tokens(checkpoint_factory):
    _, hf_model = checkpoint_factory("gelu-16experts-step2-3", **CONFIGS["gelu-16experts-step2-3"])
    assert sum(hf_dropped_tokens(hf_model, PROMPTS)) > 0  # so the parity case above covers dropping


def test_packing_sharding_and_micro_batches_do_not_change_outputs(ray_cluster, checkpoint_factory):
    config = CONFIGS["relu-tied-step1-2"]
    single, hf_model = checkpoint_factory("relu-tied-step1-2", **config)
    sharded, _ = checkpoint_factory("relu-tied-sharded", max_shard_size="20KB", **config)
    assert (sharded / "model.safetensors.index.json").is_file()
    reference = hf_generate(hf_model, PROMPTS, MAX_NEW)
    for path, per_actor, micro_batches in [(single, 1, 1), (sharded, 1, 1), (sharded, 3, 1), (single, 2, 2)]:
        with SwitchCluster(path, placement=PlacementConfig(experts_per_actor=per_actor),
                           micro_batches=micro_batches, local_experts=False) as model:
            assert len(model.actors) == -(-config["num_experts"] // per_actor)
            assert_same_as_hf(model.generate(PROMPTS, max_new_tokens=MAX_NEW), reference)


def test_front_and_actors_read_only_their_own_tensors(ray_cluster, checkpoint_factory):
    path, _ = checkpoint_factory("relu-tied-sharded", max_shard_size="20KB", **CONFIGS["relu-tied-step1-2"])
    with SwitchCluster(path, placement=PlacementConfig(experts_per_actor=3), local_experts=False) as model:
        expert_names = {n for n in model.checkpoint.tensors if ".mlp.experts." in n}
        front_read = model.checkpoint.names_read
        assert front_read and not front_read & expert_names
        assert front_read | expert_names == set(model.checkpoint.tensors)  # tied: no optional copies written
        read_by_actors = []
        for actor, hosted in zip(model.actors, model.placement.actors):
            read = set(ray.get(actor.tensors_read.remote()))
            own = {f"{stack}.block.{layer}.layer.{1 if stack == 'encoder' else 2}.mlp.experts.expert_{e}.{w}.weight"
                   for stack, layer, e in hosted.experts for w in ("wi", "wo")}
            assert read == own
            read_by_actors += read
    assert sorted(read_by_actors) == sorted(expert_names)  # every expert tensor read exactly once


def test_eos_ends_a_sequence_early(ray_cluster, checkpoint_factory, tmp_path, caplog):
    """Make a token the model emits mid-sequence the EOS in generation_config.json (config.json keeps its own, as
    transformers' generate reads the former): that sequence stops there, the others go on, as transformers' model
    loaded from the folder decodes them. A sampling default there is not applied, and said so."""
    import shutil

    path, hf_model = checkpoint_factory("relu-tied-step1-2", **CONFIGS["relu-tied-step1-2"])
    eos = hf_generate(hf_model, PROMPTS, MAX_NEW)[0][0][2]
    eos_path = tmp_path / "eos"
    shutil.copytree(path, eos_path)
    edit_config(eos_path, "generation_config.json", eos_token_id=[eos, 1], do_sample=True, temperature=0.7)
    reference = hf_generate(SwitchTransformersForConditionalGeneration.from_pretrained(eos_path), PROMPTS, MAX_NEW)
    with SwitchCluster(eos_path, placement=PlacementConfig(experts_per_actor=4)) as model:
        outputs = model.generate(PROMPTS, max_new_tokens=MAX_NEW)
    assert outputs[0].finish_reason == "eos" and outputs[0].token_ids[-1] == eos
    assert [o.token_ids for o in outputs] == [tokens for tokens, _ in reference]
    assert any(o.finish_reason == "length" for o in outputs)
    assert "generation config sets do_sample=True, which switch-serve does not apply" in caplog.text


def test_dropless_equals_unlimited_capacity(ray_cluster, checkpoint_factory):
    path, hf_model = checkpoint_factory("gelu-16experts-step2-3", **CONFIGS["gelu-16experts-step2-3"])
    routers = [m for name, m in hf_model.named_modules() if name.endswith("mlp.router")]
    for router in routers:
        router.expert_capacity = 10**6
    try:
        reference = hf_generate(hf_model, PROMPTS, MAX_NEW)
    finally:
        for router in routers:
            router.expert_capacity = 1
    with SwitchCluster(path, placement=PlacementConfig(experts_per_actor=8), capacity="dropless") as model:
        outputs = model.generate(PROMPTS, max_new_tokens=MAX_NEW)
    assert all(o.dropped_tokens == 0 for o in outputs)
    assert [o.token_ids for o in outputs] == [tokens for tokens, _ in reference]


def test_a_missing_decoder_start_token_is_the_bos_token_else_pad(ray_cluster, checkpoint_factory, tmp_path):
    """Without a start token, transformers' generate starts with the BOS token (generation_config.json's); without
    either, switch-serve starts with the pad token, T5's convention. Both other than 0, the start token of the
    checkpoints made here: fails if the start token is not read from them."""
    import shutil

    path, hf_model = checkpoint_factory("relu-tied-step1-2", **CONFIGS["relu-tied-step1-2"])
    for bos, start in [(5, 5), (None, 3)]:
        bare = tmp_path / f"no-start-{bos}"
        shutil.copytree(path, bare)
        edit_config(bare, decoder_start_token_id=None, pad_token_id=3)
        edit_config(bare, "generation_config.json", decoder_start_token_id=None, bos_token_id=bos)
        with SwitchCluster(bare, placement=PlacementConfig(experts_per_actor=4)) as model:
            assert model.checkpoint.config.decoder_start_token_id == start
            outputs = model.generate(PROMPTS, max_new_tokens=MAX_NEW)
        if bos is not None:  # as transformers' model loaded from the folder decodes
            reference = hf_generate(SwitchTransformersForConditionalGeneration.from_pretrained(bare), PROMPTS, MAX_NEW)
        else:  # transformers refuses to decode without either
            reference = hf_generate(hf_model, PROMPTS, MAX_NEW, decoder_start_token_id=start)
        assert_same_as_hf(outputs, reference)
        assert [o.token_ids for o in outputs] != [t for t, _ in hf_generate(hf_model, PROMPTS, MAX_NEW)]
