"""Fault injection through the real CLI (`python app.py`, MediaPipe's mesh, so no licensed assets).

Every bad input is generated here (tests/faults.py). A fatal case must exit non-zero with exactly one
`error:` line on stderr that names the file, device, URL or flag and says what to do, with no
traceback, and must leave every file that was already there byte for byte as it was (no temp files
either). Odd but valid inputs must complete with the right number of frames.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.faults import (
    CARPHONE,
    astronaut_portrait,
    carphone_frames,
    decodable_frames,
    flipped_copy,
    garbled_copy,
    remux_head,
    truncated_copy,
    video_frame_count,
    video_size,
    write_audio_only,
    write_exif_rotated_jpeg,
    write_png,
    write_unknown_codec,
    write_video,
)

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "app.py"
STREAM_TIMEOUT_S = 5.0  # realtime.sources.STREAM_TIMEOUT_S: how long a silent stream may take to fail


# -- running the CLI ------------------------------------------------------------------------------

@dataclass
class CliRun:
    rc: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]

    @property
    def frames_reported(self) -> int | None:
        """N from the summary line ``N frames at X fps``."""
        match = re.search(r"^(\d+) frames at ", self.stdout, re.MULTILINE)
        return int(match.group(1)) if match else None

    def warnings_about(self, name: str) -> list[str]:
        """stderr lines that mention ``name``, other than the start banner and the error line."""
        return [line for line in self.stderr.splitlines()
                if name in line and not line.startswith(("input:", "error:"))]


def run_cli(cwd: Path, *args: str, timeout: float = 120) -> CliRun:
    """`python app.py --model_name mediapipe --progress false --output_folder out … ARGS` in ``cwd``;
    a flag repeated in ARGS wins (argparse keeps the last)."""
    command = [sys.executable, str(APP), "--model_name", "mediapipe", "--progress", "false",
               "--output_folder", "out", *map(str, args)]
    start = time.monotonic()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return CliRun(done.returncode, done.stdout, done.stderr, time.monotonic() - start)


def assert_fails_clearly(run: CliRun, *needles: str) -> None:
    """Non-zero exit, one `error:` line holding every needle (case-insensitive), no traceback."""
    report = f"rc={run.rc}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert run.rc != 0, report
    assert "Traceback" not in run.stderr + run.stdout, report
    assert len(run.error_lines) == 1, report
    line = run.error_lines[0].lower()
    for needle in needles:
        assert needle.lower() in line, f"{needle!r} not in {run.error_lines[0]!r}"


def assert_completes(run: CliRun, frames: int) -> None:
    report = f"rc={run.rc}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert run.rc == 0, report
    assert "Traceback" not in run.stderr + run.stdout, report
    assert run.error_lines == [], report
    assert run.frames_reported == frames, report


# -- what was there before ------------------------------------------------------------------------

def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` → its bytes (None for folders)."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in root.rglob("*")}


def prepare_output(root: Path) -> dict[str, bytes | None]:
    """An output folder with earlier results in it; returns the snapshot of all of ``root``."""
    old = root / "out" / "processed_old" / "clip" / "results" / "mediapipe"
    old.mkdir(parents=True)
    (root / "out" / "keep.bin").write_bytes(os.urandom(4096))
    (old / "video_geometry.mp4").write_bytes(os.urandom(2048))
    return snapshot(root)


def assert_intact(root: Path, before: dict[str, bytes | None], *, nothing_new: bool) -> None:
    """Everything in ``before`` is unchanged, no temp file is left, and (``nothing_new``) nothing was added."""
    after = snapshot(root)
    for path, data in before.items():
        assert path in after, f"{path} was removed"
        assert after[path] == data, f"{path} was changed"
    temps = [p for p in after if ".tmp" in Path(p).name]
    assert temps == [], f"temp files left behind: {temps}"
    if nothing_new:
        assert sorted(set(after) - set(before)) == []


# -- shared inputs --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """A folder of real clips: 30 frames of carphone copied bit for bit, index at the end and at the start."""
    folder = tmp_path_factory.mktemp("media")
    remux_head(CARPHONE, folder / "head30.mp4", 30)
    remux_head(CARPHONE, folder / "head30_faststart.mp4", 30, faststart=True)
    return folder


@pytest.fixture(scope="module")
def startup_seconds(tmp_path_factory) -> float:
    """How long the CLI takes to fail on a missing file: the cost of starting Python and the app here."""
    run = run_cli(tmp_path_factory.mktemp("startup"), "--input", "missing.mp4")
    assert run.rc != 0
    return run.seconds


# -- fatal inputs ---------------------------------------------------------------------------------
# Each builder makes its input under tmp (the run's working folder) and returns the arguments and
# what the one error line must contain: the thing that is wrong and the fix.

def _missing_path(tmp: Path, media: Path):
    return ["--input", "missing.mp4"], ["missing.mp4", "not found", "existing"]


def _path_under_a_file(tmp: Path, media: Path):
    (tmp / "notes.txt").write_text("not a folder\n")
    return ["--input", "notes.txt/clip.mp4"], ["notes.txt/clip.mp4", "not found"]


def _unreadable_file(tmp: Path, media: Path):
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode; run as a normal user to test chmod 000")
    clip = tmp / "locked.mp4"
    clip.write_bytes((media / "head30.mp4").read_bytes())
    clip.chmod(0)
    return ["--input", "locked.mp4"], ["locked.mp4", "permission"]


def _folder_without_images(tmp: Path, media: Path):
    (tmp / "photos").mkdir()
    (tmp / "photos" / "readme.txt").write_text("no pictures here\n")
    return ["--input", "photos"], ["photos", "no images", ".png"]


def _folder_of_broken_images(tmp: Path, media: Path):
    (tmp / "photos").mkdir()
    for name in ("a.png", "b.jpg"):
        (tmp / "photos" / name).write_text("not an image\n")
    return ["--input", "photos"], ["photos", "decoded"]


def _broken_single_image(tmp: Path, media: Path):
    (tmp / "portrait.png").write_text("not an image\n")
    return ["--input", "portrait.png"], ["portrait.png", "re-export"]


def _text_named_mp4(tmp: Path, media: Path):
    (tmp / "notes.mp4").write_text("hello, this is not a video\n")
    return ["--input", "notes.mp4"], ["notes.mp4", "convert"]


def _zero_length_mp4(tmp: Path, media: Path):
    (tmp / "empty.mp4").write_bytes(b"")
    return ["--input", "empty.mp4"], ["empty.mp4", "0 bytes", "again"]


def _truncated_index_at_end(tmp: Path, media: Path):
    # An interrupted copy of an ordinary mp4: the index (moov) comes last, so nothing is playable.
    truncated_copy(media / "head30.mp4", tmp / "cut.mp4", 0.3)
    return ["--input", "cut.mp4"], ["cut.mp4", "check the file"]


def _audio_only(tmp: Path, media: Path):
    write_audio_only(tmp / "voice.m4a")
    return ["--input", "voice.m4a"], ["voice.m4a", "no video stream"]


def _unknown_codec(tmp: Path, media: Path):
    write_unknown_codec(tmp / "odd.avi")
    return ["--input", "odd.avi"], ["odd.avi", "codec", "re-encode"]


def _camera_that_does_not_open(tmp: Path, media: Path):
    return ["--input", "7", "--record", "out/take.mp4"], ["camera 7", "camera index"]


def _rtsp_refused(tmp: Path, media: Path):
    return ["--input", "rtsp://127.0.0.1:9/x", "--record", "out/take.mp4"], ["rtsp://127.0.0.1:9/x", "refused", "port"]


def _http_refused(tmp: Path, media: Path):
    return ["--input", "http://127.0.0.1:9/live.mp4", "--record", "out/take.mp4"], ["http://127.0.0.1:9/live.mp4", "refused"]


def _assets_missing(tmp: Path, media: Path):
    (tmp / "assets").mkdir()
    return (["--input", str(media / "head30.mp4"), "--model_name", "EMICA-CVT_flame2020", "--assets_dir", "assets"],
            ["EMICA-CVT_flame2020", "download_assets.sh"])


def _output_folder_is_a_file(tmp: Path, media: Path):
    (tmp / "results.txt").write_text("my notes, not a folder\n")
    return ["--input", str(media / "head30.mp4"), "--output_folder", "results.txt"], ["results.txt", "--output_folder"]


def _output_folder_under_a_file(tmp: Path, media: Path):
    (tmp / "results.txt").write_text("my notes, not a folder\n")
    return (["--input", str(media / "head30.mp4"), "--output_folder", "results.txt/run1"],
            ["(results.txt)", "--output_folder"])  # names the file that blocks it, not the folder it wanted


def _live_export_under_a_file(tmp: Path, media: Path):
    (tmp / "results.txt").write_text("my notes, not a folder\n")
    return (["--input", str(media / "head30.mp4"), "--realtime", "--export", "npz", "--output_folder", "results.txt"],
            ["(results.txt)", "--output_folder"])


def _flag(*flag_args: str, needles: tuple[str, ...]):
    def build(tmp: Path, media: Path):
        return ["--input", str(media / "head30.mp4"), *flag_args], list(needles)
    return build


FATAL = {
    "missing-path": _missing_path,
    "path-under-a-file": _path_under_a_file,
    "unreadable-file": _unreadable_file,
    "folder-without-images": _folder_without_images,
    "broken-single-image": _broken_single_image,
    "text-named-mp4": _text_named_mp4,
    "zero-length-mp4": _zero_length_mp4,
    "truncated-mp4-index-at-end": _truncated_index_at_end,
    "audio-only": _audio_only,
    "unknown-codec": _unknown_codec,
    "camera-7": _camera_that_does_not_open,
    "rtsp-refused": _rtsp_refused,
    "http-refused": _http_refused,
    "model-assets-missing": _assets_missing,
    "output-folder-is-a-file": _output_folder_is_a_file,
    "output-folder-under-a-file": _output_folder_under_a_file,
    "live-export-folder-is-a-file": _live_export_under_a_file,
    "batch-size-0": _flag("--batch_size", "0", needles=("--batch_size", "at least 1", "got 0")),
    "cat-dim-5": _flag("--cat_dim", "5", needles=("--cat_dim", "5", "0, 1")),
    "scale-negative": _flag("--scale", "-1", needles=("--scale", "positive", "-1")),
    "detail-image-in-coarse-mode": _flag("--image_type", "detail", "--mode", "coarse",
                                         needles=("--image_type detail", "--mode detail")),
    "webrtc-nonsense": _flag("--webrtc", "nonsense", needles=("--webrtc", "HOST:PORT", "nonsense")),
    "record-folder-missing": _flag("--record", "/nonexistent/dir/out.mp4", needles=("/nonexistent/dir", "create it")),
    "record-avi": _flag("--record", "out/take.avi", needles=("--record", ".mp4", "take.avi")),
    "num-faces-0": _flag("--num_faces", "0", needles=("--num_faces", "at least 1")),
    "max-frames-0": _flag("--max_frames", "0", needles=("--max_frames", "at least 1")),
    "min-confidence-2": _flag("--min_confidence", "2", needles=("--min_confidence", "(0, 1]")),
    "device-gpu0": _flag("--device", "gpu0", needles=("--device", "cuda:N", "gpu0")),
    "bool-maybe": _flag("--save_video", "maybe", needles=("--save_video", "true or false")),
    "stream-params-tcp": _flag("--stream_params", "tcp://127.0.0.1:9", needles=("--stream_params", "udp://")),
    "unknown-flag": _flag("--colour", "red", needles=("--colour", "--help")),
    "integer-flag-text": _flag("--batch_size", "four", needles=("--batch_size", "four")),
    "compile-on-cpu": _flag("--compile", "true", "--device", "cpu", needles=("--compile", "cuda:N")),
    "compile-with-onnxruntime": _flag("--compile", "true", "--device", "cuda:0", "--backend", "onnxruntime",
                                      needles=("--compile", "--backend onnxruntime")),
    "identity-refresh-negative": _flag("--identity_refresh", "-5", needles=("--identity_refresh", "-5", "0 (never)")),
    "identity-refresh-without-cache": _flag("--identity_refresh", "5", "--identity_cache", "false",
                                            needles=("--identity_refresh", "--identity_cache is false")),
    "compile-the-mesh": _flag("--compile", "true", "--device", "cuda:0", "--model_name", "mediapipe",
                              needles=("--compile", "MediaPipe mesh")),
}


@pytest.mark.parametrize("case", FATAL)
def test_fatal_input_fails_with_one_clear_line_and_touches_nothing(case, tmp_path, media):
    args, needles = FATAL[case](tmp_path, media)
    before = prepare_output(tmp_path)
    run = run_cli(tmp_path, "--save_images", "false", *args, timeout=60)
    assert_fails_clearly(run, *needles)
    assert_intact(tmp_path, before, nothing_new=True)


def test_no_input_says_pass_input(tmp_path):
    run = subprocess.run([sys.executable, str(APP)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert_fails_clearly(CliRun(run.returncode, run.stdout, run.stderr, 0.0), "--input", "camera index")
    assert list(tmp_path.iterdir()) == []


def test_audio_only_error_says_what_the_file_has(tmp_path):
    write_audio_only(tmp_path / "voice.m4a")
    run = run_cli(tmp_path, "--input", "voice.m4a")
    assert_fails_clearly(run, "voice.m4a", "it has audio")


def test_folder_of_broken_images_says_what_to_do(tmp_path, media):
    args, _ = _folder_of_broken_images(tmp_path, media)
    run = run_cli(tmp_path, *args)
    assert_fails_clearly(run, "photos", "re-export")


def test_camera_failure_prints_only_our_line(tmp_path):
    run = run_cli(tmp_path, "--input", "7", "--record", "take.mp4")
    assert_fails_clearly(run, "camera 7")
    assert "VIDEOIO" not in run.stderr and "OpenCV(" not in run.stderr and "[ERROR" not in run.stderr


def test_refused_streams_fail_at_once(tmp_path, startup_seconds):
    """A refused connection is reported right away, not after the stream timeout."""
    for url in ("rtsp://127.0.0.1:9/x", "http://127.0.0.1:9/live.mp4"):
        run = run_cli(tmp_path, "--input", url, "--record", "take.mp4", timeout=60)
        assert_fails_clearly(run, url, "refused")
        assert run.seconds - startup_seconds < STREAM_TIMEOUT_S - 1, (run.seconds, startup_seconds)


class _SilentServer:
    """A TCP server that accepts connections and never says a word (a hung camera or proxy)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.clients: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return  # closed
            self.clients.append(client)

    def close(self):
        self.sock.close()
        for client in self.clients:
            client.close()
        self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def silent_stream_run(tmp_path_factory):
    server = _SilentServer()
    try:
        url = f"rtsp://127.0.0.1:{server.port}/live"
        return url, run_cli(tmp_path_factory.mktemp("silent"), "--input", url, "--record", "take.mp4", timeout=60)
    finally:
        server.close()


