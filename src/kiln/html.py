"""Rendering of every kiln HTML page from the Jinja2 templates in ``kiln/templates``.

All pages extend ``base.html`` (one layout, one stylesheet, inline: a page is a single
self-contained file that loads nothing from the network). Autoescaping is on for every
template, so report text (ids, expectation names, reasons) can never inject markup.
The number formatters here are the only ones: templates use them as filters and the
step modules import them.
"""

from __future__ import annotations

import base64
import io
import math
from functools import lru_cache
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

MISSING = "n/a"


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def number(value: Any, digits: int = 4, missing: str = MISSING) -> str:
    """``value`` to ``digits`` significant digits (``0.9871``, ``1.23e-05``); ``missing``
    for None or NaN; anything else (an int, a string) as ``str``."""
    if _missing(value):
        return missing
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.{digits}g}"


def fixed(value: Any, digits: int = 4, missing: str = MISSING) -> str:
    """``value`` with ``digits`` decimals (``0.9871``); ``missing`` for None or NaN."""
    return missing if _missing(value) else f"{float(value):.{digits}f}"


def signed(value: Any, digits: int = 4, missing: str = MISSING) -> str:
    """Like :func:`fixed` with an explicit sign (``+0.0050``), for differences."""
    return missing if _missing(value) else f"{float(value):+.{digits}f}"


def percent(value: Any, digits: int = 2, missing: str = MISSING) -> str:
    """A fraction as a percentage (``0.9871`` -> ``98.71%``)."""
    return missing if _missing(value) else f"{float(value) * 100:.{digits}f}%"


def size(value: Any, missing: str = MISSING) -> str:
    """A byte count for people (``1.2 MB``)."""
    if _missing(value):
        return missing
    amount = float(value)
    for unit in ("B", "kB", "MB", "GB"):
        if amount < 1000 or unit == "GB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1000
    raise AssertionError("unreachable")


def compact(value: Any) -> str:
    """Short text for any value in a message: floats to 4 significant digits, lists item
    by item, None/NaN/NA as ``null``, long strings (hex digests) cut to 12 characters."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(compact(v) for v in value) + "]"
    if isinstance(value, float):
        return number(value, missing="null")
    if value is None or type(value).__name__ == "NAType":  # pandas.NA, without importing pandas
        return "null"
    text = str(value)
    return text if len(text) <= 20 else text[:12] + "..."


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for PNG bytes, so an image lives inside the page."""
    if not png.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError("not PNG data")
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_png(fig: Any, dpi: int = 100) -> bytes:
    """PNG bytes of a matplotlib ``Figure`` drawn by the Agg backend (no display needed,
    whatever the global backend is)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


@lru_cache(maxsize=1)
def environment() -> Environment:
    """The shared environment: templates from the installed package (so a wheel ships
    them), autoescape on, undefined names are errors rather than empty text."""
    env = Environment(
        loader=PackageLoader("kiln", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(number=number, fixed=fixed, signed=signed, percent=percent, size=size, compact=compact,
                       png_uri=png_data_uri)
    return env


def render(template: str, **context: Any) -> str:
    """Render ``template`` (a file name under kiln/templates) with ``context``."""
    return environment().get_template(template).render(**context)


def trusted(fragment: str) -> Markup:
    """Mark HTML that kiln itself rendered (from a template) as safe to embed unescaped."""
    return Markup(fragment)


def demo_page(model_name: str = "mnist", api_base: str = "") -> str:
    """The draw-a-digit page: it posts the drawing to ``{api_base}/v2/models/{model_name}/infer``
    (``api_base`` "" = the server that served the page) and shows the answer."""
    return render("demo.html", model_name=model_name, api_base=api_base)


__all__ = [
    "compact",
    "demo_page",
    "environment",
    "figure_png",
    "fixed",
    "number",
    "percent",
    "png_data_uri",
    "render",
    "signed",
    "size",
    "trusted",
]
