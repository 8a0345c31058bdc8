"""What the server accepts as a model directory: a sentence-transformers model, checked before anything loads it.

KServe's storage initializer puts whatever a ``storageUri`` names into ``/mnt/models``. A wrong URI, an empty
volume or a plain transformers checkpoint should stop the server at start with one line that says what is wrong,
not with a traceback from deep inside transformers, and a model that brings its own Python code should run only
when the operator said so.

Decisions:
- A directory without ``modules.json`` is refused, even when it holds a transformers model: sentence-transformers
  would silently build mean pooling for it, and the pooling and normalisation must be the model's own.
- Code runs from a model directory only when its configuration names it: a ``modules.json`` module outside
  sentence-transformers' own package, an ``auto_map`` in a config (transformers' custom classes), or a Dense
  activation that is not one of torch's. Those are refused unless ``TRUST_REMOTE_CODE`` allows them. A ``.py`` file
  that nothing names never runs (the hub's all-MiniLM-L6-v2 ships its ``train_script.py``), so it is not refused.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedding_server.operations.settings import SettingsError

logger = logging.getLogger(__name__)

ST_PACKAGE = "sentence_transformers."
ALLOW_CODE = "TRUST_REMOTE_CODE=true (or --trust_remote_code)"


class ModelDirError(SettingsError):
    """The model directory cannot be served; the message says why in one line."""


@dataclass(frozen=True)
class ModelDir:
    path: str
    code: tuple[str, ...]  # what in the directory would run Python code when loaded; empty for most models

    @property
    def has_code(self) -> bool:
        return bool(self.code)


def _read_json(file: Path, root: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"{file.relative_to(root)} in the model directory {root} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise ModelDirError(f"{file.relative_to(root)} in the model directory {root} cannot be read: "
                            f"{exc.strerror}") from None


def _modules(root: Path) -> list[dict[str, str]]:
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        if (root / "config.json").is_file():
            raise ModelDirError(
                f"{root} holds a transformers model without modules.json, so it is not a sentence-transformers model "
                "and its pooling and normalisation are unknown; save it with SentenceTransformer(...).save(path)")
        what = "is empty" if not any(root.iterdir()) else "has no modules.json"
        raise ModelDirError(f"{root} {what}: it is not a sentence-transformers model directory")
    modules = _read_json(modules_file, root)
    if not (isinstance(modules, list) and modules and all(
            isinstance(m, dict) and isinstance(m.get("type"), str) and isinstance(m.get("path"), str) for m in modules)):
        raise ModelDirError(f"modules.json in {root} must be a non-empty list of modules, each with a 'type' and a "
                            "'path'")
    for module in modules:
        folder = (root / module["path"]).resolve()
        if folder != root.resolve() and root.resolve() not in folder.parents:
            raise ModelDirError(f"modules.json in {root} names the folder {module['path']!r}, outside the directory")
    return modules


def _configs(root: Path, folder: Path) -> dict[str, Any]:
    """Every JSON file of one module's folder, parsed (a folder that does not exist holds none)."""
    if not folder.is_dir():
        return {}
    return {file.relative_to(root).as_posix(): _read_json(file, root) for file in sorted(folder.glob("*.json"))}


def _code_in(modules: list[dict[str, str]], configs: dict[str, Any]) -> list[str]:
    code = [f"modules.json names {m['type']}" for m in modules if not m["type"].startswith(ST_PACKAGE)]
    for name, config in configs.items():
        if not isinstance(config, dict):
            continue
        if config.get("auto_map"):
            code.append(f"{name} has an auto_map")
        activation = config.get("activation_function")
        if isinstance(activation, str) and not activation.startswith("torch."):
            code.append(f"{name} names the activation {activation}")
    return code


def check_model_dir(path: str, trust_remote_code: bool = False) -> ModelDir:
    """The directory as the server will load it, or ModelDirError saying in one line why it cannot be served."""
    root = Path(path)
    if not root.exists():
        raise ModelDirError(f"the model directory {path} does not exist")
    if not root.is_dir():
        raise ModelDirError(f"{path} is a file, not a model directory")
    if not os.access(root, os.R_OK | os.X_OK):
        raise ModelDirError(f"the model directory {path} cannot be read by this user (uid {os.getuid()})")
    modules = _modules(root)
    configs: dict[str, Any] = {}
    for module in modules:
        configs |= _configs(root, root / module["path"])
    for module in modules:
        if module["type"].endswith(".Transformer") and not (root / module["path"] / "config.json").is_file():
            raise ModelDirError(f"{root} lists a Transformer module in {module['path'] or 'the top folder'!r} but "
                                "that folder has no config.json")
    code = _code_in(modules, configs)
    if code and not trust_remote_code:
        raise ModelDirError(f"the model in {path} brings its own Python code, which loading it would run "
                            f"({'; '.join(code)}); set {ALLOW_CODE} only if you trust it")
    if code:
        logger.warning("running the model's own Python code (%s), as TRUST_REMOTE_CODE allows", "; ".join(code))
    return ModelDir(str(root), tuple(code))
