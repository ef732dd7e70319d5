"""Model files of inferno / EMOCA / MICA: cfg.yaml, Lightning checkpoints, ``mica.tar``; strict loading.

Layouts (``assets_dir`` is the folder ``download_assets.sh`` fills):

- EMICA (FaceReconstruction): ``<path_to_models>/<name>/cfg.yaml`` and
  ``<name>/checkpoints/model-epoch=NN-val/loss_total=X.ckpt`` (the ``/`` in Lightning's metric name makes a
  sub-folder).
- EMOCA / DECA: ``<path_to_models>/<name>/cfg.yaml`` (``coarse:`` and ``detail:`` sections) and
  ``<name>/<stage>/checkpoints/deca-epoch=NN-val_loss/dataloader_idx_0=X.ckpt``.
- MICA: ``MICA/model/mica.tar``, a plain ``torch.save`` dict with the ``arcface`` and ``flameModel`` state dicts.

Unlike inferno (``strict=False``), loading here is strict: a network key that is missing, unexpected or of the
wrong shape is an ``AssetError`` naming the key and the file. Entries that are known to be rebuildable or unused
at inference (renderer topology, texture basis, training-loss networks, optimizer state) are skipped and listed
in one log line.
"""

from __future__ import annotations

import logging
import math
import pickle
import zipfile
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ..errors import AssetError

log = logging.getLogger(__name__)

#: EMICA checkpoint entries rebuilt from the FLAME files or unused without texture: the renderer's topology and
#: UV masks, and the BFM texture basis (present when the run was trained with texture).
EMICA_REBUILDABLE = ("renderer.", "shape_model.flametex.")
#: EMOCA/DECA checkpoint entries that inference does not use or rebuilds: renderer, texture, UV masks and fixed
#: displacement (read from the FLAME files), and the networks of training losses.
DECA_REBUILDABLE = (
    "deca.render.", "deca.flametex.", "deca.uv_face_mask", "deca.uv_face_eye_mask", "deca.fixed_uv_dis",
    "deca.displacement_mask", "deca.perceptual_loss.", "deca.id_loss.", "deca.vgg_loss.", "deca.image_translator.",
    "emonet_loss.", "au_loss.", "lipread_loss.", "emotion_mlp.",
)

#: Folder names that start an assets-relative path (used to re-root absolute paths from the training cluster).
ASSET_ROOTS = ("FLAME", "MICA", "FaceReconstruction", "EMOCA", "DECA")


def read_cfg(path: Path) -> dict[str, Any]:
    """A model's ``cfg.yaml`` (OmegaConf writes plain YAML) as nested dicts, mapping order kept."""
    try:
        cfg = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise AssetError(f"model config {path} not found: run `bash download_assets.sh` to fetch the models") from None
    except (OSError, yaml.YAMLError) as e:
        raise AssetError(f"cannot read model config {path}: {e}") from None
    if not isinstance(cfg, dict):
        raise AssetError(f"model config {path} is not a YAML mapping; re-download it with `bash download_assets.sh`")
    return cfg


