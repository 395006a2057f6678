"""`kiln run`'s quiet console reads kfp.local's own output (pipelines/local_console.py).

These run a real two-step pipeline through kfp.local's SubprocessRunner, so a kfp release
that changes what the console relies on fails here: the task log lines, the cache-hit
record on the root logger, the indented step output, the FAILURE status and the
``<root>/<pipeline>-<time>/<task>/executor_output.json`` folder layout.
"""

# No `from __future__ import annotations`: kfp reads the components' real types.

import importlib.metadata
import io
import logging
import sys
from pathlib import Path

import pytest

from kiln import progress
from pipelines.local_console import StepView, capture, step_error


def test_kfp_is_the_release_the_console_was_written_against() -> None:
    assert importlib.metadata.version("kfp") == "2.17.0", (
        "pipelines/local_console.py parses kfp.local 2.17's messages: check them before moving the pin")


def probe_pipeline():
    from kfp import dsl

    @dsl.component(base_image="python:3.11")
    def count(n: int) -> int:
        from kiln.progress import emit

        for i in range(1, n + 1):
            emit("count", i, n, loss=1.0 / i)
        return n

    @dsl.component(base_image="python:3.11")
    def check(n: int) -> int:
        if n > 2:
            raise ValueError(f"n is {n}: keep it at most 2")
        return n

    @dsl.pipeline(name="console-probe")
    def probe(n: int):
        counted = count(n=n)
        check(n=counted.output).set_caching_options(enable_caching=False)

    return probe


def run_probe(work: Path, n: int, name: str) -> tuple[StepView, str, Exception | None]:
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(work / name), enable_caching=True,
               cache_root=str(work / "cache"))
    out = io.StringIO()
    view = StepView(out, uncached={"check"}, tty=True)
    error = None
    with capture(work / name / "run.log", view.feed):
        try:
            probe_pipeline()(n=n)
        except RuntimeError as e:
            error = e
        finally:
            view.close()
    return view, out.getvalue(), error


def test_steps_cache_hits_progress_and_failures_are_read_from_kfp_local(tmp_path: Path) -> None:
    stdout, root_level = sys.stdout, logging.getLogger().level

    first, shown, error = run_probe(tmp_path, 2, "first")
    assert error is None and first.finished == [("count", "cache miss"), ("check", "ran")]
    assert "2/2" in shown and "loss=0.5" in shown  # the progress lines became a tqdm bar
    assert (sys.stdout, logging.getLogger().level) == (stdout, root_level)  # everything restored
    [outputs] = (tmp_path / "first").glob("console-probe-*/count/executor_output.json")
    assert outputs.is_file()
    log = (tmp_path / "first" / "run.log").read_text()
    assert progress.PREFIX in log and "Executing task" in log  # the full story is in the log

    second, _, _ = run_probe(tmp_path, 2, "second")
    assert second.finished == [("count", "cache hit"), ("check", "ran")]

    third, shown, error = run_probe(tmp_path, 3, "third")
    assert isinstance(error, RuntimeError) and "FAILURE" in str(error)
    assert third.finished == [("count", "cache miss"), ("check", "FAILED")]
    assert third.failed == {"check": "ValueError: n is 3: keep it at most 2"}


def test_a_non_terminal_gets_one_line_per_step_and_no_bar() -> None:
    out = io.StringIO()
    ticks = iter([0.0, 61.5, 100.0])
    view = StepView(out, tty=False, clock=lambda: next(ticks))
    for line in ["12:00:00.000 - INFO - Executing task \x1b[96m'train'\x1b[0m",
                 '    KILN-PROGRESS {"step": "train", "n": 1, "of": 2}',
                 "12:00:01.000 - INFO - Task \x1b[96m'train'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m",
                 "12:00:01.000 - INFO - Task export cache hit (key=0123456789ab); skipping execution."]:
        view.feed(line)
    assert out.getvalue() == "  train      cache miss   1m02s\n  export     cache hit     0.0s\n"


@pytest.mark.parametrize("lines, expected", [
    (["    Traceback (most recent call last):", '      File "x.py", line 1, in <module>',
      "    kiln.ingest.IngestError: cannot fetch 'data'"], "IngestError: cannot fetch 'data'"),
    (["    Traceback (most recent call last):", "    KeyError: 'a'", "", "    The above exception was the direct "
      "cause of the following exception:", "", "    Traceback (most recent call last):",
      '      File "y.py", line 2, in f', "    RuntimeError: outer"], "RuntimeError: outer"),
    (["    just output"], None),
])
def test_step_error_is_the_last_tracebacks_exception_line(lines: list[str], expected: str | None) -> None:
    assert step_error(lines) == expected


def test_progress_lines_round_trip(capsys: pytest.CaptureFixture) -> None:
    progress.emit("train", 3, 10, loss=0.25)
    record = progress.parse("    " + capsys.readouterr().out)
    assert record == {"step": "train", "n": 3, "of": 10, "unit": "epoch", "loss": 0.25}
    assert progress.parse("KILN-PROGRESS {not json") is None and progress.parse("hello") is None


def test_training_emits_one_progress_line_per_epoch(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import numpy as np

    from helpers import clean_frame
    from kiln.train import TrainConfig, train

    rng = np.random.default_rng(0)  # what is learnt does not matter here, only that epochs are reported
    table = clean_frame(rng.integers(0, 256, size=(20, 28, 28), dtype=np.uint8), np.arange(20) % 10)
    train(TrainConfig(model="mlp", epochs=2, batch_size=16, device="cpu", patience=0), table, table,
          tmp_path / "m.pt", log=lambda _: None)
    records = [r for r in map(progress.parse, capsys.readouterr().out.splitlines()) if r is not None]
    assert [(r["step"], r["n"], r["of"], r["unit"]) for r in records] == [("train", 1, 2, "epoch"),
                                                                          ("train", 2, 2, "epoch")]
    assert {"val_loss", "val_acc"} <= records[-1].keys()


def test_the_summary_ends_with_the_run_reports_path() -> None:
    import argparse

    from pipelines.run_local import print_summary

    keys = ("validation_report", "drift_report", "quarantine", "training_curves", "onnx_model", "variants",
            "evaluation_report", "verdict")
    summary = {"run": "runs/r", **{k: f"runs/r/{k}" for k in keys}, "test_metrics": {"accuracy": 0.99},
               "deployed_version": "2", "version_added": True, "report": "runs/r/report.html"}
    out = io.StringIO()
    print_summary(summary, argparse.Namespace(model_store="model_store", model_name="mnist"), out)
    lines = out.getvalue().splitlines()
    assert lines[-1] == f"{'run report:':<20} runs/r/report.html"
    assert f"{'deployed:':<20} version 2 is production (model_store/mnist/2)" in lines
    assert len(lines) <= 14


def test_a_stream_taken_during_the_capture_still_works_after_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A library that keeps ``sys.stderr`` from inside a run (DVC's log handlers do) must not
    fail later, when the run's log file is closed: it writes to the real stderr then."""
    seen: list[str] = []
    with capture(tmp_path / "run.log", seen.append):
        kept = sys.stderr
        print("inside", file=kept)
    print("after the run", file=kept)  # a closed log file would raise ValueError here
    kept.flush()
    assert seen == ["inside"] and (tmp_path / "run.log").read_text() == "inside\n"
    assert "after the run" in capsys.readouterr().err
