"""Microphone capture (sounddevice / PortAudio) into timestamped ``AudioChunk`` objects.

Chunk timestamps are seconds since ``clock_origin`` on the ``time.monotonic()`` clock, the clock the
live sources stamp their frames with, so audio and video line up in the recorder and the broadcast.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

from realtime.errors import MediaError
from realtime.types import AudioChunk

MAX_BLOCK_AGE_S = 10.0  # older "capture times" are taken as bogus host-API timing
NO_MIC_HINT = "choose one with --audio_device (index or part of its name) or run without sound with --no_audio"


def _sounddevice() -> Any:
    """Import sounddevice, turning a missing PortAudio library into a user-facing error."""
    try:
        import sounddevice
    except OSError as e:  # sounddevice raises OSError when libportaudio is absent
        raise MediaError(
            f"microphone capture needs the PortAudio library ({e}); install it (Debian/Ubuntu: "
            "apt-get install libportaudio2) or run with --no_audio"
        ) from None
    return sounddevice


@dataclass(frozen=True)
class InputDevice:
    """One PortAudio device that can record."""

    index: int
    name: str
    channels: int  # most input channels it offers
    default_samplerate: float
    hostapi: str

    def __str__(self) -> str:
        return f"{self.index}: {self.name} ({self.hostapi}, {self.channels} ch, {self.default_samplerate:g} Hz)"


def list_input_devices() -> list[InputDevice]:
    """Every device with at least one input channel, in PortAudio's order."""
    sd = _sounddevice()
    hostapis = [api["name"] for api in sd.query_hostapis()]
    return [
        InputDevice(d["index"], d["name"], d["max_input_channels"], d["default_samplerate"], hostapis[d["hostapi"]])
        for d in sd.query_devices()
        if d["max_input_channels"] > 0
    ]


def resolve_input_device(
    device: Union[int, str, None], devices: list[InputDevice], default_index: Optional[int]
) -> InputDevice:
    """Pick the device the user asked for: None = the system default, an index, or part of a name.

    A name matches exactly (case-insensitive) first, else as a unique substring.
    """
    listing = "; ".join(str(d) for d in devices) or "none"
    if not devices:
        raise MediaError(f"no microphone found (PortAudio lists no input devices); {NO_MIC_HINT}")
    if device is None:
        chosen = next((d for d in devices if d.index == default_index), None)
        if chosen is None:
            raise MediaError(f"there is no default microphone; {NO_MIC_HINT}. Input devices: {listing}")
        return chosen
    if isinstance(device, int) or (isinstance(device, str) and device.strip().isdigit()):
        index = int(device)
        chosen = next((d for d in devices if d.index == index), None)
        if chosen is None:
            raise MediaError(f"audio device {index} is not a microphone; {NO_MIC_HINT}. Input devices: {listing}")
        return chosen
    wanted = device.strip().lower()
    exact = [d for d in devices if d.name.lower() == wanted]
    if exact:
        return exact[0]
    partial = [d for d in devices if wanted in d.name.lower()]
    if len(partial) == 1:
        return partial[0]
    if not partial:
        raise MediaError(f"no microphone matches {device!r}; {NO_MIC_HINT}. Input devices: {listing}")
    names = "; ".join(str(d) for d in partial)
    raise MediaError(f"{device!r} matches several microphones ({names}); pass --audio_device with its index")


class SampleClock:
    """Timestamps for consecutive blocks of one sample stream.

    Between blocks the time advances by exactly the samples delivered (no callback jitter); the
    device's own capture time anchors it, and re-anchors it when the two disagree by more than
    ``tolerance`` seconds (dropped input, clock drift). Timestamps always increase.
    """

    def __init__(self, samplerate: int, tolerance: float = 0.02):
        self.samplerate = samplerate
        self.tolerance = tolerance
        self._next: Optional[float] = None  # expected start of the next block
        self._last: Optional[float] = None

    def stamp(self, capture_time: float, frames: int) -> float:
        """capture_time: when the block's first sample was captured (seconds); returns its pts."""
        if self._next is None or abs(capture_time - self._next) > self.tolerance:
            pts = capture_time
        else:
            pts = self._next
        if self._last is not None and pts <= self._last:
            pts = self._last + 1.0 / self.samplerate  # a backwards re-anchor: keep order
        self._last = pts
        self._next = pts + frames / self.samplerate
        return pts


