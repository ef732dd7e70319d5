"""Input sources: webcams (OpenCV), network streams and video files (PyAV, with audio), image folders.

``open_source(spec)`` picks the source from what ``spec`` looks like; every source iterates ``Frame``s
(index from 0, pts in seconds, RGB uint8) and is a context manager. A source is one pass: iterate it
once, then it closes itself (``close()`` may also be called from another thread to stop it).
Cameras and streams come wrapped in ``realtime.live.ResilientSource``: captured on their own thread,
newest frame wins, reconnected after a drop-out.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import av
import cv2
import numpy as np

from realtime.errors import MediaError
from realtime.types import AudioChunk, Frame

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt")
STREAM_TIMEOUT_S = 5.0
DEFAULT_FPS = 30.0  # the rate assumed for an input that states none
# Audio decoded ahead of its frame waits at most this long (a file whose audio starts far later than
# its video would otherwise buffer the whole track).
_MAX_AUDIO_LEAD_S = 2.0

# Network streams: the decoder hands out each frame as soon as it can, and stream probing stops after
# 1 s of input instead of 5. Not "fflags=nobuffer": it discards the packets read while probing, first
# keyframe included, so nothing decodes until the next keyframe (a short stream: nothing at all).
_LOW_DELAY_OPTIONS = {"flags": "low_delay", "analyzeduration": "1000000"}


def stream_fps(video: av.VideoStream) -> float | None:
    """The video stream's frame rate as its container states it, or None if it states none."""
    rate = video.average_rate or video.guessed_rate
    return float(rate) if rate else None


def frame_time(item: av.VideoFrame, index: int, fps: float | None) -> float:
    """A decoded frame's presentation time in seconds; a frame without a timestamp is placed by its index at `fps`
    (DEFAULT_FPS if None). The file source and the parallel tracker's workers both time frames with this, so that
    the tracker's results match the source's frames by time."""
    return float(item.time) if item.pts is not None else index / (fps or DEFAULT_FPS)


def open_video_file(path: Path) -> av.container.InputContainer:
    """Open a media file with FFmpeg, or a MediaError naming the file and the fix."""
    try:
        return av.open(str(path))
    except av.FFmpegError as exc:
        raise MediaError(
            f"Not a video or image FFmpeg can read: {path} ({exc.strerror or exc}). "
            "Check the file, or convert it to .mp4 (H.264)."
        ) from exc
    except OSError as exc:
        raise MediaError(f"Cannot read {path}: {exc.strerror or exc}. Check the path and permissions.") from exc


