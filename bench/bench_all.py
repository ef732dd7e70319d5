#!/usr/bin/env python3
"""The one bench entry point: networks, the whole file pipeline at 480p and live latency at 720p on this machine.

    .venv/bin/python bench/bench_all.py [--device cuda|cpu] [--quick] [--skip networks,pipeline,live]

On whatever hardware it finds, in one run (each part a subprocess with this Python):

- networks: bench/bench_networks.py (EMICA coarse networks, every backend × precision × batch this machine
  runs, against eager fp32 PyTorch measured in the same run);
- pipeline: bench/bench_pipeline.py --size 854x480 (the sample clip transcoded and looped) for the MediaPipe
  mesh and for EMICA (EMICA-CVT_flame2020_notexture, coarse, --backend auto): decode, track, model (crop +
  inference), render, compose, sinks (encode) in ms per frame, frames/s and the slowest stage;
- live: the same at 1280x720 with --realtime true (the file paced like a camera; on a GPU with MediaPipe's GPU
  delegate, --tracker_device gpu): latency frame in → composited frame out, p50/p95/p99.

EMICA runs on random weights unless --assets_dir is given (speed does not depend on the values). On the CPU the
EMICA runs are capped (--max_frames): a few frames/s. Writes bench/results/all_<device slug>.json and prints
one markdown table plus what could not be measured here.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import device_arg, device_name  # noqa: E402
from realtime.atomic import save_json  # noqa: E402
from realtime.cli import OneLineParser  # noqa: E402
from realtime.engines import slug  # noqa: E402

EMICA = "EMICA-CVT_flame2020_notexture"
MODELS = ("mediapipe", EMICA)
PARTS = ("networks", "pipeline", "live")
FILE_SIZE, LIVE_SIZE = "854x480", "1280x720"
TARGETS = {"file_fps_480p": 500.0, "live_p50_ms_720p": 10.0, "live_p99_ms_720p": 20.0}
NETWORK_ROWS = ("coarse total", "coarse, identity cached", "coarse total, streams", "coarse, identity cached, streams")


class Plan:
    """Frames, loops, batches and repeats for this device and --quick."""

    def __init__(self, args: argparse.Namespace, on_gpu: bool):
        q = args.quick
        self.networks = (["--batch", "1,16", "--warmup", "5", "--repeat", "20"] if q else []) if on_gpu else \
            (["--batch", "1", "--warmup", "1", "--repeat", "2"] if q else [])
        self.file_loop = args.loop or ((4 if q else 20) if on_gpu else (1 if q else 3))
        self.live_loop = args.live_loop or (1 if q else 5)
        # EMICA on the CPU is a few frames/s: cap it. The mesh and GPU runs take the whole (looped) clip.
        self.emica_frames = args.max_frames or (None if on_gpu else (8 if q else 32))
        self.emica_live_frames = args.max_frames or (None if on_gpu else (30 if q else 90))
        self.repeat = 2 if on_gpu or not q else 1
        self.file_batch = 16 if on_gpu else None  # files fill batches; on a GPU a larger one (the app's default is 4)


def run_step(label: str, cmd: list[str], timeout: float) -> tuple[bool, float, str]:
    """Run one bench; returns (ok, seconds, stderr tail)."""
    print(f"[bench_all] {label}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        ok, tail = proc.returncode == 0, (proc.stderr or proc.stdout)[-2000:]
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        ok, tail = False, f"timed out after {timeout:.0f} s; " + stderr[-1500:]
    seconds = time.perf_counter() - t0
    print(f"[bench_all] {label}: {'done' if ok else 'FAILED'} in {seconds:.1f} s", file=sys.stderr, flush=True)
    if not ok:
        print(tail, file=sys.stderr)
    return ok, seconds, tail


def pipeline_cmd(model: str, size: str, loop: int, live: bool, plan: Plan, args, out: Path) -> list[str]:
    cmd = [sys.executable, str(REPO / "bench" / "bench_pipeline.py"), "--size", size, "--loop", str(loop),
           "--repeat", str(plan.repeat), "--out", str(out), "--model_name", model]
    if model != "mediapipe":
        cmd += ["--mode", "coarse", "--backend", "auto", "--device", args.device]
        frames = plan.emica_live_frames if live else plan.emica_frames
        if frames:
            cmd += ["--max_frames", str(frames)]
        if args.assets_dir:
            cmd += ["--assets_dir", args.assets_dir]
        if args.engines_dir:
            cmd += ["--engines_dir", args.engines_dir]
        batch = args.batch_size or (None if live else plan.file_batch)
        if batch:
            cmd += ["--batch_size", str(batch)]
        if args.compile:
            cmd += ["--compile", "true"]
    if live:
        cmd += ["--realtime", "true"]
        if args.device.startswith("cuda"):
            cmd += ["--tracker_device", "gpu"]  # per frame 6.4 ms vs 15.5 on a CPU core (H200 box, issue #4)
    return cmd


def table_rows(device: str, report: dict) -> list[dict]:
    rows = []
    nets = report.get("networks")
    if nets:
        for r in nets["rows"]:
            if r["network"] in NETWORK_ROWS:
                rows.append({"device": device, "what": f"networks: {r['network']}", "backend": r["variant"],
                             "precision": r["precision"], "batch": r["batch"], "ms": f"{r['ms']:.2f} / batch",
                             "rate": f"{r['faces_per_s']:.1f} faces/s", "ratio": f"{r['speedup']:.2f}×"})
    for part, size in (("pipeline", FILE_SIZE), ("live", LIVE_SIZE)):
        for model, p in (report.get(part) or {}).items():
            backend = p.get("backend") or ("MediaPipe (CPU)" if model == "mediapipe" else "?")
            what = f"{'file pipeline' if part == 'pipeline' else 'live'} {size}, {model}"
            slowest = p.get("slowest_stage")
            slowest = f"slowest: {slowest} ({p['stages_ms'][slowest]['mean']:.1f} ms)" if slowest else "no stage timed"
            if part == "pipeline":
                ms = f"{1000 / p['fps']:.1f} / frame" if p["fps"] else "—"
                what += f", {p['frames']} frames, {slowest}"
            else:
                lat = p.get("latency_ms") or {}
                ms = f"p50 {lat.get('p50', float('nan')):.1f} / p99 {lat.get('p99', float('nan')):.1f} latency"
                what += f", {p['frames']} frames out, {p.get('dropped', 0)} dropped, {slowest}"
            rows.append({"device": device, "what": what, "backend": backend,
                         "precision": p.get("precision", "—") if model != "mediapipe" else "—",
                         "batch": p.get("batch_size", "—") if model != "mediapipe" else "—", "ms": ms,
                         "rate": f"{p['fps']:.1f} frames/s", "ratio": "—"})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| device | what | backend | precision | batch | ms | frames/s or faces/s | vs eager fp32 |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['device']} | {r['what']} | {r['backend']} | {r['precision']} | {r['batch']} | {r['ms']} | "
              f"{r['rate']} | {r['ratio']} |" for r in rows]
    return "\n".join(lines)


def not_measured(device: torch.device, report: dict, args, plan: Plan) -> list[str]:
    notes = []
    has_trt = importlib.util.find_spec("tensorrt") is not None
    if device.type != "cuda":
        why = "no CUDA" if not torch.cuda.is_available() else f"--device {device}"
        notes.append(f"{why}: fp16, CUDA graphs, torch.compile and TensorRT not measured")
    else:
        if not has_trt:
            notes.append("TensorRT not installed: TensorRT engines not measured")
        elif not args.engines_dir:
            notes.append("TensorRT: networks bench given no --engines_dir, engines not measured "
                         "(build them with build_engines.py, pass --engines_dir)")
        if not args.compile:
            notes.append("torch.compile not measured (pass --compile)")
    if importlib.util.find_spec("onnxruntime") is None:
        notes.append("ONNX Runtime not installed: not measured")
    nets = report.get("networks")
    if nets:
        notes += list(nets.get("notes") or [])
    for part in ("pipeline", "live"):
        p = (report.get(part) or {}).get(EMICA)
        if p:
            if p.get("backend_reason"):
                notes.append(f"{part} EMICA backend (auto): {p['backend']}, because {p['backend_reason']}")
            cap = plan.emica_frames if part == "pipeline" else plan.emica_live_frames
            if cap:
                notes.append(f"{part} EMICA capped at {cap} input frames (--max_frames), not the whole looped clip")
    if not args.assets_dir and any((report.get(part) or {}).get(EMICA) for part in ("pipeline", "live")):
        notes.append("EMICA ran on random weights (synthetic checkpoint): same networks and speed, meaningless faces")
    for part in args.skip:
        notes.append(f"{part}: skipped (--skip)")
    for what, err in report["errors"].items():
        notes.append(f"{what}: FAILED ({err.strip().splitlines()[-1] if err.strip() else 'no output'})")
    return notes


def check_targets(report: dict) -> dict:
    out = {}
    for model, p in (report.get("pipeline") or {}).items():
        out[f"file 480p ≥ {TARGETS['file_fps_480p']:.0f} frames/s, {model}"] = {
            "value": round(p["fps"], 2), "met": p["fps"] >= TARGETS["file_fps_480p"], "slowest_stage": p["slowest_stage"]}
    for model, p in (report.get("live") or {}).items():
        lat = p.get("latency_ms") or {}
        if lat:
            out[f"live 720p p50 ≤ {TARGETS['live_p50_ms_720p']:.0f} ms, p99 ≤ {TARGETS['live_p99_ms_720p']:.0f} ms, {model}"] = {
                "value": {"p50": lat["p50"], "p99": lat["p99"]},
                "met": lat["p50"] <= TARGETS["live_p50_ms_720p"] and lat["p99"] <= TARGETS["live_p99_ms_720p"]}
    return out


def main() -> int:
    p = OneLineParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda when PyTorch sees a GPU)")
    p.add_argument("--quick", action="store_true", help="small batches and few frames: a smoke test")
    p.add_argument("--skip", default="", help=f"comma list of parts to leave out: {','.join(PARTS)}")
    p.add_argument("--loop", type=int, default=None, help="repeat the clip for the file pipeline (default by device)")
    p.add_argument("--live_loop", type=int, default=None, help="repeat the clip for live runs (default 5, quick 1)")
    p.add_argument("--max_frames", type=int, default=None, help="cap the EMICA runs (default on the CPU: 32 / quick 8)")
    p.add_argument("--batch_size", type=int, default=None, help="EMICA pipeline batch (default: 16 for files on a GPU, else the app's 4)")
    p.add_argument("--assets_dir", default=None, help="real assets (default: random EMICA weights)")
    p.add_argument("--engines_dir", default=None, help="TensorRT/ONNX engines from build_engines.py")
    p.add_argument("--compile", action="store_true", help="also torch.compile: a networks variant, and the EMICA "
                                                          "pipeline runs (GPU; slow to start)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per part before it is given up")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/all_<device slug>.json)")
    args = p.parse_args()
    args.skip = [s.strip() for s in args.skip.split(",") if s.strip()]
    bad = [s for s in args.skip if s not in PARTS]
    if bad:
        p.error(f"--skip takes {', '.join(PARTS)} (got {', '.join(bad)})")
    device = args.device
    args.device = str(device)  # handed on to the other benches as text
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA GPU is visible; use --device cpu")
    on_gpu = device.type == "cuda"
    plan = Plan(args, on_gpu)
    name = device_name(device)
    t_start = time.perf_counter()
    report: dict = {"bench": "all", "device": name, "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "quick": args.quick, "argv": sys.argv[1:], "targets": TARGETS,
                    "networks": None, "pipeline": {}, "live": {}, "seconds": {}, "errors": {}}

    with tempfile.TemporaryDirectory(prefix="bench_all_") as tmp:
        tmp = Path(tmp)
        if "networks" not in args.skip:
            out = tmp / "networks.json"
            cmd = [sys.executable, str(REPO / "bench" / "bench_networks.py"), "--device", args.device,
                   "--out", str(out), *plan.networks]
            if args.assets_dir:
                cmd += ["--assets_dir", args.assets_dir]
            if args.engines_dir:
                cmd += ["--engines_dir", args.engines_dir]
            if args.compile:
                cmd.append("--compile")
            ok, seconds, tail = run_step("networks", cmd, args.timeout)
            report["seconds"]["networks"] = round(seconds, 1)
            if ok and out.is_file():
                report["networks"] = json.loads(out.read_text())
            else:
                report["errors"]["networks"] = tail
        for part, size, loop, live in (("pipeline", FILE_SIZE, plan.file_loop, False),
                                       ("live", LIVE_SIZE, plan.live_loop, True)):
            if part in args.skip:
                continue
            for model in MODELS:
                out = tmp / f"{part}_{model}.json"
                ok, seconds, tail = run_step(f"{part} {size} {model}",
                                             pipeline_cmd(model, size, loop, live, plan, args, out), args.timeout)
                report["seconds"][f"{part} {model}"] = round(seconds, 1)
                if ok and out.is_file():
                    report[part][model] = json.loads(out.read_text())
                else:
                    report["errors"][f"{part} {model}"] = tail

    rows = table_rows(name, report)
    report["rows"] = rows
    report["table"] = format_table(rows)
    report["targets_met"] = check_targets(report)
    report["not_measured"] = not_measured(device, report, args, plan)
    report["seconds"]["total"] = round(time.perf_counter() - t_start, 1)
    report["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"all_{slug(name)}.json"
    save_json(out, report)

    print(f"## Benchmarks on {name}{' (--quick)' if args.quick else ''}\n")
    print(report["table"])
    if report["targets_met"]:
        print("\nTargets:")
        for what, t in report["targets_met"].items():
            print(f"- {what}: {'met' if t['met'] else 'not met'} ({t['value']}"
                  + (f"; slowest stage {t['slowest_stage']}" if t.get("slowest_stage") else "") + ")")
    if report["not_measured"]:
        print("\nNot measured here:")
        for note in report["not_measured"]:
            print(f"- {note}")
    print(f"\nwrote {out} ({report['seconds']['total']:.0f} s)")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
