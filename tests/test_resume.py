"""Interrupt and resume: a stopped run plus --resume gives the same outputs as one uninterrupted run."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest

from realtime.cli import main
from realtime.export import load_results

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--model_name", "mediapipe", "--save_codes", "--save_mesh", "--export", "npz", "--progress", "false"]


def _frames(video: Path) -> list[np.ndarray]:
    with av.open(str(video)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def _results(root: Path) -> Path:
    (hit,) = root.glob("processed_*/*/results/mediapipe")
    return hit


def _compare_results(full: Path, resumed: Path) -> None:
    """The results files (any format) hold the same rows: one per frame here (carphone has one face)."""
    a, b = load_results(full), load_results(resumed)
    assert sorted(a) == sorted(b)
    assert list(b["frame_index"]) == list(range(120))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _compare_runs(full: Path, resumed: Path) -> None:
    full_dirs = sorted(p.name for p in full.iterdir() if p.is_dir())
    assert full_dirs == sorted(p.name for p in resumed.iterdir() if p.is_dir())
    for name in full_dirs:
        for f in sorted((full / name).iterdir()):
            other = resumed / name / f.name
            if f.suffix == ".npy":
                np.testing.assert_array_equal(np.load(f), np.load(other), err_msg=str(other))
            else:
                assert f.read_bytes() == other.read_bytes(), other
    a, b = np.load(full / "codes.npz"), np.load(resumed / "codes.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    _compare_results(full / "results.npz", resumed / "results.npz")
    fa, fb = _frames(full / "video_geometry.mp4"), _frames(resumed / "video_geometry.mp4")
    assert len(fa) == len(fb) == 120
    diffs = [np.abs(x.astype(int) - y.astype(int)).mean() for x, y in zip(fa, fb)]
    # The same pictures; only the H.264 encode after the join differs (the resumed part starts with a keyframe,
    # and x264's noise at the default CRF then stays near 3 levels: up to 3.3 seen after a join at frame 30).
    assert max(diffs) < 4.0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, carphone_path):
    out = tmp_path_factory.mktemp("full")
    assert main(["--input", str(carphone_path), "--output_folder", str(out), *ARGS]) == 0
    return _results(out)


def test_stop_then_resume_equals_uninterrupted_run(tmp_path, carphone_path, uninterrupted):
    out = tmp_path / "out"
    assert main(["--input", str(carphone_path), "--output_folder", str(out), "--max_frames", "47", *ARGS]) == 0
    folder = _results(out)
    progress = json.loads((folder / "progress.json").read_text())
    assert progress["frames_done"] == 47 and progress["complete"] is False
    assert len(_frames(folder / "video_geometry.mp4")) == 47  # a playable video of what is done

    assert main(["--input", str(carphone_path), "--output_folder", str(out), "--resume", *ARGS]) == 0
    progress = json.loads((folder / "progress.json").read_text())
    assert progress == {**progress, "frames_done": 120, "complete": True}
    assert not list(folder.glob("*.previous.mp4")) and not list(folder.glob("*.resumed.mp4"))
    _compare_runs(uninterrupted, folder)

    # A third run has nothing left to do and changes nothing.
    before = (folder / "video_geometry.mp4").read_bytes()
    assert main(["--input", str(carphone_path), "--output_folder", str(out), "--resume", *ARGS]) == 0
    assert (folder / "video_geometry.mp4").read_bytes() == before


def test_sigint_finalises_outputs_and_resume_completes(tmp_path, carphone_path, uninterrupted):
    out = tmp_path / "out"
    cmd = [sys.executable, "app.py", "--input", str(carphone_path), "--output_folder", str(out), *ARGS]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = list(out.glob("processed_*/*/results/mediapipe/0000*_000"))
        if len(done) >= 20 or proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    folder = _results(out)
    progress = json.loads((folder / "progress.json").read_text())
    if progress["complete"]:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert len(_frames(folder / "video_geometry.mp4")) == progress["frames_done"] > 0

    assert main(["--input", str(carphone_path), "--output_folder", str(out), "--resume", *ARGS]) == 0
    _compare_runs(uninterrupted, folder)


def test_resume_refuses_another_inputs_folder(tmp_path, carphone_path):
    out = tmp_path / "out"
    assert main(["--input", str(carphone_path), "--output_folder", str(out), "--max_frames", "5", *ARGS]) == 0
    folder = _results(out)
    progress = json.loads((folder / "progress.json").read_text())
    progress["input"] = "/elsewhere/carphone_pristine.mp4"
    (folder / "progress.json").write_text(json.dumps(progress))
    proc = subprocess.run([sys.executable, "app.py", "--input", str(carphone_path), "--output_folder", str(out),
                           "--resume", *ARGS], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cannot resume" in proc.stderr and "Traceback" not in proc.stderr


def test_an_output_failing_in_the_background_is_not_counted_as_done(tmp_path, carphone_path, uninterrupted,
                                                                      monkeypatch, capsys):
    """Per-frame files and the video are written on threads of their own, behind delivery: frames already
    delivered but not written when one fails must be redone by --resume, not skipped."""
    from realtime.errors import MediaError
    from realtime.sinks.outputs import FrameOutputs

    write = FrameOutputs.write

    def failing_write(self, result):
        if result.frame.index == 30:
            time.sleep(0.3)  # let delivery run ahead of the writer
            raise MediaError("cannot write frame 30: No space left on device")
        write(self, result)

    out = tmp_path / "out"
    monkeypatch.setattr(FrameOutputs, "write", failing_write)
    assert main(["--input", str(carphone_path), "--output_folder", str(out), *ARGS]) != 0
    assert "No space left on device" in capsys.readouterr().err
    folder = _results(out)
    assert json.loads((folder / "progress.json").read_text())["frames_done"] == 30
    monkeypatch.setattr(FrameOutputs, "write", write)
    assert main(["--input", str(carphone_path), "--output_folder", str(out), "--resume", *ARGS]) == 0
    _compare_runs(uninterrupted, folder)


# -- what --resume keeps, and what it refuses -------------------------------------------------------

@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, carphone_path):
    """An output folder whose run of carphone stopped after 20 frames; copy it with `_copy_stopped`."""
    out = tmp_path_factory.mktemp("stopped") / "out"
    assert main(["--input", str(carphone_path), "--output_folder", str(out), "--max_frames", "20", *ARGS]) == 0
    return out


def _copy_stopped(stopped_run: Path, tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "out"
    shutil.copytree(stopped_run, out)
    return out, _results(out)


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in root.rglob("*")}


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_resumed_results_file_holds_every_frame(tmp_path, carphone_path, uninterrupted, fmt):
    out = tmp_path / "out"
    args = ["--input", str(carphone_path), "--output_folder", str(out), *ARGS, "--export", fmt]
    assert main([*args, "--max_frames", "33"]) == 0
    folder = _results(out)
    assert list(load_results(folder / f"results.{fmt}")["frame_index"]) == list(range(33))
    assert main([*args, "--resume"]) == 0
    _compare_results(uninterrupted / "results.npz", folder / f"results.{fmt}")


@pytest.mark.parametrize("missing", ["video_geometry.mp4", "codes.npz", "results.npz"])
def test_resume_refuses_when_an_earlier_output_is_missing(tmp_path, carphone_path, stopped_run, capsys, missing):
    out, folder = _copy_stopped(stopped_run, tmp_path)
    (folder / missing).unlink()
    before = _snapshot(out)
    assert main(["--input", str(carphone_path), "--output_folder", str(out), "--resume", *ARGS]) == 2
    line = _error_line(capsys)
    assert missing in line and "missing" in line and "without --resume" in line
    assert _snapshot(out) == before  # nothing renamed, written or left behind


def test_resume_refuses_a_video_shorter_than_the_progress(tmp_path, carphone_path, stopped_run, capsys):
    from tests.faults import remux_head

    out, folder = _copy_stopped(stopped_run, tmp_path)
    video = folder / "video_geometry.mp4"
    remux_head(video, tmp_path / "short.mp4", 12)
    os.replace(tmp_path / "short.mp4", video)
    before = _snapshot(out)
    assert main(["--input", str(carphone_path), "--output_folder", str(out), "--resume", *ARGS]) == 2
    line = _error_line(capsys)
    assert "holds 12 frames" in line and "20" in line
    assert _snapshot(out) == before


@pytest.mark.parametrize("flags", [["--cat_dim", "1"], ["--include_original", "false"], ["--black_background"],
                                   ["--export", "csv"], ["--save_codes", "false"],
                                   ["--num_workers", "other"],  # not the run's tracker processes: other chunk starts
                                   ["--record", "take.mp4"]])  # its frames are in the folder's video, not there
def test_resume_refuses_flags_that_change_the_outputs(tmp_path, carphone_path, stopped_run, capsys, flags):
    from realtime.runner import tracker_workers

    if flags == ["--num_workers", "other"]:
        flags = ["--num_workers", str(tracker_workers(None, os.cpu_count() or 1) + 1)]
    out, _ = _copy_stopped(stopped_run, tmp_path)
    before = _snapshot(out)
    assert main(["--input", str(carphone_path), "--output_folder", str(out), "--resume", *ARGS, *flags]) == 2
    line = _error_line(capsys)
    assert flags[0] in line and "cannot resume" in line
    assert _snapshot(out) == before


def test_resume_checks_the_video_size_of_a_run_that_recorded_no_flags(tmp_path, carphone_path, stopped_run, capsys):
    """progress.json from before the flags were recorded: the video's size still tells another panel layout."""
    out, folder = _copy_stopped(stopped_run, tmp_path)
    progress = json.loads((folder / "progress.json").read_text())
    del progress["settings"]
    (folder / "progress.json").write_text(json.dumps(progress))
    assert main(["--input", str(carphone_path), "--output_folder", str(out), "--resume", *ARGS, "--cat_dim", "1"]) == 2
    line = _error_line(capsys)
    assert "176x432" in line and "528x144" in line and "--cat_dim" in line


