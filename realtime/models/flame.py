"""The FLAME head model as inferno's ``FLAME_mediapipe`` (emica_spec.md §4.1-4.2), export-friendly.

The module's ``state_dict`` has exactly the keys, shapes and dtypes of inferno's
``shape_model.flame.*`` entries, so the buffers of a released EMICA checkpoint load into it strictly
(and overwrite the ones read from the FLAME files, as in inferno).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from realtime.errors import AssetError
from realtime.models.flame_assets import FLAME_HINT, FlameAssets
from realtime.models.lbs import batch_rodrigues, lbs, vertices2landmarks

#: Rows of the dynamic contour table: 0..39 for yaw 0..39°, 40..78 for yaw -1..-39° (78 also < -39°).
CONTOUR_MAX_DEGREES = 39


def contour_rows_from_yaw(yaw_degrees: torch.Tensor) -> torch.Tensor:
    """Row of FLAME's dynamic-contour table for a head yaw, exactly as inferno's FLAME method.

    ``a = round(clamp(yaw, max=39))`` with round-half-to-even, then negative angles map to
    ``39 - a`` (and everything below -39° to row 78).

    Args:
        yaw_degrees: (B,) float.

    Returns:
        (B,) int64 rows in [0, 78].
    """
    angle = torch.round(torch.clamp(yaw_degrees, max=CONTOUR_MAX_DEGREES)).to(torch.int64)
    beyond = torch.full_like(angle, 2 * CONTOUR_MAX_DEGREES)
    negative = torch.where(angle < -CONTOUR_MAX_DEGREES, beyond, CONTOUR_MAX_DEGREES - angle)
    return torch.where(angle < 0, negative, angle)


def head_yaw_degrees(global_rot: torch.Tensor, neck_rot: torch.Tensor) -> torch.Tensor:
    """Yaw of the head (global then neck rotation), in degrees, as inferno's ``FLAME`` method.

    ``atan2(-R[2,0], sqrt(R[0,0]² + R[1,0]²))`` of ``R = R_global @ R_neck``: positive when the
    head turns toward its left (+x). This is the class method's formula, which has no minus sign
    in front (unlike the free function of the same name in inferno's lbs.py).

    Args:
        global_rot: (B, 3, 3).
        neck_rot: (B, 3, 3).

    Returns:
        (B,) float.
    """
    rel = torch.matmul(global_rot, neck_rot)
    cos_yaw = torch.sqrt(rel[:, 0, 0] * rel[:, 0, 0] + rel[:, 1, 0] * rel[:, 1, 0])
    # Same operation order as inferno (·180, then /π) so half-degree boundaries round alike.
    return torch.atan2(-rel[:, 2, 0], cos_yaw) * 180.0 / math.pi


def _pad_codes(codes: torch.Tensor, size: int, name: str) -> torch.Tensor:
    """Zero-pad (B, n) codes to (B, size), as inferno's FlameShapeModel does for short codes."""
    if codes.shape[1] > size:
        raise ValueError(f"{name} has {codes.shape[1]} coefficients, FLAME was built with {size}")
    return F.pad(codes, (0, size - codes.shape[1])) if codes.shape[1] < size else codes


class FLAME(nn.Module):
    """FLAME 2020 with DECA's 68 landmarks and (when the embedding is given) 105 MediaPipe ones.

    Pose is [global, neck, jaw, eyes] with neck and eyes taken from the frozen ``neck_pose`` and
    ``eye_pose`` parameters (zeros unless a checkpoint says otherwise). There is no translation:
    it lives in the camera.
    """

    def __init__(self, assets: FlameAssets, n_shape: int = 300, n_exp: int = 100):
        super().__init__()
        num_components = assets.shapedirs.shape[2]
        if n_shape > 300 or 300 + n_exp > num_components:
            raise AssetError(
                f"FLAME model {assets.flame_model_path} has {num_components} blend shapes; "
                f"n_shape={n_shape} (at most 300) and n_exp={n_exp} (at most {num_components - 300}) do not fit; "
                f"{FLAME_HINT}."
            )
        self.n_shape = n_shape
        self.n_exp = n_exp

        def as_float(array: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32)

        def as_long(array: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.ascontiguousarray(array), dtype=torch.int64)

        # Parameters first: inferno registers them as frozen nn.Parameters, so they are in checkpoints.
        self.eye_pose = nn.Parameter(torch.zeros(1, 6), requires_grad=False)
        self.neck_pose = nn.Parameter(torch.zeros(1, 3), requires_grad=False)

        # Buffers in inferno's order and layout.
        self.register_buffer("faces_tensor", as_long(assets.faces))
        self.register_buffer("v_template", as_float(assets.v_template))
        shapedirs = np.concatenate(
            [assets.shapedirs[:, :, :n_shape], assets.shapedirs[:, :, 300 : 300 + n_exp]], axis=2
        )
        self.register_buffer("shapedirs", as_float(shapedirs))
        num_pose_basis = assets.posedirs.shape[-1]
        self.register_buffer("posedirs", as_float(assets.posedirs.reshape(-1, num_pose_basis).T))
        self.register_buffer("J_regressor", as_float(assets.j_regressor))
        self.register_buffer("parents", as_long(assets.parents))
        self.register_buffer("lbs_weights", as_float(assets.lbs_weights))
        self.register_buffer("lmk_faces_idx", as_long(assets.static_lmk_faces_idx))
        self.register_buffer("lmk_bary_coords", as_float(assets.static_lmk_bary_coords))
        self.register_buffer("dynamic_lmk_faces_idx", as_long(assets.dynamic_lmk_faces_idx))
        self.register_buffer("dynamic_lmk_bary_coords", as_float(assets.dynamic_lmk_bary_coords))
        self.register_buffer("full_lmk_faces_idx", as_long(assets.full_lmk_faces_idx))
        self.register_buffer("full_lmk_bary_coords", as_float(assets.full_lmk_bary_coords))
        # Neck → root: the chain whose rotations decide the contour (hard-coded in forward).
        self.register_buffer("neck_kin_chain", torch.tensor([1, 0], dtype=torch.int64))
        self.has_mediapipe = assets.mediapipe_lmk_faces_idx is not None
        if self.has_mediapipe:
            self.register_buffer("lmk_faces_idx_mediapipe", as_long(assets.mediapipe_lmk_faces_idx))
            self.register_buffer("lmk_bary_coords_mediapipe", as_float(assets.mediapipe_lmk_bary_coords))

    @property
    def faces(self) -> np.ndarray:
        """(F, 3) int32 triangle indices on the CPU (for :class:`realtime.types.Reconstruction`)."""
        return self.faces_tensor.detach().cpu().numpy().astype(np.int32)

    def forward(
        self,
        shape: torch.Tensor,
        expression: torch.Tensor,
        global_pose: torch.Tensor,
        jaw_pose: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Pose and shape the head.

        Args:
            shape: (B, ≤ n_shape) identity coefficients (zero-padded when shorter).
            expression: (B, ≤ n_exp) expression coefficients (zero-padded when shorter).
            global_pose: (B, 3) axis-angle head rotation.
            jaw_pose: (B, 3) axis-angle jaw rotation.

        Returns:
            ``vertices`` (B, V, 3); ``landmarks2d`` (B, 68, 3): 17 yaw-dependent contour points then
            51 static ones, iBUG order; ``landmarks3d`` (B, 68, 3) from the full embedding; and
            ``landmarks_mediapipe`` (B, 105, 3) when the model has the MediaPipe embedding.
            All in FLAME world space (metres, y up, z toward the camera).
        """
        batch_size = shape.shape[0]
        betas = torch.cat(
            [_pad_codes(shape, self.n_shape, "shape"), _pad_codes(expression, self.n_exp, "expression")], dim=1
        )
        full_pose = torch.cat(
            [global_pose, self.neck_pose.expand(batch_size, -1), jaw_pose, self.eye_pose.expand(batch_size, -1)],
            dim=1,
        )
        rot_mats = batch_rodrigues(full_pose.reshape(-1, 3)).view(batch_size, -1, 3, 3)
        vertices = lbs(
            betas, rot_mats, self.v_template, self.shapedirs, self.posedirs, self.J_regressor, self.lbs_weights
        )

        rows = contour_rows_from_yaw(head_yaw_degrees(rot_mats[:, 0], rot_mats[:, 1]))
        contour_faces = torch.index_select(self.dynamic_lmk_faces_idx, 0, rows)  # (B, 17)
        contour_bary = torch.index_select(self.dynamic_lmk_bary_coords, 0, rows)  # (B, 17, 3)
        lmk_faces = torch.cat([contour_faces, self.lmk_faces_idx.unsqueeze(0).expand(batch_size, -1)], dim=1)
        lmk_bary = torch.cat([contour_bary, self.lmk_bary_coords.unsqueeze(0).expand(batch_size, -1, -1)], dim=1)

        outputs = {
            "vertices": vertices,
            "landmarks2d": vertices2landmarks(vertices, self.faces_tensor, lmk_faces, lmk_bary),
            "landmarks3d": vertices2landmarks(
                vertices, self.faces_tensor, self.full_lmk_faces_idx[0], self.full_lmk_bary_coords[0]
            ),
        }
        if self.has_mediapipe:
            outputs["landmarks_mediapipe"] = vertices2landmarks(
                vertices, self.faces_tensor, self.lmk_faces_idx_mediapipe, self.lmk_bary_coords_mediapipe
            )
        return outputs
