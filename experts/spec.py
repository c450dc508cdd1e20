"""The Switch Transformers architecture as transformers defines it, written down once: the config fields,
which blocks are sparse, the tensor names, the dtypes, and the one rule for configs that disagree with their
weights. Used by the checkpoint reader, the planner, the front and the expert actors alike.

Pure Python (no torch, no transformers), so that commands that only plan start at once.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Literal

STACKS = ("encoder", "decoder")
ExpertKey = tuple[str, int, int]  # (stack, block index, expert index)
LayerKey = tuple[str, int]  # (stack, block index) of a sparse layer


@dataclass(frozen=True)
class DType:
    name: str  # as options spell it
    torch: str  # torch's attribute name
    safetensors: str  # the safetensors header's code
    bytes: int


DTYPES = {d.name: d for d in (DType("fp32", "float32", "F32", 4), DType("bf16", "bfloat16", "BF16", 2),
                              DType("fp16", "float16", "F16", 2))}
DTYPE_OF_SAFETENSORS = {d.safetensors: d.name for d in DTYPES.values()}
DTYPE_OF_TORCH = {d.torch: d.name for d in DTYPES.values()}
DTypeName = Literal[tuple(DTYPES)]
# none: the experts are held in the serving dtype; int8: weight-only int8 with a float32 scale per output channel
# (experts.int8), quantized at load time; the front and the activations keep the serving dtype.
QUANTIZE_MODES = ("none", "int8")
QuantizeMode = Literal[QUANTIZE_MODES]
EXPERT_FORMATS = (*DTYPES, "int8")  # what an expert's weights may be held in, for sizing them

ROUTER_DTYPES = ("float32", "bfloat16", "float16")  # transformers' router_dtype values
# The activations (transformers' ACT2FN names) a served checkpoint's FFNs may use; experts.ffn computes them with
# torch alone.
ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "swish")

# hf: transformers' rule, each expert takes at most `expert_capacity` tokens of each sequence, earlier positions
# first, and a token over it gets a zero expert output (only the residual carries it); dropless: none dropped.
CAPACITY_MODES = ("hf", "dropless")
CapacityMode = Literal[CAPACITY_MODES]

# Other names transformers' config takes for its fields (SwitchTransformersConfig.attribute_map).
CONFIG_ALIASES = {"hidden_size": "d_model", "num_attention_heads": "num_heads", "num_hidden_layers": "num_layers"}
# The config fields that say which blocks there are and which are sparse (what `follow_weights` may correct).
LAYER_FIELDS = ("num_layers", "num_decoder_layers", "num_sparse_encoder_layers", "num_sparse_decoder_layers",
                "encoder_sparse_step", "decoder_sparse_step")
# A tensor of an expert FFN, for example `encoder.block.1.layer.1.mlp.experts.expert_5.wi.weight`.
EXPERT_TENSOR = re.compile(r"(encoder|decoder)\.block\.(\d+)\.layer\.\d+\.mlp\.experts\.expert_(\d+)\.")


@dataclass(frozen=True)
class SwitchConfig:
    """The architecture fields of a Switch checkpoint's config.json, with transformers' defaults
    (`SwitchTransformersConfig`; a test keeps the two equal). Read without importing transformers."""

    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 2048
    num_heads: int = 12
    num_layers: int = 12
    num_decoder_layers: int | None = 12  # None: as many as the encoder
    num_sparse_encoder_layers: int = 3
    num_sparse_decoder_layers: int = 3
    encoder_sparse_step: int | None = None  # None: computed from the layer counts, as transformers does
    decoder_sparse_step: int | None = None
    num_experts: int = 8
    expert_capacity: int = 64
    router_bias: bool = False
    dense_act_fn: str = "relu"
    router_dtype: str = "float32"  # what the routers compute in (ROUTER_DTYPES), whatever the model's dtype
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    bos_token_id: int | None = None
    decoder_start_token_id: int | None = None  # None: the BOS token, as transformers' generate; else the pad token

    def __post_init__(self):
        def default(name: str, value) -> None:
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)

        default("num_decoder_layers", self.num_layers)
        for stack in STACKS:
            # transformers: num_layers // num_sparse, or num_layers when there are no sparse layers.
            total, sparse = num_layers(self, stack), getattr(self, f"num_sparse_{stack}_layers")
            default(f"{stack}_sparse_step", total // sparse if sparse > 0 else total)
        # transformers' generate starts the decoder with the BOS token where no start token is set (and fails where
        # neither is); T5's convention, the pad token, where neither is.
        default("decoder_start_token_id", self.pad_token_id if self.bos_token_id is None else self.bos_token_id)
        if self.decoder_start_token_id is None:
            raise ValueError("decoder_start_token_id: none, nor bos_token_id or pad_token_id to start the decoder with")
        # T5's position buckets: the encoder's halved (keys before and after), of which half exact, the rest spread
        # over distances up to max_distance, beyond the decoder's exact ones; fewer would divide by zero.
        buckets, distance = self.relative_attention_num_buckets, self.relative_attention_max_distance
        if buckets < 4:
            raise ValueError(f"relative_attention_num_buckets: must be at least 4, got {buckets}")
        if distance <= buckets // 2:
            raise ValueError(f"relative_attention_max_distance: must be more than {buckets // 2} (half the buckets), "
                             f"got {distance}")
        eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        for name, ids in [("pad_token_id", [self.pad_token_id]), ("eos_token_id", eos),
                          ("bos_token_id", [self.bos_token_id]),
                          ("decoder_start_token_id", [self.decoder_start_token_id])]:
            if bad := [i for i in ids if i is not None and not (type(i) is int and 0 <= i < self.vocab_size)]:
                raise ValueError(f"{name}: {bad[0]!r} is not a token id of the vocabulary [0, {self.vocab_size})")

    @classmethod
    def from_dict(cls, raw: dict) -> SwitchConfig:
        """From config.json's fields (the others are ignored; CONFIG_ALIASES read as the fields they name); raises
        ValueError naming a field of the wrong type."""
        if not isinstance(raw, dict):
            raise ValueError(f"expected a JSON object of the model's fields, got {type(raw).__name__}")
        for alias, name in CONFIG_ALIASES.items():
            if alias in raw and name in raw and raw[alias] != raw[name]:
                raise ValueError(f"{alias}: {raw[alias]!r}, but {name} (the same field) is {raw[name]!r}")
        raw = {CONFIG_ALIASES.get(key, key): value for key, value in raw.items()}
        values = {f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw}
        for name, value in values.items():
            annotation = cls.__dataclass_fields__[name].type
            if not _has_type(value, annotation):
                raise ValueError(f"{name}: expected {annotation}, got {value!r}")
            least = 0 if name.startswith("num_sparse_") else 1 if name in SIZES else None
            if least is not None and value is not None and value < least:
                raise ValueError(f"{name}: must be at least {least}, got {value}")
        return cls(**values)

    @classmethod
    def of(cls, config) -> SwitchConfig:
        """A SwitchConfig from this or anything with its fields (transformers' `SwitchTransformersConfig`)."""
        if isinstance(config, cls):
            return config
        return cls(**{f.name: getattr(config, f.name, None) for f in dataclasses.fields(cls)
                      if getattr(config, f.name, None) is not None})


CONFIG_FILE = "config.json"  # a checkpoint's architecture, beside its weights
# How transformers' generate decodes it, where the checkpoint says (else config.json's fields say).
GENERATION_CONFIG_FILE = "generation_config.json"
# The token ids switch-serve decodes with: GENERATION_CONFIG_FILE's where there is one, else config.json's; a field
# the file lacks is unset (not the architecture's default), as transformers' generate reads them.
GENERATION_TOKEN_FIELDS = ("eos_token_id", "bos_token_id", "decoder_start_token_id")
# Its settings that change what transformers' generate makes, at their defaults there (transformers'
# GenerationConfig): a request decodes by its own options (greedy unless it samples), so a checkpoint that sets one
# otherwise is served without it, as its fronts say as they start.
DECODING_DEFAULTS = {
    "do_sample": False, "num_beams": 1, "penalty_alpha": None, "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "min_length": 0,
    "min_new_tokens": None, "bad_words_ids": None, "force_words_ids": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None, "sequence_bias": None,
    "exponential_decay_length_penalty": None, "renormalize_logits": False, "guidance_scale": None,
    "stop_strings": None, "watermarking_config": None,
}
# A checkpoint's tokenizer: any one of them is enough for transformers' AutoTokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")
# The sizes a model cannot have none of.
SIZES = ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers", "num_decoder_layers", "num_experts",
         "expert_capacity", "relative_attention_num_buckets", "relative_attention_max_distance")