def test_a_run_into_a_folder_that_holds_one_is_refused_without_resume(tmp_path, carphone_path, stopped_run, capsys):
    out, folder = _copy_stopped(stopped_run, tmp_path)
    before = _snapshot(out)
    subfolder = folder.parents[2].name
    assert main(["--input", str(carphone_path), "--output_folder", str(out), "--processed_subfolder", subfolder,
                 *ARGS]) == 2
    line = _error_line(capsys)
    assert str(folder) in line and "--resume" in line and "--processed_subfolder" in line
    assert _snapshot(out) == before


def test_resume_takes_the_latest_folder_by_its_date(tmp_path, carphone_path):
    """inferno's names put the month as a word: sorted as text, Jan would come after Feb."""
    out = tmp_path / "out"
    run = ["--input", str(carphone_path), "--output_folder", str(out), *ARGS]
    assert main([*run, "--processed_subfolder", "processed_2025_Feb_03_10-00-00", "--max_frames", "5"]) == 0
    assert main([*run, "--processed_subfolder", "processed_2025_Jan_05_10-00-00", "--max_frames", "7"]) == 0
    assert main([*run, "--resume", "--max_frames", "4"]) == 0
    done = {p.parents[2].name: json.loads((p / "progress.json").read_text())["frames_done"]
            for p in out.glob("processed_*/*/results/mediapipe")}
    assert done == {"processed_2025_Feb_03_10-00-00": 9, "processed_2025_Jan_05_10-00-00": 7}


