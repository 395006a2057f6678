"""A loopback fake of the Kubernetes API for the TrainJob backend, with a fake Trainer
controller and kubelet behind it.

The server is a real HTTP server on 127.0.0.1 that the real ``kubernetes`` client talks
to. It records every request (method, path, query, JSON body). Creating a TrainJob
starts its nodes as real local processes running the TrainJob's own command with the
environment Kubeflow Trainer's torch plugin gives each node (``PET_NNODES``,
``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``, ``PET_MASTER_PORT``), so
the checkpoint on the "shared volume" is a real one. Pod phases and the TrainJob's
conditions follow the processes; ``follow=true`` pod logs stream their output as it
is written. With ``schedulable = False`` pods stay Pending forever (a full cluster).
Any other endpoint answers 404 and is recorded, so tests see every call the client made.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from helpers import REPO_ROOT, clean_frame, mnist_subset

GROUP_PATH = "/apis/trainer.kubeflow.org/v1alpha1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: dict | None


@dataclass
class Node:
    pod: str
    index: int
    log_path: Path
    proc: subprocess.Popen | None = None

    @property
    def phase(self) -> str:
        if self.proc is None:
            return "Pending"
        code = self.proc.poll()
        return "Running" if code is None else ("Succeeded" if code == 0 else "Failed")


@dataclass
class Job:
    body: dict
    nodes: list[Node] = field(default_factory=list)
    deleted: bool = False


class FakeKube:
    """State of the fake cluster; ``requests`` is everything the client sent."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.runtimes = {"torch-distributed"}
        self.schedulable = True
        self.requests: list[Request] = []
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()

    # -- the fake controller + kubelet
    def start(self, namespace: str, body: dict) -> Job:
        name = body["metadata"]["name"]
        job = Job(body)
        trainer = body["spec"]["trainer"]
        nnodes = trainer.get("numNodes", 1)
        master_port = free_port()
        for index in range(nnodes):
            node = Node(f"{name}-node-0-{index}-x{index}", index, self.workdir / f"{name}-{index}.log")
            job.nodes.append(node)
            if not self.schedulable:
                continue
            env = {
                **os.environ,
                **{e["name"]: e["value"] for e in trainer.get("env", [])},
                "PET_NNODES": str(nnodes), "PET_NPROC_PER_NODE": str(trainer.get("numProcPerNode", 1)),
                "PET_NODE_RANK": str(index), "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(master_port),
                "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
                "OMP_NUM_THREADS": "1",
            }
            command = list(trainer["command"])
            if command[0] == "torchrun":  # the image's torchrun is this interpreter's
                command[:1] = [sys.executable, "-m", "torch.distributed.run"]
            with node.log_path.open("wb") as out:
                node.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.jobs[name] = job
        return job

    def status(self, job: Job) -> dict:
        phases = [n.phase for n in job.nodes]
        if "Failed" in phases:
            failed = next(n for n in job.nodes if n.phase == "Failed")
            condition = {"type": "Failed", "status": "True", "reason": "JobsFailed",
                         "message": f"jobset failed: node {failed.index} exited with code {failed.proc.returncode}\n"
                                    "(see its log)", "lastTransitionTime": "2026-01-01T00:00:00Z"}
            return {"conditions": [condition]}
        if phases and all(p == "Succeeded" for p in phases):
            return {"conditions": [{"type": "Complete", "status": "True", "reason": "JobsCompleted",
                                    "message": "jobset completed", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        return {}

    def stop(self) -> None:
        for job in self.jobs.values():
            for node in job.nodes:
                if node.proc is not None and node.proc.poll() is None:
                    node.proc.kill()
                    node.proc.wait()


TRAINJOB = re.compile(GROUP_PATH + r"/namespaces/([^/]+)/trainjobs(?:/([^/]+))?$")
RUNTIME = re.compile(GROUP_PATH + r"/clustertrainingruntimes/([^/]+)$")
PODS = re.compile(r"/api/v1/namespaces/([^/]+)/pods$")
POD_LOG = re.compile(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$")


class FakeKubeHandler(BaseHTTPRequestHandler):
    kube: FakeKube  # set on a subclass per server
    protocol_version = "HTTP/1.0"  # one response per connection: a followed log ends at close

    def log_message(self, *args) -> None:
        pass

    def _send(self, code: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _not_found(self, what: str) -> None:
        self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                         "message": f"{what} not found", "code": 404})

    def _record(self) -> Request:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        req = Request(self.command, url.path, {k: v[-1] for k, v in parse_qs(url.query).items()}, body)
        with self.kube.lock:
            self.kube.requests.append(req)
        return req

    def do_POST(self) -> None:
        req = self._record()
        m = TRAINJOB.match(req.path)
        if not m or m.group(2):
            return self._not_found(req.path)
        name = req.body["metadata"]["name"]
        if name in self.kube.jobs:
            return self._send(409, {"kind": "Status", "status": "Failure", "reason": "AlreadyExists", "code": 409})
        stored = {**req.body, "metadata": {**req.body["metadata"], "namespace": m.group(1),
                                           "creationTimestamp": "2026-01-01T00:00:00Z"}}
        self.kube.start(m.group(1), stored)
        self._send(201, stored)

    def do_DELETE(self) -> None:
        req = self._record()
        m = TRAINJOB.match(req.path)
        if not m or not m.group(2) or m.group(2) not in self.kube.jobs:
            return self._not_found(req.path)
        job = self.kube.jobs[m.group(2)]
        job.deleted = True
        for node in job.nodes:  # the cluster stops a deleted job's pods
            if node.proc is not None and node.proc.poll() is None:
                node.proc.kill()
        self._send(200, {"kind": "Status", "status": "Success"})

    def do_PATCH(self) -> None:  # recorded, so a test sees any call the fake does not serve
        self._not_found(self._record().path)

    do_PUT = do_PATCH

    def do_GET(self) -> None:
        req = self._record()
        if m := RUNTIME.match(req.path):
            if m.group(1) not in self.kube.runtimes:
                return self._not_found(f"clustertrainingruntimes {m.group(1)}")
            return self._send(200, {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "ClusterTrainingRuntime",
                                    "metadata": {"name": m.group(1)}})
        if (m := TRAINJOB.match(req.path)) and m.group(2):
            job = self.kube.jobs.get(m.group(2))
            if job is None:
                return self._not_found(f"trainjobs {m.group(2)}")
            return self._send(200, {**job.body, "status": self.kube.status(job)})
        if m := PODS.match(req.path):
            selector = req.query.get("labelSelector", "")
            job = self.kube.jobs.get(selector.removeprefix("jobset.sigs.k8s.io/jobset-name="))
            items = [] if job is None else [
                {"metadata": {"name": n.pod, "namespace": m.group(1), "labels": {
                    "jobset.sigs.k8s.io/jobset-name": job.body["metadata"]["name"],
                    "jobset.sigs.k8s.io/replicatedjob-name": "node",
                    "batch.kubernetes.io/job-completion-index": str(n.index)}},
                 "status": {"phase": n.phase}} for n in job.nodes]
            return self._send(200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items})
        if m := POD_LOG.match(req.path):
            node = next((n for j in self.kube.jobs.values() for n in j.nodes if n.pod == m.group(2)), None)
            if node is None or node.proc is None:
                return self._not_found(f"pods {m.group(2)}")
            return self._stream(node, follow=req.query.get("follow", "").lower() == "true")  # Go ParseBool: True too
        self._not_found(req.path)

    def _stream(self, node: Node, follow: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        with node.log_path.open("rb") as log:
            while True:
                done = node.proc.poll() is not None
                chunk = log.read()
                if chunk:
                    self.wfile.write(chunk)
                    self.wfile.flush()
                elif done or not follow:
                    return
                else:
                    time.sleep(0.05)


@pytest.fixture(scope="session")
def fake_kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeKube, str]]:
    """(the fake cluster, its base URL)."""
    kube = FakeKube(tmp_path_factory.mktemp("kube"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (FakeKubeHandler,), {"kube": kube}))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield kube, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        kube.stop()


TINY_CONFIG = dict(model="mlp", epochs=1, batch_size=32, dropout=0.0, device="cpu", patience=0, seed=3)


@pytest.fixture(scope="session")
def tiny_overrides() -> dict:
    """TrainConfig overrides for a seconds-long CPU run with nothing rank-dependent."""
    return dict(TINY_CONFIG)


@pytest.fixture(scope="session")
def tiny_tables(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(train, val) clean Parquet tables of real digits: 200 and 100 images."""
    d = tmp_path_factory.mktemp("tables")
    clean_frame(*mnist_subset(20), prefix="t").to_parquet(d / "train.parquet")
    clean_frame(*mnist_subset(10, offset=20), prefix="v").to_parquet(d / "val.parquet")
    return d / "train.parquet", d / "val.parquet"


@pytest.fixture(scope="session")
def reference_state(tiny_tables, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The best weights of TINY_CONFIG trained in this one process."""
    import pandas as pd

    from kiln.train import TrainConfig, read_checkpoint, train

    checkpoint = tmp_path_factory.mktemp("single") / "model.pt"
    result = train(TrainConfig(**TINY_CONFIG), pd.read_parquet(tiny_tables[0]), pd.read_parquet(tiny_tables[1]),
                   checkpoint, log=lambda _: None)
    assert result.world_size == 1
    return read_checkpoint(checkpoint)["state_dict"]


@dataclass
class Outcome:
    """What one run_trainjob call did: its result or error, its log, the requests it sent."""

    result: object = None
    error: BaseException | None = None
    log: list[str] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    seconds: float = 0.0


@pytest.fixture(scope="session")
def trainjob_runs(fake_kube, tiny_tables, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """run_trainjob against the fake cluster: "success" (2 nodes x 1 process, real
    training), "failure" (a validation table the training refuses), "timeout" (pods
    never scheduled) and "no_runtime" (an unknown ClusterTrainingRuntime)."""
    from kubernetes import client

    from kiln.trainjob import TrainJobOptions, run_trainjob

    kube, url = fake_kube
    train, val = tiny_tables
    tmp = tmp_path_factory.mktemp("trainjob")
    bad_val = tmp / "bad_val.parquet"
    import pandas as pd

    pd.DataFrame({"id": ["a"], "label": [1]}).to_parquet(bad_val)
    base = dict(image="kiln:test", namespace="team-a", pvc="kiln-model-store", shared_dir=str(tmp / "pvc"),
                poll_interval_s=0.2, timeout_s=120, cpu="1", memory="1Gi")
    scenarios = {
        "success": (dict(num_nodes=2), val, True),
        "failure": (dict(num_nodes=1), bad_val, True),
        "timeout": (dict(num_nodes=1, timeout_s=1.0), val, False),
        "no_runtime": (dict(num_nodes=1, runtime="no-such-runtime"), val, True),
    }
    outcomes = {}
    for name, (extra, val_path, schedulable) in scenarios.items():
        kube.schedulable = schedulable
        outcome = Outcome()
        seen = len(kube.requests)
        api = client.ApiClient(client.Configuration(host=url))
        started = time.perf_counter()
        try:
            outcome.result = run_trainjob(TrainJobOptions(**{**base, **extra}), train, val_path, tmp / f"{name}.pt",
                                          TINY_CONFIG, log=outcome.log.append, api_client=api)
        except Exception as e:  # the tests look at it
            outcome.error = e
        finally:
            api.close()
        outcome.seconds = time.perf_counter() - started
        outcome.requests = kube.requests[seen:]
        outcomes[name] = outcome
    kube.schedulable = True
    return outcomes
