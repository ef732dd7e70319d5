"""Interrupt and resume for file processing.

Invariant: after any run ends (finished, Ctrl-C, SIGTERM), `video_<type>.mp4` holds exactly the
frames `[0, frames_done)` and `progress.json` says how many that is. `--resume` replays MediaPipe
tracking over those frames (tracking only, so the tracker's temporal state — and therefore every
later output — is the same as in an uninterrupted run), processes the rest into a second file, and
joins the two without re-encoding the video (the recorder writes no B-frames, so packets concatenate
cleanly; the audio is decoded and re-encoded once so that no AAC priming lands mid-track).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional

import av
import numpy as np

from .atomic import atomic_path, save_json
from .errors import UserError

PROGRESS_FILE = "progress.json"


@dataclass
class Progress:
    input: str
    frames_done: int
    complete: bool
    version: int = 1

    @classmethod
    def load(cls, folder: Path) -> Optional["Progress"]:
        path = folder / PROGRESS_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            return cls(input=str(data["input"]), frames_done=int(data["frames_done"]), complete=bool(data["complete"]),
                       version=int(data.get("version", 1)))
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"cannot resume: {path} is damaged ({err}); delete it to start that video again") from err

    def save(self, folder: Path) -> None:
        save_json(folder / PROGRESS_FILE, asdict(self))


def concat_videos(parts: list[Path], output: Path) -> None:
    """Join mp4 files made by the same Recorder settings into `output` (atomically)."""
    parts = [p for p in parts if p.is_file()]
    if not parts:
        return
    with av.open(str(parts[0])) as first:
        has_audio = bool(first.streams.audio)
        audio_rate = first.streams.audio[0].rate if has_audio else None
        audio_layout = first.streams.audio[0].layout.name if has_audio else None
    with atomic_path(output) as tmp:
        with av.open(str(tmp), "w", format="mp4", options={"movflags": "+faststart"}) as out:
            with av.open(str(parts[0])) as first:
                vin = first.streams.video[0]
                vout = out.add_stream_from_template(vin)
                v_tb = vin.time_base
            aout = None
            if has_audio:
                aout = out.add_stream("aac", rate=audio_rate, layout=audio_layout)
                aout.bit_rate = first_bit_rate(parts[0])
            last_dts = None
            audio = _AudioJoiner(audio_rate) if has_audio else None
            for part in parts:
                with av.open(str(part)) as inp:
                    vin = inp.streams.video[0]
                    for packet in inp.demux(vin):
                        if packet.dts is None:
                            continue
                        packet.pts = int(Fraction(packet.pts) * vin.time_base / v_tb)
                        packet.dts = int(Fraction(packet.dts) * vin.time_base / v_tb)
                        if last_dts is not None and packet.dts <= last_dts:
                            continue  # a frame both parts hold (never expected; never duplicate it)
                        last_dts = packet.dts
                        packet.stream = vout
                        out.mux(packet)
                if audio is not None:
                    with av.open(str(part)) as inp:
                        if inp.streams.audio:
                            for frame in inp.decode(audio=0):
                                for f in audio.push(frame):
                                    out.mux(aout.encode(f))
            if audio is not None:
                for f in audio.flush():
                    out.mux(aout.encode(f))
                out.mux(aout.encode(None))


def first_bit_rate(path: Path) -> int:
    with av.open(str(path)) as c:
        return int(c.streams.audio[0].bit_rate or 64000)


class _AudioJoiner:
    """Lays decoded audio frames on one sample clock by their pts: overlaps are dropped, gaps filled with silence."""

    def __init__(self, rate: int, frame_size: int = 1024):
        self.rate, self.frame_size = rate, frame_size
        self.next_sample: Optional[int] = None
        self.pending: Optional[np.ndarray] = None
        self.pending_start = 0
        self.layout = None

    def push(self, frame: av.AudioFrame) -> list[av.AudioFrame]:
        samples = frame.to_ndarray()
        if frame.format.is_packed:
            samples = samples.reshape(-1, len(frame.layout.channels)).T
        samples = samples.astype(np.float32)
        self.layout = frame.layout.name
        start = round(float(frame.pts * frame.time_base) * self.rate) if frame.pts is not None else (self.next_sample or 0)
        if self.pending is None:
            self.pending, self.pending_start = samples, start
        else:
            end = self.pending_start + self.pending.shape[1]
            if start < end:  # overlap: keep what we have
                samples = samples[:, end - start:]
            elif start > end:  # gap: silence
                samples = np.concatenate([np.zeros((samples.shape[0], start - end), np.float32), samples], axis=1)
            self.pending = np.concatenate([self.pending, samples], axis=1)
        return self._cut(final=False)

    def _cut(self, final: bool) -> list[av.AudioFrame]:
        frames = []
        while self.pending is not None and (self.pending.shape[1] >= self.frame_size or (final and self.pending.shape[1])):
            chunk = self.pending[:, : self.frame_size]
            self.pending = self.pending[:, self.frame_size:]
            f = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout=self.layout)
            f.sample_rate = self.rate
            f.pts = self.pending_start
            f.time_base = Fraction(1, self.rate)
            self.pending_start += chunk.shape[1]
            frames.append(f)
        return frames

    def flush(self) -> list[av.AudioFrame]:
        return self._cut(final=True)


def replace_with_join(previous: Path, new: Path, final: Path) -> None:
    """final := previous + new (either may be missing); then remove both."""
    concat_videos([previous, new], final)
    for p in (previous, new):
        if p.exists():
            os.remove(p)
