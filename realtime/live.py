"""Live inputs that survive drop-outs: a reader thread that keeps the newest frame, and reconnects.

``ResilientSource(open_fn)`` wraps a camera or network stream. A reader thread pulls frames from the
input as fast as it delivers them and keeps only the newest (plus all of its audio), so a slow
consumer skips stale frames instead of falling behind. When the input drops (read error, end of a
live stream, no frame for ``signal_timeout`` seconds), the consumer keeps getting frames at the
nominal rate: the last good picture with a "NO SIGNAL" banner, while the reader reopens the input
with exponential backoff (0.5 s, 1 s, 2 s, ... capped at 8 s) until it comes back or the source is
closed. Frame indexes keep counting up and pts come from one live clock across reconnects.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterator

import av
import cv2
import numpy as np

from realtime.errors import MediaError
from realtime.sources import DEFAULT_FPS, Source
from realtime.types import AudioChunk, Frame

log = logging.getLogger(__name__)

# Audio waiting for a consumer that stopped asking is capped, so a stalled pipeline cannot grow memory.
_MAX_PENDING_AUDIO_S = 5.0
# What can go wrong while (re)opening or reading a device or stream; anything else is a bug and ends the reader.
_INPUT_ERRORS = (MediaError, av.FFmpegError, OSError, cv2.error)


def backoff_delays(start: float = 0.5, cap: float = 8.0) -> Iterator[float]:
    """Waits before each reconnect attempt: start, 2·start, 4·start, ... never above cap, forever."""
    delay = start
    while True:
        yield min(delay, cap)
        delay = min(delay * 2.0, cap)


def nominal_fps(fps: float | None) -> float:
    """The rate to emit "no signal" frames at: the input's own if it is plausible, else 30."""
    if fps is None or not 1.0 <= fps <= 240.0:
        return DEFAULT_FPS
    return float(fps)


