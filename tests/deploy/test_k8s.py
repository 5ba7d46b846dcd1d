"""k8s/: every overlay renders with kustomize (kubectl's), validates offline against the Kubernetes
schemas (kubernetes-validate --strict) and KEDA's ScaledObject schema, and agrees with the server it
deploys: probe paths answer on the real server, ConfigMap keys are real settings, drain timing."""

from __future__ import annotations

import json
import shutil
import subprocess

import httpx
import kubernetes_validate
import pytest

from blip_serve.shared.settings import Settings, load_settings
from support.k8s import one, render
from support.tools import require
from tools.servers import REPO

OVERLAYS = ["cpu", "gpu"]
KUBERNETES_VERSION = "1.32.0"  # the oldest version still supported upstream when this was written
KEDA = REPO / "tests" / "support" / "keda"


def container(objects: list[dict]) -> dict:
    return one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def settings_of(objects: list[dict]) -> dict[str, str]:
    return one(objects, "ConfigMap", "blip-serve-settings")["data"]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def test_kubernetes_objects_validate_strictly(rendered):
    _, objects = rendered
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "Ingress",
        "Ingress",
        "Ingress",
        "PodDisruptionBudget",
        "ScaledObject",
        "Service",
    ]
    for obj in objects:
        if obj["kind"] != "ScaledObject":
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_a_misspelt_field_fails_strict_validation(rendered):
    """The validation above can fail: an unknown field in the pod spec is refused."""
    _, objects = rendered
    deployment = json.loads(json.dumps(one(objects, "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {"path": "/readyz"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def validate_scaled_objects(documents: list[dict]) -> subprocess.CompletedProcess:
    node = shutil.which("node")
    require(bool(node) and (KEDA / "node_modules").is_dir(), "node and `npm ci --prefix tests/support/keda`")
    lines = "".join(json.dumps(d) + "\n" for d in documents)
    return subprocess.run([node, str(KEDA / "validate.mjs")], input=lines, capture_output=True, text=True)


def test_scaled_object_validates_against_kedas_schema(rendered):
    _, objects = rendered
    scaled = one(objects, "ScaledObject")
    broken = json.loads(json.dumps(scaled))
    broken["spec"]["minReplicaCount"] = "one"
    result = validate_scaled_objects([scaled, broken])
    assert result.stdout.splitlines()[0] == "ok"
    assert "minReplicaCount must be integer" in result.stdout.splitlines()[1]


def test_probes_and_ports_exist_on_the_real_server(rendered, server):
    """`server`: the real `bentoml serve` (tiny model). The image serves on BentoML's port 3000."""
    _, objects = rendered
    spec = container(objects)
    assert spec["ports"] == [{"name": "http", "containerPort": 3000}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = spec[probe]["httpGet"]
        assert get["port"] == "http"
        assert httpx.get(f"{server.url}{get['path']}", timeout=10).status_code == 200, probe
    assert spec["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert spec["livenessProbe"]["httpGet"]["path"] == "/livez"
    service = one(objects, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for selector in (
        service["spec"]["selector"],
        one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= pod_labels.items()
    # Each route with nginx/nginx.conf's body limit for it.
    body_limits = {"/caption": "10m", "/captions": "64m", "/v1/chat/completions": "15m", "/v1/models": "15m"}
    routed = {}
    for ingress in (o for o in objects if o["kind"] == "Ingress"):
        for path in ingress["spec"]["rules"][0]["http"]["paths"]:
            assert path["backend"]["service"] == {"name": service["metadata"]["name"], "port": {"name": "http"}}
            routed[path["path"]] = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert routed == body_limits


def test_configmap_keys_are_real_settings_and_valid(rendered):
    _, objects = rendered
    data = settings_of(objects)
    for key in data:
        assert key.startswith("BLIP_") and key[5:].lower() in Settings.model_fields, key
    load_settings(data)  # raises BadSetting on a value the server would refuse at start


def test_drain_timing_is_consistent(rendered):
    """The kubelet waits terminationGracePeriodSeconds after the preStop pause starts; a request
    accepted just before SIGTERM may run BLIP_REQUEST_TIMEOUT_S."""
    _, objects = rendered
    settings = load_settings(settings_of(objects))
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    pause = int(pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pause + settings.request_timeout_s
    security = pod["containers"][0]["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_autoscaling_threshold_follows_the_batch_size(rendered):
    _, objects = rendered
    settings = load_settings(settings_of(objects))
    scaled = one(objects, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == one(objects, "Deployment")["metadata"]["name"]
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus"
    assert int(trigger["metadata"]["threshold"]) == 2 * settings.max_batch_size
    startup = container(objects)["startupProbe"]
    longest_load = startup["periodSeconds"] * startup["failureThreshold"]
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] > longest_load


def test_gpu_overlay_asks_for_a_gpu_node():
    objects = render("gpu")
    spec = container(objects)
    assert spec["resources"]["limits"]["nvidia.com/gpu"] == 1
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"]
    assert settings_of(objects)["BLIP_PRECISION"] == "fp16"
    assert "nvidia.com/gpu" not in container(render("cpu"))["resources"].get("limits", {})
    # torch's CUDA build is in the GPU image only (bentofile.gpu.yaml installs requirements-gpu.txt)
    assert spec["image"] == "blip-serve-gpu:latest" and container(render("cpu"))["image"] == "blip-serve:latest"


def test_with_a_read_only_root_bentoml_home_is_on_a_volume(rendered):
    """BentoML creates folders in its home at start: a read-only root needs it on a writable mount
    (checked with the real image under podman --read-only; README, Kubernetes)."""
    _, objects = rendered
    spec = container(objects)
    assert spec["securityContext"]["readOnlyRootFilesystem"] is True
    home = {e["name"]: e.get("value") for e in spec["env"]}["BENTOML_HOME"]
    assert any(home.startswith(mount["mountPath"] + "/") for mount in spec["volumeMounts"]), home
