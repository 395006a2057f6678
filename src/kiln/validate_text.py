"""Human-readable texts of Great Expectations results: part of the validate stage.

The HTML page and :class:`kiln.validate.DataValidationError` show, per expectation,
what it requires and what was observed; these helpers turn GX's kwargs and ``result``
dicts into those short texts. They are kept apart from :mod:`kiln.validate` so the
suite and the run stay readable; they know nothing of GX objects, only its JSON.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from kiln.html import compact

SHOWN_EXAMPLES = 5
"""Of the failing rows GX keeps, how many the human-readable ``observed`` text lists."""

_fmt = compact  # the one formatter every kiln page and message shares (kiln.html)


def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars, NA and other non-JSON leaves made JSON-serialisable."""

    def default(obj: Any) -> Any:
        if hasattr(obj, "item"):  # numpy scalar
            return obj.item()
        if obj is pd.NA:
            return None
        return str(obj)

    return json.loads(json.dumps(value, default=default))


def expected_text(expectation_type: str, kwargs: dict[str, Any]) -> str:
    """Human-readable statement of what ``expectation_type`` with ``kwargs`` requires."""
    lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
    if lo is not None and hi is not None:
        bounds = f"between {_fmt(lo)} and {_fmt(hi)}"
    elif lo is not None:
        bounds = f">= {_fmt(lo)}"
    else:
        bounds = f"<= {_fmt(hi)}"
    texts = {
        "expect_table_row_count_to_be_between": f"row count {bounds}",
        "expect_column_values_to_be_between": f"every value {bounds}",
        "expect_column_mean_to_be_between": f"column mean {bounds}",
        "expect_column_values_to_not_be_null": "no nulls",
        "expect_column_values_to_be_unique": "all values unique",
        "expect_column_values_to_be_in_set": f"every value in {_fmt(kwargs.get('value_set'))}",
        "expect_column_distinct_values_to_contain_set": f"all of {_fmt(kwargs.get('value_set'))} present",
        "expect_column_pair_values_to_be_equal": f"{kwargs.get('column_A')} == {kwargs.get('column_B')} on every row",
    }
    return texts.get(expectation_type, json.dumps(kwargs, sort_keys=True, default=str))


def class_share_text(stats: pd.DataFrame, column: str, min_share: float, max_share: float) -> str:
    """Per-label shares (``column``, one value per label) outside ``min_share..max_share``:
    GX's unexpected values, named by label."""
    if stats[column].isna().all():
        return "no labelled rows"
    shares = stats.groupby("label", dropna=True, sort=True)[column].first()
    bad = shares[(shares < min_share) | (shares > max_share)]
    if bad.empty:
        return f"class shares {shares.min():.4g}..{shares.max():.4g}"
    counts = (bad * len(stats)).round().astype(int)
    return "shares out of bounds: " + ", ".join(
        f"label {_fmt(label)}: {share:.4g} ({count} rows)" for (label, share), count in zip(bad.items(), counts)
    )


def _unexpected_text(expectation_type: str, result: dict[str, Any]) -> str:
    """Count of failing rows, with a few of their values and ids."""
    count, total = result["unexpected_count"], result.get("element_count", 0)
    noun = "null" if expectation_type == "expect_column_values_to_not_be_null" else "unexpected"
    text = f"{count} of {total} rows {noun}"
    # Null rows have no value to show; pair values are two digests, too long to help.
    show_values = noun != "null" and expectation_type != "expect_column_pair_values_to_be_equal"
    if count and show_values and result.get("partial_unexpected_counts"):
        values = [
            f"{_fmt(v.get('value'))} (x{v.get('count')})"
            for v in result["partial_unexpected_counts"][:SHOWN_EXAMPLES]
            if "value" in v
        ]
        if values:
            text += "; values " + ", ".join(values)
    # Ids are shown whole (unlike values) so they can be looked up.
    ids = [str(row.get("id")) for row in result.get("partial_unexpected_index_list", [])[:SHOWN_EXAMPLES]]
    if count and ids:
        text += "; e.g. ids " + ", ".join(ids)
    return text


def observed_text(expectation_type: str, result: dict[str, Any], exception: str | None) -> str:
    """Human-readable summary of GX's ``result`` dict for one expectation."""
    if exception:
        return f"error: {exception}"
    if "unexpected_count" in result:
        return _unexpected_text(expectation_type, result)
    if result.get("partial_missing_list"):
        return f"missing {_fmt(result['partial_missing_list'])}"
    observed = result.get("observed_value")
    if expectation_type == "expect_table_row_count_to_be_between":
        return f"{_fmt(observed)} rows"
    if expectation_type == "expect_column_distinct_values_to_contain_set" and observed is None:
        return "all present"
    return _fmt(observed)


def exception_text(info: Any) -> str | None:
    """The exception message GX recorded for an expectation, if it raised."""
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message") or "exception")
    # Some expectations report exceptions per metric: {metric_id: {raised_exception: ...}}.
    for sub in info.values():
        if isinstance(sub, dict) and sub.get("raised_exception"):
            return str(sub.get("exception_message") or "exception")
    return None
