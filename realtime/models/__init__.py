"""Face reconstruction networks (EMICA, EMOCA, DECA on FLAME) and their strict loading.

    from realtime.models import load_model
    model = load_model("EMICA-CVT_flame2020_notexture", assets_dir="assets", device="cuda", mode="coarse")
    out = model(image, mica_image=mica)      # image (B,3,224,224) RGB [0,1]; mica (B,3,112,112) in [-1,1] or None
    out["verts"], out["trans_verts"], out["expcode"], ...; model.faces (F,3) int64

The model is in eval mode with gradients off. ``model.encode`` / ``model.decode`` split the image networks from
FLAME (for exported engines and per-track identity caching: ``model.encode(image, shapecode=cached)``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import AssetError, UserError
from .checkpoints import (
    DECA_REBUILDABLE,
    EMICA_REBUILDABLE,
    load_state_strict,
    locate_checkpoint,
    read_cfg,
    read_state_dict,
)
from .deca import DecaModel
from .detail import DetailBranch, read_detail_uv
from .emica import EMICA
from .flame import FLAME
from .flame_assets import load_flame_assets
from .registry import (
    DEFAULT_DETAIL_MODEL,
    DEFAULT_MODEL,
    MODELS,
    FlameFiles,
    ModelInfo,
    deca_config,
    emica_config,
    model_info,
)

__all__ = ["load_model", "EMICA", "DecaModel", "MODELS", "DEFAULT_MODEL", "DEFAULT_DETAIL_MODEL"]

log = logging.getLogger(__name__)
MODES = ("coarse", "detail")


def _download_hint(info: ModelInfo, assets_dir: Path) -> str:
    step = "emica" if info.family == "emica" else "emoca"
    return f"run `bash download_assets.sh --only flame,mica,{step} --assets {assets_dir}`"


def _model_dir(info: ModelInfo, path_to_models: Path | None, assets_dir: Path) -> Path:
    models = path_to_models if path_to_models is not None else assets_dir / info.models_subdir
    model_dir = models / info.name
    if not (model_dir / "cfg.yaml").is_file():
        raise AssetError(f"model '{info.name}' not found at {model_dir} (no cfg.yaml): {_download_hint(info, assets_dir)}")
    return model_dir


def _flame(files: FlameFiles) -> FLAME:
    return FLAME(load_flame_assets(files.model, files.lmk_embedding, files.mediapipe_embedding), files.n_shape, files.n_exp)


def _checkpoint_folder(folder: Path) -> Path:
    """``<folder>/checkpoints`` as the exports lay it out, else the folder itself (searched recursively)."""
    return folder / "checkpoints" if (folder / "checkpoints").is_dir() else folder


def _load_emica(model_dir: Path, assets_dir: Path) -> EMICA:
    cfg_path = model_dir / "cfg.yaml"
    cfg = emica_config(read_cfg(cfg_path), cfg_path, assets_dir)
    model = EMICA(_flame(cfg.flame), cfg.deca_predicts, cfg.expression_predicts)
    ckpt = locate_checkpoint(_checkpoint_folder(model_dir), cfg.checkpoint_mode)
    state, others = read_state_dict(ckpt)
    load_state_strict(model, state, ckpt, ignore_prefixes=EMICA_REBUILDABLE, ignored_entries=others)
    log.info("loaded %s from %s", model_dir.name, ckpt)
    return model


def _deca_stage(model_dir: Path, mode: str) -> str:
    """The cfg section / checkpoint folder to use: the detail stage holds every network (inferno's demos use it)."""
    if (model_dir / "detail").is_dir():
        return "detail"
    if mode == "detail":
        raise AssetError(f"{model_dir} has no detail stage (detail/checkpoints); re-download it with `bash download_assets.sh --only emoca`")
    return "coarse"


def _detail_model_info(name: str) -> ModelInfo:
    info = model_info(name)
    if info.family != "deca":
        raise UserError(f"detail model '{name}' has no detail branch; choose one of: "
                        f"{', '.join(n for n, m in MODELS.items() if m.family == 'deca')}")
    return info


def _load_detail_branch(info: ModelInfo, assets_dir: Path, num_vertices: int) -> DetailBranch:
    """The detail networks of an EMOCA/DECA checkpoint, for EMICA's detail mode."""
    name = info.name
    model_dir = _model_dir(info, None, assets_dir)
    cfg_path = model_dir / "cfg.yaml"
    cfg = deca_config(read_cfg(cfg_path), cfg_path, assets_dir, _deca_stage(model_dir, "detail"))
    branch = DetailBranch(read_detail_uv(cfg.detail, num_vertices), n_exp=cfg.n_exp)
    ckpt = locate_checkpoint(_checkpoint_folder(model_dir / cfg.stage))
    state, others = read_state_dict(ckpt)
    load_state_strict(
        branch, state, ckpt,
        prefix_map={"deca.E_detail.": "E_detail.", "deca.D_detail.": "D_detail."},
        # The coarse networks of that model are not EMICA's; skip them with the rebuildable entries.
        ignore_prefixes=DECA_REBUILDABLE + ("deca.E_flame.", "deca.E_expression.", "deca.flame."),
        ignored_entries=others,
    )
    log.info("loaded the detail branch of %s from %s", name, ckpt)
    return branch


def _load_deca(model_dir: Path, assets_dir: Path, mode: str) -> DecaModel:
    cfg_path = model_dir / "cfg.yaml"
    stage = _deca_stage(model_dir, mode)
    cfg = deca_config(read_cfg(cfg_path), cfg_path, assets_dir, stage)
    flame = _flame(cfg.flame)
    uv = read_detail_uv(cfg.detail, flame.v_template.shape[0]) if mode == "detail" else None
    model = DecaModel(flame, cfg.n_shape, cfg.n_tex, cfg.n_exp, cfg.expression_encoder,
                      cfg.exp_global_pose, cfg.exp_jaw_pose, uv)
    ckpt = locate_checkpoint(_checkpoint_folder(model_dir / stage))
    state, others = read_state_dict(ckpt)
    load_state_strict(model, state, ckpt, ignore_prefixes=DECA_REBUILDABLE, ignored_entries=others)
    log.info("loaded %s (%s stage) from %s", model_dir.name, stage, ckpt)
    return model


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"unknown device '{device}' ({e}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{device}' requested but CUDA is not available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device '{device}' does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def load_model(
    name: str = DEFAULT_MODEL,
    path_to_models: str | Path | None = None,
    assets_dir: str | Path = "assets",
    device: str | torch.device = "cpu",
    mode: str = "coarse",
    detail_model: str | None = None,
) -> EMICA | DecaModel:
    """Build a released model and load its checkpoint strictly.

    Args:
        name: a name from ``MODELS`` (EMICA-*, EMOCA*, DECA).
        path_to_models: folder holding ``<name>/cfg.yaml``; default ``<assets_dir>/FaceReconstruction/models``
            (EMICA) or ``<assets_dir>/EMOCA/models`` (EMOCA, DECA).
        assets_dir: what ``download_assets.sh`` filled (FLAME, MICA, models).
        device: torch device for the weights.
        mode: "coarse", or "detail" (adds ``detailcode``, ``displacement_map``, ``uv_detail_normals``).
        detail_model: EMICA in detail mode borrows this EMOCA/DECA model's detail branch
            (default ``EMOCA_v2_lr_mse_20``); EMOCA/DECA use their own.

    Returns:
        The model in eval mode with ``requires_grad`` off. Call it as ``model(image, mica_image=...)``.
    """
    if mode not in MODES:
        raise UserError(f"unknown mode '{mode}'; use coarse or detail")
    info = model_info(name)
    dev = _device(device)
    assets_dir = Path(assets_dir)
    if not assets_dir.is_dir():
        raise AssetError(f"assets folder {assets_dir} does not exist: {_download_hint(info, assets_dir)}")
    detail_info: ModelInfo | None = None
    if info.family == "emica" and mode == "detail":
        detail_info = _detail_model_info(detail_model or DEFAULT_DETAIL_MODEL)
    elif info.family == "deca" and detail_model not in (None, name):
        raise UserError(f"--detail-model applies to EMICA models only; {name} uses its own detail branch")
    model_dir = _model_dir(info, Path(path_to_models) if path_to_models is not None else None, assets_dir)
    if detail_info is not None:  # fail before the slow part when the detail model is not downloaded
        _model_dir(detail_info, None, assets_dir)
    model: EMICA | DecaModel
    if info.family == "emica":
        model = _load_emica(model_dir, assets_dir)
        if detail_info is not None:
            num_vertices = model.shape_model.flame.v_template.shape[0]
            model.detail = _load_detail_branch(detail_info, assets_dir, num_vertices)
    else:
        model = _load_deca(model_dir, assets_dir, mode)
    return model.to(dev).eval().requires_grad_(False)
