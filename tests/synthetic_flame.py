"""A synthetic FLAME in the exact file formats and FLAME-2020 sizes, for tests without the licensed files.

The head is a lat-long grid over an ellipsoid that narrows into a neck (73 rings × 60 columns plus a
top pole), facing +z, about 0.15 m wide, with a nose bump and two eyeball spheres; the UV layout has
a seam at the back of the head (and on each eyeball), giving FLAME's counts exactly:
5023 vertices, 9976 triangles, 5118 texture vertices. Joints, skinning weights, landmark embeddings
and masks are placed where FLAME has them (jaw on the lower face, eyes on the eyeballs, the 68 iBUG
landmarks and MediaPipe's 105 on the front of the face).

``generic_model.pkl`` is written as a protocol-2 pickle whose arrays are chumpy ``Ch`` objects, as
chumpy itself pickles them; a stand-in ``chumpy.ch.Ch`` class is registered in ``sys.modules`` only
while dumping.
"""

from __future__ import annotations

import pickle
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import scipy.sparse
import scipy.spatial

from realtime.models.flame_assets import FlameAssets, load_flame_assets

NUM_VERTICES, NUM_FACES, NUM_UV = 5023, 9976, 5118
RINGS, COLUMNS = 73, 60  # head grid
EYE_RINGS, EYE_COLUMNS = 11, 29  # per eyeball
HEAD_AXES = (0.075, 0.11, 0.09)  # ellipsoid semi-axes x, y, z (metres)
EYE_RADIUS = 0.0125
EYE_HEIGHT, EYE_SPREAD = 0.028, 0.031
UV_HEAD = (0.02, 0.98, 0.22, 0.96)  # u0, u1, v_bottom, v_top of the head grid in the texture
UV_EYES = ((0.05, 0.45), (0.55, 0.95))  # u ranges of the left and right eyeball
UV_EYE_V = (0.04, 0.18)

