"""deploy/: the Dockerfile and the Kubernetes manifests, checked offline.

No cluster and no Docker engine are needed (none runs in CI), so this checks what can be checked
from the files themselves:

* every manifest parses, and every core Kubernetes object validates against the Kubernetes 1.30
  OpenAPI schemas in strict mode (unknown fields are errors) with ``kubernetes-validate``;
* the KEDA and Prometheus Operator objects (CRDs, not in those schemas) validate against JSON
  schemas written here. They are OURS, covering only the fields these manifests use, with
  unknown fields refused so that a typo cannot pass silently; they are not KEDA's or the
  operator's own CRD schemas;
* cross-references: Service selectors, port names, probes, autoscaler targets, Secrets and
  ConfigMaps, volumes, the settings the service reads, the Dockerfile's user and ports;
* the Dockerfile: base image pinned by tag, non-root user, exec-form ENTRYPOINT, no ``curl | sh``.

What is not checked here (docs/DEPLOY.md): that the image builds, and anything a cluster decides
(scheduling, the GPU, KEDA's behaviour, admission).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.support.shared import REPO

K8S_VERSION = "1.30"
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
NAMESPACE = "lipsync"
OVERLAYS = ("base", "dev", "monitoring")
CRD_GROUPS = ("keda.sh", "monitoring.coreos.com")
DOCKERFILE_UID = 10001


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in manifest_files() for doc in load_docs(path)]


def object_id(item: tuple[Path, dict[str, Any]]) -> str:
    path, obj = item
    return f"{path.relative_to(K8S)}:{obj['kind']}/{obj['metadata']['name']}"


def is_crd(obj: dict[str, Any]) -> bool:
    return obj["apiVersion"].split("/")[0] in CRD_GROUPS


def kustomization(directory: Path) -> dict[str, Any]:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def overlay_objects(directory: Path) -> list[dict[str, Any]]:
    """The objects a kustomization directory puts together (resources, recursively), as written
    (the transformations -- namespace, images, labels -- are not applied here)."""
    objects = []
    for entry in kustomization(directory).get("resources", []):
        target = (directory / entry).resolve()
        if target.is_dir():
            objects += overlay_objects(target)
        else:
            objects += load_docs(target)
    return objects


BASE = overlay_objects(K8S / "base")
ALL = all_objects()
EXAMPLE_SECRET = load_docs(K8S / "base" / "secret.example.yaml")[0]


def find(kind: str, name: str, objects: list[dict[str, Any]] = BASE) -> dict[str, Any]:
    hits = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected exactly one {kind}/{name}, found {len(hits)}"
    return hits[0]


def of_kind(kind: str, objects: list[dict[str, Any]] = BASE) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return spec.get("initContainers", []) + spec["containers"]


def workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet", "Job")]


def probes(container: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        if kind in container:
            yield kind, container[kind]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def quantity(value: str | int) -> float:
    """A Kubernetes resource quantity as a number (cores or bytes)."""
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6}
    units |= {"G": 1e9}
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def config_data() -> dict[str, str]:
    return find("ConfigMap", "lipsync-config")["data"]


# ---------------------------------------------------------------------------------------------
# parsing and schemas
# ---------------------------------------------------------------------------------------------


def test_manifests_exist_and_every_file_parses_into_named_objects():
    files = manifest_files()
    assert len(files) >= 10, files
    for path in files:
        docs = load_docs(path)
        assert docs, f"{path} holds no object"
        for doc in docs:
            assert isinstance(doc, dict), path
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), path
    for name in OVERLAYS:
        assert kustomization(K8S / name)["kind"] == "Kustomization"


def test_no_two_objects_share_kind_and_name_in_one_overlay():
    for name in OVERLAYS:
        keys = [(o["kind"], o["metadata"]["name"]) for o in overlay_objects(K8S / name)]
        assert len(keys) == len(set(keys)), f"{name}: duplicates in {keys}"


CORE = [item for item in ALL if not is_crd(item[1])]


@pytest.mark.parametrize("item", CORE, ids=[object_id(i) for i in CORE])
def test_core_object_validates_against_kubernetes_schema_strict(item):
    _, obj = item
    version = kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    assert version == K8S_VERSION


def test_strict_kubernetes_validation_rejects_a_misspelt_field():
    """The validator really looks at our fields: the same Deployment with one typo fails."""
    deployment = json.loads(json.dumps(find("Deployment", "lipsync-api")))
    kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


# Our JSON schemas for the CRD objects we use (NOT the upstream CRD schemas: only the fields used
# here, unknown fields refused). Field names follow keda.sh/v1alpha1 (KEDA 2.12+) and
# monitoring.coreos.com/v1 (prometheus-operator).
_STR = {"type": "string", "minLength": 1}
_INT0 = {"type": "integer", "minimum": 0}
_METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {
        "name": _STR,
        "namespace": _STR,
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}
_HPA_BEHAVIOR_RULES = {
    "type": "object",
    "properties": {
        "stabilizationWindowSeconds": _INT0,
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "policies": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "value", "periodSeconds"],
                "properties": {
                    "type": {"enum": ["Pods", "Percent"]},
                    "value": {"type": "integer", "minimum": 1},
                    "periodSeconds": {"type": "integer", "minimum": 1},
                },
                "additionalProperties": False,
            },
        },
    },
    "additionalProperties": False,
}


def _crd_schema(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A closed schema of a custom resource: ``apiVersion`` and ``kind`` fixed, our metadata,
    and the ``spec`` schema."""
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
        "additionalProperties": False,
    }


