"""The Helm chart, validated offline with a real Helm engine, Kubernetes schemas and the CRD schemas."""

from __future__ import annotations

import copy
import json
import os
import subprocess
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from grokserve.cluster.app import build_app
from grokserve.cluster.spec import parse_spec
from grokserve.model.config import get_preset

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "grokserve"
HELM = Path(os.environ.get("GROKSERVE_HELM", REPO / ".tools" / "helm"))
CRDS = REPO / "tests" / "data" / "k8s" / "crds"  # KubeRay and prometheus-operator CRDs (tests/data/README.md)
VALUE_SETS = ["default", *sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))]
CORE_KINDS = {"Service", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy", "Pod"}
K8S_VERSION = "1.30.0"


@pytest.fixture(scope="module", autouse=True)
def helm_available():
    if not HELM.exists():
        pytest.fail(f"{HELM} is missing: scripts/install.sh fetches it (scripts/get_helm.sh)")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, check=check)


def values_args(name: str) -> list[str]:
    return [] if name == "default" else ["-f", str(CHART / "ci" / name)]


@cache
def render(name: str) -> tuple[dict, ...]:
    out = helm("template", "demo", str(CHART), "--namespace", "serving", *values_args(name)).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


# ---- CRD schemas as strict JSON Schemas ----------------------------------------------------------

