"""k8s/servingruntime.yaml and k8s/inferenceservice-storageuri.yaml: valid for KServe and Kubernetes, in agreement
with the server's own flags and settings, and the server run the way the runtime runs it serves another model.

The run is the runtime's container args with KServe's placeholders filled in (model name, /mnt/models), on a model
directory made read-only, by a process without the capabilities that let root ignore file permissions.
"""
from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from test_deploy import PEAK_GROWTH_MB, check_model, final_cmd, image_home, image_user, read_stages

from conftest import NO_FILE_OVERRIDES, ROOT, RunningServer, cosines, make_variant_model, start_server

RUNTIME_YAML = ROOT / "k8s" / "servingruntime.yaml"
STORAGE_URI_YAML = ROOT / "k8s" / "inferenceservice-storageuri.yaml"
KINDS = {"ClusterServingRuntime": "V1alpha1ClusterServingRuntime", "ServingRuntime": "V1alpha1ServingRuntime",
         "InferenceService": "V1beta1InferenceService"}
SERVED_NAME = "other"
MODEL_MOUNT = "/mnt/models"  # where KServe's storage initializer puts the model
EXACT = 0.99999
MAX_CHARS = 5000  # MAX_CHARS_PER_TEXT of the exact run: its 413 must not speak of the bundled model's 256 tokens


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def runtimes() -> dict[str, dict]:
    docs = documents(RUNTIME_YAML)
    assert [doc["kind"] for doc in docs] == ["ClusterServingRuntime", "ServingRuntime"]
    return {doc["kind"]: doc for doc in docs}


@pytest.fixture(scope="module")
def runtime(runtimes) -> dict:
    return runtimes["ClusterServingRuntime"]


@pytest.fixture(scope="module")
def container(runtime) -> dict:
    containers = runtime["spec"]["containers"]
    assert [c["name"] for c in containers] == ["kserve-container"]
    return containers[0]


@pytest.fixture(scope="module")
def final():
    return read_stages()[-1]


# --- the manifests against KServe's and Kubernetes' models ------------------------------------------------------

def test_manifests_match_kserve_and_kubernetes_models():
    docs = documents(RUNTIME_YAML) + documents(STORAGE_URI_YAML)
    assert {doc["kind"] for doc in docs} == set(KINDS)
    for doc in docs:
        assert doc["apiVersion"] == ("serving.kserve.io/v1beta1" if doc["kind"] == "InferenceService"
                                     else "serving.kserve.io/v1alpha1")
        assert check_model(doc, KINDS[doc["kind"]], doc["kind"]) == []


@pytest.mark.parametrize(("where", "wrong"), [
    (("spec",), "suportedModelFormats"),
    (("spec", "containers", 0), "volumeMount"),
    (("spec", "containers", 0, "securityContext"), "runAsNonroot"),
    (("spec", "containers", 0, "startupProbe", "httpGet"), "paht"),
])
def test_the_check_refuses_a_misspelt_field_as_the_api_server_does(runtime, where, wrong):
    doc = copy.deepcopy(runtime)
    target = doc
    for step in where:
        target = target[step]
    target[wrong] = target.get(wrong.lower(), "x")
    errors = check_model(doc, KINDS[doc["kind"]], doc["kind"])
    assert any(wrong in error and "not a field" in error for error in errors), errors


def test_cluster_and_namespaced_runtimes_are_one_runtime(runtimes):
    cluster, namespaced = runtimes["ClusterServingRuntime"], runtimes["ServingRuntime"]
    assert cluster["metadata"]["name"] == namespaced["metadata"]["name"]
    assert "namespace" not in namespaced["metadata"], "kubectl apply -n chooses the namespace"
    assert cluster["spec"] == namespaced["spec"]
    # The README installs one of them with kubectl apply -l install=cluster (or install=namespace).
    assert (cluster["metadata"]["labels"]["install"], namespaced["metadata"]["labels"]["install"]) == (
        "cluster", "namespace")


