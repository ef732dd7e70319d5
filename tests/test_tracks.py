"""Track ids stay with their faces: moving faces, short and long losses, crossings, real MediaPipe faces."""

from __future__ import annotations

import numpy as np
import pytest

from realtime.tracks import IdentityCache, TrackAssigner, box_iou
from realtime.types import Face, Frame
from tests.fakes import face_at

FPS = 30.0


def make_face(cx: float, cy: float, size: float, index: int = 0, jitter: float = 0.0, rng=None) -> Face:
    face = face_at(cx, cy, size, index=index)
    if jitter:
        face.landmarks = (face.landmarks + rng.normal(0, jitter, size=face.landmarks.shape)).astype(np.float32)
    return face


def run(assigner: TrackAssigner, frames: list[list[tuple[str, float, float, float]]], seed: int = 1):
    """Feed frames of (name, cx, cy, size) detections in shuffled order; returns name → ids per frame."""
    rng = np.random.default_rng(seed)
    history: dict[str, list[int]] = {}
    for t, dets in enumerate(frames):
        order = rng.permutation(len(dets))
        faces = [make_face(*dets[k][1:], index=i, jitter=0.5, rng=rng) for i, k in enumerate(order)]
        out = assigner.assign(faces, pts=t / FPS)
        assert [f.index for f in out] == [f.index for f in faces]  # same faces, same order
        for face, k in zip(out, order):
            history.setdefault(dets[k][0], []).append(face.track_id)
    return history


def two_faces(gap: range, n: int = 60) -> list[list[tuple[str, float, float, float]]]:
    """A drifts right, B drifts left and up; B is missing during `gap`."""
    frames = []
    for t in range(n):
        dets = [("A", 150 + 2.0 * t, 200.0, 120.0)]
        if t not in gap:
            dets.append(("B", 480 - 1.5 * t, 220 - 0.5 * t, 110.0))
        frames.append(dets)
    return frames


def test_box_iou_known_values():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])
    np.testing.assert_allclose(box_iou(a, b), [[1.0, 50 / 150, 0.0]])


def test_two_faces_keep_ids_through_a_short_loss():
    history = run(TrackAssigner(max_lost_frames=15), two_faces(gap=range(20, 30)))
    assert set(history["A"]) == {history["A"][0]}
    assert set(history["B"]) == {history["B"][0]}
    assert history["A"][0] != history["B"][0]
    assert len(history["B"]) == 50


def test_face_lost_longer_than_max_lost_frames_gets_a_new_id():
    assigner = TrackAssigner(max_lost_frames=15)
    history = run(assigner, two_faces(gap=range(20, 40)))
    b = history["B"]
    assert set(b[:20]) == {b[0]} and set(b[20:]) == {b[20]}
    assert b[20] != b[0] and b[20] != history["A"][0]
    assert set(history["A"]) == {history["A"][0]}


def test_retired_ids_are_reported_once_and_never_reused():
    assigner = TrackAssigner(max_lost_frames=3)
    first = assigner.assign([make_face(100, 100, 80)], pts=0.0)[0].track_id
    retired = []
    for t in range(1, 6):
        assigner.assign([], pts=t / FPS)
        retired += assigner.retired
    assert retired == [first] and assigner.track_ids == []
    again = assigner.assign([make_face(100, 100, 80)], pts=6 / FPS)[0].track_id
    assert again != first


def test_crossing_faces_with_different_speeds_do_not_swap():
    # Same row, opposite directions, 12 vs 4 px/frame; at frame 25 they are 8 px apart, where matching
    # to the last positions (no motion model) would swap them.
    frames = [[("fast", 100 + 12.0 * t, 200.0, 100.0), ("slow", 508 - 4.0 * t, 203.0, 100.0)] for t in range(50)]
    history = run(TrackAssigner(), frames, seed=3)
    assert set(history["fast"]) == {history["fast"][0]}
    assert set(history["slow"]) == {history["slow"][0]}
    assert history["fast"][0] != history["slow"][0]


def test_face_reappearing_far_away_is_a_new_track():
    assigner = TrackAssigner()
    a = assigner.assign([make_face(100, 100, 80)], pts=0.0)[0].track_id
    assigner.assign([], pts=1 / FPS)
    b = assigner.assign([make_face(500, 400, 80)], pts=2 / FPS)[0].track_id
    assert a != b


