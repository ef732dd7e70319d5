"""Static UV-space geometry for detail mode (emica_spec.md §5.3).

DECA maps attributes into UV space with PyTorch3D every frame (``SRenderY.world2uv``), but the UV
layout of FLAME never changes, so which triangle covers each texel, and with which barycentric
weights, is computed once here. ``world2uv`` is then a gather plus a barycentric blend, and
``displacement_to_normals`` turns a predicted displacement map into DECA's detail normal map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from realtime.models.lbs import vertex_face_incidence, vertex_normals

_K_EPSILON = np.float32(1e-8)  # PyTorch3D's kEpsilon (zero-area test and barycentric denominator)


@dataclass
class UVRaster:
    """Which FLAME triangle covers each UV texel, plus the dense texel-grid mesh.

    Layout is DECA's: row 0 is v = 1, column 0 is u = 0.
    """

    face_index: torch.Tensor  # (H, W) int64, -1 where no triangle covers the texel centre
    bary: torch.Tensor  # (H, W, 3) float32 weights of the face's corners; 0 on empty texels
    dense_faces: torch.Tensor  # (2(H-1)(W-1), 3) int64: dense_grid_faces(H, W)
    dense_incidence: torch.Tensor  # (H·W, K) int64: vertex_face_incidence(dense_faces, H·W)

    def to(self, device: torch.device | str) -> "UVRaster":
        return UVRaster(*(t.to(device) for t in (self.face_index, self.bary, self.dense_faces, self.dense_incidence)))


def _edge(px: np.ndarray, py: np.ndarray, ax: np.ndarray, ay: np.ndarray, bx: np.ndarray, by: np.ndarray) -> np.ndarray:
    """PyTorch3D's ``EdgeFunctionForward(p, a, b)`` in float32."""
    return (px - ax) * (by - ay) - (py - ay) * (bx - ax)


def _pixel_centres_ndc(count: int) -> np.ndarray:
    """NDC of output pixel i in PyTorch3D (reversed axis: +X left, +Y up): 1 − (2i + 1)/S, float32."""
    flipped = count - 1 - np.arange(count)
    return (np.float32(-1.0) + (2 * flipped + 1).astype(np.float32) / np.float32(count)).astype(np.float32)


