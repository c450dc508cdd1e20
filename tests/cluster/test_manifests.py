"""The KubeRay manifests: valid against KubeRay's RayService CRD (as the API server checks them) and their
serveConfigV2 exactly what `switch-serve build` writes for the command in their annotation."""

from __future__ import annotations

import copy
import json
import re
import shlex

import jsonschema
import pytest
import yaml
from reference import DATA, ROOT
from test_app import check_serve_config, fronts_args

from cluster.cli import main
from router_service.config import ServerConfig

CRD = DATA / "crds" / "ray.io_rayservices.yaml"  # copied from KubeRay
MANIFESTS = sorted((ROOT / "manifests").glob("rayservice-*.yaml"))
README = (ROOT / "README.md").read_text()


@pytest.fixture(scope="module")
def schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def unknown_fields(schema: dict, value, path: str = "") -> list[str]:
    """Fields the structural schema does not declare: the API server prunes them silently (or rejects them
    with strict field validation), so a misspelt field would be lost; here it is an error."""
    if isinstance(value, dict) and schema.get("type") == "object":
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return []
        properties = schema.get("properties")
        if properties is None:  # a map: every value follows additionalProperties
            inner = schema.get("additionalProperties")
            return [f for k, v in value.items() for f in unknown_fields(inner, v, f"{path}.{k}")] \
                if isinstance(inner, dict) else []
        found = []
        for key, item in value.items():
            if key not in properties:
                found.append(f"{path}.{key}")
            else:
                found += unknown_fields(properties[key], item, f"{path}.{key}")
        return found
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [f for i, item in enumerate(value) for f in unknown_fields(schema["items"], item, f"{path}[{i}]")]
    return []