_JSON_TYPES = {"int": int, "bool": bool, "str": str, "float": (int, float), "list[int]": list, "None": type(None)}


def _has_type(value, annotation: str) -> bool:
    """Whether a JSON value fits a field's annotation ("int | None", ...); JSON's true is not a number."""
    kinds = [_JSON_TYPES[part.strip()] for part in annotation.split("|")]
    if isinstance(value, bool) and bool not in kinds:
        return False
    return any(isinstance(value, kind) for kind in kinds)


def num_layers(config, stack: str) -> int:
    return config.num_layers if stack == "encoder" else config.num_decoder_layers


def sparse_indices(total: int, step: int) -> list[int]:
    """transformers' rule: block i is sparse if i % step == 1, or every block with a step of 1; none for 0."""
    if step <= 0:
        return []
    return [i for i in range(total) if i % step == 1 or step == 1]


def sparse_layers(config, stack: str) -> list[int]:
    """Indices of the sparse (mixture-of-experts) blocks of one stack. `config`: a SwitchConfig or transformers'
    SwitchTransformersConfig."""
    return sparse_indices(num_layers(config, stack), getattr(config, f"{stack}_sparse_step"))


def ffn_prefix(stack: str, layer: int) -> str:
    """Name prefix of a block's feed-forward sub-layer (index 1 in the encoder, 2 in the decoder)."""
    return f"{stack}.block.{layer}.layer.{1 if stack == 'encoder' else 2}"


