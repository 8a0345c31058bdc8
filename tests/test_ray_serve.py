"""The server with its model in Ray Serve replicas (`python ray_serve.py`), and k8s/rayservice.yaml.

One local Ray instance (2 CPUs, loopback only) with two replicas of half a CPU each serves the whole module.
"""
from __future__ import annotations

import ast
import asyncio
import importlib
import json
import os
import re
import signal
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import requests
import yaml

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (requirements.txt pins it)")

from kserve.protocol.infer_type import InferResponse  # noqa: E402
from ray import serve  # noqa: E402

from conftest import MODEL_NAME, ROOT, TEST_KEY, cosines, grpc_infer, start_server  # noqa: E402

EXACT = 0.99999
V1 = f"/v1/models/{MODEL_NAME}:predict"
V2 = f"/v2/models/{MODEL_NAME}/infer"
TEXTS = ["This is the first sentence.", "Here is another sentence.", "Ünïcödé and emoji 🚀 text.", "",
         " ".join(["The quick brown fox jumps over the lazy dog."] * 60)]
REPLICAS = 2
OTHER_KEY = "ray-other-key"
MANIFEST = ROOT / "k8s" / "rayservice.yaml"


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory, openvino_fp32):
    """Replicas on OpenVINO fp32 (conftest.openvino_fp32): a replica, first or replacement, loads in a tenth of
    torch's time."""
    running = start_server(
        tmp_path_factory.mktemp("ray"),
        command=[sys.executable, "ray_serve.py"],
        env={**openvino_fp32, "RAY_NUM_CPUS": "2", "RAY_REPLICA_CPUS": "0.5",
             "RAY_MIN_REPLICAS": str(REPLICAS), "RAY_MAX_REPLICAS": str(REPLICAS), "RAY_REQUEST_TIMEOUT": "30",
             "API_KEYS": OTHER_KEY},
    )
    yield running
    assert running.stop() is not None


def post(server, path: str, body, headers: dict | None = None, timeout: float = 60) -> requests.Response:
    return requests.post(server.url + path, data=json.dumps(body),
                         headers=server.headers() if headers is None else headers, timeout=timeout)


def replica_of(response: requests.Response) -> tuple[str, int]:
    replica_id, pid = response.headers["x-replica"].split("/")
    return replica_id, int(pid)


def v1_batch(server, texts: list[str], timeout: float = 60) -> requests.Response:
    return post(server, V1, {"instances": texts}, timeout=timeout)


def replicas_answering(server, label: str, seconds: float = 120) -> set[tuple[str, int]]:
    """The replicas seen answering one-text requests sent eight at a time, until all have or `seconds` pass.

    Sent one at a time, requests find every replica idle and may all go to one of them (it happened).
    """
    seen: set[tuple[str, int]] = set()
    deadline = time.monotonic() + seconds
    while len(seen) < REPLICAS and time.monotonic() < deadline:
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda i: v1_batch(server, [f"{label} {i}"]), range(8)))
        seen |= {replica_of(r) for r in responses if r.status_code == 200}
        if len(seen) < REPLICAS:
            time.sleep(1)
    return seen


# --- the same answers, on every route --------------------------------------------------------------------------

def test_v1_matches_sentence_transformers(ray_server, reference):
    response = v1_batch(ray_server, TEXTS)
    assert response.status_code == 200, response.text
    vectors = np.asarray(response.json()["predictions"], dtype=np.float32)
    assert vectors.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert cosines(vectors, reference(TEXTS)).min() >= EXACT


def test_v2_rest_matches_sentence_transformers(ray_server, reference):
    body = {"inputs": [{"name": "text", "shape": [len(TEXTS)], "datatype": "BYTES", "data": TEXTS}]}
    response = post(ray_server, V2, body)
    assert response.status_code == 200, response.text
    output = response.json()["outputs"][0]
    assert output["datatype"] == "FP32" and output["shape"] == [len(TEXTS), 384]
    assert cosines(np.reshape(output["data"], output["shape"]), reference(TEXTS)).min() >= EXACT


