"""End to end through the CLI: the embedded MediaPipe model on real footage, outputs in inferno's layout."""

import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from realtime.cli import main

REPO = Path(__file__).resolve().parents[1]


def _video_info(path: Path):
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        frames = sum(1 for _ in c.decode(video=0))
        rate = v.average_rate
    with av.open(str(path)) as c:
        a = c.streams.audio[0] if c.streams.audio else None
        audio_seconds = None
        if a is not None:
            n = sum(f.samples for f in c.decode(audio=0))
            audio_seconds = n / a.rate
    return frames, rate, audio_seconds


def _only(pattern: str, root: Path) -> Path:
    hits = sorted(root.glob(pattern))
    assert len(hits) == 1, hits
    return hits[0]


@pytest.fixture(scope="module")
def carphone_run(tmp_path_factory, carphone_path):
    out = tmp_path_factory.mktemp("run")
    rc = main(["--input", str(carphone_path), "--output_folder", str(out), "--save_codes", "--save_mesh",
               "--model_name", "mediapipe", "--progress", "false"])
    assert rc == 0
    return _only("processed_*/carphone_pristine/results/mediapipe", out)


def test_video_has_every_frame_at_input_rate(carphone_run):
    frames, rate, audio = _video_info(carphone_run / "video_geometry.mp4")
    assert frames == 120
    assert abs(float(rate) - 30000 / 1001) < 1e-3
    assert audio is None  # carphone has no sound


def test_panels_are_stacked_vertically(carphone_run):
    with av.open(str(carphone_run / "video_geometry.mp4")) as c:
        frame = next(c.decode(video=0)).to_ndarray(format="rgb24")
    assert frame.shape[:2] == (144 * 3, 176)
    top, middle = frame[:144].astype(int), frame[144:288].astype(int)
    assert np.abs(top - middle).mean() > 1.0  # the overlay panel differs from the original


def test_per_frame_outputs_in_inferno_layout(carphone_run):
    folders = sorted(p.name for p in carphone_run.iterdir() if p.is_dir())
    assert len(folders) >= 114  # MediaPipe tracks >= 95 % of carphone's frames
    assert folders[0] in ("000001_000", "000002_000")
    sample = carphone_run / folders[0]
    assert (sample / "geometry.png").is_file()
    assert (sample / "mesh_coarse.obj").is_file()
    assert np.load(sample / "blendshapes.npy").shape == (52,)
    codes = np.load(carphone_run / "codes.npz")
    assert len(codes["frame_index"]) == len(folders)


def test_audio_is_carried_through(tmp_path, carphone_path):
    """A file with sound keeps it: same duration within one frame (inferno's demo loses it)."""
    src = tmp_path / "talk.mp4"
    with av.open(str(carphone_path)) as inp, av.open(str(src), "w") as out:
        vin = inp.streams.video[0]
        vs = out.add_stream("libx264", rate=Fraction(30000, 1001))
        vs.width, vs.height, vs.pix_fmt = vin.width, vin.height, "yuv420p"
        aus = out.add_stream("aac", rate=48000)
        aus.layout = "mono"
        n = 0
        for frame in inp.decode(video=0):
            img = frame.to_ndarray(format="rgb24")
            for pkt in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(pkt)
            n += 1
        for pkt in vs.encode():
            out.mux(pkt)
        seconds = n * 1001 / 30000
        t = np.arange(int(seconds * 48000)) / 48000
        tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        for i in range(0, len(tone), 1024):
            af = av.AudioFrame.from_ndarray(tone[None, i:i + 1024], format="fltp", layout="mono")
            af.sample_rate = 48000
            for pkt in aus.encode(af):
                out.mux(pkt)
        for pkt in aus.encode():
            out.mux(pkt)
    rc = main(["--input", str(src), "--output_folder", str(tmp_path / "out"), "--model_name", "mediapipe",
               "--save_images", "false", "--progress", "false"])
    assert rc == 0
    video = _only("processed_*/talk/results/mediapipe/video_geometry.mp4", tmp_path / "out")
    frames, rate, audio_seconds = _video_info(video)
    assert frames == 120
    assert audio_seconds is not None and abs(audio_seconds - 120 * 1001 / 30000) <= 1001 / 30000


