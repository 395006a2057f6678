"""A loopback fake of the Kubeflow Pipelines v2beta1 REST API, strict about what it accepts.

Every JSON request body is deserialized into its ``kfp_server_api`` model and serialized
back; the models drop unknown fields silently, so a body that does not survive the
round trip unchanged is refused (400) and recorded in ``violations``. Uploaded packages
must be compiled pipeline specs. Requests need ``Authorization: Bearer <token>`` (401
otherwise); unknown ids get 404, a duplicate pipeline or version name 409, with KFP's
error body (``google.rpc.Status``).
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

import kfp_server_api
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

PREFIX = "/apis/v2beta1"


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class _Raw:
    """What ``ApiClient.deserialize`` reads: a response with ``data``."""

    def __init__(self, data: str) -> None:
        self.data = data


_client = kfp_server_api.ApiClient()


def round_trip(body: Any, model: str) -> Any:
    """``body`` as ``model`` and back; ApiError 400 if anything was lost or changed."""
    try:
        obj = _client.deserialize(_Raw(json.dumps(body)), model)
    except (ValueError, TypeError) as e:
        raise ApiError(400, f"invalid {model}: {e}") from e
    back = _client.sanitize_for_serialization(obj)
    if back != body:
        raise ApiError(400, f"body is not a {model}: sent {json.dumps(body, sort_keys=True)[:300]}, "
                            f"the model keeps {json.dumps(back, sort_keys=True)[:300]}")
    return obj


def _matches(item: dict, flt: str | None) -> bool:
    if not flt:
        return True
    for p in json.loads(flt).get("predicates", []):
        value = p.get("string_value", p.get("stringValue"))
        if p.get("operation") not in ("EQUALS", 1) or item.get(p["key"]) != value:
            return False
    return True


@dataclass
class FakeKfp:
    token: str = "good-token"
    requests: list[dict] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    pipelines: dict[str, dict] = field(default_factory=dict)
    versions: dict[str, list[dict]] = field(default_factory=dict)
    experiments: dict[str, dict] = field(default_factory=dict)
    runs: dict[str, dict] = field(default_factory=dict)
    recurring: dict[str, dict] = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def new_id(self, kind: str) -> str:
        return f"{kind}-{next(self._ids)}"

    def sent(self, method: str, path: str) -> list[dict]:
        """The recorded requests with this method and path (after the API prefix)."""
        return [r for r in self.requests if r["method"] == method and r["path"] == PREFIX + path]

    # -- handlers: (method, path parts) -> response dict ------------------------------------------
    def handle(self, method: str, parts: list[str], query: dict, body: Any, files: dict) -> dict:
        route = (method, parts[0] if parts else "")
        if route == ("GET", "healthz"):
            return {"multi_user": False}
        if parts[:1] == ["pipelines"]:
            return self._pipelines(method, parts[1:], query, body, files)
        if parts[:1] == ["experiments"]:
            return self._experiments(method, parts[1:], query, body)
        if route == ("POST", "runs") and len(parts) == 1:
            run = round_trip(body, "V2beta1Run")
            self._need(self.experiments, run.experiment_id, "experiment")
            rid = self.new_id("run")
            self.runs[rid] = {**body, "run_id": rid, "state": "PENDING"}
            return self.runs[rid]
        if parts[:1] == ["recurringruns"]:
            return self._recurring(method, parts[1:], query, body)
        raise ApiError(404, f"no route {method} {'/'.join(parts)}")

    def _need(self, table: dict, key: str | None, what: str) -> dict:
        if key not in table:
            raise ApiError(404, f"{what} {key} not found")
        return table[key]

    def _pipelines(self, method: str, parts: list[str], query: dict, body: Any, files: dict) -> dict:
        if method == "POST" and not parts:
            pipeline = round_trip(body, "V2beta1Pipeline")
            if any(p["display_name"] == pipeline.display_name for p in self.pipelines.values()):
                raise ApiError(409, f"pipeline {pipeline.display_name!r} already exists")
            pid = self.new_id("pipeline")
            self.pipelines[pid] = {**body, "pipeline_id": pid}
            self.versions[pid] = []
            return self.pipelines[pid]
        if method == "GET" and not parts:
            return {"pipelines": [p for p in self.pipelines.values() if _matches(p, query.get("filter"))]}
        if method == "POST" and parts == ["upload_version"]:
            pid = query.get("pipelineid")
            self._need(self.pipelines, pid, "pipeline")
            name = query.get("name") or query.get("display_name")
            if any(v["display_name"] == name for v in self.versions[pid]):
                raise ApiError(409, f"pipeline version {name!r} already exists in pipeline {pid}")
            docs = list(yaml.safe_load_all(files.get("uploadfile", b"")))
            if not docs or not isinstance(docs[0], dict) or "root" not in docs[0] or "pipelineInfo" not in docs[0]:
                raise ApiError(400, "the uploaded file is not a compiled pipeline spec")
            vid = self.new_id("version")
            spec = {"pipeline_spec": docs[0], "platform_spec": docs[1]} if len(docs) > 1 else docs[0]
            version = {"pipeline_id": pid, "pipeline_version_id": vid, "display_name": name, "pipeline_spec": spec}
            if query.get("description"):
                version["description"] = query["description"]
            self.versions[pid].append(version)
            return version
        pid = parts[0]
        versions = self.versions.get(pid)
        if versions is None:
            raise ApiError(404, f"pipeline {pid} not found")
        if method == "GET" and parts[1:] == ["versions"]:
            found = [v for v in versions if _matches(v, query.get("filter"))]
            if query.get("sort_by") == "created_at desc":
                found = found[::-1]
            return {"pipeline_versions": found[: int(query.get("page_size") or 10)]}
        if method == "GET" and len(parts) == 3 and parts[1] == "versions":
            return next((v for v in versions if v["pipeline_version_id"] == parts[2]), None) or \
                self._need({}, parts[2], "pipeline version")
        raise ApiError(404, f"no route {method} pipelines/{'/'.join(parts)}")

    def _experiments(self, method: str, parts: list[str], query: dict, body: Any) -> dict:
        if method == "POST" and not parts:
            round_trip(body, "V2beta1Experiment")
            eid = self.new_id("experiment")
            self.experiments[eid] = {**body, "experiment_id": eid}
            return self.experiments[eid]
        if method == "GET" and not parts:
            return {"experiments": [e for e in self.experiments.values() if _matches(e, query.get("filter"))]}
        if method == "GET" and len(parts) == 1:
            return self._need(self.experiments, parts[0], "experiment")
        raise ApiError(404, f"no route {method} experiments/{'/'.join(parts)}")

    def _recurring(self, method: str, parts: list[str], query: dict, body: Any) -> dict:
        if method == "POST" and not parts:
            job = round_trip(body, "V2beta1RecurringRun")
            self._need(self.experiments, job.experiment_id, "experiment")
            rid = self.new_id("recurring")
            self.recurring[rid] = {**body, "recurring_run_id": rid}
            return self.recurring[rid]
        if method == "GET" and not parts:
            return {"recurringRuns": list(self.recurring.values())}  # this one has a json_name in the proto
        rid, _, action = parts[0].partition(":")
        job = self._need(self.recurring, rid, "recurring run")
        if method == "POST" and action in ("enable", "disable"):
            job["mode"] = "ENABLE" if action == "enable" else "DISABLE"
            return {}
        if method == "DELETE" and not action:
            del self.recurring[rid]
            return {}
        raise ApiError(404, f"no route {method} recurringruns/{parts[0]}")

    # -- the ASGI app ----------------------------------------------------------------------------
    def app(self) -> FastAPI:
        app = FastAPI()

        @app.api_route(PREFIX + "/{path:path}", methods=["GET", "POST", "DELETE", "PATCH"])
        async def route(path: str, request: Request) -> JSONResponse:
            raw = await request.body()
            query = dict(request.query_params)
            files: dict[str, bytes] = {}
            body: Any = None
            ctype = request.headers.get("content-type", "")
            if ctype.startswith("multipart/form-data"):
                message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                    f"Content-Type: {ctype}\r\n\r\n".encode() + raw)
                files = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                         for part in message.iter_parts()}
            elif raw:
                body = json.loads(raw)
            self.requests.append({"method": request.method, "path": request.url.path, "query": query, "body": body,
                                  "files": files, "authorization": request.headers.get("authorization")})
            try:
                if request.headers.get("authorization") != f"Bearer {self.token}":
                    raise ApiError(401, "Unauthenticated: no valid bearer token")
                return JSONResponse(self.handle(request.method, path.split("/"), query, body, files))
            except ApiError as e:
                if e.status == 400:
                    self.violations.append(e.message)
                code = {400: 3, 401: 16, 404: 5, 409: 6}.get(e.status, 2)
                return JSONResponse({"error": e.message, "code": code, "message": e.message, "details": []},
                                    status_code=e.status)

        return app