class Source:
    """Base class: a one-pass iterator of ``Frame``s plus what is known about the input up front.

    Attributes:
        live: frames arrive in real time (camera, stream, or a recording paced to its clock);
            the pipeline drops stale frames for live sources and never for the others.
        fps: nominal frame rate, or None if unknown.
        frame_count: exact number of frames for files and folders; None for live inputs.
        width, height: frame size in pixels (image folders: the first image's).
        audio_rate, audio_channels: the first audio stream's, or None.
        description: a short human-readable name of the input.
        decode_errors: frames/images skipped because they failed to decode, plus frames kept although
            the decoder had to conceal damage in them (``is_corrupt``).
        end_reason: why a live input stopped early (read error, timeout), for logs; None otherwise.
    """

    live: bool = False
    fps: float | None = None
    frame_count: int | None = None
    width: int = 0
    height: int = 0
    audio_rate: int | None = None
    audio_channels: int | None = None
    description: str = ""

    def __init__(self) -> None:
        self.decode_errors = 0
        self._concealed = 0  # the part of decode_errors that was kept, not skipped
        self.end_reason: str | None = None
        self._lock = threading.Lock()  # a read and close() never run at the same time
        self._closed = threading.Event()
        self._released = False
        self._paced = False  # a recording played back live: hold each frame until its pts

    def _next_frame(self) -> Frame | None:
        """The next frame, or None at the end of the input. Called with the lock held."""
        raise NotImplementedError

    def _release(self) -> None:
        """Free the underlying device/file. Called once, with the lock held."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[Frame]:
        start_wall = first_pts = None
        try:
            while True:
                with self._lock:
                    if self._closed.is_set():
                        return
                    frame = self._next_frame()
                if frame is None:
                    return
                if self._paced:
                    if start_wall is None:
                        start_wall, first_pts = time.monotonic(), frame.pts
                    delay = (frame.pts - first_pts) - (time.monotonic() - start_wall)
                    if delay > 0 and self._closed.wait(delay):
                        return  # closed while waiting for the frame's time
                frame.captured_at = frame.captured_at or time.perf_counter()  # kept if the frame says when it was captured
                yield frame
        finally:
            self.close()

    def close(self) -> None:
        """Stop and free the input (idempotent, thread-safe; waits for a read in progress)."""
        self._closed.set()  # wakes a paced wait at once
        with self._lock:
            if not self._released:
                self._released = True
                self._release()

    def _count_decode_error(self, what: str, exc: Exception) -> None:
        """Skip one undecodable frame: count it, warn on the first, keep going."""
        self.decode_errors += 1
        if self.decode_errors - self._concealed == 1:
            log.warning("%s: skipped %s that failed to decode (%s); continuing", self.description, what, exc)

    def _count_concealed(self, what: str) -> None:
        """Keep one frame the decoder patched up (its damaged parts guessed from their neighbours):
        count it and warn on the first, since its picture may be smeared."""
        self.decode_errors += 1
        self._concealed += 1
        if self._concealed == 1:
            log.warning("%s: %s is corrupt (FFmpeg concealed damaged data in it); keeping it", self.description, what)

    def _warn_decode_summary(self) -> None:
        skipped = self.decode_errors - self._concealed
        if skipped > 1:
            log.warning("%s: skipped %d undecodable frames in total", self.description, skipped)
        if self._concealed > 1:
            log.warning(
                "%s: %d corrupt frames in total were kept with concealed damage", self.description, self._concealed
            )

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description} {self.width}x{self.height} fps={self.fps} live={self.live}>"


# --------------------------------------------------------------------------------------------------
# Images


def _natural_key(name: str) -> list:
    """Sort key that orders 'img2' before 'img10'."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _to_rgb8(image: np.ndarray) -> np.ndarray:
    """Any OpenCV-decoded picture (gray/BGR, 8/16-bit or float) → (H, W, 3) uint8 RGB."""
    if image.dtype == np.uint16:
        image = ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)  # rounded 65535 → 255
    elif image.dtype.kind == "f":
        image = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)  # float TIFFs are 0..1
    elif image.dtype != np.uint8:
        raise ValueError(f"unsupported sample type {image.dtype}")
    if image.ndim == 2:
        return np.ascontiguousarray(np.repeat(image[:, :, None], 3, axis=2))
    return np.ascontiguousarray(cv2.cvtColor(image[:, :, :3], cv2.COLOR_BGR2RGB))


def read_image(path: str | Path) -> np.ndarray:
    """Decode one image file to (H, W, 3) uint8 RGB.

    EXIF orientation is applied; grayscale is replicated to 3 channels; alpha is dropped (like
    inferno's ``image[:, :, :3]``); 16-bit and float images are scaled to 8 bits.

    Raises:
        MediaError: the file cannot be read or is not a supported image.
    """
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)  # cv2.imread cannot open non-ASCII paths everywhere
    except OSError as exc:
        raise MediaError(f"Cannot read image {path}: {exc.strerror}. Check the file's permissions.") from exc
    # ANYDEPTH keeps 16-bit samples; ANYCOLOR keeps gray as gray; EXIF orientation is still applied.
    decoded = cv2.imdecode(data, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR) if data.size else None
    if decoded is None:
        raise MediaError(
            f"Cannot decode image {path}: not a readable {', '.join(IMAGE_EXTENSIONS)} file. Re-export it."
        )
    try:
        return _to_rgb8(decoded)
    except ValueError as exc:
        raise MediaError(f"Cannot use image {path}: {exc}. Convert it to 8-bit PNG or JPEG.") from exc


