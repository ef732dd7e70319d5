"""EMICA / EMOCA end to end on random-weight checkpoints in the released layout: loading, outputs, conventions."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from realtime.errors import AssetError, UserError
from realtime.models import DecaModel, EMICA, load_model
from realtime.models.checkpoints import load_mica_tar
from realtime.models.mica import MICA
from tests.synthetic_checkpoints import CAM_SCALE
from tests.fakes import ConstantNet

REPO = Path(__file__).resolve().parents[1]
KEYS_JSON_CANDIDATES = [
    Path(os.environ.get("EMICA_STATE_DICT_KEYS", REPO / "tests" / "data" / "emica_state_dict_keys.json")),
    Path("/work/shared/docs/emica_state_dict_keys.json"),
]
DECA_SPLIT = {"texcode": (0, 50), "jawpose": (50, 53), "globalpose": (53, 56), "cam": (56, 59), "lightcode": (59, 86)}


@pytest.fixture(scope="module")
def assets(synthetic_assets) -> Path:
    return synthetic_assets  # the session's shared EMICA + EMOCA checkpoints (conftest)


@pytest.fixture(scope="module")
def emoca_assets(synthetic_assets) -> Path:
    return synthetic_assets


@pytest.fixture(scope="module")
def model(assets) -> EMICA:
    return load_model("EMICA-CVT_flame2020_notexture", assets_dir=assets)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def output(model, image) -> dict[str, torch.Tensor]:
    return model(image)


@contextmanager
def constant_heads(model: EMICA, deca_bias: torch.Tensor, expression_bias: torch.Tensor):
    """Zero the last Linear of both branches and set their biases, so the raw codes are known; restore after."""
    heads = [model.face_encoder.mica_deca_encoder.deca_encoder.encoder.layers[2],
             model.face_encoder.expression_encoder.encoder.layers[2]]
    saved = [{k: v.clone() for k, v in h.state_dict().items()} for h in heads]
    with torch.no_grad():
        for head, bias in zip(heads, (deca_bias, expression_bias)):
            head.weight.zero_()
            head.bias.copy_(bias)
    try:
        yield
    finally:
        for head, state in zip(heads, saved):
            head.load_state_dict(state)


@contextmanager
def zero_trunks(model: EMICA):
    """Swap both ResNet-50 trunks for zero features, so tests of the code plumbing skip the convolutions."""
    encoders = [model.face_encoder.mica_deca_encoder.deca_encoder.encoder,
                model.face_encoder.expression_encoder.encoder]
    trunks = [e.encoder for e in encoders]
    for e in encoders:
        e.encoder = ConstantNet(torch.zeros(1, 2048))
    try:
        yield
    finally:
        for e, trunk in zip(encoders, trunks):
            e.encoder = trunk


class _Stop(Exception):
    pass


@contextmanager
def first_layer_inputs(modules: dict[str, nn.Module], stop_at: str | None = None):
    """Record what each module's first layer receives; optionally abort the forward pass right there (cheap)."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(module, args):
            seen[name] = args[0].clone()
            if name == stop_at:
                raise _Stop
        return record

    hooks = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


# ---------------------------------------------------------------------------------------------- loading


def test_state_dict_equals_the_released_key_list(model):
    path = next((p for p in KEYS_JSON_CANDIDATES if p.is_file()), None)
    if path is None:
        pytest.skip("emica_state_dict_keys.json not available (set EMICA_STATE_DICT_KEYS)")
    entries = json.loads(path.read_text())["entries"]
    expected = [(e["key"], tuple(e["shape"]), e["dtype"]) for e in entries if not e["key"].startswith("renderer.")]
    actual = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]
    assert actual == expected  # same keys, shapes, dtypes and order; renderer.* are rebuilt, not kept
    assert len(entries) == 1607 and len(actual) == 1607 - 10


def test_loaded_model_is_eval_frozen_with_the_released_parameter_count(model):
    assert isinstance(model, EMICA) and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert sum(p.numel() for p in model.face_encoder.parameters()) == 117_074_326
    assert sum(p.numel() for p in model.parameters()) == 117_074_335  # + FLAME's frozen eye (6) and neck (3) pose
    assert model.faces.shape == (9976, 3) and model.faces.dtype == torch.int64


