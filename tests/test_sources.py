"""Input sources: real footage, generated media with audio, image folders, and every error path."""

from __future__ import annotations

import functools
import http.server
import logging
import socket
import threading
import time
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from realtime.errors import MediaError
from realtime.live import ResilientSource
from realtime.sources import CameraSource, StreamSource, open_source
from tests.faults import flipped_copy, remux_head, truncated_copy

CARPHONE_STEP = 1001 / 30000


# ---------------------------------------------------------------------------------------------- helpers


def write_video(path: Path, n_frames: int, fps: int = 30, size=(64, 48), codec="libx264", audio_hz: float | None = None,
                audio_rate: int = 48000, pix_fmt="yuv420p", audio_seconds: float | None = None,
                options: dict[str, str] | None = None) -> None:
    """Frame i is a flat grey of level 4*i (so order is visible); optional stereo sine at 0.5 amplitude,
    as long as the video unless ``audio_seconds`` says otherwise."""
    width, height = size
    with av.open(str(path), "w") as container:
        video = container.add_stream(codec, rate=fps)
        video.width, video.height, video.pix_fmt = width, height, pix_fmt
        video.options = options or {}
        audio = None
        if audio_hz is not None:
            audio = container.add_stream("aac", rate=audio_rate)
            audio.layout = "stereo"
        for i in range(n_frames):
            image = np.full((height, width, 3), 4 * i, np.uint8)
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        if audio is not None:
            total = int(round((audio_seconds or n_frames / fps) * audio_rate))
            t = np.arange(total) / audio_rate
            tone = (0.5 * np.sin(2 * np.pi * audio_hz * t)).astype(np.float32)
            for start in range(0, total, 1024):
                block = tone[start:start + 1024]
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(np.stack([block, block])), format="fltp",
                                                   layout="stereo")
                frame.sample_rate, frame.pts = audio_rate, start
                for packet in audio.encode(frame):
                    container.mux(packet)
            for packet in audio.encode():
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def av_clip(tmp_path_factory) -> Path:
    """2 s of 30 fps video with a 440 Hz stereo AAC track."""
    path = tmp_path_factory.mktemp("media") / "tone.mp4"
    write_video(path, 60, fps=30, audio_hz=440.0)
    return path


# ---------------------------------------------------------------------------------------------- video files


def test_carphone_frames_size_rate_and_timestamps(carphone_path):
    with open_source(str(carphone_path)) as source:
        assert (source.width, source.height) == (176, 144)
        assert source.fps == pytest.approx(30000 / 1001)
        assert source.frame_count == 120
        assert source.live is False
        assert source.audio_rate is None and source.audio_channels is None
        frames = list(source)
    assert len(frames) == 120
    assert [f.index for f in frames] == list(range(120))
    assert all(f.image.shape == (144, 176, 3) and f.image.dtype == np.uint8 for f in frames)
    assert all(f.audio == [] for f in frames)
    pts = np.array([f.pts for f in frames])
    assert pts[0] == pytest.approx(0.0)
    steps = np.diff(pts)
    assert np.all(steps > 0)
    np.testing.assert_allclose(steps, CARPHONE_STEP, atol=1e-6)
    assert np.all(np.diff([f.captured_at for f in frames]) >= 0)
    # Real footage, not blank frames: a talking head has texture and changes over time.
    assert frames[0].image.std() > 20
    assert np.abs(frames[0].image.astype(int) - frames[-1].image.astype(int)).mean() > 2


