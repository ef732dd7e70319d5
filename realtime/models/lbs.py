"""Linear blend skinning for FLAME, written to export cleanly (ONNX / TensorRT).

Same maths as inferno's ``inferno/utils/lbs.py`` (itself from smplx), with the export hazards of
emica_spec.md §8 removed:

- no ``einsum``: blend shapes, joint regression and landmark blending are matmuls/reductions;
- no in-place slice writes (they become ScatterND): everything is built with ``torch.cat``;
- no Python loop over a ``parents`` tensor: FLAME's kinematic chain [-1, 0, 1, 1, 1] is hard-coded;
- no ``index_add_`` in vertex normals: a precomputed vertex → incident-face table turns the
  scatter into a gather and a sum.

Every function is pure; shapes are given as B = batch, V = vertices, F = faces, J = joints (5),
L = landmarks, K = basis size.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

#: FLAME's kinematic tree: root (global), neck, jaw, left eye, right eye.
FLAME_PARENTS = (-1, 0, 1, 1, 1)


def batch_rodrigues(rot_vecs: torch.Tensor) -> torch.Tensor:
    """Axis-angle → rotation matrices, with DECA's epsilon quirk.

    The angle is ``||r + 1e-8||`` (the epsilon is added to every component, not to the norm), as in
    inferno and smplx, so a zero vector gives exactly the identity and results match bit for bit.

    Args:
        rot_vecs: (N, 3) axis-angle vectors.

    Returns:
        (N, 3, 3) rotation matrices.
    """
    angle = torch.norm(rot_vecs + 1e-8, dim=1, keepdim=True)  # (N, 1)
    rot_dir = rot_vecs / angle
    cos = torch.cos(angle).unsqueeze(1)  # (N, 1, 1)
    sin = torch.sin(angle).unsqueeze(1)
    rx, ry, rz = torch.split(rot_dir, 1, dim=1)
    zeros = torch.zeros_like(rx)
    skew = torch.cat([zeros, -rz, ry, rz, zeros, -rx, -ry, rx, zeros], dim=1).view(-1, 3, 3)
    ident = torch.eye(3, dtype=rot_vecs.dtype, device=rot_vecs.device).unsqueeze(0)
    return ident + sin * skew + (1 - cos) * torch.matmul(skew, skew)


def blend_shapes(betas: torch.Tensor, shapedirs: torch.Tensor) -> torch.Tensor:
    """Per-vertex displacement of a linear blend-shape basis.

    Args:
        betas: (B, K) coefficients.
        shapedirs: (V, 3, K) basis.

    Returns:
        (B, V, 3) displacements ``sum_k betas[b, k] * shapedirs[v, :, k]``.
    """
    num_vertices = shapedirs.shape[0]
    basis = shapedirs.reshape(num_vertices * 3, -1)  # (3V, K)
    return torch.matmul(betas, basis.t()).view(betas.shape[0], num_vertices, 3)


def vertices2joints(j_regressor: torch.Tensor, vertices: torch.Tensor) -> torch.Tensor:
    """Joint locations regressed from vertices.

    Args:
        j_regressor: (J, V) regressor (rows sum to 1 for FLAME).
        vertices: (B, V, 3).

    Returns:
        (B, J, 3) joints.
    """
    return torch.matmul(j_regressor, vertices)


def _transform_matrices(rot_mats: torch.Tensor, translations: torch.Tensor) -> torch.Tensor:
    """Stack rotations and translations into homogeneous matrices.

    Args:
        rot_mats: (..., 3, 3).
        translations: (..., 3).

    Returns:
        (..., 4, 4) with last row [0, 0, 0, 1].
    """
    top = torch.cat([rot_mats, translations.unsqueeze(-1)], dim=-1)  # (..., 3, 4)
    bottom = top.new_tensor([0.0, 0.0, 0.0, 1.0]).expand(*top.shape[:-2], 1, 4)
    return torch.cat([top, bottom], dim=-2)


def batch_rigid_transform(rot_mats: torch.Tensor, joints: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward kinematics along FLAME's fixed chain ``[-1, 0, 1, 1, 1]``.

    The chain is hard-coded (root → neck → {jaw, left eye, right eye}) so the graph has no loop over
    a parents tensor and no in-place writes.

    Args:
        rot_mats: (B, 5, 3, 3) local joint rotations.
        joints: (B, 5, 3) rest-pose joint locations.

    Returns:
        posed_joints: (B, 5, 3) joint locations after posing.
        rel_transforms: (B, 5, 4, 4) world transforms with the rest-pose joint location removed
            from the translation, i.e. the transforms to apply to rest-pose vertices.
    """
    root = joints[:, 0:1]
    neck = joints[:, 1:2]
    # Translation of each joint relative to its parent: parents of joints 1..4 are 0, 1, 1, 1.
    rel_joints = torch.cat([root, neck - root, joints[:, 2:] - neck], dim=1)  # (B, 5, 3)
    local = _transform_matrices(rot_mats, rel_joints)  # (B, 5, 4, 4)
    world_root = local[:, 0]
    world_neck = torch.matmul(world_root, local[:, 1])
    world_children = torch.matmul(world_neck.unsqueeze(1), local[:, 2:])  # jaw and both eyes
    transforms = torch.cat([world_root.unsqueeze(1), world_neck.unsqueeze(1), world_children], dim=1)

    posed_joints = transforms[:, :, :3, 3]
    # Remove the rest-pose joint: t' = t - R_world @ j, so a rest vertex v maps to R (v - j) + t.
    rotated_rest = torch.matmul(transforms[:, :, :3, :3], joints.unsqueeze(-1))  # (B, 5, 3, 1)
    translation = transforms[:, :, :3, 3:] - rotated_rest
    rel_top = torch.cat([transforms[:, :, :3, :3], translation], dim=-1)
    rel_transforms = torch.cat([rel_top, transforms[:, :, 3:]], dim=-2)
    return posed_joints, rel_transforms


