"""Crop geometry: face box → similarity transforms → network input crops.

Two crops feed EMICA (emica_spec.md §3.1, §3.3):

- the 224×224 DECA/EMOCA crop: inferno's ``bbox2point('kpt68')`` square box around the 68 landmarks,
  enlarged by 1.25 and warped with an exact similarity of scale ``(S-1)/size``;
- the 112×112 ArcFace crop for MICA: a least-squares similarity that maps five face points
  (eyes, nose tip, mouth corners) onto insightface's ArcFace template.

All matrices are ``(2, 3)`` float64 and map frame pixels ``(x, y, 1)`` to crop pixels ``(col, row)``,
with pixel centres at integer coordinates (OpenCV's and skimage's convention).
"""

from __future__ import annotations

import cv2
import numpy as np

#: insightface ``arcface_src``: where the 5 points land in the 112×112 ArcFace crop, as (x, y).
#: Order: image-left eye (the subject's right eye), image-right eye, nose tip,
#: image-left mouth corner, image-right mouth corner.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)
ARCFACE_SIZE = 112

# MediaPipe FaceMesh indices for the five ArcFace points. 468/473 are the iris centres (the pupil,
# which is what RetinaFace/SCRFD keypoints were annotated on); 468 is the subject's right eye and so
# lies on the image left, like the template's first point. 1 is the nose tip, 61/291 the mouth corners.
_ARCFACE_MEDIAPIPE_INDICES = (468, 473, 1, 61, 291)


def square_box(points_xy: np.ndarray, scale: float = 1.25, whole_pixels: bool = True) -> tuple[tuple[float, float], float]:
    """inferno's ``bbox2point(..., 'kpt68')`` on the points' bounding box.

    Args:
        points_xy: (N, 2) landmark pixel coordinates (x, y).
        scale: enlargement applied after the ×1.1 of ``kpt68``.
        whole_pixels: truncate the side to an integer like inferno's ``int(old_size * scale)``; False keeps
            it exact (a smoothly moving box for smoothed landmarks).

    Returns:
        ``((cx, cy), size)``: box centre in float64 pixels and the side (a float).
    """
    pts = np.asarray(points_xy, dtype=np.float64)[:, :2]
    left, top = pts.min(axis=0)
    right, bottom = pts.max(axis=0)
    old_size = ((right - left) + (bottom - top)) / 2.0 * 1.1
    center = (float(right - (right - left) / 2.0), float(bottom - (bottom - top) / 2.0))
    return center, float(int(old_size * scale)) if whole_pixels else float(old_size * scale)


def crop_matrix(center: tuple[float, float], size: float, image_size: int = 224) -> np.ndarray:
    """Similarity that maps the square box onto an ``image_size`` crop (spec §3.1 step 5).

    Crop pixel (col c, row r) samples the frame at ``x = cx - size/2 + c*size/(S-1)``,
    ``y = cy - size/2 + r*size/(S-1)``: the box's corners land on pixel centres 0 and S-1.

    Returns:
        (2, 3) float64, frame pixel (x, y, 1) → crop pixel (col, row).
    """
    cx, cy = float(center[0]), float(center[1])
    s = (image_size - 1) / float(size)
    left, top = cx - size / 2.0, cy - size / 2.0
    return np.array([[s, 0.0, -left * s], [0.0, s, -top * s]], dtype=np.float64)