def test_file_audio_covers_the_track_in_order_at_440_hz(av_clip):
    with open_source(str(av_clip)) as source:
        assert (source.audio_rate, source.audio_channels) == (48000, 2)
        assert source.frame_count == 60
        frames = list(source)
    assert len(frames) == 60
    # Frames come out in decode order: frame i was encoded as grey level 4*i.
    levels = np.array([f.image.mean() for f in frames])
    np.testing.assert_allclose(levels, 4 * np.arange(60), atol=2.0)
    chunks = [c for f in frames for c in f.audio]
    assert all(c.sample_rate == 48000 and c.samples.dtype == np.float32 and c.samples.shape[1] == 2 for c in chunks)
    # Each frame carries the sound that starts before the next frame is due.
    for frame in frames[:-1]:
        assert all(c.pts < frame.pts + 1 / 30 + 1e-6 for c in frame.audio)
    assert sum(len(f.audio) > 0 for f in frames) > 40  # spread over the frames, not bunched at one
    starts = np.array([c.pts for c in chunks])
    lengths = np.array([len(c.samples) for c in chunks])
    # Whole track, in order, no gaps: each chunk starts where the previous one ended.
    np.testing.assert_allclose(starts[1:], starts[:-1] + lengths[:-1] / 48000, atol=1e-6)
    samples = np.concatenate([c.samples for c in chunks])
    video_duration = 60 / 30
    assert abs(len(samples) / 48000 - video_duration) <= 1 / 30
    spectrum = np.abs(np.fft.rfft(samples[:, 0] * np.hanning(len(samples))))
    peak_hz = np.fft.rfftfreq(len(samples), 1 / 48000)[np.argmax(spectrum)]
    assert peak_hz == pytest.approx(440.0, abs=1.0)
    assert 0.4 < np.abs(samples[48000:52000]).max() < 0.6  # the 0.5 amplitude survives, float in [-1, 1]
    np.testing.assert_allclose(samples[:, 0], samples[:, 1], atol=1e-3)


def test_audio_after_the_last_frame_still_reaches_the_consumer(tmp_path):
    path = tmp_path / "long_audio.mkv"  # Matroska interleaves by time: the sound tail is stored after the last frame
    write_video(path, 15, fps=30, audio_hz=440.0, audio_seconds=1.5)  # 0.5 s of video, 1.5 s of sound
    with open_source(str(path)) as source:
        frames = list(source)
    assert len(frames) == 15
    total = sum(len(c.samples) for f in frames for c in f.audio) / 48000
    assert total == pytest.approx(1.5, abs=0.03)
    assert max(c.pts for c in frames[-1].audio) > 1.0  # the tail rides on the last frame


def test_pts_start_where_the_stream_starts_and_frame_count_without_container_count(tmp_path):
    path = tmp_path / "clip.ts"  # MPEG-TS: starts after a muxing delay, and stores no frame count
    write_video(path, 10, fps=25, size=(32, 32), codec="mpeg2video")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.frames == 0
        start = float(stream.start_time * stream.time_base)
    assert start > 0
    with open_source(str(path)) as source:
        assert source.frame_count == 10
        frames = list(source)
    assert len(frames) == 10
    assert frames[0].pts == pytest.approx(start)
    np.testing.assert_allclose(np.diff([f.pts for f in frames]), 1 / 25, atol=1e-6)


