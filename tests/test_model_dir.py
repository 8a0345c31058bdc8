"""Which directories the server serves: sentence-transformers models, checked before loading, refused in one line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from conftest import ROOT, TEST_KEY, cosines, free_port, start_server
from embedding_server.engine.model_dir import ModelDirError, check_model_dir

START_EXIT_TIMEOUT = 180  # a refused directory exits within seconds; an accepted one would start serving instead


def linked_copy(source: Path, target: Path) -> Path:
    """The bundled model's tree with its weights linked, not copied: for tests that only read it."""
    target.mkdir()
    for item in source.iterdir():
        if item.is_dir():
            linked_copy(item, target / item.name)
        elif item.suffix == ".safetensors":
            (target / item.name).symlink_to(item)
        else:
            (target / item.name).write_bytes(item.read_bytes())
    return target


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(change(data)))


def bad_directory(tmp_path: Path, model_path: str, kind: str) -> Path:
    """A directory the server must refuse, of one kind."""
    if kind == "missing":
        return tmp_path / "nothing-here"
    if kind == "file":
        path = tmp_path / "model.safetensors"
        path.write_bytes(b"not a directory")
        return path
    if kind == "empty":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty"
    copy = linked_copy(Path(model_path), tmp_path / kind)
    if kind == "transformers-only":
        (copy / "modules.json").unlink()
    elif kind == "modules-not-json":
        (copy / "modules.json").write_text("[{'type': oops")
    elif kind == "modules-wrong-shape":
        (copy / "modules.json").write_text(json.dumps({"0": "sentence_transformers.models.Transformer"}))
    elif kind == "module-outside":
        edit_json(copy / "modules.json", lambda m: [*m[:1], {**m[1], "path": "../../etc"}, *m[2:]])
    elif kind == "pooling-not-json":
        (copy / "1_Pooling" / "config.json").write_text("{garbage")
    elif kind == "no-transformer-config":
        (copy / "config.json").unlink()
    elif kind == "config-values-wrong":
        edit_json(copy / "config.json", lambda c: {**c, "hidden_size": "large", "num_hidden_layers": "six"})
    elif kind == "auto-map":
        edit_json(copy / "config.json", lambda c: {**c, "auto_map": {"AutoModel": "modeling_custom.CustomBert"}})
        (copy / "modeling_custom.py").write_text("raise SystemExit('model code ran')\n")
    elif kind == "custom-activation":
        (copy / "2_Dense").mkdir()
        (copy / "2_Dense" / "config.json").write_text(json.dumps(
            {"in_features": 384, "out_features": 384, "bias": True, "activation_function": "mymodule.Swish"}))
        edit_json(copy / "modules.json", lambda m: [*m[:2], {"idx": 2, "name": "2", "path": "2_Dense",
                                                            "type": "sentence_transformers.models.Dense"}])
    else:
        raise ValueError(kind)
    return copy


# What check_model_dir says about each: words of its one line.
REFUSED = {
    "missing": "does not exist",
    "file": "is a file, not a model directory",
    "empty": "is empty",
    "transformers-only": "without modules.json",
    "modules-not-json": "modules.json in the model directory",
    "modules-wrong-shape": "must be a non-empty list of modules",
    "module-outside": "outside the directory",
    "pooling-not-json": "1_Pooling/config.json in the model directory",
    "no-transformer-config": "has no config.json",
    "auto-map": "config.json has an auto_map",
    "custom-activation": "names the activation mymodule.Swish",
}


def test_the_bundled_model_and_the_variants_are_accepted_as_they_are(model_path, variant_model):
    assert check_model_dir(model_path) == check_model_dir(model_path, trust_remote_code=True)
    assert not check_model_dir(model_path).has_code
    for kind in ("cls", "dense128", "tiny"):
        assert not check_model_dir(str(variant_model(kind))).has_code


def test_a_train_script_nothing_names_is_not_code(tmp_path, model_path):
    """The hub's own all-MiniLM-L6-v2 ships train_script.py: a .py file that nothing imports never runs."""
    copy = linked_copy(Path(model_path), tmp_path / "with-script")
    (copy / "train_script.py").write_text("raise SystemExit('never imported')\n")
    assert not check_model_dir(str(copy)).has_code


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_a_directory_that_is_not_a_plain_sentence_transformers_model_is_refused(tmp_path, model_path, kind):
    with pytest.raises(ModelDirError, match=REFUSED[kind]) as raised:
        check_model_dir(str(bad_directory(tmp_path, model_path, kind)))
    assert "\n" not in str(raised.value)


