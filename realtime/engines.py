"""Inference engines: one call interface over PyTorch (eager / CUDA graphs), ONNX Runtime and TensorRT.

An engine runs one tensor-in/tensor-out network (MICA, the DECA encoder, FLAME …): ``engine(*inputs)``
takes tensors with a leading batch dimension and returns a tuple of fp32 tensors on the engine's device.
Batches larger than ``max_batch`` are split into chunks, so callers never see a backend's batch limit.

Files (DESIGN.md, "Engines"): ONNX exports live at ``engines/<model>/<network>.onnx`` and TensorRT
engines at ``engines/<model>/<network>-<precision>-b<min>_<opt>_<max>-<gpu slug>-trt<version>.engine``,
each with a JSON ``EngineManifest`` beside it (same stem, ``.json``). A manifest records what the file was
built from and for (checkpoint and ONNX checksums, GPU, TensorRT version, batch profile), so a stale or
foreign engine is refused with a message that names the difference and the rebuild command, never used.

Use (a reconstructor)::

    networks = model_networks(model)                                   # mica, deca, expression, flame (+ detail)
    weights = {n: module_sha256(net.module) for n, net in networks.items()}
    backend, reason = select_backend("auto", "cuda:0", "engines", name, list(networks), "fp16", batch_size=4,
                                     weights=weights)                   # logs its choice and why
    engines = create_engines(backend, networks, "cuda:0", "fp16", "engines", name, weights=weights)
    (shapecode,) = engines["mica"](mica_images)                         # (B, 3, 112, 112) → (B, 300)

``tensorrt`` and ``onnxruntime`` are optional and imported only when needed.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import re
import shlex
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from .atomic import atomic_path, atomic_write_bytes
from .errors import AssetError, UserError
from .models import EMICA, DecaModel
from .models.detail import detail_condition

log = logging.getLogger("realtime.engines")

BACKENDS = ("tensorrt", "torch", "onnxruntime")
PRECISIONS = ("fp32", "fp16")
MANIFEST_VERSION = 1
TRT_INSTALL_HINT = 'pip install "tensorrt>=10,<11" (TensorRT 10, from NVIDIA\'s package index: needs internet access)'


class StaleEngineError(AssetError):
    """An engine or ONNX file exists but does not match this checkpoint, GPU, TensorRT or batch size."""


class ExportMismatchError(RuntimeError):
    """An exported network disagrees with PyTorch beyond tolerance: a bug in the export, not user input."""


# --------------------------------------------------------------------------------------------------
# The engine interface
# --------------------------------------------------------------------------------------------------


class Engine(abc.ABC):
    """A network behind a uniform call: ``(*inputs (B, ...)) → tuple of outputs (B, ...)``, fp32, on ``device``.

    Attributes: ``name`` (the network, e.g. "mica"), ``backend`` (one of BACKENDS), ``precision``
    ("fp32" | "fp16": the arithmetic inside; inputs and outputs are always fp32), ``max_batch`` (the
    largest batch one backend call takes; larger batches are chunked) and ``device``.
    """

    name: str
    backend: str
    precision: str
    max_batch: int
    device: torch.device

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch = _common_batch(inputs, self.name)
        if batch <= self.max_batch:
            return self._run(inputs)
        step = self.max_batch
        chunks = [self._run(tuple(x[i : i + step] for x in inputs)) for i in range(0, batch, step)]
        return tuple(torch.cat(parts) for parts in zip(*chunks))

    @abc.abstractmethod
    def _run(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """One backend call with 1 <= batch <= max_batch."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, backend={self.backend!r}, precision={self.precision!r}, "
            f"device={str(self.device)!r}, max_batch={self.max_batch})"
        )


def _common_batch(inputs: Sequence[torch.Tensor], name: str) -> int:
    """The shared leading dimension of ``inputs``; a clear error when they disagree or are scalars."""
    if not inputs:
        raise ValueError(f"engine {name!r} called without inputs")
    sizes = {int(x.shape[0]) if x.dim() > 0 else -1 for x in inputs}
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError(f"engine {name!r}: inputs need one common batch dimension, got shapes "
                         f"{[tuple(x.shape) for x in inputs]}")
    batch = sizes.pop()
    if batch < 1:
        raise ValueError(f"engine {name!r} called with an empty batch")
    return batch


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")


def padded_batch(batch: int, sizes: Sequence[int]) -> int:
    """The smallest of ``sizes`` that holds ``batch`` rows (``batch`` <= max(sizes))."""
    fitting = [s for s in sizes if s >= batch]
    if not fitting:
        raise ValueError(f"batch {batch} exceeds the largest size {max(sizes)}")
    return min(fitting)


def _check_arity(name: str, input_names: Sequence[str], inputs: Sequence[torch.Tensor]) -> None:
    if len(inputs) != len(input_names):
        raise ValueError(f"engine {name!r} takes {len(input_names)} inputs ({', '.join(input_names)}), "
                         f"got {len(inputs)}")


def _as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    """A module's output (tensor, tuple/list of tensors) as a tuple."""
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
        return tuple(out)
    raise TypeError(f"engines need tensor-in/tensor-out networks; the module returned {type(out).__name__}")


# --------------------------------------------------------------------------------------------------
# PyTorch: eager on CPU; fp16 autocast + CUDA graphs on GPU
# --------------------------------------------------------------------------------------------------


class _CaptureFailed(RuntimeError):
    """Recording a CUDA graph failed (not running one): the engine falls back to eager calls."""


@dataclass
class _CapturedGraph:
    """One CUDA graph for one padded batch size, with the static buffers it reads and writes."""

    graph: "torch.cuda.CUDAGraph"
    inputs: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor, ...]