def test_corrupt_frame_is_skipped_counted_and_warned(tmp_path, caplog):
    path = tmp_path / "png.mov"  # PNG frames: a damaged one fails to decode instead of being concealed
    write_video(path, 10, fps=10, size=(32, 24), codec="png", pix_fmt="rgb24")
    with av.open(str(path)) as container:
        packets = [(p.pos, p.size) for p in container.demux(container.streams.video[0]) if p.size]
    data = bytearray(path.read_bytes())
    offset, size = packets[5]
    data[offset:offset + size] = bytes(size)
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="realtime.sources"), open_source(str(path)) as source:
        frames = list(source)
    assert source.decode_errors == 1
    assert len(frames) == 9
    assert [f.index for f in frames] == list(range(9))
    levels = [round(f.image.mean() / 4) for f in frames]
    assert levels == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    assert any("failed to decode" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    for offset, size in packets:  # now every frame is damaged
        data[offset:offset + size] = bytes(size)
    path.write_bytes(bytes(data))
    with pytest.raises(MediaError) as exc, open_source(str(path)) as source:
        list(source)
    assert str(path) in one_line(exc) and "No frame" in str(exc.value)


def test_concealed_frame_is_kept_counted_and_warned(tmp_path, carphone_path, caplog):
    clean = remux_head(carphone_path, tmp_path / "clean.mp4", 30)
    # Bytes flipped inside one H.264 slice: FFmpeg still outputs the frame, patched from its neighbours.
    scratched = flipped_copy(clean, tmp_path / "scratched.mp4", at=0.3, count=1000)
    with caplog.at_level(logging.WARNING, logger="realtime.sources"), open_source(str(scratched)) as source:
        frames = list(source)
    assert len(frames) == 30 and source.decode_errors == 1
    warnings = [r.getMessage() for r in caplog.records if str(scratched) in r.getMessage()]
    assert len(warnings) == 1 and "corrupt" in warnings[0], warnings
    with open_source(str(clean)) as source:
        assert len(list(source)) == 30 and source.decode_errors == 0


def test_file_that_ends_before_its_index_says_warns_with_the_count(tmp_path, carphone_path, caplog):
    whole = remux_head(carphone_path, tmp_path / "whole.mp4", 30, faststart=True)  # index first: the head plays
    partial = truncated_copy(whole, tmp_path / "partial.mp4", 0.3)
    with caplog.at_level(logging.WARNING, logger="realtime.sources"), open_source(str(partial)) as source:
        assert source.frame_count == 30
        frames = list(source)
    assert 0 < len(frames) < 30
    messages = [r.getMessage() for r in caplog.records]
    assert f"{partial} ends early: decoded {len(frames)} of 30 frames (truncated?)" in messages, messages
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="realtime.sources"), open_source(str(whole)) as source:
        assert len(list(source)) == 30
    assert caplog.records == []


def test_live_playback_is_paced_and_close_from_another_thread_stops_it(av_clip):
    source = open_source(str(av_clip), live=True)
    assert source.live is True
    got = []
    start = time.monotonic()

    def consume():
        for frame in source:
            got.append(frame)

    worker = threading.Thread(target=consume)
    worker.start()
    time.sleep(0.5)
    source.close()
    worker.join(timeout=5)
    assert not worker.is_alive()
    elapsed = time.monotonic() - start
    # Paced at 30 fps: about 15 frames in 0.5 s, far from the 60 an unpaced decode gives at once.
    assert 8 <= len(got) <= 25
    assert elapsed < 2.0
    assert got[-1].pts <= elapsed + 0.1


# ---------------------------------------------------------------------------------------------- image folders


def test_image_folder_natural_order_names_and_pts(tmp_path):
    for name, level in [("img10.png", 10), ("img2.png", 2), ("img1.JPG", 1), ("Img3.webp", 3)]:
        image = np.full((20, 30, 3), level * 20, np.uint8)
        assert cv2.imwrite(str(tmp_path / name), image, [cv2.IMWRITE_JPEG_QUALITY, 100])
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    with open_source(str(tmp_path), fps=25) as source:
        assert source.frame_count == 4 and source.fps == 25 and source.live is False
        assert (source.width, source.height) == (30, 20)
        frames = list(source)
    assert [f.name for f in frames] == ["img1", "img2", "Img3", "img10"]
    assert [f.index for f in frames] == [0, 1, 2, 3]
    np.testing.assert_allclose([f.pts for f in frames], [0, 0.04, 0.08, 0.12])
    np.testing.assert_allclose([f.image.mean() for f in frames], [20, 40, 60, 200], atol=2)
    with open_source(str(tmp_path)) as default_rate:
        assert [f.pts for f in default_rate] == [0.0, 1.0, 2.0, 3.0]


