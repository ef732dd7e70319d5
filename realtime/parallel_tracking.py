"""Face tracking of a video file at full throughput: several MediaPipe processes over contiguous chunks.

MediaPipe's FaceLandmarker works through one frame at a time on about one core (11-18 ms per frame on
these CPUs), so for a file on a GPU box the tracker, not the model, bounds the frame rate.
``ParallelTracker`` splits the video into chunks of about ``chunk`` frames and tracks each chunk in one of
``workers`` spawned processes, each of which decodes its chunk itself (seek to the keyframe before it,
decode forward) so that no pictures cross process boundaries; only the small ``Face`` records come back.
The results are handed out per frame, in frame order, so the pipeline stays lossless and ordered.

Chunks are cut by presentation time (``chunk / fps`` seconds each, in the stream's own time base), not
by frame number: a worker knows which frames are its own from their timestamps alone, without a pass
over the whole file first. Frame indices are then assigned here by counting, chunk after chunk,
exactly as ``realtime.sources.VideoFileSource`` counts decoded frames.

How the results differ from one ``FaceTracker`` over the whole file: each chunk starts a fresh
FaceLandmarker in VIDEO mode, so its first frame is a new detection (not tracked from the previous
frame's landmarks) and the landmark tracking inside the chunk continues from that detection. The first
chunk is therefore identical to a single tracker; a later chunk's first frame differs by about a pixel or
a few, which tracking wears off within some 15 frames. Measured on carphone upscaled to 640×480 (a face
about 250 px wide) in chunks of 40 frames, mean landmark distance to one tracker: 0 in the first chunk,
1.1 and 3.8 px at the two re-detected frames, 0.06 px (max 0.37) from 15 frames after a boundary on, 0.23 px
over the whole clip (tests/test_parallel_tracking.py). Faces are numbered per frame in detection order, as
the single tracker numbers them; stable track ids are the job of the pipeline's ``TrackAssigner``, which
runs on the ordered output.

Memory is bounded: at most ``prefetch`` chunks are handed out and not yet consumed, so the buffered
results never exceed ``prefetch × chunk`` frames of faces (a few KB each), however long the video.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import pickle
import queue
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import av

from .errors import MediaError, UserError
from .sources import DEFAULT_FPS, frame_time, open_video_file, stream_fps
from .tracking import DEFAULT_MODEL_PATH, FaceTracker
from .types import Face, Frame

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 300  # frames: 10 s at 30 fps; a landmarker is built per chunk (~0.1 s), so not much smaller
_POLL_S = 0.2  # how often a blocked reader checks that its peers are still alive
_JOIN_S = 5.0  # how long close() waits for workers to finish before terminating them
_PTS_TOLERANCE_S = 1e-6  # both sides compute pts the same way from the same integers; this only absorbs float noise


class TrackedFrame(NamedTuple):
    """The tracker's answer for one frame of the file."""

    index: int  # 0-based frame number, counted like VideoFileSource
    pts: float  # presentation time in seconds (to check against the source's frame)
    faces: list[Face]
    chunk: int  # which chunk tracked it; a chunk's first frame is a fresh detection


@dataclass(frozen=True)
class _Chunk:
    """Frames with ``start <= pts < stop`` (stream time-base ticks); None = unbounded on that side."""

    number: int
    start: Optional[int]
    stop: Optional[int]


@dataclass(frozen=True)
class _TrackerSettings:
    model_path: str
    num_faces: int
    scale: float
    image_size: int
    device: str
    min_confidence: float
    mode: str


def chunk_bounds(number: int, first_pts: int, ticks_per_chunk: Optional[int]) -> tuple[Optional[int], Optional[int]]:
    """The pts range ``[start, stop)`` of chunk ``number``; the first chunk also takes anything before ``first_pts``.

    Args:
        number: chunk number, from 0.
        first_pts: the video stream's start time in its time base.
        ticks_per_chunk: chunk length in time-base ticks; None = the whole file is chunk 0.

    Returns:
        ``(start, stop)`` in time-base ticks, None for unbounded.
    """
    if ticks_per_chunk is None:
        return None, None
    start = None if number == 0 else first_pts + number * ticks_per_chunk
    return start, first_pts + (number + 1) * ticks_per_chunk