def _to_chw_unit(crop_hwc: np.ndarray) -> np.ndarray:
    """(S, S, 3) uint8 → (3, S, S) float32 in [0, 1]."""
    return np.ascontiguousarray(crop_hwc.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: int, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """(H, W, C) frame → (size, size, C) crop through the frame→crop affine (2, 3), black outside the frame."""
    return cv2.warpAffine(image, np.asarray(matrix, dtype=np.float64), (size, size), flags=interpolation,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def warp_crop(image: np.ndarray, matrix: np.ndarray, image_size: int = 224) -> np.ndarray:
    """The fast encoder crop: OpenCV bicubic, black outside the frame.

    OpenCV's cubic kernel (a = -0.75, 1/32-pixel fixed-point taps on uint8) is not skimage's
    Catmull-Rom (a = -0.5), and inferno's video path also truncates to uint8; ``warp_crop_inferno``
    is the bit-compatible reference. On carphone face crops (×3.2 upscaling) the two differ by a mean
    of 0.0034 (≈0.9/255, mostly the truncation's half-level bias) and at most 0.059 (15/255, on sharp
    edges); tests/test_crop.py checks this.

    Args:
        image: (H, W, 3) uint8 RGB frame.
        matrix: (2, 3) frame → crop similarity (``crop_matrix``).

    Returns:
        (3, S, S) float32 RGB in [0, 1].
    """
    return _to_chw_unit(warp_affine(image, matrix, image_size, cv2.INTER_CUBIC))


def warp_crop_inferno(
    image: np.ndarray, matrix: np.ndarray, image_size: int = 224, quantize: bool = True
) -> np.ndarray:
    """inferno's crop, reproduced with skimage itself (needs scikit-image).

    ``skimage.transform.warp(image/255, inv(T), output_shape=(S, S), order=3)`` in float64, then,
    for the video demo (``quantize=True``), the ``(x*255).astype(uint8)`` truncation of the saved PNG.
    The image demo (``quantize=False``) feeds the float crop directly.

    Args:
        image: (H, W, 3) uint8 RGB frame.
        matrix: (2, 3) frame → crop similarity (``crop_matrix``).

    Returns:
        (3, S, S) float32 RGB in [0, 1].
    """
    from skimage.transform import warp  # optional dependency: only the parity path needs it

    forward = np.vstack([np.asarray(matrix, dtype=np.float64), [0.0, 0.0, 1.0]])
    # A (3, 3) ndarray takes skimage's Cython path (separable cubic convolution), like inferno's tform.inverse.
    crop = warp(image / 255.0, np.linalg.inv(forward), output_shape=(image_size, image_size), order=3)
    if quantize:
        return _to_chw_unit((crop * 255.0).astype(np.uint8))
    return np.ascontiguousarray(crop.transpose(2, 0, 1), dtype=np.float32)


def arcface_points(landmarks: np.ndarray) -> np.ndarray:
    """The five ArcFace points from MediaPipe's 478 landmarks, in ``ARCFACE_TEMPLATE`` order.

    Args:
        landmarks: (478, 2+) MediaPipe landmarks in frame pixels (iris points 468–477 included).

    Returns:
        (5, 2) float64: image-left eye, image-right eye, nose tip, image-left and image-right mouth corner.
    """
    lm = np.asarray(landmarks)
    if lm.ndim != 2 or lm.shape[0] < 478 or lm.shape[1] < 2:
        raise ValueError(f"expected (478, 2+) MediaPipe landmarks with iris points, got {lm.shape}")
    return lm[list(_ARCFACE_MEDIAPIPE_INDICES), :2].astype(np.float64)


def umeyama_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) taking ``src`` onto ``dst``.

    Umeyama (1991), "Least-squares estimation of transformation parameters between two point
    patterns", eqs. 38–42; a reflection is never returned.

    Args:
        src: (N, 2) points.
        dst: (N, 2) corresponding points.

    Returns:
        (2, 3) float64 M with ``dst ≈ M @ [src, 1]``.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)  # (2, 2)
    u, sigma, vt = np.linalg.svd(cov)
    # Flip the weakest axis if the best orthogonal fit would be a reflection.
    d = np.array([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rotation = u @ np.diag(d) @ vt
    src_var = (src_c**2).sum() / len(src)
    scale = float((sigma * d).sum() / src_var)
    translation = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, translation[:, None]])


def arcface_matrix(points5: np.ndarray) -> np.ndarray:
    """Similarity that aligns five face points (frame pixels) to ``ARCFACE_TEMPLATE`` (insightface ``norm_crop``).

    Args:
        points5: (5, 2) points in ``ARCFACE_TEMPLATE`` order (``arcface_points``).

    Returns:
        (2, 3) float64, frame pixel → 112×112 ArcFace crop pixel.
    """
    return umeyama_similarity(points5, ARCFACE_TEMPLATE)


def warp_arcface(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """MICA's input: the 112×112 ArcFace crop, bilinear, black outside, normalised like insightface.

    Args:
        image: (H, W, 3) RGB, uint8 (0..255) or float32 on the same 0..255 scale.
        matrix: (2, 3) frame → ArcFace crop similarity (``arcface_matrix``).

    Returns:
        (3, 112, 112) float32 RGB, ``(x - 127.5) / 127.5``.
    """
    crop = warp_affine(image, matrix, ARCFACE_SIZE, cv2.INTER_LINEAR)
    chw = np.ascontiguousarray(crop.transpose(2, 0, 1), dtype=np.float32)
    return (chw - np.float32(127.5)) / np.float32(127.5)
