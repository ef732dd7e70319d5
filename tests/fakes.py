"""Stand-ins shared by the tests: tracked faces without MediaPipe, networks with a fixed output."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from realtime.types import Face

# A fixed "face": 478 points in box units, centred on the origin.
FACE_TEMPLATE = np.random.default_rng(0).uniform(-0.35, 0.35, size=(478, 3))


def fake_face(**fields) -> Face:
    """A Face with neutral fields (index and track 0, zero landmarks and blendshapes, identity transform and
    crop, a unit box at the origin), any of them replaced by ``fields``."""
    neutral = dict(index=0, track_id=0, landmarks=np.zeros((478, 3), np.float32), blendshapes=np.zeros(52, np.float32),
                   transform=np.eye(4, dtype=np.float32), center=(0.0, 0.0), size=1.0, crop_matrix=np.eye(2, 3))
    return Face(**{**neutral, **fields})


def face_at(cx: float, cy: float, size: float, **fields) -> Face:
    """FACE_TEMPLATE scaled to a `size`-pixel box centred at (cx, cy), not yet tracked (track_id −1)."""
    landmarks = (FACE_TEMPLATE * size + [cx, cy, 0.0]).astype(np.float32)
    return fake_face(**{"track_id": -1, "landmarks": landmarks, "center": (cx, cy), "size": size, **fields})


class ConstantNet(nn.Module):
    """Stands in for a network: returns a fixed (1, N) row for every sample."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.expand(x.shape[0], -1)
