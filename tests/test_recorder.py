"""Recorder: real H.264/AAC files written with PyAV and decoded back."""

from __future__ import annotations

import errno
import os
from fractions import Fraction
from pathlib import Path

import av
import av.filter
import numpy as np
import pytest

from realtime.errors import MediaError
from realtime.sinks import Sink
from realtime.sinks import recorder as recorder_module
from realtime.sinks.recorder import Recorder, as_frame_rate
from realtime.types import AudioChunk, Frame, FrameResult

FPS = Fraction(30000, 1001)


def sine_chunks(rate: int, seconds: float, layout: str = "mono", freq: float = 440.0) -> list[AudioChunk]:
    """A sine tone made by FFmpeg's `sine` source, as the AudioChunks a file Source would decode."""
    graph = av.filter.Graph()
    src = graph.add("sine", frequency=str(freq), sample_rate=str(rate), duration=str(seconds))
    if layout == "mono":
        src.link_to(sink := graph.add("abuffersink"))
    else:
        fmt = graph.add("aformat", sample_fmts="flt", channel_layouts=layout)
        src.link_to(fmt)
        fmt.link_to(sink := graph.add("abuffersink"))
    graph.configure()
    chunks = []
    while True:
        try:
            frame = graph.pull()
        except (EOFError, av.FFmpegError):
            break
        samples = frame.to_ndarray().reshape(frame.samples, -1)  # packed → (n, channels)
        if samples.dtype == np.int16:
            samples = samples.astype(np.float32) / 32768.0
        chunks.append(AudioChunk(float(frame.pts * frame.time_base), frame.sample_rate, samples))
    return chunks


def attach(frames: list[Frame], chunks: list[AudioChunk], fps: Fraction = FPS) -> list[Frame]:
    """Give each frame the chunks that start before the next frame, as a file Source does."""
    out, i = [], 0
    for frame in frames:
        end = frame.pts + float(1 / fps)
        audio = []
        while i < len(chunks) and chunks[i].pts < end:
            audio.append(chunks[i])
            i += 1
        out.append(Frame(frame.index, frame.pts, frame.image, audio))
    return out


@pytest.fixture(scope="module")
def carphone_frames(carphone_path: Path) -> list[Frame]:
    with av.open(str(carphone_path)) as container:
        stream = container.streams.video[0]
        return [
            Frame(i, float(f.pts * f.time_base), f.to_ndarray(format="rgb24"))
            for i, f in enumerate(container.decode(stream))
        ]


def decode(path: Path) -> dict:
    """Decode a file fully: video pts/frames, audio samples, stream metadata."""
    with av.open(str(path)) as container:
        info = {"streams": [s.type for s in container.streams]}
        v = container.streams.video[0]
        info["rate"] = v.average_rate
        info["header_rate"] = v.codec_context.framerate  # what the H.264 stream header says
        info["video_duration"] = float(v.duration * v.time_base)
        info["size"] = (v.codec_context.width, v.codec_context.height)
        info["codec"] = v.codec_context.name
        video_pts, images, audio_pts, audio = [], [], [], []
        for frame in container.decode(*container.streams):
            if isinstance(frame, av.VideoFrame):
                video_pts.append(float(frame.pts * frame.time_base))
                images.append(frame.to_ndarray(format="rgb24"))
            else:
                audio_pts.append(float(frame.pts * frame.time_base))
                audio.append(frame.to_ndarray().T)  # planar (c, n) → (n, c)
                info["audio_rate"] = frame.sample_rate
        if container.streams.audio:
            a = container.streams.audio[0]
            info["audio_duration"] = float(a.duration * a.time_base)
    info.update(video_pts=video_pts, images=images, audio_pts=audio_pts)
    info["audio"] = np.concatenate(audio) if audio else None
    return info


def dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.argmax(spectrum) * rate / len(samples))


def record(path: Path, frames: list[Frame], **kwargs) -> None:
    h, w = frames[0].image.shape[:2]
    with Recorder(path, kwargs.pop("fps", FPS), w, h, **kwargs) as rec:
        for frame in frames:
            rec.write(FrameResult(frame=frame))


def test_recorder_is_a_sink():
    assert issubclass(Recorder, Sink)


