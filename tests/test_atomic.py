"""Atomic writes: the final name holds either the old or the complete new content."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest

from realtime.atomic import atomic_path, atomic_write_bytes, save_json, save_npy, save_npz, save_png


def test_atomic_write_bytes_replaces_content(tmp_path):
    path = tmp_path / "a.bin"
    atomic_write_bytes(path, b"old")
    atomic_write_bytes(path, b"new content")
    assert path.read_bytes() == b"new content"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_failure_mid_write_leaves_the_old_file_intact(tmp_path):
    path = tmp_path / "codes.npy"
    save_npy(path, np.arange(5, dtype=np.float32))
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_path(path) as temp:
            with open(temp, "wb") as f:
                f.write(b"half a file")
            assert temp.parent == path.parent and temp.exists()
            raise RuntimeError("disk on fire")
    np.testing.assert_array_equal(np.load(path), np.arange(5, dtype=np.float32))
    assert os.listdir(tmp_path) == ["codes.npy"]  # the temp is gone


def test_temp_path_is_hidden_in_the_same_folder_with_the_same_suffix(tmp_path):
    path = tmp_path / "geometry.png"
    with atomic_path(path) as temp:
        assert temp.parent == tmp_path
        assert temp.name.startswith(".geometry.png.") and temp.suffix == ".png"
        assert not temp.exists()
        assert not path.exists()  # nothing under the final name until success
        temp.write_bytes(b"x")
    assert path.read_bytes() == b"x"


def test_new_files_get_normal_permissions(tmp_path):
    path = tmp_path / "p.bin"
    atomic_write_bytes(path, b"x")
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x")
    assert path.stat().st_mode == plain.stat().st_mode


def test_save_png_round_trips_rgb_and_grey(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (31, 45, 3), dtype=np.uint8)
    save_png(tmp_path / "rgb.png", rgb)
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "rgb.png"))[..., ::-1], rgb)
    grey = rng.integers(0, 256, (7, 9), dtype=np.uint8)
    save_png(tmp_path / "grey.png", grey)
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "grey.png"), cv2.IMREAD_UNCHANGED), grey)


def test_save_png_rejects_non_images_without_touching_disk(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        save_png(tmp_path / "x.png", np.zeros((4, 4, 3), np.float32))
    assert os.listdir(tmp_path) == []


def test_save_npy_and_npz_round_trip(tmp_path):
    a = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    save_npy(tmp_path / "a.npy", a)
    loaded = np.load(tmp_path / "a.npy", allow_pickle=False)
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, a)
    save_npz(tmp_path / "b.npz", {"a": a, "names": np.array(["x", "yz"]), "path": a})
    data = np.load(tmp_path / "b.npz", allow_pickle=False)
    np.testing.assert_array_equal(data["a"], a)
    assert list(data["names"]) == ["x", "yz"]
    np.testing.assert_array_equal(data["path"], a)
    assert sorted(os.listdir(tmp_path)) == ["a.npy", "b.npz"]


def test_save_npz_refuses_object_arrays(tmp_path):
    with pytest.raises(ValueError, match="pickle"):
        save_npz(tmp_path / "c.npz", {"bad": np.array([{"a": 1}], dtype=object)})
    assert os.listdir(tmp_path) == []


def test_save_json_creates_the_folder_and_never_leaves_a_half_file(tmp_path):
    path = tmp_path / "results" / "bench.json"
    save_json(path, {"fps": 83.7, "runs": [1, 2]})
    assert path.read_text() == '{\n  "fps": 83.7,\n  "runs": [\n    1,\n    2\n  ]\n}\n'
    with pytest.raises(TypeError):  # not JSON: the earlier file stays whole and no temp file is left
        save_json(path, {"fps": object()})
    assert json.loads(path.read_text()) == {"fps": 83.7, "runs": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["bench.json"]