def _on_device(device: torch.device):
    """Make ``device`` the current CUDA device (what torch's default streams, graph capture and TensorRT's loading
    use) for a block; nothing on the CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class TorchEngine(Engine):
    """A PyTorch module as an engine.

    CPU: plain eager fp32 (bit-identical to calling the module). CUDA:

    - ``precision="fp16"`` runs under ``torch.autocast(dtype=float16)``: convolutions and linear layers
      compute in fp16 while autocast keeps its fp32 ops in fp32 (norms such as MICA's L2 ``normalize``,
      reductions, ``exp``/``pow``); weights, inputs and the returned outputs stay fp32. Networks that are not
      safe in fp16 (FLAME, the detail decoder) are given fp32 by their callers: see ``network_precision``.
    - ``cuda_graphs``: one CUDA graph per size in ``batch_sizes``, captured on first use of that size (or all
      at once with ``capture``); a batch is padded up to the nearest captured size, by repeating its last row
      so padding never feeds the network values it would not otherwise see, and the padded rows are dropped.
    - ``channels_last``: weights and 4-D inputs in NHWC, which cuDNN's tensor-core convolutions prefer.
    - ``compile``: ``torch.compile`` (Inductor) first; its kernels are then captured into the CUDA graphs.

    The engine takes over ``module``: it is put in eval mode and moved to ``device``.
    """

    backend = "torch"

    def __init__(
        self,
        module: nn.Module,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        cuda_graphs: bool = True,
        channels_last: bool = True,
        compile: bool = False,
        batch_sizes: Sequence[int] = (1, 4, 16),
        name: Optional[str] = None,
    ):
        _check_precision(precision)
        self.device = torch.device(device)
        on_gpu = self.device.type == "cuda"
        if on_gpu and not torch.cuda.is_available():
            raise UserError(f"device {self.device} was asked for but PyTorch sees no CUDA GPU; use --device cpu")
        if precision == "fp16" and not on_gpu:
            raise UserError(f"fp16 inference needs a CUDA device (got {self.device}); use --precision fp32 on the CPU")
        if not batch_sizes or min(batch_sizes) < 1:
            raise ValueError(f"batch_sizes must be positive, got {tuple(batch_sizes)}")
        self.name = name or type(module).__name__
        self.precision = precision
        self.batch_sizes = tuple(sorted(set(int(b) for b in batch_sizes)))
        self.max_batch = self.batch_sizes[-1]
        self.channels_last = channels_last and on_gpu
        self.cuda_graphs = cuda_graphs and on_gpu
        self.module = module.eval().to(self.device)
        if self.channels_last:
            self.module.to(memory_format=torch.channels_last)
        self._forward: Callable[..., Any] = torch.compile(self.module, dynamic=False) if compile else self.module
        self._graphs: dict[tuple, _CapturedGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        # A replay fills shared static buffers: two threads (the model stage, look-ahead's re-decode) take turns,
        # and on the GPU a replay waits for the previous one (maybe on another stream) to be done with them.
        self._lock = threading.Lock()
        self._last_replay: Optional["torch.cuda.Event"] = None

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, torch.float32, non_blocking=True) if x.is_floating_point() else x.to(self.device)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _eager(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        # No autocast weight cache: a CUDA graph must not capture casts that a cache would skip on replay.
        fp16 = self.precision == "fp16"
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=fp16, cache_enabled=False):
            outputs = _as_tuple(self._forward(*inputs))
        return tuple(o.float() if o.is_floating_point() else o for o in outputs)

    def _run(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        with torch.inference_mode(), _on_device(self.device):
            inputs = tuple(self._prepare(x) for x in inputs)
            if self.cuda_graphs:
                try:
                    with self._lock:
                        return self._replay(inputs)
                except _CaptureFailed as failed:
                    # Some op cannot be captured (a host sync, say): the network still runs, only slower.
                    log.warning("engine %s: CUDA graph capture failed (%s); running it eagerly", self.name, failed)
                    self.cuda_graphs = False
                    self._graphs.clear()
            return self._eager(inputs)

    def capture(self, *example_inputs: torch.Tensor) -> None:
        """Capture every batch size now (example rows are repeated), so no call pays for a capture later."""
        with torch.inference_mode(), _on_device(self.device):
            example = tuple(self._prepare(x[:1]) for x in example_inputs)
            for size in self.batch_sizes:
                self._graph_for(tuple(x.expand(size, *x.shape[1:]) for x in example), size)

    def _graph_key(self, inputs: tuple[torch.Tensor, ...], size: int) -> tuple:
        return (size, *((tuple(x.shape[1:]), x.dtype) for x in inputs))

    def _graph_for(self, inputs: tuple[torch.Tensor, ...], size: int) -> _CapturedGraph:
        key = self._graph_key(inputs, size)
        if key not in self._graphs:
            try:
                self._graphs[key] = self._capture(inputs, size)
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError as e:
                raise _CaptureFailed(str(e).splitlines()[0][:200]) from e
        return self._graphs[key]

    def _capture(self, inputs: tuple[torch.Tensor, ...], size: int) -> _CapturedGraph:
        """Warm up on a side stream (cuDNN autotuning, lazy allocations), then record one forward."""
        static_inputs = tuple(self._prepare(_pad_rows(x, size).clone()) for x in inputs)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._eager(static_inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        caller = torch.cuda.current_stream(self.device)
        side.wait_stream(caller)
        try:
            # On this engine's own side stream (torch's default capture stream is one per process, made on whichever
            # device was current first); thread_local: other threads (the crop stage's uploads) may use CUDA meanwhile.
            with torch.cuda.graph(graph, pool=self._pool, stream=side, capture_error_mode="thread_local"):
                static_outputs = self._eager(static_inputs)
        except RuntimeError:
            # A failed capture leaves the capture stream current (torch restores it only after a successful end):
            # the eager fallback must run on the caller's stream, which the caller waits on.
            torch.cuda.set_stream(caller)
            raise
        log.debug("engine %s: captured a CUDA graph for batch %d", self.name, size)
        return _CapturedGraph(graph, static_inputs, static_outputs)

    def _replay(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        batch = inputs[0].shape[0]
        size = padded_batch(batch, self.batch_sizes)
        captured = self._graph_for(inputs, size)
        current = torch.cuda.current_stream(self.device)
        if self._last_replay is not None:
            current.wait_event(self._last_replay)
        for static, x in zip(captured.inputs, inputs):
            static.copy_(_pad_rows(x, size))
        captured.graph.replay()
        # Clone: the static outputs are overwritten by the next replay of any graph sharing the pool.
        outputs = tuple(o[:batch].clone() for o in captured.outputs)
        self._last_replay = torch.cuda.Event()
        self._last_replay.record(current)
        return outputs


def _pad_rows(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, ...) → (size, ...) with the last row repeated (a view-based expand when no padding is needed)."""
    missing = size - x.shape[0]
    if missing == 0:
        return x
    return torch.cat([x, x[-1:].expand(missing, *x.shape[1:])])


# --------------------------------------------------------------------------------------------------
# The networks a model is made of, as tensor-in/tensor-out modules
# --------------------------------------------------------------------------------------------------


