"""Shared pytest fixtures: paths to the bundled real data."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "realtime" / "data"


@pytest.fixture(scope="session")
def carphone_path() -> Path:
    """The real 'carphone' clip: 176x144, 29.97 fps, 120 frames, H.264, no audio."""
    return DATA / "carphone_pristine.mp4"


@pytest.fixture(scope="session")
def face_model_path() -> Path:
    return DATA / "face_landmarker.task"
