"""Random-weight EMICA / EMOCA / DECA model folders in the exact released layout, for tests without the licensed
downloads.

``write_emica_model`` writes, under an assets folder:

- ``FLAME/...`` (``tests.synthetic_flame``: FLAME-2020-sized, real file formats);
- ``MICA/model/mica.tar`` (keys ``arcface`` and ``flameModel``, the latter with MICA's FLAME buffers as
  ``generator.*``, as MICA saves it);
- ``FaceReconstruction/models/<name>/cfg.yaml`` (the keys inferno's export writes, FLAME paths made relative,
  the MediaPipe embedding left as an absolute cluster path as in the repo configs) and
  ``checkpoints/model-epoch=03-val/loss_total=0.12345678.ckpt``: a Lightning-style dict whose ``state_dict`` has
  all 1607 entries of the released key list with their real shapes and dtypes (117,074,326 network parameters),
  plus ``shape_model.flametex.*`` at its real size (1x786432x50) as the released file probably carries it, and a
  pickled non-tensor hyper-parameter object like Lightning's.

``write_emoca_model`` does the same for an EMOCA-app model (``EMOCA/models/<name>/cfg.yaml`` with ``coarse`` and
``detail`` sections, ``detail/checkpoints/deca-epoch=03-val_loss/dataloader_idx_0=0.12345678.ckpt``) including
the detail networks and some training-loss / renderer entries that loading must skip.

The weights are random but behave like a trained model's: BatchNorm running statistics are measured on random
inputs (so activations stay O(1) through the residual stacks), and the output layers are scaled down with
biases set so that the camera scale is about 8, poses are near zero and all codes are moderate.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from torch import nn

from realtime.atomic import atomic_path
from realtime.models.arcface import IResNet
from realtime.models.deca import DecaModel
from realtime.models.emica import EMICA
from realtime.models.flame import FLAME
from realtime.models.flame_assets import load_flame_assets
from realtime.models.mica import arcface_input_from_crop
from realtime.models.resnet import ResNet
from tests.synthetic_flame import write_synthetic_flame

CKPT_LOSS = "0.12345678"
CAM_SCALE = 8.0
# Heads get weights this small, so a code is bias + O(0.01) image-dependent variation.
HEAD_WEIGHT_SCALE = 0.01

#: The renderer buffers of the released EMICA checkpoint (rebuildable; loading skips them).
RENDERER_BUFFERS = {
    "renderer.uv_face_mask": ((1, 1, 256, 256), torch.float32),
    "renderer.uv_face_eye_mask": ((1, 1, 256, 256), torch.float32),
    "renderer.render.dense_faces": ((1, 130050, 3), torch.int64),
    "renderer.render.faces": ((1, 9976, 3), torch.int64),
    "renderer.render.raw_uvcoords": ((1, 5118, 2), torch.float32),
    "renderer.render.uvcoords": ((1, 5118, 3), torch.float32),
    "renderer.render.uvfaces": ((1, 9976, 3), torch.int64),
    "renderer.render.face_uvcoords": ((1, 9976, 3, 3), torch.float32),
    "renderer.render.face_colors": ((1, 9976, 3, 3), torch.float32),
    "renderer.render.constant_factor": ((9,), torch.float32),
}
TEXTURE_BUFFERS = {
    "shape_model.flametex.texture_mean": ((1, 1, 786432), torch.float32),
    "shape_model.flametex.texture_basis": ((1, 786432, 50), torch.float32),
}


class LightningHyperParameters:
    """Stands for the OmegaConf config Lightning pickles into ``hyper_parameters`` (a non-tensor class)."""

    def __init__(self, run_name: str):
        self.run_name = run_name


def _flame_files(root: Path, seed: int) -> dict[str, Path]:
    """The synthetic FLAME under ``root`` (written once; later models reuse it)."""
    paths = write_synthetic_flame(root, seed) if not (root / "FLAME" / "geometry" / "generic_model.pkl").exists() else None
    geometry = root / "FLAME" / "geometry"
    return paths or {
        "flame_model": geometry / "generic_model.pkl",
        "lmk_embedding": geometry / "landmark_embedding.npy",
        "mediapipe_embedding": geometry / "mediapipe_landmark_embedding.npz",
    }


def _flame(paths: dict[str, Path], n_shape: int, n_exp: int, mediapipe: bool) -> FLAME:
    assets = load_flame_assets(
        paths["flame_model"], paths["lmk_embedding"], paths["mediapipe_embedding"] if mediapipe else None
    )
    return FLAME(assets, n_shape, n_exp)


@torch.no_grad()
def _calibrate_batchnorm(layers: list[nn.Module], sample: torch.Tensor) -> None:
    """Run ``sample`` through ``layers`` once in train mode so every BatchNorm2d's running mean/var become that
    pass's statistics (cumulative average). One image at the network's real input size: smaller images give
    statistics that do not hold at full size."""
    net = nn.Sequential(*layers)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    net(sample)
    for bn in bns:
        bn.momentum = 0.1
        bn.eval()


def _resnet_layers(resnet: ResNet) -> list[nn.Module]:
    """The trunk without its fixed 7x7 average pool (which only accepts 224² inputs)."""
    return [resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4]


@torch.no_grad()
def _calibrate_arcface(arcface: IResNet, sample: torch.Tensor) -> None:
    """Calibrate the convolution stack on ``sample``; set the embedding BatchNorm1d analytically: its input is
    ``fc`` applied to unit-variance features, so mean = fc.bias and var = sum of squared weights per output."""
    _calibrate_batchnorm(
        [arcface.conv1, arcface.bn1, arcface.prelu, arcface.layer1, arcface.layer2, arcface.layer3, arcface.layer4,
         arcface.bn2], sample
    )
    arcface.features.running_mean.copy_(arcface.fc.bias)
    arcface.features.running_var.copy_(arcface.fc.weight.pow(2).sum(dim=1))


@torch.no_grad()
def _set_head(linear: nn.Linear, bias: torch.Tensor, weight_scale: float = HEAD_WEIGHT_SCALE) -> None:
    linear.weight.mul_(weight_scale)
    linear.bias.copy_(bias)


def _deca_head_bias(sizes: dict[str, int], generator: torch.Generator) -> torch.Tensor:
    """Plausible mean codes: camera [8, 0, 0], small poses, a white-ish ambient light, small tex/exp/shape."""
    parts = []
    for name, size in sizes.items():
        if name == "cam":
            parts.append(torch.tensor([CAM_SCALE, 0.0, 0.0]))
        elif name == "lightcode":
            light = torch.zeros(9, 3)
            light[0] = 3.0  # the SH DC term of every channel
            parts.append(light.flatten())
        elif name in ("globalpose", "jawpose"):
            parts.append(0.02 * torch.randn(size, generator=generator))
        else:
            parts.append(0.1 * torch.randn(size, generator=generator))
    return torch.cat(parts)


def _save(obj: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, fsync=False) as temp:
        torch.save(obj, temp)


def _write_yaml(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, fsync=False) as temp:
        temp.write_text(yaml.safe_dump(data, sort_keys=False))


def _lightning_checkpoint(state: dict[str, torch.Tensor], run_name: str) -> dict:
    return {
        "epoch": 3,
        "global_step": 12345,
        "pytorch-lightning_version": "1.4.9",
        "state_dict": state,
        "callbacks": {},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4}]}],
        "lr_schedulers": [],
        "hyper_parameters": {"cfg": LightningHyperParameters(run_name)},
    }


def make_random_emica(flame: FLAME, seed: int = 0) -> EMICA:
    """An EMICA with random weights, calibrated BatchNorms and plausible output ranges (see module doc)."""
    torch.manual_seed(seed)
    model = EMICA(flame)
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    image = torch.rand(1, 3, 224, 224, generator=generator)
    enc = model.face_encoder
    _calibrate_arcface(enc.mica_deca_encoder.mica_encoder.E_mica.arcface, arcface_input_from_crop(image))
    _calibrate_batchnorm(_resnet_layers(enc.mica_deca_encoder.deca_encoder.encoder.encoder), image)
    _calibrate_batchnorm(_resnet_layers(enc.expression_encoder.encoder.encoder), image)
    regressor = enc.mica_deca_encoder.mica_encoder.E_mica.flameModel.regressor
    _set_head(regressor.output, 0.1 * torch.randn(300, generator=generator))
    _set_head(enc.mica_deca_encoder.deca_encoder.encoder.layers[2], _deca_head_bias(model.deca_predicts, generator))
    _set_head(enc.expression_encoder.encoder.layers[2], _deca_head_bias(model.expression_predicts, generator))
    return model.eval()


def _emica_cfg(name: str, with_texture: bool) -> dict:
    flame = {
        "type": "flame_mediapipe",
        "flame_model_path": "FLAME/geometry/generic_model.pkl",
        "n_shape": 300,
        "n_exp": 100,
        "flame_lmk_embedding_path": "FLAME/geometry/landmark_embedding.npy",
        # Left absolute by inferno's export script; resolved to the same tail under the assets folder.
        "flame_mediapipe_lmk_embedding_path": "/ps/scratch/rdanecek/data/FLAME/geometry/mediapipe_landmark_embedding.npz",
    }
    if with_texture:
        flame.update({"tex_type": "BFM", "tex_path": "FLAME/texture/FLAME_albedo_from_BFM.npz", "n_tex": 50})
    deca = {
        "type": "DecaEncoder", "backbone": "ResNet50", "input_size": 224,
        "predicts": {"texcode": 50, "jawpose": 3, "globalpose": 3, "cam": 3, "lightcode": 27},
        "trainable": False, "last_layer_init_zero": True,
    }
    expression = {
        "type": "ExpressionEncoder", "backbone": "ResNet50", "input_size": 224,
        "predicts": {"expcode": 100}, "trainable": True, "last_layer_init_zero": True,
    }
    mica = {
        "type": "MicaEncoder", "mica_model_path": "MICA/model/mica.tar", "mica_preprocessing": "fan",
        "input_size": 224, "predicts": {"shape": 300}, "trainable": False,
    }
    return {
        "model": {
            "pl_module_class": "FaceReconstructionBase",
            "face_encoder": {
                "type": "EmicaEncoder",
                "trainable": True,
                "encoders": {
                    "expression_encoder": expression,
                    "mica_deca_encoder": {"encoders": {"deca_encoder": deca, "mica_encoder": mica}},
                },
            },
            "shape_model": {"type": "FlameShapeModel", "flame": flame, "use_texture": with_texture},
            "renderer": {
                "type": "DecaRenderer", "image_size": 224, "uv_size": 256,
                "topology_path": "/ps/scratch/rdanecek/data/FLAME/geometry/head_template.obj",
                "face_mask_path": "/ps/scratch/rdanecek/data/FLAME/mask/uv_face_mask.png",
                "face_eye_mask_path": "/ps/scratch/rdanecek/data/FLAME/mask/uv_face_eye_mask.png",
            },
        },
        "inout": {"full_run_dir": name, "checkpoint_dir": f"{name}/checkpoints", "output_dir": False},
        "learning": {"losses": {}, "metrics": {}},
    }


def _write_mica_tar(root: Path, model: EMICA) -> None:
    path = root / "MICA" / "model" / "mica.tar"
    if path.exists():
        return
    mica = model.face_encoder.mica_deca_encoder.mica_encoder.E_mica
    flame_model = {f"regressor.{k}": v for k, v in mica.flameModel.regressor.state_dict().items()}
    # MICA's own FLAME lives in the same dict; EMICA does not build it.
    flame = model.shape_model.flame
    flame_model.update({"generator.v_template": flame.v_template.clone(), "generator.faces_tensor": flame.faces_tensor.clone()})
    _save({"arcface": mica.arcface.state_dict(), "flameModel": flame_model}, path)


def write_emica_model(root: Path, name: str = "EMICA-CVT_flame2020_notexture", seed: int = 0) -> Path:
    """Write a random-weight EMICA model, MICA's mica.tar and the synthetic FLAME under the assets folder ``root``.

    Returns:
        The checkpoint path (``root/FaceReconstruction/models/<name>/checkpoints/model-epoch=03-val/loss_total=….ckpt``).
    """
    root = Path(root)
    model = make_random_emica(_flame(_flame_files(root, seed), 300, 100, mediapipe=True), seed)
    state = dict(model.state_dict())
    for key, (shape, dtype) in {**RENDERER_BUFFERS, **TEXTURE_BUFFERS}.items():
        state[key] = torch.zeros(shape, dtype=dtype)
    model_dir = root / "FaceReconstruction" / "models" / name
    _write_yaml(_emica_cfg(name, with_texture="notexture" not in name), model_dir / "cfg.yaml")
    ckpt = model_dir / "checkpoints" / "model-epoch=03-val" / f"loss_total={CKPT_LOSS}.ckpt"
    _save(_lightning_checkpoint(state, name), ckpt)
    _write_mica_tar(root, model)
    return ckpt


# ---------------------------------------------------------------------------------------------------- EMOCA / DECA

EMOCA_EXTRA_ENTRIES = {
    # Training-loss networks and rebuildable buffers that real EMOCA checkpoints carry.
    "emonet_loss.backbone.conv1.weight": ((8, 3, 3, 3), torch.float32),
    "deca.id_loss.reg_model.conv1.weight": ((8, 3, 7, 7), torch.float32),
    "deca.uv_face_eye_mask": ((1, 1, 256, 256), torch.float32),
    "deca.fixed_uv_dis": ((256, 256), torch.float32),
    "deca.render.faces": ((1, 9976, 3), torch.int64),
}


def make_random_deca(flame: FLAME, expression_encoder: bool, seed: int = 0) -> DecaModel:
    """A DECA (or EMOCA with ``expression_encoder``) with random, calibrated weights and plausible outputs."""
    torch.manual_seed(seed)
    model = DecaModel(flame, flame.n_shape, 50, flame.n_exp, expression_encoder=expression_encoder)
    generator = torch.Generator().manual_seed(seed + 1)
    model.eval()
    image = torch.rand(1, 3, 224, 224, generator=generator)
    deca = model.deca
    for net in (deca.E_flame, deca.E_detail, deca.E_expression):
        if net is not None:
            _calibrate_batchnorm(_resnet_layers(net.encoder), image)
    _calibrate_batchnorm([deca.D_detail], torch.randn(1, deca.D_detail.l1[0].in_features, generator=generator) * 0.1)
    _set_head(deca.E_flame.layers[2], _deca_head_bias(model.flame_split, generator))
    if deca.E_expression is not None:
        _set_head(deca.E_expression.layers[2], _deca_head_bias(model.expression_split, generator))
    _set_head(deca.E_detail.layers[2], 0.1 * torch.randn(128, generator=generator), weight_scale=0.1)
    return model.eval()


def _emoca_cfg(name: str, expression_encoder: bool, mediapipe: bool) -> dict:
    def stage(mode: str) -> dict:
        model = {
            "deca_class": "ExpDECA" if expression_encoder else "DECA",
            "n_shape": 100, "n_tex": 50, "n_exp": 50, "n_pose": 6, "n_cam": 3, "n_light": 27, "n_detail": 128,
            "image_size": 224, "uv_size": 256, "mode": mode,
            "detail_conditioning": ["jawpose", "expression", "detail"],
            "flame_model_path": "/ps/scratch/rdanecek/data/FLAME/geometry/generic_model.pkl",
            "flame_lmk_embedding_path": "/ps/scratch/rdanecek/data/FLAME/geometry/landmark_embedding.npy",
            "topology_path": "/ps/scratch/rdanecek/data/FLAME/geometry/head_template.obj",
            "face_eye_mask_path": "/ps/scratch/rdanecek/data/FLAME/mask/uv_face_eye_mask.png",
            "fixed_displacement_path": "/ps/scratch/rdanecek/data/FLAME/geometry/fixed_uv_displacements/fixed_displacement_256.npy",
            "useSeg": "rend", "background_from_input": True,
        }
        if expression_encoder:
            model.update({"expression_backbone": "deca_clone", "exp_deca_global_pose": False, "exp_deca_jaw_pose": False})
        if mediapipe:
            model["flame_mediapipe_lmk_embedding_path"] = (
                "/ps/scratch/rdanecek/data/FLAME/geometry/mediapipe_landmark_embedding.npz"
            )
        return {"model": model, "inout": {"full_run_dir": f"/ps/scratch/{name}/{mode}"}, "learning": {}}

    return {"coarse": stage("coarse"), "detail": stage("detail")}


def write_emoca_model(root: Path, name: str = "EMOCA_v2_lr_mse_20", seed: int = 0) -> Path:
    """Write a random-weight EMOCA-app model (EMOCA*, or plain DECA for ``name == "DECA"``) and the synthetic FLAME.

    Returns:
        The checkpoint path (``root/EMOCA/models/<name>/detail/checkpoints/deca-epoch=03-val_loss/dataloader_idx_0=….ckpt``).
    """
    root = Path(root)
    expression_encoder = name != "DECA"
    mediapipe = name.startswith("EMOCA_v2")
    model = make_random_deca(_flame(_flame_files(root, seed), 100, 50, mediapipe), expression_encoder, seed)
    state = dict(model.state_dict())
    for key, (shape, dtype) in EMOCA_EXTRA_ENTRIES.items():
        state[key] = torch.zeros(shape, dtype=dtype)
    model_dir = root / "EMOCA" / "models" / name
    _write_yaml(_emoca_cfg(name, expression_encoder, mediapipe), model_dir / "cfg.yaml")
    ckpt = model_dir / "detail" / "checkpoints" / "deca-epoch=03-val_loss" / f"dataloader_idx_0={CKPT_LOSS}.ckpt"
    _save(_lightning_checkpoint(state, name), ckpt)
    return ckpt
