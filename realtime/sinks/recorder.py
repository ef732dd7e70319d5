"""Record results to a video file with PyAV: H.264 video plus AAC audio, muxed in sync.

Timing follows the source: a frame with ``pts`` seconds goes out at that time on a fine clock (at
least 90 kHz, on which every nominal frame is a whole number of ticks), and audio samples go where
their chunk's ``pts`` says, so a file processed end to end keeps its frame count, duration and lip
sync, and variable-frame-rate input (phones, cameras that run fast) keeps every frame where it was.
The file is written under a hidden temp name next to the target and renamed on
:meth:`Recorder.close`, so an interrupted run never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from realtime.atomic import commit, discard, temp_sibling
from realtime.errors import MediaError
from realtime.sinks import Sink
from realtime.types import AudioChunk, FrameResult

log = logging.getLogger(__name__)

CONTAINER_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}

# libx264 speed presets → NVENC's p1 (fastest) … p7 (best) scale.
_NVENC_PRESETS = {
    "ultrafast": "p1",
    "superfast": "p1",
    "veryfast": "p2",
    "faster": "p3",
    "fast": "p4",
    "medium": "p5",
    "slow": "p6",
    "slower": "p7",
    "veryslow": "p7",
    "placebo": "p7",
}

# Audio clock slips smaller than this are absorbed; larger ones become silence or are cut, so the
# audio never drifts further than this from where its timestamps put it.
_AUDIO_SYNC_TOLERANCE_S = 0.02


def as_frame_rate(fps: float | Fraction) -> Fraction:
    """A frame rate as an exact fraction; NTSC-style floats (29.97, 23.976, 59.94) → n·1000/1001."""
    if isinstance(fps, Fraction):
        rate = fps
    else:
        ntsc = Fraction(round(fps * 1.001) * 1000, 1001)
        if abs(fps - round(fps)) < 1e-6:
            rate = Fraction(round(fps))
        elif abs(fps - float(ntsc)) < 1e-3:
            rate = ntsc
        else:
            rate = Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise MediaError(f"recorder frame rate must be positive, got {fps}")
    return rate


def video_time_base(fps: Fraction) -> Fraction:
    """1/n with n the smallest multiple of ``fps``'s numerator that is at least 90000 (the usual
    video clock): fine enough to place any frame within ~11 µs of its pts, while a nominal frame is
    still a whole number of ticks (30000/1001 fps → 1/90000, 3003 ticks; 24000/1001 → 1/96000)."""
    return Fraction(1, fps.numerator * -(-90000 // fps.numerator))


# Errors of the file rather than the encoder (FFmpeg's own open reports EPERM/EACCES/EROFS too).
_FILE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ENOENT,
                errno.ENOTDIR, errno.EISDIR}


def _is_file_error(e: BaseException) -> bool:
    # PyAV names a failed encoder open "avcodec_open2(...)"; that is the codec's fault whatever its errno.
    return (isinstance(e, OSError) and e.errno in _FILE_ERRNOS
            and not str(getattr(e, "filename", None) or "").startswith("avcodec_open2"))


def nvenc_usable() -> bool:
    """True when FFmpeg's ``h264_nvenc`` encoder opens, i.e. an NVIDIA GPU and driver are usable."""
    try:
        ctx = av.CodecContext.create("h264_nvenc", "w")
        ctx.width, ctx.height, ctx.pix_fmt = 256, 256, "yuv420p"
        ctx.time_base = Fraction(1, 30)
        ctx.open()
    except (av.FFmpegError, ValueError):
        return False
    return True


