"""FrameOutputs: inferno's per-face folder layout, codes, meshes, images and codes.npz."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from realtime.sinks import Sink
from realtime.sinks.outputs import FrameOutputs
from realtime.types import Frame, FrameResult, Reconstruction
from tests.fakes import fake_face

CODE_SHAPES = {
    "shapecode": (300,),
    "expcode": (100,),
    "texcode": (50,),
    "jawpose": (3,),
    "globalpose": (3,),
    "cam": (3,),
    "lightcode": (9, 3),  # saved flat, (27,)
    "detailcode": (128,),
    "eyepose": (6,),  # an unknown key keeps its name
}
FILE_OF = {
    "shapecode": "shape.npy",
    "expcode": "exp.npy",
    "texcode": "tex.npy",
    "jawpose": "jawpose.npy",
    "globalpose": "globalpose.npy",
    "cam": "cam.npy",
    "lightcode": "lightcode.npy",
    "detailcode": "detail.npy",
    "eyepose": "eyepose.npy",
}


def shift_matrix(x0: float, y0: float, scale: float = 1.0) -> np.ndarray:
    """frame (x, y) → crop ((x - x0) * scale, (y - y0) * scale)."""
    return np.array([[scale, 0, -x0 * scale], [0, scale, -y0 * scale]], np.float64)


def make_rec(k: int, rng: np.random.Generator, x0: float = 10, y0: float = 20, codes: dict | None = None) -> Reconstruction:
    face = fake_face(index=k, track_id=100 + k, center=(x0 + 112.0, y0 + 112.0), size=224.0,
                     crop_matrix=shift_matrix(x0, y0))
    if codes is None:
        codes = {key: rng.standard_normal(shape).astype(np.float32) for key, shape in CODE_SHAPES.items()}
    return Reconstruction(
        face=face,
        vertices=rng.standard_normal((7, 3)).astype(np.float32),
        faces=np.array([[0, 1, 2], [2, 3, 4], [4, 5, 6]], np.int32),
        world_to_frame=np.eye(4),
        codes=codes,
    )


def make_result(index: int, n_faces: int, rng: np.random.Generator, name: str | None = None) -> FrameResult:
    image = rng.integers(0, 256, (300, 320, 3), dtype=np.uint8)
    rendered = rng.integers(0, 256, (300, 320, 3), dtype=np.uint8)
    frame = Frame(index=index, pts=index / 30.0, image=image, name=name)
    recs = [make_rec(k, rng, x0=10 + 40 * k, y0=20 + 10 * k) for k in range(n_faces)]
    return FrameResult(frame=frame, faces=[r.face for r in recs], reconstructions=recs, rendered=rendered)


def read_png(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert bgr is not None, path
    return bgr[..., ::-1]


def test_frame_outputs_is_a_sink():
    assert issubclass(FrameOutputs, Sink)


def test_folder_and_file_names_for_3_frames_x_2_faces(tmp_path):
    rng = np.random.default_rng(0)
    with FrameOutputs(tmp_path, save_images=True, save_codes=True, save_mesh=True) as out:
        for i in range(3):
            out.write(make_result(i, 2, rng))
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    expected = ["codes.npz"]
    for folder in ("000001_000", "000001_001", "000002_000", "000002_001", "000003_000", "000003_001"):
        expected += [f"{folder}/{name}" for name in ["geometry.png", "mesh_coarse.obj", *FILE_OF.values()]]
    assert files == sorted(expected)


def test_only_requested_outputs_are_written(tmp_path):
    rng = np.random.default_rng(1)
    with FrameOutputs(tmp_path) as out:  # defaults: images only
        out.write(make_result(41, 1, rng))
        out.write(FrameResult(frame=Frame(42, 1.4, np.zeros((8, 8, 3), np.uint8))))  # no faces: nothing
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert files == ["000042_000", "000042_000/geometry.png"]


def test_codes_round_trip_as_float32_with_inferno_names_and_shapes(tmp_path):
    rng = np.random.default_rng(2)
    result = make_result(0, 1, rng)
    with FrameOutputs(tmp_path, save_images=False, save_codes=True) as out:
        out.write(result)
    folder = tmp_path / "000001_000"
    codes = result.reconstructions[0].codes
    for key, file in FILE_OF.items():
        saved = np.load(folder / file, allow_pickle=False)
        assert saved.dtype == np.float32
        expected = codes[key].reshape(-1) if key == "lightcode" else codes[key]
        assert saved.shape == expected.shape
        np.testing.assert_array_equal(saved, expected)
    assert np.load(folder / "lightcode.npy").shape == (27,)
    assert np.load(folder / "shape.npy").shape == (300,)


def test_obj_parses_back_to_the_vertices_and_reversed_faces(tmp_path):
    rng = np.random.default_rng(3)
    result = make_result(0, 1, rng)
    rec = result.reconstructions[0]
    with FrameOutputs(tmp_path, save_images=False, save_mesh=True) as out:
        out.write(result)
    lines = (tmp_path / "000001_000" / "mesh_coarse.obj").read_text().splitlines()
    assert {line.split()[0] for line in lines} == {"v", "f"}  # no vt, no mtllib, no usemtl
    verts = np.array([[float(t) for t in line.split()[1:]] for line in lines if line.startswith("v ")])
    faces = np.array([[int(t) for t in line.split()[1:]] for line in lines if line.startswith("f ")])
    np.testing.assert_array_equal(verts.astype(np.float32), rec.vertices)  # exact float32 round trip
    np.testing.assert_array_equal(faces, rec.faces[:, ::-1] + 1)
    assert lines[-1] == f"f {rec.faces[-1, 2] + 1} {rec.faces[-1, 1] + 1} {rec.faces[-1, 0] + 1}"
    assert lines[0] == "v {} {} {}".format(*rec.vertices[0])  # inferno's formatting of float32 values
    assert not list(tmp_path.glob("**/*.mtl"))


def test_geometry_png_warps_the_rendered_frame_into_the_crop(tmp_path):
    rng = np.random.default_rng(4)
    result = make_result(0, 2, rng)
    with FrameOutputs(tmp_path) as out:
        out.write(result)
    for k, (x0, y0) in enumerate([(10, 20), (50, 30)]):
        png = read_png(tmp_path / f"000001_{k:03d}" / "geometry.png")
        assert png.shape == (224, 224, 3) and png.dtype == np.uint8
        h = min(224, 300 - y0)  # the crop runs off the frame's bottom: black there
        w = min(224, 320 - x0)
        np.testing.assert_array_equal(png[:h, :w], result.rendered[y0 : y0 + h, x0 : x0 + w])
        assert png[h:].max(initial=0) == 0 and png[:, w:].max(initial=0) == 0


def test_geometry_png_uses_render_crop_when_given(tmp_path):
    rng = np.random.default_rng(5)
    result = make_result(0, 2, rng)
    result.rendered = None

    def render_crop(rec: Reconstruction) -> np.ndarray:
        return np.full((224, 224, 3), (10 * rec.face.index + 5, 77, 200), np.uint8)

    with FrameOutputs(tmp_path, render_crop=render_crop) as out:
        out.write(result)
    for k in range(2):
        png = read_png(tmp_path / f"000001_{k:03d}" / "geometry.png")
        assert (png == (10 * k + 5, 77, 200)).all()


def test_geometry_without_rendered_or_render_crop_is_an_error(tmp_path):
    result = make_result(0, 1, np.random.default_rng(6))
    result.rendered = None
    with FrameOutputs(tmp_path) as out:
        with pytest.raises(ValueError, match="render_crop"):
            out.write(result)


def test_image_folder_naming_and_inputs_png(tmp_path):
    rng = np.random.default_rng(7)
    result = make_result(0, 2, rng, name="astronaut")
    with FrameOutputs(tmp_path, save_codes=True) as out:
        out.write(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["astronaut00", "astronaut01", "codes.npz"]
    assert {p.name for p in (tmp_path / "astronaut00").iterdir()} >= {"geometry.png", "inputs.png"}
    inputs = read_png(tmp_path / "astronaut01" / "inputs.png")
    np.testing.assert_array_equal(inputs[:224, :224], result.frame.image[30:254, 50:274])
    assert list(np.load(tmp_path / "codes.npz")["name"]) == ["astronaut", "astronaut"]


def test_inputs_png_is_not_written_for_video_frames(tmp_path):
    with FrameOutputs(tmp_path) as out:
        out.write(make_result(0, 1, np.random.default_rng(8)))
    assert not (tmp_path / "000001_000" / "inputs.png").exists()


def test_codes_npz_round_trip_with_nan_for_missing_codes(tmp_path):
    rng = np.random.default_rng(9)
    results = [make_result(i, 2, rng) for i in range(3)]
    del results[1].reconstructions[1].codes["texcode"]  # frame 1, face 1 has no tex
    with FrameOutputs(tmp_path, save_images=False, save_codes=True) as out:
        for r in results:
            out.write(r)
    data = np.load(tmp_path / "codes.npz", allow_pickle=False)
    recs = [rec for r in results for rec in r.reconstructions]
    np.testing.assert_array_equal(data["frame_index"], [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(data["face_index"], [0, 1, 0, 1, 0, 1])
    np.testing.assert_array_equal(data["track_id"], [100, 101] * 3)
    np.testing.assert_allclose(data["pts"], [0, 0, 1 / 30, 1 / 30, 2 / 30, 2 / 30])
    np.testing.assert_array_equal(data["crop_matrix"], np.stack([r.face.crop_matrix for r in recs]))
    np.testing.assert_array_equal(data["center"], [r.face.center for r in recs])
    np.testing.assert_array_equal(data["size"], [224.0] * 6)
    assert "name" not in data.files
    assert data["shape"].shape == (6, 300) and data["shape"].dtype == np.float32
    assert data["lightcode"].shape == (6, 27)
    np.testing.assert_array_equal(data["exp"], np.stack([r.codes["expcode"] for r in recs]))
    tex = data["tex"]
    assert np.isnan(tex[3]).all() and not np.isnan(np.delete(tex, 3, axis=0)).any()
    np.testing.assert_array_equal(tex[2], recs[2].codes["texcode"])


def test_codes_npz_without_faces_has_zero_rows(tmp_path):
    with FrameOutputs(tmp_path, save_images=False, save_codes=True) as out:
        out.write(FrameResult(frame=Frame(0, 0.0, np.zeros((8, 8, 3), np.uint8))))
    data = np.load(tmp_path / "codes.npz")
    assert data["frame_index"].shape == (0,) and data["crop_matrix"].shape == (0, 2, 3)


def test_close_is_idempotent_and_rewrites_nothing(tmp_path):
    out = FrameOutputs(tmp_path, save_images=False, save_codes=True)
    out.write(make_result(0, 1, np.random.default_rng(10)))
    out.close()
    stamp = (tmp_path / "codes.npz").stat().st_mtime_ns
    out.close()
    assert (tmp_path / "codes.npz").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="closed"):
        out.write(make_result(1, 1, np.random.default_rng(11)))


def test_no_temp_files_are_left_behind(tmp_path):
    with FrameOutputs(tmp_path, save_codes=True, save_mesh=True) as out:
        out.write(make_result(0, 2, np.random.default_rng(12)))
    assert not [p for p in tmp_path.rglob(".*")]
