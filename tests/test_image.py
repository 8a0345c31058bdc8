"""The shipped image, built from the Dockerfile and run as it ships: its own user, a read-only root, tmpfs scratch.

Needs a container engine: `.ci/run` sources ../shared/container/prepare.sh, which exports CONTAINER_ENGINE,
CONTAINER_ENGINE_FLAGS and CONTAINER_BUILD_FLAGS. Without one these tests fail with the reason, never skip.
Each target is built once a session and tagged by a hash of its build context, so an unchanged tree reuses it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from test_deploy import RENDER_PLAN_MB, build_context

from conftest import MODEL_NAME, ROOT, TEST_KEY, LoopbackEndpoints, cosines, free_port, grpc_infer
from embedding_server.engine import cpu

pytestmark = pytest.mark.image

BUILD_TIMEOUT = 1800
START_TIMEOUT = 180
GRACE_PERIOD = 10
IMAGE_USER = "10001"
# OpenVINO computes bf16 where the CPU has it natively (cosine >= 0.9999 in tests/test_backends.py), fp32 elsewhere.
FLOOR = 0.9999 if cpu.has_bf16() else 0.99999
TEXTS = ["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse.",
         "Ein Mann reitet ein Pferd."]


def engine() -> list[str]:
    """The engine's command with its global flags; fails the test with the reason when there is none."""
    name = os.environ.get("CONTAINER_ENGINE", "")
    if not name or os.environ.get("CONTAINER_READY", "1") != "1":
        pytest.fail("no container engine to build and run the image: "
                    + os.environ.get("CONTAINER_PREPARE_ERROR", "CONTAINER_ENGINE is not set (run the tests with "
                                     "bash .ci/run, which sources ../shared/container/prepare.sh)"))
    return [name, *shlex.split(os.environ.get("CONTAINER_ENGINE_FLAGS", ""))]


