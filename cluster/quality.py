"""What int8 experts (`--quantize int8`) do to a model's outputs, against float32 on the same checkpoint.

    switch-serve quality                  # the demo model, then switch-base-8's shape (random float32 weights)
    switch-serve quality --shape tiny     # a quick run

- The demo model, served through the Python API with and without int8 experts: exact-match accuracy on its held-out
  examples (cluster.demo.make_held_out, the ones its training never saw) and the answer to each demo prompt.
- A built-in shape's checkpoint: transformers' float32 greedy generate gives each request's tokens and their
  log-probabilities; the front then reads the same tokens (teacher forcing) with its experts computed from int8
  weights, and with float32 ones as a control. Reported: mean and max |delta log-probability| of float32's greedy
  tokens, and how often another token becomes the most likely one; and, to read those by, how sure float32 is:
  the mean log-probability of its greedy tokens and the median gap between its two most likely tokens (random
  weights give nearly flat distributions, where the smallest change reorders the top). Each is also measured
  against the exact math's log-probabilities of the same tokens (transformers in float64), and so is transformers'
  float32 itself: how far float32's rounding alone moves them.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path

import ray
import torch
from transformers import DynamicCache, EncoderDecoderCache, SwitchTransformersForConditionalGeneration

from cluster.bench import Request, checkpoint, workload
from cluster.demo import DEMO_MODEL, PROMPTS, STREAMED, make_held_out
from experts.checkpoint import SwitchCheckpoint
from experts.ffn import ACTIVATION_FUNCTIONS
from experts.held import held_experts
from experts.spec import QUANTIZE_MODES, STACKS, sparse_layers
from router_service.dispatch import ExpertDispatcher
from router_service.engine import SwitchCluster
from router_service.model import SwitchFront

DEMO_MAX_NEW_TOKENS = 8  # the longest demo answer is 6 words and </s>


def demo_answers(model_dir: Path, quantize: str) -> tuple[dict[str, float], list[str]]:
    """Held-out exact-match accuracy per task, and the answers to the demo's prompts, served with `quantize`."""
    held_out = make_held_out()
    demo = [*PROMPTS, STREAMED]
    prompts = demo + [p for examples in held_out.values() for p, _ in examples]
    with SwitchCluster(model_dir, quantize=quantize) as model:
        answers = [model.decode(s.token_ids)
                   for s in model.generate(texts=prompts, max_new_tokens=DEMO_MAX_NEW_TOKENS)]
    accuracy, start = {}, len(demo)
    for task, examples in held_out.items():
        got = answers[start:start + len(examples)]
        accuracy[task] = sum(a == expected for a, (_, expected) in zip(got, examples)) / len(examples)
        start += len(examples)
    return accuracy, answers[:len(demo)]


def greedy_float32(folder: Path, requests: list[Request]) -> list[tuple[list[int], list[float]]]:
    """transformers' float32 greedy generate, one request at a time: (tokens, log-probability of each)."""
    model = SwitchTransformersForConditionalGeneration.from_pretrained(folder).eval()
    out = []
    for r in requests:
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        result = model.generate(input_ids=torch.tensor([r.prompt]), max_new_tokens=r.max_new_tokens, do_sample=False,
                                output_logits=True, return_dict_in_generate=True, past_key_values=cache)
        tokens = result.sequences[0, 1:].tolist()
        logprobs = [float(torch.log_softmax(step[0].float(), -1)[t]) for step, t in zip(result.logits, tokens)]
        out.append((tokens, logprobs))
    return out


def front_with_experts_here(folder: Path, quantize: str) -> SwitchFront:
    """The served front with every expert computed in this process, held as the actors hold them."""
    ckpt = SwitchCheckpoint.open(folder)
    config = ckpt.config
    layers = [(stack, layer) for stack in STACKS for layer in sparse_layers(config, stack)]
    dispatcher = ExpertDispatcher([], {layer: {e: [0] for e in range(config.num_experts)} for layer in layers},
                                  config.num_experts, act=ACTIVATION_FUNCTIONS[config.dense_act_fn])
    dispatcher.use([], *held_experts(ckpt, [(*layer, e) for layer in layers for e in range(config.num_experts)],
                                    quantize))
    return SwitchFront(ckpt, dispatcher)


@torch.inference_mode()
def teacher_forced(front: SwitchFront, prompt: list[int],
                   tokens: list[int]) -> tuple[list[float], list[int], list[float]]:
    """The log-probability the front gives each of `tokens` after the ones before it; at each position, its most
    likely token and how far ahead of the second that one is."""
    (_, encoded), = front.encode([prompt])
    cache = front.start_decoding(encoded)
    logprobs, best, gaps = [], [], []
    previous = front.config.decoder_start_token_id
    for token in tokens:
        cache, logits, _ = front.decode_step(cache, torch.tensor([previous]))
        step = torch.log_softmax(logits[0].float(), -1)
        logprobs.append(float(step[token]))
        top = step.topk(2)
        best.append(int(top.indices[0]))
        gaps.append(float(top.values[0] - top.values[1]))
        previous = token
    return logprobs, best, gaps


