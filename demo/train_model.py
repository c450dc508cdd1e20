"""Train a small Switch Transformers checkpoint whose answers can be checked at a glance.

    .venv/bin/python demo/train_model.py --out demo/model

Three tasks on single digits, with a word-level tokenizer:

    reverse : 3 1 4 1   ->  1 4 1 3
    sort : 3 1 4 1      ->  1 1 3 4
    spell : 4 7 2       ->  four hundred seventy two

A randomly initialised SwitchTransformersForConditionalGeneration (8 experts in 4 sparse layers) is trained on
examples drawn fresh every step, and stops as soon as greedy decoding is exactly right on every held-out example
(or when the learning-rate schedule or the time limit runs out). The folder written holds the model
(safetensors), the tokenizer and TRAINING.md with the measured held-out accuracy.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

from cluster.demo import HELD_OUT, TASKS, WORDS, make_example, make_held_out
from cluster.testing import word_tokenizer

SEED = 0
MODEL_CONFIG = dict(
    d_model=64, d_kv=16, num_heads=4, d_ff=128,
    num_layers=4, num_decoder_layers=4, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2,
    num_experts=8,
    expert_capacity=64,  # prompts and answers are at most 8 tokens, so no token is ever over capacity
    dense_act_fn="relu", dropout_rate=0.0,
    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
)
BATCH_SIZE = 64
LEARNING_RATE = 2e-3
WARMUP_STEPS = 200
TRAIN_STEPS = 6000  # the learning rate decays linearly to zero over these
EVAL_EVERY = 250
MAX_NEW_TOKENS = 8  # the longest answer is 6 words plus </s>


def training_batch(rng: random.Random, excluded: set[str]) -> tuple[list[str], list[str]]:
    """BATCH_SIZE fresh examples, tasks mixed evenly, none of them held out."""
    prompts, answers = [], []
    while len(prompts) < BATCH_SIZE:
        prompt, answer = make_example(TASKS[len(prompts) % len(TASKS)], rng)
        if prompt not in excluded:
            prompts.append(prompt)
            answers.append(answer)
    return prompts, answers


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str]) -> list[str]:
    """Greedy answers, decoded to space-joined words."""
    enc = tokenizer(prompts, padding=True, return_tensors="pt")
    out = model.generate(**enc, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    return tokenizer.batch_decode(out, skip_special_tokens=True)


def accuracy(model, tokenizer, held_out: dict[str, list[tuple[str, str]]]) -> dict[str, float]:
    """Exact-match accuracy of greedy decoding on each task's held-out examples."""
    model.eval()
    result = {}
    for task, examples in held_out.items():
        predictions = generate(model, tokenizer, [p for p, _ in examples])
        result[task] = sum(pred == answer for pred, (_, answer) in zip(predictions, examples)) / len(examples)
    model.train()
    return result


def train(model, tokenizer, held_out, max_seconds: float) -> tuple[int, dict[str, float]]:
    """Train until every held-out example is answered exactly, or a limit is reached; returns steps, accuracy."""
    rng = random.Random(SEED + 1)
    excluded = {prompt for examples in held_out.values() for prompt, _ in examples}
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    # Warm up to keep Adam's first steps small; the decay after it settles the last few percent of accuracy,
    # which a constant rate keeps flipping back and forth.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / WARMUP_STEPS, (TRAIN_STEPS - step) / (TRAIN_STEPS - WARMUP_STEPS)))
    start = time.perf_counter()
    model.train()
    for step in range(1, TRAIN_STEPS + 1):
        prompts, answers = training_batch(rng, excluded)
        enc = tokenizer(prompts, text_target=answers, padding=True, return_tensors="pt")
        enc["labels"][enc["labels"] == tokenizer.pad_token_id] = -100  # no loss on padding
        # output_router_logits adds the router z-loss and load-balancing loss to the cross-entropy.
        loss = model(**enc, output_router_logits=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        out_of_time = time.perf_counter() - start > max_seconds
        if step % EVAL_EVERY == 0 or out_of_time or step == TRAIN_STEPS:
            acc = accuracy(model, tokenizer, held_out)
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.0f}s  "
                  + "  ".join(f"{t} {a:.1%}" for t, a in acc.items()), flush=True)
            if all(a == 1.0 for a in acc.values()) or out_of_time:
                return step, acc
    return TRAIN_STEPS, acc


