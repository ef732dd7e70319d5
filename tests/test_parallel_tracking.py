"""ParallelTracker: several MediaPipe processes over chunks of a real clip, compared with one FaceTracker."""

from __future__ import annotations

import os
import signal
import time
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

import realtime.parallel_tracking as pt
from realtime.errors import AssetError, MediaError, UserError
from realtime.parallel_tracking import ParallelTracker
from realtime.sources import open_source
from realtime.tracking import FaceTracker

CARPHONE_FRAMES = 120


def write_upscaled_clip(source: Path, path: Path, width: int = 640, height: int = 480, gop: int = 30,
                        repeat: int = 1) -> Path:
    """carphone upscaled (bicubic) to width×height, H.264 with a keyframe every ``gop`` frames and B-frames,
    at carphone's 29.97 fps; ``repeat`` plays it forwards and backwards that many times for a longer clip."""
    frames = [cv2.resize(f.image, (width, height), interpolation=cv2.INTER_CUBIC) for f in open_source(str(source))]
    sequence = []
    for k in range(repeat):
        sequence += frames if k % 2 == 0 else frames[::-1]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=Fraction(30000, 1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.options = {"preset": "veryfast", "crf": "18", "bf": "2", "sc_threshold": "0"}
        for image in sequence:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode())
    return path


def single_tracker(path: Path) -> list[tuple[float, list]]:
    """(pts, faces) per frame from one FaceTracker over the whole file: the reference."""
    with FaceTracker(mode="video") as tracker:
        return [(frame.pts, tracker.track(frame)) for frame in open_source(str(path))]


def landmark_error(a, b) -> float:
    """Mean distance in pixels between two faces' 478 landmarks (x, y)."""
    return float(np.linalg.norm(a.landmarks[:, :2] - b.landmarks[:, :2], axis=1).mean())


def assert_gone(pids: list[int]) -> None:
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # joined and reaped: no such process any more


@pytest.fixture(scope="module")
def clip(tmp_path_factory, carphone_path) -> Path:
    return write_upscaled_clip(carphone_path, tmp_path_factory.mktemp("clip") / "carphone_640x480.mp4")


@pytest.fixture(scope="module")
def clip_reference(clip):
    return single_tracker(clip)


@pytest.fixture(scope="module")
def carphone_reference(carphone_path):
    return single_tracker(carphone_path)


def test_every_frame_once_in_order_equal_to_one_tracker_inside_the_first_chunk(clip, clip_reference):
    with ParallelTracker(clip, workers=2, chunk=40) as tracker:
        out = list(tracker)
    assert [t.index for t in out] == list(range(CARPHONE_FRAMES))
    np.testing.assert_allclose([t.pts for t in out], [pts for pts, _ in clip_reference], atol=1e-9)
    # Cut by time at 40 frames' worth: chunks 0, 1, 2 of 40 frames each.
    assert [t.chunk for t in out] == [0] * 40 + [1] * 40 + [2] * 40
    assert all(len(t.faces) == 1 for t in out)
    errors = np.array([landmark_error(t.faces[0], ref[0]) for t, (_, ref) in zip(out, clip_reference)])
    # The first chunk is tracked exactly as one tracker tracks it (same start, same frames, same timestamps).
    assert errors[:40].max() < 1e-3
    for t, (_, ref) in zip(out[:40], clip_reference[:40]):
        np.testing.assert_allclose(t.faces[0].blendshapes, ref[0].blendshapes, atol=1e-4)
        np.testing.assert_allclose(t.faces[0].crop_matrix, ref[0].crop_matrix, atol=1e-4)
    # Later chunks start from a fresh detection: a step at their first frame that tracking then wears off.
    # Measured: 1.1 and 3.8 px at frames 40 and 80 (of a ~250 px face); 15+ frames after a boundary
    # mean 0.06 px, max 0.37 px; 0.23 px mean over the clip.
    assert 0.05 < errors[40] < 8.0 and 0.05 < errors[80] < 8.0
    settled = np.r_[errors[55:80], errors[95:]]
    assert settled.mean() < 0.3 and settled.max() < 1.5
    assert errors.mean() < 0.5


def test_one_worker_is_exactly_one_tracker(carphone_path, carphone_reference):
    with ParallelTracker(carphone_path, workers=1) as tracker:
        out = list(tracker)
    assert [t.index for t in out] == list(range(CARPHONE_FRAMES)) and {t.chunk for t in out} == {0}
    for t, (pts, ref) in zip(out, carphone_reference):
        assert t.pts == pts
        np.testing.assert_allclose(t.faces[0].landmarks, ref[0].landmarks, atol=1e-3)


