"""realtime.resume.concat_videos: the parts of a stopped and a resumed recording, cut to the frames that count."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from realtime.resume import concat_videos
from realtime.sinks.recorder import Recorder
from realtime.types import AudioChunk, Frame, FrameResult

FPS = Fraction(30)
RATE = 48000


def record(path: Path, first: int, last: int, tone: bool) -> Path:
    """Frames first..last-1 (grey level = index) with their 1/30 s of audio: a 440 Hz tone or silence."""
    with Recorder(path, fps=FPS, width=32, height=32, audio_rate=RATE, audio_channels=1, codec="libx264") as rec:
        for i in range(first, last):
            t = np.arange(i * RATE // 30, (i + 1) * RATE // 30) / RATE
            samples = (0.5 * np.sin(2 * np.pi * 440 * t) if tone else np.zeros_like(t)).astype(np.float32)[:, None]
            frame = Frame(index=i, pts=i / 30, image=np.full((32, 32, 3), 4 * i, np.uint8),
                          audio=[AudioChunk(i / 30, RATE, samples)])
            rec.write(FrameResult(frame=frame))
    return path


def decode(path: Path) -> tuple[list[int], np.ndarray]:
    with av.open(str(path)) as c:
        grey = [int(round(f.to_ndarray(format="gray").mean())) for f in c.decode(video=0)]
    with av.open(str(path)) as c:
        sound = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    return grey, sound


def test_each_part_is_cut_to_its_frames_and_its_sound_with_them(tmp_path):
    # The stopped run's video ran 10 frames ahead of what counted (an output failed on frame 20).
    stopped = record(tmp_path / "stopped.mp4", 0, 30, tone=True)
    resumed = record(tmp_path / "resumed.mp4", 20, 50, tone=False)
    joined = tmp_path / "joined.mp4"
    concat_videos([stopped, resumed], joined, frames=[20, None])
    grey, sound = decode(joined)
    assert len(grey) == 50
    assert grey == pytest.approx([4 * i for i in range(50)], abs=3)  # frame 20 comes from the resumed part
    cut = 20 * RATE // 30
    assert abs(len(sound) - 50 * RATE // 30) <= 1024  # no more sound than pictures (AAC frames: 1024)
    assert np.abs(sound[cut - 3000 : cut - 1000]).max() > 0.3  # the tone up to the cut …
    assert np.abs(sound[cut + 1000 : cut + 3000]).max() < 0.05  # … then the resumed part's silence


def test_a_missing_part_is_an_error_not_skipped(tmp_path):
    stopped = record(tmp_path / "stopped.mp4", 0, 10, tone=False)
    with pytest.raises(FileNotFoundError, match="resumed.mp4"):
        concat_videos([stopped, tmp_path / "resumed.mp4"], tmp_path / "joined.mp4")
    assert not (tmp_path / "joined.mp4").exists()


def test_a_joined_part_keeps_its_frames_exact_times_at_ntsc_rates(tmp_path):
    # 29.97 fps: frame 20 starts at 0.667333 s, not a whole millisecond. mp4's default 1 kHz movie clock cut a late
    # part's start to the millisecond, so every frame after each resume came out up to 1 ms early.
    fps = Fraction(30000, 1001)

    def part(path: Path, first: int, last: int) -> Path:
        with Recorder(path, fps=fps, width=32, height=32, codec="libx264") as rec:
            for i in range(first, last):
                rec.write(FrameResult(frame=Frame(index=i, pts=float(i / fps), image=np.full((32, 32, 3), 4 * i, np.uint8))))
        return path

    joined = tmp_path / "joined.mp4"
    concat_videos([part(tmp_path / "a.mp4", 0, 20), part(tmp_path / "b.mp4", 20, 40)], joined)
    with av.open(str(joined)) as c:
        stream = c.streams.video[0]
        times = sorted(float(p.pts * stream.time_base) for p in c.demux(stream) if p.pts is not None)
    np.testing.assert_allclose(times, [float(i / fps) for i in range(40)], atol=2e-5)


def test_the_joined_sound_is_the_inputs_in_one_piece(tmp_path):
    # A resumed part's AAC encoder starts cold: spliced, its first ~80 ms garbled the join. Taken from the input in
    # one piece, the sound across the join is the input's own.
    source = record(tmp_path / "input.mp4", 0, 50, tone=True)  # stands in for the input video and its sound
    stopped = record(tmp_path / "stopped.mp4", 0, 30, tone=True)
    resumed = record(tmp_path / "resumed.mp4", 20, 50, tone=True)
    joined = tmp_path / "joined.mp4"
    concat_videos([stopped, resumed], joined, frames=[20, None], audio_from=source, whole_audio=True)
    grey, sound = decode(joined)
    _, reference = decode(source)
    assert len(grey) == 50 and abs(len(sound) - len(reference)) <= 1024
    cut = 20 * RATE // 30
    np.testing.assert_allclose(sound[cut - 4800 : cut + 4800], reference[cut - 4800 : cut + 4800], atol=0.05)
