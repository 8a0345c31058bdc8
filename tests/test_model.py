"""The real server, over HTTP and gRPC, against sentence-transformers' own output."""
from __future__ import annotations

import json
import re
import shlex
import subprocess

import grpc
import numpy as np
import pytest
import requests
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from kserve.protocol.infer_type import InferResponse

from conftest import MODEL_NAME, ROOT, TEST_KEY, cosines, grpc_infer, start_server

EXACT = 0.99999
LONG_TEXT = " ".join(["The quick brown fox jumps over the lazy dog near the riverbank."] * 60)  # > 256 tokens
TEXTS = [
    "This is the first sentence.",
    "Here is another sentence.",
    LONG_TEXT,
    "Ünïcödé, emoji 🚀 and 右から左 עברית text.",
    "",
    "a",
]
V1 = f"/v1/models/{MODEL_NAME}:predict"
V2 = f"/v2/models/{MODEL_NAME}/infer"


def post(server, path: str, body, headers: dict | None = None) -> requests.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(server.url + path, data=data, headers=server.headers() if headers is None else headers,
                         timeout=60)


def assert_matches_reference(vectors, texts, reference, floor=EXACT) -> None:
    vectors = np.asarray(vectors, dtype=np.float32)
    assert vectors.shape == (len(texts), 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert cosines(vectors, reference(texts)).min() >= floor


def v2_body(texts: list[str]) -> dict:
    return {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}


# --- KServe V1 ---------------------------------------------------------------------------------------------

def test_v1_predict_matches_sentence_transformers(server, reference):
    response = post(server, V1, {"instances": TEXTS})
    assert response.status_code == 200, response.text
    assert_matches_reference(response.json()["predictions"], TEXTS, reference)


def test_v1_keeps_order_and_tells_texts_apart(server, reference):
    texts = ["cats purr", "stock markets fell sharply", "kittens meow", "the bond yield rose"]
    vectors = np.asarray(post(server, V1, {"instances": texts}).json()["predictions"])
    assert_matches_reference(vectors, texts, reference)
    similarity = vectors @ vectors.T
    assert similarity[0, 2] > similarity[0, 1] and similarity[1, 3] > similarity[1, 2]


def test_similar_texts_are_closer_than_unrelated_ones(server):
    """Moved from test_fuzz (which now fuzzes the wiring over a hash backend): the real model's answers mean something."""
    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply today."]
    response = post(server, V1, {"instances": texts})
    assert response.status_code == 200, response.text
    vectors = np.asarray(response.json()["predictions"])
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    similar, unrelated = cosines(vectors[:1], vectors[1:2])[0], cosines(vectors[:1], vectors[2:])[0]
    assert similar > 0.5 > unrelated, (similar, unrelated)


def test_truncates_at_256_tokens_not_128(server, reference, model_path):
    from sentence_transformers import SentenceTransformer

    words = " ".join(f"word{i}" for i in range(400))
    vector = post(server, V1, {"instances": [words]}).json()["predictions"]
    st = SentenceTransformer(model_path, device="cpu")
    assert st.max_seq_length == 256
    st.max_seq_length = 128
    at_128 = st.encode([words])
    assert cosines(vector, reference([words]))[0] >= EXACT
    assert cosines(vector, at_128)[0] < 0.999


def test_v1_readiness_is_public(server):
    response = requests.get(f"{server.url}/v1/models/{MODEL_NAME}", timeout=10)
    assert response.status_code == 200
    assert response.json() == {"name": MODEL_NAME, "ready": True}


# --- Open Inference Protocol V2 over REST --------------------------------------------------------------------

def test_v2_infer_matches_sentence_transformers(server, reference):
    response = post(server, V2, v2_body(TEXTS))
    assert response.status_code == 200, response.text
    output = response.json()["outputs"][0]
    assert output["datatype"] == "FP32" and output["shape"] == [len(TEXTS), 384]
    assert_matches_reference(np.asarray(output["data"]).reshape(output["shape"]), TEXTS, reference)


def test_v2_metadata_names_and_shapes_the_tensors(server):
    response = requests.get(f"{server.url}/v2/models/{MODEL_NAME}", headers=server.headers(), timeout=10)
    assert response.status_code == 200
    body = response.json()
    assert body["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert body["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]


@pytest.mark.parametrize("path", ["/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL_NAME}/ready"])
def test_v2_health_is_public(server, path):
    response = requests.get(server.url + path, timeout=10)
    assert response.status_code == 200
    assert response.json().get("live", response.json().get("ready")) is True


def test_v2_rejects_a_non_bytes_tensor(app_server):
    body = {"inputs": [{"name": "text", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}]}
    response = post(app_server, V2, body)
    assert response.status_code == 422
    assert "BYTES" in response.json()["error"]


def binary_body(header: dict, tail: bytes) -> tuple[bytes, str]:
    """A body of the V2 binary extension: the JSON header, then the binary part; and the header's length."""
    head = json.dumps(header).encode()
    return head + tail, str(len(head))


def bytes_tensor(*elements: bytes) -> bytes:
    return b"".join(len(e).to_bytes(4, "little") + e for e in elements)


def binary_input(shape: list[int], size: int) -> dict:
    return {"inputs": [{"name": "text", "shape": shape, "datatype": "BYTES", "parameters": {"binary_data_size": size}}]}


HELLO = bytes_tensor(b"hello")
BAD_V2_BODIES = {  # name: (body, Inference-Header-Content-Length or None, expected status)
    "NaN": (b'{"inputs": NaN}', None, 400),
    "Infinity data": (b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [Infinity]}]}',
                      None, 400),
    "lone surrogate": (b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["\\ud800"]}]}',
                       None, 400),
    "inputs not a list": (b'{"inputs": "text"}', None, 422),
    "shape of strings": (b'{"inputs": [{"name": "text", "shape": ["1"], "datatype": "BYTES", "data": ["a"]}]}',
                         None, 422),
    "header not a number": (*binary_body(binary_input([1], len(HELLO)), HELLO)[:1], "abc", 400),
    "header a superscript digit": (*binary_body(binary_input([1], len(HELLO)), HELLO)[:1], "\u00b2", 400),
    "header past the end": (*binary_body(binary_input([1], len(HELLO)), HELLO)[:1], "100000", 400),
    "length prefix past the end": (*binary_body(binary_input([1], 9), (50).to_bytes(4, "little") + b"hello"), 400),
    "truncated length prefix": (*binary_body(binary_input([2], len(HELLO) + 2), HELLO + b"\x01\x00"), 400),
    "binary size past the end": (*binary_body(binary_input([1], 1000), HELLO), 400),
    "bytes left over": (*binary_body(binary_input([1], len(HELLO)), HELLO + b"extra"), 400),
    "invalid UTF-8": (*binary_body(binary_input([1], 9), bytes_tensor(b"h\xffllo")), 422),
    "surrogate as UTF-8": (*binary_body(binary_input([1], 7), bytes_tensor(b"\xed\xa0\x80")), 422),
    "claimed shape far above the data": (*binary_body(binary_input([1000000000], len(HELLO)), HELLO), 422),
    "negative binary size": (*binary_body(binary_input([1], -4), HELLO), 422),
}


