"""The output panels of inferno's ``create_reconstruction_video``, built with numpy.

Panels, in inferno's order: [original frame + a square box per face, opaque overlay of the
rendered reconstruction, transparent overlay at 196/255 of the mask], stacked vertically
(``cat_dim=0``) or side by side (``cat_dim=1``). The overlays blend exactly like PIL's
``Image.paste(vis, (0, 0), mask)``, which inferno uses.

Two deliberate differences from inferno: the reconstruction is rendered straight onto the frame
(no skimage warp of a 224² crop), and the mask is the renderer's coverage, whereas inferno
thresholds the geometry image (R·G·B > 30 on ``geometry.png``), which also drops covered pixels
darker than grey level 4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from realtime.errors import UserError
from realtime.types import Face

__all__ = ["ComposeOptions", "compose", "panel_shape", "paste_blend", "draw_box", "TRANSPARENT_OPACITY"]

TRANSPARENT_OPACITY = 196  # inferno: mask_transparent = (warped_mask * 196).astype(uint8)


@dataclass
class ComposeOptions:
    """Which panels to show and how; defaults are inferno's ``create_reconstruction_video`` call.

    ``cat_dim``: 0 stacks vertically, 1 side by side, None picks like inferno (side by side when
    the frame is taller than wide). ``box_width``: the box outline's thickness in pixels (inward).
    """

    include_original: bool = True
    include_rec: bool = True
    include_transparent: bool = True
    black_background: bool = False
    use_mask: bool = True
    cat_dim: Optional[int] = 0
    box_color: tuple[int, int, int] = (0, 255, 0)
    box_width: int = 5


def _panel_count(opts: ComposeOptions) -> int:
    n = int(opts.include_original) + int(opts.include_rec) + int(opts.include_transparent)
    if n == 0:
        raise UserError(
            "no output panel selected: enable at least one of the original, reconstruction or "
            "transparent panels"
        )
    return n


def _cat_dim(height: int, width: int, opts: ComposeOptions) -> int:
    if opts.cat_dim is None:
        return 1 if height > width else 0
    if opts.cat_dim not in (0, 1):
        raise UserError(
            f"invalid panel layout cat_dim={opts.cat_dim!r}: use 0 (stacked vertically) or 1 (side by side)"
        )
    return opts.cat_dim


def panel_shape(height: int, width: int, opts: ComposeOptions) -> tuple[int, int]:
    """(H', W') of the composed image for (height, width) frames."""
    n = _panel_count(opts)
    return (n * height, width) if _cat_dim(height, width, opts) == 0 else (height, n * width)


def paste_blend(background: np.ndarray, image: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """PIL's integer alpha paste: round((image·a + background·(255 − a)) / 255) per channel.

    PIL computes t = v + 128 and then ((t >> 8) + t) >> 8, an exact rounding division by 255
    for 0 ≤ v ≤ 255²; every intermediate fits in uint16.

    background, image: (h, w, 3) uint8; alpha: (h, w) uint8 → (h, w, 3) uint8.
    """
    a = alpha.astype(np.uint16)[..., None]
    t = image.astype(np.uint16) * a
    t += background.astype(np.uint16) * (255 - a)
    t += 128
    t += t >> 8
    t >>= 8
    return t.astype(np.uint8)


def draw_box(
    image: np.ndarray, box: tuple[float, float, float, float], color: tuple[int, int, int], width: int
) -> None:
    """Draw a rectangle outline in place, pixel for pixel like PIL's ``ImageDraw.rectangle(width=...)``.

    PIL truncates the corner coordinates to int (C cast), includes both corners, and grows the
    outline inward; parts outside the image are clipped.

    image: (H, W, 3) uint8; box: (left, top, right, bottom) in pixels.
    """
    x0, y0, x1, y1 = (int(c) for c in box)
    h, w = image.shape[:2]
    bands = (  # (row start, row end, col start, col end), ends inclusive
        (y0, y0 + width - 1, x0, x1),  # top
        (y1 - width + 1, y1, x0, x1),  # bottom
        (y0, y1, x0, x0 + width - 1),  # left
        (y0, y1, x1 - width + 1, x1),  # right
    )
    for r0, r1, c0, c1 in bands:
        r0, r1 = max(r0, y0, 0), min(r1, y1, h - 1)
        c0, c1 = max(c0, x0, 0), min(c1, x1, w - 1)
        if r0 <= r1 and c0 <= c1:
            image[r0 : r1 + 1, c0 : c1 + 1] = color


def _mask_window(mask: np.ndarray) -> Optional[tuple[slice, slice]]:
    """The bounding box of ``mask``'s non-zero pixels (None when empty): only there do the overlays differ
    from the background, and a face covers a small part of a large frame."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask[rows[0] : rows[-1] + 1].any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _overlay(out: np.ndarray, base: np.ndarray, rendered: np.ndarray, alpha: np.ndarray,
             win: Optional[tuple[slice, slice]]) -> None:
    """Write ``base`` with ``rendered`` pasted through ``alpha`` into ``out`` ((H, W, 3)); ``alpha`` covers only
    the window ``win`` (zero outside it)."""
    out[...] = base
    if win is not None:
        out[win] = paste_blend(base[win], rendered[win], alpha)


