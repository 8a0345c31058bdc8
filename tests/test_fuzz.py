"""Schemathesis against the real server's own /openapi.json: once with the key, once without a valid one.

Every generated request (the examples, coverage and fuzzing phases; valid and invalid data) must get an answer
that is not a 5xx and whose status, content type and body the document declares; and no route outside the public
list may answer anything but 401/403 without a valid key. A dedicated server with small limits keeps each
embedding request cheap: the production wiring in-process (conftest.InProcessServer) over the deterministic
HashBackend, so that what is fuzzed is the HTTP layer, not the model. Schemathesis' engine runs the cases (its pytest plugin does not work with pytest 9.2),
and each failure is reported once per operation and check, with the curl command that reproduces it.
"""
from __future__ import annotations

import json
from collections import Counter
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
import requests
import schemathesis
from hypothesis import given, settings
from hypothesis import strategies as st
from schemathesis import checks
from schemathesis.core.failures import Failure
from schemathesis.engine import Status, events, from_schema
from test_limits import json_values, tensor_documents

from auth_middleware import is_public
from conftest import MODEL_NAME, InProcessServer

KEY = "fuzz-key-5d81"
# Small limits: the fuzzer reaches 413 quickly, and a valid request embeds at most a few short texts.
FUZZ_LIMITS = {"MAX_BODY_BYTES": "4096", "MAX_TEXTS_PER_REQUEST": "8", "MAX_CHARS_PER_TEXT": "300",
               "MAX_QUEUED_TEXTS": "512"}
MAX_EXAMPLES = 50  # per operation, in the fuzzing phase: the module takes 1-3 minutes on 2 busy cores
SEED = 20261127
CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance"]
# They unload or reload the only model: the keyed run must leave it serving.
MODEL_CONTROL = r"^/v2/repository/models/"


@schemathesis.check
def keyless_request_rejected(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                             case: schemathesis.Case) -> bool | None:
    """Without a valid key, a route off the public list answers 401 (no key) or 403 (a wrong one), never more."""
    path = unquote(urlsplit(response.request.url).path)  # as the server's middleware sees it
    if is_public(case.method.upper(), path):
        return True  # schemathesis' convention: True means "not applicable", None "passed"
    sent = {name.lower() for name in response.request.headers}
    allowed = {401} if not sent & {"x-api-key", "authorization"} else {401, 403}
    if response.status_code not in allowed:
        raise Failure(operation=case.operation.label, title="Protected route answered without a valid key",
                      message=f"{case.method.upper()} {path} answered {response.status_code}, expected "
                              f"{sorted(allowed)}")
    return None


@schemathesis.check
def key_accepted(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                 case: schemathesis.Case) -> bool | None:
    """With the valid key (sent by the keyed run on every request), no route answers 401 or 403."""
    if response.status_code in (401, 403):
        raise Failure(operation=case.operation.label, title="The valid key was refused",
                      message=f"{case.method.upper()} answered {response.status_code}: {response.content[:200]!r}")
    return None


@pytest.fixture(scope="module")
def fuzz_server() -> InProcessServer:
    running = InProcessServer(env=FUZZ_LIMITS, key=KEY)
    yield running
    running.stop()


def load_schema(server: InProcessServer, check_names: list[str], headers: dict[str, str] | None = None,
                document: dict | None = None, **parameters: str) -> schemathesis.BaseSchema:
    if document is None:
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", timeout=30)
    else:
        schema = schemathesis.openapi.from_dict(document)
    assert schema.raw_schema.get("components", {}).get("securitySchemes"), \
        "the server serves FastAPI's bare document, not the one of api_docs.install_api_docs"
    config = schema.config
    config.seed = SEED
    config.update(base_url=server.url, headers=headers, parameters=parameters or None, request_timeout=60,
                  continue_on_failure=True)
    config.phases.update(phases=["examples", "coverage", "fuzzing"])
    config.generation.update(max_examples=MAX_EXAMPLES, deterministic=True, with_security_parameters=headers is None)
    config.checks.update(included_check_names=check_names)
    return schema


def _answer(interaction) -> str:
    if interaction is None or interaction.response is None:
        return "no answer"
    response = interaction.response
    return f"{response.status_code} {response.content[:300].decode('utf-8', 'replace')}"


def run(schema: schemathesis.BaseSchema) -> tuple[Counter, list[str]]:
    """All cases of the schema: how often each check ran, and one line per distinct (operation, check, title)
    failure."""
    ran: Counter = Counter()
    failures: dict[tuple[str, str, str], str] = {}
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            for case_id, results in recorder.checks.items():
                for check in results:
                    ran[check.name] += 1
                    if check.status != Status.FAILURE or check.failure_info is None:
                        continue
                    failure = check.failure_info.failure
                    key = (recorder.label, check.name, failure.title)
                    if key not in failures:
                        failures[key] = (f"{recorder.label} [{check.name}] {failure.title}: "
                                         f"{failure.message.strip()[:300]}\n    {check.failure_info.code_sample[:600]}"
                                         f"\n    -> {_answer(recorder.interactions.get(case_id))}")
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            failures[("error", str(len(failures)), "")] = f"schemathesis could not run a case: {event!r}"[:600]
    return ran, list(failures.values())


