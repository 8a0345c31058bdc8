"""The OpenAPI document: it validates, describes every route with examples that fit its schemas, asks for
the key exactly where the server does, and the real server answers its own examples as documented."""
from __future__ import annotations

import asyncio
import copy
import re

import httpx
import jsonschema
import pytest
import requests
from fastapi import FastAPI
from kserve.model_repository import ModelRepository
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.model_repository_extension import ModelRepositoryExtension
from kserve.protocol.rest.v1_endpoints import register_v1_endpoints
from kserve.protocol.rest.v2_endpoints import register_v2_endpoints
from openapi_spec_validator import validate

from api_docs import install_api_docs
from auth_middleware import ApiKeyMiddleware, is_public
from routes import register_legacy_routes, register_openai_routes
from settings import Settings

MODEL = "all-MiniLM-L6-v2"
DIMENSION = 384
KEY = "docs-key-31c"
OUR_OPERATIONS = {("/embedding", "post"), ("/health", "get"), ("/api-key-info", "get"),
                  ("/openai/v1/embeddings", "post"), ("/v1/embeddings", "post"), ("/openai/v1/models", "get"),
                  ("/v1/models/{model_name}:predict", "post"), ("/v2/models/{model_name}/infer", "post")}
EMBEDDING_OPERATIONS = {op for op in OUR_OPERATIONS if op[1] == "post"}


@pytest.fixture(scope="module")
def app() -> FastAPI:
    """The server's routes on a fresh app, registered in the server's order: ours, then KServe's at start."""
    app = FastAPI()
    repository = ModelRepository()
    dataplane = DataPlane(model_registry=repository)
    settings = Settings.from_env({"API_KEY": KEY, "MODEL_PATH": "/unused"})
    register_legacy_routes(app, dataplane, MODEL, settings)
    register_openai_routes(app, dataplane, MODEL, DIMENSION)
    app.add_middleware(ApiKeyMiddleware, keys=settings.api_keys)
    install_api_docs(app, MODEL, DIMENSION)
    register_v1_endpoints(app, dataplane, ModelRepositoryExtension(repository))
    register_v2_endpoints(app, dataplane, ModelRepositoryExtension(repository))
    return app


def get(app: FastAPI, method: str, path: str, **kwargs) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


@pytest.fixture(scope="module")
def document(app) -> dict:
    response = get(app, "GET", "/openapi.json")
    assert response.status_code == 200  # without a key
    return response.json()


def operations(document: dict):
    for path, ops in document["paths"].items():
        for method, operation in ops.items():
            yield path, method, operation


def resolve(document: dict, node: dict) -> dict:
    while "$ref" in node:
        _, kind, name = node["$ref"].removeprefix("#/").split("/")
        node = document["components"][kind][name]
    return node


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", MODEL, path)


def test_the_document_validates(document):
    validate(document)
    broken = copy.deepcopy(document)
    broken["paths"]["/embedding"]["post"]["responses"]["200"].pop("description")
    with pytest.raises(Exception):
        validate(broken)