def fill_defaults(schema: dict, value) -> None:
    """Set the defaults the schema declares for absent fields, as the API server does."""
    if isinstance(value, dict) and "properties" in schema:
        for key, sub in schema["properties"].items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                fill_defaults(sub, value[key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            fill_defaults(schema["items"], item)


def validate(manifest: dict, schema: dict) -> dict:
    """The manifest as the API server would store it; raises on any schema error or unknown field."""
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    stored = copy.deepcopy(manifest)
    fill_defaults(schema, stored)
    unknown = unknown_fields(schema, {k: v for k, v in stored.items() if k != "metadata"})
    if unknown:
        raise jsonschema.ValidationError(f"unknown fields: {', '.join(unknown)}")
    jsonschema.Draft7Validator(schema).validate(stored)
    return stored


def test_there_are_manifests_for_switch_base_8_and_switch_c_2048():
    assert [m.name for m in MANIFESTS] == ["rayservice-switch-base-8.yaml", "rayservice-switch-c-2048.yaml"]


@pytest.mark.parametrize("file", MANIFESTS, ids=lambda p: p.stem)
def test_manifest_is_valid_and_its_serve_config_is_what_build_writes(file, schema, tmp_path, monkeypatch):
    manifest = yaml.safe_load(file.read_text())
    stored = validate(manifest, schema)
    cluster = stored["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports["serve"] == 8000 and ports["serve-grpc"] == 9000
    service_ports = {p["name"]: p["port"] for p in stored["spec"]["serveService"]["spec"]["ports"]}
    assert service_ports == {"serve": 8000, "serve-grpc": 9000}
    # The autoscaler is on, and may add pods: experts beyond the plan's (room for an actor lost with its node to
    # come back elsewhere), and a spare front pod (where a front whose pod stops starts again before it drains).
    assert cluster["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    for name in ("experts", *(["front"] if "front" in groups else [])):
        assert groups[name]["minReplicas"] <= groups[name]["replicas"] < groups[name]["maxReplicas"], name
    experts = groups["experts"]

    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    check_serve_config(serve_config)
    args = fronts_args(serve_config)
    # The expert actors ask for the custom resource that only the experts group offers, enough for every actor.
    (resource, per_actor), = args["placement"]["actor_resources"].items()
    per_pod = offered(experts)[resource]
    assert per_pod / per_actor == int(experts["template"]["spec"]["containers"][0]["resources"]["limits"]
                                      ["nvidia.com/gpu"])
    assert experts["replicas"] * per_pod >= args["placement"]["gpus"] * per_actor
    assert experts["replicas"] == args["placement"]["nodes"]

    command = shlex.split(manifest["metadata"]["annotations"]["switch-serve/build"])
    assert command[:2] == ["switch-serve", "build"]
    monkeypatch.chdir(ROOT)
    main([*command[1:], "-o", str(tmp_path / "serve.yaml")])
    assert (tmp_path / "serve.yaml").read_text() == manifest["spec"]["serveConfigV2"], \
        f"{file.name} is stale: rerun its switch-serve/build command and paste the output into serveConfigV2"


def offered(group: dict) -> dict[str, float]:
    """The custom Ray resources a head or worker group offers (rayStartParams' quoted JSON)."""
    text = group.get("rayStartParams", {}).get("resources")
    return json.loads(json.loads(text)) if text else {}


@pytest.mark.parametrize("file", MANIFESTS, ids=lambda p: p.stem)
def test_each_deployment_and_actor_can_only_land_where_it_is_meant_to(file):
    """The fronts on the group meant for them (the head on switch-base-8, the front GPU pods on switch-c-2048), the
    expert fleet on the head (it outlives any front or expert pod; room for two, the old config's and a new one's),
    the expert actors on the experts group: each asks for a custom resource that only that group offers, in the
    amounts the group's pods hold."""
    manifest = yaml.safe_load(file.read_text())
    groups = ray_groups(manifest)
    args = fronts_args(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    for asked, meant, wanted in [(args["front_resources"], front_group(manifest), args["num_replicas"]),
                                 (args["fleet_resources"], "head", 2),  # the old fleet and a new config's
                                 (args["placement"]["actor_resources"], "experts", args["placement"]["gpus"])]:
        (resource, amount), = asked.items()
        holders = [name for name, group in groups.items() if resource in offered(group)]
        assert holders == [meant], (resource, holders)
        pods = 1 if meant == "head" else groups[meant]["replicas"]
        assert pods * offered(groups[meant])[resource] >= wanted * amount, resource


@pytest.mark.parametrize("where, typo", [
    (["spec", "rayClusterConfig"], "headGroupSpecs"),
    (["spec", "rayClusterConfig", "workerGroupSpecs", 0], "minReplica"),
    (["spec", "rayClusterConfig", "headGroupSpec", "template", "spec", "containers", 0], "volumeMount"),
])
def test_a_misspelt_field_fails_validation(schema, where, typo):
    manifest = yaml.safe_load(MANIFESTS[0].read_text())
    node = manifest
    for key in where:
        node = node[key]
    real = next(k for k in node if k.startswith(typo[:-1]) and k != typo)
    node[typo] = node.pop(real)
    with pytest.raises(jsonschema.ValidationError, match=typo):
        validate(manifest, schema)


def test_a_wrong_type_fails_validation(schema):
    manifest = yaml.safe_load(MANIFESTS[0].read_text())
    manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError, match="'two' is not of type 'integer'"):
        validate(manifest, schema)


def test_defaults_are_filled_as_the_api_server_does(schema):
    stored = validate(yaml.safe_load(MANIFESTS[0].read_text()), schema)
    worker = stored["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert worker["numOfHosts"] == 1  # KubeRay's default, absent from the file


def test_dashboard_plots_every_metric_the_service_exports_and_no_other():
    import json
    import re

    dashboard = json.loads((ROOT / "manifests" / "grafana-dashboard.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"ray_(switch_serve_\w+?)(?:_total|_bucket|_count|_sum)?\b", target["expr"])}
    sources = "".join((ROOT / f).read_text() for f in ("router_service/metrics.py", "experts/actor.py"))
    defined = set(re.findall(r'"(switch_serve_\w+)"', sources))
    assert queried == defined, (queried - defined, defined - queried)
    assert len(defined) >= 10  # requests, tokens, TTFT, per-token, queue, batch, dispatch, dropped, experts, embedded


def test_the_checkpoint_claim_is_shipped_read_only_many():
    claim = yaml.safe_load((ROOT / "manifests" / "checkpoints-pvc.yaml").read_text())
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    for file in MANIFESTS:
        cluster = yaml.safe_load(file.read_text())["spec"]["rayClusterConfig"]
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            (volume,) = group["template"]["spec"]["volumes"]
            assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


# -- what an operator's cluster asks of the manifests -----------------------------------------------------------

def ray_groups(manifest: dict) -> dict[str, dict]:
    """The head group and every worker group, by name."""
    cluster = manifest["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}


def pod_groups(manifest: dict) -> dict[str, dict]:
    """Each group's pod spec, by name."""
    return {name: group["template"]["spec"] for name, group in ray_groups(manifest).items()}


def front_group(manifest: dict) -> str:
    return "front" if "front" in pod_groups(manifest) else "head"


# Volume types the "restricted" Pod Security Standard allows.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
                      "secret"}


def restricted_violations(pod: dict) -> list[str]:
    """Where a pod spec breaks the "restricted" Pod Security Standard (Kubernetes' own list of checks)."""
    found = []
    pod_context = pod.get("securityContext", {})
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            found.append(flag)
    found += [f"volume {v['name']}" for v in pod.get("volumes", []) if not set(v) - {"name"} <= RESTRICTED_VOLUMES]
    for c in pod["containers"] + pod.get("initContainers", []):
        context = c.get("securityContext", {})
        if context.get("privileged"):
            found.append(f"{c['name']}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{c['name']}: allowPrivilegeEscalation is not false")
        if "ALL" not in context.get("capabilities", {}).get("drop", []):
            found.append(f"{c['name']}: capabilities not dropped")
        if set(context.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{c['name']}: capabilities added")
        if not context.get("runAsNonRoot", pod_context.get("runAsNonRoot")):
            found.append(f"{c['name']}: may run as root")
        if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
            found.append(f"{c['name']}: runs as uid 0")
        seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{c['name']}: seccomp profile {seccomp}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            found.append(f"{c['name']}: host port")
    return found


@pytest.mark.parametrize("file", MANIFESTS, ids=lambda p: p.stem)
def test_every_pod_meets_the_restricted_pod_security_standard(file):
    manifest = yaml.safe_load(file.read_text())
    for name, pod in pod_groups(manifest).items():
        assert restricted_violations(pod) == [], name
    # The autoscaler sidecar KubeRay adds to the head pod.
    sidecar = manifest["spec"]["rayClusterConfig"]["autoscalerOptions"]["securityContext"]
    head = pod_groups(manifest)["head"]
    assert restricted_violations({**head, "containers": [{"name": "autoscaler", "securityContext": sidecar}]}) == []


def test_the_restricted_check_finds_what_breaks_it():
    pod = pod_groups(yaml.safe_load(MANIFESTS[0].read_text()))["head"]
    assert restricted_violations({**pod, "securityContext": {}}) == [
        "ray-head: may run as root", "ray-head: seccomp profile None"]
    container = {**pod["containers"][0], "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}
    assert len(restricted_violations({**pod, "containers": [container], "hostNetwork": True})) == 4


@pytest.mark.parametrize("file", MANIFESTS, ids=lambda p: p.stem)
def test_the_fronts_take_their_api_key_from_a_secret_and_ray_asks_for_a_token(file):
    from router_service.auth import API_KEY_ENV

    manifest = yaml.safe_load(file.read_text())
    assert front_group(manifest) in pod_groups(manifest)
    for name, pod in pod_groups(manifest).items():
        env = {e["name"]: e for c in pod["containers"] for e in c.get("env", [])}
        # On every pod, not only where the fronts run now: a front without it would serve without a key, silently.
        # The Secret the README's `kubectl create secret generic switch-serve-api-key --from-literal=api-key=...`
        # makes.
        assert env[API_KEY_ENV]["valueFrom"]["secretKeyRef"] == {"name": "switch-serve-api-key", "key": "api-key"}, name
        assert all("value" not in e for e in env.values() if "KEY" in e["name"])  # no secret in the file
    assert "kubectl create secret generic switch-serve-api-key --from-literal=api-key=" in README
    assert manifest["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
    # As the README says: a new cluster beside the old for switch-base-8, none for switch-c-2048's 48 GPUs.
    assert manifest["spec"]["upgradeStrategy"]["type"] == {"rayservice-switch-base-8": "NewCluster",
                                                           "rayservice-switch-c-2048": "None"}[file.stem]


@pytest.mark.parametrize("file", MANIFESTS, ids=lambda p: p.stem)
def test_expert_pods_land_only_on_gpus_that_hold_the_plan(file):
    """The experts group asks for nodes whose GPUs (nvidia.com/gpu.memory, in MiB) are big enough for the plan the
    serve config makes: the smallest GPU admitted holds the fullest GPU's experts within the planner's budget."""
    from experts.checkpoint import read_config
    from experts.fleet import GPU_SIZE_SLACK
    from experts.placement import PlacementConfig
    from experts.plan import ACTIVATION_RESERVE, parse_bytes
    from experts.spec import expert_format

    manifest = yaml.safe_load(file.read_text())
    args = fronts_args(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    command = shlex.split(manifest["metadata"]["annotations"]["switch-serve/build"])
    config = read_config(ROOT / command[command.index("--config") + 1])
    placement = PlacementConfig(**args["placement"])
    plan = placement.plan(config, expert_format(args["dtype"], "none"))
    (term,) = pod_groups(manifest)["experts"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    (rule,) = term["matchExpressions"]
    assert rule["key"] == "nvidia.com/gpu.memory" and rule["operator"] == "Gt"
    smallest = (int(rule["values"][0]) + 1) * 2**20
    assert smallest * (1 - ACTIVATION_RESERVE) >= max(gpu.bytes for gpu in plan.gpus)
    # ... and was planned for GPUs no bigger than those admitted, or the fleet warns on every load that they are
    # smaller than planned.
    assert smallest >= GPU_SIZE_SLACK * parse_bytes(placement.gpu_memory), \
        "plan with --gpu-memory of the smallest GPU the experts group admits"


def test_the_podmonitors_scrape_ports_that_their_pods_declare():
    monitors = list(yaml.safe_load_all((ROOT / "manifests" / "podmonitor.yaml").read_text()))
    scraped = {m["spec"]["selector"]["matchLabels"]["ray.io/node-type"]: {e["port"] for e in
                                                                          m["spec"]["podMetricsEndpoints"]}
               for m in monitors}
    assert scraped == {"head": {"metrics", "as-metrics", "dash-metrics"}, "worker": {"metrics"}}  # KubeRay's sample
    for file in MANIFESTS:
        for name, pod in pod_groups(yaml.safe_load(file.read_text())).items():
            declared = {p["name"] for c in pod["containers"] for p in c.get("ports", [])}
            assert scraped["head" if name == "head" else "worker"] <= declared, (file.name, name)


def test_the_dashboard_filters_by_cluster_and_stays_readable_at_61440_experts():
    """Every query is filtered by the cluster variable; a query by expert is cut to a top-k, since switch-c-2048
    has 61,440 experts; the actor restarts come from Ray's per-state gauge, read as a gauge."""
    dashboard = json.loads((ROOT / "manifests" / "grafana-dashboard.json").read_text())
    assert [v["name"] for v in dashboard["templating"]["list"]][:3] == ["datasource", "cluster", "model"]
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert all('ray_io_cluster=~"$cluster"' in e for e in exprs)
    for e in exprs:
        if "expert)" in e.replace(" ", ""):
            assert e.startswith("topk(") or e.startswith("max by (model, stack, layer)"), e
    # The busiest expert over the mean of all of a layer's experts, those that never got a token (and so have no
    # series) counted: the mean divides by the layer's experts, not by the series found.
    (imbalance,) = [e for e in exprs if e.startswith("max by (model, stack, layer)")]
    assert "avg by" not in imbalance and "ray_switch_serve_experts_per_layer" in imbalance
    (restarts,) = [e for e in exprs if "ray_actors" in e]
    assert "max_over_time(" in restarts and "increase(" not in restarts and 'Name="ExpertActor"' in restarts
    # A layer or an expert is one model's: grouped by it without the model, two models' layer 1 would be added up.
    for grouping in re.findall(r"by \(([^)]*)\)", " ".join(exprs)):
        names = {name.strip() for name in grouping.split(",")}
        assert "model" in names or not names & {"stack", "layer", "expert"}, grouping


def gpus(group: dict) -> int:
    return int(group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))


@pytest.mark.parametrize("file", MANIFESTS, ids=lambda p: p.stem)
def test_only_pods_with_a_serve_proxy_take_the_clients_calls(file):
    """The serve Service selects every RayService pod that is ready. Serve runs a proxy only where a front runs, so a
    group without fronts keeps KubeRay's readiness probe, which asks the proxy: a probe of its own that asked only
    the raylet would make such pods ready, and the Service would send clients to pods where nothing listens. Fails if
    a group without fronts has a probe of its own (the manifests keep KubeRay's everywhere, as the README says)."""
    manifest = yaml.safe_load(file.read_text())
    cluster = manifest["spec"]["rayClusterConfig"]
    (front_resource, _), = fronts_args(yaml.safe_load(manifest["spec"]["serveConfigV2"]))["front_resources"].items()
    without_fronts = [g for g in cluster["workerGroupSpecs"] if front_resource not in offered(g)]
    assert [g["groupName"] for g in without_fronts] == ["experts"]
    for group in without_fronts:
        assert "readinessProbe" not in group["template"]["spec"]["containers"][0], group["groupName"]


@pytest.mark.parametrize("file", MANIFESTS, ids=lambda p: p.stem)
def test_pods_spread_so_that_one_node_lost_takes_one_front_or_a_share_of_the_experts(file):
    """Worker fronts on nodes of their own, one a node (required), on nodes with fewer GPUs than an expert pod needs
    whole; expert pods of fewer GPUs than a node's spread over nodes (preferred). Each pod anti-affinity selects its
    own group's pods by their label. Fails if a front could take a GPU of a node an expert pod needs whole."""
    cluster = yaml.safe_load(file.read_text())["spec"]["rayClusterConfig"]
    for group in cluster["workerGroupSpecs"]:
        spec, labels = group["template"]["spec"], group["template"].get("metadata", {}).get("labels", {})
        anti = spec.get("affinity", {}).get("podAntiAffinity", {})
        terms = [t for t in anti.get("requiredDuringSchedulingIgnoredDuringExecution", [])] + \
            [t["podAffinityTerm"] for t in anti.get("preferredDuringSchedulingIgnoredDuringExecution", [])]
        for term in terms:
            assert term["labelSelector"]["matchLabels"].items() <= labels.items(), group["groupName"]
            assert term["topologyKey"] == "kubernetes.io/hostname"
        if group["groupName"] == "front":
            assert anti.get("requiredDuringSchedulingIgnoredDuringExecution"), "fronts may share a node"
            experts = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "experts")
            (term,) = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
                "nodeSelectorTerms"]
            (rule,) = [e for e in term["matchExpressions"] if e["key"] == "nvidia.com/gpu.count"]
            assert rule["operator"] == "Lt" and int(rule["values"][0]) <= gpus(experts)
        if group["groupName"] == "experts" and group["replicas"] > 1 and gpus(group) < 8:
            assert terms, "expert pods may all share a node"


def cpus(group: dict) -> float:
    """The CPUs each pod of a head or worker group is limited to."""
    return float(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])


@pytest.mark.parametrize("file", MANIFESTS, ids=lambda p: p.stem)
def test_the_fronts_of_a_pod_ask_for_no_more_threads_than_it_has_cpus(file):
    """Each front computes on `front_threads` threads, or on every CPU Ray counts on its node: two fronts on one pod
    without it would run twice as many busy threads as the pod has CPUs. Fails if a pod's fronts oversubscribe it."""
    manifest = yaml.safe_load(file.read_text())
    args = fronts_args(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    (resource, amount), = args["front_resources"].items()
    (group,) = [g for g in ray_groups(manifest).values() if resource in offered(g)]
    fronts_per_pod = offered(group)[resource] // amount
    assert fronts_per_pod * (args.get("front_threads") or cpus(group)) <= cpus(group)


@pytest.mark.parametrize("file", MANIFESTS, ids=lambda p: p.stem)
def test_the_ports_the_model_path_and_rays_version_agree_across_files(file):
    """Serve's ports are the Service's targets and the head's declared ports; the checkpoint folder the apps read
    lies under every pod's mount of the claim; the manifest's Ray is the image's and the package's. Fails if one
    file changes without the others."""
    manifest = yaml.safe_load(file.read_text())
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    cluster = manifest["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    declared = {p["name"]: p["containerPort"] for p in head["ports"]}
    targets = {p["name"]: p["targetPort"] for p in manifest["spec"]["serveService"]["spec"]["ports"]}
    ports = {"serve": serve_config["http_options"]["port"], "serve-grpc": serve_config["grpc_options"]["port"]}
    assert targets == ports and {name: declared[name] for name in ports} == ports
    for pod in pod_groups(manifest).values():
        (mount,) = [m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if m["name"] == "checkpoints"]
        for app in serve_config["applications"]:
            assert app["args"]["model"].startswith(mount.rstrip("/") + "/")
    version = cluster["rayVersion"]
    assert f"FROM rayproject/ray:{version}-" in (ROOT / "manifests" / "Dockerfile").read_text()
    assert f'"ray[serve]=={version}"' in (ROOT / "pyproject.toml").read_text()


def test_the_readmes_build_command_is_the_manifests():
    """The README shows the command that writes switch-base-8's serveConfigV2: the annotation's own, flag for flag."""
    manifest = yaml.safe_load((ROOT / "manifests" / "rayservice-switch-base-8.yaml").read_text())
    command = shlex.split(manifest["metadata"]["annotations"]["switch-serve/build"])
    shown = re.search(r"\.venv/bin/(switch-serve build --model /models/switch-base-8 [^`]*?)\n```", README, re.S)
    assert shown and shlex.split(shown.group(1).replace("\\\n", " ")) == command


def ray_drain_s(pod: dict) -> float:
    """How long `ray start` drains the pod's Ray node on Kubernetes' SIGTERM: its RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S,
    else Ray's default (tested as such in test_topology)."""
    from ray._private.ray_constants import RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S

    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    return float(env.get("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S))


def test_front_pods_drain_their_node_before_they_stop():
    """Pods of fronts apart from the head have Ray drain their node for longer than a front's drain, and a grace
    period beyond it. (Fronts on the head stop with the whole cluster.)"""
    manifests = [yaml.safe_load(file.read_text()) for file in MANIFESTS]
    fronts = [(m, pod_groups(m)[front_group(m)]) for m in manifests if front_group(m) != "head"]
    assert fronts  # switch-c-2048's front pods
    for manifest, pod in fronts:
        front_drain_s = fronts_args(yaml.safe_load(manifest["spec"]["serveConfigV2"])).get(
            "drain_timeout_s", ServerConfig.model_fields["drain_timeout_s"].default)
        assert front_drain_s < ray_drain_s(pod) < pod["terminationGracePeriodSeconds"]


# Kubernetes' grace period of a pod that sets none.
KUBERNETES_GRACE_S = 30


def test_every_pod_outlasts_the_drain_ray_gives_its_node():
    """Kubernetes' grace period of every pod, the heads' too, is longer than the drain `ray start` runs on its SIGTERM:
    a shorter one kills the pod in the middle of it. Fails if a pod group leaves Kubernetes' default (30 s, Ray's
    default drain too)."""
    for file in MANIFESTS:
        for name, pod in pod_groups(yaml.safe_load(file.read_text())).items():
            assert pod.get("terminationGracePeriodSeconds", KUBERNETES_GRACE_S) > ray_drain_s(pod), (file.name, name)


BUDGETS = list(yaml.safe_load_all((ROOT / "manifests" / "disruption-budgets.yaml").read_text()))


def test_drains_leave_the_head_alone_and_a_front_serving():
    """Every head pod is kept from the cluster autoscaler's and Karpenter's scale-down (annotations) and from drains
    (a PodDisruptionBudget), as is one of switch-c-2048's two fronts: a budget of the integer minAvailable that pods
    of a RayCluster allow, selecting a pod group of a manifest by its template's labels, with pods left to drain
    where the group has more than one. Fails if a head can be evicted, or a budget selects no pod."""
    groups = {(file.stem.removeprefix("rayservice-"), name): group
              for file in MANIFESTS for name, group in ray_groups(yaml.safe_load(file.read_text())).items()}
    selected = {}
    for budget in BUDGETS:
        assert (budget["apiVersion"], budget["kind"]) == ("policy/v1", "PodDisruptionBudget")
        assert set(budget["spec"]) == {"minAvailable", "selector"} and type(budget["spec"]["minAvailable"]) is int
        (key, group), = [(key, g) for key, g in groups.items()
                         if budget["spec"]["selector"]["matchLabels"].items()
                         <= g["template"].get("metadata", {}).get("labels", {}).items()]
        replicas = group.get("replicas", 1)
        assert budget["spec"]["minAvailable"] == (1 if key[1] == "head" else replicas - 1), key
        selected[key] = budget["metadata"]["name"]
    assert selected == {("switch-base-8", "head"): "switch-base-8-head",
                        ("switch-c-2048", "head"): "switch-c-2048-head",
                        ("switch-c-2048", "front"): "switch-c-2048-front"}
    for (_, name), group in groups.items():
        if name == "head":
            assert group["template"]["metadata"]["annotations"] == {
                "cluster-autoscaler.kubernetes.io/safe-to-evict": "false", "karpenter.sh/do-not-disrupt": "true"}
    assert "kubectl apply -f manifests/disruption-budgets.yaml" in README


# The nodes each group's comment names: (vCPUs, GiB).
NODES = {("switch-base-8", "head"): (16, 64), ("switch-base-8", "experts"): (8, 32),
         ("switch-c-2048", "head"): (16, 64), ("switch-c-2048", "front"): (16, 64),
         ("switch-c-2048", "experts"): (96, 1152)}


def test_every_pod_fits_the_allocatable_of_the_node_its_comment_names():
    """A pod's requests must fit a node's allocatable, less than its size (the kubelet's and system reservations,
    the eviction threshold): at least a vCPU and 15% of the memory kept back. Fails if a group asks for a node's
    whole size, which stays Pending on such nodes."""
    from experts.plan import parse_bytes

    for file in MANIFESTS:
        for name, group in ray_groups(yaml.safe_load(file.read_text())).items():
            cpus, gib = NODES[(file.stem.removeprefix("rayservice-"), name)]
            requests = group["template"]["spec"]["containers"][0]["resources"]["requests"]
            assert float(requests["cpu"]) <= cpus - 1, (file.name, name)
            assert parse_bytes(requests["memory"]) <= 0.85 * gib * 2**30, (file.name, name)
