"""gRPC V2 inference with the tensors decoded and encoded here, for what stock clients send.

tritonclient.grpc and KServe's InferenceGRPCClient send BYTES in `raw_input_contents` (each element a 4-byte
little-endian length, then its bytes); KServe 0.21.0's servicer hands those to the model undecoded, and a bad
length prefix there is an INTERNAL error. Here both forms become a list of elements (a bad one is
INVALID_ARGUMENT), and the answer takes the request's form: raw contents in, `raw_output_contents` out (what
Triton answers), typed contents in, `contents.fp32_contents` out.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc import ServicerContext
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.infer_type import InferInput, InferRequest, InferResponse
from kserve.utils.utils import to_headers

from embedding_server.operations.errors import BadRequest
from embedding_server.protocols.adapters import require_bytes, split_bytes_tensor

logger = logging.getLogger(__name__)


def infer_request_from_grpc(request: pb.ModelInferRequest) -> InferRequest:
    """The request's BYTES inputs, from raw contents or `contents.bytes_contents`, as lists of elements."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(f"{len(request.inputs)} inputs but {len(raw)} raw input contents")
    inputs = []
    for index, tensor in enumerate(request.inputs):
        require_bytes(tensor.name, tensor.datatype)
        if raw:
            if tensor.HasField("contents"):
                raise BadRequest(f"Input '{tensor.name}' has both contents and raw input contents")
            data = split_bytes_tensor(raw[index], tensor.name)
        else:
            data = list(tensor.contents.bytes_contents)
        inputs.append(InferInput(name=tensor.name, shape=list(tensor.shape), datatype=tensor.datatype, data=data))
    return InferRequest(model_name=request.model_name, infer_inputs=inputs, request_id=request.id, from_grpc=True)


def grpc_infer_response(response: InferResponse, raw: bool) -> pb.ModelInferResponse:
    """Typed contents, as KServe writes them, or little-endian raw output contents, as Triton does."""
    if not raw:
        return response.to_grpc()
    outputs, contents = [], []
    for output in response.outputs:
        outputs.append(pb.ModelInferResponse.InferOutputTensor(name=output.name, datatype=output.datatype,
                                                              shape=output.shape))
        contents.append(np.asarray(output.data, dtype="<f4").tobytes())
    return pb.ModelInferResponse(model_name=response.model_name, id=response.id, outputs=outputs,
                                 raw_output_contents=contents)


class EmbeddingServicer(InferenceServicer):
    """KServe 0.21.0's servicer, with ModelInfer decoding and encoding through the functions above."""

    async def ModelInfer(self, request: pb.ModelInferRequest, context: ServicerContext) -> pb.ModelInferResponse:
        response, _ = await self._data_plane.infer(model_name=request.model_name,
                                                   request=infer_request_from_grpc(request),
                                                   headers=to_headers(context))
        return grpc_infer_response(response, raw=bool(request.raw_input_contents))


@dataclass(frozen=True)
class _Undecodable:
    reason: str


class MalformedMessageInterceptor(grpc.aio.ServerInterceptor):
    """A message that does not parse (invalid UTF-8 in a string field, or not protobuf at all) is the client's
    error, INVALID_ARGUMENT; grpc answers UNKNOWN for the generated deserializer's DecodeError."""

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        deserialize, behavior = handler.request_deserializer, handler.unary_unary

        def tolerant(data: bytes):
            try:
                return deserialize(data)
            except DecodeError as exc:
                return _Undecodable(str(exc))

        async def guarded(request, context: ServicerContext):
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"The message does not parse: {request.reason}")
            return await behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(guarded, request_deserializer=tolerant,
                                                   response_serializer=handler.response_serializer)
