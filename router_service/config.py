"""The typed configs of a served model: what the engine needs, and what a Serve replica adds. Pure pydantic, so
the command line builds its flags from these fields (their defaults and descriptions are written only here)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from experts.placement import PlacementConfig, RayResources
from experts.spec import CapacityMode, DTypeName, QuantizeMode
from router_service.auth import API_KEY_FILE_DEFAULT

# Serve's own defaults for its proxies' ports.
HTTP_PORT = 8000
GRPC_PORT = 9000
CLIENT_TIMEOUT_S = 600.0  # the most a client's generate call takes, its retries included (cluster.client)
LOCAL_HTTP_HOST = "127.0.0.1"  # where a server started on one machine takes HTTP: that machine alone, unless told
# What listens on Serve's HTTP and gRPC ports, set by the cluster's environment (Serve's controller and replicas read
# it as they start: the job's runtime env here, the pods' env on Kubernetes).
# - proxy: Serve's Python proxy, which relays each call, and each streamed token, to a front replica (over gRPC, see
#   CONTROLLER_ENV).
# - haproxy: HAProxy (bundled with ray[serve]) passes each call straight to a front replica, which serves it itself
#   (on 2 vCPUs: 7-9% more tokens/s with the fronts' short OpenMP spin, -0.5 to 3% with OpenMP's own;
#   docs/BENCHMARKS.md).
#   But a front's death ends its streams with CANCELLED (HAProxy resets them) where the proxy says UNAVAILABLE, and
#   each Ray cluster's HAProxy takes fixed ports of its own (9101, 8404, 8500, 9500), so one machine runs one.
INGRESS_ENV = {
    "proxy": {},
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1",
                # How long a stopping front still takes calls, for HAProxy to drop it first (Serve's default, 30 s,
                # is for load balancers across machines; a local cluster's HAProxy reloads in under one).
                "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"},
}
INGRESSES = tuple(INGRESS_ENV)
DEFAULT_INGRESS = "proxy"
# The Serve controller's environment (Serve's controller_options: in the Serve config, and as local_serve starts
# Serve). Its control loop runs every 0.1 s by default: a steady load on every core it shares with the fronts, which
# costs their math more than its own CPU time (an OpenMP team waits for whichever of its threads was preempted).
# Every 0.5 s, it reacts to a deployment change or a lost replica up to 0.4 s later (docs/BENCHMARKS.md).
# The proxies the controller starts inherit its environment: with RAY_SERVE_PROXY_USE_GRPC, a proxy passes each call,
# and each streamed chunk, to a front replica over gRPC instead of a Ray actor call and Ray's streaming generator
# (Serve's throughput-optimized mode does the same). On 2 vCPUs, alternated: 5% more tokens/s with 32 requests at
# once, one at a time within noise (docs/BENCHMARKS.md). That link takes answers of up to 4 MiB by default (an
# embedding of a few long prompts, token by token, is more): the proxies take them as large as their clients' side
# does (2 GiB, gRPC's most).
CONTROLLER_ENV = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5", "RAY_SERVE_PROXY_USE_GRPC": "1",
                  "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(2**31 - 1)}


class EngineConfig(BaseModel):
    """A checkpoint served with expert parallelism: where the experts go, the dtype, the capacity rule, the
    batch and the limits on what a request may ask."""

    # A misspelt field fails instead of being ignored; infinity and NaN, which no field means, are refused.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    model: str = Field(description="checkpoint folder, readable from every node")
    placement: PlacementConfig = PlacementConfig()
    dtype: DTypeName | None = Field(None, description="serve in this dtype (default: the checkpoint's); the front "
                                                      "and the actors cast their weights on load")
    quantize: QuantizeMode = Field(
        "none", description="int8: hold the expert weights as int8 with a scale per output channel, quantized on load "
                            "(a quarter of float32's bytes); the front and the activations keep the dtype")
    capacity: CapacityMode = Field(
        "hf", description="hf: transformers' per-sequence expert capacity, tokens over it are dropped; dropless: "
                          "never drop a token")
    micro_batches: int = Field(1, ge=1, description="split each batch into this many parts, so that one part's front "
                                                    "math runs while another's expert calls are out")
    local_experts: bool = Field(
        True, description="the front computes the experts whose actors share its node and CPU, or its GPU, itself, "
                          "instead of a round trip to them: on the CPU from the same memory-mapped weights when "
                          "served in the checkpoint's dtype, else from its own copy (cast or quantized); on a GPU "
                          "from its own copy there")
    packed_weights: bool = Field(
        True, description="on the CPU, the front also holds every weight it multiplies by (its own, and those of the "
                          "experts it computes) in oneDNN's packed layout, for products of several tokens (4 in "
                          "float32; bfloat16 on CPUs whose instructions oneDNN computes it with): steps of several "
                          "sequences about 20% faster, for as much memory again as those weights take")
    max_prompt_tokens: int = Field(512, ge=1, description="the longest prompt a request may send")
    max_new_tokens: int = Field(256, ge=1, description="the most new tokens a request may ask for")
    max_sequences: int = Field(32, ge=1, description="sequences decoding together in one batch")


class ServerConfig(EngineConfig):
    """Everything a Serve replica needs: the `args` of the Serve application (see cluster.app.build_app)."""

    front_gpus: float = Field(0.0, ge=0, description="GPUs each front replica asks for")
    front_resources: RayResources = Field(
        default_factory=dict, description="a Ray resource each front replica asks for, to keep the fronts on the "
                                          "nodes meant for them (e.g. one only their worker group offers)")
    front_threads: int | None = Field(
        None, ge=1, description="CPU threads of each replica's math, at most the cores it may run on (default: the "
                                "CPUs Ray counts on its node, since the front and the expert actors take turns)")
    drain_timeout_s: float = Field(
        60.0, gt=0, description="how long a front replica that is stopping (a config change, the app deleted, "
                                "SIGTERM) lets its requests finish; those still running then end with UNAVAILABLE")
    max_waiting: int = Field(64, ge=1, description="requests a replica queues beyond its batch before answering "
                                                   "RESOURCE_EXHAUSTED")
    stream_interval_ms: float = Field(
        50.0, ge=0, description="after a stream's first chunk, the next goes out at the end of the first decoding step "
                                "at least this long after it, with every token made since (Ray Serve LLM's streams "
                                "are batched every 50 ms too); 0: no minimum (with stream_chunks_per_s 0 too, a chunk "
                                "every step)")
    stream_chunks_per_s: float = Field(
        100.0, ge=0, description="the most chunks a second a front replica sends over all its streams together, their "
                                 "first and last aside: with n sequences decoding as it sends one, a stream waits at "
                                 "least n / this many seconds before the next, so that relaying them takes less of the "
                                 "CPU the decoding needs; 0: no limit")
    num_replicas: int = Field(1, ge=1, description="front replicas (they share the expert actors)")
    served_model_name: str | None = Field(
        None, min_length=1, description="the model's id in the OpenAI-compatible API and the metrics (default: the "
                                        "checkpoint folder's name; the Hub id for serve --model HUB_ID)")
    fleet_resources: RayResources = Field(
        default_factory=dict, description="a Ray resource the expert fleet (the owner of the expert actors) asks "
                                          "for, to keep it on a node that outlives the fronts, e.g. the head's")
    api_key_file: str | None = Field(None, description=f"file holding the API key every call but the health check "
                                                       f"must present ({API_KEY_FILE_DEFAULT})")

    @property
    def model_id(self) -> str:
        """The served model's id: what the OpenAI-compatible API lists, and every metric's `model` label (the expert
        actors' too)."""
        return self.served_model_name or Path(self.model).name