def test_silent_stream_gives_up_after_the_timeout(silent_stream_run, startup_seconds):
    url, run = silent_stream_run
    assert_fails_clearly(run, url)
    assert run.seconds - startup_seconds < STREAM_TIMEOUT_S * 2 + 3, (run.seconds, startup_seconds)


def test_silent_stream_says_it_did_not_answer(silent_stream_run):
    url, run = silent_stream_run
    assert_fails_clearly(run, url, "did not answer")


def test_record_onto_a_folder_fails_before_starting(tmp_path, media):
    (tmp_path / "take.mp4").mkdir()
    before = prepare_output(tmp_path)
    run = run_cli(tmp_path, "--input", str(media / "head30.mp4"), "--max_frames", "2", "--save_video", "false",
                  "--save_images", "false", "--record", "take.mp4")
    assert_fails_clearly(run, "take.mp4", "folder")
    assert_intact(tmp_path, before, nothing_new=True)


def test_undecodable_video_fails_and_keeps_the_earlier_results(tmp_path, media):
    """Every frame is garbage behind a valid index: the failure comes mid-run, after the recorder
    opened, and the previous video under the same name must survive."""
    garbled_copy(media / "head30.mp4", tmp_path / "clip.mp4")
    before = prepare_output(tmp_path)
    run = run_cli(tmp_path, "--input", "clip.mp4", "--processed_subfolder", "processed_old", "--save_images", "false")
    assert_fails_clearly(run, "clip.mp4", "re-encode")
    assert_intact(tmp_path, before, nothing_new=False)  # incl. out/processed_old/clip/…/video_geometry.mp4