def test_image_exif_orientation_is_applied(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, :10] = (255, 0, 0)  # red band on the stored image's left
    picture = pil.fromarray(image)
    exif = picture.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    picture.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    with open_source(str(tmp_path / "rotated.jpg")) as source:
        (frame,) = list(source)
    assert frame.image.shape == (40, 20, 3)
    assert frame.name == "rotated"
    top, bottom = frame.image[:8].mean(axis=(0, 1)), frame.image[-20:].mean(axis=(0, 1))
    assert top[0] > 200 and top[1] < 60  # the left band is now on top, and still red (RGB order)
    assert bottom.max() < 40


def test_gray_rgba_and_16_bit_images_become_8_bit_rgb(tmp_path):
    gray = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (8, 1))
    cv2.imwrite(str(tmp_path / "a_gray.png"), gray)
    bgra = np.zeros((8, 8, 4), np.uint8)
    bgra[..., 0], bgra[..., 2], bgra[..., 3] = 30, 200, 0  # fully transparent, colour kept (inferno drops alpha)
    cv2.imwrite(str(tmp_path / "b_rgba.png"), bgra)
    deep = np.array([[0, 257, 32768, 65535]], np.uint16).repeat(4, axis=0)
    cv2.imwrite(str(tmp_path / "c_16bit.png"), deep)
    deep_color = np.zeros((4, 4, 3), np.uint16)
    deep_color[..., 2] = 65535  # BGR: red
    cv2.imwrite(str(tmp_path / "d_16bit_color.tif"), deep_color)
    frames = {f.name: f.image for f in open_source(str(tmp_path))}
    assert all(img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 for img in frames.values())
    np.testing.assert_array_equal(frames["a_gray"][..., 0], gray)
    np.testing.assert_array_equal(frames["a_gray"][..., 0], frames["a_gray"][..., 2])
    np.testing.assert_array_equal(frames["b_rgba"][0, 0], [200, 0, 30])
    np.testing.assert_array_equal(frames["c_16bit"][0, :, 0], [0, 1, 128, 255])
    np.testing.assert_array_equal(frames["d_16bit_color"][0, 0], [255, 0, 0])


def test_undecodable_image_in_folder_is_skipped(tmp_path):
    cv2.imwrite(str(tmp_path / "1.png"), np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "2.png").write_bytes(b"not a png at all")
    cv2.imwrite(str(tmp_path / "3.png"), np.full((4, 4, 3), 255, np.uint8))
    with open_source(str(tmp_path)) as source:
        frames = list(source)
    assert [f.name for f in frames] == ["1", "3"]
    assert [f.index for f in frames] == [0, 1]
    assert source.decode_errors == 1


def test_folder_of_only_broken_images_says_how_to_fix_it(tmp_path):
    for name in ("a.png", "b.jpg"):
        (tmp_path / name).write_bytes(b"not an image")
    with pytest.raises(MediaError) as exc:
        open_source(str(tmp_path))
    message = one_line(exc)
    assert str(tmp_path) in message and "None of the 2 images" in message and "re-export them" in message


# ---------------------------------------------------------------------------------------------- streams and cameras


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_server(tmp_path):
    """Serves tmp_path over HTTP on 127.0.0.1 (no Range support, like a live HTTP stream)."""
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_stream_decodes_every_frame_with_stream_pts(http_server, tmp_path):
    write_video(tmp_path / "live.ts", 30, fps=25, size=(64, 48), codec="libx264")  # MPEG-TS, as streamed
    with StreamSource(f"{http_server}/live.ts") as source:
        assert source.live is True and source.frame_count is None
        assert (source.width, source.height) == (64, 48)
        assert source.fps == pytest.approx(25)
        frames = list(source)
    assert len(frames) == 30
    np.testing.assert_allclose([f.image.mean() for f in frames], 4 * np.arange(30), atol=2.0)
    np.testing.assert_allclose(np.diff([f.pts for f in frames]), 1 / 25, atol=1e-6)
    assert source.end_reason is None  # it ended at its end, not on an error