def expert_tensor_names(stack: str, layer: int, expert: int) -> tuple[str, str]:
    """The (wi, wo) weights of one expert."""
    prefix = f"{ffn_prefix(stack, layer)}.mlp.experts.expert_{expert}"
    return f"{prefix}.wi.weight", f"{prefix}.wo.weight"


def router_tensor_name(stack: str, layer: int, which: str = "weight") -> str:
    return f"{ffn_prefix(stack, layer)}.mlp.router.classifier.{which}"


# What a checkpoint of tied embeddings may hold beside `shared.weight`: copies of it.
TIED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")


def expected_tensors(config: SwitchConfig) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(required, optional) tensor shapes of a checkpoint for `config`.

    With tied embeddings transformers uses `shared.weight` for both embeddings and the LM head, so the other
    copies are optional (released checkpoints carry them); untied, each stack has its own.
    """
    d, v, inner, ff = config.d_model, config.vocab_size, config.num_heads * config.d_kv, config.d_ff
    required: dict[str, tuple[int, ...]] = {}
    optional: dict[str, tuple[int, ...]] = {}
    if config.tie_word_embeddings:
        required["shared.weight"] = (v, d)
        optional.update(dict.fromkeys(TIED_COPIES, (v, d)))
    else:
        optional["shared.weight"] = (v, d)
        required.update(dict.fromkeys(TIED_COPIES, (v, d)))
    for stack in STACKS:
        sparse = set(sparse_layers(config, stack))
        required[f"{stack}.final_layer_norm.weight"] = (d,)
        for i in range(num_layers(config, stack)):
            attentions = ["layer.0.SelfAttention"] + (["layer.1.EncDecAttention"] if stack == "decoder" else [])
            for attn in attentions:
                p = f"{stack}.block.{i}.{attn}"
                required.update({f"{p}.q.weight": (inner, d), f"{p}.k.weight": (inner, d),
                                 f"{p}.v.weight": (inner, d), f"{p}.o.weight": (d, inner)})
                required[f"{stack}.block.{i}.{attn.rsplit('.', 1)[0]}.layer_norm.weight"] = (d,)
            if i == 0:
                required[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
                    config.relative_attention_num_buckets, config.num_heads)
            ffn = ffn_prefix(stack, i)
            required[f"{ffn}.layer_norm.weight"] = (d,)
            if i in sparse:
                required[router_tensor_name(stack, i)] = (config.num_experts, d)
                if config.router_bias:
                    required[router_tensor_name(stack, i, "bias")] = (config.num_experts,)
                for e in range(config.num_experts):
                    wi, wo = expert_tensor_names(stack, i, e)
                    required[wi], required[wo] = (ff, d), (d, ff)
            else:
                required[f"{ffn}.mlp.wi.weight"] = (ff, d)
                required[f"{ffn}.mlp.wo.weight"] = (d, ff)
    return required, optional


def expert_format(dtype: str, quantize: str) -> str:
    """What the experts are held in (an EXPERT_FORMATS entry) when served in `dtype` with `quantize`."""
    return "int8" if quantize == "int8" else dtype


def expert_bytes(config: SwitchConfig, fmt: str) -> int:
    """One expert's weights (wi and wo) held in `fmt`, an EXPERT_FORMATS entry."""
    weights = 2 * config.d_model * config.d_ff
    if fmt == "int8":
        return weights + 4 * (config.d_ff + config.d_model)  # and one float32 scale per output channel
    return weights * DTYPES[fmt].bytes