SCALED_OBJECT_SCHEMA = _crd_schema(
    "keda.sh/v1alpha1",
    "ScaledObject",
    {
        "type": "object",
        "required": ["scaleTargetRef", "triggers", "minReplicaCount", "maxReplicaCount"],
        "properties": {
            "scaleTargetRef": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "apiVersion": {"const": "apps/v1"},
                    "kind": {"const": "Deployment"},
                    "name": _STR,
                },
                "additionalProperties": False,
            },
            "pollingInterval": {"type": "integer", "minimum": 1},
            "cooldownPeriod": _INT0,
            "initialCooldownPeriod": _INT0,
            "idleReplicaCount": _INT0,
            "minReplicaCount": _INT0,
            "maxReplicaCount": {"type": "integer", "minimum": 1},
            "advanced": {
                "type": "object",
                "properties": {
                    "restoreToOriginalReplicaCount": {"type": "boolean"},
                    "horizontalPodAutoscalerConfig": {
                        "type": "object",
                        "properties": {
                            "name": _STR,
                            "behavior": {
                                "type": "object",
                                "properties": {
                                    "scaleUp": _HPA_BEHAVIOR_RULES,
                                    "scaleDown": _HPA_BEHAVIOR_RULES,
                                },
                                "additionalProperties": False,
                            },
                        },
                        "additionalProperties": False,
                    },
                },
                "additionalProperties": False,
            },
            "triggers": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["type", "metadata"],
                    "properties": {
                        "type": {"const": "postgresql"},
                        "name": _STR,
                        "metricType": {"enum": ["AverageValue", "Value"]},
                        # KEDA trigger metadata values are strings, numbers included.
                        "metadata": {
                            "type": "object",
                            "required": ["query", "targetQueryValue"],
                            "properties": {
                                "query": _STR,
                                "targetQueryValue": {
                                    "type": "string",
                                    "pattern": r"^[0-9]+(\.[0-9]+)?$",
                                },
                                "activationTargetQueryValue": {
                                    "type": "string",
                                    "pattern": r"^[0-9]+(\.[0-9]+)?$",
                                },
                            },
                            "additionalProperties": False,
                        },
                        "authenticationRef": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {
                                "name": _STR,
                                "kind": {
                                    "enum": [
                                        "TriggerAuthentication",
                                        "ClusterTriggerAuthentication",
                                    ]
                                },
                            },
                            "additionalProperties": False,
                        },
                    },
                    "additionalProperties": False,
                },
            },
        },
        "additionalProperties": False,
    },
)
TRIGGER_AUTHENTICATION_SCHEMA = _crd_schema(
    "keda.sh/v1alpha1",
    "TriggerAuthentication",
    {
        "type": "object",
        "required": ["secretTargetRef"],
        "properties": {
            "secretTargetRef": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["parameter", "name", "key"],
                    # postgresql scaler auth parameters: connection string or password.
                    "properties": {
                        "parameter": {"enum": ["connection", "password"]},
                        "name": _STR,
                        "key": _STR,
                    },
                    "additionalProperties": False,
                },
            }
        },
        "additionalProperties": False,
    },
)
SERVICE_MONITOR_SCHEMA = _crd_schema(
    "monitoring.coreos.com/v1",
    "ServiceMonitor",
    {
        "type": "object",
        "required": ["selector", "endpoints"],
        "properties": {
            "selector": {
                "type": "object",
                "required": ["matchLabels"],
                "properties": {
                    "matchLabels": {
                        "type": "object",
                        "minProperties": 1,
                        "additionalProperties": {"type": "string"},
                    }
                },
                "additionalProperties": False,
            },
            "endpoints": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["port"],
                    "properties": {
                        "port": _STR,
                        "path": {"type": "string", "pattern": "^/"},
                        "interval": {"type": "string", "pattern": r"^[0-9]+(s|m)$"},
                    },
                    "additionalProperties": False,
                },
            },
        },
        "additionalProperties": False,
    },
)
CRD_SCHEMAS = {
    "ScaledObject": SCALED_OBJECT_SCHEMA,
    "TriggerAuthentication": TRIGGER_AUTHENTICATION_SCHEMA,
    "ServiceMonitor": SERVICE_MONITOR_SCHEMA,
}
CRDS = [item for item in ALL if is_crd(item[1])]


