"""Checkpoints: written atomically, loaded with `weights_only=True`, checked against expectations.

A checkpoint is a plain dict of tensors and primitives (no pickled classes), so it loads safely
and survives code refactors. `kind` names what it holds ("tokenizer", "transformer", ...), and
`config` the exact model config it was built with.
"""
from __future__ import annotations

import hashlib
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flexvar.errors import FlexvarError


class CheckpointError(FlexvarError, RuntimeError):
    """A checkpoint that cannot be used: missing, corrupt, or not matching what the caller expects."""


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (hashlib.file_digest): identifies a checkpoint."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_atomic(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike, kind: str | None = None,
                    expect: dict[str, Any] | None = None, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint dict; raise CheckpointError naming the file and what is wrong.

    `kind` must equal the stored `kind`; each key of `expect` must equal the stored value at
    that key (e.g. {"config": cfg_dict}) — differing sub-keys are listed in the message.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the bytes are (an image, a text file), it is not a checkpoint
        first = (str(e).splitlines() or [""])[0].split(". ")[0][:160]
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch checkpoint ({type(e).__name__}: "
                              f"{first}); give a checkpoint this project wrote, or delete a corrupt one") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a dict")
    if kind is not None and ckpt.get("kind") != kind:
        raise CheckpointError(f"checkpoint {path} holds kind={ckpt.get('kind')!r}, expected {kind!r}")
    for key, want in (expect or {}).items():
        have = ckpt.get(key)
        if have != want:
            raise CheckpointError(f"checkpoint {path} does not match: {key} differs ({describe_diff(have, want)}); "
                                  f"delete the checkpoint or restore the settings it was made with")
    return ckpt


def describe_diff(have: Any, want: Any, prefix: str = "") -> str:
    """Human-readable list of differing keys between two nested dicts."""
    if isinstance(have, dict) and isinstance(want, dict):
        parts = []
        for k in sorted(set(have) | set(want), key=str):
            if have.get(k) != want.get(k):
                parts.append(describe_diff(have.get(k), want.get(k), f"{prefix}{k}."))
        return "; ".join(parts)
    return f"{prefix.rstrip('.') or 'value'}: checkpoint has {have!r}, settings say {want!r}"


def capture_rng() -> dict[str, Any]:
    """Every global RNG state as tensors/primitives (weights_only-loadable)."""
    np_state = np.random.get_state()
    state = {
        "python": repr(random.getstate()),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of capture_rng. The state may have been loaded onto a GPU (map_location): RNG states
    are host tensors, so every part is brought back to the CPU first."""
    import ast

    random.setstate(_to_tuple(ast.literal_eval(state["python"])))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