def no_signal_image(last: np.ndarray | None, height: int, width: int) -> np.ndarray:
    """The picture shown while the input is away: (H, W, 3) uint8.

    The last good frame (or mid-grey if there never was one) with a dark band across the middle
    that reads "NO SIGNAL" in white; the rest of the picture is left untouched so the viewer still
    sees where the feed stopped.
    """
    image = np.full((height, width, 3), 128, np.uint8) if last is None else last.copy()
    text, font = "NO SIGNAL", cv2.FONT_HERSHEY_SIMPLEX
    (unit_w, unit_h), _ = cv2.getTextSize(text, font, 1.0, 2)
    scale = 0.6 * width / unit_w  # the text spans 60% of the width whatever the resolution
    thickness = max(1, round(2 * scale))
    (text_w, text_h), baseline = cv2.getTextSize(text, font, scale, thickness)
    band_h = min(height, 2 * (text_h + baseline))
    top = (height - band_h) // 2
    band = image[top:top + band_h]
    band[:] = band // 4  # darkened, not black: the picture behind stays recognisable
    origin = ((width - text_w) // 2, top + (band_h + text_h) // 2)
    cv2.putText(image, text, origin, font, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return image


class ResilientSource(Source):
    """A live input that never ends on its own: reconnects with backoff and fills gaps with "no signal".

    Args:
        open_fn: opens the input and returns a fresh ``Source`` (raises ``MediaError`` when it cannot).
            Called once here, so an input that never worked fails at once with its own message,
            then again from the reader thread after every drop-out.
        fps: nominal frame rate for the "no signal" frames; default: the input's, else 30.
        signal_timeout: seconds without a new frame after which the signal counts as lost.
        backoff_start, backoff_cap: first and longest wait between reconnect attempts, in seconds.

    Counters (read at any time): ``skipped`` frames captured but superseded before anyone took them,
    ``no_signal_frames`` emitted, ``outages`` begun, ``reconnects`` that succeeded.
    ``clock_origin`` is the ``time.monotonic()`` value that frame pts count from.
    """

    def __init__(
        self,
        open_fn: Callable[[], Source],
        fps: float | None = None,
        *,
        signal_timeout: float = 1.0,
        backoff_start: float = 0.5,
        backoff_cap: float = 8.0,
    ) -> None:
        super().__init__()
        self.clock_origin = time.monotonic()
        first = open_fn()  # MediaError propagates: a wrong URL or absent camera fails fast
        self._open_fn = open_fn
        self.live = True
        self.frame_count = None
        self.fps = nominal_fps(fps if fps is not None else first.fps)
        self.width, self.height = first.width, first.height
        self.audio_rate, self.audio_channels = first.audio_rate, first.audio_channels
        self.description = first.description
        self.signal_timeout = signal_timeout
        self._backoff = (backoff_start, backoff_cap)
        self.skipped = self.no_signal_frames = self.outages = self.reconnects = 0

        self._cond = threading.Condition()  # guards everything below; the reader notifies on each change
        self._latest: Frame | None = None  # newest capture not handed out yet
        self._audio: list[AudioChunk] = []  # audio captured since the last hand-out
        self._audio_trimmed = False
        self._last_arrival = time.monotonic()  # newest capture (or the connection) time: stall detection
        self._no_signal = False  # the banner is up: pace "no signal" frames until a frame arrives
        self._outage_since: float | None = None  # start of the outage being reported, until recovery is confirmed
        self._recovered_at: float | None = None  # first frame after the outage, until a second one confirms it
        self._last_image: np.ndarray | None = None  # last good picture, under the banner
        self._banner: np.ndarray | None = None  # this outage's "no signal" picture
        self._reader_error: BaseException | None = None  # the capture thread died of a bug (not an input failure)
        self._index = 0
        self._last_pts = float("-inf")
        self._last_emit = time.monotonic()
        self._next_due = 0.0

        self._reader = threading.Thread(target=self._read_forever, args=(first,), name="capture", daemon=True)
        self._reader.start()

    # -- consumer side -------------------------------------------------------------------------

    def _next_frame(self) -> Frame | None:
        """The newest capture at once if there is one; else wait for one, or pace "no signal" frames."""
        period = 1.0 / self.fps
        with self._cond:
            while not self._closed.is_set():
                if self._reader_error is not None:
                    # Showing "no signal" forever would hide it: the run ends with the error instead.
                    raise RuntimeError(f"{self.description}: the capture thread failed: "
                                       f"{type(self._reader_error).__name__}: {self._reader_error}") from self._reader_error
                now = time.monotonic()
                if self._latest is not None:
                    frame, self._latest = self._latest, None
                    self._last_image = frame.image
                    return self._hand_out(frame, now)
                stall_at = self._last_arrival + self.signal_timeout
                if not self._no_signal and now >= stall_at:
                    self._mark_lost(f"no frame for {self.signal_timeout:g} s")
                if not self._no_signal:
                    self._cond.wait(stall_at - now)
                elif now >= self._next_due:
                    # Steady cadence, but a consumer that fell behind gets one frame now, not a burst.
                    self._next_due = max(self._next_due, now - period) + period
                    return self._hand_out(self._no_signal_frame(now), now)
                else:
                    self._cond.wait(self._next_due - now)
        return None

    def _hand_out(self, frame: Frame, now: float) -> Frame:
        """Number the frame, keep pts strictly rising, attach the audio gathered since the last one."""
        frame.index = self._index
        self._index += 1
        frame.pts = max(frame.pts, self._last_pts + 1e-6)
        self._last_pts = frame.pts
        frame.audio, self._audio = self._audio, []
        self._last_emit = now
        return frame

    def _no_signal_frame(self, now: float) -> Frame:
        if self._banner is None:
            self._banner = no_signal_image(self._last_image, self.height, self.width)
        self.no_signal_frames += 1
        # A copy each time: downstream stages own the pictures they are given.
        return Frame(index=-1, pts=now - self.clock_origin, image=self._banner.copy(), captured_at=time.perf_counter())

    def _mark_lost(self, reason: str) -> None:
        """Put the banner up (the condition is held); log the outage unless it is the one already reported."""
        self._recovered_at = None
        if self._no_signal:
            return
        self._no_signal = True
        self._banner = None
        self._next_due = self._last_emit + 1.0 / self.fps
        self._cond.notify_all()
        if self._outage_since is None:
            self._outage_since = self._last_arrival
            self.outages += 1
            log.warning("%s: signal lost (%s); showing 'no signal' and reconnecting", self.description, reason)

    # -- reader thread -------------------------------------------------------------------------

    def _read_forever(self, source: Source | None) -> None:
        delays = backoff_delays(*self._backoff)
        try:
            while not self._closed.is_set():
                if source is None:
                    if self._closed.wait(next(delays)):
                        return
                    source = self._try_open()
                    if source is None:
                        continue
                reason, frames = self._pump(source)
                source = None  # _pump closed it
                if reason is None:
                    return
                if frames:
                    delays = backoff_delays(*self._backoff)  # it worked for a while: start over at 0.5 s
                with self._cond:
                    self._mark_lost(reason)
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            log.debug("%s: capture thread failed", self.description, exc_info=True)
            with self._cond:
                self._reader_error = exc
                self._cond.notify_all()
        finally:
            if source is not None:
                source.close()

    def _try_open(self) -> Source | None:
        try:
            source = self._open_fn()
        except _INPUT_ERRORS as exc:
            log.debug("%s: reconnect failed: %s", self.description, exc)
            return None
        if self._closed.is_set():
            source.close()
            return None
        self.reconnects += 1
        log.debug("%s: reconnected", self.description)
        return source

    def _pump(self, source: Source) -> tuple[str | None, int]:
        """Read ``source`` until it ends or fails; returns (why it stopped or None if closed, frames read)."""
        frames = 0
        offset = None  # input pts → live clock, fixed at this connection's first frame
        try:
            with source:
                for frame in source:
                    if self._closed.is_set():
                        return None, frames
                    arrival = time.monotonic()
                    if offset is None:
                        offset = (arrival - self.clock_origin) - frame.pts
                    self._publish(frame, arrival, offset)
                    frames += 1
        except _INPUT_ERRORS as exc:
            return f"read error: {exc}", frames
        finally:
            self.decode_errors += source.decode_errors
        if self._closed.is_set():
            return None, frames
        return source.end_reason or "end of stream", frames

    def _publish(self, frame: Frame, arrival: float, offset: float) -> None:
        """Make ``frame`` the newest capture (superseding an untaken one) and keep its audio."""
        image = frame.image
        if image.shape[:2] != (self.height, self.width):
            # The pipeline's renderer and recorder were sized for the first connection.
            image = cv2.resize(image, (self.width, self.height), interpolation=cv2.INTER_AREA)
        captured = Frame(index=-1, pts=arrival - self.clock_origin, image=image,
                         captured_at=frame.captured_at or time.perf_counter())
        audio = [AudioChunk(c.pts + offset, c.sample_rate, c.samples) for c in frame.audio]
        with self._cond:
            if self._latest is not None:
                self.skipped += 1
            self._latest = captured
            self._audio.extend(audio)
            self._trim_audio()
            self._no_signal = False
            if self._outage_since is not None:
                self._confirm_recovery(arrival)
            self._last_arrival = arrival
            self._cond.notify_all()

    def _confirm_recovery(self, arrival: float) -> None:
        """Report the outage over once a second frame follows the first: a lone frame (such as the
        last one FFmpeg flushes when a dead connection times out) is shown but does not end it."""
        if self._recovered_at is None:
            self._recovered_at = arrival
            return
        log.warning("%s: signal back after a %.1f s outage", self.description, self._recovered_at - self._outage_since)
        self._outage_since = self._recovered_at = None

    def _trim_audio(self) -> None:
        total = sum(len(c.samples) / c.sample_rate for c in self._audio)
        while total > _MAX_PENDING_AUDIO_S and len(self._audio) > 1:
            chunk = self._audio.pop(0)
            total -= len(chunk.samples) / chunk.sample_rate
            if not self._audio_trimmed:
                log.warning("%s: nobody is reading the input; dropping audio older than %g s",
                            self.description, _MAX_PENDING_AUDIO_S)
                self._audio_trimmed = True

    # -- shutdown ------------------------------------------------------------------------------

    def close(self) -> None:
        self._closed.set()
        with self._cond:
            self._cond.notify_all()  # wakes a consumer waiting for a frame
        super().close()

    def _release(self) -> None:
        # The reader sees the flag within one frame; one blocked in a read of a stalled stream frees
        # its input when that read times out, so do not hold the caller for it.
        self._reader.join(timeout=1.0)
