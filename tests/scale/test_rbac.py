"""k8s/rbac builds, its objects validate, and it grants every call the TrainJob client
made against the loopback Kubernetes API (derived from the recorded requests, so a new
call the Role does not grant fails here)."""

from __future__ import annotations

import re
import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml

from helpers import REPO_ROOT
from kiln.trainjob import API_CALLS

K8S_VERSION = "1.31.0"
SERVICE_ACCOUNT = "default-editor"

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is needed to build kustomizations")


@pytest.fixture(scope="module")
def rbac() -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(REPO_ROOT / "k8s" / "rbac")],
                         capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def access(method: str, path: str, query: dict[str, str]) -> tuple[str, str, str, bool]:
    """(API group, resource[/subresource], verb, namespaced) of one API request, as the
    API server's authorizer sees it."""
    m = re.fullmatch(r"/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)(?P<ns>/namespaces/[^/]+)?/(?P<rest>.+)", path)
    assert m, f"not a resource path: {path}"
    parts = m["rest"].split("/")
    resource, name, sub = parts[0], parts[1] if len(parts) > 1 else None, parts[2] if len(parts) > 2 else None
    if method == "GET":
        verb = "get" if name else ("watch" if query.get("watch", "").lower() == "true" else "list")
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete" if name else "deletecollection"}[method]
    return m["group"] or "", resource + (f"/{sub}" if sub else ""), verb, m["ns"] is not None


def granted(rules: list[dict], group: str, resource: str, verb: str) -> bool:
    return any(group in r.get("apiGroups", []) and resource in r.get("resources", []) and verb in r.get("verbs", [])
               for r in rules)


def test_rbac_builds_and_validates(rbac) -> None:
    kinds = sorted(d["kind"] for d in rbac)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"]
    for doc in rbac:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_bindings_give_the_roles_to_the_pipeline_service_account(rbac) -> None:
    by_kind = {d["kind"]: d for d in rbac}
    namespace = by_kind["Role"]["metadata"]["namespace"]
    for binding, role in (("RoleBinding", "Role"), ("ClusterRoleBinding", "ClusterRole")):
        doc = by_kind[binding]
        assert doc["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": role,
                                  "name": by_kind[role]["metadata"]["name"]}
        assert doc["subjects"] == [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": namespace}]


def test_every_call_the_client_made_is_granted(rbac, trainjob_runs) -> None:
    by_kind = {d["kind"]: d for d in rbac}
    seen = {access(r.method, r.path, r.query) for run in trainjob_runs.values() for r in run.requests}
    # every scenario ran: create, poll, list pods, follow a log, delete on timeout
    assert {(g, res, v) for g, res, v, _ in seen} == set(API_CALLS)
    for group, resource, verb, namespaced in sorted(seen):
        rules = by_kind["Role" if namespaced else "ClusterRole"]["rules"]
        assert granted(rules, group, resource, verb), f"{verb} {group or 'core'}/{resource} is not granted"


def test_the_check_would_catch_an_ungranted_call(rbac) -> None:
    rules = {d["kind"]: d for d in rbac}["Role"]["rules"]
    assert not granted(rules, *access("DELETE", "/api/v1/namespaces/x/pods/p", {})[:3])
    assert not granted(rules, *access("POST", "/api/v1/namespaces/x/pods/p/exec", {})[:3])
    assert access("GET", "/apis/trainer.kubeflow.org/v1alpha1/namespaces/x/trainjobs", {"watch": "True"})[2] == "watch"