def _decoded(container: av.container.InputContainer, video: av.VideoStream) -> Iterator[av.VideoFrame]:
    """The video frames in presentation order, decoded packet by packet as ``VideoFileSource`` does: a packet
    that fails to decode is skipped, and a read error ends the file, so both see the same frames."""
    packets = container.demux(video)
    while True:
        try:
            packet = next(packets)
        except (StopIteration, av.FFmpegError):
            return
        try:
            yield from packet.decode()
        except av.FFmpegError:
            continue


def _decode_chunk(path: str, chunk: _Chunk, seek: bool = True) -> Iterator[Optional[Frame]]:
    """The frames of one chunk, decoded from the keyframe at or before its start.

    Yields the chunk's frames (``index`` = position within the chunk), then None if the file ended
    inside the chunk (so every later chunk is empty).
    """
    bounded = chunk.start is not None or chunk.stop is not None
    with av.open(path) as container:
        video = container.streams.video[0]
        video.thread_type = "SLICE"  # one core per worker: frame threads would only hold frames back
        if seek and chunk.start is not None:
            try:
                container.seek(chunk.start, stream=video, backward=True, any_frame=False)
            except av.FFmpegError:
                seek = False  # not seekable: decode from the top
        fps = stream_fps(video)
        count, first = 0, True
        for item in _decoded(container, video):
            if item.pts is None and bounded:
                raise MediaError(f"{path} has frames without timestamps: track it with one worker (--num_workers 1).")
            if first and seek and chunk.start is not None and item.pts > chunk.start:
                break  # the demuxer landed after the chunk's start (inexact seeking): decode from the top instead
            first = False
            if chunk.start is not None and item.pts < chunk.start:
                continue
            if chunk.stop is not None and item.pts >= chunk.stop:
                return  # decoders hand frames out in pts order: nothing later belongs to this chunk
            yield Frame(index=count, pts=frame_time(item, count, fps), image=item.to_ndarray(format="rgb24"))
            count += 1
        else:
            yield None
            return
    yield from _decode_chunk(path, chunk, seek=False)


