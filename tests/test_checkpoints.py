"""Model files: checkpoint selection, cfg facts, safe torch loading, strict key matching, download_assets.sh."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from realtime.errors import AssetError, UserError
from realtime.models.checkpoints import (
    EMICA_REBUILDABLE,
    load_state_strict,
    load_torch_file,
    locate_checkpoint,
    read_cfg,
    read_state_dict,
    resolve_asset_path,
)
from realtime.models.emica import EMICA
from realtime.models.flame import FLAME
from realtime.models.registry import deca_config, emica_config, model_info
from tests.synthetic_flame import synthetic_flame_assets

REPO = Path(__file__).resolve().parents[1]


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


# ------------------------------------------------------------------------------------------ locate_checkpoint


def test_best_checkpoint_is_the_lowest_value_after_the_last_equals(tmp_path):
    touch(tmp_path / "checkpoints" / "last.ckpt")
    touch(tmp_path / "checkpoints" / "model-epoch=01-val" / "loss_total=0.50000000.ckpt")
    best = touch(tmp_path / "checkpoints" / "model-epoch=03-val" / "loss_total=0.12345678.ckpt")
    touch(tmp_path / "checkpoints" / "model-epoch=02-val" / "loss_total=0.20000000.ckpt")
    touch(tmp_path / "checkpoints" / "model-epoch=04-val" / "loss_total=nan-ish.ckpt")  # unparsable: skipped
    assert locate_checkpoint(tmp_path) == best


def test_best_checkpoint_tie_goes_to_the_later_file(tmp_path):
    touch(tmp_path / "a" / "x=0.1.ckpt")
    later = touch(tmp_path / "b" / "x=0.1.ckpt")
    assert locate_checkpoint(tmp_path) == later


def test_last_ckpt_is_never_best_and_latest_picks_it(tmp_path):
    last = touch(tmp_path / "last.ckpt")
    with pytest.raises(AssetError, match="no checkpoint under .* has a '<metric>=<value>.ckpt' name"):
        locate_checkpoint(tmp_path)
    assert locate_checkpoint(tmp_path, mode="latest") == last


def test_no_checkpoint_names_the_folder_and_the_download_step(tmp_path):
    with pytest.raises(AssetError) as err:
        locate_checkpoint(tmp_path / "models" / "EMICA-CVT_flame2020")
    assert str(tmp_path / "models" / "EMICA-CVT_flame2020") in str(err.value)
    assert "bash download_assets.sh" in str(err.value)


# ------------------------------------------------------------------------------------------ cfg facts


def test_relative_and_cluster_paths_resolve_under_the_assets_folder(tmp_path):
    assets = tmp_path / "assets"
    touch(assets / "FLAME" / "geometry" / "mediapipe_landmark_embedding.npz")
    assert resolve_asset_path("FLAME/geometry/generic_model.pkl", assets) == assets / "FLAME/geometry/generic_model.pkl"
    cluster = "/ps/scratch/rdanecek/data/FLAME/geometry/mediapipe_landmark_embedding.npz"
    assert resolve_asset_path(cluster, assets) == assets / "FLAME/geometry/mediapipe_landmark_embedding.npz"
    # missing everywhere: re-rooted at the known asset folder, so an error names the expected file
    assert resolve_asset_path("/ps/scratch/x/FLAME/mask/uv_face_mask.png", assets) == assets / "FLAME/mask/uv_face_mask.png"
    existing = touch(tmp_path / "elsewhere" / "generic_model.pkl")
    assert resolve_asset_path(existing, assets) == existing


def _emica_cfg(deca_predicts: dict, expression_predicts: dict) -> dict:
    return {"model": {
        "face_encoder": {"type": "EmicaEncoder", "encoders": {
            "expression_encoder": {"backbone": "ResNet50", "predicts": expression_predicts},
            "mica_deca_encoder": {"encoders": {"deca_encoder": {"backbone": "ResNet50", "predicts": deca_predicts},
                                               "mica_encoder": {"mica_model_path": "MICA/model/mica_2023.tar"}}},
        }},
        "shape_model": {"flame": {"type": "flame_mediapipe", "n_shape": 300, "n_exp": 100,
                                  "flame_model_path": "/ps/scratch/rdanecek/data/FLAME/geometry/generic_model_2023.pkl"}},
    }}


def test_emica_cfg_gives_split_orders_and_paths(tmp_path):
    cfg = _emica_cfg({"texcode": 50, "globalpose": 3, "cam": 3, "lightcode": 27}, {"expcode": 100, "jawpose": 3})
    facts = emica_config(cfg, tmp_path / "cfg.yaml", tmp_path)
    assert list(facts.deca_predicts.items()) == [("texcode", 50), ("globalpose", 3), ("cam", 3), ("lightcode", 27)]
    assert list(facts.expression_predicts.items()) == [("expcode", 100), ("jawpose", 3)]
    assert facts.flame.model == tmp_path / "FLAME/geometry/generic_model_2023.pkl"
    assert facts.flame.mediapipe_embedding == tmp_path / "FLAME/geometry/mediapipe_landmark_embedding.npz"
    assert facts.mica_model == tmp_path / "MICA/model/mica_2023.tar"
    assert facts.checkpoint_mode == "best"


def test_emica_cfg_defaults_to_the_released_split(tmp_path):
    facts = emica_config({"model": {}}, tmp_path / "cfg.yaml", tmp_path)
    assert list(facts.deca_predicts.items()) == [("texcode", 50), ("jawpose", 3), ("globalpose", 3), ("cam", 3),
                                                 ("lightcode", 27)]
    assert dict(facts.expression_predicts) == {"expcode": 100}


@pytest.mark.parametrize(
    "deca, expression, message",
    [
        ({"texcode": 50, "bogus": 3, "cam": 3, "globalpose": 3}, {"expcode": 100}, "unknown code 'bogus'"),
        ({"texcode": 50, "globalpose": 3}, {"expcode": 100}, "no encoder predicts 'cam'"),
        ({"texcode": 50, "globalpose": 3, "cam": 4}, {"expcode": 100}, "'.*cam' is 4, EMICA needs 3"),
        ({"texcode": 50, "globalpose": 3, "cam": 3}, {"expcode": 50}, "expcode has 50 values but FLAME n_exp is 100"),
    ],
)
def test_bad_emica_cfg_is_an_asset_error_naming_the_file(tmp_path, deca, expression, message):
    with pytest.raises(AssetError, match=message) as err:
        emica_config(_emica_cfg(deca, expression), tmp_path / "cfg.yaml", tmp_path)
    assert str(tmp_path / "cfg.yaml") in str(err.value)


def test_deca_cfg_facts_and_unsupported_variants(tmp_path):
    model = {"deca_class": "ExpDECA", "expression_backbone": "deca_clone", "exp_deca_jaw_pose": True, "n_shape": 100,
             "n_exp": 50, "flame_mediapipe_lmk_embedding_path": "/ps/x.npz"}
    facts = deca_config({"detail": {"model": model}}, tmp_path / "cfg.yaml", tmp_path, "detail")
    assert facts.expression_encoder and facts.exp_jaw_pose and not facts.exp_global_pose
    assert facts.flame.mediapipe_embedding == tmp_path / "FLAME/geometry/mediapipe_landmark_embedding.npz"
    assert facts.detail.fixed_displacement == tmp_path / "FLAME/geometry/fixed_uv_displacements/fixed_displacement_256.npy"
    with pytest.raises(AssetError, match="expression_backbone: deca_parallel' is not supported"):
        deca_config({"detail": {"model": {**model, "expression_backbone": "deca_parallel"}}}, tmp_path / "c", tmp_path, "detail")
    with pytest.raises(AssetError, match="no 'coarse.model' section"):
        deca_config({"detail": {"model": model}}, tmp_path / "c", tmp_path, "coarse")


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(UserError, match="unknown model 'EMICA-XYZ'.*EMICA-CVT_flame2020_notexture.*EMOCA_v2_lr_mse_20.*or mediapipe"):
        model_info("EMICA-XYZ")


def test_cfg_read_errors(tmp_path):
    with pytest.raises(AssetError, match="not found: run `bash download_assets.sh`"):
        read_cfg(tmp_path / "missing" / "cfg.yaml")
    bad = tmp_path / "cfg.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(AssetError, match=f"cannot read model config {bad}"):
        read_cfg(bad)


# ------------------------------------------------------------------------------------------ safe loading

def _leave_marker(path: str) -> None:
    Path(path).write_text("code from a checkpoint ran")


class Booby:
    """Unpickling this with plain pickle would call _leave_marker."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (_leave_marker, (self.marker,))


