"""bench/serve.py's KServe peer: KServe's ModelServer over ONNX Runtime, a custom V2 model
(``kserve.Model`` with ``load()``/``predict()``) as KServe's docs show.

It runs in KServe's own virtual environment (kserve is not a kiln dependency), started by
``bench.peers.PEERS["kserve"]`` with this folder on ``PYTHONPATH``. Its ONNX Runtime
session comes from ``ort_session``, i.e. ``kiln.runtime`` from kiln's own source tree,
built from the ``SessionSettings`` JSON the bench hands over (``--session_settings``): the
settings ``kiln serve`` builds for itself, so both servers run the model with the same
threads, spinning and graph optimisation. No batching: KServe's ModelServer has none.
"""

from __future__ import annotations

import argparse
from typing import Any

import ort_session


def main() -> None:
    from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer, model_server
    from kserve.utils.numpy_codec import from_np_dtype
    from kserve.utils.utils import generate_uuid

    parser = argparse.ArgumentParser(parents=[model_server.parser])
    parser.add_argument("--model_path", required=True)
    parser.add_argument("--session_settings", required=True, help="kiln.runtime.SessionSettings as JSON")
    args, _ = parser.parse_known_args()

    class OnnxModel(Model):
        def __init__(self, name: str) -> None:
            super().__init__(name)
            self.session: Any = None
            self.ready = False
            self.load()

        def load(self) -> bool:
            self.session = ort_session.create_session(args.model_path, ort_session.load_settings(args.session_settings))
            self.output_names = [o.name for o in self.session.get_outputs()]
            self.ready = True
            return self.ready

        def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
            feed = {inp.name: inp.as_numpy() for inp in payload.inputs}
            results = self.session.run(self.output_names, feed)
            outputs = []
            for name, array in zip(self.output_names, results, strict=True):
                out = InferOutput(name=name, shape=list(array.shape), datatype=from_np_dtype(array.dtype))
                out.set_data_from_numpy(array, binary_data=False)
                outputs.append(out)
            return InferResponse(response_id=generate_uuid(), model_name=self.name, infer_outputs=outputs)

    ModelServer().start([OnnxModel(args.model_name)])


if __name__ == "__main__":
    main()