@dataclass
class Network:
    """One network of a model, ready for an engine: ``module(*inputs) → tuple of outputs``, all batched.

    ``inputs`` maps each input name to its shape without the batch dimension and to how to sample a
    plausible example (``"image01"``: RGB in [0, 1]; ``"image11"``: in [-1, 1]; ``"code"``: N(0, 1);
    ``"pose"``: axis-angle within ±0.3 rad; a tensor: that tensor (e.g. FLAME's template vertices) with 0.5 mm
    of noise).
    """

    name: str
    module: nn.Module
    inputs: dict[str, tuple[tuple[int, ...], str | torch.Tensor]]
    outputs: tuple[str, ...]

    def example_inputs(self, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Random inputs of the right shapes and ranges (CPU, fp32)."""
        gen = torch.Generator().manual_seed(seed)
        samplers = {
            "image01": lambda s: torch.rand(s, generator=gen),
            "image11": lambda s: torch.rand(s, generator=gen) * 2 - 1,
            "code": lambda s: torch.randn(s, generator=gen),
            "pose": lambda s: (torch.rand(s, generator=gen) * 2 - 1) * 0.3,
        }

        def sample(shape: tuple[int, ...], kind: str | torch.Tensor) -> torch.Tensor:
            if isinstance(kind, torch.Tensor):
                noise = torch.randn(batch, *shape, generator=gen) * 5e-4
                return kind.detach().cpu().float().expand(batch, *shape) + noise
            return samplers[kind]((batch, *shape))

        return tuple(sample(shape, kind) for shape, kind in self.inputs.values())

    def output_shapes(self) -> dict[str, list[int]]:
        """Output name → shape with -1 for the batch, measured by running the module once at batch 1."""
        device = next(self.module.parameters(), next(self.module.buffers(), torch.empty(0))).device
        with torch.no_grad():
            outputs = _as_tuple(self.module.eval()(*(x.to(device) for x in self.example_inputs(1))))
        return {n: [-1, *o.shape[1:]] for n, o in zip(self.outputs, outputs)}

    def input_shapes(self) -> dict[str, list[int]]:
        return {n: [-1, *shape] for n, (shape, _) in self.inputs.items()}


class FlameNetwork(nn.Module):
    """FLAME as a tuple-returning network: codes → (vertices, landmarks2d, landmarks3d[, landmarks_mediapipe])."""

    def __init__(self, flame: nn.Module):
        super().__init__()
        self.flame = flame

    def forward(self, shapecode: torch.Tensor, expcode: torch.Tensor, globalpose: torch.Tensor,
                jawpose: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, 300), (B, n_exp), (B, 3), (B, 3) → (B, V, 3), (B, 68, 3), (B, 68, 3)[, (B, 105, 3)]."""
        out = self.flame(shapecode, expcode, globalpose, jawpose)
        names = ("vertices", "landmarks2d", "landmarks3d", "landmarks_mediapipe")
        return tuple(out[n] for n in names if n in out)


class DetailDecoderNetwork(nn.Module):
    """D_detail and the UV geometry: codes + coarse vertices → (displacement_map, uv_detail_normals).

    The same composition as ``DetailBranch.decode`` (EMICA) and ``DecaModel.decode`` (DECA/EMOCA).
    """

    def __init__(self, generator: nn.Module, uv: nn.Module, n_exp: int):
        super().__init__()
        self.generator = generator
        self.uv = uv
        self.n_exp = n_exp

    def forward(self, jawpose: torch.Tensor, expcode: torch.Tensor, detailcode: torch.Tensor,
                vertices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3), (B, ≥ n_exp), (B, 128), (B, V, 3) → (B, 1, 256, 256), (B, 3, 256, 256)."""
        uv_z = self.generator(detail_condition(jawpose, expcode[:, : self.n_exp], detailcode))
        return tuple(self.uv(uv_z, vertices))


#: The networks of a coarse model, in pipeline order, and the extra ones of detail mode.
COARSE_NETWORKS = ("mica", "deca", "expression", "flame")
DETAIL_NETWORKS = ("detail_encoder", "detail_decoder")
#: Networks that always run in fp32, whatever precision is asked for; both are cheap (< 1 GMAC) and not safe
#: in half precision: FLAME sums 400 blend shapes into millimetre-scale offsets and picks its contour
#: landmarks by rounding a yaw angle, and the detail decoder's normals come from cross products of
#: neighbouring UV-grid points about 1 mm apart, far below fp16's resolution at head scale (~0.05 mm).
FP32_ONLY_NETWORKS = ("flame", "detail_decoder")


def network_precision(network: str, precision: str) -> str:
    """The precision ``network`` actually runs at when ``precision`` is asked for (see FP32_ONLY_NETWORKS)."""
    return "fp32" if network in FP32_ONLY_NETWORKS else precision

_IMAGE = {"image": ((3, 224, 224), "image01")}


def model_networks(model: nn.Module) -> dict[str, Network]:
    """The exportable networks of a loaded model (``realtime.models.load_model``), by name, in pipeline order.

    EMICA: ``mica`` (mica_image (B, 3, 112, 112) in [-1, 1] → shapecode (B, 300)), ``deca`` (image (B, 3, 224,
    224) in [0, 1] → the raw DECA-branch code, split by ``model.deca_predicts``), ``expression`` (image → the
    raw expression code, split by ``model.expression_predicts``), ``flame`` (shapecode, expcode, globalpose,
    jawpose → vertices, landmarks2d, landmarks3d[, landmarks_mediapipe]). DECA/EMOCA: ``deca`` is E_flame
    (split by ``model.flame_split``), ``expression`` exists for EMOCA only, no ``mica``. Detail mode adds
    ``detail_encoder`` (image → detailcode (B, 128)) and ``detail_decoder`` (jawpose, expcode, detailcode,
    vertices → displacement_map (B, 1, 256, 256), uv_detail_normals (B, 3, 256, 256)).
    """
    if isinstance(model, EMICA):
        encoders = model.face_encoder
        flame = model.shape_model.flame
        image_nets = {
            "mica": (encoders.mica_deca_encoder.mica_encoder, {"mica_image": ((3, 112, 112), "image11")}, "shapecode"),
            "deca": (encoders.mica_deca_encoder.deca_encoder, _IMAGE, "deca_code"),
            "expression": (encoders.expression_encoder, _IMAGE, "expression_code"),
        }
        detail = model.detail
        detail_parts = None if detail is None else (detail.E_detail, detail.D_detail, detail.uv, detail.n_exp)
    elif isinstance(model, DecaModel):
        deca = model.deca
        flame = deca.flame
        image_nets = {"deca": (deca.E_flame, _IMAGE, "deca_code")}
        if deca.E_expression is not None:
            image_nets["expression"] = (deca.E_expression, _IMAGE, "expression_code")
        detail_parts = None if model.uv is None else (deca.E_detail, deca.D_detail, model.uv, model.n_exp)
    else:
        raise TypeError(f"model_networks needs an EMICA or DecaModel, got {type(model).__name__}")

    networks = [Network(name, module, dict(inputs), (output,)) for name, (module, inputs, output) in image_nets.items()]
    networks.append(Network(
        "flame",
        FlameNetwork(flame),
        {"shapecode": ((flame.n_shape,), "code"), "expcode": ((flame.n_exp,), "code"),
         "globalpose": ((3,), "pose"), "jawpose": ((3,), "pose")},
        ("vertices", "landmarks2d", "landmarks3d") + (("landmarks_mediapipe",) if flame.has_mediapipe else ()),
    ))
    if detail_parts is not None:
        encoder, generator, uv, n_exp = detail_parts
        template = flame.v_template
        networks += [
            Network("detail_encoder", encoder, dict(_IMAGE), ("detailcode",)),
            Network(
                "detail_decoder",
                DetailDecoderNetwork(generator, uv, n_exp),
                {"jawpose": ((3,), "pose"), "expcode": ((flame.n_exp,), "code"), "detailcode": ((128,), "code"),
                 "vertices": (tuple(template.shape), template)},
                ("displacement_map", "uv_detail_normals"),
            ),
        ]
    return {n.name: n for n in networks}


# --------------------------------------------------------------------------------------------------
# ONNX export and ONNX Runtime
# --------------------------------------------------------------------------------------------------


def export_onnx(
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    path: str | Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_batch: bool = True,
    opset: int = 17,
) -> Path:
    """Export ``module`` (fp32, eval mode, CPU tensors) to ONNX at ``path``, written atomically.

    With ``dynamic_batch`` every input and output gets a symbolic leading dimension "batch", so a file
    exported at batch 1 runs at any batch. Returns the path.
    """
    path = Path(path)
    if len(example_inputs) != len(input_names):
        raise ValueError(f"{len(example_inputs)} example inputs but {len(input_names)} input names")
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic_axes = {n: {0: "batch"} for n in (*input_names, *output_names)} if dynamic_batch else None
    module = module.eval()
    with atomic_path(path) as temp, torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of torch.export's, but it traces every network
        # here as-is and names dynamic axes reliably; its deprecation notice is not the user's concern.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*TorchScript-based ONNX export")
        # Shape checks on non-batch dimensions (FLAME's code sizes) are constants of the export, as they should be;
        # the ONNX check against PyTorch that follows every export is what guards the trace.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            module,
            tuple(example_inputs),
            str(temp),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return path


def relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """max |actual − reference| / max |reference|: an error relative to the output's scale.

    Element-wise relative errors blow up where the reference crosses zero, so the scale is the whole output's.
    """
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    diff = float(np.max(np.abs(actual.astype(np.float64) - reference.astype(np.float64)))) if reference.size else 0.0
    return diff / max(scale, np.finfo(np.float32).tiny)


def validate_onnx(
    module: nn.Module, onnx_path: str | Path, inputs: Sequence[torch.Tensor], rtol: float = 1e-4
) -> float:
    """Run ``module`` (PyTorch fp32, CPU) and the ONNX file (ONNX Runtime, CPU) on ``inputs``.

    Returns the largest ``relative_error`` over the outputs; raises ExportMismatchError naming the output
    when it exceeds ``rtol`` or when the output shapes differ.
    """
    ort = _import_onnxruntime()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.detach().cpu().float().numpy() for i, x in zip(session.get_inputs(), inputs)}
    got = session.run(None, feeds)
    with torch.no_grad():
        want = [o.float().numpy() for o in _as_tuple(module.eval()(*(x.cpu() for x in inputs)))]
    names = [o.name for o in session.get_outputs()]
    if len(got) != len(want):
        raise ExportMismatchError(f"{onnx_path}: ONNX gives {len(got)} outputs, PyTorch {len(want)}")
    worst = 0.0
    for name, a, b in zip(names, got, want):
        if a.shape != b.shape:
            raise ExportMismatchError(f"{onnx_path}: output {name!r} has shape {a.shape} in ONNX, {b.shape} in PyTorch")
        err = relative_error(a, b)
        if not err <= rtol:  # also catches NaN
            raise ExportMismatchError(
                f"{onnx_path}: output {name!r} differs from PyTorch by {err:.3g} (relative), above {rtol:g}"
            )
        worst = max(worst, err)
    return worst


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise UserError("ONNX Runtime is not installed: pip install onnxruntime (or onnxruntime-gpu for CUDA)") from e
    return onnxruntime


class OnnxRuntimeEngine(Engine):
    """An ONNX file run by ONNX Runtime: the CPU provider, or the CUDA provider for a cuda device.

    Runs the fp32 export only (fp16 belongs to TensorRT or torch). On CUDA, inputs and outputs are bound
    to torch device memory (IO binding), so tensors never round-trip through the host.
    """

    backend = "onnxruntime"

    def __init__(
        self,
        onnx_path: str | Path,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        max_batch: int = 64,
        threads: Optional[int] = None,
        name: Optional[str] = None,
    ):
        _check_precision(precision)
        ort = _import_onnxruntime()
        self.path = Path(onnx_path)
        self.device = torch.device(device)
        self.name = name or self.path.stem
        if precision != "fp32":
            raise UserError(f"ONNX Runtime runs the fp32 export only; for {precision} use --backend tensorrt or torch")
        if not self.path.is_file():
            raise AssetError(f"ONNX file {self.path} not found: "
                             f"{rebuild_command(self.path.parent.name, onnx_only=True)}")
        self.precision = precision
        providers = ["CPUExecutionProvider"]
        provider_options: list[dict] = [{}]
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise UserError("this onnxruntime has no CUDA provider: "
                                "pip uninstall onnxruntime && pip install onnxruntime-gpu")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
            self.device = torch.device("cuda", self.device.index if self.device.index is not None
                                       else torch.cuda.current_device())
            provider_options = [{"device_id": self.device.index}, {}]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The networks run one after another, each in its own session: spinning worker threads of the
        # session that just ran kept the cores from the next one (2-core box: coarse total 263 → 159 ms).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.path), options, providers=providers,
                                            provider_options=provider_options)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._output_shapes = [o.shape for o in self.session.get_outputs()]
        fixed = self.session.get_inputs()[0].shape[0]
        self.max_batch = fixed if isinstance(fixed, int) else max_batch

    def _run(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        _check_arity(self.name, self.input_names, inputs)
        if self.device.type == "cuda":
            return self._run_bound(inputs)
        feeds = {n: x.detach().to("cpu", torch.float32).contiguous().numpy() for n, x in zip(self.input_names, inputs)}
        return tuple(torch.from_numpy(o) for o in self.session.run(self.output_names, feeds))

    def _run_bound(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """CUDA: bind torch tensors' device memory as ORT's inputs and outputs."""
        batch = inputs[0].shape[0]
        binding = self.session.io_binding()
        device_id = self.device.index
        inputs = tuple(x.to(self.device, torch.float32).contiguous() for x in inputs)
        for n, x in zip(self.input_names, inputs):
            binding.bind_input(n, "cuda", device_id, np.float32, list(x.shape), x.data_ptr())
        outputs = []
        for n, shape in zip(self.output_names, self._output_shapes):
            if not all(isinstance(d, int) for d in shape[1:]):
                raise ValueError(f"{self.path}: output {n!r} has a symbolic non-batch dimension {shape}")
            out = torch.empty((batch, *shape[1:]), dtype=torch.float32, device=self.device)
            binding.bind_output(n, "cuda", device_id, np.float32, list(out.shape), out.data_ptr())
            outputs.append(out)
        # ORT runs on its own CUDA stream: torch's pending writes to the inputs must land first.
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        return tuple(outputs)


# --------------------------------------------------------------------------------------------------
# TensorRT
# --------------------------------------------------------------------------------------------------


def _import_tensorrt():
    try:
        import tensorrt
    except ImportError as e:
        raise UserError(f"TensorRT is not installed: {TRT_INSTALL_HINT}; or use --backend torch") from e
    return tensorrt


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int64: torch.int64,
             trt.int8: torch.int8, trt.bool: torch.bool}
    if dtype not in table:
        raise AssetError(f"TensorRT tensor type {dtype} is not supported by this engine runner")
    return table[dtype]


class TensorRTEngine(Engine):
    """A serialized TensorRT 10 engine (one optimisation profile, dynamic batch) on a CUDA stream.

    Device buffers for every input and output are allocated once at the profile's max batch (torch tensors);
    a call copies the inputs in, sets the input shapes, and enqueues ``execute_async_v3`` on ``stream``, or,
    when none was given, on the caller's current stream (so a ``realtime.streams.StreamFork`` branch runs it
    beside the other networks).
    Batches below the profile's minimum are padded (last row repeated). Outputs come back as fp32 copies.
    """

    backend = "tensorrt"

    def __init__(
        self,
        engine_path: str | Path,
        stream: Optional["torch.cuda.Stream"] = None,
        manifest: Optional["EngineManifest"] = None,
        name: Optional[str] = None,
        device: str | torch.device = "cuda",
    ):
        trt = _import_tensorrt()
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise AssetError(f"TensorRT engine {self.path} not found: {rebuild_command(self.path.parent.name)}")
        manifest = manifest or load_manifest(manifest_path(self.path))
        self.name = name or manifest.network
        self.precision = manifest.precision
        device = torch.device(device)
        self.device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        self.stream = stream
        with _on_device(self.device):  # TensorRT loads onto, and allocates on, the current CUDA device
            self._load(trt, manifest)
        # One execution context and one set of buffers: one call at a time, and on the GPU after the previous one.
        self._lock = threading.Lock()
        self._last_call: Optional["torch.cuda.Event"] = None

    def _load(self, trt, manifest: "EngineManifest") -> None:
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise StaleEngineError(
                f"TensorRT could not load {self.path} (built by another TensorRT version or for another GPU?): "
                f"{_manifest_rebuild(manifest)}"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        lo, _, hi = self.engine.get_tensor_profile_shape(self.input_names[0], 0)
        self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        # Inputs at their profile's max shape; outputs at max batch (their other dimensions are static).
        shapes = {n: tuple(self.engine.get_tensor_profile_shape(n, 0)[2]) for n in self.input_names}
        shapes.update({n: (self.max_batch, *tuple(self.engine.get_tensor_shape(n))[1:]) for n in self.output_names})
        self._buffers = {
            n: torch.empty(shape, dtype=_torch_dtype(trt, self.engine.get_tensor_dtype(n)), device=self.device)
            for n, shape in shapes.items()
        }
        for n, buf in self._buffers.items():
            self.context.set_tensor_address(n, buf.data_ptr())

    def _run(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        _check_arity(self.name, self.input_names, inputs)
        batch = inputs[0].shape[0]
        size = max(batch, self.min_batch)
        caller = torch.cuda.current_stream(self.device)
        stream = self.stream or caller
        stream.wait_stream(caller)  # the inputs may still be being written on the caller's stream
        with self._lock, _on_device(self.device), torch.cuda.stream(stream):
            if self._last_call is not None:
                stream.wait_event(self._last_call)
            for n, x in zip(self.input_names, inputs):
                buf = self._buffers[n]
                buf[:size].copy_(_pad_rows(x.to(self.device, non_blocking=True), size))
                self.context.set_input_shape(n, (size, *buf.shape[1:]))
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"TensorRT failed to enqueue engine {self.path}")
            # Copies: the buffers are overwritten by the next call.
            outputs = tuple(self._buffers[n][:batch].to(torch.float32, copy=True) for n in self.output_names)
            self._last_call = torch.cuda.Event()
            self._last_call.record(stream)
        if stream is not caller:
            caller.wait_stream(stream)
            for o in outputs:  # made on the engine's stream, used on the caller's: not to be reused before that
                o.record_stream(caller)
        return outputs


def build_trt_engine(
    onnx_file: str | Path,
    engine_file: str | Path,
    precision: str,
    batch_profile: tuple[int, int, int],
    timing_cache: Optional[str | Path] = None,
    workspace_gib: float = 4.0,
) -> None:
    """Build a TensorRT engine from an ONNX file with one optimisation profile over the batch dimension.

    Every input gets min/opt/max shapes (batch from ``batch_profile``, other dimensions from the ONNX file).
    ``precision="fp16"`` sets the FP16 builder flag (TensorRT still keeps layers in fp32 where fp16 is
    slower or unsupported). The timing cache file is read if present and written back, so rebuilding for
    other batch profiles or precisions on the same GPU reuses measured tactics. Written atomically.
    """
    trt = _import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_file).read_bytes(), str(onnx_file)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise AssetError(f"TensorRT could not parse {onnx_file}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if precision == "fp16":
        if not hasattr(trt.BuilderFlag, "FP16"):  # TensorRT 11 builds fp16 only from fp16 graphs (strong typing)
            raise UserError(f"TensorRT {trt.__version__} has no fp16 builder flag; build with TensorRT 10: "
                            f"{TRT_INSTALL_HINT}")
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    lo, opt, hi = batch_profile
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]
        profile.set_shape(tensor.name, (lo, *rest), (opt, *rest), (hi, *rest))
    config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    if cache is not None and not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("TensorRT did not take the timing cache %s (another GPU or TensorRT version?); measuring "
                    "tactics afresh", cache_path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_file} (see the TensorRT log above)")
    atomic_write_bytes(engine_file, bytes(serialized))
    updated = config.get_timing_cache()
    if cache_path and updated is not None:
        atomic_write_bytes(cache_path, bytes(updated.serialize()))


# --------------------------------------------------------------------------------------------------
# Files: names, checksums, manifests, staleness
# --------------------------------------------------------------------------------------------------


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' → 'nvidia-h100-80gb-hbm3' (lowercase, runs of other characters → '-')."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.")


def timing_cache_file(engines_dir: str | Path, gpu_name: str, tensorrt_version: str) -> Path:
    """engines/timing-<gpu slug>-trt<version>.cache: tactic timings hold for one GPU model and TensorRT version."""
    return Path(engines_dir) / f"timing-{slug(gpu_name)}-trt{tensorrt_version}.cache"


def onnx_file(engines_dir: str | Path, model: str, network: str) -> Path:
    """engines/<model>/<network>.onnx"""
    return Path(engines_dir) / model / f"{network}.onnx"


def engine_file(
    engines_dir: str | Path,
    model: str,
    network: str,
    precision: str,
    batch_profile: tuple[int, int, int],
    gpu_name: str,
    tensorrt_version: str,
) -> Path:
    """engines/<model>/<network>-<precision>-b<min>_<opt>_<max>-<gpu slug>-trt<version>.engine"""
    lo, opt, hi = batch_profile
    stem = f"{network}-{precision}-b{lo}_{opt}_{hi}-{slug(gpu_name)}-trt{tensorrt_version}"
    return Path(engines_dir) / model / f"{stem}.engine"


def manifest_path(file: str | Path) -> Path:
    """The JSON manifest beside an engine or ONNX file (same stem)."""
    return Path(file).with_suffix(".json")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def module_sha256(module: nn.Module) -> str:
    """sha256 of a module's weights: every parameter and buffer (persistent or not) by name, dtype, shape, bytes.

    It identifies what an export was made from more precisely than the checkpoint file's hash: it changes
    exactly when this network's weights (or FLAME/UV data it holds as buffers) change, and not when another
    network in the same checkpoint does.
    """
    digest = hashlib.sha256()
    tensors = sorted([*module.named_parameters(), *module.named_buffers()], key=lambda item: item[0])
    for name, tensor in tensors:
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@dataclass
class EngineManifest:
    """What an engine/ONNX file is and what it was built from; stored as JSON beside the file.

    ``weights_sha256`` is ``module_sha256`` of the network the file was exported from; ``onnx_sha256`` the
    ONNX file's (for an engine: the ONNX it was built from). ``inputs``/``outputs`` map tensor names (in
    order) to shapes, with -1 for the dynamic batch dimension.
    ONNX files have no GPU, TensorRT version or batch profile (``None``). ``file`` is the name of the
    described file in the manifest's folder.
    """

    model: str
    network: str
    mode: str
    precision: str
    file: str
    inputs: dict[str, list[int]]
    outputs: dict[str, list[int]]
    weights_sha256: str
    onnx_sha256: str
    batch_profile: Optional[tuple[int, int, int]] = None
    gpu_name: Optional[str] = None
    compute_capability: Optional[str] = None
    tensorrt_version: Optional[str] = None
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    format_version: int = MANIFEST_VERSION
    # Where it was loaded from; not stored.
    location: Optional[Path] = field(default=None, compare=False, repr=False)

    @property
    def path(self) -> Optional[Path]:
        """The described file (engine or ONNX) when the manifest was loaded from disk."""
        return None if self.location is None else self.location.parent / self.file

    def to_json(self) -> str:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "location"}
        if self.batch_profile is not None:
            data["batch_profile"] = list(self.batch_profile)
        return json.dumps(data, indent=2) + "\n"

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write_bytes(path, self.to_json().encode())
        self.location = path
        return path


def load_manifest(path: str | Path) -> EngineManifest:
    """Read a manifest JSON; a missing or unreadable one is an AssetError that names the file."""
    path = Path(path)
    if not path.is_file():
        raise AssetError(f"engine manifest {path} is missing: {rebuild_command(path.parent.name)}")
    try:
        data = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(EngineManifest) if f.name != "location"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}")
        if data.get("batch_profile") is not None:
            data["batch_profile"] = tuple(int(b) for b in data["batch_profile"])
        manifest = EngineManifest(**data)
    except (ValueError, TypeError) as e:
        raise AssetError(f"engine manifest {path} is not a valid manifest ({e}): "
                         f"{rebuild_command(path.parent.name)}") from e
    if manifest.format_version != MANIFEST_VERSION:
        raise StaleEngineError(f"engine manifest {path} has format {manifest.format_version}, this version reads "
                               f"{MANIFEST_VERSION}: {_manifest_rebuild(manifest)}")
    manifest.location = path
    return manifest


@dataclass
class EngineRequirements:
    """What an engine must match to be used here; ``None`` fields are not checked."""

    model: str
    network: str
    precision: str
    mode: str = "coarse"
    weights_sha256: Optional[str] = None
    onnx_sha256: Optional[str] = None
    gpu_name: Optional[str] = None
    compute_capability: Optional[str] = None
    tensorrt_version: Optional[str] = None
    batch_size: Optional[int] = None
    # The build_engines.py flags this run needs beyond model, mode and precision (its --assets_dir,
    # --engines_dir, --detail_model), so that the rebuild command in a message can be pasted as it is.
    build_flags: tuple[str, ...] = ()


def rebuild_command(
    model: str,
    mode: str = "coarse",
    precision: Optional[str] = None,
    batch_profile: Optional[Sequence[int]] = None,
    onnx_only: bool = False,
    build_flags: Sequence[str] = (),
) -> str:
    """The build_engines.py command line that (re)creates such files, as an instruction."""
    cmd = f"run python build_engines.py --model {model}"
    if mode != "coarse":
        cmd += f" --mode {mode}"
    if build_flags:
        cmd += " " + " ".join(shlex.quote(str(f)) for f in build_flags)
    if onnx_only:
        return cmd + " --onnx-only"
    if precision:
        cmd += f" --precision {precision}"
    if batch_profile:
        cmd += f" --batch {','.join(str(b) for b in batch_profile)}"
    return cmd


def _manifest_rebuild(manifest: EngineManifest, batch_size: Optional[int] = None, build_flags: Sequence[str] = ()) -> str:
    """The command that rebuilds ``manifest``'s file, with the batch profile widened to hold ``batch_size``."""
    profile = manifest.batch_profile
    if profile is not None and batch_size is not None:
        lo, opt, hi = profile
        profile = (min(lo, batch_size), opt, max(hi, batch_size))
    return rebuild_command(manifest.model, manifest.mode, manifest.precision, profile,
                           onnx_only=manifest.tensorrt_version is None, build_flags=build_flags)


