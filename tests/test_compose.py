"""The inferno-style panel composer: layout, PIL-exact blending, boxes, masks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image, ImageDraw

from realtime.compose import ComposeOptions, compose, draw_box, panel_shape, paste_blend
from realtime.errors import UserError
from realtime.types import Face
from tests.fakes import fake_face

H, W = 48, 64


def make_face(center=(30.0, 22.0), size=20.0) -> Face:
    return fake_face(center=center, size=size)


@pytest.fixture
def scene():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    rendered = np.zeros((H, W, 3), np.uint8)
    mask = np.zeros((H, W), np.uint8)
    rendered[10:30, 20:40] = rng.integers(0, 256, (20, 20, 1), dtype=np.uint8)  # grey, like the renderer
    mask[10:30, 20:40] = 255
    rendered[12, 21] = 0  # covered but black (shaded away from every light): still in the mask
    return frame, rendered, mask


FLAGS = list(itertools.product([False, True], repeat=3))


@pytest.mark.parametrize("cat_dim", [0, 1])
@pytest.mark.parametrize("flags", FLAGS)
def test_panel_shape_and_output_shape(scene, cat_dim, flags):
    frame, rendered, mask = scene
    original, rec, transparent = flags
    opts = ComposeOptions(include_original=original, include_rec=rec, include_transparent=transparent, cat_dim=cat_dim)
    n = sum(flags)
    if n == 0:
        with pytest.raises(UserError, match="no output panel selected"):
            panel_shape(H, W, opts)
        with pytest.raises(UserError, match="no output panel selected"):
            compose(frame, rendered, mask, [], opts)
        return
    expected = (n * H, W) if cat_dim == 0 else (H, n * W)
    assert panel_shape(H, W, opts) == expected
    out = compose(frame, rendered, mask, [make_face()], opts)
    assert out.shape == (*expected, 3) and out.dtype == np.uint8


def test_cat_dim_none_follows_inferno_and_bad_cat_dim_is_a_user_error():
    assert panel_shape(100, 50, ComposeOptions(cat_dim=None)) == (100, 150)  # portrait → side by side
    assert panel_shape(50, 100, ComposeOptions(cat_dim=None)) == (150, 100)
    with pytest.raises(UserError, match="cat_dim=2"):
        panel_shape(50, 100, ComposeOptions(cat_dim=2))


def pil_panels(frame, rendered, mask, faces, color, black=False):
    """inferno's create_reconstruction_video panels, made with PIL (our mask, already in the frame)."""
    original = Image.fromarray(frame)
    draw = ImageDraw.Draw(original)
    for f in faces:
        left, top, right, bottom = f.box
        draw.rectangle(((left, top), (right, bottom)), outline=color, width=5)
    base = np.zeros_like(frame) if black else frame
    full, trans = Image.fromarray(base), Image.fromarray(base)
    vis = Image.fromarray(rendered)
    full.paste(vis, (0, 0), Image.fromarray(mask))
    trans.paste(vis, (0, 0), Image.fromarray((mask / 255.0 * 196).astype(np.uint8)))
    return np.array(original), np.array(full), np.array(trans)


@pytest.mark.parametrize("black", [False, True])
def test_matches_pil_paste_and_draw(scene, black):
    frame, rendered, mask = scene
    faces = [make_face(), make_face(center=(2.3, 45.7), size=17.0)]  # second box runs off the frame
    out = compose(frame, rendered, mask, faces, ComposeOptions(black_background=black))
    o, f, t = pil_panels(frame, rendered, mask, faces, (0, 255, 0), black)
    np.testing.assert_array_equal(out[:H], o)
    np.testing.assert_array_equal(out[H : 2 * H], f)
    np.testing.assert_array_equal(out[2 * H :], t)