@pytest.mark.parametrize("name", list(BAD_V2_BODIES))
def test_v2_bad_input_is_a_4xx_in_our_error_shape(app_server, name):
    """Each answered 500 (or FastAPI's {"detail": ...}) before: the client's error, in the one JSON error shape."""
    body, header_length, status = BAD_V2_BODIES[name]
    headers = app_server.headers() if header_length is None else {
        "X-Api-Key": TEST_KEY, "Inference-Header-Content-Length": header_length,
        "Content-Type": "application/octet-stream"}
    response = post(app_server, V2, body, headers=headers)
    assert response.status_code == status, response.text
    assert list(response.json()) == ["error"], response.text
    assert post(app_server, V2, v2_body(["still serving"])).status_code == 200


def test_v2_binary_extension_in_and_out_matches_sentence_transformers(server, reference):
    texts = TEXTS[:4]
    header = binary_input([len(texts), 1], 0)
    tail = bytes_tensor(*(t.encode() for t in texts))
    header["inputs"][0]["parameters"]["binary_data_size"] = len(tail)
    header["outputs"] = [{"name": "embedding", "parameters": {"binary_data": True}}]
    body, length = binary_body(header, tail)
    response = post(server, V2, body, headers={"X-Api-Key": TEST_KEY, "Inference-Header-Content-Length": length})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    answer = InferResponse.from_bytes(response.content, int(response.headers["inference-header-content-length"]))
    assert_matches_reference(answer.outputs[0].as_numpy(), texts, reference)


