"""The model runtime's GPU pieces: image networks on their own CUDA streams (realtime.streams), decode as one
CUDA graph, the batched copy back to the host. Their wiring is checked on the CPU; the GPU tests skip without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from realtime.config import ModelConfig, RunConfig
from realtime.streams import StreamFork, to_host
from tests.fakes import face_at

HAS_CUDA = torch.cuda.is_available()
MODEL = "EMICA-CVT_flame2020_notexture"


def test_cpu_branch_is_the_module_itself():
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 3)
    fork = StreamFork("cpu")
    branch = fork.branch(net)
    x = torch.randn(4, 5)
    assert not fork.enabled
    with fork:
        inside = branch(x)
    assert torch.equal(inside, net(x)) and torch.equal(branch(x), net(x))


def test_fork_is_not_reentrant_and_reopens_after_an_error():
    fork = StreamFork("cpu")
    with fork, pytest.raises(RuntimeError, match="not re-entrant"):
        with fork:
            pass
    with pytest.raises(ValueError), fork:
        raise ValueError("inside")
    with fork:  # closed again by the error above
        pass


def test_fork_protocol_with_recorded_streams(monkeypatch):
    """The fork-join order on CUDA, checked here with stand-in streams that log what is asked of them: each branch
    waits for the caller's queued work, runs on its own stream, and the caller waits for every branch used."""
    import contextlib

    log: list[tuple] = []

    class Stream:
        count = 0

        def __init__(self, device=None, name=None):
            if name is None:
                Stream.count += 1
            self.name = name or f"side{Stream.count}"

        def wait_stream(self, other):
            log.append(("wait", self.name, other.name))

    caller = [Stream(name="caller")]

    @contextlib.contextmanager
    def on(stream):
        caller.append(stream)
        yield
        caller.pop()

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: caller[-1])
    monkeypatch.setattr(torch.cuda, "stream", on)

    def network(name):
        return lambda x: log.append(("run", name, caller[-1].name)) or x + 1

    fork = StreamFork("cuda")
    mica, deca, unused = (fork.branch(network(n)) for n in ("mica", "deca", "unused"))
    x = torch.zeros(2)
    with fork:
        mica(x)
        deca(x)
        deca(x)
    assert log == [
        ("wait", "side1", "caller"), ("run", "mica", "side1"),
        ("wait", "side2", "caller"), ("run", "deca", "side2"),
        ("wait", "side2", "caller"), ("run", "deca", "side2"),
        ("wait", "caller", "side1"), ("wait", "caller", "side2"),  # joined once each; the unused branch not at all
    ]
    log.clear()
    assert torch.equal(mica(x), x + 1) and log == [("run", "mica", "caller")]  # outside the fork: a plain call


def test_to_host_gives_float32_arrays_by_name():
    half = torch.tensor([[1.5, -2.0]], dtype=torch.float16)
    strided = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4).permute(0, 2, 1)
    host = to_host({"half": half, "strided": strided})
    assert set(host) == {"half", "strided"}
    assert host["half"].dtype == np.float32 and host["half"].tolist() == [[1.5, -2.0]]
    np.testing.assert_array_equal(host["strided"], strided.numpy())


def test_identity_and_frame_codes_apart_equal_one_encode(synthetic_assets):
    """MICA run apart from the ResNets (`encode_identity` + `encode_frame`) gives what one `encode` call gives."""
    from realtime.models import load_model

    model = load_model(MODEL, assets_dir=synthetic_assets, device="cpu")
    torch.manual_seed(1)
    image, arcface = torch.rand(2, 3, 224, 224), torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        whole = model.encode(image, mica_image=arcface)
        apart = {"shapecode": model.encode_identity(arcface), **model.encode_frame(image)}
    assert list(whole) == list(apart)
    for k in whole:
        assert torch.equal(whole[k], apart[k]), k