# -- damaged but usable inputs --------------------------------------------------------------------

@pytest.fixture(scope="module")
def truncated_run(tmp_path_factory, media):
    """A streaming-ready mp4 (index first) cut at 30 %: the frames before the cut are playable."""
    tmp = tmp_path_factory.mktemp("truncated")
    clip = truncated_copy(media / "head30_faststart.mp4", tmp / "partial.mp4", 0.3)
    most, _ = decodable_frames(clip)
    assert 3 < most < 30
    before = prepare_output(tmp)
    return tmp, before, most, run_cli(tmp, "--input", "partial.mp4", "--save_images", "false")


def test_truncated_video_completes_with_the_frames_it_has(truncated_run):
    tmp, before, most, run = truncated_run
    report = f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert run.rc == 0 and run.error_lines == [] and "Traceback" not in run.stderr, report
    # FFmpeg's frame threads may drop the frames next to the cut (see decodable_frames), not more.
    assert most - 3 <= run.frames_reported <= most, (run.frames_reported, most)
    (video,) = (tmp / "out").glob("processed_*/partial/results/mediapipe/video_geometry.mp4")
    assert video_frame_count(video) == run.frames_reported
    assert_intact(tmp, before, nothing_new=False)


def test_truncated_video_warns_that_it_ended_early(truncated_run):
    _, _, _, run = truncated_run
    expected = f"{run.frames_reported} of 30"
    assert any(expected in line for line in run.warnings_about("partial.mp4")), run.stderr


