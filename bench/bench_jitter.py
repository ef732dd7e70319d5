#!/usr/bin/env python3
"""Temporal stability: frame-to-frame jitter of the reconstructed landmarks, raw vs causal smoothing
(`--smoothing on`) vs look-ahead smoothing (`--smoothing lookahead`), and the lag each adds on a step
motion. Writes bench/results/jitter_<model>.json.

    .venv/bin/python bench/bench_jitter.py [--model_name mediapipe] [--assets_dir assets]

Clips: carphone (real footage), a static clip (the astronaut photo repeated 90 times with sensor
noise, sigma 4 grey levels), and a step clip (the same photo jumping 24 px right at frame 45).
Jitter = mean over frames and landmarks of |p_t - p_(t-1)| in pixels (`realtime.smoothing.jitter`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from realtime.cli import main as app_main  # noqa: E402
from realtime.export import load_results  # noqa: E402
from realtime.smoothing import jitter, step_lag  # noqa: E402

FPS = Fraction(30, 1)


def write_clip(path: Path, frames: list[np.ndarray]) -> None:
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=FPS, options={"crf": "0", "preset": "ultrafast"})
        s.height, s.width = frames[0].shape[:2]
        s.pix_fmt = "yuv444p"
        for img in frames:
            out.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(s.encode())


def photo_clips(tmp: Path) -> dict[str, Path]:
    from skimage.data import astronaut

    rng = np.random.default_rng(0)
    photo = astronaut()[:384, 64:448]  # 384x384 around the face
    static = [np.clip(photo + rng.normal(0, 4, photo.shape), 0, 255).astype(np.uint8) for _ in range(90)]
    shifted = np.roll(photo, 24, axis=1)
    step = [np.clip((photo if i < 45 else shifted) + rng.normal(0, 4, photo.shape), 0, 255).astype(np.uint8) for i in range(90)]
    clips = {"static": tmp / "static.mp4", "step": tmp / "step.mp4"}
    write_clip(clips["static"], static)
    write_clip(clips["step"], step)
    return clips


def landmarks(video: Path, out: Path, smoothing: str, extra: list[str]) -> np.ndarray:
    rc = app_main(["--input", str(video), "--output_folder", str(out), "--export", "npz", "--smoothing", smoothing,
                   "--save_images", "false", "--save_video", "false", "--progress", "false", "--log_level", "warning", *extra])
    assert rc == 0
    (path,) = out.glob("processed_*/*/results/*/results.npz")
    data = load_results(path)
    key = "landmarks_model" if "landmarks_model" in data else "landmarks_mediapipe"
    return np.asarray(data[key], np.float64)  # (T, N, 2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args, extra = p.parse_known_args()
    report = {"bench": "jitter", "args": extra, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "clips": {}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        clips = {"carphone": REPO / "realtime" / "data" / "carphone_pristine.mp4", **photo_clips(tmp)}
        for name, clip in clips.items():
            raw = landmarks(clip, tmp / f"{name}-raw", "off", extra)
            row = {"frames": int(raw.shape[0]), "jitter_raw_px": float(jitter(raw))}
            for mode, label in (("on", "causal"), ("lookahead", "lookahead")):
                smooth = landmarks(clip, tmp / f"{name}-{mode}", mode, extra)
                row[f"jitter_{label}_px"] = float(jitter(smooth))
                row[f"reduction_{label}"] = row["jitter_raw_px"] / max(row[f"jitter_{label}_px"], 1e-9)
                if name == "step":
                    row[f"step_lag_{label}_frames"] = float(step_lag(raw.mean(axis=1)[:, 0], smooth.mean(axis=1)[:, 0]))
            report["clips"][name] = row
            print(name, json.dumps(row))
    model = next((extra[i + 1] for i, a in enumerate(extra[:-1]) if a == "--model_name"), "default")
    out = REPO / "bench" / "results" / f"jitter_{model}.json"
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp_out, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
