"""Batched torch crops (realtime.gpu_crop) against the OpenCV warps they replace, on real carphone faces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from realtime.crop import arcface_matrix, arcface_points, crop_matrix, warp_arcface, warp_crop
from realtime.gpu_crop import FrameUploader, arcface_batch, crop_batch, sampling_theta, unique_frames
from realtime.sources import open_source
from realtime.tracking import FaceTracker

IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def on(device: str, *images: np.ndarray) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(image)).to(device) for image in images]


@pytest.fixture(scope="module")
def carphone_faces(carphone_path, face_model_path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(frame image, 224 crop matrix, ArcFace matrix) for every carphone frame, tracked in VIDEO mode."""
    out = []
    with FaceTracker(face_model_path, mode="video") as tracker:
        for frame in open_source(str(carphone_path)):
            (face,) = tracker.track(frame)
            out.append((frame.image, face.crop_matrix, arcface_matrix(arcface_points(face.landmarks))))
    return out


# ------------------------------------------------------------------------------------------ geometry


def test_sampling_theta_puts_pixel_centres_where_grid_sample_reads_them():
    theta = sampling_theta(IDENTITY[None], size=4, height=4, width=8)
    assert theta.shape == (1, 2, 3)
    grid = F.affine_grid(torch.from_numpy(theta), [1, 3, 4, 4], align_corners=False)[0].numpy()
    # Crop pixel (c, r) reads frame pixel (c, r), whose centre is (2x + 1)/W - 1 in align_corners=False units.
    np.testing.assert_allclose(grid[0, :, 0], [(2 * x + 1) / 8 - 1 for x in range(4)], atol=1e-12)
    np.testing.assert_allclose(grid[:, 0, 1], [(2 * y + 1) / 4 - 1 for y in range(4)], atol=1e-12)
    scaled = sampling_theta(np.array([[[0.5, 0.0, 1.0], [0.0, 0.5, 2.0]]]), size=4, height=10, width=10)
    grid = F.affine_grid(torch.from_numpy(scaled), [1, 3, 4, 4], align_corners=False)[0].numpy()
    frame_x = ((grid[0, :, 0] + 1) * 10 - 1) / 2  # back to frame pixels: x = (c - 1) / 0.5
    np.testing.assert_allclose(frame_x, [-2.0, 0.0, 2.0, 4.0], atol=1e-12)


def test_identity_crop_is_the_frame_and_half_pixel_shift_averages_neighbours():
    image = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    for mode in ("bicubic", "bilinear"):
        crop = crop_batch(on("cpu", image), [0], IDENTITY[None], mode=mode)
        assert crop.shape == (1, 3, 224, 224) and crop.dtype == torch.float32
        # float32 sample positions: within 0.013 levels
        np.testing.assert_allclose(crop[0].numpy(), image.transpose(2, 0, 1) / 255.0, atol=5e-5)
    # Crop pixel c samples frame x = c + 0.5: bilinear is the mean of columns c and c + 1.
    shifted = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, 0.0]])
    crop = crop_batch(on("cpu", image), [0], shifted[None], size=100, mode="bilinear")[0].numpy() * 255.0
    expected = (image[:100, :100].astype(np.float64) + image[:100, 1:101]) / 2.0
    np.testing.assert_allclose(crop, expected.transpose(2, 0, 1), atol=3e-3)  # levels; float32 positions