def test_v2_json_without_content_type_is_served(server, reference):
    response = requests.post(server.url + V2, data=json.dumps(v2_body(TEXTS)).encode(),
                             headers={"X-Api-Key": TEST_KEY}, timeout=60)
    assert response.status_code == 200, response.text
    output = response.json()["outputs"][0]
    assert_matches_reference(np.asarray(output["data"]).reshape(output["shape"]), TEXTS, reference)


EMPTY_BODIES = {
    "/embedding": {"instances": []},
    V1: {"instances": []},
    V2: {"inputs": [{"name": "text", "shape": [0], "datatype": "BYTES", "data": []}]},
    "/openai/v1/embeddings": {"input": []},
}


@pytest.mark.parametrize("path", list(EMPTY_BODIES))
def test_empty_input_is_400_on_every_route(app_server, path):
    """The README's rule: nothing to embed is the client's error (V1 and V2 answered 200 with nothing)."""
    response = post(app_server, path, EMPTY_BODIES[path])
    assert response.status_code == 400, response.text
    assert "error" in response.json()


# --- gRPC V2 --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("metadata", [(("x-api-key", TEST_KEY),), (("authorization", f"Bearer {TEST_KEY}"),)])
def test_grpc_infer_matches_sentence_transformers(server, reference, metadata):
    response = InferResponse.from_grpc(grpc_infer(server, TEXTS, metadata))
    assert_matches_reference(response.outputs[0].as_numpy().reshape(len(TEXTS), 384), TEXTS, reference)


@pytest.mark.parametrize("metadata,code", [
    ((), grpc.StatusCode.UNAUTHENTICATED),
    ((("x-api-key", "wrong"),), grpc.StatusCode.PERMISSION_DENIED),
    ((("authorization", "Bearer wrong"),), grpc.StatusCode.PERMISSION_DENIED),
])
def test_grpc_requires_the_key(app_server, metadata, code):
    with pytest.raises(grpc.RpcError) as caught:
        grpc_infer(app_server, ["hello"], metadata)
    assert caught.value.code() == code
    assert TEST_KEY not in (caught.value.details() or "")


def raw_grpc_request(texts: list[bytes], shape: list[int]) -> pb.ModelInferRequest:
    """As tritonclient.grpc and KServe's InferenceGRPCClient send BYTES: raw input contents."""
    return pb.ModelInferRequest(model_name=MODEL_NAME, inputs=[pb.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=shape)], raw_input_contents=[b"".join(
            len(t).to_bytes(4, "little") + t for t in texts)])


def typed_grpc_request(texts: list[bytes], shape: list[int]) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name=MODEL_NAME, inputs=[pb.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=shape, contents=pb.InferTensorContents(bytes_contents=texts))])


def model_infer(server, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    with grpc.insecure_channel(server.grpc_target) as channel:
        return pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, metadata=(("x-api-key", TEST_KEY),),
                                                                    timeout=60)


