"""EMICA / EMOCA in the pipeline, on synthetic checkpoints with the released key layout, over real footage."""

from pathlib import Path

import av
import numpy as np
import pytest

from realtime.cli import main

EMICA = "EMICA-CVT_flame2020_notexture"


def _results(root: Path, model: str) -> Path:
    (hit,) = root.glob(f"processed_*/*/results/{model}")
    return hit


@pytest.fixture(scope="module")
def emica_run(tmp_path_factory, synthetic_assets, carphone_path):
    out = tmp_path_factory.mktemp("emica")
    rc = main(["--input", str(carphone_path), "--output_folder", str(out), "--assets_dir", str(synthetic_assets),
               "--max_frames", "12", "--save_codes", "--save_mesh", "--progress", "false"])
    assert rc == 0
    return _results(out, EMICA)


def test_emica_is_the_default_when_installed(emica_run):
    assert emica_run.name == EMICA


def test_codes_in_inferno_layout(emica_run):
    sample = emica_run / "000001_000"
    shapes = {"shape": (300,), "exp": (100,), "tex": (50,), "jawpose": (3,), "globalpose": (3,), "cam": (3,), "lightcode": (27,)}
    for stem, shape in shapes.items():
        arr = np.load(sample / f"{stem}.npy")
        assert arr.shape == shape and arr.dtype == np.float32 and np.isfinite(arr).all(), stem
    codes = np.load(emica_run / "codes.npz")
    assert codes["shape"].shape == (12, 300) and list(codes["frame_index"]) == list(range(12))
    assert codes["crop_matrix"].shape == (12, 2, 3)


def test_identity_is_cached_per_track(emica_run):
    codes = np.load(emica_run / "codes.npz")
    # The first 5 frames are averaged, then the identity is frozen.
    assert np.allclose(codes["shape"][5:], codes["shape"][5])


def test_mesh_is_flame_world_space_with_reversed_faces(emica_run):
    lines = (emica_run / "000001_000" / "mesh_coarse.obj").read_text().splitlines()
    verts = [l for l in lines if l.startswith("v ")]
    faces = [l for l in lines if l.startswith("f ")]
    assert len(verts) == 5023 and len(faces) == 9976


def test_mesh_is_drawn_over_the_frame(emica_run):
    with av.open(str(emica_run / "video_geometry.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 12
    h = frames[0].shape[0] // 3
    original, overlay = frames[0][:h].astype(int), frames[0][h:2 * h].astype(int)
    changed = np.abs(original - overlay).max(axis=2) > 20
    assert changed.sum() > 200  # a shaded head covers part of the frame
    geometry = np.asarray(av.open(str(emica_run / "000001_000" / "geometry.png")).decode(video=0).__next__().to_ndarray(format="rgb24"))
    assert geometry.shape == (224, 224, 3) and (geometry.max(axis=2) > 0).sum() > 500


def test_identity_cache_off_runs_mica_every_frame(tmp_path, synthetic_assets, carphone_path):
    rc = main(["--input", str(carphone_path), "--output_folder", str(tmp_path), "--assets_dir", str(synthetic_assets),
               "--max_frames", "3", "--save_codes", "--save_images", "false", "--identity_cache", "false",
               "--save_video", "false", "--progress", "false"])
    assert rc == 0
    codes = np.load(_results(tmp_path, EMICA) / "codes.npz")
    assert not np.allclose(codes["shape"][0], codes["shape"][2])  # MICA sees each frame's own crop


@pytest.mark.slow
def test_detail_mode_writes_displacement_and_detail_shading(tmp_path, synthetic_assets, carphone_path):
    rc = main(["--input", str(carphone_path), "--output_folder", str(tmp_path), "--assets_dir", str(synthetic_assets),
               "--max_frames", "2", "--mode", "detail", "--image_type", "detail", "--save_codes", "--progress", "false"])
    assert rc == 0
    sample = _results(tmp_path, EMICA) / "000001_000"
    disp = np.load(sample / "displacement_map.npy")
    assert disp.shape == (256, 256) and np.isfinite(disp).all()
    assert np.load(sample / "detail.npy").shape == (128,)
    assert (sample / "geometry.png").is_file()


def test_emoca_model_by_name(tmp_path, synthetic_assets, carphone_path):
    rc = main(["--input", str(carphone_path), "--output_folder", str(tmp_path), "--assets_dir", str(synthetic_assets),
               "--model_name", "EMOCA_v2_lr_mse_20", "--max_frames", "2", "--save_codes", "--progress", "false"])
    assert rc == 0
    sample = _results(tmp_path, "EMOCA_v2_lr_mse_20") / "000001_000"
    assert np.load(sample / "shape.npy").shape == (100,) and np.load(sample / "exp.npy").shape == (50,)


def test_non_finite_output_skips_the_face_and_the_run_goes_on(tmp_path, synthetic_assets, carphone_path, monkeypatch, caplog):
    from realtime.models.emica import EMICA as EmicaModel

    decode = EmicaModel.decode
    calls = {"n": 0}

    def poisoned(self, codes):
        out = decode(self, codes)
        calls["n"] += 1
        if calls["n"] == 2:  # the second batch's faces come out as NaN
            out["verts"] = out["verts"] * float("nan")
        return out

    monkeypatch.setattr(EmicaModel, "decode", poisoned)
    rc = main(["--input", str(carphone_path), "--output_folder", str(tmp_path), "--assets_dir", str(synthetic_assets),
               "--max_frames", "6", "--batch_size", "2", "--save_codes", "--progress", "false"])
    assert rc == 0
    folder = _results(tmp_path, EMICA)
    codes = np.load(folder / "codes.npz")
    assert list(codes["frame_index"]) == [0, 1, 4, 5]  # frames 2 and 3 (batch 2) lost their face, nothing else
    with av.open(str(folder / "video_geometry.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 6  # every frame still written
    assert "non-finite model output" in caplog.text


def test_image_folder_with_emica_in_inferno_layout(tmp_path, synthetic_assets):
    """inferno's demo_face_rec_on_images: image_output/<model>/<stem>00/ with geometry.png, inputs.png and codes."""
    skimage = pytest.importorskip("skimage")
    import cv2

    folder = tmp_path / "photos"
    folder.mkdir()
    cv2.imwrite(str(folder / "astronaut.jpg"), cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR))
    rc = main(["--input", str(folder), "--output_folder", str(tmp_path / "out"), "--assets_dir", str(synthetic_assets),
               "--save_codes", "--progress", "false"])
    assert rc == 0
    sample = tmp_path / "out" / EMICA / "astronaut00"
    for name in ("geometry.png", "inputs.png", "shape.npy", "exp.npy", "cam.npy"):
        assert (sample / name).is_file(), name