class ImageFolderSource(Source):
    """Every image directly inside a folder, in natural order (or a single image file).

    ``Frame.name`` is the file stem and ``pts = index / fps`` (fps = 1 unless given). An image that
    fails to decode is skipped and counted in ``decode_errors``.
    """

    def __init__(self, path: str | Path, *, fps: float | None = None, live: bool | None = None) -> None:
        super().__init__()
        path = Path(path)
        if path.is_dir():
            files = sorted(
                (p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")),
                key=lambda p: _natural_key(p.name),
            )
            files = [p for p in files if p.is_file()]
            if not files:
                raise MediaError(
                    f"No images in folder {path}: expected {', '.join(IMAGE_EXTENSIONS)} files directly inside it."
                )
        else:
            files = [path]
        if fps is not None and fps <= 0:
            raise MediaError(f"Frame rate for {path} must be positive, got {fps}.")
        self._files = files
        self._position = 0
        self._index = 0
        self._first_position, self._first_image = self._first_readable()
        self.live = bool(live)
        self._paced = self.live
        self.fps = float(fps) if fps is not None else 1.0
        self.frame_count = len(files)
        self.height, self.width = self._first_image.shape[:2]
        self.description = f"{path} ({len(files)} image{'s' if len(files) != 1 else ''})"

    def _first_readable(self) -> tuple[int, np.ndarray]:
        """(position, pixels) of the first image that decodes; raises if none does."""
        for position, file in enumerate(self._files):
            try:
                return position, read_image(file)
            except MediaError as exc:
                if len(self._files) == 1:
                    raise
                self.decode_errors += 1
                log.warning("%s", exc)
        raise MediaError(
            f"None of the {len(self._files)} images in {self._files[0].parent} can be decoded: "
            "re-export them as PNG or JPEG."
        )

    def _next_frame(self) -> Frame | None:
        while self._position < len(self._files):
            position, file = self._position, self._files[self._position]
            self._position += 1
            if position < self._first_position:
                continue  # already counted as undecodable while looking for the first image
            if position == self._first_position and self._first_image is not None:
                image, self._first_image = self._first_image, None
            else:
                try:
                    image = read_image(file)
                except MediaError as exc:
                    self._count_decode_error(f"image {file.name}", exc)
                    continue
            frame = Frame(index=self._index, pts=self._index / self.fps, image=image, name=file.stem)
            self._index += 1
            return frame
        self._warn_decode_summary()
        return None

    def _release(self) -> None:
        self._first_image = None


# --------------------------------------------------------------------------------------------------
# Cameras


class _QuietOpenCV:
    """A context in which OpenCV logs nothing.

    A camera that fails to open makes every OpenCV backend log its own failure (~15 lines, exception
    text included) ahead of our one-line error. The log level is process-wide and cameras open on
    several threads at once, so the first to enter silences it and the last to leave restores it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved_level = 0

    def __enter__(self) -> None:
        with self._lock:
            if self._users == 0:
                self._saved_level = cv2.utils.logging.getLogLevel()
                cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
            self._users += 1

    def __exit__(self, *exc_info) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                cv2.utils.logging.setLogLevel(self._saved_level)


_QUIET_OPENCV = _QuietOpenCV()


class CameraSource(Source):
    """A capture device through OpenCV: a camera index, a /dev/video* path, or anything VideoCapture opens.

    Frames are converted to RGB; pts are seconds since the device was opened (``time.monotonic``),
    taken when each frame is read.
    """

    def __init__(self, device: int | str, *, live: bool | None = None) -> None:
        super().__init__()
        self.description = f"camera {device}"
        with _QUIET_OPENCV:
            self._capture = cv2.VideoCapture(device)
        if not self._capture.isOpened():
            self._capture.release()
            raise MediaError(
                f"Camera {device} could not be opened: check that it is connected and not in use "
                "(ls /dev/video*), or pass another camera index."
            )
        # Keep at most one frame queued in the driver so reads return the newest picture.
        self._capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        self._opened_at = time.monotonic()
        self._index = 0
        self.live = True if live is None else live
        fps = self._capture.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps > 0 else None
        self.width = int(self._capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        self.height = int(self._capture.get(cv2.CAP_PROP_FRAME_HEIGHT))

    def _next_frame(self) -> Frame | None:
        ok, bgr = self._capture.read()
        pts = time.monotonic() - self._opened_at
        if not ok or bgr is None:
            self.end_reason = f"no frame from the device after {self._index} frames"
            log.debug("%s: %s", self.description, self.end_reason)
            return None
        image = _to_rgb8(bgr)
        frame = Frame(index=self._index, pts=pts, image=image)
        self._index += 1
        return frame

    def _release(self) -> None:
        self._capture.release()


# --------------------------------------------------------------------------------------------------
# Video files and network streams (PyAV)


def _audio_samples(frame: av.AudioFrame) -> np.ndarray:
    """A decoded ``av.AudioFrame`` → (n, channels) float32 in [-1, 1]."""
    data = frame.to_ndarray()
    channels = len(frame.layout.channels)
    # Planar formats come as (channels, n); packed ones as (1, n * channels), interleaved.
    data = data.T if frame.format.is_planar else data.reshape(-1, channels)
    if data.dtype == np.uint8:
        data = (data.astype(np.float32) - 128.0) / 128.0
    elif data.dtype.kind == "i":
        data = data.astype(np.float32) / float(2 ** (8 * data.dtype.itemsize - 1))
    return np.ascontiguousarray(data, dtype=np.float32)


def _redact(url: str) -> str:
    """The URL without a password, fit for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class _PyAVSource(Source):
    """Shared PyAV decoding: the first video stream to RGB24 and the first audio stream to float32.

    Each frame carries the decoded audio that starts before the next frame is due (pts + 1/fps), so
    sound rides with the picture it belongs to even though the video decoder runs frames behind the
    audio. Audio is never held back more than ``_MAX_AUDIO_LEAD_S``. A file also holds each frame
    back until the next one is decoded, so that the audio after the last frame still reaches it.
    """

    _hold_last_frame = False
    _thread_type = "AUTO"  # frame + slice threads: throughput
    _read_timeout: float | None = None  # streams: seconds FFmpeg waits for data before giving up

    def _setup(self, container: av.container.InputContainer, name: str) -> None:
        self._container = container
        self._next_audio_pts = 0.0
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["no streams"]  # gone once closed
            container.close()
            raise MediaError(f"No video stream in {name} (it has {', '.join(kinds)}). Pass a video file or an image.")
        self._video = container.streams.video[0]
        if self._video.codec_context is None:
            container.close()
            raise MediaError(
                f"Unsupported video codec in {name}: this FFmpeg build has no decoder for it. "
                "Re-encode it, e.g. ffmpeg -i INPUT -c:v libx264 OUTPUT.mp4."
            )
        self._video.thread_type = self._thread_type
        self._audio = container.streams.audio[0] if container.streams.audio else None
        if self._audio is not None and self._audio.codec_context is None:
            log.warning("%s: audio codec has no decoder; continuing without audio", name)
            self._audio = None
        self.fps = stream_fps(self._video)
        self.width, self.height = self._video.width, self._video.height
        if self._audio is not None:
            self.audio_rate = int(self._audio.rate)
            self.audio_channels = len(self._audio.layout.channels)
        self._frames = self._decode()

    def _next_frame(self) -> Frame | None:
        return next(self._frames, None)

    def _release(self) -> None:
        self._container.close()

    def _input_failed(self, exc: av.FFmpegError) -> None:
        """Reading stopped with an error: for a file, the rest of it is undecodable."""
        self._count_decode_error("the rest of the input", exc)

    def _decode(self) -> Iterator[Frame]:
        streams = [self._video] if self._audio is None else [self._video, self._audio]
        packets = self._container.demux(*streams)
        pending: deque[AudioChunk] = deque()
        held: Frame | None = None
        index = 0
        video_packets = 0  # compared with frame_count: fewer means the file stops before its index says
        while True:
            started = time.monotonic()
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.FFmpegError as exc:
                # The demuxer cannot go on (a truncated file, a dropped connection): end with what was decoded.
                self._input_failed(exc)
                break
            # When the read timeout runs out, FFmpeg first hands over the packet its parser still holds
            # and fails only on the next read, a whole timeout later: a read that took the full timeout
            # is that last packet of a dead connection.
            timed_out = self._read_timeout is not None and time.monotonic() - started >= self._read_timeout
            if packet.stream is self._video and packet.size:
                video_packets += 1
            try:
                decoded = packet.decode()
            except av.FFmpegError as exc:
                self._count_decode_error(f"a {packet.stream.type} packet", exc)
                decoded = []
            for item in decoded:
                if packet.stream is self._audio:
                    pending.append(self._audio_chunk(item))
                    continue
                if item.is_corrupt:
                    self._count_concealed(f"frame {index}")
                frame = Frame(index=index, pts=frame_time(item, index, self.fps), image=item.to_ndarray(format="rgb24"))
                index += 1
                if self._hold_last_frame:
                    frame, held = held, frame
                    if frame is None:
                        continue
                frame.audio = self._audio_due(pending, frame.pts + 1.0 / (self.fps or DEFAULT_FPS))
                yield frame
            if timed_out:
                self.end_reason = f"no data for {self._read_timeout:g} s"
                log.debug("%s: %s", self.description, self.end_reason)
                break
        if held is not None:
            held.audio = list(pending)
            yield held
        self._warn_decode_summary()
        if self.frame_count and video_packets < self.frame_count:
            log.warning(
                "%s ends early: decoded %d of %d frames (truncated?)", self.description, index, self.frame_count
            )
        if index == 0 and self.decode_errors:
            raise MediaError(f"No frame of {self.description} could be decoded. Re-encode it or check the stream.")

    @staticmethod
    def _audio_due(pending: deque[AudioChunk], until: float) -> list[AudioChunk]:
        """Pop the chunks that start before ``until``, plus any beyond the maximum lead."""
        due = []
        buffered = sum(len(c.samples) / c.sample_rate for c in pending)
        while pending and (pending[0].pts < until or buffered > _MAX_AUDIO_LEAD_S):
            chunk = pending.popleft()
            buffered -= len(chunk.samples) / chunk.sample_rate
            due.append(chunk)
        return due

    def _audio_chunk(self, item: av.AudioFrame) -> AudioChunk:
        samples = _audio_samples(item)
        # Without a timestamp, a chunk follows the previous one.
        pts = float(item.time) if item.pts is not None else self._next_audio_pts
        self._next_audio_pts = pts + len(samples) / item.sample_rate
        return AudioChunk(pts=pts, sample_rate=int(item.sample_rate), samples=samples)


class VideoFileSource(_PyAVSource):
    """A video file (any container/codec FFmpeg decodes), every frame in order, with its first audio track."""

    _hold_last_frame = True

    def __init__(self, path: str | Path, *, live: bool | None = None) -> None:
        super().__init__()
        path = Path(path)
        self.description = str(path)
        self._setup(open_video_file(path), str(path))
        self.live = bool(live)
        self._paced = self.live
        self.frame_count = self._video.frames or self._count_frames(path)

    @staticmethod
    def _count_frames(path: Path) -> int:
        """Count video packets when the container has no frame count (e.g. Matroska, MPEG-TS)."""
        with av.open(str(path)) as container:
            video = container.streams.video[0]
            return sum(1 for packet in container.demux(video) if packet.size)


class StreamSource(_PyAVSource):
    """A network stream (RTSP, RTMP, HTTP(S), UDP, ...) through FFmpeg with low-delay options.

    ``timeout`` bounds both opening and each read; pts come from the stream.
    """

    _thread_type = "SLICE"  # frame threads would hold back several frames: latency

    def __init__(self, url: str, *, live: bool | None = None, timeout: float = STREAM_TIMEOUT_S) -> None:
        super().__init__()
        shown = _redact(url)
        self.description = shown
        options = dict(_LOW_DELAY_OPTIONS)
        if urlsplit(url).scheme in ("rtsp", "rtsps"):
            options["rtsp_transport"] = "tcp"  # UDP RTP loses packets (smeared frames) on busy networks
        silent = f"Stream {shown} did not answer within {timeout:g} s: check the URL and that the server is sending."
        started = time.monotonic()
        try:
            container = av.open(url, options=options, timeout=(timeout, timeout))
        except av.ExitError as exc:
            raise MediaError(silent) from exc
        except ConnectionRefusedError as exc:
            raise MediaError(
                f"Stream {shown} refused the connection: check the host and port and that the server is running."
            ) from exc
        except (av.FFmpegError, OSError) as exc:
            if time.monotonic() - started >= timeout:
                # Some protocols (RTSP) turn the interrupt at the timeout into their own error, e.g.
                # "Invalid data found": an error that took the whole timeout is a server that never answered.
                raise MediaError(silent) from exc
            reason = getattr(exc, "strerror", None) or exc
            raise MediaError(f"Cannot open stream {shown}: {reason}. Check the URL.") from exc
        self._setup(container, shown)
        self.live = True if live is None else live
        self._read_timeout = timeout

    def _input_failed(self, exc: av.FFmpegError) -> None:
        """A network read failed: the stream ended, it is not a decode error."""
        if isinstance(exc, av.ExitError):  # FFmpeg's interrupt: the read timeout ran out
            self.end_reason = f"no data for {self._read_timeout:g} s"
        else:
            self.end_reason = f"read error: {exc.strerror or exc}"
        log.debug("%s: %s", self.description, self.end_reason)


# --------------------------------------------------------------------------------------------------


def open_source(spec: str, *, live: bool | None = None, fps: float | None = None) -> Source:
    """Open an input from a command-line style spec.

    - ``"0"``, ``"1"``, ...: a camera index (OpenCV); a ``/dev/video*`` device path: that camera;
    - ``rtsp://``, ``rtmp://``, ``http(s)://``, ``udp://``, ...: a network stream (PyAV);
    - a directory: its images in natural order; a single image file: a one-frame source;
    - any other file: a video file (PyAV), with its first audio track.

    Cameras and streams (unless ``live=False``) come as a ``realtime.live.ResilientSource``: they are
    read on their own thread (a slow consumer gets the newest frame, not a backlog), and a drop-out
    is bridged with "no signal" frames while the input is reopened with backoff, until closed.
    Only the first open must succeed.

    Args:
        live: override whether the source is treated as live. A file or folder opened with
            ``live=True`` is played back at its own frame rate, like a camera; a stream opened
            with ``live=False`` is read losslessly and ends at its end.
        fps: frame rate for image folders (default 1); ignored by the other sources.

    Raises:
        MediaError: the input is missing, empty, unreadable, has no video, or cannot be opened.
    """
    if spec.isdigit():
        return _live_input(functools.partial(CameraSource, int(spec)), live)
    if urlsplit(spec).scheme.lower() in STREAM_SCHEMES and "://" in spec:
        return _live_input(functools.partial(StreamSource, spec), live)
    path = Path(spec).expanduser()
    if path.is_dir():
        return ImageFolderSource(path, fps=fps, live=live)
    if not path.exists():
        raise MediaError(
            f"Input not found: {path}. Pass an existing video file, image or folder, "
            "a camera index (0) or a stream URL."
        )
    if path.is_char_device():
        return _live_input(functools.partial(CameraSource, str(path)), live)
    if path.stat().st_size == 0:
        raise MediaError(f"Input file is empty (0 bytes): {path}. Copy or export it again.")
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return ImageFolderSource(path, fps=fps, live=live)
    return VideoFileSource(path, live=live)


def _live_input(open_fn: Callable[..., Source], live: bool | None) -> Source:
    """A camera or stream: resilient and threaded when live, the bare source when not."""
    if live is False:
        return open_fn(live=False)
    from realtime.live import ResilientSource  # live.py builds on this module

    return ResilientSource(functools.partial(open_fn, live=True))
