"""`--smoothing lookahead`: frames held back K frames and smoothed zero-phase over t-K..t+K, for files."""

from __future__ import annotations

import threading
from pathlib import Path

import av
import numpy as np
import pytest

from realtime.cli import main
from realtime.export import load_results
from realtime.lookahead import LookaheadSmoother, lookahead_frames
from realtime.reconstruct import MediaPipeMeshReconstructor
from realtime.smoothing import (
    ParamSmoother,
    cam_to_screen,
    jitter,
    screen_to_cam,
    step_lag,
)
from realtime.types import Face, Frame, FrameResult, Reconstruction
from tests.fakes import fake_face

FPS = 30.0
EMICA = "EMICA-CVT_flame2020_notexture"

# Per key: noise and step size each smoothing group is tuned for (realtime.smoothing.PRESETS).
CASES = {
    "globalpose": dict(noise=0.01, step=np.array([0.0, 0.2, 0.0]), base=np.array([0.1, -0.2, 0.05])),
    "cam": dict(noise=0.005, step=np.array([0.0, 0.1, 0.0]), base=np.array([8.0, 0.01, 0.02])),
    "expcode": dict(noise=0.03, step=np.full(100, 0.5), base=np.zeros(100)),
    "landmarks": dict(noise=0.5, step=np.tile([10.0, 0.0, 0.0], (478, 1)), base=np.full((478, 3), 100.0)),
}


def _value(key: str, t: int, step_at: int | None, rng=None) -> np.ndarray:
    """Base, plus the step from `step_at` on, plus white noise unless `rng` is None."""
    c = CASES[key]
    jump = c["step"] if step_at is not None and t >= step_at else 0.0
    noise = 0.0 if rng is None else c["noise"]
    if key == "cam":  # step and noise in what the viewer sees
        return screen_to_cam(cam_to_screen(c["base"]) + jump + noise * rng_normal(rng, 3)).astype(np.float32)
    return (c["base"] + jump + noise * rng_normal(rng, c["base"].shape)).astype(np.float32)


def rng_normal(rng, shape) -> np.ndarray:
    return np.zeros(shape) if rng is None else rng.normal(0, 1, shape)


def _points(key: str, values) -> np.ndarray:
    """(T, ...) → (T, N, D) for jitter/step_lag."""
    a = np.asarray(values, np.float64)
    if key == "cam":
        a = cam_to_screen(a)
    if key == "landmarks":
        return a[..., :2]
    return a.reshape(len(a), -1, 3 if key in ("globalpose", "cam") else 1)


def _face(track_id: int, landmarks: np.ndarray | None = None) -> Face:
    lm = np.full((478, 3), 100.0, np.float32) if landmarks is None else landmarks
    return fake_face(track_id=track_id, landmarks=lm, center=(100.0, 100.0), size=80.0)


class CodesReconstructor:
    """Stands in for EMICA's FLAME decode: the 'geometry' is the codes themselves, so what comes out is what
    the look-ahead stage asked for."""

    def temporal_codes(self, rec: Reconstruction) -> dict[str, np.ndarray]:
        return dict(rec.codes)

    def redecode(self, recs, codes):
        return [Reconstruction(face=r.face, vertices=r.vertices, faces=r.faces, world_to_frame=r.world_to_frame,
                               codes={**r.codes, **c}) for r, c in zip(recs, codes)]


def _result(t: int, recs: list[Reconstruction]) -> FrameResult:
    return FrameResult(frame=Frame(index=t, pts=t / FPS, image=np.zeros((2, 2, 3), np.uint8)),
                       faces=[r.face for r in recs], reconstructions=recs)


def _run(key: str, n: int, step_at: int | None, seed: int):
    """Raw and look-ahead-smoothed values of one key over n frames of one track."""
    rng = np.random.default_rng(seed)
    raw = [_value(key, t, step_at, rng) for t in range(n)]
    if key == "landmarks":
        mesh = MediaPipeMeshReconstructor()
        recon, results = mesh, [_result(t, [mesh._one(_face(1, x), t / FPS)]) for t, x in enumerate(raw)]
    else:
        recon = CodesReconstructor()
        results = [_result(t, [Reconstruction(face=_face(1), vertices=np.zeros((1, 3), np.float32),
                                              faces=np.zeros((1, 3), np.int32), world_to_frame=np.eye(4),
                                              codes={key: x})]) for t, x in enumerate(raw)]
    params = ParamSmoother()
    stage = LookaheadSmoother(recon, params, lookahead_frames(params, FPS))
    out = [r for res in results for r in stage.push(res)] + stage.flush()
    assert [r.frame.index for r in out] == list(range(n))  # every frame once, in order
    if key == "landmarks":
        return raw, [np.concatenate([r.reconstructions[0].landmarks, raw[0][:, 2:]], axis=1) for r in out], out
    return raw, [r.reconstructions[0].codes[key] for r in out], out


def test_lookahead_is_three_frames_at_30_fps():
    assert lookahead_frames(ParamSmoother(), 30.0) == 3
    assert lookahead_frames(ParamSmoother(), 60.0) == 6