def test_a_resume_that_fails_to_start_leaves_the_folder_as_it_was(tmp_path, carphone_path, stopped_run, capsys):
    out, folder = _copy_stopped(stopped_run, tmp_path)
    before = _snapshot(out)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc = main(["--input", str(carphone_path), "--output_folder", str(out), "--resume", *ARGS,
                   "--webrtc", f"127.0.0.1:{port}"])
    assert rc == 2 and str(port) in _error_line(capsys)
    assert _snapshot(out) == before  # the video still under its name; no temp file of the recorder left
    assert main(["--input", str(carphone_path), "--output_folder", str(out), "--resume", *ARGS]) == 0
    assert len(_frames(folder / "video_geometry.mp4")) == 120


# -- outputs that fail to finish, and signals -------------------------------------------------------

def _full_disk_on_flush(monkeypatch) -> None:
    """The recorder's encoder flush hits a full disk (its unfinished file is then removed)."""
    from realtime.sinks.recorder import Recorder

    close = Recorder.close

    def failing_close(self):
        mux = self._mux

        def full_disk(stream, frame):
            if frame is None:
                raise OSError(28, "No space left on device")
            mux(stream, frame)

        self._mux = full_disk
        close(self)

    monkeypatch.setattr(Recorder, "close", failing_close)