@pytest.mark.parametrize("estimate", [25, 1000])
def test_a_wrong_frame_count_in_the_header_changes_nothing(carphone_path, carphone_reference, monkeypatch, estimate):
    """Too low: chunks past the estimate are probed one by one; too high: the extra chunks come back empty."""
    probe = pt._probe

    def wrong_count(path):
        time_base, first_pts, fps, _, timestamps = probe(path)
        return time_base, first_pts, fps, estimate, timestamps

    monkeypatch.setattr(pt, "_probe", wrong_count)
    with ParallelTracker(carphone_path, workers=2, chunk=16) as tracker:
        out = list(tracker)
    assert [t.index for t in out] == list(range(CARPHONE_FRAMES))
    assert [t.pts for t in out] == [pts for pts, _ in carphone_reference]
    assert max(t.chunk for t in out) == 7  # 120 frames in chunks of 16
    np.testing.assert_allclose(out[5].faces[0].landmarks, carphone_reference[5][1][0].landmarks, atol=1e-3)


def test_faces_for_matches_the_sources_frames_by_timestamp(carphone_path, carphone_reference, caplog):
    """What a damaged file can do: the source drops frames the workers decoded, or has one they do not."""
    frames = list(open_source(str(carphone_path)))
    kept = frames[:10] + frames[13:40]  # frames 10-12 lost by the source's decoder
    stray = frames[40]
    stray.pts += 0.5 / 29.97  # a frame between two of the file's: no worker decoded it
    with ParallelTracker(carphone_path, workers=2, chunk=60, max_frames=60) as tracker:  # all in chunk 0: exact
        faces = [tracker.faces_for(frame) for frame in kept]
        assert tracker.faces_for(stray) == []
        after = tracker.faces_for(frames[41])
    for frame, found in zip(kept, faces):
        np.testing.assert_allclose(found[0].landmarks, carphone_reference[frame.index][1][0].landmarks, atol=1e-3)
    assert "frame 40" in caplog.text and "not decoded by the tracking workers" in caplog.text
    np.testing.assert_allclose(after[0].landmarks, carphone_reference[41][1][0].landmarks, atol=1e-3)  # back in step


def test_a_stream_without_timestamps_is_tracked_whole_by_one_worker(tmp_path, carphone_path):
    raw = tmp_path / "carphone.h264"  # an elementary stream: no container, no timestamps
    with av.open(str(carphone_path)) as inp, av.open(str(raw), "w", format="h264") as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    frames = list(open_source(str(raw)))
    with ParallelTracker(raw, workers=2, chunk=20) as tracker:
        assert tracker.chunk is None
        faces = [tracker.faces_for(frame) for frame in frames]
    assert len(frames) == CARPHONE_FRAMES
    for found, (_, ref) in zip(faces, single_tracker(raw)):  # its own pts (guessed 25 fps) drive MediaPipe's filters
        np.testing.assert_allclose(found[0].landmarks, ref[0].landmarks, atol=1e-3)


def test_max_frames_stops_there_and_the_workers_are_gone(carphone_path):
    tracker = ParallelTracker(carphone_path, workers=2, chunk=20, max_frames=50)
    pids = tracker.pids
    assert len(pids) == 2
    out = list(tracker)
    assert [t.index for t in out] == list(range(50))
    assert_gone(pids)


def test_stopping_early_ends_every_worker(carphone_path):
    tracker = ParallelTracker(carphone_path, workers=2, chunk=20)
    pids = tracker.pids
    for t in tracker:
        if t.index == 4:
            break  # the loop drops the generator: it closes the tracker
    assert_gone(pids)
    with ParallelTracker(carphone_path, workers=2, chunk=20) as tracker:
        pids = tracker.pids
        next(iter(tracker))
    assert_gone(pids)  # the with-block closed it while a reader still held the iterator


def test_memory_stays_bounded_when_the_reader_is_slow(carphone_path):
    with ParallelTracker(carphone_path, workers=2, chunk=10, prefetch=2) as tracker:
        frames = iter(tracker)
        next(frames)
        time.sleep(2.0)  # unbounded workers would track ahead all this time
        chunks, held = [tracker.in_flight], [tracker.buffered]
        count = 1
        for _ in frames:
            chunks.append(tracker.in_flight)
            held.append(tracker.buffered)
            count += 1
    assert count == CARPHONE_FRAMES
    assert max(chunks) == 2  # never more than prefetch chunks handed out ahead of the reader (12 in the clip)
    assert max(held) <= 2 * 11  # so never more than 2 chunks' frames (10-11 each, cut by time) wait here