def test_crd_objects_present():
    kinds = sorted(obj["kind"] for _, obj in CRDS)
    assert kinds.count("ScaledObject") == 2, kinds
    assert kinds.count("TriggerAuthentication") == 1, kinds
    assert kinds.count("ServiceMonitor") == 3, kinds


@pytest.mark.parametrize("item", CRDS, ids=[object_id(i) for i in CRDS])
def test_crd_object_validates_against_our_schema(item):
    _, obj = item
    assert obj["kind"] in CRD_SCHEMAS, f"no schema of ours for {obj['kind']}"
    schema = CRD_SCHEMAS[obj["kind"]]
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(obj)


def test_our_crd_schema_rejects_typos():
    scaled = json.loads(json.dumps(find("ScaledObject", "lipsync-triton")))
    validator = jsonschema.Draft202012Validator(SCALED_OBJECT_SCHEMA)
    validator.validate(scaled)
    scaled["spec"]["minReplicas"] = scaled["spec"].pop("minReplicaCount")  # the HPA's name
    assert not validator.is_valid(scaled)
    scaled = json.loads(json.dumps(find("ScaledObject", "lipsync-triton")))
    scaled["spec"]["triggers"][0]["metadata"]["targetQueryValue"] = 4  # must be a string
    assert not validator.is_valid(scaled)


# ---------------------------------------------------------------------------------------------
# kustomize
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OVERLAYS)
def test_kustomization_lists_every_file_and_only_existing_ones(name):
    directory = K8S / name
    listed = kustomization(directory).get("resources", [])
    for entry in listed:
        assert (directory / entry).exists(), f"{name}/kustomization.yaml lists missing {entry}"
    files = {p.name for p in directory.glob("*.yaml") if p.name != "kustomization.yaml"}
    applied = {p for p in files if not p.endswith(".example.yaml")}
    assert applied <= set(listed), f"{name}: not in kustomization.yaml: {applied - set(listed)}"
    examples = files - applied
    assert not examples & set(listed), f"{name}: example files must never be applied"


def test_overlays_build_on_base():
    for name in ("dev", "monitoring"):
        assert "../base" in kustomization(K8S / name)["resources"], name


def test_example_secret_is_not_applied_but_dev_generates_it_with_the_same_keys():
    assert "secret.example.yaml" not in kustomization(K8S / "base")["resources"]
    assert not of_kind("Secret"), "base must not carry a Secret: it would overwrite the real one"
    generators = kustomization(K8S / "dev")["secretGenerator"]
    (dev,) = [g for g in generators if g["name"] == "lipsync-secrets"]
    assert dev["options"]["disableNameSuffixHash"] is True  # KEDA refers to it by name
    dev_keys = {literal.split("=", 1)[0] for literal in dev["literals"]}
    assert "DATABASE_URL" in EXAMPLE_SECRET["stringData"]
    assert "DATABASE_URL" in dev_keys
    for value in EXAMPLE_SECRET["stringData"].values():
        assert "CHANGE-ME" in value, "the example Secret holds placeholders only"


def test_base_image_is_set_in_one_place():
    images = kustomization(K8S / "base")["images"]
    assert [i["name"] for i in images] == ["lipsync"]
    for obj in workloads(BASE):
        for c in containers(obj):
            assert c["image"] == "lipsync", (obj["metadata"]["name"], c["image"])


def _kubectl_kustomize(name: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: rendering with kustomize not checked")
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / name)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.parametrize("name", OVERLAYS)
def test_kustomize_renders_valid_objects(name):
    """With kubectl present, render each overlay as `kubectl apply -k` would and validate the
    result (namespace, image and label transformations applied)."""
    rendered = _kubectl_kustomize(name)
    expected = overlay_objects(K8S / name)
    assert len(rendered) == len(expected) + (1 if name == "dev" else 0)  # + generated Secret
    for obj in rendered:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]["name"]
        if is_crd(obj):
            jsonschema.validate(obj, CRD_SCHEMAS[obj["kind"]])
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        if obj["kind"] in ("Deployment", "Job"):
            for c in containers(obj):
                assert c["image"] == "registry.example.com/lipsync:0.1.0", c["image"]


# ---------------------------------------------------------------------------------------------
# cross-references
# ---------------------------------------------------------------------------------------------