@pytest.fixture(scope="module")
def concealed_run(tmp_path_factory, media):
    """Bytes flipped in the middle; FFmpeg conceals the damage and flags one frame corrupt."""
    tmp = tmp_path_factory.mktemp("concealed")
    clip = flipped_copy(media / "head30.mp4", tmp / "scratched.mp4", at=0.3, count=1000)
    assert decodable_frames(clip) == (30, 1)
    before = prepare_output(tmp)
    return tmp, before, run_cli(tmp, "--input", "scratched.mp4", "--save_images", "false")


def test_concealed_corruption_keeps_every_frame(concealed_run):
    tmp, before, run = concealed_run
    assert_completes(run, 30)
    (video,) = (tmp / "out").glob("processed_*/scratched/results/mediapipe/video_geometry.mp4")
    assert video_frame_count(video) == 30
    assert_intact(tmp, before, nothing_new=False)


def test_concealed_corruption_is_counted(concealed_run):
    _, _, run = concealed_run
    assert any("corrupt" in line.lower() for line in run.warnings_about("scratched.mp4")), run.stderr


def test_corrupt_packets_are_skipped_and_counted(tmp_path, media):
    clip = flipped_copy(media / "head30.mp4", tmp_path / "damaged.mp4", at=0.6, count=4000)
    most, _ = decodable_frames(clip)
    assert most < 30  # some packets no longer decode at all
    before = prepare_output(tmp_path)
    run = run_cli(tmp_path, "--input", "damaged.mp4", "--save_images", "false")
    report = f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert run.rc == 0 and run.error_lines == [] and "Traceback" not in run.stderr, report
    assert most - 3 <= run.frames_reported <= most, (run.frames_reported, most)
    assert any("skipped" in line and "decode" in line for line in run.warnings_about("damaged.mp4")), report
    (video,) = (tmp_path / "out").glob("processed_*/damaged/results/mediapipe/video_geometry.mp4")
    assert video_frame_count(video) == run.frames_reported
    assert_intact(tmp_path, before, nothing_new=False)