def test_120_frames_keep_count_rate_and_duration(tmp_path, carphone_frames):
    out = tmp_path / "carphone.mp4"
    record(out, carphone_frames)
    got = decode(out)
    assert got["streams"] == ["video"]
    assert got["codec"] == "h264"
    assert len(got["video_pts"]) == 120
    assert got["rate"] == FPS
    assert got["header_rate"] == FPS  # not the 90 kHz clock the frames are placed on
    assert got["video_duration"] == pytest.approx(120 * 1001 / 30000, abs=1e-3)
    assert got["video_pts"] == pytest.approx([f.pts for f in carphone_frames], abs=1e-4)
    # crf 18: the pictures survive (mean abs error of a few grey levels)
    err = np.abs(got["images"][60].astype(int) - carphone_frames[60].image.astype(int)).mean()
    assert err < 4.0


def test_composite_is_recorded_in_preference_to_the_frame(tmp_path, carphone_frames):
    out = tmp_path / "composite.mp4"
    frame = carphone_frames[0]
    panel = np.zeros((2 * 144, 176, 3), np.uint8)
    panel[144:] = (200, 40, 40)
    with Recorder(out, FPS, 176, 288) as rec:
        rec.write(FrameResult(frame=frame, composite=panel))
    got = decode(out)
    assert got["size"] == (176, 288)
    assert np.abs(got["images"][0][160:280, 10:160].astype(int) - (200, 40, 40)).max() < 12
    assert got["images"][0][:130].max() < 30


def test_audio_440hz_is_muxed_in_sync(tmp_path, carphone_frames):
    chunks = sine_chunks(48000, 120 * 1001 / 30000)
    out = tmp_path / "with_audio.mp4"
    record(out, attach(carphone_frames, chunks), audio_rate=48000, audio_channels=1)
    got = decode(out)
    frame_s = 1001 / 30000
    assert sorted(got["streams"]) == ["audio", "video"]
    assert len(got["video_pts"]) == 120
    assert got["audio_rate"] == 48000
    assert dominant_hz(got["audio"][:, 0], 48000) == pytest.approx(440, abs=2)
    assert abs(got["audio_duration"] - got["video_duration"]) <= frame_s
    assert abs(len(got["audio"]) / 48000 - len(got["video_pts"]) * frame_s) <= frame_s
    assert abs(got["audio_pts"][0] - got["video_pts"][0]) <= frame_s


def test_audio_of_another_rate_and_layout_is_converted(tmp_path, carphone_frames):
    chunks = sine_chunks(44100, 2.0, layout="stereo")
    frames = attach(carphone_frames[:60], chunks)
    out = tmp_path / "resampled.mp4"
    record(out, frames, audio_rate=48000, audio_channels=1)
    got = decode(out)
    assert got["audio_rate"] == 48000 and got["audio"].shape[1] == 1
    assert dominant_hz(got["audio"][:, 0], 48000) == pytest.approx(440, abs=2)
    assert len(got["audio"]) / 48000 == pytest.approx(2.0, abs=1001 / 30000)


def test_missing_audio_does_not_shift_later_audio(tmp_path, carphone_frames):
    """Chunks for 1.0–2.0 s never arrive: that stretch is silent and the tone after it starts on time."""
    chunks = [c for c in sine_chunks(48000, 3.0) if not 1.0 <= c.pts < 2.0]
    resume = next(c.pts for c in chunks if c.pts >= 2.0)
    out = tmp_path / "gap.mp4"
    record(out, attach(carphone_frames[:90], chunks), audio_rate=48000, audio_channels=1)
    audio = decode(out)["audio"][:, 0]

    def rms(t0: float, t1: float) -> float:
        return float(np.sqrt(np.mean(audio[int(t0 * 48000) : int(t1 * 48000)] ** 2)))

    # FFmpeg's sine source has amplitude 1/8, so the tone's RMS is about 0.088
    assert rms(0.1, 0.95) > 0.06
    assert rms(1.05, 1.95) < 0.005
    assert rms(2.1, 2.9) > 0.06
    onset = (int(1.5 * 48000) + np.flatnonzero(np.abs(audio[int(1.5 * 48000) :]) > 0.05)[0]) / 48000
    assert onset == pytest.approx(resume, abs=0.002)


