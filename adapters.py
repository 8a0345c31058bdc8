"""Pure adapters between the wire formats and lists of texts / arrays of embeddings. No I/O."""
from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from errors import BadRequest, Unprocessable

INPUT_NAME = "text"
OUTPUT_NAME = "embedding"


def parse_json(body: bytes) -> Any:
    if not body or not body.strip():
        raise BadRequest("The request body is empty; send a JSON object")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}") from None


def _string_list(values: Any, what: str) -> list[str]:
    if not isinstance(values, list):
        raise Unprocessable(f"'{what}' must be a list of strings, not {type(values).__name__}")
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise Unprocessable(f"'{what}[{index}]' must be a string, not {type(value).__name__}")
    return values


def texts_from_instances(body: Any) -> list[str]:
    """KServe V1: {"instances": [str, ...]}. Bytes arrive when the client sent no JSON content type."""
    if isinstance(body, bytes):
        body = parse_json(body)
    if not isinstance(body, dict):
        raise Unprocessable(f"The body must be a JSON object with 'instances', not {type(body).__name__}")
    if "instances" not in body:
        raise Unprocessable("The body must have 'instances': a list of strings")
    return _string_list(body["instances"], "instances")


def parse_legacy(body: Any) -> tuple[list[str] | None, list[str]]:
    """The legacy /embedding body: an ID map {"id": "text"} or {"instances": [...]}.

    Returns (ids, texts); ids is None for the instances form.
    """
    if not isinstance(body, dict):
        raise Unprocessable(
            f"The body must be a JSON object mapping IDs to texts, or {{'instances': [...]}}, not {type(body).__name__}"
        )
    if not body:
        raise BadRequest("No texts provided: send {\"id1\": \"text\", ...} or {\"instances\": [...]}")
    if "instances" in body:
        return None, texts_from_instances(body)
    for key, value in body.items():
        if not isinstance(value, str):
            raise Unprocessable(f"The value of '{key}' must be a string, not {type(value).__name__}")
    return list(body), list(body.values())


def embedding_string(row: np.ndarray) -> str:
    """One embedding as the legacy service wrote it: str() of a list of floats."""
    return str(row.tolist())


def legacy_response(ids: list[str] | None, embeddings: np.ndarray) -> dict[str, Any]:
    if ids is None:
        return {"predictions": embeddings}
    return {key: embedding_string(row) for key, row in zip(ids, embeddings)}


def _decode(value: Any, index: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise Unprocessable(f"Element {index} of the input tensor is not valid UTF-8") from None
    raise Unprocessable(f"Element {index} of the input tensor must be a string, not {type(value).__name__}")


def texts_from_infer_request(request: InferRequest) -> list[str]:
    """Open Inference Protocol V2: one BYTES input of shape [n] (or [n, 1])."""
    if len(request.inputs) != 1:
        raise Unprocessable(f"Expected exactly one input tensor '{INPUT_NAME}', got {len(request.inputs)}")
    tensor = request.inputs[0]
    if tensor.datatype != "BYTES":
        raise Unprocessable(f"Input '{tensor.name}' must have datatype BYTES, not {tensor.datatype}")
    shape = list(tensor.shape)
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise Unprocessable(f"Input '{tensor.name}' must have shape [n] or [n, 1], not {shape}")
    values = tensor.as_numpy().reshape(-1).tolist() if tensor.data is None else tensor.data
    flat: list[Any] = []
    for value in values:
        flat.extend(value if isinstance(value, list) else [value])
    if len(flat) != shape[0]:
        raise Unprocessable(f"Input '{tensor.name}' has shape {shape} but {len(flat)} elements")
    return [_decode(value, index) for index, value in enumerate(flat)]


def infer_response(model_name: str, request_id: str | None, embeddings: np.ndarray) -> InferResponse:
    output = InferOutput(name=OUTPUT_NAME, shape=list(embeddings.shape), datatype="FP32")
    output.set_data_from_numpy(embeddings, binary_data=False)
    return InferResponse(response_id=request_id or "", model_name=model_name, infer_outputs=[output])
