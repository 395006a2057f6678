"""kiln.train: config handling, determinism, learning, checkpoints."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

import kiln
from kiln import train as train_mod
from kiln.augment import random_rotate, random_shift
from kiln.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, weights_sha256
from kiln.contract import NUM_CLASSES
from kiln.dataset import to_arrays
from kiln.models import MNIST_MEAN, MNIST_STD, MODEL_TYPES, ServingModel, build_model, predict_proba
from kiln.train import TrainConfig, train

QUIET = {"log": lambda _: None}


# --- config ---


def test_config_round_trips_through_dict_and_json() -> None:
    config = TrainConfig(model="mlp", epochs=3, lr=1e-3, weight_decay=0.0, seed=7, device="cpu", patience=0)
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_from_dict_fills_defaults_for_missing_fields() -> None:
    assert TrainConfig.from_dict({"epochs": 2}) == TrainConfig(epochs=2)


def test_from_dict_rejects_unknown_keys_by_name() -> None:
    with pytest.raises(ValueError, match=r"unknown TrainConfig field\(s\) \['learning_rate'\]"):
        TrainConfig.from_dict({"learning_rate": 0.1, "epochs": 2})


@pytest.mark.parametrize(
    "bad",
    [{"model": "resnet"}, {"device": "tpu"}, {"epochs": 0}, {"batch_size": 2.5}, {"lr": 0}, {"dropout": 1.0},
     {"max_shift": 28}, {"lr": float("nan")}, {"epochs": True}, {"max_rotation": 90}, {"max_rotation": -1},
     {"amp": "yes"}],
)
def test_config_rejects_invalid_values(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        TrainConfig(**bad)


# --- models ---


@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_build_model_maps_normalised_images_to_logits(model: str) -> None:
    net = build_model(TrainConfig(model=model)).eval()
    assert net(torch.zeros(5, 1, 28, 28)).shape == (5, NUM_CLASSES)


def test_families_come_from_the_registry() -> None:
    assert MODEL_TYPES == ("cnn", "mlp") and train_mod.MODELS == MODEL_TYPES
    # a checkpoint's saved config (a plain dict) is enough to rebuild its network
    assert isinstance(build_model({"model": "cnn", "dropout": 0.0}), torch.nn.Module)
    with pytest.raises(ValueError, match=r"unknown model 'rnn'; known families are \['cnn', 'mlp'\]"):
        build_model({"model": "rnn", "dropout": 0.0})


def test_mlp_is_784_512_10() -> None:
    linears = [m for m in build_model(TrainConfig(model="mlp")).modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 512), (512, 10)]


def test_serving_model_normalises_and_returns_probabilities_and_labels() -> None:
    torch.manual_seed(0)
    net = build_model(TrainConfig(model="mlp")).eval()
    pixels = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    probabilities, label = ServingModel(net).eval()(pixels)
    assert probabilities.dtype == torch.float32 and probabilities.shape == (4, NUM_CLASSES)
    assert label.dtype == torch.int64 and label.shape == (4,)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(4))
    # the same as normalising by hand with the MNIST constants and running the net
    x = ((pixels.float() / 255 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)
    torch.testing.assert_close(probabilities, torch.softmax(net(x), dim=1))
    assert torch.equal(label, probabilities.argmax(dim=1))


def test_random_shift_moves_digits_without_losing_ink(tables) -> None:
    pixels, _ = to_arrays(tables.train.head(64))
    images = torch.tensor(pixels)
    shifted = random_shift(images, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8
    assert not torch.equal(shifted, images)
    # MNIST digits sit inside a 4-pixel empty border, so a 2-pixel shift keeps all ink
    assert torch.equal(shifted.sum(dim=(1, 2), dtype=torch.int64), images.sum(dim=(1, 2), dtype=torch.int64))
    assert random_shift(images, 0, torch.Generator()) is images


def test_random_rotate_turns_digits_about_their_centre(tables) -> None:
    pixels, _ = to_arrays(tables.train.head(64))
    images = torch.tensor(pixels)
    rotated = random_rotate(images, 15.0, torch.Generator().manual_seed(0))
    assert rotated.shape == images.shape and rotated.dtype == torch.uint8
    assert not torch.equal(rotated, images)
    # a rotation keeps the digit: ink is roughly conserved and its centroid stays put
    ink_before = images.sum(dim=(1, 2), dtype=torch.float64)
    ink_after = rotated.sum(dim=(1, 2), dtype=torch.float64)
    assert torch.allclose(ink_after, ink_before, rtol=0.1)
    assert float(torch.nn.functional.cosine_similarity(rotated.flatten(1).double(), images.flatten(1).double()).min()) > 0.5
    # the same generator seed gives the same angles; 0 degrees is the identity
    assert torch.equal(rotated, random_rotate(images, 15.0, torch.Generator().manual_seed(0)))
    assert random_rotate(images, 0.0, torch.Generator()) is images
    # a quarter turn of a single bright pixel lands where rotation says it must
    dot = torch.zeros(1, 28, 28, dtype=torch.uint8)
    dot[0, 14, 20] = 255  # right of the centre
    turned = random_rotate(dot, 45.0, torch.Generator().manual_seed(1))
    assert int(turned.sum()) > 0 and int(turned[0, 14, 20]) < 255


# --- training ---


def test_tiny_run_learns(trained) -> None:
    result = trained.result
    assert result.epochs_run == trained.config.epochs == len(result.history)
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert set(result.history[0]) == {"epoch", "train_loss", "val_loss", "val_accuracy", "lr"}
    # chance is 0.1; a few epochs on 1,000 digits should be far above it
    assert result.best_val_accuracy >= 0.8
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.best_val_loss == min(row["val_loss"] for row in result.history)
    assert result.device == "cpu"


def test_training_is_deterministic_on_cpu_and_leaves_caller_rng_alone(tables, tmp_path) -> None:
    config = TrainConfig(model="cnn", epochs=2, batch_size=32, device="cpu", seed=3)
    train_df, val_df = tables.train.head(256), tables.val.head(100)
    torch.manual_seed(1234)
    rng_before = torch.get_rng_state()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    fill_before = torch.utils.deterministic.fill_uninitialized_memory
    first = train(config, train_df, val_df, tmp_path / "a.pt", **QUIET)
    assert torch.equal(torch.get_rng_state(), rng_before)
    # the global switches train() flips for itself are the caller's again
    assert torch.are_deterministic_algorithms_enabled() == deterministic_before
    assert torch.utils.deterministic.fill_uninitialized_memory == fill_before
    second = train(config, train_df, val_df, tmp_path / "b.pt", **QUIET)
    other_seed = train(TrainConfig.from_dict({**config.to_dict(), "seed": 4}), train_df, val_df, tmp_path / "c.pt", **QUIET)

    assert first.history == second.history
    a, b = read_checkpoint(tmp_path / "a.pt")["state_dict"], read_checkpoint(tmp_path / "b.pt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert other_seed.history != first.history  # the seed really is used


def test_early_stopping_keeps_best_epoch(tables, tmp_path, monkeypatch) -> None:
    # Validation loss that only gets worse after epoch 2: with patience 2 the run
    # must stop after epoch 4 and report epoch 2 as best.
    losses = iter([0.5, 0.4, 0.6, 0.7, 0.8, 0.9])
    monkeypatch.setattr(train_mod, "_evaluate", lambda *a, **k: (next(losses), 0.5))
    config = TrainConfig(model="mlp", epochs=6, patience=2, device="cpu")
    result = train(config, tables.train.head(64), tables.val.head(16), tmp_path / "m.pt", **QUIET)
    assert result.epochs_run == 4
    assert (result.best_epoch, result.best_val_loss) == (2, 0.4)
    assert read_checkpoint(tmp_path / "m.pt")["best_epoch"] == 2


def test_train_rejects_empty_or_out_of_range_tables(tables, tmp_path) -> None:
    config = TrainConfig(epochs=1, device="cpu")
    with pytest.raises(ValueError, match="val table is empty"):
        train(config, tables.train.head(8), tables.val.head(0), tmp_path / "m.pt", **QUIET)
    bad = tables.train.head(8).assign(label=11)
    with pytest.raises(ValueError, match="labels outside"):
        train(config, bad, tables.val.head(8), tmp_path / "m.pt", **QUIET)
    assert not (tmp_path / "m.pt").exists()


# --- checkpoints ---


class _Crash(Exception):
    pass


def test_an_interrupted_run_resumes_to_the_same_result(tables, tmp_path) -> None:
    config = TrainConfig(model="cnn", epochs=3, batch_size=32, device="cpu", seed=5, patience=0)
    train_df, val_df = tables.train.head(256), tables.val.head(100)
    straight = train(config, train_df, val_df, tmp_path / "straight.pt", **QUIET)

    def crash_after_epoch_2(message: str) -> None:
        if message.startswith("epoch 2:"):
            raise _Crash  # as if the pod were preempted once epoch 2 was checkpointed

    with pytest.raises(_Crash):
        train(config, train_df, val_df, tmp_path / "run.pt", log=crash_after_epoch_2)
    assert read_checkpoint(tmp_path / "run.pt")["resume"]["epoch"] == 2
    resumed = train(config, train_df, val_df, tmp_path / "run.pt", resume_from=tmp_path / "run.pt", **QUIET)

    assert resumed.resumed_from_epoch == 2 and [row["epoch"] for row in resumed.history] == [1, 2, 3]
    assert resumed.history == straight.history
    assert resumed.weights_sha256 == straight.weights_sha256
    # a finished run resumes to itself, into another file
    again = train(config, train_df, val_df, tmp_path / "copy.pt", resume_from=tmp_path / "run.pt", **QUIET)
    assert again.weights_sha256 == straight.weights_sha256 and (tmp_path / "copy.pt").is_file()


def test_resume_refuses_a_checkpoint_of_another_config(trained, tables, tmp_path) -> None:
    other = TrainConfig.from_dict({**trained.config.to_dict(), "lr": 0.01})
    with pytest.raises(CheckpointError, match=r"different config \(fields \['lr'\]\)"):
        train(other, tables.train.head(64), tables.val.head(16), tmp_path / "m.pt", resume_from=trained.checkpoint,
              **QUIET)


def test_checkpoint_holds_config_history_and_best_weights(trained, tables) -> None:
    ckpt = read_checkpoint(trained.checkpoint)
    assert ckpt["config"] == trained.config.to_dict()
    assert ckpt["history"] == trained.result.history
    assert ckpt["kiln_version"] == kiln.__version__
    assert ckpt["best_epoch"] == trained.result.best_epoch

    config, net = load_checkpoint(trained.checkpoint)
    assert config == trained.config.to_dict()
    assert not net.training
    # The reloaded weights reproduce the best epoch's validation metrics exactly.
    pixels, labels = to_arrays(tables.val)
    probabilities = predict_proba(net, pixels)
    assert np.mean(probabilities.argmax(axis=1) == labels) == trained.result.best_val_accuracy
    val_loss = -np.mean(np.log(probabilities[np.arange(len(labels)), labels].astype(np.float64)))
    assert val_loss == pytest.approx(trained.result.best_val_loss, rel=1e-4)


def test_reloading_a_checkpoint_gives_identical_outputs(trained, tables) -> None:
    pixels, _ = to_arrays(tables.test)
    first = predict_proba(load_checkpoint(trained.checkpoint)[1], pixels)
    second = predict_proba(load_checkpoint(trained.checkpoint)[1], pixels, batch_size=7)
    np.testing.assert_array_equal(first.argmax(axis=1), second.argmax(axis=1))
    np.testing.assert_allclose(first, second, rtol=0, atol=1e-6)  # batch size changes only summation order
    np.testing.assert_array_equal(first, predict_proba(load_checkpoint(trained.checkpoint)[1], pixels))


def test_load_checkpoint_rejects_missing_and_mismatched_files(trained, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    ckpt = read_checkpoint(trained.checkpoint)
    torch.save({**ckpt, "config": {**ckpt["config"], "model": "mlp"}}, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match="does not match its config"):
        load_checkpoint(tmp_path / "wrong.pt")
    torch.save({"state_dict": ckpt["state_dict"]}, tmp_path / "noconfig.pt")
    with pytest.raises(CheckpointError, match="missing \\['config'\\]"):
        load_checkpoint(tmp_path / "noconfig.pt")


def test_curves_are_plotted_as_png_and_inline_html(trained, tmp_path) -> None:
    import base64
    import re

    from PIL import Image

    from kiln.train import curves_png, write_curves

    history = trained.result.history
    png_path = write_curves(history, tmp_path / "curves.png", trained.result.best_epoch)
    assert png_path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    page = write_curves(history, tmp_path / "curves.html", trained.result.best_epoch).read_text()
    (encoded,) = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    image = Image.open(io.BytesIO(base64.b64decode(encoded)))
    assert image.format == "PNG" and image.size == (900, 350)
    assert page.count("<tr><td>") == len(history)  # one table row per epoch
    assert f"{history[-1]['val_loss']:.4f}" in page and "http" not in page
    # the plot depends on the numbers: different curves, different picture
    changed = [{**r, "val_loss": r["val_loss"] * 3} for r in history]
    assert curves_png(changed) != curves_png(history)
    with pytest.raises(ValueError, match="no epochs"):
        curves_png([])


def test_run_train_writes_curves_and_logs_metrics(tables, tmp_path) -> None:
    from kiln.train import run_train

    for name in ("train", "val"):
        getattr(tables, name).to_parquet(tmp_path / f"{name}.parquet")
    logged: dict[str, float] = {}
    result = run_train(tmp_path / "train.parquet", tmp_path / "val.parquet", tmp_path / "m.pt",
                       {"model": "mlp", "epochs": 1, "device": "cpu"}, log_metric=logged.__setitem__,
                       curves_path=tmp_path / "out" / "curves.html")
    assert result.epochs_run == 1 and logged["best_epoch"] == 1 and "epoch01_val_loss" in logged
    assert 0 < result.loop_seconds < result.seconds  # the steps alone, without data prep and validation
    assert "data:image/png;base64," in (tmp_path / "out" / "curves.html").read_text()


# --------------------------------------------------------------------------- distributed (DDP, gloo on CPU)


def _torchrun(tmp_path, name: str, overrides: dict, nproc: int = 2) -> list[dict]:
    """Train under ``torchrun --nproc-per-node nproc -m kiln.train``; the ranks' results."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
         "-m", "kiln.train", "--train", str(tmp_path / "train.parquet"), "--val", str(tmp_path / "val.parquet"),
         "--checkpoint", str(tmp_path / f"{name}.pt"), "--config", json.dumps(overrides),
         "--result", str(tmp_path / f"{name}_{{rank}}.json")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp_path / f"{name}_{rank}.json").read_text()) for rank in range(nproc)]


