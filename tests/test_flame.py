"""FLAME layer: checkpoint layout, agreement with smplx's independent LBS, landmarks, export."""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from realtime.errors import AssetError
from realtime.models.flame import FLAME, contour_rows_from_yaw
from realtime.models.lbs import batch_rodrigues, vertex_face_incidence, vertex_normals
from tests.synthetic_flame import synthetic_flame_assets

KEYS_JSON = Path("/work/shared/docs/emica_state_dict_keys.json")  # the checkpoint's key list, when present
PREFIX = "shape_model.flame."
# inferno's `shape_model.flame.*` entries of a released EMICA checkpoint, in state_dict order.
CHECKPOINT_FLAME_ENTRIES = [
    ("eye_pose", (1, 6), "float32"),
    ("neck_pose", (1, 3), "float32"),
    ("faces_tensor", (9976, 3), "int64"),
    ("v_template", (5023, 3), "float32"),
    ("shapedirs", (5023, 3, 400), "float32"),
    ("posedirs", (36, 15069), "float32"),
    ("J_regressor", (5, 5023), "float32"),
    ("parents", (5,), "int64"),
    ("lbs_weights", (5023, 5), "float32"),
    ("lmk_faces_idx", (51,), "int64"),
    ("lmk_bary_coords", (51, 3), "float32"),
    ("dynamic_lmk_faces_idx", (79, 17), "int64"),
    ("dynamic_lmk_bary_coords", (79, 17, 3), "float32"),
    ("full_lmk_faces_idx", (1, 68), "int64"),
    ("full_lmk_bary_coords", (1, 68, 3), "float32"),
    ("neck_kin_chain", (2,), "int64"),
    ("lmk_faces_idx_mediapipe", (105,), "int64"),
    ("lmk_bary_coords_mediapipe", (105, 3), "float32"),
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory):
    return synthetic_flame_assets(tmp_path_factory.mktemp("flame"), seed=1)


@pytest.fixture(scope="module")
def flame(assets) -> FLAME:
    return FLAME(assets).eval()


def _yaw(degrees: float) -> torch.Tensor:
    return torch.tensor([0.0, math.radians(degrees), 0.0], dtype=torch.float32)


def _random_codes(batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    shape = torch.randn(batch, 300, generator=g)
    expression = 2.0 * torch.randn(batch, 100, generator=g)
    global_pose = 0.3 * torch.randn(batch, 3, generator=g)
    global_pose[0] = _yaw(60.0)
    global_pose[1] = torch.tensor([0.2, -math.radians(60.0), 0.1])
    jaw_pose = 0.15 * torch.randn(batch, 3, generator=g)
    return shape, expression, global_pose, jaw_pose


def _blend(vertices: np.ndarray, faces: np.ndarray, face_idx: np.ndarray, bary: np.ndarray) -> np.ndarray:
    """Reference barycentric landmarks in NumPy float64: (V,3), (F,3), (L,), (L,3) → (L,3)."""
    corners = vertices.astype(np.float64)[faces[face_idx]]  # (L, 3, 3)
    return (corners * bary[:, :, None]).sum(1)


def test_state_dict_matches_inferno_checkpoint_layout(flame):
    actual = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in flame.state_dict().items()]
    assert actual == CHECKPOINT_FLAME_ENTRIES
    torch.testing.assert_close(flame.neck_kin_chain, torch.tensor([1, 0]))
    torch.testing.assert_close(flame.parents, torch.tensor([-1, 0, 1, 1, 1]))


@pytest.mark.skipif(not KEYS_JSON.exists(), reason="shared key list not on this machine")
def test_expected_layout_is_the_shared_checkpoint_key_list():
    entries = json.loads(KEYS_JSON.read_text())["entries"]
    listed = [(e["key"][len(PREFIX):], tuple(e["shape"]), e["dtype"]) for e in entries if e["key"].startswith(PREFIX)]
    assert listed == CHECKPOINT_FLAME_ENTRIES


def test_without_mediapipe_embedding_it_is_decas_flame(assets):
    deca_assets = copy.copy(assets)
    deca_assets.mediapipe_lmk_faces_idx = deca_assets.mediapipe_lmk_bary_coords = None
    model = FLAME(deca_assets)
    assert list(model.state_dict()) == [k for k, _, _ in CHECKPOINT_FLAME_ENTRIES[:-2]]
    out = model(torch.zeros(1, 300), torch.zeros(1, 100), torch.zeros(1, 3), torch.zeros(1, 3))
    assert set(out) == {"vertices", "landmarks2d", "landmarks3d"}