@pytest.mark.parametrize("shape", [[len(TEXTS)], [len(TEXTS), 1]])
@pytest.mark.parametrize("form", ["raw", "typed"])
def test_grpc_answers_in_the_form_it_was_asked(server, reference, form, shape):
    """Raw input contents in, raw output contents out (as Triton answers); typed contents in, fp32_contents out."""
    build = raw_grpc_request if form == "raw" else typed_grpc_request
    response = model_infer(server, build([t.encode() for t in TEXTS], shape))
    output = response.outputs[0]
    assert (output.name, output.datatype, list(output.shape)) == ("embedding", "FP32", [len(TEXTS), 384])
    if form == "raw":
        assert len(response.raw_output_contents) == 1 and not output.contents.fp32_contents
        vectors = np.frombuffer(response.raw_output_contents[0], dtype="<f4")
    else:
        assert not response.raw_output_contents
        vectors = np.asarray(output.contents.fp32_contents, dtype=np.float32)
    assert_matches_reference(vectors.reshape(len(TEXTS), 384), TEXTS, reference)


def _raw_with_tail(tail: bytes, shape: list[int]) -> pb.ModelInferRequest:
    request = raw_grpc_request([], shape)
    request.raw_input_contents[0] = tail
    return request


BAD_GRPC_REQUESTS = {
    "wrong length prefix": _raw_with_tail((50).to_bytes(4, "little") + b"hello", [1]),
    "truncated length prefix": _raw_with_tail(b"\x05\x00", [1]),
    "invalid UTF-8, raw": raw_grpc_request([b"h\xffllo"], [1]),
    "invalid UTF-8, typed": typed_grpc_request([b"\xed\xa0\x80"], [1]),
    "claimed shape far above the data, raw": raw_grpc_request([b"hello"], [1000000000]),
    "claimed shape far above the data, typed": typed_grpc_request([b"hello"], [1000000000]),
    "empty, typed": typed_grpc_request([], [0]),
    "empty, raw": raw_grpc_request([], [0]),
    "two raw contents for one input": pb.ModelInferRequest(
        model_name=MODEL_NAME, inputs=raw_grpc_request([b"a"], [1]).inputs, raw_input_contents=[b"", b""]),
    "FP32 input": pb.ModelInferRequest(model_name=MODEL_NAME, inputs=[pb.ModelInferRequest.InferInputTensor(
        name="text", datatype="FP32", shape=[1], contents=pb.InferTensorContents(fp32_contents=[1.0]))]),
    "unknown datatype": pb.ModelInferRequest(model_name=MODEL_NAME, inputs=[pb.ModelInferRequest.InferInputTensor(
        name="text", datatype="STRING", shape=[1])], raw_input_contents=[b"\x01\x00\x00\x00a"]),
}


@pytest.mark.parametrize("name", list(BAD_GRPC_REQUESTS))
def test_grpc_bad_input_is_invalid_argument(app_server, name):
    """The client's error, never INTERNAL or UNKNOWN; and the app_server keeps serving."""
    with pytest.raises(grpc.RpcError) as caught:
        model_infer(app_server, BAD_GRPC_REQUESTS[name])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert model_infer(app_server, typed_grpc_request([b"still serving"], [1])).outputs[0].shape == [1, 384]


UNDECODABLE = {
    "not protobuf": b"\xff\xff\xff\xff",
    "invalid UTF-8 in the model name": typed_grpc_request([b"hi"], [1]).SerializeToString().replace(
        MODEL_NAME.encode(), MODEL_NAME[:-1].encode() + b"\xff"),
}