@torch.inference_mode()
def float64_logprobs(folder: Path, requests: list[Request], tokens: list[list[int]]) -> list[list[float]]:
    """transformers' log-probabilities of the given tokens after each request's prompt, in float64 (one forward
    pass each, the tokens fed as the decoder's input)."""
    model = SwitchTransformersForConditionalGeneration.from_pretrained(folder, torch_dtype=torch.float64).eval()
    out = []
    for r, ids in zip(requests, tokens):
        decoder_input = torch.tensor([[model.config.decoder_start_token_id, *ids[:-1]]])
        logits = model(input_ids=torch.tensor([r.prompt]), decoder_input_ids=decoder_input).logits[0]
        out.append(torch.log_softmax(logits, -1)[torch.arange(len(ids)), ids].tolist())
    return out


def deltas_from(got: list[list[float]], expected: list[list[float]]) -> dict[str, float]:
    deltas = [abs(a - b) for g, e in zip(got, expected, strict=True) for a, b in zip(g, e, strict=True)]
    return {"mean": sum(deltas) / len(deltas), "max": max(deltas),
            "over_1e-4": sum(d > 1e-4 for d in deltas) / len(deltas)}


def logprob_drift(folder: Path, requests: list[Request]) -> dict[str, dict]:
    """Per quantize mode, how far the front's log-probabilities of float32's greedy tokens are from float32's, and
    from float64's (as transformers' float32 is)."""
    reference = greedy_float32(folder, requests)
    exact = float64_logprobs(folder, requests, [tokens for tokens, _ in reference])
    greedy = [lp for _, logprobs in reference for lp in logprobs]
    report = {"float32_mean_greedy_logprob": sum(greedy) / len(greedy),
              "float32_from_float64": deltas_from([logprobs for _, logprobs in reference], exact)}
    for quantize in QUANTIZE_MODES:
        front = front_with_experts_here(folder, quantize)
        read, changed, gaps = [], 0, []
        for r, (tokens, _) in zip(requests, reference):
            got, best, gap = teacher_forced(front, r.prompt, tokens)
            read.append(got)
            changed += sum(b != t for b, t in zip(best, tokens))
            gaps += gap
        drift = deltas_from(read, [logprobs for _, logprobs in reference])
        report[quantize] = {"tokens": len(greedy), "mean_abs_delta_logprob": drift["mean"],
                            "max_abs_delta_logprob": drift["max"], "greedy_token_changed": changed / len(greedy),
                            "median_top2_gap": statistics.median(gaps), "from_float64": deltas_from(read, exact)}
    return report


def run(shape: str, requests: int, demo: bool = True) -> dict:
    report = {}
    if demo:
        ray.init(logging_level=logging.WARNING, include_dashboard=False, log_to_driver=False)
        try:
            runs = {q: demo_answers(DEMO_MODEL, q) for q in QUANTIZE_MODES}
        finally:
            ray.shutdown()
        report["demo"] = {q: {"held_out_accuracy": acc, "answers": answers} for q, (acc, answers) in runs.items()}
        report["demo"]["answers_changed"] = sum(a != b for a, b in zip(*(answers for _, answers in runs.values())))
    folder = checkpoint(shape)
    vocab = SwitchCheckpoint.open(folder).config.vocab_size
    report[shape] = {"requests": requests, "vocab_size": vocab,
                     **logprob_drift(folder, workload(requests, vocab, "default", seed=0))}
    return report


def print_report(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report))
        return
    if "demo" in report:
        demo = report["demo"]
        print("demo model, held-out exact-match accuracy:")
        for q in QUANTIZE_MODES:
            print(f"  quantize {q}: " + ", ".join(f"{t} {a:.1%}" for t, a in demo[q]["held_out_accuracy"].items()))
        print(f"  demo answers that differ between them: {demo['answers_changed']} of {len(demo['none']['answers'])}")
    for shape, drift in ((k, v) for k, v in report.items() if k != "demo"):
        print(f"{shape} shape, {drift['requests']} requests, float32 greedy tokens read back by the front "
              f"(float32's mean greedy log-probability {drift['float32_mean_greedy_logprob']:.2f}, uniform over the "
              f"vocabulary {-math.log(drift['vocab_size']):.2f}; median gap to the second token "
              f"{drift['none']['median_top2_gap']:.4f}):")
        for q in QUANTIZE_MODES:
            d = drift[q]
            print(f"  quantize {q}: {d['tokens']} tokens, |delta logprob| mean {d['mean_abs_delta_logprob']:.4f} "
                  f"max {d['max_abs_delta_logprob']:.4f}; most likely token changed at "
                  f"{d['greedy_token_changed']:.1%} of positions")
        print("  against float64 (transformers), |delta logprob|:")
        for name, d in [("transformers float32", drift["float32_from_float64"]),
                        *((f"quantize {q}", drift[q]["from_float64"]) for q in QUANTIZE_MODES)]:
            print(f"    {name}: mean {d['mean']:.2e} max {d['max']:.2e}; over 1e-4 at {d['over_1e-4']:.1%} of tokens")
