"""The floor of a Python gRPC server here: ``grpc.aio`` on uvloop (as ``kiln serve`` runs it)
answering ModelInfer with a fixed response, no model and no decoding.

``bench/serve.py`` drives it with the same h2load command as kiln's gRPC endpoint: what
it reaches is what grpcio's own per-call cost (its Cython core and completion-queue poller
thread, HTTP/2 framing, protobuf) leaves for a handler.

    python bench/grpc_echo.py PORT
"""

from __future__ import annotations

import asyncio
import sys

import grpc
import uvloop
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

# what kiln answers for one image: probabilities FP32 [1, 10], label INT64 [1], raw
RESPONSE = pb.ModelInferResponse(
    model_name="mnist", model_version="1",
    outputs=[pb.ModelInferResponse.InferOutputTensor(name="probabilities", datatype="FP32", shape=[1, 10]),
             pb.ModelInferResponse.InferOutputTensor(name="label", datatype="INT64", shape=[1])],
    raw_output_contents=[bytes(40), bytes(8)],
)


class Echo(pb_grpc.GRPCInferenceServiceServicer):
    async def ModelInfer(self, request, context):
        return RESPONSE


async def serve(port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Echo(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    uvloop.install()
    asyncio.run(serve(int(sys.argv[1])))
