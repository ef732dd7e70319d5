"""Face tracking with MediaPipe FaceLandmarker: 478 landmarks, 52 blendshapes, a head pose, and the crop box.

inferno boxes a face with the min/max of FAN's 68 iBUG landmarks (spec §3.1). MediaPipe's 478 points
reach higher (the forehead), so the box here is built from the 68 MediaPipe points that sit where the
iBUG points do (``IBUG68_FROM_MEDIAPIPE``), which gives the same box geometry as inferno's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import mediapipe as mp
import numpy as np
from mediapipe.tasks.python import vision
from mediapipe.tasks.python.core.base_options import BaseOptions

from realtime.crop import crop_matrix, square_box
from realtime.errors import AssetError, UserError
from realtime.types import Face, Frame

log = logging.getLogger(__name__)

DEFAULT_MODEL_PATH = Path(__file__).resolve().parent / "data" / "face_landmarker.task"

#: MediaPipe's 52 blendshape category names, in the model's output order.
BLENDSHAPE_NAMES: tuple[str, ...] = (
    "_neutral", "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft", "browOuterUpRight",
    "cheekPuff", "cheekSquintLeft", "cheekSquintRight", "eyeBlinkLeft", "eyeBlinkRight",
    "eyeLookDownLeft", "eyeLookDownRight", "eyeLookInLeft", "eyeLookInRight", "eyeLookOutLeft",
    "eyeLookOutRight", "eyeLookUpLeft", "eyeLookUpRight", "eyeSquintLeft", "eyeSquintRight",
    "eyeWideLeft", "eyeWideRight", "jawForward", "jawLeft", "jawOpen", "jawRight", "mouthClose",
    "mouthDimpleLeft", "mouthDimpleRight", "mouthFrownLeft", "mouthFrownRight", "mouthFunnel",
    "mouthLeft", "mouthLowerDownLeft", "mouthLowerDownRight", "mouthPressLeft", "mouthPressRight",
    "mouthPucker", "mouthRight", "mouthRollLower", "mouthRollUpper", "mouthShrugLower",
    "mouthShrugUpper", "mouthSmileLeft", "mouthSmileRight", "mouthStretchLeft", "mouthStretchRight",
    "mouthUpperUpLeft", "mouthUpperUpRight", "noseSneerLeft", "noseSneerRight",
)  # fmt: skip

#: For each of the 68 iBUG/FAN points (in iBUG order), the MediaPipe FaceMesh vertex at the same place.
#: "Right"/"left" are the subject's; the subject's right is on the image left, as in iBUG's point 0.
#: Derived from the canonical mesh: the face-oval ring for the jaw (temple at eye height → chin → other
#: temple), the upper brow edge, the nose ridge and the nostril base, the eye-lid contours, and the
#: outer/inner lip contours. Points mirror through x = 0 on the canonical mesh (tests/test_tracking.py).
IBUG68_FROM_MEDIAPIPE: tuple[int, ...] = (
    # 0–16 jaw: subject's right temple, down the cheek, chin (8), up to the left temple
    127, 234, 93, 132, 58, 172, 136, 150, 152, 379, 365, 397, 288, 361, 323, 454, 356,
    # 17–21 right brow (outer → inner), 22–26 left brow (inner → outer)
    70, 63, 105, 66, 107, 336, 296, 334, 293, 300,
    # 27–30 nose ridge (between the eyes → tip), 31–35 nostril base (right → left)
    168, 197, 5, 4, 98, 97, 2, 326, 327,
    # 36–41 right eye: outer corner, upper lid ×2, inner corner, lower lid ×2
    33, 160, 158, 133, 153, 144,
    # 42–47 left eye: inner corner, upper lid ×2, outer corner, lower lid ×2
    362, 385, 387, 263, 373, 380,
    # 48–59 outer lips: right corner, upper lip to the left corner, lower lip back
    61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181,
    # 60–67 inner lips: right corner, upper lip, left corner, lower lip
    78, 81, 13, 311, 308, 402, 14, 178,
)  # fmt: skip

_MODES = ("video", "image", "live")
_DEVICES = ("cpu", "gpu")


class FaceTracker:
    """MediaPipe FaceLandmarker wrapped to turn a ``Frame`` into ``Face`` records.

    ``mode``: "video" for files (timestamps from the frames' pts), "image" for independent pictures
    (image folders), "live" for cameras/streams (VIDEO mode on the monotonic clock; dropping stale
    frames is the pipeline's job). One tracker serves one source; it is not thread-safe.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        num_faces: int = 1,
        scale: float = 1.25,
        image_size: int = 224,
        mode: str = "video",
        device: str = "cpu",
        min_confidence: float = 0.5,
    ) -> None:
        if mode not in _MODES:
            raise UserError(f"Unknown tracking mode {mode!r}: use one of {', '.join(_MODES)}.")
        if device not in _DEVICES:
            raise UserError(f"Unknown tracking device {device!r}: use 'cpu' or 'gpu'.")
        if num_faces < 1:
            raise UserError(f"num_faces must be at least 1, got {num_faces}.")
        self.model_path = Path(model_path) if model_path is not None else DEFAULT_MODEL_PATH
        self.num_faces = num_faces
        self.scale = scale
        self.image_size = image_size
        self.mode = mode
        self.min_confidence = min_confidence
        self._last_timestamp_ms = -1
        self._clock_start = time.monotonic()
        self._landmarker, self.device = self._create(device)

    def _create(self, device: str) -> tuple[vision.FaceLandmarker, str]:
        """Build the FaceLandmarker and say on which device; falls back from GPU to CPU with one warning line."""
        if not self.model_path.is_file():
            raise AssetError(
                f"MediaPipe face model not found: {self.model_path}. "
                "Run download_assets.sh or pass the path of face_landmarker.task."
            )
        model = self.model_path.read_bytes()  # a buffer, so non-ASCII paths work too
        running_mode = vision.RunningMode.IMAGE if self.mode == "image" else vision.RunningMode.VIDEO

        def options(delegate: BaseOptions.Delegate) -> vision.FaceLandmarkerOptions:
            return vision.FaceLandmarkerOptions(
                base_options=BaseOptions(model_asset_buffer=model, delegate=delegate),
                running_mode=running_mode,
                num_faces=self.num_faces,
                min_face_detection_confidence=self.min_confidence,
                min_face_presence_confidence=self.min_confidence,
                min_tracking_confidence=self.min_confidence,
                output_face_blendshapes=True,
                output_facial_transformation_matrixes=True,
            )

        if device == "gpu":
            try:
                with _quiet_native_stderr():
                    return vision.FaceLandmarker.create_from_options(options(BaseOptions.Delegate.GPU)), "gpu"
            except (RuntimeError, ValueError) as exc:
                reason = str(exc).splitlines()[0][:120]
                if "kGpuService" in reason:  # MediaPipe's words for "no GPU context could be made"
                    reason = "no OpenGL ES context on a GPU: EGL found no usable GPU display"
                log.warning("MediaPipe GPU delegate unavailable (%s); tracking on the CPU.", reason)
        try:
            with _quiet_native_stderr():
                return vision.FaceLandmarker.create_from_options(options(BaseOptions.Delegate.CPU)), "cpu"
        except (RuntimeError, ValueError) as exc:
            raise AssetError(
                f"{self.model_path} is not a usable MediaPipe FaceLandmarker model ({str(exc).splitlines()[0][:120]}). "
                "Re-download face_landmarker.task (float16, v1)."
            ) from exc

    def _timestamp_ms(self, frame: Frame) -> int:
        """VIDEO-mode timestamp: from pts (files) or the monotonic clock (live), strictly increasing."""
        if self.mode == "live":
            ms = int((time.monotonic() - self._clock_start) * 1000.0)
        else:
            ms = int(frame.pts * 1000.0)
        ms = max(ms, self._last_timestamp_ms + 1)
        self._last_timestamp_ms = ms
        return ms

    def track(self, frame: Frame) -> list[Face]:
        """Detect and landmark the faces of one frame, in MediaPipe's order.

        Returns:
            One ``Face`` per detection (``index`` = ``track_id`` = detection order); empty if none.
        """
        image = np.ascontiguousarray(frame.image, dtype=np.uint8)
        height, width = image.shape[:2]
        mp_image = mp.Image(image_format=mp.ImageFormat.SRGB, data=image)
        if self.mode == "image":
            result = self._landmarker.detect(mp_image)
        else:
            result = self._landmarker.detect_for_video(mp_image, self._timestamp_ms(frame))
        faces = []
        for k, points in enumerate(result.face_landmarks):
            landmarks = np.array([(p.x * width, p.y * height, p.z * width) for p in points], dtype=np.float32)
            blendshapes = np.array([c.score for c in result.face_blendshapes[k]], dtype=np.float32)
            transform = np.asarray(result.facial_transformation_matrixes[k], dtype=np.float32).reshape(4, 4)
            center, size = square_box(landmarks[list(IBUG68_FROM_MEDIAPIPE), :2], self.scale)
            faces.append(
                Face(
                    index=k,
                    track_id=k,
                    landmarks=landmarks,
                    blendshapes=blendshapes,
                    transform=transform,
                    center=center,
                    size=size,
                    crop_matrix=crop_matrix(center, size, self.image_size),
                )
            )
        return faces

    def close(self) -> None:
        """Release the MediaPipe graph (idempotent)."""
        if self._landmarker is not None:
            self._landmarker.close()
            self._landmarker = None

    def __enter__(self) -> "FaceTracker":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# What MediaPipe's C++ side prints to fd 2 while a graph starts: absl/glog lines ("W0000 00:00:…"), their stack
# traces, TFLite's "INFO: …" and absl's warning that logging is not initialised.
_NATIVE_LOG_LINE = re.compile(r"([IWEF]\d{4} |Stack trace:|\s+@\s|INFO: |WARNING: Logging before InitGoogle)")
# fd 2 belongs to the whole process: two trackers starting at once must not swap it in turn.
_STDERR_SWAP = threading.Lock()


@contextlib.contextmanager
def _quiet_native_stderr():
    """Hold back fd 2 while MediaPipe's C++ graph starts: its log lines (which GLOG_minloglevel does not reach,
    and a page of EGL stack traces when the GPU delegate is unavailable) go to the debug log; whatever else was
    written to fd 2 meanwhile (another thread's log line) is passed on afterwards, so nothing of ours is lost."""
    with _STDERR_SWAP:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):  # no real fd 2 (e.g. captured by a test runner): nothing to quiet
            yield
            return
        with tempfile.TemporaryFile() as held:
            os.dup2(held.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                held.seek(0)
                lines = held.read().decode(errors="replace").splitlines(keepends=True)
    native = "".join(line for line in lines if _NATIVE_LOG_LINE.match(line))
    if native:
        log.debug("MediaPipe start-up output:\n%s", native.rstrip())
    other = "".join(line for line in lines if not _NATIVE_LOG_LINE.match(line))
    if other:
        sys.stderr.write(other)
        sys.stderr.flush()
