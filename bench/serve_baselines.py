"""``bench/serve.py``'s models and in-process baselines: the two ONNX models it deploys,
ONNX Runtime in a loop from one caller thread, and kiln's codec timed in-process."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

MODEL_NAMES = {"tiny": "mnist", "heavy": "mnist-heavy"}


def kiln_session_settings():
    """The ONNX Runtime settings ``kiln serve`` builds with the flags of ``kiln_cmd``
    (``--device cpu``; intra-op threads = the CPU quota): every peer and baseline gets them
    (tests/serving/test_runtime.py checks that they are the same)."""
    from kiln.runtime import SessionSettings

    return SessionSettings(device="cpu")


# --- models ------------------------------------------------------------------------------------


def heavy_net(channels: tuple[int, int], hidden: int, layers: int):
    """kiln's ConvNet, wider, with a deeper and wider head (normalised [N,1,28,28] -> logits [N,10])."""
    from torch import nn

    c1, c2 = channels
    mods: list[nn.Module] = [
        nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c2 * 7 * 7, hidden), nn.ReLU(),
    ]
    for _ in range(layers - 1):
        mods += [nn.Linear(hidden, hidden), nn.ReLU()]
    mods.append(nn.Linear(hidden, 10))
    return nn.Sequential(*mods)


def build_models(work: Path, store: Path, images: np.ndarray, labels: np.ndarray,
                 args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Export both models and deploy each as version 1 (production) of its name in ``store``."""
    import hashlib

    import onnx
    import pandas as pd
    import torch

    from kiln.deploy import deploy
    from kiln.export import _export_proto, check_onnx_contract, export_onnx
    from kiln.models import ServingModel, build_model
    from kiln.train import TrainConfig

    models: dict[str, dict[str, Any]] = {}
    # tiny: kiln's own architecture and export path (contract + parity gate) on real digits
    torch.manual_seed(0)
    config = TrainConfig(model="cnn", device="cpu")
    net = build_model(config).eval()
    ckpt = work / "tiny.pt"
    torch.save({"config": config.to_dict(), "state_dict": net.state_dict(), "history": [], "best_epoch": None}, ckpt)
    pixels = [img.tobytes() for img in images[:256]]
    val_df = pd.DataFrame({"id": [f"{i:05d}" for i in range(len(pixels))], "label": labels[:256].astype(np.int64),
                           "pixels": pixels, "sha256": [hashlib.sha256(p).hexdigest() for p in pixels]})
    export_onnx(ckpt, work / "tiny.onnx", val_df, {"data_version": "bench-untrained"})
    models["tiny"] = {"architecture": "kiln ConvNet (TrainConfig(model='cnn')), seeded, untrained",
                      "parameters": sum(p.numel() for p in net.parameters()), "onnx": work / "tiny.onnx"}

    # heavy: same contract, a wider network; exported with kiln's exporter and contract check
    torch.manual_seed(0)
    c1, c2 = args.heavy_channels
    hnet = heavy_net((c1, c2), args.heavy_hidden, args.heavy_layers).eval()
    proto = _export_proto(ServingModel(hnet).eval())
    onnx.checker.check_model(proto, full_check=True)
    check_onnx_contract(proto)
    spec = {"model": "bench-heavy-cnn", "channels": [c1, c2], "hidden": args.heavy_hidden, "layers": args.heavy_layers}
    proto.metadata_props.add(key="train_config", value=json.dumps(spec))
    onnx.save_model(proto, str(work / "heavy.onnx"), save_as_external_data=False)
    models["heavy"] = {"architecture": f"conv({c1})-pool-conv({c2})-pool-" + "-".join([f"fc({args.heavy_hidden})"] * args.heavy_layers)
                       + "-fc(10), batchnorm+relu, seeded, untrained",
                       "parameters": sum(p.numel() for p in hnet.parameters()), "onnx": work / "heavy.onnx"}

    for key, info in models.items():
        version = deploy(info["onnx"], store, MODEL_NAMES[key], {"note": "bench/serve.py"})
        info.update(model_name=MODEL_NAMES[key], version=version.version, onnx=version.onnx_path,
                    onnx_bytes=version.onnx_path.stat().st_size, sha256=version.meta["sha256"])
    return models


# --- in-process measurements -------------------------------------------------------------------


def ort_loop(session, feed: dict[str, np.ndarray], seconds: float) -> dict[str, Any]:
    """Run ``session`` on ``feed`` back to back for ``seconds``: per-call latency and calls/s."""
    for _ in range(20):
        session.run(None, feed)
    times: list[float] = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or len(times) < 20:
        t = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t)
    rows = next(iter(feed.values())).shape[0]
    mean = sum(times) / len(times)
    return {"calls": len(times), "mean_ms": round(mean * 1e3, 4), "p50_ms": round(statistics.median(times) * 1e3, 4),
            "p99_ms": round(float(np.percentile(times, 99)) * 1e3, 4), "calls_per_s": round(1 / mean, 1),
            "images_per_s": round(rows / mean, 1)}


def in_process_ort(models: dict[str, dict[str, Any]], image: np.ndarray, seconds: float) -> list[dict[str, Any]]:
    import onnxruntime as ort

    from kiln.runtime import create_session

    rows = []
    for key, info in models.items():
        # ONNX Runtime's own defaults (every core, spinning on) on purpose: the row says
        # what the server's settings change.
        sessions = {
            "default_options": lambda path: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]),
            "server_options": lambda path: create_session(path, kiln_session_settings()),
        }
        for label, open_session in sessions.items():
            session = open_session(info["onnx"])
            for batch in (1, 64):
                feed = {"pixels": np.ascontiguousarray(np.repeat(image[None], batch, axis=0))}
                r = ort_loop(session, feed, seconds if batch == 1 else seconds / 2)
                rows.append({"model": key, "session": label, "batch": batch, **r})
            del session
    return rows


def kiln_codec(store: Path, model_name: str, body: bytes, seconds: float) -> dict[str, Any]:
    """Kiln's own decode (parse + validate) and encode (JSON response) of ``body``, timed in-process."""
    from kiln.serving import codec
    from kiln.serving.config import DEFAULT_MAX_BODY_BYTES
    from kiln.serving.predictor import OnnxPredictor
    from kiln.store import ModelStore

    predictor = OnnxPredictor(ModelStore(store).production(model_name), session=kiln_session_settings())
    predictor.load()
    headers = {"content-type": "application/json"}
    parsed, feed, wanted = codec.decode_request(predictor, body, headers, DEFAULT_MAX_BODY_BYTES)
    outputs = predictor.run(feed)

    def timed(fn) -> float:
        for _ in range(50):
            fn()
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds or n < 50:
            fn()
            n += 1
        return (time.perf_counter() - started) / n * 1e6

    return {
        "body_bytes": len(body),
        "decode_us": round(timed(lambda: codec.decode_request(predictor, body, headers, DEFAULT_MAX_BODY_BYTES)), 1),
        "pydantic_parse_us": round(timed(lambda: codec.parse_request(body)), 1),
        "inference_us": round(timed(lambda: predictor.run(feed)), 1),
        "encode_us": round(timed(lambda: codec.encode_response(predictor, parsed, wanted, outputs)), 1),
        "note": "one caller thread, no load: decode_request = JSON parse (pydantic) + tensor decode + validation; "
                "encode_response = response dict + JSON rendering (JSONResponse)",
    }
