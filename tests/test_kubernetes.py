"""deploy/kubernetes, checked offline: overlays rendered, objects validated, settings and entrypoint real.

The kustomizations are rendered by `render` below (the subset of kustomize they use: resources,
strategic-merge patches from files or inline with `$patch: delete` and null deletions, `labels`);
where `kubectl` (with its built-in kustomize) or `kustomize` is on PATH, the rendering is also
compared with the real one. Every object is validated with kubernetes-validate against the
Kubernetes release the manifests target; the custom resources it has no schema for
(ServiceMonitor, InferenceService) get their required structure checked here.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .conftest import REPO_ROOT

kubernetes_validate = pytest.importorskip("kubernetes_validate")

DEPLOY = REPO_ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.32.0"  # the release the manifests target (base/kustomization.yaml says so)
OVERLAYS = {"cpu": DEPLOY / "overlays" / "cpu", "gpu": DEPLOY / "overlays" / "gpu", "kserve": DEPLOY / "kserve",
            "front-proxy": DEPLOY / "overlays" / "front-proxy"}
CUSTOM_RESOURCES = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("serving.kserve.io/v1beta1", "InferenceService")}
# Strategic-merge keys of the lists the patches touch (Kubernetes' patchMergeKey for each field; `ports` is a
# container's, keyed by containerPort, or a Service's, keyed by port).
MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "env": "name",
              "volumeMounts": "mountPath", "ports": ("containerPort", "port"), "envFrom": None, "tolerations": None}


# --- rendering --------------------------------------------------------------------------------------

def _merge(base, patch):
    if not (isinstance(base, dict) and isinstance(patch, dict)):
        return copy.deepcopy(patch)
    merged = copy.deepcopy(base)
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        if value is None:
            merged.pop(key, None)
        elif key in merged and isinstance(value, list) and MERGE_KEYS.get(key):
            merged[key] = _merge_list(merged[key], value, MERGE_KEYS[key])
        elif key in merged:
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = _merge({}, value) if isinstance(value, dict) else copy.deepcopy(value)
    return merged


def _merge_list(base: list, patch: list, keys) -> list:
    merged = copy.deepcopy(base)
    for item in patch:
        key = next((k for k in (keys if isinstance(keys, tuple) else (keys,)) if k in item), None)
        assert key is not None, f"a patch item without its merge key {keys}: {item}"
        index = next((i for i, old in enumerate(merged) if old.get(key) == item.get(key)), None)
        if item.get("$patch") == "delete":
            if index is not None:
                merged.pop(index)
        elif index is None:
            merged.append(_merge({}, item))
        else:
            merged[index] = _merge(merged[index], item)
    return merged


def _identity(document: dict) -> tuple[str, str]:
    return document["kind"], document["metadata"]["name"]


def render(directory: Path) -> list[dict]:
    """The objects of a kustomization directory, as `kustomize build` makes them."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objects: list[dict] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        objects += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in kustomization.get("patches", []):
        text = (directory / patch["path"]).read_text() if "path" in patch else patch["patch"]
        for document in filter(None, yaml.safe_load_all(text)):
            matches = [i for i, o in enumerate(objects) if _identity(o) == _identity(document)]
            assert len(matches) == 1, f"{directory}: patch target {_identity(document)} matches {len(matches)}"
            if document.get("$patch") == "delete":
                objects.pop(matches[0])
            else:
                objects[matches[0]] = _merge(objects[matches[0]], document)
    for labels in kustomization.get("labels", []):
        for document in objects:
            document.setdefault("metadata", {}).setdefault("labels", {}).update(labels["pairs"])
            template = document.get("spec", {}).get("template")
            if labels.get("includeTemplates") and template is not None:
                template.setdefault("metadata", {}).setdefault("labels", {}).update(labels["pairs"])
    return objects


def _canonical(value):
    """Lists of objects in a fixed order: strategic merge leaves merged items in its own order."""
    if isinstance(value, dict):
        return {key: _canonical(item) for key, item in value.items()}
    if isinstance(value, list):
        items = [_canonical(item) for item in value]
        if items and all(isinstance(item, dict) for item in items):
            items.sort(key=lambda item: json.dumps(item, sort_keys=True))
        return items
    return value


def _by_identity(objects: list[dict]) -> dict:
    return {_identity(o): _canonical(o) for o in objects}


