"""MICA identity branch: ArcFace embedding → L2 normalisation → mapping MLP → FLAME shape code (300).

Module names follow MICA / inferno so the released weights load unchanged:
``MicaEncoder.E_mica`` (inferno's MICA) holds ``arcface`` (iResNet-100) and ``flameModel`` (MICA's
``Generator`` without its FLAME), whose ``regressor`` is the mapping network (``network.0..3``, ``output``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .arcface import iresnet100

ARCFACE_DIM = 512
SHAPE_DIM = 300


class MappingNetwork(nn.Module):
    """z (B, z_dim) → (B, out_dim): (1 + hidden) Linear layers each followed by leaky ReLU(0.2), then ``output``.

    MICA uses hidden=3 (no skip connections; MICA only adds skips when hidden > 5).
    """

    def __init__(self, z_dim: int = ARCFACE_DIM, hidden_dim: int = 300, out_dim: int = SHAPE_DIM, hidden: int = 3):
        super().__init__()
        dims = [z_dim] + [hidden_dim] * (hidden + 1)
        self.network = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.output = nn.Linear(hidden_dim, out_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = z
        for layer in self.network:
            h = F.leaky_relu(layer(h), negative_slope=0.2)
        return self.output(h)


class MicaShapeGenerator(nn.Module):
    """MICA's ``flameModel`` with FLAME not instantiated (EMICA decodes FLAME itself): only the regressor."""

    def __init__(self):
        super().__init__()
        self.regressor = MappingNetwork()

    def forward(self, identity: torch.Tensor) -> torch.Tensor:
        """(B, 512) unit-norm identity → shape code (B, 300)."""
        return self.regressor(identity)


class MICA(nn.Module):
    """ArcFace input (B, 3, 112, 112) in [-1, 1] → shape code (B, 300)."""

    def __init__(self):
        super().__init__()
        self.arcface = iresnet100()
        self.flameModel = MicaShapeGenerator()

    def identity(self, arcface_image: torch.Tensor) -> torch.Tensor:
        """(B, 3, 112, 112) → L2-normalised ArcFace feature (B, 512); ``F.normalize`` eps 1e-12 as MICA."""
        return F.normalize(self.arcface(arcface_image), p=2.0, dim=1, eps=1e-12)

    def forward(self, arcface_image: torch.Tensor) -> torch.Tensor:
        return self.flameModel(self.identity(arcface_image))


class MicaEncoder(nn.Module):
    """EMICA's ``mica_encoder``: MICA on an ArcFace-aligned crop.

    Input as MICA's ``blobFromImages(scale=1/127.5, mean=127.5, swapRB=False)`` makes it: RGB,
    (x - 127.5) / 127.5 on 0..255 pixels, i.e. in [-1, 1] (``realtime.crop.warp_arcface`` produces this).
    """

    def __init__(self):
        super().__init__()
        self.E_mica = MICA()

    def forward(self, mica_image: torch.Tensor) -> torch.Tensor:
        """(B, 3, 112, 112) RGB in [-1, 1] → shapecode (B, 300)."""
        return self.E_mica(mica_image)


def arcface_input_from_crop(image: torch.Tensor) -> torch.Tensor:
    """Fallback MICA input when no 5-point-aligned crop is given: the whole 224 crop, 2x2-averaged to 112.

    This is a centred resize of the face crop, NOT inferno's path (SCRFD 5-point detection on the crop, then
    insightface ``norm_crop``); the face sits higher and smaller than ArcFace's template, so the identity is
    less accurate. The pipeline passes a properly aligned crop instead.

    (B, 3, 224, 224) RGB in [0, 1] → (B, 3, 112, 112) RGB in [-1, 1].
    """
    return F.avg_pool2d(image, kernel_size=2) * 2.0 - 1.0
