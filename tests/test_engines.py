"""realtime.engines: engines agree with PyTorch, ONNX export/validation, manifests, staleness, backend choice.

Small stand-in networks keep this file fast; tests/test_build_engines.py exports the real EMICA networks.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from realtime import engines as E
from realtime.errors import AssetError, UserError

HAS_CUDA = torch.cuda.is_available()
try:
    import tensorrt  # noqa: F401

    HAS_TRT = True
except ImportError:
    HAS_TRT = False


class TinyEncoder(nn.Module):
    """Conv → BN → ReLU → pool → linear, like a miniature DECA encoder: (B, 3, 32, 32) → (B, 7)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 7)
        with torch.no_grad():  # non-trivial BN statistics, as in a trained network
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(image)))
        return self.fc(x.mean(dim=(2, 3)))


class TwoInTwoOut(nn.Module):
    """(B, 4), (B, 3) → (B, 4) sum-ish and (B, 2) product-ish: several inputs and outputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.a = nn.Linear(7, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.a(torch.cat([x, y], dim=1))
        return h, self.b(torch.tanh(h)) * y[:, :2]


def images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- TorchEngine


def test_torch_engine_on_cpu_equals_the_module_exactly():
    net = TinyEncoder()
    x = images(3)
    with torch.no_grad():
        want = net.eval()(x)
    engine = E.TorchEngine(TinyEncoder(), "cpu", "fp32", name="deca")
    (got,) = engine(x)
    assert (engine.name, engine.backend, engine.precision, engine.max_batch) == ("deca", "torch", "fp32", 16)
    assert got.shape == (3, 7) and got.dtype == torch.float32
    assert torch.equal(got, want)


def test_torch_engine_chunks_batches_above_max_batch():
    engine = E.TorchEngine(TinyEncoder(), "cpu", batch_sizes=(1, 2))
    x = images(5)
    (got,) = engine(x)
    with torch.no_grad():
        want = TinyEncoder().eval()(x)
    assert engine.max_batch == 2 and got.shape == (5, 7)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_torch_engine_several_inputs_and_outputs():
    engine = E.TorchEngine(TwoInTwoOut(), "cpu")
    x, y = torch.randn(6, 4), torch.randn(6, 3)
    h, p = engine(x, y)
    with torch.no_grad():
        wh, wp = TwoInTwoOut()(x, y)
    assert torch.equal(h, wh) and torch.equal(p, wp)


def test_torch_engine_refuses_fp16_on_cpu_and_bad_calls():
    with pytest.raises(UserError, match="fp16 inference needs a CUDA device.*--precision fp32"):
        E.TorchEngine(TinyEncoder(), "cpu", "fp16")
    with pytest.raises(UserError, match="precision must be one of fp32, fp16"):
        E.TorchEngine(TinyEncoder(), "cpu", "int8")
    engine = E.TorchEngine(TwoInTwoOut(), "cpu")
    with pytest.raises(ValueError, match="one common batch dimension"):
        engine(torch.randn(2, 4), torch.randn(3, 3))
    dict_engine = E.TorchEngine(DictOut(), "cpu")
    with pytest.raises(TypeError, match="tensor-in/tensor-out"):
        dict_engine(torch.randn(2, 4))


class DictOut(nn.Module):
    def forward(self, x: torch.Tensor) -> dict:
        return {"x": x}


@pytest.mark.skipif(HAS_CUDA, reason="checks the message on a machine without CUDA")
def test_torch_engine_on_missing_cuda_says_so():
    with pytest.raises(UserError, match="PyTorch sees no CUDA GPU; use --device cpu"):
        E.TorchEngine(TinyEncoder(), "cuda:0")


@pytest.mark.parametrize("batch,size", [(1, 1), (2, 4), (4, 4), (5, 16), (16, 16)])
def test_padded_batch_picks_the_nearest_captured_size(batch, size):
    assert E.padded_batch(batch, (1, 4, 16)) == size


def test_padded_batch_rejects_batches_above_the_largest_size():
    with pytest.raises(ValueError, match="exceeds the largest size 16"):
        E.padded_batch(17, (1, 4, 16))


# ---------------------------------------------------------------------------------------------- ONNX


def test_export_is_dynamic_in_batch_and_matches_pytorch(tmp_path):
    path = E.export_onnx(TinyEncoder(), [images(1)], tmp_path / "m" / "deca.onnx", ["image"], ["code"])
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["deca.onnx"]  # no temp left
    err = E.validate_onnx(TinyEncoder(), path, [images(3, seed=5)])  # exported at 1, run at 3
    assert 0 <= err < 1e-5
    engine = E.OnnxRuntimeEngine(path, "cpu")
    x = images(3, seed=5)
    (got,) = engine(x)
    with torch.no_grad():
        want = TinyEncoder().eval()(x)
    assert engine.input_names == ["image"] and engine.output_names == ["code"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_onnxruntime_sessions_do_not_spin_between_runs(tmp_path):
    # EMICA's networks run in turn, one session each: idle spinning threads of one session starved the next.
    path = E.export_onnx(TinyEncoder(), [images(1)], tmp_path / "m" / "deca.onnx", ["image"], ["code"])
    options = E.OnnxRuntimeEngine(path, "cpu").session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_static_export_does_not_accept_another_batch(tmp_path):
    """The control for the test above: without dynamic_batch the file is fixed at its export batch."""
    path = E.export_onnx(TinyEncoder(), [images(1)], tmp_path / "deca.onnx", ["image"], ["code"], dynamic_batch=False)
    engine = E.OnnxRuntimeEngine(path, "cpu")
    assert engine.max_batch == 1
    (got,) = engine(images(3))  # chunked into three batch-1 calls
    with torch.no_grad():
        torch.testing.assert_close(got, TinyEncoder().eval()(images(3)), rtol=1e-5, atol=1e-6)
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        session.run(None, {"image": images(3).numpy()})


def test_export_several_inputs_and_outputs(tmp_path):
    x, y = torch.randn(1, 4), torch.randn(1, 3)
    path = E.export_onnx(TwoInTwoOut(), [x, y], tmp_path / "two.onnx", ["x", "y"], ["h", "p"])
    assert E.validate_onnx(TwoInTwoOut(), path, [torch.randn(4, 4), torch.randn(4, 3)]) < 1e-5
    h, p = E.OnnxRuntimeEngine(path)(torch.ones(2, 4), torch.ones(2, 3))
    assert h.shape == (2, 4) and p.shape == (2, 2)


def test_validate_onnx_catches_a_wrong_export(tmp_path):
    path = E.export_onnx(TinyEncoder(seed=0), [images(1)], tmp_path / "deca.onnx", ["image"], ["code"])
    with pytest.raises(E.ExportMismatchError, match=r"output 'code' differs from PyTorch by .* above 0.0001"):
        E.validate_onnx(TinyEncoder(seed=1), path, [images(2)])


def test_failed_export_leaves_no_file(tmp_path):
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        E.export_onnx(Broken(), [torch.zeros(1, 2)], tmp_path / "broken.onnx", ["x"], ["y"])
    assert list(tmp_path.iterdir()) == []


def test_relative_error_is_relative_to_the_output_scale():
    ref = np.array([1000.0, 0.0, -500.0], dtype=np.float32)
    assert E.relative_error(ref + np.float32(0.1), ref) == pytest.approx(1e-4, rel=1e-3)
    assert E.relative_error(ref, ref) == 0.0


def test_onnxruntime_engine_errors(tmp_path):
    with pytest.raises(AssetError, match=r"not found: run python build_engines.py --model mymodel --onnx-only"):
        E.OnnxRuntimeEngine(tmp_path / "mymodel" / "deca.onnx")
    path = E.export_onnx(TinyEncoder(), [images(1)], tmp_path / "deca.onnx", ["image"], ["code"])
    with pytest.raises(UserError, match="fp32 export only"):
        E.OnnxRuntimeEngine(path, "cpu", "fp16")
    with pytest.raises(ValueError, match=r"takes 1 inputs \(image\), got 2"):
        E.OnnxRuntimeEngine(path)(images(1), images(1))


# ---------------------------------------------------------------------------------------------- files


def test_file_names_follow_the_design():
    path = E.engine_file("engines", "EMICA-CVT_flame2020_notexture", "mica", "fp16", (1, 4, 16),
                         "NVIDIA H100 80GB HBM3", "10.3.0")
    assert path == Path("engines/EMICA-CVT_flame2020_notexture/"
                        "mica-fp16-b1_4_16-nvidia-h100-80gb-hbm3-trt10.3.0.engine")
    assert E.manifest_path(path).name == "mica-fp16-b1_4_16-nvidia-h100-80gb-hbm3-trt10.3.0.json"
    assert E.onnx_file("engines", "DECA", "flame") == Path("engines/DECA/flame.onnx")


def make_manifest(folder: Path, **changes) -> E.EngineManifest:
    """A TensorRT manifest plus a dummy engine file for it in ``folder``."""
    fields = dict(
        model="EMICA-X", network="mica", mode="coarse", precision="fp16", inputs={"mica_image": [-1, 3, 112, 112]},
        outputs={"shapecode": [-1, 300]}, weights_sha256="a" * 64, onnx_sha256="b" * 64,
        batch_profile=(1, 4, 16), gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0",
        tensorrt_version="10.3.0",
    )
    fields.update(changes)
    path = E.engine_file(folder.parent, fields["model"], fields["network"], fields["precision"],
                         fields["batch_profile"], fields["gpu_name"], fields["tensorrt_version"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"serialized engine")
    manifest = E.EngineManifest(file=path.name, **fields)
    manifest.save(E.manifest_path(path))
    return manifest


def requirements(**changes) -> E.EngineRequirements:
    fields = dict(model="EMICA-X", network="mica", precision="fp16", weights_sha256="a" * 64,
                  gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0", tensorrt_version="10.3.0", batch_size=4)
    fields.update(changes)
    return E.EngineRequirements(**fields)


def test_manifest_round_trip(tmp_path):
    saved = make_manifest(tmp_path / "EMICA-X")
    loaded = E.load_manifest(saved.location)
    assert loaded == saved
    assert loaded.batch_profile == (1, 4, 16) and loaded.inputs == {"mica_image": [-1, 3, 112, 112]}
    assert loaded.path == tmp_path / "EMICA-X" / "mica-fp16-b1_4_16-nvidia-h100-80gb-hbm3-trt10.3.0.engine"
    data = json.loads(saved.location.read_text())
    assert data["batch_profile"] == [1, 4, 16] and "location" not in data and data["created"].endswith("Z")
    E.check_engine(loaded, requirements())  # usable: no exception


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(weights_sha256="c" * 64),
         r"the checkpoint changed \(weights sha256 aaaaaaaaaaaa… when built, cccccccccccc… now\)"),
        (dict(gpu_name="NVIDIA A100-SXM4-80GB", compute_capability="8.0"),
         r"built for another GPU \(NVIDIA H100 80GB HBM3; this one is NVIDIA A100-SXM4-80GB\)"),
        (dict(tensorrt_version="10.7.0"), r"another TensorRT version \(10.3.0; installed: 10.7.0\)"),
        (dict(batch_size=32), r"batch 32 is outside its batch profile 1..16.*--batch 1,4,32"),
        (dict(precision="fp32"), r"it is for precision 'fp16', not 'fp32'.*--precision fp32"),
        (dict(onnx_sha256="d" * 64), r"the ONNX export changed"),
    ],
)
def test_each_staleness_is_named_with_the_rebuild_command(tmp_path, change, message):
    manifest = E.load_manifest(make_manifest(tmp_path / "EMICA-X").location)
    with pytest.raises(E.StaleEngineError, match=message) as info:
        E.check_engine(manifest, requirements(**change))
    assert "run python build_engines.py --model EMICA-X" in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_engine_file_is_named(tmp_path):
    manifest = E.load_manifest(make_manifest(tmp_path / "EMICA-X").location)
    manifest.path.unlink()
    with pytest.raises(E.StaleEngineError, match=r"the file .*mica-fp16-b1_4_16.*\.engine is missing"):
        E.check_engine(manifest, requirements())


def test_several_problems_are_all_named(tmp_path):
    manifest = E.load_manifest(make_manifest(tmp_path / "EMICA-X").location)
    with pytest.raises(E.StaleEngineError) as info:
        E.check_engine(manifest, requirements(weights_sha256="c" * 64, tensorrt_version="10.7.0"))
    assert "checkpoint changed" in str(info.value) and "another TensorRT version" in str(info.value)


def test_missing_or_corrupt_manifest(tmp_path):
    with pytest.raises(AssetError, match=r"engine manifest .*mica.json is missing"):
        E.load_manifest(tmp_path / "EMICA-X" / "mica.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": "x"}')
    with pytest.raises(AssetError, match="bad.json is not a valid manifest"):
        E.load_manifest(bad)


def test_find_engine_skips_foreign_engines(tmp_path):
    folder = tmp_path / "EMICA-X"
    make_manifest(folder, gpu_name="NVIDIA A100-SXM4-80GB", compute_capability="8.0")
    with pytest.raises(E.StaleEngineError, match="built for another GPU"):
        E.find_engine(tmp_path, requirements())
    ours = make_manifest(folder)
    assert E.find_engine(tmp_path, requirements()) == ours.location.with_suffix(".engine")
    with pytest.raises(AssetError, match=r"no fp16 TensorRT engine for flame in .*: run python build_engines.py "
                                         r"--model EMICA-X --precision fp16"):
        E.find_engine(tmp_path, requirements(network="flame"))


def write_onnx_export(engines_dir: Path, model: str, network: str, weights_sha: str) -> Path:
    path = E.export_onnx(TinyEncoder(), [images(1)], E.onnx_file(engines_dir, model, network), ["image"], ["code"])
    E.EngineManifest(model=model, network=network, mode="coarse", precision="fp32", file=path.name,
                     inputs={"image": [-1, 3, 32, 32]}, outputs={"code": [-1, 7]}, weights_sha256=weights_sha,
                     onnx_sha256=E.file_sha256(path)).save(E.manifest_path(path))
    return path


def test_check_onnx_detects_a_modified_or_stale_export(tmp_path):
    path = write_onnx_export(tmp_path, "EMICA-X", "deca", "a" * 64)
    want = E.EngineRequirements("EMICA-X", "deca", "fp32", weights_sha256="a" * 64)
    assert E.check_onnx(tmp_path, want) == path
    with pytest.raises(E.StaleEngineError, match=r"checkpoint changed.*--model EMICA-X --onnx-only"):
        E.check_onnx(tmp_path, E.EngineRequirements("EMICA-X", "deca", "fp32", weights_sha256="c" * 64))
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(E.StaleEngineError, match="was modified after export"):
        E.check_onnx(tmp_path, want)
    with pytest.raises(AssetError, match=r"no ONNX export .*mica.onnx: run python build_engines.py --model EMICA-X "
                                         r"--mode detail --onnx-only"):
        E.check_onnx(tmp_path, E.EngineRequirements("EMICA-X", "mica", "fp32", mode="detail"))


def test_rebuild_hints_carry_the_runs_own_folders_and_detail_model(tmp_path):
    # A hint without the user's --assets_dir/--engines_dir failed when pasted; without --detail_model it rebuilt
    # the other detail model's export and the app refused again, in a loop.
    path = write_onnx_export(tmp_path, "EMICA-X", "detail_encoder", "a" * 64)
    flags = ("--assets_dir", "/data/my assets", "--engines_dir", str(tmp_path), "--detail_model", "EMOCA_v2_lr_cos_1.5")
    stale = E.EngineRequirements("EMICA-X", "detail_encoder", "fp32", mode="detail", weights_sha256="c" * 64,
                                 build_flags=flags)
    with pytest.raises(E.StaleEngineError) as info:
        E.check_onnx(tmp_path, stale)
    assert str(info.value).endswith(f"run python build_engines.py --model EMICA-X --mode detail "
                                    f"--assets_dir '/data/my assets' --engines_dir {tmp_path} "
                                    f"--detail_model EMOCA_v2_lr_cos_1.5 --onnx-only")
    path.unlink()
    with pytest.raises(AssetError, match=r"--engines_dir .* --detail_model EMOCA_v2_lr_cos_1.5 --onnx-only"):
        E.check_onnx(tmp_path, stale)


# ---------------------------------------------------------------------------------------------- backend selection

GPU_TRT = E.Availability(cuda=True, gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0",
                         tensorrt_version="10.3.0", onnxruntime=True)
GPU_NO_TRT = E.Availability(cuda=True, gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0", onnxruntime=True)
CPU_ORT = E.Availability(cuda=False, onnxruntime=True)
CPU_BARE = E.Availability(cuda=False)


def select(tmp_path, requested, device, available, **kw):
    kw.setdefault("precision", "fp16" if device.startswith("cuda") else "fp32")
    return E.select_backend(requested, device, tmp_path, "EMICA-X", ["mica"], available=available, **kw)


def test_auto_picks_tensorrt_with_valid_engines(tmp_path, caplog):
    make_manifest(tmp_path / "EMICA-X")
    with caplog.at_level(logging.INFO, logger="realtime.engines"):
        backend, reason = select(tmp_path, "auto", "cuda:0", GPU_TRT, batch_size=4)
    assert backend == "tensorrt" and "TensorRT 10.3.0 engines for NVIDIA H100" in reason
    assert [r.getMessage() for r in caplog.records] == [f"inference backend: tensorrt ({reason})"]


def test_auto_falls_back_to_torch_and_says_why(tmp_path):
    make_manifest(tmp_path / "EMICA-X")
    backend, reason = select(tmp_path, "auto", "cuda:0", GPU_NO_TRT)
    assert backend == "torch" and 'TensorRT is not installed: pip install "tensorrt>=10,<11"' in reason
    assert "CUDA graphs" in reason
    backend, reason = select(tmp_path, "auto", "cuda:0", GPU_TRT, batch_size=64)
    assert backend == "torch" and "batch 64 is outside its batch profile" in reason
    other_gpu = E.Availability(cuda=True, gpu_name="NVIDIA L4", compute_capability="8.9", tensorrt_version="10.3.0")
    backend, reason = select(tmp_path, "auto", "cuda:0", other_gpu)
    assert backend == "torch" and "built for another GPU" in reason


def test_auto_on_cpu_prefers_onnxruntime_when_exports_exist(tmp_path):
    backend, reason = select(tmp_path, "auto", "cpu", CPU_ORT)
    assert backend == "torch" and "no ONNX export" in reason and "--onnx-only" in reason
    write_onnx_export(tmp_path, "EMICA-X", "mica", "a" * 64)
    backend, reason = select(tmp_path, "auto", "cpu", CPU_ORT)
    assert backend == "onnxruntime" and "ONNX Runtime on the CPU" in reason
    backend, reason = select(tmp_path, "auto", "cpu", CPU_BARE)
    assert backend == "torch" and "pip install onnxruntime" in reason
    assert reason.endswith("PyTorch eager fp32 on the CPU")


def test_auto_checks_exports_against_the_loaded_weights(tmp_path):
    net = TinyEncoder()
    write_onnx_export(tmp_path, "EMICA-X", "mica", E.module_sha256(net))
    assert select(tmp_path, "auto", "cpu", CPU_ORT, weights={"mica": E.module_sha256(net)})[0] == "onnxruntime"
    with torch.no_grad():
        net.fc.bias[0] += 1e-3  # a retrained / other checkpoint
    backend, reason = select(tmp_path, "auto", "cpu", CPU_ORT, weights={"mica": E.module_sha256(net)})
    assert backend == "torch" and "checkpoint changed" in reason


def test_module_sha256_follows_weights_and_buffers():
    a, b = TinyEncoder(seed=0), TinyEncoder(seed=0)
    assert E.module_sha256(a) == E.module_sha256(b) and len(E.module_sha256(a)) == 64
    with torch.no_grad():
        b.bn.running_var[3] += 1e-6  # a buffer, not a parameter
    assert E.module_sha256(a) != E.module_sha256(b)
    assert E.module_sha256(TinyEncoder(seed=0).double()) != E.module_sha256(a)  # dtype counts


def test_explicit_requests_that_cannot_be_met_say_how_to_fix(tmp_path):
    with pytest.raises(UserError, match=re.escape('TensorRT is not installed: pip install "tensorrt>=10,<11"')):
        select(tmp_path, "tensorrt", "cuda:0", GPU_NO_TRT)
    with pytest.raises(UserError, match="TensorRT needs a CUDA GPU: use --device cuda:0"):
        select(tmp_path, "tensorrt", "cpu", E.Availability(cuda=False, tensorrt_version="10.3.0"))
    with pytest.raises(AssetError, match="no fp16 TensorRT engine for mica .*run python build_engines.py --model EMI"):
        select(tmp_path, "tensorrt", "cuda:0", GPU_TRT)
    with pytest.raises(UserError, match="ONNX Runtime is not installed: pip install onnxruntime"):
        select(tmp_path, "onnxruntime", "cpu", CPU_BARE)
    with pytest.raises(UserError, match="pip install onnxruntime-gpu"):
        select(tmp_path, "onnxruntime", "cuda:0", GPU_NO_TRT)
    with pytest.raises(AssetError, match="no ONNX export .*--onnx-only"):
        select(tmp_path, "onnxruntime", "cpu", CPU_ORT)
    with pytest.raises(UserError, match="no CUDA GPU is visible; use --device cpu"):
        select(tmp_path, "torch", "cuda:0", CPU_BARE)
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        select(tmp_path, "torch", "cpu", CPU_BARE, precision="fp16")
    with pytest.raises(UserError, match="--backend must be auto, tensorrt, torch, onnxruntime"):
        select(tmp_path, "openvino", "cpu", CPU_BARE)


def test_fp16_requests_use_fp32_engines_for_flame(tmp_path):
    assert [E.network_precision(n, "fp16") for n in ("mica", "deca", "flame", "detail_decoder")] == \
        ["fp16", "fp16", "fp32", "fp32"]
    make_manifest(tmp_path / "EMICA-X", network="flame", precision="fp32")
    make_manifest(tmp_path / "EMICA-X", network="mica", precision="fp16")
    backend, _ = E.select_backend("auto", "cuda:0", tmp_path, "EMICA-X", ["mica", "flame"], precision="fp16",
                                  available=GPU_TRT)
    assert backend == "tensorrt"


def test_explicit_torch_always_works(tmp_path):
    assert select(tmp_path, "torch", "cpu", CPU_BARE) == ("torch", "requested; PyTorch eager fp32 on the CPU")
    backend, reason = select(tmp_path, "torch", "cuda:0", GPU_TRT)
    assert backend == "torch" and "fp16 with CUDA graphs on NVIDIA H100" in reason


def test_probe_availability_describes_this_machine():
    a = E.probe_availability("cpu")
    assert a.cuda == torch.cuda.is_available() and a.onnxruntime  # onnxruntime is a test dependency
    assert (a.tensorrt_version is not None) == HAS_TRT


def test_create_engines_for_the_chosen_backend(tmp_path):
    networks = {"deca": E.Network("deca", TinyEncoder(), {"image": ((3, 32, 32), "image01")}, ("code",))}
    (x,) = networks["deca"].example_inputs(3)
    with torch.no_grad():
        want = TinyEncoder().eval()(x)
    torch_engines = E.create_engines("torch", networks, "cpu", "fp32", tmp_path, "EMICA-X", batch_sizes=(1, 2))
    assert isinstance(torch_engines["deca"], E.TorchEngine) and torch_engines["deca"].max_batch == 2
    torch.testing.assert_close(torch_engines["deca"](x)[0], want, rtol=0, atol=1e-6)  # chunked 2 + 1

    with pytest.raises(AssetError, match="no ONNX export"):
        E.create_engines("onnxruntime", networks, "cpu", "fp32", tmp_path, "EMICA-X")
    write_onnx_export(tmp_path, "EMICA-X", "deca", E.module_sha256(networks["deca"].module))
    ort_engines = E.create_engines("onnxruntime", networks, "cpu", "fp32", tmp_path, "EMICA-X",
                                   weights={"deca": E.module_sha256(networks["deca"].module)})
    assert ort_engines["deca"].backend == "onnxruntime"
    torch.testing.assert_close(ort_engines["deca"](x)[0], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(E.StaleEngineError, match="checkpoint changed"):
        E.create_engines("onnxruntime", networks, "cpu", "fp32", tmp_path, "EMICA-X", weights={"deca": "f" * 64})
    with pytest.raises(UserError, match="unknown backend 'openvino'"):
        E.create_engines("openvino", networks, "cpu", "fp32", tmp_path, "EMICA-X")


# ---------------------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_graphs_match_eager_with_padding():
    net = TinyEncoder().cuda().eval()
    engine = E.TorchEngine(TinyEncoder(), "cuda", "fp32", batch_sizes=(1, 4, 8))
    for batch in (1, 3, 4, 7, 8, 11):  # 3 and 7 are padded, 11 is chunked 8 + 3
        x = images(batch, seed=batch).cuda()
        (got,) = engine(x)
        with torch.no_grad():
            want = net(x)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    assert sorted(k[0] for k in engine._graphs) == [1, 4, 8]  # captured on use; 3 → 4, 7 and 11's rest (3) → 4, 8


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_two_threads_on_their_own_streams_share_one_graphed_engine():
    """The model stage and look-ahead's re-decode call the same engine: neither may see the other's results."""
    import threading

    engine = E.TorchEngine(TinyEncoder(), "cuda", "fp32", batch_sizes=(4,))
    net = TinyEncoder().cuda().eval()
    inputs = [images(4, seed=s).cuda() for s in (1, 2)]
    with torch.no_grad():
        wants = [net(x) for x in inputs]
    errors = []

    def worker(k: int) -> None:
        with torch.cuda.stream(torch.cuda.Stream()):
            for _ in range(50):
                (got,) = engine(inputs[k])
                torch.cuda.current_stream().synchronize()
                if not torch.allclose(got, wants[k], rtol=1e-3, atol=1e-4):
                    errors.append(k)

    threads = [threading.Thread(target=worker, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_a_network_that_cannot_be_captured_runs_eagerly_with_a_warning(caplog):
    class HostSync(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * float(x.abs().max().item() > 0)  # .item() waits for the GPU: not allowed in a capture

    engine = E.TorchEngine(HostSync(), "cuda", "fp32", batch_sizes=(2,))
    x = images(2).cuda()
    with caplog.at_level("WARNING", logger="realtime"):
        (got,) = engine(x)
    assert torch.equal(got, x) and not engine.cuda_graphs
    assert "CUDA graph capture failed" in caplog.text and "running it eagerly" in caplog.text
    (again,) = engine(x)  # no second attempt
    assert torch.equal(again, x)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_fp16_autocast_is_close_to_fp32_and_returns_fp32():
    net = TinyEncoder().cuda().eval()
    engine = E.TorchEngine(TinyEncoder(), "cuda", "fp16")
    engine.capture(images(1).cuda())
    x = images(4).cuda()
    (got,) = engine(x)
    with torch.no_grad():
        want = net(x)
    assert got.dtype == torch.float32
    assert E.relative_error(got.cpu().numpy(), want.cpu().numpy()) < 1e-2


@pytest.mark.tensorrt
@pytest.mark.skipif(not (HAS_TRT and HAS_CUDA), reason="needs tensorrt and CUDA")
def test_tensorrt_engine_matches_pytorch(tmp_path):
    onnx_path = E.export_onnx(TinyEncoder(), [images(1)], tmp_path / "M" / "deca.onnx", ["image"], ["code"])
    gpu = torch.cuda.get_device_name(0)
    engine_path = E.engine_file(tmp_path, "M", "deca", "fp32", (1, 2, 4), gpu, tensorrt.__version__)
    E.build_trt_engine(onnx_path, engine_path, "fp32", (1, 2, 4), timing_cache=tmp_path / "timing.cache")
    E.EngineManifest(model="M", network="deca", mode="coarse", precision="fp32", file=engine_path.name,
                     inputs={"image": [-1, 3, 32, 32]}, outputs={"code": [-1, 7]}, weights_sha256="",
                     onnx_sha256=E.file_sha256(onnx_path), batch_profile=(1, 2, 4), gpu_name=gpu,
                     tensorrt_version=tensorrt.__version__).save(E.manifest_path(engine_path))
    stream = torch.cuda.Stream()
    engine = E.TensorRTEngine(engine_path, stream)
    x = images(6).cuda()  # chunked 4 + 2
    (got,) = engine(x)
    stream.synchronize()
    with torch.no_grad():
        want = TinyEncoder().cuda().eval()(x)
    assert engine.max_batch == 4 and (tmp_path / "timing.cache").is_file()
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
