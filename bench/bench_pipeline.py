#!/usr/bin/env python3
"""Whole-pipeline benchmark on a video: per-stage ms/frame (p50/p95/p99), the slowest stage and frames/s, as JSON.

    .venv/bin/python bench/bench_pipeline.py [--input VIDEO] [--size 854x480] [--loop 4] [--repeat 2] [APP FLAGS…]

Any other flag goes to the app (`python app.py --help`): `--model_name mediapipe`, `--device cuda`, `--backend`,
`--batch_size`, `--max_frames`, `--realtime true`, …

--size WxH / --loop N first transcode the input once into a temp folder (H.264 yuv420p, same frame rate; the
picture scaled to fit and padded with black, so the face keeps its proportions; the clip repeated N times;
audio dropped), and that copy is benchmarked. With `--realtime true` the file is played at its own frame rate
like a camera (live mode: frames may be dropped) and `latency_ms` is frame in → composited frame delivered to
every sink; a live run without --show/--webrtc/--record records to a temp .mp4 so that it has a sink (encode
included). An EMICA model without --assets_dir (and not installed under ./assets) runs on random weights
(tests/synthetic_checkpoints.py, written to a temp folder): speed does not depend on the values. On the CPU
its ONNX exports are made there too, so that --backend auto can pick ONNX Runtime, as it would for a user who
ran build_engines.py --onnx-only.

Writes bench/results/pipeline_<device>_<model>[_<H>p][_live].json. Timings are machine-specific; compare
ratios measured in the same run, never across machines.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import device_name, parse_size  # noqa: E402
from realtime.atomic import save_json  # noqa: E402
from realtime.cli import OneLineParser, build_parser, config_from_args  # noqa: E402
from realtime.config import DEFAULT_MODEL, ModelConfig  # noqa: E402
from realtime.engines import slug  # noqa: E402
from realtime.runner import run  # noqa: E402

#: Entries of the stage statistics that are not a pipeline stage of their own.
NOT_STAGES = ("latency",)


def transcode(src: str, dst: Path, size: tuple[int, int] | None, loop: int, max_frames: int | None) -> dict:
    """Write ``src`` scaled to ``size`` (fit, black padding), repeated ``loop`` times, as H.264 yuv420p ``dst``.

    Stops after ``max_frames`` frames (the run reads no more). Returns the copy's size, frame count and rate.
    """
    import av
    import numpy as np

    with av.open(src) as probe:
        stream = probe.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or Fraction(30)
        src_w, src_h = stream.width, stream.height
    w, h = size or (src_w + src_w % 2, src_h + src_h % 2)
    scale = min(w / src_w, h / src_h)
    inner_w, inner_h = max(2, round(src_w * scale)), max(2, round(src_h * scale))
    x0, y0 = (w - inner_w) // 2, (h - inner_h) // 2
    canvas = np.zeros((h, w, 3), np.uint8)
    frames = 0
    t0 = time.perf_counter()
    with av.open(str(dst), "w") as out:
        video = out.add_stream("libx264", rate=Fraction(rate))
        video.width, video.height, video.pix_fmt = w, h, "yuv420p"
        video.options = {"preset": "veryfast", "crf": "18"}
        time_base = 1 / Fraction(rate)
        done = False
        for _ in range(loop):
            with av.open(src) as inp:
                for frame in inp.decode(video=0):
                    if max_frames is not None and frames >= max_frames:
                        done = True
                        break
                    canvas[y0:y0 + inner_h, x0:x0 + inner_w] = frame.to_ndarray(
                        width=inner_w, height=inner_h, format="rgb24")
                    picture = av.VideoFrame.from_ndarray(canvas, format="rgb24")
                    picture.pts, picture.time_base = frames, time_base
                    out.mux(video.encode(picture))
                    frames += 1
            if done:
                break
        out.mux(video.encode(None))
    return {"size": [w, h], "frames": frames, "frame_rate": float(rate), "loop": loop,
            "transcode_seconds": round(time.perf_counter() - t0, 3)}


def video_size(path: str) -> list[int]:
    import av

    with av.open(path) as c:
        s = c.streams.video[0]
        return [s.width, s.height]


class _BackendLog(logging.Handler):
    """Catches realtime.engines' one-line 'inference backend: NAME (REASON)'."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.backend: str | None = None
        self.reason: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("inference backend") and len(record.args or ()) == 2:
            self.backend, self.reason = record.args


def slowest_stage(stages: dict[str, dict[str, float]], exclude: tuple[str, ...] = ()) -> str | None:
    """The pipeline stage with the largest mean ms per frame (not the end-to-end latency, not a total)."""
    candidates = {k: s["mean"] for k, s in stages.items()
                  if k not in NOT_STAGES and k not in exclude and "total" not in k}
    return max(candidates, key=candidates.get) if candidates else None


