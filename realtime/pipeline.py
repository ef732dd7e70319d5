"""The threaded pipeline: source → tracker → reconstructor → renderer/composer → sinks.

One thread per stage, bounded queues between them. Files and image folders are lossless (a full queue
blocks the producer; every input frame gives exactly one output frame, in order). Live input is
latest-wins: a full queue drops its oldest frame, counts it, and hands that frame's audio on so the
sound track stays whole (and its retired track ids, so per-track state downstream is still freed).

Shutdown is cooperative: `stop()` (SIGINT/SIGTERM, a window's ESC, max_frames) makes the source emit
its end marker; every stage finishes the frame in hand, passes the marker on, and the sinks close
(the recorder finalises a playable mp4). A stage that fails records the error, asks for a stop and
keeps draining its queue, so no thread is left blocked.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Protocol

import numpy as np

from .types import FrameResult

log = logging.getLogger("realtime.pipeline")

_END = object()  # end-of-stream marker travelling through the queues


class Stage(Protocol):
    """A per-frame worker. `setup`/`teardown` run inside the stage's own thread (GL contexts need that)."""

    name: str

    def setup(self) -> None: ...
    def process(self, batch: list[FrameResult]) -> None: ...
    def teardown(self) -> None: ...


class LatestQueue:
    """Bounded queue for live input: put never blocks; when full the oldest item is dropped and counted."""

    def __init__(self, maxsize: int):
        self._items: collections.deque = collections.deque()
        self._maxsize = maxsize
        self._cond = threading.Condition()
        self.dropped = 0

    def put(self, item) -> None:
        with self._cond:
            self._items.append(item)
            if item is not _END and len(self._items) > self._maxsize:
                oldest = self._items.popleft()
                self.dropped += 1
                self._items[0].absorb(oldest)
            self._cond.notify()

    def get(self, timeout: Optional[float] = None):
        with self._cond:
            if not self._cond.wait_for(lambda: self._items, timeout):
                raise queue.Empty
            return self._items.popleft()

    def get_nowait(self):
        with self._cond:
            if not self._items:
                raise queue.Empty
            return self._items.popleft()


class LosslessQueue(queue.Queue):
    """Bounded blocking queue for files: back-pressure instead of loss."""


@dataclass
class StageTimes:
    """Per-stage latencies in ms, bounded so long live runs keep constant memory."""

    window: int = 10_000
    samples: dict[str, collections.deque] = field(default_factory=dict)

    def add(self, timings: dict[str, float]) -> None:
        for name, ms in timings.items():
            self.samples.setdefault(name, collections.deque(maxlen=self.window)).append(ms)

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, values in self.samples.items():
            arr = np.fromiter(values, dtype=np.float64)
            out[name] = {"p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)),
                         "p99": float(np.percentile(arr, 99)), "mean": float(arr.mean()), "n": int(arr.size)}
        return out

    def format(self) -> str:
        rows = [f"{name:>12}: p50 {s['p50']:7.2f} ms  p95 {s['p95']:7.2f} ms" for name, s in self.summary().items()]
        return "\n".join(rows)


@dataclass
class PipelineResult:
    frames_in: int = 0
    frames_out: int = 0
    dropped: int = 0
    seconds: float = 0.0
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    error: Optional[BaseException] = None
    interrupted: bool = False

    @property
    def fps(self) -> float:
        return self.frames_out / self.seconds if self.seconds > 0 else 0.0


