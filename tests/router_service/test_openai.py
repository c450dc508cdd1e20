"""OpenAI's completions API, called with the official `openai` client (sync, async, streaming) against a running
server with an API key: the same tokens as the native API, stop strings, n, logprobs, and OpenAI's errors."""

from __future__ import annotations

import asyncio
import collections
import json
import urllib.error
import urllib.request

import grpc
import openai
import pytest

from cluster.app import local_serve
from cluster.demo import PROMPTS, WORDS
from cluster.testing import free_port, write_random_checkpoint_with_tokenizer
from experts.placement import PlacementConfig
from router_service.config import ServerConfig
from router_service.proto import switch_serve_pb2 as pb
from router_service.proto import switch_serve_pb2_grpc as pb_grpc

KEY = "test-key-openai"


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    path = tmp_path_factory.mktemp("openai-model")
    write_random_checkpoint_with_tokenizer(path, WORDS, num_decoder_layers=3)  # stacks of different depths
    key_file = tmp_path_factory.mktemp("key") / "key"
    key_file.write_text(KEY)
    config = ServerConfig(model=str(path), placement=PlacementConfig(experts_per_actor=4), max_new_tokens=64,
                          api_key_file=str(key_file))
    with local_serve(config, http_port=free_port(), grpc_port=free_port()) as endpoints:
        with grpc.insecure_channel(endpoints.grpc) as channel:
            yield {"model": path.name, "path": path, "base_url": f"{endpoints.http}/v1", "http": endpoints.http,
                   "grpc": endpoints.grpc, "stub": pb_grpc.SwitchServeStub(channel)}


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served["base_url"], api_key=KEY, max_retries=0)


def native(served, prompt: str, max_new_tokens: int, **fields) -> pb.GenerateResponse:
    return served["stub"].Generate(pb.GenerateRequest(text=prompt, max_new_tokens=max_new_tokens, **fields),
                                   metadata=[("authorization", f"Bearer {KEY}")], timeout=60)


def test_models_and_model_info_describe_the_served_model(served, client):
    assert [m.id for m in client.models.list()] == [served["model"]]
    # Created when its checkpoint was, whichever replica answers (not when the one that answers started).
    assert client.models.list().data[0].created == int((served["path"] / "config.json").stat().st_mtime)
    assert client.models.retrieve(served["model"]).id == served["model"]
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.body["code"] == "model_not_found"
    info = served["stub"].ModelInfo(pb.ModelInfoRequest(), metadata=[("authorization", f"Bearer {KEY}")], timeout=60)
    assert (info.encoder_layers, info.decoder_layers) == (4, 3)  # ModelInfo says which stack is which


def test_greedy_completion_equals_the_native_api(served, client):
    reference = native(served, PROMPTS[0], 12, return_logprobs=True)
    out = client.completions.create(model=served["model"], prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert out.object == "text_completion" and out.model == served["model"]
    assert out.choices[0].text == reference.text and out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == reference.prompt_tokens and out.usage.completion_tokens == 12
    assert out.usage.total_tokens == reference.prompt_tokens + 12


def test_async_client_and_token_id_prompts(served):
    """Each token-id prompt's choice is the native API's answer to those ids, in the prompts' order."""
    ids = list(native(served, PROMPTS[1], 1).token_ids)  # any ids in the vocabulary
    prompts = [[5, 9, 1], ids + [1]]

    async def run():
        async with openai.AsyncOpenAI(base_url=served["base_url"], api_key=KEY, max_retries=0) as client:
            return await client.completions.create(model=served["model"], prompt=prompts, max_tokens=6,
                                                   temperature=0)

    out = asyncio.run(run())
    answers = [served["stub"].Generate(pb.GenerateRequest(input_ids=p, max_new_tokens=6),
                                       metadata=[("authorization", f"Bearer {KEY}")], timeout=60) for p in prompts]
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.text for c in out.choices] == [a.text for a in answers] and answers[0].text != answers[1].text