def _find(objects: list[dict], kind: str, name: str) -> dict:
    return next(o for o in objects if _identity(o) == (kind, name))


def _container(deployment: dict, name: str, init: bool = False) -> dict:
    spec = deployment["spec"]["template"]["spec"]
    return next(c for c in spec["initContainers" if init else "containers"] if c["name"] == name)


RENDERED = {name: render(path) for name, path in OVERLAYS.items()}
RENDERED["base"] = render(DEPLOY / "base")


def _kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


# --- rendering and schemas -------------------------------------------------------------------------

@pytest.mark.parametrize("version", [KUBERNETES_VERSION, kubernetes_validate.latest_version()])
@pytest.mark.parametrize("overlay", sorted(RENDERED))
def test_overlays_render_and_every_object_passes_its_schema(overlay, version):
    """Against the targeted release, and the newest kubernetes-validate knows (no API the manifests use is gone)."""
    objects = RENDERED[overlay]
    assert len({_identity(o) for o in objects}) == len(objects), "two objects with one kind and name"
    for document in objects:
        if (document["apiVersion"], document["kind"]) in CUSTOM_RESOURCES:
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(document, version, strict=True)
            continue
        kubernetes_validate.validate(document, version, strict=True)  # raises ValidationError


def test_every_manifest_file_is_used_by_a_kustomization():
    used = set()
    for kustomization in DEPLOY.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        used.add(kustomization.resolve())
        used |= {(kustomization.parent / r).resolve() for r in spec.get("resources", [])}
        used |= {(kustomization.parent / p["path"]).resolve() for p in spec.get("patches", []) if "path" in p}
    files = {path.resolve() for path in DEPLOY.rglob("*.yaml")}
    assert files - used == set(), "manifests no kustomization renders"