def compose(
    frame: np.ndarray,
    rendered: np.ndarray,
    mask: np.ndarray,
    faces: list[Face],
    opts: Optional[ComposeOptions] = None,
) -> np.ndarray:
    """Build the panel image for one frame.

    Args:
        frame: (H, W, 3) uint8 RGB input picture.
        rendered: (H, W, 3) uint8 reconstruction image on black (:meth:`Renderer.render`).
        mask: (H, W) uint8, 255 where the reconstruction was drawn.
        faces: the faces whose square boxes are outlined on the original panel.
        opts: panel selection and layout; inferno's defaults when None.

    Returns: (H', W', 3) uint8 with (H', W') = :func:`panel_shape`.
    """
    opts = opts or ComposeOptions()
    height, width = frame.shape[:2]
    if frame.shape != (height, width, 3) or rendered.shape != frame.shape or mask.shape != (height, width):
        raise ValueError(
            f"frame {frame.shape}, rendered {rendered.shape} and mask {mask.shape} must be (H, W, 3), (H, W, 3), (H, W)"
        )
    out_h, out_w = panel_shape(height, width, opts)
    out = np.empty((out_h, out_w, 3), dtype=np.uint8)
    vertical = _cat_dim(height, width, opts) == 0

    def panel(i: int) -> np.ndarray:
        return out[i * height : (i + 1) * height] if vertical else out[:, i * width : (i + 1) * width]

    base = np.zeros_like(frame) if opts.black_background else frame
    win = _mask_window(mask) if opts.use_mask else (slice(0, height), slice(0, width))
    i = 0
    if opts.include_original:
        original = panel(i)
        original[...] = frame
        for face in faces:
            draw_box(original, face.box, opts.box_color, opts.box_width)
        i += 1
    if opts.include_rec:
        if opts.use_mask:
            _overlay(panel(i), base, rendered, mask[win] if win else None, win)
        else:  # alpha 255 everywhere: PIL's paste then copies the render exactly
            panel(i)[...] = rendered
        i += 1
    if opts.include_transparent:
        alpha = None
        if win is not None and opts.use_mask:
            # inferno scales a [0, 1] mask by 196 and truncates; ours is 0/255, so 255 → 196.
            alpha = ((mask[win].astype(np.uint16) * TRANSPARENT_OPACITY) // 255).astype(np.uint8)
        elif win is not None:
            alpha = np.full(mask.shape, TRANSPARENT_OPACITY, dtype=np.uint8)
        _overlay(panel(i), base, rendered, alpha, win)
    return out