class MicrophoneCapture:
    """Record from a microphone on PortAudio's thread; ``read()`` drains what arrived so far.

    device: None (system default), an index, or part of a device name (see ``list_input_devices``).
    clock_origin: a ``time.monotonic()`` value; chunk pts are seconds since it (default: construction).
    blocksize: samples per chunk (960 = 20 ms at 48 kHz).
    max_buffered_s: unread audio beyond this is dropped, oldest first (counted in ``dropped_samples``).
    """

    def __init__(
        self,
        device: Union[int, str, None] = None,
        samplerate: int = 48000,
        channels: int = 1,
        clock_origin: Optional[float] = None,
        blocksize: int = 960,
        max_buffered_s: float = 5.0,
    ):
        sd = _sounddevice()
        self.device = resolve_input_device(device, list_input_devices(), sd.default.device[0])
        if not 1 <= channels <= self.device.channels:
            raise MediaError(
                f"microphone {self.device.name!r} has {self.device.channels} input channel(s), "
                f"{channels} requested; lower the channel count or pick another --audio_device"
            )
        try:
            sd.check_input_settings(device=self.device.index, channels=channels, samplerate=samplerate, dtype="float32")
        except (sd.PortAudioError, ValueError) as e:
            raise MediaError(
                f"microphone {self.device.name!r} cannot record {channels} ch at {samplerate} Hz ({e}); "
                "pick another --audio_device"
            ) from None
        self.samplerate = samplerate
        self.channels = channels
        self.blocksize = blocksize
        self.clock_origin = time.monotonic() if clock_origin is None else clock_origin
        self.overflows = 0  # PortAudio reported lost input (the callback ran late)
        self.dropped_samples = 0  # captured but never read, dropped to bound memory
        self._max_buffered = int(max_buffered_s * samplerate)
        self._chunks: collections.deque[AudioChunk] = collections.deque()
        self._buffered = 0
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)  # signalled whenever a block arrives
        self._captured_until = float("-inf")  # end (pts) of the newest block received
        self._clock = SampleClock(samplerate)
        self._stream = None

    def start(self) -> None:
        if self._stream is not None:
            return
        sd = _sounddevice()
        try:
            self._stream = sd.InputStream(
                device=self.device.index,
                samplerate=self.samplerate,
                channels=self.channels,
                dtype="float32",
                blocksize=self.blocksize,
                latency="low",
                callback=self._callback,
            )
            self._stream.start()
        except sd.PortAudioError as e:
            self._stream = None
            raise MediaError(
                f"cannot open microphone {self.device.name!r} ({e}); pick another --audio_device or use --no_audio"
            ) from None

    def stop(self) -> None:
        """Stop recording (safe to call twice); unread chunks stay readable."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.stop()
            stream.close()
        with self._ready:
            self._ready.notify_all()  # a read_until() waiting for more audio gets what there is

    def read(self) -> list[AudioChunk]:
        """All chunks captured since the last call, oldest first; never waits."""
        with self._lock:
            chunks = list(self._chunks)
            self._chunks.clear()
            self._buffered = 0
        return chunks

    def read_until(self, end: float, timeout: float = 1.0) -> list[AudioChunk]:
        """The chunks before ``end`` (seconds since ``clock_origin``), the last one cut at ``end``.

        Waits up to ``timeout`` seconds for the microphone to deliver audio up to ``end`` (use it when
        a recording stops, so the sound covers the last frame); later audio stays queued.
        """
        deadline = time.monotonic() + timeout
        with self._ready:
            while self._captured_until < end and self._stream is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._ready.wait(remaining)
            out = []
            while self._chunks:
                chunk = self._chunks[0]
                keep = min(len(chunk.samples), round((end - chunk.pts) * self.samplerate))
                if keep <= 0:
                    break
                self._chunks.popleft()
                self._buffered -= keep
                out.append(AudioChunk(chunk.pts, chunk.sample_rate, chunk.samples[:keep]))
                if keep < len(chunk.samples):
                    rest = AudioChunk(chunk.pts + keep / self.samplerate, chunk.sample_rate, chunk.samples[keep:])
                    self._chunks.appendleft(rest)
                    break
            return out

    def __enter__(self) -> "MicrophoneCapture":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _capture_time(self, frames: int, time_info: Any) -> float:
        """time.monotonic() of the block's first sample."""
        now = time.monotonic()
        age = time_info.currentTime - time_info.inputBufferAdcTime
        # Some sources deliver in bursts (PulseAudio's test sine source: 2 s blocks), so a block may
        # be seconds old when it arrives; its capture time is still right.
        if time_info.inputBufferAdcTime > 0 and 0 <= age < MAX_BLOCK_AGE_S:
            return now - age  # the device's own capture time, moved onto our clock
        # Host APIs without timing info: the last sample arrived one input latency ago.
        latency = self._stream.latency if self._stream is not None else 0.0
        return now - latency - frames / self.samplerate

    def _callback(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        if status.input_overflow:
            self.overflows += 1
        pts = self._clock.stamp(self._capture_time(frames, time_info) - self.clock_origin, frames)
        chunk = AudioChunk(pts=pts, sample_rate=self.samplerate, samples=indata.copy())
        with self._ready:
            self._chunks.append(chunk)
            self._buffered += frames
            self._captured_until = pts + frames / self.samplerate
            while self._buffered > self._max_buffered:
                dropped = self._chunks.popleft()
                self._buffered -= len(dropped.samples)
                self.dropped_samples += len(dropped.samples)
            self._ready.notify_all()
