"""Text in and out with T5's own tokenizer: a SentencePiece model with T5's 100 sentinels, as transformers saves it.
Prompt ids equal transformers' tokenizer's and SentencePiece's own; generated text keeps the sentinels; streamed
text, joined, equals the whole text, word-initial spaces and multi-byte characters included."""

from __future__ import annotations

import random

import grpc
import pytest
import sentencepiece
from reference import hf_generate
from transformers import AutoTokenizer

from cluster.app import local_serve
from cluster.testing import free_port, tiny_config, write_random_checkpoint, write_t5_tokenizer
from experts.placement import PlacementConfig
from router_service.config import ServerConfig
from router_service.engine import SwitchCluster
from router_service.proto import switch_serve_pb2 as pb
from router_service.proto import switch_serve_pb2_grpc as pb_grpc
from router_service.text import TextStream

SPAN = "The capital of France is <extra_id_0>."  # the Switch Transformers docs' example
PROMPTS = [SPAN, "Grüße aus <extra_id_0> und 東京 <extra_id_1> ☃", "café crème"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("t5-text")
    tokenizer = write_t5_tokenizer(path)
    model = write_random_checkpoint(path, tiny_config(vocab_size=len(tokenizer)))
    return path, model


@pytest.fixture(scope="module")
def cluster(ray_cluster, checkpoint):
    with SwitchCluster(checkpoint[0], placement=PlacementConfig(experts_per_actor=2)) as model:
        yield model


def test_prompt_ids_are_t5s(checkpoint, cluster):
    path, _ = checkpoint
    hf_tokenizer = AutoTokenizer.from_pretrained(path)
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(path / "spiece.model"))
    sentinel = hf_tokenizer.convert_tokens_to_ids("<extra_id_0>")
    assert sentinel == len(hf_tokenizer) - 1 and sentinel >= pieces.get_piece_size()  # T5's: at the vocabulary's end
    for text in PROMPTS:
        assert cluster.encode_text(text) == hf_tokenizer(text)["input_ids"]
    # SentencePiece's own ids around the sentinel, then T5's </s>.
    assert cluster.encode_text(SPAN) == (pieces.encode("The capital of France is") + [sentinel] + pieces.encode(".")
                                         + [1])
    assert "<unk>" not in hf_tokenizer.convert_ids_to_tokens(cluster.encode_text(PROMPTS[1]))  # multi-byte pieces


def test_text_generation_equals_transformers_and_keeps_sentinels(checkpoint, cluster):
    path, hf_model = checkpoint
    outputs = cluster.generate(texts=PROMPTS, max_new_tokens=12)
    ids = [cluster.encode_text(t) for t in PROMPTS]
    assert [o.token_ids for o in outputs] == [t for t, _ in hf_generate(hf_model, ids, 12)]
    hf_tokenizer = AutoTokenizer.from_pretrained(path)
    paris = hf_tokenizer("Paris", add_special_tokens=False)["input_ids"]
    sentinel = hf_tokenizer.convert_tokens_to_ids("<extra_id_1>")
    assert cluster.decode([sentinel, 2, *paris, 1, 0]) == "<extra_id_1> Paris"  # <unk>, pad and </s> left out
    assert hf_tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]


