"""`make demo`: a small Switch checkpoint with a tokenizer, served with its experts in Ray actors."""

from __future__ import annotations

import time
from pathlib import Path

from cluster.synthetic import tiny_config, write_random_checkpoint

WORDS = ("zero one two three four five six seven eight nine ten eleven twelve hundred thousand "
         "sort reverse spell count add the list of numbers and then please : , .").split()
MAX_NEW_TOKENS = 12
PROMPTS = ["sort the list : nine two seven", "reverse : one two three four", "spell 42 ,", "count to ten"]


def write_word_tokenizer(path: Path) -> int:
    """A whitespace word-level tokenizer with T5's special ids (pad 0, eos 1, unk 2); returns its size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)
    return len(vocab)


def build_demo_checkpoint(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    vocab_size = write_word_tokenizer(path)
    config = tiny_config(vocab_size=vocab_size, d_model=64, d_ff=128, num_experts=8, expert_capacity=4)
    write_random_checkpoint(path, config, max_shard_size="100KB")


def transformers_generate(path: Path, input_ids: list[list[int]]) -> list[list[int]]:
    """transformers' own greedy generate on the same checkpoint, generated tokens cut after EOS."""
    import torch
    from transformers import SwitchTransformersForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = SwitchTransformersForConditionalGeneration.from_pretrained(path).eval()
    ids = torch.zeros(len(input_ids), max(map(len, input_ids)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(input_ids):
        ids[row, :len(seq)], mask[row, :len(seq)] = torch.tensor(seq), 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    generated = []
    for row in out[:, 1:].tolist():
        eos = model.config.eos_token_id
        generated.append(row[:row.index(eos) + 1] if eos in row else row)
    return generated


def run_demo(model_dir: str, experts_per_actor: int = 2) -> None:
    from cluster.engine import SwitchCluster

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        print(f"building a demo checkpoint (random weights, {len(WORDS) + 3}-word tokenizer) in {path}")
        build_demo_checkpoint(path)
    start = time.perf_counter()
    with SwitchCluster(path, experts_per_actor=experts_per_actor) as model:
        config = model.checkpoint.config
        print(f"serving {path}: {config.num_experts} experts x {len(model.placement.owners())} sparse layers "
              f"in {len(model.actors)} Ray actors (ready in {time.perf_counter() - start:.1f}s)")
        outputs = model.generate(texts=PROMPTS, max_new_tokens=MAX_NEW_TOKENS)
        reference = transformers_generate(path, [model.tokenizer(p)["input_ids"] for p in PROMPTS])
        print("\n(random weights: the words are arbitrary; each line is checked against transformers' generate)")
        for prompt, out, ref in zip(PROMPTS, outputs, reference):
            same = "same as transformers" if out.token_ids == ref else f"DIFFERS from transformers: {ref}"
            print(f"  {prompt!r:36} -> {model.decode(out.token_ids)!r}\n  {'':36}    "
                  f"[{out.finish_reason}, {out.dropped_tokens} tokens over capacity, {same}]")
        counts = model.expert_token_counts()
    print("\ntokens received by each expert of each sparse layer:")
    print(f"  {'layer':<12}" + "".join(f"{'e' + str(e):>6}" for e in range(config.num_experts)))
    for (stack, layer), row in counts.items():
        print(f"  {stack + '.' + str(layer):<12}" + "".join(f"{n:>6}" for n in row))
