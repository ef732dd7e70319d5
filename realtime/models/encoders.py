"""Image encoders of DECA / EMOCA / EMICA: a ResNet-50 trunk and a 2-layer MLP head.

``ResnetEncoder`` is inferno's module of the same name (state-dict names ``encoder.*`` for the trunk and
``layers.0`` / ``layers.2`` for the head). ``DecaEncoder`` is the thin wrapper EMICA puts around it
(``deca_encoder.encoder.*`` and ``expression_encoder.encoder.*`` in the released checkpoints).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .resnet import resnet50


class ResnetEncoder(nn.Module):
    """Image (B, 3, 224, 224) RGB in [0, 1], no mean/std normalisation → raw code (B, outsize)."""

    def __init__(self, outsize: int):
        super().__init__()
        self.outsize = outsize
        self.encoder = resnet50()
        self.layers = nn.Sequential(nn.Linear(2048, 1024), nn.ReLU(), nn.Linear(1024, outsize))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) → (B, outsize). No activation on the output (inferno's ``last_op=None``)."""
        return self.layers(self.encoder(image))


class DecaEncoder(nn.Module):
    """EMICA's DECA / expression branch: ``.encoder`` is a ResnetEncoder; the raw code is split by the caller."""

    def __init__(self, outsize: int):
        super().__init__()
        self.encoder = ResnetEncoder(outsize)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) → (B, outsize)."""
        return self.encoder(image)


def split_code(code: torch.Tensor, sizes: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Cut a raw code (B, sum(sizes)) into named consecutive slices, in the mapping's order.

    This is inferno's ``_decompose_code``: no activation or reshape on any slice (``lightcode`` stays (B, 27)).
    """
    total = sum(sizes.values())
    if code.shape[-1] != total:
        raise ValueError(f"code has {code.shape[-1]} values but the split {dict(sizes)} needs {total}")
    out: dict[str, torch.Tensor] = {}
    start = 0
    for name, size in sizes.items():
        out[name] = code[:, start : start + size]
        start += size
    return out