def check_tokenizer(out: Path) -> None:
    """The saved tokenizer loads with AutoTokenizer and round-trips text."""
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "spell : 4 7 2"
    ids = tokenizer(text)["input_ids"]
    assert ids[-1] == 1 and 2 not in ids, ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def write_report(out: Path, model, vocab_size: int, steps: int, seconds: float, acc: dict[str, float],
                 samples: list[tuple[str, str, str]]) -> None:
    lines = [
        "# Demo checkpoint: a small trained Switch Transformers model",
        "",
        "Produced by:",
        "",
        "```bash",
        ".venv/bin/python demo/train_model.py " + " ".join(sys.argv[1:]),
        "```",
        "",
        "## Tasks",
        "",
        "Lists are 2 to 6 single digits; numbers are 0 to 999, written digit by digit (held-out numbers all have "
        "three digits; every number below 100 is in training). Some held-out prompts "
        "and the saved model's greedy answers:",
        "",
        "| prompt | expected | model |",
        "|---|---|---|",
        *[f"| `{p}` | `{a}` | `{m}` |" for p, a, m in samples],
        "",
        "## Model",
        "",
        f"`SwitchTransformersForConditionalGeneration`, randomly initialised (seed {SEED}), "
        f"{model.num_parameters()} parameters, float32, word-level tokenizer of "
        f"{vocab_size} tokens (`<pad>`=0, `</s>`=1, `<unk>`=2).",
        "",
        *[f"- {k} = {v}" for k, v in MODEL_CONFIG.items()],
        "",
        "## Training",
        "",
        f"- AdamW, learning rate {LEARNING_RATE} after {WARMUP_STEPS} warmup steps, then linear decay to zero "
        f"at step {TRAIN_STEPS}; batch {BATCH_SIZE}, "
        "fresh random examples each step (held-out prompts excluded)",
        "- loss: cross-entropy plus the router z-loss and load-balancing loss (`output_router_logits=True`)",
        f"- {steps} steps (held-out accuracy checked every {EVAL_EVERY} steps, training stops at 100%), "
        f"{seconds / 60:.1f} minutes of training, wall clock, on 2 CPU threads",
        "",
        "## Held-out exact-match accuracy",
        "",
        f"Greedy `generate` (max_new_tokens={MAX_NEW_TOKENS}) on prompts never seen in training:",
        "",
        *[f"- {task}: {a:.1%} of {HELD_OUT[task]}" for task, a in acc.items()],
        "",
    ]
    (out / "TRAINING.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder to write the checkpoint to")
    parser.add_argument("--max-minutes", type=float, default=9.0, help="stop training after this long")
    args = parser.parse_args()

    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    args.out.mkdir(parents=True, exist_ok=True)

    tokenizer = word_tokenizer(WORDS)
    tokenizer.save_pretrained(args.out)
    check_tokenizer(args.out)

    held_out = make_held_out()
    config = SwitchTransformersConfig(vocab_size=len(tokenizer), **MODEL_CONFIG)
    model = SwitchTransformersForConditionalGeneration(config)

    start = time.perf_counter()
    steps, acc = train(model, tokenizer, held_out, args.max_minutes * 60)
    seconds = time.perf_counter() - start

    model.eval()
    model.save_pretrained(args.out)
    shown = [example for task in TASKS for example in held_out[task][:3]]
    answers = generate(model, tokenizer, [prompt for prompt, _ in shown])
    samples = [(prompt, expected, answer) for (prompt, expected), answer in zip(shown, answers)]
    for prompt, expected, answer in samples:
        print(f"{prompt!r:28} -> {answer!r}" + ("" if answer == expected else f"  (expected {expected!r})"))
    write_report(args.out, model, len(tokenizer), steps, seconds, acc, samples)
    print(f"{steps} steps in {seconds:.0f}s; held-out accuracy "
          + ", ".join(f"{t} {a:.1%}" for t, a in acc.items()) + f"; saved to {args.out}")


if __name__ == "__main__":
    main()
