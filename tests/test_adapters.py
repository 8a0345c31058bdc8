"""The pure adapters between wire formats and texts/embeddings."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kserve.protocol.infer_type import InferInput, InferRequest

from embedding_server.operations.errors import BadRequest, Unprocessable
from embedding_server.protocols.adapters import (
    embedding_string,
    infer_response,
    legacy_response,
    parse_json,
    parse_legacy,
    parse_v2_rest,
    split_bytes_tensor,
    texts_from_infer_request,
    texts_from_instances,
)


@pytest.mark.parametrize("body", [b"", b"   ", b"{", b"nope", b"\xff\xfe"])
def test_parse_json_rejects_empty_and_broken_bodies(body):
    with pytest.raises(BadRequest):
        parse_json(body)


def test_parse_legacy_id_map_keeps_order():
    ids, texts = parse_legacy({"b": "two", "a": "one", "c": ""})
    assert ids == ["b", "a", "c"] and texts == ["two", "one", ""]


def test_parse_legacy_instances():
    assert parse_legacy({"instances": ["x", "y"]}) == (None, ["x", "y"])


@pytest.mark.parametrize("body,error,words", [
    ({}, BadRequest, "No texts"),
    ([], Unprocessable, "JSON object"),
    ("text", Unprocessable, "JSON object"),
    ({"a": "ok", "b": None}, Unprocessable, "'b'"),
    ({"a": ["x"]}, Unprocessable, "'a'"),
    ({"instances": "x"}, Unprocessable, "'instances'"),
    ({"instances": ["x", 1]}, Unprocessable, "'instances[1]'"),
])
def test_parse_legacy_errors_name_the_culprit(body, error, words):
    with pytest.raises(error) as caught:
        parse_legacy(body)
    assert words in caught.value.reason


def test_texts_from_instances_accepts_raw_json_bytes():
    assert texts_from_instances(b'{"instances": ["a"]}') == ["a"]
    with pytest.raises(Unprocessable):
        texts_from_instances({"inputs": ["a"]})


def test_embedding_string_is_the_legacy_format():
    row = np.array([-0.010852468200027943, 0.5, 1e-8], dtype=np.float32)
    text = embedding_string(row)
    assert text.startswith("[") and ", " in text
    assert text == str(row.tolist())
    np.testing.assert_array_equal(np.array(json.loads(text), dtype=np.float32), row)


@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=64))
@settings(max_examples=500, deadline=None)
def test_embedding_string_matches_str_of_the_list_for_every_float32(values):
    """The fast path must write exactly what str() wrote: exponents, subnormals, zeros, huge and non-finite values."""
    row = np.array(values, dtype=np.float32)
    assert embedding_string(row) == str(row.tolist())


def test_embedding_string_of_real_embeddings_with_small_values():
    rows = (np.random.default_rng(7).standard_normal((200, 384)) * 0.05).astype(np.float32)
    rows[0, :6] = [1e-5, -3.2e-7, 0.0, -0.0, 1.5e-4, 1e-45]
    assert all(embedding_string(row) == str(row.tolist()) for row in rows)


def test_legacy_response_shapes():
    vectors = np.eye(2, dtype=np.float32)
    assert list(legacy_response(["q", "p"], vectors)) == ["q", "p"]
    assert legacy_response(None, vectors)["predictions"] is vectors


def v2_request(data, shape, datatype="BYTES", n_inputs=1) -> InferRequest:
    inputs = [InferInput(name="text", shape=shape, datatype=datatype, data=data) for _ in range(n_inputs)]
    return InferRequest(model_name="m", infer_inputs=inputs)


def test_texts_from_infer_request_shapes_and_bytes():
    assert texts_from_infer_request(v2_request(["a", "b"], [2])) == ["a", "b"]
    assert texts_from_infer_request(v2_request([["a"], ["b"]], [2, 1])) == ["a", "b"]
    assert texts_from_infer_request(v2_request([b"caf\xc3\xa9"], [1])) == ["café"]


@pytest.mark.parametrize("request_,words", [
    (v2_request(["a"], [1], n_inputs=2), "exactly one"),
    (v2_request([1.0], [1], datatype="FP32"), "BYTES"),
    (v2_request(["a", "b"], [1, 2]), "shape"),
    (v2_request(["a", "b"], [3]), "elements"),
    (v2_request([b"\xff"], [1]), "UTF-8"),
    (v2_request(["\ud800"], [1]), "Unicode"),
])
def test_texts_from_infer_request_errors(request_, words):
    with pytest.raises(Unprocessable) as caught:
        texts_from_infer_request(request_)
    assert words in caught.value.reason


def test_infer_response_is_fp32_n_by_dim():
    request = InferRequest(model_name="m", infer_inputs=[], request_id="id-1")
    response = infer_response("m", request, np.ones((3, 4), dtype=np.float32))
    output = response.outputs[0]
    assert (output.name, output.datatype, output.shape) == ("embedding", "FP32", [3, 4])
    assert response.id == "id-1"


@pytest.mark.parametrize("request_", [v2_request([], [0]), v2_request([], [0, 1])])
def test_texts_from_infer_request_refuses_empty_input(request_):
    with pytest.raises(BadRequest, match="No texts"):
        texts_from_infer_request(request_)


def test_texts_from_instances_refuses_empty_input():
    with pytest.raises(BadRequest, match="No texts"):
        texts_from_instances({"instances": []})


def test_split_bytes_tensor():
    assert split_bytes_tensor(b"\x01\x00\x00\x00a\x00\x00\x00\x00", "t") == [b"a", b""]
    for broken in (b"\x05\x00\x00\x00abc", b"\x01\x00"):
        with pytest.raises(BadRequest, match="'t'"):
            split_bytes_tensor(broken, "t")


def test_parse_v2_rest_json_binary_and_answer_form():
    head = b'{"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", ' \
           b'"parameters": {"binary_data_size": 6}}], "outputs": [{"name": "embedding", ' \
           b'"parameters": {"binary_data": true}}], "id": "r1"}'
    request = parse_v2_rest(head + b"\x02\x00\x00\x00hi", str(len(head)), "m")
    assert texts_from_infer_request(request) == ["hi"] and request.id == "r1"
    body, json_length = infer_response("m", request, np.ones((1, 4), dtype=np.float32)).to_rest()
    assert json_length is not None and np.frombuffer(body[json_length:], dtype="<f4").tolist() == [1.0] * 4
    plain = parse_v2_rest(b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}',
                          None, "m")
    assert texts_from_infer_request(plain) == ["a"]
    assert infer_response("m", plain, np.ones((1, 4), dtype=np.float32)).to_rest()[1] is None


@pytest.mark.parametrize("body,header,error", [
    (b'{"inputs": NaN}', None, BadRequest),
    (b'{"inputs": []}', "x1", BadRequest),
    (b'{"inputs": []}', "\u00b2", BadRequest),
    (b'{"inputs": []}', "99", BadRequest),
    (b'{"inputs": []}extra', "14", BadRequest),
    (b'{"inputs": {}}', None, Unprocessable),
    (b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES"}]}', None, Unprocessable),
    (b'{"inputs": [], "outputs": [{"name": 1}]}', None, Unprocessable),
    (b'{"inputs": [], "parameters": []}', None, Unprocessable),
])
def test_parse_v2_rest_errors(body, header, error):
    with pytest.raises(error):
        parse_v2_rest(body, header, "m")