class Pipeline:
    """Runs `frames` through `stages` on one thread each; `on_result` sees every finished FrameResult."""

    def __init__(
        self,
        frames: Iterable[FrameResult],
        stages: list[Stage],
        *,
        live: bool,
        batch_size: int = 1,
        queue_size: int = 8,
        on_result: Optional[Callable[[FrameResult], None]] = None,
        stats_every: Optional[float] = None,
    ):
        self.frames = frames
        self.stages = stages
        self.live = live
        self.batch_size = max(1, batch_size)
        self.on_result = on_result
        self.stats_every = stats_every
        self.times = StageTimes()
        self._stop = threading.Event()
        self._abort = threading.Event()  # stop at once: frames in flight are dropped, not finished
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._frames_in = 0
        self._frames_out = 0
        # The source waits until every stage has set up (MediaPipe, GL context), so live input is not
        # dropped during start-up.
        self._ready = [threading.Event() for _ in stages]
        n = len(stages) + 1
        if live:
            self._queues = [LatestQueue(2) for _ in range(n)]
        else:
            self._queues = [LosslessQueue(max(queue_size, 2 * self.batch_size)) for _ in range(n)]

    # -- control -------------------------------------------------------------------------------
    def stop(self) -> None:
        """Finish the frames in flight, then end (safe from signal handlers and other threads)."""
        self._stop.set()

    def abort(self, timeout: float = 5.0, collect: bool = True) -> bool:
        """Stop at once (a second Ctrl-C): frames in flight are dropped, and the stage and source threads are waited
        for, up to ``timeout`` s, so that closing the input and the outputs afterwards does not race them.

        ``collect``: ``run`` was interrupted, so the caller also takes (and drops) what reaches the end of the
        pipeline, or the stages' last hand-overs would block. Returns whether every thread ended.
        """
        self._abort.set()
        self._stop.set()
        last, deadline = self._queues[-1], time.monotonic() + timeout
        while any(t.is_alive() for t in self._threads) and time.monotonic() < deadline:
            if not collect:
                time.sleep(0.02)
                continue
            try:
                last.get(timeout=0.05)
            except queue.Empty:
                pass
        return not any(t.is_alive() for t in self._threads)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _fail(self, err: BaseException) -> None:
        with self._lock:
            self._errors.append(err)
        self._stop.set()

    # -- threads -------------------------------------------------------------------------------
    def _feed(self) -> None:
        out = self._queues[0]
        for ready in self._ready:
            ready.wait()
        try:
            for item in self.frames:
                if self._stop.is_set():
                    break
                item.frame.captured_at = item.frame.captured_at or time.perf_counter()
                self._frames_in += 1
                out.put(item)
        except BaseException as err:  # noqa: BLE001 - reported by run()
            self._fail(err)
        finally:
            out.put(_END)

    def _take_batch(self, inbox, batched: bool) -> tuple[list[FrameResult], bool]:
        """Block for one item; files then fill up to batch_size faces, live takes only what is already queued."""
        first = inbox.get()
        if first is _END:
            return [], True
        batch, faces = [first], max(1, len(first.faces))
        while batched and faces < self.batch_size:
            try:
                item = inbox.get_nowait() if self.live else inbox.get()
            except queue.Empty:
                break
            if item is _END:
                return batch, True
            batch.append(item)
            faces += max(1, len(item.faces))
        return batch, False

    def _run_stage(self, index: int, stage: Stage) -> None:
        inbox, outbox = self._queues[index], self._queues[index + 1]
        batched = getattr(stage, "batched", False)
        ok = True
        try:
            stage.setup()
        except BaseException as err:  # noqa: BLE001
            self._fail(err)
            ok = False
        self._ready[index].set()
        ended = False
        while not ended:
            batch, ended = self._take_batch(inbox, batched)
            if not batch:
                break
            if self._abort.is_set():
                continue  # drained: nothing more is processed or passed on
            if ok:
                t0 = time.perf_counter()
                try:
                    stage.process(batch)
                except BaseException as err:  # noqa: BLE001
                    self._fail(err)
                    ok = False
                ms = (time.perf_counter() - t0) * 1000.0 / len(batch)
                for item in batch:
                    item.timings.setdefault(stage.name, ms)
            if ok:
                for item in batch:
                    outbox.put(item)
        try:
            stage.teardown()
        except BaseException as err:  # noqa: BLE001
            self._fail(err)
        outbox.put(_END)

    def _collect(self) -> None:
        inbox = self._queues[-1]
        last_report = time.perf_counter()
        delivering = True
        while True:
            item = inbox.get()
            if item is _END:
                return
            if not delivering:
                continue  # drained, not delivered: after a failed delivery a later frame would leave a gap
            if self.on_result is not None:
                try:
                    self.on_result(item)
                except KeyboardInterrupt as err:
                    # A signal handler's abort (a second Ctrl-C) landed in the delivery: it is the caller's to
                    # handle (Pipeline.abort), not a failed frame to drain the whole pipeline after.
                    self._fail(err)
                    raise
                except BaseException as err:  # noqa: BLE001
                    self._fail(err)
                    delivering = False
                    continue
            now = time.perf_counter()
            item.timings["latency"] = (now - item.frame.captured_at) * 1000.0  # frame in → delivered to every sink
            self.times.add(item.timings)
            self._frames_out += 1
            if self.stats_every and now - last_report >= self.stats_every:
                log.info("stats after %d frames:\n%s", self._frames_out, self.times.format())
                last_report = now

    def run(self) -> PipelineResult:
        t0 = time.perf_counter()
        self._threads = [threading.Thread(target=self._feed, name="source", daemon=True)]
        self._threads += [
            threading.Thread(target=self._run_stage, args=(i, s), name=s.name, daemon=True)
            for i, s in enumerate(self.stages)
        ]
        for t in self._threads:
            t.start()
        self._collect()
        for t in self._threads:
            t.join()
        dropped = sum(getattr(q, "dropped", 0) for q in self._queues)
        return PipelineResult(
            frames_in=self._frames_in, frames_out=self._frames_out, dropped=dropped,
            seconds=time.perf_counter() - t0, stats=self.times.summary(),
            error=self._errors[0] if self._errors else None,
            interrupted=self._stop.is_set() and not self._errors,
        )
