"""One results file per run: every face of every frame with its FLAME codes, crop and landmarks.

`ResultsWriter` collects rows (one per frame and face) and writes them on `close()` as .npz, .json or
.csv, atomically; `load_results` reads any of the three back into the same arrays. FLAME codes are
padded to FLAME 2020's full sizes (shape 300, expression 100, pose 15), so one loader drives FLAME
whichever model (EMICA, EMOCA, DECA) made the file. docs/export_format.md describes the layout.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .atomic import atomic_path
from .errors import MediaError, UserError
from .resume import start_over_hint
from .sinks import Sink
from .types import Face, FrameResult, Reconstruction

SCHEMA = "emica-realtime/results"
VERSION = 1
FORMATS = ("npz", "json", "csv")

FLAME_SHAPE, FLAME_EXPRESSION, FLAME_POSE = 300, 100, 15
# Slices of FLAME's full pose (15) = [global 3, neck 3, jaw 3, eyes 6]; neck and eyes are zero in
# EMICA/EMOCA/DECA, which predict only the global and jaw rotations.
POSE_SLICES = {"globalpose": slice(0, 3), "neckpose": slice(3, 6), "jawpose": slice(6, 9), "eyepose": slice(9, 15)}
# Model codes consumed by the padded FLAME fields, and the MediaPipe outputs a reconstruction may
# repeat in its codes (they are stored from the Face); neither is stored again as `code_<name>`.
FLAME_CODE_KEYS = ("shapecode", "expcode", "posecode", "cam", *POSE_SLICES)
FACE_CODE_KEYS = ("blendshapes", "transform")

MEDIAPIPE_LANDMARKS, BLENDSHAPES = 478, 52  # layouts used when a file has no rows to measure


@dataclass(frozen=True)
class Field:
    """One per-row column: its name, element dtype and per-row shape."""

    name: str
    dtype: str  # "int64" | "float64" | "float32" | "bool" | "str"
    shape: tuple[int, ...]


def face_records(result: FrameResult) -> list[tuple[Face, Optional[Reconstruction]]]:
    """Each face of a frame with its reconstruction (None where the model skipped it), by face index."""
    recs = {rec.face.index: rec for rec in result.reconstructions}
    records = [(face, recs.pop(face.index, None)) for face in result.faces]
    records += [(rec.face, rec) for rec in recs.values()]  # reconstructions whose face was not listed
    return sorted(records, key=lambda r: r[0].index)


def pad_code(code: np.ndarray, size: int, name: str) -> np.ndarray:
    """(n,) code → (size,) float32, zero-padded (FLAME's zero is the mean shape/expression)."""
    flat = np.asarray(code, dtype=np.float32).reshape(-1)
    if flat.size > size:
        raise ValueError(f"code {name!r} has {flat.size} values, more than FLAME's {size}")
    out = np.zeros(size, np.float32)
    out[: flat.size] = flat
    return out


def flame_pose(codes: dict[str, np.ndarray]) -> Optional[np.ndarray]:
    """FLAME's full (15,) pose from a model's pose codes; None when it predicts none.

    DECA-style `posecode` (6,) is [global 3, jaw 3]; separate `globalpose`/`jawpose`/`neckpose`/
    `eyepose` win over it.
    """
    if not any(k in codes for k in ("posecode", *POSE_SLICES)):
        return None
    pose = np.zeros(FLAME_POSE, np.float32)
    if "posecode" in codes:
        pc = np.asarray(codes["posecode"], np.float32).reshape(-1)
        pose[POSE_SLICES["globalpose"]] = pc[0:3]
        pose[POSE_SLICES["jawpose"]] = pc[3:6]
    for key, where in POSE_SLICES.items():
        if key in codes:
            pose[where] = np.asarray(codes[key], np.float32).reshape(-1)
    return pose


def flame_row(codes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The padded FLAME fields (shape, expression, pose, cam) a model's codes provide; NaN if absent."""
    nan = {"shape": FLAME_SHAPE, "expression": FLAME_EXPRESSION, "pose": FLAME_POSE, "cam": 3}
    row = {name: np.full(size, np.nan, np.float32) for name, size in nan.items()}
    if "shapecode" in codes:
        row["shape"] = pad_code(codes["shapecode"], FLAME_SHAPE, "shapecode")
    if "expcode" in codes:
        row["expression"] = pad_code(codes["expcode"], FLAME_EXPRESSION, "expcode")
    pose = flame_pose(codes)
    if pose is not None:
        row["pose"] = pose
    if "cam" in codes:
        row["cam"] = pad_code(codes["cam"], 3, "cam")
    return row


def float32_shortest(values: np.ndarray) -> np.ndarray:
    """float32 values as the float64 of their shortest decimal: same float32, short text.

    ``repr`` of the result prints e.g. ``0.1`` rather than ``0.10000000149011612`` (the exact double
    of float32(0.1)), and converting it back to float32 gives the original bits. Non-finite values
    and zeros are kept as they are.
    """
    f = np.asarray(values, dtype=np.float32)
    d = f.astype(np.float64)
    out = d.copy()
    todo = np.isfinite(d) & (d != 0)
    exponent = np.floor(np.log10(np.abs(np.where(todo, d, 1.0))))
    for digits in range(1, 10):  # 9 significant digits always identify a float32
        places = digits - 1 - exponent
        exact = todo & (np.abs(places) <= 22)  # 10**k is exact in float64 up to k = 22
        scale = 10.0 ** np.abs(np.where(exact, places, 0))
        cand = np.where(places >= 0, np.round(d * scale) / scale, np.round(d / scale) * scale)
        hit = exact & (cand.astype(np.float32) == f)
        out[hit] = cand[hit]
        todo &= ~hit
        if not todo.any():
            break
    return out


class ResultsWriter(Sink):
    """Collects one row per frame and face; `close()` writes the results file atomically.

    Args:
        path: the file to write; its folder is created if missing.
        fmt: "npz", "json" or "csv"; None takes it from the file suffix.
        model_name: the model that made the codes (stored in the file).
        fps: the input's frame rate (stored in the file).
        blendshape_names: MediaPipe's 52 names (default: `realtime.tracking.BLENDSHAPE_NAMES`).

    As every sink, `with ResultsWriter(...) as w:` closes (writes) even after an error in the block,
    so the frames processed so far are kept; a failure while writing leaves no file (and any older
    file at `path` untouched).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        fmt: Optional[str] = None,
        model_name: str = "",
        fps: float = 0.0,
        blendshape_names: Optional[Sequence[str]] = None,
    ):
        self.path = Path(path)
        suffix = self.path.suffix.lower().lstrip(".")
        self.fmt = fmt if fmt is not None else suffix
        if self.fmt not in FORMATS:
            shown = fmt if fmt is not None else f"the suffix {self.path.suffix or '(none)'!r} of {self.path}"
            raise UserError(f"results format must be npz, json or csv (got {shown}); name the file .npz, .json or .csv")
        if self.path.is_dir():
            example = self.path / f"results.{self.fmt}"
            raise UserError(f"results path {self.path} is a folder; give a file name such as {example}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MediaError(f"cannot create the folder for results file {self.path}: {e.strerror or e}") from e
        if not os.access(self.path.parent, os.W_OK):
            raise MediaError(f"cannot write results file {self.path}: its folder is not writable")
        if blendshape_names is None:
            from .tracking import BLENDSHAPE_NAMES  # here, so loading results never imports MediaPipe

            blendshape_names = BLENDSHAPE_NAMES
        self.model_name = model_name
        self.fps = float(fps)
        self.blendshape_names = list(blendshape_names)
        self._rows: list[dict[str, Any]] = []
        self._closed = False

    @property
    def rows(self) -> int:
        """Rows collected so far."""
        return len(self._rows)

    def write(self, result: FrameResult) -> None:
        """Add one row per face of the frame (frames without faces add nothing)."""
        if self._closed:
            raise ValueError(f"results file {self.path} is already closed")
        frame = result.frame
        for face, rec in face_records(result):
            codes = rec.codes if rec is not None else {}
            flame = flame_row(codes)
            row: dict[str, Any] = {
                "frame_index": frame.index,
                "pts": frame.pts,
                "track_id": face.track_id,
                "face_index": face.index,
                "has_flame": any(k in codes for k in FLAME_CODE_KEYS),
                **flame,
                "crop_matrix": np.asarray(face.crop_matrix, np.float64).reshape(2, 3),
                "center": np.asarray(face.center, np.float64).reshape(2),
                "size": float(face.size),
                "landmarks_mediapipe": np.asarray(face.landmarks, np.float32)[:, :2],
                "blendshapes": np.asarray(face.blendshapes, np.float32).reshape(-1),
                "transform": np.asarray(face.transform, np.float32).reshape(4, 4),
            }
            if frame.name is not None:
                row["name"] = frame.name
            if rec is not None and rec.landmarks is not None:
                row["landmarks_model"] = np.asarray(rec.landmarks, np.float32)[:, :2]
            for key, value in codes.items():
                if key not in FLAME_CODE_KEYS and key not in FACE_CODE_KEYS:
                    row[f"code_{key}"] = np.asarray(value, np.float32)
            self._rows.append(row)

    add = write  # the name issue 7 gives it; `write` is the Sink interface

    def resume(self, before_frame: int) -> None:
        """Continue an interrupted run (``--resume``): keep the rows of the file already at ``path`` for
        frames < ``before_frame``, so that ``close()`` writes every frame's rows, not only this run's.

        Raises:
            UserError: the earlier file is missing or unreadable (the earlier frames' rows would be lost).
        """
        if self._rows:
            raise ValueError("resume() comes before the first write()")
        start_over = start_over_hint(self.path.parent)
        if not self.path.is_file():
            raise UserError(f"cannot resume: {self.path} is missing, so the rows of frames 0-{before_frame - 1} "
                            f"are gone; {start_over}")
        try:
            data = load_results(self.path)
        except MediaError as err:
            raise UserError(f"cannot resume: {err}; {start_over}") from err
        fixed = {f.name for f in self._fields()}
        names = [k for k in data if k not in ("schema", "version", "model_name", "fps", "blendshape_names")]
        for i in np.flatnonzero(data["frame_index"] < before_frame):
            row: dict[str, Any] = {}
            for name in names:
                value = data[name][i]
                if name in fixed:
                    row[name] = value.item() if np.ndim(value) == 0 else value
                # An optional field is absent from a row where the file holds its filler ("" or all NaN).
                elif name == "name":
                    if str(value):
                        row[name] = str(value)
                elif not np.isnan(value).all():
                    row[name] = value
            self._rows.append(row)

    def close(self) -> None:
        """Write the file (once; later calls do nothing)."""
        if self._closed:
            return
        self._closed = True
        fields = self._fields()
        meta = {
            "schema": SCHEMA,
            "version": VERSION,
            "model_name": self.model_name,
            "fps": self.fps,
            "blendshape_names": self.blendshape_names,
        }
        columns = {f.name: _column(f, [row.get(f.name) for row in self._rows]) for f in fields}
        writer = {"npz": _write_npz, "json": _write_json, "csv": _write_csv}[self.fmt]
        try:
            with atomic_path(self.path) as temp:
                writer(temp, meta, fields, columns)
        except OSError as e:
            raise MediaError(f"cannot write results file {self.path}: {e.strerror or e}") from e

    def _fields(self) -> list[Field]:
        """The file's columns: the fixed ones, then the optional ones some row has."""
        first = self._rows[0] if self._rows else {}
        n_mp = len(first["landmarks_mediapipe"]) if first else MEDIAPIPE_LANDMARKS
        n_bs = len(first["blendshapes"]) if first else BLENDSHAPES
        fields = [
            Field("frame_index", "int64", ()),
            Field("pts", "float64", ()),
            Field("track_id", "int64", ()),
            Field("face_index", "int64", ()),
            Field("has_flame", "bool", ()),
            Field("shape", "float32", (FLAME_SHAPE,)),
            Field("expression", "float32", (FLAME_EXPRESSION,)),
            Field("pose", "float32", (FLAME_POSE,)),
            Field("cam", "float32", (3,)),
            Field("crop_matrix", "float64", (2, 3)),
            Field("center", "float64", (2,)),
            Field("size", "float64", ()),
            Field("landmarks_mediapipe", "float32", (n_mp, 2)),
            Field("blendshapes", "float32", (n_bs,)),
            Field("transform", "float32", (4, 4)),
        ]
        optional: dict[str, Field] = {}
        for row in self._rows:
            for name, value in row.items():
                if name == "name":
                    optional.setdefault(name, Field(name, "str", ()))
                elif name == "landmarks_model" or name.startswith("code_"):
                    f = optional.setdefault(name, Field(name, "float32", tuple(np.shape(value))))
                    if f.shape != np.shape(value):
                        raise ValueError(f"{name} changes shape between rows: {f.shape} then {np.shape(value)}")
        return fields + list(optional.values())


def _column(field: Field, values: list[Any]) -> np.ndarray:
    """Stack one field over the rows ((R, *shape)); rows without it get NaN (or "" for text)."""
    if field.dtype == "str":
        return np.array(["" if v is None else v for v in values], dtype=str).reshape(len(values))
    out = np.full((len(values), *field.shape), np.nan if field.dtype.startswith("float") else 0, dtype=field.dtype)
    for i, v in enumerate(values):
        if v is not None:
            out[i] = v
    return out


# ----------------------------------------------------------------------------- writers


def _write_npz(path: Path, meta: dict, fields: list[Field], columns: dict[str, np.ndarray]) -> None:
    arrays = {
        "schema": np.array(meta["schema"]),
        "version": np.array(meta["version"], np.int64),
        "model_name": np.array(meta["model_name"]),
        "fps": np.array(meta["fps"], np.float64),
        "blendshape_names": np.array(meta["blendshape_names"], dtype=str),
        **columns,
    }
    with open(path, "xb") as f:
        np.savez_compressed(f, **arrays)


def _text_values(field: Field, column: np.ndarray) -> list:
    """A column as Python values for JSON/CSV: float32 as shortest decimals, non-finite as None."""
    if field.dtype in ("float32", "float64"):
        values = float32_shortest(column) if field.dtype == "float32" else column.astype(np.float64)
        finite = np.isfinite(values)
        if not finite.all():
            values = np.where(finite, values, None)
        return values.tolist()
    if field.dtype == "bool":
        return column.astype(bool).tolist()
    return column.tolist()


def _meta_with_fields(meta: dict, fields: list[Field]) -> dict:
    return {**meta, "fields": {f.name: {"dtype": f.dtype, "shape": list(f.shape)} for f in fields}}


def _write_json(path: Path, meta: dict, fields: list[Field], columns: dict[str, np.ndarray]) -> None:
    values = {f.name: _text_values(f, columns[f.name]) for f in fields}
    n = len(next(iter(columns.values())))
    header = json.dumps(_meta_with_fields(meta, fields), separators=(",", ":"))
    with open(path, "x", encoding="utf-8") as f:
        f.write(header[:-1] + ',"rows":[\n')  # stream the rows: one compact row per line
        for i in range(n):
            row = {f_.name: values[f_.name][i] for f_ in fields}
            f.write(json.dumps(row, separators=(",", ":"), allow_nan=False))
            f.write(",\n" if i + 1 < n else "\n")
        f.write("]}\n")


def _column_names(field: Field) -> list[str]:
    """CSV header cells of a field: `pts`, `shape_0` … `shape_299`, `crop_matrix_0_0` …"""
    if not field.shape:
        return [field.name]
    return [field.name + "".join(f"_{i}" for i in idx) for idx in np.ndindex(*field.shape)]


def _csv_cells(field: Field, values: list) -> Iterator[list]:
    """Per row, the field's flattened cells ('' for missing numbers, 0/1 for booleans)."""
    for v in values:
        flat = np.asarray(v, dtype=object).reshape(-1).tolist()
        if field.dtype == "bool":
            yield [int(x) for x in flat]
        else:
            yield ["" if x is None else x for x in flat]


def _write_csv(path: Path, meta: dict, fields: list[Field], columns: dict[str, np.ndarray]) -> None:
    per_field = [list(_csv_cells(f, _text_values(f, columns[f.name]))) for f in fields]
    n = len(next(iter(columns.values())))
    with open(path, "x", encoding="utf-8", newline="") as f:
        f.write("# " + json.dumps(_meta_with_fields(meta, fields), separators=(",", ":")) + "\n")
        writer = csv.writer(f)
        writer.writerow([name for field in fields for name in _column_names(field)])
        for i in range(n):
            writer.writerow([cell for cells in per_field for cell in cells[i]])


# ----------------------------------------------------------------------------- reader


def load_results(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read a results file of any format.

    Returns:
        Per-row fields as (R, ...) arrays (see docs/export_format.md) plus the metadata
        `schema`, `version`, `model_name`, `fps` (0-d arrays) and `blendshape_names` (52,).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as e:
        raise MediaError(f"cannot read results file {path}: {e.strerror or e}") from e
    try:
        if head == b"PK":
            data = _read_npz(path)
        elif head.startswith(b"{"):
            data = _read_json(path)
        elif head == b"# ":
            data = _read_csv(path)
        else:
            raise MediaError(f"{path} is not an EMICA results file (.npz, .json or .csv written by ResultsWriter)")
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        raise MediaError(f"{path} is not a readable EMICA results file ({e})") from e
    if str(data.get("schema")) != SCHEMA:
        raise MediaError(f"{path} is not an EMICA results file (schema {str(data.get('schema'))!r}, expected {SCHEMA!r})")
    if int(data["version"]) > VERSION:
        raise MediaError(
            f"{path} has results format version {int(data['version'])}; "
            f"this emica-realtime reads up to {VERSION}: upgrade it"
        )
    return data


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _meta_arrays(meta: dict) -> dict[str, np.ndarray]:
    return {
        "schema": np.array(meta["schema"]),
        "version": np.array(meta["version"], np.int64),
        "model_name": np.array(meta["model_name"]),
        "fps": np.array(meta["fps"], np.float64),
        "blendshape_names": np.array(meta["blendshape_names"], dtype=str),
    }


def _typed(field: Field, values: list) -> np.ndarray:
    """Python values of one field over the rows → (R, *shape) array of the field's dtype."""
    if field.dtype == "str":
        return np.array(values, dtype=str).reshape(len(values))
    if field.dtype.startswith("float"):
        # None (missing) → NaN; the float64 of a shortest decimal rounds back to the same float32.
        return np.array(values, dtype=np.float64).reshape(len(values), *field.shape).astype(field.dtype)
    return np.array(values, dtype=field.dtype).reshape(len(values), *field.shape)


def _fields_of(meta: dict) -> list[Field]:
    return [Field(name, spec["dtype"], tuple(spec["shape"])) for name, spec in meta["fields"].items()]


def _read_json(path: Path) -> dict[str, np.ndarray]:
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    fields = _fields_of(doc)
    rows = doc["rows"]
    out = _meta_arrays(doc)
    for field in fields:
        out[field.name] = _typed(field, [row[field.name] for row in rows])
    return out


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    with open(path, encoding="utf-8", newline="") as f:
        meta = json.loads(f.readline()[2:])
        reader = csv.reader(f)
        header = next(reader)
        rows = list(reader)
    fields = _fields_of(meta)
    expected = [name for field in fields for name in _column_names(field)]
    if header != expected:
        raise ValueError("the CSV header does not match the fields listed on its first line")
    out = _meta_arrays(meta)
    start = 0
    for field in fields:
        width = math.prod(field.shape)
        cells = [row[start : start + width] for row in rows]
        start += width
        if field.dtype == "str":
            values = [c[0] for c in cells]
        elif field.dtype.startswith("float"):
            values = [[float(x) if x != "" else None for x in c] for c in cells]
        else:
            values = [[int(x) for x in c] for c in cells]
        out[field.name] = _typed(field, values)
    return out