def test_folder_with_one_broken_image_completes(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    portrait = astronaut_portrait()
    write_png(photos / "first.png", portrait[:, :, ::-1])
    (photos / "second.png").write_text("this was never an image\n")
    write_png(photos / "third.png", np.ascontiguousarray(portrait[:, ::-1, ::-1]))  # mirrored
    before = prepare_output(tmp_path)
    run = run_cli(tmp_path, "--input", "photos")
    assert_completes(run, 2)
    assert any("skipped" in line for line in run.warnings_about("second.png")), run.stderr
    results = tmp_path / "out" / "mediapipe"
    assert sorted(p.name for p in results.iterdir() if p.is_dir()) == ["first00", "third00"]
    assert (results / "first00" / "geometry.png").is_file()
    assert_intact(tmp_path, before, nothing_new=False)


# -- odd inputs that must work --------------------------------------------------------------------

def _only_video(tmp: Path, stem: str) -> Path:
    (video,) = (tmp / "out").glob(f"processed_*/{stem}/results/mediapipe/video_geometry.mp4")
    return video


def test_one_pixel_video(tmp_path):
    write_video(tmp_path / "dot.mp4", [np.full((1, 1, 3), 90 + 10 * i, np.uint8) for i in range(5)], pix_fmt="yuv444p")
    run = run_cli(tmp_path, "--input", "dot.mp4", "--save_images", "false")
    assert_completes(run, 5)
    assert video_frame_count(_only_video(tmp_path, "dot")) == 5


def test_odd_sized_video(tmp_path):
    frames = [f[:143, :175] for f in carphone_frames(10)]
    write_video(tmp_path / "odd.mp4", frames, pix_fmt="yuv444p")
    run = run_cli(tmp_path, "--input", "odd.mp4", "--save_images", "false")
    assert_completes(run, 10)
    video = _only_video(tmp_path, "odd")
    assert video_frame_count(video) == 10
    width, height = video_size(video)
    assert (width, height) == (176, 3 * 143 + 1)  # three stacked panels, padded to even for 4:2:0


def test_variable_frame_rate_video_keeps_every_frame(tmp_path):
    pts_ms = [0, 33, 40, 100, 133, 300, 310, 320, 400, 433]  # bursts and gaps, two frames 7 ms apart
    write_video(tmp_path / "vfr.mp4", carphone_frames(10), pts_ms=pts_ms)
    run = run_cli(tmp_path, "--input", "vfr.mp4", "--save_images", "false")
    assert_completes(run, 10)
    assert video_frame_count(_only_video(tmp_path, "vfr")) == 10


def test_video_with_another_extension_and_a_unicode_path(tmp_path, media):
    folder = tmp_path / "my clips"
    folder.mkdir()
    remux_head(media / "head30.mp4", folder / "vidéo 1.dat", 8)
    run = run_cli(tmp_path, "--input", "my clips/vidéo 1.dat", "--save_images", "false")
    assert_completes(run, 8)
    assert video_frame_count(_only_video(tmp_path, "vidéo 1")) == 8


def test_video_without_faces(tmp_path):
    ramp = np.linspace(0, 255, 64 * 48 * 3).astype(np.uint8).reshape(48, 64, 3)
    write_video(tmp_path / "wall.mp4", [np.roll(ramp, i, axis=1) for i in range(6)])
    run = run_cli(tmp_path, "--input", "wall.mp4")
    assert_completes(run, 6)
    results = _only_video(tmp_path, "wall").parent
    assert video_frame_count(results / "video_geometry.mp4") == 6
    assert [p for p in results.iterdir() if p.is_dir()] == []  # no face, no per-face folder
    (hint,) = run.warnings_about("wall.mp4")  # an empty result is explained, once
    assert hint.startswith("no face was found in any of the 6 frames of wall.mp4") and "--min_confidence" in hint


def test_4k_image(tmp_path):
    from skimage import data

    image = np.zeros((2160, 3840, 3), np.uint8)
    image[:, 840:3000] = cv2.resize(data.astronaut(), (2160, 2160), interpolation=cv2.INTER_LINEAR)
    write_png(tmp_path / "poster.png", image[:, :, ::-1])
    run = run_cli(tmp_path, "--input", "poster.png", "--save_images", "false", "--save_codes")
    assert_completes(run, 1)
    codes = np.load(tmp_path / "out" / "mediapipe" / "codes.npz")
    assert list(codes["name"]) == ["poster"]
    cx, cy = codes["center"][0]
    assert 1500 < cx < 2300 and 300 < cy < 900  # the face, at the scale of the full frame


def test_gray_rgba_16bit_and_exif_rotated_images_find_the_same_face(tmp_path):
    """One folder, five encodings of the same portrait: each face lands where the plain PNG's does."""
    photos = tmp_path / "photos"
    photos.mkdir()
    rgb = astronaut_portrait()
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    write_png(photos / "plain.png", bgr)
    write_png(photos / "gray.png", np.asarray(rgb.mean(axis=2).round(), np.uint8))
    alpha = np.linspace(0, 255, rgb.shape[1]).astype(np.uint8)[None, :].repeat(rgb.shape[0], axis=0)
    write_png(photos / "rgba.png", np.dstack([bgr, alpha]))
    write_png(photos / "deep.png", bgr.astype(np.uint16) * 257)
    write_exif_rotated_jpeg(photos / "phone.jpg", rgb)
    run = run_cli(tmp_path, "--input", "photos", "--save_images", "false", "--save_codes")
    assert_completes(run, 5)
    codes = np.load(tmp_path / "out" / "mediapipe" / "codes.npz")
    centers = dict(zip(codes["name"], codes["center"]))
    sizes = dict(zip(codes["name"], codes["size"]))
    assert sorted(centers) == ["deep", "gray", "phone", "plain", "rgba"]
    for name in ("deep", "gray", "phone", "rgba"):
        np.testing.assert_allclose(centers[name], centers["plain"], atol=4.0, err_msg=name)
        assert abs(sizes[name] - sizes["plain"]) <= 0.05 * sizes["plain"], name
