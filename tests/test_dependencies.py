"""Every third-party package imported by flexvar/, pipeline/ and flows/ is declared in pyproject.toml."""
from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib

from tests.flows_support import ROOT

OURS = {"flexvar", "pipeline", "flows"}


def imported_top_level(folders=OURS) -> set[str]:
    mods: set[str] = set()
    for d in folders:
        for f in (ROOT / d).rglob("*.py"):
            for n in ast.walk(ast.parse(f.read_text())):
                if isinstance(n, ast.Import):
                    mods |= {a.name.split(".")[0] for a in n.names}
                elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
                    mods.add(n.module.split(".")[0])
    return {m for m in mods if m not in sys.stdlib_module_names and m not in OURS}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_package_is_declared():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = {_norm(re.split(r"[\[=<>~! ]", d, maxsplit=1)[0]) for d in deps}
    dists = md.packages_distributions()
    undeclared = {m: dists.get(m) for m in imported_top_level()
                  if not any(_norm(d) in declared for d in dists.get(m, [m]))}
    assert not undeclared, f"imported but not in pyproject.toml dependencies: {undeclared}"
    assert {"pyarrow", "psutil", "optuna"} <= declared