def test_outside_the_frame_is_black_and_bicubic_is_clamped():
    grey = np.full((100, 100, 3), 200, np.uint8)
    crop = crop_batch(on("cpu", grey), [0], crop_matrix((10.0, 50.0), 60.0)[None])[0].numpy()
    assert crop[:, :, :60].max() == 0.0  # the box hangs off the left edge
    assert crop[:, 100:120, 120:].min() == pytest.approx(200 / 255, abs=1e-5)
    edges = np.zeros((64, 64, 3), np.uint8)
    edges[:, 32:] = 255  # a step: bicubic over/undershoots there
    up = crop_batch(on("cpu", edges), [0], crop_matrix((32.0, 32.0), 20.0)[None])[0]
    assert up.min() == 0.0 and up.max() == 1.0
    arc = arcface_batch(on("cpu", grey), [0], np.array([[1.0, 0, 30.0], [0, 1.0, 30.0]])[None])[0].numpy()
    assert arc.shape == (3, 112, 112)
    np.testing.assert_allclose(arc[:, :29, :], -1.0)  # rows above the frame: black → -1
    np.testing.assert_allclose(arc[:, 40:100, 40:100], (200 - 127.5) / 127.5, atol=1e-5)


def test_a_batch_mixes_frames_of_different_sizes_and_keeps_face_order():
    rng = np.random.default_rng(3)
    small = rng.integers(0, 256, (144, 176, 3), dtype=np.uint8)
    large = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    matrices = np.stack([crop_matrix((200.0, 150.0), 120.0), crop_matrix((88.0, 72.0), 60.0),
                         crop_matrix((120.0, 100.0), 90.0)])
    frame_index = [1, 0, 1]  # two faces in the large frame, around one in the small frame
    crops = crop_batch(on("cpu", small, large), frame_index, matrices).numpy()
    arcs = arcface_batch(on("cpu", small, large), frame_index, matrices * 0.5).numpy()
    assert crops.shape == (3, 3, 224, 224) and arcs.shape == (3, 3, 112, 112)
    for i, (k, m) in enumerate(zip(frame_index, matrices)):
        image = (small, large)[k]
        np.testing.assert_allclose(crops[i], warp_crop(image, m), atol=0.6 / 255)
        np.testing.assert_allclose(arcs[i], warp_arcface(image, m * 0.5), atol=0.6 / 127.5)


def test_bad_arguments_are_refused():
    image = on("cpu", np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(ValueError, match="frame indices"):
        crop_batch(image, [0, 0], IDENTITY[None])
    with pytest.raises(ValueError, match="frame_index"):
        crop_batch(image, [1], IDENTITY[None])
    with pytest.raises(ValueError, match="interpolation"):
        crop_batch(image, [0], IDENTITY[None], mode="area")
    with pytest.raises(ValueError, match="uint8"):
        crop_batch([torch.zeros(10, 10, 3)], [0], IDENTITY[None])
    assert crop_batch(image, [], np.zeros((0, 2, 3))).shape == (0, 3, 224, 224)


def test_unique_frames_groups_faces_by_their_frame_object():
    a, b = np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2, 3), np.uint8)  # equal values, different frames
    frames, index = unique_frames([a, b, a, a, b])
    assert len(frames) == 2 and frames[0] is a and frames[1] is b
    assert index == [0, 1, 0, 0, 1]


def test_cpu_uploader_wraps_the_frame_without_copying():
    image = np.random.default_rng(4).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    frame = FrameUploader("cpu").upload(image)
    assert frame.shape == (48, 64, 3) and frame.dtype == torch.uint8
    assert frame.data_ptr() == image.ctypes.data
    with pytest.raises(ValueError, match="uint8"):
        FrameUploader("cpu").upload(image.astype(np.float32))


# ------------------------------------------------------------------------------------------ real faces


