"""The Serve application: a typed config in, a Serve app out, and the ports it listens on.

    serve run cluster.app:build_app model=/models/switch-base-8
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application
from ray.serve.config import gRPCOptions
from transformers import SwitchTransformersConfig

from router_service.server import ServerConfig, SwitchServer

APP_NAME = "switch-serve"
GRPC_SERVICER_FUNCTIONS = [
    "router_service.proto.switch_serve_pb2_grpc.add_SwitchServeServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
# Health checks and ModelInfo must get through while the batch is full.
CONTROL_HEADROOM = 16
# A front waits on the expert actors after each sparse layer. Its OpenMP threads would spin for a while after
# every op, on the cores the actors need meanwhile; a short spin keeps the front's speed and frees them.
# OpenMP reads this when torch loads, so it goes in the replicas' environment.
FRONT_ENV = {"GOMP_SPINCOUNT": "10000"}


def build_app(args: dict | ServerConfig) -> Application:
    """Serve's application builder: `args` are ServerConfig's fields."""
    config = args if isinstance(args, ServerConfig) else ServerConfig(**args)
    config = config.model_copy(update={"placement": config.placement.for_cluster()})  # the same for every replica
    ongoing = config.max_sequences + config.max_waiting + CONTROL_HEADROOM
    return SwitchServer.options(num_replicas=config.num_replicas, max_ongoing_requests=ongoing,
                                max_queued_requests=config.max_waiting,
                                ray_actor_options={"num_gpus": config.front_gpus,
                                                   "runtime_env": {"env_vars": FRONT_ENV}}).bind(config)


def check_placement(config: ServerConfig, model_config: SwitchTransformersConfig) -> list[str]:
    """Plan the placement `config` asks for on `model_config` (raises when it does not fit); the plan's
    warnings. Deployed, each replica computes the same placement from the same options."""
    from cluster.plan import expert_layers

    _, warnings = expert_layers(model_config)
    config.placement.place(model_config, config.dtype or "bf16")
    return warnings


def grpc_options(port: int) -> gRPCOptions:
    return gRPCOptions(port=port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS)


def serve_config(config: ServerConfig, *, http_host: str = "0.0.0.0", http_port: int = 8000,
                 grpc_port: int = 9000) -> dict:
    """The Serve config (`serve run FILE` / `serve deploy FILE`, or a RayService's serveConfigV2) of the app."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": http_host, "port": http_port},
        "grpc_options": {"port": grpc_port, "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS},
        "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": "cluster.app:build_app",
                          "args": config.model_dump(exclude_defaults=True) | {"model": config.model}}],
    }


def start(config: ServerConfig, *, http_host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 9000) -> None:
    """Start Serve's proxies on this Ray cluster and deploy the app; returns once it is ready."""
    serve.start(http_options={"host": http_host, "port": http_port}, grpc_options=grpc_options(grpc_port))
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")


def stop(config: ServerConfig) -> None:
    """Take the app down, then its shared expert actors."""
    from cluster.checkpoint import SwitchCheckpoint
    from cluster.engine import dtype_name
    from cluster.fleet import stop_shared_fleet

    serve.delete(APP_NAME)
    checkpoint = SwitchCheckpoint.open(config.model)
    dtype = dtype_name(checkpoint, config.dtype)
    stop_shared_fleet(checkpoint, config.placement.for_cluster().place(checkpoint.config, dtype), dtype)
