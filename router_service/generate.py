"""Greedy generation over a batch of prompts with a KV cache."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from router_service.model import SwitchFront


@dataclass
class Generation:
    token_ids: list[int] = field(default_factory=list)  # generated tokens, without the decoder start token
    logprobs: list[float] = field(default_factory=list)  # log-probability of each chosen token
    finish_reason: str = "length"  # "eos" or "length"
    dropped_tokens: int = 0  # tokens over an expert's capacity, over all sparse layers of both stacks

    def to_dict(self, logprobs: bool = True) -> dict:
        out = {"token_ids": self.token_ids, "finish_reason": self.finish_reason,
               "dropped_tokens": self.dropped_tokens}
        if logprobs:
            out["logprobs"] = self.logprobs
        return out


def check_prompts(input_ids: list[list[int]], vocab_size: int, max_new_tokens: int) -> None:
    """Reject bad input before any work starts, naming the field."""
    if not input_ids:
        raise ValueError("input_ids: at least one prompt is needed")
    for i, ids in enumerate(input_ids):
        if not ids:
            raise ValueError(f"input_ids[{i}]: empty prompt")
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"input_ids[{i}]: token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be at least 1, got {max_new_tokens}")


@torch.inference_mode()
def generate_greedy(front: SwitchFront, input_ids: list[list[int]], max_new_tokens: int) -> list[Generation]:
    """Decode all prompts together; a sequence that ends leaves the batch at once, freeing its cache."""
    config = front.config
    check_prompts(input_ids, config.vocab_size, max_new_tokens)
    eos = config.eos_token_id
    eos_ids = torch.tensor(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    encoded = front.encode(input_ids)
    results = [Generation(dropped_tokens=int(d)) for d in encoded.dropped]
    cache = front.start_decoding(encoded)
    active = torch.arange(len(input_ids))
    tokens = torch.full((len(input_ids),), config.decoder_start_token_id, dtype=torch.long)
    for step in range(max_new_tokens):
        logits, dropped = front.decode_step(cache, tokens)
        logits = logits.float()
        tokens = logits.argmax(dim=-1)
        chosen = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
        ended = torch.isin(tokens, eos_ids)
        for row, seq in enumerate(active.tolist()):
            result = results[seq]
            result.token_ids.append(int(tokens[row]))
            result.logprobs.append(float(chosen[row]))
            result.dropped_tokens += int(dropped[row])
            if ended[row]:
                result.finish_reason = "eos"
        if step + 1 == max_new_tokens or bool(ended.all()):
            break
        if bool(ended.any()):
            going = (~ended).nonzero().squeeze(1)
            active, tokens, cache = active[going], tokens[going], cache.select(going)
    return results