def test_it_covers_every_route_we_add_with_examples(document):
    present = {(path, method) for path, method, _ in operations(document)}
    assert OUR_OPERATIONS <= present
    for path, method in OUR_OPERATIONS:
        operation = document["paths"][path][method]
        answer = resolve(document, operation["responses"]["200"])
        assert answer["content"]["application/json"]["examples"], (path, method)
        if method == "post":
            assert operation["requestBody"]["content"]["application/json"]["examples"], path
    legacy = document["paths"]["/embedding"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    assert set(legacy) == {"ids", "instances"}  # both body forms
    assert legacy["ids"]["value"] == {"doc1": "The cat sits on the mat.", "doc2": "A dog plays in the garden."}


def test_every_example_fits_its_schema(document):
    checked = 0
    for path, method, operation in operations(document):
        bodies = [operation.get("requestBody", {})] + [resolve(document, r) for r in operation["responses"].values()]
        for body in bodies:
            for media in body.get("content", {}).values():
                if "schema" not in media:
                    continue
                schema = {**media["schema"], "components": document["components"]}
                for name, example in media.get("examples", {}).items():
                    jsonschema.Draft202012Validator(schema).validate(example["value"])
                    checked += 1
    assert checked >= 25
    wrong = {"$ref": "#/components/schemas/Predictions", "components": document["components"]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(wrong).validate({"predictions": "not a list"})


def test_the_key_schemes(document):
    schemes = document["components"]["securitySchemes"]
    assert schemes["ApiKeyAuth"] | {"description": ""} == {"type": "apiKey", "in": "header", "name": "X-Api-Key",
                                                          "description": ""}
    assert schemes["BearerAuth"]["type"] == "http" and schemes["BearerAuth"]["scheme"] == "bearer"


def test_the_document_asks_for_the_key_exactly_where_the_server_does(app, document):
    protected = 0
    for path, method, operation in operations(document):
        status = get(app, method.upper(), concrete(path)).status_code  # no key
        if operation["security"]:
            assert operation["security"] == [{"ApiKeyAuth": []}, {"BearerAuth": []}]
            assert status == 401, (method, path)
            assert not is_public(method.upper(), concrete(path))
            protected += 1
        else:
            assert status != 401, (method, path)
            assert is_public(method.upper(), concrete(path))
    assert protected >= 10
    assert document["paths"]["/health"]["get"]["security"] == []


def test_error_answers_are_documented_with_bodies(document):
    for path, method in EMBEDDING_OPERATIONS:
        responses = document["paths"][path][method]["responses"]
        expected = {"401", "413", "429"} | (set() if "embeddings" in path else {"403", "422"})
        assert expected <= set(responses), path
        for status in expected:
            assert resolve(document, responses[status])["content"]["application/json"]["examples"], (path, status)
        assert "Retry-After" in resolve(document, responses["429"])["headers"]
        assert "x-compute-tokens" in resolve(document, responses["200"])["headers"]
    legacy_403 = resolve(document, document["paths"]["/embedding"]["post"]["responses"]["403"])
    example = next(iter(legacy_403["content"]["application/json"]["examples"].values()))
    assert example["value"]["error"] == "Invalid API key"
    openai_401 = resolve(document, document["paths"]["/v1/embeddings"]["post"]["responses"]["401"])
    codes = {e["value"]["error"]["code"] for e in openai_401["content"]["application/json"]["examples"].values()}
    assert codes == {"missing_api_key", "invalid_api_key"}


def test_the_docs_page_is_public_html(app):
    page = get(app, "GET", "/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "swagger-ui" in page.text and "/openapi.json" in page.text
    assert get(app, "GET", "/docs/oauth2-redirect").status_code == 200
    assert get(app, "POST", "/embedding").status_code == 401  # the key check is on


# --- the real server ----------------------------------------------------------------------------------------------


def test_the_real_server_answers_its_documented_examples(server):
    assert requests.get(f"{server.url}/docs", timeout=10).status_code == 200
    document = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    validate(document)
    assert document["info"]["title"] == f"{MODEL} embedding server"
    header = document["components"]["securitySchemes"]["ApiKeyAuth"]["name"]  # what Swagger's Authorize sends
    answered = 0
    for path, method in sorted(EMBEDDING_OPERATIONS):
        operation = document["paths"][path][method]
        media = operation["requestBody"]["content"]["application/json"]
        answer = resolve(document, operation["responses"]["200"])["content"]["application/json"]
        for name, example in media["examples"].items():
            response = requests.post(f"{server.url}{concrete(path)}", json=example["value"],
                                     headers={header: server.key}, timeout=60)
            assert response.status_code == 200, (path, name, response.text[:300])
            if "schema" in answer:
                schema = {**answer["schema"], "components": document["components"]}
                jsonschema.Draft202012Validator(schema).validate(response.json())
            answered += 1
        refused = requests.post(f"{server.url}{concrete(path)}", json=media["examples"][next(iter(media["examples"]))]
                                ["value"], headers={header: "not-the-key"}, timeout=10)
        assert str(refused.status_code) in operation["responses"]
    assert answered == 10
