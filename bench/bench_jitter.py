#!/usr/bin/env python3
"""Temporal stability: frame-to-frame jitter of the reconstructed landmarks (px) and mesh vertices
(mm), raw vs causal smoothing (`--smoothing on`) vs look-ahead smoothing (`--smoothing lookahead`),
and the lag each adds on a step motion, for both tracker modes: MediaPipe's default VIDEO mode
(which tracks from frame to frame and smooths its landmarks itself) and `--per_frame_tracking`
(IMAGE mode: raw per-frame detection, as inferno's pipeline does). Writes
bench/results/jitter_<model>.json.

    .venv/bin/python bench/bench_jitter.py [--model_name mediapipe] [--assets_dir assets]

Clips: carphone (real footage), a static clip (the astronaut photo repeated 90 times with sensor
noise, sigma 4 grey levels), and a step clip (the same photo jumping 24 px right at frame 45).
Jitter = mean over frames and points of |p_t - p_(t-1)| (`realtime.smoothing.jitter`). Vertices are
the `--save_mesh` OBJs: FLAME models are in metres; MediaPipe's mesh is in face-box units, put in
millimetres by the similarity fit of the clip's mean mesh onto MediaPipe's canonical face (cm).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from realtime.atomic import save_json  # noqa: E402
from realtime.cli import OneLineParser, main as app_main  # noqa: E402
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


def read_obj_vertices(path: Path) -> np.ndarray:
    return np.array([line.split()[1:4] for line in path.read_text().splitlines() if line.startswith("v ")], np.float64)


def run_clip(video: Path, out: Path, smoothing: str, per_frame: bool, extra: list[str]) -> tuple[np.ndarray, np.ndarray, str]:
    """Landmarks (T, N, 2) px, mesh vertices (T, V, 3) in the model's world units, and the model that ran."""
    rc = app_main(["--input", str(video), "--output_folder", str(out), "--export", "npz", "--smoothing", smoothing,
                   "--per_frame_tracking", str(per_frame).lower(), "--save_mesh", "true",
                   "--save_images", "false", "--save_video", "false", "--progress", "false", "--log_level", "warning", *extra])
    assert rc == 0
    (path,) = out.glob("processed_*/*/results/*/results.npz")
    data = load_results(path)
    key = "landmarks_model" if "landmarks_model" in data else "landmarks_mediapipe"
    meshes = sorted(path.parent.glob("*_000/mesh_coarse.obj"))
    assert len(meshes) == len(data[key]), (len(meshes), len(data[key]))
    return np.asarray(data[key], np.float64), np.stack([read_obj_vertices(m) for m in meshes]), str(data["model_name"])


def similarity_scale(source: np.ndarray, target: np.ndarray) -> float:
    """Scale s of the least-squares similarity (s, R, t) taking (V, 3) `source` onto `target` (Umeyama 1991)."""
    a, b = source - source.mean(0), target - target.mean(0)
    singular = np.linalg.svd(b.T @ a / len(a), compute_uv=False)
    sign = np.sign(np.linalg.det(b.T @ a))
    return float((singular[0] + singular[1] + sign * singular[2]) / (a**2).sum(1).mean())


def millimetres_per_unit(vertices: np.ndarray, model: str) -> float:
    """World units → mm: FLAME models are in metres; MediaPipe's mesh is fitted to its canonical face (cm)."""
    if model != "mediapipe":
        return 1000.0
    from realtime.face_mesh import canonical_face_mesh

    canonical_cm = canonical_face_mesh()[0].astype(np.float64)
    return 10.0 * similarity_scale(vertices.mean(0), canonical_cm)


def main() -> int:
    p = OneLineParser(description=__doc__.splitlines()[0])
    args, extra = p.parse_known_args()
    model = None  # the model that ran (the default falls back to the MediaPipe mesh without EMICA assets)
    report = {"bench": "jitter", "args": extra, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "clips": {}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        clips = {"carphone": REPO / "realtime" / "data" / "carphone_pristine.mp4", **photo_clips(tmp)}
        for name, clip in clips.items():
            report["clips"][name] = rows = {}
            per_frame_raw = None
            for tracking, per_frame in (("per_frame", True), ("mediapipe_video", False)):
                raw_px, raw_v, model = run_clip(clip, tmp / f"{name}-{tracking}-off", "off", per_frame, extra)
                mm = millimetres_per_unit(raw_v, model)
                row = {"frames": int(raw_px.shape[0]), "mm_per_unit": mm,
                       "jitter_raw_px": jitter(raw_px), "jitter_raw_mm": mm * jitter(raw_v)}
                for mode, label in (("on", "causal"), ("lookahead", "lookahead")):
                    px, v, _ = run_clip(clip, tmp / f"{name}-{tracking}-{mode}", mode, per_frame, extra)
                    row[f"jitter_{label}_px"] = jitter(px)
                    row[f"jitter_{label}_mm"] = mm * jitter(v)
                    row[f"reduction_{label}_px"] = row["jitter_raw_px"] / max(row[f"jitter_{label}_px"], 1e-12)
                    row[f"reduction_{label}_mm"] = row["jitter_raw_mm"] / max(row[f"jitter_{label}_mm"], 1e-12)
                    if per_frame_raw is not None:  # against raw per-frame detection, the pipeline inferno runs
                        row[f"reduction_{label}_px_vs_per_frame_raw"] = per_frame_raw / max(row[f"jitter_{label}_px"], 1e-12)
                    if name == "step":
                        row[f"step_lag_{label}_frames"] = step_lag(raw_px.mean(axis=1)[:, 0], px.mean(axis=1)[:, 0])
                per_frame_raw = row["jitter_raw_px"] if per_frame else per_frame_raw
                rows[tracking] = row
                print(name, tracking, json.dumps({k: round(v, 4) for k, v in row.items()}))
    report["model"] = model
    out = REPO / "bench" / "results" / f"jitter_{model}.json"
    save_json(out, report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
