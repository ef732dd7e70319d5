"""DECA / EMOCA detail branch: E_detail (image → 128-d detail code) and D_detail (code → UV displacement).

``DetailGenerator`` is DECA's ``Generator`` (inferno/models/DecaDecoder.py) with the same state-dict names
(``l1.0.*``, ``conv_blocks.N.*``). Two quirks are kept on purpose because the weights were trained with them:
the first BatchNorm has eps 1e-5 but the five after the convolutions have **eps 0.8** (DECA passes 0.8 as the
second positional argument of ``BatchNorm2d``, which is eps), and the output is ``tanh(.) * 0.01``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .encoders import ResnetEncoder
from .flame_assets import ObjMesh, read_fixed_displacement, read_mask, read_obj
from .lbs import vertex_face_incidence
from .registry import DetailFiles
from .uv import UVRaster, build_uv_rasterization, displacement_to_normals

DETAIL_CODE_DIM = 128
UV_SIZE = 256
# D_detail's input: [jaw pose (3), expression (n_exp), detail code (128)]; DECA/EMOCA use n_exp = 50.
DETAIL_EXP_DIM = 50
DETAIL_COND_DIM = 3 + DETAIL_EXP_DIM + DETAIL_CODE_DIM

_CHANNELS = (128, 128, 64, 64, 32, 16)  # 8² → 16² → 32² → 64² → 128² → 256²
_INIT_SIZE = 8


class DetailGenerator(nn.Module):
    """D_detail: condition (B, latent_dim) → displacement ``uv_z`` (B, 1, 256, 256), in [-0.01, 0.01]."""

    def __init__(self, latent_dim: int = DETAIL_COND_DIM, out_scale: float = 0.01):
        super().__init__()
        self.out_scale = out_scale
        self.l1 = nn.Sequential(nn.Linear(latent_dim, _CHANNELS[0] * _INIT_SIZE**2))
        blocks: list[nn.Module] = [nn.BatchNorm2d(_CHANNELS[0])]
        for c_in, c_out in zip(_CHANNELS[:-1], _CHANNELS[1:]):
            blocks += [
                nn.Upsample(scale_factor=2, mode="bilinear"),
                nn.Conv2d(c_in, c_out, 3, stride=1, padding=1),
                nn.BatchNorm2d(c_out, eps=0.8),
                nn.LeakyReLU(0.2),
            ]
        blocks += [nn.Conv2d(_CHANNELS[-1], 1, 3, stride=1, padding=1), nn.Tanh()]
        # One Sequential, so the indices (conv_blocks.0, .2, .3, .6 …, .21) match the released keys.
        self.conv_blocks = nn.Sequential(*blocks)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.l1(z).view(-1, _CHANNELS[0], _INIT_SIZE, _INIT_SIZE)
        return self.conv_blocks(x) * self.out_scale


def detail_condition(jawpose: torch.Tensor, expcode: torch.Tensor, detailcode: torch.Tensor) -> torch.Tensor:
    """DECA's default ``detail_conditioning`` ['jawpose', 'expression', 'detail']: (B, 3 + n_exp + 128).

    EMICA predicts 100 expression coefficients; its caller passes the first 50, the ones the EMOCA/DECA detail
    decoder was trained on (the same FLAME basis vectors).
    """
    return torch.cat([jawpose, expcode, detailcode], dim=1)


def make_detail_encoder() -> ResnetEncoder:
    """E_detail: ResNet-50 + MLP with 128 outputs (DECA's n_detail; EMOCA has no extra emotion detail code)."""
    return ResnetEncoder(DETAIL_CODE_DIM)


class DetailUV(nn.Module):
    """The static UV geometry that turns a displacement map into DECA's detail normal map.

    Everything is a non-persistent buffer rebuilt from the FLAME files (no state-dict keys), so it moves
    with ``.to(device)`` but never meets a checkpoint.

    Args:
        mesh: FLAME's ``head_template.obj`` (faces, uvcoords, uvfaces). Its faces are the ones DECA maps to UV
            space (the same topology as the FLAME model's).
        uv_face_eye_mask: (256, 256) float32, ``uv_face_eye_mask.png`` as DECA reads it.
        fixed_uv_dis: (256, 256) float32, ``fixed_displacement_256.npy``.
        num_vertices: V of the FLAME mesh.
    """

    def __init__(self, mesh: ObjMesh, uv_face_eye_mask: np.ndarray, fixed_uv_dis: np.ndarray, num_vertices: int):
        super().__init__()
        faces = torch.as_tensor(mesh.faces, dtype=torch.int64)
        raster = build_uv_rasterization(mesh.uvcoords, mesh.uvfaces, size=UV_SIZE)
        buffers = {
            "faces": faces,
            "vertex_incidence": vertex_face_incidence(faces, num_vertices),
            "uv_face_index": raster.face_index,
            "uv_bary": raster.bary,
            "dense_faces": raster.dense_faces,
            "dense_incidence": raster.dense_incidence,
            "uv_face_eye_mask": torch.as_tensor(uv_face_eye_mask, dtype=torch.float32).view(1, 1, UV_SIZE, UV_SIZE),
            "fixed_uv_dis": torch.as_tensor(fixed_uv_dis, dtype=torch.float32).view(UV_SIZE, UV_SIZE),
            # For consumers that draw the detail normals (types.Reconstruction.uvcoords / uvfaces).
            "uvcoords": torch.as_tensor(mesh.uvcoords, dtype=torch.float32),
            "uvfaces": torch.as_tensor(mesh.uvfaces, dtype=torch.int64),
        }
        for name, tensor in buffers.items():
            self.register_buffer(name, tensor, persistent=False)

    def forward(self, uv_z: torch.Tensor, vertices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """D_detail's ``uv_z`` (B, 1, 256, 256) + coarse world vertices (B, V, 3) →
        (displacement_map (B, 1, 256, 256), uv_detail_normals (B, 3, 256, 256)).

        ``displacement_map`` is inferno's: ``uv_z`` plus the fixed displacement (not masked); the normals use
        ``uv_z`` masked to face and eyes, as DECA's ``displacement2normal``.
        """
        raster = UVRaster(self.uv_face_index, self.uv_bary, self.dense_faces, self.dense_incidence)
        normals = displacement_to_normals(
            uv_z, vertices, self.faces, raster, self.uv_face_eye_mask, self.fixed_uv_dis, self.vertex_incidence
        )
        return uv_z + self.fixed_uv_dis[None, None], normals


def read_detail_uv(files: DetailFiles, num_vertices: int) -> DetailUV:
    """DetailUV from the FLAME files (head template, face+eye mask, fixed displacement)."""
    return DetailUV(
        read_obj(files.head_template),
        read_mask(files.uv_face_eye_mask, UV_SIZE),
        read_fixed_displacement(files.fixed_displacement, UV_SIZE),
        num_vertices,
    )


class DetailBranch(nn.Module):
    """E_detail + D_detail (state-dict keys ``E_detail.*``, ``D_detail.*``) + the UV geometry (``uv``).

    Args:
        uv: the static UV geometry (``read_detail_uv``).
        n_exp: how many expression coefficients condition D_detail (DECA/EMOCA: 50; longer codes are cut).
    """

    def __init__(self, uv: DetailUV, n_exp: int = DETAIL_EXP_DIM):
        super().__init__()
        self.n_exp = n_exp
        self.E_detail = make_detail_encoder()
        self.D_detail = DetailGenerator(3 + n_exp + DETAIL_CODE_DIM)
        self.uv = uv

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) RGB in [0, 1] → detailcode (B, 128)."""
        return self.E_detail(image)

    def decode(
        self, jawpose: torch.Tensor, expcode: torch.Tensor, detailcode: torch.Tensor, vertices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes + coarse world vertices (B, V, 3) → (displacement_map, uv_detail_normals), see ``DetailUV``."""
        uv_z = self.D_detail(detail_condition(jawpose, expcode[:, : self.n_exp], detailcode))
        return self.uv(uv_z, vertices)