def engine_problems(manifest: EngineManifest, expected: EngineRequirements) -> list[str]:
    """Every way ``manifest`` fails ``expected``, each as a short phrase; empty when the engine is usable."""
    problems = []
    path = manifest.path
    if path is not None and not path.is_file():
        problems.append(f"the file {path} is missing")
    for key in ("model", "network", "precision"):
        if getattr(manifest, key) != getattr(expected, key):
            problems.append(f"it is for {key} {getattr(manifest, key)!r}, not {getattr(expected, key)!r}")
    if expected.weights_sha256 and manifest.weights_sha256 != expected.weights_sha256:
        problems.append(f"the checkpoint changed (weights sha256 {manifest.weights_sha256[:12]}… when built, "
                        f"{expected.weights_sha256[:12]}… now)")
    if expected.onnx_sha256 and manifest.onnx_sha256 != expected.onnx_sha256:
        problems.append(f"the ONNX export changed (sha256 {manifest.onnx_sha256[:12]}… when built, "
                        f"{expected.onnx_sha256[:12]}… now)")
    if expected.gpu_name and manifest.gpu_name != expected.gpu_name:
        problems.append(f"it was built for another GPU ({manifest.gpu_name}; this one is {expected.gpu_name})")
    elif expected.compute_capability and manifest.compute_capability != expected.compute_capability:
        problems.append(f"it was built for compute capability {manifest.compute_capability}, "
                        f"this GPU has {expected.compute_capability}")
    if expected.tensorrt_version and manifest.tensorrt_version != expected.tensorrt_version:
        problems.append(f"it was built with another TensorRT version ({manifest.tensorrt_version}; "
                        f"installed: {expected.tensorrt_version})")
    if expected.batch_size is not None and manifest.batch_profile is not None:
        lo, _, hi = manifest.batch_profile
        if not lo <= expected.batch_size <= hi:
            problems.append(f"batch {expected.batch_size} is outside its batch profile {lo}..{hi}")
    return problems


