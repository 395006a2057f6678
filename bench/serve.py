"""Benchmark: the kiln model server under load, against its peers and in-process ONNX Runtime.

Requests/s and p50/p99 latency at concurrency 1, 16 and 64 for ``kiln serve`` with
batching on and off, driven by Debian's ``wrk`` with a Lua script that POSTs one
image as a KServe V2 JSON body (``pixels`` UINT8 [1, 28, 28], a real MNIST digit).
Measured in the same run on the same ONNX files:

* in-process ONNX Runtime: ``session.run`` at batch 1 in a loop from one caller thread,
  with ORT's default session options and with the server's (``kiln.runtime.SessionSettings``:
  intra-op threads = CPU quota, inter-op 1, sequential, no spinning) -- the limit no
  server can pass;
* the peers of ``bench/peers`` on the tiny model, each from its own virtual environment
  (``--<peer>-venv``, created when absent): KServe's ``ModelServer`` (a custom V2 model,
  no batching), MLServer with adaptive batching and Triton (nvidia-pytriton) with its
  dynamic batcher. Every one opens its session with ``kiln.runtime`` from the same
  ``SessionSettings`` as ``kiln serve`` (``kiln_session_settings``; recorded with the
  ONNX Runtime options it sets), so none runs ONNX Runtime's defaults;
* gRPC against REST on one kiln server, both driven by ``h2load`` (nghttp2-client):
  REST JSON over HTTP/1.1 and gRPC ModelInfer (raw input contents) over HTTP/2, counted
  by the server's own status counters (h2load takes a gRPC error for a success).

Models: (1) ``tiny``, kiln's default CNN (``TrainConfig(model="cnn")``, seeded and
untrained: throughput does not depend on the weights) exported by ``kiln.export.export_onnx``
(contract and parity checks included); (2) ``heavy``, the same contract (``kiln.models.ServingModel``
around a wider CNN with a two-layer 2048-unit head, see ``--heavy-*``) whose batch-1
inference takes 1 ms or more here (measured and recorded). Both are put in a model
store with ``kiln.deploy.deploy`` (model.json with sha256, ``production`` alias), which
is what ``kiln serve`` loads.

Each server is started as its own process group on a free loopback port, warmed up,
then measured point by point; it is always killed at the end (also on errors and
Ctrl-C). For kiln, ``/metrics`` is scraped before and after every point: the histogram
deltas give, per request, the handler's total time, the batching queue wait and the
ONNX Runtime compute; their difference is decode + encode and the rest of the handler;
wrk's mean latency minus the handler's total is what the HTTP server and the socket add.
Server CPU time per request comes from /proc for every server; the load average at the
start and end of the run is recorded (the machine may be shared).

Targets (the issue's table) are recorded as ratios within this run, never asserted.

    .venv/bin/python bench/serve.py                  # ~8 min -> bench/results/serve.json
    .venv/bin/python bench/serve.py --quick          # ~2 s per point smoke run
    .venv/bin/python bench/serve.py --peers mlserver --skip-grpc --output /tmp/serve.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serve_baselines import (  # noqa: E402
    MODEL_NAMES,
    build_models,
    in_process_ort,
    kiln_codec,
    kiln_session_settings,
)
from bench.serve_report import CONCURRENCY, compute_ratios, print_summary  # noqa: E402
from bench.loadgen import (  # noqa: E402
    LUA,
    Server,
    breakdown,
    check_answer,
    free_port,
    grpc_frame,
    run_h2load,
    run_wrk,
    scrape,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "serve.json"

# --- driving -----------------------------------------------------------------------------------


def measure_server(server: Server, infer_path: str, lua: Path, concurrency: list[int], seconds: int,
                   warmup: int, metrics: bool, batch_stats=None) -> list[dict[str, Any]]:
    """Warm ``server`` up, then one wrk run per concurrency (with /metrics deltas for kiln,
    and the peer's own batch counts through ``batch_stats()`` where it has a batcher)."""
    url = server.base + infer_path
    run_wrk(url, lua, max(concurrency), warmup)
    points = []
    for c in concurrency:
        time.sleep(0.5)  # let the previous run's last requests and connections settle
        before = scrape(server.base) if metrics else None
        batches0 = batch_stats() if batch_stats else None
        cpu0 = server.cpu_seconds()
        r = run_wrk(url, lua, c, seconds)
        cpu1 = server.cpu_seconds()
        point = {"concurrency": c, **r,
                 "server_cpu_us_per_request": round((cpu1 - cpu0) / max(r["requests"], 1) * 1e6, 1),
                 "server_cpu_cores": round((cpu1 - cpu0) / r["duration_s"], 2)}
        if before is not None:
            point["breakdown"] = breakdown(before, scrape(server.base), r["mean_ms"])
        if batches0 is not None:
            served = batch_stats() - batches0
            point["peer_batches"] = {"runs": served.runs, "rows": served.rows, "mean_rows": round(served.mean_rows, 2)}
        points.append(point)
        print(f"  {server.name:<28} c={c:<3} {r['rps']:>8.1f} req/s  p50 {r['p50_ms']:>7.2f} ms  "
              f"p99 {r['p99_ms']:>7.2f} ms  errors {r['errors']}", file=sys.stderr, flush=True)
    return points


def kiln_cmd(store: Path, model: str, port: int, batching: bool, grpc_port: int = 0) -> list[str]:
    return [sys.executable, "-m", "kiln.cli", "serve", "--store", str(store), "--model", model,
            "--host", "127.0.0.1", "--port", str(port), "--batching" if batching else "--no-batching",
            "--device", "cpu", "--grpc-port", str(grpc_port)]


def measure_peers(names: list[str], venvs: dict[str, Path], model: dict[str, Any], body: bytes, expected: int,
                  lua: Path, args: argparse.Namespace, work: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    """Each peer from its own venv, on the same ONNX file, with kiln's session settings."""
    from bench.peers import PEERS

    points = []
    settings = kiln_session_settings().model_dump_json()
    for name in names:
        peer = PEERS[name]
        port, workdir = free_port(), work / f"peer-{name}"
        workdir.mkdir(parents=True, exist_ok=True)
        argv, peer_env = peer.command(venvs[name], model["onnx"], port, settings, workdir)
        peer_env = {k: v for k, v in peer_env.items() if not k.startswith("KILN_")}
        with Server(f"{name} tiny", argv, port, peer.ready_path, work / f"{name}.log", peer_env) as server:
            check_answer(server, peer.infer_path, body, expected)
            stats = (lambda: peer.batch_stats(port, workdir)) if peer.batch_stats(port, workdir) else None
            for p in measure_server(server, peer.infer_path, lua, args.concurrency, args.duration, args.warmup,
                                    False, stats):
                points.append({"server": name, "model": "tiny", "batching": None, **p})
    return points


def grpc_request(image: np.ndarray, model_name: str) -> bytes:
    """The gRPC ModelInfer request tritonclient sends for ``image``: raw input contents."""
    from tritonclient.grpc import service_pb2 as pb

    tensor = pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=[1, 28, 28])
    request = pb.ModelInferRequest(model_name=model_name, inputs=[tensor], raw_input_contents=[image.tobytes()])
    return request.SerializeToString()


def grpc_vs_rest(store: Path, model_name: str, body: bytes, image: np.ndarray, expected: int, args: argparse.Namespace,
                 work: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    """One kiln server (batching on) driven by h2load: REST JSON over HTTP/1.1, then gRPC over
    HTTP/2, at each concurrency; success counted by the server's own counters."""
    rest_body, grpc_body = work / "rest.json", work / "grpc.bin"
    rest_body.write_bytes(body)
    grpc_body.write_bytes(grpc_frame(grpc_request(image, model_name)))
    port, gport = free_port(), free_port()
    protocols = {
        "rest": (f"http://127.0.0.1:{port}/v2/models/{model_name}/infer", rest_body,
                 {"content-type": "application/json"}, True, "code_200"),
        "grpc": (f"http://127.0.0.1:{gport}/inference.GRPCInferenceService/ModelInfer", grpc_body,
                 {"content-type": "application/grpc", "te": "trailers"}, False, "grpc_OK"),
    }
    points = []
    with Server("kiln tiny rest+grpc", kiln_cmd(store, model_name, port, True, gport), port, "/v2/health/ready",
                work / "kiln-grpc.log", env) as server:
        check_answer(server, f"/v2/models/{model_name}/infer", body, expected)
        for proto, (url, data, headers, h1, ok_key) in protocols.items():
            run_h2load(url, data, max(args.concurrency), args.warmup, headers, h1=h1, log=work / "h2-warm.log")
            for c in args.concurrency:
                time.sleep(0.5)
                before, cpu0 = scrape(server.base), server.cpu_seconds()
                r = run_h2load(url, data, c, args.duration, headers, h1=h1, log=work / f"h2-{proto}-{c}.log")
                cpu1, after = server.cpu_seconds(), scrape(server.base)
                served = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after if k.startswith(("code_", "grpc_"))}
                ok = served.get(ok_key, 0.0)
                points.append({"protocol": proto, "concurrency": c, **r, "server_ok": int(ok),
                               "server_not_ok": int(sum(v for k, v in served.items() if k != ok_key)),
                               "server_cpu_us_per_request": round((cpu1 - cpu0) / max(r["requests"], 1) * 1e6, 1)})
                print(f"  h2load kiln {proto:<5} c={c:<3} {r['rps']:>8.1f} req/s  p99 {r['p99_ms']:>7.2f} ms  "
                      f"server OK {int(ok)} not OK {points[-1]['server_not_ok']}", file=sys.stderr, flush=True)
    points += grpc_floor(grpc_body, protocols["grpc"][2], args, work, env)
    return points


def grpc_floor(body: Path, headers: dict[str, str], args: argparse.Namespace, work: Path,
               env: dict[str, str]) -> list[dict[str, Any]]:
    """grpc.aio on uvloop answering a fixed response (bench/grpc_echo.py), same h2load runs:
    the most any Python handler behind grpcio can reach here."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "grpc_echo.py"), str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/inference.GRPCInferenceService/ModelInfer"
    points = []
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("bench/grpc_echo.py did not start")
            time.sleep(0.2)
        run_h2load(url, body, max(args.concurrency), args.warmup, headers, h1=False, log=work / "h2-warm.log")
        for c in args.concurrency:
            time.sleep(0.5)
            r = run_h2load(url, body, c, args.duration, headers, h1=False, log=work / f"h2-echo-{c}.log")
            points.append({"protocol": "grpc_echo_floor", "concurrency": c, **r, "server_ok": r["succeeded"],
                           "server_not_ok": 0})
            print(f"  h2load grpc.aio echo c={c:<3} {r['rps']:>8.1f} req/s", file=sys.stderr, flush=True)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    return points


def environment(peer_versions: dict[str, dict[str, str | None]]) -> dict[str, Any]:
    import importlib.metadata as md

    import onnxruntime as ort

    from kiln.runtime import cpu_quota

    commit = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        commit = proc.stdout.strip() or "unknown"
    cpu_model = ""
    with contextlib.suppress(OSError):
        cpu_model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                          if ln.startswith("model name")), "")
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()[:1]
    h2load_version = subprocess.run(["h2load", "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    return {
        "kiln_commit": commit,
        "cpu_count": os.cpu_count(),
        "cpu_quota": cpu_quota(),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "onnxruntime": ort.__version__,
        "kiln_server_stack": {p: md.version(p) for p in ("fastapi", "uvicorn", "pydantic", "numpy", "grpcio")},
        "kiln_server_has_uvloop_httptools": all(_installed(p) for p in ("uvloop", "httptools")),
        "peer_envs": peer_versions,
        "wrk": wrk_version[0] if wrk_version else "unknown",
        "h2load": h2load_version[0] if h2load_version else "unknown",
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _installed(dist: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(dist)
        return True
    except md.PackageNotFoundError:
        return False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from bench.peers import PEERS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds of wrk per point (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of wrk warm-up per server (default 2)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 s per point, 1 s warm-ups")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument("--ort-seconds", type=float, default=2.0, help="in-process ONNX Runtime loop time per case")
    parser.add_argument("--peers", nargs="*", choices=sorted(PEERS), default=sorted(PEERS),
                        help="peer servers to measure on the tiny model (default: all; none: --peers)")
    for name, peer in PEERS.items():
        parser.add_argument(f"--{name}-venv", type=Path, default=peer.default_venv,
                            help=f"{name}'s own environment, created when absent (default {peer.default_venv})")
    parser.add_argument("--skip-grpc", action="store_true", help="no h2load gRPC-vs-REST comparison")
    parser.add_argument("--heavy-channels", type=int, nargs=2, default=[96, 192], metavar=("C1", "C2"))
    parser.add_argument("--heavy-hidden", type=int, default=2048)
    parser.add_argument("--heavy-layers", type=int, default=2)
    parser.add_argument("--noise-tolerance", type=float, default=0.05,
                        help="band under 1.0 within which 'batching must not lower throughput' counts as met")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.ort_seconds = 2, 1, 0.5
    return args


def measure_kiln(store: Path, body: bytes, expected: dict[str, int], lua: Path, args: argparse.Namespace,
                 work: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    """kiln serve on both models, batching on and off (REST, wrk)."""
    points = []
    for key in ("tiny", "heavy"):
        name = MODEL_NAMES[key]
        path = f"/v2/models/{name}/infer"
        for batching in (True, False):
            port = free_port()
            label = f"kiln {key} batching {'on' if batching else 'off'}"
            with Server(label, kiln_cmd(store, name, port, batching), port, "/v2/health/ready",
                        work / f"kiln-{key}-{batching}.log", env) as server:
                check_answer(server, path, body, expected[key])
                for p in measure_server(server, path, lua, args.concurrency, args.duration, args.warmup, True):
                    points.append({"server": "kiln", "model": key, "batching": batching, **p})
    return points


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A SIGTERM unwinds like Ctrl-C, so every server started is killed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for tool, package in (("wrk", "wrk"), ("h2load", "nghttp2-client")):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench/serve.py needs {tool}: apt-get install -y {package}")

    from bench.peers import PEERS, ort_session
    from kiln.data import mnist_5k

    venvs = {name: getattr(args, f"{name}_venv") for name in args.peers}
    peer_versions = {name: PEERS[name].ensure_venv(venvs[name]) for name in args.peers}
    images, labels = mnist_5k()
    image = images[0]
    body = json.dumps({"inputs": [{"name": "pixels", "shape": [1, 28, 28], "datatype": "UINT8",
                                   "data": image.reshape(-1).tolist()}]}, separators=(",", ":")).encode()
    started = time.perf_counter()
    env_info = environment(peer_versions)
    # export_onnx and deploy() record the commit: hand it over rather than have them ask git
    os.environ["KILN_GIT_COMMIT"] = env_info["kiln_commit"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}

    with tempfile.TemporaryDirectory(prefix="kiln-bench-serve-") as tmp:
        work = Path(tmp)
        store = work / "store"
        print("exporting and deploying the models...", file=sys.stderr, flush=True)
        models = build_models(work, store, images, labels, args)
        print("in-process ONNX Runtime...", file=sys.stderr, flush=True)
        ort_rows = in_process_ort(models, image, args.ort_seconds)
        for key, info in models.items():
            b1 = [r for r in ort_rows if r["model"] == key and r["batch"] == 1]
            info["batch1_ms"] = {r["session"]: r["mean_ms"] for r in b1}
            info["batch64_ms_per_image"] = {r["session"]: round(1e3 / r["images_per_s"], 4)
                                            for r in ort_rows if r["model"] == key and r["batch"] == 64}
        models["heavy"]["batch1_at_least_1ms"] = min(models["heavy"]["batch1_ms"].values()) >= 1.0
        codec = kiln_codec(store, MODEL_NAMES["tiny"], body, args.ort_seconds / 2)
        # each model's answer to the body, to check every server once before timing it
        from kiln.runtime import predict

        expected = {key: int(predict(info["onnx"], image[None], kiln_session_settings())[1][0])
                    for key, info in models.items()}
        lua = work / "post_v2.lua"
        lua.write_text(LUA % {"body": body.decode()})
        points = measure_kiln(store, body, expected, lua, args, work, env)
        points += measure_peers(args.peers, venvs, models["tiny"], body, expected["tiny"], lua, args, work, env)
        grpc_points = [] if args.skip_grpc else grpc_vs_rest(store, MODEL_NAMES["tiny"], body, image,
                                                             expected["tiny"], args, work, env)
        for info in models.values():
            info["onnx"] = info["onnx"].name

    settings = kiln_session_settings()
    result = {
        "benchmark": "serve",
        "command": " ".join(["python bench/serve.py", *(argv if argv is not None else sys.argv[1:])]),
        "elapsed_s": round(time.perf_counter() - started, 1),
        "environment": {**env_info, "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "settings": {
            **SETTINGS_NOTES, "duration_s": args.duration, "warmup_s": args.warmup, "concurrency": args.concurrency,
            "body_bytes": len(body), "session_settings": settings.model_dump(),
            "onnx_runtime_options": ort_session.describe(settings),
        },
        "models": models,
        "in_process_ort": ort_rows,
        "kiln_codec_in_process": codec,
        "points": points,
        "grpc_vs_rest": grpc_points,
        "ratios": compute_ratios(points, ort_rows, grpc_points, args.noise_tolerance),
        "breakdown_columns": BREAKDOWN_COLUMNS,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print_summary(result)
    print(f"\nwrote {args.output} in {result['elapsed_s']:.0f} s")
    return 0


SETTINGS_NOTES = {
    "wrk": "-t min(c, 2) -c c --latency --timeout 10s, Lua POST of one image (KServe V2 JSON)",
    "h2load": "-t 1 -c c -m 1 -D duration: REST JSON over HTTP/1.1 (--h1) and gRPC ModelInfer (raw input "
              "contents, as tritonclient sends) over HTTP/2, the same kiln server; rps from the server's "
              "own OK counters, since h2load counts a gRPC error as a success",
    "image": "mnist_5k()[0] (a real digit), pixels UINT8 [1, 28, 28]",
    "kiln_server": "kiln serve --device cpu --batching|--no-batching --grpc-port 0, other settings default "
                   "(max batch 64, max queue delay 500 us, 4 inference threads, intra-op threads = CPU quota)",
    "peers": "bench/peers: KServe 0.21 ModelServer (no batching), MLServer 1.7.1 (adaptive batching 64 / 0.5 ms), "
             "Triton via nvidia-pytriton 0.7.0 (dynamic batching 64 / 500 us), each from its own venv, on the "
             "tiny model, every one opening its session with kiln.runtime from session_settings",
    "session_settings_note": "kiln.runtime.SessionSettings of kiln serve --device cpu; every peer and the "
                             "in-process server_options rows get the same object (onnx_runtime_options: what "
                             "it sets in ONNX Runtime)",
    "rps": "requests answered 2xx/3xx per second of the run",
    "note": "the load generator, the server and its inference threads share the same CPUs; server CPU per "
            "request is /proc's, for the whole process group",
}

BREAKDOWN_COLUMNS = {
    "client_latency_us": "wrk's mean latency",
    "handler_total_us": "kiln_inference_request_duration_seconds: body read to response built",
    "queue_us": "kiln_inference_queue_duration_seconds: waiting for the inference run to start",
    "inference_us": "ONNX Runtime time of the run the request was in (compute _sum / _count)",
    "inference_amortised_us": "ONNX Runtime time per request (compute _sum / requests)",
    "decode_encode_other_us": "handler_total - queue - inference: JSON parse, tensor decode, validation, "
                              "response encode, thread-pool hops",
    "outside_handler_us": "client_latency - handler_total: HTTP parsing by uvicorn (httptools), "
                          "socket I/O, event-loop waits, and wrk itself",
}


if __name__ == "__main__":
    sys.exit(main())
