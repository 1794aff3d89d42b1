"""Presets: partial params files under presets/ merged into params.yaml.

`flexvar preset smoke` deep-merges presets/smoke.yaml into params.yaml, keeping the file's
comments and order (ruamel round-trip), and validates the result before writing it.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from flexvar.config import ConfigError, load_params_dict
from flexvar.errors import one_line

PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets"


def available(presets_dir: Path = PRESETS_DIR) -> list[str]:
    return sorted(p.stem for p in presets_dir.glob("*.yaml"))


def _yaml() -> YAML:
    y = YAML()  # round-trip: keeps comments and key order
    y.preserve_quotes = True
    y.width = 120
    return y


SCHEDULE_SECTIONS = {("sample", "schedules"), ("sweep", "eval_panel")}   # their entries are named schedules


def deep_merge(base: Any, patch: Any, path: tuple[str, ...] = ()) -> Any:
    """Merge `patch` into `base` in place: mappings recurse, everything else is replaced — and so is a
    named schedule (an entry of sample.schedules or sweep.eval_panel), which is one unit written in one
    form: `{scales: [...]}` replaces `{preset: canonical}` instead of mixing with it."""
    if isinstance(base, dict) and isinstance(patch, dict) and path[:-1] not in SCHEDULE_SECTIONS:
        for k, v in patch.items():
            base[k] = (deep_merge(base[k], v, (*path, str(k)))
                       if k in base and isinstance(base[k], dict) and isinstance(v, dict) else v)
        return base
    return patch


def resolve(name_or_path: str, presets_dir: Path = PRESETS_DIR) -> Path:
    """A .yaml path as given, else presets/NAME.yaml of the project in the working directory, else ours."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    local = Path.cwd() / "presets" / f"{name_or_path}.yaml"
    path = local if local.is_file() else presets_dir / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"preset {name_or_path!r} not found; available: {', '.join(available(presets_dir))} "
                          f"(or give a path to a .yaml file)")
    return path


def apply_preset(name_or_path: str, params_path: str | os.PathLike = "params.yaml",
                 presets_dir: Path = PRESETS_DIR) -> Path:
    """Merge a preset into params.yaml; validation errors name the preset and key; returns the preset path."""
    preset_path = resolve(name_or_path, presets_dir)
    y = _yaml()
    params_path = Path(params_path)
    base = _load_yaml(y, params_path) if params_path.is_file() else {}
    patch = _load_yaml(y, preset_path) or {}
    merged = deep_merge(base if base is not None else {}, patch)
    load_params_dict(_plain(merged), origin=f"{params_path} after preset {preset_path.name}")
    buf = io.StringIO()
    y.dump(merged, buf)
    tmp = params_path.with_name(f".{params_path.name}.tmp")   # whole file or nothing
    tmp.write_text(buf.getvalue())
    tmp.replace(params_path)
    return preset_path


def _load_yaml(y: YAML, path: Path) -> Any:
    try:
        return y.load(path.read_text())
    except (YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML: {one_line(e)}") from None


def _plain(x: Any) -> Any:
    """ruamel's commented containers -> plain dict/list for pydantic."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x