def test_odd_frame_size_is_padded_not_cropped(tmp_path, carphone_frames):
    frames = [Frame(f.index, f.pts, np.ascontiguousarray(f.image[:143, :175])) for f in carphone_frames[:10]]
    out = tmp_path / "odd.mp4"
    record(out, frames)
    got = decode(out)
    assert got["size"] == (176, 144)
    assert len(got["images"]) == 10
    img = got["images"][5].astype(int)
    assert np.abs(img[:143, :175] - frames[5].image).mean() < 4.0
    # the padding repeats the edge: no black border
    assert np.abs(img[:143, 175] - img[:143, 174]).mean() < 8.0
    assert np.abs(img[143, :175] - img[142, :175]).mean() < 8.0


def test_file_appears_only_on_close_and_no_temp_is_left(tmp_path, carphone_frames):
    out = tmp_path / "sub" / "atomic.mp4"
    rec = Recorder(out, FPS, 176, 144)
    for frame in carphone_frames[:5]:
        rec.write(FrameResult(frame=frame))
    assert not out.exists()
    temps = list(out.parent.iterdir())
    assert len(temps) == 1 and temps[0].name.startswith(".atomic.mp4.")
    rec.close()
    rec.close()  # idempotent
    assert list(out.parent.iterdir()) == [out]
    assert len(decode(out)["video_pts"]) == 5


def test_crash_midway_still_gives_a_playable_file(tmp_path, carphone_frames):
    out = tmp_path / "crash.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        with Recorder(out, FPS, 176, 144, audio_rate=48000, audio_channels=1) as rec:
            for frame in attach(carphone_frames, sine_chunks(48000, 4.0)):
                if frame.index == 50:
                    raise RuntimeError("boom")
                rec.write(FrameResult(frame=frame))
    got = decode(out)
    assert len(got["video_pts"]) == 50
    assert got["video_duration"] == pytest.approx(50 * 1001 / 30000, abs=1e-3)
    assert abs(len(got["audio"]) / 48000 - 50 * 1001 / 30000) <= 1001 / 30000
    assert list(tmp_path.iterdir()) == [out]


def test_no_frames_leaves_no_file(tmp_path):
    out = tmp_path / "empty.mp4"
    Recorder(out, 30, 64, 64).close()
    assert list(tmp_path.iterdir()) == []


def test_live_pts_that_run_fast_or_repeat_still_give_every_frame_in_place(tmp_path, carphone_frames):
    times = [i * 0.030 for i in range(30)]  # a 33 fps camera that says 30 fps
    times[11] = times[10]  # and a clock that stamped two frames alike
    live = [Frame(i, t, f.image) for i, (t, f) in enumerate(zip(times, carphone_frames))]
    out = tmp_path / "live.mp4"
    record(out, live, fps=30)
    pts = decode(out)["video_pts"]
    assert len(pts) == 30
    assert all(b > a for a, b in zip(pts, pts[1:]))
    assert pts == pytest.approx(times, abs=1e-3)  # the repeat moves on by one tick only, nothing drifts


def test_auto_codec_falls_back_to_libx264(tmp_path, monkeypatch, carphone_frames):
    monkeypatch.setattr(recorder_module, "nvenc_usable", lambda: False)
    out = tmp_path / "auto.mp4"
    with Recorder(out, FPS, 176, 144, codec="auto") as rec:
        assert rec.codec_name == "libx264"
        rec.write(FrameResult(frame=carphone_frames[0]))
    assert decode(out)["codec"] == "h264"


@pytest.mark.skipif(Path("/dev/nvidiactl").exists(), reason="an NVIDIA device is present")
def test_nvenc_is_not_usable_without_an_nvidia_gpu():
    assert recorder_module.nvenc_usable() is False


def test_frame_rates_are_exact_fractions():
    assert as_frame_rate(29.97) == Fraction(30000, 1001)
    assert as_frame_rate(23.976) == Fraction(24000, 1001)
    assert as_frame_rate(25.0) == 25
    assert as_frame_rate(Fraction(30000, 1001)) == Fraction(30000, 1001)
    assert as_frame_rate(12.5) == Fraction(25, 2)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("out.avi", {}, "unsupported file type"),
        ("out.mp4", {"codec": "no_such_codec"}, "no_such_codec"),
        ("out.mp4", {"audio_rate": 48000}, "audio_rate and audio_channels"),
        ("out.mp4", {"audio_rate": 48000, "audio_channels": 0}, "positive rate and channel count"),
        ("out.mp4", {"preset": "warp9"}, "preset warp9"),
    ],
)
def test_bad_settings_are_user_errors_and_leave_nothing(tmp_path, name, kwargs, message):
    with pytest.raises(MediaError, match=message) as info:
        Recorder(tmp_path / name, FPS, 176, 144, **kwargs)
    assert name in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_image_of_the_wrong_size_is_refused(tmp_path, carphone_frames):
    with Recorder(tmp_path / "x.mp4", FPS, 64, 64) as rec:
        with pytest.raises(ValueError, match="64x64"):
            rec.write(FrameResult(frame=carphone_frames[0]))


