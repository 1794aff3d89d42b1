"""The project files a dvc.yaml stage's command imports, transitively, and whether its deps cover them.

Read from the source with `ast` (no import is executed): every `import`/`from ... import` of a
project package (flexvar, pipeline, flows) anywhere in a module — including imports inside
functions — plus the `__init__.py` of every package on the way. Used by tests/test_dvc_deps.py;
`python -m tests.import_closure` prints the stage -> closure -> deps table.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flexvar", "pipeline", "flows")


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """`a.b.c` -> a/b/c.py or a/b/c/__init__.py (relative to root), None if neither exists."""
    base = root.joinpath(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand.relative_to(root)
    return None


def _package_inits(name: str, root: Path) -> set[Path]:
    parts = name.split(".")
    return {f for i in range(1, len(parts)) if (f := module_file(".".join(parts[:i]), root))}


def imported_modules(file: Path, root: Path = ROOT) -> set[str]:
    """Project modules a file imports (`from a.b import c` counts a.b, and a.b.c when it is a module)."""
    tree = ast.parse((root / file).read_text(), str(file))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n.split(".")[0] in PACKAGES and module_file(n, root)}


def closure(module: str, root: Path = ROOT) -> set[Path]:
    """Every project file executing `python -m module` may import."""
    todo, seen = [module], set()
    files: set[Path] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        file = module_file(name, root)
        files |= {file} | _package_inits(name, root)
        todo.extend(imported_modules(file, root))
    return files


def stage_commands(root: Path = ROOT) -> dict[str, tuple[str, list[str]]]:
    """stage name -> (module its command runs with `python -m`, its deps as written in dvc.yaml)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, spec in stages.items():
        m = re.search(r"python -m ([\w.]+)", spec["cmd"])
        if m:
            out[name] = (m.group(1), [str(d) for d in spec.get("deps", [])])
    return out


def covered(file: Path, deps: list[str]) -> bool:
    """A dep covers a file when it is the file or a folder above it."""
    parts = file.parts
    return any(parts[:len(Path(d).parts)] == Path(d).parts for d in deps)


def uncovered(root: Path = ROOT) -> dict[str, list[str]]:
    """stage -> project files its command imports that no dep covers (empty lists: all covered)."""
    return {stage: sorted(str(f) for f in closure(module, root) if not covered(f, deps))
            for stage, (module, deps) in stage_commands(root).items()}


def table(root: Path = ROOT) -> str:
    """Markdown table: stage | files its command imports | code deps in dvc.yaml."""
    rows = ["| stage | imported project files | code deps in dvc.yaml |", "| --- | --- | --- |"]
    for stage, (module, deps) in stage_commands(root).items():
        files = sorted(str(f) for f in closure(module, root))
        code = [d for d in deps if d.split("/")[0] in PACKAGES]
        rows.append(f"| {stage} | {' '.join(files)} | {' '.join(code)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT))
    missing = {s: f for s, f in uncovered().items() if f}
    print("\nuncovered:", missing or "none")
