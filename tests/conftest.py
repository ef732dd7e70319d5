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


@pytest.fixture(scope="session")
def synthetic_assets(tmp_path_factory) -> Path:
    """An assets folder in inferno's layout with random-weight EMICA and EMOCA (with detail) checkpoints
    in the exact released key layout, MICA's mica.tar and synthetic FLAME files. Written once per session
    (about 1 GB, ~30 s): share it, never modify it."""
    from tests.synthetic_checkpoints import write_emica_model, write_emoca_model

    root = tmp_path_factory.mktemp("assets")
    write_emica_model(root)
    write_emoca_model(root)
    return root
