"""build_engines.py on random-weight checkpoints in the released layout: ONNX exports of the real networks agree
with PyTorch, up-to-date files are kept, stale ones rebuilt or refused, and TensorRT's absence is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import build_engines
from realtime import engines as E
from realtime.models import load_model
from realtime.models.encoders import split_code

MODEL = "EMICA-CVT_flame2020_notexture"

try:
    import tensorrt  # noqa: F401

    HAS_TRT = True
except ImportError:
    HAS_TRT = False


@pytest.fixture(scope="module")
def assets(synthetic_assets) -> Path:
    return synthetic_assets  # the session's shared EMICA + EMOCA checkpoints (conftest)


def build(capsys, assets: Path, engines: Path, *extra: str, model: str = MODEL) -> tuple[int, str, str]:
    rc = build_engines.main(["--model", model, "--assets_dir", str(assets), "--engines_dir", str(engines), *extra])
    out, err = capsys.readouterr()
    return rc, out, err


def test_flame_export_keep_rebuild_and_refuse(assets, tmp_path, capsys):
    rc, out, _ = build(capsys, assets, tmp_path, "--networks", "flame")
    onnx = tmp_path / MODEL / "flame.onnx"
    assert rc == 0 and onnx.is_file()
    assert "flame: exported" in out and "max relative error" in out
    error = float(out.split("max relative error ")[1].split()[0])
    assert error < 1e-4
    without_trt = [line for line in out.splitlines() if "TensorRT" in line]
    if not HAS_TRT:
        assert without_trt == [f"TensorRT is not installed: stopping after the ONNX exports. To build engines: "
                               f"{E.TRT_INSTALL_HINT}."]
        assert E.TRT_INSTALL_HINT.startswith('pip install "tensorrt>=10,<11"')
    manifest = E.load_manifest(tmp_path / MODEL / "flame.json")
    assert manifest.outputs == {"vertices": [-1, 5023, 3], "landmarks2d": [-1, 68, 3], "landmarks3d": [-1, 68, 3],
                                "landmarks_mediapipe": [-1, 105, 3]}
    assert manifest.onnx_sha256 == E.file_sha256(onnx)

    # Up to date: kept, byte for byte.
    before = onnx.stat().st_mtime_ns
    rc, out, _ = build(capsys, assets, tmp_path, "--networks", "flame", "--onnx-only")
    assert rc == 0 and f"flame: {onnx} is up to date" in out and onnx.stat().st_mtime_ns == before

    # Weights that differ from the ones exported (as after a checkpoint update): refused, then rebuilt.
    data = json.loads(manifest.location.read_text())
    data["weights_sha256"] = "0" * 64
    manifest.location.write_text(json.dumps(data))
    rc, _, err = build(capsys, assets, tmp_path, "--networks", "flame", "--onnx-only", "--no-rebuild")
    assert rc == 2
    assert err.startswith(f"error: {onnx} is stale (the checkpoint changed (weights sha256 000000000000…")
    assert "--no-rebuild was given" in err and err.count("\n") == 1
    rc, out, _ = build(capsys, assets, tmp_path, "--networks", "flame", "--onnx-only")
    assert rc == 0 and "flame.onnx is stale: the checkpoint changed" in out and "flame: exported" in out
    assert E.load_manifest(manifest.location).weights_sha256 != "0" * 64

    # A modified ONNX file is not trusted either.
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    rc, out, _ = build(capsys, assets, tmp_path, "--networks", "flame", "--onnx-only")
    assert rc == 0 and "the file was modified after export" in out


def test_an_export_that_disagrees_with_pytorch_fails_loudly_and_is_removed(assets, tmp_path, capsys, monkeypatch):
    def disagree(module, onnx_path, inputs, rtol):
        raise E.ExportMismatchError(f"{onnx_path}: output 'vertices' differs from PyTorch by 0.5 (relative), above {rtol:g}")

    monkeypatch.setattr(build_engines.E, "validate_onnx", disagree)
    rc, _, err = build(capsys, assets, tmp_path, "--networks", "flame")
    assert rc == 1 and err.startswith("error: ") and "output 'vertices' differs from PyTorch by 0.5" in err
    assert list((tmp_path / MODEL).iterdir()) == []


class _FakeTensorRT:
    """TensorRT's part of build_engines on the CPU: 'engines' are bytes, and their check against PyTorch says `error`."""

    def __init__(self, monkeypatch, error: float):
        self.error = error
        gpu = E.Availability(cuda=True, gpu_name="Fake GPU 80GB", compute_capability="9.0", tensorrt_version="10.0.1")
        monkeypatch.setattr(E, "probe_availability", lambda device="cuda": gpu)
        monkeypatch.setattr(E, "build_trt_engine", self.build)
        monkeypatch.setattr(E, "TensorRTEngine", lambda path, manifest=None, **kw: path)
        monkeypatch.setattr(build_engines, "compare_with_torch", lambda net, engine, batch: self.error)
        monkeypatch.setattr(torch.nn.Module, "to", lambda module, *a, **kw: module)  # "cuda" on a CPU box

    def build(self, onnx_path, engine_path, precision, batch_profile, timing_cache=None, workspace_gib=4.0):
        Path(engine_path).write_bytes(b"engine " + precision.encode())
        Path(timing_cache).write_bytes(b"tactics")


