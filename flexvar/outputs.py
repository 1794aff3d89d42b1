"""Paths checked before any work: inputs exist and are of the right kind, outputs are written whole or
not at all, and nothing that is not ours is ever deleted.

A command or stage calls `check_out_file` / `check_out_dir` before it loads a model or reads
data, so a bad `--out` costs nothing. A folder output is built in a temporary sibling and
renamed into place (`replace_dir`); the folder it replaces is deleted only if it carries the
marker this module writes into every folder it produces (or is empty). The project root, its
parents, and folders holding other files are refused with a one-line error naming the argument.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from flexvar.errors import usage

MARKER = ".flexvar-output"   # written into every folder replace_dir produces: "this folder is ours to replace"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def check_in_file(path: str | os.PathLike, arg: str) -> Path:
    """An input file that exists and is a file (not a folder)."""
    p = Path(path)
    if p.is_dir():
        raise usage(arg, f"{path} is a folder; give a file")
    if not p.is_file():
        raise usage(arg, f"{path} does not exist")
    return p


def check_in_dir(path: str | os.PathLike, arg: str, holds: str | None = None, hint: str = "") -> Path:
    """An input folder that exists (and holds the file `holds`, when given)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise usage(arg, f"{path} is a file; give a folder")
    if not p.is_dir():
        raise usage(arg, f"{path} does not exist" + (f"; {hint}" if hint else ""))
    if holds and not (p / holds).is_file():
        raise usage(arg, f"{path} has no {holds}" + (f"; {hint}" if hint else ""))
    return p


def _nearest_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_creatable(p: Path, arg: str, shown: str) -> None:
    """The missing part of `p` can be created: its nearest existing ancestor is a writable folder."""
    base = _nearest_existing(p.parent)
    if not base.is_dir():
        raise usage(arg, f"{shown}: {base} is a file, so no folder can be made inside it")
    try:   # a real write (not os.access): also right for root, read-only mounts and /proc
        fd, probe = tempfile.mkstemp(dir=base, prefix=".flexvar-write-probe-")
    except OSError as e:
        raise usage(arg, f"{shown}: cannot write in {base} ({e.strerror}); choose a writable location") from None
    os.close(fd)
    os.unlink(probe)


def check_out_file(path: str | os.PathLike, arg: str = "--out", suffixes: set[str] | None = None) -> Path:
    """A file to be written: not a folder, its folder creatable and writable, an allowed suffix."""
    shown, p = str(path), Path(path)
    if shown.endswith(os.sep) or p.is_dir():
        raise usage(arg, f"{shown} is a folder; give a file name, e.g. {p / 'out.png'}")
    if suffixes and p.suffix.lower() not in suffixes:
        raise usage(arg, f"{shown}: unsupported file type {p.suffix or '(none)'!r}; use one of "
                         f"{', '.join(sorted(suffixes))}")
    if p.exists() and not os.access(p, os.W_OK):
        raise usage(arg, f"{shown} exists and is not writable")
    _check_creatable(p, arg, shown)
    return p


def check_out_dir(path: str | os.PathLike, arg: str = "--out", root: str | os.PathLike | None = None,
                  replaces: bool = True) -> Path:
    """A folder this command may write: refuse the project root, its parents and files; when the command
    `replaces` the folder as a whole, also refuse one holding files this pipeline did not write."""
    shown, p = str(path), Path(path).resolve()
    root_p = Path(root or os.getcwd()).resolve()
    if p == root_p or p in root_p.parents:
        raise usage(arg, f"{shown} is the project folder or one of its parents; give a folder of its own "
                         f"(e.g. {Path('outputs') / 'run1'})")
    if p.exists() and not p.is_dir():
        raise usage(arg, f"{shown} is a file; give a folder")
    if replaces and p.is_dir() and not is_ours(p):
        raise usage(arg, f"{shown} holds files this pipeline did not write; give a new or empty folder "
                         f"(nothing was deleted)")
    _check_creatable(p, arg, shown)
    return p


def is_ours(folder: Path) -> bool:
    """Empty, or written by replace_dir / mark_ours (it carries the marker)."""
    return (folder / MARKER).is_file() or not any(folder.iterdir())


def mark_ours(folder: str | os.PathLike, what: str) -> None:
    """Mark a folder as produced by `what`, so a later run may replace it."""
    (Path(folder) / MARKER).write_text(f"{what}\n")


@contextlib.contextmanager
def replace_dir(path: str | os.PathLike, what: str, arg: str = "--out") -> Iterator[Path]:
    """Yield a temporary sibling of `path` to fill; on success it replaces `path`, on failure it is removed.

    `path` is checked first (check_out_dir); the previous folder is removed only after the new one is
    complete, and only because it is ours. Nothing half-written is ever left at `path`.
    """
    out = check_out_dir(path, arg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        yield tmp
        mark_ours(tmp, what)
        tmp.chmod(0o755)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.{os.getpid()}.old")
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
