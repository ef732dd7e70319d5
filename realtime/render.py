"""Offscreen moderngl renderer: DECA's "geometry" image drawn straight onto the full frame.

Every :class:`~realtime.types.Reconstruction` carries world-space vertices and an affine
``world_to_frame``; the vertex shader applies it, so meshes land on the frame at full
resolution without warping a 224x224 crop (inferno's video composer warps with skimage).

Shading reproduces DECA's ``render_shape`` (spec §5.2): grey albedo 180/255, five white
directional lights of intensity 1.7 in world space, per-vertex area-weighted world normals
interpolated per fragment without re-normalising, ``uint8`` by truncation. Detail mode samples a
world-space normal map in UV space instead (spec §5.3).

Threading: an OpenGL context is current in exactly one thread, the one that created it. The
pipeline must construct the :class:`Renderer` *inside* its render thread and call every method
from there; calls from another thread raise ``RuntimeError`` instead of crashing the driver.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Callable, Generic, TypeVar

import moderngl
import numpy as np

from realtime.errors import UserError
from realtime.types import Reconstruction

__all__ = ["Renderer", "RenderError", "vertex_normals", "world_to_clip", "IMAGE_TYPES"]

IMAGE_TYPES = ("geometry", "detail")

# DECA's render_shape constants (inferno/models/Renderer.py).
ALBEDO = 180.0 / 255.0
LIGHT_INTENSITY = 1.7
LIGHT_DIRECTIONS = np.array(
    [[-1, 1, 1], [1, 1, 1], [-1, -1, 1], [1, -1, 1], [0, 0, 1]], dtype=np.float64
)
NORMAL_EPS = 1e-6  # torch.nn.functional.normalize(eps=1e-6), as in DECA's vertex_normals

# Bounded caches: a pipeline uses one or two topologies and one frame size; the bound only
# stops a caller that keeps changing them from leaking GPU memory.
_MAX_CACHED_MESHES = 8
_MAX_CACHED_FRAMEBUFFERS = 4
_MAX_CACHED_TEXTURES = 4


class RenderError(UserError):
    """The headless OpenGL renderer cannot run here, or cannot draw what was asked."""


# --------------------------------------------------------------------------------------------
# Pure numpy pieces
# --------------------------------------------------------------------------------------------


def face_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Un-normalised triangle normals (v1 − v0) × (v2 − v0), length = twice the area.

    vertices: (V, 3) float32; faces: (F, 3) int → (F, 3) float32.
    """
    v0 = vertices[faces[:, 0]]
    e1 = vertices[faces[:, 1]] - v0
    e2 = vertices[faces[:, 2]] - v0
    # Written out: np.cross costs ~2x more on (F, 3) float32 arrays.
    n = np.empty_like(e1)
    n[:, 0] = e1[:, 1] * e2[:, 2] - e1[:, 2] * e2[:, 1]
    n[:, 1] = e1[:, 2] * e2[:, 0] - e1[:, 0] * e2[:, 2]
    n[:, 2] = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    return n


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals, as DECA's ``vertex_normals``.

    Each vertex sums the cross products of its triangles (DECA adds the same cross product once
    per corner), then divides by max(|n|, 1e-6). Counter-clockwise triangles seen from outside
    give outward normals.

    vertices: (V, 3) float32; faces: (F, 3) int → (V, 3) float32.
    """
    fn = face_normals(vertices, faces)
    corners = faces.T.reshape(-1)  # corner k of every face, k-major: matches the tiled weights
    weights = np.concatenate([fn, fn, fn])
    n = np.empty((vertices.shape[0], 3), dtype=np.float32)
    for c in range(3):  # bincount beats np.add.at by ~10x for scatter-adds
        n[:, c] = np.bincount(corners, weights[:, c], minlength=vertices.shape[0])
    length = np.sqrt(np.einsum("ij,ij->i", n, n))
    return n / np.maximum(length, NORMAL_EPS)[:, None]


def frame_to_clip(height: int, width: int, near: float, far: float) -> np.ndarray:
    """(4, 4) float64: frame pixels (x, y, depth, 1) → GL clip space with w = 1.

    Pixel centres sit at integers: x_ndc = (2x + 1)/W − 1. Frame row 0 goes to GL's bottom
    row (y_ndc = (2y + 1)/H − 1), which is the first row ``glReadPixels`` returns, so the
    read-back image has row 0 at the top without a flip copy. Depth maps [near, far] → [−1, 1],
    so the smaller depth wins under GL's LESS test.
    """
    s = np.eye(4)
    s[0, 0], s[0, 3] = 2.0 / width, 1.0 / width - 1.0
    s[1, 1], s[1, 3] = 2.0 / height, 1.0 / height - 1.0
    s[2, 2], s[2, 3] = 2.0 / (far - near), -(far + near) / (far - near)
    return s


def world_to_clip(world_to_frame: np.ndarray, height: int, width: int, near: float, far: float) -> np.ndarray:
    """(4, 4) float64 world → GL clip space: :func:`frame_to_clip` after ``world_to_frame``."""
    return frame_to_clip(height, width, near, far) @ world_to_frame


def depth_range(reconstructions: list[Reconstruction]) -> tuple[float, float]:
    """(near, far) enclosing every vertex depth of one pass, with a margin.

    The margin keeps triangles at exactly the nearest/farthest depth inside the clip volume
    (and gives a flat, camera-facing mesh a non-empty range).
    """
    lo, hi = np.inf, -np.inf
    for rec in reconstructions:
        m = rec.world_to_frame
        depth = rec.vertices @ m[2, :3].astype(np.float32) + np.float32(m[2, 3])
        lo, hi = min(lo, float(depth.min())), max(hi, float(depth.max()))
    margin = 0.01 * (hi - lo) + 1e-3 * max(1.0, abs(lo), abs(hi))
    return lo - margin, hi + margin


def crop_world_to_frame(world_to_frame: np.ndarray, crop_matrix: np.ndarray) -> np.ndarray:
    """(4, 4) world → crop pixels: the (2, 3) frame → crop similarity applied after ``world_to_frame``.

    Depth passes through unchanged.
    """
    c = np.eye(4)
    c[:2, :2] = crop_matrix[:, :2]
    c[:2, 3] = crop_matrix[:, 2]
    return c @ world_to_frame


# --------------------------------------------------------------------------------------------
# Shaders
# --------------------------------------------------------------------------------------------

_SHADE_GLSL = """
uniform vec3 lights[5];  // unit directions, world space
uniform float intensity;
uniform float albedo;

