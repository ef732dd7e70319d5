"""Reconstructors: tracked faces in, `Reconstruction`s out. One interface for every model.

- `MediaPipeMeshReconstructor`: MediaPipe's own 3D face mesh (478 landmarks on the canonical
  468-vertex topology). Needs no licensed download, so every use works out of the box.
- `ModelReconstructor`: EMICA / EMOCA / DECA through `realtime.models.load_model`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Protocol

import numpy as np

from .config import EMBEDDED_MODEL, RunConfig
from .crop import square_box
from .errors import AssetError
from .types import Face, FrameResult, Reconstruction

log = logging.getLogger("realtime")


class Reconstructor(Protocol):
    """What the pipeline's model stage calls. A reconstructor that also has ``prepare(result)`` (cut the frame's
    network inputs ahead, on the crop stage's thread) gets a crop stage before its model stage; the MediaPipe mesh
    needs no crops and has none."""

    name: str

    def reconstruct(self, batch: list[FrameResult]) -> None:
        """Fill `result.reconstructions` for every result in the batch (one per face, in face order), then
        free the per-track state of each result's `retired_tracks`."""

    def temporal_codes(self, rec: Reconstruction) -> dict[str, np.ndarray]:
        """The per-frame values of `rec` that look-ahead smoothing replaces (names from realtime.smoothing.KEY_GROUPS)."""

    def redecode(self, recs: list[Reconstruction], codes: list[dict[str, np.ndarray]]) -> list[Reconstruction]:
        """New reconstructions of the same faces with `codes[i]` in place of `temporal_codes(recs[i])`."""


class MediaPipeMeshReconstructor:
    """MediaPipe's 3D landmarks as a mesh.

    World space is face-centred and measured in box sizes: x right, y up, z toward the camera
    (MediaPipe's z grows away from the camera, so it is negated); `world_to_frame` undoes that.
    """

    name = EMBEDDED_MODEL

    def __init__(self, model_path: Optional[str] = None, smoother=None, scale: float = 1.25):
        from .face_mesh import canonical_face_mesh
        from .tracking import IBUG68_FROM_MEDIAPIPE

        self._outline = list(IBUG68_FROM_MEDIAPIPE)
        self.smoother = smoother  # realtime.smoothing.ParamSmoother, or None for raw per-frame output
        self.scale = scale  # the tracker's box scale (--scale), so world units are the crop box's size
        _, uv, triangles = canonical_face_mesh(model_path)
        self.faces = np.ascontiguousarray(triangles, dtype=np.int32)
        self.uv = uv
        self.n_vertices = int(self.faces.max()) + 1  # 468: the iris points (468..477) are not part of the mesh

    def reconstruct(self, batch: list[FrameResult]) -> None:
        for result in batch:
            result.reconstructions = [self._one(face, result.frame.pts) for face in result.faces]
            # After the frame's own faces: a retired id shows up in no later frame, so its filters are dead weight.
            if self.smoother is not None:
                for track_id in result.retired_tracks:
                    self.smoother.reset(track_id)

    def _one(self, face: Face, time: float) -> Reconstruction:
        landmarks = face.landmarks
        if self.smoother is not None:
            landmarks = self.smoother.smooth(face.track_id, {"landmarks": landmarks}, time)["landmarks"]
        return self._mesh(face, landmarks)

    def _mesh(self, face: Face, landmarks: np.ndarray) -> Reconstruction:
        """The mesh of (478, 3) frame-pixel landmarks, in the box-normalised world space of those landmarks.

        The box is inferno's (68-point extent × 1.1 × scale) but measured on the given landmarks and not
        rounded to whole pixels: the tracker's box comes from the raw landmarks, and normalising smoothed
        landmarks by it would put the raw jitter back into the mesh.
        """
        pts = landmarks[: self.n_vertices].astype(np.float64)
        (cx, cy), side = square_box(landmarks[self._outline, :2], self.scale, whole_pixels=False)
        s = max(side, 1.0)  # a point-sized detection: 1 px, not a 0 divide
        world = np.empty_like(pts)
        world[:, 0] = (pts[:, 0] - cx) / s
        world[:, 1] = -(pts[:, 1] - cy) / s
        world[:, 2] = -pts[:, 2] / s
        world_to_frame = np.array(
            [[s, 0, 0, cx], [0, -s, 0, cy], [0, 0, -s, 0], [0, 0, 0, 1]], dtype=np.float64
        )
        return Reconstruction(
            face=face,
            vertices=world.astype(np.float32),
            faces=self.faces,
            world_to_frame=world_to_frame,
            codes={"blendshapes": face.blendshapes.astype(np.float32), "transform": face.transform.astype(np.float32)},
            landmarks=landmarks[:, :2].astype(np.float32),
        )

    # -- look-ahead smoothing (realtime.lookahead) ----------------------------------------------
    def temporal_codes(self, rec: Reconstruction) -> dict[str, np.ndarray]:
        """The per-frame values that temporal smoothing acts on: the tracked landmarks the mesh is built from."""
        return {"landmarks": rec.face.landmarks}

    def redecode(self, recs: list[Reconstruction], codes: list[dict[str, np.ndarray]]) -> list[Reconstruction]:
        """Rebuild each mesh from smoothed landmarks (`codes[i]["landmarks"]`, (478, 3) frame pixels)."""
        return [self._mesh(rec.face, c["landmarks"]) for rec, c in zip(recs, codes)]


def model_folder(cfg: RunConfig) -> Path:
    """Where `<name>/cfg.yaml` of the configured model is expected (inferno's layout)."""
    from .models.registry import model_info

    m = cfg.model
    models = Path(m.path_to_models) if m.path_to_models else Path(m.assets_dir) / model_info(m.name).models_subdir
    return models / m.name


def create_smoother(cfg: RunConfig, live: bool):
    """Causal temporal filtering inside the model: on by default for live input (`--smoothing auto`), off for
    files. `--smoothing lookahead` smooths after the model instead (realtime.lookahead), so none here."""
    mode = cfg.output.smoothing
    if mode in ("off", "lookahead") or (mode == "auto" and not live):
        return None
    from .smoothing import ParamSmoother

    return ParamSmoother("default")


def create_reconstructor(cfg: RunConfig, live: bool = False, stable_tracks: bool = True) -> Reconstructor:
    """The model the config asks for; the embedded MediaPipe mesh when the default EMICA is not installed.

    `stable_tracks` is False for image folders: face k of one photo is not face k of the next, so no
    identity is shared between them.
    """
    m = cfg.model
    smoother = create_smoother(cfg, live)
    if m.name == EMBEDDED_MODEL:
        return MediaPipeMeshReconstructor(smoother=smoother, scale=cfg.tracking.scale)
    where = model_folder(cfg)
    if not (where / "cfg.yaml").is_file() and not m.name_given:
        if m.mode == "detail":
            raise AssetError(f"--mode detail needs the EMICA and EMOCA assets, and {where}/cfg.yaml is missing: "
                             "install them with `bash download_assets.sh` (the embedded MediaPipe mesh has no detail branch)")
        log.info(
            "EMICA assets not found (%s); running the embedded MediaPipe face mesh. "
            "Install EMICA with: bash download_assets.sh", where,
        )
        return MediaPipeMeshReconstructor(smoother=smoother, scale=cfg.tracking.scale)
    from .model_runtime import ModelReconstructor

    return ModelReconstructor(cfg, smoother=smoother, identity_cache=m.identity_cache and stable_tracks)
