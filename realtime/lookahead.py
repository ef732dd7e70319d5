"""Look-ahead (non-causal) smoothing for video files: `--smoothing lookahead`.

The causal One-Euro filter (realtime.smoothing) must trade jitter against lag because it only sees
the past. A file can wait for the future: each frame is held back K frames, then every track's
per-frame codes are replaced by a zero-phase estimate over frames t−K … t+K (the same step-preserving,
Gaussian-weighted local quadratic fit and per-group handling as `ParamSmoother.smooth_sequence`,
rotations on the quaternion sphere), and the reconstructor rebuilds the geometry from the smoothed codes
(`redecode`: FLAME again for EMICA/EMOCA/DECA, the mesh from smoothed landmarks for MediaPipe).

A symmetric window has no lag on a step, and K = 1.5 σ of the widest group window (3 frames at
30 fps, 0.1 s) keeps >= 3x of the jitter reduction on white noise (tests/test_lookahead.py).

The pipeline's stages pass each frame on as soon as it is processed, so the held-back frames sit
between two pipelines: `LookaheadPipeline` runs track → model in one, feeds its results through a
`LookaheadSmoother`, and renders and writes them in the second. Files only: still lossless and in
order, the last K frames are flushed at the end of the stream.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .pipeline import Pipeline, PipelineResult, Stage
from .smoothing import ParamSmoother
from .types import FrameResult, Reconstruction

# Half-width of the look-ahead window in standard deviations of the widest group's Gaussian: the
# weights beyond it are < 1/3 of the centre's, and cutting them keeps the noise reduction >= 3x.
LOOKAHEAD_SIGMAS = 1.5

_END = object()  # end of the smoothed stream


def lookahead_frames(smoother: ParamSmoother, fps: float) -> int:
    """K, the frames each output waits for: LOOKAHEAD_SIGMAS widest-group σ at `fps`, at least 1."""
    windows = [p.window for p in smoother.groups.values() if p is not None]
    if not windows:
        return 1
    return max(1, round(LOOKAHEAD_SIGMAS * max(windows) * fps))


@dataclass
class _Held:
    """A frame waiting for its look-ahead, with its tracks' codes as the model gave them."""

    result: FrameResult
    raw: dict[int, dict[str, np.ndarray]]  # track id → temporal codes (copies: the result's are replaced)


class LookaheadSmoother:
    """Holds frames back K frames and replaces each track's codes with a zero-phase estimate over t−K … t+K.

    Args:
        reconstructor: gives `temporal_codes(rec)` and `redecode(recs, codes)` (realtime.reconstruct).
        smoother: its groups' windows and rotation/camera handling are used (`smooth_sequence`).
        frames: K, the look-ahead (and look-back) in frames.

    Frames go in with `push` in stream order and come out of `push`/`flush` in the same order, each once.
    A track missing from some frames of a window is fitted on the frames that have it.
    """

    def __init__(self, reconstructor, smoother: ParamSmoother, frames: int):
        if frames < 1:
            raise ValueError(f"look-ahead must be at least 1 frame, got {frames}")
        self.reconstructor = reconstructor
        self.smoother = smoother
        self.frames = frames
        self._history: collections.deque[_Held] = collections.deque(maxlen=frames)  # already released
        self._pending: list[_Held] = []  # waiting for their future

    def push(self, result: FrameResult) -> list[FrameResult]:
        """Take the next frame; returns the frames whose look-ahead is now complete (oldest first)."""
        raw = {rec.face.track_id: {k: np.array(v, copy=True) for k, v in self.reconstructor.temporal_codes(rec).items()}
               for rec in result.reconstructions}
        self._pending.append(_Held(result, raw))
        return self._release(len(self._pending) - self.frames)

    def flush(self) -> list[FrameResult]:
        """End of stream: every frame still held, smoothed over the neighbours there are."""
        return self._release(len(self._pending))

    def _release(self, count: int) -> list[FrameResult]:
        if count <= 0:
            return []
        t0 = time.perf_counter()
        window = list(self._history) + self._pending
        start = len(self._history)
        recs: list[Reconstruction] = []
        codes: list[dict[str, np.ndarray]] = []
        where: list[tuple[FrameResult, int]] = []
        for centre in range(start, start + count):
            held = window[centre]
            neighbours = window[max(0, centre - self.frames) : centre + self.frames + 1]
            for j, rec in enumerate(held.result.reconstructions):
                recs.append(rec)
                codes.append(self._smoothed(rec.face.track_id, held, neighbours))
                where.append((held.result, j))
        for (result, j), rec in zip(where, self.reconstructor.redecode(recs, codes)):
            result.reconstructions[j] = rec
        released = self._pending[:count]
        del self._pending[:count]
        self._history.extend(released)
        ms = (time.perf_counter() - t0) * 1000.0 / count
        for held in released:
            held.result.timings["lookahead"] = ms
        return [held.result for held in released]

    def _smoothed(self, track: int, centre: _Held, neighbours: list[_Held]) -> dict[str, np.ndarray]:
        """One track's codes at `centre`, fitted over the neighbouring frames that have the track."""
        frames = [h for h in neighbours if track in h.raw]
        at = frames.index(centre)
        return self.smoother.smooth_sequence([h.raw[track] for h in frames], [h.result.frame.pts for h in frames], at=at)[at]