def bench_once(input_path: str, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--input", input_path, "--output_folder", tmp, "--progress", "false", "--log_level", "warning", *extra]
        args = build_parser().parse_args(argv)
        if args.realtime and not (args.record or args.show or args.webrtc):
            args = build_parser().parse_args([*argv, "--record", str(Path(tmp) / "live.mp4")])
        cfg = config_from_args(args)
        catcher = _BackendLog()
        engines_log = logging.getLogger("realtime.engines")
        level = engines_log.level
        engines_log.addHandler(catcher)
        engines_log.setLevel(logging.INFO)
        try:
            t0 = time.perf_counter()
            summary = run(cfg)
            wall = time.perf_counter() - t0
        finally:
            engines_log.removeHandler(catcher)
            engines_log.setLevel(level)
    r = summary.result
    return {
        "model": summary.model,
        "backend": catcher.backend,
        "backend_reason": catcher.reason,
        "frames": r.frames_out,
        "frames_in": r.frames_in,
        "dropped": r.dropped,
        "pipeline_seconds": r.seconds,
        "wall_seconds_incl_setup": wall,
        "fps": r.fps,
        "stages_ms": {k: {q: round(v, 3) for q, v in s.items() if q != "n"} for k, s in r.stats.items()},
    }


def synthetic_assets_needed(extra: list[str]) -> str | None:
    """The EMICA model to write random weights for, when the run names one and has no assets for it."""
    args, _ = build_parser().parse_known_args(extra)
    name = args.model_name or DEFAULT_MODEL
    if not name.startswith("EMICA") or any(a.split("=")[0] == "--assets_dir" for a in extra) or args.path_to_models:
        return None
    if args.model_name is None:
        return None  # the default falls back to the embedded mesh without assets, as the app does
    installed = Path(ModelConfig().assets_dir) / "FaceReconstruction" / "models" / name / "cfg.yaml"  # no --assets_dir
    return None if installed.is_file() else name


def main() -> int:
    p = OneLineParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--input", default=str(REPO / "realtime" / "data" / "carphone_pristine.mp4"))
    p.add_argument("--size", type=parse_size, default=None, help="WxH: transcode the input to this size first")
    p.add_argument("--loop", type=int, default=1, help="concatenate the clip this many times first")
    p.add_argument("--repeat", type=int, default=2, help="runs; the first warms caches, the best is reported")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/pipeline_<device>_<model>.json)")
    args, extra = p.parse_known_args()
    if not Path(args.input).is_file():
        p.error(f"--input {args.input}: no such file")
    app = build_parser().parse_args(["--input", args.input, *extra])  # bad app flags fail here, before any work
    live = bool(app.realtime)

    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        input_path, transcoded = args.input, None
        if args.size is not None or args.loop > 1:
            input_path = str(Path(tmp) / "input.mp4")
            transcoded = transcode(args.input, Path(input_path), args.size, max(1, args.loop), app.max_frames)
            print(f"transcoded {args.input} → {transcoded['size'][0]}x{transcoded['size'][1]}, "
                  f"{transcoded['frames']} frames in {transcoded['transcode_seconds']:.1f} s", file=sys.stderr)
        run_extra, weights = list(extra), None
        synthetic = synthetic_assets_needed(extra)
        if synthetic is not None:
            from tests.synthetic_checkpoints import write_emica_model

            assets = Path(tmp) / "assets"
            write_emica_model(assets, synthetic)
            run_extra += ["--assets_dir", str(assets)]
            weights = "random (synthetic checkpoint)"
            if app.device == "cpu" and app.backend in ("auto", "onnxruntime") and "--engines_dir" not in extra:
                # The app's fastest CPU backend needs ONNX exports of these very weights: made here, once.
                import build_engines

                engines = Path(tmp) / "engines"
                with contextlib.redirect_stdout(sys.stderr):
                    build_engines.main(["--model", synthetic, "--assets_dir", str(assets), "--engines_dir",
                                        str(engines), "--onnx-only"])
                run_extra += ["--engines_dir", str(engines)]
        elif (app.model_name or DEFAULT_MODEL) != "mediapipe" and (app.model_name or app.assets_dir):
            weights = "from --assets_dir"  # a named model, or the default one with its assets given
        runs = [bench_once(input_path, run_extra) for _ in range(max(1, args.repeat))]

    # Files: the run with the highest throughput. Live: throughput is the source's frame rate, so the
    # run with the lowest median latency (the first one also warms caches).
    best = min(runs, key=lambda r: r["stages_ms"].get("latency", {}).get("p50", 0.0)) if live else \
        max(runs, key=lambda r: r["fps"])
    stages = best["stages_ms"]
    # Live: "decode" includes the wait for the frame's time (the file is paced like a camera), not work.
    slowest = slowest_stage(stages, exclude=("decode",) if live else ())
    report = {
        "bench": "pipeline",
        "input": os.path.relpath(args.input, REPO),
        "input_size": transcoded["size"] if transcoded else video_size(args.input),
        "transcoded": transcoded,
        "device": device_name(),
        "cpu_count": os.cpu_count(),
        "args": extra,
        "model": best["model"],
        "weights": weights,
        "backend": best["backend"],
        "backend_reason": best["backend_reason"],
        "precision": app.precision,
        "batch_size": app.batch_size,
        "realtime": live,
        "frames": best["frames"],
        "fps": best["fps"],
        "stages_ms": {k: v for k, v in stages.items() if k not in NOT_STAGES},
        "slowest_stage": slowest,
        "best": best,
        "runs_fps": [round(r["fps"], 2) for r in runs],
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if live:
        report["latency_ms"] = {q: stages["latency"][q] for q in ("p50", "p95", "p99")} if "latency" in stages else None
        report["dropped"] = best["dropped"]
        report["note"] = "live: decode includes waiting for each frame's time, so it is not a candidate for slowest_stage"
    name = f"pipeline_{slug(report['device'])}_{best['model']}"
    if args.size is not None:
        name += f"_{args.size[1]}p"
    if live:
        name += "_live"
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"{name}.json"
    save_json(out, report)
    print(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
