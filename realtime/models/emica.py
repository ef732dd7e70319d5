"""EMICA (inferno's FaceReconstruction ``EmicaEncoder`` + ``FlameShapeModel``), coarse, optionally with a
DECA/EMOCA detail branch.

Per face: MICA (ArcFace 112² → shape 300), a DECA ResNet-50 (224² → tex 50 | jaw 3 | global 3 | cam 3 |
light 27 in the released split) and an EMOCA ResNet-50 (224² → expression 100), then FLAME and the orthographic
camera. The module tree and names equal inferno's, so ``state_dict()`` keys equal the released checkpoint's
(``face_encoder.mica_deca_encoder.mica_encoder.E_mica.arcface…``, ``shape_model.flame.*``); the renderer's
buffers are not kept (rebuilt from the FLAME files by the renderer).

``encode`` runs the image networks (export them alone; pass a cached ``shapecode`` to skip MICA; or call
``encode_identity`` and ``encode_frame`` apart) and ``decode`` turns codes into geometry; ``forward`` does both
and returns inferno's output names.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .camera import orthographic_project, to_image_space
from .detail import DetailBranch
from .encoders import DecaEncoder, split_code
from .flame import FLAME
from .mica import SHAPE_DIM, MicaEncoder, arcface_input_from_crop
from .registry import DEFAULT_DECA_PREDICTS, DEFAULT_EXPRESSION_PREDICTS

IMAGE_SIZE = 224
ARCFACE_SIZE = 112


class MicaDecaEncoder(nn.Module):
    """MICA (identity) and the DECA branch (texture, poses, camera, light)."""

    def __init__(self, deca_outsize: int):
        super().__init__()
        self.mica_encoder = MicaEncoder()
        self.deca_encoder = DecaEncoder(deca_outsize)


class EmicaEncoder(nn.Module):
    """The three image networks; ``expression_encoder`` is EMOCA's (same structure as the DECA branch)."""

    def __init__(self, deca_outsize: int, expression_outsize: int):
        super().__init__()
        self.mica_deca_encoder = MicaDecaEncoder(deca_outsize)
        self.expression_encoder = DecaEncoder(expression_outsize)


class FlameShapeModel(nn.Module):
    """Holds FLAME under inferno's name (``shape_model.flame.*``)."""

    def __init__(self, flame: FLAME):
        super().__init__()
        self.flame = flame


def project_to_image(flame_out: Mapping[str, torch.Tensor], cam: torch.Tensor) -> dict[str, torch.Tensor]:
    """FLAME outputs → inferno's camera-space outputs (spec §4.3), without the renderer's +10 on z.

    Args:
        flame_out: ``vertices`` (B, V, 3), ``landmarks2d`` / ``landmarks3d`` (B, 68, 3), optionally
            ``landmarks_mediapipe`` (B, 105, 3), all FLAME world space.
        cam: (B, 3) weak-perspective [s, tx, ty].

    Returns:
        ``verts`` (world), ``trans_verts`` (B, V, 3) = s·(v + t) with y and z negated; ``predicted_landmarks``,
        ``predicted_landmarks_3d`` (B, 68, 2) and ``predicted_landmarks_mediapipe`` (B, 105, 2): projected xy with y
        negated (x right, y down, about [-1, 1] over the 224 crop); the ``*_flame_space`` world landmarks.
    """
    out = {
        "verts": flame_out["vertices"],
        "trans_verts": to_image_space(orthographic_project(flame_out["vertices"], cam)),
        "predicted_landmarks2d_flame_space": flame_out["landmarks2d"],
        "predicted_landmarks3d_flame_space": flame_out["landmarks3d"],
        "predicted_landmarks": to_image_space(orthographic_project(flame_out["landmarks2d"], cam))[..., :2],
        "predicted_landmarks_3d": to_image_space(orthographic_project(flame_out["landmarks3d"], cam))[..., :2],
    }
    if "landmarks_mediapipe" in flame_out:
        out["predicted_landmarks2d_mediapipe_flame_space"] = flame_out["landmarks_mediapipe"]
        out["predicted_landmarks_mediapipe"] = to_image_space(
            orthographic_project(flame_out["landmarks_mediapipe"], cam)
        )[..., :2]
    return out


def check_image(image: torch.Tensor, size: int, name: str) -> None:
    if image.dim() != 4 or tuple(image.shape[1:]) != (3, size, size):
        raise ValueError(f"{name} must be (B, 3, {size}, {size}), got {tuple(image.shape)}")


