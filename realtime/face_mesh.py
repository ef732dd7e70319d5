"""MediaPipe's canonical face mesh (468 vertices with triangles), read from the ``.task`` bundle.

The FaceLandmarker bundle is a zip that carries ``geometry_pipeline_metadata_landmarks.binarypb``,
a ``mediapipe.face_geometry.GeometryPipelineMetadata`` protobuf. The mediapipe wheel does not ship
the generated ``_pb2`` classes for it, so this module decodes the protobuf wire format itself.
Only the fields used here are read (see mediapipe/modules/face_geometry/protos/*.proto):

    GeometryPipelineMetadata { Mesh3d canonical_mesh = 1; ... }
    Mesh3d { VertexType vertex_type = 1; PrimitiveType primitive_type = 2;
             repeated float vertex_buffer = 3;     // x, y, z, u, v per vertex (VERTEX_PT)
             repeated uint32 index_buffer = 4; }   // 3 per triangle (TRIANGLE)

The canonical mesh lives in the same world frame as FLAME (types.py): centimetres, x toward
the subject's left (image right), y up, z toward the camera; its vertex ids are the landmark ids.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from realtime.errors import AssetError

DEFAULT_MODEL_PATH = Path(__file__).resolve().parent / "data" / "face_landmarker.task"
_METADATA_ENTRY = "geometry_pipeline_metadata_landmarks.binarypb"
_NUM_VERTICES = 468
_VERTEX_PT_FLOATS = 5

# Protobuf wire types.
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a base-128 varint at ``pos``; returns (value, next position)."""
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Yield (field number, wire type, value) for each field of one message.

    Varints come back as int; fixed32/fixed64 and length-delimited fields as raw bytes.
    """
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, pos = _read_varint(buf, pos)
            yield number, wire_type, value
            continue
        if wire_type == _LENGTH_DELIMITED:
            length, pos = _read_varint(buf, pos)
            end = pos + length
        elif wire_type == _FIXED32:
            end = pos + 4
        elif wire_type == _FIXED64:
            end = pos + 8
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        if end > len(buf):
            raise ValueError("truncated field")
        yield number, wire_type, buf[pos:end]
        pos = end


def _repeated_floats(values: list[tuple[int, int | bytes]]) -> np.ndarray:
    """A ``repeated float`` field, whether packed (one blob) or not (one fixed32 each)."""
    blob = b"".join(v for wt, v in values if wt in (_FIXED32, _LENGTH_DELIMITED))  # type: ignore[misc]
    return np.frombuffer(blob, dtype="<f4").astype(np.float32)


def _repeated_uint32(values: list[tuple[int, int | bytes]]) -> np.ndarray:
    """A ``repeated uint32`` field, whether packed (a blob of varints) or not (one varint each)."""
    out: list[int] = []
    for wire_type, value in values:
        if wire_type == _VARINT:
            out.append(value)  # type: ignore[arg-type]
        else:
            pos = 0
            while pos < len(value):  # type: ignore[arg-type]
                item, pos = _read_varint(value, pos)  # type: ignore[arg-type]
                out.append(item)
    return np.asarray(out, dtype=np.int64)


def parse_mesh3d(metadata: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Decode the canonical ``Mesh3d`` out of a serialized ``GeometryPipelineMetadata``.

    Returns:
        vertex_buffer (V, 5) float32 rows of x, y, z, u, v; index_buffer (F, 3) int64.
    """
    mesh = next((v for n, wt, v in _fields(metadata) if n == 1 and wt == _LENGTH_DELIMITED), None)
    if mesh is None:
        raise ValueError("no canonical_mesh field")
    by_field: dict[int, list[tuple[int, int | bytes]]] = {}
    for number, wire_type, value in _fields(mesh):  # type: ignore[arg-type]
        by_field.setdefault(number, []).append((wire_type, value))
    kinds = [v for wt, v in by_field.get(1, []) + by_field.get(2, []) if wt == _VARINT]
    if any(kinds):
        raise ValueError("mesh is not VERTEX_PT triangles")
    vertices = _repeated_floats(by_field.get(3, []))
    indices = _repeated_uint32(by_field.get(4, []))
    if vertices.size % _VERTEX_PT_FLOATS or indices.size % 3:
        raise ValueError("vertex or index buffer has a partial element")
    return vertices.reshape(-1, _VERTEX_PT_FLOATS), indices.reshape(-1, 3)


def canonical_face_mesh(model_path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MediaPipe's canonical face mesh from a FaceLandmarker ``.task`` bundle.

    Args:
        model_path: the ``.task`` file; default: the bundled ``realtime/data/face_landmarker.task``.

    Returns:
        vertices (468, 3) float32 in centimetres (x to image right, y up, z toward the camera);
        uv (468, 2) float32 texture coordinates in the OpenGL/FLAME convention (v = 1 at the top
        row of the texture image; MediaPipe stores v downward, so v is flipped here);
        triangles (F, 3) int32 (F = 898), counter-clockwise seen from the front.
    """
    path = Path(model_path) if model_path is not None else DEFAULT_MODEL_PATH
    if not path.is_file():
        raise AssetError(
            f"MediaPipe face model not found: {path}. Run download_assets.sh or pass the path of face_landmarker.task."
        )
    try:
        with zipfile.ZipFile(path) as bundle:
            metadata = bundle.read(_METADATA_ENTRY)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise AssetError(
            f"{path} is not a MediaPipe FaceLandmarker bundle ({exc}). Use Google's face_landmarker.task (float16, v1)."
        ) from exc
    try:
        vertex_buffer, index_buffer = parse_mesh3d(metadata)
    except ValueError as exc:
        raise AssetError(f"{path}: cannot read {_METADATA_ENTRY} ({exc}). Re-download face_landmarker.task.") from exc
    if len(vertex_buffer) != _NUM_VERTICES or index_buffer.size == 0 or index_buffer.max() >= _NUM_VERTICES:
        raise AssetError(
            f"{path}: the canonical mesh has {len(vertex_buffer)} vertices and indices up to "
            f"{index_buffer.max(initial=-1)}; expected {_NUM_VERTICES} vertices. Re-download face_landmarker.task."
        )
    vertices = np.ascontiguousarray(vertex_buffer[:, :3])
    uv = np.stack([vertex_buffer[:, 3], 1.0 - vertex_buffer[:, 4]], axis=1).astype(np.float32)
    # MediaPipe already stores the triangles counter-clockwise seen from +z (888 of 898 face the
    # camera; the other 10 are under the nose and the upper lip, facing down), so they are returned as is.
    return vertices, uv, index_buffer.astype(np.int32)