def test_streaming_equals_unary_and_reports_usage(served, client):
    unary = client.completions.create(model=served["model"], prompt=PROMPTS[2], max_tokens=10, temperature=0)
    # include_obfuscation, which the client's types offer, is taken (and there is no padding to leave out)
    options = {"include_usage": True, "include_obfuscation": False}
    chunks = list(client.completions.create(model=served["model"], prompt=PROMPTS[2], max_tokens=10, temperature=0,
                                            stream=True, stream_options=options))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == unary.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    # With include_usage, every chunk before the last has "usage": null, as OpenAI's; all have one id and time.
    assert all("usage" in c.model_fields_set and c.usage is None for c in chunks[:-1])
    assert len({(c.id, c.created) for c in chunks}) == 1
    for options in (None, {"include_usage": False}):  # without stream_options, and with include_usage false
        plain = list(client.completions.create(model=served["model"], prompt=PROMPTS[2], max_tokens=3, stream=True,
                                               stream_options=options))
        assert plain[-1].choices and not any("usage" in c.model_fields_set for c in plain)


def test_n_choices_sampled_with_a_seed_are_reproducible(served, client):
    def sample():
        return client.completions.create(model=served["model"], prompt=PROMPTS[3], max_tokens=8, n=3, seed=11)

    first, second = sample(), sample()
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert first.usage.prompt_tokens == native(served, PROMPTS[3], 1).prompt_tokens  # the prompt once, not n times
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert len({c.text for c in first.choices}) > 1  # temperature 1 by default: the choices differ


def test_a_stream_of_several_prompts_and_choices_equals_the_unary_answer(served, client):
    """Streamed by the async client, two prompts of three sampled choices each: every index's text and finish reason
    as the unary call's, its finish reason once, and the usage the choices' tokens summed. Fails if the chunks of
    the choices mix or one is lost."""
    fields = {"model": served["model"], "prompt": [PROMPTS[3], PROMPTS[4]], "max_tokens": 8, "n": 3, "seed": 5}
    unary = client.completions.create(**fields)

    async def run():
        async with openai.AsyncOpenAI(base_url=served["base_url"], api_key=KEY, max_retries=0) as aclient:
            stream = await aclient.completions.create(**fields, stream=True, stream_options={"include_usage": True})
            return [chunk async for chunk in stream]

    chunks = asyncio.run(run())
    texts, finished = collections.defaultdict(str), collections.defaultdict(list)
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason is not None:
                finished[choice.index].append(choice.finish_reason)
    assert sorted(texts) == list(range(6))
    assert [texts[i] for i in range(6)] == [c.text for c in unary.choices]
    assert [finished[i] for i in range(6)] == [[c.finish_reason] for c in unary.choices]
    assert chunks[-1].usage.completion_tokens == unary.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == unary.usage.prompt_tokens