def test_an_engine_that_fails_its_check_is_removed_and_a_good_one_is_kept(assets, tmp_path, capsys, monkeypatch):
    fake = _FakeTensorRT(monkeypatch, error=0.5)  # above fp32's limit
    rc, _, err = build(capsys, assets, tmp_path, "--networks", "flame", "--precision", "fp32", "--batch", "1,2,4")
    assert rc == 1 and "TensorRT fp32 differs from PyTorch by 0.5" in err and err.count("\n") == 1
    assert sorted(p.name for p in (tmp_path / MODEL).iterdir()) == ["flame.json", "flame.onnx"]  # no engine, no manifest

    fake.error = 1e-5
    rc, out, _ = build(capsys, assets, tmp_path, "--networks", "flame", "--precision", "fp32", "--batch", "1,2,4")
    (engine,) = (tmp_path / MODEL).glob("flame-fp32-b1_2_4-fake-gpu-80gb-trt10.0.1.engine")
    assert rc == 0 and "max relative error 1.00e-05" in out
    assert E.load_manifest(E.manifest_path(engine)).gpu_name == "Fake GPU 80GB"
    assert (tmp_path / "timing-fake-gpu-80gb-trt10.0.1.cache").read_bytes() == b"tactics"
    rc, out, _ = build(capsys, assets, tmp_path, "--networks", "flame", "--precision", "fp32", "--batch", "1,2,4")
    assert rc == 0 and f"flame fp32: {engine} is up to date" in out


@pytest.mark.slow
def test_every_coarse_network_exports_and_onnx_reproduces_the_model(assets, tmp_path, capsys):
    """All four EMICA networks through ONNX Runtime, chained like emica.py, give the model's own geometry."""
    rc, out, _ = build(capsys, assets, tmp_path, "--onnx-only")
    assert rc == 0
    errors = {line.split(":")[0]: float(line.split("max relative error ")[1].split()[0])
              for line in out.splitlines() if "max relative error" in line}
    assert set(errors) == {"mica", "deca", "expression", "flame"} and max(errors.values()) < 1e-4

    model = load_model(MODEL, assets_dir=assets)
    networks = E.model_networks(model)
    weights = {n: E.module_sha256(net.module) for n, net in networks.items()}
    backend, reason = E.select_backend("auto", "cpu", tmp_path, MODEL, list(networks), weights=weights,
                                       available=E.Availability(cuda=False, onnxruntime=True))
    assert backend == "onnxruntime", reason
    engines = E.create_engines(backend, networks, "cpu", "fp32", tmp_path, MODEL, weights=weights)
    gen = torch.Generator().manual_seed(7)
    image = torch.rand(3, 3, 224, 224, generator=gen)  # batch 3: exported at 1, validated at 2
    mica_image = torch.rand(3, 3, 112, 112, generator=gen) * 2 - 1
    (shapecode,) = engines["mica"](mica_image)
    codes = {"shapecode": shapecode}
    codes.update(split_code(engines["deca"](image)[0], model.deca_predicts))
    codes.update(split_code(engines["expression"](image)[0], model.expression_predicts))
    vertices, landmarks2d, _, _ = engines["flame"](codes["shapecode"], codes["expcode"], codes["globalpose"],
                                                   codes["jawpose"])
    with torch.no_grad():
        want = model(image, mica_image=mica_image)
    for name in ("shapecode", "expcode", "cam", "jawpose"):
        assert E.relative_error(codes[name].numpy(), want[name].numpy()) < 1e-4, name
    assert E.relative_error(vertices.numpy(), want["verts"].numpy()) < 1e-4
    assert E.relative_error(landmarks2d.numpy(), want["predicted_landmarks2d_flame_space"].numpy()) < 1e-4


