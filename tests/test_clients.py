"""The stock V2 clients KServe and Triton users already have, in their default modes, against the real server.

Each answer is held to sentence-transformers' own vectors (cosine >= 0.99999, the fp32 server), sent with the key the
way each client passes headers or metadata, and refused without it.

tritonclient.grpc and kserve cannot be imported in one process: both register the protobuf package `inference`
(`duplicate symbol 'inference.ServerLiveRequest'`). Its calls therefore run in a child process, as a user's would.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from tritonclient.utils import InferenceServerException

from conftest import MODEL_NAME, ROOT, TEST_KEY, cosines

EXACT = 0.99999
TEXTS = [
    "This is the first sentence.",
    "Ünïcödé, emoji 🚀 and 右から左 עברית text.",
    " ".join(["The quick brown fox jumps over the lazy dog."] * 60),  # > 256 tokens
    "",
]
SHAPES = {"[n]": [len(TEXTS)], "[n, 1]": [len(TEXTS), 1]}


def assert_matches(vectors, reference) -> None:
    vectors = np.asarray(vectors, dtype=np.float32).reshape(len(TEXTS), -1)
    assert vectors.shape == (len(TEXTS), 384)
    assert cosines(vectors, reference(TEXTS)).min() >= EXACT


# --- tritonclient.http -------------------------------------------------------------------------------------

def triton_http_infer(server, shape: list[int], binary: bool, headers: dict[str, str] | None):
    client = triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}", network_timeout=120)
    text = triton_http.InferInput("text", shape, "BYTES")
    text.set_data_from_numpy(np.array(TEXTS, dtype=object).reshape(shape), binary_data=binary)
    output = triton_http.InferRequestedOutput("embedding", binary_data=binary)
    try:
        return client.infer(MODEL_NAME, [text], outputs=[output], headers=headers)
    finally:
        client.close()


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_http_matches_sentence_transformers(server, reference, shape, binary):
    """JSON mode sends no Content-Type (KServe answered 400 'inference-header-content-length missing');
    binary mode sends the binary extension and asks for a binary output."""
    result = triton_http_infer(server, SHAPES[shape], binary, headers={"X-Api-Key": TEST_KEY})
    output = result.get_output("embedding")
    assert output["datatype"] == "FP32" and output["shape"] == [len(TEXTS), 384]
    assert ("binary_data_size" in (output.get("parameters") or {})) is binary
    assert_matches(result.as_numpy("embedding"), reference)


def test_tritonclient_http_without_the_key_is_401(server):
    with pytest.raises(InferenceServerException) as caught:
        triton_http_infer(server, SHAPES["[n]"], True, headers=None)
    assert caught.value.status() == "401"
    assert triton_http_infer(server, SHAPES["[n]"], True, headers={"Authorization": f"Bearer {TEST_KEY}"})


def test_tritonclient_http_probes_and_metadata(server):
    client = triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL_NAME)
        metadata = client.get_model_metadata(MODEL_NAME, headers={"X-Api-Key": TEST_KEY})
        with pytest.raises(InferenceServerException) as caught:
            client.get_model_metadata(MODEL_NAME)
    finally:
        client.close()
    assert metadata["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert metadata["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]
    assert caught.value.status() == "401"


# --- tritonclient.grpc, in a child process ----------------------------------------------------------------

TRITON_GRPC = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tritonclient.grpc as triton_grpc
    from tritonclient.utils import InferenceServerException

    job = json.load(sys.stdin)
    client = triton_grpc.InferenceServerClient(job["target"])
    metadata = {"x-api-key": job["key"]}
    answer = {"infer": {}}
    for name, shape in job["shapes"].items():
        text = triton_grpc.InferInput("text", shape, "BYTES")
        text.set_data_from_numpy(np.array(job["texts"], dtype=object).reshape(shape))
        result = client.infer(job["model"], [text], headers=metadata, client_timeout=120)
        answer["infer"][name] = {"vectors": result.as_numpy("embedding").tolist(),
                                 "raw_outputs": len(result.get_response().raw_output_contents)}
    answer["live"] = client.is_server_live()
    answer["ready"] = client.is_server_ready()
    answer["model_ready"] = client.is_model_ready(job["model"])
    answer["metadata"] = client.get_model_metadata(job["model"], headers=metadata, as_json=True)
    try:
        client.infer(job["model"], [text])
    except InferenceServerException as exc:
        answer["without_key"] = exc.status()
    json.dump(answer, sys.stdout)
""")


