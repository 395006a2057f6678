"""The run report, built from the files a small real run left behind."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from kiln.html import render
from kiln.report import SECTIONS, EvaluationSummary, Lineage, RunReport, Validation, render_report, write_report

pytestmark = pytest.mark.slow  # a small real run through every step

IMG_SRC = re.compile(r'<img[^>]*\bsrc="([^"]*)"')


def decoded_images(page: str) -> list[Image.Image]:
    """Every <img> of the page, decoded; fails unless each is an inline PNG."""
    images = []
    for src in IMG_SRC.findall(page):
        assert src.startswith("data:image/png;base64,"), src[:60]
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
        image.load()
        assert image.width > 0 and image.height > 0
        images.append(image)
    return images


def assert_self_contained(page: str) -> None:
    assert not re.search(r"https?:", page), "the page names a network URL"
    assert "<script" not in page and "<link" not in page and "url(" not in page and "@import" not in page


def test_second_run_report_has_every_part(tiny_runs, report_of, tmp_path: Path) -> None:
    run = tiny_runs.second
    path = write_report(report_of(run), tmp_path / "out" / "report.html")
    page = path.read_text(encoding="utf-8")

    for name in SECTIONS:
        assert f'id="section-{name}"' in page
    assert "Not available" not in page
    assert_self_contained(page)
    # curves, confusion matrix, recall bars, variants, champion, and quarantine thumbnails
    images = decoded_images(page)
    assert len(images) >= 5 + 3
    assert "DEPLOYED" in page and "Deployed as version <strong>2</strong>" in page
    assert str(tiny_runs.store / "mnist" / "2") in page
    # drift was checked against version 1's data (the same data: no drift)
    assert "against the data of production version 1" in page and ">no drift<" in page
    champion = run.evaluation.champion
    assert f"{champion['accuracy']:.4f}" in page and f"{champion['accuracy_delta']:+.4f}" in page
    assert run.data_version in page and "0123456789abcdef" in page
    variants = pd.read_json(run.paths["variants"] / "variants.json", typ="series")
    for name in variants["variants"]:
        assert f"<td>{name}</td>" in page


def test_first_run_has_no_drift_reference_nor_champion(tiny_runs, report_of) -> None:
    run = tiny_runs.first
    report = report_of(run)
    page = render_report(report)

    assert "Not checked</strong>: no production model" in page
    assert "No champion: there was no production model" in page
    assert report.drift is not None and not report.drift.checked
    # cleaning: counts per reason are the quarantine list's, every broken row accounted for
    quarantine = pd.read_csv(run.paths["quarantine.csv"])
    assert dict(report.cleaning.by_reason) == quarantine["reason"].value_counts().to_dict()
    assert report.cleaning.n_input == len(pd.read_parquet(run.paths["raw"]))
    for reason, count in report.cleaning.by_reason.items():
        assert f"<tr><td>{reason}</td><td>{count}</td></tr>" in page
    # rows whose bytes are an image get a thumbnail; the others say there is none
    shown = {q.id: q.thumbnail is not None for q in report.cleaning.examples}
    assert shown["bad-big"] and shown["bad-nolabel"] and shown["bad-copy"]
    assert not shown["bad-empty"] and not shown["bad-truncated"] and not shown["bad-text"]
    thumbs = [Image.open(io.BytesIO(q.thumbnail)) for q in report.cleaning.examples if q.thumbnail]
    assert all(max(t.size) == 56 for t in thumbs)
    assert page.count('class="noimage"') == 3
    decoded_images(page)
    assert_self_contained(page)


def test_rejected_run_says_why_it_was_not_deployed(tiny_runs, report_of) -> None:
    run = tiny_runs.rejected
    page = render_report(report_of(run))

    assert not run.blessed and "NOT DEPLOYED" in page
    assert "Not deployed (not blessed: FAIL min_accuracy: accuracy" in page
    assert "the production alias did not move" in page
    assert "&lt; 0.9999" in page  # the failed check, escaped


def test_parts_from_objects_match_parts_from_files(tiny_runs, report_of) -> None:
    run = tiny_runs.second
    from_files = report_of(run)
    from_object = EvaluationSummary.from_evaluation(run.evaluation)

    assert from_object.confusion_matrix == from_files.evaluation.confusion_matrix
    assert from_object.per_class_recall == pytest.approx(dict(from_files.evaluation.per_class_recall))
    assert from_object.reasons == from_files.evaluation.reasons
    assert from_object.metrics["accuracy"] == pytest.approx(from_files.evaluation.metrics["accuracy"])
    assert Validation.from_report(run.validation) == from_files.validation


def test_absent_parts_render_every_section_saying_so() -> None:
    page = render_report(RunReport(Lineage("abc", "md5:1", {"note": "<script>alert(1)</script>"})))

    for name in SECTIONS:
        assert f'id="section-{name}"' in page
    assert page.count("Not available") == 7  # every section but lineage and verdict
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert IMG_SRC.findall(page) == []
    assert_self_contained(page)


def test_curves_template_renders_an_inline_plot(tiny_runs) -> None:
    from kiln import plots
    from kiln.report import Training

    history = Training.from_metrics(tiny_runs.first.metrics["curves"]).history
    assert [r["epoch"] for r in history] == [1, 2, 3]
    page = render("curves.html", png=plots.training_curves(history, 2), history=history)
    assert len(decoded_images(page)) == 1 and page.count("<tr>") == 4
    assert_self_contained(page)
