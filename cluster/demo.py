"""`make demo`: serve the trained demo checkpoint, call it over gRPC, print the answers and the expert load.

The checkpoint in demo/model was trained by demo/train_model.py on three tasks whose answers a reader can
check at a glance; the tasks are defined here so that the demo can show the expected answer beside the model's.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path

import grpc

from cluster.app import local_serve
from cluster.testing import free_port
from experts.placement import PlacementConfig
from router_service.config import ServerConfig
from router_service.proto import switch_serve_pb2 as pb
from router_service.proto import switch_serve_pb2_grpc as pb_grpc

DEMO_MODEL = Path(__file__).resolve().parents[1] / "demo" / "model"
TASKS = ("reverse", "sort", "spell")
DIGITS = [str(d) for d in range(10)]
ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen").split()
TENS = ["", ""] + "twenty thirty forty fifty sixty seventy eighty ninety".split()
WORDS = DIGITS + list(TASKS) + [":"] + ONES + TENS[2:] + ["hundred"]  # the demo tokenizer's vocabulary, in order
PROMPTS = ["reverse : 3 1 4 1 5", "sort : 9 2 6 5 3", "spell : 4 7 2", "reverse : 2 7 1 8", "sort : 8 0 8 1",
           "spell : 1 9", "spell : 9 9 9"]
STREAMED = "spell : 3 1 4"
CALL_S = 120.0  # the most each of the demo's calls may take: a server that stops answering fails the demo, not hangs it
ROUTED, ROUTED_WORD = "reverse : 2 7 1 8", 2  # whose route the demo shows: the word at that position
EMBEDDED = ("sort : 3 1 2", "sort : 3 2 1", "spell : 3 1 2")  # the first's embedding against the others'
# Distinct prompts per task that training never sees. Lists get many so that 100% on them means the task is
# learnt, not a lucky step; spell holds out a third of the 900 three-digit numbers and trains on the rest.
HELD_OUT = {"reverse": 1000, "sort": 1000, "spell": 300}
HELD_OUT_SEED = 0


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def spell(n: int) -> str:
    """0..999 in English words: 472 -> 'four hundred seventy two'."""
    if n == 0:
        return "zero"
    hundreds, rest = divmod(n, 100)
    words = [ONES[hundreds], "hundred"] if hundreds else []
    if rest >= 20:
        words.append(TENS[rest // 10])
        if rest % 10:
            words.append(ONES[rest % 10])
    elif rest:
        words.append(ONES[rest])
    return " ".join(words)


def make_example(task: str, rng: random.Random) -> tuple[str, str]:
    """One random (prompt, answer) pair for the task."""
    if task == "spell":
        n = rng.randrange(1000)
        return "spell : " + " ".join(str(n)), spell(n)
    digits = [rng.choice(DIGITS) for _ in range(rng.randint(2, 6))]
    answer = digits[::-1] if task == "reverse" else sorted(digits)
    return f"{task} : " + " ".join(digits), " ".join(answer)


def make_held_out() -> dict[str, list[tuple[str, str]]]:
    """HELD_OUT[task] distinct examples per task, in random order: the same every time."""
    rng, held_out = random.Random(HELD_OUT_SEED), {}
    for task in TASKS:
        examples = {}
        while len(examples) < HELD_OUT[task]:
            prompt, answer = make_example(task, rng)
            # Numbers below 100 are few, and many have a word no other number spells the same way (zero,
            # eleven .. nineteen), so all of them stay in training: held-out numbers have three digits.
            if task == "spell" and len(prompt.split()) < 5:
                continue
            examples[prompt] = answer
        held_out[task] = list(examples.items())
    return held_out


def expected_answer(prompt: str) -> str:
    task, _, digits = prompt.split(" ", 2)
    items = digits.split()
    if task == "spell":
        return spell(int("".join(items)))
    return " ".join(items[::-1] if task == "reverse" else sorted(items))


def run_demo(model_dir: str | Path = DEMO_MODEL, experts_per_actor: int | None = None) -> int:
    """Serve the model, call it, print what it answered; how many of PROMPTS it answered right."""
    config = ServerConfig(model=str(model_dir), placement=PlacementConfig(experts_per_actor=experts_per_actor))
    grpc_port, http_port = free_port(), free_port()
    start = time.perf_counter()
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    with local_serve(config, http_port=http_port, grpc_port=grpc_port, worker_logs=False) as served:
        print(f"\nserving {model_dir} on gRPC {served.grpc} and HTTP {served.http} "
              f"(ready in {time.perf_counter() - start:.0f}s)")
        with grpc.insecure_channel(served.grpc) as channel:
            stub = pb_grpc.SwitchServeStub(channel)
            print(f"\nstreamed as it is generated:\n  {STREAMED!r} ->", end="", flush=True)
            for chunk in stub.GenerateStream(pb.GenerateRequest(text=STREAMED, max_new_tokens=12), timeout=CALL_S):
                print(f" {chunk.text.strip()}" if chunk.text.strip() else "", end="", flush=True)
                if chunk.finish_reason:
                    print(f"  [{chunk.finish_reason}]")

            print(f"\n{len(PROMPTS)} requests in flight at once, decoded together:")
            calls = [stub.Generate.future(pb.GenerateRequest(text=p, max_new_tokens=12)) for p in PROMPTS]
            right = 0
            for prompt, call in zip(PROMPTS, calls):
                answer, expected = call.result(timeout=CALL_S).text, expected_answer(prompt)
                right += answer == expected
                mark = "ok" if answer == expected else f"expected {expected!r}"
                print(f"  {prompt!r:26} -> {answer!r:30} {mark}")
            print(f"  {right} of {len(PROMPTS)} right")

            routed = stub.Generate(pb.GenerateRequest(text=ROUTED, max_new_tokens=12, return_routing=True),
                                   timeout=CALL_S)
            vectors = [list(e.values) for e in stub.Embed(pb.EmbedRequest(
                inputs=[pb.EmbedInput(text=t) for t in EMBEDDED]), timeout=CALL_S).embeddings]
            print("\nembeddings (Embed: the encoder's output, averaged over the tokens), cosine similarity:")
            for text, vector in zip(EMBEDDED[1:], vectors[1:]):
                print(f"  {EMBEDDED[0]!r} and {text!r}: {cosine(vectors[0], vector):.3f}")

            print(f"\nwhere the token {ROUTED.split()[ROUTED_WORD]!r} of {ROUTED!r} went (return_routing):")
            for layer in (r for r in routed.routing if r.stack == "encoder"):
                print(f"  encoder layer {layer.layer}: expert {layer.experts[ROUTED_WORD]}, router probability "
                      f"{layer.probs[ROUTED_WORD]:.2f}{', over capacity' if layer.dropped[ROUTED_WORD] else ''}")

            info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=CALL_S)
        print(f"\n{info.num_experts} experts in each of {len(info.expert_tokens)} sparse layers, "
              f"{len(info.actors)} expert actors; tokens each expert has computed:")
        print(f"  {'layer':<12}" + "".join(f"{'e' + str(e):>6}" for e in range(info.num_experts)))
        for load in info.expert_tokens:
            print(f"  {load.stack + '.' + str(load.layer):<12}" + "".join(f"{n:>6}" for n in load.tokens))
    return right