def test_legacy_embedding_matches_sentence_transformers(ray_server, reference):
    response = post(ray_server, "/embedding", {"a": TEXTS[0], "b": TEXTS[1]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert list(body) == ["a", "b"] and all(isinstance(v, str) for v in body.values())
    vectors = [json.loads(body["a"]), json.loads(body["b"])]
    assert cosines(vectors, reference(TEXTS[:2])).min() >= EXACT


def test_grpc_matches_sentence_transformers(ray_server, reference):
    response = InferResponse.from_grpc(grpc_infer(ray_server, TEXTS, (("x-api-key", TEST_KEY),)))
    vectors = response.outputs[0].as_numpy().reshape(len(TEXTS), 384)
    assert cosines(vectors, reference(TEXTS)).min() >= EXACT


def test_v2_metadata_comes_from_the_replicas(ray_server):
    response = requests.get(f"{ray_server.url}/v2/models/{MODEL_NAME}", headers=ray_server.headers(), timeout=30)
    assert response.status_code == 200
    assert response.json()["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]


def test_a_request_error_keeps_its_status_across_ray(ray_server):
    response = v1_batch(ray_server, ["fine", 3])
    assert response.status_code == 422
    assert response.json() == {"error": "'instances[1]' must be a string, not int"}


def test_openai_route_goes_through_the_replicas(ray_server, reference):
    response = post(ray_server, "/openai/v1/embeddings", {"input": TEXTS[:2], "model": MODEL_NAME})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [item["index"] for item in data] == [0, 1]
    assert cosines([item["embedding"] for item in data], reference(TEXTS[:2])).min() >= EXACT
    assert "x-replica" in response.headers


def test_attach_fronts_the_running_application(ray_server, reference, tmp_path):
    """`--attach` (as on the KubeRay head) serves the application another process deployed, on the same replicas."""
    address = re.search(r"Ray instance: (\S+)", ray_server.log()).group(1)
    front = start_server(tmp_path, command=[sys.executable, "ray_serve.py", "--attach"],
                         # A local instance is on loopback and has a token (~/.ray/auth_token): join it as such.
                         env={"RAY_ADDRESS": address, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                              "RAY_AUTH_MODE": "token"})
    try:
        response = v1_batch(front, TEXTS[:2])
        assert response.status_code == 200, response.text
        assert cosines(response.json()["predictions"], reference(TEXTS[:2])).min() >= EXACT
        assert post(front, V1, {"instances": ["x"]}, headers={"Content-Type": "application/json"}).status_code == 401
        assert replica_of(response) in replicas_answering(ray_server, "owner")
    finally:
        front.stop()
    # The attached front end leaves the application running for its owner.
    assert v1_batch(ray_server, ["still here"]).status_code == 200


# --- auth, unchanged --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path,body", [("/embedding", {"a": "hello"}), (V1, {"instances": ["hello"]})])
def test_the_key_is_still_required(ray_server, path, body):
    plain = {"Content-Type": "application/json"}
    missing = post(ray_server, path, body, headers=plain)
    wrong = post(ray_server, path, body, headers={**plain, "X-Api-Key": "wrong"})
    assert (missing.status_code, wrong.status_code) == (401, 403)
    assert "x-replica" not in missing.headers and "x-replica" not in wrong.headers
    assert requests.get(f"{ray_server.url}/health", timeout=10).json() == {"status": "healthy", "model": MODEL_NAME}


def test_grpc_still_requires_the_key(ray_server):
    with pytest.raises(grpc.RpcError) as caught:
        grpc_infer(ray_server, ["hello"], (("x-api-key", "wrong"),))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_each_replica_computes_a_repeated_text_once_per_key(ray_server):
    text = f"asked again and again {uuid.uuid4().hex}"
    responses = [v1_batch(ray_server, [text]) for _ in range(8)]
    assert all(r.status_code == 200 for r in responses)
    computed = Counter()
    for response in responses:
        computed[replica_of(response)] += int(response.headers["x-computed-texts"])
    assert set(computed.values()) == {1}, computed  # its first request on a replica computes it, no other one
    other = post(ray_server, V1, {"instances": [text]}, headers={"X-Api-Key": OTHER_KEY})
    assert other.status_code == 200 and other.headers["x-computed-texts"] == "1"  # no replica answers another key's


# --- replicas ---------------------------------------------------------------------------------------------------

def test_requests_spread_over_both_replicas(ray_server, reference):
    texts = [[f"sentence {i} about topic {i % 5}"] for i in range(24)]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda t: v1_batch(ray_server, t), texts))
    assert all(r.status_code == 200 for r in responses)
    served = Counter(replica_of(r) for r in responses)
    assert len(served) == REPLICAS, served
    assert len({pid for _, pid in served}) == REPLICAS and os.getpid() not in {pid for _, pid in served}
    # Every replica gives the reference answer, not only the first.
    for response, text in zip(responses, texts):
        assert cosines(response.json()["predictions"], reference(text))[0] >= EXACT


def test_a_killed_replica_is_replaced_and_no_request_hangs(ray_server):
    """SIGKILL one replica under load: each request gets 200 (retried on the other) or a 503 JSON error."""
    before = replicas_answering(ray_server, "warm")
    assert len(before) == REPLICAS
    victim_id, victim_pid = sorted(before)[0]
    client_timeout = 45  # above RAY_REQUEST_TIMEOUT=30: a 503 must come before the client gives up

    def one(i: int):
        try:
            response = v1_batch(ray_server, [f"load {i} " * 30] * 4, timeout=client_timeout)
        except requests.Timeout:
            return "timeout", None
        replica = replica_of(response) if response.status_code == 200 else None
        if response.status_code == 503:
            assert "error" in response.json()
        return response.status_code, replica

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(64)]
        time.sleep(1.0)
        os.kill(victim_pid, signal.SIGKILL)
        results = [f.result(timeout=client_timeout + 15) for f in futures]
    statuses = Counter(status for status, _ in results)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[200] >= len(results) // 2, statuses

    # Ray Serve starts a new replica in the victim's place; both answer again.
    seen = replicas_answering(ray_server, "after")
    assert len(seen) == REPLICAS and victim_id not in {rid for rid, _ in seen}, seen


