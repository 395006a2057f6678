"""Triton Inference Server (through nvidia-pytriton) serving kiln's ONNX contract with ONNX Runtime.

Run from the Triton peer's own virtual environment by ``bench/peers`` (which sets
``LD_LIBRARY_PATH`` so the Python backend stub loads this interpreter's libpython).
Triton's dynamic batcher groups requests (``max_batch_size`` 64, ``max_queue_delay``
500 µs); the bound infer function gets the batch as one ``pixels`` UINT8 [N, 28, 28]
array and returns ``probabilities`` FP32 [N, 10] and ``label`` INT64 [N, 1] (Triton's model
config cannot declare a batched tensor without a dim of its own; the data is kiln's). The ONNX
Runtime session comes from ``ort_session`` (kiln's ``kiln.runtime``) with kiln's
``SessionSettings`` JSON given on the command line, so Triton runs the model exactly as kiln
does. Only HTTP is served: gRPC and Prometheus metrics are off; batching shows in ``GET /v2/models/<name>/stats``
(``inference_count`` rows in ``execution_count`` runs).
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import DEFAULT_PROTECTED_ENDPOINTS, Triton, TritonConfig, TritonSecurityConfig

import ort_session

MODEL_NAME = "mnist"


def make_infer(session):
    @batch
    def infer(pixels: np.ndarray) -> dict[str, np.ndarray]:
        probabilities, label = ort_session.predict(session, pixels)
        # Triton gives every batched tensor at least one dim of its own: label is [N, 1]
        return {"probabilities": probabilities, "label": label[:, None]}

    return infer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="ONNX file following kiln's contract")
    parser.add_argument("--port", type=int, required=True, help="HTTP port (loopback)")
    parser.add_argument("--session-settings", required=True, help="kiln.runtime.SessionSettings as JSON")
    parser.add_argument("--workspace", default=None, help="PyTriton's workspace folder (default: a temp dir)")
    args = parser.parse_args()

    settings = ort_session.load_settings(args.session_settings)
    session = ort_session.create_session(args.model, settings)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("triton_peer").warning("ORT options %s", ort_session.describe(settings))

    config = TritonConfig(http_address="127.0.0.1", http_port=args.port, allow_grpc=False, allow_metrics=False,
                          log_verbose=0)
    model_config = ModelConfig(
        max_batch_size=ort_session.MAX_BATCH,
        batcher=DynamicBatcher(max_queue_delay_microseconds=round(ort_session.MAX_BATCH_DELAY_S * 1e6)),
    )
    # Loopback only; the statistics endpoint stays open so the bench can read batch sizes.
    security = TritonSecurityConfig(restricted_endpoints=[e for e in DEFAULT_PROTECTED_ENDPOINTS if e != "statistics"])
    with Triton(config=config, workspace=args.workspace, security_config=security) as triton:
        triton.bind(
            model_name=MODEL_NAME,
            infer_func=make_infer(session),
            inputs=[Tensor(name=ort_session.INPUT_NAME, dtype=np.uint8,
                           shape=(ort_session.IMAGE_SIZE, ort_session.IMAGE_SIZE))],
            outputs=[Tensor(name="probabilities", dtype=np.float32, shape=(ort_session.NUM_CLASSES,)),
                     Tensor(name="label", dtype=np.int64, shape=(1,))],
            config=model_config,
            strict=False,  # its dtype check rejects a valid int64 array (np.dtype vs type)
        )
        triton.serve()


if __name__ == "__main__":
    main()
