"""Plain data passed between pipeline stages: source → tracker → model → renderer → sinks.

Conventions used everywhere:
- Images are HxWx3 ``uint8`` RGB, C-contiguous.
- Frame pixel coordinates: x to the right, y down, pixel centres at integers.
- "World" (model) space is FLAME's: x to the subject's left (image right), y up, z toward the
  camera. Every reconstruction (FLAME or MediaPipe's own mesh) gives vertices in such a space and
  an affine ``world_to_frame`` that maps them into frame pixels, so one renderer draws them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class AudioChunk:
    """Decoded audio that belongs just before/with a video frame."""

    pts: float  # seconds, start of the first sample, on the same clock as Frame.pts
    sample_rate: int
    samples: np.ndarray  # (n, channels) float32 in [-1, 1]


@dataclass
class Frame:
    """One decoded input picture."""

    index: int  # 0-based position in the source (file frame number, or capture counter)
    pts: float  # presentation time in seconds (files: stream time; live: seconds since start)
    image: np.ndarray  # (H, W, 3) uint8 RGB
    audio: list[AudioChunk] = field(default_factory=list)  # audio decoded since the previous frame
    name: Optional[str] = None  # image folders: the file stem; else None
    captured_at: float = 0.0  # time.perf_counter() when it left the source, for latency stats


@dataclass
class Face:
    """One tracked face in a frame (MediaPipe FaceLandmarker output plus crop geometry)."""

    index: int  # detection index k within the frame (inferno's `<frame>_<k:03d>`)
    track_id: int  # stable across frames where the tracker can tell
    landmarks: np.ndarray  # (478, 3) float32: x, y in frame pixels; z in pixels (MediaPipe scale, smaller = nearer)
    blendshapes: np.ndarray  # (52,) float32, MediaPipe's order (realtime.tracking.BLENDSHAPE_NAMES)
    transform: np.ndarray  # (4, 4) float32, MediaPipe's facial transformation matrix
    center: tuple[float, float]  # square box centre in frame pixels (inferno bbox2point)
    size: float  # square box side in frame pixels, int-truncated like inferno
    crop_matrix: np.ndarray  # (2, 3) float64: frame pixel (x, y, 1) → crop pixel (col, row) of the image_size crop

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of the square box in frame pixels."""
        cx, cy = self.center
        h = self.size / 2.0
        return (cx - h, cy - h, cx + h, cy + h)


@dataclass
class Reconstruction:
    """A reconstructed face: a mesh plus how it lands in the frame."""

    face: Face
    vertices: np.ndarray  # (V, 3) float32 in world space (y up, z toward the camera)
    faces: np.ndarray  # (F, 3) int32 triangle indices (shared by every reconstruction of a model)
    world_to_frame: np.ndarray  # (4, 4) float64 affine: world (x,y,z,1) → (x_px, y_px, depth, 1); smaller depth = nearer
    codes: dict[str, np.ndarray] = field(default_factory=dict)  # per-face model outputs, no batch dim
    landmarks: Optional[np.ndarray] = None  # (N, 2) float32 projected model landmarks in frame pixels
    # Detail mode: a world-space normal map in UV space, DECA's layout (row 0 is v = 1, column 0 is u = 0),
    # with the UV topology that indexes it (FLAME has seams: uv vertices differ from mesh vertices).
    detail_normals: Optional[np.ndarray] = None  # (Huv, Wuv, 3) float32
    uvcoords: Optional[np.ndarray] = None  # (T, 2) float32 in [0, 1]
    uvfaces: Optional[np.ndarray] = None  # (F, 3) int32, corners of `faces` → rows of `uvcoords`
    # inferno's per-face geometry.png: the shaded mesh in the encoder crop, filled by the render stage
    # when per-frame images are saved (the GL context lives in that thread).
    crop_image: Optional[np.ndarray] = None  # (S, S, 3) uint8

    def frame_points(self, points: Optional[np.ndarray] = None) -> np.ndarray:
        """Map world points (default: the vertices) to frame pixels: (N, 3) → (N, 3) [x_px, y_px, depth]."""
        p = self.vertices if points is None else points
        m = self.world_to_frame
        return (p.astype(np.float64) @ m[:3, :3].T + m[:3, 3]).astype(np.float32)


@dataclass
class FrameResult:
    """Everything known about one frame; each stage fills in its part and passes it on."""

    frame: Frame
    faces: list[Face] = field(default_factory=list)
    reconstructions: list[Reconstruction] = field(default_factory=list)
    rendered: Optional[np.ndarray] = None  # (H, W, 3) uint8 reconstruction image on black
    mask: Optional[np.ndarray] = None  # (H, W) uint8 coverage, 255 where the mesh was drawn
    composite: Optional[np.ndarray] = None  # the output panel image (H', W', 3) uint8
    timings: dict[str, float] = field(default_factory=dict)  # stage name → milliseconds
    dropped_before: int = 0  # live input: frames dropped (latest-wins) since the previous result
    skipped_faces: int = 0  # faces dropped this frame (e.g. non-finite model output)
    replay: bool = False  # --resume: done by an earlier run; only tracked (to restore tracker state), not output
    # Tracks retired by the tracker at this frame (never seen again: ids are not reused). They travel with the
    # frame so the model stage frees their per-track state (identity codes, smoothing filters) once it has
    # processed the frame's faces, in stream order, without calling back up the pipeline.
    retired_tracks: tuple[int, ...] = ()
    # The model's input crops for `faces`, cut ahead of the model stage by its crop stage (on a GPU: already
    # on the device), so cropping frame k+1 overlaps inference on frame k. Opaque here: see realtime.model_runtime.
    model_inputs: Optional[object] = None

    def absorb(self, dropped: "FrameResult") -> None:
        """Take over what must outlive an earlier frame that a live queue drops in favour of this one: its drop
        count, its sound (so the audio track stays whole) and its retired tracks (or the model stage would hold
        their state for good)."""
        self.dropped_before += dropped.dropped_before + 1
        self.frame.audio = dropped.frame.audio + self.frame.audio
        self.retired_tracks = dropped.retired_tracks + self.retired_tracks