def test_with_key(fuzz_server: InProcessServer):
    """The served model's name in every path, so that bodies reach the model rather than a 404."""
    checks_run = [*CHECKS, key_accepted.__name__]
    schema = load_schema(fuzz_server, checks_run, headers={"X-Api-Key": KEY}, model_name=MODEL_NAME)
    ran, failures = run(schema.exclude(path_regex=MODEL_CONTROL))
    assert min(ran[name] for name in checks_run) > 300, ran
    assert not failures, "\n".join(failures)


def test_without_a_valid_key(fuzz_server: InProcessServer):
    """No key, or one schemathesis makes up: every route, the model controls included, as the key would guard them."""
    ran, failures = run(load_schema(fuzz_server, [*CHECKS, keyless_request_rejected.__name__]))
    assert min(ran[name] for name in [*CHECKS, keyless_request_rejected.__name__]) > 300, ran
    assert not failures, "\n".join(failures)


LIMIT_CASES = {  # texts, and extra bytes in the body; each just over FUZZ_LIMITS
    "too many texts": (["a short text"] * 9, ""),
    "text too long": (["x" * 301], ""),
    "body too large": (["a short text"], "x" * 4100),
}
EMBEDDING_BODIES = {
    "/embedding": lambda texts: {"instances": texts},
    "/v1/models/{model_name}:predict": lambda texts: {"instances": texts},
    "/v2/models/{model_name}/infer": lambda texts: {
        "inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]},
    "/openai/v1/embeddings": lambda texts: {"input": texts},
    "/v1/embeddings": lambda texts: {"input": texts},
}


@pytest.mark.parametrize("limit", list(LIMIT_CASES))
@pytest.mark.parametrize("path", list(EMBEDDING_BODIES))
def test_limit_answers_match_the_document(fuzz_server: InProcessServer, path: str, limit: str):
    """Each limit's 413, route by route, as the document describes it: the fuzzer rarely builds these bodies."""
    texts, padding = LIMIT_CASES[limit]
    body = EMBEDDING_BODIES[path](texts) | ({"padding": padding} if padding else {})
    schema = load_schema(fuzz_server, CHECKS)
    case = schema[path]["POST"].Case(path_parameters={"model_name": MODEL_NAME} if "{" in path else None,
                                     body=body, media_type="application/json")
    response = case.call_and_validate(headers={"X-Api-Key": KEY}, checks=[getattr(checks, name) for name in CHECKS])
    assert response.status_code == 413, response.text


V2_INFER = f"/v2/models/{MODEL_NAME}/infer"
V2_INFER_OPERATION = "/v2/models/{model_name}/infer"


def with_binary_extension(server: InProcessServer) -> dict:
    """The server's document, with the V2 binary extension it cannot state in OpenAPI terms (the first
    Inference-Header-Content-Length bytes are JSON, the binary inputs follow): any bytes, any header value."""
    document = requests.get(f"{server.url}/openapi.json", timeout=30).json()
    operation = document["paths"][V2_INFER_OPERATION]["post"]
    operation["requestBody"]["content"] = {"application/octet-stream": {"schema": {"type": "string",
                                                                                   "format": "binary"}}}
    operation.setdefault("parameters", []).append({
        "name": "Inference-Header-Content-Length", "in": "header", "required": True,
        "schema": {"type": "string"}, "examples": {"json_length": {"value": "2"}}})
    return document


def test_binary_extension_with_key(fuzz_server: InProcessServer):
    checks_run = [*CHECKS, key_accepted.__name__]
    schema = load_schema(fuzz_server, checks_run, headers={"X-Api-Key": KEY},
                         document=with_binary_extension(fuzz_server), model_name=MODEL_NAME)
    ran, failures = run(schema.include(path=V2_INFER_OPERATION, method="POST"))
    assert min(ran[name] for name in checks_run) > 30, ran
    assert not failures, "\n".join(failures)
header_values = st.none() | st.integers(0, 5000).map(str) | st.from_regex(r"[0-9a-z+.-]{1,6}", fullmatch=True)


@settings(max_examples=150, deadline=None)
@given(tensor_documents | json_values, st.binary(max_size=64), header_values, st.booleans())
def test_v2_body_and_binary_extension_never_get_a_5xx(fuzz_server: InProcessServer, document, tail, header, honest):
    """V2 JSON bodies and binary-extension bodies (honest or lying Inference-Header-Content-Length), as the
    document cannot describe them: a 200, or a 4xx in the one error shape."""
    head = json.dumps(document).encode()
    headers = {"X-Api-Key": KEY}
    if honest:
        header = str(len(head))
    if header is not None:
        headers["Inference-Header-Content-Length"] = header
    response = requests.post(fuzz_server.url + V2_INFER, data=head + tail, headers=headers, timeout=60)
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        assert list(response.json()) == ["error"], response.text


def test_model_still_served_after_fuzzing(fuzz_server: InProcessServer):
    """Runs last in this module: the fuzzing left the model loaded and serving whole answers. (That the answers of
    the real model carry meaning is test_model.py's test_similar_texts_are_closer_than_unrelated_ones.)"""
    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply today."]
    answers = []
    for _ in range(2):
        response = requests.post(f"{fuzz_server.url}/v1/models/{MODEL_NAME}:predict", json={"instances": texts},
                                 headers={"X-Api-Key": KEY}, timeout=60)
        assert response.status_code == 200, response.text
        answers.append(np.asarray(response.json()["predictions"]))
    vectors = answers[0]
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    assert np.array_equal(answers[0], answers[1]), "the same texts, the same vectors"
    assert fuzz_server.model.ready and fuzz_server.data_plane.serving()
