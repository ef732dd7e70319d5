"""Per-frame outputs in inferno's layout (``inferno_apps/FaceReconstruction/utils/output.py``).

One folder per reconstructed face:

- video frames: ``<outfolder>/<frame_number:06d>_<k:03d>/`` with ``frame_number = Frame.index + 1``
  (ffmpeg's 1-based frame numbering, as inferno's extracted frames) and ``k = Face.index``;
- image folders (``Frame.name`` set): ``<outfolder>/<name><k:02d>/`` (inferno: ``<stem>00``).

Inside: ``geometry.png`` (224² RGB), ``inputs.png`` (the 224² input crop, image folders only),
the codes as float32 ``.npy`` files named like inferno's (``shape.npy`` ← ``shapecode`` …) and
``mesh_coarse.obj``. Unlike inferno, an existing folder is overwritten rather than skipped.

With ``save_codes``, :meth:`FrameOutputs.close` also writes ``<outfolder>/codes.npz``: one row per
written face, in write order, holding

- ``frame_index`` (N,) int64, the 0-based ``Frame.index`` (folder number minus one);
- ``face_index`` (N,) int64 ``k``; ``track_id`` (N,) int64; ``pts`` (N,) float64 seconds;
- ``crop_matrix`` (N, 2, 3), ``center`` (N, 2), ``size`` (N,) float64: the crop geometry;
- every code under its file name (``shape`` (N, 300), ``exp`` (N, 100), ``lightcode`` (N, 27) …)
  as float32. A face that lacks a code another face has gets a NaN-filled row for it;
- ``name`` (N,) str, only when the frames came from an image folder.

Every file is written atomically (:mod:`realtime.atomic`): a crash never leaves a partial file
under a final name. Only ``codes.npz`` is also fsynced; the per-face files skip it, because ~10 of
them per face at several ms per fsync would throttle a 30 fps run, and they can be regenerated.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from realtime.atomic import atomic_write_bytes, save_npy, save_npz, save_png
from realtime.crop import warp_affine
from realtime.errors import MediaError, UserError
from realtime.resume import start_over_hint
from realtime.sinks import Sink
from realtime.types import Frame, FrameResult, Reconstruction

CROP_SIZE = 224  # inferno's image_size: the crop the encoders see and geometry.png's size

# Model output key → inferno's per-sample file stem; any other key keeps its own name.
CODE_FILE_STEMS = {
    "shapecode": "shape",
    "expcode": "exp",
    "texcode": "tex",
    "jawpose": "jawpose",
    "globalpose": "globalpose",
    "cam": "cam",
    "lightcode": "lightcode",
    "detailcode": "detail",
}

RenderCrop = Callable[[Reconstruction], np.ndarray]


def sample_folder_name(frame: Frame, face_index: int) -> str:
    """inferno's folder name for face ``face_index`` of ``frame``: ``000001_000`` or ``<stem>00``."""
    if frame.name is not None:
        return f"{frame.name}{face_index:02d}"
    return f"{frame.index + 1:06d}_{face_index:03d}"


def code_file_stem(key: str) -> str:
    """``shapecode`` → ``shape`` etc.; unknown keys are kept."""
    return CODE_FILE_STEMS.get(key, key)


def code_array(key: str, value: np.ndarray) -> np.ndarray:
    """A code as inferno saves it: float32, the light code flattened to (27,)."""
    array = np.asarray(value, dtype=np.float32)
    return array.reshape(-1) if key == "lightcode" else array


def obj_text(vertices: np.ndarray, faces: np.ndarray) -> str:
    """An OBJ as inferno's ``write_obj`` with ``texture=None`` writes it.

    vertices: (V, 3) world positions → ``v x y z`` lines, each float32 printed by ``'{}'.format``
        as inferno does (numpy formats it as the exact float64 value, e.g. ``0.10000000149011612``).
    faces: (F, 3) 0-based → ``f c b a`` lines, 1-based with the winding reversed. No vt, no mtl.
    """
    # numpy formats a float32 through Python's float; .tolist() gives those floats directly (faster)
    v = np.asarray(vertices, np.float32).astype(np.float64).tolist()
    f = (np.asarray(faces, np.int64) + 1).tolist()
    lines = [f"v {x} {y} {z}" for x, y, z in v]
    lines += [f"f {c} {b} {a}" for a, b, c in f]
    return "\n".join(lines) + "\n"