@pytest.mark.parametrize("key", list(CASES))
def test_static_noise_is_cut_at_least_3x(key):
    for seed in range(3):
        raw, out, _ = _run(key, 150, None, seed)
        ratio = jitter(_points(key, raw)) / jitter(_points(key, out))
        assert ratio >= 3.0, f"{key}: jitter only reduced {ratio:.2f}x"


@pytest.mark.parametrize("key", list(CASES))
def test_step_has_no_lag(key):
    for seed in range(3):
        clean = [_value(key, t, 30) for t in range(60)]
        _, out, _ = _run(key, 60, 30, seed)
        assert step_lag(_points(key, clean), _points(key, out)) == 0, key


def test_mediapipe_mesh_is_rebuilt_from_the_smoothed_landmarks():
    raw, out, results = _run("landmarks", 20, None, 0)
    for result in results:
        rec = result.reconstructions[0]
        # The mesh lands exactly on the smoothed landmarks; the tracker's own landmarks stay raw.
        np.testing.assert_allclose(rec.frame_points()[:, :2], rec.landmarks[:468], atol=1e-3)
        np.testing.assert_array_equal(rec.face.landmarks, raw[result.frame.index])
    assert not np.allclose(out[10][:, :2], raw[10][:, :2])


def test_mediapipe_world_mesh_ignores_the_raw_tracking_box():
    # Smoothed landmarks normalised by the raw tracker's box would carry the box's jitter into the exported
    # mesh: the world space is measured on the landmarks the mesh is built from.
    rng = np.random.default_rng(0)
    landmarks = (rng.uniform(80, 160, (478, 3))).astype(np.float32)
    model = MediaPipeMeshReconstructor(scale=1.25)
    steady = model._mesh(_face(0, landmarks), landmarks)
    jittered_face = _face(0, landmarks)
    jittered_face.center, jittered_face.size = (103.0, 97.5), 83.0  # the raw box of another frame
    moved = model._mesh(jittered_face, landmarks)
    np.testing.assert_array_equal(moved.vertices, steady.vertices)
    np.testing.assert_allclose(moved.frame_points()[:, :2], landmarks[:468, :2], atol=1e-3)


def test_mediapipe_mesh_of_a_point_sized_face_is_finite():
    rec = MediaPipeMeshReconstructor()._mesh(_face(0), np.full((478, 3), 100.0, np.float32))
    assert np.all(np.isfinite(rec.vertices)) and np.all(np.isfinite(rec.world_to_frame))


def test_tracks_that_come_and_go_use_the_neighbours_they_have():
    stage = LookaheadSmoother(CodesReconstructor(), ParamSmoother(), frames=2)
    present = {1: range(10), 2: [3, 4, 5, 8]}  # track 2 appears, vanishes, comes back for one frame
    results = []
    for t in range(10):
        recs = [Reconstruction(face=_face(tid), vertices=np.zeros((1, 3), np.float32), faces=np.zeros((1, 3), np.int32),
                               world_to_frame=np.eye(4), codes={"expcode": np.full(4, float(t * tid), np.float32)})
                for tid, frames in present.items() if t in frames]
        results.append(_result(t, recs))
    out = [r for res in results for r in stage.push(res)]
    assert [r.frame.index for r in out] == list(range(8))  # held back 2 frames
    out += stage.flush()
    assert [r.frame.index for r in out] == list(range(10))
    codes = {(r.frame.index, rec.face.track_id): rec.codes["expcode"] for r in out for rec in r.reconstructions}
    assert len(codes) == 10 + 4
    # A ramp is kept exactly by the local quadratic fit, wherever the neighbours are missing.
    for (t, tid), value in codes.items():
        np.testing.assert_allclose(value, t * tid, atol=1e-4)


def test_off_preset_passes_every_value_bit_identical():
    stage = LookaheadSmoother(CodesReconstructor(), ParamSmoother("off"), frames=3)
    rng = np.random.default_rng(0)
    raw = [rng.normal(size=100).astype(np.float32) for _ in range(8)]
    results = [_result(t, [Reconstruction(face=_face(1), vertices=np.zeros((1, 3), np.float32),
                                          faces=np.zeros((1, 3), np.int32), world_to_frame=np.eye(4),
                                          codes={"expcode": x})]) for t, x in enumerate(raw)]
    out = [r for res in results for r in stage.push(res)] + stage.flush()
    for r in out:
        assert r.reconstructions[0].codes["expcode"].tobytes() == raw[r.frame.index].tobytes()


# -- through the CLI --------------------------------------------------------------------------------

def _cli(video: Path, out: Path, smoothing: str, *extra: str) -> Path:
    rc = main(["--input", str(video), "--output_folder", str(out), "--smoothing", smoothing, "--export", "npz",
               "--save_images", "false", "--progress", "false", *extra])
    assert rc == 0
    (folder,) = out.glob("processed_*/*/results/*")
    return folder