def _full_disk_on_results(monkeypatch) -> None:
    def failing_write(path, *args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("realtime.export._write_npz", failing_write)


@pytest.mark.parametrize("fail", [_full_disk_on_flush, _full_disk_on_results])
def test_an_output_that_fails_to_finish_counts_no_new_frames(tmp_path, carphone_path, stopped_run, uninterrupted,
                                                              monkeypatch, capsys, fail):
    out, folder = _copy_stopped(stopped_run, tmp_path)
    kept = {"video_geometry.mp4": (folder / "video_geometry.mp4").read_bytes()}
    with monkeypatch.context() as patch:
        fail(patch)
        assert main(["--input", str(carphone_path), "--output_folder", str(out), "--resume", "--max_frames", "30",
                     *ARGS]) != 0
    assert "No space left on device" in capsys.readouterr().err
    assert json.loads((folder / "progress.json").read_text())["frames_done"] == 20
    assert (folder / "video_geometry.mp4").read_bytes() == kept["video_geometry.mp4"]
    # Outputs that did finish may hold the new frames too; --resume takes only the counted ones from them.
    assert set(range(20)) <= set(load_results(folder / "results.npz")["frame_index"])
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".") or ".resumed" in p.name]
    # The frames that did not count are redone.
    assert main(["--input", str(carphone_path), "--output_folder", str(out), "--resume", *ARGS]) == 0
    _compare_runs(uninterrupted, folder)


def test_a_first_run_whose_video_was_not_saved_records_no_progress(tmp_path, carphone_path, monkeypatch, capsys):
    out = tmp_path / "out"
    _full_disk_on_flush(monkeypatch)
    assert main(["--input", str(carphone_path), "--output_folder", str(out), "--max_frames", "10", *ARGS]) != 0
    assert "No space left on device" in capsys.readouterr().err
    folder = _results(out)
    assert not (folder / "video_geometry.mp4").exists()
    progress = folder / "progress.json"
    assert not progress.exists() or json.loads(progress.read_text())["frames_done"] == 0


def _signal_after(out: Path, frames: int, *signals: int) -> threading.Thread:
    """Send ``signals`` to this process (as a terminal would) once ``frames`` frames' files are written."""
    def send():
        deadline = time.monotonic() + 120
        while len(list(out.glob("processed_*/*/results/mediapipe/0000*_000"))) < frames and time.monotonic() < deadline:
            time.sleep(0.005)
        for sig in signals:
            os.kill(os.getpid(), sig)
            time.sleep(0.01)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_a_second_ctrl_c_keeps_what_the_outputs_wrote(tmp_path, carphone_path, uninterrupted, capsys):
    out = tmp_path / "out"
    _signal_after(out, 20, signal.SIGINT, signal.SIGINT)
    assert main(["--input", str(carphone_path), "--output_folder", str(out), *ARGS]) == 130
    folder = _results(out)
    progress = json.loads((folder / "progress.json").read_text())
    assert progress["complete"] is False and progress["frames_done"] >= 20
    # Aborted, but the outputs were finalised: the user is told where --resume goes on.
    assert f"interrupted (stopped after frame {progress['frames_done']}; continue with --resume)" in capsys.readouterr().err
    assert len(_frames(folder / "video_geometry.mp4")) >= progress["frames_done"]
    assert len(load_results(folder / "results.npz")["frame_index"]) >= progress["frames_done"]
    assert main(["--input", str(carphone_path), "--output_folder", str(out), "--resume", *ARGS]) == 0
    _compare_runs(uninterrupted, folder)


def test_ctrl_c_while_the_outputs_are_finished_is_only_noted(tmp_path, carphone_path, monkeypatch, caplog):
    from realtime.sinks.outputs import FrameOutputs

    close = FrameOutputs.close

    def interrupted_close(self):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # the handler runs in this (the main) thread meanwhile
        close(self)

    monkeypatch.setattr(FrameOutputs, "close", interrupted_close)
    out = tmp_path / "out"
    assert main(["--input", str(carphone_path), "--output_folder", str(out), "--max_frames", "10", *ARGS]) == 0
    folder = _results(out)
    assert "finishing the outputs; please wait" in caplog.text
    assert json.loads((folder / "progress.json").read_text())["frames_done"] == 10
    assert len(_frames(folder / "video_geometry.mp4")) == 10
    assert len(np.load(folder / "codes.npz")["frame_index"]) == 10
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no temp file left


