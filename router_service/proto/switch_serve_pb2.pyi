from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("text", "input_ids", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "return_logprobs", "stop_token_ids", "stop", "return_routing")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    RETURN_ROUTING_FIELD_NUMBER: _ClassVar[int]
    text: str
    input_ids: _containers.RepeatedScalarFieldContainer[int]
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    return_logprobs: bool
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    stop: _containers.RepeatedScalarFieldContainer[str]
    return_routing: bool
    def __init__(self, text: _Optional[str] = ..., input_ids: _Optional[_Iterable[int]] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., return_logprobs: _Optional[bool] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., stop: _Optional[_Iterable[str]] = ..., return_routing: _Optional[bool] = ...) -> None: ...

class LayerRouting(_message.Message):
    __slots__ = ("stack", "layer", "experts", "probs", "dropped")
    STACK_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    stack: str
    layer: int
    experts: _containers.RepeatedScalarFieldContainer[int]
    probs: _containers.RepeatedScalarFieldContainer[float]
    dropped: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, stack: _Optional[str] = ..., layer: _Optional[int] = ..., experts: _Optional[_Iterable[int]] = ..., probs: _Optional[_Iterable[float]] = ..., dropped: _Optional[_Iterable[bool]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "token_ids", "logprobs", "finish_reason", "prompt_tokens", "dropped_tokens", "routing")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    finish_reason: str
    prompt_tokens: int
    dropped_tokens: int
    routing: _containers.RepeatedCompositeFieldContainer[LayerRouting]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., dropped_tokens: _Optional[int] = ..., routing: _Optional[_Iterable[_Union[LayerRouting, _Mapping]]] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("token_ids", "text", "logprobs", "finish_reason", "prompt_tokens", "dropped_tokens", "routing")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    finish_reason: str
    prompt_tokens: int
    dropped_tokens: int
    routing: _containers.RepeatedCompositeFieldContainer[LayerRouting]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., logprobs: _Optional[_Iterable[float]] = ..., finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., dropped_tokens: _Optional[int] = ..., routing: _Optional[_Iterable[_Union[LayerRouting, _Mapping]]] = ...) -> None: ...

class EmbedInput(_message.Message):
    __slots__ = ("text", "input_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    input_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, text: _Optional[str] = ..., input_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("inputs", "pooling")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedCompositeFieldContainer[EmbedInput]
    pooling: str
    def __init__(self, inputs: _Optional[_Iterable[_Union[EmbedInput, _Mapping]]] = ..., pooling: _Optional[str] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values", "tokens")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    tokens: int
    def __init__(self, values: _Optional[_Iterable[float]] = ..., tokens: _Optional[int] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embeddings", "dimensions", "prompt_tokens")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    dimensions: int
    prompt_tokens: int
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., dimensions: _Optional[int] = ..., prompt_tokens: _Optional[int] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExpertRef(_message.Message):
    __slots__ = ("stack", "layer", "expert")
    STACK_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    stack: str
    layer: int
    expert: int
    def __init__(self, stack: _Optional[str] = ..., layer: _Optional[int] = ..., expert: _Optional[int] = ...) -> None: ...

class ActorPlacement(_message.Message):
    __slots__ = ("actor", "node_id", "device", "pid", "experts", "expert_bytes")
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_BYTES_FIELD_NUMBER: _ClassVar[int]
    actor: int
    node_id: str
    device: str
    pid: int
    experts: _containers.RepeatedCompositeFieldContainer[ExpertRef]
    expert_bytes: int
    def __init__(self, actor: _Optional[int] = ..., node_id: _Optional[str] = ..., device: _Optional[str] = ..., pid: _Optional[int] = ..., experts: _Optional[_Iterable[_Union[ExpertRef, _Mapping]]] = ..., expert_bytes: _Optional[int] = ...) -> None: ...

class ExpertLoad(_message.Message):
    __slots__ = ("stack", "layer", "tokens")
    STACK_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    stack: str
    layer: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, stack: _Optional[str] = ..., layer: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class ModelInfoResponse(_message.Message):
    __slots__ = ("model", "vocab_size", "d_model", "d_ff", "num_heads", "num_experts", "encoder_layers", "decoder_layers", "encoder_sparse_layers", "decoder_sparse_layers", "expert_capacity", "capacity_mode", "dtype", "actors", "expert_tokens", "active_sequences", "waiting_requests", "status", "decode_steps", "cache_rows", "quantize")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    D_FF_FIELD_NUMBER: _ClassVar[int]
    NUM_HEADS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    ENCODER_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DECODER_LAYERS_FIELD_NUMBER: _ClassVar[int]
    ENCODER_SPARSE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DECODER_SPARSE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_MODE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ACTORS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    WAITING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEPS_FIELD_NUMBER: _ClassVar[int]
    CACHE_ROWS_FIELD_NUMBER: _ClassVar[int]
    QUANTIZE_FIELD_NUMBER: _ClassVar[int]
    model: str
    vocab_size: int
    d_model: int
    d_ff: int
    num_heads: int
    num_experts: int
    encoder_layers: int
    decoder_layers: int
    encoder_sparse_layers: _containers.RepeatedScalarFieldContainer[int]
    decoder_sparse_layers: _containers.RepeatedScalarFieldContainer[int]
    expert_capacity: int
    capacity_mode: str
    dtype: str
    actors: _containers.RepeatedCompositeFieldContainer[ActorPlacement]
    expert_tokens: _containers.RepeatedCompositeFieldContainer[ExpertLoad]
    active_sequences: int
    waiting_requests: int
    status: str
    decode_steps: int
    cache_rows: int
    quantize: str
    def __init__(self, model: _Optional[str] = ..., vocab_size: _Optional[int] = ..., d_model: _Optional[int] = ..., d_ff: _Optional[int] = ..., num_heads: _Optional[int] = ..., num_experts: _Optional[int] = ..., encoder_layers: _Optional[int] = ..., decoder_layers: _Optional[int] = ..., encoder_sparse_layers: _Optional[_Iterable[int]] = ..., decoder_sparse_layers: _Optional[_Iterable[int]] = ..., expert_capacity: _Optional[int] = ..., capacity_mode: _Optional[str] = ..., dtype: _Optional[str] = ..., actors: _Optional[_Iterable[_Union[ActorPlacement, _Mapping]]] = ..., expert_tokens: _Optional[_Iterable[_Union[ExpertLoad, _Mapping]]] = ..., active_sequences: _Optional[int] = ..., waiting_requests: _Optional[int] = ..., status: _Optional[str] = ..., decode_steps: _Optional[int] = ..., cache_rows: _Optional[int] = ..., quantize: _Optional[str] = ...) -> None: ...