def test_live_stream_is_resilient_and_reconnects_after_its_end(http_server, tmp_path):
    write_video(tmp_path / "live.ts", 30, fps=25, size=(64, 48), codec="libx264")
    url = f"{http_server}/live.ts"
    with open_source(url, live=False) as lossless:
        assert isinstance(lossless, StreamSource) and lossless.live is False
        assert len(list(lossless)) == 30  # not live: read to the end, then stop
    source = open_source(url)
    assert isinstance(source, ResilientSource)
    assert source.live is True and source.frame_count is None and source.description == url
    assert (source.width, source.height, source.fps) == (64, 48, pytest.approx(25))
    levels = []
    second_pass = None
    deadline = time.monotonic() + 10
    for frame in source:  # the server's "stream" ends after 30 frames; the source goes on
        levels.append(frame.image[:8].mean())  # the top rows: clear of the "no signal" banner
        if second_pass is None and len(levels) > 1 and levels[-1] < levels[-2] - 50:
            second_pass = len(levels) - 1  # the ramp starts over
        if (second_pass is not None and len(levels) >= second_pass + 5) or time.monotonic() > deadline:
            break
    source.close()
    # Pass one's grey ramp (unpaced, so the reader may have skipped some), "no signal" while
    # reconnecting with the last picture held, then pass two's ramp from the start.
    assert second_pass is not None
    held = levels.index(max(levels))
    assert levels[held] == pytest.approx(4 * 29, abs=2)
    assert np.all(np.diff(levels[:held]) > 0)
    np.testing.assert_allclose(levels[held:second_pass], levels[held], atol=1.0)
    assert levels[second_pass] < 10 and np.all(np.diff(levels[second_pass:]) > 0)
    assert source.outages == 1 and source.reconnects == 1
    assert source.no_signal_frames >= 0.5 * 25 - 3  # the first retry waits 0.5 s


def test_stream_that_stalls_ends_after_one_read_timeout(tmp_path):
    path = tmp_path / "live.ts"
    write_video(path, 60, fps=25, size=(64, 48), codec="libx264", options={"bframes": "0"})  # as cameras send
    data = path.read_bytes()
    half = len(data) // 2 // 188 * 188  # whole MPEG-TS packets: the first half of the stream
    release = threading.Event()

    class Stalling(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "video/mp2t")
            self.end_headers()
            self.wfile.write(data[:half])
            self.wfile.flush()
            release.wait(10)  # the connection stays open; nothing more comes

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stalling)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        (tmp_path / "half.ts").write_bytes(data[:half])
        with av.open(str(tmp_path / "half.ts")) as container:  # how many pictures the first half holds
            sent = sum(1 for _ in container.decode(video=0))
        with StreamSource(f"http://127.0.0.1:{server.server_address[1]}/live.ts", timeout=0.5) as source:
            got = []
            for frame in source:
                got.append((time.monotonic(), frame))
            ended = time.monotonic()
    finally:
        release.set()
        server.shutdown()
        server.server_close()
    assert source.end_reason == "no data for 0.5 s"
    # Every picture up to where the data stopped, in order; FFmpeg may still hold the last few in its
    # demuxer when a dead connection is given up (a file's end would flush them).
    assert sent - 4 <= len(got) <= sent
    np.testing.assert_allclose([f.image.mean() for _, f in got], 4 * np.arange(len(got)), atol=2.0)
    # Over one timeout after the last data, not two (FFmpeg flushes on the first, fails on the second).
    assert ended - got[-2][0] < 0.9