def cfg_get(cfg: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    """``cfg_get(cfg, "model.shape_model.flame.n_shape")``; ``default`` when any level is absent or null."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or node.get(part) is None:
            return default
        node = node[part]
    return node


def _loss_from_stem(stem: str) -> float | None:
    """The number after the last '=' of a checkpoint stem (``loss_total=0.1234`` → 0.1234), else None."""
    value = stem[stem.rfind("=") + 1 :]
    try:
        return float(value)
    except ValueError:
        return None


def locate_checkpoint(folder: Path, mode: str = "best") -> Path:
    """Pick the checkpoint under ``folder`` (searched recursively) like inferno's ``locate_checkpoint``.

    ``best``: skip ``last.ckpt``, read the float after the last '=' of each stem, keep the minimum; on a tie the
    later file in sorted path order wins. ``latest``: ``last.ckpt``.
    """
    folder = Path(folder)
    checkpoints = sorted(folder.rglob("*.ckpt"))
    if not checkpoints:
        raise AssetError(f"no checkpoint (*.ckpt) under {folder}: run `bash download_assets.sh` to fetch the models")
    if mode == "latest":
        last = [c for c in checkpoints if c.name == "last.ckpt"]
        if not last:
            raise AssetError(f"checkpoint mode 'latest' needs a last.ckpt under {folder}; use checkpoint mode 'best'")
        return last[0]
    if mode != "best":
        raise AssetError(f"unknown checkpoint mode '{mode}' in the config of {folder}; use 'best' or 'latest'")
    best: Path | None = None
    best_loss = math.inf
    for ckpt in checkpoints:
        if ckpt.stem == "last":
            continue
        loss = _loss_from_stem(ckpt.stem)
        if loss is not None and loss <= best_loss:
            best, best_loss = ckpt, loss
    if best is None:
        raise AssetError(
            f"no checkpoint under {folder} has a '<metric>=<value>.ckpt' name to pick the best from; "
            "re-download the model with `bash download_assets.sh`"
        )
    return best


def resolve_asset_path(value: str | Path, assets_dir: Path) -> Path:
    """A path from a cfg: relative → under ``assets_dir``; absolute and missing (the authors' cluster paths,
    ``/ps/scratch/.../FLAME/geometry/generic_model.pkl``) → the same tail under ``assets_dir``.

    The tail is the longest one that exists under ``assets_dir``; if none exists, the one starting at a known
    asset folder (FLAME, MICA …), so error messages name the file the user should have.
    """
    path = Path(value)
    assets_dir = Path(assets_dir)
    if not path.is_absolute():
        return assets_dir / path
    if path.exists():
        return path
    parts = path.parts[1:]
    for i in range(len(parts)):
        candidate = assets_dir.joinpath(*parts[i:])
        if candidate.exists():
            return candidate
    for i, part in enumerate(parts):
        if part in ASSET_ROOTS:
            return assets_dir.joinpath(*parts[i:])
    return path


class _Opaque:
    """Stand-in for every non-tensor class a checkpoint pickles (OmegaConf configs, paths, enums …).

    It accepts any constructor arguments and state and does nothing with them, so loading never runs code
    named by the file. Only tensors and plain containers survive; nothing here reads hyper-parameters.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Opaque":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def load_torch_file(path: Path) -> Any:
    """``torch.load`` on the CPU with ``weights_only=True`` (no code execution), memory-mapped when possible.

    Globals that torch does not allow-list (e.g. Lightning's pickled OmegaConf hyper-parameters) are
    replaced by an inert stand-in instead of failing the load.
    """
    path = Path(path)
    if not path.is_file():
        raise AssetError(f"model file {path} not found: run `bash download_assets.sh` to fetch it")
    is_zip = zipfile.is_zipfile(path)
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) if is_zip else []
        with torch.serialization.safe_globals([(_Opaque, name) for name in unsafe]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, ValueError, EOFError, OSError, KeyError,
            TypeError, AttributeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AssetError(
            f"cannot read model file {path} ({first_line}); it may be truncated: delete it and run "
            "`bash download_assets.sh` again"
        ) from None


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The network weights of a Lightning ``.ckpt`` (its ``state_dict``) or of a plain saved state dict.

    Returns (state dict, names of the other top-level entries such as ``optimizer_states``, which are unused).
    """
    obj = load_torch_file(path)
    if not isinstance(obj, Mapping):
        raise AssetError(f"model file {path} holds a {type(obj).__name__}, not a checkpoint dict")
    if "state_dict" in obj:
        state, others = obj["state_dict"], [str(k) for k in obj if k != "state_dict"]
    else:
        state, others = obj, []
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AssetError(f"model file {path} has no tensor state_dict; re-download it with `bash download_assets.sh`")
    return dict(state), others


def _summarise(keys: Iterable[str], depth: int = 2) -> str:
    """'renderer.render.* (8), shape_model.flametex.* (2)' — grouped by the first ``depth`` name parts."""
    groups = Counter(".".join(k.split(".")[:depth]) + ("" if k.count(".") < depth else ".*") for k in keys)
    return ", ".join(f"{g} ({n})" if n > 1 else g for g, n in groups.items())


def load_state_strict(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: Path,
    *,
    prefix_map: Mapping[str, str] | None = None,
    ignore_prefixes: Iterable[str] = (),
    ignored_entries: Iterable[str] = (),
) -> None:
    """Copy ``state`` into ``module``, every module key exactly once, or raise ``AssetError``.

    Args:
        module: the network; its ``state_dict()`` keys are the required set.
        state: checkpoint tensors.
        source: the file ``state`` came from (named in every error).
        prefix_map: checkpoint-key prefix → module-key prefix (first match wins); keys that match no entry
            are unexpected. Default: identity.
        ignore_prefixes: checkpoint-key prefixes that are known to be rebuildable or unused here; skipped.
        ignored_entries: other skipped things to list in the log line (e.g. top-level ``optimizer_states``).
    """
    prefix_map = {"": ""} if prefix_map is None else dict(prefix_map)
    ignore_prefixes = tuple(ignore_prefixes)
    expected = module.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for key, value in state.items():
        if key.startswith(ignore_prefixes):
            skipped.append(key)
            continue
        target = next((dst + key[len(src) :] for src, dst in prefix_map.items() if key.startswith(src)), None)
        if target is None or target not in expected:
            raise AssetError(
                f"unexpected key '{key}' in {source}: this file does not match the model's architecture "
                "(wrong model name, or a damaged/foreign checkpoint)"
            )
        if tuple(value.shape) != tuple(expected[target].shape):
            raise AssetError(
                f"key '{key}' in {source} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(expected[target].shape)} (wrong model name or config for this checkpoint)"
            )
        mapped[target] = value
    missing = [k for k in expected if k not in mapped]
    if missing:
        inverse = {dst: src for src, dst in prefix_map.items()}
        src_name = next((inverse[d] + missing[0][len(d) :] for d in inverse if missing[0].startswith(d)), missing[0])
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise AssetError(f"missing key '{src_name}'{more} in {source}: the checkpoint is incomplete or of another model")
    module.load_state_dict(mapped, strict=True)
    extras = skipped + list(ignored_entries)
    if extras:
        log.info("%s: ignored %d rebuildable/unused entries: %s", source, len(extras), _summarise(extras))


def load_mica_tar(path: Path, mica: nn.Module) -> None:
    """Initialise a ``mica.MICA`` module (``arcface`` + ``flameModel``) from MICA's released ``mica.tar``.

    ``flameModel`` in the file also carries MICA's own FLAME (``generator.*``); EMICA does not build it, so those
    entries are skipped.
    """
    obj = load_torch_file(path)
    if not isinstance(obj, Mapping) or "arcface" not in obj or "flameModel" not in obj:
        raise AssetError(f"{path} is not MICA's mica.tar (needs 'arcface' and 'flameModel'); re-run `bash download_assets.sh`")
    state = {f"arcface.{k}": v for k, v in obj["arcface"].items()}
    state.update({f"flameModel.{k}": v for k, v in obj["flameModel"].items()})
    others = [str(k) for k in obj if k not in ("arcface", "flameModel")]
    load_state_strict(mica, state, path, ignore_prefixes=("flameModel.generator.",), ignored_entries=others)