class FlameFaceModel(nn.Module):
    """What EMICA, EMOCA and DECA share after their image networks: codes → FLAME → image space, plus the
    detail maps when a detail branch is on. Subclasses implement ``encode`` and say where their state dict
    keeps FLAME (``flame_layer``) and how their detail branch decodes (``decode_detail``)."""

    @property
    def flame_layer(self) -> FLAME:
        raise NotImplementedError

    def encode(
        self, image: torch.Tensor, mica_image: torch.Tensor | None = None, shapecode: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def decode_detail(
        self, codes: Mapping[str, torch.Tensor], vertices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(displacement_map, uv_detail_normals) for coarse world vertices (B, V, 3); None when coarse only."""
        raise NotImplementedError

    @property
    def faces(self) -> torch.Tensor:
        """(F, 3) int64 FLAME triangles."""
        return self.flame_layer.faces_tensor

    def decode(self, codes: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Codes (as from ``encode``) → geometry (see ``project_to_image``), plus ``displacement_map``
        (B, 1, 256, 256) and ``uv_detail_normals`` (B, 3, 256, 256) with a detail branch."""
        flame_out = self.flame_layer(codes["shapecode"], codes["expcode"], codes["globalpose"], codes["jawpose"])
        geometry = project_to_image(flame_out, codes["cam"])
        detail = self.decode_detail(codes, geometry["verts"])
        if detail is not None:
            geometry["displacement_map"], geometry["uv_detail_normals"] = detail
        return geometry

    def forward(
        self, image: torch.Tensor, mica_image: torch.Tensor | None = None, shapecode: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``encode`` then ``decode``: all codes and geometry in one dict, inferno's names."""
        codes = self.encode(image, mica_image, shapecode)
        return {**codes, **self.decode(codes)}


class EMICA(FlameFaceModel):
    """EMICA coarse (+ optional detail branch borrowed from an EMOCA/DECA checkpoint).

    Args:
        flame: the FLAME layer (n_shape 300, n_exp = expression size).
        deca_predicts / expression_predicts: split of each branch's raw code, in the cfg's ``predicts`` order.
            Names: texcode, jawpose, globalpose, cam, lightcode, expcode. If both branches predict a code, the
            expression branch wins (inferno writes its outputs last); no ``jawpose`` at all means a zero jaw.
        detail: DECA/EMOCA detail branch, or None for coarse only.
    """

    def __init__(
        self,
        flame: FLAME,
        deca_predicts: Mapping[str, int] = DEFAULT_DECA_PREDICTS,
        expression_predicts: Mapping[str, int] = DEFAULT_EXPRESSION_PREDICTS,
        detail: DetailBranch | None = None,
    ):
        super().__init__()
        self.deca_predicts = dict(deca_predicts)
        self.expression_predicts = dict(expression_predicts)
        self.face_encoder = EmicaEncoder(sum(self.deca_predicts.values()), sum(self.expression_predicts.values()))
        self.shape_model = FlameShapeModel(flame)
        self.detail = detail

    @property
    def flame_layer(self) -> FLAME:
        return self.shape_model.flame

    def encode(
        self, image: torch.Tensor, mica_image: torch.Tensor | None = None, shapecode: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Run the image networks: ``encode_identity`` (unless ``shapecode`` is given) and ``encode_frame``.

        Args:
            image: (B, 3, 224, 224) RGB in [0, 1], the face crop. Fed to both ResNets exactly as given (no
                mean/std normalisation, as inferno).
            mica_image: (B, 3, 112, 112) ArcFace-aligned crop, RGB in [-1, 1] ((x − 127.5) / 127.5 on 0..255).
                None: a 2x2-averaged copy of ``image`` (a centred resize, not inferno's SCRFD alignment; see
                ``mica.arcface_input_from_crop``).
            shapecode: (B, 300) identity from an earlier frame of the same face; MICA is skipped.

        Returns:
            ``shapecode`` (B, 300), ``texcode`` (B, 50), ``jawpose`` (B, 3), ``globalpose`` (B, 3), ``cam`` (B, 3),
            ``lightcode`` (B, 27, flat), ``expcode`` (B, 100); plus ``detailcode`` (B, 128) with a detail branch.
        """
        check_image(image, IMAGE_SIZE, "image")
        if shapecode is None:
            shapecode = self.encode_identity(arcface_input_from_crop(image) if mica_image is None else mica_image)
        elif tuple(shapecode.shape) != (image.shape[0], SHAPE_DIM):
            raise ValueError(f"shapecode must be ({image.shape[0]}, {SHAPE_DIM}), got {tuple(shapecode.shape)}")
        return {"shapecode": shapecode, **self.encode_frame(image)}

    def encode_identity(self, mica_image: torch.Tensor) -> torch.Tensor:
        """MICA: (B, 3, 112, 112) ArcFace crop in [-1, 1] → shapecode (B, 300)."""
        check_image(mica_image, ARCFACE_SIZE, "mica_image")
        return self.face_encoder.mica_deca_encoder.mica_encoder(mica_image)

    def encode_frame(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """The per-frame codes (all but ``shapecode``, see ``encode``) from the (B, 3, 224, 224) crop."""
        check_image(image, IMAGE_SIZE, "image")
        encoders = self.face_encoder
        codes = split_code(encoders.mica_deca_encoder.deca_encoder(image), self.deca_predicts)
        codes.update(split_code(encoders.expression_encoder(image), self.expression_predicts))
        if "jawpose" not in codes:  # the FLAME 2023 "no jaw" variants
            codes["jawpose"] = codes["globalpose"].new_zeros(image.shape[0], 3)
        if self.detail is not None:
            codes["detailcode"] = self.detail.encode(image)
        return codes

    def decode_detail(self, codes: Mapping[str, torch.Tensor], vertices: torch.Tensor):
        if self.detail is None:
            return None
        return self.detail.decode(codes["jawpose"], codes["expcode"], codes["detailcode"], vertices)