def test_opencv_capture_converts_to_rgb_and_stamps_monotonic_time(carphone_path):
    # Any OpenCV capture target works as a "camera"; the carphone file stands in for a webcam here.
    reference = [f.image for f in open_source(str(carphone_path))]
    with CameraSource(str(carphone_path)) as camera:
        assert camera.live is True and camera.frame_count is None
        assert (camera.width, camera.height) == (176, 144)
        frames = list(camera)
    assert len(frames) == 120
    pts = np.array([f.pts for f in frames])
    assert pts[0] >= 0 and np.all(np.diff(pts) > 0)
    # Same picture as PyAV's RGB decode (both go through FFmpeg; only the YUV→RGB rounding may differ).
    assert np.abs(frames[60].image.astype(int) - reference[60].astype(int)).mean() < 3
    # A BGR mix-up would swap the channel means of this scene.
    np.testing.assert_allclose(frames[60].image.mean(axis=(0, 1)), reference[60].mean(axis=(0, 1)), atol=2)


# ---------------------------------------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.mp4"
    with pytest.raises(MediaError) as exc:
        open_source(str(missing))
    assert str(missing) in one_line(exc)


def test_folder_without_images(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(MediaError) as exc:
        open_source(str(tmp_path))
    assert str(tmp_path) in one_line(exc) and "No images" in str(exc.value)


def test_non_media_file(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("this is plain text, not a video\n" * 20)
    with pytest.raises(MediaError) as exc:
        open_source(str(path))
    assert str(path) in one_line(exc)


def test_zero_length_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(MediaError) as exc:
        open_source(str(path))
    assert str(path) in one_line(exc) and "empty" in str(exc.value)


def test_file_without_video_stream(tmp_path):
    path = tmp_path / "voice.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=16000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1600), np.int16), format="s16", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(MediaError) as exc:
        open_source(str(path))
    assert str(path) in one_line(exc) and "No video stream" in str(exc.value) and "it has audio" in str(exc.value)


def test_unsupported_codec(tmp_path, carphone_path):
    path = tmp_path / "unknown_codec.mp4"
    path.write_bytes(carphone_path.read_bytes().replace(b"avc1", b"zzzz"))  # a sample entry no decoder knows
    with pytest.raises(MediaError) as exc:
        open_source(str(path))
    assert str(path) in one_line(exc) and "codec" in str(exc.value)


def test_single_unreadable_image(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(b"\xff\xd8 truncated jpeg")
    with pytest.raises(MediaError) as exc:
        open_source(str(path))
    assert str(path) in one_line(exc)


def test_camera_that_does_not_exist(capfd):
    level = cv2.utils.logging.getLogLevel()
    with pytest.raises(MediaError) as exc:
        open_source("7")
    assert "Camera 7" in one_line(exc)
    assert capfd.readouterr().err == ""  # none of OpenCV's per-backend failure reports
    assert cv2.utils.logging.getLogLevel() == level  # silenced for the open only


def test_stream_refused():
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"rtsp://127.0.0.1:{port}/live"
    with pytest.raises(MediaError) as exc:
        open_source(url)
    assert url in one_line(exc) and "refused" in str(exc.value)


def test_stream_that_never_answers_times_out():
    with socket.socket() as server:  # accepts the connection, then says nothing
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        url = f"http://127.0.0.1:{server.getsockname()[1]}/stream.ts"
        start = time.monotonic()
        with pytest.raises(MediaError) as exc:
            StreamSource(url, timeout=0.5)
        assert time.monotonic() - start < 5
    assert url in one_line(exc) and "0.5 s" in str(exc.value)


def test_silent_rtsp_server_is_reported_as_not_answering():
    # FFmpeg's RTSP client reports its interrupted read as "Invalid data found", not as a timeout.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        url = f"rtsp://127.0.0.1:{server.getsockname()[1]}/live"
        with pytest.raises(MediaError) as exc:
            StreamSource(url, timeout=0.5)
    assert url in one_line(exc) and "did not answer within 0.5 s" in str(exc.value)


def test_stream_password_is_not_shown():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(MediaError) as exc:
        open_source(f"rtsp://admin:hunter2@127.0.0.1:{port}/cam")
    assert "hunter2" not in str(exc.value) and "admin:***@127.0.0.1" in str(exc.value)
