"""Stable face identities across frames, and the per-identity shape code cache.

`TrackAssigner` gives every detected face a `track_id` that stays the same while the face is in
view and survives short losses (occlusion, a face sliding out of the frame and back). Each frame,
live and recently lost tracks are matched to the detections by a minimum-cost assignment over
box overlap (IoU) and landmark-centroid distance, measured against where each track is predicted
to be (constant velocity). A track unseen for more than `max_lost_frames` frames is retired and
its id is never reused.

`IdentityCache` holds one shape code per track: MICA's shape depends on identity only, so the
model needs it for the first few frames of a track (and on an optional refresh schedule), not
every frame.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy.optimize import linear_sum_assignment

from .types import Face

# A cost no feasible pair reaches; the assignment solver needs finite numbers.
_INFEASIBLE = 1e6


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of every pair of boxes.

    Args:
        a: (N, 4) boxes (left, top, right, bottom).
        b: (M, 4) boxes (left, top, right, bottom).

    Returns:
        (N, M) IoU in [0, 1].
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    left = np.maximum(a[:, None, 0], b[None, :, 0])
    top = np.maximum(a[:, None, 1], b[None, :, 1])
    right = np.minimum(a[:, None, 2], b[None, :, 2])
    bottom = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(right - left, 0, None) * np.clip(bottom - top, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def landmark_centroid(face: Face) -> np.ndarray:
    """Mean landmark position in frame pixels: (478, 3) landmarks → (2,)."""
    return np.asarray(face.landmarks, dtype=np.float64)[:, :2].mean(axis=0)


@dataclass
class _Track:
    """What the assigner remembers about one identity."""

    track_id: int
    centroid: np.ndarray  # (2,) landmark centroid at the last sighting, frame pixels
    box_center: np.ndarray  # (2,) box centre at the last sighting
    size: float  # box side at the last sighting
    velocity: np.ndarray  # (2,) pixels per second, of the centroid
    pts: float  # time of the last sighting
    lost: int = 0  # assign() calls since the last sighting

    def predicted_offset(self, pts: float) -> np.ndarray:
        """(2,) displacement expected since the last sighting, assuming constant velocity."""
        return self.velocity * max(pts - self.pts, 0.0)


class TrackAssigner:
    """Assigns stable track ids to the faces of successive frames.

    Args:
        max_lost_frames: a track missing from this many consecutive frames can still be picked up
            again with its old id; one more missed frame retires it.
        iou_threshold: a detection whose box overlaps a track's predicted box at least this much is
            a candidate for that track regardless of the centroid distance.
        max_distance: the largest centroid distance, in box sizes, between a detection and a live
            track's predicted centroid for them to match. A lost track's gate widens with the
            frames it has been missing (up to twice this after `max_lost_frames`), because the face
            may come back somewhere else near where it left.
    """

    def __init__(self, max_lost_frames: int = 15, iou_threshold: float = 0.3, max_distance: float = 0.5):
        if max_lost_frames < 0:
            raise ValueError(f"max_lost_frames must be >= 0, got {max_lost_frames}")
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        if max_distance <= 0:
            raise ValueError(f"max_distance must be > 0, got {max_distance}")
        self.max_lost_frames = max_lost_frames
        self.iou_threshold = iou_threshold
        self.max_distance = max_distance
        self._tracks: list[_Track] = []
        self._next_id = 0
        self.retired: list[int] = []  # ids retired by the latest assign() call (free their caches)

    @property
    def track_ids(self) -> list[int]:
        """Ids of the tracks still kept (in view or lost for at most `max_lost_frames` frames)."""
        return [t.track_id for t in self._tracks]

    def reset(self) -> None:
        """Forget every track (a new input); ids keep counting up so they are never reused."""
        self.retired = [t.track_id for t in self._tracks]
        self._tracks = []

    def assign(self, faces: list[Face], pts: float) -> list[Face]:
        """Give each face of one frame its track id.

        Args:
            faces: the detections of the frame, in any order.
            pts: the frame's presentation time in seconds (increasing from call to call).

        Returns:
            The same faces, in the same order, as copies with `track_id` set.
        """
        centroids = np.array([landmark_centroid(f) for f in faces]).reshape(-1, 2)
        boxes = np.array([f.box for f in faces], dtype=np.float64).reshape(-1, 4)
        sizes = np.maximum([float(f.size) for f in faces], 1e-6)  # a size of 0 would break the log ratio

        cost = self._cost(centroids, boxes, sizes, pts)
        rows, cols = linear_sum_assignment(cost) if cost.size else (np.empty(0, int), np.empty(0, int))
        track_of_face: dict[int, _Track] = {}
        for r, c in zip(rows, cols):
            if cost[r, c] < _INFEASIBLE:
                track_of_face[int(c)] = self._tracks[int(r)]

        seen: set[int] = set()
        ids: list[int] = []
        for j in range(len(faces)):
            track = track_of_face.get(j)
            if track is None:
                track = self._new_track(centroids[j], boxes[j], sizes[j], pts)
            else:
                self._observe(track, centroids[j], boxes[j], sizes[j], pts)
            seen.add(track.track_id)
            ids.append(track.track_id)

        self._age(seen)
        return [dataclasses.replace(face, track_id=tid) for face, tid in zip(faces, ids)]

    def _cost(self, centroids: np.ndarray, boxes: np.ndarray, sizes: np.ndarray, pts: float) -> np.ndarray:
        """(tracks, detections) matching cost; `_INFEASIBLE` where a pair is outside every gate.

        The cost adds the centroid distance in box sizes, one minus the IoU, the log size ratio
        and a small penalty per missed frame, so a live track wins over a lost one at equal fit.
        """
        n_tracks, n_faces = len(self._tracks), len(centroids)
        cost = np.full((n_tracks, n_faces), _INFEASIBLE)
        if n_tracks == 0 or n_faces == 0:
            return cost
        for i, t in enumerate(self._tracks):
            offset = t.predicted_offset(pts)
            pred_box = np.concatenate([t.box_center + offset - t.size / 2, t.box_center + offset + t.size / 2])
            iou = box_iou(pred_box[None], boxes)[0]
            dist = np.linalg.norm(centroids - (t.centroid + offset), axis=1)
            if t.lost:
                # It may have turned back while unseen (e.g. slid out of the frame and back in).
                dist = np.minimum(dist, np.linalg.norm(centroids - t.centroid, axis=1))
                iou_still = box_iou(np.concatenate([t.box_center - t.size / 2, t.box_center + t.size / 2])[None], boxes)[0]
                iou = np.maximum(iou, iou_still)
            dist = dist / t.size
            gate = self.max_distance * (1.0 + t.lost / max(self.max_lost_frames, 1))
            feasible = (iou >= self.iou_threshold) | (dist <= gate)
            scale = np.abs(np.log(sizes / t.size))
            pair_cost = dist + (1.0 - iou) + scale + 0.05 * t.lost
            cost[i] = np.where(feasible, pair_cost, _INFEASIBLE)
        return cost

    def _new_track(self, centroid: np.ndarray, box: np.ndarray, size: float, pts: float) -> _Track:
        track = _Track(
            track_id=self._next_id,
            centroid=centroid.copy(),
            box_center=(box[:2] + box[2:]) / 2,
            size=float(size),
            velocity=np.zeros(2),
            pts=pts,
        )
        self._next_id += 1
        self._tracks.append(track)
        return track

    @staticmethod
    def _observe(track: _Track, centroid: np.ndarray, box: np.ndarray, size: float, pts: float) -> None:
        dt = pts - track.pts
        if dt > 0:
            measured = (centroid - track.centroid) / dt
            # Averaging two frames damps landmark jitter; after a gap the net displacement over the
            # gap is the only velocity estimate that is not stale.
            track.velocity = measured if track.lost else 0.5 * (track.velocity + measured)
        track.centroid = centroid.copy()
        track.box_center = (box[:2] + box[2:]) / 2
        track.size = float(size)
        track.pts = pts
        track.lost = 0

    def _age(self, seen: set[int]) -> None:
        """Count a missed frame for every unmatched track; retire those missing too long."""
        kept, self.retired = [], []
        for t in self._tracks:
            if t.track_id not in seen:
                t.lost += 1
            if t.lost > self.max_lost_frames:
                self.retired.append(t.track_id)
            else:
                kept.append(t)
        self._tracks = kept


@dataclass
class _Identity:
    frozen: Optional[np.ndarray] = None  # the code in use once enough frames were averaged
    total: Optional[np.ndarray] = None  # running sum of the codes being collected (float64)
    count: int = 0  # codes in `total`
    frames_since_freeze: int = 0
    dtype: np.dtype = np.dtype(np.float32)  # the callers' dtype, used for every answer


class IdentityCache:
    """One shape code per track: the mean of its first `frames` codes, then frozen.

    With `refresh_every=K`, after K frames on a frozen code the cache collects `frames` fresh codes
    (still answering with the old one meanwhile) and then switches to their mean.

    Typical use, so the identity network runs only while it is needed::

        if cache.needs_code(tid):
            shape = cache.update(tid, mica(crop))
        else:
            shape = cache.get(tid)
    """

    def __init__(self, frames: int = 5, refresh_every: Optional[int] = None):
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        if refresh_every is not None and refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1 or None, got {refresh_every}")
        self.frames = frames
        self.refresh_every = refresh_every
        self._ids: dict[int, _Identity] = {}

    def needs_code(self, track_id: int) -> bool:
        """True when the next frame of this track should bring a freshly computed shape code."""
        state = self._ids.get(track_id)
        return state is None or state.frozen is None or self._refresh_due(state)

    def needs_codes(self, track_ids: list[int]) -> list[bool]:
        """``needs_code`` for several frames' faces at once, in order, as if each were answered (``update`` where
        True, ``get`` where False) before the next is asked: a batch of frames gets the same answers as the
        frames one at a time, so results do not depend on the batch size. Changes nothing."""
        ahead: dict[int, tuple[bool, int, int]] = {}  # track → (frozen, count, frames_since_freeze), as it would be
        answers = []
        for tid in track_ids:
            if tid not in ahead:
                state = self._ids.get(tid)
                ahead[tid] = ((False, 0, 0) if state is None else
                              (state.frozen is not None, state.count, state.frames_since_freeze))
            frozen, count, since = ahead[tid]
            need = not frozen or (self.refresh_every is not None and since >= self.refresh_every)
            answers.append(need)
            if need:
                count += 1
                if count == self.frames:
                    frozen, count, since = True, 0, 0
            elif frozen:
                since += 1
            ahead[tid] = (frozen, count, since)
        return answers

    def update(self, track_id: int, shapecode: np.ndarray) -> np.ndarray:
        """Feed this frame's shape code ((D,)); returns the code to use for this frame ((D,))."""
        code = np.asarray(shapecode)
        state = self._ids.setdefault(track_id, _Identity())
        known = state.frozen if state.frozen is not None else state.total
        if known is not None and known.shape != code.shape:
            raise ValueError(f"track {track_id}: shape code {code.shape} differs from the cached {known.shape}")
        if state.frozen is not None and not self._refresh_due(state):
            state.frames_since_freeze += 1
            return state.frozen
        state.total = code.astype(np.float64) if state.count == 0 else state.total + code
        state.count += 1
        state.dtype = code.dtype
        mean = (state.total / state.count).astype(code.dtype)
        if state.count == self.frames:
            state.frozen, state.total, state.count, state.frames_since_freeze = mean, None, 0, 0
            return mean
        # While refreshing, keep the old identity so the face does not drift frame by frame.
        return state.frozen if state.frozen is not None else mean

    def get(self, track_id: int) -> Optional[np.ndarray]:
        """The code to use for this frame without a new measurement; None for an unknown track."""
        state = self._ids.get(track_id)
        if state is None:
            return None
        if state.frozen is None:
            return (state.total / state.count).astype(state.dtype)
        state.frames_since_freeze += 1
        return state.frozen

    def forget(self, track_id: int) -> None:
        """Drop a retired track (no error if unknown)."""
        self._ids.pop(track_id, None)

    def _refresh_due(self, state: _Identity) -> bool:
        return self.refresh_every is not None and state.frames_since_freeze >= self.refresh_every