def test_runtime_serves_sentence_transformers_on_v1_and_v2(runtime):
    formats = runtime["spec"]["supportedModelFormats"]
    assert [(f["name"], f["autoSelect"]) for f in formats] == [("sentence-transformers", True)]
    assert sorted(runtime["spec"]["protocolVersions"]) == ["v1", "v2"]


def test_storage_uri_example_selects_the_runtime_by_model_format(runtime):
    (isvc,) = documents(STORAGE_URI_YAML)
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model.get("runtime", runtime["metadata"]["name"]) == runtime["metadata"]["name"]
    assert re.fullmatch(r"(hf|s3|gs|pvc|https?)://\S+", model["storageUri"])
    assert "containers" not in isvc["spec"]["predictor"], "the image comes from the runtime"


# --- the manifests against the code -----------------------------------------------------------------------------

class ReadNames(dict):
    """An environment that records which variables the code asks for."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.read: set[str] = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def runtime_env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def parse_runtime_args(container: dict):
    from embedding_server.operations.settings import Settings
    from model import build_parser

    settings = Settings.from_env({**runtime_env(container), "API_KEY": "from-the-secret"})
    try:
        return build_parser(settings).parse_args(container["args"])
    except SystemExit:
        pytest.fail(f"the server's parser refuses the runtime's args {container['args']}")


def test_container_runs_the_image_cmd(container, final):
    assert container["command"] == final_cmd(final), "args alone would replace the image's CMD"


def test_every_arg_is_the_servers_and_names_the_ports_and_the_mounted_model(container):
    args = parse_runtime_args(container)
    assert args.model_path == MODEL_MOUNT
    assert args.model_name == "{{.Name}}"  # KServe fills in the InferenceService's name
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["ports"][0]["name"] == "http", "KServe maps the first port to the Service's port 80"
    assert (args.http_port, args.grpc_port) == (ports["http"], ports["grpc"])
    assert args.enable_grpc is True


def test_every_variable_is_one_settings_reads_and_the_key_is_a_secret(container):
    from embedding_server.operations.settings import Settings

    literal = runtime_env(container)
    env = ReadNames({**literal, "API_KEY": "from-the-secret"})
    settings = Settings.from_env(env)
    from_secret = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert set(from_secret) == {"API_KEY"} and from_secret["API_KEY"].get("optional") is not True
    assert set(literal) | set(from_secret) <= env.read
    assert settings.api_keys == ("from-the-secret",) and not settings.api_key_generated
    assert settings.show_api_key_info is False and settings.trust_remote_code is False


def test_probes_are_public_routes_on_the_http_port(container):
    from auth_middleware import is_public

    probes = {kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    for kind, probe in probes.items():
        assert probe["httpGet"]["port"] == container["ports"][0]["containerPort"], kind
        assert is_public("GET", probe["httpGet"]["path"]), kind
        assert "{{" not in probe["httpGet"]["path"], "probes must not depend on the model's name"


def test_pod_is_non_root_on_a_read_only_root_and_writes_only_scratch_volumes(runtime, container, final):
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True and str(security["runAsUser"]) == image_user(final)
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
    assert security["readOnlyRootFilesystem"] is True
    scratch = {v["name"] for v in runtime["spec"]["volumes"] if "emptyDir" in v}
    mounted = {m["mountPath"] for m in container["volumeMounts"] if m["name"] in scratch}
    assert {"/tmp", image_home(final), runtime_env(container)["CACHE_DIR"]} <= mounted


# --- the server run as the runtime runs it ----------------------------------------------------------------------

def served_args(container: dict, model_dir: Path) -> list[str]:
    """The runtime's args as KServe hands them over, with the model at model_dir; the ports are start_server's
    (PORT and GRPC_PORT: free loopback ports)."""
    args = []
    for arg in container["args"]:
        if arg.startswith(("--http_port", "--grpc_port")):
            continue
        args.append(arg.replace("{{.Name}}", SERVED_NAME).replace(f"={MODEL_MOUNT}", f"={model_dir}"))
    assert f"--model_dir={model_dir}" in args and f"--model_name={SERVED_NAME}" in args
    return args


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_mode) for p in root.rglob("*")}


def read_only(folder: Path) -> None:
    subprocess.run(["chmod", "-R", "a-w", str(folder)], check=True)


def memory_mb(server: RunningServer, field: str) -> float:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) / 1024


@dataclass
class RuntimeRun:
    server: RunningServer
    model_dir: Path
    cache_dir: Path
    model_tree: dict
    reference: object


def start_as_runtime(tmp: Path, container: dict, kind: str, env: dict[str, str]) -> RuntimeRun:
    from sentence_transformers import SentenceTransformer

    model_dir = make_variant_model(tmp, kind)
    read_only(model_dir)
    cache_dir = tmp / "cache"
    cache_dir.mkdir()
    reference = SentenceTransformer(str(model_dir), device="cpu")
    full_env = {**runtime_env(container), "CACHE_DIR": str(cache_dir), "HOME": str(tmp), **env}
    server = start_server(tmp, env=full_env,
                          command=[*NO_FILE_OVERRIDES, sys.executable, "model.py", *served_args(container, model_dir)])
    return RuntimeRun(server, model_dir, cache_dir, tree(model_dir), reference)


@pytest.fixture(scope="module")
def exact_run(tmp_path_factory, container) -> Iterator[RuntimeRun]:
    """A 128-dimension model with a Dense layer and a 128-token limit, on the exact path (torch fp32)."""
    run = start_as_runtime(tmp_path_factory.mktemp("runtime-exact"), container, "dense128",
                           {"BACKEND": "torch", "PRECISION": "fp32", "MAX_CHARS_PER_TEXT": str(MAX_CHARS)})
    yield run
    run.server.stop()


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, container) -> Iterator[RuntimeRun]:
    """A CLS-pooled model without Normalize on the default backend: converted at start into an empty CACHE_DIR."""
    run = start_as_runtime(tmp_path_factory.mktemp("runtime-default"), container, "cls", {})
    yield run
    run.server.stop()


TEXTS = ["A man is eating food.", "A man is riding a horse.", "The runtime serves whatever model it is given."]


def post(server: RunningServer, path: str, body: dict, key: bool = True) -> requests.Response:
    headers = server.headers() if key else {"Content-Type": "application/json"}
    return requests.post(server.url + path, json=body, headers=headers, timeout=120)


def test_v1_v2_and_openai_serve_the_mounted_models_vectors_with_the_key(exact_run):
    expected = exact_run.reference.encode(TEXTS)
    assert expected.shape == (3, 128)
    v1 = post(exact_run.server, f"/v1/models/{SERVED_NAME}:predict", {"instances": TEXTS})
    assert v1.status_code == 200, v1.text
    v2 = post(exact_run.server, f"/v2/models/{SERVED_NAME}/infer",
              {"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": TEXTS}]})
    assert v2.status_code == 200, v2.text
    (output,) = v2.json()["outputs"]
    assert output["shape"] == [3, 128]
    openai = post(exact_run.server, "/openai/v1/embeddings", {"model": SERVED_NAME, "input": TEXTS, "dimensions": 128})
    assert openai.status_code == 200, openai.text
    for vectors in (v1.json()["predictions"], np.reshape(output["data"], (3, 128)),
                    [d["embedding"] for d in openai.json()["data"]]):
        assert np.shape(vectors) == (3, 128)
        assert cosines(vectors, expected).min() >= EXACT
    for path in (f"/v1/models/{SERVED_NAME}:predict", "/openai/v1/embeddings"):
        assert post(exact_run.server, path, {"instances": TEXTS, "input": TEXTS}, key=False).status_code == 401


def test_metadata_limits_and_docs_follow_the_mounted_model(exact_run):
    url = exact_run.server.url
    meta = requests.get(f"{url}/v2/models/{SERVED_NAME}", headers=exact_run.server.headers(), timeout=30)
    assert meta.status_code == 200, meta.text
    assert meta.json()["outputs"][0]["shape"] == [-1, 128]
    wrong = post(exact_run.server, "/openai/v1/embeddings", {"model": SERVED_NAME, "input": "x", "dimensions": 384})
    assert wrong.status_code == 400 and "128" in wrong.json()["error"]["message"]
    long = post(exact_run.server, f"/v1/models/{SERVED_NAME}:predict", {"instances": ["many words " * 300]})
    assert long.status_code == 200
    assert long.headers["x-compute-tokens"] == "128" and long.headers["x-truncated-texts"] == "1"
    assert cosines(long.json()["predictions"], exact_run.reference.encode(["many words " * 300])).min() >= EXACT
    docs = requests.get(f"{url}/openapi.json", timeout=30).json()
    assert "128" in docs["info"]["title"] + docs["info"].get("description", "") + str(docs["components"])
    assert "all-MiniLM-L6-v2" not in json.dumps(docs), "an example names the bundled model, not the served one"
    too_long = post(exact_run.server, f"/v1/models/{SERVED_NAME}:predict", {"instances": ["x" * (MAX_CHARS + 1)]})
    assert too_long.status_code == 413 and "256" not in too_long.json()["error"], too_long.text
    assert requests.get(f"{url}/health", timeout=10).json()["model"] == SERVED_NAME


def test_probe_paths_answer_without_the_key(exact_run, container):
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        response = requests.get(exact_run.server.url + container[kind]["httpGet"]["path"], timeout=10)
        assert response.status_code == 200, f"{kind}: {response.status_code} {response.text}"


def test_the_read_only_model_directory_is_left_as_it_was(exact_run, default_run):
    for run in (exact_run, default_run):
        post(run.server, f"/v1/models/{SERVED_NAME}:predict", {"instances": TEXTS}).raise_for_status()
        assert tree(run.model_dir) == run.model_tree


def test_default_backend_converts_the_read_only_model_into_cache_dir(default_run):
    from embedding_server.engine import export_cache

    response = post(default_run.server, f"/v1/models/{SERVED_NAME}:predict", {"instances": TEXTS})
    assert response.status_code == 200, response.text
    vectors, expected = np.array(response.json()["predictions"]), default_run.reference.encode(TEXTS)
    assert cosines(vectors, expected).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), np.linalg.norm(expected, axis=1), rtol=1e-2)
    assert "converting" in default_run.server.log()
    folder = export_cache.model_cache_dir(default_run.model_dir, default_run.cache_dir)
    assert (folder / "openvino" / "model.xml").is_file()
    assert [p.name for p in default_run.cache_dir.iterdir()] == [folder.name], "one folder per model, no leftovers"


def test_a_restart_reuses_the_conversion(default_run, container, tmp_path):
    args = served_args(container, default_run.model_dir)
    env = {name: default_run.server.env[name] for name in ("CACHE_DIR", "HOME")}
    again = start_server(tmp_path, env=env,
                         command=[*NO_FILE_OVERRIDES, sys.executable, "model.py", *args])
    try:
        assert post(again, f"/v1/models/{SERVED_NAME}:predict", {"instances": TEXTS}).status_code == 200
        assert "converting" not in again.log()
    finally:
        again.stop()


def test_resources_hold_a_first_start_that_converts_the_model(default_run, container):
    """The first start of a model converts it in the server's process: the memory limit must hold that peak."""
    from kubernetes.utils import parse_quantity

    post(default_run.server, f"/v1/models/{SERVED_NAME}:predict", {"instances": TEXTS}).raise_for_status()
    peak_mb, resident_mb = memory_mb(default_run.server, "VmHWM"), memory_mb(default_run.server, "VmRSS")
    resources = container["resources"]
    limit_mb = float(parse_quantity(resources["limits"]["memory"])) / 2**20
    request_mb = float(parse_quantity(resources["requests"]["memory"])) / 2**20
    measured = f"first start: peak {peak_mb:.0f} MB, resident {resident_mb:.0f} MB"
    assert resident_mb < request_mb <= limit_mb, measured
    assert limit_mb >= max(peak_mb, resident_mb + PEAK_GROWTH_MB), measured
    assert float(parse_quantity(resources["requests"]["cpu"])) >= 1
