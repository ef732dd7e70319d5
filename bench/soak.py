#!/usr/bin/env python3
"""Soak: a synthetic 29.97 fps live camera through the whole pipeline for a bounded time, sampling the
process's resident memory (RSS) every second.

    .venv/bin/python bench/soak.py [--seconds 180] [--drop_every 30] [--model_name mediapipe]

The camera plays the carphone clip in a loop on the live clock and drops out every ``--drop_every``
seconds, so the run also goes through ``ResilientSource``'s "no signal" frames and reconnects. The
frames go through ``realtime.runner.run`` (tracking, model, rendering, composing) into ``--record``.
Writes bench/results/soak.json: the RSS series, its growth after the first half minute, frame counts,
reconnects and latency. tests/test_soak.py runs the same thing for a minute.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from unittest import mock

import av
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from realtime import sources  # noqa: E402
from realtime.atomic import save_json  # noqa: E402
from realtime.cli import OneLineParser, build_parser, config_from_args  # noqa: E402
from realtime.live import ResilientSource  # noqa: E402
from realtime.runner import run  # noqa: E402
from realtime.sources import Source  # noqa: E402
from realtime.types import Frame  # noqa: E402

CLIP = REPO / "realtime" / "data" / "carphone_pristine.mp4"
WARMUP_S = 30.0  # growth is measured from here to the end: allocators, caches and stats windows fill first


def resident_mb() -> float:
    """This process's resident set size in MiB (/proc/self/statm: pages)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class LoopingCamera(Source):
    """A live camera made of recorded pictures: ``pictures`` over and over at ``fps``, in real time.

    Ends after ``drop_after`` seconds (None: never), like a camera whose cable comes loose.
    """

    def __init__(self, pictures: list[np.ndarray], fps: float, *, drop_after: float | None = None,
                 live: bool = True) -> None:
        super().__init__()
        self.live, self.fps = live, fps
        self.height, self.width = pictures[0].shape[:2]
        self.description = f"looping camera ({len(pictures)} pictures at {fps:.2f} fps)"
        self._pictures = pictures
        self._drop_after = drop_after
        self._start = time.monotonic()
        self._count = 0

    def _next_frame(self) -> Frame | None:
        due = self._start + self._count / self.fps
        if self._drop_after is not None and due - self._start >= self._drop_after:
            return None
        if due > time.monotonic():
            time.sleep(due - time.monotonic())
        picture = self._pictures[self._count % len(self._pictures)]
        frame = Frame(index=self._count, pts=self._count / self.fps, image=picture.copy())
        self._count += 1
        return frame

    def _release(self) -> None:
        pass


class MemorySampler:
    """Samples ``resident_mb()`` once a second on a background thread: ``samples`` is [(seconds, MiB)]."""

    def __init__(self, period: float = 1.0) -> None:
        self.period = period
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        while True:
            self.samples.append((time.monotonic() - start, resident_mb()))
            if self._stop.wait(self.period):
                return

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()


def growth_after(samples: list[tuple[float, float]], warmup: float) -> dict[str, float]:
    """RSS at the end of warm-up (median of the 5 samples around it), at the end (median of the last 5)
    and the difference, in MiB; also the peak after warm-up."""
    times = np.array([t for t, _ in samples])
    mb = np.array([m for _, m in samples])
    at_warmup = float(np.median(mb[np.argsort(np.abs(times - warmup))[:5]]))
    at_end = float(np.median(mb[-5:]))
    return {"rss_at_warmup_mb": at_warmup, "rss_at_end_mb": at_end, "growth_mb": at_end - at_warmup,
            "peak_after_warmup_mb": float(mb[times >= warmup].max())}


def read_pictures(path: Path) -> tuple[list[np.ndarray], float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [f.to_ndarray(format="rgb24") for f in container.decode(stream)], float(stream.average_rate)


@contextmanager
def camera_as_input(source: Source) -> Iterator[None]:
    """Make ``realtime.runner.run`` take ``source`` as its input: the runner opens its input by spec, and
    a synthetic camera has none."""
    with mock.patch.object(sources, "open_source", lambda spec, **kw: source):
        yield


def soak(seconds: float, *, drop_every: float | None = 20.0, model_name: str = "mediapipe",
         record_to: Path) -> dict:
    """Run the synthetic camera for ``seconds`` through the pipeline into ``record_to``; returns the report."""
    pictures, fps = read_pictures(CLIP)
    camera = ResilientSource(lambda: LoopingCamera(pictures, fps, drop_after=drop_every))
    args = build_parser().parse_args(["--input", "synthetic-camera", "--record", str(record_to),
                                      "--model_name", model_name, "--no_audio", "--log_level", "warning",
                                      "--max_frames", str(round(seconds * fps))])
    with camera_as_input(camera), MemorySampler() as sampler:
        summary = run(config_from_args(args))
    with av.open(str(record_to)) as container:
        recorded = sum(1 for p in container.demux(container.streams.video[0]) if p.size)
    r = summary.result
    return {
        "seconds": round(r.seconds, 2),
        "model": summary.model,
        "frames_in": r.frames_in,
        "frames_out": r.frames_out,
        "frames_recorded": recorded,
        "dropped": r.dropped,
        "fps_out": round(r.fps, 2),
        "no_signal_frames": camera.no_signal_frames,
        "outages": camera.outages,
        "reconnects": camera.reconnects,
        "latency_ms": {q: round(r.stats["latency"][q], 1) for q in ("p50", "p95", "p99")},
        "memory": {k: round(v, 2) for k, v in growth_after(sampler.samples, WARMUP_S).items()},
        "rss_mb": [[round(t, 1), round(m, 2)] for t, m in sampler.samples],
    }


def main() -> int:
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=180.0, help="how long the camera runs")
    p.add_argument("--drop_every", type=float, default=30.0, help="the camera drops out this often (0: never)")
    p.add_argument("--model_name", default="mediapipe")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "soak.json")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = soak(a.seconds, drop_every=a.drop_every or None, model_name=a.model_name,
                      record_to=Path(tmp) / "soak.mp4")
    report["machine"] = f"{platform.processor() or platform.machine()} x{os.cpu_count()} (CPU)"
    a.out.parent.mkdir(parents=True, exist_ok=True)
    save_json(a.out, report, indent=1)
    m = report["memory"]
    print(f"{report['frames_out']}/{report['frames_in']} frames in {report['seconds']} s, "
          f"{report['reconnects']} reconnects, RSS {m['rss_at_warmup_mb']:.1f} → {m['rss_at_end_mb']:.1f} MiB "
          f"({m['growth_mb']:+.1f} MiB after {WARMUP_S:g} s) → {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
