"""OpenAI's embeddings API, driven by the official openai SDK against the real server."""
from __future__ import annotations

import base64
import json

import numpy as np
import openai
import pytest
import requests

from conftest import MODEL_NAME, TEST_KEY, cosines

TEXTS = ["The cat sits on the mat.", "Quarterly revenue grew by 12%.", "word " * 400, "é 🚀"]
EXACT = 0.99999


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key=TEST_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def token_counts(model_path):
    """Tokens as the model sees them: special tokens included, cut at 256."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return lambda texts: [len(ids) for ids in tokenizer(texts, truncation=True, max_length=256)["input_ids"]]


def vectors(response) -> np.ndarray:
    assert [item.index for item in response.data] == list(range(len(response.data)))
    return np.array([item.embedding for item in response.data], dtype=np.float32)


@pytest.mark.parametrize("encoding", [None, "float"])
def test_sdk_embeddings_match_sentence_transformers(client, reference, token_counts, encoding):
    kwargs = {} if encoding is None else {"encoding_format": encoding}  # None: the SDK asks for base64
    response = client.embeddings.create(model=MODEL_NAME, input=TEXTS, **kwargs)
    found = vectors(response)
    assert found.shape == (len(TEXTS), 384)
    assert cosines(found, reference(TEXTS)).min() >= EXACT
    assert response.model == MODEL_NAME and response.object == "list"
    expected_tokens = sum(token_counts(TEXTS))
    assert response.usage.prompt_tokens == response.usage.total_tokens == expected_tokens
    assert token_counts(TEXTS)[2] == 256  # the long text was counted as the model saw it


def test_base64_is_little_endian_float32(server, reference):
    body = {"input": ["hello there"], "model": MODEL_NAME, "encoding_format": "base64"}
    answer = requests.post(f"{server.url}/openai/v1/embeddings", json=body,
                           headers={"Authorization": f"Bearer {TEST_KEY}"}, timeout=30).json()
    vector = np.frombuffer(base64.b64decode(answer["data"][0]["embedding"]), dtype="<f4")
    assert vector.shape == (384,)
    assert cosines([vector], reference(["hello there"]))[0] >= EXACT


def test_one_string_input_and_dimensions_384_and_user(client, reference):
    response = client.embeddings.create(model=MODEL_NAME, input="just one", dimensions=384, user="someone")
    assert len(response.data) == 1
    assert cosines(vectors(response), reference(["just one"]))[0] >= EXACT


def test_same_vectors_as_the_v1_route(server, client):
    v1 = requests.post(f"{server.url}/v1/models/{MODEL_NAME}:predict", json={"instances": TEXTS},
                       headers=server.headers(), timeout=60).json()["predictions"]
    assert cosines(vectors(client.embeddings.create(model=MODEL_NAME, input=TEXTS)), v1).min() >= EXACT


def test_plain_v1_alias_for_clients_whose_base_url_ends_in_v1(server, reference):
    alias = openai.OpenAI(base_url=f"{server.url}/v1", api_key=TEST_KEY, max_retries=0)
    response = alias.embeddings.create(model=MODEL_NAME, input=["alias"])
    assert cosines(vectors(response), reference(["alias"]))[0] >= EXACT
    kserve_models = requests.get(f"{server.url}/v1/models", headers=server.headers(), timeout=10).json()
    assert kserve_models == {"models": [MODEL_NAME]}  # GET /v1/models stays KServe V1's


def test_openai_model_list(client):
    assert [model.id for model in client.models.list()] == [MODEL_NAME]


@pytest.mark.parametrize("base", ["/openai/v1", "/v1"])
def test_wrong_key_raises_the_sdk_authentication_error(app_server, base):
    wrong = openai.OpenAI(base_url=app_server.url + base, api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.embeddings.create(model=MODEL_NAME, input=["x"])
    assert caught.value.status_code == 401
    assert caught.value.body["code"] == "invalid_api_key"


def test_missing_key_is_401_in_openai_shape(app_server):
    response = requests.post(f"{app_server.url}/openai/v1/embeddings", json={"input": "x", "model": MODEL_NAME}, timeout=10)
    assert response.status_code == 401
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(model="text-embedding-3-small", input=["x"])
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"


@pytest.mark.parametrize("token_input", [[15339, 1917], [[15339, 1917], [9906]]])
def test_token_ids_are_refused_with_what_to_send(client, token_input):
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=MODEL_NAME, input=token_input)
    assert caught.value.body["param"] == "input"
    assert "list of strings" in caught.value.body["message"]
    assert "check_embedding_ctx_length=False" in caught.value.body["message"]


def test_other_dimensions_are_refused(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=MODEL_NAME, input=["x"], dimensions=256)
    assert caught.value.body["param"] == "dimensions"


@pytest.mark.parametrize("body,param", [
    (b"not json", None),
    (b"", None),
    (json.dumps({"model": MODEL_NAME}).encode(), "input"),
    (json.dumps({"input": [], "model": MODEL_NAME}).encode(), "input"),
    (json.dumps({"input": ["a", 3], "model": MODEL_NAME}).encode(), "input"),
    (json.dumps({"input": "a", "model": MODEL_NAME, "encoding_format": "int8"}).encode(), "encoding_format"),
])
def test_bad_requests_get_openai_errors(app_server, body, param):
    response = requests.post(f"{app_server.url}/openai/v1/embeddings", data=body, timeout=10,
                             headers={"Authorization": f"Bearer {TEST_KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
