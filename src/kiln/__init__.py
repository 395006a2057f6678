"""kiln: a DVC-versioned dataset turned into a validated, evaluated ONNX model.

Every stage of the pipeline is a plain typed function in this package; the Kubeflow
components in ``components/`` only map artifact paths onto one call each.
"""

__version__ = "0.1.0"
