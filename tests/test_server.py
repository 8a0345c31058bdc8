"""The server's wiring: the model-repository extension locked away, and health that follows the model."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import grpc
import pytest
import requests
from fastapi import FastAPI
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from kserve.protocol.rest.server import PrintTimings
from starlette.middleware.cors import CORSMiddleware
from timing_asgi import TimingMiddleware

from conftest import MODEL_NAME, ROOT, TEST_KEY, InProcessServer, cosines, grpc_infer
from embedding_server.server import drop_unlogged_timing

ADMIN_KEY = "admin-key-5d1e0b"
REPOSITORY_ROUTES = [f"/v2/repository/models/{MODEL_NAME}/unload", f"/v2/repository/models/{MODEL_NAME}/load",
                     "/v2/repository/index"]
PROBES = ["/health", "/v2/health/ready", f"/v2/models/{MODEL_NAME}/ready", f"/v1/models/{MODEL_NAME}"]


def grpc_call(server, method: str, request, key: str | None):
    metadata = (("x-api-key", key),) if key else ()
    with grpc.insecure_channel(server.grpc_target) as channel:
        return getattr(pb_grpc.GRPCInferenceServiceStub(channel), method)(request, metadata=metadata, timeout=30)


def grpc_code(server, method: str, request, key: str | None) -> grpc.StatusCode:
    try:
        grpc_call(server, method, request, key)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


REPOSITORY_RPCS = [
    ("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=MODEL_NAME)),
    ("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name=MODEL_NAME)),
]


def test_the_repository_extension_is_off_by_default(server, reference):
    """With the client key, nobody can unload the model: the routes are not there, the RPCs not implemented."""
    for path in REPOSITORY_ROUTES:
        response = requests.post(server.url + path, headers=server.headers(), timeout=30)
        assert response.status_code == 404, (path, response.status_code, response.text)
        assert "error" in response.json()
    for method, request in REPOSITORY_RPCS:
        assert grpc_code(server, method, request, TEST_KEY) == grpc.StatusCode.UNIMPLEMENTED, method
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    texts = ["still serving"]
    answer = requests.post(f"{server.url}/v1/models/{MODEL_NAME}:predict", json={"instances": texts},
                           headers=server.headers(), timeout=60)
    assert cosines(answer.json()["predictions"], reference(texts)).min() >= 0.99999
    reply = grpc_infer(server, texts, metadata=(("x-api-key", TEST_KEY),))
    assert reply.outputs[0].name == "embedding"


@pytest.fixture(scope="module")
def admin_server():
    """The production wiring in-process over the hash backend: what is tested is who may unload, and what follows."""
    running = InProcessServer(env={"ADMIN_API_KEY": ADMIN_KEY})
    yield running
    running.stop()


def test_with_an_admin_key_the_repository_takes_that_key_only(admin_server):
    unload = REPOSITORY_ROUTES[0]
    assert requests.post(admin_server.url + unload, timeout=30).status_code == 401
    for key in (TEST_KEY, "wrong"):
        response = requests.post(admin_server.url + unload, headers={"X-Api-Key": key}, timeout=30)
        assert response.status_code == 403 and response.json()["error"] == "Invalid API key"
        assert grpc_code(admin_server, *REPOSITORY_RPCS[0], key) == grpc.StatusCode.PERMISSION_DENIED
    assert grpc_code(admin_server, *REPOSITORY_RPCS[0], None) == grpc.StatusCode.UNAUTHENTICATED
    assert requests.get(admin_server.url + "/health", timeout=10).status_code == 200


def test_without_its_model_the_server_is_not_ready_and_not_live(admin_server):
    """Unloaded (by the operator, or by anything else), the model is gone for good: the platform must restart."""
    response = requests.post(admin_server.url + REPOSITORY_ROUTES[0], headers={"X-Api-Key": ADMIN_KEY}, timeout=30)
    assert response.status_code == 200
    for path in PROBES:
        answer = requests.get(admin_server.url + path, timeout=10)
        assert answer.status_code == 503, (path, answer.status_code, answer.text)
    assert requests.get(admin_server.url + "/v2/health/live", timeout=10).status_code == 503
    predict = requests.post(f"{admin_server.url}/v1/models/{MODEL_NAME}:predict", json={"instances": ["x"]},
                            headers=admin_server.headers(), timeout=30)
    assert predict.status_code == 503 and "error" in predict.json()
    not_ready = f"Model with name {MODEL_NAME} is not ready."
    legacy = requests.post(f"{admin_server.url}/embedding", json={"a": "x"}, headers=admin_server.headers(), timeout=30)
    assert (legacy.status_code, legacy.json()) == (503, {"error": not_ready})
    for path in ("/openai/v1/embeddings", "/v1/embeddings"):  # OpenAI's shape: KServe's own handler is replaced
        openai = requests.post(admin_server.url + path, json={"input": "x"}, headers=admin_server.headers(), timeout=30)
        assert openai.status_code == 503, (path, openai.text)
        assert openai.json() == {"error": {"message": not_ready, "type": "server_error", "param": None, "code": None}}
    assert grpc_code(admin_server, "ServerLive", pb.ServerLiveRequest(), None) == grpc.StatusCode.UNAVAILABLE
    assert not grpc_call(admin_server, "ServerReady", pb.ServerReadyRequest(), None).ready
    assert not grpc_call(admin_server, "ModelReady", pb.ModelReadyRequest(name=MODEL_NAME), None).ready
    with pytest.raises(grpc.RpcError) as failed:
        grpc_infer(admin_server, ["x"], metadata=(("x-api-key", TEST_KEY),))
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(("level", "kept"), [(logging.DEBUG, True), (logging.WARNING, False)])
def test_kserves_timing_middleware_runs_only_when_its_lines_are_logged(level, kept):
    app = FastAPI()
    app.add_middleware(TimingMiddleware, client=PrintTimings())
    app.add_middleware(CORSMiddleware, allow_origins=["*"])
    trace = logging.getLogger("kserve.trace")
    before = trace.level
    trace.setLevel(level)
    try:
        drop_unlogged_timing(app)
    finally:
        trace.setLevel(before)
    assert [m.cls for m in app.user_middleware] == ([CORSMiddleware, TimingMiddleware] if kept else [CORSMiddleware])
PRODUCTION_WIRING_SCRIPT = """
import json, sys
from kserve.model_repository import ModelRepository
from kserve.protocol.dataplane import DataPlane
from model import EmbeddingModel, build_parser
from embedding_server.kserve_adapter import fresh_app, kserve_app
from embedding_server.server import create_server, install_app
from embedding_server.operations.settings import Settings

