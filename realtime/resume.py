"""Interrupt and resume for file processing.

Invariant: after any run ends (finished, Ctrl-C, SIGTERM, a failed output), `video_<type>.mp4` holds
at least the frames `[0, frames_done)` and `progress.json` says how many that is (an output that failed
may have left the video a few frames ahead; those are cut off when the run is resumed). `--resume`
replays MediaPipe tracking over those frames (tracking only, so the tracker's temporal state — and
therefore every later output — is the same as in an uninterrupted run), processes the rest into a second
file, and joins the two without re-encoding the video (the recorder writes no B-frames, so packets
concatenate cleanly and can be cut anywhere); the sound is taken from the input again in one piece and encoded
once, since a part's AAC encoder starts cold and a splice would garble the join.

A resume is refused, with one line saying why, when the folder's earlier outputs cannot be continued: the
video is missing or shorter than progress.json says, or this run's flags would make different outputs
(another panel layout, image type, export format …), which the join would mix into one garbled file.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional, Sequence

import av
import numpy as np

from .atomic import atomic_path, save_json
from .errors import MediaError, UserError

PROGRESS_FILE = "progress.json"

log = logging.getLogger("realtime")


@dataclass
class Progress:
    input: str
    frames_done: int
    complete: bool
    version: int = 1
    # The flags that shape the outputs (see RunConfig → runner.resume_settings), as `--flag: value`;
    # absent in files from before they were recorded.
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, folder: Path) -> Optional["Progress"]:
        path = folder / PROGRESS_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            settings = data.get("settings") or {}
            if not isinstance(settings, dict):
                raise TypeError(f"settings is a {type(settings).__name__}, not an object")
            return cls(input=str(data["input"]), frames_done=int(data["frames_done"]), complete=bool(data["complete"]),
                       version=int(data.get("version", 1)), settings=settings)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise UserError(f"cannot resume: {path} is damaged ({err}); delete it to start that video again") from err

    def save(self, folder: Path) -> None:
        save_json(folder / PROGRESS_FILE, asdict(self))


def video_frames(path: Path) -> tuple[int, int, int]:
    """(frames, width, height) of an mp4 the Recorder wrote, counting its video packets (one per frame:
    no B-frames, nothing to decode). A damaged file raises av.FFmpegError."""
    with av.open(str(path)) as c:
        video = c.streams.video[0]
        frames = sum(1 for packet in c.demux(video) if packet.dts is not None)
        return frames, video.codec_context.width, video.codec_context.height


def concat_videos(parts: Sequence[Path], output: Path, frames: Optional[Sequence[Optional[int]]] = None,
                  audio_from: Optional[Path] = None, whole_audio: bool = False) -> None:
    """Join mp4 files made by the same Recorder settings into `output` (atomically).

    Args:
        parts: the files, in order; each must exist (a missing one is a FileNotFoundError, never skipped).
        frames: per part, how many of its first frames to take (None: all); the part's audio is cut at the
            same time. The recorder writes no B-frames, so every packet is one frame in presentation order.
        audio_from: where the parts' sound came from (the input video): when the parts have sound, it is taken
            from there in one piece, up to where the joined video ends (all of it with ``whole_audio``), instead
            of splicing the parts' own (a part's AAC encoder starts cold: about 80 ms of garble at each join).
    """
    parts = [Path(p) for p in parts]
    limits = list(frames) if frames is not None else [None] * len(parts)
    if len(limits) != len(parts):
        raise ValueError(f"{len(parts)} parts but {len(limits)} frame limits")
    for part in parts:
        if not part.is_file():
            raise FileNotFoundError(f"cannot join videos: {part} is missing")
    if not parts:
        raise ValueError("concat_videos needs at least one part")
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
            video_end = 0.0  # seconds: where the joined video's last frame ends
            from_input = has_audio and audio_from is not None and _has_audio(audio_from)
            audio = _AudioJoiner(audio_rate) if has_audio else None
            for part, limit in zip(parts, limits):
                until = None  # seconds: where this part's video was cut, so its audio stops there too
                with av.open(str(part)) as inp:
                    vin = inp.streams.video[0]
                    taken = 0
                    for packet in inp.demux(vin):
                        if packet.dts is None:
                            continue
                        if limit is not None and taken >= limit:
                            until = float(packet.pts * vin.time_base)
                            break
                        taken += 1
                        packet.pts = int(Fraction(packet.pts) * vin.time_base / v_tb)
                        packet.dts = int(Fraction(packet.dts) * vin.time_base / v_tb)
                        if last_dts is not None and packet.dts <= last_dts:
                            continue  # a frame both parts hold (never expected; never duplicate it)
                        last_dts = packet.dts
                        video_end = max(video_end, float((packet.pts + (packet.duration or 0)) * v_tb))
                        packet.stream = vout
                        out.mux(packet)
                if audio is not None and not from_input:
                    with av.open(str(part)) as inp:
                        if inp.streams.audio:
                            for frame in inp.decode(audio=0):
                                for f in audio.push(frame, until):
                                    out.mux(aout.encode(f))
            if from_input:
                resample = av.AudioResampler(format="fltp", layout=audio_layout, rate=audio_rate)
                with av.open(str(audio_from)) as inp:
                    for frame in inp.decode(audio=0):
                        for f in resample.resample(frame):
                            for g in audio.push(f, None if whole_audio else video_end):
                                out.mux(aout.encode(g))
            if audio is not None:
                for f in audio.flush():
                    out.mux(aout.encode(f))
                out.mux(aout.encode(None))


def _has_audio(path: Path) -> bool:
    try:
        with av.open(str(path)) as c:
            return bool(c.streams.audio) and c.streams.audio[0].codec_context is not None
    except (av.FFmpegError, OSError):
        return False


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

    def push(self, frame: av.AudioFrame, until: Optional[float] = None) -> list[av.AudioFrame]:
        """Add a decoded frame; samples at or after ``until`` seconds (if given) are left out."""
        samples = frame.to_ndarray()
        if frame.format.is_packed:
            samples = samples.reshape(-1, len(frame.layout.channels)).T
        samples = samples.astype(np.float32)
        self.layout = frame.layout.name
        start = round(float(frame.pts * frame.time_base) * self.rate) if frame.pts is not None else (self.next_sample or 0)
        if until is not None:
            samples = samples[:, : max(0, round(until * self.rate) - start)]
            if not samples.shape[1]:
                return []
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


def start_over_hint(folder: Path) -> str:
    """The end of every refused resume's message: how to get a clean run instead."""
    return f"to start over, run without --resume into another --processed_subfolder, or delete {folder}"


