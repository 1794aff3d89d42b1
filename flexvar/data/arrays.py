""".npy arrays written row block by row block and read back memory-mapped, with O(block) memory.

`NpyWriter` writes the standard .npy header for the final shape up front, then appends rows as
they come (to a file, or to a member of a .npz zip opened for writing), so a 50,000-image
samples.npz or a 1.28 M-image latent cache never exists in RAM. `npz_member_memmap` maps an
uncompressed .npz member (what np.savez and `NpyWriter` into a stored zip member produce)
read-only, so readers take random rows without loading the archive.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np


class NpyWriter:
    """Append rows of a (N, ...) array of known final shape to `f` (header first); `close` checks the count."""

    def __init__(self, f: BinaryIO, shape: tuple[int, ...], dtype, name: str = "array"):
        self.f, self.shape, self.dtype, self.name, self.rows = f, tuple(shape), np.dtype(dtype), name, 0
        np.lib.format.write_array_header_2_0(
            f, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape})

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:] or self.rows + len(rows) > self.shape[0]:
            raise ValueError(f"{self.name}: rows of shape {rows.shape} do not fit the declared {self.shape} "
                             f"after {self.rows} rows")
        self.f.write(rows.tobytes())
        self.rows += len(rows)

    def close(self) -> None:
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.name}: {self.rows} rows written, {self.shape[0]} declared")


class NpzWriter:
    """An uncompressed .npz built member by member; each member streamed with `NpyWriter`."""

    def __init__(self, path: str | os.PathLike):
        self.zf = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def member(self, name: str, shape: tuple[int, ...], dtype) -> tuple[NpyWriter, BinaryIO]:
        """(writer, stream) of member `name`.npy; close the stream (after writer.close()) before the next one."""
        stream = self.zf.open(f"{name}.npy", "w", force_zip64=True)
        return NpyWriter(stream, shape, dtype, name), stream

    def close(self) -> None:
        self.zf.close()


def npz_member_memmap(path: str | os.PathLike, name: str, mode: str = "r") -> np.ndarray:
    """Member `name` of an .npz as a memory map (stored members; mode 'r' read-only, 'c' copy-on-write);
    a compressed member is loaded instead."""
    path = Path(path)
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{name}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            with np.load(path) as npz:
                return npz[name]
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
            f.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            offset = f.tell()
    if fortran:
        raise ValueError(f"{path}: {name} is Fortran-ordered; expected C order")
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode=mode, offset=offset, shape=shape)
