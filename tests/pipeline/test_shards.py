"""Sharded cleaning gives exactly what unsharded cleaning gives, through kfp.local's ParallelFor.

The data set has every fault cleaning handles (``helpers.plant_faults``) plus duplicates
whose copies land in different shards: one with the same label (one is kept) and one
with a different label (both are dropped).
"""

# No `from __future__ import annotations`: kfp reads the test pipeline's real types.

from pathlib import Path

import pandas as pd
import pytest

from helpers import commit_data, init_dvc_repo, mnist_subset, plant_faults
from kiln.clean import Reason, clean_table
from kiln.data import write_dataset
from kiln.ingest import PLAN_COLUMNS, fetch_shard, plan_shards, raw_table_from_dir, shard_of
from kiln.shard import clean_shard, merge_parts
from kiln.stats import image_statistics

pytestmark = pytest.mark.slow  # kfp.local runs

SHARDS = 4


def new_id_outside(shard: int) -> str:
    """An unused id that is not in ``shard`` (of SHARDS)."""
    return next(f"x{i:03d}" for i in range(100) if shard_of(f"x{i:03d}", SHARDS) != shard)


@pytest.fixture(scope="module")
def data_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = init_dvc_repo(tmp_path_factory.mktemp("shards") / "repo")
    images, labels = mnist_subset(per_class=2)
    root = plant_faults(write_dataset(repo / "data", images, labels), images)
    # copies of 00010 (label 5) and 00017 (label 8) in other shards: same label, and label 3
    same, conflict = new_id_outside(shard_of("00010", SHARDS)), new_id_outside(shard_of("00017", SHARDS))
    conflict = conflict if conflict != same else next(f"y{i}" for i in range(100)
                                                      if shard_of(f"y{i}", SHARDS) != shard_of("00017", SHARDS))
    (root / "images" / f"{same}.png").write_bytes((root / "images" / "00010.png").read_bytes())
    (root / "images" / f"{conflict}.png").write_bytes((root / "images" / "00017.png").read_bytes())
    with (root / "labels.csv").open("a") as f:
        f.write(f"{same},5\n{conflict},3\n")
    commit_data(repo, "data with faults")
    return repo


def shard_outputs(repo: Path, work: Path, shards: int) -> tuple[pd.DataFrame, pd.DataFrame, object, pd.DataFrame]:
    plan = plan_shards(str(repo), "", work / "plan.parquet", shards)
    for s in plan.shards:
        clean_shard(fetch_shard(work / "plan.parquet", s, str(repo), ""), work / f"part{s}")
    return merge_parts([work / f"part{s}" for s in plan.shards])


def test_shards_merge_to_exactly_the_unsharded_result(data_repo: Path, tmp_path: Path) -> None:
    clean, quarantine, report = clean_table(raw_table_from_dir(data_repo / "data"))
    sharded = shard_outputs(data_repo, tmp_path / "four", SHARDS)
    single = shard_outputs(data_repo, tmp_path / "one", 1)
    for got in (sharded, single):
        pd.testing.assert_frame_equal(got[0], clean)
        pd.testing.assert_frame_equal(got[1], quarantine)
        assert got[2] == report
        pd.testing.assert_frame_equal(got[3], image_statistics(clean))
    plan = pd.read_parquet(tmp_path / "four" / "plan.parquet")
    assert list(plan.columns) == list(PLAN_COLUMNS) and plan["shard"].nunique() == SHARDS
    # the planted duplicates crossed shards and were still found
    reasons = quarantine.groupby("reason")["id"].apply(sorted).to_dict()
    dup, conflict = reasons[Reason.DUPLICATE.value], reasons[Reason.CONFLICTING_DUPLICATE.value]
    shard = dict(zip(plan["id"], plan["shard"]))
    assert any(i.startswith(("x", "y")) for i in dup + conflict)
    assert shard[next(i for i in dup if i.startswith("x"))] != shard["00010"]
    assert len(conflict) == 4 and len({shard[i] for i in conflict}) > 1
    assert report.n_clean + report.n_quarantined == report.n_input == len(plan)


def test_plan_reads_no_image_and_rejects_zero_shards(data_repo: Path, tmp_path: Path) -> None:
    plan = plan_shards(str(data_repo), "", tmp_path / "plan.parquet", 3)
    table = pd.read_parquet(tmp_path / "plan.parquet")
    assert "png" not in table.columns and sum(plan.rows_per_shard) == len(table) and plan.shards == [0, 1, 2]
    assert table["ordinal"].tolist() == list(range(len(table)))
    assert pd.isna(table.set_index("id").loc["00000", "file"])  # listed in the manifest, no file
    with pytest.raises(ValueError, match="shards must be at least 1"):
        plan_shards(str(data_repo), "", tmp_path / "p.parquet", 0)


def run_clean_steps(repo: Path, work: Path, shards: int) -> Path:
    """resolve -> ingest -> ParallelFor(shard) -> merge, the pipeline's own components, via
    kfp.local; returns merge's folder."""
    from kfp import dsl, local

    from components import make_components
    from kiln.version import local_image
    from pipelines.training_pipeline import DEFAULT_IMAGE

    c = make_components(local_image(DEFAULT_IMAGE))

    @dsl.pipeline(name="sharded-clean")
    def pipeline(data_repo: str, shards: int):
        resolve = c.resolve(data_repo=data_repo, data_rev="main")
        ingest = c.ingest(data_repo=data_repo, data_commit=resolve.outputs["data_commit"],
                          data_version=resolve.outputs["data_version"], shards=shards)
        with dsl.ParallelFor(ingest.outputs["Output"], parallelism=2) as shard_no:
            shard = c.shard(plan=ingest.outputs["plan"], shard=shard_no, data_repo=data_repo,
                            resize_wrong_size=False)
        c.merge(parts=dsl.Collected(shard.outputs["part"]), data_version=resolve.outputs["data_version"])

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(work), enable_caching=False)
    pipeline(data_repo=str(repo), shards=shards)
    return next(work.glob("sharded-clean-*/merge"))


def test_kfp_local_fan_out_matches_one_shard(data_repo: Path, tmp_path: Path) -> None:
    """Four shard tasks through kfp.local's ParallelFor give the files one shard gives
    (the one-shard files made in process: the same functions, equal by the test above)."""
    from kiln.shard import merge_shards

    four = run_clean_steps(data_repo, tmp_path / "four", SHARDS)
    assert len(list((tmp_path / "four").glob("sharded-clean-*/*-iteration-*/shard/part"))) == SHARDS
    one = tmp_path / "one"
    plan_shards(str(data_repo), "", one / "plan", 1)
    clean_shard(fetch_shard(one / "plan", 0, str(data_repo), ""), one / "part")
    merge_shards([one / "part"], one / "cleaned", one / "quarantine", one / "repairs", one / "statistics",
                 summary_path=one / "summary", quarantined_raw_path=one / "quarantined_raw")
    for name in ("quarantine", "repairs", "summary"):
        assert (four / name).read_bytes() == (one / name).read_bytes(), name
    for name in ("cleaned", "statistics", "quarantined_raw"):
        pd.testing.assert_frame_equal(pd.read_parquet(four / name), pd.read_parquet(one / name), obj=name)
    quarantine = pd.read_csv(four / "quarantine", dtype=str)
    assert set(pd.read_parquet(four / "quarantined_raw")["path"]) == set(quarantine["path"])
    # 20 manifest rows + a repeated id + 2 copies, and the stray file
    assert len(pd.read_parquet(four / "cleaned")) + len(quarantine) == 24
