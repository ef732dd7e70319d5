#!/usr/bin/env python3
"""Export a model's networks to ONNX, check them against PyTorch, and build TensorRT engines.

    python build_engines.py --model EMICA-CVT_flame2020_notexture [--mode coarse|detail] \
        [--precision fp16,fp32] [--batch 1,4,16] [--assets_dir assets] [--engines_dir engines] [--onnx-only]

For every network (MICA, DECA, expression, FLAME; the detail encoder/decoder with --mode detail):

1. export engines/<model>/<network>.onnx with a dynamic batch dimension (+ a JSON manifest);
2. run it with ONNX Runtime beside PyTorch fp32 and print the max relative error (fails above 1e-4);
3. when TensorRT is installed: build engines/<model>/<network>-<precision>-b<min>_<opt>_<max>-<gpu>-trt<ver>.engine
   for each precision, one optimisation profile over --batch, sharing engines/timing-<gpu>-trt<version>.cache (+ manifests),
   and compare each engine with PyTorch on the GPU.

Files that are up to date (same weights, same ONNX, same GPU and TensorRT, same batch profile) are kept;
stale ones are rebuilt, or refused with --no-rebuild. --force rebuilds everything.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from realtime import engines as E
from realtime.cli import OneLineParser
from realtime.errors import UserError

ONNX_RTOL = 1e-4  # fp32 ONNX Runtime vs PyTorch, relative to each output's scale
# TensorRT computes fp32 layers in TF32 and fp16 layers in half precision, so its engines are compared with a
# sanity bound that catches a broken build (wrong layout, lost layer), not rounding; the error is printed.
TRT_RTOL = {"fp32": 1e-2, "fp16": 1e-1}
VALIDATION_BATCH = 2  # validate at another batch than the export's (1): proves the batch axis is dynamic


@dataclass(frozen=True)
class Options:
    model: str
    mode: str
    detail_model: str | None
    precisions: tuple[str, ...]
    batch_profile: tuple[int, int, int]
    assets_dir: Path
    path_to_models: Path | None
    engines_dir: Path
    onnx_only: bool
    rebuild: bool
    force: bool
    networks: tuple[str, ...] | None
    workspace_gib: float


def parse_precisions(text: str) -> tuple[str, ...]:
    values = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    bad = [p for p in values if p not in E.PRECISIONS]
    if not values or bad:
        raise UserError(f"--precision takes a comma list of fp16 and fp32 (got {text!r})")
    return values


def parse_batch_profile(text: str) -> tuple[int, int, int]:
    """'1,4,16' → (1, 4, 16) = min, opt, max; one value 'N' → a fixed batch (N, N, N)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or values[0] < 1 or not values[0] <= values[1] <= values[2]:
        raise UserError(f"--batch takes min,opt,max with 1 <= min <= opt <= max, or one batch size (got {text!r})")
    return values[0], values[1], values[2]


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 2)[2],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model name, e.g. EMICA-CVT_flame2020_notexture")
    p.add_argument("--mode", choices=("coarse", "detail"), default="coarse")
    p.add_argument("--detail_model", "--detail-model", default=None,
                   help="EMICA --mode detail: the EMOCA/DECA model whose detail branch is used")
    p.add_argument("--precision", default="fp16,fp32", help="TensorRT precisions, comma list (default fp16,fp32)")
    p.add_argument("--batch", default="1,4,16", help="TensorRT batch profile min,opt,max (default 1,4,16)")
    p.add_argument("--assets_dir", "--assets-dir", default="assets")
    p.add_argument("--path_to_models", "--path-to-models", default=None,
                   help="folder with <model>/cfg.yaml (default: inside --assets_dir)")
    p.add_argument("--engines_dir", "--engines-dir", default="engines")
    p.add_argument("--networks", default=None, help="only these networks, comma list (default: all of the mode)")
    p.add_argument("--onnx-only", "--onnx_only", dest="onnx_only", action="store_true",
                   help="stop after the ONNX exports and their check")
    p.add_argument("--no-rebuild", "--no_rebuild", dest="no_rebuild", action="store_true",
                   help="refuse (exit 2) instead of rebuilding stale files")
    p.add_argument("--force", action="store_true", help="rebuild every file, stale or not")
    p.add_argument("--workspace_gib", type=float, default=4.0, help="TensorRT builder workspace (GiB)")
    return p


