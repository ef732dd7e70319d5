#!/usr/bin/env python3
"""Pre-processing before the networks: the face crops and the tracker.

    .venv/bin/python bench/bench_preprocess.py [--batches 1,4,16] [--sizes 640x480,1920x1080] [--repeat 2]
                                               [--workers 1,2,16]

Crops: the 224 encoder crop plus MICA's 112 ArcFace crop for a batch of faces (one face per frame, real
MediaPipe boxes on carphone upscaled to each size), ready as tensors on the inference device:
- "cv2 per face": ``realtime.crop.warp_crop`` + ``warp_arcface`` per face, stacked, copied to the device
  (what ``realtime.model_runtime`` does today);
- "torch batched": frames uploaded once (``FrameUploader``), then ``crop_batch`` + ``arcface_batch``
  (``realtime.gpu_crop``), on the CPU and, when CUDA is present, on the GPU (synchronised before the clock stops).

Tracker: carphone upscaled to 640×480 (played forwards and backwards ``--repeat`` times), tracked by one
in-process ``FaceTracker`` (the baseline) and by ``ParallelTracker`` with 1, 2 and cpu_count processes.
"total fps" counts from the constructor (process start-up included), "steady fps" from the first frame
delivered; "landmark diff" is the mean distance (px) of the 478 landmarks to the baseline's.

On the CPU "torch batched" also runs with one intra-op thread: on a busy 2-core box OpenMP's spinning
barriers made two threads 10-50× slower than one (and both slower than OpenCV, which stays the CPU path).

Writes bench/results/preprocess_<device slug>.json. Timings are machine-specific; compare within one file.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import device_name, median_ms, positive_ints, size_list  # noqa: E402
from realtime.atomic import save_json  # noqa: E402
from realtime.cli import OneLineParser  # noqa: E402
from realtime.crop import arcface_matrix, arcface_points, warp_arcface, warp_crop  # noqa: E402
from realtime.engines import slug  # noqa: E402
from realtime.gpu_crop import FrameUploader, arcface_batch, crop_batch, unique_frames  # noqa: E402
from realtime.parallel_tracking import ParallelTracker  # noqa: E402
from realtime.sources import open_source  # noqa: E402
from realtime.tracking import FaceTracker  # noqa: E402
from realtime.types import Frame  # noqa: E402
from tests.test_parallel_tracking import write_upscaled_clip  # noqa: E402

CARPHONE = REPO / "realtime" / "data" / "carphone_pristine.mp4"


# -- crops ----------------------------------------------------------------------------------------

def timed_with_threads(fn, repeat: int, device: torch.device, threads: int | None) -> float:
    """``median_ms`` with torch's intra-op threads set to ``threads`` for the run (None: leave them)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return median_ms(fn, device, warmup=3, repeat=repeat)
    finally:
        torch.set_num_threads(before)