def build_uv_rasterization(uvcoords: np.ndarray, uvfaces: np.ndarray, size: int = 256) -> UVRaster:
    """Rasterise the UV layout once, reproducing PyTorch3D as DECA calls it in ``world2uv``.

    Derivation of the conventions:

    - DECA places UV vertex (u, v) at ``(2u − 1, 1 − 2v)`` (``uvcoords*2 − 1``, then y negated),
      and ``Pytorch3dRasterizer`` negates x and y before ``rasterize_meshes``, so PyTorch3D sees
      ``(1 − 2u, 2v − 1)``.
    - PyTorch3D's NDC has +X to the left and +Y up: output column c is at x = 1 − (2c + 1)/W and
      row r at y = 1 − (2r + 1)/H (pixel centres).
    - Equating the two: the texel centre (r, c) samples u = (c + 0.5)/W and v = 1 − (r + 0.5)/H,
      so column 0 is u = 0 and row 0 is v = 1.
    - A texel belongs to a face when all three barycentrics are > 0 (blur radius 0: edges and
      vertices exactly on the centre are outside); faces with |area| ≤ 1e-8 are skipped; all UV
      z are 1, so on overlaps the lowest face index wins (PyTorch3D keeps the first of equal z).
    - Barycentrics are PyTorch3D's, in float32: edge functions over (area + 1e-8).

    Args:
        uvcoords: (T, 2) texture coordinates in [0, 1].
        uvfaces: (F, 3) rows of ``uvcoords`` per face corner (same face order as the mesh).
        size: texture side (DECA: 256).

    Returns:
        The raster (on the CPU), with the dense grid mesh for :func:`displacement_to_normals`.
    """
    uv = np.asarray(uvcoords, dtype=np.float32)
    x = -(uv[:, 0] * np.float32(2.0) - np.float32(1.0))
    y = uv[:, 1] * np.float32(2.0) - np.float32(1.0)
    corners = np.asarray(uvfaces, dtype=np.int64)
    x0, x1, x2 = x[corners[:, 0]], x[corners[:, 1]], x[corners[:, 2]]
    y0, y1, y2 = y[corners[:, 0]], y[corners[:, 1]], y[corners[:, 2]]

    area = _edge(x0, y0, x1, y1, x2, y2)
    kept = np.flatnonzero(np.abs(area) > _K_EPSILON)
    x0, x1, x2, y0, y1, y2 = (a[kept] for a in (x0, x1, x2, y0, y1, y2))

    # Candidate texels: each face's bounding box (one texel of margin), inverted from the
    # pixel-centre formula above; the inside test below is what decides.
    def index_range(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        first = np.floor((size * (1.0 - hi.astype(np.float64)) - 1.0) / 2.0).astype(np.int64) - 1
        last = np.ceil((size * (1.0 - lo.astype(np.float64)) - 1.0) / 2.0).astype(np.int64) + 1
        return np.clip(first, 0, size - 1), np.clip(last, 0, size - 1)

    col_first, col_last = index_range(np.minimum(np.minimum(x0, x1), x2), np.maximum(np.maximum(x0, x1), x2))
    row_first, row_last = index_range(np.minimum(np.minimum(y0, y1), y2), np.maximum(np.maximum(y0, y1), y2))
    num_cols = col_last - col_first + 1
    counts = num_cols * (row_last - row_first + 1)
    candidate_face = np.repeat(np.arange(kept.size), counts)  # ascending face order
    offset = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    cols = col_first[candidate_face] + offset % num_cols[candidate_face]
    rows = row_first[candidate_face] + offset // num_cols[candidate_face]

    centres = _pixel_centres_ndc(size)
    px, py = centres[cols], centres[rows]
    fx0, fx1, fx2 = x0[candidate_face], x1[candidate_face], x2[candidate_face]
    fy0, fy1, fy2 = y0[candidate_face], y1[candidate_face], y2[candidate_face]
    denominator = _edge(fx2, fy2, fx0, fy0, fx1, fy1) + _K_EPSILON
    w0 = _edge(px, py, fx1, fy1, fx2, fy2) / denominator
    w1 = _edge(px, py, fx2, fy2, fx0, fy0) / denominator
    w2 = _edge(px, py, fx0, fy0, fx1, fy1) / denominator
    inside = np.flatnonzero((w0 > 0) & (w1 > 0) & (w2 > 0))

    texel = rows[inside] * size + cols[inside]
    texel, first = np.unique(texel, return_index=True)  # first hit = lowest face index
    winner = inside[first]
    face_index = np.full(size * size, -1, dtype=np.int64)
    face_index[texel] = kept[candidate_face[winner]]
    bary = np.zeros((size * size, 3), dtype=np.float32)
    bary[texel] = np.stack([w0[winner], w1[winner], w2[winner]], axis=1)

    dense_faces = torch.from_numpy(dense_grid_faces(size, size))
    return UVRaster(
        face_index=torch.from_numpy(face_index.reshape(size, size)),
        bary=torch.from_numpy(bary.reshape(size, size, 3)),
        dense_faces=dense_faces,
        dense_incidence=vertex_face_incidence(dense_faces, size * size),
    )


def world2uv(attributes: torch.Tensor, faces: torch.Tensor, raster: UVRaster) -> torch.Tensor:
    """Per-vertex attributes → UV map (DECA's ``SRenderY.world2uv``), as a gather and a blend.

    The corners of UV face f are the corners of mesh face f, so the texel's barycentrics blend
    the attributes of ``faces[f]``. (``uvfaces`` only matters when building the raster.)

    Args:
        attributes: (B, V, C) per-vertex values (positions, normals, ...).
        faces: (F, 3) int64 mesh faces.
        raster: from :func:`build_uv_rasterization`, on the same device.

    Returns:
        (B, C, H, W); zero on texels no triangle covers.
    """
    batch_size, _, channels = attributes.shape
    height, width = raster.face_index.shape
    corner_vertices = faces[raster.face_index.clamp(min=0)]  # (H, W, 3)
    values = attributes[:, corner_vertices.reshape(-1)].view(batch_size, height, width, 3, channels)
    # Empty texels have all-zero weights, so they come out as 0 like DECA's masked output.
    blended = (values * raster.bary.unsqueeze(-1)).sum(dim=3)  # (B, H, W, C)
    return blended.permute(0, 3, 1, 2)


def dense_grid_faces(height: int, width: int) -> np.ndarray:
    """Triangles of the texel grid, DECA's ``generate_triangles``.

    Grid vertex (row y, column x) is ``y·width + x``. Faces are listed column by column (outer
    loop over x, inner over y), two per quad, ``[i, i+1, i+w]`` and ``[i+1, i+w+1, i+w]``, with
    corners then reordered [0, 2, 1].

    Returns:
        (2(height−1)(width−1), 3) int64; 130,050 faces for 256².
    """
    x = np.arange(width - 1)[:, None]  # outer loop
    y = np.arange(height - 1)[None, :]  # inner loop
    top_left = y * width + x  # (W-1, H-1)
    first = np.stack([top_left, top_left + 1, top_left + width], axis=-1)
    second = np.stack([top_left + 1, top_left + width + 1, top_left + width], axis=-1)
    triangles = np.stack([first, second], axis=2).reshape(-1, 3)
    return np.ascontiguousarray(triangles[:, [0, 2, 1]]).astype(np.int64)


def displacement_to_normals(
    uv_z: torch.Tensor,
    vertices: torch.Tensor,
    faces: torch.Tensor,
    raster: UVRaster,
    uv_face_eye_mask: torch.Tensor,
    fixed_uv_dis: torch.Tensor,
    incidence: torch.Tensor | None = None,
) -> torch.Tensor:
    """Detail normal map from a UV displacement map (DECA's ``displacement2normal``).

    The coarse vertices and their normals go to UV space; the displacement (masked to face and
    eyes) plus DECA's fixed displacement pushes each texel along the coarse normal; the normals
    of that displaced texel-grid mesh are the detail normals.

    Args:
        uv_z: (B, 1, H, W) predicted displacement (D_detail output).
        vertices: (B, V, 3) coarse FLAME vertices (world space).
        faces: (F, 3) int64 FLAME faces.
        raster: from :func:`build_uv_rasterization`, same device.
        uv_face_eye_mask: (1, 1, H, W).
        fixed_uv_dis: (H, W) ``fixed_displacement_256.npy``.
        incidence: (V, K) ``vertex_face_incidence(faces, V)``; pass it to avoid rebuilding it.

    Returns:
        (B, 3, H, W) unit world-space normals in DECA's UV layout.
    """
    batch_size = uv_z.shape[0]
    height, width = raster.face_index.shape
    coarse_normals = vertex_normals(vertices, faces, incidence)
    uv_vertices = world2uv(vertices, faces, raster)
    uv_normals = world2uv(coarse_normals, faces, raster)
    uv_z = uv_z * uv_face_eye_mask
    detail = uv_vertices + uv_z * uv_normals + fixed_uv_dis[None, None] * uv_normals
    dense = detail.permute(0, 2, 3, 1).reshape(batch_size, -1, 3)
    normals = vertex_normals(dense, raster.dense_faces, raster.dense_incidence)
    return normals.view(batch_size, height, width, 3).permute(0, 3, 1, 2)
