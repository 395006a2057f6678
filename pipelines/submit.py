"""Kept as an alias of the kiln CLI: ``python -m pipelines.submit run ...`` is ``kiln submit ...``
and ``python -m pipelines.submit schedule ...`` is ``kiln schedule create ...``."""

import sys

from kiln.cli import main as kiln

ALIASES = {"run": ["submit"], "schedule": ["schedule", "create"]}

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not argv or argv[0] not in ALIASES:
        sys.exit(f"usage: python -m pipelines.submit {{run|schedule}} ...  (prefer `kiln submit` / `kiln schedule`)")
    sys.exit(kiln([*ALIASES[argv[0]], *argv[1:]]))