def _portable(err: BaseException) -> BaseException:
    """The exception itself if it survives pickling (UserError and friends do), else a RuntimeError naming it."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError(f"{type(err).__name__}: {err}")


def _stopping(stop, parent_pid: int) -> bool:
    """Told to stop, or orphaned (the reader's process is gone, so nobody would ever say so)."""
    return stop.is_set() or os.getppid() != parent_pid


def _track_chunk(path: str, settings: _TrackerSettings, chunk: _Chunk, results, stop, parent_pid: int) -> None:
    """Track one chunk with a fresh landmarker.

    Posts ("frame", chunk, pts, faces) per frame, then ("done", chunk, eof).
    """
    with FaceTracker(settings.model_path, num_faces=settings.num_faces, scale=settings.scale,
                     image_size=settings.image_size, mode=settings.mode, device=settings.device,
                     min_confidence=settings.min_confidence) as tracker:
        eof = False
        for frame in _decode_chunk(path, chunk):
            if _stopping(stop, parent_pid):
                return
            if frame is None:
                eof = True
                break
            results.put(("frame", chunk.number, frame.pts, tracker.track(frame)))
        results.put(("done", chunk.number, eof))


def _worker_main(path: str, settings: _TrackerSettings, tasks, results, stop, parent_pid: int) -> None:
    """A tracker process: take chunks until told to stop or orphaned; a failure is posted, then the process ends."""
    # A terminal's Ctrl-C goes to the whole process group: the parent decides what it means and stops the workers
    # through `stop`; a KeyboardInterrupt here would be posted as a tracking failure. SIGINT was blocked while this
    # process started (see ParallelTracker), so one that came before this point is discarded here too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        while not _stopping(stop, parent_pid):
            try:
                chunk = tasks.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            try:
                _track_chunk(path, settings, chunk, results, stop, parent_pid)
            except BaseException as err:  # noqa: BLE001 - reported to the reader, which raises it
                results.put(("error", chunk.number, _portable(err)))
                return
    finally:
        if _stopping(stop, parent_pid):
            results.cancel_join_thread()  # nobody will read what is still buffered: exit without flushing it


def _probe(path: Path) -> tuple[Fraction, int, Fraction, Optional[int], bool]:
    """(time base, first pts, fps, estimated frame count, has timestamps) of the file's video stream, or a MediaError."""
    if not path.is_file():
        raise MediaError(f"Input not found: {path}. Parallel tracking needs a video file.")
    with open_video_file(path) as container:
        if not container.streams.video:
            raise MediaError(f"No video stream in {path}. Pass a video file.")
        video = container.streams.video[0]
        fps = Fraction(video.average_rate or video.guessed_rate or DEFAULT_FPS)
        frames = video.frames or None
        if frames is None and video.duration is not None and video.time_base is not None:
            frames = math.ceil(video.duration * video.time_base * fps)
        if frames is None and container.duration:  # Matroska/WebM: only the container knows (in µs)
            frames = math.ceil(Fraction(container.duration, av.time_base) * fps)
        time_base = video.time_base or Fraction(1, 1000)
        try:
            first = next((packet for packet in container.demux(video) if packet.size), None)
        except av.FFmpegError:
            first = None
        timestamps = first is not None and first.pts is not None  # raw elementary streams have none
        return Fraction(time_base), int(video.start_time or 0), fps, frames, timestamps


class ParallelTracker:
    """Track a video file with ``workers`` MediaPipe processes over contiguous chunks; iterate for the
    faces of every frame, in frame order (``TrackedFrame(index, pts, faces, chunk)``).

    The workers start (and begin tracking) in the constructor, so they can run ahead while the rest of
    the pipeline loads. Iterate once, or call ``faces_for`` with each frame the pipeline's own decoder
    hands out; stopping early (``break``, an exception, ``close()``) ends and joins every worker process.
    ``workers=1`` without ``chunk`` tracks the whole file as one chunk: exactly a single ``FaceTracker``'s
    results, off the calling process.

    Args:
        path: the video file.
        workers: tracker processes.
        chunk: frames per chunk (cut by time: ``chunk / fps`` seconds). Default: the file split evenly
            across the workers, between 30 and ``DEFAULT_CHUNK`` frames per chunk.
        max_frames: stop after this many frames (the workers do not track far beyond it).
        prefetch: chunks handed out ahead of the reader (default ``2 × workers``); bounds memory.
        model_path, num_faces, scale, image_size, device, min_confidence: as ``FaceTracker``.
        mode: ``FaceTracker``'s "video" (tracks within each chunk) or "image" (every frame on its own).
    """

    def __init__(
        self,
        path: str | Path,
        workers: int = 2,
        chunk: Optional[int] = None,
        *,
        max_frames: Optional[int] = None,
        prefetch: Optional[int] = None,
        model_path: str | Path | None = None,
        num_faces: int = 1,
        scale: float = 1.25,
        image_size: int = 224,
        device: str = "cpu",
        min_confidence: float = 0.5,
        mode: str = "video",
    ) -> None:
        if workers < 1:
            raise UserError(f"tracking workers must be at least 1, got {workers}.")
        if chunk is not None and chunk < 1:
            raise UserError(f"tracking chunk must be at least 1 frame, got {chunk}.")
        self.path = Path(path)
        time_base, first_pts, fps, frames, timestamps = _probe(self.path)
        self.fps = float(fps)
        model_path = Path(model_path) if model_path is not None else DEFAULT_MODEL_PATH
        # A bad model or setting fails here, not in a worker. On the CPU delegate: whether the GPU one works
        # is each worker's to find out (FaceTracker falls back with a warning).
        FaceTracker(model_path, num_faces=num_faces, scale=scale, image_size=image_size, mode=mode,
                    device="cpu", min_confidence=min_confidence).close()
        self.workers = workers
        if not timestamps:
            if workers > 1:
                log.info("%s has no frame timestamps, so it cannot be cut into chunks: tracking it in one process", path)
            chunk = None
        elif chunk is None and workers > 1:
            chunk = min(DEFAULT_CHUNK, max(30, math.ceil((frames or DEFAULT_CHUNK * workers) / workers)))
        self.chunk = chunk
        self.max_frames = max_frames
        self.prefetch = prefetch or 2 * workers
        self._first_pts = first_pts
        self._ticks = None if chunk is None else max(1, round(chunk / fps / time_base))
        # Chunks that surely hold frames are handed out freely; past that, one at a time after the previous
        # one ended without reaching the end of the file (frame counts in headers can be wrong).
        estimate = frames if max_frames is None else min(frames or max_frames, max_frames)
        self._sure_chunks = 1 if chunk is None else (math.ceil(estimate / chunk) if estimate else 1)
        self._next_chunk = 0  # the next chunk to hand out
        self._reading = 0  # the chunk the reader is in
        self._frames: dict[int, deque] = {}  # chunk → (pts, faces) received, not yet read
        self._done: dict[int, bool] = {}  # chunk → reached the end of the file
        self._end_chunk: Optional[int] = None  # the chunk in which the file ends
        self._closed = False
        self._started = False
        self._checked = time.monotonic()  # when the workers were last seen alive
        self._matching: Optional[Iterator[TrackedFrame]] = None  # faces_for's reader
        self._next_tracked: Optional[TrackedFrame] = None  # read ahead by faces_for, not yet matched
        self._unmatched = 0  # source frames faces_for found no tracked frame for

        context = mp.get_context("spawn")  # fork would copy the caller's threads' locks (torch, pipeline)
        self._stop = context.Event()
        self._tasks = context.Queue()
        self._results = context.Queue()
        settings = _TrackerSettings(str(model_path), num_faces, scale, image_size, device, min_confidence, mode)
        self._processes = [
            context.Process(target=_worker_main, name=f"emica-track-{i}", daemon=True,
                            args=(str(self.path), settings, self._tasks, self._results, self._stop, os.getpid()))
            for i in range(workers)
        ]
        try:
            # Children inherit the signal mask: blocked, a Ctrl-C cannot interrupt a worker before it ignores SIGINT
            # (_worker_main); here it is delivered when unblocked. (CPython starts its resource tracker this way.)
            blocked = threading.current_thread() is threading.main_thread()
            if blocked:
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                for process in self._processes:
                    process.start()
            finally:
                if blocked:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            self._hand_out()
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers (for monitoring)."""
        return [p.pid for p in self._processes if p.pid is not None]

    # -- reading --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[TrackedFrame]:
        if self._started or self._closed:
            raise RuntimeError("a ParallelTracker is iterated once, before it is closed")
        self._started = True
        return self._read()

    def _read(self) -> Iterator[TrackedFrame]:
        index = 0
        try:
            while self.max_frames is None or index < self.max_frames:
                chunk = self._reading
                pending = self._frames.get(chunk)
                if pending:
                    pts, faces = pending.popleft()
                    yield TrackedFrame(index, pts, faces, chunk)
                    index += 1
                elif chunk in self._done:
                    self._frames.pop(chunk, None)
                    if self._done.pop(chunk):
                        return  # the file ended in this chunk
                    self._reading += 1
                    self._hand_out()
                else:
                    self._receive()
        finally:
            self.close()

    def _hand_out(self) -> None:
        """Queue chunks for the workers, at most ``prefetch`` ahead of the reader."""
        while self._next_chunk < self._reading + self.prefetch:
            k = self._next_chunk
            if self._end_chunk is not None and k > self._end_chunk:
                return
            if k >= self._sure_chunks and not (k - 1 in self._done or k - 1 < self._reading):
                return  # past the estimate: only once the previous chunk ended without the file ending
            start, stop = chunk_bounds(k, self._first_pts, self._ticks)
            self._tasks.put(_Chunk(k, start, stop))
            self._next_chunk += 1

    def faces_for(self, frame: Frame) -> list[Face]:
        """The faces of ``frame``, a frame of the same file from ``VideoFileSource``, matched by timestamp.

        Call it for the source's frames in order (instead of iterating). On an intact file every frame
        matches the tracker's frame of the same index. On a damaged one the two decoders may recover
        different frames around the damage (FFmpeg's frame threads drop some): a frame only the workers
        decoded is passed over, and one only the source decoded gets no faces, with one warning.
        """
        if self._matching is None:
            self._matching = iter(self)
        while True:
            if self._next_tracked is None:
                self._next_tracked = next(self._matching, None)
            tracked = self._next_tracked
            if tracked is None or tracked.pts > frame.pts + _PTS_TOLERANCE_S:
                self._unmatched += 1
                if self._unmatched == 1:
                    log.warning("%s: frame %d (%.3f s) was not decoded by the tracking workers (a damaged file?); "
                                "no faces for it", self.path, frame.index, frame.pts)
                return []
            self._next_tracked = None
            if tracked.pts >= frame.pts - _PTS_TOLERANCE_S:
                return tracked.faces

    @property
    def in_flight(self) -> int:
        """Chunks handed to the workers and not yet read to the end (at most ``prefetch``)."""
        return self._next_chunk - self._reading

    @property
    def buffered(self) -> int:
        """Frames tracked and received here but not yet read (bounded by about ``prefetch × chunk``)."""
        return sum(len(frames) for frames in self._frames.values())

    def _receive(self) -> None:
        """Wait for the workers' next message, then take all that are waiting (so what was tracked ahead is held
        here, where ``buffered`` counts it); every ``_POLL_S`` also check that none of the workers died."""
        try:
            self._handle(self._results.get(timeout=_POLL_S))
            while True:
                self._handle(self._results.get_nowait())
        except queue.Empty:
            pass
        if time.monotonic() - self._checked > _POLL_S:
            self._check_workers()

    def _handle(self, message: tuple) -> None:
        kind, chunk = message[0], message[1]
        if kind == "frame":
            self._frames.setdefault(chunk, deque()).append((message[2], message[3]))
        elif kind == "done":
            self._done[chunk] = message[2]
            if message[2]:
                self._end_chunk = chunk if self._end_chunk is None else min(self._end_chunk, chunk)
            self._hand_out()
        else:
            raise message[2]

    def _check_workers(self) -> None:
        self._checked = time.monotonic()
        for process in self._processes:
            if not process.is_alive():
                # A worker that failed posted its error before exiting: report that error, not the exit.
                try:
                    while True:
                        self._handle(self._results.get(timeout=_POLL_S))
                except queue.Empty:
                    pass
                raise RuntimeError(f"tracking worker {process.name} (pid {process.pid}) stopped unexpectedly "
                                   f"(exit code {process.exitcode}) while tracking {self.path}")

    # -- shutdown -------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the workers and wait for them (terminate any that do not finish within a few seconds). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        deadline = time.monotonic() + _JOIN_S
        for process in self._processes:
            while process.pid is not None and process.is_alive() and time.monotonic() < deadline:
                self._drain()  # a worker flushing its results must find room in the pipe
                process.join(0.05)
        for process in self._processes:
            if process.pid is not None and process.is_alive():
                log.warning("tracking worker %s did not stop; terminating it", process.name)
                process.terminate()
                process.join(1.0)
                if process.is_alive():
                    process.kill()
                    process.join()
        self._drain()
        self._tasks.cancel_join_thread()
        self._tasks.close()
        self._results.close()
        self._frames.clear()

    def _drain(self) -> None:
        try:
            while True:
                self._results.get_nowait()
        except (queue.Empty, OSError, ValueError):
            pass

    def __enter__(self) -> "ParallelTracker":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
