"""kiln.html: the shared layout, formatters and the pages' escaping (no browser needed)."""

from __future__ import annotations

import math

import pytest

from kiln.html import compact, demo_page, fixed, number, percent, png_data_uri, render, signed, size

pytestmark = pytest.mark.slow  # a small real run through every step


def test_formatters() -> None:
    assert [number(0.987654), number(1.23456e-5), number(3), number(None), number(math.nan)] == \
        ["0.9877", "1.235e-05", "3", "n/a", "n/a"]
    assert [fixed(0.5), fixed(None), signed(0.005), signed(-0.01), percent(0.98765)] == \
        ["0.5000", "n/a", "+0.0050", "-0.0100", "98.77%"]
    assert [size(512), size(1_234_567), size(None)] == ["512 B", "1.2 MB", "n/a"]
    assert compact([1.0, None, math.nan, "a" * 64]) == "[1, null, null, aaaaaaaaaaaa...]"


def test_png_data_uri_refuses_other_bytes() -> None:
    assert png_data_uri(b"\x89PNG\r\n\x1a\nrest").startswith("data:image/png;base64,iVBORw0K")
    with pytest.raises(ValueError, match="not PNG"):
        png_data_uri(b"GIF89a")


def test_every_page_shares_the_base_layout() -> None:
    from kiln.drift import render_no_reference_html

    base_css = "img.plot { max-width: 100%;"
    pages = [render_no_reference_html("<b>no store</b>"), demo_page(), render("curves.html", png=b"\x89PNG\r\n\x1a\n",
                                                                              history=[])]
    for page in pages:
        assert page.startswith("<!DOCTYPE html>") and base_css in page
    assert "&lt;b&gt;no store&lt;/b&gt;" in pages[0]


def test_demo_page_embeds_the_model_name_as_data_not_code() -> None:
    page = demo_page("</script><script>alert(1)</script>")
    assert "<script>alert(1)" not in page
    assert page.count("<script>") == 1 and page.count("</script>") == 1
    assert "https:" not in page and "http:" not in page  # nothing loaded from anywhere
