"""An MLServer custom runtime serving kiln's ONNX contract with ONNX Runtime.

``bench/peers`` writes MLServer's settings.json and the model's model-settings.json
(``implementation: mlserver_runtime.OnnxRuntimeModel``, ``parameters.uri``: the ONNX
file, ``parameters.extra.session_settings``: kiln's ``SessionSettings`` as a JSON object, adaptive batching
``max_batch_size`` 64 / ``max_batch_time`` 0.0005 s) and starts ``mlserver start`` from
the MLServer peer's own virtual environment with this folder on ``PYTHONPATH``.

``predict()`` receives a batch MLServer's adaptive batcher merged along the first
dim: ``pixels`` UINT8 [N, 28, 28] in, ``probabilities`` FP32 [N, 10] and ``label``
INT64 [N] out. Runs and rows are counted and served by a custom REST handler,
``GET /kiln-peer/batch-stats``, so the bench can see that batching engaged. (MLServer's
custom metrics would not do: without parallel workers its /metrics endpoint serves
prometheus_client's default registry, not the one ``mlserver.log`` writes to.)
"""

from __future__ import annotations

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.errors import InferenceError
from mlserver.handlers import custom_handler
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput

import ort_session

BATCH_STATS_PATH = "/kiln-peer/batch-stats"


class OnnxRuntimeModel(MLModel):
    async def load(self) -> bool:
        parameters = self.settings.parameters
        if parameters is None or not parameters.uri:
            raise ValueError(f"model {self.name}: model-settings.json lacks parameters.uri (the ONNX file)")
        settings = ort_session.load_settings((parameters.extra or {}).get("session_settings") or {})
        self._session = ort_session.create_session(parameters.uri, settings)
        self._runs = self._rows = 0
        return True

    @custom_handler(rest_path=BATCH_STATS_PATH, rest_method="GET")
    async def batch_stats(self) -> dict[str, int]:
        return {"runs": self._runs, "rows": self._rows}

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        inputs = [i for i in payload.inputs if i.name == ort_session.INPUT_NAME]
        if len(inputs) != 1:
            raise InferenceError(f"expected one input named {ort_session.INPUT_NAME!r}, "
                                 f"got {[i.name for i in payload.inputs]}")
        try:
            probabilities, label = ort_session.predict(self._session, NumpyCodec.decode_input(inputs[0]))
        except ValueError as e:
            raise InferenceError(str(e)) from None
        self._runs += 1
        self._rows += len(label)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[
                NumpyCodec.encode_output("probabilities", probabilities),
                # NumpyCodec would report a 1-D array as [N, 1]; kiln's contract says [N]
                ResponseOutput(name="label", datatype="INT64", shape=[len(label)], data=label.tolist()),
            ],
        )
