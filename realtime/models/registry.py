"""Released model names and the facts their ``cfg.yaml`` contributes to building the networks.

Two families exist (emica_spec.md §1):

- ``emica``: inferno's FaceReconstruction models (``FaceReconstructionBase``), in
  ``assets/FaceReconstruction/models/<name>``; coarse only.
- ``deca``: the EMOCA app's ``DecaModule`` models (DECA, EMOCA v1/v2), in ``assets/EMOCA/models/<name>``;
  coarse and detail. EMICA's ``--mode detail`` borrows the detail branch of one of these.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..config import EMBEDDED_MODEL
from ..errors import AssetError, UserError
from .checkpoints import cfg_get, resolve_asset_path


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str  # "emica" or "deca"
    models_subdir: str  # where download_assets.sh puts the model folder, relative to the assets folder
    description: str


_EMICA_DIR = "FaceReconstruction/models"
_EMOCA_DIR = "EMOCA/models"

MODELS: Mapping[str, ModelInfo] = MappingProxyType(
    {
        m.name: m
        for m in (
            ModelInfo("EMICA-CVT_flame2020_notexture", "emica", _EMICA_DIR, "EMICA trained on CelebV-Text, FLAME 2020 (default)"),
            ModelInfo("EMICA-CVT_flame2020", "emica", _EMICA_DIR, "same weights, config keeps the BFM texture model"),
            ModelInfo("EMICA-MEAD_flame2020", "emica", _EMICA_DIR, "EMICA-CVT fine-tuned on MEAD"),
            ModelInfo("EMICA-CVT_flame2023", "emica", _EMICA_DIR, "EMICA on FLAME 2023 with mica_2023.tar"),
            ModelInfo("EMOCA_v2_lr_mse_20", "deca", _EMOCA_DIR, "EMOCA v2, mediapipe landmarks + lip-reading loss (MSE)"),
            ModelInfo("EMOCA_v2_lr_cos_1.5", "deca", _EMOCA_DIR, "EMOCA v2, mediapipe landmarks + lip-reading loss (cosine)"),
            ModelInfo("EMOCA_v2_mp", "deca", _EMOCA_DIR, "EMOCA v2, mediapipe landmarks, no lip-reading loss"),
            ModelInfo("EMOCA", "deca", _EMOCA_DIR, "EMOCA v1"),
            ModelInfo("DECA", "deca", _EMOCA_DIR, "DECA as retrained in the EMOCA app"),
        )
    }
)
DEFAULT_MODEL = "EMICA-CVT_flame2020_notexture"
DEFAULT_DETAIL_MODEL = "EMOCA_v2_lr_mse_20"


def model_info(name: str) -> ModelInfo:
    """The registry entry for ``name``; ``UserError`` listing the known names otherwise."""
    if name not in MODELS:
        raise UserError(f"unknown model '{name}'; choose one of: {', '.join(MODELS)}, "
                        f"or {EMBEDDED_MODEL} (the embedded MediaPipe face mesh, no assets needed)")
    return MODELS[name]


# ------------------------------------------------------------------------------------------------ FLAME files

# inferno's EMOCA loader (``replace_asset_dirs``) ignores the cfg's paths and always uses these.
FLAME_MODEL = "FLAME/geometry/generic_model.pkl"
FLAME_LMK_EMBEDDING = "FLAME/geometry/landmark_embedding.npy"
FLAME_MEDIAPIPE_EMBEDDING = "FLAME/geometry/mediapipe_landmark_embedding.npz"
HEAD_TEMPLATE = "FLAME/geometry/head_template.obj"
UV_FACE_EYE_MASK = "FLAME/mask/uv_face_eye_mask.png"
FIXED_DISPLACEMENT = "FLAME/geometry/fixed_uv_displacements/fixed_displacement_256.npy"
MICA_MODEL = "MICA/model/mica.tar"


@dataclass(frozen=True)
class FlameFiles:
    model: Path
    lmk_embedding: Path
    mediapipe_embedding: Path | None  # None: plain FLAME without the 105 MediaPipe landmarks
    n_shape: int
    n_exp: int


@dataclass(frozen=True)
class DetailFiles:
    head_template: Path
    uv_face_eye_mask: Path
    fixed_displacement: Path


def detail_files(assets_dir: Path) -> DetailFiles:
    """The FLAME UV files the detail branch needs, at inferno's fixed assets-relative places."""
    return DetailFiles(
        assets_dir / HEAD_TEMPLATE, assets_dir / UV_FACE_EYE_MASK, assets_dir / FIXED_DISPLACEMENT
    )


# ------------------------------------------------------------------------------------------------ EMICA cfg