def tracked_frames(width: int, height: int, count: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(image, 224 crop matrix, ArcFace matrix) for the first ``count`` carphone frames upscaled to width×height."""
    out = []
    with FaceTracker(mode="image") as tracker:
        for frame in open_source(str(CARPHONE)):
            if len(out) == count:
                break
            image = cv2.resize(frame.image, (width, height), interpolation=cv2.INTER_CUBIC)
            faces = tracker.track(Frame(index=frame.index, pts=frame.pts, image=image))
            if faces:
                out.append((image, faces[0].crop_matrix, arcface_matrix(arcface_points(faces[0].landmarks))))
    return out


def bench_crops(sizes: list[tuple[int, int]], batches: list[int], devices: list[torch.device]) -> list[dict]:
    rows = []
    for width, height in sizes:
        faces = tracked_frames(width, height, max(batches))
        for batch in batches:
            picked = faces[:batch]
            images = [image for image, _, _ in picked]
            crop_m = np.stack([m for _, m, _ in picked])
            arc_m = np.stack([m for _, _, m in picked])
            for device in devices:
                def per_face() -> None:
                    crops = np.stack([warp_crop(image, m) for image, m, _ in picked])
                    arcs = np.stack([warp_arcface(image, m) for image, _, m in picked])
                    torch.from_numpy(crops).to(device)
                    torch.from_numpy(arcs).to(device)

                uploader = FrameUploader(device)

                def batched() -> None:
                    frames, index = unique_frames(images)
                    on_device = [uploader.upload(image) for image in frames]
                    crop_batch(on_device, index, crop_m)
                    arcface_batch(on_device, index, arc_m)

                repeat = 20 if device.type == "cpu" else 100
                methods = [("cv2 per face", per_face, None), ("torch batched", batched, None)]
                if device.type == "cpu":
                    methods.append(("torch batched, 1 thread", batched, 1))
                for method, fn, threads in methods:
                    ms = timed_with_threads(fn, repeat, device, threads)
                    rows.append({"frame": f"{width}x{height}", "batch": batch, "device": device.type, "method": method,
                                 "ms_per_batch": round(ms, 3), "ms_per_face": round(ms / batch, 3)})
                    print(f"crop {width}x{height} batch {batch:2d} {device.type:4s} {method:23s}: "
                          f"{ms:8.2f} ms/batch {ms / batch:7.3f} ms/face")
    return rows


# -- tracker --------------------------------------------------------------------------------------

def bench_tracker(clip: Path, workers: list[int]) -> list[dict]:
    t0 = time.perf_counter()
    first = None
    reference = []
    with FaceTracker(mode="video") as tracker:
        for frame in open_source(str(clip)):
            reference.append(tracker.track(frame))
            first = first or time.perf_counter()
    rows = [_tracker_row("FaceTracker in process", 0, len(reference), t0, first, time.perf_counter(), [], [])]
    for n in workers:
        t0 = time.perf_counter()
        first = None
        diffs, chunks = [], []
        with ParallelTracker(clip, workers=n) as parallel:
            for tracked in parallel:
                first = first or time.perf_counter()
                ref = reference[tracked.index]
                if tracked.faces and ref:
                    diffs.append(float(np.linalg.norm(tracked.faces[0].landmarks[:, :2] - ref[0].landmarks[:, :2],
                                                      axis=1).mean()))
                chunks.append(tracked.chunk)
            chunk = parallel.chunk
        rows.append(_tracker_row(f"ParallelTracker workers={n} chunk={chunk}", n, len(chunks), t0, first,
                                 time.perf_counter(), diffs, chunks))
    return rows


def _tracker_row(label, workers, frames, t0, first, end, diffs, chunks) -> dict:
    row = {"tracker": label, "workers": workers, "frames": frames,
           "total_fps": round(frames / (end - t0), 1), "steady_fps": round((frames - 1) / (end - first), 1),
           "startup_s": round(first - t0, 2)}
    if workers:
        row["chunks"] = len(set(chunks))
        row["landmark_diff_mean_px"] = round(float(np.mean(diffs)), 4)
        row["landmark_diff_max_px"] = round(float(np.max(diffs)), 3)
    diff = (f", landmarks vs in-process: mean {row['landmark_diff_mean_px']:.3f} px, "
            f"max {row['landmark_diff_max_px']:.2f} px") if workers else ""
    print(f"{label:38s}: {frames} frames, total {row['total_fps']:6.1f} fps, steady {row['steady_fps']:6.1f} fps, "
          f"start-up {row['startup_s']:.2f} s{diff}")
    return row


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=positive_ints, default=[1, 4, 16])
    parser.add_argument("--sizes", type=size_list, default=[(640, 480), (1920, 1080)], help="frame sizes for the crop timings")
    parser.add_argument("--repeat", type=int, default=2, help="tracker clip: carphone forwards/backwards this often")
    parser.add_argument("--workers", type=positive_ints, default=None, help="tracker processes to try (default 1,2,cpu_count)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    batches, frame_sizes = args.batches, args.sizes
    workers = sorted(set(args.workers)) if args.workers else sorted({1, 2, os.cpu_count() or 1})
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    name = device_name(devices[-1])
    load = os.getloadavg()

    crops = bench_crops(frame_sizes, batches, devices)
    with tempfile.TemporaryDirectory() as tmp:
        clip = write_upscaled_clip(CARPHONE, Path(tmp) / "carphone_640x480.mp4", 640, 480, repeat=args.repeat)
        tracker = bench_tracker(clip, workers)

    report = {
        "bench": "preprocess",
        "device": name,
        "cpu": device_name(torch.device("cpu")),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "opencv": cv2.__version__,
        "load_average_at_start": [round(v, 2) for v in load],  # other work on the box skews CPU timings
        "crops": crops,
        "tracker_clip": f"carphone upscaled to 640x480, {args.repeat * 120} frames, H.264 GOP 30",
        "tracker": tracker,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"preprocess_{slug(name)}.json"
    save_json(out, report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
