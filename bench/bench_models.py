"""Time one EMICA coarse forward (eager PyTorch) at several batch sizes and write the numbers as JSON.

    .venv/bin/python bench/bench_models.py                      # CPU, batch 1 and 4
    .venv/bin/python bench/bench_models.py --device cuda --batch 1,4,16

Uses the released model when ``--assets`` holds it; otherwise the same networks with random weights and the
synthetic FLAME from the tests (timings do not depend on the weight values). Reported per batch: the full
forward (MICA + both ResNet-50s + FLAME), the forward with a cached identity (MICA skipped, what a tracked face
costs after its first frame), and FLAME decode alone; median / min / mean milliseconds over ``--repeats`` runs
after ``--warmup`` runs.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import device_name  # noqa: E402
from realtime.atomic import save_json  # noqa: E402
from realtime.cli import OneLineParser  # noqa: E402
from realtime.errors import AssetError  # noqa: E402
from realtime.models import DEFAULT_MODEL, EMICA, load_model  # noqa: E402
from realtime.models.flame import FLAME  # noqa: E402


def build_model(assets: Path, device: torch.device) -> tuple[EMICA, str]:
    """The released default model if present, else random weights on the synthetic FLAME."""
    try:
        return load_model(DEFAULT_MODEL, assets_dir=assets, device=device), f"{DEFAULT_MODEL} from {assets}"
    except AssetError:
        # Calibrated random weights: untrained BatchNorm statistics overflow to inf/NaN, which times differently.
        from tests.synthetic_checkpoints import make_random_emica
        from tests.synthetic_flame import synthetic_flame_assets

        with tempfile.TemporaryDirectory() as tmp:
            flame = FLAME(synthetic_flame_assets(Path(tmp)), 300, 100)
        model = make_random_emica(flame).to(device).eval().requires_grad_(False)
        return model, "random weights (BatchNorm-calibrated), synthetic FLAME-2020-sized head (released model not found)"


def timed(fn, device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1000.0

    for _ in range(warmup):
        once()
    times = [once() for _ in range(repeats)]
    return {"median_ms": statistics.median(times), "min_ms": min(times), "mean_ms": statistics.fmean(times),
            "repeats": repeats}


def main() -> None:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", type=Path, default=REPO / "assets")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", default="1,4", help="comma-separated batch sizes")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON path (default bench/results/emica_<device type>_forward.json)")
    args = parser.parse_args()

    device = torch.device(args.device)
    batches = [int(b) for b in args.batch.split(",")]
    model, source = build_model(args.assets, device)
    generator = torch.Generator().manual_seed(0)
    results = []
    with torch.inference_mode():
        for batch in batches:
            image = torch.rand(batch, 3, 224, 224, generator=generator).to(device)
            mica_image = (torch.rand(batch, 3, 112, 112, generator=generator) * 2 - 1).to(device)
            codes = model.encode(image, mica_image)
            cached = codes["shapecode"]
            row = {
                "batch": batch,
                "forward": timed(lambda: model(image, mica_image=mica_image), device, args.warmup, args.repeats),
                "forward_cached_identity": timed(lambda: model(image, shapecode=cached), device, args.warmup,
                                                 args.repeats),
                "flame_decode": timed(lambda: model.decode(codes), device, args.warmup, args.repeats),
            }
            row["forward_per_face_ms"] = row["forward"]["median_ms"] / batch
            row["mica_share_of_forward"] = 1.0 - row["forward_cached_identity"]["median_ms"] / row["forward"]["median_ms"]
            results.append(row)
            print(f"batch {batch}: forward {row['forward']['median_ms']:.1f} ms, cached identity "
                  f"{row['forward_cached_identity']['median_ms']:.1f} ms, FLAME {row['flame_decode']['median_ms']:.2f} ms")

    report = {
        "benchmark": "EMICA coarse forward, eager PyTorch fp32",
        "model": source,
        "device": device_name(device),
        "torch": torch.__version__,
        # Other jobs on a shared box inflate CPU timings; the 1-minute load average says how busy it was.
        "load_average_1min_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "results": results,
    }
    output = args.output or REPO / "bench" / "results" / f"emica_{device.type}_forward.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    save_json(output, report)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