def _blocks_in_weights(names: list[str], stack: str) -> tuple[int, list[int]] | None:
    """(blocks, sparse block indices) of a stack as the tensor names show them; None if it has none."""
    blocks, sparse = set(), set()
    for name in names:
        match = re.match(rf"{stack}\.block\.(\d+)\.", name)
        if match:
            blocks.add(int(match.group(1)))
            if ".mlp.router." in name or ".mlp.experts." in name:
                sparse.add(int(match.group(1)))
    return (max(blocks) + 1, sorted(sparse)) if blocks else None


def follow_weights(config, names: list[str] | None = None,
                   where: str = CONFIG_FILE) -> tuple[SwitchConfig, list[str]]:
    """The config that describes the weights, and one warning per stack where config.json does not.

    A stack whose config.json says it has more sparse layers than layers is read as the weights hold it, or,
    without the weights' tensor names (planning from config.json alone), as such weights hold it: that many blocks,
    all sparse. switch-c-2048's published config says 12 decoder layers of which 15 are sparse; its weights hold 15
    decoder blocks, all sparse. Any other config stands, as transformers reads it: weights that differ from it (a
    block missing, or one more) are the checkpoint's check's to name."""
    config, warnings = SwitchConfig.of(config), []
    for stack in STACKS:
        total, sparse_count = num_layers(config, stack), getattr(config, f"num_sparse_{stack}_layers")
        if sparse_count <= total:
            continue
        if names is not None:
            held = _blocks_in_weights(names, stack)
            evidence = "the weights hold {blocks} blocks, {sparse} sparse; following the weights"
        else:
            held = (sparse_count, list(range(sparse_count)))
            evidence = "reading it as {blocks} blocks, all sparse, as the released weights hold"
        if held is None:
            continue
        blocks, sparse = held
        agrees = (blocks, sparse) == (total, sparse_layers(config, stack))
        steps = [s for s in range(1, blocks + 1) if sparse_indices(blocks, s) == sparse]
        if sparse and not steps:
            raise ValueError(f"{where}: the {stack} sparse blocks in the weights, {sparse}, follow no sparse step "
                             "transformers supports")
        config = dataclasses.replace(config, **{
            "num_layers" if stack == "encoder" else "num_decoder_layers": blocks,
            f"num_sparse_{stack}_layers": len(sparse), f"{stack}_sparse_step": steps[0] if sparse else 0})
        if agrees:  # read alike, but the count said otherwise: written as held, so that a reading without the
            continue  # weights (planning) does not take more sparse layers than layers for all sparse
        warnings.append(f"{where}: the {stack} has {total} layers but {sparse_count} sparse; "
                        + evidence.format(blocks=blocks, sparse=len(sparse)))
    return config, warnings
