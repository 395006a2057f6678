"""Talk to a Kubeflow Pipelines API (v2beta1): upload, submit and schedule the kiln pipeline.

Everything goes through ``kfp.Client``; this module adds what kiln needs around it:
authentication from a token or the in-cluster service-account token
(``KF_PIPELINES_SA_TOKEN_PATH``), run parameters checked against the pipeline spec that
is actually sent, tri-state caching, and API errors turned into one-line messages.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kfp_server_api
import urllib3
import yaml

API_ERRORS = (kfp_server_api.ApiException, urllib3.exceptions.HTTPError)
"""What a KFP call raises: an HTTP error answer, or no answer (connection, TLS, timeout)."""
SA_TOKEN_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
CRON_FIELDS = 6  # KFP's cron (robfig/cron) has a leading seconds field


class KfpError(RuntimeError):
    """A failed KFP call or a request that cannot be made, as a one-line message."""


@dataclass(frozen=True)
class Connection:
    """Where the KFP API is and who we are: a bearer ``token``, or a ``token_path`` read
    (and re-read when it rotates) on each request, as in-cluster service-account tokens."""

    host: str
    namespace: str = "kubeflow"
    token: str | None = None
    token_path: str | None = None


def client(conn: Connection):
    """A ``kfp.Client`` for ``conn``."""
    import warnings

    import kfp
    from kfp.client import ServiceAccountTokenVolumeCredentials

    if not conn.host:
        raise KfpError("no KFP host: pass --host or set KFP_HOST")
    credentials = None
    if not conn.token and conn.token_path:
        if not Path(conn.token_path).is_file():
            raise KfpError(f"no service-account token at {conn.token_path} ({SA_TOKEN_ENV})")
        credentials = ServiceAccountTokenVolumeCredentials(conn.token_path)
    with warnings.catch_warnings():  # "only works with KFP v2.0.0-beta.2 and later": so does kiln
        warnings.simplefilter("ignore", FutureWarning)
        return kfp.Client(host=conn.host, namespace=conn.namespace, existing_token=conn.token or None,
                          credentials=credentials)


def api_error(e: Exception) -> KfpError:
    """A ``kfp_server_api`` / connection error as one line: status, reason and the server's message."""
    status = getattr(e, "status", None)
    if status is None:
        return KfpError(f"cannot reach the KFP API: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    message = ""
    try:
        body = json.loads(e.body or "{}")
        message = body.get("message") or body.get("error") or ""
    except (TypeError, ValueError):
        message = str(e.body or "").strip()
    hint = {401: " (check --token / KFP_TOKEN or KF_PIPELINES_SA_TOKEN_PATH)",
            403: " (the token may not access this namespace)"}.get(status, "")
    line = f"KFP API {status} {e.reason or ''}".rstrip() + (f": {message}" if message else "") + hint
    return KfpError(" ".join(line.split()))


def read_spec(package: Path) -> tuple[dict, dict | None]:
    """(pipeline spec, platform spec or None) of a compiled package."""
    try:
        docs = list(yaml.safe_load_all(package.read_text()))
    except (OSError, yaml.YAMLError) as e:
        raise KfpError(f"cannot read the pipeline package {package}: {e}") from e
    if not docs or not isinstance(docs[0], dict) or "root" not in docs[0]:
        raise KfpError(f"{package} is not a compiled KFP pipeline (no 'root')")
    return docs[0], docs[1] if len(docs) > 1 else None


def spec_of_version(version_spec: dict) -> dict:
    """The pipeline spec inside a pipeline version's ``pipeline_spec`` (bare, or beside a platform spec)."""
    if "root" in version_spec:
        return version_spec
    if "pipeline_spec" in version_spec:
        return version_spec["pipeline_spec"]
    raise KfpError("the pipeline version holds no pipeline spec")


_CASTS = {"NUMBER_INTEGER": int, "NUMBER_DOUBLE": float, "STRING": str, "STRUCT": json.loads,
          "BOOLEAN": lambda v: {"true": True, "false": False}[v.lower()]}


def parse_params(pairs: list[str], spec: dict) -> dict[str, Any]:
    """``["epochs=3", "data_rev=v2"]`` -> ``{"epochs": 3, "data_rev": "v2"}``, typed as ``spec`` declares.

    Raises KfpError on a malformed pair, a parameter the pipeline lacks, a bad value (of
    the wrong type, or one its stage's config refuses: ``kiln.config.check_parameters``),
    or a required parameter missing.
    """
    from kiln.config import ConfigError, check_parameters

    declared = spec["root"].get("inputDefinitions", {}).get("parameters", {})
    params: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise KfpError(f"--param needs name=value, got {pair!r}")
        if name not in declared:
            raise KfpError(f"the pipeline has no parameter {name!r}; it has {sorted(declared)}")
        kind = declared[name]["parameterType"]
        try:
            params[name] = _CASTS[kind](value)
        except (KeyError, ValueError) as e:
            raise KfpError(f"{name}={value!r} is not a valid {kind}") from e
    missing = [n for n, d in declared.items() if not d.get("isOptional") and "defaultValue" not in d and n not in params]
    if missing:
        raise KfpError(f"required parameters missing: {missing}")
    try:
        check_parameters(params)
    except ConfigError as e:
        raise KfpError(str(e)) from e
    return params


def check_cron(cron: str) -> str:
    """``cron`` if it has KFP's six fields (seconds first), else KfpError saying so."""
    if len(cron.split()) != CRON_FIELDS:
        raise KfpError(f"cron {cron!r} has {len(cron.split())} fields; KFP wants 6 (seconds first), "
                       f"e.g. '0 0 3 * * *' for 03:00 daily")
    return cron


def _name_filter(name: str) -> str:
    return json.dumps({"predicates": [{"key": "display_name", "operation": "EQUALS", "string_value": name}]})


def find_pipeline(kfp_client, conn: Connection, name: str) -> str | None:
    """The id of the pipeline called ``name`` in the namespace (None if absent)."""
    found = kfp_client.list_pipelines(filter=_name_filter(name), namespace=conn.namespace, page_size=2).pipelines or []
    if len(found) > 1:
        raise KfpError(f"{len(found)} pipelines are called {name!r}; rename one in the KFP UI")
    return found[0].pipeline_id if found else None


def find_version(kfp_client, pipeline_id: str, version: str | None):
    """The named version of the pipeline, or its newest one."""
    if version:
        found = kfp_client.list_pipeline_versions(pipeline_id, filter=_name_filter(version), page_size=1)
    else:
        found = kfp_client.list_pipeline_versions(pipeline_id, sort_by="created_at desc", page_size=1)
    versions = found.pipeline_versions or []
    if not versions:
        raise KfpError(f"pipeline {pipeline_id} has no version {version!r}" if version
                       else f"pipeline {pipeline_id} has no versions: run `kiln upload`")
    return versions[0]


def upload(conn: Connection, package: Path, name: str, version: str, description: str = "") -> tuple[str, str]:
    """Register ``package`` as version ``version`` of pipeline ``name`` (created if new);
    return (pipeline id, version id)."""
    read_spec(package)  # refuse a file that is not a compiled pipeline before any call
    kfp_client = client(conn)
    pipeline_id = find_pipeline(kfp_client, conn, name)
    if pipeline_id is None:
        # a pipeline without versions, so that every version is named by its commit
        created = kfp_client._pipelines_api.pipeline_service_create_pipeline(
            pipeline=kfp_server_api.V2beta1Pipeline(display_name=name, description=description or None,
                                                    namespace=conn.namespace))
        pipeline_id = created.pipeline_id
    uploaded = kfp_client.upload_pipeline_version(str(package), pipeline_version_name=version,
                                                  pipeline_id=pipeline_id, description=description or None)
    return pipeline_id, uploaded.pipeline_version_id


@dataclass(frozen=True)
class Target:
    """What a run starts: a local package, or an uploaded pipeline (by name) at a version."""

    package: Path | None = None
    pipeline: str | None = None
    version: str | None = None


def _job_source(kfp_client, conn: Connection, target: Target, pairs: list[str],
                caching: bool | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(parameters checked against the spec that will run, kfp.Client source arguments)."""
    if target.pipeline:
        if caching is not None:
            raise KfpError("--cache on/off rewrites the spec, so it needs --package; an uploaded version "
                           "runs with its compiled per-task caching")
        pipeline_id = find_pipeline(kfp_client, conn, target.pipeline)
        if pipeline_id is None:
            raise KfpError(f"no pipeline called {target.pipeline!r} in namespace {conn.namespace}: run `kiln upload`")
        version = find_version(kfp_client, pipeline_id, target.version)
        spec = spec_of_version(version.pipeline_spec or {})
        return parse_params(pairs, spec), {"pipeline_id": pipeline_id, "version_id": version.pipeline_version_id}
    spec, _ = read_spec(target.package)
    return parse_params(pairs, spec), {"pipeline_package_path": str(target.package), "enable_caching": caching}


def submit(conn: Connection, target: Target, pairs: list[str], experiment: str, run_name: str,
           caching: bool | None = None) -> str:
    """Start one run; return its id. ``caching`` None keeps the compiled per-task settings."""
    kfp_client = client(conn)
    params, source = _job_source(kfp_client, conn, target, pairs, caching)
    experiment_id = kfp_client.create_experiment(experiment, namespace=conn.namespace).experiment_id
    run = kfp_client.run_pipeline(experiment_id=experiment_id, job_name=run_name, params=params, **source)
    return run.run_id


def schedule(conn: Connection, target: Target, pairs: list[str], experiment: str, name: str, cron: str,
             caching: bool | None = None) -> str:
    """Create a recurring run: 6-field ``cron``, one run at a time, no catch-up; return its id.

    ``max_concurrency`` is an int64, which the API (proto JSON) and its models carry as a string.
    """
    check_cron(cron)
    kfp_client = client(conn)
    params, source = _job_source(kfp_client, conn, target, pairs, caching)
    experiment_id = kfp_client.create_experiment(experiment, namespace=conn.namespace).experiment_id
    recurring = kfp_client.create_recurring_run(experiment_id=experiment_id, job_name=name, cron_expression=cron,
                                                max_concurrency="1", no_catchup=True, params=params, **source)
    return recurring.recurring_run_id


def list_schedules(conn: Connection) -> list[dict[str, str]]:
    """The namespace's recurring runs: id, name, mode, cron."""
    found = client(conn).list_recurring_runs(namespace=conn.namespace, page_size=100).recurring_runs or []
    out = []
    for r in found:
        cron = r.trigger.cron_schedule.cron if r.trigger and r.trigger.cron_schedule else ""
        out.append({"id": r.recurring_run_id, "name": r.display_name, "mode": r.mode, "cron": cron})
    return out


def change_schedule(conn: Connection, recurring_run_id: str, action: str) -> None:
    """``pause``, ``resume`` or ``delete`` a recurring run."""
    kfp_client = client(conn)
    {"pause": kfp_client.disable_recurring_run, "resume": kfp_client.enable_recurring_run,
     "delete": kfp_client.delete_recurring_run}[action](recurring_run_id)