def test_with_every_replica_killed_requests_end_in_bounded_time(ray_server):
    """No replica at all for a while: each request gets 200 (once a new one is up) or a 503 JSON error in time."""
    pids = {pid for _, pid in replicas_answering(ray_server, "warm")}
    assert len(pids) == REPLICAS
    request_timeout = 30  # RAY_REQUEST_TIMEOUT of the fixture

    def one(i: int):
        started = time.monotonic()
        try:
            response = v1_batch(ray_server, [f"orphan {i}"], timeout=request_timeout + 15)
        except requests.Timeout:
            return "timeout", time.monotonic() - started
        if response.status_code == 503:
            assert response.json()["error"]
        return response.status_code, time.monotonic() - started

    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(12)))
    assert {status for status, _ in results} <= {200, 503}, results
    assert max(elapsed for _, elapsed in results) < request_timeout + 10, results

    alive = replicas_answering(ray_server, "back", seconds=180)
    assert len(alive) == REPLICAS and not {pid for _, pid in alive} & pids, alive


# --- the front's handling of replicas, on Serve's in-process testing mode --------------------------------------

@serve.deployment
class Stuck:
    """A replica that never answers in time: a hung backend, a lost node."""

    async def __call__(self, body, headers=None):
        await asyncio.sleep(60)
        return body, {}


@serve.deployment
class Echo:
    async def __call__(self, body, headers=None):
        return body, dict(headers or {})


def call_model(model, body, headers=None, settle: float = 0.0):
    async def run():
        try:
            return await model(body, headers=headers)
        finally:
            await asyncio.sleep(settle)  # lets a cancelled call finish before the loop closes

    return asyncio.run(run())


def test_a_stuck_replica_gets_a_503_in_bounded_time():
    from embedding_server.operations.errors import ReplicaUnavailable
    from ray_serve import RayEmbeddingModel

    handle = serve.run(Stuck.bind(), name="stuck", route_prefix=None, _local_testing_mode=True)
    model = RayEmbeddingModel(MODEL_NAME, handle, timeout=0.5, retries=2)
    started = time.monotonic()
    with pytest.raises(ReplicaUnavailable) as caught:
        call_model(model, {"instances": ["x"]}, settle=0.2)
    assert time.monotonic() - started < 3
    assert "within 0.5s" in caught.value.reason  # gRPC's interceptor reads .reason


