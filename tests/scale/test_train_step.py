"""The pipeline's train step with ``backend="trainjob"``: the component adapter, called with
KFP artifacts, creates a TrainJob on the loopback fake cluster (kube config from
the default location, as outside a pod), follows it, and hands back the checkpoint and curves."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kfp import dsl

from components.train import train

pytestmark = pytest.mark.slow  # a real 2-node training through the train adapter


def artifact(kind, path: Path, **metadata):
    out = kind(uri=str(path))
    out.metadata.update(metadata)
    return out


def test_the_train_step_trains_on_a_trainjob(fake_kube, tiny_tables, tiny_overrides, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    kube, url = fake_kube
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": url}}],
        "users": [{"name": "fake", "user": {"token": "t"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}))
    from kubernetes.config import kube_config

    # what KUBECONFIG names, read by the client when it is imported (already, here)
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    seen = len(kube.requests)
    overrides = dict(tiny_overrides)
    model_type, epochs, seed = overrides.pop("model"), overrides.pop("epochs"), overrides.pop("seed")
    outputs = {"checkpoint": artifact(dsl.Model, tmp_path / "checkpoint"),
               "curves": artifact(dsl.Metrics, tmp_path / "curves"),
               "curves_plot": artifact(dsl.HTML, tmp_path / "curves_plot")}
    train(train_set=artifact(dsl.Dataset, tiny_tables[0], data_version="v1"),
          val_set=artifact(dsl.Dataset, tiny_tables[1]), model_type=model_type, epochs=epochs, seed=seed,
          train_config=overrides, num_gpus=0, backend="trainjob", num_nodes=2, procs_per_node=1,
          trainjob={"image": "kiln:test", "namespace": "team-a", "runtime": "torch-distributed",
                    "pvc": "kiln-model-store", "shared_dir": str(tmp_path / "pvc"), "timeout_s": 120.0,
                    "poll_interval_s": 0.2},
          **outputs)
    created = [r for r in kube.requests[seen:] if r.method == "POST"]
    assert len(created) == 1 and created[0].path.endswith("/namespaces/team-a/trainjobs")
    assert created[0].body["spec"]["trainer"]["numNodes"] == 2
    assert outputs["checkpoint"].metadata == {"framework": "pytorch", "device": "cpu", "world_size": 2,
                                              "data_version": "v1", "backend": "trainjob"}
    assert Path(outputs["checkpoint"].path).stat().st_size > 0
    assert outputs["curves"].metadata["best_epoch"] == 1 and "epoch01_val_loss" in outputs["curves"].metadata
    assert Path(outputs["curves_plot"].path).read_text().startswith("<!")
    assert list((tmp_path / "pvc" / "trainjobs").iterdir()) == []  # the staged files are gone after success


def test_the_trainjob_backend_needs_the_cluster_build(tiny_tables, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs the cluster build"):
        train(train_set=artifact(dsl.Dataset, tiny_tables[0]), val_set=artifact(dsl.Dataset, tiny_tables[1]),
              model_type="mlp", epochs=1, seed=0, train_config={}, num_gpus=0, backend="trainjob", num_nodes=2,
              procs_per_node=1, trainjob={}, checkpoint=artifact(dsl.Model, tmp_path / "c"),
              curves=artifact(dsl.Metrics, tmp_path / "m"), curves_plot=artifact(dsl.HTML, tmp_path / "p"))
