"""The moderngl renderer on Mesa's EGL: coverage to the pixel, DECA's shading values, depth, detail."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from realtime.errors import UserError
from realtime.render import Renderer, vertex_normals
from realtime.types import Face, Reconstruction
from tests.fakes import fake_face

LIGHTS = np.array([[-1, 1, 1], [1, 1, 1], [-1, -1, 1], [1, -1, 1], [0, 0, 1]], dtype=np.float64)
LIGHTS /= np.linalg.norm(LIGHTS, axis=1, keepdims=True)


def deca_level(normal: np.ndarray) -> float:
    """DECA's geometry shade ×255 before truncation, computed in float64 from spec §5.2."""
    return 180.0 / 255.0 * np.mean(np.clip(LIGHTS @ normal, 0.0, 1.0) * 1.7) * 255.0


def make_face(crop_matrix: np.ndarray | None = None) -> Face:
    return fake_face() if crop_matrix is None else fake_face(crop_matrix=crop_matrix)


def pixel_affine(scale: float, cx: float, cy: float, flip_x: bool = False) -> np.ndarray:
    """world (y up, z toward camera) → frame pixels (y down), depth = −z (nearer is smaller)."""
    m = np.eye(4)
    m[0, 0] = -scale if flip_x else scale
    m[1, 1] = -scale
    m[2, 2] = -1.0
    m[0, 3], m[1, 3] = cx, cy
    return m