class LookaheadPipeline:
    """track → model, then `LookaheadSmoother`, then render → sinks: two `Pipeline`s with the held-back frames
    between them. Offers what the runner uses of a `Pipeline`: `run()`, `stop()`, `stopping`, `times`.

    Args:
        frames: the source's FrameResults, in order.
        upstream: the stages before the smoother (tracker, model).
        downstream: the stages after it (renderer).
        smoother: holds the frames back and smooths them.
        batch_size: faces per model batch.
        on_result: called with every finished FrameResult, in order.
    """

    def __init__(self, frames: Iterable[FrameResult], upstream: list[Stage], downstream: list[Stage],
                 smoother: LookaheadSmoother, *, batch_size: int = 1, queue_size: int = 8,
                 on_result: Optional[Callable[[FrameResult], None]] = None):
        self.smoother = smoother
        self._smoothed: queue.Queue = queue.Queue(queue_size)
        self._thread: Optional[threading.Thread] = None  # runs the first half
        self.first = Pipeline(frames, upstream, live=False, batch_size=batch_size, on_result=self._push)
        self.second = Pipeline(self._drain(), downstream, live=False, on_result=on_result)

    @property
    def times(self):
        return self.second.times  # each result carries every stage's timings through to the end

    @property
    def stopping(self) -> bool:
        return self.first.stopping

    def stop(self) -> None:
        """Stop reading the source; the frames in flight are smoothed, rendered and written."""
        self.first.stop()

    def abort(self, timeout: float = 5.0) -> bool:
        """Stop at once, dropping the frames in flight (see ``Pipeline.abort``); call from the thread that ran ``run``."""
        second = self.second.abort(timeout / 2)  # its stopping also frees the first half's blocked hand-over
        first = self.first.abort(timeout / 2, collect=False)  # its collector is the look-ahead thread, still running
        if self._thread is not None:
            self._thread.join(timeout / 2)
        return first and second and not (self._thread is not None and self._thread.is_alive())

    def _push(self, result: FrameResult) -> None:
        for ready in self.smoother.push(result):
            self._put(ready)

    def _put(self, item) -> None:
        while True:
            try:
                self._smoothed.put(item, timeout=0.1)
                return
            except queue.Full:
                if self.second.stopping:  # the downstream half failed and reads no more
                    self.first.stop()
                    return

    def _drain(self) -> Iterator[FrameResult]:
        while True:
            try:
                item = self._smoothed.get(timeout=0.1)
            except queue.Empty:
                if self.second.stopping:
                    return
                continue
            if item is _END:
                return
            yield item

    def run(self) -> PipelineResult:
        t0 = time.perf_counter()
        upstream: dict[str, object] = {}

        def run_first() -> None:
            try:
                upstream["result"] = self.first.run()
                for ready in self.smoother.flush():
                    self._put(ready)
            except BaseException as err:  # noqa: BLE001 - reported by run()
                upstream["error"] = err
            finally:
                self._put(_END)

        self._thread = thread = threading.Thread(target=run_first, name="lookahead", daemon=True)
        thread.start()
        second = self.second.run()
        self.first.stop()  # the downstream half ended early (an error): nothing more is read
        thread.join()
        first = upstream.get("result") or PipelineResult()
        error = first.error or upstream.get("error") or second.error
        return PipelineResult(
            frames_in=first.frames_in, frames_out=second.frames_out, dropped=0,
            seconds=time.perf_counter() - t0, stats=second.stats, error=error,
            interrupted=first.interrupted and error is None,
        )