@pytest.fixture(scope="module")
def triton_grpc_answers(server) -> dict:
    job = {"target": server.grpc_target, "key": TEST_KEY, "model": MODEL_NAME, "texts": TEXTS, "shapes": SHAPES}
    done = subprocess.run([sys.executable, "-c", TRITON_GRPC], input=json.dumps(job), capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_tritonclient_grpc_matches_sentence_transformers(triton_grpc_answers, reference, shape):
    """tritonclient.grpc always sends raw_input_contents (the old server saw 0 elements) and reads raw outputs."""
    answer = triton_grpc_answers["infer"][shape]
    assert answer["raw_outputs"] == 1
    assert_matches(answer["vectors"], reference)


def test_tritonclient_grpc_probes_metadata_and_key(triton_grpc_answers):
    assert triton_grpc_answers["live"] and triton_grpc_answers["ready"] and triton_grpc_answers["model_ready"]
    metadata = triton_grpc_answers["metadata"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [("text", "BYTES", ["-1"])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["outputs"]] == [
        ("embedding", "FP32", ["-1", "384"])]
    assert triton_grpc_answers["without_key"] == "StatusCode.UNAUTHENTICATED"


# --- KServe's own clients ----------------------------------------------------------------------------------

def kserve_v2_request(shape: list[int]) -> InferRequest:
    """As KServe's docs build it: set_data_from_numpy's default is binary data."""
    text = InferInput("text", shape, "BYTES")
    text.set_data_from_numpy(np.array(TEXTS, dtype=object).reshape(shape))
    return InferRequest(model_name=MODEL_NAME, infer_inputs=[text])


async def kserve_rest(server, protocol: str, headers: dict[str, str] | None):
    client = InferenceRESTClient(RESTConfig(protocol=protocol, timeout=120))
    try:
        body = {"instances": TEXTS} if protocol == "v1" else kserve_v2_request(SHAPES["[n]"])
        return await client.infer(server.url, body, model_name=MODEL_NAME, headers=headers)
    finally:
        await client.close()


def test_kserve_rest_client_v1(server, reference):
    answer = asyncio.run(kserve_rest(server, "v1", {"X-Api-Key": TEST_KEY}))
    assert_matches(answer["predictions"], reference)
    with pytest.raises(httpx.HTTPStatusError) as caught:
        asyncio.run(kserve_rest(server, "v1", None))
    assert caught.value.response.status_code == 401


def test_kserve_rest_client_v2(server, reference):
    answer = asyncio.run(kserve_rest(server, "v2", {"X-Api-Key": TEST_KEY}))
    assert_matches(answer.outputs[0].as_numpy(), reference)
    with pytest.raises(httpx.HTTPStatusError) as caught:
        asyncio.run(kserve_rest(server, "v2", None))
    assert caught.value.response.status_code == 401


async def kserve_grpc(server, shape: list[int], metadata):
    client = InferenceGRPCClient(server.grpc_target, timeout=120)
    try:
        return await client.infer(kserve_v2_request(shape), headers=metadata)
    finally:
        await client.close()


@pytest.mark.parametrize("shape", list(SHAPES))
def test_kserve_grpc_client(server, reference, shape):
    """Its default sends raw_input_contents, as tritonclient does."""
    answer = asyncio.run(kserve_grpc(server, SHAPES[shape], (("x-api-key", TEST_KEY),)))
    assert_matches(answer.outputs[0].as_numpy(), reference)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        asyncio.run(kserve_grpc(server, SHAPES[shape], None))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