@pytest.mark.parametrize("name, mode", [(MODEL, "coarse"), ("EMOCA_v2_lr_mse_20", "detail")])
def test_decode_network_gives_what_decode_gives(synthetic_assets, name, mode):
    """The tensor-in/tensor-out decode a CUDA graph captures, run through an engine (eager on the CPU)."""
    from realtime.engines import TorchEngine
    from realtime.model_runtime import DecodeNetwork
    from realtime.models import load_model

    model = load_model(name, assets_dir=synthetic_assets, device="cpu", mode=mode)
    torch.manual_seed(4)
    with torch.no_grad():
        codes = model.encode(torch.rand(3, 3, 224, 224))
        want = model.decode(codes)
    network = DecodeNetwork(model)
    assert ("detailcode" in network.inputs) == (mode == "detail")
    engine = TorchEngine(network, "cpu", "fp32", batch_sizes=(2,))  # 3 rows: chunked 2 + 1
    got = dict(zip(network.outputs, engine(*(codes[k] for k in network.inputs))))
    assert set(got) == {"verts", "predicted_landmarks2d_flame_space"} | (
        {"displacement_map", "uv_detail_normals"} if mode == "detail" else set())
    for k, v in got.items():  # the detail decoder's convolutions round differently in a batch of 2 than of 3
        torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-4 if k == "uv_detail_normals" else 1e-6)


def _frames_with_faces(n: int = 4) -> list:
    """`n` frames of one image: two tracked faces, except frame 1, which has none."""
    from realtime.types import Frame, FrameResult

    image = np.random.default_rng(3).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    faces = [face_at(200.0, 220.0, 160.0, track_id=1), face_at(430.0, 260.0, 120.0, track_id=2)]
    return [FrameResult(frame=Frame(index=i, pts=i / 30, image=image), faces=[] if i == 1 else list(faces))
            for i in range(n)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not HAS_CUDA, reason="needs CUDA")])])
@pytest.mark.parametrize("identity_cache", [False, True])
def test_crops_cut_ahead_give_the_same_reconstructions(synthetic_assets, tmp_path, device, identity_cache):
    """The crop stage (prepare, on another thread) feeds the model exactly what it would have cut itself."""
    import threading

    from realtime.model_runtime import ModelReconstructor

    def run(ahead: bool) -> list:
        cfg = RunConfig(model=ModelConfig(assets_dir=str(synthetic_assets), device=device, backend="torch",
                                          engines_dir=str(tmp_path), batch_size=4))
        model = ModelReconstructor(cfg, identity_cache=identity_cache)
        results = _frames_with_faces()
        if ahead:
            worker = threading.Thread(target=lambda: [model.prepare(r) for r in results])
            worker.start()
            worker.join()
            assert results[1].model_inputs is None and results[0].model_inputs.image.shape == (2, 3, 224, 224)
        model.reconstruct(results[:3])  # one batch of 4 faces over 3 frames (one without faces) ...
        model.reconstruct(results[3:])  # ... then one frame, so the cache sees a second batch
        assert all(r.model_inputs is None for r in results)  # freed once used
        return [rec for r in results for rec in r.reconstructions]

    plain, ahead = run(False), run(True)
    assert len(plain) == len(ahead) == 6
    tol = {"rtol": 0, "atol": 0} if device == "cpu" else {"rtol": 1e-5, "atol": 1e-6}  # cuDNN may pick per instance
    for a, b in zip(plain, ahead):
        np.testing.assert_allclose(b.vertices, a.vertices, **tol)
        for k in a.codes:
            np.testing.assert_allclose(b.codes[k], a.codes[k], **tol, err_msg=k)