class _CodeTable:
    """Rows of per-face metadata and codes, stacked into arrays for ``codes.npz``."""

    def __init__(self) -> None:
        self.meta: dict[str, list] = {k: [] for k in ("frame_index", "face_index", "track_id", "pts",
                                                      "crop_matrix", "center", "size", "name")}
        self.codes: list[dict[str, np.ndarray]] = []

    def add(self, frame: Frame, rec: Reconstruction, codes: dict[str, np.ndarray]) -> None:
        face = rec.face
        self.meta["frame_index"].append(frame.index)
        self.meta["face_index"].append(face.index)
        self.meta["track_id"].append(face.track_id)
        self.meta["pts"].append(frame.pts)
        self.meta["crop_matrix"].append(np.asarray(face.crop_matrix, np.float64).reshape(2, 3))
        self.meta["center"].append(face.center)
        self.meta["size"].append(face.size)
        self.meta["name"].append(frame.name)
        self.codes.append(codes)

    def load(self, path: Path, before_frame: int) -> None:
        """Take the rows of an earlier run's ``codes.npz`` for frames < ``before_frame`` (``--resume``)."""
        with np.load(path) as data:
            keep = data["frame_index"] < before_frame
            meta_keys = {"frame_index", "face_index", "track_id", "pts", "crop_matrix", "center", "size", "name"}
            for i in np.flatnonzero(keep):
                self.meta["frame_index"].append(int(data["frame_index"][i]))
                self.meta["face_index"].append(int(data["face_index"][i]))
                self.meta["track_id"].append(int(data["track_id"][i]))
                self.meta["pts"].append(float(data["pts"][i]))
                self.meta["crop_matrix"].append(data["crop_matrix"][i])
                self.meta["center"].append(tuple(data["center"][i]))
                self.meta["size"].append(float(data["size"][i]))
                self.meta["name"].append(str(data["name"][i]) if "name" in data.files else None)
                self.codes.append({k: data[k][i] for k in data.files if k not in meta_keys and not np.isnan(data[k][i]).all()})

    def arrays(self) -> dict[str, np.ndarray]:
        m = self.meta
        out = {
            "frame_index": np.asarray(m["frame_index"], np.int64),
            "face_index": np.asarray(m["face_index"], np.int64),
            "track_id": np.asarray(m["track_id"], np.int64),
            "pts": np.asarray(m["pts"], np.float64),
            "crop_matrix": np.asarray(m["crop_matrix"], np.float64).reshape(-1, 2, 3),
            "center": np.asarray(m["center"], np.float64).reshape(-1, 2),
            "size": np.asarray(m["size"], np.float64),
        }
        if any(name is not None for name in m["name"]):
            out["name"] = np.asarray([name or "" for name in m["name"]], dtype=str)
        shapes: dict[str, tuple[int, ...]] = {}
        for row in self.codes:
            for stem, value in row.items():
                if shapes.setdefault(stem, value.shape) != value.shape:
                    raise ValueError(f"code {stem!r} changes shape: {shapes[stem]} then {value.shape}")
        for stem, shape in shapes.items():
            stacked = np.full((len(self.codes), *shape), np.nan, np.float32)
            for i, row in enumerate(self.codes):
                if stem in row:
                    stacked[i] = row[stem]
            out[stem] = stacked
        return out


