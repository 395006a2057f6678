"""The data and model contract shared by every stage and by the server.

Changing anything here changes the ONNX interface that deployed clients rely on.
"""

from __future__ import annotations

IMAGE_SIZE = 28
"""Images are IMAGE_SIZE x IMAGE_SIZE, 8-bit grayscale."""

NUM_CLASSES = 10
CLASS_LABELS: tuple[str, ...] = tuple(str(i) for i in range(NUM_CLASSES))
"""Index i of the model's output is the digit ``CLASS_LABELS[i]``."""

INPUT_NAME = "pixels"
"""ONNX input: uint8 [N, 28, 28], raw image bytes; normalisation lives inside the graph."""

PROBABILITIES_NAME = "probabilities"
"""ONNX output: float32 [N, 10], softmax over CLASS_LABELS."""

LABEL_NAME = "label"
"""ONNX output: int64 [N], argmax of ``probabilities``."""

ONNX_OPSET = 18