def test_sigterm_is_reported_as_sigterm(tmp_path, carphone_path):
    from realtime.cli import build_parser, config_from_args
    from realtime.runner import run

    out = tmp_path / "out"
    cfg = config_from_args(build_parser().parse_args(["--input", str(carphone_path), "--output_folder", str(out),
                                                      *ARGS]))
    _signal_after(out, 10, signal.SIGTERM)
    summary = run(cfg)
    assert summary.signalled and summary.signal_number == signal.SIGTERM
    assert json.loads((_results(out) / "progress.json").read_text())["frames_done"] == summary.frames < 120


def test_resume_with_nothing_to_resume_says_it_starts_over(tmp_path, carphone_path, caplog):
    out = tmp_path / "out"
    assert main(["--input", str(carphone_path), "--output_folder", str(out), "--max_frames", "5", "--resume", *ARGS]) == 0
    assert "--resume: no earlier run of" in caplog.text and "starting from the beginning" in caplog.text


def test_a_third_signal_does_not_cut_the_abort_short(caplog):
    from realtime.runner import Interrupted, _Signals

    class Stoppable:
        stopped = False

        def stop(self):
            self.stopped = True

    signals, pipeline = _Signals(), Stoppable()
    signals.running(pipeline)
    signals._handler(signal.SIGINT, None)  # first: finish the frames in flight
    assert pipeline.stopped
    with pytest.raises(Interrupted):
        signals._handler(signal.SIGINT, None)  # second: abort
    signals._handler(signal.SIGINT, None)  # third, while aborting and closing: only noted
    assert "finishing the outputs; please wait" in caplog.text


def test_sigterm_exits_143_and_ctrl_c_130(tmp_path, carphone_path):
    for sig, status in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        out = tmp_path / sig.name
        _signal_after(out, 10, sig)
        assert main(["--input", str(carphone_path), "--output_folder", str(out), *ARGS]) == status


def test_lookahead_run_stopped_early_does_not_advise_resume(tmp_path, carphone_path, capsys):
    out = tmp_path / "out"
    assert main(["--input", str(carphone_path), "--output_folder", str(out), "--max_frames", "10",
                 "--smoothing", "lookahead", *ARGS]) == 0
    printed = capsys.readouterr().out
    assert "stopped after frame 10" in printed and "continue with --resume" not in printed


def test_resume_with_causal_smoothing_warns_that_the_filter_restarts(tmp_path, carphone_path, caplog):
    out = tmp_path / "out"
    run = ["--input", str(carphone_path), "--output_folder", str(out), "--smoothing", "on", *ARGS]
    assert main([*run, "--max_frames", "10"]) == 0
    assert "filter starts afresh" not in caplog.text
    assert main([*run, "--resume", "--max_frames", "5"]) == 0
    (line,) = [r.getMessage() for r in caplog.records if "filter starts afresh" in r.getMessage()]
    assert "frame 10" in line


def test_two_runs_of_a_video_in_the_same_second_get_folders_of_their_own(tmp_path, carphone_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(time, "time", lambda: 1_750_000_000.0)  # both runs start at the same second
    run = ["--input", str(carphone_path), "--output_folder", str(out), *ARGS, "--max_frames", "3"]
    assert main(run) == 0
    assert main(run) == 0
    names = sorted(p.parents[2].name for p in out.glob("processed_*/*/results/mediapipe"))
    assert len(names) == 2
    assert all(json.loads((p / "progress.json").read_text())["frames_done"] == 3
               for p in out.glob("processed_*/*/results/mediapipe"))


def test_resume_continues_a_record_path_too(tmp_path, carphone_path):
    out, take = tmp_path / "out", tmp_path / "take.mp4"
    run = ["--input", str(carphone_path), "--output_folder", str(out), *ARGS, "--record", str(take)]
    assert main([*run, "--max_frames", "25"]) == 0
    assert len(_frames(take)) == 25
    assert main([*run, "--resume"]) == 0
    assert len(_frames(take)) == 120
