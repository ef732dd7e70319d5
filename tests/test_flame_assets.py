"""FLAME file readers: real formats (chumpy pickle, pickled .npy, .npz, OBJ, PNG), clear errors."""

from __future__ import annotations

import importlib.util
import os
import pickle
import struct
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from realtime.errors import AssetError
from realtime.models.flame_assets import (
    load_flame_assets,
    read_fixed_displacement,
    read_flame_pkl,
    read_landmark_embedding,
    read_mask,
    read_mediapipe_embedding,
    read_obj,
)
from tests.synthetic_flame import synthetic_flame_content, write_synthetic_flame


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], dict]:
    paths = write_synthetic_flame(tmp_path_factory.mktemp("flame"), seed=3)
    return paths, synthetic_flame_content(seed=3)


def test_pkl_reader_returns_the_arrays_written_without_chumpy(synthetic):
    paths, content = synthetic
    assert importlib.util.find_spec("chumpy") is None  # the reader must not need it
    assert "chumpy" not in sys.modules  # the writer's stand-in was unregistered
    model = read_flame_pkl(paths["flame_model"])
    assert "chumpy" not in sys.modules
    expected = content["model"]
    assert set(model) == set(expected)  # strings (bs_style, bs_type) are left out
    for key in ("v_template", "shapedirs", "posedirs", "weights", "J", "f", "kintree_table"):
        np.testing.assert_array_equal(model[key], expected[key], err_msg=key)
    assert model["shapedirs"].shape == (5023, 3, 400) and model["shapedirs"].dtype == np.float64
    assert model["J_regressor"].dtype == np.float32 and model["J_regressor"].shape == (5, 5023)
    np.testing.assert_allclose(model["J_regressor"], expected["J_regressor"], rtol=1e-6)


def _py2_array(array: np.ndarray) -> bytes:
    """Protocol-2 opcodes for an ndarray as Python 2 + NumPy 1.x wrote them (raw str data)."""
    out = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
    out += b"(K\x01(" + b"".join(b"J" + struct.pack("<i", n) for n in array.shape) + b"t"
    out += b"cnumpy\ndtype\nU\x02f8K\x00K\x01\x87R(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    data = array.astype("<f8").tobytes()
    out += b"\x89T" + struct.pack("<i", len(data)) + data + b"tb"
    return out


def test_pkl_reader_reads_python2_chumpy_pickles(tmp_path):
    """The real file is a Python-2 pickle: numpy.core module names, str array data, copy_reg sets."""
    values = np.arange(12, dtype=np.float64).reshape(4, 3) / 7
    ch = b"cchumpy.ch\nCh\n)\x81}(U\x01x" + _py2_array(values)
    ch += b"U\x0b_dirty_varsc__builtin__\nset\n]U\x01xa\x85RU\x04_itrNub"
    blob = b"\x80\x02}(U\nv_template" + ch + b"U\x08bs_styleU\x03lbsu."
    path = tmp_path / "py2.pkl"
    path.write_bytes(blob)
    model = read_flame_pkl(path)
    assert list(model) == ["v_template"]
    np.testing.assert_array_equal(model["v_template"], values)
    assert "chumpy" not in sys.modules


def test_pkl_reader_refuses_foreign_code(tmp_path):
    marker = tmp_path / "should_not_exist"

    class Evil:
        def __reduce__(self):
            return (os.makedirs, (str(marker),))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"v_template": Evil()}, protocol=2))
    with pytest.raises(AssetError, match="refusing to load posix.makedirs|refusing to load os.makedirs"):
        read_flame_pkl(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "reader",
    [read_flame_pkl, read_landmark_embedding, read_mediapipe_embedding, read_obj, read_mask, read_fixed_displacement],
)
def test_missing_file_names_the_path_and_the_download(tmp_path, reader):
    missing = tmp_path / "nowhere" / "file.bin"
    with pytest.raises(AssetError) as info:
        reader(missing)
    message = str(info.value)
    assert str(missing) in message and "not found" in message and "download_assets.sh" in message
    assert "\n" not in message


def test_load_flame_assets_missing_embedding_names_it(synthetic, tmp_path):
    paths, _ = synthetic
    with pytest.raises(AssetError, match="landmark_embedding.npy: file not found"):
        load_flame_assets(paths["flame_model"], tmp_path / "landmark_embedding.npy")


@pytest.mark.parametrize(
    "reader", [read_flame_pkl, read_landmark_embedding, read_mediapipe_embedding, read_mask, read_fixed_displacement]
)
def test_corrupt_file_is_an_asset_error(tmp_path, reader):
    path = tmp_path / "corrupt"
    path.write_bytes(b"\x80\x02this is not what you think" * 5)
    with pytest.raises(AssetError, match=str(path)):
        reader(path)


def test_pkl_that_is_not_flame_is_refused(tmp_path):
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(pickle.dumps({"v_template": np.zeros((10, 3))}, protocol=2))
    with pytest.raises(AssetError, match="has no 'f'"):
        load_flame_assets(path, tmp_path / "unused.npy")


