"""ArcFace iResNet-100 (insightface), the identity network inside MICA.

Layout and names follow insightface's ``iresnet.py`` as MICA ships it (inferno/models/mica/arcface.py), so the
``arcface`` entry of ``mica.tar`` and the ``E_mica.arcface.*`` keys of EMICA checkpoints load unchanged.
Differences from a torchvision ResNet that matter for the numbers:

- pre-activation-style ``IBasicBlock``: BN → conv3x3 → BN → PReLU → conv3x3 (carries the stride) → BN, plus
  the identity, and **no activation after the add**;
- every stage, layer1 included, starts with stride 2 and a 1x1 projection: 112 → 56 → 28 → 14 → 7;
- the head flattens the 512x7x7 map in C, H, W order → Linear(25088, 512) → BatchNorm1d (``features``).

Input: (B, 3, 112, 112) RGB normalised as (x - 127.5) / 127.5, i.e. in [-1, 1]. Output: the raw 512-d
embedding; MICA L2-normalises it (see mica.py).
"""

from __future__ import annotations

import torch
from torch import nn

_BN_EPS = 1e-5


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """(B, inplanes, H, W) → (B, planes, H/stride, W/stride)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        # Attribute order = state-dict order of the released files.
        self.bn1 = nn.BatchNorm2d(inplanes, eps=_BN_EPS)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=_BN_EPS)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=_BN_EPS)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + identity


class IResNet(nn.Module):
    """iResNet trunk + embedding head: (B, 3, 112, 112) → (B, num_features)."""

    def __init__(self, layers: tuple[int, int, int, int], num_features: int = 512):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=_BN_EPS)
        self.prelu = nn.PReLU(64)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1])
        self.layer3 = self._make_layer(256, layers[2])
        self.layer4 = self._make_layer(512, layers[3])
        self.bn2 = nn.BatchNorm2d(512, eps=_BN_EPS)
        # insightface's Dropout has p=0 at inference; kept out of the graph (it holds no weights).
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=_BN_EPS)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=2, bias=False),
            nn.BatchNorm2d(planes, eps=_BN_EPS),
        )
        stage = [IBasicBlock(self.inplanes, planes, stride=2, downsample=downsample)]
        self.inplanes = planes
        stage += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 112, 112) in [-1, 1] → (B, num_features), not normalised."""
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.bn2(x), 1)
        return self.features(self.fc(x))


def iresnet100() -> IResNet:
    """ArcFace iResNet-100, 65,156,160 parameters."""
    return IResNet((3, 13, 30, 3))
