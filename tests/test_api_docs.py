"""The OpenAPI document: it validates, describes every route with examples that fit its schemas, asks for
the key exactly where the server does, and the real server answers its own examples as documented."""
from __future__ import annotations

import asyncio
import base64
import copy
import itertools
import json
import os
import queue
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import jsonschema
import pytest
import requests
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from kserve.model_repository import ModelRepository
from kserve.protocol.dataplane import DataPlane
from openapi_spec_validator import validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError
from PIL import Image

from auth_middleware import DOCS_ASSETS, is_public
from embedding_server.kserve_adapter import fresh_app
from embedding_server.operations.errors import (
    INVALID_KEY_BODY,
    MISSING_KEY_BODY,
    BadRequest,
    OpenAIRequestError,
    TooLarge,
    Unprocessable,
)
from embedding_server.operations.settings import Limits, Settings
from embedding_server.protocols.adapters import check_limits, parse_json, parse_openai_embedding, texts_from_instances
from embedding_server.protocols.api_docs import install_api_docs
from embedding_server.server import install_app

MODEL = "all-MiniLM-L6-v2"
DIMENSION = 384
KEY = "docs-key-31c"
OUR_OPERATIONS = {("/embedding", "post"), ("/health", "get"), ("/api-key-info", "get"),
                  ("/openai/v1/embeddings", "post"), ("/v1/embeddings", "post"), ("/openai/v1/models", "get"),
                  ("/v1/models/{model_name}:predict", "post"), ("/v2/models/{model_name}/infer", "post")}
EMBEDDING_OPERATIONS = {op for op in OUR_OPERATIONS if op[1] == "post"}


@pytest.fixture(scope="module")
def app() -> FastAPI:
    """The server's routes, middleware and docs on a fresh app, as the server installs them (server.install_app)."""
    settings = Settings.from_env({"API_KEY": KEY, "MODEL_PATH": "/unused"})
    return install_app(fresh_app(), DataPlane(model_registry=ModelRepository()), MODEL, settings, DIMENSION)


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
    with pytest.raises(OpenAPIValidationError):
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
    for _path, _method, operation in operations(document):
        bodies = [operation.get("requestBody", {})] + [resolve(document, r) for r in operation["responses"].values()]
        for body in bodies:
            for media in body.get("content", {}).values():
                if "schema" not in media:
                    continue
                schema = {**media["schema"], "components": document["components"]}
                for example in media.get("examples", {}).values():
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


def examples(document: dict, response: str) -> list:
    content = document["components"]["responses"][response]["content"]["application/json"]
    return [example["value"] for example in content["examples"].values()]


def test_error_examples_are_what_the_parsers_and_the_key_check_answer(document):
    """No example message is written by hand: each is what the server says to a bad request, so a parser that
    changes its words changes the document (an example written as a literal fails here once they differ)."""
    with pytest.raises(BadRequest) as empty:
        parse_json(b"")
    with pytest.raises(Unprocessable) as not_a_string:
        texts_from_instances({"instances": ["a", 1]})
    with pytest.raises(TooLarge) as too_many:
        check_limits(["x"] * (Limits().max_texts + 1), Limits())
    with pytest.raises(OpenAIRequestError) as no_input:
        parse_openai_embedding({"model": MODEL}, MODEL, DIMENSION)
    with pytest.raises(OpenAIRequestError) as other_model:
        parse_openai_embedding({"input": "x", "model": "text-embedding-3-small"}, MODEL, DIMENSION)
    assert examples(document, "BadRequest") == [{"error": empty.value.reason}]
    assert examples(document, "Unprocessable") == [{"error": not_a_string.value.reason}]
    assert examples(document, "TooLarge") == [{"error": too_many.value.reason}]
    assert [e["error"]["message"] for e in examples(document, "OpenAITooLarge")] == [too_many.value.reason]
    for response, error in (("OpenAIBadRequest", no_input.value), ("OpenAIModelNotFound", other_model.value)):
        assert examples(document, response) == [{"error": {"message": error.message, "type": error.type,
                                                           "param": error.param, "code": error.code}}]
    assert examples(document, "MissingKey") == [MISSING_KEY_BODY]
    assert examples(document, "WrongKey") == [INVALID_KEY_BODY]
    assert [e["error"]["message"] for e in examples(document, "OpenAIUnauthorized")] == [
        MISSING_KEY_BODY["message"], INVALID_KEY_BODY["message"]]
    assert examples(document, "Unavailable") == [{"error": f"Model with name {MODEL} is not ready."}]
    assert examples(document, "OpenAIUnavailable")[0]["error"]["type"] == "server_error"


def test_the_openai_routes_document_every_error_in_openais_shape(document):
    for path in ("/openai/v1/embeddings", "/v1/embeddings"):
        for status, response in document["paths"][path]["post"]["responses"].items():
            if status.startswith(("4", "5")):
                schema = resolve(document, response)["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/OpenAIError"}, (path, status)