@pytest.fixture(scope="module")
def ddp_tables(tables, tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    small_train, small_val = tables.train.head(400), tables.val
    small_train.to_parquet(d / "train.parquet")
    small_val.to_parquet(d / "val.parquet")
    return d, small_train, small_val


def test_rank_slices_partition_the_global_batch_in_order() -> None:
    from kiln.distributed import Dist, rank_slice

    batch = torch.arange(10)
    assert rank_slice(batch, Dist()) is batch  # one process: the whole batch
    parts = [rank_slice(batch, Dist(rank=r, world_size=3)) for r in range(3)]
    assert [p.tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_ddp_two_ranks_match_single_process_run(ddp_tables) -> None:
    d, small_train, small_val = ddp_tables
    # no dropout and no BatchNorm: the only difference left is reduction order
    overrides = dict(model="mlp", epochs=2, batch_size=32, dropout=0.0, device="cpu", patience=0, seed=3)
    single = train(TrainConfig(**overrides), small_train, small_val, d / "single.pt", log=lambda _: None)
    rank0, rank1 = _torchrun(d, "mlp", overrides)
    assert rank0["world_size"] == rank1["world_size"] == 2 and single.world_size == 1
    assert rank0["weights_sha256"] == rank1["weights_sha256"]  # both ranks end with identical weights
    assert rank0["history"] == rank1["history"]
    ckpt = read_checkpoint(d / "mlp.pt")
    assert weights_sha256(ckpt["state_dict"]) == rank0["weights_sha256"]
    expected = read_checkpoint(d / "single.pt")["state_dict"]
    assert list(ckpt["state_dict"]) == list(expected)  # no "module." prefix from DDP
    for key, value in expected.items():
        torch.testing.assert_close(ckpt["state_dict"][key], value, atol=1e-4, rtol=1e-4)
    for got, want in zip(rank0["history"], single.history, strict=True):
        assert got["val_accuracy"] == pytest.approx(want["val_accuracy"], abs=0.006)
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4)
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-4)


def test_ddp_cnn_ranks_agree_including_batchnorm_buffers(ddp_tables) -> None:
    d, _, _ = ddp_tables
    overrides = dict(model="cnn", epochs=1, batch_size=32, device="cpu", seed=0)
    rank0, rank1 = _torchrun(d, "cnn", overrides)
    assert rank0["weights_sha256"] == rank1["weights_sha256"] and rank0["history"] == rank1["history"]
    assert rank0["history"][0]["val_accuracy"] > 0.3  # it learnt something in one epoch


def test_run_train_with_two_processes_launches_torchrun(ddp_tables) -> None:
    from kiln.train import run_train

    d, _, _ = ddp_tables
    result = run_train(d / "train.parquet", d / "val.parquet", d / "run.pt", {"model": "mlp", "epochs": 1, "device": "cpu"},
                       curves_path=d / "run_curves.html", nproc=2)
    assert result.world_size == 2 and result.checkpoint_path == d / "run.pt"
    assert weights_sha256(read_checkpoint(d / "run.pt")["state_dict"]) == result.weights_sha256
    assert (d / "run_curves.html").is_file()
    with pytest.raises(ValueError, match="nproc"):
        run_train(d / "train.parquet", d / "val.parquet", d / "x.pt", nproc=0)