# ---------------------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_branches_on_streams_match_one_stream(synthetic_assets):
    from realtime.model_runtime import _branch_image_networks
    from realtime.models import load_model

    plain = load_model(MODEL, assets_dir=synthetic_assets, device="cuda")
    forked = load_model(MODEL, assets_dir=synthetic_assets, device="cuda")
    fork = StreamFork("cuda")
    _branch_image_networks(forked, fork)
    torch.manual_seed(2)
    image, arcface = torch.rand(4, 3, 224, 224, device="cuda"), torch.rand(4, 3, 112, 112, device="cuda") * 2 - 1
    with torch.inference_mode():
        want = plain.encode(image, mica_image=arcface)
        for _ in range(3):  # repeated: a missing join would show as a race, not on the first call only
            with fork:
                got = {"shapecode": forked.encode_identity(arcface), **forked.encode_frame(image)}
            got = to_host(got)
            for k in want:
                np.testing.assert_allclose(got[k], want[k].cpu().numpy(), rtol=1e-5, atol=1e-5, err_msg=k)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("identity_cache", [False, True])
def test_gpu_reconstructor_matches_the_cpu_one(synthetic_assets, tmp_path, identity_cache):
    """Streams, CUDA graphs, warm-up, GPU crops and the batched copy back against the CPU path."""
    from realtime.model_runtime import ModelReconstructor
    from realtime.types import Frame, FrameResult

    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    faces = [face_at(200.0, 220.0, 160.0, track_id=1), face_at(430.0, 260.0, 120.0, track_id=2)]

    def run(device: str) -> list:
        cfg = RunConfig(model=ModelConfig(assets_dir=str(synthetic_assets), device=device, backend="torch",
                                          engines_dir=str(tmp_path), batch_size=4))
        model = ModelReconstructor(cfg, identity_cache=identity_cache)
        results = [FrameResult(frame=Frame(index=i, pts=i / 30, image=image), faces=faces) for i in range(3)]
        model.reconstruct(results)
        if device == "cuda":  # the graphed path ran, not a silent eager fallback
            assert model.decoder.cuda_graphs and model.decoder._graphs
        return [rec for r in results for rec in r.reconstructions]

    cpu, gpu = run("cpu"), run("cuda")
    assert len(gpu) == len(cpu) == 6
    for a, b in zip(cpu, gpu):
        # Loose enough for unrounded GPU crops and TF32 convolutions; a race or a wrong row is far outside.
        np.testing.assert_allclose(b.vertices, a.vertices, atol=2e-3)  # metres
        np.testing.assert_allclose(b.landmarks, a.landmarks, atol=0.5)  # pixels


def test_identity_refresh_runs_mica_again_on_schedule(synthetic_assets, tmp_path, monkeypatch):
    """--identity_refresh N: MICA for a track's first 5 frames, then not, then 5 fresh frames after N."""
    from realtime.model_runtime import ModelReconstructor

    cfg = RunConfig(model=ModelConfig(assets_dir=str(synthetic_assets), device="cpu", backend="torch",
                                      engines_dir=str(tmp_path), identity_refresh=6))
    model = ModelReconstructor(cfg, identity_cache=True)
    measured = []
    encode_identity = model.model.encode_identity
    monkeypatch.setattr(model.model, "encode_identity", lambda x: (measured.append(frame), encode_identity(x))[1])
    results = _frames_with_faces(20)
    for frame, r in enumerate(results):
        r.faces = r.faces[:1]
        model.reconstruct([r])
    assert measured == [0, 2, 3, 4, 5, 12, 13, 14, 15, 16]  # frame 1 has no face; 6 frames on the frozen code
    assert [len(r.reconstructions) for r in results] == [len(r.faces) for r in results]