def test_a_worker_that_dies_is_reported_and_the_rest_are_stopped(carphone_path):
    tracker = ParallelTracker(carphone_path, workers=2, chunk=10)
    pids = tracker.pids
    frames = iter(tracker)
    next(frames)
    os.kill(pids[1], signal.SIGKILL)
    with pytest.raises(RuntimeError, match="stopped unexpectedly"):
        for _ in frames:
            pass
    assert_gone(pids)


def test_ctrl_c_reaching_the_workers_is_left_to_the_parent(carphone_path):
    """A terminal's Ctrl-C goes to the whole process group: the workers must neither die nor report it as a
    tracking failure; the parent decides (it stops them through close())."""
    tracker = ParallelTracker(carphone_path, workers=2, chunk=10)
    pids = tracker.pids
    for pid in pids:
        os.kill(pid, signal.SIGINT)  # while they start up (importing MediaPipe)
    frames = iter(tracker)
    try:
        seen = [next(frames).index]
        for pid in pids:
            os.kill(pid, signal.SIGINT)  # while they track
        seen += [t.index for t in frames]
    except BaseException as err:  # noqa: BLE001 - a KeyboardInterrupt from a worker would end the test session
        pytest.fail(f"a worker's Ctrl-C ended the tracking: {err!r}")
    assert seen == list(range(CARPHONE_FRAMES))
    assert_gone(pids)


def test_ctrl_c_in_a_terminal_finishes_a_parallel_run_cleanly(tmp_path, carphone_path):
    """The app with tracker processes, Ctrl-C sent to its whole process group as a terminal does."""
    import json
    import subprocess
    import sys

    out = tmp_path / "out"
    cmd = [sys.executable, "app.py", "--input", str(carphone_path), "--output_folder", str(out), "--model_name",
           "mediapipe", "--num_workers", "2", "--progress", "false"]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list(out.glob("processed_*/*/results/mediapipe/0000*_000"))) < 20 and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    (folder,) = out.glob("processed_*/*/results/mediapipe")
    progress = json.loads((folder / "progress.json").read_text())
    if progress["complete"]:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 130 and "Traceback" not in err and "error" not in err.lower(), err
    with av.open(str(folder / "video_geometry.mp4")) as video:
        assert sum(1 for _ in video.decode(video=0)) == progress["frames_done"] >= 20


def test_bad_inputs_are_one_line_user_errors(tmp_path, carphone_path):
    with pytest.raises(MediaError, match="not found.*missing.mp4"):
        ParallelTracker(tmp_path / "missing.mp4")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    with pytest.raises(MediaError, match="notes.mp4"):
        ParallelTracker(text)
    with pytest.raises(UserError, match="at least 1"):
        ParallelTracker(carphone_path, workers=0)
    with pytest.raises(UserError, match="at least 1 frame"):
        ParallelTracker(carphone_path, chunk=0)
    with pytest.raises(AssetError, match="nowhere.task"):
        ParallelTracker(carphone_path, model_path=tmp_path / "nowhere.task")
    with pytest.raises(UserError):  # a bad tracker setting fails here, before any worker starts
        ParallelTracker(carphone_path, num_faces=0)


@pytest.mark.parametrize("requested, cores, workers", [
    (None, 2, 1), (None, 4, 2), (None, 8, 6), (None, 16, 12), (None, 64, 48),  # default: cores left for the rest
    (1, 16, 1), (16, 16, 16), (32, 16, 16), (2, 2, 2),  # asked for: kept, up to the core count
])
def test_tracker_processes_per_machine(requested, cores, workers):
    from realtime.runner import tracker_workers

    assert tracker_workers(requested, cores) == workers


def test_matroska_frame_count_comes_from_the_container(tmp_path, carphone_path):
    """MKV/WebM streams carry no frame count or duration: without the container's duration every chunk after the
    first would wait for the one before it, and the tracker processes would run one at a time."""
    mkv = tmp_path / "carphone.mkv"
    with av.open(str(carphone_path)) as src, av.open(str(mkv), "w") as dst:
        out = dst.add_stream("libx264", rate=30)
        out.width, out.height, out.pix_fmt = 176, 144, "yuv420p"
        for frame in src.decode(video=0):
            dst.mux(out.encode(frame.reformat(format="yuv420p")))
        dst.mux(out.encode(None))
    with av.open(str(mkv)) as c:
        assert not c.streams.video[0].frames and c.streams.video[0].duration is None  # what makes this case
    _, _, fps, frames, _ = pt._probe(mkv)
    assert frames is not None and abs(frames - 120) <= 2