def test_the_docs_page_is_public_html(app):
    page = get(app, "GET", "/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "swagger-ui" in page.text and "/openapi.json" in page.text
    assert get(app, "GET", "/docs/oauth2-redirect").status_code == 200
    assert get(app, "POST", "/embedding").status_code == 401  # the key check is on


def page_references(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]*)"', html)


def test_the_docs_page_loads_only_files_the_server_serves_without_a_key(app):
    page = get(app, "GET", "/docs").text
    references = page_references(page)
    assert sorted(references) == sorted(f"/docs/{name}" for name in DOCS_ASSETS)  # no CDN, no other host
    assert "://" not in page.replace("window.location.origin", "")
    types = {}
    for reference in references:
        assert is_public("GET", reference)
        asset = get(app, "GET", reference)  # no key
        assert asset.status_code == 200 and len(asset.content) > 500, reference
        types[reference.rsplit(".", 1)[1]] = asset.headers["content-type"]
    assert types["js"].startswith("text/javascript") and types["css"].startswith("text/css")
    assert types["png"] == "image/png"
    assert "SwaggerUIBundle" in get(app, "GET", "/docs/swagger-ui-bundle.js").text
    assert get(app, "GET", "/docs/index.html").status_code == 401  # only the listed files are public


def test_kserves_docs_flag_gets_the_offline_page_too():
    app = FastAPI(docs_url="/docs")  # what KServe builds with --enable_docs_url: a page that loads a CDN
    assert "cdn.jsdelivr.net" in get(app, "GET", "/docs").text
    install_api_docs(app, MODEL, DIMENSION)
    page = get(app, "GET", "/docs").text
    assert sorted(page_references(page)) == sorted(f"/docs/{name}" for name in DOCS_ASSETS)
    assert get(app, "GET", "/docs/swagger-ui.css").status_code == 200


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


# --- a real browser, with no network ------------------------------------------------------------------------------

BROWSER_TIMEOUT = 90
# Every host but the loopback is unreachable: names do not resolve, and connections go to a closed local port.
NO_NETWORK = ["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--proxy-server=http://127.0.0.1:1"]
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--hide-scrollbars", "--window-size=1280,1400", *NO_NETWORK]
POST_GREEN = (0x49, 0xCC, 0x90)  # Swagger UI's colour for POST operations and the Authorize button


