"""The OpenAPI document: it validates, describes every route with examples that fit its schemas, asks for
the key exactly where the server does, and the real server answers its own examples as documented."""
from __future__ import annotations

import asyncio
import copy
import re
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import httpx
import jsonschema
import pytest
import requests
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from kserve.model_repository import ModelRepository
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.model_repository_extension import ModelRepositoryExtension
from kserve.protocol.rest.v1_endpoints import register_v1_endpoints
from kserve.protocol.rest.v2_endpoints import register_v2_endpoints
from openapi_spec_validator import validate
from PIL import Image

from api_docs import install_api_docs
from auth_middleware import DOCS_ASSETS, ApiKeyMiddleware, is_public
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

BROWSER_TIMEOUT = 180
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--hide-scrollbars", "--virtual-time-budget=10000"]
POST_GREEN = (0x49, 0xCC, 0x90)  # Swagger UI's colour for POST operations and the Authorize button
# Chromium's own update, clock and sign-in checks, which it makes whatever page it shows (no flag stops them all)
BROWSER_SERVICE_HOSTS = frozenset({"update.googleapis.com", "clients2.google.com", "accounts.google.com"})


class RefusingProxy:
    """Stands for the network: the browser sends every request for a host other than the loopback here, where
    each is recorded and refused, so a page that needs anything from outside the server fails and is seen."""

    def __init__(self):
        self.requests: list[str] = []
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return
            with connection:
                connection.settimeout(5)
                try:
                    self.requests.append(connection.recv(4096).split(b"\r\n", 1)[0].decode(errors="replace"))
                    connection.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                except OSError:
                    pass

    def close(self) -> None:
        self._socket.close()

    def hosts(self) -> set[str]:
        """The hosts asked for: 'CONNECT host:443 HTTP/1.1' or 'GET http://host/path HTTP/1.1'."""
        targets = [line.split(" ")[1] for line in self.requests if line.count(" ") >= 2]
        return {target.removeprefix("http://").split("/")[0].rsplit(":", 1)[0] for target in targets}

    def page_hosts(self) -> set[str]:
        return self.hosts() - BROWSER_SERVICE_HOSTS


@pytest.fixture
def network():
    proxy = RefusingProxy()
    yield proxy
    proxy.close()


def browse(url: str, profile: Path, proxy: RefusingProxy, *action: str) -> str:
    """Chromium, headless, loads `url` with every other host unreachable, and returns what it printed."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("no chromium on PATH: .ci/run installs Debian's chromium package")
    command = [binary, *BROWSER_FLAGS, f"--user-data-dir={profile}", f"--proxy-server=http://127.0.0.1:{proxy.port}",
               "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", *action, url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=BROWSER_TIMEOUT)
    assert done.returncode == 0, f"chromium could not start or load {url}: {done.stderr[-2000:]}"
    return done.stdout


def rendered_paths(dom: str) -> list[str]:
    return re.findall(r'class="opblock-summary-path" data-path="([^"]*)"', dom)


def test_the_docs_page_renders_in_a_browser_without_network(server, tmp_path, network):
    document = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    dom = browse(f"{server.url}/docs", tmp_path / "profile", network, "--dump-dom")
    paths = rendered_paths(dom)
    assert {path for path, _ in OUR_OPERATIONS} <= set(paths), dom[-2000:]
    assert len(paths) == sum(len(operations) for operations in document["paths"].values())  # one block each
    assert 'class="btn authorize unlocked"' in dom
    assert f"{MODEL} embedding server" in dom
    assert network.page_hosts() == set(), network.requests  # nothing was asked of any host but the server

    shot = tmp_path / "docs.png"
    browse(f"{server.url}/docs", tmp_path / "profile", network, f"--screenshot={shot}", "--window-size=1280,1400")
    colours = dict((colour, count) for count, colour in Image.open(shot).convert("RGB").getcolors(1 << 24))
    assert colours.get(POST_GREEN, 0) > 2000  # the Authorize button and the POST operations are drawn
    assert colours.get((255, 255, 255), 0) < 0.9 * 1280 * 1400  # not a blank page
    assert network.page_hosts() == set(), network.requests


def test_the_browser_check_catches_a_page_that_needs_a_cdn(tmp_path, network):
    """The same browser on FastAPI's stock page (what /docs served before): it asks the CDN and renders nothing."""
    page = tmp_path / "stock.html"
    page.write_text(get_swagger_ui_html(openapi_url="/openapi.json", title="stock").body.decode())
    dom = browse(page.as_uri(), tmp_path / "profile", network, "--dump-dom")
    assert rendered_paths(dom) == [] and "btn authorize" not in dom
    assert "cdn.jsdelivr.net" in network.page_hosts(), network.requests
