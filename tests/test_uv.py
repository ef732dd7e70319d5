"""Static UV rasterisation, world2uv, DECA's dense grid and detail normals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from realtime.models.flame import FLAME
from realtime.models.flame_assets import load_flame_assets, read_fixed_displacement, read_mask, read_obj
from realtime.models.lbs import vertex_face_incidence
from realtime.models.uv import build_uv_rasterization, dense_grid_faces, displacement_to_normals, world2uv
from tests.synthetic_flame import write_synthetic_flame


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory):
    paths = write_synthetic_flame(tmp_path_factory.mktemp("flame"), seed=2)
    mesh = read_obj(paths["head_template"])
    raster = build_uv_rasterization(mesh.uvcoords, mesh.uvfaces, size=256)
    return paths, mesh, raster


def _texel_uv(size: int) -> tuple[np.ndarray, np.ndarray]:
    """UV of texel centres in DECA's layout: row 0 is v = 1, column 0 is u = 0 → (H, W) each."""
    centres = (np.arange(size) + 0.5) / size
    return np.meshgrid(centres, 1.0 - centres, indexing="xy")


def _reference_bary(uv: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Barycentrics of points in triangles, float64, by solving the 2×2 system: (N,2), (N,3,2) → (N,3)."""
    a, b, c = triangles[:, 0], triangles[:, 1], triangles[:, 2]
    m = np.stack([b - a, c - a], axis=-1)  # (N, 2, 2)
    w12 = np.linalg.solve(m, (uv - a)[..., None])[..., 0]
    return np.concatenate([1 - w12.sum(-1, keepdims=True), w12], axis=-1)


def test_small_layout_matches_brute_force_point_in_triangle():
    rng = np.random.default_rng(0)
    size = 24
    uvcoords = rng.uniform(0.0, 1.0, size=(30, 2)).astype(np.float32)
    uvfaces = np.stack([np.arange(0, 30, 3), np.arange(1, 30, 3), np.arange(2, 30, 3)], 1)
    raster = build_uv_rasterization(uvcoords, uvfaces, size=size)

    u, v = _texel_uv(size)
    points = np.stack([u.ravel(), v.ravel()], 1)
    expected = np.full(size * size, -1)
    expected_bary = np.zeros((size * size, 3))
    for face in range(len(uvfaces) - 1, -1, -1):  # lowest face index wins on overlaps
        tri = np.repeat(uvcoords[uvfaces[face]][None].astype(np.float64), len(points), 0)
        bary = _reference_bary(points, tri)
        inside = (bary > 1e-6).all(1)
        expected[inside] = face
        expected_bary[inside] = bary[inside]
    face_index = raster.face_index.numpy().ravel()
    assert (expected >= 0).sum() > 50  # the random layout covers a fair number of texels
    clear = np.ones_like(face_index, dtype=bool)  # ignore texels within 1e-6 of an edge
    for face in range(len(uvfaces)):
        tri = np.repeat(uvcoords[uvfaces[face]][None].astype(np.float64), len(points), 0)
        clear &= ~(np.abs(_reference_bary(points, tri)) < 1e-6).any(1)
    np.testing.assert_array_equal(face_index[clear], expected[clear])
    np.testing.assert_allclose(raster.bary.numpy().reshape(-1, 3)[clear], expected_bary[clear], atol=1e-5)


def test_orientation_row0_is_v1_and_col0_is_u0():
    # One small triangle in the top-left corner of the texture (u ≈ 0, v ≈ 1).
    uvcoords = np.array([[0.0, 1.0], [0.2, 1.0], [0.0, 0.8]], dtype=np.float32)
    raster = build_uv_rasterization(uvcoords, np.array([[0, 1, 2]]), size=20)
    covered = np.argwhere(raster.face_index.numpy() == 0)
    assert covered[:, 0].min() == 0 and covered[:, 1].min() == 0
    assert covered[:, 0].max() <= 3 and covered[:, 1].max() <= 3


def test_flame_layout_coverage(synthetic):
    _, mesh, raster = synthetic
    assert raster.face_index.shape == (256, 256) and raster.face_index.dtype == torch.int64
    covered = raster.face_index >= 0
    tri = mesh.uvcoords[mesh.uvfaces].astype(np.float64)
    edges1, edges2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    uv_area = 0.5 * np.abs(edges1[:, 0] * edges2[:, 1] - edges1[:, 1] * edges2[:, 0]).sum()
    # No overlaps in the layout: covered texels ≈ total UV area (edge texels make up the slack).
    assert abs(covered.float().mean().item() - uv_area) < 0.01
    bary = raster.bary[covered]
    assert bary.min() > 0
    torch.testing.assert_close(bary.sum(-1), torch.ones(len(bary)), atol=1e-4, rtol=0)
    assert torch.all(raster.bary[~covered] == 0)
    assert raster.dense_faces.shape == (130050, 3)


def test_world2uv_interpolates_vertex_positions(synthetic):
    _, mesh, raster = synthetic
    vertices = torch.from_numpy(mesh.vertices)[None]
    faces = torch.from_numpy(mesh.faces)
    uv_positions = world2uv(torch.cat([vertices, 2 * vertices], 0), faces, raster)
    assert uv_positions.shape == (2, 3, 256, 256)
    torch.testing.assert_close(uv_positions[1], 2 * uv_positions[0])

    face_index = raster.face_index.numpy()
    rows, cols = np.nonzero(face_index >= 0)
    u, v = _texel_uv(256)
    points = np.stack([u[rows, cols], v[rows, cols]], 1)
    hit = face_index[rows, cols]
    bary = _reference_bary(points, mesh.uvcoords[mesh.uvfaces[hit]].astype(np.float64))
    expected = (mesh.vertices[mesh.faces[hit]].astype(np.float64) * bary[..., None]).sum(1)
    actual = uv_positions[0].permute(1, 2, 0).numpy()[rows, cols]
    np.testing.assert_allclose(actual, expected, atol=1e-5)
    assert torch.all(uv_positions[0][:, face_index < 0] == 0)


def _deca_generate_triangles(h: int, w: int) -> np.ndarray:
    """DECA's util.generate_triangles, as written there, for reference."""
    triangles = []
    for x in range(w - 1):
        for y in range(h - 1):
            triangles.append([y * w + x, y * w + x + 1, (y + 1) * w + x])
            triangles.append([y * w + x + 1, (y + 1) * w + x + 1, (y + 1) * w + x])
    return np.array(triangles)[:, [0, 2, 1]]


def test_dense_grid_faces_match_deca():
    np.testing.assert_array_equal(dense_grid_faces(4, 6), _deca_generate_triangles(4, 6))
    np.testing.assert_array_equal(dense_grid_faces(7, 3), _deca_generate_triangles(7, 3))
    assert dense_grid_faces(256, 256).shape == (130050, 3)


def _plane(size: float = 0.8) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """A flat square facing +z whose UV equals its (x, y): vertices (1,V,3), faces, uvcoords."""
    ticks = np.linspace(0.1, 0.1 + size, 5)
    x, y = np.meshgrid(ticks, ticks, indexing="xy")
    uv = np.stack([x.ravel(), y.ravel()], 1).astype(np.float32)
    vertices = torch.from_numpy(np.concatenate([uv, np.zeros((len(uv), 1), np.float32)], 1))[None]
    quads = [(r * 5 + c, r * 5 + c + 1, (r + 1) * 5 + c, (r + 1) * 5 + c + 1) for r in range(4) for c in range(4)]
    faces = torch.tensor([[a, b, d] for a, b, c, d in quads] + [[a, d, c] for a, b, c, d in quads])
    return vertices, faces, uv


def test_displacement_ramp_tilts_detail_normals():
    vertices, faces, uv = _plane()
    size = 64
    raster = build_uv_rasterization(uv, faces.numpy(), size=size)
    covered = (raster.face_index >= 0).numpy()
    interior = covered.copy()  # texels whose whole 3×3 neighbourhood is on the plane
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            interior &= np.roll(np.roll(covered, dr, 0), dc, 1)
    assert interior.sum() > 1000

    u, _ = _texel_uv(size)
    slope = 0.3  # displacement along the coarse normal (+z) grows with x
    uv_z = torch.from_numpy((slope * u).astype(np.float32))[None, None]
    ones = torch.ones(1, 1, size, size)
    zero_fixed = torch.zeros(size, size)
    normals = displacement_to_normals(uv_z, vertices, faces, raster, ones, zero_fixed)
    assert normals.shape == (1, 3, size, size)
    expected = torch.tensor([-slope, 0.0, 1.0]) / np.sqrt(1 + slope**2)
    torch.testing.assert_close(normals[0].permute(1, 2, 0)[interior], expected.expand(int(interior.sum()), 3),
                               atol=1e-4, rtol=0)

    # Masked out, the predicted displacement has no effect; the fixed one is never masked.
    flat = displacement_to_normals(uv_z, vertices, faces, raster, torch.zeros_like(ones), zero_fixed)
    facing_camera = torch.tensor([0.0, 0.0, 1.0]).expand(int(interior.sum()), 3)
    torch.testing.assert_close(flat[0].permute(1, 2, 0)[interior], facing_camera, atol=1e-5, rtol=0)
    fixed = displacement_to_normals(torch.zeros_like(uv_z), vertices, faces, raster, torch.zeros_like(ones), uv_z[0, 0])
    torch.testing.assert_close(fixed[0][:, torch.from_numpy(interior)], normals[0][:, torch.from_numpy(interior)],
                               atol=1e-5, rtol=0)


def test_detail_normals_on_synthetic_flame(synthetic):
    paths, _, raster = synthetic
    assets = load_flame_assets(paths["flame_model"], paths["lmk_embedding"], paths["mediapipe_embedding"])
    flame = FLAME(assets)
    vertices = flame(torch.zeros(2, 300), torch.zeros(2, 100), torch.zeros(2, 3), torch.zeros(2, 3))["vertices"]
    mask = torch.from_numpy(read_mask(paths["uv_face_eye_mask"]))[None, None]
    fixed = torch.from_numpy(read_fixed_displacement(paths["fixed_displacement"]))
    incidence = vertex_face_incidence(flame.faces_tensor, assets.num_vertices)
    wrinkles = 0.0005 * torch.sin(torch.arange(256.0) / 6.0)  # smooth, like D_detail's output
    uv_z = wrinkles[None, None, :, None].expand(2, 1, 256, 256)
    normals = displacement_to_normals(uv_z, vertices, flame.faces_tensor, raster, mask, fixed, incidence)
    assert normals.shape == (2, 3, 256, 256) and torch.isfinite(normals).all()
    # The front of the face (centre of the texture) faces the camera (+z).
    centre = normals[0, :, 118:138, 118:138]
    assert (centre[2] > 0.5).float().mean() > 0.9
    torch.testing.assert_close(centre.norm(dim=0), torch.ones(20, 20), atol=1e-5, rtol=0)