@pytest.mark.parametrize("name", list(UNDECODABLE))
def test_grpc_message_that_does_not_parse_is_invalid_argument(app_server, name):
    """grpc answered UNKNOWN for the deserializer's DecodeError; the key is still checked first."""
    with grpc.insecure_channel(app_server.grpc_target) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as caught:
            call(UNDECODABLE[name], metadata=(("x-api-key", TEST_KEY),), timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            call(UNDECODABLE[name], timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert model_infer(app_server, typed_grpc_request([b"still serving"], [1])).outputs[0].shape == [1, 384]


def test_grpc_model_unload_requires_the_key(app_server):
    with grpc.insecure_channel(app_server.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=MODEL_NAME), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
        assert stub.ModelReady(pb.ModelReadyRequest(name=MODEL_NAME), timeout=10).ready


# --- The legacy API ------------------------------------------------------------------------------------------

def test_legacy_id_map_keeps_keys_in_order_and_values_as_strings(server, reference):
    body = {"zeta": TEXTS[0], "alpha": TEXTS[1], "m-3": TEXTS[2], "b": TEXTS[3]}
    response = post(server, "/embedding", body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert list(answer) == list(body)
    assert all(isinstance(value, str) and value.startswith("[") for value in answer.values())
    assert ", " in answer["zeta"]
    vectors = [json.loads(answer[key]) for key in body]
    assert_matches_reference(vectors, list(body.values()), reference)


def test_legacy_instances_form(server, reference):
    response = post(server, "/embedding", {"instances": TEXTS[:3]})
    assert response.status_code == 200
    assert list(response.json()) == ["predictions"]
    assert_matches_reference(response.json()["predictions"], TEXTS[:3], reference)


def test_legacy_and_v1_give_the_same_vectors(server):
    legacy = post(server, "/embedding", {"x": "same text"}).json()["x"]
    v1 = post(server, V1, {"instances": ["same text"]}).json()["predictions"][0]
    assert cosines([json.loads(legacy)], [v1])[0] >= EXACT


def test_health_and_key_info_bodies(server):
    assert requests.get(f"{server.url}/health", timeout=10).json() == {"status": "healthy", "model": MODEL_NAME}
    info = requests.get(f"{server.url}/api-key-info", timeout=10)
    assert info.status_code == 200
    assert info.json() == {
        "message": "API key authentication is enabled",
        "usage": {
            "header_name": "X-Api-Key",
            "alternative": "Authorization: Bearer <key>",
            "note": "Set SHOW_API_KEY_INFO=true environment variable to display the actual key",
        },
    }
    assert TEST_KEY not in info.text


@pytest.fixture(scope="module")
def started_bare(tmp_path_factory, cache_dir):
    """One start for the start-up tests below: no API_KEY (the key is generated), SHOW_API_KEY_INFO, MODEL_NAME,
    and the port given as KServe's --http_port flag while PORT names another (the default backend, from the run's
    export cache)."""
    running = start_server(tmp_path_factory.mktemp("bare"), env={"SHOW_API_KEY_INFO": "true", "MODEL_NAME": "minilm"},
                           key=None, port_flag=True)
    log = running.log()
    printed = re.findall(r"Generated API Key: (\S+)", log)
    running.key = printed[0] if printed else None
    yield running, log, printed
    running.stop()


def test_generated_key_is_printed_once_and_shown_only_when_asked(started_bare):
    shown, log, printed = started_bare
    assert log.count("WARNING: No API_KEY environment variable set!") == 1
    assert len(printed) == 1 and len(printed[0]) >= 32
    key = printed[0]
    assert requests.get(f"{shown.url}/api-key-info", timeout=10).json()["api_key"] == key
    ok = requests.post(f"{shown.url}/embedding", json={"a": "hi"}, headers={"X-Api-Key": key}, timeout=30)
    assert ok.status_code == 200
    assert shown.log().count(key) == 1, "the key appears in the log only in the banner"


# --- The seed README's curl examples -------------------------------------------------------------------------

def seed_curl_examples() -> list[tuple[str, int]]:
    """Every complete curl command in the seed README, with the status its comment promises (401 or 200)."""
    text = (ROOT / "docs" / "seed-README.md").read_text()
    examples = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        comment = ""
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("#"):
                comment = line
            elif line.startswith("curl") and "..." not in line:
                examples.append((line, 401 if "401" in comment else 200))
    return examples


SEED_EXAMPLES = seed_curl_examples()


def test_seed_readme_has_curl_examples():
    assert len(SEED_EXAMPLES) >= 7
    assert sum(status == 401 for _, status in SEED_EXAMPLES) == 2


@pytest.mark.parametrize("command,status", SEED_EXAMPLES)
def test_seed_curl_example(server, command, status):
    command = (command.replace("http://localhost:5000", server.url)
               .replace("YOUR_API_KEY_HERE", TEST_KEY).replace("your-api-key-here", TEST_KEY))
    argv = shlex.split(command) + ["-s", "-o", "-", "-w", "\n%{http_code}"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    body, code = result.stdout.rsplit("\n", 1)
    assert int(code) == status, body
    answer = json.loads(body)
    if status == 401:
        assert answer["error"] == "API key required"
    elif "/embedding" in command:
        sent = json.loads(re.search(r"-d '(.*?)'", command).group(1))
        expected = ["predictions"] if "instances" in sent else list(sent)
        assert list(answer) == expected


# --- Errors ----------------------------------------------------------------------------------------------------

BAD_BODIES = [
    ("/embedding", b"not json", 400, "not valid JSON"),
    ("/embedding", b"", 400, "empty"),
    ("/embedding", b"{}", 400, "No texts"),
    ("/embedding", b'{"a": "ok", "b": 3}', 422, "'b'"),
    ("/embedding", b'{"a": {"nested": "x"}}', 422, "'a'"),
    ("/embedding", b'["a", "b"]', 422, "JSON object"),
    ("/embedding", b'{"instances": "text"}', 422, "'instances'"),
    ("/embedding", b'{"instances": ["ok", null]}', 422, "'instances[1]'"),
    (V1, b"not json", 400, "Unrecognized request format"),
    (V1, b'{"instances": ["ok", 5]}', 422, "'instances[1]'"),
    (V1, b'{"inputs": ["a"]}', 422, "'instances'"),
    (V1, b'"just a string"', 422, "JSON object"),
]


@pytest.mark.parametrize("path,body,status,words", BAD_BODIES)
def test_bad_input_gets_a_clear_json_error(app_server, path, body, status, words):
    response = post(app_server, path, body)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]
    assert "Traceback" not in response.text


def test_unknown_model_is_404(app_server):
    response = post(app_server, "/v1/models/no-such-model:predict", {"instances": ["a"]})
    assert response.status_code == 404
    assert "no-such-model" in response.json()["error"]


def test_wrong_method_is_405_json(app_server):
    response = requests.get(f"{app_server.url}/embedding", headers=app_server.headers(), timeout=10)
    assert response.status_code == 405
    assert response.json()


def test_server_keeps_serving_after_bad_requests(server, reference):
    for path, body, _, _ in BAD_BODIES:
        post(server, path, body)
    response = post(server, "/embedding", {"still": "alive"})
    assert response.status_code == 200
    assert_matches_reference([json.loads(response.json()["still"])], ["alive"], reference)
    assert server.process.poll() is None


# --- Start-up options -----------------------------------------------------------------------------------------

def test_kserve_flags_and_model_name_are_honoured(started_bare, reference):
    custom, _, _ = started_bare
    assert custom.env["PORT"] != str(custom.http_port)  # the flag wins over PORT
    response = requests.post(f"{custom.url}/v1/models/minilm:predict", json={"instances": ["flag"]},
                             headers=custom.headers(), timeout=30)
    assert response.status_code == 200
    assert_matches_reference(response.json()["predictions"], ["flag"], reference, floor=0.9999)
    assert requests.get(f"{custom.url}/health", timeout=10).json()["model"] == "minilm"