def strict_schema(node):
    """openAPIV3Schema → JSON Schema where unknown fields fail (unless the CRD preserves them)."""
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    preserve = node.get("x-kubernetes-preserve-unknown-fields", False)
    int_or_string = node.get("x-kubernetes-int-or-string", False)
    out = {k: strict_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if int_or_string:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


@cache
def crd_validators() -> dict[tuple[str, str], jsonschema.Draft7Validator]:
    validators = {}
    for path in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = strict_schema(version["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = {"type": "object"}
            validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return validators


def validate(doc: dict) -> None:
    if doc["kind"] in CORE_KINDS:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        return
    validator = crd_validators().get((doc["apiVersion"], doc["kind"]))
    assert validator is not None, f"no schema for {doc['apiVersion']} {doc['kind']}"
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
    if errors:
        raise jsonschema.ValidationError(f"{doc['kind']} {doc['metadata']['name']}: " +
                                         "; ".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:5]))


def gpu_limits_ok(rayservice: dict) -> list[str]:
    """Every Ray group that offers GPUs to Ray requests them from Kubernetes: returns the offenders."""
    bad = []
    spec = rayservice["spec"]["rayClusterConfig"]
    for group in spec["workerGroupSpecs"]:
        gpus = int(group["rayStartParams"].get("num-gpus", "0"))
        limits = group["template"]["spec"]["containers"][0]["resources"].get("limits", {})
        if gpus and int(limits.get("nvidia.com/gpu", 0)) != gpus:
            bad.append(group["groupName"])
    return bad


def rayservice_of(docs) -> dict:
    return next(d for d in docs if d["kind"] == "RayService")


# ---- tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("values", VALUE_SETS)
def test_chart_lints_strictly(values):
    result = helm("lint", "--strict", str(CHART), *values_args(values), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", VALUE_SETS)
def test_every_rendered_object_validates(values):
    docs = render(values)
    assert {d["kind"] for d in docs} >= {"RayService", "Service"}
    for doc in docs:
        validate(doc)


@pytest.mark.parametrize("values", VALUE_SETS)
def test_rendered_serve_config_builds_the_application_with_grokserve_code(values):
    rayservice = rayservice_of(render(values))
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    (application,) = serve_config["applications"]
    assert application["import_path"] == "grokserve.cluster.app:app_builder"
    spec = parse_spec(application["args"])
    config = get_preset("grok-1")
    plan = spec.placement(config)
    app = build_app(spec, config)
    router = app._bound_deployment
    assert router.name == "router" and router.num_replicas == spec.router.replicas
    shard_deployments = [a._bound_deployment for a in router.init_args[1:]]
    assert [d.name for d in shard_deployments] == [f"expert-{s.name}" for s in plan.shards]
    assert all(d.ray_actor_options["resources"] == {"grokserve_expert": 1} for d in shard_deployments)
    # what the spec asks of Ray fits what the chart's groups offer
    groups = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    offered_gpus = sum(int(g["rayStartParams"]["num-gpus"]) * g["replicas"] for g in groups)
    assert spec.required_resources(config).get("GPU", 0) <= offered_gpus
    assert not gpu_limits_ok(rayservice)


def test_weight_mode_reaches_the_cluster_spec():
    def spec_of(values):
        serve_config = yaml.safe_load(rayservice_of(render(values))["spec"]["serveConfigV2"])
        return parse_spec(serve_config["applications"][0]["args"])

    assert spec_of("default").model.weights == "dense"
    assert spec_of("eight-experts-two-nodes-values.yaml").model.weights == "int8"
    assert spec_of("default").router.limits.prefix_cache is True


def test_the_http_api_is_served_exposed_and_exercised_by_helm_test():
    docs = render("default")
    spec = parse_spec(yaml.safe_load(rayservice_of(docs)["spec"]["serveConfigV2"])["applications"][0]["args"])
    assert spec.router.http_port == 8080  # not Ray Serve's proxy port (8000, on every node)
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-grpc"))
    http = next(p for p in service["spec"]["ports"] if p["name"] == "serve-http")
    assert http["port"] == 8080 and http["targetPort"] == "serve-http"
    cluster = rayservice_of(docs)["spec"]["rayClusterConfig"]
    router_ports = [{k: p[k] for k in ("name", "containerPort")} for g in cluster["workerGroupSpecs"]
                    for c in g["template"]["spec"]["containers"] for p in c.get("ports", [])
                    if p["name"] == "serve-grpc" or p["name"] == "serve-http"]
    assert {"name": "serve-http", "containerPort": 8080} in router_ports
    test_pod = next(d for d in docs if d["kind"] == "Pod" and "helm.sh/hook" in d["metadata"].get("annotations", {}))
    script = test_pod["spec"]["containers"][0]["args"][0]
    assert "/v1/completions" in script and ":8080" in script
    compile(script, "helm-test", "exec")  # the rendered test is valid Python


def test_ray_start_params_are_all_quoted_strings():
    for values in VALUE_SETS:
        cluster = rayservice_of(render(values))["spec"]["rayClusterConfig"]
        for params in [cluster["headGroupSpec"]["rayStartParams"],
                       *(g["rayStartParams"] for g in cluster["workerGroupSpecs"])]:
            assert all(isinstance(v, str) for v in params.values()), params


def test_a_misspelled_field_fails_validation():
    broken = copy.deepcopy(rayservice_of(render("default")))
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replica"] = 2
    with pytest.raises(jsonschema.ValidationError, match="replica"):
        validate(broken)


def test_an_unquoted_ray_start_param_fails_validation():
    broken = copy.deepcopy(rayservice_of(render("default")))
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = 1
    with pytest.raises(jsonschema.ValidationError, match="num-gpus"):
        validate(broken)


def test_a_missing_gpu_limit_is_caught():
    broken = copy.deepcopy(rayservice_of(render("eight-experts-two-nodes-values.yaml")))
    group = broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]
    del group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert gpu_limits_ok(broken) == [group["groupName"]]


def test_a_misspelled_core_field_fails_validation():
    service = copy.deepcopy(next(d for d in render("default") if d["kind"] == "Service"))
    service["spec"]["portz"] = service["spec"].pop("ports")
    with pytest.raises(Exception, match="portz"):
        validate(service)


@pytest.mark.parametrize("bad", [
    "model.dtype=float16", "router.grpcPort=70000", "router.replicas=0", "model.storage.type=nfs",
    "experts.groups[0].gpus=-1", "monitoring.podMonitor.interval=soon", "router.trasport=stream",
    "image.tag=", "service.type=Ingress", "model.weights=int4", "router.limits.prefix_cache=maybe",
])
def test_values_schema_rejects_bad_values(bad):
    result = helm("template", "demo", str(CHART), "--set", bad, check=False)
    assert result.returncode != 0 and "schema" in (result.stderr + result.stdout).lower(), bad


def test_monitoring_renders_the_dashboards_and_rules_the_code_tests():
    docs = render("monitoring-values.yaml")
    dashboards = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    assert len(dashboards) == len(list((CHART / "dashboards").glob("*.json")))
    for cm in dashboards.values():
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        (content,) = cm["data"].values()
        assert json.loads(content)["panels"]
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((CHART / "rules" / "alerts.yaml").read_text())
    monitor = next(d for d in docs if d["kind"] == "PodMonitor")
    ports = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    assert {"router-m0", "expert-m5"} <= ports


def test_defaults_are_hardened_and_every_container_has_resources():
    for values in VALUE_SETS:
        for doc in render(values):
            pod_specs = []
            if doc["kind"] == "RayService":
                cluster = doc["spec"]["rayClusterConfig"]
                pod_specs = [cluster["headGroupSpec"]["template"]["spec"],
                             *(g["template"]["spec"] for g in cluster["workerGroupSpecs"])]
            elif doc["kind"] == "Pod":
                pod_specs = [doc["spec"]]
            for pod in pod_specs:
                assert pod["securityContext"]["runAsNonRoot"] is True
                assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
                for container in [*pod["containers"], *pod.get("initContainers", [])]:
                    ctx = container["securityContext"]
                    assert ctx["capabilities"]["drop"] == ["ALL"] and ctx["allowPrivilegeEscalation"] is False
                    assert ctx["readOnlyRootFilesystem"] is True
                    assert container["resources"]["requests"] and container["resources"]["limits"]


def test_dockerfile_runs_as_non_root_on_a_cuda_runtime_image():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "FROM nvidia/cuda:" in dockerfile and "runtime" in dockerfile
    user_lines = [line for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert user_lines and user_lines[-1].split()[1] not in ("root", "0")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert "org.opencontainers.image.source" in dockerfile
    assert values["image"]["repository"].startswith("ghcr.io/grokserve/")


def test_tls_values_wire_secrets_where_the_spec_reads_them():
    docs = render("tls-values.yaml")
    rayservice = rayservice_of(docs)
    security = parse_spec(yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["args"]).security
    assert security.client_tls and security.tokens_file and security.dispatch_mtls
    files = [security.client_tls.cert_file, security.client_tls.key_file, security.tokens_file,
             security.dispatch_mtls.ca_file, security.dispatch_mtls.cert_file, security.dispatch_mtls.key_file]
    cluster = rayservice["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in cluster["workerGroupSpecs"])]
    for pod in pods:
        mounts = [m["mountPath"] for m in pod["containers"][0]["volumeMounts"]]
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        assert set(secrets.values()) == {"grok-api-tls", "grok-client-tokens", "grok-dispatch-mtls"}
        for path in files:
            assert any(path.startswith(m + "/") for m in mounts), path
    test_pod = next(d for d in docs if d["kind"] == "Pod")
    assert "ssl_channel_credentials" in test_pod["spec"]["containers"][0]["args"][0]
