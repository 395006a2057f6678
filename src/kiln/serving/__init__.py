"""The kiln model server: ONNX Runtime behind the KServe Open Inference Protocol (V2 REST)."""
