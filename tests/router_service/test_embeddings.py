"""Embeddings, the encoder alone: the Python API equals transformers' SwitchTransformersEncoderModel (mean over
the tokens, and every token's vector), and embedding requests share the encoder's passes with generation. gRPC
`Embed` is tested in test_server, OpenAI's /v1/embeddings with its client in test_openai. And, on the same Python
API model, a call's prompts sampling with seeds of their own."""

from __future__ import annotations

import pytest
import torch
from reference import hf_dropped_tokens
from transformers import SwitchTransformersEncoderModel

from experts.placement import PlacementConfig
from router_service.batching import ContinuousBatcher, Sequence, run_to_completion
from router_service.engine import SwitchCluster
from router_service.requests import SamplingParams

PROMPTS = [[5, 9, 23, 4, 17, 60, 33, 2, 11, 48, 1], [71, 3, 1], [14, 15, 16, 90, 27, 1], [88, 1]]
# Capacity 2: the encoder drops tokens, per input, as transformers does.
CONFIG = dict(num_experts=8, num_layers=4, num_sparse_encoder_layers=2, expert_capacity=2, router_bias=True)


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory):
    path, _ = checkpoint_factory("embeddings", **CONFIG)
    encoder = SwitchTransformersEncoderModel.from_pretrained(path).eval()
    with torch.no_grad():  # each input alone: transformers' capacity would count another input's padding
        reference = [encoder(input_ids=torch.tensor([ids])).last_hidden_state[0] for ids in PROMPTS]
    return path, reference


@pytest.fixture(scope="module")
def model(ray_cluster, checkpoint):
    with SwitchCluster(checkpoint[0], placement=PlacementConfig(experts_per_actor=4)) as cluster:
        yield cluster


def test_python_api_equals_transformers_encoder(checkpoint_factory, checkpoint, model):
    _, reference = checkpoint
    _, hf_model = checkpoint_factory("embeddings", **CONFIG)
    assert sum(hf_dropped_tokens(hf_model, [prompt])[0] for prompt in PROMPTS) > 0  # capacity drops tokens here
    means, tokens = model.embed(PROMPTS), model.embed(PROMPTS, pooling="none")
    for expected, mean, each in zip(reference, means, tokens, strict=True):
        assert each.shape == expected.shape and mean.shape == expected.shape[1:]
        assert torch.allclose(each, expected, atol=1e-4)
        assert torch.allclose(mean, expected.mean(dim=0), atol=1e-4)
    # Plain tensors a caller may train on, each its own: not inference tensors, nor views of their pass's batch.
    for each in tokens:
        assert not each.is_inference() and each.untyped_storage().nbytes() == each.nbytes
    head = torch.nn.Linear(model.checkpoint.config.d_model, 1)
    head(tokens[0]).sum().backward()
    assert head.weight.grad is not None


def test_embedding_requests_share_the_encoder_passes_with_generation(model):
    calls, encode = [], model.front.encode
    model.front.encode = lambda prompts: calls.append(len(prompts)) or encode(prompts)
    try:
        together = [Sequence(PROMPTS[0], SamplingParams(max_new_tokens=5)), Sequence(PROMPTS[1], pooling="mean"),
                    Sequence(PROMPTS[2], SamplingParams(max_new_tokens=3)), Sequence(PROMPTS[3], pooling="none")]
        run_to_completion(model.batcher, together)
    finally:
        del model.front.encode
    assert calls == [4]  # one encoder pass for the four
    generated = model.generate([PROMPTS[0], PROMPTS[2]], max_new_tokens=5)
    assert together[0].token_ids == generated[0].token_ids and together[2].token_ids == generated[1].token_ids[:3]
    assert torch.allclose(together[1].embedding, model.embed([PROMPTS[1]])[0], atol=1e-5)
    assert together[3].embedding.shape == (len(PROMPTS[3]), model.checkpoint.config.d_model)
    assert together[0].embedding is None and together[1].token_ids == []


def test_embedding_requests_do_not_wait_for_room_in_the_batch(model):
    batcher = ContinuousBatcher(model.front, max_sequences=1)
    decoding = Sequence(PROMPTS[0], SamplingParams(max_new_tokens=20))
    batcher.add(decoding)
    batcher.step()  # the batch is full
    waiting, embedding = Sequence(PROMPTS[2], SamplingParams(max_new_tokens=2)), Sequence(PROMPTS[1], pooling="mean")
    batcher.add(waiting)
    batcher.add(embedding)
    changed = batcher.step()
    assert not decoding.done and len(decoding.token_ids) == 2
    assert embedding in changed and embedding.done
    assert torch.allclose(embedding.embedding, model.embed([PROMPTS[1]])[0], atol=1e-5)
    assert waiting.token_ids == [] and list(batcher.waiting) == [waiting]


def test_a_calls_prompts_sample_each_with_a_seed_of_its_own(model):
    """generate(prompts, seed=s) samples prompt i with seed s + i, as OpenAI's choices are: the same prompt twice in a
    call gets two samples, and the call again the same two. Fails if every prompt samples with the one seed."""
    sampling = dict(max_new_tokens=12, temperature=2.0, seed=7)
    twice = [o.token_ids for o in model.generate([PROMPTS[0], PROMPTS[0]], **sampling)]
    assert twice[0] != twice[1]
    assert [o.token_ids for o in model.generate([PROMPTS[0], PROMPTS[0]], **sampling)] == twice
    assert model.generate([PROMPTS[0]], **sampling | {"seed": 8})[0].token_ids == twice[1]