def test_identity_cache_averages_then_freezes():
    cache = IdentityCache(frames=3)
    codes = [np.full(4, v, np.float32) for v in (1.0, 2.0, 6.0, 100.0, -50.0)]
    assert cache.needs_code(7)
    out = [cache.update(7, c) for c in codes]
    np.testing.assert_allclose(out[0], 1.0)
    np.testing.assert_allclose(out[1], 1.5)
    np.testing.assert_allclose(out[2], 3.0)
    np.testing.assert_allclose(out[3], 3.0)  # frozen: later codes are ignored
    np.testing.assert_allclose(out[4], 3.0)
    assert out[4].dtype == np.float32
    assert not cache.needs_code(7)
    np.testing.assert_allclose(cache.get(7), 3.0)
    assert cache.get(8) is None
    cache.forget(7)
    assert cache.needs_code(7) and cache.get(7) is None


def test_identity_cache_refresh_switches_after_collecting_new_codes():
    cache = IdentityCache(frames=2, refresh_every=3)
    cache.update(1, np.zeros(2))
    assert np.all(cache.update(1, np.zeros(2)) == 0)  # frozen at 0
    for _ in range(3):  # three frames on the frozen code
        assert not cache.needs_code(1)
        assert np.all(cache.get(1) == 0)
    assert cache.needs_code(1)
    assert np.all(cache.update(1, np.full(2, 4.0)) == 0)  # still the old identity while collecting
    np.testing.assert_allclose(cache.update(1, np.full(2, 6.0)), 5.0)
    assert not cache.needs_code(1)


def test_identity_cache_plans_a_batch_as_frames_one_at_a_time():
    # The model stage asks for a whole batch before feeding any code; a refresh must come at the same frame as
    # with one frame per batch, or results would depend on --batch_size.
    rng = np.random.default_rng(0)
    tracks = [1, 2, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1]
    one_by_one, by_batch = IdentityCache(frames=2, refresh_every=3), IdentityCache(frames=2, refresh_every=3)
    expected, planned = [], []
    for tid in tracks:
        need = one_by_one.needs_code(tid)
        expected.append(need)
        one_by_one.update(tid, rng.normal(size=4)) if need else one_by_one.get(tid)
    for start in range(0, len(tracks), 4):
        batch = tracks[start:start + 4]
        needs = by_batch.needs_codes(batch)
        planned += needs
        for tid, need in zip(batch, needs):
            by_batch.update(tid, np.zeros(4)) if need else by_batch.get(tid)
    assert planned == expected and sum(expected) > 6  # first codes and at least one refresh per track


def test_identity_cache_tracks_are_independent():
    cache = IdentityCache(frames=1)
    cache.update(1, np.ones(3))
    cache.update(2, np.full(3, 2.0))
    np.testing.assert_allclose(cache.get(1), 1.0)
    np.testing.assert_allclose(cache.get(2), 2.0)
    with pytest.raises(ValueError, match="track 1"):
        cache.update(1, np.ones(5))


def _two_astronauts(n: int = 60) -> list[np.ndarray]:
    """Two astronaut faces side by side; the right one slides out of the frame and comes back."""
    import cv2
    from skimage import data

    face = cv2.resize(data.astronaut()[0:300, 100:360], (208, 240), interpolation=cv2.INTER_AREA)
    h, w = face.shape[:2]
    frames = []
    for t in range(n):
        canvas = np.full((300, 640, 3), 90, np.uint8)
        canvas[30 : 30 + h, 40 : 40 + w] = face
        # Right copy: slides out (gone at frame 10), back in from frame 12, home again by frame 22.
        x = int(round(360 + 280 * np.clip(min(t / 10, (22 - t) / 10), 0, 1)))
        visible = max(0, min(w, 640 - x))
        if visible:
            canvas[30 : 30 + h, x : x + visible] = face[:, :visible]
        frames.append(canvas)
    return frames


def test_real_tracker_two_astronauts_keep_their_ids():
    tracking = pytest.importorskip("realtime.tracking", reason="realtime.tracking (FaceTracker) not written yet")
    assigner = TrackAssigner()
    left, right, right_frames = set(), set(), []
    with tracking.FaceTracker(num_faces=2, mode="video") as tracker:
        for t, image in enumerate(_two_astronauts()):
            faces = tracker.track(Frame(index=t, pts=t / FPS, image=image))
            for face in assigner.assign(faces, pts=t / FPS):
                (left if face.center[0] < 320 else right).add(face.track_id)
                if face.center[0] >= 320:
                    right_frames.append(t)
    assert len(left) == 1, f"left face changed id: {left}"
    assert len(right) == 1, f"right face changed id: {right}"
    assert left != right
    # It really left (MediaPipe loses it for several frames) and really came back.
    assert min(right_frames) == 0 and not any(9 <= t <= 13 for t in right_frames)
    assert set(range(25, 60)) <= set(right_frames)
