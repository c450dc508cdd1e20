"""What a decoding step asks of the device, the front's against transformers': the ATen ops that make or write a tensor
(each a kernel launched on a GPU, where a step of a small batch waits on the CPU launching them) and, on a GPU, the
reads back to the host (copies, scalars, nonzero's indices: each waits for the device). Counted, not timed, so that
the count does not move with the machine's speed; the weights' sizes do not change it, so the checkpoint is
switch-base-8's layout with tiny dimensions, its every expert held stacked as on a front's GPU, and a batch of
prompts of 5 to 13 tokens. The count is of one device's ops: a CPU's and a GPU's can differ where one fuses what the
other runs as two.

    .venv/bin/python -m cluster.bench_step                 # float32, batches of 1 and 32, on the GPU if there is one
    .venv/bin/python -m cluster.bench_step --dtype bf16
"""

from __future__ import annotations

import argparse
import collections
import tempfile

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache, EncoderDecoderCache

from cluster.testing import tiny_config, write_random_checkpoint
from cluster.workloads import SHAPES
from experts.checkpoint import SwitchCheckpoint
from experts.ffn import ACTIVATION_FUNCTIONS
from experts.held import stacked_experts
from experts.spec import STACKS, sparse_layers
from experts.wire import torch_dtype
from router_service.dispatch import ExpertDispatcher
from router_service.model import DecoderCache, SwitchFront

LAYOUT = {name: SHAPES["base-8"][name] for name in ("num_layers", "num_decoder_layers", "num_sparse_encoder_layers",
                                                     "num_sparse_decoder_layers", "num_experts")}
STEPS_BEFORE = 3  # steps decoded before the one counted, so that the caches have grown as they do in a run


# Ops on a device whose result the host reads besides copies to it: a scalar (`.item()`, `int(t)`), and the
# indices of nonzero elements (their count sizes the output).
HOST_READS = {"aten._local_scalar_dense", "aten.nonzero"}


class DeviceWork(TorchDispatchMode):
    """Counts the ops that make or write a tensor (not views), by name, and the reads back to the host from a device
    (copies to it and HOST_READS), each of which waits for the device."""

    def __init__(self):
        super().__init__()
        self.ops, self.reads = collections.Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # A view, or a cast to the dtype a tensor has, returns the memory it was given.
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        outputs = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]
        if func._schema.name.endswith("_") or any(o.untyped_storage().data_ptr() not in inputs for o in outputs):
            self.ops[str(func.overloadpacket)] += 1
        on_device = any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args)
        self.reads += on_device and (str(func.overloadpacket) in HOST_READS
                                     or any(o.device.type == "cpu" for o in outputs))
        return out


def front_with_every_expert(folder: str, device: str, dtype: torch.dtype, packed_weights: bool = False) -> SwitchFront:
    """A front that computes every expert itself, each layer's held stacked (no actors, no Ray)."""
    checkpoint = SwitchCheckpoint.open(folder)
    config = checkpoint.config
    experts = range(config.num_experts)
    layers = [(stack, layer) for stack in STACKS for layer in sparse_layers(config, stack)]
    stacks = {layer: stacked_experts(checkpoint, layer, device, dtype) for layer in layers}
    dispatcher = ExpertDispatcher([], {layer: {e: [0] for e in experts} for layer in layers}, config.num_experts,
                                  act=ACTIVATION_FUNCTIONS[config.dense_act_fn])
    # The experts' weights views of the stacks, as experts.held.held_experts holds them on a GPU.
    dispatcher.use([], {(*layer, e): (wi[e], wo[e]) for layer, (wi, wo) in stacks.items() for e in experts}, stacks)
    return SwitchFront(checkpoint, dispatcher, dtype=dtype, device=device, packed_weights=packed_weights)


def front_step(folder: str, prompts: list[list[int]], device: str, dtype: torch.dtype) -> DeviceWork:
    """The front's decoding step, every expert held stacked."""
    front = front_with_every_expert(folder, device, dtype)
    cache = DecoderCache.merge([front.start_decoding(encoded) for _, encoded in front.encode(prompts)], len(prompts))
    tokens = torch.zeros(len(prompts), dtype=torch.long)
    for _ in range(STEPS_BEFORE):
        cache, logits, _ = front.decode_step(cache, tokens)
        tokens = logits.argmax(-1)
    with DeviceWork() as work:
        front.decode_step(cache, tokens)
    return work


def transformers_step(model, prompts: list[list[int]], device: str) -> DeviceWork:
    """transformers' decoding step with its cache, the way `generate` runs it."""
    width = max(map(len, prompts))
    ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts], device=device)
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts], device=device)
    encoded = model.get_encoder()(input_ids=ids, attention_mask=mask)
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    tokens = torch.zeros(len(prompts), 1, dtype=torch.long, device=device)

    def step():
        return model(encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=tokens, past_key_values=cache,
                     use_cache=True)

    for _ in range(STEPS_BEFORE):
        step()
    with DeviceWork() as work:
        step()
    return work


@torch.inference_mode()
def count(batches: list[int], device: str, dtype: torch.dtype) -> list[dict]:
    """Per batch size: the ops and reads of a step of each system, and the front's by name."""
    with tempfile.TemporaryDirectory() as folder:
        model = write_random_checkpoint(folder, tiny_config(**LAYOUT)).to(device, dtype)
        rows = []
        for batch in batches:
            prompts = [[(7 * row + i) % 90 + 3 for i in range(5 + row % 9)] for row in range(batch)]
            ours, theirs = front_step(folder, prompts, device, dtype), transformers_step(model, prompts, device)
            rows.append({"batch": batch, "front_ops": sum(ours.ops.values()), "front_reads": ours.reads,
                         "transformers_ops": sum(theirs.ops.values()), "transformers_reads": theirs.reads,
                         "front_by_op": dict(ours.ops.most_common())})
        return rows


def report(batches: list[int], dtype: torch.dtype) -> str:
    """count's rows as lines of text, on the GPU if there is one."""
    device, lines = "cuda" if torch.cuda.is_available() else "cpu", []
    for row in count(batches, device, dtype):
        lines += [f"{device} {str(dtype).removeprefix('torch.')}, a step of {row['batch']}: "
                  f"the front {row['front_ops']} ops, {row['front_reads']} reads back; "
                  f"transformers {row['transformers_ops']} ops, "
                  f"{row['transformers_reads']} reads back",
                  "   the front's: " + ", ".join(f"{op} {n}" for op, n in row["front_by_op"].items())]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batches", default="1,32", help="batch sizes, comma-separated")
    args = parser.parse_args()
    print(report([int(b) for b in args.batches.split(",")], torch_dtype(args.dtype)))


if __name__ == "__main__":
    main()
