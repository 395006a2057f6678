"""Run settings as the steps receive them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def plain_value(value: Any) -> Any:
    """``value`` as the type it was given in: a runner may hand nested parameters over as
    strings or floats (``"3.0"`` for the int 3); numbers, bools and JSON come back typed."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def plain_parameters(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`plain_value` of every value of ``parameters``."""
    return {key: plain_value(value) for key, value in parameters.items()}
