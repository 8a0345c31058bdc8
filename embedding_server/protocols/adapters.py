"""Pure adapters between the wire formats and lists of texts / arrays of embeddings. No I/O."""
from __future__ import annotations

import base64
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from kserve.constants.constants import INFERENCE_CONTENT_LENGTH_HEADER
from kserve.protocol.infer_type import InferInput, InferOutput, InferRequest, InferResponse, RequestedOutput

from embedding_server.engine.batcher import Embedded
from embedding_server.operations.errors import BadRequest, OpenAIRequestError, TooLarge, Unprocessable
from embedding_server.operations.observability import (
    COMPUTE_TEXTS,
    COMPUTE_TIME,
    COMPUTE_TOKENS,
    COMPUTED_TEXTS,
    QUEUE_TIME,
    TRUNCATED_TEXTS,
)
from embedding_server.operations.settings import Limits

INPUT_NAME = "text"
OUTPUT_NAME = "embedding"
BINARY = "application/octet-stream"  # the media type of V2 binary-extension bodies


def parse_json(body: bytes) -> Any:
    if not body or not body.strip():
        raise BadRequest("The request body is empty; send a JSON object")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}") from None


NO_TEXTS = "No texts to embed: send at least one"


def _string_list(values: Any, what: str) -> list[str]:
    if not isinstance(values, list):
        raise Unprocessable(f"'{what}' must be a list of strings, not {type(values).__name__}")
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise Unprocessable(f"'{what}[{index}]' must be a string, not {type(value).__name__}")
    if not values:
        raise BadRequest(f"'{what}' is empty. {NO_TEXTS}")
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


def check_limits(texts: list[str], limits: Limits) -> list[str]:
    """Too many texts, or a text too long to tokenise cheaply, is a 413 that says which limit."""
    if len(texts) > limits.max_texts:
        raise TooLarge(f"{len(texts)} texts in one request; the limit is {limits.max_texts} (MAX_TEXTS_PER_REQUEST)")
    for index, text in enumerate(texts):
        if len(text) > limits.max_chars:
            raise TooLarge(f"Text {index} has {len(text)} characters; the limit is {limits.max_chars} "
                           "(MAX_CHARS_PER_TEXT). Texts are cut at the model's token limit anyway: send the first part.")
    return texts


def embedding_string(row: np.ndarray) -> str:
    """One embedding as the legacy service wrote it: str() of a list of floats.

    orjson writes the same shortest round-trip digits as Python's float repr, 8x faster (str() was 5% of the
    server's CPU under load). Where the two could write a value differently (Python switches to an exponent below
    1e-4 and from 1e16, orjson elsewhere; orjson writes null for nan and inf), the value takes repr() itself.
    """
    values = row.tolist()
    tokens = orjson.dumps(values).decode()[1:-1].split(",")
    size = np.abs(row)
    for i in np.flatnonzero(~np.isfinite(row) | ((size < 1e-3) & (size > 0)) | (size >= 1e15)):
        tokens[i] = repr(values[i])
    return "[" + ", ".join(tokens) + "]"


def legacy_response(ids: list[str] | None, embeddings: np.ndarray) -> dict[str, Any]:
    if ids is None:
        return {"predictions": embeddings}
    return {key: embedding_string(row) for key, row in zip(ids, embeddings)}