def options_from_args(args: argparse.Namespace) -> Options:
    if args.no_rebuild and args.force:
        raise UserError("--force and --no-rebuild contradict each other; use one")
    return Options(
        model=args.model,
        mode=args.mode,
        detail_model=args.detail_model,
        precisions=parse_precisions(args.precision),
        batch_profile=parse_batch_profile(args.batch),
        assets_dir=Path(args.assets_dir),
        path_to_models=Path(args.path_to_models) if args.path_to_models else None,
        engines_dir=Path(args.engines_dir),
        onnx_only=args.onnx_only,
        rebuild=not args.no_rebuild,
        force=args.force,
        networks=tuple(n.strip() for n in args.networks.split(",")) if args.networks else None,
        workspace_gib=args.workspace_gib,
    )


def select_networks(model: torch.nn.Module, opts: Options) -> dict[str, E.Network]:
    networks = E.model_networks(model)
    if opts.mode == "coarse":
        networks = {n: net for n, net in networks.items() if n not in E.DETAIL_NETWORKS}
    if opts.networks is not None:
        unknown = [n for n in opts.networks if n not in networks]
        if unknown:
            raise UserError(f"--networks: {', '.join(unknown)} not in {opts.model} ({opts.mode}); "
                            f"choose from {', '.join(networks)}")
        networks = {n: networks[n] for n in opts.networks}
    return networks


def say(message: str) -> None:
    print(message, flush=True)


def _stale_or_skip(what: Path, problems: list[str], opts: Options) -> bool:
    """True when ``what`` must be (re)built; False when it is up to date. Raises under --no-rebuild."""
    if opts.force:
        return True
    if not problems:
        return False
    if not opts.rebuild:
        raise E.StaleEngineError(f"{what} is stale ({'; '.join(problems)}) and --no-rebuild was given; "
                                 f"run again without --no-rebuild to rebuild it")
    say(f"  {what.name} is stale: {'; '.join(problems)}; rebuilding")
    return True


def _existing_problems(file: Path, expected: E.EngineRequirements, check_onnx_hash: bool = False) -> list[str]:
    """Why ``file`` cannot be kept (empty when it is up to date): it or its manifest is missing or unreadable,
    ``engine_problems`` against ``expected``, or (ONNX) its bytes are not the ones the manifest describes."""
    if not file.is_file():
        return [f"{file} does not exist"]
    try:
        manifest = E.load_manifest(E.manifest_path(file))
    except UserError as e:
        return [str(e)]
    problems = E.engine_problems(manifest, expected)
    if check_onnx_hash and E.file_sha256(file) != manifest.onnx_sha256:
        problems.append("the file was modified after export")
    return problems


def export_network(net: E.Network, weights: str, opts: Options) -> tuple[Path, str]:
    """Export (or keep) engines/<model>/<network>.onnx; returns its path and sha256."""
    path = E.onnx_file(opts.engines_dir, opts.model, net.name)
    expected = E.EngineRequirements(opts.model, net.name, "fp32", mode=opts.mode, weights_sha256=weights)
    problems = _existing_problems(path, expected, check_onnx_hash=True)
    if path.is_file() and not _stale_or_skip(path, problems, opts):
        say(f"{net.name}: {path} is up to date")
        return path, E.load_manifest(E.manifest_path(path)).onnx_sha256
    start = time.perf_counter()
    E.export_onnx(net.module, net.example_inputs(1), path, list(net.inputs), list(net.outputs))
    exported = time.perf_counter() - start
    try:
        err = E.validate_onnx(net.module, path, net.example_inputs(VALIDATION_BATCH, seed=1), rtol=ONNX_RTOL)
    except E.ExportMismatchError:
        path.unlink()  # a wrong export must not stay where the app would find it
        E.manifest_path(path).unlink(missing_ok=True)
        raise
    onnx_sha = E.file_sha256(path)
    E.EngineManifest(
        model=opts.model, network=net.name, mode=opts.mode, precision="fp32", file=path.name,
        inputs=net.input_shapes(), outputs=net.output_shapes(), weights_sha256=weights, onnx_sha256=onnx_sha,
    ).save(E.manifest_path(path))
    size_mb = path.stat().st_size / 1e6
    say(f"{net.name}: exported {path} ({size_mb:.1f} MB, {exported:.1f} s); ONNX Runtime vs PyTorch fp32 at batch "
        f"{VALIDATION_BATCH}: max relative error {err:.2e} (limit {ONNX_RTOL:g})")
    return path, onnx_sha


