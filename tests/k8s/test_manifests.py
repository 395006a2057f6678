"""Kubernetes manifests, checked statically: no cluster here (see README).

Every overlay must build with ``kubectl kustomize`` and every core object must pass the
Kubernetes OpenAPI schema (kubernetes-validate, strict: unknown fields are errors).
The KServe InferenceService is a CRD with no bundled schema, so its V2-predictor shape
is asserted directly.
"""

from __future__ import annotations

import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml

from helpers import REPO_ROOT

OVERLAYS = sorted(p.name for p in (REPO_ROOT / "k8s" / "overlays").iterdir() if p.is_dir())
K8S_VERSION = "1.31.0"

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is needed to build kustomizations")


def build(overlay: str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(REPO_ROOT / "k8s" / "overlays" / overlay)],
                         capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_and_core_objects_validate(overlay: str) -> None:
    docs = build(overlay)
    assert docs
    for doc in docs:
        if doc["apiVersion"].startswith("serving.kserve.io"):
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_dev_server_probes_hit_the_v2_health_endpoints() -> None:
    deployment = next(d for d in build("dev") if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert deployment["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    mount = container["volumeMounts"][0]
    env_from = container["envFrom"][0]["configMapRef"]["name"]
    config = next(d for d in build("dev") if d["kind"] == "ConfigMap" and d["metadata"]["name"] == env_from)
    assert config["data"]["KILN_MODEL_STORE"] == mount["mountPath"]


def test_kserve_predictor_speaks_v2_on_the_store_mount() -> None:
    isvc = next(d for d in build("kserve") if d["kind"] == "InferenceService")
    container = isvc["spec"]["predictor"]["containers"][0]
    assert container["name"] == "kserve-container"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["PROTOCOL"] == "v2" and env["STORAGE_URI"].startswith("pvc://")
    assert container["args"][container["args"].index("--store") + 1] == "/mnt/models"  # where KServe puts storageUri
