"""Live inputs: drop-outs bridged with "no signal" frames, reconnect backoff, newest-frame-wins capture."""

from __future__ import annotations

import logging
import re
import threading
import time

import numpy as np
import pytest

from realtime.errors import MediaError
from realtime.live import ResilientSource, backoff_delays, no_signal_image, nominal_fps
from realtime.pipeline import Pipeline
from realtime.sources import Source, open_source
from realtime.types import AudioChunk, Frame, FrameResult

FPS = 30.0
AUDIO_RATE = 48000
SAMPLES_PER_FRAME = AUDIO_RATE // 30


class FakeCamera(Source):
    """A paced live input of flat pictures at ``level``; pixel (0, 0) holds the capture counter (low, high byte).

    It delivers ``frames`` frames (None: forever) and then ends, raises ``error``, or first blocks
    for ``stall`` seconds after ``stall_after`` frames. With ``audio`` each frame carries the
    1/30 s of sound that goes with it, timestamped on the camera's own clock (which starts at 100 s).
    """

    def __init__(self, *, level: int = 200, frames: int | None = None, size: tuple[int, int] = (64, 48),
                 error: Exception | None = None, stall: float = 0.0, stall_after: int = 0, audio: bool = False) -> None:
        super().__init__()
        self.live, self.fps = True, FPS
        self.width, self.height = size
        self.description = "fake camera"
        if audio:
            self.audio_rate, self.audio_channels = AUDIO_RATE, 1
        self._level, self._frames, self._error = level, frames, error
        self._stall, self._stall_after, self._audio = stall, stall_after, audio
        self._count = 0
        self._start = time.monotonic()

    def _next_frame(self) -> Frame | None:
        n = self._count
        if self._frames is not None and n >= self._frames:
            if self._error is not None:
                raise self._error
            return None
        if self._stall and n == self._stall_after:
            time.sleep(self._stall)
            self._start += self._stall
        delay = self._start + n / FPS - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        image = np.full((self.height, self.width, 3), self._level, np.uint8)
        image[0, 0, :2] = (n % 256, n // 256)
        audio = []
        if self._audio:
            samples = np.full((SAMPLES_PER_FRAME, 1), 0.25, np.float32)
            audio = [AudioChunk(pts=100.0 + n / FPS, sample_rate=AUDIO_RATE, samples=samples)]
        self._count += 1
        return Frame(index=n, pts=100.0 + n / FPS, image=image, audio=audio)

    def _release(self) -> None:
        pass


class Script:
    """open_fn for ResilientSource: each call takes the next step (FakeCamera kwargs, or an exception to
    raise); after the last step every call fails. Records when each call happened."""

    def __init__(self, *steps) -> None:
        self.steps = list(steps)
        self.calls: list[float] = []

    def __call__(self) -> Source:
        self.calls.append(time.monotonic())
        step = self.steps.pop(0) if self.steps else MediaError("fake camera is unplugged")
        if isinstance(step, Exception):
            raise step
        return FakeCamera(**step)


def counter(frame: Frame) -> int:
    return int(frame.image[0, 0, 0]) + 256 * int(frame.image[0, 0, 1])


def collect(source: Source, until, timeout: float = 15.0) -> list[Frame]:
    """Iterate ``source`` until ``until(frames)`` holds (or fail after ``timeout`` s), then close it."""
    frames: list[Frame] = []
    deadline = time.monotonic() + timeout
    for frame in source:
        frames.append(frame)
        if until(frames):
            break
        assert time.monotonic() < deadline, f"gave up after {len(frames)} frames"
    source.close()
    return frames


def level(frame: Frame) -> int:
    """The picture's grey level at its centre, where the "no signal" banner goes."""
    h, w = frame.image.shape[:2]
    return int(frame.image[h // 2, w // 2, 0])


def log_lines(caplog, word: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "realtime.live" and word in r.getMessage()]


# ---------------------------------------------------------------------------------------------- pure pieces


def test_backoff_doubles_from_half_a_second_up_to_eight():
    delays = backoff_delays()
    assert [next(delays) for _ in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]
    custom = backoff_delays(0.3, 1.0)
    assert [next(custom) for _ in range(4)] == [0.3, 0.6, 1.0, 1.0]


def test_nominal_rate_falls_back_to_30_for_unknown_or_absurd_rates():
    assert nominal_fps(25.0) == 25.0
    assert nominal_fps(30000 / 1001) == pytest.approx(29.97, abs=1e-3)
    assert nominal_fps(None) == nominal_fps(0.0) == nominal_fps(90000.0) == 30.0


def test_no_signal_banner_reads_white_on_dark_over_the_last_frame():
    last = np.full((144, 176, 3), 200, np.uint8)
    image = no_signal_image(last, 144, 176)
    assert image.shape == (144, 176, 3) and image.dtype == np.uint8
    assert np.array_equal(last, np.full_like(last, 200))  # the caller's frame is not drawn on
    banner_rows = np.where((image != 200).any(axis=(1, 2)))[0]
    top, bottom = banner_rows.min(), banner_rows.max()
    assert 10 < bottom - top < 72 and abs((top + bottom) / 2 - 72) <= 2  # a band across the middle
    np.testing.assert_array_equal(image[:top], last[:top])  # the rest of the picture is untouched
    np.testing.assert_array_equal(image[bottom + 1:], last[bottom + 1:])
    band = image[top:bottom + 1]
    assert (band == 50).all(axis=2).mean() > 0.6  # mostly darkened to a quarter
    white = (band >= 200).all(axis=2)
    assert white.sum() > 150  # the lettering
    columns = np.where(white.any(axis=0))[0]
    assert 0.5 * 176 < columns.max() - columns.min() < 0.7 * 176  # spans ~60% of the width, centred
    assert abs((columns.max() + columns.min()) / 2 - 88) < 6
    grey = no_signal_image(None, 48, 64)
    assert (grey[:5] == 128).all() and (grey[16:32] > 150).all(axis=2).sum() > 10


# ---------------------------------------------------------------------------------------------- recovery


def test_first_open_failure_is_raised_at_once():
    script = Script(MediaError("Stream rtsp://cam/x refused the connection: check the host."))
    start = time.monotonic()
    with pytest.raises(MediaError, match="refused the connection"):
        ResilientSource(script)
    assert time.monotonic() - start < 0.1
    assert len(script.calls) == 1  # no retries for an input that never worked


def test_drop_out_is_bridged_with_no_signal_frames_and_reconnected_with_backoff(caplog):
    script = Script(dict(level=200, frames=15), MediaError("still down"), dict(level=60))
    caplog.set_level(logging.INFO, logger="realtime.live")
    source = ResilientSource(script)
    assert (source.live, source.fps, source.frame_count, source.width, source.height) == (True, FPS, None, 64, 48)
    frames = collect(source, lambda got: sum(level(f) == 60 for f in got) >= 15)

    # One pass of numbering and one clock across the outage.
    assert [f.index for f in frames] == list(range(len(frames)))
    pts = np.array([f.pts for f in frames])
    assert np.all(np.diff(pts) > 0)
    kinds = ["before" if level(f) == 200 else "after" if level(f) == 60 else "gap" for f in frames]
    assert kinds[:15] == ["before"] * 15 and kinds[-15:] == ["after"] * 15
    gap = [f for f, k in zip(frames, kinds) if k == "gap"]
    assert set(kinds[15:-15]) == {"gap"}  # the gap is bridged, with nothing else in it

    # Reconnects: first retry 0.5 s after the drop, the next 1 s later (it failed), then success.
    assert len(script.calls) == 3
    np.testing.assert_allclose(np.diff(script.calls), [15 / FPS + 0.5, 1.0], atol=0.15)
    outage = pts[kinds.index("after")] - pts[14]
    assert outage == pytest.approx(1.5, abs=0.25)
    # The gap runs at the nominal rate with the banner over the last good frame.
    assert len(gap) == pytest.approx(outage * FPS, abs=4)
    assert np.median(np.diff([f.pts for f in gap])) == pytest.approx(1 / FPS, rel=0.1)
    np.testing.assert_array_equal(gap[0].image, no_signal_image(frames[14].image, 48, 64))
    assert gap[0].image is not gap[1].image  # every frame owns its pixels

    lost, back = log_lines(caplog, "signal lost"), log_lines(caplog, "signal back")
    assert len(lost) == 1 and "end of stream" in lost[0] and "fake camera" in lost[0]
    assert len(back) == 1
    assert float(re.search(r"after a ([\d.]+) s outage", back[0]).group(1)) == pytest.approx(outage, abs=0.2)
    assert (source.outages, source.reconnects) == (1, 1)
    assert source.no_signal_frames == len(gap)


def test_a_stall_shows_no_signal_after_the_timeout_and_recovers_without_reconnecting(caplog):
    caplog.set_level(logging.INFO, logger="realtime.live")
    script = Script(dict(level=200, stall=1.2, stall_after=10))
    source = ResilientSource(script, signal_timeout=0.3)
    frames = collect(source, lambda got: len(got) > 10 and counter(got[-1]) >= 20)
    nosignal = [f for f in frames if level(f) != 200]
    # No frame from 10/30 s to 10/30 + 1.2 s; the banner starts 0.3 s in: ~0.9 s x 30 fps of it.
    assert len(nosignal) == pytest.approx(0.9 * FPS, abs=5)
    assert [counter(f) for f in frames if level(f) == 200] == list(range(counter(frames[-1]) + 1))
    lost, back = log_lines(caplog, "signal lost"), log_lines(caplog, "signal back")
    assert len(lost) == 1 and "no frame for 0.3 s" in lost[0]
    assert len(back) == 1 and float(re.search(r"after a ([\d.]+) s", back[0]).group(1)) == pytest.approx(1.2, abs=0.15)
    assert source.reconnects == 0 and len(script.calls) == 1


def test_read_error_is_the_reason_given_and_no_signal_before_any_frame_is_grey(caplog):
    caplog.set_level(logging.INFO, logger="realtime.live")
    script = Script(dict(frames=0, error=MediaError("connection reset by peer")), dict(level=90))
    source = ResilientSource(script)
    frames = collect(source, lambda got: level(got[-1]) == 90)
    assert "read error: connection reset by peer" in log_lines(caplog, "signal lost")[0]
    assert len(frames) == pytest.approx(0.5 * FPS, abs=4)
    np.testing.assert_array_equal(frames[0].image, no_signal_image(None, 48, 64))


def test_a_bug_in_the_capture_thread_ends_the_run_instead_of_no_signal_forever():
    # Not an input failure (those reconnect): a programming error must surface, not hide behind the banner.
    source = ResilientSource(Script(dict(frames=5, error=ZeroDivisionError("division by zero"))))
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="capture thread failed: ZeroDivisionError: division by zero"):
        collect(source, lambda got: False)
    assert time.monotonic() - started < 2.0
    source.close()


def test_only_live_input_without_sound_of_its_own_records_the_microphone(tmp_path, carphone_path):
    from realtime.runner import sound_from_microphone

    silent, with_sound = ResilientSource(Script(dict())), ResilientSource(Script(dict(audio=True)))
    try:
        assert sound_from_microphone(silent)  # a camera
        assert not sound_from_microphone(with_sound)  # a stream with an audio track keeps it
    finally:
        silent.close()
        with_sound.close()
    with open_source(str(carphone_path), live=True) as file_played_live:
        assert not sound_from_microphone(file_played_live)


def test_frames_of_another_size_after_a_reconnect_keep_the_first_size():
    script = Script(dict(level=200, frames=3), dict(level=60, size=(128, 96)))
    source = ResilientSource(script, backoff_start=0.05)
    frames = collect(source, lambda got: level(got[-1]) == 60)
    assert {f.image.shape for f in frames} == {(48, 64, 3)}


def test_close_during_an_outage_returns_promptly_and_stops_reconnecting():
    script = Script(dict(frames=2))
    source = ResilientSource(script, backoff_start=8.0)
    frames = collect(source, lambda got: len(got) >= 10)  # 2 real frames, then "no signal"
    start = time.monotonic()
    source.close()
    assert time.monotonic() - start < 0.5
    assert len(frames) == 10
    assert not source._reader.is_alive()
    calls = len(script.calls)
    time.sleep(0.3)
    assert len(script.calls) == calls == 1


# ---------------------------------------------------------------------------------------------- slow consumers


def test_a_slow_consumer_gets_the_newest_frame_and_all_the_audio():
    source = ResilientSource(Script(dict(level=200, audio=True)))
    assert (source.audio_rate, source.audio_channels) == (AUDIO_RATE, 1)
    taken = []
    start = time.monotonic()
    for frame in source:
        taken.append((frame, time.perf_counter() - frame.captured_at))
        if len(taken) == 10:
            break
        time.sleep(0.2)  # a consumer at 5 fps
    elapsed = time.monotonic() - start
    source.close()
    frames = [f for f, _ in taken]
    ages = np.array([age for _, age in taken])
    assert ages.max() < 0.07  # at most one capture interval old: never a backlog
    captured = np.array([counter(f) for f in frames])
    # Capture kept going at 30 fps meanwhile: ~6 frames apart, the ones between skipped.
    assert np.median(np.diff(captured)) == pytest.approx(0.2 * FPS, abs=1.5)
    assert captured[-1] == pytest.approx(elapsed * FPS, abs=4)
    assert source.skipped >= captured[-1] - 10 - 2
    assert [f.index for f in frames] == list(range(10))
    # Every skipped frame's sound reached the consumer, in order, on the live clock.
    chunks = [c for f in frames for c in f.audio]
    assert len(chunks) == captured[-1] + 1
    starts = np.array([c.pts for c in chunks])
    np.testing.assert_allclose(np.diff(starts), 1 / FPS, atol=1e-9)
    for frame in frames[1:]:
        assert abs(frame.audio[-1].pts - frame.pts) < 0.05  # the newest sound goes with the newest picture


def test_a_slow_sink_does_not_slow_capture_in_the_pipeline():
    source = ResilientSource(Script(dict(level=200)))

    class Passthrough:
        name = "model"

        def setup(self) -> None: ...
        def process(self, batch: list[FrameResult]) -> None: ...
        def teardown(self) -> None: ...

    def slow_sink(result: FrameResult) -> None:
        time.sleep(0.2)

    pipeline = Pipeline((FrameResult(frame=f) for f in source), [Passthrough()], live=True, on_result=slow_sink)
    timer = threading.Timer(3.0, pipeline.stop)
    timer.start()
    result = pipeline.run()
    source.close()
    seconds = result.seconds
    assert result.error is None
    # The source went on capturing at its own 30 fps, and the pipeline took nearly every capture ...
    assert result.frames_in + source.skipped == pytest.approx(seconds * FPS, rel=0.12)
    assert result.frames_in > 0.7 * seconds * FPS and source.no_signal_frames == 0
    # ... the sink saw ~5 frames a second, and the pipeline dropped the rest to stay live ...
    assert result.frames_out == pytest.approx(seconds / 0.2, abs=3)
    assert result.dropped >= result.frames_in - result.frames_out - 6
    assert result.dropped > 0.6 * result.frames_in
    # ... with a bounded delay from capture to the sink, not one that grows with the backlog.
    assert result.stats["latency"]["p95"] < 700