def quad(normal=(0.0, 0.0, 1.0), z: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Unit square [-1, 1]² in the plane through (0, 0, z) with the given normal, CCW toward it."""
    n = np.asarray(normal, np.float64)
    n /= np.linalg.norm(n)
    u = np.cross([0.0, 1.0, 0.0], n)
    u = u / np.linalg.norm(u) if np.linalg.norm(u) > 1e-9 else np.array([1.0, 0, 0])
    v = np.cross(n, u)
    corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    verts = np.array([a * u + b * v + [0, 0, z] for a, b in corners], np.float32)
    return verts, np.array([[0, 1, 2], [0, 2, 3]], np.int32)


def grid_quad(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """[-1, 1]² at z = 0 as an n×n grid: vertices, faces (CCW toward +z), uvcoords, uvfaces."""
    s = np.linspace(-1.0, 1.0, n + 1)
    xx, yy = np.meshgrid(s, s)
    verts = np.stack([xx.ravel(), yy.ravel(), np.zeros(xx.size)], 1).astype(np.float32)
    i = np.arange(n)[:, None] * (n + 1) + np.arange(n)[None, :]
    a, b, c, d = i.ravel(), i.ravel() + 1, i.ravel() + n + 2, i.ravel() + n + 1
    faces = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)]).astype(np.int32)
    uv = ((verts[:, :2] + 1.0) / 2.0).astype(np.float32)
    return verts, faces, uv, faces.copy()


def uv_sphere(n_lat: int, n_lon: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit sphere, outward CCW triangles: ~n_lat·n_lon vertices, ~2·n_lat·n_lon triangles."""
    theta = np.linspace(0, np.pi, n_lat + 1)[1:-1]
    phi = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    ring = np.stack([np.sin(t) * np.cos(p), np.cos(t), np.sin(t) * np.sin(p)], -1).reshape(-1, 3)
    verts = np.concatenate([[[0, 1, 0]], ring, [[0, -1, 0]]]).astype(np.float32)
    idx = 1 + np.arange(n_lat - 1)[:, None] * n_lon + np.arange(n_lon)[None, :]
    nxt = 1 + np.arange(n_lat - 1)[:, None] * n_lon + (np.arange(n_lon)[None, :] + 1) % n_lon
    tris = [np.stack([np.zeros(n_lon, int), nxt[0], idx[0]], 1)]
    for r in range(n_lat - 2):
        tris += [np.stack([idx[r], nxt[r], nxt[r + 1]], 1), np.stack([idx[r], nxt[r + 1], idx[r + 1]], 1)]
    last = len(verts) - 1
    tris.append(np.stack([np.full(n_lon, last), idx[-1], nxt[-1]], 1))
    return verts, np.concatenate(tris).astype(np.int32)


def rec(verts, faces, m, **kw) -> Reconstruction:
    return Reconstruction(face=make_face(), vertices=verts, faces=faces, world_to_frame=m, **kw)


@pytest.fixture(scope="module")
def renderer():
    r = Renderer()
    yield r
    r.close()


def test_square_covers_exact_pixels_with_deca_shade(renderer):
    verts, faces = quad()
    # Edges at half-integers: x 39.5..59.5, y 29.5..49.5 → pixel centres 40..59 × 30..49.
    image, mask = renderer.render(80, 100, [rec(verts, faces, pixel_affine(10.0, 49.5, 39.5))])
    assert image.shape == (80, 100, 3) and image.dtype == np.uint8
    assert mask.shape == (80, 100) and mask.dtype == np.uint8
    ys, xs = np.nonzero(mask)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (30, 49, 40, 59)
    assert len(ys) == 400 and set(np.unique(mask)) == {0, 255}
    expected = int(np.floor(deca_level(np.array([0.0, 0.0, 1.0]))))
    assert expected == 202  # spec §5.2: the frontal maximum
    assert (image[mask > 0] == expected).all()
    assert (image[mask == 0] == 0).all()


@pytest.mark.parametrize("normal", [(0.3, -0.5, 0.8), (-0.7, 0.3, 0.4), (0.1, 0.8, 0.3)])
def test_tilted_flat_square_matches_five_light_formula(renderer, normal):
    verts, faces = quad(normal)
    image, mask = renderer.render(64, 64, [rec(verts, faces, pixel_affine(12.0, 32.0, 32.0))])
    n = np.asarray(normal) / np.linalg.norm(normal)
    level = deca_level(n)
    assert 0.05 < level % 1.0 < 0.95  # not on a truncation edge, so float32 must agree exactly
    assert mask.sum() > 0
    assert (image[mask > 0] == int(np.floor(level))).all()


def test_vertex_normals_area_weighted_and_unit():
    # Two triangles sharing vertex 0: one in the z=0 plane (area 2), one in the x=0 plane (area 0.5).
    verts = np.array([[0, 0, 0], [2, 0, 0], [0, 2, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    faces = np.array([[0, 1, 2], [0, 3, 4]], np.int32)
    n = vertex_normals(verts, faces)
    expected0 = np.array([1.0, 0.0, 4.0]) / np.sqrt(17.0)  # 4·(0,0,1) + 1·(1,0,0)
    np.testing.assert_allclose(n[0], expected0, atol=1e-6)
    np.testing.assert_allclose(n[1], [0, 0, 1], atol=1e-6)
    np.testing.assert_allclose(n[3], [1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(n, axis=1), 1.0, atol=1e-6)


def test_sphere_brighter_at_centre_than_rim(renderer):
    verts, faces = uv_sphere(40, 48)
    image, mask = renderer.render(121, 121, [rec(verts, faces, pixel_affine(50.0, 60.0, 60.0))])
    assert image[60, 60, 0] in (201, 202)  # the normal there is interpolated, nearly (0, 0, 1)
    rim = image[60, 60 - 48 : 60 + 49][[0, -1], 0]
    assert mask[60, 12] == 255 and mask[60, 108] == 255
    assert (rim < 120).all() and (rim > 0).all()
    ys, xs = np.nonzero(mask)
    assert xs.min() >= 10 and xs.max() <= 110 and ys.min() >= 10 and ys.max() <= 110
    assert abs(len(ys) - np.pi * 50**2) < 0.02 * np.pi * 50**2  # a disc of radius 50 px


def test_nearer_quad_wins_in_either_order(renderer):
    far_v, far_f = quad((0, 0, 1), z=0.0)  # shade 202
    near_v, near_f = quad((0.1, 0.8, 0.3), z=0.0)  # tilted, different shade
    near_v = near_v * 0.5 + np.float32([0, 0, 3.0])  # in front (larger z → smaller depth)
    m = pixel_affine(10.0, 32.0, 32.0)
    far, near = rec(far_v, far_f, m), rec(near_v, near_f, m)
    near_level = int(np.floor(deca_level(np.array([0.1, 0.8, 0.3]) / np.linalg.norm([0.1, 0.8, 0.3]))))
    assert near_level != 202
    for order in ([far, near], [near, far]):
        image, mask = renderer.render(64, 64, order)
        assert image[32, 32, 0] == near_level
        assert image[32, 24, 0] == 202  # outside the small near quad
        assert image[32, 32, 0] != image[32, 24, 0]


def test_reflection_keeps_both_triangles(renderer):
    verts, faces = quad()
    m = pixel_affine(10.0, 49.5, 39.5, flip_x=True)
    assert np.linalg.det(m[:3, :3]) < 0
    image, mask = renderer.render(80, 100, [rec(verts, faces, m)])
    assert (mask > 0).sum() == 400  # both triangles, nothing culled
    assert (image[mask > 0] == 202).all()


def test_two_topologies_in_one_pass_and_buffers_reused(renderer):
    qv, qf = quad()
    gv, gf, _, _ = grid_quad(6)
    a = rec(qv, qf, pixel_affine(5.0, 19.5, 19.5))  # centres 15..24
    b = rec(gv, gf, pixel_affine(5.0, 49.5, 39.5))  # centres 45..54 × 35..44
    image, mask = renderer.render(60, 80, [a, b])
    assert (mask > 0).sum() == 200
    assert mask[15:25, 15:25].all() and mask[35:45, 45:55].all()
    assert (image[mask > 0] == 202).all()
    # A copied faces array (same content) reuses the cached buffers rather than building more.
    n_cached = len(renderer._coarse_meshes._by_content)
    image2, mask2 = renderer.render(60, 80, [rec(qv, qf.copy(), a.world_to_frame), b])
    assert len(renderer._coarse_meshes._by_content) == n_cached
    np.testing.assert_array_equal(image2, image)
    np.testing.assert_array_equal(mask2, mask)


def test_empty_list_gives_black_and_fresh_arrays(renderer):
    verts, faces = quad()
    image, mask = renderer.render(40, 40, [rec(verts, faces, pixel_affine(10.0, 20.0, 20.0))])
    blank, blank_mask = renderer.render(40, 40, [])
    assert not blank.any() and not blank_mask.any()
    assert image.any() and mask.any()  # the earlier result was not overwritten by the reused framebuffer


def test_detail_constant_geometric_normal_equals_coarse_and_tilt_changes_it(renderer):
    verts, faces, uv, uvf = grid_quad(8)
    # UVs inside the map: at its very edge grid_sample's zero padding (kept here) darkens the shade.
    uv = 0.25 + 0.5 * uv
    m = pixel_affine(20.0, 32.0, 32.0)
    coarse, coarse_mask = renderer.render(64, 64, [rec(verts, faces, m)])
    flat = np.zeros((32, 32, 3), np.float32)
    flat[..., 2] = 1.0
    detail, detail_mask = renderer.render(
        64, 64, [rec(verts, faces, m, detail_normals=flat, uvcoords=uv, uvfaces=uvf)], image_type="detail"
    )
    np.testing.assert_array_equal(detail_mask, coarse_mask)
    assert np.abs(detail.astype(int) - coarse.astype(int)).max() <= 1

    tilt = (np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])).astype(np.float32)
    tilted = np.broadcast_to(tilt, (32, 32, 3)).copy()
    changed, _ = renderer.render(64, 64, [rec(verts, faces, m, detail_normals=tilted, uvcoords=uv, uvfaces=uvf)])
    inside = coarse_mask > 0
    assert (changed[inside] == int(np.floor(deca_level(tilt.astype(np.float64))))).all()
    assert (changed[inside] != coarse[inside]).all()


def test_detail_map_layout_row0_is_v1(renderer):
    # Top half of the map (rows 0..15, v > 0.5) faces up-left, bottom half faces +z. With uv
    # following world x, y, the top of the square on screen must get the first normal.
    verts, faces, uv, uvf = grid_quad(4)
    up = np.array([-0.5, 0.5, 0.7071], np.float32)
    normals = np.zeros((32, 32, 3), np.float32)
    normals[:16] = up
    normals[16:] = [0.0, 0.0, 1.0]
    image, mask = renderer.render(
        64, 64, [rec(verts, faces, pixel_affine(20.0, 31.5, 31.5), detail_normals=normals, uvcoords=uv, uvfaces=uvf)]
    )
    assert image[15, 31, 0] == int(np.floor(deca_level(up.astype(np.float64))))
    assert image[47, 31, 0] == 202


def test_render_crop_through_crop_matrix(renderer):
    verts, faces = quad()
    # Frame → crop: scale 2, shift (−60, −40). The square spans frame x, y 39.75..59.75, 29.75..49.75.
    crop = np.array([[2.0, 0.0, -60.0], [0.0, 2.0, -40.0]])
    r = Reconstruction(make_face(crop), verts, faces, pixel_affine(10.0, 49.75, 39.75))
    image = renderer.render_crop(r, image_size=96)
    assert image.shape == (96, 96, 3)
    ys, xs = np.nonzero(image[..., 0])
    # crop x = 2·(49.75 ± 10) − 60 = 19.5 .. 59.5 → centres 20..59; y = 2·(39.75 ± 10) − 40 = 19.5..59.5
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (20, 59, 20, 59)
    assert (image[20:60, 20:60] == 202).all()


def test_user_errors(renderer):
    verts, faces = quad()
    r = rec(verts, faces, pixel_affine(10.0, 20.0, 20.0))
    with pytest.raises(UserError, match="unknown image type 'normals'"):
        renderer.render(40, 40, [r], image_type="normals")
    with pytest.raises(UserError, match="5000x40 frame.*downscale"):
        renderer.render(40, 5000, [r])
    with pytest.raises(UserError, match="detail normals"):
        renderer.render(40, 40, [r], image_type="detail")


def test_other_thread_is_refused(renderer):
    errors: list[BaseException] = []

    def worker():
        try:
            renderer.render(8, 8, [])
        except BaseException as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
    assert "render thread" in str(errors[0])


def test_time_640x480_flame_sized_mesh(renderer):
    verts, faces = uv_sphere(70, 72)  # 4,972 vertices, 9,936 triangles: FLAME has 5,023 / 9,976
    m = pixel_affine(200.0, 320.0, 240.0)
    r = rec(verts, faces, m)
    renderer.render(480, 640, [r])  # warm-up: buffers, framebuffer
    n = 20
    t0 = time.perf_counter()
    for _ in range(n):
        image, mask = renderer.render(480, 640, [r])
    ms = (time.perf_counter() - t0) / n * 1e3
    t0 = time.perf_counter()
    for _ in range(n):
        vertex_normals(verts, faces)
    normals_ms = (time.perf_counter() - t0) / n * 1e3
    print(f"\nrender 640x480, {len(verts)} verts / {len(faces)} tris: {ms:.2f} ms incl. readback "
          f"(vertex normals {normals_ms:.2f} ms)")
    assert mask.any()


def test_detail_sampling_matches_torch_grid_sample(renderer):
    """DECA samples the normal map with grid_sample(bilinear, zeros padding, align_corners=False)."""
    torch = pytest.importorskip("torch")
    verts, faces, uv, uvf = grid_quad(4)
    rng = np.random.default_rng(3)
    coarse_noise = rng.normal(size=(6, 6, 3))
    # A smooth random normal map, 24×24, biased toward +z and normalised.
    up = np.kron(coarse_noise, np.ones((4, 4, 1)))[:24, :24] * 0.4 + [0.0, 0.0, 1.0]
    normals = (up / np.linalg.norm(up, axis=2, keepdims=True)).astype(np.float32)
    s, c = 30.0, 35.0
    image, mask = renderer.render(
        70, 70, [rec(verts, faces, pixel_affine(s, c, c), detail_normals=normals, uvcoords=uv, uvfaces=uvf)]
    )
    rows, cols = np.nonzero(mask)
    # Pixel centre → world X, Y → grid (2u − 1, 1 − 2v) = (X, −Y).
    grid = np.stack([(cols - c) / s, -(c - rows) / s], 1)
    sampled = torch.nn.functional.grid_sample(
        torch.from_numpy(normals.astype(np.float64)).permute(2, 0, 1)[None],
        torch.from_numpy(grid)[None, None],
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )[0, :, 0].T.numpy()
    expected = np.floor(180.0 / 255.0 * np.clip(sampled @ LIGHTS.T, 0, 1).mean(1) * 1.7 * 255.0)
    diff = np.abs(image[rows, cols, 0].astype(int) - expected)
    assert diff.max() <= 2  # GPUs filter with limited sub-texel precision
    assert diff.mean() < 0.3
    # Edge pixels half-sample the zero border, exactly like grid_sample: visibly darker.
    assert image[rows.min(), 35, 0] < 0.75 * image[35, 35, 0]