def test_transparent_pixel_value_is_pils_rounding(scene):
    frame, rendered, mask = scene
    out = compose(frame, rendered, mask, [], ComposeOptions(cat_dim=1))
    y, x = 15, 25
    bg, fg = frame[y, x].astype(int), rendered[y, x].astype(int)
    # PIL: t = v + 128; ((t >> 8) + t) >> 8, with v = fg·196 + bg·59.
    t = fg * 196 + bg * 59 + 128
    expected = ((t >> 8) + t) >> 8
    np.testing.assert_array_equal(out[y, 2 * W + x], expected)
    assert np.abs(expected - np.round((fg * 196 + bg * 59) / 255.0)).max() == 0
    np.testing.assert_array_equal(out[y, W + x], rendered[y, x])  # opaque panel: the render itself
    np.testing.assert_array_equal(out[12, W + 21], [0, 0, 0])  # covered-but-black stays black (inferno drops it)


def test_paste_blend_all_values_equal_pil():
    bg = np.repeat(np.arange(256, dtype=np.uint8)[None, :], 256, 0)
    fg = bg.T.copy()
    for a in (0, 1, 77, 128, 196, 254, 255):
        alpha = np.full((256, 256), a, np.uint8)
        ours = paste_blend(np.dstack([bg] * 3), np.dstack([fg] * 3), alpha)
        pil = Image.fromarray(np.dstack([bg] * 3))
        pil.paste(Image.fromarray(np.dstack([fg] * 3)), (0, 0), Image.fromarray(alpha))
        np.testing.assert_array_equal(ours, np.array(pil))


def test_box_in_original_panel_and_unmasked_pixels_equal_frame(scene):
    frame, rendered, mask = scene
    face = make_face(center=(30.0, 22.0), size=20.0)  # box 20..40 × 12..32
    out = compose(frame, rendered, mask, [face], ComposeOptions(box_color=(0, 128, 0)))
    original, full, trans = out[:H], out[H : 2 * H], out[2 * H :]
    band = np.zeros((H, W), bool)
    band[12:33, 20:41] = True
    band[17:28, 25:36] = False  # 5 px inward from each edge, both corners inclusive
    assert (original[band] == [0, 128, 0]).all()
    np.testing.assert_array_equal(original[~band], frame[~band])
    outside = mask == 0
    np.testing.assert_array_equal(full[outside], frame[outside])
    np.testing.assert_array_equal(trans[outside], frame[outside])
    assert not np.array_equal(trans[~outside], frame[~outside])


def test_no_mask_and_black_background(scene):
    frame, rendered, mask = scene
    out = compose(frame, rendered, mask, [], ComposeOptions(include_original=False, use_mask=False))
    np.testing.assert_array_equal(out[:H], rendered)  # alpha 255 everywhere: the render replaces the frame
    trans = out[H:]
    expected = paste_blend(frame, rendered, np.full((H, W), 196, np.uint8))
    np.testing.assert_array_equal(trans, expected)
    outside = mask == 0  # black render at 196/255 over the frame: darkened, not untouched
    assert (trans[outside] <= frame[outside]).all() and (trans[outside] < frame[outside]).any()

    black = compose(frame, rendered, mask, [], ComposeOptions(include_original=False, black_background=True))
    assert not black[:H][mask == 0].any() and not black[H:][mask == 0].any()


def test_draw_box_matches_pil_for_odd_boxes():
    for box in [(2.7, 3.2, 15.9, 14.5), (-3.7, 3.2, 6.9, 8.5), (50.2, 40.9, 70.0, 60.0), (0.0, 0.0, 63.0, 47.0)]:
        ours = np.zeros((H, W, 3), np.uint8)
        draw_box(ours, box, (1, 2, 3), 5)
        pil = Image.new("RGB", (W, H))
        ImageDraw.Draw(pil).rectangle(((box[0], box[1]), (box[2], box[3])), outline=(1, 2, 3), width=5)
        np.testing.assert_array_equal(ours, np.array(pil), err_msg=str(box))


def test_shape_mismatch_is_rejected(scene):
    frame, rendered, mask = scene
    with pytest.raises(ValueError, match="must be"):
        compose(frame, rendered[:-1], mask, [])