def test_stop_strings_end_the_text_before_them(served, client):
    full = client.completions.create(model=served["model"], prompt=PROMPTS[4], max_tokens=20, temperature=0)
    words = full.choices[0].text.split()
    stop = " ".join(words[2:4])  # two words, so that the stop string spans tokens
    out = client.completions.create(model=served["model"], prompt=PROMPTS[4], max_tokens=20, temperature=0,
                                    stop=[stop, "never there"])
    expected = full.choices[0].text[:full.choices[0].text.index(stop)]
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=served["model"], prompt=PROMPTS[4], max_tokens=20, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_logprobs_in_the_legacy_layout(served, client):
    """Each token's text is what it adds to the text (its word's leading space included), so the tokens joined are
    the text, and each offset is where its token starts, counted from the prompt's start as OpenAI's are (a prompt of
    token ids: their text); each token's alternatives include it, as OpenAI's do, with logprobs 0 too; a stream
    gives the same as a unary call."""
    reference = native(served, PROMPTS[5], 6, return_logprobs=True)

    def complete(logprobs: int, stream: bool = False):
        return client.completions.create(model=served["model"], prompt=PROMPTS[5], max_tokens=6, temperature=0,
                                         logprobs=logprobs, stream=stream)

    out = complete(2)
    text, lp = out.choices[0].text, out.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(list(reference.logprobs), abs=1e-5)
    assert "".join(lp.tokens) == text and " " in text
    assert lp.text_offset == [len(PROMPTS[5]) + len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    by_ids = client.completions.create(model=served["model"], prompt=list(reference.token_ids), max_tokens=2,
                                       temperature=0, logprobs=0)
    assert by_ids.choices[0].logprobs.text_offset[0] == len(reference.text) > 0
    for token, top, chosen in zip(lp.tokens, lp.top_logprobs, lp.token_logprobs):
        assert len(top) <= 2 and top[token] == pytest.approx(chosen, abs=1e-5)
        assert max(top.values()) == pytest.approx(chosen, abs=1e-5)  # greedy: the best
    # Two alternatives a token, fewer only where both add the same text: fails if fewer are asked for.
    assert any(len(top) == 2 for top in lp.top_logprobs)
    alone = complete(0).choices[0].logprobs
    assert alone.tokens == lp.tokens and alone.top_logprobs == [{t: c} for t, c in zip(lp.tokens, alone.token_logprobs)]
    chunks = [c.choices[0].logprobs for c in complete(2, stream=True) if c.choices[0].logprobs]
    assert [t for c in chunks for t in c.tokens] == lp.tokens
    assert [o for c in chunks for o in c.text_offset] == lp.text_offset


def test_null_means_the_default(served, client):
    """OpenAI's optional fields take null, which its client sends for a parameter given as None."""
    given = client.completions.create(model=served["model"], prompt=PROMPTS[0], max_tokens=16, temperature=0)
    nulls = client.completions.create(model=served["model"], prompt=PROMPTS[0], temperature=0, max_tokens=None,
                                      top_p=None, n=None, stop=None, logprobs=None, echo=None, stream=None,
                                      presence_penalty=None, frequency_penalty=None, seed=None, user=None)
    assert nulls.choices[0].text == given.choices[0].text
    assert nulls.usage.completion_tokens == given.usage.completion_tokens
    # the highest seed: choice j samples with seed + j, wrapped below 2**64
    out = client.completions.create(model=served["model"], prompt=PROMPTS[0], max_tokens=2, n=2, seed=2**64 - 1)
    assert len(out.choices) == 2


def test_errors_are_openais(served, client):
    model = served["model"]
    stranger = openai.OpenAI(base_url=served["base_url"], api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.completions.create(model=model, prompt="x", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):  # every route asks for the key first
        stranger.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt=PROMPTS[0], max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    for fields, param in [({"echo": True}, "echo"), ({"suffix": "!"}, "suffix"), ({"best_of": 3}, "best_of"),
                          ({"logprobs": 9}, "logprobs"), ({"max_tokens": 10_000}, "max_tokens"),
                          ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"extra_body": {"colour": 1}}, "colour"),
                          ({"presence_penalty": 0.5}, "presence_penalty"),
                          ({"frequency_penalty": -0.5}, "frequency_penalty"),
                          ({"logit_bias": {"7": 1}}, "logit_bias"),
                          ({"prompt": [PROMPTS[0]] * 7, "n": 16}, "prompt")]:  # more choices than it ever takes
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=model, **({"prompt": PROMPTS[0], "max_tokens": 2} | fields))
        assert e.value.body["param"] == param, (fields, e.value.body)
        assert e.value.body["type"] == "invalid_request_error" and e.value.body["message"].startswith(param)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    assert "not chat models" in e.value.body["message"]
    # A path or a method no route takes: OpenAI's error too (FastAPI's own says {"detail": ...}).
    for method, route, status in [("GET", "/v1/responses", 404), ("GET", "/v1/completions", 405)]:
        request = urllib.request.Request(served["http"] + route, method=method,
                                         headers={"Authorization": f"Bearer {KEY}"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        error = json.loads(refused.value.read())["error"]
        assert refused.value.code == status and error["message"].startswith(f"{method} {route}: "), error
        assert error["type"] == "invalid_request_error"
    # On the native API's paths, its own shape.
    request = urllib.request.Request(served["http"] + "/v1/generate", headers={"Authorization": f"Bearer {KEY}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 405
    assert json.loads(refused.value.read()) == {"error": "GET /v1/generate: Method Not Allowed"}


def test_native_stop_strings(served):
    full = native(served, PROMPTS[6], 20).text
    stop = " ".join(full.split()[1:3])
    out = native(served, PROMPTS[6], 20, stop=[stop])
    assert out.text == full[:full.index(stop)] and out.finish_reason == "stop"
    chunks = list(served["stub"].GenerateStream(pb.GenerateRequest(text=PROMPTS[6], max_new_tokens=20, stop=[stop]),
                                                metadata=[("authorization", f"Bearer {KEY}")], timeout=60))
    assert "".join(c.text for c in chunks) == out.text and chunks[-1].finish_reason == "stop"
    body = {"text": PROMPTS[6], "max_new_tokens": 20, "stop": [stop]}
    request = urllib.request.Request(f"{served['http']}/v1/generate", method="POST", data=json.dumps(body).encode(),
                                     headers={"authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=60) as r:
        assert json.loads(r.read())["text"] == out.text


def test_embeddings_with_the_openai_client(served, client):
    """The client asks for base64 unless told otherwise: both forms give the native Embed's float32 values."""
    texts = PROMPTS[:2]
    native = served["stub"].Embed(pb.EmbedRequest(inputs=[pb.EmbedInput(text=t) for t in texts]),
                                  metadata=[("authorization", f"Bearer {KEY}")], timeout=60)
    out = client.embeddings.create(model=served["model"], input=texts)
    assert out.model == served["model"] and [d.index for d in out.data] == [0, 1]
    for got, expected in zip(out.data, native.embeddings, strict=True):
        assert got.embedding == list(expected.values)
    assert out.usage.prompt_tokens == out.usage.total_tokens == native.prompt_tokens
    floats = client.embeddings.create(model=served["model"], input=texts[0], encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(out.data[0].embedding, abs=1e-5)  # alone: other padding
    ids = client.embeddings.create(model=served["model"], input=[[5, 9, 1], [7, 1]], encoding_format="float")
    assert len(ids.data) == 2 and ids.usage.prompt_tokens == 5
    each = client.embeddings.create(model=served["model"], input=texts[0], encoding_format="float",
                                    extra_body={"pooling": "none"})
    assert len(each.data[0].embedding) == native.embeddings[0].tokens
    assert all(len(row) == native.dimensions for row in each.data[0].embedding)
    for fields, param in (({"dimensions": 3}, "dimensions"), ({"extra_body": {"pooling": "max"}}, "pooling"),
                          ({"input": []}, "input"), ({"input": [[5, 10**6]]}, "input")):
        with pytest.raises(openai.BadRequestError) as e:
            client.embeddings.create(**{"model": served["model"], "input": texts, **fields})
        assert e.value.body["param"] == param, (fields, e.value.body)


def test_openais_finish_reasons():
    from router_service.openai_api import finish_reason

    assert [finish_reason(r) for r in ("eos", "stop", "length", None)] == ["stop", "stop", "length", None]


@pytest.mark.parametrize("field, value", [("stream", "yes"), ("max_tokens", "8"), ("n", 2.5), ("logprobs", True),
                                          ("prompt", [True, 5]), ("temperature", "0"), ("stream_options", {})])
def test_fields_of_another_type_are_refused_not_converted(field, value):
    """As OpenAI's API and the native one refuse them (the native HTTP API answers "stream": "yes" with 400).
    Fails if "8" becomes 8 or true becomes 1; stream_options goes with stream alone."""
    from router_service.openai_api import OpenAIError, parse_completion_request

    with pytest.raises(OpenAIError) as e:
        parse_completion_request({"model": "m", "prompt": "x", field: value}, "m")
    assert e.value.status == 400 and e.value.param == field and e.value.message.startswith(field)
    assert parse_completion_request({"model": "m", "prompt": [5, 1], "temperature": 0, "max_tokens": 8}, "m")


def test_the_request_metric_counts_openai_errors_by_their_kind():
    """`switch_serve_requests_total` counts calls by gRPC status: an OpenAI API refusal (a bad field, another
    model, a wrong key, a full queue) is the client's, not a server outage. Fails if it counts as UNAVAILABLE."""
    from router_service.openai_api import OpenAIError
    from router_service.server import error_status

    for status, code in [(400, grpc.StatusCode.INVALID_ARGUMENT), (401, grpc.StatusCode.UNAUTHENTICATED),
                         (404, grpc.StatusCode.NOT_FOUND), (429, grpc.StatusCode.RESOURCE_EXHAUSTED),
                         (503, grpc.StatusCode.UNAVAILABLE)]:
        assert error_status(OpenAIError(status, "why")) == (code, status)


def test_native_errors_reach_openai_clients_with_openai_names():
    """The native API's errors, as OpenAI's SDK reads them: its status (which picks the SDK's exception), code and
    type; a failed batch is a retryable server_error. Fails if one changes status or kind on the way."""
    from router_service.auth import Unauthenticated
    from router_service.requests import InvalidRequest
    from router_service.scheduler import QueueFull
    from router_service.server import as_openai_error

    cases = [(Unauthenticated("api key: missing"), 401, "invalid_api_key", "invalid_request_error"),
             (QueueFull("queue full"), 429, "rate_limit_exceeded", "rate_limit_error"),
             (RuntimeError("expert actor lost\ntraceback"), 503, None, "server_error"),
             (InvalidRequest("max_new_tokens", "must be at least 1"), 400, None, "invalid_request_error")]
    for error, status, code, kind in cases:
        answer = as_openai_error(error)
        assert (answer.status, answer.code, answer.kind) == (status, code, kind)
        assert "\n" not in answer.message
    assert as_openai_error(InvalidRequest("max_new_tokens", "x")).param == "max_tokens"


def test_a_model_without_a_tokenizer_refuses_text_it_cannot_make():
    """Stop strings and completions need the tokenizer: refused, naming the field, rather than matched against, or
    completed with, an empty text."""
    from types import SimpleNamespace

    from router_service.openai_api import CompletionRequest, OpenAIError
    from router_service.requests import InvalidRequest
    from router_service.server import SwitchServer

    replica = SwitchServer.func_or_class  # the class, without Serve
    cluster = SimpleNamespace(checkpoint=SimpleNamespace(config=SimpleNamespace(vocab_size=100)),
                              check_experts=lambda: None)
    server = SimpleNamespace(has_tokenizer=False, config=ServerConfig(model="unused"), cluster=cluster)
    server._new_sequence = lambda *args, **kw: replica._new_sequence(server, *args, **kw)
    seq, stop = server._new_sequence([5, 9, 1], "input_ids", [])
    assert seq.prompt == [5, 9, 1] and stop == ()
    with pytest.raises(InvalidRequest) as e:
        server._new_sequence([5, 9, 1], "input_ids", ["9"])
    assert e.value.field == "stop"
    with pytest.raises(OpenAIError) as e:
        replica._completion_choices(server, CompletionRequest(model="m", prompt=[5, 9, 1]))
    assert e.value.status == 400 and e.value.param == "prompt"


def test_a_request_of_too_many_choices_is_refused_before_any_prompt_is_tokenized():
    """The room for a request's sequences (prompts times n) is checked first: a request of many prompts costs the
    replica's event loop nothing before it is refused. Fails if the prompts are tokenized first."""
    from types import SimpleNamespace

    from router_service.openai_api import CompletionRequest
    from router_service.requests import InvalidRequest
    from router_service.server import SwitchServer

    asked, tokenized = [], []

    def check_count(count, field):
        asked.append((count, field))
        raise InvalidRequest(field, "more than this server takes at once")

    server = SimpleNamespace(has_tokenizer=True, config=ServerConfig(model="unused"),
                             scheduler=SimpleNamespace(check_count=check_count),
                             cluster=SimpleNamespace(encode_text=lambda text, field: tokenized.append(text)))
    with pytest.raises(InvalidRequest):
        SwitchServer.func_or_class._completion_choices(server, CompletionRequest(model="m", prompt=["x"] * 500, n=16))
    assert asked == [(8000, "prompt")] and tokenized == []


@pytest.mark.parametrize("route, bad, good", [
    ("openai_completions", {"prompt": [5, 999999]}, {"prompt": [5, 9]}),
    ("openai_completions", {"prompt": [5, 999999], "stream": True}, {"prompt": [5, 9], "stream": True}),
    ("openai_completions", {"prompt": [[5, 9]] * 2, "n": 2, "max_tokens": 10**9}, {"prompt": [[5, 9]] * 2, "n": 2}),
    ("openai_completions", {"prompt": [[5, 9], [5, 999999]]}, {"prompt": [[5, 9], [5, 10]]}),
    ("openai_embeddings", {"input": [[5, 1], [999999]]}, {"input": [[5, 1], [9, 1]]}),
    ("http_generate", {"input_ids": [5, 999999]}, {"input_ids": [5, 9]}),
    ("http_generate", {"input_ids": [5, 999999], "stream": True}, {"input_ids": [5, 9], "stream": True}),
])
@pytest.mark.parametrize("busy", ["the queue is full", "the experts are down"])
def test_bad_input_is_refused_as_such_when_the_server_is_busy_or_down(route, bad, good, busy):
    """Through the routes' own handlers (OpenAI's and the native HTTP API's, whose gRPC methods share its path): a
    request that could never be served is bad input (400), not a full queue (429) nor experts down (503, refused at
    once rather than queued), both of which clients retry: every field of every prompt is checked before the experts
    are looked at or the request queues. Fails if the room or the experts are checked before the last prompt, or a
    request queues while the experts are down."""
    import json
    from types import SimpleNamespace

    from router_service.dispatch import ExpertsUnavailable
    from router_service.requests import BodyLimits
    from router_service.scheduler import QueueFull
    from router_service.server import SwitchServer

    def full(*_):
        raise QueueFull("32 sequences already waiting, room for 32 (max_waiting and the batch's free places)")

    def down():
        raise ExpertsUnavailable("the experts are not serving: expert actors lost")

    replica = SwitchServer.func_or_class
    config = ServerConfig(model="unused")
    queue_full = busy == "the queue is full"
    server = SimpleNamespace(has_tokenizer=True, config=config, body_limits=BodyLimits.of(config), model_id="m",
                             api_key=None,
                             scheduler=SimpleNamespace(check_count=lambda count, field: None,
                                                       queue=full if queue_full else lambda *_: pytest.fail("queued")),
                             cluster=SimpleNamespace(checkpoint=SimpleNamespace(config=SimpleNamespace(
                                 vocab_size=100, d_model=8)), check_experts=(lambda: None) if queue_full else down),
                             _finished=lambda error=None: None)
    for name in ("_new_sequence", "_queued", "_completion_choices", "_complete", "_first_offsets", "_follow_choices",
                 "_embed", "_authorize", "_sequence", "_generate", "_stream", "_follow"):
        setattr(server, name, getattr(replica, name).__get__(server))

    def status(body: dict) -> int:
        raw = json.dumps(({"model": "m"} if route.startswith("openai") else {}) | body).encode()

        async def read() -> bytes:
            return raw

        request = SimpleNamespace(body=read, headers={"content-length": str(len(raw))})
        return asyncio.run(getattr(replica, route)(server, request)).status_code

    assert status(bad) == 400
    assert status(good) == (429 if queue_full else 503)  # and a good one is told what holds it


def test_a_stream_whose_client_left_before_its_first_event_ends_its_work():
    """Where the client has gone as the headers go out, the events' generator never starts, so its clean-up (the
    choices' decoding cancelled, the call counted) is the response's to do, once. Fails if it is left undone, or
    done for a stream that was read."""
    from router_service.server import EventStream

    started, unread = [], []

    async def events():
        started.append(True)
        yield "data: 1\n\n"

    async def note_unread():
        unread.append(True)

    async def gone(message):
        raise asyncio.CancelledError  # Serve cancels the call: its client has gone

    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        await asyncio.sleep(60)

    scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(EventStream(events(), note_unread)(scope, receive, gone))
    assert started == [] and unread == [True]
    asyncio.run(EventStream(events(), note_unread)(scope, receive, send))
    assert started == [True] and unread == [True] and sent[1]["body"] == b"data: 1\n\n"


def test_a_choice_failing_mid_stream_ends_the_stream_with_the_error():
    """The choices of a streamed completion are followed in a task of their own, and the events read in another
    (Starlette's stream task): one choice's batch failing after the first event ends the others and the stream, with
    the error as its last event. Fails if the stream waits on for events that will not come."""
    from types import SimpleNamespace

    from router_service.dispatch import ExpertsUnavailable
    from router_service.openai_api import CompletionRequest
    from router_service.server import Piece, SwitchServer

    replica, finished = SwitchServer.func_or_class, []  # the class, without Serve

    async def follow(seq, updates, stop):
        yield Piece([7], [-0.5], [], "seven", None, [], 0)
        await asyncio.sleep(0.05)
        if seq == "failing":
            raise ExpertsUnavailable("expert actor lost")
        await asyncio.sleep(60)  # the other choice would go on for long

    cancelled = []
    scheduler = SimpleNamespace(queue=lambda seqs: [None] * len(seqs), cancel=cancelled.extend)
    server = SimpleNamespace(model_id="m", _follow=follow, _finished=finished.append, scheduler=scheduler)
    server._follow_choices = lambda choices, events: replica._follow_choices(server, choices, events)
    server._logprobs = lambda *args: None
    server._first_offsets = lambda request: [0, 0]
    request = CompletionRequest(model="m", prompt="x", stream=True)
    choices = [("failing", ()), ("slow", ())]

    async def run() -> list[str]:
        events = asyncio.Queue()
        following = server._follow_choices(choices, events)
        first = await events.get()
        stream = replica._completion_events(server, request, choices, events, first, following)
        read = asyncio.create_task(asyncio.wait_for(collect(stream), 10))  # another task, as Starlette's
        return await read

    async def collect(stream) -> list[str]:
        return [event async for event in stream]

    events = asyncio.run(run())
    assert len(events) == 3 and '"expert actor lost"' in events[-1] and '"server_error"' in events[-1]
    assert len(finished) == 1 and isinstance(finished[0], ExpertsUnavailable)
    assert cancelled == ["failing", "slow"]  # both out of the batch as the choices' task ended


@pytest.mark.parametrize("key", [None, "wrong"])
def test_every_call_but_the_health_check_asks_for_the_key(served, key):
    """Each gRPC method and HTTP route refuses a call without the key or with another (UNAUTHENTICATED, 401), before
    it reads the request; the health check answers anyone."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub, metadata = served["stub"], [("authorization", f"Bearer {key}")] if key else []
    for method, request in [(stub.Generate, pb.GenerateRequest(text=PROMPTS[0])), (stub.Embed, pb.EmbedRequest()),
                            (stub.ModelInfo, pb.ModelInfoRequest()),
                            (lambda r, **kw: next(stub.GenerateStream(r, **kw)), pb.GenerateRequest(text=PROMPTS[0]))]:
        with pytest.raises(grpc.RpcError) as refused:
            method(request, metadata=metadata, timeout=60)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    for route, body in [("/v1/generate", {"text": PROMPTS[0]}), ("/v1/model", None), ("/v1/models", None),
                        ("/v1/completions", {"model": served["model"], "prompt": PROMPTS[0]}),
                        ("/v1/embeddings", {"model": served["model"], "input": PROMPTS[0]}),
                        ("/v1/chat/completions", {"model": served["model"], "messages": []})]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(served["http"] + route, data=data, headers=headers)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        assert refused.value.code == 401, route
        assert refused.value.headers["WWW-Authenticate"] == "Bearer", route  # RFC 9110: a 401 names the scheme
    with grpc.insecure_channel(served["grpc"]) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=60)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