class FrameOutputs(Sink):
    """Write each reconstructed face's images, codes and mesh into inferno's folder layout.

    Args:
        outfolder: the results folder (created if missing).
        save_images: ``geometry.png`` per face (and ``inputs.png`` for image folders).
        save_codes: the codes as ``.npy`` per face, plus ``codes.npz`` for the whole run on close.
        save_mesh: ``mesh_coarse.obj`` per face.
        render_crop: ``rec -> (224, 224, 3) uint8`` drawing one face's geometry image in its crop.
            Without it, ``result.rendered`` (all faces, frame-sized) is warped into each face's crop.
    """

    def __init__(
        self,
        outfolder: str | os.PathLike[str],
        save_images: bool = True,
        save_codes: bool = False,
        save_mesh: bool = False,
        render_crop: RenderCrop | None = None,
    ):
        self.outfolder = Path(outfolder)
        self.save_images = save_images
        self.save_codes = save_codes
        self.save_mesh = save_mesh
        self.render_crop = render_crop
        self._table = _CodeTable()
        self._closed = False
        try:
            self.outfolder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MediaError(f"cannot write outputs to {self.outfolder}: {e.strerror or e}") from e

    def _geometry(self, result: FrameResult, rec: Reconstruction) -> np.ndarray:
        if self.render_crop is not None:
            image = np.asarray(self.render_crop(rec))
            if image.shape != (CROP_SIZE, CROP_SIZE, 3) or image.dtype != np.uint8:
                raise ValueError(f"render_crop must return (224, 224, 3) uint8, got {image.shape} {image.dtype}")
            return image
        if result.rendered is None:
            raise ValueError("saving geometry.png needs result.rendered or a render_crop callable")
        return warp_affine(result.rendered, rec.face.crop_matrix, CROP_SIZE)

    def _write_face(self, result: FrameResult, rec: Reconstruction) -> None:
        frame = result.frame
        folder = self.outfolder / sample_folder_name(frame, rec.face.index)
        folder.mkdir(exist_ok=True)
        if self.save_images:
            save_png(folder / "geometry.png", self._geometry(result, rec), fsync=False)
            if frame.name is not None:
                save_png(folder / "inputs.png", warp_affine(frame.image, rec.face.crop_matrix, CROP_SIZE), fsync=False)
        codes = {code_file_stem(k): code_array(k, v) for k, v in rec.codes.items()}
        if self.save_codes:
            for stem, array in codes.items():
                save_npy(folder / f"{stem}.npy", array, fsync=False)
            self._table.add(frame, rec, codes)
        if self.save_mesh:
            obj = obj_text(rec.vertices, rec.faces).encode()
            atomic_write_bytes(folder / "mesh_coarse.obj", obj, fsync=False)

    def resume(self, before_frame: int) -> None:
        """Continue an interrupted run: keep its ``codes.npz`` rows for frames < ``before_frame``.

        Raises:
            UserError: with ``save_codes``, the earlier ``codes.npz`` is missing or unreadable (the earlier
                frames' rows would be lost from the new one).
        """
        if not self.save_codes:
            return
        previous = self.outfolder / "codes.npz"
        start_over = start_over_hint(self.outfolder)
        if not previous.is_file():
            raise UserError(f"cannot resume: {previous} is missing, so the codes of frames 0-{before_frame - 1} are "
                            f"gone; {start_over}")
        try:
            self._table.load(previous, before_frame)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"cannot resume: {previous} is damaged ({e}); {start_over}") from e

    def write(self, result: FrameResult) -> None:
        """Write the outputs of every reconstructed face in ``result``."""
        if self._closed:
            raise ValueError(f"outputs to {self.outfolder} are closed")
        for rec in result.reconstructions:
            try:
                self._write_face(result, rec)
            except OSError as e:
                raise MediaError(f"cannot write outputs to {self.outfolder}: {e.strerror or e}") from e

    def close(self) -> None:
        """Write ``codes.npz`` (with ``save_codes``); later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        if self.save_codes:
            try:
                save_npz(self.outfolder / "codes.npz", self._table.arrays())
            except OSError as e:
                raise MediaError(f"cannot write {self.outfolder / 'codes.npz'}: {e.strerror or e}") from e