layout(location = 0) out vec4 out_color;
layout(location = 1) out float out_mask;

void write_shaded(vec3 n) {
    // DECA: mean over lights of clamp(N.l, 0, 1) * intensity, times the albedo; N is used as
    // interpolated (not re-normalised), like the rasterised normal image.
    float shading = 0.0;
    for (int i = 0; i < 5; ++i) {
        shading += clamp(dot(n, lights[i]), 0.0, 1.0) * intensity;
    }
    float value = albedo * (shading / 5.0);
    // (x * 255).astype(uint8) truncates; k/255 converts back to exactly k in the UNORM8 target.
    float level = min(floor(value * 255.0), 255.0) / 255.0;
    out_color = vec4(level, level, level, 1.0);
    out_mask = 1.0;
}
"""

_COARSE_VS = """
#version 330
uniform mat4 world_to_clip;
in vec3 in_position;
in vec3 in_normal;
out vec3 v_normal;
void main() {
    gl_Position = world_to_clip * vec4(in_position, 1.0);  // w stays 1: affine, so no perspective divide
    v_normal = in_normal;
}
"""

_COARSE_FS = (
    "#version 330\n"
    + _SHADE_GLSL
    + """
in vec3 v_normal;
void main() { write_shaded(v_normal); }
"""
)

_DETAIL_VS = """
#version 330
uniform mat4 world_to_clip;
in vec3 in_position;
in vec2 in_uv;
out vec2 v_uv;
void main() {
    gl_Position = world_to_clip * vec4(in_position, 1.0);
    v_uv = in_uv;
}
"""

_DETAIL_FS = (
    "#version 330\n"
    + _SHADE_GLSL
    + """