def _video_frames(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


@pytest.fixture(scope="module")
def mediapipe_runs(tmp_path_factory, carphone_path):
    out = tmp_path_factory.mktemp("lookahead")
    return {mode: _cli(carphone_path, out / mode, mode, "--model_name", "mediapipe") for mode in ("off", "lookahead")}


def test_mediapipe_lookahead_keeps_every_frame_in_order(mediapipe_runs):
    off = load_results(mediapipe_runs["off"] / "results.npz")
    smooth = load_results(mediapipe_runs["lookahead"] / "results.npz")
    assert _video_frames(mediapipe_runs["lookahead"] / "video_geometry.mp4") == 120
    assert list(smooth["frame_index"]) == list(off["frame_index"])
    assert np.all(np.diff(smooth["frame_index"]) > 0)
    # carphone is mostly real motion, which a zero-phase fit keeps: only the tracker noise goes.
    assert jitter(smooth["landmarks_model"]) < 0.97 * jitter(off["landmarks_model"])


def test_smoothing_off_is_the_raw_tracker_output(mediapipe_runs):
    off = load_results(mediapipe_runs["off"] / "results.npz")
    assert off["landmarks_model"].tobytes() == off["landmarks_mediapipe"].tobytes()


def test_emica_lookahead_redecodes_smoothed_codes(tmp_path, synthetic_assets, carphone_path):
    args = ("--assets_dir", str(synthetic_assets), "--max_frames", "8")
    off = load_results(_cli(carphone_path, tmp_path / "off", "off", *args) / "results.npz")
    folder = _cli(carphone_path, tmp_path / "la", "lookahead", *args)
    smooth = load_results(folder / "results.npz")
    assert folder.name == EMICA
    assert _video_frames(folder / "video_geometry.mp4") == 8
    assert list(smooth["frame_index"]) == list(off["frame_index"]) == list(range(8))
    # Each frame's codes are the zero-phase fit over frames t-3..t+3 of the raw run's codes.
    params, k = ParamSmoother(), 3
    for t in range(8):
        window = range(max(0, t - k), min(8, t + k + 1))
        codes = [{"expcode": off["expression"][i], "globalpose": off["pose"][i, :3], "jawpose": off["pose"][i, 6:9],
                  "cam": off["cam"][i]} for i in window]
        want = params.smooth_sequence(codes, [off["pts"][i] for i in window])[list(window).index(t)]
        got = {"expcode": smooth["expression"][t], "globalpose": smooth["pose"][t, :3], "jawpose": smooth["pose"][t, 6:9],
               "cam": smooth["cam"][t]}
        for key, value in got.items():
            np.testing.assert_allclose(value, want[key], atol=1e-4, err_msg=f"{key} at frame {t}")
    assert not np.allclose(smooth["expression"], off["expression"])
    np.testing.assert_array_equal(smooth["shape"], off["shape"])  # identity is not smoothed
    # The geometry follows: the projected landmarks moved with the smoothed codes.
    assert not np.allclose(smooth["landmarks_model"][3], off["landmarks_model"][3])


@pytest.mark.parametrize("extra", [["--realtime"], []], ids=["realtime-file", "image-folder"])
def test_lookahead_refuses_input_without_a_future(tmp_path, carphone_path, capsys, extra):
    if extra:
        source = str(carphone_path)
    else:
        import cv2
        from skimage.data import astronaut

        (tmp_path / "photos").mkdir()
        cv2.imwrite(str(tmp_path / "photos" / "a.png"), astronaut()[..., ::-1])
        source = str(tmp_path / "photos")
    rc = main(["--input", source, "--model_name", "mediapipe", "--smoothing", "lookahead",
               "--output_folder", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--smoothing lookahead" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("where", ["upstream", "downstream"])
def test_a_failing_stage_ends_the_run_with_its_error_and_no_hang(where):
    from realtime.lookahead import LookaheadPipeline

    class Broken:
        name = "broken"

        def setup(self):
            pass

        def process(self, batch):
            if any(r.frame.index == 20 for r in batch):
                raise RuntimeError("stage broke")

        def teardown(self):
            pass

    results = (_result(t, [Reconstruction(face=_face(1), vertices=np.zeros((1, 3), np.float32),
                                          faces=np.zeros((1, 3), np.int32), world_to_frame=np.eye(4),
                                          codes={"expcode": np.zeros(3, np.float32)})]) for t in range(500))
    params = ParamSmoother()
    seen = []
    pipe = LookaheadPipeline(results, [Broken()] if where == "upstream" else [], [] if where == "upstream" else [Broken()],
                             LookaheadSmoother(CodesReconstructor(), params, lookahead_frames(params, FPS)),
                             on_result=lambda r: seen.append(r.frame.index))
    done = []
    worker = threading.Thread(target=lambda: done.append(pipe.run()), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert done, "the look-ahead pipeline hung after a stage failed"
    assert isinstance(done[0].error, RuntimeError)
    assert 20 not in seen and seen == sorted(seen)