def _decode(value: Any, index: int) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise Unprocessable(f"Element {index} of the input tensor is not valid UTF-8") from None
    if not isinstance(value, str):
        raise Unprocessable(f"Element {index} of the input tensor must be a string, not {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate such as "\ud800": JSON can spell it, UTF-8 cannot
        raise Unprocessable(f"Element {index} of the input tensor is not valid Unicode text") from None
    return value


def require_bytes(name: str, datatype: Any) -> None:
    if datatype != "BYTES":
        raise Unprocessable(f"Input '{name}' must have datatype BYTES, not {datatype}")


def split_bytes_tensor(raw: bytes, name: str) -> list[bytes]:
    """A BYTES tensor's binary form (V2 binary extension, gRPC raw contents): each element is a 4-byte
    little-endian length, then that many bytes. A length that runs past the end is the client's error."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if len(raw) - offset < 4:
            raise BadRequest(f"Input '{name}': {len(raw) - offset} bytes left where a 4-byte length was expected")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if length > len(raw) - offset:
            raise BadRequest(f"Input '{name}': element {len(elements)} claims {length} bytes, "
                             f"but only {len(raw) - offset} follow")
        elements.append(raw[offset:offset + length])
        offset += length
    return elements


def texts_from_infer_request(request: InferRequest) -> list[str]:
    """Open Inference Protocol V2: one BYTES input of shape [n] (or [n, 1]) whose data is a list of elements
    (parse_v2_rest and grpc_v2 decode the binary forms into that list)."""
    if len(request.inputs) != 1:
        raise Unprocessable(f"Expected exactly one input tensor '{INPUT_NAME}', got {len(request.inputs)}")
    tensor = request.inputs[0]
    require_bytes(tensor.name, tensor.datatype)
    shape = list(tensor.shape)
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise Unprocessable(f"Input '{tensor.name}' must have shape [n] or [n, 1], not {shape}")
    if not isinstance(tensor.data, list):
        raise Unprocessable(f"Input '{tensor.name}' has no data")
    flat: list[Any] = []
    for value in tensor.data:
        flat.extend(value if isinstance(value, list) else [value])
    if len(flat) != shape[0]:
        raise Unprocessable(f"Input '{tensor.name}' has shape {shape} but {len(flat)} elements")
    if not flat:
        raise BadRequest(f"Input '{tensor.name}' has shape {shape}. {NO_TEXTS}")
    return [_decode(value, index) for index, value in enumerate(flat)]


def _object(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise Unprocessable(f"'{what}' must be a JSON object, not {type(value).__name__}")
    return value


def _parameters(holder: dict, what: str) -> dict:
    parameters = holder.get("parameters")
    return {} if parameters is None else _object(parameters, f"{what}.parameters")


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise Unprocessable(f"'{what}' must be a non-negative integer, not {value!r}"[:300])
    return value


def _tensor(document: Any, index: int, binary: bytes, offset: int) -> tuple[InferInput, int]:
    """One input of a V2 REST request; its data is in the JSON or, per the binary extension, the next
    `binary_data_size` bytes after the JSON header. Returns the input and the offset past its bytes."""
    what = f"inputs[{index}]"
    tensor = _object(document, what)
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(name, str) or not isinstance(datatype, str):
        raise Unprocessable(f"'{what}' needs a string 'name' and a string 'datatype'")
    if not isinstance(shape, list):
        raise Unprocessable(f"'{what}.shape' must be a list of integers")
    shape = [_count(size, f"{what}.shape") for size in shape]
    parameters = _parameters(tensor, what)
    if "data" in tensor:
        return InferInput(name, shape, datatype, data=tensor["data"], parameters=parameters), offset
    if "binary_data_size" not in parameters:
        raise Unprocessable(f"'{what}' has neither 'data' nor the parameter 'binary_data_size'")
    size = _count(parameters["binary_data_size"], f"{what}.parameters.binary_data_size")
    if size > len(binary) - offset:
        raise BadRequest(f"'{what}' claims {size} bytes of binary data, but only {len(binary) - offset} follow")
    require_bytes(name, datatype)
    data = split_bytes_tensor(binary[offset:offset + size], name)
    return InferInput(name, shape, datatype, data=data, parameters=parameters), offset + size


def parse_v2_rest(body: bytes, header_length: str | None, model_name: str) -> InferRequest:
    """A V2 REST inference request: JSON, or the binary extension (the first `Inference-Header-Content-Length`
    bytes are the JSON header, the binary inputs follow in order). Without that header the body is JSON,
    whatever its Content-Type: tritonclient's JSON mode sends none."""
    if header_length is None:
        document, binary = parse_json(body), b""
    else:
        header_length = header_length.strip()
        if not (header_length.isascii() and header_length.isdigit()):  # str.isdigit alone takes "²"
            raise BadRequest(f"{INFERENCE_CONTENT_LENGTH_HEADER} must be a number of bytes, "
                             f"not {header_length[:40]!r}")
        length = int(header_length)
        if length > len(body):
            raise BadRequest(f"{INFERENCE_CONTENT_LENGTH_HEADER} is {length}, but the body has {len(body)} bytes")
        document, binary = parse_json(body[:length]), body[length:]
    request = _object(document, "body")
    inputs = request.get("inputs")
    if not isinstance(inputs, list):
        raise Unprocessable("'inputs' must be a list of tensors")
    infer_inputs, offset = [], 0
    for index, tensor in enumerate(inputs):
        infer_input, offset = _tensor(tensor, index, binary, offset)
        infer_inputs.append(infer_input)
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes after the JSON header belong to no input")
    outputs = request.get("outputs")
    if outputs is not None and not isinstance(outputs, list):
        raise Unprocessable("'outputs' must be a list")
    requested = []
    for index, output in enumerate(outputs or []):
        output = _object(output, f"outputs[{index}]")
        if not isinstance(output.get("name"), str):
            raise Unprocessable(f"'outputs[{index}].name' must be a string")
        requested.append(RequestedOutput(output["name"], _parameters(output, f"outputs[{index}]")))
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise Unprocessable("'id' must be a string")
    return InferRequest(model_name=model_name, infer_inputs=infer_inputs, request_id=request_id,
                        parameters=_parameters(request, "body"), request_outputs=requested or None)


def infer_response(model_name: str, request: InferRequest, embeddings: np.ndarray) -> InferResponse:
    """The embeddings as the request asked for them: JSON data, or binary (REST `binary_data_output` or an
    output's `binary_data`), which KServe's to_rest writes."""
    output = InferOutput(name=OUTPUT_NAME, shape=list(embeddings.shape), datatype="FP32")
    output.set_data_from_numpy(embeddings, binary_data=False)
    return InferResponse(response_id=request.id or "", model_name=model_name, infer_outputs=[output],
                         use_binary_outputs=bool(request.use_binary_outputs),
                         requested_outputs=request.request_outputs)


def cost_headers(embedded: Embedded) -> dict[str, str]:
    """What a request cost, in the headers TEI uses (times in milliseconds)."""
    return {
        COMPUTE_TEXTS: str(len(embedded.embeddings)),
        COMPUTED_TEXTS: str(embedded.computed),
        COMPUTE_TOKENS: str(embedded.tokens),
        TRUNCATED_TEXTS: str(embedded.truncated),
        COMPUTE_TIME: f"{embedded.compute_seconds * 1000:.3f}",
        QUEUE_TIME: f"{embedded.queue_seconds * 1000:.3f}",
    }


# --- OpenAI embeddings -----------------------------------------------------------------------------------------

TOKEN_IDS_HELP = (
    "This server embeds text, not token ids: send 'input' as a string or a list of strings. "
    "Token ids from tiktoken are not this model's vocabulary. LangChain: "
    "OpenAIEmbeddings(..., check_embedding_ctx_length=False) sends strings; LlamaIndex: "
    "OpenAILikeEmbedding(model_name=..., api_base=...) sends strings."
)


ENCODING_FORMATS = ("float", "base64")  # the first is the default


@dataclass(frozen=True)
class OpenAIEmbeddingRequest:
    texts: list[str]
    model: str
    encoding_format: str


def _is_token_ids(value: Any) -> bool:
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return True
    return isinstance(value, list) and bool(value) and all(_is_token_ids(v) for v in value)


def parse_openai_embedding(body: Any, served_model: str, dimension: int) -> OpenAIEmbeddingRequest:
    """OpenAI's POST /v1/embeddings body: input (str | [str]), model, encoding_format, dimensions, user."""
    if not isinstance(body, dict):
        raise OpenAIRequestError("The body must be a JSON object", param=None)
    if "input" not in body:
        raise OpenAIRequestError("'input' is required: a string or a list of strings", param="input")
    raw = body["input"]
    if _is_token_ids(raw):
        raise OpenAIRequestError(TOKEN_IDS_HELP, param="input", code="token_ids_not_supported")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts:
        raise OpenAIRequestError("'input' must be a string or a non-empty list of strings", param="input")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise OpenAIRequestError(f"'input[{index}]' must be a string, not {type(text).__name__}", param="input")
    model = body.get("model", served_model)
    if model != served_model:
        raise OpenAIRequestError(f"The model '{model}' does not exist; this server serves '{served_model}'",
                                 param="model", status=404, code="model_not_found")
    encoding_format = body.get("encoding_format") or ENCODING_FORMATS[0]
    if encoding_format not in ENCODING_FORMATS:
        choices = " or ".join(repr(choice) for choice in ENCODING_FORMATS)
        raise OpenAIRequestError(f"'encoding_format' must be {choices}, not {encoding_format!r}",
                                 param="encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and dimensions != dimension:
        raise OpenAIRequestError(
            f"'dimensions' must be {dimension}: this model gives {dimension}-dimensional embeddings and was not "
            "trained to be shortened", param="dimensions")
    return OpenAIEmbeddingRequest(texts=texts, model=model, encoding_format=encoding_format)


def openai_embedding_response(request: OpenAIEmbeddingRequest, embeddings: np.ndarray, tokens: int) -> dict[str, Any]:
    """OpenAI's list of embeddings; base64 is little-endian float32, as the official SDKs decode it."""
    if request.encoding_format == "base64":
        little_endian = embeddings.astype("<f4", copy=False)
        vectors: list[Any] = [base64.b64encode(row.tobytes()).decode("ascii") for row in little_endian]
    else:
        vectors = list(embeddings)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
        "model": request.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
