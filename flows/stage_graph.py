"""The dvc.yaml stage graph as the flows see it, read through DVC's Python API.

Nothing here lists stages by hand: `load_graph(root)` asks DVC for every stage of the project
(matrix entries expanded, e.g. `train_transformer@2`), the commands DVC would run and the edges
DVC derives from deps/outs. `is_stale` and `commit` also go through DVC, so "up to date" means
exactly what `dvc status` / `dvc repro` mean by it, and a committed stage is one `dvc repro`
skips.

The graph is returned as plain data (`StageSpec`), so it can be shipped to Ray workers without
DVC objects.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from flexvar.errors import usage
from pipeline.common import file_lock


@dataclass(frozen=True)
class StageSpec:
    """One runnable stage: what to run, where, and which outputs DVC would clear first."""
    name: str                     # DVC addressing: "prepare", "train_transformer@2"
    group: str                    # the dvc.yaml stage it comes from: "train_transformer"
    cmds: tuple[str, ...]         # shell commands, run in order
    wdir: str                     # absolute working directory of the commands
    clean_outs: tuple[str, ...]   # absolute paths of non-persistent outs (removed before a fresh run)
    frozen: bool = False


@dataclass
class StageGraph:
    stages: dict[str, StageSpec]                                   # in DVC's order
    upstream: dict[str, set[str]] = field(default_factory=dict)    # stage -> stages it depends on

    def order(self) -> list[str]:
        """A topological order (dependencies first), stable with respect to dvc.yaml order."""
        done: list[str] = []
        seen: set[str] = set()

        def visit(name: str) -> None:
            if name in seen:
                return
            seen.add(name)
            for up in sorted(self.upstream[name], key=list(self.stages).index):
                visit(up)
            done.append(name)

        for name in self.stages:
            visit(name)
        return done

    def restrict(self, targets: list[str]) -> "StageGraph":
        """The sub-graph that `dvc repro TARGETS` would consider: the targets and all their ancestors.

        A target may be a stage addressing (`sample@d2-short`) or a dvc.yaml stage name
        (`train_transformer`, meaning all its matrix entries).
        """
        if not targets:
            return self
        keep: set[str] = set()
        todo = [n for n in self.stages for t in targets if n == t or self.stages[n].group == t]
        unknown = [t for t in targets if not any(n == t or self.stages[n].group == t for n in self.stages)]
        if unknown:
            raise usage("targets", f"unknown stage(s) {unknown}; dvc.yaml has "
                                   f"{sorted({s.group for s in self.stages.values()})}")
        while todo:
            n = todo.pop()
            if n not in keep:
                keep.add(n)
                todo.extend(self.upstream[n])
        return StageGraph({n: s for n, s in self.stages.items() if n in keep},
                          {n: set(u) & keep for n, u in self.upstream.items() if n in keep})


@contextlib.contextmanager
def _repo(root: Path):
    """DVC's Repo for `root`, with the working directory there (DVC resolves stage names and paths from it)."""
    from dvc.repo import Repo

    old = os.getcwd()
    os.chdir(root)
    repo = Repo(str(root))
    try:
        yield repo
    finally:
        repo.close()
        os.chdir(old)


def load_graph(root: str | Path) -> StageGraph:
    """Every pipeline stage of the DVC project at `root` and the edges between them."""
    with _repo(Path(root).resolve()) as repo:
        index = repo.index
        stages = [s for s in index.stages if getattr(s, "cmd", None)]   # pipeline stages, not .dvc files
        specs: dict[str, StageSpec] = {}
        for s in stages:
            cmds = (s.cmd,) if isinstance(s.cmd, str) else tuple(s.cmd)
            clean = tuple(str(Path(o.fs_path).resolve()) for o in s.outs if not o.persist)
            specs[s.addressing] = StageSpec(name=s.addressing, group=s.name.split("@")[0], cmds=cmds,
                                            wdir=str(Path(s.wdir).resolve()), clean_outs=clean,
                                            frozen=bool(s.frozen))
        upstream: dict[str, set[str]] = {n: set() for n in specs}
        for down, up in index.graph.edges:   # DVC's edges point from a stage to the stage it depends on
            if down.addressing in specs and up.addressing in specs:
                upstream[down.addressing].add(up.addressing)
        return StageGraph(specs, upstream)


def stale(root: str | Path, names: list[str]) -> dict[str, bool]:
    """For each stage: does `dvc status` say it changed (deps, params, outs or command)?

    Read afresh from disk each call, so stages committed a moment ago count as up to date.
    Frozen stages are never stale (as in `dvc repro`).
    """
    with _repo(Path(root).resolve()) as repo:
        by_name = {s.addressing: s for s in repo.index.stages}
        with repo.lock:
            return {n: (not by_name[n].frozen) and bool(by_name[n].changed()) for n in names}


def _driver_lock(root: Path):
    """Serialises lockfile writes of concurrent flows on one project (DVC's own lock fails fast)."""
    return file_lock(root / ".dvc" / "tmp" / "flexvar-commit.lock")


def commit(root: str | Path, name: str) -> None:
    """Record a finished stage in dvc.lock and its outs in the DVC cache (`dvc commit -f NAME`)."""
    root = Path(root).resolve()
    with _driver_lock(root), _repo(root) as repo:
        repo.commit(name, force=True)