def lbs(
    betas: torch.Tensor,
    rot_mats: torch.Tensor,
    v_template: torch.Tensor,
    shapedirs: torch.Tensor,
    posedirs: torch.Tensor,
    j_regressor: torch.Tensor,
    lbs_weights: torch.Tensor,
) -> torch.Tensor:
    """FLAME linear blend skinning: shape/expression blend shapes, pose correctives, skinning.

    Takes rotation matrices (not axis-angle) so the caller can reuse them (FLAME's dynamic
    contour needs the global and neck rotations).

    Args:
        betas: (B, K) shape and expression coefficients, concatenated.
        rot_mats: (B, 5, 3, 3) joint rotations (root, neck, jaw, left eye, right eye).
        v_template: (V, 3) template vertices.
        shapedirs: (V, 3, K) blend-shape basis.
        posedirs: (9 * 4, 3V) pose-corrective basis (FLAME's buffer layout, rows = (R - I) entries
            of the four non-root joints).
        j_regressor: (5, V).
        lbs_weights: (V, 5) skinning weights.

    Returns:
        (B, V, 3) posed vertices.
    """
    batch_size = betas.shape[0]
    v_shaped = v_template + blend_shapes(betas, shapedirs)  # (B, V, 3)
    joints = vertices2joints(j_regressor, v_shaped)  # (B, 5, 3)

    ident = torch.eye(3, dtype=rot_mats.dtype, device=rot_mats.device)
    pose_feature = (rot_mats[:, 1:] - ident).reshape(batch_size, -1)  # (B, 36)
    pose_offsets = torch.matmul(pose_feature, posedirs).view(batch_size, -1, 3)
    v_posed = v_shaped + pose_offsets

    _, rel_transforms = batch_rigid_transform(rot_mats, joints)
    num_joints = j_regressor.shape[0]
    per_vertex = torch.matmul(lbs_weights, rel_transforms.reshape(batch_size, num_joints, 16))
    per_vertex = per_vertex.view(batch_size, -1, 4, 4)  # (B, V, 4, 4)
    v_homo = torch.cat([v_posed, torch.ones_like(v_posed[..., :1])], dim=-1).unsqueeze(-1)
    return torch.matmul(per_vertex, v_homo)[:, :, :3, 0]