def test_checkpoint_buffers_load_strictly_and_take_effect(flame):
    model = copy.deepcopy(flame)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["v_template"] += torch.tensor([0.0, 0.0, 0.01])
    model.load_state_dict(state, strict=True)
    zeros = [torch.zeros(1, n) for n in (300, 100, 3, 3)]
    shift = model(*zeros)["vertices"] - flame(*zeros)["vertices"]
    torch.testing.assert_close(shift, torch.tensor([0.0, 0.0, 0.01]).expand_as(shift), atol=1e-6, rtol=0)


def test_vertices_agree_with_smplx_lbs(flame):
    smplx_lbs = pytest.importorskip("smplx.lbs")
    shape, expression, global_pose, jaw_pose = _random_codes(8, seed=0)
    ours = flame(shape, expression, global_pose, jaw_pose)["vertices"]
    full_pose = torch.cat([global_pose, torch.zeros(8, 3), jaw_pose, torch.zeros(8, 6)], dim=1)
    reference, _ = smplx_lbs.lbs(
        torch.cat([shape, expression], 1), full_pose, flame.v_template, flame.shapedirs, flame.posedirs,
        flame.J_regressor, flame.parents, flame.lbs_weights,
    )
    assert (ours - flame.v_template).abs().max() > 0.05  # the test poses really move the mesh
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_short_codes_are_zero_padded(flame):
    shape, expression, global_pose, jaw_pose = _random_codes(2, seed=1)
    padded = flame(torch.cat([shape[:, :100], torch.zeros(2, 200)], 1),
                   torch.cat([expression[:, :50], torch.zeros(2, 50)], 1), global_pose, jaw_pose)
    short = flame(shape[:, :100], expression[:, :50], global_pose, jaw_pose)
    torch.testing.assert_close(short["vertices"], padded["vertices"], atol=0, rtol=0)


def test_static_and_mediapipe_landmarks_are_barycentric_blends(flame, assets):
    out = flame(*_random_codes(3, seed=2))
    faces = assets.faces
    for b in range(3):
        vertices = out["vertices"][b].numpy()
        np.testing.assert_allclose(
            out["landmarks3d"][b].numpy(),
            _blend(vertices, faces, assets.full_lmk_faces_idx[0], assets.full_lmk_bary_coords[0]), atol=1e-6)
        np.testing.assert_allclose(
            out["landmarks2d"][b, 17:].numpy(),
            _blend(vertices, faces, assets.static_lmk_faces_idx, assets.static_lmk_bary_coords), atol=1e-6)
        np.testing.assert_allclose(
            out["landmarks_mediapipe"][b].numpy(),
            _blend(vertices, faces, assets.mediapipe_lmk_faces_idx, assets.mediapipe_lmk_bary_coords), atol=1e-6)


def _expected_contour_row(yaw_degrees: int) -> int:
    """Row of the 79-row table for an integer yaw (rows 0..39: yaw 0..39; 40..78: yaw -1..-39)."""
    if yaw_degrees >= 0:
        return min(yaw_degrees, 39)
    return 39 + min(-yaw_degrees, 39)


@pytest.mark.parametrize("yaw", [-50, -20, 0, 20, 50])
def test_dynamic_contour_follows_head_yaw(flame, assets, yaw):
    global_pose = _yaw(yaw)[None]
    out = flame(torch.zeros(1, 300), torch.zeros(1, 100), global_pose, torch.zeros(1, 3))
    vertices = out["vertices"][0].numpy()
    contour = out["landmarks2d"][0, :17].numpy()

    def row_landmarks(row: int) -> np.ndarray:
        return _blend(vertices, assets.faces, assets.dynamic_lmk_faces_idx[row], assets.dynamic_lmk_bary_coords[row])

    row = _expected_contour_row(yaw)
    np.testing.assert_allclose(contour, row_landmarks(row), atol=1e-6)
    for other in {row - 1, row + 1} & set(range(79)):
        assert np.abs(contour - row_landmarks(other)).max() > 1e-4


