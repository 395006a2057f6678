"""The kiln model server's entry points: the KServe Open Inference Protocol (V2 REST) over ONNX Runtime.

``create_app`` builds the application (:mod:`kiln.serving.app`); ``main`` is ``kiln
serve`` (:mod:`kiln.serving.cli`). The pieces: :mod:`~kiln.serving.codec` (V2 JSON and
binary tensor data), :mod:`~kiln.serving.repository` (versions and hot reload),
:mod:`~kiln.serving.batching`, :mod:`~kiln.serving.metrics`, :mod:`~kiln.serving.predictor`
(one version behind an ONNX Runtime session from :mod:`kiln.runtime`).
"""

from __future__ import annotations

import sys

from kiln.serving.app import create_app, create_app_from_settings
from kiln.serving.cli import load_settings, main, parse_args

__all__ = ["create_app", "create_app_from_settings", "load_settings", "main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