#: The released 'Pe' split (``emica_encoder_train``); used when a cfg leaves ``predicts`` out.
DEFAULT_DECA_PREDICTS: Mapping[str, int] = MappingProxyType(
    {"texcode": 50, "jawpose": 3, "globalpose": 3, "cam": 3, "lightcode": 27}
)
DEFAULT_EXPRESSION_PREDICTS: Mapping[str, int] = MappingProxyType({"expcode": 100})
_CODE_SIZES = {"texcode": 50, "jawpose": 3, "globalpose": 3, "cam": 3, "lightcode": 27, "expcode": 100}


@dataclass(frozen=True)
class EmicaConfig:
    deca_predicts: Mapping[str, int]  # order = split order of the DECA branch's raw code
    expression_predicts: Mapping[str, int]
    flame: FlameFiles
    mica_model: Path  # only for MICA-only initialisation; EMICA checkpoints carry the MICA weights
    checkpoint_mode: str


def _predicts(cfg: Mapping[str, Any], key: str, default: Mapping[str, int], cfg_path: Path) -> dict[str, int]:
    value = cfg_get(cfg, key, default)
    if not isinstance(value, Mapping) or not value:
        raise AssetError(f"{cfg_path}: '{key}' must map code names to sizes, got {value!r}")
    out = {str(k): int(v) for k, v in value.items()}
    for name, size in out.items():
        if name not in _CODE_SIZES:
            raise AssetError(f"{cfg_path}: '{key}' predicts unknown code '{name}' (known: {', '.join(_CODE_SIZES)})")
        if name != "expcode" and size != _CODE_SIZES[name]:
            raise AssetError(f"{cfg_path}: '{key}.{name}' is {size}, EMICA needs {_CODE_SIZES[name]}")
    return out


def _require(cfg: Mapping[str, Any], key: str, allowed: tuple[str, ...], default: str, cfg_path: Path) -> None:
    value = str(cfg_get(cfg, key, default))
    if value not in allowed:
        raise AssetError(f"{cfg_path}: '{key}: {value}' is not supported (supported: {', '.join(allowed)})")


def emica_config(cfg: Mapping[str, Any], cfg_path: Path, assets_dir: Path) -> EmicaConfig:
    """The facts of a FaceReconstruction ``cfg.yaml`` that shape the EMICA networks (spec §1.4)."""
    enc = "model.face_encoder"
    _require(cfg, f"{enc}.type", ("EmicaEncoder",), "EmicaEncoder", cfg_path)
    deca_key = f"{enc}.encoders.mica_deca_encoder.encoders.deca_encoder"
    exp_key = f"{enc}.encoders.expression_encoder"
    mica_key = f"{enc}.encoders.mica_deca_encoder.encoders.mica_encoder"
    _require(cfg, f"{deca_key}.backbone", ("ResNet50",), "ResNet50", cfg_path)
    _require(cfg, f"{exp_key}.backbone", ("ResNet50",), "ResNet50", cfg_path)
    deca_predicts = _predicts(cfg, f"{deca_key}.predicts", DEFAULT_DECA_PREDICTS, cfg_path)
    expression_predicts = _predicts(cfg, f"{exp_key}.predicts", DEFAULT_EXPRESSION_PREDICTS, cfg_path)
    codes = {**deca_predicts, **expression_predicts}
    for needed in ("globalpose", "cam", "expcode"):
        if needed not in codes:
            raise AssetError(f"{cfg_path}: no encoder predicts '{needed}', which EMICA needs")

    flame_key = "model.shape_model.flame"
    _require(cfg, f"{flame_key}.type", ("flame_mediapipe", "flame"), "flame_mediapipe", cfg_path)
    with_mediapipe = str(cfg_get(cfg, f"{flame_key}.type", "flame_mediapipe")) == "flame_mediapipe"
    n_exp = int(cfg_get(cfg, f"{flame_key}.n_exp", 100))
    if codes["expcode"] != n_exp:
        raise AssetError(f"{cfg_path}: expcode has {codes['expcode']} values but FLAME n_exp is {n_exp}")

    def path(key: str, default: str) -> Path:
        return resolve_asset_path(cfg_get(cfg, key, default), assets_dir)

    flame = FlameFiles(
        model=path(f"{flame_key}.flame_model_path", FLAME_MODEL),
        lmk_embedding=path(f"{flame_key}.flame_lmk_embedding_path", FLAME_LMK_EMBEDDING),
        mediapipe_embedding=(
            path(f"{flame_key}.flame_mediapipe_lmk_embedding_path", FLAME_MEDIAPIPE_EMBEDDING) if with_mediapipe else None
        ),
        n_shape=int(cfg_get(cfg, f"{flame_key}.n_shape", 300)),
        n_exp=n_exp,
    )
    return EmicaConfig(
        deca_predicts=MappingProxyType(deca_predicts),
        expression_predicts=MappingProxyType(expression_predicts),
        flame=flame,
        mica_model=path(f"{mica_key}.mica_model_path", MICA_MODEL),
        checkpoint_mode=str(cfg.get("checkpoint_mode") or "best"),
    )