def check_engine(manifest: EngineManifest, expected: EngineRequirements) -> None:
    """Raise StaleEngineError naming every difference and the rebuild command; return None when usable."""
    problems = engine_problems(manifest, expected)
    if problems:
        what = manifest.path or f"{manifest.model}/{manifest.file}"
        wanted = dataclasses.replace(manifest, model=expected.model, mode=expected.mode, precision=expected.precision)
        raise StaleEngineError(f"{what} cannot be used: {'; '.join(problems)}. To rebuild, "
                               f"{_manifest_rebuild(wanted, expected.batch_size, expected.build_flags)}")


def find_engine(engines_dir: str | Path, expected: EngineRequirements) -> Path:
    """The first usable TensorRT engine for ``expected`` under engines/<model>/, checked against its manifest.

    Raises StaleEngineError listing why each candidate is unusable, or AssetError when there is none.
    """
    folder = Path(engines_dir) / expected.model
    candidates = sorted(folder.glob(f"{expected.network}-{expected.precision}-b*.engine"))
    problems = []
    for candidate in candidates:
        try:
            check_engine(load_manifest(manifest_path(candidate)), expected)
            return candidate
        except AssetError as e:
            problems.append(str(e))
    if problems:
        raise StaleEngineError(" | ".join(problems))
    command = rebuild_command(expected.model, expected.mode, expected.precision, build_flags=expected.build_flags)
    raise AssetError(f"no {expected.precision} TensorRT engine for {expected.network} in {folder}: {command}")