class HyperParams:
    def __init__(self):
        self.lr = 1e-4


def test_checkpoints_load_without_running_pickled_code(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.arange(3.0)}, "hyper_parameters": {"cfg": HyperParams()},
                "trap": Booby(str(marker))}, path)
    state, others = read_state_dict(path)
    assert torch.equal(state["w"], torch.arange(3.0))
    assert others == ["hyper_parameters", "trap"]
    assert not marker.exists()


def test_truncated_checkpoint_is_an_asset_error_with_the_fix(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(AssetError, match=f"cannot read model file {path} .*delete it and run `bash download_assets.sh`"):
        load_torch_file(path)


def test_checkpoint_without_tensors_is_rejected(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": "not a tensor"}}, path)
    with pytest.raises(AssetError, match="no tensor state_dict"):
        read_state_dict(path)


# ------------------------------------------------------------------------------------------ strict loading


@pytest.fixture(scope="module")
def emica_and_state(tmp_path_factory):
    """An EMICA module (synthetic FLAME) and a copy of its state dict plus the checkpoint's rebuildable extras."""
    assets = synthetic_flame_assets(tmp_path_factory.mktemp("flame"))
    model = EMICA(FLAME(assets, 300, 100))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["renderer.render.faces"] = torch.zeros(1, 9976, 3, dtype=torch.int64)
    state["shape_model.flametex.texture_mean"] = torch.zeros(1, 1, 786432)
    return model, state


CKPT = Path("/assets/FaceReconstruction/models/EMICA-CVT_flame2020_notexture/checkpoints/m=0.1.ckpt")
KEY = "face_encoder.mica_deca_encoder.deca_encoder.encoder.layers.2.weight"


def test_strict_load_accepts_the_full_state_and_logs_the_skipped_entries_once(emica_and_state, caplog):
    model, state = emica_and_state
    with torch.no_grad():
        model.face_encoder.expression_encoder.encoder.layers[2].bias.fill_(123.0)
    with caplog.at_level(logging.INFO, logger="realtime.models.checkpoints"):
        load_state_strict(model, state, CKPT, ignore_prefixes=EMICA_REBUILDABLE, ignored_entries=["optimizer_states"])
    assert torch.equal(model.face_encoder.expression_encoder.encoder.layers[2].bias,
                       state["face_encoder.expression_encoder.encoder.layers.2.bias"])
    records = [r.getMessage() for r in caplog.records]
    assert len(records) == 1
    assert "ignored 3" in records[0] and "renderer.render.*" in records[0] and "optimizer_states" in records[0]


def test_missing_key_names_the_key_and_the_file(emica_and_state):
    model, state = emica_and_state
    broken = {k: v for k, v in state.items() if k != KEY}
    with pytest.raises(AssetError, match=f"missing key '{KEY}' in {CKPT}"):
        load_state_strict(model, broken, CKPT, ignore_prefixes=EMICA_REBUILDABLE)


def test_renamed_key_is_unexpected_and_named(emica_and_state):
    model, state = emica_and_state
    renamed = {(k.replace("layers.2", "layers.3") if k == KEY else k): v for k, v in state.items()}
    with pytest.raises(AssetError, match=f"unexpected key '{KEY.replace('layers.2', 'layers.3')}' in {CKPT}"):
        load_state_strict(model, renamed, CKPT, ignore_prefixes=EMICA_REBUILDABLE)


def test_extra_network_key_is_unexpected(emica_and_state):
    model, state = emica_and_state
    extra = dict(state, **{"face_encoder.mica_deca_encoder.mica_encoder.E_mica.flameModel.generator.v_template": torch.zeros(3)})
    with pytest.raises(AssetError, match=r"unexpected key 'face_encoder\.mica_deca_encoder\.mica_encoder\.E_mica\.flameModel\.generator\.v_template'"):
        load_state_strict(model, extra, CKPT, ignore_prefixes=EMICA_REBUILDABLE)


def test_wrong_shape_names_key_file_and_shapes(emica_and_state):
    model, state = emica_and_state
    wrong = dict(state, **{KEY: torch.zeros(83, 1024)})  # a `_jaw` checkpoint read with the default cfg
    with pytest.raises(AssetError, match=rf"key '{KEY}' in {CKPT} has shape \(83, 1024\), the model expects \(86, 1024\)"):
        load_state_strict(model, wrong, CKPT, ignore_prefixes=EMICA_REBUILDABLE)


def test_prefix_map_loads_a_sub_network_and_reports_ckpt_names(emica_and_state):
    model, state = emica_and_state
    head = model.face_encoder.expression_encoder.encoder.layers
    sub = {f"deca.E_expression.layers.{k}": v for k, v in head.state_dict().items()}
    sub["deca.E_flame.layers.0.weight"] = torch.zeros(1)
    load_state_strict(head, sub, CKPT, prefix_map={"deca.E_expression.layers.": ""}, ignore_prefixes=("deca.E_flame.",))
    del sub["deca.E_expression.layers.2.bias"]
    with pytest.raises(AssetError, match="missing key 'deca.E_expression.layers.2.bias'"):
        load_state_strict(head, sub, CKPT, prefix_map={"deca.E_expression.layers.": ""}, ignore_prefixes=("deca.E_flame.",))


# ------------------------------------------------------------------------------------------ download_assets.sh


def run_script(*args: str, script: Path = REPO / "download_assets.sh") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAME_")}
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, env=env)


def test_download_script_parses_and_has_help():
    assert subprocess.run(["bash", "-n", str(REPO / "download_assets.sh")]).returncode == 0
    result = run_script("--help")
    assert result.returncode == 0
    for word in ("--assets", "--only", "--yes", "flame.is.tue.mpg.de", "FLAME_USERNAME", "mica", "emica", "emoca"):
        assert word in result.stdout


def test_download_script_rejects_unknown_options():
    result = run_script("--bogus")
    assert result.returncode == 2 and "unknown option '--bogus'" in result.stderr
    result = run_script("--only", "flame,nope")
    assert result.returncode == 2 and "unknown component 'nope'" in result.stderr


def test_download_script_verifies_the_bundled_data_offline(tmp_path):
    result = run_script("--only", "data", "--assets", str(tmp_path / "assets"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "carphone_pristine.mp4: OK" in result.stdout and "face_landmarker.task: OK" in result.stdout
    assert not (tmp_path / "assets").exists()  # the data check touches nothing else


def test_download_script_reports_a_corrupted_bundled_file(tmp_path):
    copy = tmp_path / "repo"
    (copy / "realtime").mkdir(parents=True)
    shutil.copy(REPO / "download_assets.sh", copy / "download_assets.sh")
    shutil.copytree(REPO / "realtime" / "data", copy / "realtime" / "data")
    with open(copy / "realtime" / "data" / "carphone_pristine.mp4", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    result = run_script("--only", "data", script=copy / "download_assets.sh")
    assert result.returncode == 1
    assert "FAILED: data: checksum mismatch or missing in realtime/data: carphone_pristine.mp4" in result.stdout


def test_download_script_without_licence_answers_fetches_nothing(tmp_path):
    """Non-interactive without --yes: every licence prompt reads EOF = no; nothing is downloaded."""
    assets = tmp_path / "assets"
    result = run_script("--only", "flame,mica,emica,emoca", "--assets", str(assets))
    assert result.returncode == 1
    for part in ("flame: licence not accepted", "mica: licence not accepted", "emica: licence not accepted",
                 "emoca: licence not accepted"):
        assert part in result.stdout
    assert list(assets.rglob("*")) == []