def vertices2landmarks(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    lmk_faces_idx: torch.Tensor,
    lmk_bary_coords: torch.Tensor,
) -> torch.Tensor:
    """Landmarks as barycentric blends of mesh triangles.

    Args:
        vertices: (B, V, 3).
        faces: (F, 3) int64.
        lmk_faces_idx: (B, L) or (L,) int64 triangle per landmark.
        lmk_bary_coords: (B, L, 3) or (L, 3) barycentric weights.

    Returns:
        (B, L, 3) landmarks.
    """
    batch_size = vertices.shape[0]
    if lmk_faces_idx.dim() == 1:
        lmk_faces_idx = lmk_faces_idx.unsqueeze(0).expand(batch_size, -1)
    if lmk_bary_coords.dim() == 2:
        lmk_bary_coords = lmk_bary_coords.unsqueeze(0).expand(batch_size, -1, -1)
    num_landmarks = lmk_faces_idx.shape[1]
    corner_ids = faces[lmk_faces_idx.reshape(-1)].view(batch_size, num_landmarks * 3, 1)
    corners = torch.gather(vertices, 1, corner_ids.expand(-1, -1, 3))
    corners = corners.view(batch_size, num_landmarks, 3, 3)
    return (corners * lmk_bary_coords.unsqueeze(-1)).sum(dim=2)


def vertex_face_incidence(faces: torch.Tensor | np.ndarray, num_vertices: int) -> torch.Tensor:
    """For each vertex, the faces that use it, padded with the index ``F`` (a zero-normal row).

    Precompute once per topology and pass to :func:`vertex_normals`; it turns DECA's
    ``index_add_`` scatter into a gather + sum that exports to ONNX/TensorRT.

    Args:
        faces: (F, 3) vertex indices.
        num_vertices: V.

    Returns:
        (V, K) int64 on the device of ``faces`` (CPU for NumPy input); K = max vertex valence.
    """
    faces_t = torch.as_tensor(faces, dtype=torch.int64)
    num_faces = faces_t.shape[0]
    corner_vertex = faces_t.reshape(-1)
    corner_face = torch.arange(num_faces, device=faces_t.device).repeat_interleave(3)
    order = torch.argsort(corner_vertex, stable=True)
    sorted_vertex = corner_vertex[order]
    counts = torch.bincount(corner_vertex, minlength=num_vertices)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(corner_vertex.numel(), device=faces_t.device) - starts[sorted_vertex]
    width = int(counts.max())
    incidence = torch.full((num_vertices, width), num_faces, dtype=torch.int64, device=faces_t.device)
    incidence[sorted_vertex, slot] = corner_face[order]
    return incidence


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Explicit cross product over the last axis (exports as plain Mul/Sub)."""
    ax, ay, az = a.unbind(-1)
    bx, by, bz = b.unbind(-1)
    return torch.stack([ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx], dim=-1)


def face_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Unnormalised face normals ``(v1 - v0) x (v2 - v0)``; length = twice the triangle area.

    Args:
        vertices: (B, V, 3).
        faces: (F, 3) int64.

    Returns:
        (B, F, 3).
    """
    v0 = vertices[:, faces[:, 0]]
    v1 = vertices[:, faces[:, 1]]
    v2 = vertices[:, faces[:, 2]]
    return _cross(v1 - v0, v2 - v0)


def vertex_normals(
    vertices: torch.Tensor, faces: torch.Tensor, incidence: torch.Tensor | None = None
) -> torch.Tensor:
    """Area-weighted vertex normals, normalised with eps 1e-6 (DECA's ``util.vertex_normals``).

    DECA adds each face's cross product to its three corners; all three corner cross products
    are the same vector, so a vertex normal is the sum of its incident faces' normals.

    Args:
        vertices: (B, V, 3).
        faces: (F, 3) int64.
        incidence: (V, K) from :func:`vertex_face_incidence`; computed here when omitted
            (slower; precompute it for per-frame use).

    Returns:
        (B, V, 3) unit normals (zero vectors for unused vertices).
    """
    batch_size, num_vertices = vertices.shape[:2]
    if incidence is None:
        incidence = vertex_face_incidence(faces, num_vertices)
    normals_f = face_normals(vertices, faces)
    padded = torch.cat([normals_f, torch.zeros_like(normals_f[:, :1])], dim=1)  # (B, F + 1, 3)
    gathered = padded[:, incidence.reshape(-1)].view(batch_size, num_vertices, -1, 3)
    return F.normalize(gathered.sum(dim=2), eps=1e-6, dim=-1)