# MediaPipe mesh ids of the 105 landmarks in FLAME's mediapipe embedding (inferno's
# get_mediapipe_indices(), which lists the file's landmark_indices).
MEDIAPIPE_INDICES = np.array([
    276, 282, 283, 285, 293, 295, 296, 300, 334, 336, 46, 52, 53, 55, 63, 65, 66, 70, 105, 107, 249, 263,
    362, 373, 374, 380, 381, 382, 384, 385, 386, 387, 388, 390, 398, 466, 7, 33, 133, 144, 145, 153, 154,
    155, 157, 158, 159, 160, 161, 163, 173, 246, 168, 6, 197, 195, 5, 4, 129, 98, 97, 2, 326, 327, 358, 0,
    13, 14, 17, 37, 39, 40, 61, 78, 80, 81, 82, 84, 87, 88, 91, 95, 146, 178, 181, 185, 191, 267, 269, 270,
    291, 308, 310, 311, 312, 314, 317, 318, 321, 324, 375, 402, 405, 409, 415,
])


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _head_surface(theta: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Point on the head for polar angle theta (0 = top) and longitude phi (0 = front): (..., 3)."""
    ax, ay, az = HEAD_AXES
    theta, phi = np.broadcast_arrays(theta, phi)
    neck = _smoothstep((theta - 0.6 * np.pi) / (0.2 * np.pi))
    radius = np.sin(theta) * (1 - neck) + 0.6 * neck
    y = ay * np.cos(theta) - 0.06 * neck
    x = ax * radius * np.sin(phi)
    z = az * radius * np.cos(phi)
    nose = 0.02 * np.exp(-(x / 0.009) ** 2 / 2 - (y / 0.022) ** 2 / 2) * (z > 0)
    return np.stack([x, y, z + nose], axis=-1)


def _eye_centre(side: float) -> np.ndarray:
    """Centre of an eyeball, sunk 6 mm into the head surface in front of it."""
    ax, ay, az = HEAD_AXES
    ring = np.sqrt(1 - (EYE_HEIGHT / ay) ** 2)
    front = az * ring * np.sqrt(1 - (EYE_SPREAD / (ax * ring)) ** 2)
    return np.array([side * EYE_SPREAD, EYE_HEIGHT, front - 0.006])


def _build_mesh() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Vertices (V,3), faces (F,3), uvcoords (T,2), uvfaces (F,3); counts exactly FLAME 2020's."""
    theta = np.linspace(0.04 * np.pi, 0.80 * np.pi, RINGS)
    phi = -np.pi + 2 * np.pi * np.arange(COLUMNS) / COLUMNS  # column 0 at the back, COLUMNS/2 front
    grid = _head_surface(theta[:, None], phi[None, :]).reshape(-1, 3)
    pole = np.array([[0.0, HEAD_AXES[1], 0.0]])
    vertices = [grid, pole]

    u0, u1, v_bottom, v_top = UV_HEAD
    grid_u = u0 + (u1 - u0) * np.arange(COLUMNS + 1) / COLUMNS  # one extra column: the back seam
    grid_v = v_top - (v_top - v_bottom) * np.arange(RINGS) / (RINGS - 1)
    uvcoords = [np.stack(np.meshgrid(grid_u, grid_v), axis=-1).reshape(-1, 2), [[0.5, v_top + 0.01]]]

    ring, col = np.meshgrid(np.arange(RINGS - 1), np.arange(COLUMNS), indexing="ij")
    ring, col = ring.ravel(), col.ravel()
    nxt = (col + 1) % COLUMNS

    def vid(r, c):
        return r * COLUMNS + c

    def tid(r, c):
        return r * (COLUMNS + 1) + c

    # Counter-clockwise seen from outside: (top-left, bottom-left, top-right), (top-right, bottom-left, bottom-right).
    faces = [
        np.stack([vid(ring, col), vid(ring + 1, col), vid(ring, nxt)], 1),
        np.stack([vid(ring, nxt), vid(ring + 1, col), vid(ring + 1, nxt)], 1),
    ]
    uvfaces = [
        np.stack([tid(ring, col), tid(ring + 1, col), tid(ring, col + 1)], 1),
        np.stack([tid(ring, col + 1), tid(ring + 1, col), tid(ring + 1, col + 1)], 1),
    ]
    pole_id, pole_uv = RINGS * COLUMNS, RINGS * (COLUMNS + 1)
    top = np.arange(COLUMNS)
    faces.append(np.stack([np.full(COLUMNS, pole_id), vid(0, top), vid(0, (top + 1) % COLUMNS)], 1))
    uvfaces.append(np.stack([np.full(COLUMNS, pole_uv), tid(0, top), tid(0, top + 1)], 1))

    for side, (eu0, eu1) in zip((1.0, -1.0), UV_EYES):  # left eye (+x) first, like FLAME's joints
        v_base = sum(len(v) for v in vertices)
        t_base = sum(len(t) for t in uvcoords)
        alpha = np.pi * (np.arange(EYE_RINGS) + 1) / (EYE_RINGS + 1)  # from the front pole
        beta = 2 * np.pi * np.arange(EYE_COLUMNS) / EYE_COLUMNS
        a, b = np.meshgrid(alpha, beta, indexing="ij")
        sphere = np.stack([np.sin(a) * np.cos(b), np.sin(a) * np.sin(b), np.cos(a)], -1).reshape(-1, 3)
        poles = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]])
        vertices.append(_eye_centre(side) + EYE_RADIUS * np.concatenate([sphere, poles]))
        eye_u = eu0 + (eu1 - eu0) * np.arange(EYE_COLUMNS + 1) / EYE_COLUMNS
        eye_v = UV_EYE_V[1] - (UV_EYE_V[1] - UV_EYE_V[0]) * np.arange(EYE_RINGS) / (EYE_RINGS - 1)
        uvcoords.append(np.stack(np.meshgrid(eye_u, eye_v), axis=-1).reshape(-1, 2))
        uvcoords.append([[(eu0 + eu1) / 2, UV_EYE_V[1] + 0.01], [(eu0 + eu1) / 2, UV_EYE_V[0] - 0.01]])

        r, c = np.meshgrid(np.arange(EYE_RINGS - 1), np.arange(EYE_COLUMNS), indexing="ij")
        r, c = r.ravel(), c.ravel()
        cn = (c + 1) % EYE_COLUMNS

        def evid(rr, cc):
            return v_base + rr * EYE_COLUMNS + cc

        def etid(rr, cc):
            return t_base + rr * (EYE_COLUMNS + 1) + cc

        front_pole, back_pole = v_base + EYE_RINGS * EYE_COLUMNS, v_base + EYE_RINGS * EYE_COLUMNS + 1
        front_uv, back_uv = t_base + EYE_RINGS * (EYE_COLUMNS + 1), t_base + EYE_RINGS * (EYE_COLUMNS + 1) + 1
        ends = np.arange(EYE_COLUMNS)
        last = EYE_RINGS - 1
        faces += [
            np.stack([evid(r, c), evid(r + 1, c), evid(r, cn)], 1),
            np.stack([evid(r, cn), evid(r + 1, c), evid(r + 1, cn)], 1),
            np.stack([np.full(EYE_COLUMNS, front_pole), evid(0, ends), evid(0, (ends + 1) % EYE_COLUMNS)], 1),
            np.stack([np.full(EYE_COLUMNS, back_pole), evid(last, (ends + 1) % EYE_COLUMNS), evid(last, ends)], 1),
        ]
        uvfaces += [
            np.stack([etid(r, c), etid(r + 1, c), etid(r, c + 1)], 1),
            np.stack([etid(r, c + 1), etid(r + 1, c), etid(r + 1, c + 1)], 1),
            np.stack([np.full(EYE_COLUMNS, front_uv), etid(0, ends), etid(0, ends + 1)], 1),
            np.stack([np.full(EYE_COLUMNS, back_uv), etid(last, ends + 1), etid(last, ends)], 1),
        ]

    return (
        np.concatenate(vertices).astype(np.float64),
        np.concatenate(faces).astype(np.uint32),
        np.concatenate([np.asarray(t, dtype=np.float64) for t in uvcoords]),
        np.concatenate(uvfaces).astype(np.int64),
    )