def test_the_key_stays_in_the_front_process():
    from embedding_server.engine.cache import NAMESPACE_HEADER, namespace_of
    from ray_serve import RayEmbeddingModel

    handle = serve.run(Echo.bind(), name="echo", route_prefix=None, _local_testing_mode=True)
    model = RayEmbeddingModel(MODEL_NAME, handle, timeout=5, retries=0)
    # The replica gets the key's cache namespace in its place; a client's own namespace header is replaced.
    body, headers = call_model(model, {"instances": ["x"]},
                               {"x-api-key": TEST_KEY, "authorization": f"Bearer {TEST_KEY}", "x-request-id": "r1",
                                NAMESPACE_HEADER: namespace_of("someone-else")})
    assert body == {"instances": ["x"]}
    assert headers == {"x-request-id": "r1", NAMESPACE_HEADER: namespace_of(TEST_KEY)}


# --- the settings ---------------------------------------------------------------------------------------------

def test_ray_settings_come_from_the_environment():
    from ray_serve import RaySettings, deployment_options

    settings = RaySettings.from_env({"RAY_MIN_REPLICAS": "2", "RAY_MAX_REPLICAS": "5", "RAY_REPLICA_CPUS": "0.5",
                                     "RAY_TARGET_ONGOING_REQUESTS": "4"})
    options = deployment_options(settings)
    assert options["autoscaling_config"] == {"min_replicas": 2, "initial_replicas": 2, "max_replicas": 5,
                                             "target_ongoing_requests": 4.0}
    assert options["ray_actor_options"]["num_cpus"] == 0.5
    assert RaySettings.from_env({}).max_replicas >= RaySettings.from_env({}).min_replicas


@pytest.mark.parametrize("env", [{"RAY_MIN_REPLICAS": "two"}, {"RAY_REPLICA_CPUS": "0"}, {"RAY_MAX_REPLICAS": "0"}])
def test_bad_ray_settings_are_named(env):
    from embedding_server.operations.settings import SettingsError
    from ray_serve import RaySettings

    with pytest.raises(SettingsError, match=next(iter(env))):
        RaySettings.from_env(env)


# --- k8s/rayservice.yaml --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def manifest() -> list[dict]:
    return [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]


@pytest.fixture(scope="module")
def rayservice(manifest) -> dict:
    (service,) = [doc for doc in manifest if doc["kind"] == "RayService"]
    assert service["apiVersion"] == "ray.io/v1"
    return service


@pytest.fixture(scope="module")
def serve_config(rayservice) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def containers(rayservice) -> list[dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def test_serve_config_is_valid_for_ray_serve(serve_config):
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(serve_config)


def test_serve_config_import_path_builds_our_deployment(serve_config, monkeypatch):
    import ray_serve

    (app,) = serve_config["applications"]
    module_name, attribute = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module_name), attribute)
    assert builder is ray_serve.build_app
    assert app["route_prefix"] is None, "Serve's own proxy must not reach the model without the API key"
    monkeypatch.delenv("API_KEY", raising=False)
    built = builder(app["args"])
    (deployment,) = app["deployments"]
    assert deployment["name"] == built._bound_deployment.name == ray_serve.DEPLOYMENT_NAME
    assert set(app["args"]) <= set(ray_serve.ReplicaConfig.__dataclass_fields__)
    autoscaling = deployment["autoscaling_config"]
    assert 1 <= autoscaling["min_replicas"] <= autoscaling["max_replicas"]
    assert autoscaling["target_ongoing_requests"] <= deployment["max_ongoing_requests"]


