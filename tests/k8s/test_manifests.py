"""Kubernetes manifests, checked statically: no cluster here (see README).

Every overlay (and the store-permissions Job) builds with ``kubectl kustomize``; every
core object passes two Kubernetes versions' OpenAPI schemas strictly (unknown fields
are errors); every pod template passes Pod Security "restricted"; the InferenceServices
survive a round trip through the KServe SDK's v1beta1 models (tests/k8s/kserve_roundtrip.py).
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from helpers import REPO_ROOT
from kiln import images as kiln_images

K8S = REPO_ROOT / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
BUILDS = [f"overlays/{o}" for o in OVERLAYS] + ["jobs/store-permissions"]
K8S_VERSIONS = ("1.30.0", "1.34.0")
KSERVE_VENV = REPO_ROOT / "build" / "kserve-venv"
# Pod Security Standards, "restricted" profile (kubernetes.io/docs/concepts/security/pod-security-standards)
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


@functools.cache
def build(path: str) -> tuple[dict, ...]:
    # Debian's kubernetes-client (1.20) cannot build these; kubectl >= 1.27 ships with the
    # machine image. A missing kubectl is a broken environment: fail, never skip.
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl is not on PATH: tests/k8s need kubectl >= 1.27 (kustomize v5)")
    out = subprocess.run(["kubectl", "kustomize", str(K8S / path)], capture_output=True, text=True)
    if out.returncode:
        pytest.fail(f"kubectl kustomize {path} failed: {out.stderr.strip()}")
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def find(path: str, kind: str, name: str | None = None) -> list[dict]:
    return [d for d in build(path) if d["kind"] == kind and name in (None, d["metadata"]["name"])]


def pod_specs(doc: dict) -> list[tuple[dict, list[dict]]]:
    """(pod-level spec, its containers) of every pod a document makes."""
    if doc["kind"] in ("Deployment", "Job"):
        spec = doc["spec"]["template"]["spec"]
        return [(spec, spec["containers"] + spec.get("initContainers", []))]
    if doc["kind"] == "InferenceService":
        predictor = doc["spec"]["predictor"]
        containers = list(predictor.get("containers", [])) + ([predictor["model"]] if "model" in predictor else [])
        return [(predictor, containers)]
    return []


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", BUILDS)
def test_builds_and_core_objects_validate_strictly(path: str, version: str) -> None:
    docs = build(path)
    assert docs
    for doc in docs:
        if doc["apiVersion"].startswith("serving.kserve.io"):
            continue  # a CRD: checked by test_inference_services_match_the_kserve_v1beta1_api
        kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_rejects_a_misspelt_field() -> None:
    deployment = json.loads(json.dumps(find("overlays/cpu", "Deployment")[0]))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def test_one_namespace_everywhere_the_kfp_profile_namespace() -> None:
    expected = yaml.safe_load((K8S / "base" / "store" / "kustomization.yaml").read_text())["namespace"]
    assert expected.startswith("kubeflow-user-")
    for path in BUILDS:
        for doc in build(path):
            assert doc["metadata"].get("namespace") == expected, (path, doc["kind"], doc["metadata"]["name"])


def test_images_are_the_ones_in_images_toml() -> None:
    refs = {key: image.ref for key, image in kiln_images.images().items()}
    expected = {"overlays/cpu": refs["serve"], "overlays/cpu-rwo": refs["serve"], "overlays/gpu": refs["serve-cuda"],
                "overlays/kserve": refs["serve"], "jobs/store-permissions": refs["serve"]}
    assert set(expected) == set(BUILDS)
    for path in BUILDS:
        used = {c["image"] for doc in build(path) for _, cs in pod_specs(doc) for c in cs if "image" in c}
        assert used == {expected[path]}, path


@pytest.mark.parametrize("path", BUILDS)
def test_every_pod_template_passes_pod_security_restricted(path: str) -> None:
    pods = [p for doc in build(path) for p in pod_specs(doc)]
    assert pods
    for spec, containers in pods:
        assert not (spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"))
        for volume in spec.get("volumes", []):
            assert set(volume) - {"name"} <= RESTRICTED_VOLUMES, volume
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsUser", 1) != 0
        for c in containers:
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, c.get("name")
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            assert seccomp.get("type") in ("RuntimeDefault", "Localhost"), c.get("name")
            assert sc.get("allowPrivilegeEscalation") is False and not sc.get("privileged")
            assert "ALL" in sc.get("capabilities", {}).get("drop", [])
            assert set(sc.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}
            assert not any("hostPort" in p for p in c.get("ports", []))


def server_container(path: str) -> tuple[dict, dict, dict]:
    deployment = find(path, "Deployment", "kiln-serve")[0]
    spec = deployment["spec"]["template"]["spec"]
    return deployment, spec, spec["containers"][0]


@pytest.mark.parametrize("overlay", ["cpu", "cpu-rwo", "gpu"])
def test_server_is_hardened_probed_and_drains_within_its_grace_period(overlay: str) -> None:
    path = f"overlays/{overlay}"
    deployment, spec, c = server_container(path)
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["automountServiceAccountToken"] is False
    assert find(path, "ServiceAccount", spec["serviceAccountName"])
    for probe, endpoint in (("startupProbe", "ready"), ("readinessProbe", "ready"), ("livenessProbe", "live")):
        assert c[probe]["httpGet"]["path"] == f"/v2/health/{endpoint}"
    config = find(path, "ConfigMap", c["envFrom"][0]["configMapRef"]["name"])[0]["data"]
    assert config["KILN_MODEL_STORE"] == next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "model-store")
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    needed = float(pre_stop[1]) + float(config["KILN_DRAIN_DELAY_S"]) + float(config["KILN_GRACEFUL_TIMEOUT_S"])
    assert needed < spec["terminationGracePeriodSeconds"] <= needed + 15
    pvc = spec["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert find(path, "PersistentVolumeClaim", pvc)
    # Every selector picks the server's pods.
    labels = spec and deployment["spec"]["template"]["metadata"]["labels"]
    selectors = [deployment["spec"]["selector"]["matchLabels"]]
    selectors += [d["spec"]["selector"] for d in find(path, "Service")]
    selectors += [d["spec"]["selector"]["matchLabels"] for d in find(path, "PodDisruptionBudget")]
    selectors += [d["spec"]["podSelector"]["matchLabels"] for d in find(path, "NetworkPolicy")]
    assert all(s and s.items() <= labels.items() for s in selectors)
    ports = {p["port"] for d in find(path, "NetworkPolicy") for rule in d["spec"]["ingress"] for p in rule["ports"]}
    assert {p["containerPort"] for p in c["ports"]} <= ports
    # KServe V2 gRPC: the server's default --grpc-port, named, exposed by the Service, opened
    # by the NetworkPolicy; the probes stay on HTTP.
    container_ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert container_ports == {"http": 8080, "grpc": 8081} and 8081 in ports
    service_ports = {p["name"]: p for d in find(path, "Service") for p in d["spec"]["ports"]}
    assert service_ports["grpc"]["targetPort"] == "grpc" and service_ports["grpc"]["appProtocol"] == "grpc"
    assert all(c[probe]["httpGet"]["port"] == "http" for probe in ("startupProbe", "readinessProbe", "livenessProbe"))


def test_rwx_by_default_rwo_pins_one_replica_without_hpa_or_pdb() -> None:
    for overlay in ("cpu", "gpu", "kserve"):
        assert find(f"overlays/{overlay}", "PersistentVolumeClaim")[0]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert find("overlays/cpu", "HorizontalPodAutoscaler") and find("overlays/cpu", "PodDisruptionBudget")
    rwo = "overlays/cpu-rwo"
    assert find(rwo, "PersistentVolumeClaim")[0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    deployment = find(rwo, "Deployment")[0]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert not find(rwo, "HorizontalPodAutoscaler") and not find(rwo, "PodDisruptionBudget")


def test_hpa_scales_the_server() -> None:
    hpa = find("overlays/cpu", "HorizontalPodAutoscaler")[0]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "kiln-serve"}
    assert 1 <= hpa["minReplicas"] < hpa["maxReplicas"]
    _, _, c = server_container("overlays/cpu")
    assert "cpu" in c["resources"]["requests"]  # utilisation is relative to the request


def test_gpu_overlay_runs_the_cuda_image_on_gpu_nodes() -> None:
    _, spec, c = server_container("overlays/gpu")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert {"name": "KILN_DEVICE", "value": "cuda"} in c["env"]
    assert c["image"] == kiln_images.image_ref("serve-cuda")


def test_store_permissions_job_gives_the_store_to_the_images_user() -> None:
    data = kiln_images.load()
    job = find("jobs/store-permissions", "Job")[0]["spec"]["template"]["spec"]
    assert job["securityContext"]["runAsUser"] == data["uid"] and job["securityContext"]["fsGroup"] == data["gid"]
    assert job["volumes"][0]["persistentVolumeClaim"]["claimName"] == "kiln-model-store"
    assert "chmod 2775 /mnt/models" in job["containers"][0]["command"][-1]


def test_kserve_predictors_share_the_store_and_probe_the_model() -> None:
    custom = find("overlays/kserve", "InferenceService", "kiln-mnist")[0]["spec"]["predictor"]
    onnx = find("overlays/kserve", "InferenceService", "kiln-mnist-onnx")[0]["spec"]["predictor"]["model"]
    pvc = find("overlays/kserve", "PersistentVolumeClaim")[0]["metadata"]["name"]
    container = custom["containers"][0]
    assert container["name"] == "kserve-container"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["STORAGE_URI"] == onnx["storageUri"] == f"pvc://{pvc}/"
    args = container["command"]
    model = args[args.index("--model") + 1]
    assert args[args.index("--store") + 1] == "/mnt/models"  # where KServe mounts storageUri
    assert container["readinessProbe"]["httpGet"]["path"] == f"/v2/models/{model}/ready"
    assert onnx["modelFormat"] == {"name": "onnx"} and onnx["protocolVersion"] == "v2"
    assert "--model-control-mode=poll" in onnx["args"]


@pytest.fixture(scope="module")
def kserve_python() -> Path:
    """The KServe SDK venv (build/kserve-venv, cached). Failing to build it fails the test."""
    out = subprocess.run(["bash", str(REPO_ROOT / "tests" / "k8s" / "build_kserve_venv.sh"), str(KSERVE_VENV)],
                         capture_output=True, text=True, timeout=900)
    if out.returncode:
        pytest.fail(f"cannot build the KServe SDK venv: {out.stderr.strip()[-2000:]}")
    return KSERVE_VENV / "bin" / "python"


def kserve_roundtrip(python: Path, docs: list[dict]) -> list[dict]:
    out = subprocess.run([str(python), str(REPO_ROOT / "tests" / "k8s" / "kserve_roundtrip.py")],
                         input=json.dumps(docs), capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout)


def lost_fields(sent, back, path: str = "") -> list[str]:
    """Paths of what ``sent`` holds that ``back`` does not (the SDK drops unknown fields)."""
    if isinstance(sent, dict):
        if not isinstance(back, dict):
            return [path]
        return [p for k, v in sent.items() for p in (lost_fields(v, back[k], f"{path}/{k}") if k in back else [f"{path}/{k}"])]
    if isinstance(sent, list):
        if not isinstance(back, list) or len(back) != len(sent):
            return [path]
        return [p for i, (a, b) in enumerate(zip(sent, back)) for p in lost_fields(a, b, f"{path}[{i}]")]
    return [] if sent == back else [path]


def test_inference_services_match_the_kserve_v1beta1_api(kserve_python: Path) -> None:
    docs = find("overlays/kserve", "InferenceService")
    assert len(docs) == 2
    misspelt = json.loads(json.dumps(docs[0]))
    misspelt["spec"]["predictor"]["containers"][0]["readinesProbe"] = misspelt["spec"]["predictor"]["containers"][0].pop("readinessProbe")
    back = kserve_roundtrip(kserve_python, [*docs, misspelt])
    for sent, received in zip(docs, back):
        assert lost_fields(sent, received) == [], sent["metadata"]["name"]
    # The check has teeth: a misspelt field is caught.
    assert lost_fields(misspelt, back[2]) == ["/spec/predictor/containers[0]/readinesProbe"]
