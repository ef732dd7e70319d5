"""Readers for the licensed FLAME files (emica_spec.md §4.1), without chumpy and without running
arbitrary pickled code.

``generic_model.pkl`` is a Python-2 pickle whose arrays are chumpy ``Ch`` objects and whose
``J_regressor`` is a ``scipy.sparse`` matrix. A plain ``pickle.load`` would import chumpy (which
does not install on current Python/NumPy). Here a restricted unpickler maps chumpy and scipy.sparse
classes to small stand-ins that only record their pickled state, and refuses every other global
except NumPy's array reconstruction helpers. A chumpy ``Ch`` pickles through protocol 2's default
``__reduce_ex__`` (``NEWOBJ`` + ``BUILD``) with its ``__getstate__`` = ``__dict__`` minus the
``_parents``/``_cache`` weak dictionaries, so the array lives in the state under ``'x'``.

Every missing or malformed file raises :class:`~realtime.errors.AssetError` naming the file and
where it comes from.
"""

from __future__ import annotations

import codecs
import collections
import copyreg
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Optional

import numpy as np
import scipy.sparse

from realtime.errors import AssetError
from realtime.models.lbs import FLAME_PARENTS

try:  # NumPy >= 2 keeps the pickle helpers in numpy._core; NumPy 1.x pickles name numpy.core.
    from numpy._core import multiarray as _np_multiarray
except ImportError:  # pragma: no cover - NumPy 1.x
    from numpy.core import multiarray as _np_multiarray

FLAME_HINT = (
    "it comes from `bash download_assets.sh` (FLAME step; needs a free registration at "
    "flame.is.tue.mpg.de)"
)

_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _np_multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): _np_multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _np_multiarray.scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # bytes inside protocol-2 pickles
    ("copyreg", "_reconstructor"): copyreg._reconstructor,  # protocol 0/1 objects
    ("copy_reg", "_reconstructor"): copyreg._reconstructor,  # Python 2 spelling
    ("builtins", "object"): object,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "object"): object,  # Python 2 spellings (protocol < 3)
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


def _asset_error(path: Path | str, problem: str) -> AssetError:
    return AssetError(f"FLAME asset {path}: {problem}; {FLAME_HINT}.")


class _PickledState:
    """Stand-in for a foreign class: keeps only what the pickle stores (its BUILD state)."""

    source_class = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_PickledState":
        return object.__new__(cls)

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _ChumpyObject(_PickledState):
    pass


class _SparseMatrix(_PickledState):
    sparse_format = ""


class _AssetUnpickler(pickle.Unpickler):
    """Unpickler that resolves only NumPy arrays, chumpy objects and scipy.sparse matrices."""

    def __init__(self, file: BinaryIO):
        super().__init__(file, encoding="latin1")  # Python-2 str data of NumPy arrays
        self._stand_ins: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_GLOBALS:
            return _NUMPY_GLOBALS[(module, name)]
        if module == "chumpy" or module.startswith("chumpy."):
            return self._stand_in(module, name, _ChumpyObject, {})
        if module.startswith("scipy.sparse") and name in ("csc_matrix", "csr_matrix"):
            return self._stand_in(module, name, _SparseMatrix, {"sparse_format": name[:3]})
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    def _stand_in(self, module: str, name: str, base: type, extra: dict[str, str]) -> type:
        key = (module, name)
        if key not in self._stand_ins:
            attrs = {"source_class": f"{module}.{name}", **extra}
            self._stand_ins[key] = type(name, (base,), attrs)
        return self._stand_ins[key]