def test_workers_can_hold_max_replicas(rayservice, serve_config):
    (deployment,) = serve_config["applications"][0]["deployments"]
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    worker_cpus = sum(int(g["rayStartParams"]["num-cpus"]) * g["maxReplicas"] for g in cluster["workerGroupSpecs"])
    needed = deployment["autoscaling_config"]["max_replicas"] * deployment["ray_actor_options"]["num_cpus"]
    assert needed <= worker_cpus
    assert cluster["enableInTreeAutoscaling"] is True


def test_containers_run_one_image_with_resources(rayservice):
    found = containers(rayservice)
    assert len({c["image"] for c in found}) == 1
    for container in found:
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), container["name"]


def test_every_container_starts_ray_itself(rayservice):
    """With ray.io/overwrite-container-cmd KubeRay adds no command anywhere: a worker without one would run
    the image's CMD (model.py) and never join the cluster."""
    assert rayservice["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    for container in containers(rayservice):
        assert container["command"] == ["/bin/bash", "-c", "--"], container["name"]
        assert 'exec /bin/bash -c "$KUBERAY_GEN_RAY_START_CMD"' in container["args"][0], container["name"]


def test_api_key_comes_from_a_secret(rayservice):
    env = {e["name"]: e for c in containers(rayservice) for e in c.get("env", [])}
    assert set(env["API_KEY"]["valueFrom"]["secretKeyRef"]) == {"name", "key"}
    assert "value" not in env["API_KEY"]


def string_constants(path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def test_env_names_are_read_by_the_server(rayservice):
    read = string_constants(ROOT / "embedding_server/operations/settings.py") | string_constants(ROOT / "ray_serve.py")
    ray_own = {"RAY_ADDRESS"}  # read by ray.init itself
    names = {e["name"] for c in containers(rayservice) for e in c.get("env", [])}
    assert names and names - ray_own <= read, names - ray_own - read


def test_front_service_keeps_the_single_process_ports(manifest, rayservice):
    (service,) = [doc for doc in manifest if doc["kind"] == "Service"]
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    assert service["spec"]["selector"].items() <= head["metadata"]["labels"].items()
    head_ports = {p["name"]: p["containerPort"] for p in head["spec"]["containers"][0]["ports"]}
    env = {e["name"]: e.get("value") for e in head["spec"]["containers"][0]["env"]}
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert (ports["http"]["port"], ports["grpc"]["port"]) == (8080, 8081)
    assert head_ports[ports["http"]["targetPort"]] == int(env["PORT"])
    assert head_ports[ports["grpc"]["targetPort"]] == int(env["GRPC_PORT"])
    assert "python ray_serve.py --attach" in head["spec"]["containers"][0]["args"][0]


def test_the_front_pod_outlives_the_servers_grace_period(rayservice):
    """SIGKILL comes terminationGracePeriodSeconds after SIGTERM: the front end drains within GRACE_PERIOD first."""
    from embedding_server.operations.settings import DEFAULT_GRACE_PERIOD

    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    env = {e["name"]: e.get("value") for e in head["spec"]["containers"][0]["env"]}
    grace_period = int(env.get("GRACE_PERIOD", DEFAULT_GRACE_PERIOD))
    assert head["spec"].get("terminationGracePeriodSeconds", 30) >= grace_period + 10


def test_workers_have_a_readiness_probe_the_image_can_run(rayservice, serve_config):
    """KubeRay's default worker probe runs wget, which the image lacks, and asks Serve's proxy, which has no route
    to be healthy for here; ours asks the raylet with Python (tests/test_image.py runs it in the built image)."""
    assert serve_config["applications"][0]["route_prefix"] is None
    for group in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        command = container["readinessProbe"]["exec"]["command"]
        assert command[:2] == ["python", "-c"], command
        assert "localhost:52365/api/local_raylet_healthz" in command[2] and ":8000" not in command[2]
        compile(command[2], "readinessProbe", "exec")


def test_the_object_store_fits_in_dev_shm(rayservice):
    from kubernetes.utils import parse_quantity

    cluster = rayservice["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        spec = group["template"]["spec"]
        (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        assert volume["emptyDir"]["medium"] == "Memory"
        store = int(group["rayStartParams"]["object-store-memory"])
        assert store <= parse_quantity(volume["emptyDir"]["sizeLimit"])