def check_onnx(engines_dir: str | Path, expected: EngineRequirements) -> Path:
    """engines/<model>/<network>.onnx when it exists, is the file its manifest describes and fits ``expected``."""
    path = onnx_file(engines_dir, expected.model, expected.network)
    if not path.is_file():
        command = rebuild_command(expected.model, expected.mode, onnx_only=True, build_flags=expected.build_flags)
        raise AssetError(f"no ONNX export {path}: {command}")
    manifest = load_manifest(manifest_path(path))
    check_engine(manifest, expected)
    actual = file_sha256(path)
    if actual != manifest.onnx_sha256:
        raise StaleEngineError(f"{path} was modified after export (sha256 {actual[:12]}…, its manifest says "
                               f"{manifest.onnx_sha256[:12]}…). To rebuild, "
                               f"{_manifest_rebuild(manifest, build_flags=expected.build_flags)}")
    return path


# --------------------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Availability:
    """What this machine offers; ``probe_availability`` measures it, tests construct it."""

    cuda: bool
    gpu_name: Optional[str] = None
    compute_capability: Optional[str] = None  # "9.0"
    tensorrt_version: Optional[str] = None  # None: tensorrt is not importable
    onnxruntime: bool = False
    onnxruntime_cuda: bool = False


def probe_availability(device: str | torch.device = "cuda") -> Availability:
    """CUDA (and the GPU's name/capability), TensorRT and ONNX Runtime as installed here."""
    device = torch.device(device)
    cuda = torch.cuda.is_available()
    gpu_name = capability = None
    if cuda:
        index = device.index if device.type == "cuda" and device.index is not None else 0
        gpu_name = torch.cuda.get_device_name(index)
        capability = "{}.{}".format(*torch.cuda.get_device_capability(index))
    trt_version = None
    if importlib.util.find_spec("tensorrt") is not None:
        try:
            import tensorrt

            trt_version = str(tensorrt.__version__)
        except ImportError:  # the PyPI stub packages install a `tensorrt` that fails to import
            trt_version = None
    ort = ort_cuda = False
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        ort = True
        ort_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    return Availability(cuda, gpu_name, capability, trt_version, ort, ort_cuda)


