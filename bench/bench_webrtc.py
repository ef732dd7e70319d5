#!/usr/bin/env python3
"""WebRTC broadcast benchmark: real headless Chromium viewers of a WebRTCSink on loopback.

    .venv/bin/python bench/bench_webrtc.py [--width 640 --height 480 --fps 30 --seconds 10 --viewers 3]

Measures, for 0, 1 and N viewers: frames/s displayed in the browser (requestVideoFrameCallback),
capture-to-display latency (each frame carries its index as the sink's stats stamp; the page decodes
it from the displayed picture and notes Date.now(), compared with the wall-clock time the frame was
written), and this process's CPU time (the sink: encode, packetise, send; plus the frame synthesis,
which is the same in every phase). Needs /usr/bin/chromium. Writes bench/results/webrtc.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import aioice.ice  # noqa: E402
from skimage import data  # noqa: E402

from realtime.atomic import save_json  # noqa: E402
from realtime.cli import OneLineParser  # noqa: E402
from realtime.sinks.webrtc import STAMP_CELL, STAMP_HEIGHT, STAMP_WIDTH, WebRTCSink  # noqa: E402
from realtime.types import AudioChunk, Frame, FrameResult  # noqa: E402
from tests.browser_cdp import CHROMIUM, Browser  # noqa: E402

# In-page probe: on every displayed frame, read the stamp from the picture (same rules as
# realtime.sinks.webrtc.decode_stamp) and record [frame index, Date.now()].
PROBE_JS = """
(() => {
  const CELL = %(cell)d, W = %(width)d, H = %(height)d, COLS = W / CELL;
  const video = document.querySelector("video");
  const canvas = document.createElement("canvas");
  canvas.width = W; canvas.height = H;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  const decode = () => {
    context.drawImage(video, 0, 0, W, H, 0, 0, W, H);
    const px = context.getImageData(0, 0, W, H).data;
    const level = (row, col) => {
      let sum = 0;
      for (let y = CELL / 4; y < 3 * CELL / 4; y++)
        for (let x = CELL / 4; x < 3 * CELL / 4; x++) {
          const i = ((row * CELL + y) * W + col * CELL + x) * 4;
          sum += (px[i] + px[i + 1] + px[i + 2]) / 3;
        }
      return sum / (CELL * CELL / 4);
    };
    const white = (level(0, 0) + level(1, 1)) / 2, black = (level(0, 1) + level(1, 0)) / 2;
    if (white - black < 96) return null;
    const mid = (white + black) / 2;
    let value = 0;
    for (let c = 2; c < COLS; c++) {
      const top = level(0, c) > mid;
      if (top === level(1, c) > mid) return null;
      value = value * 2 + (top ? 1 : 0);
    }
    return value;
  };
  window.bench = { callbacks: 0, samples: [] };
  const step = () => {
    const now = Date.now();
    window.bench.callbacks += 1;
    const value = decode();
    if (value !== null) window.bench.samples.push([value, now]);
    video.requestVideoFrameCallback(step);
  };
  video.requestVideoFrameCallback(step);
  return true;
})()
""" % {"cell": STAMP_CELL, "width": STAMP_WIDTH, "height": STAMP_HEIGHT}


class Feeder:
    """Writes moving 'camera' frames (a panning photo) with a 440 Hz tone at a fixed rate."""

    def __init__(self, sink: WebRTCSink, width: int, height: int, fps: float):
        self.sink, self.fps = sink, fps
        photo = data.astronaut()
        reps = (-(-height // photo.shape[0]), -(-2 * width // photo.shape[1]), 1)
        self.canvas = np.tile(photo, reps)[:height, : 2 * width]  # twice as wide: room to pan
        self.width = width
        self.written_at: dict[int, float] = {}  # frame index → time.time() when written
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _frame(self, index: int) -> FrameResult:
        x = (index * 4) % self.width
        image = np.ascontiguousarray(self.canvas[:, x : x + self.width])
        n = 48000 // int(self.fps)
        t = (index * n + np.arange(n)) / 48000
        tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[:, None]
        audio = [AudioChunk(pts=index * n / 48000, sample_rate=48000, samples=tone)]
        return FrameResult(frame=Frame(index=index, pts=index / self.fps, image=image, audio=audio))

    def _run(self) -> None:
        start, index = time.monotonic(), 0
        while not self._stop.is_set():
            result = self._frame(index)
            self.written_at[index & 0xFFFF] = time.time()
            self.sink.write(result)
            index += 1
            self._stop.wait(max(0.0, start + index / self.fps - time.monotonic()))

    def __enter__(self) -> "Feeder":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    a = np.asarray(values)
    return {"p50": round(float(np.median(a)), 1), "p90": round(float(np.percentile(a, 90)), 1),
            "min": round(float(a.min()), 1), "max": round(float(a.max()), 1), "n": int(a.size)}


async def measure(pages: list, feeder: Feeder, seconds: float) -> dict:
    """Run one window: CPU time of this process, and per page displayed fps and latency."""
    for page in pages:
        await page.evaluate("window.bench.callbacks = 0; window.bench.samples = []; true")
    cpu0, wall0 = time.process_time(), time.monotonic()
    await asyncio.sleep(seconds)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    viewers = []
    for page in pages:
        probe = await page.evaluate("window.bench")
        latency = [
            t / 1000.0 - feeder.written_at[code]
            for code, t in probe["samples"]
            if code in feeder.written_at
        ]
        viewers.append({
            "displayed_fps": round(probe["callbacks"] / wall, 2),
            "stamped_frames": len(probe["samples"]),
            "latency_ms": percentiles([1000.0 * v for v in latency]),
        })
    return {"viewers": len(pages), "wall_s": round(wall, 2), "cpu_s": round(cpu, 3),
            "cpu_cores": round(cpu / wall, 3), "cpu_ms_per_frame": round(1000.0 * cpu / (wall * feeder.fps), 2),
            "per_viewer": viewers}


async def open_viewer(browser: Browser, url: str):
    page = await browser.new_page()
    await page.navigate(url)
    await page.wait_for("window.emicaViewer !== undefined")
    await page.wait_for('document.querySelector("video").readyState >= 2', timeout=30)
    await page.evaluate(PROBE_JS)
    return page


async def bench(args: argparse.Namespace) -> dict:
    # Keep everything on loopback: aioice skips 127.0.0.1 unless told otherwise.
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]
    phases = []
    with WebRTCSink(port=0, fps=args.fps, stats=True, max_viewers=max(args.viewers, 1)) as sink:
        with Feeder(sink, args.width, args.height, args.fps) as feeder:
            async with Browser() as browser:
                version = (await browser.send("Browser.getVersion"))["product"]
                await asyncio.sleep(1.0)
                phases.append(await measure([], feeder, args.seconds))
                pages = [await open_viewer(browser, sink.url)]
                await asyncio.sleep(args.warmup)
                phases.append(await measure(pages, feeder, args.seconds))
                for _ in range(args.viewers - 1):
                    pages.append(await open_viewer(browser, sink.url))
                await asyncio.sleep(args.warmup)
                phases.append(await measure(pages, feeder, args.seconds))
                errors = [e for page in pages for e in page.errors]
    by_n = {p["viewers"]: p for p in phases}
    n = args.viewers
    per_extra = (by_n[n]["cpu_cores"] - by_n[1]["cpu_cores"]) / max(1, n - 1)
    return {
        "benchmark": "webrtc",
        "machine": f"{platform.processor() or platform.machine()} x{os.cpu_count()} (CPU), {platform.system()}",
        "browser": version,
        "resolution": f"{args.width}x{args.height}",
        "target_fps": args.fps,
        "codec": "VP8 (shared encode, one per frame for all viewers)",
        "phases": phases,
        "summary": {
            "browser_fps_1_viewer": by_n[1]["per_viewer"][0]["displayed_fps"],
            "latency_ms_p50_1_viewer": by_n[1]["per_viewer"][0]["latency_ms"].get("p50"),
            "latency_ms_p90_1_viewer": by_n[1]["per_viewer"][0]["latency_ms"].get("p90"),
            "cpu_cores_0_viewers": by_n[0]["cpu_cores"],
            "cpu_cores_1_viewer": by_n[1]["cpu_cores"],
            f"cpu_cores_{n}_viewers": by_n[n]["cpu_cores"],
            "cpu_cores_per_extra_viewer": round(per_extra, 4),
            "cpu_ms_per_frame_per_extra_viewer": round(1000.0 * per_extra / args.fps, 2),
        },
        "page_errors": errors,
        "notes": "CPU is this process (sink + frame synthesis; synthesis alone is the 0-viewer phase). "
        "Latency = Date.now() in the page's requestVideoFrameCallback minus time.time() at write().",
    }


def main() -> None:
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--seconds", type=float, default=10.0, help="length of each measuring window")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds after viewers join before measuring")
    p.add_argument("--viewers", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "webrtc.json"))
    args = p.parse_args()
    if not CHROMIUM.exists():
        sys.exit(f"{CHROMIUM} is missing: apt-get install chromium")
    report = asyncio.run(bench(args))
    save_json(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