def build_engine(net: E.Network, onnx_path: Path, onnx_sha: str, weights: str, precision: str,
                 available: E.Availability, opts: Options) -> None:
    """Build (or keep) one TensorRT engine and compare it with PyTorch on the GPU."""
    path = E.engine_file(opts.engines_dir, opts.model, net.name, precision, opts.batch_profile,
                         available.gpu_name, available.tensorrt_version)
    expected = E.EngineRequirements(
        opts.model, net.name, precision, mode=opts.mode, weights_sha256=weights, onnx_sha256=onnx_sha,
        gpu_name=available.gpu_name, compute_capability=available.compute_capability,
        tensorrt_version=available.tensorrt_version,
    )
    problems = _existing_problems(path, expected)
    if path.is_file() and not _stale_or_skip(path, problems, opts):
        say(f"{net.name} {precision}: {path} is up to date")
        return
    start = time.perf_counter()
    timing_cache = E.timing_cache_file(opts.engines_dir, available.gpu_name, available.tensorrt_version)
    E.manifest_path(path).unlink(missing_ok=True)  # it describes the engine being replaced
    E.build_trt_engine(onnx_path, path, precision, opts.batch_profile, timing_cache=timing_cache,
                       workspace_gib=opts.workspace_gib)
    built = time.perf_counter() - start
    manifest = E.EngineManifest(
        model=opts.model, network=net.name, mode=opts.mode, precision=precision, file=path.name,
        inputs=net.input_shapes(), outputs=net.output_shapes(), weights_sha256=weights, onnx_sha256=onnx_sha,
        batch_profile=opts.batch_profile, gpu_name=available.gpu_name,
        compute_capability=available.compute_capability, tensorrt_version=available.tensorrt_version,
    )
    limit = TRT_RTOL[precision]
    try:
        err = compare_with_torch(net, E.TensorRTEngine(path, manifest=manifest), batch=opts.batch_profile[1])
        say(f"{net.name} {precision}: built {path.name} ({built:.0f} s); TensorRT vs PyTorch fp32 at batch "
            f"{opts.batch_profile[1]}: max relative error {err:.2e} (limit {limit:g})")
        if not err <= limit:
            raise E.ExportMismatchError(f"{path}: TensorRT {precision} differs from PyTorch by {err:.3g}, "
                                        f"above {limit:g}")
    except BaseException:
        path.unlink(missing_ok=True)  # an engine that failed its check must not stay where the app would find it
        raise
    manifest.save(E.manifest_path(path))  # last: only a checked engine gets a manifest, and only that is ever used


def compare_with_torch(net: E.Network, engine: E.Engine, batch: int) -> float:
    """Largest relative error of ``engine`` against the network in PyTorch fp32 (eager) on the engine's device."""
    reference = E.TorchEngine(net.module, engine.device, "fp32", cuda_graphs=False, channels_last=False)
    inputs = tuple(x.to(engine.device) for x in net.example_inputs(batch, seed=2))
    got, want = engine(*inputs), reference(*inputs)
    return max(E.relative_error(g.cpu().numpy(), w.cpu().numpy()) for g, w in zip(got, want))


def run(opts: Options) -> int:
    from realtime.models import load_model

    model = load_model(opts.model, path_to_models=opts.path_to_models, assets_dir=opts.assets_dir, device="cpu",
                       mode=opts.mode, detail_model=opts.detail_model)
    networks = select_networks(model, opts)
    say(f"{opts.model} ({opts.mode}): {', '.join(networks)} → {opts.engines_dir / opts.model}")
    exports = {}
    for name, net in networks.items():
        weights = E.module_sha256(net.module)
        exports[name] = (*export_network(net, weights, opts), weights)
    if opts.onnx_only:
        return 0
    available = E.probe_availability("cuda")
    if available.tensorrt_version is None:
        say(f"TensorRT is not installed: stopping after the ONNX exports. To build engines: {E.TRT_INSTALL_HINT}.")
        return 0
    if not available.cuda:
        say("TensorRT is installed but no CUDA GPU is visible: stopping after the ONNX exports.")
        return 0
    say(f"TensorRT {available.tensorrt_version} on {available.gpu_name} (compute {available.compute_capability}), "
        f"batch profile {'/'.join(map(str, opts.batch_profile))}, precisions {', '.join(opts.precisions)}")
    model.to("cuda")
    for name, net in networks.items():
        onnx_path, onnx_sha, weights = exports[name]
        for precision in dict.fromkeys(E.network_precision(name, p) for p in opts.precisions):
            build_engine(net, onnx_path, onnx_sha, weights, precision, available, opts)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return run(options_from_args(args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except E.ExportMismatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