# ------------------------------------------------------------------------------------------------ DECA/EMOCA cfg


@dataclass(frozen=True)
class DecaConfig:
    stage: str  # the cfg section used: "detail" or "coarse"
    n_shape: int
    n_tex: int
    n_exp: int
    n_cam: int
    n_light: int
    n_detail: int
    expression_encoder: bool  # EMOCA (ExpDECA): a second ResNet encoder replaces DECA's expression code
    exp_global_pose: bool  # EMOCA's E_expression also predicts the global pose …
    exp_jaw_pose: bool  # … and/or the jaw pose (``exp_deca_global_pose`` / ``exp_deca_jaw_pose``)
    flame: FlameFiles
    detail: DetailFiles


_DECA_CLASSES = ("DECA", "ExpDECA", "EMOCA")  # 'EMOCA' is the name the EMOCA app configs use for ExpDECA


def deca_config(cfg: Mapping[str, Any], cfg_path: Path, assets_dir: Path, stage: str) -> DecaConfig:
    """The facts of an EMOCA-app ``cfg.yaml`` section (``coarse`` or ``detail``) that shape the networks."""
    section = cfg.get(stage)
    if not isinstance(section, Mapping) or not isinstance(section.get("model"), Mapping):
        raise AssetError(f"{cfg_path}: no '{stage}.model' section; re-download the model with `bash download_assets.sh`")
    model = section["model"]

    def flag(key: str) -> bool:
        return bool(model.get(key) or False)

    deca_class = str(model.get("deca_class") or "DECA")
    if deca_class not in _DECA_CLASSES:
        raise AssetError(f"{cfg_path}: deca_class '{deca_class}' is not supported (supported: {', '.join(_DECA_CLASSES)})")
    expression_encoder = deca_class != "DECA"
    if expression_encoder:
        _require(model, "expression_backbone", ("deca_clone",), "deca_clone", cfg_path)
    _require(model, "e_flame_type", ("ResnetEncoder",), "ResnetEncoder", cfg_path)
    _require(model, "e_detail_type", ("ResnetEncoder",), "ResnetEncoder", cfg_path)
    _require(model, "detail_conditioning_type", ("concat",), "concat", cfg_path)
    conditioning = list(model.get("detail_conditioning") or ["jawpose", "expression", "detail"])
    if sorted(conditioning) != ["detail", "expression", "jawpose"]:
        raise AssetError(f"{cfg_path}: detail_conditioning {conditioning} is not supported (only jawpose, expression, detail)")
    if int(model.get("n_detail_emo") or 0) != 0 or flag("apply_displacement_masks"):
        raise AssetError(f"{cfg_path}: emotion detail codes / displacement masks are not supported")
    sizes = {k: int(model.get(k) or d) for k, d in
             (("n_shape", 100), ("n_tex", 50), ("n_exp", 50), ("n_pose", 6), ("n_cam", 3), ("n_light", 27), ("n_detail", 128))}
    if (sizes["n_pose"], sizes["n_cam"], sizes["n_light"], sizes["n_detail"]) != (6, 3, 27, 128):
        raise AssetError(f"{cfg_path}: unsupported code sizes {sizes}")
    if sizes["n_exp"] < 50:
        raise AssetError(f"{cfg_path}: n_exp {sizes['n_exp']} < 50 cannot feed the detail decoder")
    with_mediapipe = model.get("flame_mediapipe_lmk_embedding_path") is not None
    return DecaConfig(
        stage=stage,
        n_shape=sizes["n_shape"],
        n_tex=sizes["n_tex"],
        n_exp=sizes["n_exp"],
        n_cam=sizes["n_cam"],
        n_light=sizes["n_light"],
        n_detail=sizes["n_detail"],
        expression_encoder=expression_encoder,
        exp_global_pose=expression_encoder and flag("exp_deca_global_pose"),
        exp_jaw_pose=expression_encoder and flag("exp_deca_jaw_pose"),
        flame=FlameFiles(
            model=assets_dir / FLAME_MODEL,
            lmk_embedding=assets_dir / FLAME_LMK_EMBEDDING,
            mediapipe_embedding=assets_dir / FLAME_MEDIAPIPE_EMBEDDING if with_mediapipe else None,
            n_shape=sizes["n_shape"],
            n_exp=sizes["n_exp"],
        ),
        detail=detail_files(assets_dir),
    )
