"""The front of a Switch Transformers model: everything except the expert FFNs.

Embeddings, T5 RMS norms, self- and cross-attention with relative position bias, dense FFN layers, the top-1
routers (in the config's router_dtype) and the LM head run here, matching transformers'
`SwitchTransformersForConditionalGeneration` operation for operation. Each sparse layer routes its tokens, applies
the capacity rule and hands the kept tokens to an expert dispatcher (the Ray actors), then scales what comes back by
the router probability.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from experts.checkpoint import SwitchCheckpoint
from experts.ffn import ACTIVATION_FUNCTIONS, core_threads, linear_on_cores, pack
from experts.spec import (
    CAPACITY_MODES,
    STACKS,
    expected_tensors,
    ffn_prefix,
    num_layers,
    router_tensor_name,
    sparse_layers,
)

# The front's dispatch (router_service.dispatch.ExpertDispatcher): `dispatch.send(stack, layer, tokens [N,
# d_model], expert [N], keep [N] or None for all)` starts the expert calls and returns a handle whose `.result()` is
# the expert outputs [N, d_model], zero where not kept, and whose `.abandon(error)` cancels its calls where another
# micro-batch failed with `error`; `dispatch.settle()` is told when a pass's results are back from the device. A
# micro-batch's math is a generator that yields that handle at each sparse layer and is resumed with the outputs.
MicroBatch = Generator

# The names' endings of the front's weights that multiply activations, besides the fused attention weights and a tied
# LM head (the others are layer norms, embeddings, routers and position biases).
PRODUCT_WEIGHTS = (".q.weight", ".o.weight", ".wi.weight", ".wo.weight", "lm_head.weight")


def run_overlapped(micro_batches: list[MicroBatch]) -> list:
    """Run micro-batches to their ends in turns: each runs until it has sent a sparse layer's expert calls, then
    the next one computes while those calls are out. Returns what each returned."""
    n = len(micro_batches)
    pending, results, live = [None] * n, [None] * n, list(range(n))
    try:
        while live:
            for j in list(live):
                try:
                    pending[j] = micro_batches[j].send(None if pending[j] is None else pending[j].result())
                except StopIteration as finished:
                    results[j] = finished.value
                    live.remove(j)
    except BaseException as e:  # the others' calls in flight too (see PendingDispatch.abandon)
        for j in live:
            if pending[j] is not None:
                pending[j].abandon(e)
        raise
    return results


@dataclass
class Routing:
    """Where one sparse layer sent each position of each row: tensors [batch, positions], on the CPU once a pass is
    done. On padding: expert -1, prob 0, not dropped."""

    expert: torch.Tensor  # the router's top-1 expert
    prob: torch.Tensor  # its router probability (what scales the expert's output)
    dropped: torch.Tensor  # bool: over the expert's capacity, so only the residual carried it

    @staticmethod
    def dropped_per_row(routing: dict[int, Routing], batch: int) -> torch.Tensor:
        """[batch] tokens over capacity, summed over positions and sparse layers."""
        return sum((r.dropped.sum(dim=1) for r in routing.values()), torch.zeros(batch, dtype=torch.long))

    @staticmethod
    def cat(parts: list[dict[int, Routing]]) -> dict[int, Routing]:
        """The rows of each part in turn, layer by layer, on the CPU."""
        layers = list(parts[0])
        fields = [on_host([torch.cat([getattr(p[layer], f) for p in parts]) if len(parts) > 1
                           else getattr(parts[0][layer], f) for layer in layers])
                  for f in ("expert", "prob", "dropped")]
        return {layer: Routing(*(field[i] for field in fields)) for i, layer in enumerate(layers)}


def on_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Tensors of one dtype on the CPU, read back from a GPU in one copy: each copy waits for the device and has a
    fixed cost, and a step has a few tensors of routing for every sparse layer."""
    if all(t.device.type == "cpu" for t in tensors):  # none to read back (an empty list too)
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors]).cpu()
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


@dataclass
class EncoderOutput:
    hidden: torch.Tensor  # [batch, src_len, d_model], right-padded
    mask: torch.Tensor  # [batch, src_len] bool, True on real tokens
    routing: dict[int, Routing]  # per sparse layer of the encoder

    @property
    def dropped(self) -> torch.Tensor:
        """[batch] tokens that went over an expert's capacity, summed over sparse layers."""
        return Routing.dropped_per_row(self.routing, self.mask.shape[0])

    def rows(self, rows: list[int]) -> EncoderOutput:
        """The hidden states and mask of these rows only (for the decoder: without the routing)."""
        return EncoderOutput(self.hidden[rows], self.mask[rows], {})


