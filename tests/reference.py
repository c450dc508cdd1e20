"""transformers as the reference: its greedy generate and its routers' drops, for comparison; a run of ours in
the background, to break things under it; and where the repository's files are."""

from __future__ import annotations

import copy
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import DynamicCache, EncoderDecoderCache
from transformers.activations import ACT2FN

from experts import int8
from experts.checkpoint import SwitchCheckpoint
from experts.ffn import expert_ffn
from experts.spec import expert_tensor_names

ROOT = Path(__file__).resolve().parents[1]  # the repository
DATA = ROOT / "tests" / "data"
MODEL_CONFIGS = DATA / "model-configs"  # the released checkpoints' configs


class LocalExperts:
    """A dispatch that computes the experts in this process, with the FFN the actors run, on `device` in
    `dtype` (default: the checkpoint's), and answers at once."""

    def __init__(self, checkpoint: SwitchCheckpoint, device: str = "cpu", dtype: torch.dtype | None = None):
        self.checkpoint, self.act = checkpoint, ACT2FN[checkpoint.config.dense_act_fn]
        self.device, self.dtype = device, dtype or checkpoint.dtype

    def send(self, stack, layer, tokens, expert, keep):
        keep = torch.ones_like(expert, dtype=torch.bool) if keep is None else keep
        out = torch.zeros_like(tokens)
        for e in expert[keep].unique().tolist():
            rows = (expert == e) & keep
            wi, wo = (t.to(self.device, self.dtype)
                      for t in self.checkpoint.read(list(expert_tensor_names(stack, layer, e))).values())
            out[rows] = expert_ffn(tokens[rows], wi, wo, self.act)
        return SimpleNamespace(result=lambda: out)

    def settle(self):
        pass  # counts nothing


def padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and attention mask, T5's convention."""
    ids = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(prompts):
        ids[row, :len(seq)], mask[row, :len(seq)] = torch.tensor(seq), 1
    return ids, mask


def edit_config(path, file: str = "config.json", **changes) -> None:
    """Rewrite fields of a checkpoint's config.json, or of another of its JSON files (None deletes the field)."""
    file = path / file
    config = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    file.write_text(json.dumps(config))


def hf_generate(model, prompts: list[list[int]], max_new_tokens: int, decoder_start_token_id: int | None = None,
                distributions: bool = False):
    """transformers' greedy generate on right-padded prompts: per prompt, the generated tokens (cut after EOS)
    and the log-probability of each; with `distributions`, also every token's log-probability at each step
    ([steps, vocab], on the CPU)."""
    ids, mask = (t.to(model.device) for t in padded(prompts))
    kwargs = {} if decoder_start_token_id is None else {"decoder_start_token_id": decoder_start_token_id}
    # A cache built without a config grows per layer: transformers 5.23 sizes a config-built cache by the
    # encoder's layer count and fails when the decoder has more layers.
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, past_key_values=cache, **kwargs)
    logprobs = torch.stack([torch.log_softmax(step.float(), dim=-1) for step in out.logits], dim=1)
    eos = model.generation_config.eos_token_id  # what generate ended on
    eos = set(eos if isinstance(eos, list) else [eos])
    results = []
    for row, seq in enumerate(out.sequences[:, 1:].tolist()):
        tokens = seq[:next((i + 1 for i, t in enumerate(seq) if t in eos), len(seq))]
        chosen = [float(logprobs[row, i, t]) for i, t in enumerate(tokens)]
        results.append((tokens, chosen, logprobs[row, :len(tokens)].cpu()) if distributions else (tokens, chosen))
    return results


def hf_dropped_tokens(model, prompts: list[list[int]]) -> list[int]:
    """Per prompt, tokens transformers' encoder routers drop over capacity (a real token whose dispatch row is
    all zero), read with forward hooks on transformers' own routers."""
    dropped = torch.zeros(len(prompts), dtype=torch.long)
    ids, mask = padded(prompts)

    def count(_module, _inputs, outputs):
        nonlocal dropped
        expert_index = outputs[0]  # [batch, len, experts], zeroed where over capacity
        dropped += ((expert_index.sum(-1) == 0) & mask.bool()).sum(-1)

    routers = [m for name, m in model.encoder.named_modules() if name.endswith("mlp.router")]
    hooks = [r.register_forward_hook(count) for r in routers]
    try:
        with torch.no_grad():
            model.encoder(input_ids=ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    return dropped.tolist()


def hf_routing(model, prompts: list[list[int]], max_new_tokens: int) -> list[dict]:
    """Per prompt, where transformers' own routers sent each position during its greedy generate, read with forward
    hooks: {(stack, layer): (experts, probs, dropped)}, encoder lists over the prompt's tokens, decoder lists over
    the decoder's inputs (one a step; steps after a prompt's end are cut)."""
    seen = {}  # (stack, layer) -> one (expert_index, router_probs, router_logits) per call

    def hook(key):
        def record(_module, _inputs, outputs):
            seen.setdefault(key, []).append(outputs)
        return record

    hooks = [module.register_forward_hook(hook((name.split(".")[0], int(name.split(".")[2]))))
             for name, module in model.named_modules() if name.endswith("mlp.router")]
    try:
        generated = hf_generate(model, prompts, max_new_tokens)
    finally:
        for h in hooks:
            h.remove()
    out = [{} for _ in prompts]
    for (stack, layer), calls in seen.items():
        # The encoder runs once over the padded prompts; the decoder once a step, one position each.
        index, probs, logits = (torch.cat(parts, dim=1) for parts in zip(*calls))
        for row, (prompt, (tokens, _)) in enumerate(zip(prompts, generated)):
            n = len(prompt) if stack == "encoder" else len(tokens)
            out[row][(stack, layer)] = (logits[row, :n].argmax(-1).tolist(), probs[row, :n, 0].tolist(),
                                        (index[row, :n].sum(-1) == 0).tolist())
    return out


def dequantized_model(hf_model):
    """A copy of the transformers model whose expert weights are int8's dequantized values."""
    model = copy.deepcopy(hf_model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".mlp.experts." in name:
                param.copy_(int8.quantize(param).dequantized(param.dtype))
    return model


def wait_until(condition, what: str, timeout_s: float = 30.0, poll_s: float = 0.01) -> None:
    """Until `condition()` holds; fails, naming `what`, after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll_s)


def generate_in_background(model, prompts, **sampling):
    """`model.generate` (a SwitchCluster) on its own thread; returns (thread, result) once the batch is
    decoding. `result` gets "outputs", or "error" if generation raised."""
    result = {}

    def run():
        try:
            result["outputs"] = model.generate(prompts, **sampling)
        except Exception as e:
            result["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 30
    while not model.batcher.active and time.monotonic() < deadline:  # wait until the batch is decoding
        time.sleep(0.005)
    assert model.batcher.active, "generation did not start"
    return thread, result