from embedding_server.operations.observability import configure_logging

settings = Settings.from_env({"API_KEY": "x"})
configure_logging(settings.log_level, settings.log_format)  # as start_up does before the wiring
args = build_parser(settings).parse_args([])
model = EmbeddingModel(settings.model_name, settings.model_path)  # the wiring needs no weights
server = create_server(model, settings, args, dimension=384)
fresh = install_app(fresh_app(), DataPlane(model_registry=ModelRepository()), model.name, settings, 384)


def table(app):
    def walk(routes, prefix=""):
        for route in routes:
            if hasattr(route, "original_router"):
                yield from walk(route.original_router.routes, prefix + route.include_context.prefix)
            else:
                yield [prefix + route.path, sorted(getattr(route, "methods", None) or ["GET"])]
    middleware = [getattr(m.cls, "__name__", str(m.cls)) for m in app.user_middleware]
    handlers = sorted(getattr(k, "__name__", str(k)) for k in app.exception_handlers)
    return {"routes": list(walk(app.routes)), "middleware": middleware, "handlers": handlers}


json.dump({"production": table(kserve_app()), "fresh": table(fresh), "same_app": server.app is kserve_app()},
          sys.stdout)
"""


def test_production_gets_the_wiring_that_tests_build_in_process():
    """create_server installs on KServe's app exactly what install_app puts on a fresh one (so the in-process tests
    test the production wiring); in a subprocess, since KServe's app is a module global."""
    out = subprocess.run([sys.executable, "-c", PRODUCTION_WIRING_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    tables = json.loads(out.stdout)
    assert tables["same_app"]
    assert tables["production"] == tables["fresh"]
    paths = {path for path, _ in tables["production"]["routes"]}
    assert {"/embedding", "/v1/models/{model_name}:predict", "/v2/models/{model_name}/infer", "/openai/v1/embeddings",
            "/v2/health/live", "/docs"} <= paths
    # Outermost first; KServe's TimingMiddleware only where its lines are logged (DEBUG), not here.
    assert tables["production"]["middleware"][0] == "ObservabilityMiddleware"
    assert "TimingMiddleware" not in tables["production"]["middleware"]
