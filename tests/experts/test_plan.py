"""The placement planner on the released checkpoints' architectures (no weights needed)."""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter

import pytest
from reference import MODEL_CONFIGS
from transformers import SwitchTransformersConfig

from cluster.cli import main
from cluster.testing import tiny_config
from experts.plan import ACTIVATION_RESERVE, PlanError, front_bytes, make_plan, parse_bytes, read_stats
from experts.spec import SwitchConfig, expert_bytes, sparse_layers

CONFIGS = MODEL_CONFIGS
GiB = 2**30

# (checkpoint, GPUs, GiB per GPU, nodes): sensible deployments of each released architecture.
DEPLOYMENTS = [("switch-base-8", 1, 24, 1), ("switch-base-8", 2, 24, 2), ("switch-base-128", 4, 40, 1),
               ("switch-large-128", 8, 40, 2), ("switch-xxl-128", 32, 80, 4), ("switch-c-2048", 48, 80, 6),
               ("switch-c-2048", 64, 80, 8)]


def config(name: str) -> SwitchTransformersConfig:
    return SwitchTransformersConfig.from_json_file(CONFIGS / f"{name}.json")


def expected_experts(name: str) -> int:
    """Sparse layers as transformers reads the config (switch-xxl-128's published steps of 2 included),
    except switch-c-2048's decoder, where the weights win."""
    c = config(name)
    layers = [len(sparse_layers(c, "encoder")), 15 if name == "switch-c-2048" else len(sparse_layers(c, "decoder"))]
    return sum(layers) * c.num_experts


