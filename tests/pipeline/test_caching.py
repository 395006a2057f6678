"""Recurring runs through kfp.local's own cache: unchanged data is not retrained or
redeployed, new data is; a change of the kiln code version misses the cache.

One shared cache root across runs, as a schedule on a cluster shares KFP's cache.
Kept cheap: 1,000 real digits (the validation suite's minimum), an MLP, one epoch and
thresholds at zero (the gates are tested elsewhere; here only caching matters).
"""

# No `from __future__ import annotations`: kfp reads the test pipeline's real types.

from pathlib import Path

import pytest

from helpers import commit_data, init_dvc_repo, mnist_subset, sh
from kiln.cli import main as kiln
from kiln.data import write_dataset
from kiln.store import ModelStore
from pipelines.run_local import parse_args, run, summarize

EVERY_STEP = ["deploy", "drift", "evaluate", "export", "ingest", "merge", "report", "resolve", "shard", "split",
              "train", "validate"]
ALWAYS_RUN = ["deploy", "drift", "evaluate", "report", "resolve"]  # resolve, the store's readers, the report


def run_once(repo: Path, work: Path, min_accuracy: str = "0") -> dict:
    args = parse_args(["--data-repo", str(repo), "--data-rev", "main", "--model-store", str(work / "store"),
                       "--runs-dir", str(work / "runs"), "--cache-root", str(work / "cache"),
                       "--epochs", "1", "--model-type", "mlp", "--min-accuracy", min_accuracy,
                       "--min-macro-recall", "0", "--min-class-recall", "0", "--champion-tolerance", "1"],
                      repo_root=work)
    return summarize(run(args))


def report_text(summary: dict) -> str:
    """The run report's HTML; every section of the page is there whatever the outcome."""
    from kiln.report import SECTIONS

    page = Path(summary["report"]).read_text()
    assert all(f'id="section-{name}"' in page for name in SECTIONS)
    return page


@pytest.mark.slow
def test_a_second_run_reuses_the_cache_and_new_data_retrains(tmp_path: Path) -> None:
    repo = init_dvc_repo(tmp_path / "repo")
    images, labels = mnist_subset(per_class=100)
    write_dataset(repo / "data", images, labels)
    first_version = commit_data(repo, "data v1")
    store = ModelStore(tmp_path / "store")

    run1 = run_once(repo, tmp_path)
    assert run1["ran"] == EVERY_STEP
    assert (run1["deployed_version"], run1["version_added"]) == ("1", True)
    assert store.production("mnist").meta["data_version"] == first_version
    page = report_text(run1)
    assert ">DEPLOYED</span>" in page and "version 1" in page and first_version in page

    run2 = run_once(repo, tmp_path)  # nothing changed
    assert run2["ran"] == ALWAYS_RUN
    assert run2["training_curves"] == "(from cache: an earlier run's)"
    assert run2["blessed"] is True  # the same model, evaluated again against itself
    assert (run2["deployed_version"], run2["version_added"]) == ("1", False)
    assert store.versions("mnist") == ["1"]

    # a bar no model reaches: the else branch runs and the report still comes, from cache up to export
    rejected = run_once(repo, tmp_path, min_accuracy="1")
    assert rejected["ran"] == ["drift", "evaluate", "report", "resolve", "withheld"]
    assert rejected["blessed"] is False and rejected["deployed_version"] is None
    page = report_text(rejected)
    assert ">NOT DEPLOYED</span>" in page and "not blessed: FAIL" in page
    assert store.alias("mnist") == "1"

    batch = tmp_path / "batch"
    new_images, new_labels = mnist_subset(per_class=5, offset=100)
    write_dataset(batch, new_images, new_labels, ids=[f"new{i:03d}" for i in range(len(new_labels))])
    assert kiln(["data", "add", str(batch), "--root", str(repo / "data")]) == 0
    sh(repo, "git", "add", "data.dvc")
    sh(repo, "git", "commit", "-q", "-m", "data: add 50 images")

    run3 = run_once(repo, tmp_path)
    assert run3["ran"] == EVERY_STEP
    assert (run3["deployed_version"], run3["version_added"]) == ("2", True)
    production = store.production("mnist")
    assert production.version == "2" and production.meta["data_version"] not in (first_version, "")
    assert store.versions("mnist") == ["1", "2"]


def ran_steps(repo: Path, work: Path, image: str) -> list[str]:
    """Run resolve -> ingest (the real components, in ``image``) once; the steps that executed."""
    from kfp import dsl, local

    from components import make_components

    c = make_components(image)

    @dsl.pipeline(name="resolve-ingest")
    def pipeline(data_repo: str, data_rev: str):
        resolve = c.resolve(data_repo=data_repo, data_rev=data_rev).set_caching_options(enable_caching=False)
        c.ingest(data_repo=data_repo, data_commit=resolve.outputs["data_commit"],
                 data_version=resolve.outputs["data_version"], shards=1)

    root = work / "runs" / str(len(list((work / "runs").glob("*"))) if (work / "runs").exists() else 0)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), enable_caching=True,
               cache_root=str(work / "cache"))
    pipeline(data_repo=str(repo), data_rev="main")
    return sorted(p.name for p in root.glob("resolve-ingest-*/*") if p.is_dir())


@pytest.mark.slow  # two kfp.local runs
def test_a_code_version_change_misses_the_cache(tmp_path: Path) -> None:
    import shutil

    import kiln
    from kiln.version import local_image, source_hash
    from pipelines.training_pipeline import DEFAULT_IMAGE

    repo = init_dvc_repo(tmp_path / "repo")
    images, labels = mnist_subset(per_class=2)
    write_dataset(repo / "data", images, labels)
    commit_data(repo, "data")
    image = local_image(DEFAULT_IMAGE)
    assert ran_steps(repo, tmp_path, image) == ["ingest", "resolve"]
    assert ran_steps(repo, tmp_path, image) == ["resolve"]  # same data, same code: ingest from cache

    changed = shutil.copytree(Path(kiln.__file__).parent, tmp_path / "kiln", ignore=shutil.ignore_patterns("__pycache__"))
    (changed / "ingest.py").write_text((changed / "ingest.py").read_text() + "\n# a code change\n")
    new_image = DEFAULT_IMAGE.rsplit(":", 1)[0] + f":src-{source_hash(changed)}"
    assert new_image != image
    assert ran_steps(repo, tmp_path, new_image) == ["ingest", "resolve"]


def test_image_tags_carry_the_code_version() -> None:
    from kiln.version import image_with_tag, local_image, source_hash

    assert image_with_tag("reg.example:5000/ml/kiln:0.1.0", "abc123") == "reg.example:5000/ml/kiln:abc123"
    assert image_with_tag("reg.example:5000/kiln", "abc") == "reg.example:5000/kiln:abc"
    assert image_with_tag("kiln@sha256:" + "0" * 64, "abc") == "kiln:abc"
    assert local_image("ghcr.io/kiln-ml/kiln:0.1.0") == f"ghcr.io/kiln-ml/kiln:src-{source_hash()}"
    with pytest.raises(ValueError, match="not a valid image tag"):
        image_with_tag("kiln:1", "bad/tag")