def pad_to_even(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) → (H + H%2, W + W%2, 3), repeating the last row/column (4:2:0 needs even sizes)."""
    h, w = image.shape[:2]
    if h % 2 == 0 and w % 2 == 0:
        return image
    return np.pad(image, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def remix_channels(samples: np.ndarray, channels: int) -> np.ndarray:
    """(n, c_in) float32 → (n, channels): mono is copied to every channel, many → mono is averaged,
    other counts keep the first channels (zero-filling any missing ones)."""
    c_in = samples.shape[1]
    if c_in == channels:
        return samples
    if channels == 1:
        return samples.mean(axis=1, keepdims=True, dtype=np.float32)
    if c_in == 1:
        return np.repeat(samples, channels, axis=1)
    out = np.zeros((samples.shape[0], channels), np.float32)
    keep = min(c_in, channels)
    out[:, :keep] = samples[:, :keep]
    return out


class _AudioTrack:
    """Turns :class:`AudioChunk` objects (any rate or channel count, with gaps or overlaps) into
    encoder-sized planar frames on one sample clock whose pts come from the chunks' pts."""

    def __init__(self, rate: int, layout: str, frame_size: int, pad_last: bool):
        self.rate = rate
        self.layout = layout
        self.channels = av.AudioLayout(layout).nb_channels
        self.frame_size = frame_size
        self.pad_last = pad_last  # the encoder cannot take a short final frame
        self.tolerance = round(_AUDIO_SYNC_TOLERANCE_S * rate)
        self.pending = np.zeros((0, self.channels), np.float32)  # samples not yet cut into frames
        self.pending_start: int | None = None  # sample position of pending[0]; None before any audio
        self.resampler: av.AudioResampler | None = None
        self.resampler_rate = 0

    def _resample(self, samples: np.ndarray, rate: int) -> np.ndarray:
        """(n, channels) at ``rate`` → (m, channels) at ``self.rate``; stateful across chunks."""
        if rate == self.rate:
            return samples
        if self.resampler is None or self.resampler_rate != rate:
            # a source that changes rate mid-stream loses the old resampler's few buffered samples
            self.resampler = av.AudioResampler(format="fltp", layout=self.layout, rate=self.rate)
            self.resampler_rate = rate
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples.T), format="fltp", layout=self.layout
        )
        frame.sample_rate = rate
        out = [f.to_ndarray().T for f in self.resampler.resample(frame)]
        return np.concatenate(out) if out else np.zeros((0, self.channels), np.float32)

    def _place(self, start: int, samples: np.ndarray) -> None:
        """Append ``samples`` that belong at sample position ``start`` to the pending buffer."""
        if self.pending_start is None:
            skip = max(0, -start)  # nothing before t = 0 (e.g. AAC priming decoded by a source)
            self.pending_start = start + skip
            samples = samples[skip:]
        else:
            gap = start - (self.pending_start + len(self.pending))
            if gap > self.tolerance:  # audio went missing: keep later audio in place with silence
                samples = np.concatenate([np.zeros((gap, self.channels), np.float32), samples])
            elif gap < -self.tolerance:  # audio repeats time already written: drop the overlap
                samples = samples[-gap:]
        self.pending = np.concatenate([self.pending, samples])

    def _frame(self, samples: np.ndarray) -> av.AudioFrame:
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples.T), format="fltp", layout=self.layout
        )
        frame.sample_rate = self.rate
        frame.time_base = Fraction(1, self.rate)
        frame.pts = self.pending_start
        return frame

    def _cut(self, final: bool) -> list[av.AudioFrame]:
        frames = []
        while len(self.pending) >= self.frame_size or (final and len(self.pending)):
            samples = self.pending[: self.frame_size]
            if len(samples) < self.frame_size and self.pad_last:
                samples = np.pad(samples, ((0, self.frame_size - len(samples)), (0, 0)))
            frames.append(self._frame(samples))
            self.pending = self.pending[self.frame_size :]
            self.pending_start += self.frame_size
        return frames

    def push(self, chunk: AudioChunk) -> list[av.AudioFrame]:
        """Add one chunk; return the frames that are now complete."""
        samples = np.asarray(chunk.samples, np.float32)
        if samples.ndim == 1:
            samples = samples[:, None]
        samples = self._resample(remix_channels(samples, self.channels), chunk.sample_rate)
        self._place(round(chunk.pts * self.rate), samples)
        return self._cut(final=False)

    def flush(self) -> list[av.AudioFrame]:
        """Drain the resampler and return every remaining sample as frames."""
        if self.resampler is not None and self.pending_start is not None:
            tail = [f.to_ndarray().T for f in self.resampler.resample(None)]
            if tail:
                self.pending = np.concatenate([self.pending, *tail])
        return self._cut(final=True) if self.pending_start is not None else []


