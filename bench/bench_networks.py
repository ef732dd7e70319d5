#!/usr/bin/env python3
"""EMICA coarse networks alone: ms per batch and faces/s for every available backend × precision × batch.

    .venv/bin/python bench/bench_networks.py [--batch 1,4,16,64] [--assets_dir assets] [--engines_dir engines]

Rows: MICA, DECA, expression, FLAME, "coarse total" (all four in sequence) and "coarse, identity cached"
(without MICA, as when a track's shape code is reused); on a GPU also both totals with the image networks on
their own CUDA streams (realtime.streams, as the pipeline runs them), whose speedup is against the sequential
eager fp32 total. On a GPU the report also gives fp16's differences from fp32 (codes; landmarks in pixels of
the 224 crop). Columns: eager fp32 PyTorch (the baseline, always
measured in the same run) and whatever else this machine runs: PyTorch fp16 / CUDA graphs / torch.compile on a
GPU, ONNX Runtime, and TensorRT engines found valid in --engines_dir. "speedup" is baseline ms / ms for the
same row and batch. Without --assets_dir the weights are random (tests/synthetic_checkpoints.py, written to a
temp folder): speed does not depend on the values.

Writes bench/results/networks_<device slug>.json. Timings are machine-specific; compare within one file.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import count_arg, device_arg, device_name, median_ms, positive_ints  # noqa: E402
from realtime import engines as E  # noqa: E402
from realtime.atomic import save_json  # noqa: E402
from realtime.errors import UserError  # noqa: E402
from realtime.cli import OneLineParser  # noqa: E402
from realtime.models import load_model  # noqa: E402
from realtime.streams import StreamFork  # noqa: E402

MODEL = "EMICA-CVT_flame2020_notexture"
ROWS = {
    "mica": ("mica",),
    "deca": ("deca",),
    "expression": ("expression",),
    "flame": ("flame",),
    "coarse total": E.COARSE_NETWORKS,
    "coarse, identity cached": ("deca", "expression", "flame"),
}
# GPU only: (networks run concurrently, each on its own stream; then this one) and the sequential row compared to.
STREAM_ROWS = {
    "coarse total, streams": (("mica", "deca", "expression"), "flame", "coarse total"),
    "coarse, identity cached, streams": (("deca", "expression"), "flame", "coarse, identity cached"),
}


@dataclass
class Variant:
    """One backend × precision configuration: how to make an engine for a network at the benchmarked batches."""

    label: str
    backend: str
    precision: str
    make: Callable[[E.Network], E.Engine]


def torch_variants(device: torch.device, batches: tuple[int, ...], with_compile: bool) -> list[Variant]:
    """Eager fp32 first (the baseline); on a GPU also fp16, CUDA graphs and optionally torch.compile."""

    def torch_engine(precision: str, graphs: bool, channels_last: bool, compiled: bool = False):
        # A private copy per variant: TorchEngine converts weights in place (channels_last, device).
        return lambda net: E.TorchEngine(copy.deepcopy(net.module), device, E.network_precision(net.name, precision),
                                         cuda_graphs=graphs,
                                         channels_last=channels_last, compile=compiled, batch_sizes=batches,
                                         name=net.name)

    variants = [Variant("torch eager fp32", "torch", "fp32", torch_engine("fp32", False, False))]
    if device.type == "cuda":
        variants += [
            Variant("torch eager fp16", "torch", "fp16", torch_engine("fp16", False, True)),
            Variant("torch CUDA graphs fp32", "torch", "fp32", torch_engine("fp32", True, True)),
            Variant("torch CUDA graphs fp16", "torch", "fp16", torch_engine("fp16", True, True)),
        ]
        if with_compile:
            compiled = torch_engine("fp16", True, True, compiled=True)
            variants.append(Variant("torch compile+graphs fp16", "torch", "fp16", compiled))
    return variants


def onnxruntime_variant(device: torch.device, onnx_dir: Path, available: E.Availability,
                        threads: int | None) -> list[Variant]:
    if not available.onnxruntime or (device.type == "cuda" and not available.onnxruntime_cuda):
        return []

    def make(net: E.Network) -> E.Engine:
        path = E.onnx_file(onnx_dir, MODEL, net.name)
        if not path.is_file():
            E.export_onnx(net.module, net.example_inputs(1), path, list(net.inputs), list(net.outputs))
        return E.OnnxRuntimeEngine(path, device, "fp32", threads=threads, name=net.name)

    return [Variant("onnxruntime fp32", "onnxruntime", "fp32", make)]


def tensorrt_variants(engines_dir: Path | None, available: E.Availability, weights: dict[str, str],
                      batches: tuple[int, ...]) -> tuple[list[Variant], list[str]]:
    """TensorRT engines already built by build_engines.py and valid here for every benchmarked batch."""
    if engines_dir is None or available.tensorrt_version is None or not available.cuda:
        return [], []
    variants, notes = [], []
    for precision in E.PRECISIONS:
        try:
            paths = {
                n: E.find_engine(engines_dir, E.EngineRequirements(
                    MODEL, n, E.network_precision(n, precision), weights_sha256=weights[n], gpu_name=available.gpu_name,
                    compute_capability=available.compute_capability, tensorrt_version=available.tensorrt_version,
                    batch_size=max(batches)))
                for n in E.COARSE_NETWORKS
            }
        except E.UserError as e:
            notes.append(f"tensorrt {precision} skipped: {e}")
            continue
        variants.append(Variant(f"tensorrt {precision}", "tensorrt", precision,
                                lambda net, paths=paths: E.TensorRTEngine(paths[net.name], name=net.name)))
    return variants, notes


def bench_variant(variant: Variant, networks: dict[str, E.Network], device: torch.device,
                  batches: tuple[int, ...], warmup: int, repeat: int) -> dict[tuple[str, int], float]:
    """ms per batch for every (row, batch) of one variant."""
    engines = {name: variant.make(net) for name, net in networks.items()}
    fork = StreamFork(device)
    branches = {name: fork.branch(engine) for name, engine in engines.items()}
    results = {}
    with torch.inference_mode():
        for batch in batches:
            inputs = {n: tuple(x.to(device) for x in net.example_inputs(batch)) for n, net in networks.items()}
            for row, parts in ROWS.items():
                def run(parts=parts):
                    for n in parts:
                        engines[n](*inputs[n])
                results[(row, batch)] = median_ms(run, device, warmup, repeat)
            if not fork.enabled:
                continue
            for row, (concurrent, after, _) in STREAM_ROWS.items():
                def run_forked(concurrent=concurrent, after=after):
                    with fork:
                        for n in concurrent:
                            branches[n](*inputs[n])
                    engines[after](*inputs[after])
                results[(row, batch)] = median_ms(run_forked, device, warmup, repeat)
    return results


def fp16_differences(model: torch.nn.Module, device: torch.device, batch: int = 8) -> dict:
    """How far fp16 image networks (autocast, as TorchEngine runs them; FLAME stays fp32) move the outputs.

    Returns, per code, the largest absolute difference and that relative to the code's fp32 spread (std over
    the batch and its entries), and the 68 landmarks' largest and mean shift in pixels of the 224 crop.
    """
    model = copy.deepcopy(model).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(batch, 3, 224, 224, generator=generator).to(device)
    arcface = (torch.rand(batch, 3, 112, 112, generator=generator) * 2 - 1).to(device)
    outputs = {}
    with torch.inference_mode():
        for precision in ("fp32", "fp16"):
            with torch.autocast(device.type, dtype=torch.float16, enabled=precision == "fp16"):
                codes = model.encode(image, mica_image=arcface)
            codes = {k: v.float() for k, v in codes.items()}
            outputs[precision] = {**codes, **model.decode(codes)}
    ref, half = outputs["fp32"], outputs["fp16"]
    report: dict = {"batch": batch, "codes": {}}
    for k in ("shapecode", "expcode", "globalpose", "jawpose", "cam", "texcode", "lightcode"):
        if k in ref:
            diff = (half[k] - ref[k]).abs().max().item()
            spread = ref[k].std().item()
            report["codes"][k] = {"max_abs": round(diff, 6), "relative_to_std": round(diff / spread, 6) if spread else None}
    shift = (half["predicted_landmarks"] - ref["predicted_landmarks"]).norm(dim=-1) * 224 / 2  # [-1, 1] → pixels
    report["landmarks_px_224"] = {"max": round(shift.max().item(), 4), "mean": round(shift.mean().item(), 4)}
    return report


def format_table(rows: list[dict]) -> str:
    lines = ["| network | backend | batch | ms / batch | faces/s | speedup |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['network']} | {r['variant']} | {r['batch']} | {r['ms']:.2f} | {r['faces_per_s']:.1f} | "
                     f"{r['speedup']:.2f}× |")
    return "\n".join(lines)


def main() -> int:
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=positive_ints, default=None,
                   help="comma list (default 1,4,16,64 on a GPU, 1,4 on the CPU)")
    p.add_argument("--assets_dir", default=None, help="real assets (default: random weights in a temp folder)")
    p.add_argument("--engines_dir", default=None, help="where build_engines.py put TensorRT engines")
    p.add_argument("--warmup", type=count_arg(0), default=None, help="untimed calls first (default 10 GPU, 1 CPU)")
    p.add_argument("--repeat", type=count_arg(1), default=None,
                   help="timed calls, median reported (default 50 GPU, 3 CPU)")
    p.add_argument("--compile", action="store_true", help="also torch.compile (GPU; slow to compile)")
    p.add_argument("--threads", type=count_arg(1), default=None,
                   help="CPU threads for PyTorch and ONNX Runtime alike (default: their defaults, all cores)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/networks_<device>.json)")
    args = p.parse_args()

    device = args.device
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {device}: PyTorch sees no CUDA GPU here; use --device cpu")
    try:
        return run(args, device)
    except UserError as e:  # missing or broken assets, an unusable backend: what to fix, in one line
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args, device: torch.device) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = device.type == "cuda"
    batches = tuple(args.batch or ((1, 4, 16, 64) if on_gpu else (1, 4)))
    warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 1)
    repeat = args.repeat if args.repeat is not None else (50 if on_gpu else 3)
    available = E.probe_availability(device)

    with tempfile.TemporaryDirectory(prefix="bench_networks_") as tmp:
        assets = Path(args.assets_dir) if args.assets_dir else Path(tmp) / "assets"
        if args.assets_dir is None:
            from tests.synthetic_checkpoints import write_emica_model

            write_emica_model(assets, MODEL)
        model = load_model(MODEL, assets_dir=assets, device="cpu")
        networks = {n: net for n, net in E.model_networks(model).items() if n in E.COARSE_NETWORKS}
        weights = {n: E.module_sha256(net.module) for n, net in networks.items()}
        fp16 = fp16_differences(model, device) if on_gpu else None
        engines_dir = Path(args.engines_dir) if args.engines_dir else None
        trt, notes = tensorrt_variants(engines_dir, available, weights, batches)
        variants = (torch_variants(device, batches, args.compile)
                    + onnxruntime_variant(device, Path(tmp), available, args.threads) + trt)
        measured = {}
        for variant in variants:
            print(f"timing {variant.label} …", file=sys.stderr, flush=True)
            measured[variant.label] = bench_variant(variant, networks, device, batches, warmup, repeat)
            if on_gpu:
                torch.cuda.empty_cache()

    baseline = measured[variants[0].label]
    compared_to = {**{row: row for row in ROWS}, **{row: seq for row, (_, _, seq) in STREAM_ROWS.items()}}
    rows = [
        {"network": row, "variant": v.label, "backend": v.backend, "precision": v.precision, "batch": batch,
         "ms": round(ms, 3), "faces_per_s": round(batch / ms * 1000, 2),
         "speedup": round(baseline[(compared_to[row], batch)] / ms, 3)}
        for row in compared_to for batch in batches for v in variants
        if (row, batch) in measured[v.label]
        for ms in [measured[v.label][(row, batch)]]
    ]
    name = device_name(device)
    report = {
        "bench": "networks",
        "model": MODEL,
        "weights": "real" if args.assets_dir else "random (synthetic checkpoint)",
        "device": name,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "tensorrt": available.tensorrt_version,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32 if on_gpu else None,
        "batches": list(batches),
        "warmup": warmup,
        "repeat": repeat,
        "baseline": variants[0].label,
        "notes": notes,
        "rows": rows,
        "fp16_vs_fp32": fp16,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"networks_{E.slug(name)}.json"
    save_json(out, report)
    print(f"{MODEL} coarse networks on {name} ({report['weights']} weights)")
    print(format_table(rows))
    if fp16 is not None:
        print(f"fp16 vs fp32 (batch {fp16['batch']}): landmarks max {fp16['landmarks_px_224']['max']} px, "
              f"mean {fp16['landmarks_px_224']['mean']} px on the 224 crop; codes {fp16['codes']}")
    for note in notes:
        print(note)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
