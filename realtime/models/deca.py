"""DECA and EMOCA (the EMOCA app's ``DecaModule``), coarse and detail.

Networks under inferno's names (``deca.E_flame``, ``deca.E_expression``, ``deca.E_detail``, ``deca.D_detail``,
``deca.flame``), so the released ``.ckpt`` state dicts load unchanged:

- ``E_flame``: ResNet-50 + MLP with n_shape + n_tex + n_exp + 6 + 3 + 27 outputs (236 for DECA's 100/50/50), split
  shape | tex | exp | pose (global 3, jaw 3) | cam | light.
- ``E_expression`` (EMOCA only, ``expression_backbone: deca_clone``): a second ResNet-50 whose n_exp outputs
  replace DECA's expression (and, with ``exp_deca_global_pose`` / ``exp_deca_jaw_pose``, the poses too).
- ``E_detail`` / ``D_detail``: the detail branch (detail.py).

Outputs use the same names as EMICA (``shapecode`` 100, ``expcode`` 50, flat ``lightcode`` …).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .detail import DETAIL_CODE_DIM, DetailGenerator, DetailUV, detail_condition, make_detail_encoder
from .emica import IMAGE_SIZE, FlameFaceModel, check_image
from .encoders import ResnetEncoder, split_code
from .flame import FLAME

N_POSE, N_CAM, N_LIGHT = 6, 3, 27


class DecaNetworks(nn.Module):
    """The ``deca`` sub-module of inferno's DecaModule (only the parts inference uses)."""

    def __init__(self, flame: FLAME, n_shape: int, n_tex: int, n_exp: int, expression_outsize: int | None):
        super().__init__()
        self.E_flame = ResnetEncoder(n_shape + n_tex + n_exp + N_POSE + N_CAM + N_LIGHT)
        self.E_expression = ResnetEncoder(expression_outsize) if expression_outsize else None
        self.E_detail = make_detail_encoder()
        self.D_detail = DetailGenerator(3 + n_exp + DETAIL_CODE_DIM)
        self.flame = flame


class DecaModel(FlameFaceModel):
    """DECA / EMOCA with the EMICA-style ``encode`` / ``decode`` / ``forward`` API.

    Args:
        flame: FLAME with n_shape / n_exp of the checkpoint (DECA, EMOCA: 100 / 50).
        n_shape, n_tex, n_exp: code sizes from the cfg.
        expression_encoder: EMOCA's separate expression network is present.
        exp_global_pose, exp_jaw_pose: EMOCA's expression network also predicts these poses (in this order,
            after the expression).
        uv: detail UV geometry; None runs coarse only (the detail networks are still loaded, unused).
    """

    def __init__(
        self,
        flame: FLAME,
        n_shape: int = 100,
        n_tex: int = 50,
        n_exp: int = 50,
        expression_encoder: bool = False,
        exp_global_pose: bool = False,
        exp_jaw_pose: bool = False,
        uv: DetailUV | None = None,
    ):
        super().__init__()
        self.flame_split = {
            "shapecode": n_shape, "texcode": n_tex, "expcode": n_exp, "globalpose": 3, "jawpose": 3,
            "cam": N_CAM, "lightcode": N_LIGHT,
        }
        self.expression_split = {"expcode": n_exp}
        if exp_global_pose:
            self.expression_split["globalpose"] = 3
        if exp_jaw_pose:
            self.expression_split["jawpose"] = 3
        self.n_exp = n_exp
        outsize = sum(self.expression_split.values()) if expression_encoder else None
        self.deca = DecaNetworks(flame, n_shape, n_tex, n_exp, outsize)
        self.uv = uv

    @property
    def flame_layer(self) -> FLAME:
        return self.deca.flame

    def encode(
        self, image: torch.Tensor, mica_image: torch.Tensor | None = None, shapecode: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Image (B, 3, 224, 224) RGB in [0, 1] → codes (``mica_image`` is unused: DECA has no MICA).

        ``shapecode`` (B, n_shape), when given, replaces the predicted identity (a cached one per track).
        Returns shapecode, texcode, expcode, globalpose, jawpose, cam, lightcode (flat 27), and ``detailcode``
        (B, 128) when the detail branch is on.
        """
        check_image(image, IMAGE_SIZE, "image")
        codes = split_code(self.deca.E_flame(image), self.flame_split)
        if self.deca.E_expression is not None:
            codes.update(split_code(self.deca.E_expression(image), self.expression_split))
        if shapecode is not None:
            if tuple(shapecode.shape) != tuple(codes["shapecode"].shape):
                raise ValueError(f"shapecode must be {tuple(codes['shapecode'].shape)}, got {tuple(shapecode.shape)}")
            codes["shapecode"] = shapecode
        if self.uv is not None:
            codes["detailcode"] = self.deca.E_detail(image)
        return codes

    def decode_detail(self, codes: Mapping[str, torch.Tensor], vertices: torch.Tensor):
        if self.uv is None:
            return None
        uv_z = self.deca.D_detail(detail_condition(codes["jawpose"], codes["expcode"], codes["detailcode"]))
        return self.uv(uv_z, vertices)