class Recorder(Sink):
    """Write ``result.composite`` (else ``result.frame.image``) and the frames' audio to a video file.

    Args:
        path: output file; ``.mp4``/``.m4v``/``.mov``/``.mkv``. Missing folders are created and an
            existing file is replaced on :meth:`close`.
        fps: the source's nominal frame rate (``Fraction(30000, 1001)`` or ``29.97`` for NTSC): the
            stream's stated rate and the last frame's duration. Frames are placed by their own pts, so
            input that strays from it (variable frame rate) keeps its timing.
        width, height: size of the images that will be written. Odd sizes are padded to even by
            repeating the last row/column (H.264 4:2:0 needs even sizes); nothing is cropped.
        audio_rate, audio_channels: give both to record audio (AAC); chunks of another rate or
            channel count are converted. Without them, audio chunks are ignored.
        codec: an FFmpeg H.264 encoder name, or ``"auto"``: ``h264_nvenc`` when an NVIDIA GPU is
            usable, else ``libx264``.
        crf: quality (libx264 CRF; NVENC's constant-quality ``cq``). preset: libx264 speed preset
            (mapped onto NVENC's p1–p7). pix_fmt: the encoded pixel format.
        known_as, chosen_with: for error messages, the file as the user knows it (default ``path``) and
            the option that chose where it goes.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        fps: float | Fraction,
        width: int,
        height: int,
        audio_rate: int | None = None,
        audio_channels: int | None = None,
        codec: str = "libx264",
        crf: int = 18,
        preset: str = "veryfast",
        pix_fmt: str = "yuv420p",
        known_as: str | os.PathLike[str] | None = None,
        chosen_with: str = "--record path or --output_folder",
    ):
        self.path = Path(path)
        # What file-system errors name: the file the user knows (a resumed part is joined onto it later),
        # and the option that chose where it goes.
        self._known_as = Path(known_as) if known_as is not None else self.path
        self._chosen_with = chosen_with
        self.fps = as_frame_rate(fps)
        self.time_base = video_time_base(self.fps)
        self._frame_ticks = int(1 / (self.fps * self.time_base))  # one nominal frame, exactly
        self.width, self.height = int(width), int(height)
        fmt = CONTAINER_FORMATS.get(self.path.suffix.lower())
        if fmt is None:
            raise MediaError(
                f"cannot record to {self.path}: unsupported file type; use one of "
                f"{', '.join(sorted(CONTAINER_FORMATS))}"
            )
        if self.width <= 0 or self.height <= 0:
            raise MediaError(f"cannot record to {self.path}: frame size {width}x{height} is empty")
        if (audio_rate is None) != (audio_channels is None):
            raise MediaError(f"cannot record to {self.path}: give both audio_rate and audio_channels")
        if audio_rate is not None and (audio_rate <= 0 or audio_channels <= 0):
            raise MediaError(
                f"cannot record to {self.path}: audio needs a positive rate and channel count, "
                f"got {audio_rate} Hz x {audio_channels}"
            )
        self.codec_name = ("h264_nvenc" if nvenc_usable() else "libx264") if codec == "auto" else codec
        self.frames_written = 0
        self._last_pts: int | None = None
        self._closed = False
        self._warned_audio = False
        self._temp = temp_sibling(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Created here rather than by FFmpeg (which opens it only after the encoders), so a folder
            # that cannot be written is reported as such, before any encoder is blamed.
            os.close(os.open(self._temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except OSError as e:
            raise MediaError(self._cannot_write(e)) from e
        try:
            # faststart moves the mp4 index to the front on close, so players can start at once. The movie
            # timescale is the video clock's: in the default 1 kHz one a part that starts late (a --resume's)
            # has its start cut to the millisecond, and the joined video drifts by that at every resume.
            options = ({"movflags": "+faststart", "movie_timescale": str(self.time_base.denominator)}
                       if fmt in ("mp4", "mov") else {})
            self._container = av.open(str(self._temp), "w", format=fmt, options=options)
            try:
                self._video = self._add_video(crf, preset, pix_fmt)
                self._audio = self._add_audio(audio_rate, audio_channels) if audio_rate else None
                self._container.start_encoding()  # opens the encoders: frame_size is known after this
            except BaseException:
                with contextlib.suppress(av.FFmpegError, OSError):  # the first error is the one to report
                    self._container.close()
                raise
        except BaseException as e:
            self._remove_temp()  # never raises: the user hears about e, not about the cleanup
            if _is_file_error(e):
                raise MediaError(self._cannot_write(e)) from e
            if isinstance(e, (av.FFmpegError, ValueError)):
                raise MediaError(
                    f"cannot record to {self.path} with codec {self.codec_name} (crf {crf}, preset {preset}, "
                    f"pix_fmt {pix_fmt}): {e}; check these settings or use codec libx264"
                ) from e
            raise
        self._audio_track = None
        if self._audio is not None:
            ctx = self._audio.codec_context
            small_last = bool(ctx.codec.capabilities & av.codec.Capabilities.small_last_frame)
            self._audio_track = _AudioTrack(ctx.sample_rate, ctx.layout.name, ctx.frame_size, not small_last)

    def _cannot_write(self, e: OSError, action: str = "record to", note: str = "recording {name}") -> str:
        """One line for a file-system error: it names the folder and how to get round it."""
        folder = self.path.absolute().parent
        fix = f"choose another {self._chosen_with} ({note.format(name=self._known_as.name)})"
        if e.errno == errno.EROFS:
            return f"cannot write {folder}: read-only file system; {fix}"
        if e.errno in (errno.EACCES, errno.EPERM):
            return f"cannot write {folder}: the folder is not writable ({e.strerror}); {fix}"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"cannot write {folder}: {e.strerror}; free some space or {fix}"
        if e.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST) and self.path.is_dir():
            return f"cannot {action} {self.path}: a folder has that name; move it away or {fix}"
        return f"cannot {action} {self._known_as}: {e.strerror or e}"

    def _add_video(self, crf: int, preset: str, pix_fmt: str) -> av.VideoStream:
        # No B-frames: frames leave the encoder as they arrive (lower live latency), and files from an
        # interrupted run and its --resume concatenate packet by packet (realtime.resume).
        if self.codec_name == "h264_nvenc":
            options = {"preset": _NVENC_PRESETS.get(preset, preset), "rc": "vbr", "cq": str(crf), "bf": "0"}
        else:
            # force-cfr: x264 otherwise writes the fine time base into the stream header as the frame rate
            # (90000 fps to tools that read it); the frames keep their own pts all the same.
            options = {"crf": str(crf), "preset": preset, "bf": "0", "x264-params": "force-cfr=1"}
        stream = self._container.add_stream(self.codec_name, rate=self.fps, options=options)
        if self.codec_name == "libx264":
            # x264's frame threads, not PyAV's default slice threads: 19% more frames/s on 2 cores at 2562x480,
            # for a few frames of delay, which the recorder's own thread hides (realtime.sinks.background).
            stream.codec_context.thread_type = "FRAME"
        stream.width = self.width + self.width % 2
        stream.height = self.height + self.height % 2
        stream.pix_fmt = pix_fmt
        stream.codec_context.time_base = self.time_base
        if pix_fmt.startswith("yuv"):
            # Tag what swscale's RGB→YUV conversion does (BT.601, limited range) so players undo it
            # exactly; untagged HD video is often assumed BT.709 and comes out with shifted colours.
            ctx = stream.codec_context
            ctx.colorspace = ctx.color_primaries = ctx.color_trc = 6  # AVCOL_*_SMPTE170M
            ctx.color_range = 1  # AVCOL_RANGE_MPEG
        return stream

    def _add_audio(self, rate: int, channels: int) -> av.AudioStream:
        supported = av.Codec("aac", "w").audio_rates or [rate]
        out_rate = min(supported, key=lambda r: (abs(r - rate), -r))  # the nearest rate AAC can code
        layout = av.AudioLayout(f"{channels}c").name  # FFmpeg's default layout for n channels
        stream = self._container.add_stream("aac", rate=out_rate, layout=layout)
        stream.bit_rate = 64000 * min(channels, 2)
        return stream

    def _mux(self, stream: av.stream.Stream, frame: av.frame.Frame | None) -> None:
        self._container.mux(stream.encode(frame))

    def _video_pts(self, seconds: float) -> int:
        pts = round(seconds / self.time_base)
        # Only frames closer than one tick (~11 µs) collide; the muxer needs strictly rising pts.
        if self._last_pts is not None and pts <= self._last_pts:
            pts = self._last_pts + 1
        self._last_pts = pts
        return pts

    def _encode_image(self, image: np.ndarray, seconds: float) -> None:
        if image.shape != (self.height, self.width, 3) or image.dtype != np.uint8:
            raise ValueError(
                f"recorder for {self.path} was opened for {self.width}x{self.height} RGB uint8, "
                f"got an image of shape {image.shape} {image.dtype}"
            )
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pad_to_even(image)), format="rgb24")
        frame.pts = self._video_pts(seconds)
        frame.time_base = self.time_base
        # Where the next frame lands is unknown here; the nominal duration gives the last frame its length.
        frame.duration = self._frame_ticks
        self._mux(self._video, frame)

    def _encode_audio(self, chunks: list[AudioChunk]) -> None:
        if self._audio_track is None:
            if chunks and not self._warned_audio:
                log.warning("recording %s without audio: no audio_rate/audio_channels given", self.path)
                self._warned_audio = True
            return
        for chunk in chunks:
            for frame in self._audio_track.push(chunk):
                self._mux(self._audio, frame)

    def write(self, result: FrameResult) -> None:
        """Encode one frame (and the audio attached to it)."""
        if self._closed:
            raise ValueError(f"recorder for {self.path} is closed")
        image = result.composite if result.composite is not None else result.frame.image
        try:
            self._encode_audio(result.frame.audio)
            self._encode_image(image, result.frame.pts)
        except (av.FFmpegError, OSError) as e:
            raise MediaError(f"cannot write {self.path}: {e}") from e
        self.frames_written += 1

    def _remove_temp(self) -> None:
        """Delete the temp file without raising, so the error that led here is the one reported."""
        try:
            discard(self._temp)
        except OSError as e:
            if os.path.lexists(self._temp):  # e.g. EROFS for a temp that was never created: nothing to say
                log.warning("could not remove the unfinished recording %s: %s", self._temp, e.strerror or e)

    def close(self) -> None:
        """Flush the encoders, finish the file and move it to its final name (once)."""
        if self._closed:
            return
        self._closed = True
        try:
            try:
                if self._audio_track is not None:
                    for frame in self._audio_track.flush():
                        self._mux(self._audio, frame)
                    self._mux(self._audio, None)
                self._mux(self._video, None)
            finally:
                self._container.close()  # writes the trailer (the mp4 index)
        except BaseException as e:
            # Ctrl-C too: a file whose encoders were not drained would lack its last frames, so it is
            # dropped (an older file under the final name is left as it was) and the error goes on.
            self._remove_temp()
            if _is_file_error(e):  # e.g. the disk filled up while the index was written
                raise MediaError(self._cannot_write(e, "finish", "{name} was not saved")) from e
            if isinstance(e, (av.FFmpegError, OSError)):
                raise MediaError(f"cannot finish {self.path}: {e}") from e
            raise
        if self.frames_written == 0:
            self._remove_temp()
            if self._known_as != self.path:  # a resumed part: the video itself is there, unchanged
                log.info("no new frames were recorded for %s", self._known_as)
            else:
                log.warning("no frames were recorded; %s was not created", self.path)
            return
        try:
            commit(self._temp, self.path)
        except BaseException as e:
            # A temp that cannot take its final name is of no use to anyone: remove it, say why in one line.
            self._remove_temp()
            if isinstance(e, OSError):
                raise MediaError(self._cannot_write(e, "save", "{name} was not saved")) from e
            raise