def test_identity_refresh_comes_at_the_same_frame_whatever_the_batch_size(synthetic_assets, tmp_path):
    """--batch_size is a throughput setting: a batch of 4 frames must refresh the identity where 4 single frames do."""
    from realtime.model_runtime import ModelReconstructor

    shapes = {}
    for batch in (1, 4):
        cfg = RunConfig(model=ModelConfig(assets_dir=str(synthetic_assets), device="cpu", backend="torch",
                                          engines_dir=str(tmp_path), identity_refresh=7, batch_size=batch))
        model = ModelReconstructor(cfg, identity_cache=True)
        results = _frames_with_faces(20)  # refresh due at frame 13: inside a batch of 4 (12-15), not at its start
        for i, r in enumerate(results):
            r.faces = r.faces[:1]
            r.frame.image = np.roll(r.frame.image, 7 * i, axis=1)  # each frame its own picture: its own MICA code
        for start in range(0, len(results), batch):
            model.reconstruct(results[start:start + batch])
        shapes[batch] = np.stack([rec.codes["shapecode"] for r in results for rec in r.reconstructions])
    # Equal up to float noise of batched convolutions; a refresh at another frame averages other codes (~1e-5 here).
    np.testing.assert_allclose(shapes[4], shapes[1], rtol=0, atol=1e-7)


def test_cached_identity_equals_per_frame_mica_on_the_same_image(synthetic_assets, tmp_path):
    """The cache averages MICA's first codes and then reuses them: on a still image that is MICA's own code, so
    the output equals running MICA on every frame (as inferno does), frame for frame."""
    from realtime.model_runtime import ModelReconstructor

    def run(identity_cache: bool) -> list:
        cfg = RunConfig(model=ModelConfig(assets_dir=str(synthetic_assets), device="cpu", backend="torch",
                                          engines_dir=str(tmp_path)))
        model = ModelReconstructor(cfg, identity_cache=identity_cache)
        results = [r for r in _frames_with_faces(9) if r.faces]
        for r in results:
            model.reconstruct([r])
        return [rec for r in results for rec in r.reconstructions]

    cached, per_frame = run(True), run(False)
    assert len(cached) == len(per_frame) == 16
    for a, b in zip(cached, per_frame):
        np.testing.assert_array_equal(a.vertices, b.vertices)
        for k in b.codes:
            np.testing.assert_array_equal(a.codes[k], b.codes[k], err_msg=k)


@pytest.mark.parametrize("batch_size, sizes", [(1, (1,)), (4, (1, 4)), (5, (1, 4, 5)), (16, (1, 4, 16)),
                                               (64, (1, 4, 16, 64)), (100, (1, 4, 16, 64, 100))])
def test_graph_batch_sizes_end_at_the_batch_size(batch_size, sizes):
    from realtime.model_runtime import _graph_batch_sizes

    assert _graph_batch_sizes(batch_size) == sizes


def test_arcface_crops_are_cut_only_while_a_track_needs_mica(synthetic_assets, tmp_path):
    """With the identity cache the crop stage skips ArcFace crops once every track's identity is known; a batch
    whose track needs MICA again after its crops were cut (here: forgotten in between) cuts them itself."""
    from realtime.model_runtime import ModelReconstructor

    def model() -> ModelReconstructor:
        cfg = RunConfig(model=ModelConfig(assets_dir=str(synthetic_assets), device="cpu", backend="torch",
                                          engines_dir=str(tmp_path)))
        return ModelReconstructor(cfg, identity_cache=True)

    ahead, plain = model(), model()
    frames = [r for r in _frames_with_faces(9) if r.faces]  # 8 frames, tracks 1 and 2
    reference = [r for r in _frames_with_faces(9) if r.faces]
    with_arcface = []
    for k, (r, ref) in enumerate(zip(frames, reference)):
        ahead.prepare(r)
        with_arcface.append(r.model_inputs.arcface is not None)
        if k == 6:  # track 1 needs MICA again, but its crops were cut without ArcFace
            ahead.identity.forget(1)
            plain.identity.forget(1)
        ahead.reconstruct([r])
        plain.reconstruct([ref])
    assert with_arcface == [True] * 5 + [False] * 2 + [True]  # frame 7: track 1 is new to the cache again
    for r, ref in zip(frames, reference):
        for a, b in zip(r.reconstructions, ref.reconstructions):
            np.testing.assert_array_equal(a.vertices, b.vertices)
