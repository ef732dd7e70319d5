"""Network input crops on the inference device: one batched ``grid_sample`` instead of a ``cv2.warpAffine`` per face.

Same geometry as ``realtime.crop``: a ``(2, 3)`` matrix maps frame pixels ``(x, y, 1)`` to crop pixels
``(col, row)``, pixel centres at integers, and crop pixel ``(c, r)`` samples the frame at
``inverse(M) · (c, r, 1)`` (what ``cv2.warpAffine`` does without ``WARP_INVERSE_MAP``); outside the frame is black.

How it differs from the OpenCV warps (measured on all 120 carphone frames tracked with MediaPipe, faces
upscaled about 3.2× into the 224 crop; tests/test_gpu_crop.py checks these bounds). Both use Keys' cubic
kernel with a = −0.75 (bilinear for ArcFace) and zero padding; OpenCV then rounds to whole uint8 levels, this
path stays float32 (clamped to [0, 1], as OpenCV saturates). That rounding is the whole difference:

- 224 crop: mean abs difference 0.00097, max 0.00197 (= 0.5/255) on [0, 1]; rounded to whole levels, the
  two crops agree on more than 99.9% of the values.
- 112 ArcFace crop: mean 0.00194, max 0.00393 (= 0.5/127.5) on the normalised [−1, 1] scale.
- The 1/32-px sample-position quantisation of older OpenCV warps does not show with the OpenCV 5.1 that
  mediapipe brings: even on random noise, where it would move values by several levels, both warps stay
  within 0.52 levels of these crops at any scale.
- A random-weight EMICA's codes from the two paths differ by at most 0.4% of each code's magnitude.

Sample positions are float32 on the device (``affine_grid`` from a float64-composed matrix): an identity crop
reproduces the frame to within 0.01 levels.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .crop import ARCFACE_SIZE

_MODES = ("bicubic", "bilinear", "nearest")


def unique_frames(images: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
    """Group faces by the frame they come from, so each frame is uploaded and converted once.

    Args:
        images: per face, its frame's image; faces of one frame share the same array object.

    Returns:
        ``(frames, frame_index)``: the distinct arrays in first-seen order, and per face the position of its
        frame in ``frames``.
    """
    slots: dict[int, int] = {}
    frames: list[np.ndarray] = []
    frame_index = []
    for image in images:
        key = id(image)
        if key not in slots:
            slots[key] = len(frames)
            frames.append(image)
        frame_index.append(slots[key])
    return frames, frame_index


def sampling_theta(matrices: np.ndarray, size: int, height: int, width: int) -> np.ndarray:
    """``F.affine_grid`` matrices for crops taken with frame → crop similarities.

    ``affine_grid`` maps output (crop) positions to input (frame) positions, both in ``align_corners=False``
    units where −1 and 1 are the outer pixel edges, i.e. pixel centre p of an n-pixel axis is (2p + 1)/n − 1.
    So theta = to_unit(frame) · inverse(M) · to_pixel(crop), composed here in float64.

    Args:
        matrices: (N, 2, 3) frame pixel → crop pixel affines.
        size: crop side S.
        height, width: the frame's size.

    Returns:
        (N, 2, 3) float64 theta.
    """
    m = np.asarray(matrices, dtype=np.float64).reshape(-1, 2, 3)
    forward = np.concatenate([m, np.broadcast_to([0.0, 0.0, 1.0], (len(m), 1, 3))], axis=1)
    frame_to_unit = np.array([[2.0 / width, 0.0, 1.0 / width - 1.0], [0.0, 2.0 / height, 1.0 / height - 1.0],
                              [0.0, 0.0, 1.0]])
    unit_to_crop = np.array([[size / 2.0, 0.0, (size - 1) / 2.0], [0.0, size / 2.0, (size - 1) / 2.0],
                             [0.0, 0.0, 1.0]])  # inverse of c ↦ (2c + 1)/S − 1
    return (frame_to_unit @ np.linalg.inv(forward) @ unit_to_crop)[:, :2]


def _sample(
    frames: Sequence[torch.Tensor], frame_index: Sequence[int], matrices: np.ndarray, size: int, mode: str
) -> torch.Tensor:
    """Crops on the 0..255 scale: (N, 3, S, S) float32 on the frames' device.

    One ``grid_sample`` per distinct frame: its faces' grids are stacked along the rows, so a frame is
    converted to float once however many faces it holds.
    """
    if mode not in _MODES:
        raise ValueError(f"unknown interpolation {mode!r}: use one of {', '.join(_MODES)}")
    matrices = np.asarray(matrices, dtype=np.float64).reshape(-1, 2, 3)
    frame_index = np.asarray(frame_index, dtype=np.int64)
    if len(frame_index) != len(matrices):
        raise ValueError(f"{len(matrices)} matrices but {len(frame_index)} frame indices")
    if len(frame_index) and (frame_index.min() < 0 or frame_index.max() >= len(frames)):
        raise ValueError(f"frame_index must lie in [0, {len(frames)}), got {frame_index.tolist()}")
    if not frames:
        return torch.zeros(0, 3, size, size)
    device = frames[0].device
    out = None  # made only when the faces come from several frames
    for k, frame in enumerate(frames):
        faces = np.flatnonzero(frame_index == k)
        if len(faces) == 0:
            continue
        if frame.dtype != torch.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"frames must be (H, W, 3) uint8, got {tuple(frame.shape)} {frame.dtype}")
        height, width = frame.shape[:2]
        image = frame.permute(2, 0, 1).unsqueeze(0).float()  # (1, 3, H, W)
        # non_blocking: a pageable host copy is staged at once instead of waiting for the stream's queued work.
        theta = torch.from_numpy(sampling_theta(matrices[faces], size, height, width)).float().to(device, non_blocking=True)
        grid = F.affine_grid(theta, [len(faces), 3, size, size], align_corners=False)  # (n, S, S, 2)
        stacked = grid.reshape(1, len(faces) * size, size, 2)
        crops = F.grid_sample(image, stacked, mode=mode, padding_mode="zeros", align_corners=False)
        crops = crops.reshape(3, len(faces), size, size).transpose(0, 1)
        if len(faces) == len(matrices):  # every face from this one frame (the crop stage's case): no scatter
            return crops.contiguous()
        if out is None:
            out = torch.empty(len(matrices), 3, size, size, dtype=torch.float32, device=device)
        out[torch.from_numpy(faces).to(device, non_blocking=True)] = crops
    return out if out is not None else torch.zeros(0, 3, size, size, device=device)


def crop_batch(
    frames: Sequence[torch.Tensor],
    frame_index: Sequence[int],
    matrices: np.ndarray,
    size: int = 224,
    mode: str = "bicubic",
) -> torch.Tensor:
    """The encoder crops of a batch of faces (``realtime.crop.warp_crop`` for many faces at once).

    Args:
        frames: distinct frames, each (H, W, 3) uint8 RGB on the inference device (sizes may differ).
        frame_index: (N,) per face, which of ``frames`` it is in.
        matrices: (N, 2, 3) float64 frame → crop similarities (``Face.crop_matrix``).
        size: crop side S.
        mode: ``grid_sample`` interpolation; "bicubic" matches OpenCV's INTER_CUBIC kernel.

    Returns:
        (N, 3, S, S) float32 RGB in [0, 1] on the frames' device; black outside the frame.
    """
    crops = _sample(frames, frame_index, matrices, size, mode)
    # Bicubic overshoots at edges; OpenCV saturates to uint8, so clamp to the same range.
    return crops.clamp_(0.0, 255.0).div_(255.0)


def arcface_batch(frames: Sequence[torch.Tensor], frame_index: Sequence[int], matrices: np.ndarray) -> torch.Tensor:
    """MICA's 112×112 ArcFace crops for a batch of faces (``realtime.crop.warp_arcface`` for many at once).

    Args:
        frames: distinct frames, each (H, W, 3) uint8 RGB on the inference device.
        frame_index: (N,) per face, which of ``frames`` it is in.
        matrices: (N, 2, 3) frame → ArcFace crop similarities (``realtime.crop.arcface_matrix``).

    Returns:
        (N, 3, 112, 112) float32 RGB, ``(x − 127.5) / 127.5`` of the 0..255 bilinear samples; black (−1) outside.
    """
    crops = _sample(frames, frame_index, matrices, ARCFACE_SIZE, "bilinear")
    return crops.sub_(127.5).div_(127.5)


class FrameUploader:
    """Copies decoded frames to the inference device.

    On CUDA each frame goes through a page-locked host buffer (kept per frame size and reused) with a
    ``non_blocking`` copy on the given stream, so the copy overlaps the caller's next work. A buffer is
    only refilled after its previous copy finished (an event per buffer), which is why there is a small
    ring of them per size rather than one. On the CPU the frame is wrapped without a copy.
    """

    def __init__(self, device: str | torch.device, buffers: int = 4, sizes: int = 4):
        self.device = torch.device(device)
        if buffers < 1 or sizes < 1:
            raise ValueError(f"buffers and sizes must be at least 1, got {buffers} and {sizes}")
        self.buffers = buffers
        self.sizes = sizes  # frame sizes whose rings are kept (image folders can change size every frame)
        self._rings: OrderedDict[tuple[int, ...], list] = OrderedDict()  # size → [(pinned buffer, copy event)]
        self._next: dict[tuple[int, ...], int] = {}
        self._lock = threading.Lock()

    def upload(self, image: np.ndarray, stream: Optional["torch.cuda.Stream"] = None) -> torch.Tensor:
        """One frame onto the device.

        Args:
            image: (H, W, 3) uint8 RGB.
            stream: CUDA stream for the copy (default: the current stream). Work on another stream must
                wait for it (``other.wait_stream(stream)``) before reading the result.

        Returns:
            (H, W, 3) uint8 on ``self.device``. On the CPU it shares memory with ``image``.
        """
        if image.dtype != np.uint8 or image.ndim != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
        if self.device.type != "cuda":
            return torch.from_numpy(np.ascontiguousarray(image)).to(self.device)
        stream = stream if stream is not None else torch.cuda.current_stream(self.device)
        with self._lock:  # the crop stage and the model stage's fallback may upload at the same time
            return self._upload(image, stream)

    def _upload(self, image: np.ndarray, stream: "torch.cuda.Stream") -> torch.Tensor:
        key = tuple(image.shape)
        ring = self._ring(key)
        slot = self._next.get(key, 0)
        self._next[key] = (slot + 1) % self.buffers
        if slot == len(ring):
            ring.append((torch.empty(key, dtype=torch.uint8, pin_memory=True), None))
        host, last_copy = ring[slot]
        if last_copy is not None:
            last_copy.synchronize()  # the copy that last read this buffer has finished: safe to overwrite
        host.numpy()[...] = image
        with torch.cuda.stream(stream):
            frame = torch.empty(key, dtype=torch.uint8, device=self.device)
            frame.copy_(host, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(stream)
        ring[slot] = (host, copied)
        return frame

    def _ring(self, key: tuple[int, ...]) -> list:
        """The buffer ring for one frame size, most recently used last; the least recently used size is dropped.

        Dropping is safe with copies in flight: PyTorch's pinned allocator keeps a block until its copies finish.
        """
        if key in self._rings:
            self._rings.move_to_end(key)
            return self._rings[key]
        while len(self._rings) >= self.sizes:
            old, _ = self._rings.popitem(last=False)
            del self._next[old]
        self._rings[key] = []
        self._next[key] = 0
        return self._rings[key]