@dataclass
class DecoderCache:
    """Per-layer key/value cache of the sequences decoding together, one row each.

    Sequences join at different times, so their self-attention caches have different lengths: they are
    left-padded to a common width and `self_valid` marks the real positions. Every step appends one column for
    all rows, so a key's distance to the newest query is the same in every row and one relative position bias
    serves the whole batch. The self-attention tensors keep room for more columns than are used, so that a step
    writes its column in place rather than copying the whole cache; the room doubles when it runs out. Their memory
    also holds `row_room` rows (from the first join on, the batch's limit), so that sequences that join write their
    rows there rather than copying the whole cache.
    """

    self_k: list[torch.Tensor]  # [batch, heads, room, d_kv] per layer; columns from `width` on are unused
    self_v: list[torch.Tensor]
    self_valid: torch.Tensor  # [batch, width] bool
    cross_k: list[torch.Tensor]  # [batch, heads, src_len, d_kv], computed once from the encoder output
    cross_v: list[torch.Tensor]
    cross_bias: torch.Tensor  # [batch, 1, 1, src_len], additive mask over encoder padding
    row_room: int = 0  # rows the memory of every tensor above holds from its first row on (0: no more than batch)

    @property
    def width(self) -> int:
        return self.self_valid.shape[1]

    @property
    def batch(self) -> int:
        return self.self_valid.shape[0]

    def with_room(self, width: int) -> DecoderCache:
        """This cache, or a copy with room for at least `width` self-attention columns."""
        if self.self_k and self.self_k[0].shape[2] >= width:
            return self

        def grow(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
            out = []
            for t in tensors:
                bigger = t.new_empty(max(self.row_room, t.shape[0]), t.shape[1], self_columns(width), t.shape[3])
                bigger[:t.shape[0], :, :self.width] = t[:, :, :self.width]
                out.append(bigger[:t.shape[0]])
            return out

        return DecoderCache(grow(self.self_k), grow(self.self_v), self.self_valid, self.cross_k, self.cross_v,
                            self.cross_bias, self.row_room)

    def without(self, leaving: list[int]) -> tuple[DecoderCache, list[int]]:
        """This cache without the rows in `leaving`, and for each row that stays, the row it was; trimmed of the
        columns no staying row uses, so that its width is that of its longest sequence, however long the batch has
        been decoding. Each leaving row below the new count is overwritten by one of the last rows that stay, then
        every tensor is cut to the new count and columns: views of the same memory, so a sequence that leaves costs
        a copy of one row rather than of the whole cache (copying it took about 5% of a run of 32 requests). The
        rows cut off are the room of sequences that join later."""
        batch, gone = self.batch, set(leaving)
        n, device = batch - len(gone), self.self_valid.device
        holes = [row for row in sorted(gone) if row < n]
        movers = [row for row in range(n, batch) if row not in gone]
        order = list(range(n))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        if holes:
            to, source = torch.tensor(holes, device=device), torch.tensor(movers, device=device)
            for t in (*self.self_k, *self.self_v, *self.cross_k, *self.cross_v):
                t[to] = t[source]
        rows = torch.tensor(order, device=device)
        valid, cross_bias = self.self_valid[rows], self.cross_bias[rows]
        used = valid.any(dim=0).nonzero()
        first = int(used[0]) if used.numel() else valid.shape[1]
        src = int((cross_bias == 0).any(dim=0).nonzero()[:, -1].max()) + 1

        def cut(tensors: list[torch.Tensor], columns: slice) -> list[torch.Tensor]:
            return [t[:n, :, columns] for t in tensors]

        keep, cross = slice(first, None), slice(0, src)  # the self caches' room beyond their width stays
        cross_k, row_room = cut(self.cross_k, cross), max(self.row_room, batch)
        if src < self.cross_bias.shape[-1] and cross_k and multiplies_keys_contiguous(cross_k[0]):
            # Cut to the longest prompt left, the keys are a strided view that attention would copy at every step
            # of every layer (0.7 ms of a step of 32 in bfloat16, 2 ms of 64, over 12 layers): copied once, with
            # the rows' room.
            cross_k = [compact(t, row_room) for t in cross_k]
        return DecoderCache(cut(self.self_k, keep), cut(self.self_v, keep), valid[:, first:], cross_k,
                            cut(self.cross_v, cross), cross_bias[..., :src], row_room), order

    @staticmethod
    def merge(caches: list[DecoderCache], row_room: int = 0) -> DecoderCache:
        """The rows of each cache in turn: self caches left-padded, cross caches right-padded to fit. Written into
        the first cache's room when it has room for them (their self caches no wider than its, their prompts no
        longer), else copied into new memory with room for `row_room` rows. With 32 and 64 clients in a closed loop
        (switch-base-8's shape, 2 cores), copying the whole cache at every join took 6-18% of the time, and 3-5%
        with joins into the room (docs/BENCHMARKS.md)."""
        if len(caches) == 1:
            return caches[0]
        return caches[0]._joined(caches[1:]) or DecoderCache._copied(caches, row_room)

    def _joined(self, joining: list[DecoderCache]) -> DecoderCache | None:
        """This cache with the rows of `joining` written into its room; None unless they fit there."""
        rows, src = self.batch + sum(c.batch for c in joining), self.cross_bias.shape[-1]
        if rows > self.row_room or any(c.width > self.width or c.cross_bias.shape[-1] > src for c in joining):
            return None

        def extended(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
            return [t.as_strided((rows, *t.shape[1:]), t.stride(), t.storage_offset()) for t in tensors]

        cache = DecoderCache(extended(self.self_k), extended(self.self_v), valid_rows([self, *joining]),
                             extended(self.cross_k), extended(self.cross_v), cross_bias_rows([self, *joining]),
                             self.row_room)
        cache._write(joining, self.batch)
        return cache

    @staticmethod
    def _copied(caches: list[DecoderCache], row_room: int) -> DecoderCache:
        """The rows of `caches` copied into new memory that holds `row_room` rows (or as many as they have), with room
        for as many self-attention columns again."""
        rows, width = sum(c.batch for c in caches), max(c.width for c in caches)
        src = max(c.cross_bias.shape[-1] for c in caches)
        like = caches[0]

        def held(tensors: list[torch.Tensor], columns: int) -> list[torch.Tensor]:
            return [t.new_empty(max(row_room, rows), t.shape[1], columns, t.shape[3])[:rows] for t in tensors]

        cache = DecoderCache(held(like.self_k, self_columns(width)), held(like.self_v, self_columns(width)),
                             valid_rows(caches), held(like.cross_k, src), held(like.cross_v, src),
                             cross_bias_rows(caches), max(row_room, rows))
        cache._write(caches, 0)
        return cache

    def _write(self, caches: list[DecoderCache], row: int) -> None:
        """Write the rows of `caches` from `row` on: self caches left-padded to this one's width, cross caches
        right-padded to its prompt length. Padding is masked, but must hold numbers (a masked score's weight is 0,
        and 0 * NaN is NaN): it is zeroed."""
        for c in caches:
            rows, padding = slice(row, row + c.batch), self.width - c.width
            for into, own in zip(self.self_k + self.self_v, c.self_k + c.self_v):
                into[rows, :, :padding] = 0
                into[rows, :, padding:self.width] = own[:, :, :c.width]
            for into, own in zip(self.cross_k + self.cross_v, c.cross_k + c.cross_v):
                into[rows, :, :own.shape[2]] = own
                into[rows, :, own.shape[2]:] = 0
            row += c.batch


def compact(t: torch.Tensor, row_room: int) -> torch.Tensor:
    """A contiguous copy of `t`, in memory that holds `row_room` rows (or as many as it has)."""
    out = t.new_empty(max(row_room, t.shape[0]), *t.shape[1:])[:t.shape[0]]
    out.copy_(t)
    return out


def self_columns(width: int) -> int:
    """The self-attention columns a cache of `width` gets room for when it grows or is copied: as many again."""
    return max(2 * width, 16)


def valid_rows(caches: list[DecoderCache]) -> torch.Tensor:
    """The caches' self_valid row after row, left-padded (with False) to the widest."""
    width = max(c.width for c in caches)
    return torch.cat([F.pad(c.self_valid, (width - c.width, 0), value=False) for c in caches])


def cross_bias_rows(caches: list[DecoderCache]) -> torch.Tensor:
    """The caches' cross_bias row after row, right-padded (masked) to the longest prompt."""
    src, masked = max(c.cross_bias.shape[-1] for c in caches), torch.finfo(caches[0].cross_bias.dtype).min
    return torch.cat([F.pad(c.cross_bias, (0, src - c.cross_bias.shape[-1]), value=masked) for c in caches])


# Padded tokens that a group of prompts attended apart is worth. The encoder computes the math of each token on its own
# for the real tokens of all its prompts together; only attention runs group by group, each group padded to its longest
# prompt, so padding costs attention's share of a token and a group its Python and its smaller products. From 16 to
# 256, 32 prompts of 8-64 tokens took the same time to encode within noise (switch-base-8's shape, 2-core CPU), and
# all in one group 10-20% longer (docs/BENCHMARKS.md).
ENCODER_GROUP_COST = 64


def length_groups(lengths: list[int], group_cost: int) -> list[list[int]]:
    """The indices of `lengths`, shortest first, cut into groups so that padding every group to its longest,
    plus `group_cost` tokens a group, costs the least (dynamic programming over the cut points)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    best, cut = [0] + [None] * len(order), [0] * (len(order) + 1)  # best[n]: the cost of the first n
    for end in range(1, len(order) + 1):
        for start in range(end):
            cost = best[start] + lengths[order[end - 1]] * (end - start) + group_cost
            if best[end] is None or cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], len(order)
    while end:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """T5's layer norm of x by a weight of x's dtype: scale only, no mean subtraction, no bias; the mean square in
    fp32, the normalized x rounded to the dtype before the scale, as transformers does. F.rms_norm computes that
    normalized x (bit for bit on the CPU, in float32, bfloat16 and float16) in one op where transformers' way takes
    five, which counts where the GPU waits for the CPU to launch each kernel. In float32 the rounding is none, and
    F.rms_norm takes the scale too: one op where two."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps=eps)
    return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """T5's bucket of each key-minus-query distance: exact buckets for small distances, logarithmic ones up to
    `max_distance`, one bucket beyond; with `bidirectional`, half the buckets for keys after the query."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).to(torch.long) * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)  # a decoder query sees only earlier keys
    exact = num_buckets // 2
    log_bucket = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact)
                          * (num_buckets - exact)).to(torch.long)
    return buckets + torch.where(distance < exact, distance, log_bucket.clamp(max=num_buckets - 1))


def clamp_fp16(x: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
    """transformers' guard after every sub-layer in float16, keeping values finite: clamped to float16's largest, or
    1000 below it where any is infinite, which transformers asks of a request's values alone: here of each sequence's
    rows of x (`sequence`: each row's sequence), so that a batch mate's overflow changes no other sequence."""
    if x.dtype != torch.float16:
        return x
    top = torch.finfo(torch.float16).max
    infinite = torch.isinf(x).flatten(1).any(1).to(torch.int32)
    infinite = torch.zeros_like(infinite).index_add_(0, sequence, infinite)[sequence] > 0
    limit = torch.where(infinite, top - 1000, top).to(x.dtype).view(-1, *[1] * (x.dim() - 1))
    return torch.clamp(x, min=-limit, max=limit)


def multiplies_keys_contiguous(k: torch.Tensor) -> bool:
    """Whether `attention` copies keys that are a strided view (a decoding step's: the cache's first columns, its
    room between one head's matrix and the next) before their product: torch's bfloat16 product of such a view took
    twice as long as a copy of it and a product of the copy (in float32 a whole step took as long either way;
    docs/BENCHMARKS.md)."""
    return k.device.type == "cpu" and k.dtype != torch.float32


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """T5 attention of q, k, v [batch, heads, len, d_kv] to [batch, len, heads * d_kv]: no 1/sqrt(d_kv) scaling;
    position bias and mask are added to the scores; softmax in the scores' dtype, as transformers' (torch's fused
    attention rounds differently in half precision)."""
    if multiplies_keys_contiguous(k):
        k = k.contiguous()
    scores = torch.matmul(q, k.transpose(2, 3)) + bias
    out = torch.matmul(F.softmax(scores, dim=-1), v)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


class PromptGroup:
    """Prompts encoded together, right-padded to the longest: `rows` (their indices in the batch), `mask` [prompts,
    length] (True on real tokens) and `tokens`, where their real tokens lie among the batch's packed ones."""

    def __init__(self, rows: list[int], lengths: list[int], first: int):
        self.rows, self.length, self.count = rows, max(lengths), sum(lengths)
        self.mask = torch.arange(self.length)[None, :] < torch.tensor(lengths)[:, None]
        self.index = self.mask.view(-1).nonzero().squeeze(1)  # the real tokens' places in the flattened padding
        self.tokens = slice(first, first + self.count)

    @staticmethod
    def of(lengths: list[int], rows: list[int]) -> list[PromptGroup]:
        """These prompts (`rows`, of `lengths`) in groups of similar length (length_groups), their tokens packed
        group after group."""
        groups, first = [], 0
        for group in length_groups([lengths[r] for r in rows], ENCODER_GROUP_COST):
            groups.append(PromptGroup([rows[i] for i in group], [lengths[rows[i]] for i in group], first))
            first += groups[-1].count
        return groups

    def padded(self, packed: torch.Tensor, fill: float = 0) -> torch.Tensor:
        """The group's packed tokens [count, ...] as [prompts, length, ...], `fill` on padding."""
        shape = (*self.mask.shape, *packed.shape[1:])
        if self.count == self.mask.numel():
            return packed.reshape(shape)
        out = packed.new_full((self.mask.numel(), *packed.shape[1:]), fill)
        return out.index_copy_(0, self._index_on(packed.device), packed).view(shape)

    def packed(self, padded: torch.Tensor) -> torch.Tensor:
        """The real tokens of padded [prompts, length, ...], packed."""
        flat = padded.reshape(-1, *padded.shape[2:])
        return flat if self.count == self.mask.numel() else flat.index_select(0, self._index_on(padded.device))

    def _index_on(self, device: torch.device) -> torch.Tensor:
        """`index` on `device`, moved there once: a copy to a GPU waits for the work queued on it, and every layer of
        the encoder pass would wait twice."""
        if self.index.device != device:
            self.index = self.index.to(device)
        return self.index


class SwitchFront:
    """The non-expert weights of a checkpoint and the math that uses them. Never reads an expert tensor.

    Runs on `device` in `dtype` (default: the checkpoint's); takes token ids and returns logits on that device.
    With `micro_batches` > 1, each batch is split by rows and one part's math runs while another's expert calls
    are out. With `packed_weights`, the weights of its products get packed copies on the CPU (experts.ffn.pack)."""

    def __init__(self, checkpoint: SwitchCheckpoint, dispatch, capacity: str = "hf",
                 dtype: torch.dtype | None = None, device: str = "cpu", micro_batches: int = 1,
                 packed_weights: bool = True):
        if capacity not in CAPACITY_MODES:
            raise ValueError(f"capacity must be one of {', '.join(CAPACITY_MODES)}, got {capacity!r}")
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be at least 1, got {micro_batches}")
        self.config = config = checkpoint.config
        self.capacity = capacity
        self.dispatch = dispatch
        self.micro_batches = micro_batches
        required, _ = expected_tensors(config)
        # shared.weight's own name, or the copy a tied checkpoint holds in its place.
        names = [checkpoint.embedding if n == "shared.weight" else n for n in required if ".mlp.experts." not in n]
        self.device = torch.device(device)
        self.dtype = dtype or checkpoint.dtype
        self.weights = {name: t.to(self.device, self.dtype) for name, t in checkpoint.read(names).items()}
        # The routers compute in the config's router_dtype (float32 in every released checkpoint) from their weights in
        # the front's dtype, as transformers' do: cast once.
        self.router_dtype = getattr(torch, config.router_dtype)
        for stack in STACKS:
            for layer in sparse_layers(config, stack):
                for which in ("weight", "bias"):
                    if (name := router_tensor_name(stack, layer, which)) in self.weights:
                        self.weights[name] = self.weights[name].to(self.router_dtype)
        # Every self-attention's q, k and v as one matrix, and every cross-attention's k and v: one matmul each.
        self.fused = {}
        for stack in STACKS:
            for i in range(num_layers(config, stack)):
                attn = f"{stack}.block.{i}.layer.0.SelfAttention"
                self.fused[attn] = torch.cat([self.weights.pop(f"{attn}.{w}.weight") for w in "qkv"])
                if stack == "decoder":
                    cross = f"decoder.block.{i}.layer.1.EncDecAttention"
                    self.fused[cross] = torch.cat([self.weights.pop(f"{cross}.{w}.weight") for w in "kv"])
        if packed_weights:
            self.fused = {name: pack(weight) for name, weight in self.fused.items()}
            self.weights |= {name: pack(w) for name, w in self.weights.items() if name.endswith(PRODUCT_WEIGHTS)}
        self.act = ACTIVATION_FUNCTIONS[config.dense_act_fn]
        self.heads, self.d_kv, self.eps = config.num_heads, config.d_kv, config.layer_norm_epsilon
        self.sparse = {stack: set(sparse_layers(config, stack)) for stack in STACKS}
        self._decoder_bias = torch.zeros(1, self.heads, 1, 0, dtype=self.dtype, device=self.device)
        if config.tie_word_embeddings:
            checkpoint.check_tied_copies()
            shared = self.weights[checkpoint.embedding]
            self.embed = {"encoder": shared, "decoder": shared}
            self.lm_head = pack(shared) if packed_weights else shared
        else:
            self.embed = {s: self.weights[f"{s}.embed_tokens.weight"] for s in STACKS}
            self.lm_head = self.weights["lm_head.weight"]

    # -- building blocks ----------------------------------------------------------------------------------

    def _w(self, name: str) -> torch.Tensor:
        return self.weights[name]

    @staticmethod
    def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """F.linear; a large weight computed on every core in a step on one OpenMP thread (see
        experts.ffn.linear_on_cores)."""
        return linear_on_cores(x, weight, core_threads())

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, self.d_kv).transpose(1, 2)

    def _project(self, prefix: str, which: str, x: torch.Tensor) -> torch.Tensor:
        return self._split_heads(self._linear(x, self._w(f"{prefix}.{which}.weight")))

    def _project_fused(self, prefix: str, x: torch.Tensor) -> list[torch.Tensor]:
        """x projected by the attention's fused weights: [q, k, v] (self-attention) or [k, v] (cross-attention)."""
        fused = self.fused[prefix]
        parts = fused.shape[0] // (self.heads * self.d_kv)
        return [self._split_heads(part) for part in self._linear(x, fused).chunk(parts, dim=-1)]

    def _attend(self, prefix: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                bias: torch.Tensor) -> torch.Tensor:
        """The attention's output projected by its o weight."""
        return self._linear(attention(q, k, v, bias), self._w(f"{prefix}.o.weight"))

    def _grouped_self_attention(self, prefix: str, x: torch.Tensor, groups: list[PromptGroup],
                                biases: list[torch.Tensor]) -> torch.Tensor:
        """Self-attention of packed tokens x [tokens, d_model], group by group, each right-padded to its longest
        prompt (its q, k and v zero on padding, which its bias masks)."""
        qkv, out = self._linear(x, self.fused[prefix]), []
        for group, bias in zip(groups, biases):
            padded = group.padded(qkv[group.tokens])
            q, k, v = [self._split_heads(part) for part in padded.chunk(3, dim=-1)]
            out.append(group.packed(attention(q, k, v, bias)))
        return self._linear(torch.cat(out) if len(out) > 1 else out[0], self._w(f"{prefix}.o.weight"))

    def _position_bias(self, stack: str, query_positions: torch.Tensor, key_length: int) -> torch.Tensor:
        """[1, heads, queries, keys] relative position bias from block 0 of the stack."""
        memory = torch.arange(key_length, device=self.device)[None, :]
        buckets = relative_position_bucket(
            memory - query_positions[:, None], bidirectional=(stack == "encoder"),
            num_buckets=self.config.relative_attention_num_buckets,
            max_distance=self.config.relative_attention_max_distance)
        table = self._w(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        return F.embedding(buckets, table).permute(2, 0, 1).unsqueeze(0)

    def _decoder_position_bias(self, width: int) -> torch.Tensor:
        """[1, heads, 1, width]: the position bias of a decoding step's query (position width - 1) over its keys. A
        query's bias depends on its distance to each key alone, so it is the last `width` columns of that of a longer
        step's, kept: a view, not the dozen kernels of computing it at every step."""
        if self._decoder_bias.shape[-1] < width:
            longest = max(width, 2 * self._decoder_bias.shape[-1])
            self._decoder_bias = self._position_bias("decoder", torch.tensor([longest - 1], device=self.device),
                                                     longest)
        return self._decoder_bias[..., -width:]

    def _padding_bias(self, mask: torch.Tensor) -> torch.Tensor:
        """Additive [batch, 1, 1, keys] mask: 0 on real tokens, the dtype's minimum on padding."""
        return (1.0 - mask[:, None, None, :].to(self.dtype)) * torch.finfo(self.dtype).min

    def _micro_batches(self, batch: int) -> list[slice]:
        n = min(self.micro_batches, batch)
        return [slice(i * batch // n, (i + 1) * batch // n) for i in range(n)]

    def _ffn(self, stack: str, layer: int, x: torch.Tensor, sequence: torch.Tensor, longest: int) -> MicroBatch:
        """The feed-forward sub-layer's output for tokens x [tokens, d_model] (before the residual), and if the layer is
        sparse each token's routing (see _moe); `sequence` and `longest` as _moe takes them."""
        prefix = ffn_prefix(stack, layer)
        normed = rms_norm(x, self._w(f"{prefix}.layer_norm.weight"), self.eps)
        if layer not in self.sparse[stack]:
            h = self.act(self._linear(normed, self._w(f"{prefix}.mlp.wi.weight")))
            return self._linear(h.to(self.dtype), self._w(f"{prefix}.mlp.wo.weight")), None
        return (yield from self._moe(stack, layer, normed, sequence, longest))

    def _moe(self, stack: str, layer: int, tokens: torch.Tensor, sequence: torch.Tensor, longest: int) -> MicroBatch:
        """Route tokens [tokens, d_model] top-1, apply capacity, run the experts remotely. `sequence` [tokens] numbers
        each token's sequence (sequence by sequence, earlier positions first); `longest` is the most tokens of one.
        Returns the output [tokens, d_model] and each token's (expert, prob, dropped), on the device (read back once
        a step is done, so that a layer computed on the GPU need not wait for it)."""
        logits = F.linear(tokens.to(self.router_dtype), self._w(router_tensor_name(stack, layer)),
                          self.weights.get(router_tensor_name(stack, layer, "bias")))
        prob, expert = F.softmax(logits, dim=-1, dtype=self.router_dtype).to(tokens.dtype).max(dim=-1)
        nothing_over = self.capacity == "dropless" or longest <= self.config.expert_capacity
        keep = None if nothing_over else self._within_capacity(expert, sequence)
        out = ((yield self.dispatch.send(stack, layer, tokens, expert, keep)) * prob[:, None]).to(tokens.dtype)
        return out, (expert, prob.float(), torch.zeros_like(expert, dtype=torch.bool) if keep is None else ~keep)

    def _within_capacity(self, expert: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """transformers' rule: each expert takes at most `expert_capacity` tokens of each sequence, earlier
        positions first. Per sequence, so a request's result does not depend on what it is batched with."""
        onehot = F.one_hot(expert, self.config.num_experts)
        seen = onehot.cumsum(0)  # [tokens, experts], running over the whole flattened batch
        lengths = torch.bincount(rows)
        starts = lengths.cumsum(0) - lengths
        before = torch.cat([torch.zeros_like(seen[:1]), seen])[starts]  # counts before each sequence began
        priority = seen.gather(1, expert[:, None]).squeeze(1) - before[rows, expert]
        return priority <= self.config.expert_capacity

    # -- the two stacks -----------------------------------------------------------------------------------

    def encode(self, input_ids: list[list[int]]) -> list[tuple[list[int], EncoderOutput]]:
        """Run the encoder over a batch of prompts of different lengths: (indices of its prompts, output) per group of
        prompts of similar length, each right-padded to its longest. The math of each token on its own (norms,
        products, routers, experts) runs on the real tokens of all of them at once, attention group by group; with
        micro-batches, the prompts are split into that many parts, whose expert calls overlap one another's math."""
        lengths = [len(ids) for ids in input_ids]
        order = sorted(range(len(input_ids)), key=lengths.__getitem__)
        grouped = [PromptGroup.of(lengths, order[rows]) for rows in self._micro_batches(len(order))]
        outputs = run_overlapped([self._encode(groups, [input_ids[r] for g in groups for r in g.rows])
                                  for groups in grouped])
        self.dispatch.settle()
        results = []
        for groups, (hidden, routing) in zip(grouped, outputs):
            routing = Routing.cat([{layer: Routing(*routed) for layer, routed in routing.items()}])
            for group in groups:
                routed = {layer: Routing(group.padded(r.expert[group.tokens], -1), group.padded(r.prob[group.tokens]),
                                         group.padded(r.dropped[group.tokens]))
                          for layer, r in routing.items()}
                results.append((group.rows, EncoderOutput(group.padded(hidden[group.tokens]),
                                                          group.mask.to(self.device), routed)))
        return results

    def _encode(self, groups: list[PromptGroup], prompts: list[list[int]]) -> MicroBatch:
        """The encoder's output for the real tokens of these groups' prompts, packed [tokens, d_model] in the groups'
        order, and each sparse layer's routing of them (see _moe)."""
        ids = torch.tensor([token for prompt in prompts for token in prompt], dtype=torch.long, device=self.device)
        sequence = torch.repeat_interleave(torch.arange(len(prompts), device=self.device),
                                           torch.tensor([len(p) for p in prompts], device=self.device))
        longest = max(len(p) for p in prompts)
        biases = [self._position_bias("encoder", torch.arange(g.length, device=self.device), g.length)
                  + self._padding_bias(g.mask.to(self.device)) for g in groups]
        h = F.embedding(ids, self.embed["encoder"])
        routing = {}
        for i in range(num_layers(self.config, "encoder")):
            p = f"encoder.block.{i}.layer.0"
            n = rms_norm(h, self._w(f"{p}.layer_norm.weight"), self.eps)
            h = clamp_fp16(h + self._grouped_self_attention(f"{p}.SelfAttention", n, groups, biases), sequence)
            ffn_out, routed = yield from self._ffn("encoder", i, h, sequence, longest)
            h = clamp_fp16(h + ffn_out, sequence)
            if routed is not None:
                routing[i] = routed
        return rms_norm(h, self._w("encoder.final_layer_norm.weight"), self.eps), routing

    def start_decoding(self, encoded: EncoderOutput) -> DecoderCache:
        """Cross-attention keys and values, computed once per request; an empty self-attention cache."""
        cross_k, cross_v, self_k, self_v = [], [], [], []
        batch = encoded.hidden.shape[0]
        for i in range(num_layers(self.config, "decoder")):
            attn = f"decoder.block.{i}.layer.1.EncDecAttention"
            # Contiguous in [batch, heads, src_len, d_kv]: every step's attention reads them without a copy.
            k, v = self._project_fused(attn, encoded.hidden)
            cross_k.append(k.contiguous())
            cross_v.append(v.contiguous())
            self_k.append(cross_k[-1][:, :, :0])
            self_v.append(cross_v[-1][:, :, :0])
        no_positions = torch.zeros(batch, 0, dtype=torch.bool, device=self.device)
        return DecoderCache(self_k, self_v, no_positions, cross_k, cross_v, self._padding_bias(encoded.mask))

    def decode_step(self, cache: DecoderCache,
                    tokens: torch.Tensor) -> tuple[DecoderCache, torch.Tensor, dict[int, Routing]]:
        """Feed one token per sequence. Returns the cache grown by one position, next-token logits [batch, vocab] on
        the front's device and each decoder sparse layer's Routing of the fed tokens ([batch, 1]). The grown cache
        may share storage with `cache`: step from the grown one only."""
        width, batch = cache.width + 1, tokens.shape[0]
        cache = cache.with_room(width)
        new = torch.ones(batch, 1, dtype=torch.bool, device=self.device)
        self_valid = torch.cat([cache.self_valid, new], dim=1)
        position_bias = self._decoder_position_bias(width)
        parts = run_overlapped([self._decode(cache, tokens[rows], self_valid[rows], position_bias, rows)
                                for rows in self._micro_batches(batch)])
        grown = DecoderCache(cache.self_k, cache.self_v, self_valid, cache.cross_k, cache.cross_v, cache.cross_bias,
                             cache.row_room)
        logits = torch.cat([x for x, _ in parts]) if len(parts) > 1 else parts[0][0]
        self.dispatch.settle()  # reads back the step's expert counts: waits for the device
        return grown, logits, Routing.cat([r for _, r in parts])

    def _decode(self, cache: DecoderCache, tokens: torch.Tensor, self_valid: torch.Tensor,
                position_bias: torch.Tensor, rows: slice) -> MicroBatch:
        """Logits and Routing per sparse layer for these rows of the batch; writes their new keys and values into
        the cache, whose room has a column for them."""
        width, batch = self_valid.shape[1], tokens.shape[0]
        h = F.embedding(tokens[:, None].to(self.device), self.embed["decoder"])
        self_bias = position_bias + self._padding_bias(self_valid)
        sequence = torch.arange(batch, device=self.device)  # one token each
        routing = {}
        for i in range(num_layers(self.config, "decoder")):
            p = f"decoder.block.{i}.layer"
            n = rms_norm(h, self._w(f"{p}.0.layer_norm.weight"), self.eps)
            attn = f"{p}.0.SelfAttention"
            q, k, v = self._project_fused(attn, n)
            self_k, self_v = cache.self_k[i][rows], cache.self_v[i][rows]  # views: written in place
            self_k[:, :, width - 1:width] = k
            self_v[:, :, width - 1:width] = v
            h = clamp_fp16(h + self._attend(attn, q, self_k[:, :, :width], self_v[:, :, :width], self_bias), sequence)
            n = rms_norm(h, self._w(f"{p}.1.layer_norm.weight"), self.eps)
            attn = f"{p}.1.EncDecAttention"
            h = clamp_fp16(h + self._attend(attn, self._project(attn, "q", n), cache.cross_k[i][rows],
                                            cache.cross_v[i][rows], cache.cross_bias[rows]), sequence)
            ffn_out, routed = yield from self._ffn("decoder", i, h.view(batch, -1), sequence, 1)
            h = clamp_fp16(h + ffn_out.view_as(h), sequence)
            if routed is not None:
                routing[i] = Routing(*(t.view(batch, 1) for t in routed))
        h = rms_norm(h, self._w("decoder.final_layer_norm.weight"), self.eps)
        if self.config.tie_word_embeddings:
            h = h * (self.config.d_model ** -0.5)
        return self._linear(h[:, 0], self.lm_head), routing
