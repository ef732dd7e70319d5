"""EMICA / EMOCA / DECA in the pipeline: crops in, Reconstructions out.

Per batch: the 224 crops (and, for EMICA, the 112 ArcFace crops from MediaPipe's eye, nose and
mouth-corner landmarks aligned to the ArcFace template) → encoders → optional smoothing of the
per-frame codes → FLAME → one Reconstruction per face, whose `world_to_frame` is the orthographic
camera composed with the crop similarity (so the renderer draws straight onto the full frame).

Where this differs from inferno: inferno builds the ArcFace crop by running SCRFD on the 224 crop
and aligning its 5 keypoints; we align MediaPipe's corresponding landmarks instead (no second
detector; same template and similarity fit, bilinear warp). MICA's identity then differs slightly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .config import ModelConfig, RunConfig
from .crop import arcface_matrix, arcface_points, warp_arcface, warp_crop
from .errors import UserError
from .gpu_crop import FrameUploader, arcface_batch, crop_batch, unique_frames
from .streams import StreamFork, to_host
from .types import Face, FrameResult, Reconstruction

log = logging.getLogger("realtime")

MODEL_IMAGE_SIZE = 224  # the encoders' AvgPool2d(7) fixes it
CODE_KEYS = ("shapecode", "expcode", "texcode", "jawpose", "globalpose", "cam", "lightcode", "detailcode")
SMOOTHED_KEYS = ("globalpose", "jawpose", "cam", "expcode")  # identity is cached instead; light/tex need none


@dataclass
class CropInputs:
    """One frame's network inputs, cut by ``ModelReconstructor.prepare``.

    ``image``: (F, 3, 224, 224) float in [0, 1]; ``arcface``: (F, 3, 112, 112) in [−1, 1] or None when the model
    has no MICA; on the model's device. ``ready``: on a GPU, the CUDA event after which they are written.
    """

    image: torch.Tensor
    arcface: Optional[torch.Tensor]
    ready: Optional["torch.cuda.Event"] = None


class ModelReconstructor:
    """Runs a model from `realtime.models.load_model` on tracked faces."""

    def __init__(self, cfg: RunConfig, smoother=None, identity_cache: Optional[bool] = None):
        from .models import load_model
        from .models.emica import EMICA

        m = cfg.model
        if cfg.tracking.image_size != MODEL_IMAGE_SIZE:
            raise UserError(f"--image_size must be {MODEL_IMAGE_SIZE} for {m.name} (its encoders take 224x224 crops)")
        self.name = m.name
        self.device = torch.device(m.device)
        self.model = load_model(m.name, path_to_models=m.path_to_models, assets_dir=m.assets_dir, device=self.device,
                                mode=m.mode, detail_model=m.detail_model if m.mode == "detail" and m.name.startswith("EMICA") else None)
        self.is_emica = isinstance(self.model, EMICA)
        graph_sizes = _graph_batch_sizes(m.batch_size)
        self.backend = _attach_engines(self.model, cfg, graph_sizes)
        # The image networks share no data until FLAME: on a GPU each runs on its own stream (MICA beside the ResNets).
        self.fork = StreamFork(self.device)
        if self.fork.enabled:
            _branch_image_networks(self.model, self.fork)
        self.faces = self.model.faces.detach().cpu().numpy().astype(np.int32)
        self.smoother = smoother
        self.skipped_faces = 0
        use_cache = m.identity_cache if identity_cache is None else identity_cache
        self.identity = None
        if use_cache:
            from .tracks import IdentityCache

            self.identity = IdentityCache(frames=5, refresh_every=m.identity_refresh or None)
        self.uvcoords, self.uvfaces = _uv_topology(self.model)
        # On a GPU the crops are cut there, batched; on the CPU OpenCV per face is faster (bench/bench_preprocess.py).
        self.uploader = FrameUploader(self.device) if self.device.type == "cuda" else None
        self._crop_stream = None  # prepare()'s CUDA stream, made in its thread's first call
        # FLAME (and the detail decoder) are hundreds of small kernels per batch: on a GPU, one CUDA graph.
        self.decoder = None
        if self.device.type == "cuda":
            from .engines import TorchEngine

            self.decoder = TorchEngine(DecodeNetwork(self.model), self.device, "fp32", channels_last=False,
                                       batch_sizes=graph_sizes, name="decode")
            self._warm_up(graph_sizes)

    @torch.inference_mode()
    def _warm_up(self, sizes: tuple[int, ...]) -> None:
        """Run every batch size once at start-up, so CUDA-graph capture and cuDNN autotuning happen here and not
        on the first live frames."""
        for size in sizes:
            try:
                image = torch.zeros(size, 3, MODEL_IMAGE_SIZE, MODEL_IMAGE_SIZE, device=self.device)
                with self.fork:
                    shapecode = self.model.encode_identity(image[:, :, ::2, ::2] * 2 - 1) if self.is_emica else None
                    codes = self.model.encode_frame(image) if self.is_emica else self.model.encode(image)
                if shapecode is not None:
                    codes["shapecode"] = shapecode
                self._decode(codes)
                torch.cuda.synchronize(self.device)
            except torch.cuda.OutOfMemoryError as e:
                raise UserError(f"{self.device}: not enough GPU memory for {self.name} at batch {size}: lower "
                                f"--batch_size (now {max(sizes)}) or use --precision fp16") from e

    def _decode(self, codes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.decoder is None:
            return self.model.decode(codes)
        net: DecodeNetwork = self.decoder.module
        return dict(zip(net.outputs, self.decoder(*(codes[k] for k in net.inputs))))

    # -- inputs ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def prepare(self, result: FrameResult) -> None:
        """Cut one frame's crops ahead of ``reconstruct`` (the pipeline's crop stage, on a thread of its own).

        On a GPU the frame is uploaded and cropped on a CUDA stream of this stage, so the copies and
        ``grid_sample`` of frame k+1 overlap the networks on frame k; ``reconstruct`` waits for its event.
        """
        if not result.faces:
            return
        items = [(result, f) for f in result.faces]
        # ArcFace crops only while some track of the frame still needs MICA: with the identity cache that is a
        # track's first frames. The cache is read here without a lock (reads only): if it changes before the
        # model stage, that batch falls back to cutting its crops itself (`_prepared`).
        needs_mica = self.is_emica and (
            self.identity is None or any(self.identity.needs_code(f.track_id) for f in result.faces))
        every = list(range(len(items))) if needs_mica else []
        if self.uploader is None:
            result.model_inputs = CropInputs(*self._inputs(items, every))
            return
        if self._crop_stream is None:
            self._crop_stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._crop_stream):
            image, arcface = self._device_inputs(items, every)
            ready = torch.cuda.Event()
            ready.record(self._crop_stream)
        result.model_inputs = CropInputs(image, arcface, ready)

    def _prepared(self, batch: list[FrameResult], need: list[int]) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """The batch's inputs from ``prepare`` (faces in batch order, ArcFace rows ``need``); None where a frame
        with faces has none (``reconstruct`` called without the crop stage) or lacks ArcFace crops it now needs."""
        with_faces = [r for r in batch if r.faces]
        inputs = [r.model_inputs for r in with_faces]
        if any(not isinstance(x, CropInputs) or len(x.image) != len(r.faces) for x, r in zip(inputs, with_faces)):
            return None
        if need and any(x.arcface is None for x in inputs):
            return None
        if self.uploader is not None:
            current = torch.cuda.current_stream(self.device)
            for x in inputs:
                current.wait_event(x.ready)
                for t in (x.image, x.arcface):
                    if t is not None:
                        t.record_stream(current)  # made on the crop stream, used (and freed) on this one
        image = torch.cat([x.image for x in inputs]) if len(inputs) > 1 else inputs[0].image
        if not need:
            return image, None
        arcface = torch.cat([x.arcface for x in inputs]) if len(inputs) > 1 else inputs[0].arcface
        if len(need) < len(arcface):
            arcface = arcface[torch.as_tensor(need, device=arcface.device)]
        return image, arcface

    def _inputs(self, items: list[tuple[FrameResult, Face]], need_mica: list[int]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.uploader is not None:
            return self._device_inputs(items, need_mica)
        crops = np.stack([warp_crop(r.frame.image, f.crop_matrix, MODEL_IMAGE_SIZE) for r, f in items])
        image = torch.from_numpy(crops).to(self.device)
        mica = None
        if need_mica:
            aligned = []
            for i in need_mica:
                r, f = items[i]
                aligned.append(warp_arcface(r.frame.image, arcface_matrix(arcface_points(f.landmarks))))
            mica = torch.from_numpy(np.stack(aligned)).to(self.device)
        return image, mica

    def _device_inputs(self, items: list[tuple[FrameResult, Face]], need_mica: list[int]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """`_inputs` on the GPU: each frame uploaded once, all crops of the batch in one grid_sample per frame."""
        frames, frame_index = unique_frames([r.frame.image for r, _ in items])
        on_device = [self.uploader.upload(image) for image in frames]
        image = crop_batch(on_device, frame_index, np.stack([f.crop_matrix for _, f in items]), MODEL_IMAGE_SIZE)
        mica = None
        if need_mica:
            matrices = np.stack([arcface_matrix(arcface_points(items[i][1].landmarks)) for i in need_mica])
            mica = arcface_batch(on_device, [frame_index[i] for i in need_mica], matrices)
        return image, mica

    def _identity(self, items, fresh: Optional[torch.Tensor], need: list[int]) -> torch.Tensor:
        """Shape codes per face: MICA's `fresh` codes (rows `need`) folded into the per-track cache, or `fresh`
        itself without a cache (then `need` is every face)."""
        if self.identity is None:
            return fresh
        row = {i: k for k, i in enumerate(need)}  # face → its row of `fresh`
        fresh = to_host({"shapecode": fresh})["shapecode"] if need else None
        codes = [self.identity.update(face.track_id, fresh[row[i]]) if i in row else self.identity.get(face.track_id)
                 for i, (_, face) in enumerate(items)]
        return torch.from_numpy(np.stack(codes).astype(np.float32)).to(self.device)

    # -- run ------------------------------------------------------------------------------------
    def reconstruct(self, batch: list[FrameResult]) -> None:
        items = [(r, f) for r in batch for f in r.faces]
        for r in batch:
            r.reconstructions = []
        if items:
            self._run(items, batch)
        # Only after the whole batch: an id retired at one frame may still have faces in the batch's earlier
        # frames (never in later ones: ids are not reused), and frames with no faces retire tracks too.
        self._retire([tid for r in batch for tid in r.retired_tracks])

    def _retire(self, track_ids: list[int]) -> None:
        """Free the identity code and smoothing filters of tracks the tracker has retired."""
        for track_id in track_ids:
            if self.identity is not None:
                self.identity.forget(track_id)
            if self.smoother is not None:
                self.smoother.reset(track_id)

    @torch.inference_mode()
    def _run(self, items: list[tuple[FrameResult, Face]], batch: list[FrameResult]) -> None:
        cache = self.identity if self.is_emica else None
        if cache is None:
            need = list(range(len(items))) if self.is_emica else []
        else:
            # Planned in order, as frames one at a time would be (unknown tracks too): refreshes do not move with
            # the batch size.
            need = [i for i, flag in enumerate(cache.needs_codes([f.track_id for _, f in items])) if flag]
        prepared = self._prepared(batch, need)
        image, mica = prepared if prepared is not None else self._inputs(items, need)
        for r in batch:
            r.model_inputs = None  # the crops are not needed past this stage
        with self.fork:  # MICA first: on a GPU it then runs while the ResNets are queued
            fresh = self.model.encode_identity(mica) if need else None
            codes = self.model.encode_frame(image) if self.is_emica else self.model.encode(image)
        if self.is_emica:
            codes = {"shapecode": self._identity(items, fresh, need), **codes}
        elif self.identity is not None:
            codes["shapecode"] = self._cached_predicted_shape(items, codes["shapecode"])
        if self.smoother is not None:
            codes = self._smooth(items, codes)
        geometry = self._decode(codes)
        self._emit(items, codes, geometry)

    def _cached_predicted_shape(self, items, shapecode: torch.Tensor) -> torch.Tensor:
        """DECA/EMOCA predict identity with the pose: average it per track like MICA's."""
        raw = to_host({"shapecode": shapecode})["shapecode"]
        out = [self.identity.update(f.track_id, raw[i]) if self.identity.needs_code(f.track_id) else self.identity.get(f.track_id)
               for i, (_, f) in enumerate(items)]
        return torch.from_numpy(np.stack(out).astype(np.float32)).to(shapecode.device)

    def _smooth(self, items, codes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        keys = [k for k in SMOOTHED_KEYS if k in codes]
        host = to_host({k: codes[k] for k in keys})
        for i, (r, f) in enumerate(items):
            smoothed = self.smoother.smooth(f.track_id, {k: host[k][i] for k in keys}, r.frame.pts)
            for k in keys:
                host[k][i] = smoothed[k]
        return {**codes, **{k: torch.from_numpy(host[k]).to(codes[k].device) for k in keys}}

    def _emit(self, items, codes: dict[str, torch.Tensor], geometry: dict[str, torch.Tensor]) -> None:
        for (r, f), rec in zip(items, self._build(items, codes, geometry)):
            if rec is None:
                self._skip(r, f)
                continue
            r.reconstructions.append(rec)

    def _build(self, items, codes: dict[str, torch.Tensor], geometry: dict[str, torch.Tensor]) -> list[Optional[Reconstruction]]:
        """One Reconstruction per (result, face) item from decoded batch outputs; None where an output is non-finite."""
        from .models.camera import world_to_frame_matrix

        wanted = {"verts": geometry["verts"], "lmk": geometry["predicted_landmarks2d_flame_space"],
                  **{f"code:{k}": codes[k] for k in CODE_KEYS if k in codes}}
        if "uv_detail_normals" in geometry:
            wanted["normals"] = geometry["uv_detail_normals"].permute(0, 2, 3, 1)
            wanted["displacement"] = geometry["displacement_map"]
        host = to_host(wanted)  # one wait for all copies, not one per tensor
        verts, lmk = host["verts"], host["lmk"]
        host_codes = {k[5:]: v for k, v in host.items() if k.startswith("code:")}
        normals, displacement = host.get("normals"), host.get("displacement")
        out: list[Optional[Reconstruction]] = []
        for i, (_, f) in enumerate(items):
            face_codes = {k: v[i] for k, v in host_codes.items()}
            finite = np.isfinite(verts[i]).all() and all(np.isfinite(v).all() for v in face_codes.values())
            if not finite:
                out.append(None)
                continue
            rec = Reconstruction(
                face=f, vertices=verts[i], faces=self.faces,
                world_to_frame=world_to_frame_matrix(face_codes["cam"], f.center, f.size, MODEL_IMAGE_SIZE),
                codes=face_codes,
            )
            rec.landmarks = rec.frame_points(lmk[i])[:, :2]
            if normals is not None:
                rec.detail_normals = normals[i]
                rec.uvcoords, rec.uvfaces = self.uvcoords, self.uvfaces
                rec.codes["displacement_map"] = displacement[i, 0]
            out.append(rec)
        return out

    def _skip(self, r: FrameResult, f: Face) -> None:
        """Count (and now and then log) a face left out because its output is not finite."""
        r.skipped_faces += 1
        self.skipped_faces += 1
        if self.skipped_faces in (1, 10, 100) or self.skipped_faces % 1000 == 0:
            log.warning("non-finite model output: skipped %d face(s) so far (frame %d, face %d)",
                        self.skipped_faces, r.frame.index, f.index)

    # -- look-ahead smoothing (realtime.lookahead) ----------------------------------------------
    def temporal_codes(self, rec: Reconstruction) -> dict[str, np.ndarray]:
        """The per-frame codes that temporal smoothing acts on (identity, light and texture are not)."""
        return {k: rec.codes[k] for k in SMOOTHED_KEYS if k in rec.codes}

    @torch.inference_mode()
    def redecode(self, recs: list[Reconstruction], codes: list[dict[str, np.ndarray]]) -> list[Reconstruction]:
        """Run FLAME (and the detail decoder) again on smoothed codes: one batch for all `recs`.

        Args:
            recs: (N) reconstructions made by this model.
            codes: (N) dicts replacing some of each rec's codes (`temporal_codes` keys).

        Returns:
            (N) new reconstructions of the same faces; where the new output is not finite the input rec
            is kept (it was finite), so smoothing never loses a face.
        """
        if not recs:
            return []
        keys = [k for k in CODE_KEYS if k in recs[0].codes]
        batch = {k: torch.from_numpy(np.stack([np.asarray({**r.codes, **c}[k], np.float32) for r, c in zip(recs, codes)]))
                 .to(self.device) for k in keys}
        items = [(None, r.face) for r in recs]
        fresh = self._build(items, batch, self._decode(batch))
        for rec, new in zip(recs, fresh):
            if new is None:
                log.warning("non-finite output after smoothing (track %d): kept the unsmoothed face", rec.face.track_id)
        return [rec if new is None else new for rec, new in zip(recs, fresh)]


class DecodeNetwork(torch.nn.Module):
    """``model.decode`` with tensors in and out, so an engine (a CUDA graph) can run it: the codes it reads, in
    ``inputs`` order → the geometry ``ModelReconstructor`` reads, in ``outputs`` order."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        detail = getattr(model, "detail", None) is not None or getattr(model, "uv", None) is not None
        self.inputs = ("shapecode", "expcode", "globalpose", "jawpose", "cam") + (("detailcode",) if detail else ())
        self.outputs = ("verts", "predicted_landmarks2d_flame_space") + (
            ("displacement_map", "uv_detail_normals") if detail else ())

    def forward(self, *codes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        geometry = self.model.decode(dict(zip(self.inputs, codes)))
        return tuple(geometry[k] for k in self.outputs)


class _EngineModule(torch.nn.Module):
    """Stands in for a network inside the model: same call, output from an engine (ONNX Runtime, TensorRT,
    CUDA graphs). The model's own encode/decode (splits, FLAME projection) stay the one code path."""

    def __init__(self, engine):
        super().__init__()
        self.engine = engine

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.engine(*inputs)[0]


def _attach_engines(model, cfg: RunConfig, batch_sizes: tuple[int, ...]) -> str:
    """Choose the inference backend (`--backend`, logged with the reason) and route the image networks through
    it. FLAME and the detail decoder stay in PyTorch: together well under 1 GMAC, and FLAME's buffers
    (faces, template) are what the rest of the model reads."""
    from .engines import create_engines, model_networks, module_sha256, select_backend
    from .models.emica import EMICA

    m = cfg.model
    networks = {k: v for k, v in model_networks(model).items() if k not in ("flame", "detail_decoder")}
    weights = {name: module_sha256(net.module) for name, net in networks.items()}
    flags = build_flags(m)
    backend, _ = select_backend(m.backend, m.device, m.engines_dir, m.name, list(networks), m.precision,
                                batch_size=m.batch_size, weights=weights, mode=m.mode, build_flags=flags)
    if backend == "torch" and torch.device(m.device).type == "cpu":
        return backend  # eager PyTorch is the model itself
    engines = create_engines(backend, networks, m.device, m.precision, m.engines_dir, m.name, mode=m.mode, weights=weights,
                             batch_sizes=batch_sizes, compile=m.compile, build_flags=flags)
    wrap = {name: _EngineModule(e) for name, e in engines.items()}
    if isinstance(model, EMICA):
        enc = model.face_encoder
        enc.mica_deca_encoder.mica_encoder = wrap["mica"]
        enc.mica_deca_encoder.deca_encoder = wrap["deca"]
        enc.expression_encoder = wrap["expression"]
        if model.detail is not None:
            model.detail.E_detail = wrap["detail_encoder"]
    else:
        model.deca.E_flame = wrap["deca"]
        if "expression" in wrap:
            model.deca.E_expression = wrap["expression"]
        if "detail_encoder" in wrap:
            model.deca.E_detail = wrap["detail_encoder"]
    return backend


def build_flags(m: ModelConfig) -> tuple[str, ...]:
    """The build_engines.py flags that make exports for this run's model (where its assets and engines are, which
    detail model): what a rebuild hint must carry besides --model and --mode to be pasted as it is."""
    default = ModelConfig()
    flags: list[str] = []
    if m.assets_dir != default.assets_dir:
        flags += ["--assets_dir", m.assets_dir]
    if m.path_to_models:
        flags += ["--path_to_models", m.path_to_models]
    if m.engines_dir != default.engines_dir:
        flags += ["--engines_dir", m.engines_dir]
    if m.mode == "detail" and m.detail_model:
        flags += ["--detail_model", m.detail_model]
    return tuple(flags)


def _graph_batch_sizes(batch_size: int) -> tuple[int, ...]:
    """Batch sizes with a captured CUDA graph: --batch_size (the largest; bigger batches are split) and the smaller
    of 1, 4, 16, 64, so a part-filled batch is padded only up to the next of them."""
    batch_size = max(1, batch_size)
    return tuple(sorted({s for s in (1, 4, 16, 64) if s < batch_size} | {batch_size}))


def _branch_image_networks(model, fork: StreamFork) -> None:
    """Put each image network of `model` on a stream of its own (see `realtime.streams`)."""
    from .models.emica import EMICA

    if isinstance(model, EMICA):
        enc = model.face_encoder
        enc.mica_deca_encoder.mica_encoder = fork.branch(enc.mica_deca_encoder.mica_encoder)
        enc.mica_deca_encoder.deca_encoder = fork.branch(enc.mica_deca_encoder.deca_encoder)
        enc.expression_encoder = fork.branch(enc.expression_encoder)
        if model.detail is not None:
            model.detail.E_detail = fork.branch(model.detail.E_detail)
        return
    model.deca.E_flame = fork.branch(model.deca.E_flame)
    for name in ("E_expression", "E_detail"):
        if getattr(model.deca, name, None) is not None:
            setattr(model.deca, name, fork.branch(getattr(model.deca, name)))


def _uv_topology(model) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """The FLAME UV layout (for detail-normal rendering), when the model has a detail branch."""
    uv = getattr(getattr(model, "detail", None), "uv", None) or getattr(model, "uv", None)
    if uv is None or not hasattr(uv, "uvcoords"):
        return None, None
    return uv.uvcoords.cpu().numpy().astype(np.float32), uv.uvfaces.cpu().numpy().astype(np.int32)