def test_contour_uses_global_and_neck_rotation(flame, assets):
    model = copy.deepcopy(flame)
    with torch.no_grad():
        model.neck_pose.copy_(_yaw(10.0)[None])
    out = model(torch.zeros(1, 300), torch.zeros(1, 100), _yaw(20.0)[None], torch.zeros(1, 3))
    expected = _blend(out["vertices"][0].numpy(), assets.faces, assets.dynamic_lmk_faces_idx[30],
                      assets.dynamic_lmk_bary_coords[30])
    np.testing.assert_allclose(out["landmarks2d"][0, :17].numpy(), expected, atol=1e-6)


def test_contour_rows_round_half_to_even_and_fold_negative_yaws():
    yaws = torch.tensor([20.5, 21.5, 22.4, -0.5, -20.5, -38.5, -39.4, -39.6, -80.0, 39.7, 75.0])
    expected = [20, 22, 22, 0, 59, 77, 78, 78, 78, 39, 39]
    assert contour_rows_from_yaw(yaws).tolist() == expected


def test_batch_rodrigues_matches_scipy_and_keeps_zero_exact():
    rotvecs = torch.randn(64, 3, dtype=torch.float64) * 1.2
    ours = batch_rodrigues(rotvecs).numpy()
    # DECA's quirk rotates about r/|r + 1e-8| by |r + 1e-8|: differences are O(1e-8).
    np.testing.assert_allclose(ours, Rotation.from_rotvec(rotvecs.numpy()).as_matrix(), atol=1e-7)
    assert torch.equal(batch_rodrigues(torch.zeros(2, 3)), torch.eye(3).expand(2, 3, 3))


def _deca_vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """DECA's util.vertex_normals (index_add_ of the three corner cross products), for reference."""
    batch, num_vertices = vertices.shape[:2]
    normals = torch.zeros(batch, num_vertices, 3, dtype=vertices.dtype)
    v = vertices[:, faces]  # (B, F, 3, 3)
    for corner, (a, b) in enumerate([(1, 2), (2, 0), (0, 1)]):
        contribution = torch.cross(v[:, :, a] - v[:, :, corner], v[:, :, b] - v[:, :, corner], dim=-1)
        normals.index_add_(1, faces[:, corner], contribution)
    return torch.nn.functional.normalize(normals, eps=1e-6, dim=-1)


def test_vertex_normals_match_deca_scatter_version(flame, assets):
    vertices = flame(*_random_codes(2, seed=3))["vertices"]
    faces = flame.faces_tensor
    incidence = vertex_face_incidence(faces, assets.num_vertices)
    assert incidence.shape[0] == assets.num_vertices
    ours = vertex_normals(vertices, faces, incidence)
    torch.testing.assert_close(ours, _deca_vertex_normals(vertices, faces), atol=1e-5, rtol=0)
    # On the rest-pose synthetic head, normals point away from the vertical axis (outward).
    head = flame.v_template[None, : 73 * 60]
    rest_normals = vertex_normals(flame.v_template[None], faces, incidence)[:, : 73 * 60]
    outward = head * torch.tensor([1.0, 0.0, 1.0])
    assert ((rest_normals * outward).sum(-1) > 0).float().mean() > 0.99


def test_faces_accessor(flame, assets):
    faces = flame.faces
    assert faces.dtype == np.int32 and faces.shape == (9976, 3)
    np.testing.assert_array_equal(faces, assets.faces)


def test_too_many_expression_components_is_an_asset_error(assets):
    with pytest.raises(AssetError, match="n_exp=150"):
        FLAME(assets, n_exp=150)


def test_onnx_export_matches_torch(flame, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    inputs = _random_codes(2, seed=4)
    names = ["shape", "expression", "global_pose", "jaw_pose"]
    outputs = ["vertices", "landmarks2d", "landmarks3d", "landmarks_mediapipe"]
    path = tmp_path / "flame.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about the static code-length check
        torch.onnx.export(
            flame, inputs, str(path), dynamo=False, opset_version=17, input_names=names, output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in names + outputs},
        )
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert not ops & {"Einsum", "ScatterND", "ScatterElements", "Loop"}

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = _random_codes(5, seed=5)  # another batch size than the export
    results = session.run(outputs, {n: t.numpy() for n, t in zip(names, batch)})
    expected = flame(*batch)
    for name, result in zip(outputs, results):
        np.testing.assert_allclose(result, expected[name].numpy(), atol=1e-5, rtol=0, err_msg=name)