def _open(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise _asset_error(path, "file not found") from None
    except IsADirectoryError:
        raise _asset_error(path, "is a folder, not a file") from None
    except OSError as exc:
        raise _asset_error(path, f"cannot be opened ({exc.strerror})") from None


def _unpickle(file: BinaryIO, path: Path) -> Any:
    try:
        return _AssetUnpickler(file).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        raise _asset_error(path, f"is corrupt or not the expected pickle ({exc})") from None


def _chumpy_array(obj: _ChumpyObject, key: str, path: Path) -> np.ndarray:
    state = getattr(obj, "state", None)
    if not isinstance(state, dict) or not isinstance(state.get("x"), np.ndarray):
        raise _asset_error(
            path, f"entry '{key}' is a chumpy {obj.source_class} expression, not a stored array"
        )
    return state["x"]


def _sparse_to_dense(obj: _SparseMatrix, key: str, path: Path) -> np.ndarray:
    state = getattr(obj, "state", None)
    if not isinstance(state, dict):
        raise _asset_error(path, f"entry '{key}' is an empty sparse matrix")
    shape = state.get("_shape", state.get("shape"))
    try:
        parts = (np.asarray(state["data"]), np.asarray(state["indices"]), np.asarray(state["indptr"]))
        build = scipy.sparse.csc_matrix if obj.sparse_format == "csc" else scipy.sparse.csr_matrix
        matrix = build(parts, shape=tuple(int(n) for n in shape))
    except (KeyError, TypeError, ValueError) as exc:
        raise _asset_error(path, f"entry '{key}' is a malformed sparse matrix ({exc})") from None
    return np.asarray(matrix.toarray(), dtype=np.float32)


def read_flame_pkl(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read FLAME's ``generic_model.pkl`` without importing chumpy.

    Returns:
        Every array entry by key: chumpy objects → their stored ``x`` array (dtype kept), sparse
        matrices → dense float32, NumPy arrays as stored. Non-array entries (e.g. ``bs_style``)
        are left out.
    """
    path = Path(path)
    with _open(path) as file:
        content = _unpickle(file, path)
    if not isinstance(content, dict):
        raise _asset_error(path, f"holds a {type(content).__name__}, expected a dict of FLAME arrays")
    arrays: dict[str, np.ndarray] = {}
    for key, value in content.items():
        if isinstance(value, _ChumpyObject):
            arrays[key] = _chumpy_array(value, key, path)
        elif isinstance(value, _SparseMatrix):
            arrays[key] = _sparse_to_dense(value, key, path)
        elif isinstance(value, np.ndarray):
            arrays[key] = value
    return arrays


def _read_npy_object(path: Path) -> Any:
    """The Python object inside a pickled ``.npy`` (``np.save`` of a dict), loaded restrictively."""
    with _open(path) as file:
        try:
            version = np.lib.format.read_magic(file)
            if version == (1, 0):
                _, _, dtype = np.lib.format.read_array_header_1_0(file)
            elif version == (2, 0):
                _, _, dtype = np.lib.format.read_array_header_2_0(file)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except ValueError as exc:
            raise _asset_error(path, f"is not a .npy file ({exc})") from None
        if not dtype.hasobject:
            raise _asset_error(path, "holds a plain array, expected a pickled dict")
        array = _unpickle(file, path)
    if not isinstance(array, np.ndarray) or array.shape != ():
        raise _asset_error(path, "does not hold a single pickled object")
    return array.item()


def _check_shape(path: Path, key: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
    if array.shape != shape:
        raise _asset_error(path, f"'{key}' has shape {array.shape}, expected {shape}")


_LANDMARK_EMBEDDING_SHAPES = {
    "static_lmk_faces_idx": (51,),
    "static_lmk_bary_coords": (51, 3),
    "dynamic_lmk_faces_idx": (79, 17),
    "dynamic_lmk_bary_coords": (79, 17, 3),
    "full_lmk_faces_idx": (1, 68),
    "full_lmk_bary_coords": (1, 68, 3),
}


def read_landmark_embedding(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read DECA's ``landmark_embedding.npy`` (a pickled dict saved with ``np.save``).

    Returns:
        The six DECA arrays: ``*_faces_idx`` as int64, ``*_bary_coords`` as float32, with shapes
        static (51,), (51, 3); dynamic (79, 17), (79, 17, 3); full (1, 68), (1, 68, 3).
    """
    path = Path(path)
    content = _read_npy_object(path)
    if not isinstance(content, dict):
        raise _asset_error(path, f"holds a {type(content).__name__}, expected a dict")
    result: dict[str, np.ndarray] = {}
    for key, shape in _LANDMARK_EMBEDDING_SHAPES.items():
        if key not in content:
            raise _asset_error(path, f"has no '{key}'")
        dtype = np.int64 if key.endswith("faces_idx") else np.float32
        try:
            result[key] = np.asarray(content[key], dtype=dtype)
        except (TypeError, ValueError):
            raise _asset_error(path, f"'{key}' is not numeric") from None
        _check_shape(path, key, result[key], shape)
    return result


def read_mediapipe_embedding(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read ``mediapipe_landmark_embedding.npz``.

    Returns:
        ``lmk_face_idx`` (N,) int64, ``lmk_b_coords`` (N, 3) float32 and ``landmark_indices`` (N,)
        int64 (MediaPipe 468-mesh ids); N = 105 for the released file.
    """
    path = Path(path)
    with _open(path) as file:
        try:
            with np.load(file, allow_pickle=False) as npz:
                raw = {key: npz[key] for key in npz.files}
        except (ValueError, OSError, EOFError) as exc:
            raise _asset_error(path, f"is not a readable .npz archive ({exc})") from None
    result: dict[str, np.ndarray] = {}
    for key, dtype in (("lmk_face_idx", np.int64), ("lmk_b_coords", np.float32), ("landmark_indices", np.int64)):
        if key not in raw:
            raise _asset_error(path, f"has no '{key}'")
        result[key] = raw[key].astype(dtype)
    count = result["lmk_face_idx"].shape[0]
    _check_shape(path, "lmk_face_idx", result["lmk_face_idx"], (count,))
    _check_shape(path, "lmk_b_coords", result["lmk_b_coords"], (count, 3))
    _check_shape(path, "landmark_indices", result["landmark_indices"], (count,))
    return result


@dataclass
class ObjMesh:
    """A triangle mesh with texture coordinates, as PyTorch3D's ``load_obj`` returns it."""

    vertices: np.ndarray  # (V, 3) float32
    faces: np.ndarray  # (F, 3) int64, 0-based
    uvcoords: np.ndarray  # (T, 2) float32
    uvfaces: np.ndarray  # (F, 3) int64, 0-based rows of uvcoords per face corner


def _obj_index(token: str, count: int, path: Path, line_number: int) -> int:
    """OBJ index (1-based, or negative = relative to the end) → 0-based."""
    try:
        index = int(token)
    except ValueError:
        raise _asset_error(path, f"line {line_number}: bad index '{token}'") from None
    index = index - 1 if index > 0 else count + index
    if not 0 <= index < count:
        raise _asset_error(path, f"line {line_number}: index {token} out of range")
    return index


def _obj_numbers(tokens: list[str], count: int, path: Path, line_number: int) -> list[float]:
    try:
        numbers = [float(t) for t in tokens]
    except ValueError:
        raise _asset_error(path, f"line {line_number}: bad number") from None
    if len(numbers) != count:
        raise _asset_error(path, f"line {line_number}: expected {count} coordinates")
    return numbers


def read_obj(path: str | os.PathLike) -> ObjMesh:
    """Read a Wavefront OBJ with ``v``, ``vt`` and ``f v/vt`` lines (e.g. ``head_template.obj``).

    Polygons are fan-triangulated like PyTorch3D. Every face corner must carry a texture index.
    """
    path = Path(path)
    with _open(path) as file:
        try:
            text = file.read().decode("utf-8")
        except UnicodeDecodeError:
            raise _asset_error(path, "is not a text OBJ file") from None
    vertices: list[list[float]] = []
    uvcoords: list[list[float]] = []
    faces: list[list[int]] = []
    uvfaces: list[list[int]] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "v":
            vertices.append(_obj_numbers(parts[1:4], 3, path, line_number))
        elif parts[0] == "vt":
            uvcoords.append(_obj_numbers(parts[1:3], 2, path, line_number))
        if parts[0] != "f":
            continue
        corners = [corner.split("/") for corner in parts[1:]]
        if len(corners) < 3 or any(len(c) < 2 or not c[1] for c in corners):
            raise _asset_error(path, f"line {line_number}: faces need 'v/vt' corners")
        v_ids = [_obj_index(c[0], len(vertices), path, line_number) for c in corners]
        t_ids = [_obj_index(c[1], len(uvcoords), path, line_number) for c in corners]
        for k in range(1, len(corners) - 1):
            faces.append([v_ids[0], v_ids[k], v_ids[k + 1]])
            uvfaces.append([t_ids[0], t_ids[k], t_ids[k + 1]])
    if not faces:
        raise _asset_error(path, "has no faces")
    return ObjMesh(
        vertices=np.asarray(vertices, dtype=np.float32).reshape(-1, 3),
        faces=np.asarray(faces, dtype=np.int64),
        uvcoords=np.asarray(uvcoords, dtype=np.float32).reshape(-1, 2),
        uvfaces=np.asarray(uvfaces, dtype=np.int64),
    )


def nearest_resize_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source indices of PyTorch's ``F.interpolate(mode='nearest')``: floor(i · in/out), clamped.

    Returns:
        (out_size,) int64.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    index = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, in_size - 1)


def read_mask(path: str | os.PathLike, size: int = 256) -> np.ndarray:
    """Read a UV mask PNG like DECA: first (red) channel / 255, nearest-resized to ``size``².

    Returns:
        (size, size) float32.
    """
    import cv2

    path = Path(path)
    with _open(path) as file:
        data = np.frombuffer(file.read(), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise _asset_error(path, "is not a readable image")
    # OpenCV decodes colour as BGR(A); DECA reads RGB(A) and keeps channel 0, i.e. red.
    channel = image if image.ndim == 2 else image[:, :, 2]
    mask = channel.astype(np.float32) / 255.0
    rows = nearest_resize_indices(mask.shape[0], size)
    cols = nearest_resize_indices(mask.shape[1], size)
    return np.ascontiguousarray(mask[rows][:, cols])


def read_fixed_displacement(path: str | os.PathLike, size: int = 256) -> np.ndarray:
    """Read DECA's ``fixed_displacement_256.npy``.

    Returns:
        (size, size) float32.
    """
    path = Path(path)
    with _open(path) as file:
        try:
            array = np.load(file, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise _asset_error(path, f"is not a readable .npy array ({exc})") from None
    _check_shape(path, "fixed displacement", array, (size, size))
    return array.astype(np.float32)


@dataclass
class FlameAssets:
    """Everything the FLAME layer needs, as NumPy arrays (FLAME 2020: V = 5023, F = 9976)."""

    faces: np.ndarray  # (F, 3) int64
    v_template: np.ndarray  # (V, 3) float32
    shapedirs: np.ndarray  # (V, 3, 400) float32: 300 shape then 100 expression components
    posedirs: np.ndarray  # (V, 3, 36) float32, as stored in the pkl
    j_regressor: np.ndarray  # (5, V) float32
    parents: np.ndarray  # (5,) int64: [-1, 0, 1, 1, 1]
    lbs_weights: np.ndarray  # (V, 5) float32
    static_lmk_faces_idx: np.ndarray  # (51,) int64
    static_lmk_bary_coords: np.ndarray  # (51, 3) float32
    dynamic_lmk_faces_idx: np.ndarray  # (79, 17) int64
    dynamic_lmk_bary_coords: np.ndarray  # (79, 17, 3) float32
    full_lmk_faces_idx: np.ndarray  # (1, 68) int64
    full_lmk_bary_coords: np.ndarray  # (1, 68, 3) float32
    mediapipe_lmk_faces_idx: Optional[np.ndarray] = None  # (105,) int64
    mediapipe_lmk_bary_coords: Optional[np.ndarray] = None  # (105, 3) float32
    mediapipe_landmark_indices: Optional[np.ndarray] = None  # (105,) int64, MediaPipe mesh ids
    flame_model_path: Optional[Path] = None  # where the model came from, for error messages

    @property
    def num_vertices(self) -> int:
        return int(self.v_template.shape[0])


_FLAME_KEYS = ("f", "v_template", "shapedirs", "posedirs", "J_regressor", "kintree_table", "weights")


def _check_flame_model(path: Path, model: dict[str, np.ndarray]) -> None:
    for key in _FLAME_KEYS:
        if key not in model:
            raise _asset_error(path, f"has no '{key}' (not a FLAME model)")
    num_vertices = model["v_template"].shape[0]
    num_joints = len(FLAME_PARENTS)
    _check_shape(path, "v_template", model["v_template"], (num_vertices, 3))
    if model["shapedirs"].ndim != 3 or model["shapedirs"].shape[:2] != (num_vertices, 3):
        raise _asset_error(path, f"'shapedirs' has shape {model['shapedirs'].shape}, expected ({num_vertices}, 3, K)")
    _check_shape(path, "posedirs", model["posedirs"], (num_vertices, 3, 9 * (num_joints - 1)))
    _check_shape(path, "J_regressor", model["J_regressor"], (num_joints, num_vertices))
    _check_shape(path, "weights", model["weights"], (num_vertices, num_joints))
    _check_shape(path, "kintree_table", model["kintree_table"], (2, num_joints))
    faces = model["f"]
    if faces.ndim != 2 or faces.shape[1] != 3 or faces.size == 0:
        raise _asset_error(path, f"'f' has shape {faces.shape}, expected (F, 3)")
    if faces.min() < 0 or faces.max() >= num_vertices:
        raise _asset_error(path, "'f' indexes vertices that do not exist")
    # FLAME stores a large number as the root's parent; inferno replaces it with -1.
    parents = (-1, *(int(p) for p in model["kintree_table"][0, 1:]))
    if parents != FLAME_PARENTS:
        raise _asset_error(path, f"kinematic tree {list(parents)} is not FLAME's {list(FLAME_PARENTS)}")


def _check_face_ids(path: Path, key: str, ids: np.ndarray, num_faces: int) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= num_faces):
        raise _asset_error(path, f"'{key}' points at triangles the FLAME mesh does not have")



def load_flame_assets(
    flame_model_path: str | os.PathLike,
    lmk_embedding_path: str | os.PathLike,
    mediapipe_embedding_path: str | os.PathLike | None = None,
) -> FlameAssets:
    """Read and cross-check the FLAME model and its landmark embeddings.

    Args:
        flame_model_path: ``FLAME/geometry/generic_model.pkl``.
        lmk_embedding_path: ``FLAME/geometry/landmark_embedding.npy``.
        mediapipe_embedding_path: ``FLAME/geometry/mediapipe_landmark_embedding.npz``; EMICA's
            FLAME has the MediaPipe landmarks, DECA/EMOCA's does not.
    """
    model_path = Path(flame_model_path)
    model = read_flame_pkl(model_path)
    _check_flame_model(model_path, model)
    num_faces = model["f"].shape[0]

    lmk_path = Path(lmk_embedding_path)
    lmk = read_landmark_embedding(lmk_path)
    for key in ("static_lmk_faces_idx", "dynamic_lmk_faces_idx", "full_lmk_faces_idx"):
        _check_face_ids(lmk_path, key, lmk[key], num_faces)

    mediapipe: dict[str, Optional[np.ndarray]] = {"lmk_face_idx": None, "lmk_b_coords": None, "landmark_indices": None}
    if mediapipe_embedding_path is not None:
        mp_path = Path(mediapipe_embedding_path)
        mediapipe.update(read_mediapipe_embedding(mp_path))
        _check_face_ids(mp_path, "lmk_face_idx", mediapipe["lmk_face_idx"], num_faces)

    return FlameAssets(
        faces=model["f"].astype(np.int64),
        v_template=model["v_template"].astype(np.float32),
        shapedirs=model["shapedirs"].astype(np.float32),
        posedirs=model["posedirs"].astype(np.float32),
        j_regressor=model["J_regressor"].astype(np.float32),
        parents=np.asarray(FLAME_PARENTS, dtype=np.int64),
        lbs_weights=model["weights"].astype(np.float32),
        static_lmk_faces_idx=lmk["static_lmk_faces_idx"],
        static_lmk_bary_coords=lmk["static_lmk_bary_coords"],
        dynamic_lmk_faces_idx=lmk["dynamic_lmk_faces_idx"],
        dynamic_lmk_bary_coords=lmk["dynamic_lmk_bary_coords"],
        full_lmk_faces_idx=lmk["full_lmk_faces_idx"],
        full_lmk_bary_coords=lmk["full_lmk_bary_coords"],
        mediapipe_lmk_faces_idx=mediapipe["lmk_face_idx"],
        mediapipe_lmk_bary_coords=mediapipe["lmk_b_coords"],
        mediapipe_landmark_indices=mediapipe["landmark_indices"],
        flame_model_path=model_path,
    )