def select_backend(
    requested: str,
    device: str,
    engines_dir: str | Path,
    model: str,
    networks: Sequence[str],
    precision: str = "fp32",
    batch_size: int = 1,
    weights: Optional[Mapping[str, str]] = None,
    mode: str = "coarse",
    available: Optional[Availability] = None,
    build_flags: Sequence[str] = (),
) -> tuple[str, str]:
    """Pick the backend for ``model``'s ``networks`` and say why: returns (backend, reason).

    ``auto``: TensorRT when it is installed, the device is a GPU and valid engines exist for every network;
    else torch on CUDA (CUDA graphs); on the CPU ONNX Runtime when installed and valid fp32 ONNX exports
    exist; else torch eager. An explicit request that cannot be met raises a UserError with the fix.
    ``weights`` maps network names to ``module_sha256`` of the loaded networks; files made from other
    weights are stale (networks missing from it are not checked for that). ``build_flags``: see
    ``EngineRequirements``. The choice is logged in one line.
    """
    if requested not in ("auto", *BACKENDS):
        raise UserError(f"--backend must be auto, {', '.join(BACKENDS)} (got {requested!r})")
    _check_precision(precision)
    available = available or probe_availability(device)
    on_gpu = torch.device(device).type == "cuda"
    if on_gpu and not available.cuda:
        raise UserError(f"--device {device} but no CUDA GPU is visible; use --device cpu")
    ask = _Ask(Path(engines_dir), model, tuple(networks), precision, batch_size, mode, on_gpu, available,
               dict(weights or {}), tuple(build_flags))
    if requested == "auto":
        backend, reason = _choose_auto(ask)
    else:
        backend, reason = requested, "requested; " + _CHOOSERS[requested](ask)
    log.info("inference backend: %s (%s)", backend, reason)
    return backend, reason


