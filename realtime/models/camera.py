"""DECA's weak-perspective camera and the way back to frame pixels (emica_spec.md §4.3, §3.1).

FLAME world (metres, y up, z toward the camera)
  → orthographic camera ``[s, tx, ty]``: x' = s(x + tx), y' = s(y + ty), z' = s·z
  → image space (negate y and z): x right, y down, roughly [-1, 1] over the crop
  → crop pixels: u = (N/2)(x + 1) − 0.5 for an N×N crop (PyTorch3D's NDC with DECA's xy flip,
    pixel centres at integers)
  → frame pixels through the crop similarity: X = cx − size/2 + u·size/(N − 1).

:func:`world_to_frame_matrix` folds all of it into one 4×4 affine map, which the pipeline hands to
the renderer.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor, tuple, list]


def orthographic_project(points: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
    """DECA's ``batch_orth_proj``.

    Args:
        points: (B, N, 3) world points.
        cam: (B, 3) ``[s, tx, ty]``.

    Returns:
        (B, N, 3): ``[s(x + tx), s(y + ty), s·z]``.
    """
    scale = cam[:, None, 0:1]  # (B, 1, 1)
    shift = torch.cat([cam[:, 1:3], torch.zeros_like(cam[:, :1])], dim=1).unsqueeze(1)  # (B, 1, 3)
    return scale * (points + shift)


def to_image_space(points: torch.Tensor) -> torch.Tensor:
    """Camera → image space: negate y and z (a new tensor; DECA does this in place).

    Args:
        points: (..., 3).

    Returns:
        (..., 3) ``[x, -y, -z]``.
    """
    return torch.cat([points[..., :1], -points[..., 1:]], dim=-1)


def ndc_to_crop_pixels(xy: torch.Tensor, image_size: int = 224) -> torch.Tensor:
    """Image-space [-1, 1] coordinates → crop pixel coordinates (pixel centres at integers).

    Args:
        xy: (..., 2) image-space x (right) and y (down).
        image_size: crop side N.

    Returns:
        (..., 2) ``(N/2)(xy + 1) − 0.5``.
    """
    return (image_size / 2.0) * (xy + 1.0) - 0.5


def crop_to_frame(
    uv: torch.Tensor, center: torch.Tensor, size: Union[torch.Tensor, float], image_size: int = 224
) -> torch.Tensor:
    """Crop pixels → frame pixels through the square-box similarity of the crop.

    Args:
        uv: (B, N, 2) crop pixel coordinates.
        center: (B, 2) box centre in frame pixels.
        size: (B,) or scalar box side in frame pixels.
        image_size: crop side.

    Returns:
        (B, N, 2) ``center − size/2 + uv · size / (image_size − 1)``.
    """
    size = torch.as_tensor(size, dtype=uv.dtype, device=uv.device).reshape(-1, 1, 1)
    return center.unsqueeze(1) - size / 2.0 + uv * size / (image_size - 1)


def world_to_frame_matrix(cam: ArrayLike, center: ArrayLike, size: float, image_size: int = 224) -> np.ndarray:
    """The whole world → frame chain as one affine matrix.

    ``M @ [x, y, z, 1] = [x_px, y_px, depth, 1]`` where x_px, y_px are what the step functions give
    and depth is the image-space z scaled by the same factor as x, so the map is a uniform scale
    times a half-turn about x (y and z both flip; determinant > 0) plus a shift; smaller depth is
    nearer the camera. Triangles counter-clockwise seen from the camera in FLAME space are
    clockwise in (x right, y down) pixel coordinates.

    Args:
        cam: (3,) ``[s, tx, ty]``.
        center: (2,) box centre in frame pixels.
        size: box side in frame pixels.
        image_size: crop side.

    Returns:
        (4, 4) float64.
    """
    s, tx, ty = (float(v) for v in np.asarray(cam, dtype=np.float64).reshape(3))
    cx, cy = (float(v) for v in np.asarray(center, dtype=np.float64).reshape(2))
    size = float(size)

    project = np.diag([s, s, s, 1.0])
    project[:3, 3] = [s * tx, s * ty, 0.0]
    flip = np.diag([1.0, -1.0, -1.0, 1.0])
    half = image_size / 2.0
    to_crop = np.diag([half, half, half, 1.0])
    to_crop[:2, 3] = half - 0.5
    pixel = size / (image_size - 1)
    to_frame = np.diag([pixel, pixel, pixel, 1.0])
    to_frame[:2, 3] = [cx - size / 2.0, cy - size / 2.0]
    return to_frame @ to_crop @ flip @ project