def test_stop_strings_end_the_python_apis_answers_as_the_servers(cluster):
    """A stop string from the middle of one answer's text: an answer whose text holds it ends before it, its tokens
    (and logprobs, routes) at the one that completed it, finish_reason "stop"; the others are as without it. Fails if
    the stop string is ignored, cut after the fact in the text alone, or ends the other answers."""
    full = cluster.generate(texts=PROMPTS, max_new_tokens=12, routing=True)
    assert [o.text for o in full] == [cluster.decode(o.token_ids) for o in full]
    text = full[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = cluster.generate(texts=PROMPTS, max_new_tokens=12, routing=True, stop=stop)
    assert len(stop) == 2 and cut[0].finish_reason == "stop"
    for alone, both in zip(full, cut, strict=True):
        if stop not in alone.text:
            assert (both.token_ids, both.text, both.finish_reason) == (alone.token_ids, alone.text, alone.finish_reason)
            continue
        kept = next(n for n in range(1, 13) if stop in cluster.decode(alone.token_ids[:n]))
        assert both.text == alone.text[:alone.text.index(stop)] and both.finish_reason == "stop"
        assert both.token_ids == alone.token_ids[:kept] and both.logprobs == alone.logprobs[:kept]
        assert both.routing(encoder=False) == alone.routing(0, kept, encoder=False)
    assert len(cut[0].token_ids) < len(full[0].token_ids)  # ended before its last token
    # An answer a stop string ended, the last of its call: out of the batch as the call returns (its rows freed).
    assert cluster.generate(texts=PROMPTS[:1], max_new_tokens=12, stop=stop)[0].token_ids == cut[0].token_ids
    assert cluster.batcher.active == [] and not cluster.batcher.has_work
    # Prompts of token ids: their answers' text only where stop strings may cut it.
    ids = [cluster.encode_text(t) for t in PROMPTS]
    assert [o.text for o in cluster.generate(ids, max_new_tokens=12)] == [None] * len(PROMPTS)
    assert [o.text for o in cluster.generate(ids, max_new_tokens=12, stop=stop)] == [o.text for o in cut]
    # The cluster goes on serving after answers cut mid-batch: the same answers again.
    assert [o.token_ids for o in cluster.generate(texts=PROMPTS, max_new_tokens=12)] == [o.token_ids for o in full]


def test_streamed_text_joins_to_the_whole_text(cluster, monkeypatch):
    """Any token sequence: each step's new text, joined, is the text of all the tokens; nothing sent is taken back
    (TextStream only sends what extends what it sent). So also where the tokenizer's config asks for its spaces
    cleaned up, which changes text already decoded as tokens follow ("c " then "c!"): fails if decode does that."""
    monkeypatch.setattr(cluster.tokenizer, "clean_up_tokenization_spaces", True)
    rng = random.Random(0)
    vocab = len(cluster.tokenizer)
    for _ in range(3000):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 24))]
        stream = TextStream(cluster.decode)
        joined = "".join(stream.update(ids[:n], n == len(ids)) for n in range(1, len(ids) + 1))
        assert joined == cluster.decode(ids), ids



def test_many_token_lists_decode_as_each_alone(checkpoint, cluster):
    """decode_many (one call of the tokenizer's Rust side for all the lists) gives what transformers' decode gives
    each list, special tokens but the sentinels left out and no clean-up of spaces. Fails if it cleans up spaces,
    keeps <unk>, pad or </s>, or loses the sentinels or a list's order."""
    hf_tokenizer = AutoTokenizer.from_pretrained(checkpoint[0], clean_up_tokenization_spaces=True)
    rng = random.Random(1)
    vocab = len(hf_tokenizer)
    lists = [[rng.randrange(vocab) for _ in range(rng.randint(0, 16))] + [0, 1, 2, vocab - 1] for _ in range(500)]
    lists += [hf_tokenizer("c !", add_special_tokens=False)["input_ids"]]
    shown = [[t for t in ids if t not in (0, 1, 2)] for ids in lists]
    expected = [hf_tokenizer.decode(ids, clean_up_tokenization_spaces=False) for ids in shown]
    assert cluster.decode_many(lists) == expected and expected[-1] == "c !"
    assert all(text.endswith("<extra_id_0>") for text in expected[:-1])

@pytest.mark.ray  # serves through local_serve, which starts Ray itself: not the shared cluster's fixture
def test_served_text_over_grpc(checkpoint):
    path, _ = checkpoint
    config = ServerConfig(model=str(path), placement=PlacementConfig(experts_per_actor=2))
    with local_serve(config, http_port=free_port(), grpc_port=free_port()) as served:
        with grpc.insecure_channel(served.grpc) as channel:
            stub = pb_grpc.SwitchServeStub(channel)
            for text in PROMPTS:
                request = pb.GenerateRequest(text=text, max_new_tokens=16)
                unary = stub.Generate(request)
                chunks = list(stub.GenerateStream(request))
                assert "".join(c.text for c in chunks) == unary.text
                assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
                assert chunks[-1].prompt_tokens == len(AutoTokenizer.from_pretrained(path)(text)["input_ids"])
                assert unary.text == AutoTokenizer.from_pretrained(path).decode(
                    [t for t in unary.token_ids if t > 2], skip_special_tokens=False)