@pytest.mark.parametrize("name, gpus, gib, nodes", DEPLOYMENTS)
def test_plans_of_released_architectures(name, gpus, gib, nodes):
    plan = make_plan(config(name), gpus=gpus, gpu_memory=gib * GiB, nodes=nodes)
    placed = Counter(key for g in plan.gpus for key in g.experts)
    assert len(placed) == expected_experts(name) and set(placed.values()) == {1}  # every expert once
    assert all(g.bytes <= plan.budget_bytes for g in plan.gpus)  # no GPU over budget
    counts = [len(g.experts) for g in plan.gpus]
    assert max(counts) - min(counts) <= 1  # uniform load: balanced to one expert
    assert Counter(g.node for g in plan.gpus) == {n: gpus // nodes for n in range(nodes)}


def test_switch_c_2048_follows_the_weights_and_says_so():
    plan = make_plan(config("switch-c-2048"), gpus=48, gpu_memory=80 * GiB)
    assert sum(len(g.experts) for g in plan.gpus) == 30 * 2048
    assert len({(s, layer) for g in plan.gpus for s, layer, _ in g.experts if s == "decoder"}) == 15
    assert any("decoder has 12 layers but 15 sparse" in w for w in plan.warnings)


def test_too_few_gpus_says_how_many_it_takes():
    with pytest.raises(PlanError, match=r"61440 experts of 49 MiB need at least 41 GPUs of 80 GiB .*; 30 given"):
        make_plan(config("switch-c-2048"), gpus=30, gpu_memory=80 * GiB)


def test_load_statistics_balance_and_replicate_hot_experts():
    c = config("switch-base-8")
    stats = {("encoder", 1, e): 1000.0 if e == 3 else 10.0 for e in range(8)}  # expert 3 of layer 1 is hot
    plan = make_plan(c, gpus=4, gpu_memory=24 * GiB, replicate_hot=1, stats=stats)
    holders = [g for g in plan.gpus if ("encoder", 1, 3) in g.experts]
    assert len(holders) == 2 and plan.replicas == {"encoder.1.3": 2}
    assert max(g.load for g in plan.gpus) < 1000  # without its replica, one GPU would carry all of its load


def tiny_plan(gpus: int, experts_per_gpu: int, **options):
    """A plan of tiny_config's 8 experts (4 in each of 2 sparse layers) over GPUs with room for so many each."""
    c = tiny_config(num_experts=4, num_layers=2, num_decoder_layers=2, num_sparse_encoder_layers=1,
                    num_sparse_decoder_layers=1)
    room = (experts_per_gpu + 0.5) * expert_bytes(c, "fp32") / (1 - ACTIVATION_RESERVE)
    return make_plan(c, gpus=gpus, gpu_memory=int(room), dtype="fp32", **options)


def test_replicas_placed_apart_where_the_copies_just_fit():
    """12 copies (4 experts twice) on 3 GPUs of room for 4: a layout exists. Fails if the replicas are placed by load
    among the rest, which left a second copy only its twin's GPU (an IndexError)."""
    stats = {("encoder", 1, e): n for e, n in enumerate([1, 100, 100, 1])}
    stats.update({("decoder", 1, e): n for e, n in enumerate([2, 2, 2, 10])})
    plan = tiny_plan(3, 4, replicate_hot=4, stats=stats)
    assert [len(g.experts) for g in plan.gpus] == [4, 4, 4]
    placed = Counter(key for g in plan.gpus for key in g.experts)
    assert sorted(placed.values()) == [1] * 4 + [2] * 4
    assert all(len(set(g.experts)) == len(g.experts) for g in plan.gpus)  # no GPU holds both copies


def test_replicas_keep_the_heaviest_first_balance():
    """One hot expert a layer, fewer replicated than there are layers: placed heaviest first, the hot experts without
    a second copy spread over the GPUs as well. Fails if the replicas always go first (1.31 here)."""
    c = config("switch-base-8")
    stats = {(s, layer, e): 1e4 / (1 + e) ** 2 for s in ("encoder", "decoder") for layer in sparse_layers(c, s)
             for e in range(c.num_experts)}
    plan = make_plan(c, gpus=16, gpu_memory=80 * GiB, replicate_hot=8, stats=stats)
    assert len(plan.replicas) == 8 and plan.to_json()["load_imbalance"] < 1.02


def test_experts_no_token_went_to_spread_over_the_gpus():
    """Statistics of a server that has served nothing yet: every load 0. Fails if the GPU first in order takes
    them all while it has room, or the imbalance divides by the zero mean."""
    plan = tiny_plan(2, 8, stats={("encoder", 1, e): 0.0 for e in range(4)} | {("decoder", 1, e): 0.0
                                                                             for e in range(4)})
    assert [len(g.experts) for g in plan.gpus] == [4, 4]
    assert plan.to_json()["load_imbalance"] == 1.0


@pytest.mark.parametrize("options, message", [
    ({"gpus": 5, "nodes": 2}, "gpus: 5 GPUs cannot be spread evenly over 2 nodes"),
    ({"gpus": 0}, "gpus: must be at least 1, got 0"), ({"gpus": 4, "nodes": 0}, "nodes: must be at least 1, got 0"),
    ({"gpus": 1, "replicate_hot": 1}, "replicate_hot: replicas need at least 2 GPUs"),
    ({"gpus": 4, "dtype": "fp8"}, "dtype: one of fp32, bf16, fp16, int8, got 'fp8'"),
    ({"gpus": 4, "replicate_hot": 97}, "replicate_hot: 97 is more than the model's 96 experts"),
    ({"gpus": 4, "replicate_hot": 2}, "replicate_hot: needs stats"),
    ({"gpus": 4, "stats": {("decoder", 2, 0): 5.0}}, "stats: decoder.2 has no expert 0 in this model"),
    ({"gpus": 4, "stats": {("encoder", 1, 8): 5.0}}, "stats: encoder.1 has no expert 8 in this model")])
def test_a_plan_that_cannot_be_is_refused_naming_the_field(options, message):
    """GPUs are spread evenly over the nodes (5 over 2 would ask for a bundle on a third node, which the fleet never
    gets); replicas need a second GPU, and an expert to copy; the dtype is one the experts can be held in; the load
    statistics are of this model's experts (decoder.2 is a dense layer of switch-base-8, and it has 8 experts)."""
    with pytest.raises(PlanError, match=f"^{re.escape(message)}"):
        make_plan(config("switch-base-8"), gpu_memory=80 * GiB, **options)


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * GiB and parse_bytes("40GB") == 40 * 10**9 and parse_bytes("1024") == 1024
    assert parse_bytes("1.5TiB") == 1.5 * 2**40 and parse_bytes(".5 GB") == 5 * 10**8
    for text in ("lots", "80.0.0GiB", "1..5G", "."):
        with pytest.raises(PlanError, match="^gpu_memory: cannot read"):
            parse_bytes(text)


@pytest.mark.parametrize("text", ['{"encoder": [1, 2]}', '{"encoder.x": [1]}', '{"encoder.1": 5}', "[1, 2]",
                                  '{"encoder.1": ["a"]}', '{"encoder.1": [1, NaN]}', '{"encoder.1": [Infinity, 1]}',
                                  '{"encoder.1": [3, -5]}', '{"encoder.1": [true, 1]}'])
def test_a_stats_file_not_of_token_counts_is_refused_naming_it(tmp_path, text):
    path = tmp_path / "stats.json"
    path.write_text(text)
    with pytest.raises(PlanError, match=rf"^stats: {path}: expected"):
        read_stats(str(path))
    path.write_text("encoder.1: [1, 2]")  # not JSON
    with pytest.raises(PlanError, match=rf"^stats: {path} is not JSON \(Expecting value"):
        read_stats(str(path))
    path.write_bytes(b"\xff\xfe")  # not UTF-8
    with pytest.raises(PlanError, match=rf"^stats: {path} is not JSON"):
        read_stats(str(path))
    path.unlink()  # as on a node without the file
    with pytest.raises(PlanError, match=rf"^stats: {path} cannot be read on .* \(No such file or directory\)"):
        read_stats(str(path))


def test_int8_experts_fit_switch_c_2048_on_about_half_the_gpus(capsys):
    """int8 experts are held as one byte a weight (and a float32 scale per output channel); the front stays bf16."""
    bf16 = make_plan(config("switch-c-2048"), gpus=48, gpu_memory=80 * GiB)
    int8 = make_plan(config("switch-c-2048"), gpus=48, gpu_memory=80 * GiB, dtype="int8")
    assert (bf16.min_gpus, int8.min_gpus) == (41, 21)
    assert int8.front_bytes == bf16.front_bytes and 0.5 < int8.expert_bytes / bf16.expert_bytes < 0.51
    with pytest.raises(PlanError, match="need at least 21 GPUs"):
        make_plan(config("switch-c-2048"), gpus=20, gpu_memory=80 * GiB, dtype="int8")
    main(["plan", "--config", str(CONFIGS / "switch-c-2048.json"), "--gpus", "21", "--dtype", "int8"])
    assert "every expert fits on 21 such GPUs" in capsys.readouterr().out


def test_plan_command_json(capsys):
    main(["plan", "--config", str(CONFIGS / "switch-base-128.json"), "--gpus", "4", "--gpu-memory", "40GiB", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["num_actors"] == 4 and out["max_gpu_bytes"] <= out["budget_bytes_per_gpu"]
    assert sum(len(g["experts"]) for g in out["gpus"]) == 12 * 128


def test_a_config_the_front_cannot_serve_is_refused_by_plan_naming_the_field(capsys, tmp_path):
    """`plan --config` reads config.json as serving does: a router_dtype no front computes in (transformers takes any
    of torch's) is an error of one line naming the file and the field, not a traceback."""
    config = json.loads((CONFIGS / "switch-base-128.json").read_text()) | {"router_dtype": "float64"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exited:
        main(["plan", "--config", str(tmp_path / "config.json"), "--gpus", "4"])
    assert exited.value.code == 2
    assert "config.json: router_dtype 'float64' is not one of float32, bfloat16, float16" in capsys.readouterr().err


def test_experts_spread_evenly_over_the_nodes():
    """Of GPUs alike, the planner takes one node's after another's in turn: 96 experts on 64 GPUs of 4 nodes put 24 on
    each node (the 32 GPUs holding two spread over all four), and 96 on 128 GPUs use every node. Fails if the GPUs
    first in order fill first (32, 32, 16 and 16; a node left empty)."""
    from experts.placement import PlacementConfig

    plan = make_plan(config("switch-base-8"), gpus=64, nodes=4, gpu_memory=80 * GiB)
    assert Counter(g.node for g in plan.gpus for _ in g.experts) == {0: 24, 1: 24, 2: 24, 3: 24}
    assert PlacementConfig(gpus=128, nodes=4).place(config("switch-base-8"), "bf16").nodes == 4


@pytest.mark.parametrize("stats", [[1] * 6, [1, 2, 1, 7, 1, 7]])
def test_every_expert_replicated_where_the_copies_fit(stats):
    """Six experts, each twice, on 3 GPUs of room for 4: a layout exists whatever the loads; the planner finds it,
    each expert's copies on two GPUs. Fails if the hot experts' loads leave a copy only its twin's GPU."""
    c = tiny_config(num_experts=3, num_layers=2, num_decoder_layers=2, num_sparse_encoder_layers=1,
                    num_sparse_decoder_layers=1)
    room = 4.5 * expert_bytes(c, "fp32") / (1 - ACTIVATION_RESERVE)
    keys = [(stack, layer, e) for stack in ("encoder", "decoder") for layer in sparse_layers(c, stack)
            for e in range(3)]
    plan = make_plan(c, gpus=3, gpu_memory=int(room), dtype="fp32", replicate_hot=6,
                     stats=dict(zip(keys, map(float, stats))))
    for key in keys:
        assert len({g.gpu for g in plan.gpus if key in g.experts}) == 2, key
    assert plan.min_gpus == 3


def test_replicas_need_two_gpus_however_few_experts():
    """An expert's second copy goes to another GPU: a plan with replicas says so in its least GPUs. Fails if one GPU,
    which make_plan itself refuses for replicas, is given as enough."""
    c = config("switch-base-8")
    stats = {("encoder", 1, 3): 9.0}
    assert make_plan(c, gpus=2, gpu_memory=80 * GiB, replicate_hot=1, stats=stats).min_gpus == 2


def test_plans_of_many_small_shapes_keep_their_rules():
    """Random small plans, replicas and loads: each either places every copy (within the budget, an expert's copies
    on different GPUs) or is refused with a PlanError. Fails on any other error (a GPU passed over for a replica and
    put back in the wrong form broke the next placement)."""
    import random

    c = tiny_config(num_experts=4, num_layers=2, num_decoder_layers=2, num_sparse_encoder_layers=1,
                    num_sparse_decoder_layers=1)
    keys = [(stack, layer, e) for stack in ("encoder", "decoder") for layer in sparse_layers(c, stack)
            for e in range(4)]
    placed = 0
    for seed in range(300):
        rng = random.Random(seed)
        gpus, room = rng.randint(2, 5), (rng.randint(1, 6) + 0.5) * expert_bytes(c, "fp32") / (1 - ACTIVATION_RESERVE)
        stats = {key: float(rng.randint(0, 9)) for key in keys}
        try:
            plan = make_plan(c, gpus=gpus, gpu_memory=int(room), dtype="fp32", replicate_hot=rng.randint(0, 8),
                             stats=stats)
        except PlanError:
            continue
        placed += 1
        assert all(g.bytes <= plan.budget_bytes and len(set(g.experts)) == len(g.experts) for g in plan.gpus)
        assert Counter(k for g in plan.gpus for k in g.experts) == {k: plan.replicas.get(".".join(map(str, k)), 1)
                                                                      for k in keys}
    assert placed > 100


def test_an_untied_models_front_holds_each_stacks_embeddings_and_the_lm_head():
    """Untied, the front computes with each stack's own embed_tokens and the LM head (router_service.model): three
    vocabulary-sized matrices where a tied model holds one. Fails if the plan counts fewer."""
    tied, untied = (SwitchConfig.from_dict(tiny_config(tie_word_embeddings=tie).to_dict()) for tie in (True, False))
    assert front_bytes(untied, "bf16") - front_bytes(tied, "bf16") == 2 * untied.vocab_size * untied.d_model * 2


def test_the_fronts_routers_count_in_their_own_dtype():
    """transformers computes a router in its `router_dtype` (float32 in every released config) whatever the model's
    dtype, and so does the front: in bfloat16, each router weighs twice as much as the other weights do. Fails if the
    plan counts the routers in the serving dtype (switch-c-2048's front: 1.70 GiB, where it holds 1.94)."""
    config = SwitchConfig.from_dict(tiny_config(router_bias=False).to_dict())
    in_bf16 = dataclasses.replace(config, router_dtype="bfloat16")
    routers = sum(len(sparse_layers(config, stack)) for stack in ("encoder", "decoder")) * config.num_experts
    assert front_bytes(config, "bf16") - front_bytes(in_bf16, "bf16") == routers * config.d_model * 2