def test_the_validator_does_reject_a_bad_manifest():
    deployment = copy.deepcopy(_find(RENDERED["cpu"], "Deployment", "early-exit-gateway"))
    deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["requets"] = {"cpu": "1"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


@pytest.mark.skipif(_kustomize_command() is None, reason="no kustomize or kubectl on PATH")
@pytest.mark.parametrize("overlay", sorted(RENDERED))
def test_the_python_rendering_is_what_kustomize_renders(overlay):
    directory = DEPLOY / "base" if overlay == "base" else OVERLAYS[overlay]
    result = subprocess.run([*_kustomize_command(), str(directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert _by_identity(list(filter(None, yaml.safe_load_all(result.stdout)))) == _by_identity(RENDERED[overlay])


@pytest.mark.parametrize("overlay", sorted(RENDERED))
def test_custom_resources_have_their_required_structure(overlay):
    objects = RENDERED[overlay]
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    for monitor in (o for o in objects if o["kind"] == "ServiceMonitor"):
        assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"} and monitor["metadata"]["name"]
        selector = monitor["spec"]["selector"]["matchLabels"]
        selected = [s for s in services.values() if selector.items() <= s["metadata"].get("labels", {}).items()]
        assert len(selected) == 1, f"{monitor['metadata']['name']} selects {len(selected)} services"
        port_names = {p["name"] for p in selected[0]["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
    for service in (o for o in objects if o["kind"] == "InferenceService"):
        assert set(service) == {"apiVersion", "kind", "metadata", "spec"}
        model = service["spec"]["predictor"]["model"]
        assert model["modelFormat"]["name"] == "triton" and model["protocolVersion"] == "v2"
        assert model["storageUri"].startswith("pvc://early-exit-model-repository/")
        assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
        # The gateway is pointed at the predictor's Service, over HTTP (raw mode: <name>-predictor, port 80).
        config = _find(objects, "ConfigMap", "early-exit-gateway")["data"]
        assert config["EE_TRITON_URL"] == f"{service['metadata']['name']}-predictor:80"
        assert config["EE_TRITON_PROTOCOL"] == "http"
    if overlay == "kserve":
        assert not [o for o in objects if o["metadata"]["name"] == "early-exit-triton"]


# --- wiring between the objects --------------------------------------------------------------------

@pytest.mark.parametrize("overlay", sorted(RENDERED))
def test_services_budgets_and_autoscaler_point_at_real_pods_and_ports(overlay):
    objects = RENDERED[overlay]
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    claims = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    configmaps = {o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"}

    def selected(selector):
        return [d for d in deployments.values()
                if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]

    for deployment in deployments.values():
        assert deployment["spec"]["selector"]["matchLabels"].items() <= \
            deployment["spec"]["template"]["metadata"]["labels"].items()
        pod = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"] + pod.get("initContainers", []):
            ports = {p["name"] for p in container.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in container:
                    assert container[probe]["httpGet"]["port"] in ports
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in configmaps
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
    for service in (o for o in objects if o["kind"] == "Service"):
        (target,) = selected(service["spec"]["selector"])
        container_ports = {p["name"] for c in target["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    for budget in (o for o in objects if o["kind"] == "PodDisruptionBudget"):
        assert len(selected(budget["spec"]["selector"]["matchLabels"])) == 1
    autoscaler = _find(objects, "HorizontalPodAutoscaler", "early-exit-gateway")
    assert autoscaler["spec"]["scaleTargetRef"]["name"] in deployments
    assert "replicas" not in deployments["early-exit-gateway"]["spec"], "the HPA owns the gateway's replicas"


def test_gateway_pod_is_non_root_read_only_with_requests_and_the_images_user():
    deployment = _find(RENDERED["base"], "Deployment", "early-exit-gateway")
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment, "gateway")
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert f"USER {pod['securityContext']['runAsUser']}" in dockerfile
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "command" not in container and "args" not in container, "the image's ENTRYPOINT runs"
    assert {"readinessProbe", "livenessProbe"} <= set(container)


def test_queue_depth_autoscaling_uses_the_gateways_real_metric_and_the_adapter_rule():
    from serving.metrics import GatewayMetrics

    metrics = GatewayMetrics()
    metric_name = metrics.queue_depth._name
    metrics.model("a").read_queue_depth(lambda: 1)
    metrics.model("b").read_queue_depth(lambda: 2)
    page = "\n" + metrics.render().decode()  # a gauge, exposed under its own name, one series per model
    assert f'\n{metric_name}{{model="a"}} 1.0' in page and f'\n{metric_name}{{model="b"}} 2.0' in page
    objects = RENDERED["base"]
    (rule,) = yaml.safe_load(_find(objects, "ConfigMap", "early-exit-prometheus-adapter-rules")["data"]
                             ["config.yaml"])["rules"]
    assert rule["seriesQuery"].startswith(f"{metric_name}{{")
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert "<<.LabelMatchers>>" in rule["metricsQuery"]
    assert rule["metricsQuery"].startswith("sum(") and "by (<<.GroupBy>>)" in rule["metricsQuery"]  # the models
    autoscaler = _find(objects, "HorizontalPodAutoscaler", "early-exit-gateway")
    kinds = {m["type"]: m for m in autoscaler["spec"]["metrics"]}
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    assert kinds["Pods"]["pods"]["metric"]["name"] == rule["name"]["as"]
    assert autoscaler["spec"]["minReplicas"] >= 2


def test_gpu_overlay_puts_triton_and_the_plan_build_on_one_gpu():
    triton = _find(RENDERED["gpu"], "Deployment", "early-exit-triton")
    server, builder = _container(triton, "triton"), _container(triton, "build-plans", init=True)
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1 == builder["resources"]["limits"]["nvidia.com/gpu"]
    volumes = {v["name"]: v for v in triton["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["models"] and "persistentVolumeClaim" not in volumes["models"]
    # The gateway still reads the calibrated manifest from the shared repository volume.
    gateway = _find(RENDERED["gpu"], "Deployment", "early-exit-gateway")
    gateway_volumes = {v["name"]: v for v in gateway["spec"]["template"]["spec"]["volumes"]}
    assert gateway_volumes["models"]["persistentVolumeClaim"]["claimName"] == "early-exit-model-repository"
    assert "nvidia.com/gpu" not in json.dumps(_find(RENDERED["cpu"], "Deployment", "early-exit-triton"))


def test_gpu_overlays_plan_build_writes_tensorrt_configs_with_gpu_instance_groups(tiny_checkpoint, imagefolder,
                                                                                   tiny_repository, tmp_path,
                                                                                   monkeypatch):
    """The init container's exact to_trt.py arguments (paths swapped for this test's), run with a stand-in
    engine builder: the repository Triton then loads has a plan per model and KIND_GPU instance groups,
    under the names and tensors of the ONNX repository's manifest, which the gateway reads."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    import export.to_trt as to_trt
    from common.manifest import read_manifest

    builder = _container(_find(RENDERED["gpu"], "Deployment", "early-exit-triton"), "build-plans", init=True)
    assert builder["command"][:2] == ["python", "export/to_trt.py"]
    paths = {"--checkpoint": str(tiny_checkpoint), "--data": str(imagefolder), "--output": str(tmp_path / "plans"),
             "--timing-cache": str(tmp_path / "cache")}
    argv = []
    for argument in builder["command"][2:]:
        flag, _, value = argument.partition("=")
        argv.append(f"{flag}={paths.get(flag, value)}" if value else flag)
    argv += ["--validation-images", "20"]

    class StandInBuilder:
        def __init__(self, settings):
            self.settings = settings

        def __call__(self, onnx_bytes, spec, name):
            return b"plan " + name.encode()

    monkeypatch.setattr(to_trt, "TensorRTPlanBuilder", StandInBuilder)
    assert to_trt.main(argv) == 0
    instances = int(dict(a.partition("=")[::2] for a in argv)["--instances"])
    manifest = read_manifest(tmp_path / "plans")
    assert manifest.backend == "tensorrt"
    for entry in manifest.exits:
        for deployed in (entry.exit_model, entry.segment_model):
            directory = tmp_path / "plans" / deployed.name
            config = text_format.Parse((directory / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
            assert config.platform == "tensorrt_plan" and config.max_batch_size == 64
            assert [(g.kind, g.count) for g in config.instance_group] == \
                [(model_config_pb2.ModelInstanceGroup.KIND_GPU, instances)]
            assert (directory / "1" / "model.plan").read_bytes() == b"plan " + deployed.name.encode()
    # The gateway's manifest (the shared repository, here the ONNX export of the same checkpoint) names
    # the very models, with the very tensors, that Triton serves from the plans.
    gateways = read_manifest(tiny_repository)

    def served(m):
        return [(e.depth, e.exit_model, e.segment_model) for e in m.exits]

    assert served(gateways) == served(manifest)


@pytest.mark.skipif(shutil.which("hadolint") is None and not (REPO_ROOT / ".venv/bin/hadolint").exists(),
                    reason="hadolint not installed")
def test_the_plan_build_image_passes_hadolint():
    binary = shutil.which("hadolint") or str(REPO_ROOT / ".venv/bin/hadolint")
    dockerfile = DEPLOY / "overlays" / "gpu" / "export.Dockerfile"
    result = subprocess.run([binary, str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    builder = _container(_find(RENDERED["gpu"], "Deployment", "early-exit-triton"), "build-plans", init=True)
    assert builder["image"].split(":")[1] in dockerfile.read_text()  # the tag names the TensorRT release it pins


# --- the gateway's settings --------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", sorted(RENDERED))
def test_every_configmap_key_is_a_setting_the_gateway_accepts(overlay, monkeypatch):
    from serving.settings import Settings, env_name, load_settings

    data = _find(RENDERED[overlay], "ConfigMap", "early-exit-gateway")["data"]
    accepted = {env_name(field) for field in Settings.model_fields}
    assert set(data) <= accepted, f"not gateway settings: {sorted(set(data) - accepted)}"
    for name in accepted:
        monkeypatch.delenv(name, raising=False)
    for name, value in data.items():
        monkeypatch.setenv(name, value)
    settings = load_settings([])  # validates every value as the gateway does at start-up
    assert settings.backend == data["EE_BACKEND"] and settings.http_port == int(data["EE_HTTP_PORT"])


def _triton_successes(triton) -> float:
    """Requests Triton answered, all models together (its Prometheus counter)."""
    import httpx

    page = httpx.get(f"http://127.0.0.1:{triton.metrics_port}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in page.splitlines()
               if line.startswith("nv_inference_request_success{"))


@pytest.fixture(scope="module")
def triton(tiny_repository, triton_venv, tmp_path_factory):
    from benchmarks.triton_launcher import TritonServer

    with TritonServer(tiny_repository, triton_venv, log_path=tmp_path_factory.mktemp("t") / "triton.log") as server:
        yield server


@pytest.mark.parametrize("overlay", ["cpu", "kserve"])  # Triton over gRPC; the KServe predictor over HTTP
def test_the_images_entrypoint_with_the_configmaps_environment_serves_through_triton(overlay, tiny_repository,
                                                                                      triton, tmp_path):
    """The Dockerfile's ENTRYPOINT with the ConfigMap's environment (outside a container, as the Dockerfile
    test does), its Triton address, repository and ports swapped for a real local tritonserver's."""
    import httpx
    import numpy as np
    import tritonclient.http as httpclient

    from benchmarks.triton_launcher import free_ports

    from .test_deployment import _dockerfile

    image_env, entrypoint = _dockerfile()
    deployment = _find(RENDERED[overlay], "Deployment", "early-exit-gateway")
    gateway = _container(deployment, "gateway")
    data = dict(_find(RENDERED[overlay], "ConfigMap", "early-exit-gateway")["data"])
    http_port, grpc_port = free_ports(2)
    data.update(EE_TRITON_URL=triton.grpc_url if data["EE_TRITON_PROTOCOL"] == "grpc" else triton.http_url,
                EE_MODEL_REPOSITORY=str(tiny_repository), EE_HOST="127.0.0.1",
                EE_HTTP_PORT=str(http_port), EE_GRPC_PORT=str(grpc_port))
    env = {**os.environ, **image_env, **data}  # envFrom overrides the image's ENV
    log = open(tmp_path / "gateway.log", "wb")
    process = subprocess.Popen([sys.executable, *entrypoint[1:]], cwd=REPO_ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        ready = False
        while not ready and time.monotonic() < deadline and process.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{http_port}/v2/health/ready").status_code == 200
            except httpx.HTTPError:
                pass
            if not ready:
                time.sleep(0.1)  # polling the health endpoint, not waiting blindly
        assert ready, (tmp_path / "gateway.log").read_text()
        served_before = _triton_successes(triton)
        # Every probe of the Deployment answers 200 on the port it names.
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert httpx.get(f"http://127.0.0.1:{http_port}{gateway[probe]['httpGet']['path']}").status_code == 200
        client = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
        images = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
        tensor = httpclient.InferInput("images", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        result = client.infer("mwresnet8_3", [tensor])
        assert result.as_numpy("logits").shape == (3, 3) and len(result.as_numpy("exit_depth")) == 3
        assert _triton_successes(triton) > served_before, "the answer did not come through Triton"
        page = httpx.get(f"http://127.0.0.1:{http_port}/metrics").text  # what the ServiceMonitor scrapes
        assert '\ngateway_queue_depth{model="mwresnet8_3"} ' in page
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0
        log.close()


# --- the front-proxy overlay ----------------------------------------------------------------------------

def test_the_front_proxy_overlay_puts_nginx_with_the_repositorys_template_in_front_of_the_gateway():
    """The ConfigMap carries deploy/nginx's template unchanged, the sidecar sets each of its placeholders
    and points nginx at the gateway on the pod's loopback, and the Service's ports go to nginx."""
    from benchmarks.front_proxy import PLACEHOLDER, TEMPLATE, render

    objects = RENDERED["front-proxy"]
    template = _find(objects, "ConfigMap", "early-exit-nginx-template")["data"]["default.conf.template"]
    assert template == TEMPLATE.read_text()
    deployment = _find(objects, "Deployment", "early-exit-gateway")
    proxy, gateway = _container(deployment, "front-proxy"), _container(deployment, "gateway")
    env = {item["name"]: item["value"] for item in proxy["env"]}
    assert set(PLACEHOLDER.findall(template)) == set(env)
    gateway_ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert env["EE_GATEWAY_HTTP"] == f"127.0.0.1:{gateway_ports['http']}"
    assert env["EE_GATEWAY_GRPC"] == f"127.0.0.1:{gateway_ports['grpc']}"
    proxy_ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    assert proxy_ports == {"proxy-http": int(env["EE_PROXY_HTTP_PORT"]), "proxy-grpc": int(env["EE_PROXY_GRPC_PORT"])}
    rendered = render(template, env)
    assert f"limit_conn ee_in_flight {env['EE_PROXY_MAX_IN_FLIGHT']};" in rendered
    service = _find(objects, "Service", "early-exit-gateway")
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {"http": "proxy-http",
                                                                              "grpc": "proxy-grpc"}
    mounts = {m["mountPath"] for m in proxy["volumeMounts"]}
    assert {"/etc/nginx/templates", "/etc/nginx/conf.d", "/tmp"} <= mounts  # read-only root: what nginx writes
    assert proxy["securityContext"]["readOnlyRootFilesystem"] is True