def test_wrong_kinematic_tree_is_refused(synthetic, tmp_path):
    _, content = synthetic
    model = dict(content["model"])
    model["shapedirs"] = model["shapedirs"][:, :, :4]  # smaller file; the kinematic check comes first
    model["kintree_table"] = np.array([[4294967295, 0, 1, 2, 1], [0, 1, 2, 3, 4]])
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(pickle.dumps(model, protocol=2))
    with pytest.raises(AssetError, match=r"kinematic tree \[-1, 0, 1, 2, 1\] is not FLAME's"):
        load_flame_assets(path, tmp_path / "unused.npy")


def test_landmark_embedding_reader(synthetic):
    paths, content = synthetic
    lmk = read_landmark_embedding(paths["lmk_embedding"])
    for key, value in content["landmarks"].items():
        assert lmk[key].dtype == (np.int64 if key.endswith("idx") else np.float32)
        np.testing.assert_allclose(lmk[key], value, rtol=1e-6, err_msg=key)
    assert lmk["dynamic_lmk_bary_coords"].shape == (79, 17, 3)


def test_landmark_embedding_with_a_missing_key(tmp_path):
    path = tmp_path / "landmark_embedding.npy"
    np.save(path, np.array({"static_lmk_faces_idx": np.zeros(51)}, dtype=object), allow_pickle=True)
    with pytest.raises(AssetError, match="has no 'static_lmk_bary_coords'"):
        read_landmark_embedding(path)


def test_mediapipe_embedding_reader(synthetic):
    paths, content = synthetic
    mp = read_mediapipe_embedding(paths["mediapipe_embedding"])
    assert mp["lmk_face_idx"].shape == (105,) and mp["lmk_b_coords"].shape == (105, 3)
    np.testing.assert_array_equal(mp["landmark_indices"], content["mediapipe"]["landmark_indices"])
    np.testing.assert_allclose(mp["lmk_b_coords"].sum(1), 1.0, atol=1e-6)


def test_obj_reader(synthetic):
    paths, content = synthetic
    mesh = read_obj(paths["head_template"])
    expected = content["mesh"]
    assert mesh.vertices.shape == (5023, 3) and mesh.uvcoords.shape == (5118, 2)
    assert mesh.faces.shape == (9976, 3) and mesh.uvfaces.shape == (9976, 3)
    np.testing.assert_allclose(mesh.vertices, expected["vertices"], atol=1e-6)
    np.testing.assert_allclose(mesh.uvcoords, expected["uvcoords"], atol=1e-6)
    np.testing.assert_array_equal(mesh.faces, expected["faces"])
    np.testing.assert_array_equal(mesh.uvfaces, expected["uvfaces"])


def test_obj_reader_triangulates_quads_and_relative_indices(tmp_path):
    path = tmp_path / "quad.obj"
    path.write_text("v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nvt 0 0\nvt 1 0\nvt 1 1\nvt 0 1\nf -4/1 -3/2 -2/3 -1/4\n")
    mesh = read_obj(path)
    np.testing.assert_array_equal(mesh.faces, [[0, 1, 2], [0, 2, 3]])
    np.testing.assert_array_equal(mesh.uvfaces, [[0, 1, 2], [0, 2, 3]])


def test_obj_without_texture_indices_is_refused(tmp_path):
    path = tmp_path / "plain.obj"
    path.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    with pytest.raises(AssetError, match="line 4: faces need 'v/vt' corners"):
        read_obj(path)


def test_mask_reader_takes_red_channel_and_nearest_resizes(tmp_path, synthetic):
    rgb = np.zeros((512, 512, 3), np.uint8)
    rgb[:, :, 0] = (np.arange(512) % 256)[None, :]  # red: a ramp along x
    rgb[:, :, 1] = 255
    path = tmp_path / "mask.png"
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    mask = read_mask(path, size=256)
    assert mask.shape == (256, 256) and mask.dtype == np.float32
    np.testing.assert_allclose(mask, rgb[::2, ::2, 0] / 255.0, atol=1e-7)

    paths, content = synthetic
    eye_mask = read_mask(paths["uv_face_eye_mask"])
    np.testing.assert_array_equal(eye_mask, content["masks"]["uv_face_eye_mask"][::2, ::2, 0] / 255.0)


def test_load_flame_assets(synthetic):
    paths, content = synthetic
    assets = load_flame_assets(paths["flame_model"], paths["lmk_embedding"], paths["mediapipe_embedding"])
    assert assets.num_vertices == 5023
    assert assets.faces.dtype == np.int64 and assets.faces.shape == (9976, 3)
    assert assets.shapedirs.dtype == np.float32 and assets.shapedirs.shape == (5023, 3, 400)
    assert assets.posedirs.shape == (5023, 3, 36)
    np.testing.assert_array_equal(assets.parents, [-1, 0, 1, 1, 1])
    np.testing.assert_allclose(assets.j_regressor.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(assets.lbs_weights.sum(1), 1.0, atol=1e-6)
    assert assets.mediapipe_lmk_faces_idx.shape == (105,)
    without = load_flame_assets(paths["flame_model"], paths["lmk_embedding"])
    assert without.mediapipe_lmk_faces_idx is None and without.mediapipe_landmark_indices is None