class Chromium:
    """Headless Chromium driven over the DevTools protocol (on a pipe, so no extra package), one page open."""

    def __init__(self, profile: Path):
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        if binary is None:
            pytest.fail("no chromium on PATH: .ci/run installs Debian's chromium package")
        to_browser, from_browser = os.pipe(), os.pipe()
        self.log = profile.parent / "chromium.log"
        with open(self.log, "wb") as log:  # the protocol wants its pipe on fds 3 and 4
            self.process = subprocess.Popen(
                ["bash", "-c", f'exec "$0" "$@" 3<&{to_browser[0]} 4>&{from_browser[1]}', binary, *BROWSER_FLAGS,
                 "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"],
                pass_fds=(to_browser[0], from_browser[1]), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        os.close(to_browser[0])
        os.close(from_browser[1])
        self._writer = os.fdopen(to_browser[1], "wb")
        self._messages: queue.Queue[dict | None] = queue.Queue()
        threading.Thread(target=self._read, args=(os.fdopen(from_browser[0], "rb"),), daemon=True).start()
        self._ids = itertools.count(1)
        self.events: list[dict] = []
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Network", "Runtime"):
            self.send(f"{domain}.enable", session=self.session)

    def _read(self, pipe) -> None:
        buffer = b""
        while chunk := pipe.read1(65536):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for message in messages:
                self._messages.put(json.loads(message))
        self._messages.put(None)

    def send(self, method: str, session: str | None = None, **params) -> dict:
        call = {"id": next(self._ids), "method": method, "params": params}
        if session:
            call["sessionId"] = session
        self._writer.write(json.dumps(call).encode() + b"\0")
        self._writer.flush()
        while True:
            try:
                message = self._messages.get(timeout=BROWSER_TIMEOUT)
            except queue.Empty:
                message = None
            if message is None:
                pytest.fail(f"chromium did not answer {method}: {self.log.read_text(errors='replace')[-2000:]}")
            if message.get("id") == call["id"]:
                assert "error" not in message, (method, message["error"])
                return message["result"]
            self.events.append(message)

    def evaluate(self, expression: str):
        answer = self.send("Runtime.evaluate", session=self.session, expression=expression, returnByValue=True)
        assert "exceptionDetails" not in answer, (expression, answer["exceptionDetails"])
        return answer["result"].get("value")

    def wait_for(self, expression: str, what: str):
        deadline = time.monotonic() + BROWSER_TIMEOUT
        while time.monotonic() < deadline:
            if value := self.evaluate(expression):
                return value
            time.sleep(0.2)
        pytest.fail(f"the page never showed {what}")

    def requested(self) -> list[str]:
        """Every URL the page asked for, scripts, styles, images and API calls alike."""
        return [event["params"]["request"]["url"] for event in self.events
                if event.get("method") == "Network.requestWillBeSent"]

    def close(self) -> None:
        self._writer.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def browser(tmp_path):
    chromium = Chromium(tmp_path / "profile")
    yield chromium
    chromium.close()


OPERATION = """[...document.querySelectorAll('.opblock-post')]
    .find(block => block.querySelector('.opblock-summary-path').dataset.path === '/embedding')"""


def test_the_docs_page_works_in_a_browser_without_network(server, browser, tmp_path):
    """Swagger UI draws every operation, Authorize takes the key, and "Try it out" embeds through the server."""
    document = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    browser.send("Page.navigate", session=browser.session, url=f"{server.url}/docs")
    count = browser.wait_for("document.querySelectorAll('.opblock').length", "its operations")
    paths = browser.evaluate("[...document.querySelectorAll('.opblock-summary-path')].map(p => p.dataset.path)")
    assert {path for path, _ in OUR_OPERATIONS} <= set(paths)
    assert count == sum(len(operations) for operations in document["paths"].values())  # one block each
    assert browser.evaluate("document.title") == f"{MODEL} embedding server"

    shot = tmp_path / "docs.png"
    shot.write_bytes(base64.b64decode(browser.send("Page.captureScreenshot", session=browser.session)["data"]))
    image = Image.open(shot).convert("RGB")
    colours = {colour: count for count, colour in image.getcolors(image.width * image.height)}
    assert colours.get(POST_GREEN, 0) > 2000  # the Authorize button and the POST operations are drawn
    assert colours.get((255, 255, 255), 0) < 0.9 * image.width * image.height  # not a blank page

    browser.evaluate("document.querySelector('.auth-wrapper .btn.authorize').click()")
    schemes = browser.wait_for("[...document.querySelectorAll('.auth-container h4')].map(h => h.textContent)",
                               "the Authorize dialog")
    assert any("ApiKeyAuth" in name for name in schemes) and any("BearerAuth" in name for name in schemes)
    browser.evaluate("document.querySelector('.auth-container input').focus()")
    browser.send("Input.insertText", session=browser.session, text=server.key)
    browser.evaluate("document.querySelector('.auth-container .modal-btn.authorize').click()")
    browser.wait_for("[...document.querySelectorAll('.auth-container button')].some(b => b.textContent === 'Logout')",
                     "the key accepted")
    browser.evaluate("document.querySelector('.auth-container .modal-btn.btn-done').click()")

    browser.evaluate(f"{OPERATION}.querySelector('.opblock-summary-control').click()")
    browser.wait_for(f"!!{OPERATION}.querySelector('.try-out__btn')", "Try it out")
    browser.evaluate(f"{OPERATION}.querySelector('.try-out__btn').click()")
    browser.wait_for(f"!!{OPERATION}.querySelector('.execute')", "Execute")
    browser.evaluate(f"{OPERATION}.querySelector('.execute').click()")
    answer_row = f"{OPERATION}.querySelector('.live-responses-table tr.response')"
    status = browser.wait_for(f"{answer_row}?.querySelector('.response-col_status').textContent", "the answer")
    assert status.strip() == "200"  # the server checked the key Authorize took, and embedded the example
    answer = browser.evaluate(f"{answer_row}.querySelector('.response-col_description pre').textContent")
    assert set(json.loads(answer)) == {"doc1", "doc2"}

    requested = browser.requested()
    assert f"{server.url}/docs/swagger-ui-bundle.js" in requested and f"{server.url}/embedding" in requested
    elsewhere = [url for url in requested if not url.startswith((server.url + "/", "data:"))]  # data: is inline
    assert elsewhere == []  # nothing from another host


def test_the_browser_check_catches_a_page_that_needs_a_cdn(browser, tmp_path):
    """The same browser on FastAPI's stock page (what /docs served before): it asks the CDN and draws nothing."""
    page = tmp_path / "stock.html"
    page.write_text(get_swagger_ui_html(openapi_url="/openapi.json", title="stock").body.decode())
    browser.send("Page.navigate", session=browser.session, url=page.as_uri())
    browser.wait_for("document.readyState === 'complete'", "the page loaded")
    assert browser.evaluate("document.querySelectorAll('.opblock').length") == 0
    assert browser.evaluate("typeof SwaggerUIBundle") == "undefined"
    assert any(url.startswith("https://cdn.jsdelivr.net/") for url in browser.requested())


def test_no_browser_is_a_failure_not_a_skip(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match="no chromium"):
        Chromium(tmp_path / "profile")