def test_every_object_is_in_the_lipsync_namespace():
    (namespace,) = of_kind("Namespace")
    assert namespace["metadata"]["name"] == NAMESPACE
    for name in OVERLAYS:
        assert kustomization(K8S / name).get("namespace", NAMESPACE) == NAMESPACE
    for item in ALL:
        if item[1]["kind"] != "Namespace":
            assert item[1]["metadata"].get("namespace") == NAMESPACE, object_id(item)


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_service_selects_pods_and_targets_declared_ports(name):
    objects = overlay_objects(K8S / name)
    services = of_kind("Service", objects)
    assert services
    for svc in services:
        selector = svc["spec"]["selector"]
        pods = [
            w
            for w in workloads(objects)
            if matches(selector, w["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(pods) == 1, f"Service {svc['metadata']['name']} selects {len(pods)} workloads"
        ports = {p["name"]: p["containerPort"] for c in containers(pods[0]) for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if isinstance(target, str):
                assert target in ports, (svc["metadata"]["name"], target, ports)
                assert ports[target] == port["port"], "Service port differs from containerPort"
            else:
                assert target in ports.values()


@pytest.mark.parametrize("name", OVERLAYS)
def test_workload_selectors_match_their_pod_labels(name):
    for w in workloads(overlay_objects(K8S / name)):
        if w["kind"] == "Job":
            continue
        selector = w["spec"]["selector"]["matchLabels"]
        assert matches(selector, w["spec"]["template"]["metadata"]["labels"]), w["metadata"]
    # no two workloads' pods answer to the same selector (Services would mix them)
    labels = [
        tuple(sorted(w["spec"]["template"]["metadata"]["labels"].items()))
        for w in workloads(overlay_objects(K8S / name))
    ]
    assert len(labels) == len(set(labels))


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_probe_uses_a_declared_container_port(name):
    for w in workloads(overlay_objects(K8S / name)):
        for c in containers(w):
            names = {p["name"] for p in c.get("ports", [])}
            numbers = {p["containerPort"] for p in c.get("ports", [])}
            for kind, probe in probes(c):
                action = probe.get("httpGet") or probe.get("tcpSocket") or probe.get("grpc")
                if action is None:
                    assert "exec" in probe, (w["metadata"]["name"], kind)
                    continue
                port = action["port"]
                ok = port in names if isinstance(port, str) else port in numbers
                assert ok, f"{w['metadata']['name']}/{c['name']} {kind} uses undeclared {port}"


def test_each_service_process_has_probes_and_the_right_command():
    expected = {
        "lipsync-api": ("api", {"/healthz", "/readyz"}),
        "lipsync-worker": ("worker", {"/healthz", "/readyz"}),
        "lipsync-triton": ("triton", {"/v2/health/live", "/v2/models/lipsync/ready"}),
    }
    for name, (process, paths) in expected.items():
        (c,) = pod_spec(find("Deployment", name))["containers"]
        assert c["args"] == ["serve", process]
        kinds = dict(probes(c))
        assert {"livenessProbe", "readinessProbe"} <= kinds.keys(), name
        assert {p["httpGet"]["path"] for p in kinds.values()} == paths, name
    (triton,) = pod_spec(find("Deployment", "lipsync-triton"))["containers"]
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/models/lipsync/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    (api,) = pod_spec(find("Deployment", "lipsync-api"))["containers"]
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # a worker that is not registered (or cannot reach the database) is not ready; one whose
    # loop stopped or whose heartbeat has not gone through for too long fails liveness
    (worker,) = pod_spec(find("Deployment", "lipsync-worker"))["containers"]
    assert worker["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert worker["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # ... and Prometheus keeps scraping it meanwhile
    assert find("Service", "lipsync-worker-metrics")["spec"]["publishNotReadyAddresses"] is True


def test_ingress_and_api_enforce_the_same_body_limit():
    """The Ingress refuses bodies over the API's own limit (upload limit + form overhead), and
    streams bodies to the API (which checks the key before reading) instead of spooling them."""
    from lipsync.serving.api.limits import FORM_OVERHEAD
    from lipsync.serving.settings import ServeSettings

    (ingress,) = of_kind("Ingress")
    notes = ingress["metadata"]["annotations"]
    size = notes["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert size.endswith("m"), size  # nginx: m = MiB
    settings = ServeSettings.from_env({**config_data(), "DATABASE_URL": "postgresql://x@db/l"})
    assert int(size[:-1]) * 2**20 == settings.max_upload_bytes + FORM_OVERHEAD
    assert notes["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "off"
    (rule,) = ingress["spec"]["rules"]
    for path in rule["http"]["paths"]:
        backend = path["backend"]["service"]
        svc = find("Service", backend["name"])
        assert backend["port"]["name"] in {p["name"] for p in svc["spec"]["ports"]}
        assert svc["spec"]["selector"]["app.kubernetes.io/component"] == "api"


def test_triton_requests_exactly_one_gpu_and_nobody_else_does():
    for w in workloads(BASE):
        for c in containers(w):
            limits = c.get("resources", {}).get("limits", {})
            requests = c.get("resources", {}).get("requests", {})
            if w["metadata"]["name"] == "lipsync-triton":
                assert limits["nvidia.com/gpu"] == 1
                # extended resources: a request, if given, must equal the limit
                assert requests.get("nvidia.com/gpu", 1) == 1
            else:
                assert "nvidia.com/gpu" not in limits, w["metadata"]["name"]


def test_triton_pod_has_shm_model_volume_ports_and_gpu_toleration():
    triton = find("Deployment", "lipsync-triton")
    spec = pod_spec(triton)
    (c,) = spec["containers"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
        "http": 8000,
        "grpc": 8001,
        "metrics": 8002,
    }
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    shm = volumes[mounts["/dev/shm"]["name"]]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert quantity(shm["emptyDir"]["sizeLimit"]) >= 1 * 2**30
    models = mounts[config_data()["LIPSYNC_HOME"]]
    assert models["readOnly"] is True
    claim = volumes[models["name"]]["persistentVolumeClaim"]["claimName"]
    pvc = find("PersistentVolumeClaim", claim)
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    # one GPU per slot in rollouts: no surge pod waiting for a GPU that is not there
    assert triton["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0


def test_model_download_job_fills_the_volume_triton_reads_with_the_served_preset():
    job = find("Job", "lipsync-model-download")
    (c,) = pod_spec(job)["containers"]
    assert c["args"][:1] == ["download"]
    version = c["args"][c["args"].index("--version") + 1]
    assert config_data()["LIPSYNC_PRESET"] == f"v{version}"
    job_claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod_spec(job)["volumes"]
        if "persistentVolumeClaim" in v
    }
    triton_claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod_spec(find("Deployment", "lipsync-triton"))["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert job_claims == triton_claims == {"lipsync-models"}
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert config_data()["LIPSYNC_HOME"] in mounts


@pytest.mark.parametrize("name", ["lipsync-api", "lipsync-worker", "lipsync-triton"])
def test_containers_have_cpu_and_memory_requests_and_limits(name):
    for c in containers(find("Deployment", name)):
        res = c["resources"]
        for key in ("cpu", "memory"):
            assert key in res["requests"] and key in res["limits"], (name, key)
            assert quantity(res["limits"][key]) >= quantity(res["requests"][key]), (name, key)


def test_api_runs_at_least_two_replicas_spread_and_protected():
    api = find("Deployment", "lipsync-api")
    assert api["spec"]["replicas"] >= 2
    hpa = find("HorizontalPodAutoscaler", "lipsync-api")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "lipsync-api",
    }
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 90
    assert api["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_pod_disruption_budgets_cover_api_and_triton():
    covered = {}
    for pdb in of_kind("PodDisruptionBudget"):
        hits = [
            w["metadata"]["name"]
            for w in workloads(BASE)
            if matches(
                pdb["spec"]["selector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"]
            )
        ]
        assert len(hits) == 1, pdb["metadata"]["name"]
        covered[hits[0]] = pdb["spec"]
    assert covered.keys() == {"lipsync-api", "lipsync-triton"}
    # the API keeps one replica up (it runs >= 2, so drains still proceed)
    assert (
        covered["lipsync-api"]["minAvailable"]
        < find("Deployment", "lipsync-api")["spec"]["replicas"]
    )
    # Triton may be at one replica: minAvailable would block every drain of its node
    assert "minAvailable" not in covered["lipsync-triton"]
    assert covered["lipsync-triton"]["maxUnavailable"] >= 1


def test_worker_shutdown_grace_fits_in_the_termination_grace_period():
    worker = find("Deployment", "lipsync-worker")
    period = pod_spec(worker)["terminationGracePeriodSeconds"]
    grace = float(config_data()["LIPSYNC_SHUTDOWN_GRACE_S"])
    assert period >= 300, "a long grace period lets a worker finish its job"
    assert grace + 30 <= period, "time to release the job after the grace runs out"
    (c,) = pod_spec(worker)["containers"]
    (port,) = c["ports"]
    assert port["containerPort"] == int(config_data()["LIPSYNC_WORKER_METRICS_PORT"])
    for _, probe in probes(c):
        assert probe["httpGet"]["port"] == port["name"]


def test_prometheus_annotations_point_at_declared_ports():
    for name in ("lipsync-api", "lipsync-worker", "lipsync-triton"):
        template = find("Deployment", name)["spec"]["template"]
        notes = template["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true"
        assert notes["prometheus.io/path"] == "/metrics"
        ports = {p["containerPort"] for c in template["spec"]["containers"] for p in c["ports"]}
        assert int(notes["prometheus.io/port"]) in ports, name


def test_service_monitors_select_services_with_the_named_ports():
    objects = overlay_objects(K8S / "monitoring")
    monitors = of_kind("ServiceMonitor", objects)
    assert {m["metadata"]["name"] for m in monitors} == {
        "lipsync-api",
        "lipsync-worker",
        "lipsync-triton",
    }
    for monitor in monitors:
        selector = monitor["spec"]["selector"]["matchLabels"]
        services = [
            s for s in of_kind("Service", objects) if matches(selector, s["metadata"]["labels"])
        ]
        assert len(services) == 1, monitor["metadata"]["name"]
        names = {p["name"] for p in services[0]["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in names


def test_references_to_secrets_configmaps_claims_and_accounts_resolve():
    secret_keys = set(EXAMPLE_SECRET["stringData"])
    for w in workloads(BASE):
        spec = pod_spec(w)
        assert spec["serviceAccountName"] == "lipsync"
        find("ServiceAccount", spec["serviceAccountName"])
        for c in containers(w):
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    find("ConfigMap", source["configMapRef"]["name"])
                if "secretRef" in source:
                    assert source["secretRef"]["name"] == EXAMPLE_SECRET["metadata"]["name"]
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secret_keys
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                find("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    # the API and the workers need the database
    for name in ("lipsync-api", "lipsync-worker"):
        (c,) = pod_spec(find("Deployment", name))["containers"]
        assert any(s.get("secretRef", {}).get("name") == "lipsync-secrets" for s in c["envFrom"])


def test_configmap_settings_are_ones_the_service_reads():
    """Every LIPSYNC_* key is a ServeSettings field (or LIPSYNC_HOME, the checkpoint cache), and
    every value parses: a misspelt setting would otherwise be ignored without a word."""
    from lipsync.serving.settings import ENV_PREFIX, ServeSettings

    data = config_data()
    for key in data:
        if key.startswith(ENV_PREFIX) and key != "LIPSYNC_HOME":
            field = key.removeprefix(ENV_PREFIX).lower()
            assert field in ServeSettings.model_fields, f"{key} is not a setting"
    settings = ServeSettings.from_env({**data, "DATABASE_URL": "postgresql://x@db/lipsync"})
    # API and worker metrics bind settings.host: probes and Prometheus come from outside the pod
    assert settings.host == "0.0.0.0"
    assert settings.port == 8000
    assert settings.storage_url.startswith("s3://"), "API and workers need shared storage"
    # LIPSYNC_TRITON_URL names the Triton Service and its gRPC port
    host, port = settings.triton_url.rsplit(":", 1)
    svc = find("Service", host)
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]}["grpc"] == int(port)


# ---------------------------------------------------------------------------------------------
# gpu-workers: one worker per GPU, no Triton
# ---------------------------------------------------------------------------------------------

GPU_WORKERS = K8S / "gpu-workers"
TRITON_OBJECTS = {
    (kind, "lipsync-triton")
    for kind in ("Deployment", "Service", "PodDisruptionBudget", "ScaledObject")
}


def test_gpu_workers_overlay_is_base_with_inline_patches_only():
    """Patches live inside kustomization.yaml: a partial object in its own file would fail the
    strict schema checks every manifest file goes through."""
    assert kustomization(GPU_WORKERS)["resources"] == ["../base"]
    assert [p.name for p in GPU_WORKERS.iterdir()] == ["kustomization.yaml"]


def test_gpu_workers_overlay_renders_one_gpu_worker_per_gpu_and_no_triton():
    from lipsync.serving.settings import ServeSettings

    rendered = _kubectl_kustomize("gpu-workers")
    for obj in rendered:
        if is_crd(obj):
            jsonschema.validate(obj, CRD_SCHEMAS[obj["kind"]])
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    names = {(o["kind"], o["metadata"]["name"]) for o in rendered}
    assert {(o["kind"], o["metadata"]["name"]) for o in BASE} - names == TRITON_OBJECTS
    # the workers run the model themselves, on their own GPU
    data = find("ConfigMap", "lipsync-config", rendered)["data"]
    settings = ServeSettings.from_env({**data, "DATABASE_URL": "postgresql://x@db/lipsync"})
    assert settings.runner == "engine" and settings.triton_url is None
    worker = find("Deployment", "lipsync-worker", rendered)
    spec = pod_spec(worker)
    (c,) = spec["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    gpu_users = [w["metadata"]["name"] for w in workloads(rendered) for k in containers(w)
                 if "nvidia.com/gpu" in k.get("resources", {}).get("limits", {})]  # fmt: skip
    assert gpu_users == ["lipsync-worker"]
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0  # no pod waits for a GPU
    # checkpoints: the volume the download Job fills, read-only, where LIPSYNC_HOME points
    mount = {m["mountPath"]: m for m in c["volumeMounts"]}[data["LIPSYNC_HOME"]]
    assert mount["readOnly"] is True
    volume = {v["name"]: v for v in spec["volumes"]}[mount["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == "lipsync-models"
    # the model loads before the probes answer: as long a start-up allowance as Triton's
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert float(data["LIPSYNC_SHUTDOWN_GRACE_S"]) + 30 <= spec["terminationGracePeriodSeconds"]
    # replicas: one pod per queued-or-running job, 0 when idle, at most one per GPU
    scaled = find("ScaledObject", "lipsync-worker", rendered)["spec"]
    assert scaled["scaleTargetRef"]["name"] == "lipsync-worker"
    assert scaled["minReplicaCount"] == 0 == worker["spec"]["replicas"]
    assert scaled["maxReplicaCount"] >= 1
    (trigger,) = scaled["triggers"]
    assert trigger["metadata"]["targetQueryValue"] == "1"


def test_keda_scales_existing_deployments_and_triton_scales_to_zero():
    deployments = {d["metadata"]["name"] for d in of_kind("Deployment")}
    auths = {a["metadata"]["name"]: a for a in of_kind("TriggerAuthentication")}
    queue = config_data()["LIPSYNC_QUEUE"]
    targets = []
    for scaled in of_kind("ScaledObject"):
        spec = scaled["spec"]
        assert spec["scaleTargetRef"]["name"] in deployments
        targets.append(spec["scaleTargetRef"]["name"])
        assert spec["minReplicaCount"] < spec["maxReplicaCount"]
        for trigger in spec["triggers"]:
            query = trigger["metadata"]["query"]
            assert re.search(r"\bFROM\s+procrastinate_jobs\b", query, re.I), query
            assert "'todo'" in query, "queue depth counts waiting jobs"
            assert f"queue_name = '{queue}'" in query, "count the queue the workers serve"
            assert float(trigger["metadata"]["targetQueryValue"]) > 0  # KEDA refuses 0
            auth = auths[trigger["authenticationRef"]["name"]]
            for ref in auth["spec"]["secretTargetRef"]:
                assert ref["name"] == "lipsync-secrets"
                assert ref["key"] in EXAMPLE_SECRET["stringData"]
    assert sorted(targets) == ["lipsync-triton", "lipsync-worker"]
    triton = find("ScaledObject", "lipsync-triton")["spec"]
    assert triton["minReplicaCount"] == 0
    assert triton["cooldownPeriod"] >= 300, "idle time before the GPU is released"
    assert find("Deployment", "lipsync-triton")["spec"]["replicas"] == 0
    assert find("ScaledObject", "lipsync-worker")["spec"]["minReplicaCount"] >= 1
    # one autoscaler per Deployment: HPA and KEDA fighting over replicas is a classic bug
    hpa_targets = [h["spec"]["scaleTargetRef"]["name"] for h in of_kind("HorizontalPodAutoscaler")]
    assert not set(hpa_targets) & set(targets)
    assert len(hpa_targets) == len(set(hpa_targets))


@pytest.mark.parametrize("name", OVERLAYS)
def test_pods_meet_the_restricted_pod_security_standard(name):
    """The namespace enforces `restricted`; pods that miss it would be refused at admission."""
    (namespace,) = of_kind("Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for w in workloads(overlay_objects(K8S / name)):
        spec = pod_spec(w)
        who = w["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, who
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", who
        assert spec["securityContext"].get("runAsUser", 1) != 0, who
        assert spec.get("automountServiceAccountToken") is False, who
        assert not spec.get("hostNetwork") and not spec.get("hostIPC"), who
        for volume in spec.get("volumes", []):
            assert "hostPath" not in volume, who
        for c in containers(w):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, who
            assert sc["capabilities"]["drop"] == ["ALL"], who
            assert not sc.get("privileged"), who


def test_pods_run_as_the_dockerfile_user():
    for w in workloads(BASE):
        assert pod_spec(w)["securityContext"]["runAsUser"] == DOCKERFILE_UID
        assert pod_spec(w)["securityContext"]["fsGroup"] == DOCKERFILE_UID
    for name in ("lipsync-api", "lipsync-worker"):
        (c,) = pod_spec(find("Deployment", name))["containers"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, "writable scratch"


# ---------------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, args = current.partition(" ")
        out.append((keyword.upper(), args.strip()))
        current = ""
    assert not current, "Dockerfile ends inside a continued line"
    return out


INSTRUCTIONS = dockerfile_instructions(DOCKERFILE.read_text())


def stages() -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(image, stage name, instructions) per FROM, with global ARG defaults substituted."""
    args: dict[str, str] = {}
    out: list[tuple[str, str, list[tuple[str, str]]]] = []
    for keyword, rest in INSTRUCTIONS:
        if keyword == "ARG" and not out:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            words = rest.split()
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m[1] or m[2]], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            out.append((image, name, []))
        else:
            assert out, f"{keyword} before the first FROM"
            out[-1][2].append((keyword, rest))
    return out


def test_dockerfile_parses_into_a_multi_stage_build():
    names = [name for _, name, _ in stages()]
    assert names == ["builder", "runtime"], names
    keywords = {k for k, _ in INSTRUCTIONS}
    known = {"FROM", "ARG", "ENV", "RUN", "COPY", "WORKDIR", "USER", "VOLUME", "EXPOSE"}
    assert keywords <= known | {"HEALTHCHECK", "ENTRYPOINT", "CMD"}, keywords


def test_dockerfile_base_images_are_pinned_cuda_images():
    for image, _, _ in stages():
        repo, sep, tag = image.rpartition(":")
        assert sep and "/" not in tag, f"{image} has no tag"
        assert tag != "latest"
        assert repo == "nvidia/cuda", image
        # e.g. 13.0.1-base-ubuntu22.04: full CUDA version, flavour, OS release
        assert re.fullmatch(r"\d+\.\d+\.\d+-(base|runtime|cudnn-runtime)-ubuntu2[24]\.04", tag)


def test_dockerfile_final_stage_is_non_root_with_exec_form_entrypoint_and_healthcheck():
    _, name, final = stages()[-1]
    assert name == "runtime"
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users, "the runtime stage must switch to a non-root USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    (useradd,) = [rest for k, rest in final if k == "RUN" and "useradd" in rest]
    # useradd ... --uid "${LIPSYNC_UID}" ... <user> (the user USER switches to, with that uid)
    assert re.search(r'useradd\b[^&]*--uid "\$\{LIPSYNC_UID\}"[^&]*\s' + user + r"\s", useradd)
    uid_args = [rest for k, rest in final if k == "ARG" and rest.startswith("LIPSYNC_UID=")]
    assert uid_args == [f"LIPSYNC_UID={DOCKERFILE_UID}"]

    (entrypoint,) = [rest for k, rest in final if k == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["lipsync"], "exec form, so signals reach lipsync"
    (cmd,) = [rest for k, rest in final if k == "CMD"]
    assert json.loads(cmd) == ["serve", "api"]

    (healthcheck,) = [rest for k, rest in final if k == "HEALTHCHECK"]
    options, _, command = healthcheck.partition("CMD ")
    assert "--interval=" in options and "--timeout=" in options
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"]
    compile(argv[2], "<healthcheck>", "exec")  # the one-liner is valid Python
    env = " ".join(rest for k, rest in final if k == "ENV")
    assert "LIPSYNC_HEALTHCHECK_URL=http://127.0.0.1:8000/healthz" in env
    assert "LIPSYNC_HOST=0.0.0.0" in env


def test_dockerfile_has_no_pipe_to_shell_and_cleans_apt():
    for keyword, rest in INSTRUCTIONS:
        if keyword == "RUN":
            assert not re.search(r"\b(curl|wget)\b[^|;&]*\|\s*(ba|z|da)?sh\b", rest), rest
            if "apt-get install" in rest:
                assert "--no-install-recommends" in rest
                assert "rm -rf /var/lib/apt/lists/*" in rest
            assert not re.search(r"(^|&&|;|\|)\s*sudo\b", rest), rest
        if keyword == "ADD":
            assert "://" not in rest, "ADD from a URL is unverified"


def test_dockerfile_installs_python311_and_the_serve_extra_with_the_tested_torch():
    runs = " ".join(rest for k, rest in INSTRUCTIONS if k == "RUN")
    assert "python3.11 -m venv /opt/venv" in runs
    assert 'pip install --prefer-binary ".[serve]"' in runs
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "serve" in extras["optional-dependencies"]
    assert "nvidia-pytriton" in " ".join(extras["optional-dependencies"]["serve"])
    (torch_arg,) = [rest for k, rest in INSTRUCTIONS if k == "ARG" and rest.startswith("TORCH_")]
    version = torch_arg.split("=", 1)[1]
    readme = (REPO / "README.md").read_text()
    assert f"torch=={version}" in readme, "the image's torch is the one the README installs"
    # the runtime stage has the shared libpython that PyTriton's Python backend loads
    _, _, final = stages()[-1]
    assert "libpython3.11" in " ".join(rest for k, rest in final if k == "RUN")
    copies = [rest for k, rest in final if k == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv"]


def test_dockerfile_ports_and_paths_match_the_manifests():
    (expose,) = [rest for k, rest in INSTRUCTIONS if k == "EXPOSE"]
    exposed = {int(p) for p in expose.split()}
    declared = {
        p["containerPort"]
        for name in ("lipsync-api", "lipsync-worker", "lipsync-triton")
        for c in containers(find("Deployment", name))
        for p in c["ports"]
    }
    assert declared == exposed
    env = " ".join(rest for k, rest in INSTRUCTIONS if k == "ENV")
    assert f"LIPSYNC_HOME={config_data()['LIPSYNC_HOME']}" in env


def test_dockerignore_admits_exactly_what_the_image_copies():
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "allow-list: everything excluded first"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    sources = set()
    for keyword, rest in INSTRUCTIONS:
        if keyword == "COPY" and not rest.startswith("--from"):
            sources.update(rest.split()[:-1])
    sources = {s.removeprefix("./").rstrip("/") for s in sources}
    assert sources == allowed, (sources, allowed)
    for source in sources:
        assert (REPO / source).exists(), source


# ---------------------------------------------------------------------------------------------
# docs
# ---------------------------------------------------------------------------------------------


def test_deploy_doc_names_only_paths_that_exist():
    text = (REPO / "docs" / "DEPLOY.md").read_text()
    # paths from the repository root (not tests/deploy/... inside a longer path)
    paths = set(re.findall(r"(?<![\w./-])(deploy/[\w./-]*\w)", text))
    assert {"deploy/Dockerfile", "deploy/k8s/base"} <= paths
    for path in paths:
        assert (REPO / path).exists(), f"docs/DEPLOY.md names missing {path}"
    assert "not built" in text.lower() or "never built" in text.lower()
