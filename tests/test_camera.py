"""Camera chain: FLAME world → orthographic camera → image space → crop pixels → frame pixels."""

from __future__ import annotations

import numpy as np
import torch

from realtime.models.camera import (
    crop_to_frame,
    ndc_to_crop_pixels,
    orthographic_project,
    to_image_space,
    world_to_frame_matrix,
)


def test_orthographic_project_numbers():
    points = torch.tensor([[[0.1, -0.2, 0.3], [0.0, 0.0, 0.0]]], dtype=torch.float64)
    cam = torch.tensor([[8.0, 0.01, -0.02]], dtype=torch.float64)
    projected = orthographic_project(points, cam)
    expected = [[[8 * 0.11, 8 * -0.22, 8 * 0.3], [0.08, -0.16, 0.0]]]
    torch.testing.assert_close(projected, torch.tensor(expected, dtype=torch.float64))


def test_to_image_space_negates_y_and_z_without_touching_the_input():
    points = torch.tensor([[1.0, 2.0, 3.0]])
    out = to_image_space(points)
    assert out.tolist() == [[1.0, -2.0, -3.0]]
    assert points.tolist() == [[1.0, 2.0, 3.0]]


def test_ndc_to_crop_pixels_pixel_centres():
    xy = torch.tensor([[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0], [1 / 224 - 1, 3 / 224 - 1]], dtype=torch.float64)
    expected = torch.tensor([[-0.5, -0.5], [111.5, 111.5], [223.5, 223.5], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(ndc_to_crop_pixels(xy), expected)


def test_crop_to_frame_maps_crop_corners_to_the_box():
    uv = torch.tensor([[[0.0, 0.0], [223.0, 223.0], [111.5, 0.0]]], dtype=torch.float64)
    center = torch.tensor([[300.0, 200.0]], dtype=torch.float64)
    frame = crop_to_frame(uv, center, 150.0)
    assert frame.tolist() == [[[225.0, 125.0], [375.0, 275.0], [300.0, 125.0]]]


def _step_by_step(points: np.ndarray, cam: np.ndarray, center: np.ndarray, size: float) -> np.ndarray:
    p = torch.from_numpy(points)[None]
    image = to_image_space(orthographic_project(p, torch.from_numpy(cam)[None]))
    crop = ndc_to_crop_pixels(image[..., :2])
    frame = crop_to_frame(crop, torch.from_numpy(center)[None], size)
    depth = image[..., 2:] * 112.0 * size / 223.0  # same scale as x: crop (112) then frame (size/223)
    return torch.cat([frame, depth], -1)[0].numpy()


def test_world_to_frame_matrix_equals_the_step_functions():
    rng = np.random.default_rng(0)
    for _ in range(5):
        cam = np.array([rng.uniform(5, 12), rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05)])
        center = rng.uniform(50, 600, size=2)
        size = float(rng.integers(60, 400))
        points = rng.normal(0, 0.08, size=(200, 3))
        matrix = world_to_frame_matrix(cam, center, size)
        assert matrix.shape == (4, 4) and matrix.dtype == np.float64
        np.testing.assert_array_equal(matrix[3], [0, 0, 0, 1])
        mapped = points @ matrix[:3, :3].T + matrix[:3, 3]
        np.testing.assert_allclose(mapped, _step_by_step(points, cam, center, size), atol=1e-9)


def test_world_to_frame_is_a_similarity_with_near_points_smaller_depth():
    matrix = world_to_frame_matrix([9.0, 0.0, 0.0], [320.0, 240.0], 200.0)
    linear = matrix[:3, :3]
    scale = 9.0 * 112.0 * 200.0 / 223.0
    np.testing.assert_allclose(linear.T @ linear, scale**2 * np.eye(3), rtol=1e-12)
    # Flipping y and z together is a half-turn about x, not a mirror: handedness is kept
    # (x right, y down, depth away is right-handed like FLAME's x, y up, z toward the camera).
    assert np.linalg.det(linear) > 0
    near, far = np.array([0.0, 0.0, 0.1]), np.array([0.0, 0.0, -0.1])
    assert (linear @ near)[2] < (linear @ far)[2]
    # The face's up (+y) goes up the image (smaller row); its left (+x) goes right.
    assert (linear @ [0, 1, 0])[1] < 0 and (linear @ [1, 0, 0])[0] > 0