def test_variable_frame_rate_keeps_every_frame_in_place_and_in_sync(tmp_path):
    """5 s at 60 fps then 10 s at 15 fps, recorded at the nominal 30 fps (a phone video): every frame
    comes out at its own pts, and a flash in the picture still lines up with a click in the sound."""
    pts = [i / 60 for i in range(300)] + [5 + i / 15 for i in range(150)]
    flashes = (299, 375)  # at 4.983 s and 10.0 s: the old 1/fps clock put them at ~9.9 s and ~12.4 s
    rate = 48000
    sound = np.zeros(15 * rate, np.float32)
    for i in flashes:
        start = round(pts[i] * rate)
        sound[start : start + rate // 20] = 0.5 * np.sin(np.arange(rate // 20) * 2 * np.pi * 1000 / rate)
    chunks = [AudioChunk(s / rate, rate, sound[s : s + 1024, None]) for s in range(0, len(sound), 1024)]
    frames, c = [], 0
    for i, t in enumerate(pts):
        end = pts[i + 1] if i + 1 < len(pts) else float("inf")
        audio = []
        while c < len(chunks) and chunks[c].pts < end:
            audio.append(chunks[c])
            c += 1
        frames.append(Frame(i, t, np.full((48, 64, 3), 255 if i in flashes else 16, np.uint8), audio))
    out = tmp_path / "vfr.mp4"
    record(out, frames, fps=30, audio_rate=rate, audio_channels=1)
    got = decode(out)
    assert len(got["video_pts"]) == 450
    assert got["video_pts"] == pytest.approx(pts, abs=1e-3)
    assert got["video_duration"] == pytest.approx(15.0, abs=0.05)
    assert float(got["rate"]) == pytest.approx(30, abs=0.5)  # 450 frames in 15 s
    assert got["header_rate"] == 30  # the nominal rate
    bright = [t for t, img in zip(got["video_pts"], got["images"]) if img.mean() > 128]
    audio = np.abs(got["audio"][:, 0])
    onsets, s = [], 0
    while (hits := np.flatnonzero(audio[s:] > 0.1)).size:
        onsets.append((s + hits[0]) / rate)
        s += hits[0] + rate // 4
    assert len(bright) == len(onsets) == 2
    assert bright == pytest.approx(onsets, abs=0.003)
    assert bright == pytest.approx([pts[i] for i in flashes], abs=1e-3)


def test_ctrl_c_while_closing_leaves_no_temp_and_keeps_the_old_file(tmp_path, monkeypatch, carphone_frames):
    out = tmp_path / "take.mp4"
    out.write_bytes(b"last week's recording")
    rec = Recorder(out, FPS, 176, 144)
    for frame in carphone_frames[:5]:
        rec.write(FrameResult(frame=frame))
    mux = Recorder._mux

    def interrupted_flush(self, stream, frame):
        if frame is None:  # draining the encoder: where a second Ctrl-C lands while the file is finished
            raise KeyboardInterrupt
        mux(self, stream, frame)

    monkeypatch.setattr(Recorder, "_mux", interrupted_flush)
    with pytest.raises(KeyboardInterrupt):
        rec.close()
    assert list(tmp_path.iterdir()) == [out]
    assert out.read_bytes() == b"last week's recording"


def _refuse_writes_in(monkeypatch, folder: Path, err: int, unlink_too: bool = False) -> None:
    """Make creating files in ``folder`` fail with ``err`` (as root, chmod would not bite)."""
    real_open, real_unlink = os.open, os.unlink

    def refusing_open(path, flags, *args, **kwargs):
        if Path(path).parent == folder and flags & os.O_CREAT:
            raise OSError(err, os.strerror(err), str(path))
        return real_open(path, flags, *args, **kwargs)

    def refusing_unlink(path, *args, **kwargs):
        if Path(path).parent == folder:
            raise OSError(err, os.strerror(err), str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    if unlink_too:
        monkeypatch.setattr(os, "unlink", refusing_unlink)


def test_read_only_folder_is_one_line_naming_the_folder(tmp_path, monkeypatch):
    # On a read-only file system even removing a file that is not there fails (EROFS, not ENOENT).
    _refuse_writes_in(monkeypatch, tmp_path, errno.EROFS, unlink_too=True)
    with pytest.raises(MediaError) as info:
        Recorder(tmp_path / "take.mp4", FPS, 176, 144)
    message = str(info.value)
    assert message.startswith(f"cannot write {tmp_path}: read-only file system; choose another --record path")
    assert "\n" not in message and "codec" not in message
    assert list(tmp_path.iterdir()) == []


def test_a_resumed_part_is_named_as_the_video_the_user_knows(tmp_path, monkeypatch):
    # --resume records into video_geometry.resumed.mp4 and joins it on; the user asked for video_geometry.mp4.
    _refuse_writes_in(monkeypatch, tmp_path, errno.EACCES)
    with pytest.raises(MediaError) as info:
        Recorder(tmp_path / "video_geometry.resumed.mp4", FPS, 176, 144, known_as=tmp_path / "video_geometry.mp4",
                 chosen_with="--output_folder")
    assert str(info.value).endswith("; choose another --output_folder (recording video_geometry.mp4)")


def test_a_cleanup_that_fails_does_not_hide_the_real_error(tmp_path, monkeypatch):
    real_unlink = os.unlink

    def failing_unlink(path, *args, **kwargs):
        if Path(path).parent == tmp_path:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", failing_unlink)
    with pytest.raises(MediaError, match="preset warp9"):
        Recorder(tmp_path / "take.mp4", FPS, 176, 144, preset="warp9")


@pytest.mark.parametrize("err", [errno.EACCES, errno.EPERM])
def test_unwritable_folder_is_blamed_not_the_codec(tmp_path, monkeypatch, err):
    folder = tmp_path / "locked"
    folder.mkdir()
    _refuse_writes_in(monkeypatch, folder, err)
    with pytest.raises(MediaError) as info:
        Recorder(folder / "take.mp4", FPS, 176, 144)
    message = str(info.value)
    assert message.startswith(f"cannot write {folder}: the folder is not writable ({os.strerror(err)})")
    assert "choose another --record path" in message and "take.mp4" in message
    assert "codec" not in message and "libx264" not in message
    assert list(folder.iterdir()) == []


def test_a_folder_in_the_way_of_the_final_name_is_one_line_and_leaves_no_temp(tmp_path, carphone_frames):
    out = tmp_path / "take.mp4"
    rec = Recorder(out, FPS, 176, 144)
    for frame in carphone_frames[:5]:
        rec.write(FrameResult(frame=frame))
    out.mkdir()  # made while the run was going: the rename onto it fails
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(MediaError) as info:
        rec.close()
    message = str(info.value)
    assert message.startswith(f"cannot save {out}: a folder has that name")
    assert "\n" not in message and "(take.mp4 was not saved)" in message
    assert list(tmp_path.iterdir()) == [out]
    assert (out / "notes.txt").read_text() == "keep me"


def test_a_rename_that_is_refused_is_one_line_and_leaves_no_temp(tmp_path, monkeypatch, carphone_frames):
    out = tmp_path / "take.mp4"
    rec = Recorder(out, FPS, 176, 144)
    rec.write(FrameResult(frame=carphone_frames[0]))

    def refused(src, dst):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(src), None, str(dst))

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(MediaError, match=f"cannot write {tmp_path}: the folder is not writable") as info:
        rec.close()
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_finishing_is_one_line_and_leaves_no_temp(tmp_path, monkeypatch, carphone_frames):
    out = tmp_path / "take.mp4"
    rec = Recorder(out, FPS, 176, 144)
    rec.write(FrameResult(frame=carphone_frames[0]))

    def disk_full(self, stream, frame):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Recorder, "_mux", disk_full)
    with pytest.raises(MediaError) as info:
        rec.close()
    assert str(info.value).startswith(f"cannot write {tmp_path}: No space left on device; free some space")
    assert "(take.mp4 was not saved)" in str(info.value)
    assert list(tmp_path.iterdir()) == []