def run(*args: str, timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([*engine(), *args], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{shlex.join(args[:3])}... exited {result.returncode}:\n{result.stderr[-4000:]}")
    return result


def context_hash(target: str) -> str:
    digest = hashlib.sha256(f"{target}\n{os.environ.get('CONTAINER_BUILD_FLAGS', '')}\n".encode())
    for rel in sorted(build_context(ROOT) | {"Dockerfile", ".dockerignore"}):
        digest.update(f"{rel}\n".encode() + (ROOT / rel).read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class Built:
    tag: str
    seconds: float | None  # None: reused from an earlier build of the same context


def build(target: str | None) -> Built:
    """The image of one Dockerfile target (None: the default, what a plain `docker build .` makes)."""
    name = target or "default"
    tag = f"localhost/embedding-server-test:{name}-{context_hash(name)}"
    if run("image", "exists", tag, check=False).returncode == 0:
        return Built(tag, None)
    started = time.monotonic()
    args = ["build", *shlex.split(os.environ.get("CONTAINER_BUILD_FLAGS", "")), "-t", tag]
    if target:
        args += ["--target", target]
    result = run(*args, str(ROOT), timeout=BUILD_TIMEOUT, check=False)
    assert result.returncode == 0, f"the {name} image did not build:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    return Built(tag, time.monotonic() - started)


@pytest.fixture(scope="session")
def default_image() -> Built:
    return build(None)


@pytest.fixture(scope="session")
def ray_image() -> Built:
    return build("ray")


@pytest.fixture(scope="session")
def scratch(tmp_path_factory) -> Path:
    """Containers start from here: conmon leaves an `oom` file in the directory `run` was called from."""
    return tmp_path_factory.mktemp("containers")


@dataclass
class Container(LoopbackEndpoints):
    name: str
    http_port: int
    grpc_port: int
    started: float
    healthy_after: float | None = None

    def inspect(self, template: str) -> str:
        return run("inspect", "--format", template, self.name).stdout.strip()

    def logs(self) -> str:
        result = run("logs", self.name, check=False)
        return result.stdout + result.stderr

    def wait_healthy(self, path: str = "/health", timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.inspect("{{.State.Running}}") != "true":
                raise AssertionError(f"{self.name} exited {self.inspect('{{.State.ExitCode}}')}:\n{self.logs()[-4000:]}")
            try:
                if requests.get(self.url + path, timeout=2).status_code == 200:
                    self.healthy_after = time.monotonic() - self.started
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise AssertionError(f"{self.name} not healthy after {timeout}s:\n{self.logs()[-4000:]}")


@pytest.fixture(scope="session")
def containers(scratch) -> Iterator:
    """Starts containers of an image as it ships (no --user), removing them all at the end of the session."""
    names: list[str] = []

    def start(image: Built, env: dict[str, str] | None = None, extra: list[str] | None = None,
              command: list[str] | None = None) -> Container:
        http_port, grpc_port = free_port(), free_port()
        name = f"embedding-test-{os.getpid()}-{len(names)}"
        names.append(name)
        env = {"API_KEY": TEST_KEY, **(env or {})}
        args = ["run", "-d", "--name", name, "--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp",
                "-p", f"127.0.0.1:{http_port}:{env.get('PORT', '8080')}",
                "-p", f"127.0.0.1:{grpc_port}:{env.get('GRPC_PORT', '8081')}"]
        args += [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
        run(*args, *(extra or []), image.tag, *(command or []), cwd=scratch)
        return Container(name, http_port, grpc_port, time.monotonic())

    yield start
    for name in names:
        run("rm", "-f", "-t", "0", name, check=False, cwd=scratch)


@pytest.fixture(scope="session")
def served(default_image, containers) -> Container:
    container = containers(default_image)
    container.wait_healthy()
    return container


# --- the default image -----------------------------------------------------------------------------------------

def test_the_image_runs_as_its_own_user_on_a_read_only_root(served):
    assert served.inspect("{{.Config.User}}").split(":")[0] == IMAGE_USER
    assert run("exec", served.name, "id", "-u").stdout.strip() == IMAGE_USER
    assert run("exec", served.name, "touch", "/app/written", check=False).returncode != 0
    assert "unusable" not in served.logs(), "the server should load the export cache the build made"


def test_without_a_key_every_protocol_refuses(served):
    import grpc

    assert requests.post(served.url + "/embedding", json={"a": "hello"}, timeout=30).status_code == 401
    assert requests.post(served.url + f"/v1/models/{MODEL_NAME}:predict", json={"instances": ["hello"]},
                         timeout=30).status_code == 401
    with pytest.raises(grpc.RpcError) as caught:
        grpc_infer(served, ["hello"])
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_v1_legacy_and_grpc_match_sentence_transformers(served, reference):
    from kserve.protocol.infer_type import InferResponse

    expected = reference(TEXTS)
    headers = {"X-Api-Key": TEST_KEY}
    v1 = requests.post(served.url + f"/v1/models/{MODEL_NAME}:predict", json={"instances": TEXTS},
                       headers=headers, timeout=60)
    assert v1.status_code == 200, v1.text
    legacy = requests.post(served.url + "/embedding", json={f"t{i}": t for i, t in enumerate(TEXTS)},
                           headers=headers, timeout=60)
    assert legacy.status_code == 200, legacy.text
    legacy_vectors = [json.loads(legacy.json()[f"t{i}"]) for i in range(len(TEXTS))]
    response = InferResponse.from_grpc(grpc_infer(served, TEXTS, (("x-api-key", TEST_KEY),)))
    grpc_vectors = response.outputs[0].as_numpy()
    for name, vectors in {"v1": v1.json()["predictions"], "legacy": legacy_vectors, "grpc": grpc_vectors}.items():
        assert np.asarray(vectors).shape == (len(TEXTS), 384), name
        assert cosines(vectors, expected).min() >= FLOOR, name


def test_the_healthcheck_command_passes(served):
    assert served.inspect("{{json .Config.Healthcheck}}") not in ("", "null"), "docker format keeps HEALTHCHECK"
    result = run("healthcheck", "run", served.name, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_sigterm_ends_the_server_with_exit_0_inside_the_grace_period(default_image, containers, scratch):
    container = containers(default_image, env={"GRACE_PERIOD": str(GRACE_PERIOD)})
    container.wait_healthy()
    started = time.monotonic()
    run("stop", "-t", str(GRACE_PERIOD + 5), container.name, timeout=GRACE_PERIOD + 60, cwd=scratch)
    assert time.monotonic() - started < GRACE_PERIOD + 5
    assert container.inspect("{{.State.ExitCode}}") == "0", container.logs()[-3000:]


def test_start_to_healthy_is_recorded(served, default_image, record_property):
    """Not a threshold (the machine is shared): the figures for the record, and a bound on the start."""
    record_property("start_to_healthy_s", round(served.healthy_after, 1))
    record_property("build_s", default_image.seconds)
    size = run("image", "inspect", "--format", "{{.Size}}", default_image.tag).stdout.strip()
    record_property("image_bytes", int(size))
    assert served.healthy_after < START_TIMEOUT


# --- Render: the starter plan's 512 MB --------------------------------------------------------------------------

def render_service() -> dict:
    (service,) = yaml.safe_load((ROOT / "render.yaml").read_text())["services"]
    return service


def largest_texts(count: int, chars: int) -> list[str]:
    """Distinct texts of ``chars`` characters made of one-token words, so that each is cut at 256 tokens and every
    micro-batch is as wide as the model allows."""
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    return [(f"{i} " + " ".join(letters[(i * 7 + k) % len(letters)] for k in range(chars)))[:chars]
            for i in range(count)]


def test_the_render_plan_holds_the_largest_requests_the_limits_admit(default_image, containers, scratch,
                                                                    record_property):
    """The image under render.yaml's env and plan memory, driven by concurrent requests of MAX_TEXTS_PER_REQUEST
    texts just under MAX_BODY_BYTES on the legacy route and V1: no OOM kill, no restart, no 5xx."""
    from embedding_server.operations.settings import Limits

    service = render_service()
    plan_mb = RENDER_PLAN_MB[service["plan"]]
    env = {item["key"]: item["value"] for item in service["envVars"] if "value" in item}
    limits = Limits.from_env(env)
    count = limits.max_texts
    chars = min(limits.max_chars, (limits.max_body_bytes - 64 * count) // count)
    texts = largest_texts(count, chars)
    bodies = [("/embedding", json.dumps({f"id{i}": t for i, t in enumerate(texts)})),
              (f"/v1/models/{MODEL_NAME}:predict", json.dumps({"instances": texts}))]
    assert all(len(body.encode()) <= limits.max_body_bytes for _, body in bodies)

    container = containers(default_image, env=env, extra=["--memory", f"{plan_mb}m", "--memory-swap", f"{plan_mb}m"])
    container.wait_healthy()
    statuses: Counter = Counter()
    lock = threading.Lock()

    def client(route: str, body: str) -> None:
        """One request, retried after a 429 (Retry-After) until the queue admits it."""
        for _ in range(200):
            try:
                response = requests.post(container.url + route, data=body, timeout=900,
                                         headers={"X-Api-Key": TEST_KEY, "Content-Type": "application/json"})
                key = f"{route.split(':')[-1]} {response.status_code}"
            except requests.RequestException as exc:
                response, key = None, f"{route.split(':')[-1]} {type(exc).__name__}"
            with lock:
                statuses[key] += 1
            if response is None or response.status_code != 429:
                break
            time.sleep(min(float(response.headers.get("Retry-After", "1")), 5))

    # Both routes at once: the queue admits one, the other waits on 429s (its body parsed each time) for its turn.
    threads = [threading.Thread(target=client, args=body) for body in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    peak = run("exec", container.name, "cat", "/sys/fs/cgroup/memory/memory.max_usage_in_bytes", check=False)
    if peak.returncode != 0:
        peak = run("exec", container.name, "cat", "/sys/fs/cgroup/memory.peak", check=False)
    record_property("cgroup_peak_mb", round(int(peak.stdout.strip() or 0) / 2**20))
    status = run("exec", container.name, "cat", "/proc/1/status").stdout
    record_property("server_peak_rss_mb", round(int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024))
    record_property("statuses", dict(statuses))
    assert container.inspect("{{.State.Running}}") == "true", container.logs()[-3000:]
    assert container.inspect("{{.State.OOMKilled}}") == "false"
    assert container.inspect("{{.RestartCount}}") == "0"
    assert all(key.split()[-1] in ("200", "429") for key in statuses), statuses
    assert statuses["/embedding 200"] and statuses["predict 200"], statuses


# --- the ray target --------------------------------------------------------------------------------------------

# Ray writes its session under /tmp (a tmpfs already) and its token under HOME, and keeps objects in /dev/shm.
RAY_SCRATCH = ["--tmpfs", "/home/app:U", "--shm-size", "1g"]  # U: owned by the image user, as fsGroup makes it


def test_ray_serve_in_the_image_serves_the_same_vectors_from_two_replicas(ray_image, containers, reference,
                                                                         record_property):
    container = containers(ray_image, env={"RAY_MIN_REPLICAS": "2", "RAY_MAX_REPLICAS": "2", "RAY_NUM_CPUS": "2"},
                           extra=RAY_SCRATCH, command=["python", "ray_serve.py"])
    container.wait_healthy(timeout=420)
    record_property("start_to_healthy_s", round(container.healthy_after, 1))
    record_property("image_bytes", int(run("image", "inspect", "--format", "{{.Size}}", ray_image.tag).stdout))
    expected = reference(TEXTS)

    def ask(_: int) -> requests.Response:
        return requests.post(container.url + f"/v1/models/{MODEL_NAME}:predict", json={"instances": TEXTS},
                             headers={"X-Api-Key": TEST_KEY}, timeout=120)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(ask, range(24)))
    replicas = Counter(r.headers.get("x-replica") for r in responses)
    assert len(replicas) == 2 and None not in replicas, replicas
    for response in responses:
        assert response.status_code == 200, response.text
        assert cosines(response.json()["predictions"], expected).min() >= FLOOR, response.headers["x-replica"]
    assert requests.post(container.url + "/embedding", json={"a": "hi"}, timeout=30).status_code == 401


def worker_readiness_command() -> list[str]:
    (service,) = [d for d in yaml.safe_load_all((ROOT / "k8s" / "rayservice.yaml").read_text())
                  if d and d["kind"] == "RayService"]
    (worker,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return worker["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["command"]


def test_the_kuberay_worker_readiness_probe_runs_in_the_image(ray_image, containers):
    """The probe's own command, inside the image, against a Ray node: it fails before the node is up and passes
    once its raylet is healthy."""
    command = worker_readiness_command()
    node = "ray start --head --num-cpus 1 --disable-usage-stats --dashboard-agent-listen-port 52365 && sleep infinity"
    container = containers(ray_image, extra=RAY_SCRATCH, command=["bash", "-c", node])
    assert run("exec", container.name, *command, check=False, timeout=60).returncode != 0, "passed before Ray ran"
    deadline = time.monotonic() + 300
    result = None
    while time.monotonic() < deadline:
        result = run("exec", container.name, *command, check=False, timeout=60)
        if result.returncode == 0:
            break
        time.sleep(3)
    assert result is not None and result.returncode == 0, result.stdout + result.stderr + container.logs()[-3000:]


# --- the ServingRuntime: any model KServe's storage initializer puts in /mnt/models -------------------------------

def runtime_container() -> dict:
    (runtime, _) = [d for d in yaml.safe_load_all((ROOT / "k8s" / "servingruntime.yaml").read_text()) if d]
    (container,) = runtime["spec"]["containers"]
    return container


def test_the_image_run_as_the_servingruntime_runs_it_serves_the_mounted_model(default_image, containers, scratch,
                                                                              variant_model, record_property):
    """k8s/servingruntime.yaml's command, args, env and scratch volumes, as its user on a read-only root, with a
    model of another dimension mounted read-only at /mnt/models: converted at start into the scratch CACHE_DIR,
    then served on V1, V2 and OpenAI, compared with sentence-transformers loading the same directory."""
    from sentence_transformers import SentenceTransformer

    spec = runtime_container()
    name, mount = "other", "/mnt/models"
    # As KServe's storage initializer leaves it for the server's user: readable by all, written by none.
    model_dir = shutil.copytree(variant_model("dense128"), scratch / "mounted-model")
    subprocess.run(["chmod", "-R", "a+rX,a-w", str(model_dir)], check=True)
    command = [*spec["command"], *(arg.replace("{{.Name}}", name) for arg in spec["args"])]
    assert f"--model_dir={mount}" in command and f"--model_name={name}" in command
    env = {item["name"]: item["value"] for item in spec["env"] if "value" in item}
    http_port = next(arg.split("=")[1] for arg in spec["args"] if arg.startswith("--http_port="))
    grpc_port = next(arg.split("=")[1] for arg in spec["args"] if arg.startswith("--grpc_port="))
    # Each emptyDir the runtime mounts becomes a tmpfs owned by the image user (as fsGroup makes it); /tmp is one.
    scratch = [arg for volume in spec["volumeMounts"] if volume["mountPath"] != "/tmp"
               for arg in ("--tmpfs", f"{volume['mountPath']}:U")]
    assert spec["securityContext"]["readOnlyRootFilesystem"] and spec["securityContext"]["runAsUser"] == 10001
    container = containers(default_image, env={**env, "PORT": http_port, "GRPC_PORT": grpc_port},
                           extra=[*scratch, "-v", f"{model_dir}:{mount}:ro"], command=command)
    container.wait_healthy(path=f"/v2/models/{name}/ready", timeout=600)
    record_property("start_to_healthy_with_conversion_s", round(container.healthy_after, 1))
    assert "converting" in container.logs(), "the mounted model should be converted at start"
    assert run("exec", container.name, "touch", f"{mount}/written", check=False).returncode != 0

    expected = SentenceTransformer(str(model_dir), device="cpu").encode(TEXTS)
    assert expected.shape == (len(TEXTS), 128)
    headers = {"X-Api-Key": TEST_KEY}
    v1 = requests.post(container.url + f"/v1/models/{name}:predict", json={"instances": TEXTS}, headers=headers,
                       timeout=120)
    v2 = requests.post(container.url + f"/v2/models/{name}/infer", headers=headers, timeout=120, json={
        "inputs": [{"name": "text", "shape": [len(TEXTS)], "datatype": "BYTES", "data": TEXTS}]})
    openai = requests.post(container.url + "/openai/v1/embeddings", json={"model": name, "input": TEXTS},
                           headers=headers, timeout=120)
    for response in (v1, v2, openai):
        assert response.status_code == 200, response.text
    (output,) = v2.json()["outputs"]
    for route, vectors in {"v1": v1.json()["predictions"], "v2": np.reshape(output["data"], output["shape"]),
                           "openai": [d["embedding"] for d in openai.json()["data"]]}.items():
        assert np.shape(vectors) == (len(TEXTS), 128), route
        # The converted graph (fp16-stored weights) is held to the fidelity gate of tests/test_backends.py.
        assert cosines(vectors, expected).min() >= 0.9999, route
    assert requests.post(container.url + f"/v1/models/{name}:predict", json={"instances": TEXTS},
                         timeout=30).status_code == 401