def test_matches_opencv_on_carphone_faces(carphone_faces):
    """The documented tolerance (realtime/gpu_crop.py): OpenCV rounds to whole uint8 levels, torch does not."""
    crop_max, crop_mean, arc_max, arc_mean, same_level = [], [], [], [], []
    for image, m224, m112 in carphone_faces:
        frame = on("cpu", image)
        ours = crop_batch(frame, [0], m224[None])[0].numpy()
        reference = warp_crop(image, m224)
        diff = np.abs(ours - reference)
        crop_max.append(diff.max())
        crop_mean.append(diff.mean())
        same_level.append(np.mean(np.round(ours * 255.0) == np.round(reference * 255.0)))
        diff = np.abs(arcface_batch(frame, [0], m112[None])[0].numpy() - warp_arcface(image, m112))
        arc_max.append(diff.max())
        arc_mean.append(diff.mean())
    assert len(crop_max) == 120
    # Measured on [0, 1]: mean 0.00097, max 0.00197 (0.5/255: OpenCV's rounding to uint8 and nothing else).
    assert np.mean(crop_mean) < 0.0012 and max(crop_max) < 0.0025
    assert np.mean(crop_mean) > 0.0005  # not a warp compared with itself: the rounding must show
    assert min(same_level) > 0.999  # rounded to whole levels, the two crops agree on >99.9% of the values
    # Measured on [-1, 1]: mean 0.00194, max 0.00393 (0.5/127.5).
    assert np.mean(arc_mean) < 0.0024 and max(arc_max) < 0.0048


def test_batched_crops_give_the_same_emica_codes_as_opencv_crops(carphone_faces, synthetic_assets):
    from realtime.models import load_model

    model = load_model("EMICA-CVT_flame2020_notexture", assets_dir=synthetic_assets, device="cpu")
    picked = carphone_faces[::30]  # 4 frames, one face each: one batch
    frames, frame_index = unique_frames([image for image, _, _ in picked])
    device_frames = [FrameUploader("cpu").upload(image) for image in frames]
    image = crop_batch(device_frames, frame_index, np.stack([m for _, m, _ in picked]))
    mica = arcface_batch(device_frames, frame_index, np.stack([m for _, _, m in picked]))
    cv_image = torch.from_numpy(np.stack([warp_crop(img, m) for img, m, _ in picked]))
    cv_mica = torch.from_numpy(np.stack([warp_arcface(img, m) for img, _, m in picked]))
    with torch.inference_mode():
        ours = model.encode(image, mica_image=mica)
        reference = model.encode(cv_image, mica_image=cv_mica)
        other_faces = model.encode(cv_image.roll(1, 0), mica_image=cv_mica.roll(1, 0))  # the next picked frame's
    # Measured: the largest code difference is 0.37% of the code's magnitude (globalpose) and 1.8-4.2% of how
    # far the codes move between carphone frames one second apart; the crops differ by OpenCV's uint8 rounding.
    for key in ("shapecode", "expcode", "globalpose", "jawpose", "cam", "lightcode", "texcode"):
        scale = reference[key].abs().max().item()
        err = (ours[key] - reference[key]).abs().max().item()
        spread = (other_faces[key] - reference[key]).abs().max().item()
        assert err < 0.01 * scale, (key, err, scale)
        assert err < 0.1 * spread, (key, err, spread)


# ------------------------------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_crops_equal_cpu_crops_and_pinned_ring_reuse_is_safe(carphone_faces):
    uploader = FrameUploader("cuda", buffers=2)
    stream = torch.cuda.Stream()
    picked = carphone_faces[:12]  # more frames than buffers: each buffer is refilled while copies may be in flight
    frames = [uploader.upload(image, stream) for image, _, _ in picked]
    torch.cuda.current_stream().wait_stream(stream)
    for frame, (image, _, _) in zip(frames, picked):
        assert frame.is_cuda
        np.testing.assert_array_equal(frame.cpu().numpy(), image)
    index = list(range(len(picked)))
    gpu = crop_batch(frames, index, np.stack([m for _, m, _ in picked])).cpu().numpy()
    cpu = crop_batch(on("cpu", *[i for i, _, _ in picked]), index, np.stack([m for _, m, _ in picked])).numpy()
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)
    gpu_arc = arcface_batch(frames, index, np.stack([m for _, _, m in picked])).cpu().numpy()
    cpu_arc = arcface_batch(on("cpu", *[i for i, _, _ in picked]), index, np.stack([m for _, _, m in picked])).numpy()
    np.testing.assert_allclose(gpu_arc, cpu_arc, atol=2e-4)
