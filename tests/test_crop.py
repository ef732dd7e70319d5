"""Crop geometry: inferno's box and similarity, the two 224 warps, ArcFace alignment."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.transform import estimate_transform

from realtime.crop import (
    ARCFACE_TEMPLATE,
    arcface_matrix,
    arcface_points,
    crop_matrix,
    square_box,
    umeyama_similarity,
    warp_arcface,
    warp_crop,
    warp_crop_inferno,
)
from realtime.sources import open_source
from realtime.tracking import FaceTracker


def test_square_box_is_inferno_kpt68_with_int_truncation():
    points = np.array([[10.0, 20.0], [50.0, 80.0], [30.0, 40.0]], np.float32)
    center, size = square_box(points)
    # old_size = (40 + 60) / 2 * 1.1 = 55; centre of the min/max box; int(55 * 1.25) = int(68.75) = 68
    assert center == pytest.approx((30.0, 50.0))
    assert size == 68.0
    _, size_other_scale = square_box(points, scale=1.3)
    assert size_other_scale == 71.0  # int(71.5): truncated, not rounded
    assert isinstance(center[0], float) and isinstance(size, float)


def test_crop_matrix_maps_box_corners_to_crop_corners_like_skimage():
    center, size = (87.3, 64.9), 71.0
    m = crop_matrix(center, size, 224)
    half = size / 2
    src = np.array([[center[0] - half, center[1] - half], [center[0] - half, center[1] + half],
                    [center[0] + half, center[1] - half]])
    dst = np.array([[0, 0], [0, 223], [223, 0]], np.float64)
    np.testing.assert_allclose(np.c_[src, np.ones(3)] @ m.T, dst, atol=1e-9)
    inferno = estimate_transform("similarity", src, dst).params  # what bbpoint_warp builds
    np.testing.assert_allclose(m, inferno[:2], atol=1e-9)
    assert m[0, 0] == pytest.approx(223 / 71)


def test_warp_crop_samples_the_box_with_black_outside():
    image = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    identity = crop_matrix((111.5, 111.5), 223.0, 224)  # box = the whole image, pixel for pixel
    np.testing.assert_allclose(identity, [[1, 0, 0], [0, 1, 0]], atol=1e-12)
    crop = warp_crop(image, identity)
    assert crop.shape == (3, 224, 224) and crop.dtype == np.float32
    np.testing.assert_allclose(crop, image.transpose(2, 0, 1) / 255.0, atol=1e-6)
    # A box hanging off the left edge: the part outside the frame is black.
    shifted = warp_crop(np.full((100, 100, 3), 200, np.uint8), crop_matrix((10.0, 50.0), 60.0, 224))
    assert shifted[:, :, :60].max() == 0.0
    assert shifted[:, 100:120, 120:].min() == pytest.approx(200 / 255, abs=1e-6)


def test_warp_crop_inferno_quantizes_like_the_video_demo():
    image = np.random.default_rng(1).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    m = crop_matrix((80.0, 60.0), 90.0, 224)
    quantized = warp_crop_inferno(image, m)
    exact = warp_crop_inferno(image, m, quantize=False)
    assert quantized.shape == exact.shape == (3, 224, 224)
    levels = quantized * 255.0
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)  # whole uint8 levels
    # Truncation, not rounding: never above the float crop, less than one level below it.
    assert np.all(quantized <= exact + 1e-6)
    assert np.all(exact - quantized < 1 / 255 + 1e-6)
    assert (exact - quantized).mean() == pytest.approx(0.5 / 255, abs=0.15 / 255)


def test_fast_warp_matches_inferno_warp_on_carphone_faces(carphone_path, face_model_path):
    """Documents the cost of cv2 bicubic instead of skimage order=3 + uint8 truncation (crop.warp_crop)."""
    frames = [f for f in open_source(str(carphone_path)) if f.index % 10 == 0]
    max_diff, mean_diff = [], []
    with FaceTracker(face_model_path, mode="image") as tracker:
        for frame in frames:
            (face,) = tracker.track(frame)
            fast = warp_crop(frame.image, face.crop_matrix)
            reference = warp_crop_inferno(frame.image, face.crop_matrix)
            diff = np.abs(fast - reference)
            max_diff.append(diff.max())
            mean_diff.append(diff.mean())
    assert len(mean_diff) == 12
    # Measured: mean 0.0034 (about 0.9/255, mostly truncation bias), max 0.059 (15/255) on edges.
    assert np.mean(mean_diff) < 0.005
    assert max(max_diff) < 0.08
    assert min(mean_diff) > 0.0005  # different kernels: zero would mean a warp compared with itself


def test_umeyama_recovers_a_known_similarity_and_agrees_with_skimage():
    rng = np.random.default_rng(2)
    src = rng.uniform(0, 200, (5, 2))
    angle, scale, shift = 0.3, 0.45, np.array([12.0, -7.5])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = scale * src @ rotation.T + shift
    m = umeyama_similarity(src, dst)
    np.testing.assert_allclose(m, np.c_[scale * rotation, shift], atol=1e-10)
    noisy = dst + rng.normal(0, 1.5, dst.shape)
    reference = estimate_transform("similarity", src, noisy).params
    np.testing.assert_allclose(umeyama_similarity(src, noisy), reference[:2], atol=1e-9)


def test_umeyama_never_returns_a_reflection():
    src = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 1.0], [1.0, 3.0]])
    mirrored = src * [-1.0, 1.0]  # only a reflection maps these exactly
    m = umeyama_similarity(src, mirrored)
    assert np.linalg.det(m[:, :2]) > 0
    np.testing.assert_allclose(m, estimate_transform("similarity", src, mirrored).params[:2], atol=1e-9)


def test_arcface_matrix_of_the_template_is_the_identity():
    np.testing.assert_allclose(arcface_matrix(ARCFACE_TEMPLATE), [[1, 0, 0], [0, 1, 0]], atol=1e-10)
    doubled = ARCFACE_TEMPLATE * 2 + [30.0, 40.0]  # a face twice as big, shifted
    np.testing.assert_allclose(arcface_matrix(doubled), [[0.5, 0, -15.0], [0, 0.5, -20.0]], atol=1e-10)


def test_arcface_points_picks_iris_nose_and_mouth_corners():
    landmarks = np.zeros((478, 3), np.float32)
    for index, xy in {468: (10, 20), 473: (30, 21), 1: (20, 30), 61: (12, 40), 291: (28, 41)}.items():
        landmarks[index, :2] = xy
    np.testing.assert_array_equal(arcface_points(landmarks), [[10, 20], [30, 21], [20, 30], [12, 40], [28, 41]])
    with pytest.raises(ValueError):
        arcface_points(landmarks[:468])


def test_warp_arcface_normalises_and_fills_black():
    image = np.full((112, 112, 3), 255, np.uint8)
    image[:, :, 1] = 0
    out = warp_arcface(image, np.array([[1.0, 0, 0], [0, 1.0, 0]]))
    assert out.shape == (3, 112, 112) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], 1.0)
    np.testing.assert_allclose(out[1], -1.0)
    half = warp_arcface(np.full((56, 56, 3), 255, np.uint8), np.array([[1.0, 0, 0], [0, 1.0, 0]]))
    np.testing.assert_allclose(half[:, :50, :50], 1.0)
    np.testing.assert_allclose(half[:, 60:, :], -1.0)  # outside the picture: black → -1
