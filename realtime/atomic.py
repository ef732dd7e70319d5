"""Atomic file writes: write a temp file in the target's folder, fsync it, then ``os.replace`` it.

A reader (or a crash) therefore sees either the old file or the complete new one under the final
name, never a half-written file. The temp lives in the same folder because ``os.replace`` is only
atomic within one file system. Temp names start with a dot and keep the target's suffix, so writers
that pick a format from the extension (OpenCV, FFmpeg, ``np.save``) behave as for the real name.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np


def temp_sibling(path: str | os.PathLike[str]) -> Path:
    """A fresh, not yet existing temp path next to ``path`` with the same suffix.

    ``out/video.mp4`` → ``out/.video.mp4.3f9a1c2e.tmp.mp4``.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; some file systems refuse fsync on a directory.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit(temp: str | os.PathLike[str], path: str | os.PathLike[str], fsync: bool = True) -> None:
    """Atomically move ``temp`` to ``path`` (replacing any old file).

    With ``fsync`` the data and the rename are flushed to disk first/after, so they also survive a
    power cut; without it the swap is still atomic for every process (a crash of this one cannot
    leave a partial file), at a fraction of the cost (an fsync is milliseconds).
    """
    temp, path = Path(temp), Path(path)
    if fsync:
        _fsync_file(temp)
    os.replace(temp, path)
    if fsync:
        _fsync_dir(path.parent)


def discard(temp: str | os.PathLike[str]) -> None:
    """Remove a temp file if it exists (after a failed write)."""
    Path(temp).unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike[str], fsync: bool = True) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success it replaces ``path``, on error it is removed.

    The temp does not exist yet: the caller creates it (so it gets the usual permissions).
    """
    temp = temp_sibling(path)
    try:
        yield temp
        commit(temp, path, fsync)
    except BaseException:
        discard(temp)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path, fsync) as temp:
        with open(temp, "xb") as f:
            f.write(data)


def save_json(path: str | os.PathLike[str], data, indent: int = 2, fsync: bool = True) -> None:
    """Write ``data`` as indented JSON (with a final newline) to ``path`` atomically, creating its folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(data, indent=indent) + "\n").encode(), fsync)


def save_png(path: str | os.PathLike[str], rgb: np.ndarray, fsync: bool = True) -> None:
    """Write an RGB image ((H, W, 3) uint8) or a grey one ((H, W) uint8) as a PNG, atomically."""
    if rgb.dtype != np.uint8 or not (rgb.ndim == 2 or (rgb.ndim == 3 and rgb.shape[2] == 3)):
        raise ValueError(f"save_png needs (H, W, 3) or (H, W) uint8, got {rgb.shape} {rgb.dtype}")
    bgr = rgb if rgb.ndim == 2 else np.ascontiguousarray(rgb[..., ::-1])  # OpenCV writes BGR
    ok, encoded = cv2.imencode(".png", bgr)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {rgb.shape} image as PNG for {path}")
    atomic_write_bytes(path, encoded.tobytes(), fsync)


def save_npy(path: str | os.PathLike[str], array: np.ndarray, fsync: bool = True) -> None:
    """Write ``array`` in NumPy's .npy format (no pickles), atomically."""
    with atomic_path(path, fsync) as temp:
        with open(temp, "xb") as f:
            np.save(f, np.asarray(array), allow_pickle=False)


def save_npz(path: str | os.PathLike[str], arrays: dict[str, np.ndarray], fsync: bool = True) -> None:
    """Write named arrays as an uncompressed .npz, atomically. Object arrays (pickles) are refused."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}  # names are free: "path" and "fsync" too
    for name, array in arrays.items():
        if array.dtype.hasobject:
            raise ValueError(f"save_npz: array {name!r} has dtype object, which would need pickle")
    with atomic_path(path, fsync) as temp:
        with open(temp, "xb") as f:
            np.savez(f, **arrays)