@pytest.mark.slow
def test_detail_networks_of_emoca_export(assets, tmp_path, capsys):
    rc, out, _ = build(capsys, assets, tmp_path / "engines", "--mode", "detail", "--onnx-only",
                       "--networks", "detail_encoder,detail_decoder", model="EMOCA_v2_lr_mse_20")
    assert rc == 0
    errors = {line.split(":")[0]: float(line.split("max relative error ")[1].split()[0])
              for line in out.splitlines() if "max relative error" in line}
    assert set(errors) == {"detail_encoder", "detail_decoder"} and max(errors.values()) < 1e-4
    manifest = E.load_manifest(tmp_path / "engines" / "EMOCA_v2_lr_mse_20" / "detail_decoder.json")
    assert manifest.mode == "detail"
    assert manifest.outputs == {"displacement_map": [-1, 1, 256, 256], "uv_detail_normals": [-1, 3, 256, 256]}


@pytest.mark.parametrize(
    "args,message",
    [
        (["--batch", "4,1,16"], "--batch takes min,opt,max with 1 <= min <= opt <= max"),
        (["--batch", "1,4"], "--batch takes min,opt,max"),
        (["--precision", "fp8"], "--precision takes a comma list of fp16 and fp32 (got 'fp8')"),
        (["--force", "--no-rebuild"], "--force and --no-rebuild contradict each other"),
    ],
)
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, args, message):
    rc, out, err = build(capsys, tmp_path, tmp_path / "engines", *args)
    assert rc == 2 and out == "" and err == f"error: {message}" + err.split(message, 1)[1]
    assert err.count("\n") == 1 and not (tmp_path / "engines").exists()


def test_missing_model_names_the_folder_and_the_fix(tmp_path, capsys):
    rc, _, err = build(capsys, tmp_path, tmp_path / "engines")
    assert rc == 2 and f"model '{MODEL}' not found" in err and "download_assets.sh" in err


def test_batch_profile_parsing():
    assert build_engines.parse_batch_profile("1,4,16") == (1, 4, 16)
    assert build_engines.parse_batch_profile("8") == (8, 8, 8)
    assert build_engines.parse_precisions("fp16, fp32,fp16") == ("fp16", "fp32")


@pytest.mark.tensorrt
@pytest.mark.skipif(not (HAS_TRT and torch.cuda.is_available()), reason="needs tensorrt and CUDA")
def test_tensorrt_engines_are_built_and_kept(assets, tmp_path, capsys):
    rc, out, _ = build(capsys, assets, tmp_path, "--networks", "deca,flame", "--precision", "fp32,fp16",
                       "--batch", "1,2,4")
    assert rc == 0
    folder = tmp_path / MODEL
    # FLAME runs in fp32 whatever is asked (E.network_precision): deca fp32 + fp16, flame fp32.
    assert len(list(folder.glob("*-b1_2_4-*.engine"))) == 3 and len(list(tmp_path.glob("timing-*-trt*.cache"))) == 1
    rc, out, _ = build(capsys, assets, tmp_path, "--networks", "deca,flame", "--precision", "fp32,fp16",
                       "--batch", "1,2,4")
    assert rc == 0 and out.count("is up to date") == 5  # 2 ONNX + 3 engines
