"""The Serve application: a typed config in, a Serve app out; its Serve config file; and serving it locally.

    switch-serve build --model /models/switch-base-8 -o serve.yaml && serve run serve.yaml
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray import serve
from ray.serve import Application, RunTarget
from ray.serve.config import gRPCOptions

from experts.ffn import KEPT_HEAP_ENV
from experts.fleet import CLUSTER_HAS, cluster_has
from experts.placement import PlacementError
from experts.plan import PLAN_DTYPE
from experts.spec import SwitchConfig, expert_format, follow_weights
from experts.wire import INLINE_ACTIVATIONS_ENV
from router_service.config import (
    CONTROLLER_ENV,
    DEFAULT_INGRESS,
    GRPC_PORT,
    HTTP_PORT,
    INGRESS_ENV,
    LOCAL_HTTP_HOST,
    ServerConfig,
)
from router_service.engine import FLEET_POLL_S, first_line
from router_service.server import FLEET_DEPLOYMENT, FRONT_DEPLOYMENT, ServedFleet, SwitchServer, fleet_app_name

APP_NAME = "switch-serve"
GRPC_SERVICER_FUNCTIONS = [
    "router_service.proto.add_switch_serve_to_server",
    "router_service.proto.add_health_check_to_server",
]
# Health checks and ModelInfo must get through while the batch is full.
CONTROL_HEADROOM = 16
FLEET_APP = fleet_app_name(APP_NAME)
EVERY_ADDRESS = ("0.0.0.0", "::")  # the bind addresses that stand for every address
# What the fleet's application is built from (see build_fleet): a change to any of them starts a new fleet. Its drain
# timeout is set apart, as a deployment option Serve changes in place (see serve_config).
FLEET_FIELDS = ("model", "placement", "dtype", "quantize", "fleet_resources", "served_model_name")
# Calls the fleet answers at once: each front replica's link asks one at a time.
FLEET_MAX_CALLS = 256
# How often Serve checks that the fleet lives (its default is 10 s).
FLEET_HEALTH_CHECK_S = 2.0
# Time a stopping fleet has, after the fronts' drain timeout, to release its actors and placement group.
FLEET_RELEASE_S = 10.0
# Time a new front replica takes to start, where it starts without its experts (their fleet waiting for the old
# fleet's room): Serve stops the next old front only once it runs.
FRONT_START_S = 60.0
# After every op, a front's idle OpenMP threads spin for a while before they sleep (OpenMP reads GOMP_SPINCOUNT as
# torch loads, so it goes in the replicas' environment). Where two vCPUs share a core (SMT), a spinning thread takes
# half the core from the one computing, so a short spin frees it: on an AMD EPYC whose 2 vCPUs barely sped up a
# product over one, OpenMP's default spin made the served front slower (25 against 36 tokens/s for 32 requests).
# Where each vCPU is a core of its own, waking a sleeping thread at every op costs more: on an Intel Xeon with 2
# cores, OpenMP's default served 16% more tokens/s one request at a time and 10% more for 32 at once. But a front
# that sends every expert to its actor (local_experts off) waits while the actors compute, maybe on its cores: there
# a short spin took 12.5-13.0 s for 32 requests at once where the default took 13.5-14.3 (docs/BENCHMARKS.md).
SHORT_SPIN = {"GOMP_SPINCOUNT": "10000"}
# The fronts' handlers run on the replica's own event loop instead of one on a thread of their own (Serve's default,
# which guards its replica from user code that blocks): they never block (the model steps on the batching thread),
# and each streamed chunk skips a hop between the two loops. On 2 vCPUs, alternated: 4% more tokens/s with 32
# requests at once, one at a time within noise (docs/BENCHMARKS.md).
HANDLERS_ON_REPLICA_LOOP = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


def vcpus_share_cores(topology: Path = Path("/sys/devices/system/cpu")) -> bool:
    """Whether this process's CPUs are SMT siblings of others (Linux's CPU topology; False where it is not told)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    for cpu in cpus:
        try:
            siblings = (topology / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text()
        except OSError:
            return False
        if "," in siblings or "-" in siblings:
            return True
    return False


def front_env(local_experts: bool) -> dict[str, str]:
    """The environment of front replicas that compute their node's experts (`local_experts`) or not; their OpenMP
    spin for the fronts' nodes taken to be of the kind of the node that builds the app (set GOMP_SPINCOUNT in the
    nodes' environment where they are not)."""
    short_spin = vcpus_share_cores() or not local_experts
    return HANDLERS_ON_REPLICA_LOOP | KEPT_HEAP_ENV | INLINE_ACTIVATIONS_ENV | (SHORT_SPIN if short_spin else {})


# Answers in a row, per replica, that say the fronts serve (a handle spreads calls at random: with two replicas,
# one that does not serve yet goes unasked by 16 calls once in 65,536).
SERVING_IN_A_ROW = 8


def build_fleet(args: dict | ServerConfig) -> Application:
    """Serve's builder of the experts' application: one deployment, the fleet that owns the expert actors every
    front replica shares. `args` are ServerConfig's FLEET_FIELDS: the fleet is an application of its own so that
    a change to any other field (Serve rebuilds an application whose args change) keeps the experts loaded."""
    config = args if isinstance(args, ServerConfig) else ServerConfig(**args)
    # Checked often: while a dead fleet goes unnoticed, no expert serves.
    return ServedFleet.options(num_replicas=1, max_ongoing_requests=FLEET_MAX_CALLS,
                               health_check_period_s=FLEET_HEALTH_CHECK_S,
                               ray_actor_options={"num_cpus": 0, "resources": config.fleet_resources},
                               **fleet_drain(config)).bind(config.model, config.placement, config.dtype,
                                                           config.quantize, config.model_id, fleet_version(config))


def fleet_drain(config: ServerConfig) -> dict:
    """The fleet's deployment options of its drain: a stopping fleet waits up to the drain timeout for the fronts to
    begin draining, then while each drains (up to the drain timeout, one after another at worst, each after the new
    front before it has started: see ServedFleet.__del__), and must release its placement groups before Serve's own
    deadline ends it."""
    replicas = config.num_replicas
    return {"user_config": {"drain_timeout_s": config.drain_timeout_s},
            "graceful_shutdown_timeout_s": config.drain_timeout_s * (replicas + 1) + FRONT_START_S * replicas
            + FLEET_RELEASE_S}


def fleet_config(config: ServerConfig) -> ServerConfig:
    """`config` as the fleet sees it: its placement without the fields the fronts alone read."""
    return config.model_copy(update={"placement": config.placement.for_fleet()})


def fleet_version(config: ServerConfig) -> str:
    """A digest of what the fleet is built from (FLEET_FIELDS): it names the fleet's placement group, so that a
    fleet started again after its process died removes its predecessor's group, and one of a new config, started
    while the old one keeps its actors for the fronts still draining, does not."""
    built = fleet_config(config).model_dump(include=set(FLEET_FIELDS), mode="json")
    return hashlib.sha1(json.dumps(built, sort_keys=True).encode()).hexdigest()[:10]


def build_app(args: dict | ServerConfig) -> Application:
    """Serve's builder of the fronts' application: `args` are ServerConfig's fields. The fronts find their expert
    fleet in the application named after theirs (see build_fleet and serve_config), and check that it serves the
    same checkpoint, placement and dtype."""
    config = args if isinstance(args, ServerConfig) else ServerConfig(**args)
    ongoing = config.max_sequences + config.max_waiting + CONTROL_HEADROOM
    return SwitchServer.options(num_replicas=config.num_replicas, max_ongoing_requests=ongoing,
                                max_queued_requests=config.max_waiting,
                                graceful_shutdown_timeout_s=config.drain_timeout_s,
                                # No CPU: a front and the experts take turns on the cores (see actor_cpus).
                                ray_actor_options={"num_cpus": 0, "num_gpus": config.front_gpus,
                                                   "resources": config.front_resources,
                                                   "runtime_env": {"env_vars": front_env(config.local_experts)}}
                                ).bind(config)


def check_placement(config: ServerConfig, model_config: SwitchConfig, checkpoint_dtype: str | None) -> list[str]:
    """Plan the placement `config` asks for on `model_config` (raises when it does not fit), in the dtype it is served
    in: `config.dtype`, else the checkpoint's own (None where only its config.json is at hand). The warnings about
    config.json. Deployed, the fleet computes the same placement from the same options."""
    dtype = config.dtype or checkpoint_dtype
    if dtype is None and config.placement.gpus and config.quantize != "int8":  # int8 experts are sized as int8
        raise ValueError("dtype: the checkpoint's own is not known from its config.json alone; give the one it is "
                         "served in (--dtype), to check that its experts fit")
    dtype = dtype or PLAN_DTYPE  # packing for CPUs does not depend on it
    model_config, warnings = follow_weights(model_config)
    config.placement.place(model_config, expert_format(dtype, config.quantize))
    return warnings


def controller_options() -> dict:
    """Serve's controller_options: the controller's environment (see CONTROLLER_ENV). Serve applies them as it
    starts its controller, and ignores them where one runs already."""
    return {"runtime_env": {"env_vars": CONTROLLER_ENV}}


def serve_config(config: ServerConfig, *, http_port: int = HTTP_PORT, grpc_port: int = GRPC_PORT) -> dict:
    """The Serve config (`serve run FILE` / `serve deploy FILE`, or a RayService's serveConfigV2): the fleet's
    application, then the fronts', their HTTP port on every address of each node (as gRPC's always is)."""
    def args(config: ServerConfig, fields=None) -> dict:
        return config.model_dump(include=fields, exclude_defaults=True) | {"model": config.model}

    fleet = fleet_config(config)

    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": http_port},
        "grpc_options": {"port": grpc_port, "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS},
        "controller_options": controller_options(),
        "applications": [
            {"name": FLEET_APP, "route_prefix": None, "import_path": "cluster.app:build_fleet",
             "args": args(fleet, set(FLEET_FIELDS)),
             # Changed in place: a deployment's options are not its code, as its application's args are.
             "deployments": [{"name": FLEET_DEPLOYMENT, **fleet_drain(config)}]},
            {"name": APP_NAME, "route_prefix": "/", "import_path": "cluster.app:build_app", "args": args(config)}],
    }


def start_ray(address: str | None = None, ingress: str = DEFAULT_INGRESS, **options) -> None:
    """Start Ray here (or join `address`), Serve to start on it with `ingress` (see INGRESS_ENV)."""
    ray.init(address=address, logging_level=logging.WARNING, runtime_env={"env_vars": INGRESS_ENV[ingress]},
             **options)


def applications() -> dict:
    """Serve's applications on this cluster, by name, with their status."""
    return serve.status().applications


def wait_until_serving(front, replicas: int, timeout_s: float, asks: dict[str, dict] | None = None,
                       fleet=None) -> None:
    """Wait for both applications to run: a front replica starts once it has its expert actors, so a replica that
    never finds room, or experts that never load, keep one deploying: PlacementError after `timeout_s`, saying what
    each deployment's replicas are doing, what they ask for (`asks` by deployment), what the experts wait for (as
    `fleet`, a Serve handle to it, says) and what the cluster has. Then for the fronts (a Serve handle to them) to
    serve, every replica (one may have lost its actors since it started, and finds new ones on its own): a handle
    cannot pick a replica, so wait for SERVING_IN_A_ROW answers a replica saying so."""
    deadline, in_a_row = time.monotonic() + timeout_s, 0
    while True:
        apps = applications()
        if all(app.status == "RUNNING" for app in apps.values()):
            break
        if failed := [f"{name}: {app.message}" for name, app in apps.items() if app.status == "DEPLOY_FAILED"]:
            raise PlacementError(f"placement: an application failed to deploy ({'; '.join(failed)})")
        if time.monotonic() > deadline:
            waiting = [f"{kind} replicas {d.replica_states}, each asking for {(asks or {}).get(kind, {})}"
                       + (f" ({d.message})" if d.message else "") for app in apps.values()
                       for kind, d in app.deployments.items() if d.status != "HEALTHY"]
            experts = "" if fleet is None else f"; the experts: {experts_status(fleet)}"
            cluster = "" if CLUSTER_HAS in experts else f"; {cluster_has()}"
            raise PlacementError(f"placement: the applications are not running after {timeout_s:.0f} s: "
                                 f"{'; '.join(waiting)}{experts}{cluster}")
        time.sleep(0.2)
    while in_a_row < SERVING_IN_A_ROW * replicas:
        status = front.status.remote().result(timeout_s=max(deadline - time.monotonic(), 1.0))
        in_a_row = in_a_row + 1 if status == "serving" else 0
        if time.monotonic() > deadline:
            raise PlacementError(f"placement: {status} after {timeout_s:.0f} s")
        if status != "serving":
            time.sleep(0.2)


def wait_until_ingress_serves(address: str, timeout_s: float) -> None:
    """Wait for a health check through the ingress at `address` (gRPC) to answer SERVING: HAProxy takes up the
    fronts a moment after they serve, and a call made in between waited behind it for a minute, unanswered.
    PlacementError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
            except grpc.RpcError:  # not taken up yet, or not answering in time
                status = None
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
            if time.monotonic() > deadline:
                raise PlacementError(f"placement: the fronts serve, but not through the ingress at {address} after "
                                     f"{timeout_s:.0f} s")
            time.sleep(0.2)


def experts_status(fleet) -> str:
    """What the expert fleet (a Serve handle to it) says of its actors: "ready", what they wait for, or why it
    cannot say."""
    try:
        return fleet.actors.remote(0.0).result(timeout_s=FLEET_POLL_S).status
    except Exception as e:  # its load failed, or it does not run
        return first_line(e)


def grpc_listens_on(ingress: str, http_host: str) -> str:
    """Where gRPC listens, in words: Serve's proxy on every address (it has no option to bind one); HAProxy where
    HTTP does (Ray's HAProxy config binds its gRPC frontend to the HTTP host), and behind it each front's own gRPC
    port, which Ray binds to every address."""
    if ingress == "proxy" or http_host in EVERY_ADDRESS:
        return "every address"
    return f"{http_host}, and each front's own gRPC port behind HAProxy on every address"


def reachable(host: str, port: int) -> str:
    """HOST:PORT of a server bound to `host`, as this machine calls it."""
    host = LOCAL_HTTP_HOST if host in EVERY_ADDRESS else host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class Endpoints:
    grpc: str  # HOST:PORT
    http: str  # http://HOST:PORT


@contextmanager
def local_serve(config: ServerConfig, *, http_host: str = LOCAL_HTTP_HOST, http_port: int = HTTP_PORT,
                grpc_port: int = GRPC_PORT, address: str | None = None, dashboard: bool = False,
                worker_logs: bool = True, ingress: str = DEFAULT_INGRESS) -> Iterator[Endpoints]:
    """Serve `config` while the block runs: on the running Ray cluster (with the ingress it was started with),
    else one started here (joining `address` if given, with Ray's dashboard if asked, echoing the workers' logs
    unless told not to, with `ingress` in front: see INGRESS_ENV). Starts Serve, on these ports: refuses a cluster
    where Serve runs already (its ports and apps are not this call's to change). Returns once the app serves
    (PlacementError if its experts are not up within `placement.timeout_s`); at the end takes down the app, its
    expert actors, Serve, and Ray if it started it."""
    owns_ray, owns_serve = not ray.is_initialized(), False
    if owns_ray:
        start_ray(address, ingress, include_dashboard=dashboard, log_to_driver=worker_logs)
    try:
        running = serve.status()
        if running.proxies or running.applications:
            where = f"the Ray cluster at {address}" if address else "this Ray cluster"
            raise ValueError(f"address: Serve runs already on {where} (applications: "
                             f"{', '.join(running.applications) or 'none'}); stop it (`serve shutdown`), or add "
                             "switch-serve to it with `switch-serve build` and `serve deploy`")
        serve.start(http_options={"host": http_host, "port": http_port},
                    grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS),
                    controller_options=controller_options())
        owns_serve, serving = True, False
        try:
            # Both at once, as from the Serve config: HAProxy counts as serving only once some app has a route.
            fleet, front = serve.run_many([RunTarget(build_fleet(config), name=FLEET_APP, route_prefix=None),
                                       RunTarget(build_app(config), name=APP_NAME, route_prefix="/")],
                                      wait_for_applications_running=False)  # waited for below, with a deadline
            asks = {FRONT_DEPLOYMENT: {"GPU": config.front_gpus, **config.front_resources},
                    FLEET_DEPLOYMENT: config.fleet_resources}
            wait_until_serving(front, config.num_replicas, config.placement.timeout_s, asks, fleet)
            endpoints = Endpoints(reachable(http_host, grpc_port), f"http://{reachable(http_host, http_port)}")
            if address is None:  # the ingress on this machine's port
                wait_until_ingress_serves(endpoints.grpc, config.placement.timeout_s)
            serving = True
            yield endpoints
        finally:
            # Served, the fronts drain first, then the fleet releases its actors and placement group. Never served,
            # there is nothing to drain, and a replica that never started would hold a blocking delete for its whole
            # graceful shutdown: Serve's or Ray's shutdown below takes them.
            serve.delete(APP_NAME, _blocking=serving)
            serve.delete(FLEET_APP, _blocking=serving)
    finally:
        # A Ray started here takes everything with it (Serve's own shutdown would log failed tasks); a cluster joined
        # outlives this process, and Serve's controller with it.
        if owns_serve and not (owns_ray and address is None):
            serve.shutdown()
        if owns_ray:
            ray.shutdown()