uniform sampler2D detail_normals;
in vec2 v_uv;
void main() {
    // The map's row 0 is v = 1 and was uploaded as texture row t = 0, hence t = 1 - v.
    write_shaded(texture(detail_normals, vec2(v_uv.x, 1.0 - v_uv.y)).rgb);
}
"""
)


# --------------------------------------------------------------------------------------------
# GPU resource caches
# --------------------------------------------------------------------------------------------

_Entry = TypeVar("_Entry")


class _TopologyCache(Generic[_Entry]):
    """GPU buffers keyed by the topology arrays that built them, least recently used dropped first.

    Lookup is by array identity first (the hot path: a model shares one ``faces`` array), then by
    content, so a caller that copies ``faces`` every frame still reuses the buffers.
    """

    def __init__(self, max_entries: int, release: Callable[[_Entry], None]):
        self._max = max_entries
        self._release = release
        self._by_content: OrderedDict[bytes, _Entry] = OrderedDict()
        self._by_identity: OrderedDict[tuple[int, ...], tuple[tuple[np.ndarray, ...], bytes]] = OrderedDict()

    def get(self, arrays: tuple[np.ndarray, ...], build: Callable[[], _Entry]) -> _Entry:
        ident = tuple(id(a) for a in arrays)
        known = self._by_identity.get(ident)
        if known is not None and all(a is b for a, b in zip(known[0], arrays)):
            self._by_identity.move_to_end(ident)
            digest = known[1]
        else:
            digest = _digest(arrays)
            # Holding the arrays keeps their ids from being reused by unrelated objects.
            self._by_identity[ident] = (arrays, digest)
            while len(self._by_identity) > 4 * self._max:
                self._by_identity.popitem(last=False)
        entry = self._by_content.get(digest)
        if entry is None:
            entry = build()
            self._by_content[digest] = entry
            while len(self._by_content) > self._max:
                self._release(self._by_content.popitem(last=False)[1])
        else:
            self._by_content.move_to_end(digest)
        return entry

    def clear(self) -> None:
        for entry in self._by_content.values():
            self._release(entry)
        self._by_content.clear()
        self._by_identity.clear()


def _digest(arrays: tuple[np.ndarray, ...]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.digest()


@dataclass
class _CoarseMesh:
    """Indexed draw: per-vertex positions and normals, uploaded every frame."""

    positions: moderngl.Buffer
    normals: moderngl.Buffer
    indices: moderngl.Buffer
    vao: moderngl.VertexArray

    def release(self) -> None:
        for obj in (self.vao, self.positions, self.normals, self.indices):
            obj.release()


@dataclass
class _DetailMesh:
    """Non-indexed draw, one vertex per triangle corner, so UV seams keep their own UVs."""

    corners: np.ndarray  # (3F,) int: mesh vertex of each corner, to gather positions
    positions: moderngl.Buffer
    uvs: moderngl.Buffer  # static
    vao: moderngl.VertexArray

    def release(self) -> None:
        for obj in (self.vao, self.positions, self.uvs):
            obj.release()


@dataclass
class _Target:
    """A framebuffer of one size: shaded RGBA8, coverage R8 and depth."""

    color: moderngl.Renderbuffer
    mask: moderngl.Renderbuffer
    depth: moderngl.Renderbuffer
    fbo: moderngl.Framebuffer

    def release(self) -> None:
        for obj in (self.fbo, self.color, self.mask, self.depth):
            obj.release()


# --------------------------------------------------------------------------------------------
# Renderer
# --------------------------------------------------------------------------------------------


class Renderer:
    """Headless EGL/OpenGL 3.3 renderer of reconstructions onto frames.

    Create it in the thread that will render (see the module docstring). The hot path uploads
    only vertex data (and the detail normal map, in detail mode): index/UV buffers are cached per
    topology and framebuffers per frame size.

    Args:
        max_size: (height, width) limit for :meth:`render`; also capped by the GL driver's limits.
    """

    def __init__(self, max_size: tuple[int, int] = (4096, 4096)):
        self._thread = threading.get_ident()
        try:
            self.ctx = moderngl.create_standalone_context(backend="egl", require=330)
        except Exception as e:  # moderngl raises a bare Exception for every EGL failure
            raise RenderError(
                f"cannot create a headless OpenGL 3.3 context through EGL ({e}); install the EGL "
                "driver: 'apt-get install libegl1 libgl1 libegl-mesa0 libgl1-mesa-dri' (CPU) or the "
                "NVIDIA driver's libEGL_nvidia (GPU)"
            ) from e
        gl_max = min(int(self.ctx.info["GL_MAX_RENDERBUFFER_SIZE"]), *map(int, self.ctx.info["GL_MAX_VIEWPORT_DIMS"]))
        self.max_size = (min(int(max_size[0]), gl_max), min(int(max_size[1]), gl_max))

        self._coarse = self.ctx.program(vertex_shader=_COARSE_VS, fragment_shader=_COARSE_FS)
        self._detail = self.ctx.program(vertex_shader=_DETAIL_VS, fragment_shader=_DETAIL_FS)
        lights = (LIGHT_DIRECTIONS / np.linalg.norm(LIGHT_DIRECTIONS, axis=1, keepdims=True)).astype(np.float32)
        for prog in (self._coarse, self._detail):
            prog["lights"].write(lights.tobytes())
            prog["intensity"].value = LIGHT_INTENSITY
            prog["albedo"].value = ALBEDO
        self._detail["detail_normals"].value = 0
        # grid_sample(padding_mode="zeros", align_corners=False) ≙ bilinear, border colour 0.
        self._sampler = self.ctx.sampler(
            filter=(moderngl.LINEAR, moderngl.LINEAR), repeat_x=False, repeat_y=False, border_color=(0.0, 0.0, 0.0, 0.0)
        )

        self._coarse_meshes = _TopologyCache(_MAX_CACHED_MESHES, _CoarseMesh.release)
        self._detail_meshes = _TopologyCache(_MAX_CACHED_MESHES, _DetailMesh.release)
        self._targets: OrderedDict[tuple[int, int], _Target] = OrderedDict()
        self._textures: OrderedDict[tuple[int, int], moderngl.Texture] = OrderedDict()
        self._closed = False

    # -- public API ---------------------------------------------------------------------------

    def render(
        self,
        height: int,
        width: int,
        reconstructions: list[Reconstruction],
        image_type: str = "geometry",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Draw every reconstruction in one pass on a black (height, width) canvas.

        A reconstruction is shaded with its detail normal map when ``image_type == "detail"`` or
        when it carries ``detail_normals``; otherwise with its coarse vertex normals. Nearer
        surfaces (smaller depth) hide farther ones; no face culling, because ``world_to_frame``
        may contain a reflection that flips the winding.

        Returns:
            image: (H, W, 3) uint8, the geometry image on black.
            mask: (H, W) uint8, 255 where a triangle covers the pixel centre, else 0.
        """
        self._check_usable()
        if image_type not in IMAGE_TYPES:
            raise RenderError(f"unknown image type '{image_type}'; choose one of: {', '.join(IMAGE_TYPES)}")
        height, width = int(height), int(width)
        if not (0 < height <= self.max_size[0] and 0 < width <= self.max_size[1]):
            raise RenderError(
                f"cannot render a {width}x{height} frame: the renderer takes 1x1 up to "
                f"{self.max_size[1]}x{self.max_size[0]} (width x height); downscale the input"
            )
        for rec in reconstructions:
            _check_reconstruction(rec, image_type)

        target = self._target(height, width)
        target.fbo.use()
        target.fbo.clear(0.0, 0.0, 0.0, 0.0, depth=1.0)
        if reconstructions:
            self.ctx.enable_only(moderngl.DEPTH_TEST)  # and no CULL_FACE: see the docstring
            near, far = depth_range(reconstructions)
            for rec in reconstructions:
                clip = world_to_clip(rec.world_to_frame, height, width, near, far)
                if image_type == "detail" or rec.detail_normals is not None:
                    self._draw_detail(rec, clip)
                else:
                    self._draw_coarse(rec, clip)

        # Fresh arrays every call: results travel to other threads while the next frame renders.
        image = np.empty((height, width, 3), dtype=np.uint8)
        mask = np.empty((height, width), dtype=np.uint8)
        target.fbo.read_into(image, components=3, attachment=0, alignment=1)
        target.fbo.read_into(mask, components=1, attachment=1, alignment=1)
        return image, mask

    def render_crop(self, reconstruction: Reconstruction, image_size: int = 224) -> np.ndarray:
        """inferno's per-detection ``geometry.png``: the same shading in the model's square crop.

        Maps through ``reconstruction.face.crop_matrix`` (frame → crop pixels), so ``image_size``
        must be the crop size that matrix was built for.

        Returns: (image_size, image_size, 3) uint8.
        """
        to_crop = crop_world_to_frame(reconstruction.world_to_frame, reconstruction.face.crop_matrix)
        image, _ = self.render(image_size, image_size, [replace(reconstruction, world_to_frame=to_crop)])
        return image

    def close(self) -> None:
        """Release every GPU object and the context. Idempotent."""
        if self._closed:
            return
        self._check_thread()
        self._coarse_meshes.clear()
        self._detail_meshes.clear()
        for target in self._targets.values():
            target.release()
        for texture in self._textures.values():
            texture.release()
        self._targets.clear()
        self._textures.clear()
        self._sampler.release()
        self._coarse.release()
        self._detail.release()
        self.ctx.release()
        self._closed = True

    def __enter__(self) -> "Renderer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- drawing ------------------------------------------------------------------------------

    def _draw_coarse(self, rec: Reconstruction, clip: np.ndarray) -> None:
        vertices = np.ascontiguousarray(rec.vertices, dtype=np.float32)
        mesh = self._coarse_meshes.get((rec.faces,), lambda: self._build_coarse(rec.faces, len(vertices)))
        if mesh.positions.size != vertices.nbytes:  # same topology, different vertex count: grow/shrink
            mesh.positions.orphan(vertices.nbytes)
            mesh.normals.orphan(vertices.nbytes)
        mesh.positions.write(vertices)
        mesh.normals.write(vertex_normals(vertices, rec.faces))
        self._coarse["world_to_clip"].write(clip.T.astype(np.float32).tobytes())  # GL is column-major
        mesh.vao.render(moderngl.TRIANGLES)

    def _draw_detail(self, rec: Reconstruction, clip: np.ndarray) -> None:
        mesh = self._detail_meshes.get(
            (rec.faces, rec.uvfaces, rec.uvcoords), lambda: self._build_detail(rec.faces, rec.uvfaces, rec.uvcoords)
        )
        corner_positions = np.ascontiguousarray(rec.vertices, dtype=np.float32)[mesh.corners]
        mesh.positions.write(corner_positions)
        self._texture(rec.detail_normals).use(0)
        self._sampler.use(0)
        self._detail["world_to_clip"].write(clip.T.astype(np.float32).tobytes())
        mesh.vao.render(moderngl.TRIANGLES)

    # -- cached resources ---------------------------------------------------------------------

    def _build_coarse(self, faces: np.ndarray, n_vertices: int) -> _CoarseMesh:
        positions = self.ctx.buffer(reserve=n_vertices * 12, dynamic=True)
        normals = self.ctx.buffer(reserve=n_vertices * 12, dynamic=True)
        indices = self.ctx.buffer(np.ascontiguousarray(faces, dtype=np.int32))
        vao = self.ctx.vertex_array(
            self._coarse,
            [(positions, "3f", "in_position"), (normals, "3f", "in_normal")],
            index_buffer=indices,
            index_element_size=4,
        )
        return _CoarseMesh(positions, normals, indices, vao)

    def _build_detail(self, faces: np.ndarray, uvfaces: np.ndarray, uvcoords: np.ndarray) -> _DetailMesh:
        corners = np.ascontiguousarray(faces, dtype=np.int64).reshape(-1)
        corner_uvs = np.ascontiguousarray(uvcoords, dtype=np.float32)[np.asarray(uvfaces).reshape(-1)]
        positions = self.ctx.buffer(reserve=corners.size * 12, dynamic=True)
        uvs = self.ctx.buffer(corner_uvs)
        vao = self.ctx.vertex_array(self._detail, [(positions, "3f", "in_position"), (uvs, "2f", "in_uv")])
        return _DetailMesh(corners, positions, uvs, vao)

    def _target(self, height: int, width: int) -> _Target:
        key = (height, width)
        target = self._targets.get(key)
        if target is None:
            size = (width, height)
            color = self.ctx.renderbuffer(size, components=4)
            mask = self.ctx.renderbuffer(size, components=1)
            depth = self.ctx.depth_renderbuffer(size)
            target = _Target(color, mask, depth, self.ctx.framebuffer([color, mask], depth))
            self._targets[key] = target
            while len(self._targets) > _MAX_CACHED_FRAMEBUFFERS:
                self._targets.popitem(last=False)[1].release()
        else:
            self._targets.move_to_end(key)
        return target

    def _texture(self, normals: np.ndarray) -> moderngl.Texture:
        """The detail normal map uploaded into a float RGB texture reused per map size."""
        key = normals.shape[:2]
        texture = self._textures.get(key)
        if texture is None:
            texture = self.ctx.texture((normals.shape[1], normals.shape[0]), 3, dtype="f4", alignment=1)
            self._textures[key] = texture
            while len(self._textures) > _MAX_CACHED_TEXTURES:
                self._textures.popitem(last=False)[1].release()
        else:
            self._textures.move_to_end(key)
        texture.write(np.ascontiguousarray(normals, dtype=np.float32))
        return texture

    def _check_thread(self) -> None:
        if threading.get_ident() != self._thread:
            raise RuntimeError(
                "Renderer used from a thread that did not create it; an OpenGL context is current in "
                "one thread only, so create the Renderer inside the render thread"
            )

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError("Renderer used after close()")
        self._check_thread()


def _check_reconstruction(rec: Reconstruction, image_type: str) -> None:
    """Shape and finiteness checks: a bad array must fail here, not draw garbage on the GPU."""
    v, f = rec.vertices, rec.faces
    if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"expected vertices (V, 3) and faces (F, 3), got {v.shape} and {f.shape}")
    if not np.isfinite(v).all():
        raise ValueError("reconstruction vertices contain NaN/inf; drop the face before rendering")
    if image_type == "detail" or rec.detail_normals is not None:
        if rec.detail_normals is None or rec.uvcoords is None or rec.uvfaces is None:
            raise RenderError(
                "image type 'detail' needs a model that predicts detail normals (DECA/EMOCA); EMICA "
                "and the MediaPipe mesh have none, use image type 'geometry'"
            )
        if rec.detail_normals.ndim != 3 or rec.detail_normals.shape[2] != 3:
            raise ValueError(f"detail_normals must be (H, W, 3), got {rec.detail_normals.shape}")
        if rec.uvfaces.shape != f.shape:
            raise ValueError(f"uvfaces {rec.uvfaces.shape} must match faces {f.shape}")