def test_loaded_weights_are_the_checkpoint_tensors(model, assets):
    ckpt = next((assets / "FaceReconstruction" / "models" / "EMICA-CVT_flame2020_notexture").rglob("*.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    for key in ("face_encoder.mica_deca_encoder.mica_encoder.E_mica.arcface.features.running_var",
                "face_encoder.expression_encoder.encoder.layers.2.bias",
                "shape_model.flame.shapedirs"):
        assert torch.equal(model.state_dict()[key], state[key]), key


@pytest.mark.slow
def test_strict_loading_through_load_model_names_key_and_file(assets, tmp_path):
    name = "EMICA-CVT_flame2020_notexture"
    src = assets / "FaceReconstruction" / "models" / name
    dst = tmp_path / "models" / name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.ckpt"))
    ckpt_src = next(src.rglob("*.ckpt"))
    ckpt = dst / ckpt_src.relative_to(src)
    checkpoint = torch.load(ckpt_src, map_location="cpu", weights_only=False, mmap=True)
    key = "face_encoder.mica_deca_encoder.mica_encoder.E_mica.flameModel.regressor.output.bias"
    del checkpoint["state_dict"][key]
    torch.save(checkpoint, ckpt)
    with pytest.raises(AssetError) as err:
        load_model(name, path_to_models=tmp_path / "models", assets_dir=assets)
    assert f"missing key '{key}'" in str(err.value) and str(ckpt) in str(err.value)


@pytest.mark.slow
def test_mica_tar_initialises_mica_strictly(model, assets):
    mica = MICA()
    load_mica_tar(assets / "MICA" / "model" / "mica.tar", mica)
    reference = model.face_encoder.mica_deca_encoder.mica_encoder.E_mica
    for key, value in reference.state_dict().items():
        assert torch.equal(mica.state_dict()[key], value), key


def test_missing_assets_and_bad_arguments_are_user_errors(assets, tmp_path):
    with pytest.raises(AssetError, match=r"assets folder .*nowhere does not exist: run `bash download_assets.sh"):
        load_model(assets_dir=tmp_path / "nowhere")
    with pytest.raises(AssetError, match=r"model 'EMICA-MEAD_flame2020' not found at .*FaceReconstruction/models/EMICA-MEAD_flame2020.*bash download_assets.sh --only flame,mica,emica"):
        load_model("EMICA-MEAD_flame2020", assets_dir=assets)
    with pytest.raises(UserError, match="unknown mode 'fine'"):
        load_model(assets_dir=assets, mode="fine")
    with pytest.raises(UserError, match="detail model 'EMICA-CVT_flame2020' has no detail branch"):
        load_model(assets_dir=assets, mode="detail", detail_model="EMICA-CVT_flame2020")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            load_model(assets_dir=assets, device="cuda")


# ---------------------------------------------------------------------------------------------- outputs


def test_forward_gives_inferno_names_shapes_and_sane_values(output):
    shapes = {
        "shapecode": (2, 300), "texcode": (2, 50), "jawpose": (2, 3), "globalpose": (2, 3), "cam": (2, 3),
        "lightcode": (2, 27), "expcode": (2, 100), "verts": (2, 5023, 3), "trans_verts": (2, 5023, 3),
        "predicted_landmarks": (2, 68, 2), "predicted_landmarks_3d": (2, 68, 2),
        "predicted_landmarks_mediapipe": (2, 105, 2), "predicted_landmarks2d_flame_space": (2, 68, 3),
        "predicted_landmarks3d_flame_space": (2, 68, 3), "predicted_landmarks2d_mediapipe_flame_space": (2, 105, 3),
    }
    assert {k: tuple(v.shape) for k, v in output.items()} == shapes
    assert all(torch.isfinite(v).all() for v in output.values())
    assert torch.allclose(output["cam"][:, 0], torch.full((2,), CAM_SCALE), atol=0.5)
    assert output["predicted_landmarks"].abs().max() < 1.0  # on the crop


def test_split_order_follows_the_cfg_predicts(model, image):
    deca_bias = torch.arange(86, dtype=torch.float32)
    expression_bias = 1000 + torch.arange(100, dtype=torch.float32)
    with constant_heads(model, deca_bias, expression_bias), zero_trunks(model):
        codes = model.encode(image, shapecode=torch.zeros(2, 300))
    for name, (start, stop) in DECA_SPLIT.items():
        assert torch.equal(codes[name], deca_bias[start:stop].expand(2, -1)), name
    assert torch.equal(codes["expcode"], expression_bias.expand(2, -1))
    assert codes["lightcode"].shape == (2, 27)  # flat, coefficient k channel c at 3k + c


def test_camera_and_image_space_conventions(output):
    s, tx, ty = (output["cam"][:, i, None] for i in range(3))
    verts = output["verts"]
    expected = torch.stack([s * (verts[..., 0] + tx), -s * (verts[..., 1] + ty), -s * verts[..., 2]], dim=-1)
    assert torch.allclose(output["trans_verts"], expected, atol=1e-6)  # y and z negated, no +10 on z
    lmk = output["predicted_landmarks2d_flame_space"]
    expected_lmk = torch.stack([s * (lmk[..., 0] + tx), -s * (lmk[..., 1] + ty)], dim=-1)
    assert torch.allclose(output["predicted_landmarks"], expected_lmk, atol=1e-6)
    mp = output["predicted_landmarks2d_mediapipe_flame_space"]
    assert torch.allclose(output["predicted_landmarks_mediapipe"][..., 1], -s * (mp[..., 1] + ty), atol=1e-6)


def test_encoders_see_the_inputs_exactly_as_given(model, image):
    enc = model.face_encoder
    first = {
        "arcface": enc.mica_deca_encoder.mica_encoder.E_mica.arcface.conv1,
        "deca": enc.mica_deca_encoder.deca_encoder.encoder.encoder.conv1,
        "expression": enc.expression_encoder.encoder.encoder.conv1,
    }
    mica_image = torch.rand(2, 3, 112, 112) * 2 - 1
    with first_layer_inputs({"arcface": first["arcface"]}, stop_at="arcface") as seen, pytest.raises(_Stop):
        model.encode(image, mica_image=mica_image)
    assert torch.equal(seen["arcface"], mica_image)
    with first_layer_inputs({"arcface": first["arcface"]}, stop_at="arcface") as seen, pytest.raises(_Stop):
        model.encode(image)  # no aligned crop: the 224 crop, 2x2-averaged, in [-1, 1]
    assert torch.allclose(seen["arcface"], F.avg_pool2d(image, 2) * 2 - 1)
    with first_layer_inputs({"deca": first["deca"]}, stop_at="deca") as seen, pytest.raises(_Stop):
        model.encode(image, shapecode=torch.zeros(2, 300))
    assert torch.equal(seen["deca"], image)  # no mean/std normalisation
    with first_layer_inputs({"expression": first["expression"]}, stop_at="expression") as seen, pytest.raises(_Stop):
        model.encode(image, shapecode=torch.zeros(2, 300))
    assert torch.equal(seen["expression"], image)


def test_cached_shapecode_skips_mica(model, image):
    cached = torch.randn(2, 300)
    arcface = model.face_encoder.mica_deca_encoder.mica_encoder.E_mica.arcface.conv1
    with first_layer_inputs({"arcface": arcface}) as seen, zero_trunks(model):
        codes = model.encode(image, shapecode=cached)
    assert "arcface" not in seen
    assert torch.equal(codes["shapecode"], cached)
    with pytest.raises(ValueError, match=r"shapecode must be \(2, 300\)"):
        model.encode(image, shapecode=torch.zeros(1, 300))


def test_decode_of_the_codes_gives_the_forward_geometry(model, output):
    codes = {k: output[k] for k in ("shapecode", "texcode", "jawpose", "globalpose", "cam", "lightcode", "expcode")}
    geometry = model.decode(codes)
    assert set(codes) | set(geometry) == set(output)
    for key, value in geometry.items():
        assert torch.equal(value, output[key]), key


def test_jaw_variants_take_jaw_from_the_expression_branch_or_zero(model, image):
    with torch.device("meta"):  # the networks are replaced below; skip allocating 117 M random weights
        jaw = EMICA(model.shape_model.flame, {"texcode": 50, "globalpose": 3, "cam": 3, "lightcode": 27},
                    {"expcode": 100, "jawpose": 3})
    deca_code = torch.arange(83, dtype=torch.float32)[None]
    expression_code = 1000 + torch.arange(103, dtype=torch.float32)[None]
    jaw.face_encoder.mica_deca_encoder.deca_encoder.encoder = ConstantNet(deca_code)
    jaw.face_encoder.expression_encoder.encoder = ConstantNet(expression_code)
    codes = jaw.encode(image, shapecode=torch.zeros(2, 300))
    assert torch.equal(codes["jawpose"], expression_code[:, 100:103].expand(2, -1))
    assert torch.equal(codes["globalpose"][0], deca_code[0, 50:53]) and torch.equal(codes["cam"][0], deca_code[0, 53:56])
    assert torch.equal(codes["expcode"][0], expression_code[0, :100])
    # FLAME 2023 "no jaw": no branch predicts it, so the jaw is zero
    jaw.expression_predicts = {"expcode": 100}
    jaw.face_encoder.expression_encoder.encoder = ConstantNet(expression_code[:, :100])
    assert torch.equal(jaw.encode(image, shapecode=torch.zeros(2, 300))["jawpose"], torch.zeros(2, 3))
    # both branches predict a jaw: the expression branch (written last in inferno) wins
    jaw.deca_predicts = {"texcode": 50, "jawpose": 3, "globalpose": 3, "cam": 3, "lightcode": 27}
    jaw.expression_predicts = {"expcode": 100, "jawpose": 3}
    jaw.face_encoder.mica_deca_encoder.deca_encoder.encoder = ConstantNet(torch.arange(86.0)[None])
    jaw.face_encoder.expression_encoder.encoder = ConstantNet(expression_code)
    assert torch.equal(jaw.encode(image, shapecode=torch.zeros(2, 300))["jawpose"][0], expression_code[0, 100:])


def test_inputs_of_the_wrong_size_are_rejected(model):
    with pytest.raises(ValueError, match=r"image must be \(B, 3, 224, 224\)"):
        model(torch.rand(1, 3, 256, 256))
    with pytest.raises(ValueError, match=r"mica_image must be \(B, 3, 112, 112\)"):
        model.encode(torch.rand(1, 3, 224, 224), mica_image=torch.rand(1, 3, 224, 224))


# ---------------------------------------------------------------------------------------------- detail, EMOCA


@pytest.mark.slow
def test_emica_detail_mode_borrows_emoca_detail_branch(emoca_assets, image):
    detail = load_model(assets_dir=emoca_assets, mode="detail")
    out = detail(image[:1], shapecode=torch.zeros(1, 300))
    assert out["detailcode"].shape == (1, 128)
    assert out["displacement_map"].shape == (1, 1, 256, 256)
    assert out["uv_detail_normals"].shape == (1, 3, 256, 256)
    fixed = detail.detail.uv.fixed_uv_dis
    assert (out["displacement_map"][0, 0] - fixed).abs().max() <= 0.01  # tanh(.) * 0.01 on top of the fixed map
    covered = detail.detail.uv.uv_face_index >= 0
    lengths = out["uv_detail_normals"][0].norm(dim=0)[covered]
    # unit normals, except where a texel's triangles are so small that DECA's eps 1e-6 shortens the normal
    assert covered.sum() > 10_000 and lengths.max() <= 1 + 1e-5 and (lengths > 0.999).float().mean() > 0.99
    eps = [m.eps for m in detail.detail.D_detail.conv_blocks if isinstance(m, nn.BatchNorm2d)]
    assert eps == [1e-5, 0.8, 0.8, 0.8, 0.8, 0.8]
    assert not any(p.requires_grad for p in detail.parameters()) and not detail.training


@pytest.mark.slow
def test_emoca_model_loads_with_its_own_codes(emoca_assets, image):
    emoca = load_model("EMOCA_v2_lr_mse_20", assets_dir=emoca_assets)
    assert isinstance(emoca, DecaModel) and emoca.uv is None
    assert list(emoca.state_dict())[0] == "deca.E_flame.encoder.conv1.weight"
    assert any(k.startswith("deca.E_expression.") for k in emoca.state_dict())
    out = emoca(image[:1])
    assert out["shapecode"].shape == (1, 100) and out["expcode"].shape == (1, 50) and out["lightcode"].shape == (1, 27)
    assert "detailcode" not in out and out["verts"].shape == (1, 5023, 3)
    # EMOCA's expression comes from E_expression, not from E_flame's expression slice
    with torch.no_grad():
        direct = emoca.deca.E_expression(image[:1])
    assert torch.allclose(out["expcode"], direct, atol=1e-6)