def test_the_models_own_code_is_refused_unless_allowed(variant_model):
    path = str(variant_model("code"))
    with pytest.raises(ModelDirError, match=r"modules.json names flip.Flip.*TRUST_REMOTE_CODE=true"):
        check_model_dir(path)
    allowed = check_model_dir(path, trust_remote_code=True)
    assert allowed.has_code and allowed.code == ("modules.json names flip.Flip",)


# --- the server -------------------------------------------------------------------------------------------------

def start_and_expect_refusal(args: list[str], env: dict[str, str] | None = None,
                             entry: str = "model.py") -> subprocess.CompletedProcess:
    full_env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "API_KEY": TEST_KEY, "BACKEND": "torch",
                "PORT": str(free_port()), "GRPC_PORT": str(free_port()), **(env or {})}
    try:
        return subprocess.run([sys.executable, entry, *args], cwd=ROOT, env=full_env, capture_output=True,
                              text=True, timeout=START_EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server did not exit within {START_EXIT_TIMEOUT}s: it accepted {args}")


def assert_one_line_refusal(result: subprocess.CompletedProcess, *words: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-2000:]
    assert "Traceback" not in output, output[-4000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Configuration error: "), output[-2000:]
    for word in words:
        assert word in last


NOT_SENTENCE_TRANSFORMERS = ["missing", "file", "empty", "transformers-only", "modules-not-json",
                             "no-transformer-config", "config-values-wrong"]
CODE_IN_CONFIGS = ["auto-map", "custom-activation"]
# Runs each case's entry point main() in one process (one import of torch and KServe for all of them) and reports
# how each ended: a refusal is SystemExit with its one line, exactly what `python model.py` prints last and exits 1
# with. test_server_refuses_a_missing_directory_in_one_line runs one case as its own process, end to end.
REFUSALS_SCRIPT = """
import contextlib, io, json, sys
results = {}
for case in json.loads(sys.argv[1]):
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            entry = __import__(case["entry"].removesuffix(".py"))
            entry.main(case["args"])
        outcome = {"exit": None, "error": "main returned: the directory was accepted"}
    except SystemExit as exc:
        outcome = {"exit": exc.code if isinstance(exc.code, (str, int, type(None))) else repr(exc.code)}
    except BaseException as exc:
        outcome = {"exit": None, "error": repr(exc)}
    results[case["id"]] = {**outcome, "stdout": stdout.getvalue()}
json.dump(results, sys.__stdout__)
"""


@pytest.fixture(scope="module")
def refusals(tmp_path_factory, model_path, variant_model) -> dict[str, dict]:
    """Every refusal case of this module, started in one process: case id -> how main() ended."""
    cases, paths = [], {}
    for kind in NOT_SENTENCE_TRANSFORMERS[1:] + CODE_IN_CONFIGS:
        paths[kind] = bad_directory(tmp_path_factory.mktemp(kind), model_path, kind)
        flag = "--model_path" if kind in CODE_IN_CONFIGS else "--model_dir"
        cases.append({"id": kind, "entry": "model.py", "args": [f"{flag}={paths[kind]}"]
                      + ([] if kind in CODE_IN_CONFIGS else ["--model_name=other"])})
    code = variant_model("code")
    cases.append({"id": "own-module", "entry": "model.py", "args": [f"--model_dir={code}", "--model_name=other"]})
    cases.append({"id": "ray-own-module", "entry": "ray_serve.py", "args": [f"--model_dir={code}"]})
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "API_KEY": TEST_KEY, "BACKEND": "torch",
           "PORT": str(free_port()), "GRPC_PORT": str(free_port())}
    try:
        result = subprocess.run([sys.executable, "-c", REFUSALS_SCRIPT, json.dumps(cases)], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=START_EXIT_TIMEOUT * 2)
    except subprocess.TimeoutExpired:
        pytest.fail("a refusal case did not exit: the server accepted a directory it should refuse")
    assert result.returncode == 0, result.stderr[-4000:]
    outcomes = json.loads(result.stdout)
    for kind, path in paths.items():
        outcomes[kind]["path"] = str(path)
    return outcomes


def assert_refused(outcome: dict, *words: str) -> None:
    """main() ended in SystemExit with one "Configuration error: ..." line naming `words`, and nothing else."""
    assert "error" not in outcome, outcome
    message = outcome["exit"]
    assert isinstance(message, str) and message.startswith("Configuration error: "), outcome
    assert "\n" not in message.strip(), message
    for word in words:
        assert word in message, (word, message)


def test_server_refuses_a_missing_directory_in_one_line(tmp_path, model_path):
    path = bad_directory(tmp_path, model_path, "missing")
    result = start_and_expect_refusal([f"--model_dir={path}", "--model_name=other"])
    assert_one_line_refusal(result, str(path), REFUSED["missing"])


@pytest.mark.parametrize("kind", NOT_SENTENCE_TRANSFORMERS[1:])
def test_server_refuses_a_directory_that_is_not_a_sentence_transformers_model(refusals, kind):
    outcome = refusals[kind]
    assert_refused(outcome, outcome["path"], REFUSED.get(kind, "could not be loaded"))


def test_ray_front_end_refuses_the_same_directories_before_starting_ray(tmp_path, refusals):
    missing = start_and_expect_refusal([f"--model_dir={tmp_path / 'absent'}"], entry="ray_serve.py")
    assert_one_line_refusal(missing, "does not exist")
    code = refusals["ray-own-module"]
    assert_refused(code, "flip.Flip", "TRUST_REMOTE_CODE")
    assert "Ray instance" not in missing.stdout + code["stdout"]


@pytest.mark.parametrize("kind", CODE_IN_CONFIGS)
def test_server_refuses_code_in_the_model_configs_without_the_setting(refusals, kind):
    assert_refused(refusals[kind], REFUSED[kind], "TRUST_REMOTE_CODE")


def test_server_refuses_a_model_with_its_own_module_without_the_setting(refusals):
    outcome = refusals["own-module"]
    assert_refused(outcome, "flip.Flip", "TRUST_REMOTE_CODE=true")
    assert "model code ran" not in outcome["stdout"]


def test_trust_remote_code_runs_the_models_own_module(tmp_path, variant_model, reference):
    """Allowed, the model's own module runs in the server exactly as in sentence-transformers (on torch)."""
    from sentence_transformers import SentenceTransformer

    path = variant_model("code")
    server = start_server(tmp_path, env={"TRUST_REMOTE_CODE": "true", "PRECISION": "fp32", "HOME": str(tmp_path)},
                          args=[f"--model_dir={path}", "--model_name=other"])
    try:
        texts = ["The model's own module flips every vector.", "Code runs only when allowed."]
        response = requests.post(f"{server.url}/v1/models/other:predict", json={"instances": texts},
                                 headers=server.headers(), timeout=60)
        assert response.status_code == 200, response.text
        expected = SentenceTransformer(str(path), device="cpu", trust_remote_code=True).encode(texts)
        assert cosines(response.json()["predictions"], expected).min() >= 0.99999
        assert cosines(response.json()["predictions"], reference(texts)).max() <= -0.99999, "the flip did not run"
        assert "own code" in server.log()
    finally:
        server.stop()


def test_flag_and_variable_name_one_model_directory_and_the_last_flag_wins():
    from embedding_server.operations.settings import Settings
    from model import build_parser

    settings = Settings.from_env({"MODEL_PATH": "/from/env", "API_KEY": "k"})
    parser = build_parser(settings)
    assert parser.parse_args([]).model_path == "/from/env"
    assert parser.parse_args(["--model_dir=/mnt/models"]).model_path == "/mnt/models"
    assert parser.parse_args(["--model_path=/a", "--model_dir=/b"]).model_path == "/b"
    assert parser.parse_args(["--model_dir=/b", "--model_path=/a"]).model_path == "/a"
    assert parser.parse_args([]).trust_remote_code is False
    assert parser.parse_args(["--trust_remote_code"]).trust_remote_code is True
    assert build_parser(Settings.from_env({"TRUST_REMOTE_CODE": "true", "API_KEY": "k"})).parse_args(
        []).trust_remote_code is True