@dataclass(frozen=True)
class _Ask:
    """One backend question: what to run, where, and what the machine offers."""

    engines_dir: Path
    model: str
    networks: tuple[str, ...]
    precision: str
    batch_size: int
    mode: str
    on_gpu: bool
    available: Availability
    weights: dict[str, str]
    build_flags: tuple[str, ...] = ()

    def requirements(self, network: str, precision: str, **hardware: Any) -> EngineRequirements:
        return EngineRequirements(self.model, network, precision, mode=self.mode,
                                  weights_sha256=self.weights.get(network), build_flags=self.build_flags, **hardware)


def _choose_auto(ask: _Ask) -> tuple[str, str]:
    preferred = "tensorrt" if ask.on_gpu else "onnxruntime"
    try:
        return preferred, _CHOOSERS[preferred](ask)
    except UserError as e:
        return "torch", f"{preferred} not used: {e}; " + _choose_torch(ask)


def _choose_tensorrt(ask: _Ask) -> str:
    a = ask.available
    if a.tensorrt_version is None:
        raise UserError(f"TensorRT is not installed: {TRT_INSTALL_HINT}")
    if not ask.on_gpu:
        raise UserError("TensorRT needs a CUDA GPU: use --device cuda:0 (or --backend onnxruntime / torch on the CPU)")
    for network in ask.networks:
        expected = ask.requirements(network, network_precision(network, ask.precision), gpu_name=a.gpu_name,
                                    compute_capability=a.compute_capability, tensorrt_version=a.tensorrt_version,
                                    batch_size=ask.batch_size)
        find_engine(ask.engines_dir, expected)
    return f"TensorRT {a.tensorrt_version} engines for {a.gpu_name} in {ask.engines_dir / ask.model}"


def _choose_onnxruntime(ask: _Ask) -> str:
    if not ask.available.onnxruntime:
        raise UserError("ONNX Runtime is not installed: pip install onnxruntime")
    if ask.on_gpu and not ask.available.onnxruntime_cuda:
        raise UserError("ONNX Runtime has no CUDA provider here: pip install onnxruntime-gpu, or use --device cpu")
    if ask.precision != "fp32":
        raise UserError(f"ONNX Runtime runs the fp32 export only (asked for {ask.precision}); use --precision fp32")
    for network in ask.networks:
        check_onnx(ask.engines_dir, ask.requirements(network, "fp32"))
    return f"ONNX Runtime on the {'GPU' if ask.on_gpu else 'CPU'} with the exports in {ask.engines_dir / ask.model}"


def _choose_torch(ask: _Ask) -> str:
    if ask.on_gpu:
        return f"PyTorch {ask.precision} with CUDA graphs on {ask.available.gpu_name}"
    if ask.precision != "fp32":
        raise UserError(f"{ask.precision} needs a CUDA GPU; use --precision fp32 on the CPU")
    return "PyTorch eager fp32 on the CPU"


_CHOOSERS: dict[str, Callable[[_Ask], str]] = {
    "tensorrt": _choose_tensorrt,
    "onnxruntime": _choose_onnxruntime,
    "torch": _choose_torch,
}


def create_engines(
    backend: str,
    networks: Mapping[str, Network],
    device: str | torch.device,
    precision: str,
    engines_dir: str | Path,
    model: str,
    mode: str = "coarse",
    batch_sizes: Sequence[int] = (1, 4, 16),
    weights: Optional[Mapping[str, str]] = None,
    compile: bool = False,
    build_flags: Sequence[str] = (),
) -> dict[str, Engine]:
    """One engine per network for the backend ``select_backend`` chose, by network name.

    Each network runs at ``network_precision(name, precision)``. torch: a TorchEngine over the network's
    module (CUDA graphs for ``batch_sizes`` on a GPU; ``torch.compile`` first with ``compile``); onnxruntime:
    the checked ONNX exports; tensorrt: the first valid engine per network whose batch profile holds the largest of
    ``batch_sizes`` (the one ``select_backend`` checked), on the caller's stream. ``weights`` (network →
    ``module_sha256``) re-checks the files against the loaded weights.
    """
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    weights = weights or {}
    hardware: dict[str, Any] = {}
    if backend == "tensorrt":
        a = probe_availability(device)
        hardware = {"gpu_name": a.gpu_name, "compute_capability": a.compute_capability,
                    "tensorrt_version": a.tensorrt_version, "batch_size": max(batch_sizes)}
    engines: dict[str, Engine] = {}
    for name, net in networks.items():
        net_precision = "fp32" if backend == "onnxruntime" else network_precision(name, precision)
        wanted = EngineRequirements(model, name, net_precision, mode=mode, weights_sha256=weights.get(name),
                                    build_flags=tuple(build_flags), **hardware)
        if backend == "torch":
            engines[name] = TorchEngine(net.module, device, net_precision, batch_sizes=batch_sizes, name=name,
                                        compile=compile)
        elif backend == "onnxruntime":
            path = check_onnx(engines_dir, wanted)
            engines[name] = OnnxRuntimeEngine(path, device, "fp32", max_batch=max(batch_sizes), name=name)
        else:
            engines[name] = TensorRTEngine(find_engine(engines_dir, wanted), name=name, device=device)
    return engines
