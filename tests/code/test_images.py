"""Packaging: pins, extras per image, the Dockerfiles' content (no Docker engine here)
and images.toml; and a venv holding only the `serve` extra serves a stored model
without torch."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import socket
import subprocess
import time
import tomllib
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from contract_model import reference, weights, write_contract_onnx
from helpers import REPO_ROOT
from kiln import images as kiln_images
from kiln.contract import IMAGE_SIZE, INPUT_NAME
from kiln.store import ModelStore

pytestmark = pytest.mark.slow  # builds a venv with the serve extra alone

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
HEAVY = ("torch", "kfp", "dvc", "great-expectations", "great_expectations", "pandas", "scikit-learn", "onnx==")
SERVE_VENV = REPO_ROOT / "build" / "serve-venv"


def name_of(pin: str) -> str:
    return re.split(r"[\[=<>!~ ]", pin, maxsplit=1)[0].lower().replace("_", "-")


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO_ROOT / dockerfile).read_text())
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            op, _, args = line.strip().partition(" ")
            out.append((op.upper(), args.strip()))
    return out


def arg_defaults(steps: list[tuple[str, str]]) -> dict[str, str | None]:
    return {a.partition("=")[0]: (a.partition("=")[2] or None) for op, a in steps if op == "ARG"}


def pip_installs(steps: list[tuple[str, str]]) -> list[list[str]]:
    return [shlex.split(a) for op, a in steps if op == "RUN" and "pip install" in a]


def test_pins_are_exact_without_local_version_labels() -> None:
    pins = [p for deps in EXTRAS.values() for p in deps] + PYPROJECT["project"]["dependencies"]
    pins += [line for line in (REPO_ROOT / "constraints.txt").read_text().splitlines() if line and not line.startswith("#")]
    for pin in pins:
        assert re.fullmatch(r"[A-Za-z0-9_.\-\[\],]+==[0-9][0-9A-Za-z.]*", pin), pin  # no `+cpu`, no ranges
    constrained = {name_of(line) for line in (REPO_ROOT / "constraints.txt").read_text().splitlines()}
    assert {name_of(p) for deps in EXTRAS.values() for p in deps} <= constrained


def test_extras_match_the_images() -> None:
    assert PYPROJECT["project"]["dependencies"] == []
    serve, serve_gpu = set(EXTRAS["serve"]), set(EXTRAS["serve-gpu"])
    assert serve - serve_gpu == {"onnxruntime==1.31.1"} and serve_gpu - serve == {"onnxruntime-gpu==1.31.1"}
    assert not [p for p in serve if p.lower().startswith(HEAVY)]
    pipeline = {name_of(p) for p in EXTRAS["pipeline"]}
    assert {"torch", "dvc", "dvc-s3", "great-expectations", "kfp", "kfp-kubernetes"} <= pipeline
    assert not pipeline & {"onnxruntime", "onnxruntime-gpu"}  # the image pairs it with serve or serve-gpu


def test_images_toml_digests_and_references() -> None:
    data = kiln_images.load()
    for base in data["bases"].values():
        assert kiln_images.DIGEST_RE.match(base["digest"])
    found = kiln_images.images()
    assert set(found) == {"steps", "train", "serve", "serve-cuda"}
    for image in found.values():
        assert image.ref.startswith(data["registry"] + "/") and image.ref.endswith(":" + data["tag"])
        command = image.build_command()
        assert command[command.index("-f") + 1] == image.dockerfile
        assert f"BASE_IMAGE={image.base_ref}" in command and "@sha256:" in image.base_ref


def test_a_malformed_digest_is_refused(tmp_path: Path) -> None:
    bad = (REPO_ROOT / "images.toml").read_text().replace("sha256:" + "0" * 64, "sha256:abc", 1)
    (tmp_path / "images.toml").write_text(bad)
    with pytest.raises(kiln_images.ImagesError, match="not sha256"):
        kiln_images.load(tmp_path / "images.toml")


def test_pipeline_default_image_is_the_steps_image() -> None:
    from pipelines.training_pipeline import DEFAULT_IMAGE

    assert DEFAULT_IMAGE == kiln_images.image_ref("steps")


@pytest.mark.parametrize("key", ["steps", "train", "serve", "serve-cuda"])
def test_dockerfile_builds_from_the_pinned_base_as_a_non_root_user(key: str) -> None:
    data = kiln_images.load()
    image = kiln_images.images()[key]
    steps = instructions(image.dockerfile)
    args = arg_defaults(steps)
    # The base comes only from the build argument make images passes (images.toml).
    assert steps[0] == ("ARG", "BASE_IMAGE") and [a for op, a in steps if op == "FROM"] == ["${BASE_IMAGE}"]
    users = [a for op, a in steps if op == "USER"]
    assert users and users[-1] == "${KILN_UID}:${KILN_GID}"
    assert (args["KILN_UID"], args["KILN_GID"]) == (str(data["uid"]), str(data["gid"])) and data["uid"] != 0
    assert [op for op, _ in steps].index("USER") > max(i for i, (op, _) in enumerate(steps) if op == "RUN")
    assert set(image.build_args) <= set(args)


def installed_extras(key: str) -> tuple[set[str], list[list[str]]]:
    image = kiln_images.images()[key]
    steps = instructions(image.dockerfile)
    installs = pip_installs(steps)
    spec = next(arg for cmd in installs for arg in cmd if arg.startswith(".["))
    spec = spec.replace("${SERVE_EXTRA}", image.build_args.get("SERVE_EXTRA", arg_defaults(steps).get("SERVE_EXTRA") or ""))
    assert all("-c" in cmd and "constraints.txt" in cmd for cmd in installs)
    return set(spec[2:-1].split(",")), installs


def test_each_dockerfile_installs_its_extras() -> None:
    expected = {"steps": {"pipeline", "serve"}, "train": {"pipeline", "serve-gpu", "cuda"},
                "serve": {"serve"}, "serve-cuda": {"serve-gpu", "cuda"}}
    for key, extras in expected.items():
        got, installs = installed_extras(key)
        assert got == extras and got <= set(EXTRAS), key
        assert installs[-1][-1] == "." and "--no-deps" in installs[-1]  # the code layer adds nothing
    for key, index in (("steps", "/whl/cpu"), ("train", "/whl/cu")):
        image = kiln_images.images()[key]
        steps = instructions(image.dockerfile)
        assert index in image.build_args["TORCH_INDEX"] and index in arg_defaults(steps)["TORCH_INDEX"]
        assert any("${TORCH_INDEX}" in cmd for cmd in pip_installs(steps))
    assert "torch" not in json.dumps(instructions("components/Dockerfile.serve")).lower()


# --- the serve extra alone -------------------------------------------------------


@pytest.fixture(scope="module")
def serve_venv() -> Path:
    """build/serve-venv: `pip install -e .[serve]` with constraints.txt, rebuilt when the
    pins change (the editable install always runs this checkout's code)."""
    pins = hashlib.sha256((REPO_ROOT / "pyproject.toml").read_bytes() + (REPO_ROOT / "constraints.txt").read_bytes())
    stamp = SERVE_VENV / f".installed-{pins.hexdigest()[:16]}"
    if not stamp.exists():
        subprocess.run(["rm", "-rf", str(SERVE_VENV)], check=True)
        cmds = [["python3.11", "-m", "venv", str(SERVE_VENV)],
                [str(SERVE_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", "-c",
                 str(REPO_ROOT / "constraints.txt"), "-e", f"{REPO_ROOT}[serve]"]]
        for cmd in cmds:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if out.returncode:
                pytest.fail(f"cannot build the serve venv ({' '.join(cmd)}): {out.stderr.strip()[-2000:]}")
        stamp.touch()
    return SERVE_VENV


def test_serve_extra_alone_serves_a_stored_model_without_torch(serve_venv: Path, tmp_path: Path) -> None:
    python = serve_venv / "bin" / "python"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no PYTHONPATH: only the venv's packages
    for module in ("torch", "kfp", "dvc", "great_expectations", "pandas"):
        probe = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, text=True, env=env)
        assert probe.returncode == 1 and "ModuleNotFoundError" in probe.stderr, module
    weight = weights(3)
    store = ModelStore(tmp_path / "store")
    store.set_alias("mnist", store.add_version("mnist", write_contract_onnx(tmp_path / "m.onnx", weight), {}).version)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(serve_venv / "bin" / "kiln"), "serve", "--store", str(store.root), "--model", "mnist",
                               "--host", "127.0.0.1", "--port", str(port), "--grpc-port", "0"], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "kiln serve did not become ready in 60 s"
            time.sleep(0.2)
        pixels = np.random.default_rng(0).integers(0, 256, (3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
        body = {"inputs": [{"name": INPUT_NAME, "shape": list(pixels.shape), "datatype": "UINT8",
                            "data": pixels.ravel().tolist()}]}
        request = urllib.request.Request(f"{base}/v2/models/mnist/infer", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as r:
            outputs = {o["name"]: o for o in json.load(r)["outputs"]}
        probs, labels = reference(weight, pixels)
        assert outputs["label"]["data"] == labels.tolist()
        np.testing.assert_allclose(np.array(outputs["probabilities"]["data"]).reshape(3, -1), probs, atol=1e-6)
    finally:
        server.terminate()
        server.wait(30)