def _shown(flag: str, value: Any) -> str:
    """How a recorded setting reads on the command line: `--cat_dim 1`, `--use_mask false`, `no --export`."""
    if value is None:
        return f"no {flag}"
    if isinstance(value, bool):
        return f"{flag} {str(value).lower()}"
    return f"{flag} {value}"


class Resume:
    """progress.json bookkeeping for one video's results folder.

    The constructor only reads and checks (a refused resume touches nothing). The earlier video stays under
    its name while this run records the rest into ``recording_path``; ``finish`` joins the two atomically, so
    a run that fails or is killed at any point leaves the earlier video as it was.

    Args:
        folder: the results folder (progress.json, the video, the per-frame outputs).
        input_path: the input video (its resolved path is recorded and must match on resume).
        video: the reconstruction video this run writes, or None (``--save_video false``).
        enabled: ``--resume`` was given. Without it, a folder whose run did any frames is refused.
        settings: ``{flag: value}`` of the flags that shape the outputs; a resume with other values is refused.
        frame_size: (width, height) the video's frames will have (even sizes, as the recorder pads them).
    """

    def __init__(self, folder: Path, input_path: str, video: Optional[Path], enabled: bool,
                 settings: Optional[dict[str, Any]] = None, frame_size: Optional[tuple[int, int]] = None):
        self.folder, self.input, self.video = folder, str(Path(input_path).resolve()), video
        self.settings = dict(settings or {})
        start_over = start_over_hint(folder)
        self._start_over = start_over
        previous = Progress.load(folder)
        if previous is not None and not enabled and (previous.frames_done or previous.complete):
            done = "complete" if previous.complete else f"{previous.frames_done} frames done"
            raise UserError(f"{folder} already holds a run ({done}): --resume to continue it, or choose another "
                            "--processed_subfolder (or delete that folder)")
        if enabled and (previous is None or not (previous.frames_done or previous.complete)):
            log.warning("--resume: no earlier run of %s with frames done in %s; starting from the beginning",
                        self.input, folder)
        if not enabled:
            previous = None  # a run that did no frames: nothing to keep
        if previous is not None and previous.input != self.input:
            raise UserError(f"cannot resume in {folder}: it holds results of {previous.input}, not {self.input}; "
                            "pass another --processed_subfolder")
        self.already_complete = previous is not None and previous.complete
        self.frames_done = previous.frames_done if previous is not None else 0
        self.complete = False
        self.recording_path = video
        if previous is not None and not previous.complete and self.frames_done:
            self._check_settings(previous)
            if video is not None:
                self.recording_path = video.with_name(video.stem + ".resumed.mp4")
                self._check_video(frame_size)
            log.info("resuming %s after frame %d", folder, self.frames_done)

    @property
    def resuming(self) -> bool:
        return self.frames_done > 0 and not self.already_complete

    def _check_settings(self, previous: Progress) -> None:
        for flag, value in self.settings.items():
            if flag in previous.settings and previous.settings[flag] != value:
                raise UserError(f"cannot resume in {self.folder}: its run used {_shown(flag, previous.settings[flag])}, "
                                f"this one {_shown(flag, value)}, which makes different outputs; resume with "
                                f"{_shown(flag, previous.settings[flag])}, or {self._start_over}")

    def _check_video(self, frame_size: Optional[tuple[int, int]]) -> None:
        video = self.video
        aside = video.with_name(video.stem + ".previous.mp4")
        if not video.exists() and aside.is_file():
            # Earlier versions moved the video aside while resuming; a run stopped then left it there.
            os.replace(aside, video)
            log.info("restored %s from %s", video.name, aside.name)
        self.recording_path.unlink(missing_ok=True)  # the unfinished part of a run killed before it joined
        n = self.frames_done
        if not video.is_file():
            raise UserError(f"cannot resume in {self.folder}: {video.name}, which held the {n} frames done, is missing; "
                            f"{self._start_over}")
        try:
            frames, width, height = video_frames(video)
        except (av.FFmpegError, OSError, IndexError) as err:
            raise UserError(f"cannot resume: {video} is damaged ({err}); {self._start_over}") from err
        if frames < n:
            raise UserError(f"cannot resume: {video} holds {frames} frames, but progress.json counts {n} done; "
                            f"{self._start_over}")
        if frame_size is not None and (width, height) != tuple(frame_size):
            raise UserError(f"cannot resume: {video} is {width}x{height}, but this run's panels are "
                            f"{frame_size[0]}x{frame_size[1]} (other --cat_dim or --include_* flags than its run?); "
                            f"resume with that run's flags, or {self._start_over}")

    def finish(self, frames: int, complete: bool) -> None:
        """Join this run's ``frames`` new frames onto the video and record the progress.

        ``frames`` counts only what every output holds; the parts are cut to the counts, so the video never runs
        ahead of progress.json. If the join fails, the earlier video is kept as it was, no new frame counts, and
        the error is raised (after progress.json is brought up to date).
        """
        failure: Optional[BaseException] = None
        if self.video is not None and self.recording_path != self.video:
            if frames:
                try:
                    concat_videos([self.video, self.recording_path], self.video, frames=[self.frames_done, frames],
                                  audio_from=Path(self.input), whole_audio=complete)
                except (OSError, av.FFmpegError, ValueError) as err:
                    failure = MediaError(f"cannot add the resumed frames to {self.video} ({err}); it still holds the "
                                         f"first {self.frames_done} frames: --resume again to redo the rest")
                    frames, complete = 0, False
            try:
                self.recording_path.unlink(missing_ok=True)
            except OSError as err:
                log.warning("could not remove %s: %s", self.recording_path, err)
        if frames or complete:  # else progress.json (if any) is still right
            self.frames_done += frames
            self.complete = complete
            Progress(input=self.input, frames_done=self.frames_done, complete=complete,
                     settings=self.settings).save(self.folder)
        if failure is not None:
            raise failure