def _front_faces(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Head triangles facing the camera (+z), the candidates for landmarks."""
    head_faces = np.arange(2 * (RINGS - 1) * COLUMNS)
    tri = vertices[faces[head_faces]]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    facing = (normal[:, 2] > 0.2 * np.linalg.norm(normal, axis=1)) & (tri[:, :, 2].mean(1) > 0)
    return head_faces[facing]


def _faces_at(points_xy: np.ndarray, vertices: np.ndarray, faces: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Front triangle whose centroid is nearest (in x, y) to each point: (N,) int64."""
    centroids = vertices[faces[candidates]].mean(axis=1)[:, :2]
    _, nearest = scipy.spatial.cKDTree(centroids).query(points_xy)
    return candidates[nearest].astype(np.int64)


def _barycentrics(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random valid barycentric weights (positive, summing to 1): shape + (3,)."""
    weights = rng.uniform(0.15, 1.0, size=shape + (3,))
    return weights / weights.sum(-1, keepdims=True)


def ibug68_layout() -> np.ndarray:
    """Front-view (x, y) positions (metres) of the 68 iBUG landmarks on the synthetic face.

    x is to the subject's left (image right); point 0 is on the image-left jaw, as in iBUG.
    """
    jaw_angle = np.radians(np.linspace(-85, 85, 17))
    jaw = np.stack([0.066 * np.sin(jaw_angle), 0.02 - 0.09 * np.cos(jaw_angle)], 1)
    brow_x = np.linspace(-0.050, -0.012, 5)
    brows = np.concatenate([
        np.stack([brow_x, 0.048 + 0.006 * np.sin(np.linspace(0, np.pi, 5))], 1),
        np.stack([-brow_x[::-1], 0.048 + 0.006 * np.sin(np.linspace(0, np.pi, 5))], 1),
    ])
    bridge = np.stack([np.zeros(4), np.linspace(0.030, 0.002, 4)], 1)
    nostril_x = np.linspace(-0.012, 0.012, 5)
    nostrils = np.stack([nostril_x, -0.008 - 0.003 * np.cos(np.linspace(-1.2, 1.2, 5))], 1)
    eye_angle = np.radians([180, 120, 60, 0, -60, -120])
    eye = np.stack([0.012 * np.cos(eye_angle), 0.004 * np.sin(eye_angle)], 1)
    eyes = np.concatenate([eye + [-EYE_SPREAD, EYE_HEIGHT], eye + [EYE_SPREAD, EYE_HEIGHT]])
    outer_angle = np.radians(np.linspace(180, -150, 12))
    mouth_outer = np.stack([0.024 * np.cos(outer_angle), -0.034 + 0.010 * np.sin(outer_angle)], 1)
    inner_angle = np.radians(np.linspace(180, -135, 8))
    mouth_inner = np.stack([0.018 * np.cos(inner_angle), -0.034 + 0.004 * np.sin(inner_angle)], 1)
    return np.concatenate([jaw, brows, bridge, nostrils, eyes, mouth_outer, mouth_inner])


def _contour_row_yaw(row: int) -> int:
    """Yaw (degrees) a row of FLAME's dynamic-contour table stands for: 0..39, then -1..-39."""
    return row if row <= 39 else 39 - row


def _landmark_embeddings(rng, vertices, faces) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    candidates = _front_faces(vertices, faces)
    layout = ibug68_layout()
    static_faces = _faces_at(layout[17:], vertices, faces, candidates)
    full_faces = _faces_at(layout, vertices, faces, candidates)
    # Each row: the jaw line slid sideways in proportion to the yaw it is for.
    contour = np.stack([layout[:17] + [-0.012 * _contour_row_yaw(r) / 39, 0.0] for r in range(79)])
    dynamic_faces = _faces_at(contour.reshape(-1, 2), vertices, faces, candidates).reshape(79, 17)
    dlib = {
        "static_lmk_faces_idx": static_faces,
        "static_lmk_bary_coords": _barycentrics(rng, (51,)),
        "dynamic_lmk_faces_idx": dynamic_faces,
        "dynamic_lmk_bary_coords": _barycentrics(rng, (79, 17)),
        "full_lmk_faces_idx": full_faces[None],
        "full_lmk_bary_coords": _barycentrics(rng, (1, 68)),
    }
    spots = rng.uniform([-0.045, -0.045], [0.045, 0.055], size=(len(MEDIAPIPE_INDICES), 2))
    mediapipe = {
        "lmk_face_idx": _faces_at(spots, vertices, faces, candidates).astype(np.int64),
        "lmk_b_coords": _barycentrics(rng, (len(MEDIAPIPE_INDICES),)),
        "landmark_indices": MEDIAPIPE_INDICES.astype(np.int64),
    }
    return dlib, mediapipe


def _joints_and_weights(vertices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """J_regressor (5, V) and skinning weights (V, 5): root, neck, jaw, left eye, right eye."""
    num_head = RINGS * COLUMNS + 1
    eye_size = EYE_RINGS * EYE_COLUMNS + 2
    x, y, z = vertices[:, 0], vertices[:, 1], vertices[:, 2]
    head = np.arange(NUM_VERTICES) < num_head
    groups = [
        head & (y < -0.13),  # root: bottom of the neck
        head & (y > -0.10) & (y < -0.07) & (z < 0.0),  # neck: back of the upper neck
        head & (np.abs(y + 0.005) < 0.012) & (np.abs(x) > 0.06),  # jaw hinge: both sides below the ears
        np.arange(NUM_VERTICES) >= NUM_VERTICES - 2 * eye_size,
        np.arange(NUM_VERTICES) >= NUM_VERTICES - eye_size,
    ]
    groups[3] = groups[3] & ~groups[4]
    regressor = np.zeros((5, NUM_VERTICES))
    for joint, members in enumerate(groups):
        regressor[joint, members] = 1.0 / members.sum()

    weights = np.zeros((NUM_VERTICES, 5))
    root_share = _smoothstep((-0.10 - y) / 0.05) * head
    jaw_share = _smoothstep((-0.02 - y) / 0.015) * _smoothstep((z - 0.01) / 0.03) * (1 - root_share) * head
    weights[:, 0] = root_share
    weights[:, 2] = jaw_share
    weights[:, 1] = head - root_share - jaw_share
    weights[groups[3], 3] = 1.0
    weights[groups[4], 4] = 1.0
    return regressor, weights


def _blend_bases(rng: np.random.Generator, vertices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Smooth shape (300) + expression (100) and pose-corrective (36) bases: (V,3,400), (V,3,36).

    Each component is a random mix of a few low-frequency waves over the head, in millimetres;
    expression and pose components are confined to the lower face.
    """
    centred = vertices - vertices.mean(0)
    waves = np.sin(centred @ rng.normal(0, 25.0, size=(3, 48)) + rng.uniform(0, 2 * np.pi, size=48))  # (V, 48)

    def components(count: int, amplitude: float, focus: np.ndarray) -> np.ndarray:
        mixing = rng.normal(0, amplitude / np.sqrt(48), size=(48, 3 * count))
        return ((waves @ mixing) * focus[:, None]).reshape(-1, 3, count)

    lower_face = np.exp(-(((vertices[:, 1] + 0.03) / 0.04) ** 2)) * (vertices[:, 2] > 0)
    shapedirs = np.concatenate(
        [components(300, 0.002, np.ones(len(vertices))), components(100, 0.003, lower_face)], axis=2
    )
    return shapedirs, components(36, 0.001, lower_face)


class _ChumpyCh:
    """Pickles like ``chumpy.ch.Ch``: protocol-2 NEWOBJ + BUILD with its ``__getstate__`` dict."""

    def __init__(self, x: np.ndarray):
        self.x = x

    def __getstate__(self) -> dict:
        # What Ch.__getstate__ returns for a plain Ch(x): __dict__ without _parents and _cache.
        return {
            "_dirty_vars": {"x"},
            "_itr": None,
            "_make_dense": False,
            "_make_sparse": False,
            "_depends_on_deps": {},
            "x": self.x,
        }


def _dump_chumpy_pickle(content: dict, path: Path) -> None:
    """Pickle with ``_ChumpyCh`` posing as ``chumpy.ch.Ch``, registered only while dumping."""
    module_names = ("chumpy", "chumpy.ch")
    saved = {name: sys.modules.get(name) for name in module_names}
    package = types.ModuleType("chumpy")
    module = types.ModuleType("chumpy.ch")
    package.ch = module
    original = (_ChumpyCh.__module__, _ChumpyCh.__qualname__, _ChumpyCh.__name__)
    _ChumpyCh.__module__, _ChumpyCh.__qualname__, _ChumpyCh.__name__ = "chumpy.ch", "Ch", "Ch"
    module.Ch = _ChumpyCh
    sys.modules.update({"chumpy": package, "chumpy.ch": module})
    try:
        with open(path, "wb") as file:
            pickle.dump(content, file, protocol=2)
    finally:
        _ChumpyCh.__module__, _ChumpyCh.__qualname__, _ChumpyCh.__name__ = original
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


def _write_obj(path: Path, vertices: np.ndarray, faces: np.ndarray, uvcoords: np.ndarray, uvfaces: np.ndarray) -> None:
    lines = [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in vertices]
    lines += [f"vt {u:.6f} {v:.6f}" for u, v in uvcoords]
    lines += [f"f {a}/{ta} {b}/{tb} {c}/{tc}" for (a, b, c), (ta, tb, tc) in zip(faces + 1, uvfaces + 1)]
    path.write_text("\n".join(lines) + "\n")


def _uv_mask(size: int, with_eyes: bool) -> np.ndarray:
    """RGB uint8 mask over the front of the face in UV (and the eyeballs' front if asked)."""
    v, u = np.meshgrid(1 - (np.arange(size) + 0.5) / size, (np.arange(size) + 0.5) / size, indexing="ij")
    u0, u1, v_bottom, v_top = UV_HEAD
    height = v_top - v_bottom
    face = (np.abs(u - 0.5) < 0.17 * (u1 - u0)) & (v > v_bottom + 0.25 * height) & (v < v_top - 0.3 * height)
    if with_eyes:
        face |= (v > UV_EYE_V[1] - 0.05) & (v < UV_EYE_V[1] + 0.02)
    return np.repeat((face * 255).astype(np.uint8)[:, :, None], 3, axis=2)


def synthetic_flame_content(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Everything the synthetic files hold, as plain arrays (what the readers must give back).

    Returns:
        ``model`` (the pkl's arrays; J_regressor dense), ``landmarks`` (DECA embedding),
        ``mediapipe`` (MediaPipe embedding), ``mesh`` (vertices, faces, uvcoords, uvfaces of
        head_template.obj), ``masks`` (uv_face_mask, uv_face_eye_mask: 512² RGB uint8) and
        ``fixed_displacement`` (``{"map": (256, 256) float32}``).
    """
    rng = np.random.default_rng(seed)
    vertices, faces, uvcoords, uvfaces = _build_mesh()
    assert (len(vertices), len(faces), len(uvcoords)) == (NUM_VERTICES, NUM_FACES, NUM_UV)
    j_regressor, weights = _joints_and_weights(vertices)
    shapedirs, posedirs = _blend_bases(rng, vertices)
    dlib, mediapipe = _landmark_embeddings(rng, vertices, faces)
    bumps = 0.0005 * np.sin(np.arange(256)[:, None] / 5.0) * np.cos(np.arange(256)[None, :] / 7.0)
    return {
        "model": {
            "f": faces,
            "v_template": vertices,
            "shapedirs": shapedirs,
            "posedirs": posedirs,
            "J_regressor": j_regressor,
            # FLAME stores uint32(-1) as the root's parent.
            "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
            "weights": weights,
            "J": j_regressor @ vertices,
        },
        "landmarks": dlib,
        "mediapipe": mediapipe,
        "mesh": {"vertices": vertices, "faces": faces.astype(np.int64), "uvcoords": uvcoords, "uvfaces": uvfaces},
        "masks": {"uv_face_mask": _uv_mask(512, with_eyes=False), "uv_face_eye_mask": _uv_mask(512, with_eyes=True)},
        "fixed_displacement": {"map": bumps.astype(np.float32)},
    }


def write_synthetic_flame(root: Path, seed: int = 0) -> dict[str, Path]:
    """Write the synthetic FLAME files under ``root`` in the layout of inferno's ``assets/``.

    Returns:
        Paths by name: flame_model, lmk_embedding, mediapipe_embedding, head_template,
        uv_face_mask, uv_face_eye_mask, fixed_displacement.
    """
    content = synthetic_flame_content(seed)
    geometry = root / "FLAME" / "geometry"
    mask_dir = root / "FLAME" / "mask"
    displacement_dir = geometry / "fixed_uv_displacements"
    for folder in (geometry, mask_dir, displacement_dir):
        folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "flame_model": geometry / "generic_model.pkl",
        "lmk_embedding": geometry / "landmark_embedding.npy",
        "mediapipe_embedding": geometry / "mediapipe_landmark_embedding.npz",
        "head_template": geometry / "head_template.obj",
        "uv_face_mask": mask_dir / "uv_face_mask.png",
        "uv_face_eye_mask": mask_dir / "uv_face_eye_mask.png",
        "fixed_displacement": displacement_dir / "fixed_displacement_256.npy",
    }

    model = content["model"]
    chumpy_keys = ("v_template", "shapedirs", "posedirs", "weights", "J")
    pickled = {key: _ChumpyCh(value) if key in chumpy_keys else value for key, value in model.items()}
    pickled["J_regressor"] = scipy.sparse.csc_matrix(model["J_regressor"])
    pickled.update(bs_style="lbs", bs_type="lrotmin")
    _dump_chumpy_pickle(pickled, paths["flame_model"])
    np.save(paths["lmk_embedding"], np.array(content["landmarks"], dtype=object), allow_pickle=True)
    np.savez(paths["mediapipe_embedding"], **content["mediapipe"])
    mesh = content["mesh"]
    _write_obj(paths["head_template"], mesh["vertices"], mesh["faces"], mesh["uvcoords"], mesh["uvfaces"])
    for name, rgb in content["masks"].items():
        cv2.imwrite(str(paths[name]), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    np.save(paths["fixed_displacement"], content["fixed_displacement"]["map"])
    return paths


def synthetic_flame_assets(tmp_path: Path, seed: int = 0) -> FlameAssets:
    """Write the synthetic FLAME under ``tmp_path`` and load it with the real readers."""
    paths = write_synthetic_flame(tmp_path, seed=seed)
    return load_flame_assets(paths["flame_model"], paths["lmk_embedding"], paths["mediapipe_embedding"])
