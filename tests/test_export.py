"""Results files: every format reads back to the same numbers, codes padded to FLAME, atomic writes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from realtime import export
from realtime.errors import MediaError, UserError
from realtime.export import ResultsWriter, float32_shortest, load_results
from realtime.types import Face, Frame, FrameResult, Reconstruction

REPO = Path(__file__).resolve().parents[1]
NAMES = [f"bs{i}" for i in range(52)]


def make_face(rng, index: int, track_id: int) -> Face:
    lms = rng.uniform(0, 640, (478, 3)).astype(np.float32)
    return Face(
        index=index,
        track_id=track_id,
        landmarks=lms,
        blendshapes=rng.uniform(0, 1, 52).astype(np.float32),
        transform=rng.normal(size=(4, 4)).astype(np.float32),
        center=(float(rng.uniform(100, 500)), float(rng.uniform(100, 400))),
        size=float(int(rng.uniform(80, 200))),
        crop_matrix=rng.normal(size=(2, 3)),
    )


def emica_codes(rng) -> dict[str, np.ndarray]:
    sizes = dict(shapecode=300, expcode=100, texcode=50, jawpose=3, globalpose=3, cam=3, lightcode=27)
    return {k: rng.normal(size=n).astype(np.float32) for k, n in sizes.items()}


def deca_codes(rng) -> dict[str, np.ndarray]:
    sizes = dict(shapecode=100, expcode=50, posecode=6, cam=3, texcode=50)
    codes = {k: rng.normal(size=n).astype(np.float32) for k, n in sizes.items()}
    codes["lightcode"] = rng.normal(size=(9, 3)).astype(np.float32)
    return codes


def recon(face: Face, codes: dict, rng, n_landmarks: int = 105) -> Reconstruction:
    return Reconstruction(
        face=face,
        vertices=np.zeros((5, 3), np.float32),
        faces=np.zeros((1, 3), np.int32),
        world_to_frame=np.eye(4),
        codes=codes,
        landmarks=rng.uniform(0, 640, (n_landmarks, 2)).astype(np.float32),
    )


def sequence(seed: int = 0, codes=emica_codes) -> list[FrameResult]:
    """4 frames: two tracks; frame 1 has no faces; in frame 2 the model skipped face 1."""
    rng = np.random.default_rng(seed)
    results = []
    for t in range(4):
        frame = Frame(index=t, pts=t / 29.97, image=np.zeros((4, 4, 3), np.uint8))
        faces = [] if t == 1 else [make_face(rng, 0, 7), make_face(rng, 1, 9)]
        recs = [recon(f, codes(rng), rng) for f in faces if not (t == 2 and f.index == 1)]
        results.append(FrameResult(frame=frame, faces=faces, reconstructions=recs))
    return results


def write(path: Path, results, **kw) -> dict[str, np.ndarray]:
    with ResultsWriter(path, model_name="EMICA-CVT_flame2020_notexture", fps=29.97, blendshape_names=NAMES, **kw) as w:
        for r in results:
            w.add(r)
    return load_results(path)


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_round_trip_gives_the_same_numbers(tmp_path, fmt):
    results = sequence()
    data = write(tmp_path / f"res.{fmt}", results)
    assert str(data["schema"]) == "emica-realtime/results" and int(data["version"]) == 1
    assert str(data["model_name"]) == "EMICA-CVT_flame2020_notexture" and float(data["fps"]) == 29.97
    assert list(data["blendshape_names"]) == NAMES
    np.testing.assert_array_equal(data["frame_index"], [0, 0, 2, 2, 3, 3])
    np.testing.assert_array_equal(data["track_id"], [7, 9, 7, 9, 7, 9])
    np.testing.assert_array_equal(data["face_index"], [0, 1, 0, 1, 0, 1])
    np.testing.assert_array_equal(data["has_flame"], [True, True, True, False, True, True])
    assert data["pts"].dtype == np.float64 and data["pts"][2] == 2 / 29.97
    rows = [(r, f, next((x for x in r.reconstructions if x.face.index == f.index), None)) for r in results for f in r.faces]
    for i, (_, face, rec) in enumerate(rows):
        assert data["shape"].dtype == np.float32 and data["landmarks_mediapipe"].dtype == np.float32
        np.testing.assert_array_equal(data["landmarks_mediapipe"][i], face.landmarks[:, :2])
        np.testing.assert_array_equal(data["blendshapes"][i], face.blendshapes)
        np.testing.assert_array_equal(data["transform"][i], face.transform)
        np.testing.assert_array_equal(data["crop_matrix"][i], face.crop_matrix)
        np.testing.assert_array_equal(data["center"][i], face.center)
        assert data["size"][i] == face.size
        if rec is None:
            assert np.isnan(data["shape"][i]).all() and np.isnan(data["landmarks_model"][i]).all()
            assert np.isnan(data["code_texcode"][i]).all()
            continue
        c = rec.codes
        np.testing.assert_array_equal(data["shape"][i], c["shapecode"])
        np.testing.assert_array_equal(data["expression"][i], c["expcode"])
        np.testing.assert_array_equal(data["cam"][i], c["cam"])
        np.testing.assert_array_equal(data["code_texcode"][i], c["texcode"])
        np.testing.assert_array_equal(data["code_lightcode"][i], c["lightcode"])
        np.testing.assert_array_equal(data["landmarks_model"][i], rec.landmarks)
        pose = data["pose"][i]
        np.testing.assert_array_equal(pose[0:3], c["globalpose"])
        np.testing.assert_array_equal(pose[6:9], c["jawpose"])
        assert not pose[3:6].any() and not pose[9:15].any()  # neck and eyes: FLAME's zeros


def test_all_formats_agree(tmp_path):
    results = sequence(seed=3, codes=deca_codes)
    loaded = {fmt: write(tmp_path / f"res.{fmt}", results) for fmt in export.FORMATS}
    keys = set(loaded["npz"])
    for fmt in ("json", "csv"):
        assert set(loaded[fmt]) == keys
        for k in keys:
            assert loaded[fmt][k].shape == loaded["npz"][k].shape, k
            assert loaded[fmt][k].dtype.kind == loaded["npz"][k].dtype.kind, k
            np.testing.assert_array_equal(loaded[fmt][k], loaded["npz"][k], err_msg=f"{fmt}: {k}")


def test_smaller_codes_are_padded_to_flame_sizes(tmp_path):
    results = sequence(seed=1, codes=deca_codes)
    data = write(tmp_path / "deca.npz", results)
    c = results[0].reconstructions[0].codes
    assert data["shape"].shape == (6, 300) and data["expression"].shape == (6, 100) and data["pose"].shape == (6, 15)
    np.testing.assert_array_equal(data["shape"][0, :100], c["shapecode"])
    assert not data["shape"][0, 100:].any()
    np.testing.assert_array_equal(data["expression"][0, :50], c["expcode"])
    assert not data["expression"][0, 50:].any()
    pose = data["pose"][0]  # DECA's posecode = [global, jaw] → FLAME's [global, neck, jaw, eyes]
    np.testing.assert_array_equal(pose[0:3], c["posecode"][:3])
    np.testing.assert_array_equal(pose[6:9], c["posecode"][3:])
    assert not pose[3:6].any() and not pose[9:].any()
    assert data["code_lightcode"].shape == (6, 9, 3)


def test_mediapipe_only_rows_and_image_names(tmp_path):
    rng = np.random.default_rng(5)
    face = make_face(rng, 0, 0)
    rec = recon(face, {"blendshapes": face.blendshapes, "transform": face.transform}, rng, n_landmarks=478)
    frame = Frame(index=0, pts=0.0, image=np.zeros((2, 2, 3), np.uint8), name="img_001")
    for fmt in export.FORMATS:
        data = write(tmp_path / f"mp.{fmt}", [FrameResult(frame=frame, faces=[face], reconstructions=[rec])])
        assert list(data["has_flame"]) == [False]
        assert np.isnan(data["shape"]).all() and not any(k.startswith("code_") for k in data)
        assert list(data["name"]) == ["img_001"]
        assert data["landmarks_model"].shape == (1, 478, 2)


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_empty_run_writes_a_valid_file(tmp_path, fmt):
    data = write(tmp_path / f"empty.{fmt}", [FrameResult(frame=Frame(0, 0.0, np.zeros((2, 2, 3), np.uint8)))])
    assert data["shape"].shape == (0, 300) and data["landmarks_mediapipe"].shape == (0, 478, 2)
    assert data["frame_index"].shape == (0,)


def test_failure_while_writing_leaves_no_half_file(tmp_path, monkeypatch):
    path = tmp_path / "out" / "res.json"
    path.parent.mkdir()
    path.write_text("old results")
    calls = {"n": 0}
    real_dumps = json.dumps

    def dumps_then_disk_full(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # header and first row written, then the disk fills up
            raise OSError(28, "No space left on device")
        return real_dumps(*args, **kwargs)

    monkeypatch.setattr(export.json, "dumps", dumps_then_disk_full)
    writer = ResultsWriter(path, fps=30, blendshape_names=NAMES)
    for r in sequence():
        writer.add(r)
    with pytest.raises(MediaError, match=r"cannot write results file .*res\.json: No space left on device"):
        writer.close()
    assert path.read_text() == "old results"  # the old file is untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["res.json"]  # no temp left behind


def test_bad_paths_and_files(tmp_path):
    with pytest.raises(UserError, match=r"results format must be npz, json or csv .*'\.txt'"):
        ResultsWriter(tmp_path / "res.txt", blendshape_names=NAMES)
    with pytest.raises(UserError, match="results format must be npz, json or csv"):
        ResultsWriter(tmp_path / "res.npz", fmt="hdf5", blendshape_names=NAMES)
    with pytest.raises(UserError, match="is a folder"):
        ResultsWriter(tmp_path, fmt="npz", blendshape_names=NAMES)
    assert ResultsWriter(tmp_path / "a" / "b" / "r.csv", blendshape_names=NAMES).fmt == "csv"  # folders created
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(MediaError, match="notes.txt is not an EMICA results file"):
        load_results(other)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(MediaError, match="other.npz is not an EMICA results file"):
        load_results(tmp_path / "other.npz")
    with pytest.raises(MediaError, match="cannot read results file"):
        load_results(tmp_path / "missing.npz")
    newer = tmp_path / "newer.json"
    write(newer, sequence())
    newer.write_text(newer.read_text().replace('"version":1', '"version":2', 1))
    with pytest.raises(MediaError, match="version 2; this emica-realtime reads up to 1"):
        load_results(newer)


def test_default_blendshape_names_are_mediapipes(tmp_path):
    tracking = pytest.importorskip("realtime.tracking")
    with ResultsWriter(tmp_path / "r.npz") as w:
        w.add(sequence()[0])
    assert tuple(load_results(tmp_path / "r.npz")["blendshape_names"]) == tracking.BLENDSHAPE_NAMES


def test_float32_shortest_is_exact_and_short():
    rng = np.random.default_rng(0)
    values = np.concatenate([
        rng.normal(size=5000).astype(np.float32),
        (rng.normal(size=1000) * 10.0 ** rng.integers(-40, 38, 1000)).astype(np.float32),
        np.array([0.1, -0.0, 0.0, 1e-45, 3.4028235e38, np.nan, np.inf], np.float32),
    ])
    short = float32_shortest(values)
    back = np.array([float(repr(float(x))) for x in short]).astype(np.float32)
    np.testing.assert_array_equal(back, values)  # bit-exact through text (NaN == NaN here)
    assert repr(float(short[-7])) == "0.1"
    assert max(len(repr(float(x))) for x in short[:5000]) <= 16


def test_documented_example_runs(tmp_path):
    """The example in docs/export_format.md loads a results file and drives FLAME (synthetic assets)."""
    pytest.importorskip("torch")
    from tests.synthetic_flame import write_synthetic_flame

    write_synthetic_flame(tmp_path / "assets")
    results_path = tmp_path / "results.npz"
    write(results_path, sequence(seed=2))
    doc = (REPO / "docs" / "export_format.md").read_text()
    code = next(block for block in re.findall(r"```python\n(.*?)```", doc, re.S) if "FLAME(" in block)
    code = code.replace('"video_output/results.npz"', repr(str(results_path)))
    code = code.replace('Path("assets")', f"Path({str(tmp_path / 'assets')!r})")
    scope: dict = {}
    exec(compile(code, "export_format.md", "exec"), scope)
    assert scope["vertices"].shape == (3, 5023, 3)  # track 7 has FLAME codes in 3 frames
    assert scope["landmarks_px"].shape == (3, 105, 2)
    assert np.isfinite(scope["landmarks_px"].numpy()).all()