def test_image_folder_outputs(tmp_path):
    skimage = pytest.importorskip("skimage")
    import cv2

    folder = tmp_path / "photos"
    folder.mkdir()
    cv2.imwrite(str(folder / "astronaut.png"), cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR))
    rc = main(["--input", str(folder), "--output_folder", str(tmp_path / "out"), "--model_name", "mediapipe",
               "--progress", "false"])
    assert rc == 0
    assert (tmp_path / "out" / "mediapipe" / "astronaut00" / "geometry.png").is_file()


def test_resume_of_an_image_folder_says_it_starts_over(tmp_path, caplog):
    import cv2

    folder = tmp_path / "photos"
    folder.mkdir()
    cv2.imwrite(str(folder / "grey.png"), np.full((64, 64, 3), 90, np.uint8))
    rc = main(["--input", str(folder), "--output_folder", str(tmp_path / "out"), "--model_name", "mediapipe",
               "--progress", "false", "--resume"])
    assert rc == 0 and "--resume continues video files only" in caplog.text


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--input", "/nonexistent/clip.mp4"], "/nonexistent/clip.mp4"),
        (["--input", "README.md"], "README.md"),
        (["--input", "x.mp4", "--batch_size", "0"], "--batch_size"),
        (["--input", "realtime/data/carphone_pristine.mp4", "--model_name", "EMICA-CVT_flame2020", "--assets_dir", "/nonexistent"],
         "download_assets.sh"),
        # A mistyped --assets_dir is an error, not a silent run of the MediaPipe mesh instead of EMICA.
        (["--input", "realtime/data/carphone_pristine.mp4", "--assets_dir", "/nonexistent_assets"], "/nonexistent_assets"),
        ([], "--input"),
    ],
)
def test_user_mistakes_give_one_line_and_nonzero_exit(args, needle):
    proc = subprocess.run([sys.executable, "app.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_parallel_tracker_processes_keep_every_frame_in_order(tmp_path, carphone_path, monkeypatch):
    """On a many-core machine files are tracked by several processes; the output is still lossless and ordered."""
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    rc = main(["--input", str(carphone_path), "--output_folder", str(tmp_path), "--model_name", "mediapipe",
               "--num_workers", "2", "--save_codes", "--progress", "false"])
    assert rc == 0
    folder = _only("processed_*/carphone_pristine/results/mediapipe", tmp_path)
    frames, _, _ = _video_info(folder / "video_geometry.mp4")
    assert frames == 120
    codes = np.load(folder / "codes.npz")
    assert list(codes["frame_index"]) == sorted(codes["frame_index"]) and len(codes["frame_index"]) >= 114


@pytest.mark.parametrize("args, needle", [
    (["--model_name", "mediapipe", "--mode", "detail"], "no detail branch"),
    (["--mode", "detail", "--assets_dir", "/nonexistent"], "download_assets.sh"),
])
def test_detail_mode_without_a_detail_model_is_refused(args, needle):
    proc = subprocess.run([sys.executable, "app.py", "--input", "realtime/data/carphone_pristine.mp4", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr


def test_help_states_each_default_once_in_the_flags_own_terms():
    from realtime.cli import build_parser

    text = " ".join(build_parser().format_help().split())  # argparse wraps lines
    assert "(default: True)" not in text and "(default: False)" not in text and "(default: None)" not in text
    assert "--no_audio same as --audio false --audio_device" in text  # a switch has no default of its own
    assert "(default: true)" in text and "(default: 8)" in text  # booleans in their own words, numbers as numbers
