"""Temporal smoothing of per-frame face parameters.

Live input uses the One-Euro filter (Casiez, Roussel & Vogel, CHI 2012): a first-order low-pass whose
cut-off rises with the signal's speed, so a still face stops jittering while a fast move is followed
with little lag. Time comes from each frame's pts, so irregular frame intervals (dropped frames, a
variable-rate camera) are handled. Files use a zero-phase smoother instead (`smooth_sequence`):
Gaussian-weighted local quadratic regression over time (Savitzky–Golay generalised to irregular
timestamps), which has no lag at all because it sees the future; its weights also drop samples
that differ from the one being fitted by much more than the sequence's noise (a bilateral filter
in time), so a sudden move is neither smeared nor overshot.

What is smoothed, per parameter group (`KEY_GROUPS`):
- pose (`globalpose`, `jawpose`, DECA's `posecode`, …): axis-angle rotations, filtered as unit
  quaternions (hemisphere-aligned, slerp blending) so the result is always a valid rotation and a
  turn through the axis-angle wrap-around does not spin the head the long way round;
- cam (`cam` = [s, tx, ty]): filtered as the on-screen motion it causes, [r·s, s·tx, s·ty] with r a
  face radius in FLAME units, so a single `beta` suits both the scale and the translation;
- expression (`expcode`, `blendshapes`) and landmarks (`landmarks*`): element-wise.
Identity codes (`shapecode`, …) pass through untouched: `realtime.tracks.IdentityCache` fixes them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy import sparse

from .errors import UserError

# FLAME's head is about 0.2 units across, so the orthographic scale `s` moves the face outline by
# about this many crop units per unit of s, per unit of (s·tx): it puts s and t on one scale.
FACE_RADIUS = 0.1


@dataclass(frozen=True)
class GroupParams:
    """Tuning of one parameter group.

    min_cutoff: low-pass cut-off in Hz when the signal is still (lower = less jitter, more lag).
    beta: cut-off increase in Hz per unit/s of speed (higher = less lag on fast moves). Units are
        the group's: radians (pose), crop units (cam), code units (expression), pixels (landmarks).
    d_cutoff: cut-off in Hz of the speed estimate.
    window: standard deviation in seconds of the Gaussian time weights of `smooth_sequence`.
    """

    min_cutoff: float
    beta: float
    d_cutoff: float = 1.0
    window: float = 0.05

    def __post_init__(self):
        for name in ("min_cutoff", "d_cutoff", "window"):
            if not getattr(self, name) > 0:
                raise UserError(f"smoothing parameter {name} must be > 0 (got {getattr(self, name)!r})")
        if not self.beta >= 0:
            raise UserError(f"smoothing parameter beta must be >= 0 (got {self.beta!r})")


# Tuned so that, at 30 fps, white noise of the stated size loses >= 3x of its frame-to-frame jitter
# while a step of the stated size reaches half height within one frame (tests/test_smoothing.py):
#   pose: noise 0.01 rad per component (0.6°), steps >= 0.2 rad;  cam: noise 0.005 crop units (0.3 px
#   of a 224 crop), steps >= 0.1;  expression: noise 0.03, steps >= 0.5;  landmarks: noise 0.5 px,
#   steps >= 10 px. Each beta sits mid-way (geometrically) in the range that meets both.
# The file windows (σ of the time weights) cut the same noise >= 3x: head pose and camera change
# slowly (σ = 2 frames; 4 Hz keeps 61 %), expression and landmarks carry speech (σ = 1.5 frames;
# 4 Hz keeps 85 %).
PRESETS: dict[str, dict[str, Optional[GroupParams]]] = {
    "default": {
        "pose": GroupParams(min_cutoff=0.7, beta=2.2, d_cutoff=1.0, window=0.067),
        "cam": GroupParams(min_cutoff=0.7, beta=13.0, d_cutoff=1.0, window=0.067),
        "expression": GroupParams(min_cutoff=0.7, beta=2.4, d_cutoff=1.0, window=0.05),
        "landmarks": GroupParams(min_cutoff=0.7, beta=0.13, d_cutoff=1.0, window=0.05),
    },
    "off": {"pose": None, "cam": None, "expression": None, "landmarks": None},
}

# Which group a code belongs to; keys not listed (and not starting with "landmarks") pass through.
KEY_GROUPS: dict[str, str] = {
    "globalpose": "pose",
    "jawpose": "pose",
    "neckpose": "pose",
    "eyepose": "pose",
    "posecode": "pose",
    "cam": "cam",
    "expcode": "expression",
    "blendshapes": "expression",
}

_ROTATION_GROUPS = ("pose",)


def group_of(key: str) -> Optional[str]:
    """The parameter group of a code name, or None when it is not smoothed."""
    if key.startswith("landmarks"):
        return "landmarks"
    return KEY_GROUPS.get(key)


# ----------------------------------------------------------------------------- metrics


def jitter(sequence: np.ndarray) -> float:
    """Mean frame-to-frame displacement: (T, N, D) → mean over t, n of ‖x[t, n] − x[t−1, n]‖."""
    x = np.asarray(sequence, dtype=np.float64)
    if x.ndim != 3 or x.shape[0] < 2:
        raise ValueError(f"jitter needs a (T >= 2, N, D) sequence, got {x.shape}")
    return float(np.linalg.norm(np.diff(x, axis=0), axis=-1).mean())


def _half_way_frame(sequence: np.ndarray, start: np.ndarray, end: np.ndarray) -> float:
    progress = (sequence - start).reshape(len(sequence), -1) @ (end - start).ravel() / np.sum((end - start) ** 2)
    reached = np.nonzero(progress >= 0.5)[0]
    return float(reached[0]) if reached.size else float("inf")


def step_lag(raw: np.ndarray, filtered: np.ndarray) -> float:
    """Frames by which `filtered` reaches half of a step later than `raw` does.

    The step goes from ``raw[0]`` to ``raw[-1]``; "half" is measured along that direction.

    Args:
        raw: (T, ...) the unfiltered step signal.
        filtered: (T, ...) the same frames after filtering.

    Returns:
        The lag in frames (0 = same frame); inf if the filtered signal never gets half way.
    """
    raw = np.asarray(raw, dtype=np.float64)
    filtered = np.asarray(filtered, dtype=np.float64)
    if raw.shape != filtered.shape:
        raise ValueError(f"raw {raw.shape} and filtered {filtered.shape} differ in shape")
    start, end = raw[0], raw[-1]
    if not np.any(start != end):
        raise ValueError("step_lag needs a signal whose first and last frames differ")
    return _half_way_frame(filtered, start, end) - _half_way_frame(raw, start, end)


# ----------------------------------------------------------------------------- rotations


def axis_angle_to_quaternion(rotvec: np.ndarray) -> np.ndarray:
    """(K, 3) axis-angle → (K, 4) unit quaternions [w, x, y, z]."""
    rotvec = np.asarray(rotvec, dtype=np.float64)
    angle = np.linalg.norm(rotvec, axis=-1, keepdims=True)
    # sin(θ/2)/θ, with its Taylor series near 0 where the division is unstable.
    small = angle < 1e-6
    safe = np.where(small, 1.0, angle)
    factor = np.where(small, 0.5 - angle**2 / 48.0, np.sin(safe / 2.0) / safe)
    return np.concatenate([np.cos(angle / 2.0), rotvec * factor], axis=-1)


def quaternion_to_axis_angle(quat: np.ndarray) -> np.ndarray:
    """(K, 4) quaternions [w, x, y, z] (any norm) → (K, 3) axis-angle with angle in [0, π]."""
    quat = np.asarray(quat, dtype=np.float64)
    quat = quat / np.linalg.norm(quat, axis=-1, keepdims=True)
    quat = np.where(quat[..., :1] < 0, -quat, quat)  # w >= 0: the shorter of the two equal rotations
    w, xyz = quat[..., :1], quat[..., 1:]
    s = np.linalg.norm(xyz, axis=-1, keepdims=True)
    angle = 2.0 * np.arctan2(s, w)
    small = s < 1e-9
    factor = np.where(small, 2.0 / np.maximum(w, 1e-12), angle / np.where(small, 1.0, s))
    return xyz * factor


def align_hemisphere(quat: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Flip each quaternion of (K, 4) to the sign closer to `reference` (K, 4) (q and −q are the same rotation)."""
    dot = np.sum(quat * reference, axis=-1, keepdims=True)
    return np.where(dot < 0, -quat, quat)


def slerp(q0: np.ndarray, q1: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Spherical interpolation of unit quaternions (K, 4), (K, 4) at fractions t (K,) → (K, 4).

    Both inputs must be in the same hemisphere (`align_hemisphere`).
    """
    t = np.asarray(t, dtype=np.float64)[..., None]
    dot = np.clip(np.sum(q0 * q1, axis=-1, keepdims=True), -1.0, 1.0)
    theta = np.arccos(dot)
    sin_theta = np.sin(theta)
    near = sin_theta < 1e-6  # nearly equal: linear blend, then renormalise
    safe = np.where(near, 1.0, sin_theta)
    w0 = np.where(near, 1.0 - t, np.sin((1.0 - t) * theta) / safe)
    w1 = np.where(near, t, np.sin(t * theta) / safe)
    q = w0 * q0 + w1 * q1
    return q / np.linalg.norm(q, axis=-1, keepdims=True)


def rotation_angle_between(q0: np.ndarray, q1: np.ndarray) -> np.ndarray:
    """Angle in radians of the rotation taking q0 to q1: (K, 4), (K, 4) unit quaternions → (K,)."""
    dot = np.abs(np.sum(q0 * q1, axis=-1))
    return 2.0 * np.arccos(np.clip(dot, 0.0, 1.0))


# ----------------------------------------------------------------------------- camera


def cam_to_screen(cam: np.ndarray) -> np.ndarray:
    """(…, 3) [s, tx, ty] → (…, 3) [r·s, s·tx, s·ty]: face-outline size and centre in crop units."""
    cam = np.asarray(cam, dtype=np.float64)
    s = cam[..., :1]
    return np.concatenate([FACE_RADIUS * s, s * cam[..., 1:]], axis=-1)


def screen_to_cam(screen: np.ndarray) -> np.ndarray:
    """Inverse of `cam_to_screen` (s must not be 0)."""
    screen = np.asarray(screen, dtype=np.float64)
    s = screen[..., :1] / FACE_RADIUS
    return np.concatenate([s, screen[..., 1:] / s], axis=-1)


# ----------------------------------------------------------------------------- causal filters


def smoothing_factor(cutoff: np.ndarray, dt: float) -> np.ndarray:
    """Exponential-smoothing weight of the new sample for a first-order low-pass at `cutoff` Hz."""
    r = 2.0 * np.pi * np.asarray(cutoff, dtype=np.float64) * dt
    return r / (r + 1.0)


class OneEuroFilter:
    """One-Euro filter over an array of independent values (any shape, fixed per filter)."""

    def __init__(self, params: GroupParams):
        self.params = params
        self._value: Optional[np.ndarray] = None  # last output (float64)
        self._speed: Optional[np.ndarray] = None  # low-passed derivative, units/s
        self._pts = 0.0

    def __call__(self, x: np.ndarray, pts: float) -> np.ndarray:
        """Filter one sample taken at time `pts` (s); returns the filtered sample (float64, x's shape)."""
        x = np.asarray(x, dtype=np.float64)
        dt = pts - self._pts
        if self._value is None or self._value.shape != x.shape or not dt > 0:
            # First sample, a new layout, or time going backwards (a seek): start over from here.
            self._value, self._speed, self._pts = x.copy(), np.zeros_like(x), pts
            return x.copy()
        p = self.params
        speed = (x - self._value) / dt
        self._speed = self._speed + smoothing_factor(p.d_cutoff, dt) * (speed - self._speed)
        alpha = smoothing_factor(p.min_cutoff + p.beta * np.abs(self._speed), dt)
        self._value = self._value + alpha * (x - self._value)
        self._pts = pts
        return self._value.copy()


class RotationOneEuroFilter:
    """One-Euro filter over K axis-angle rotations ((K, 3)), blended on the quaternion sphere.

    The speed is the angular speed (rad/s) of each rotation; the low-pass step is a slerp from the
    previous output towards the new sample, so outputs are always proper rotations.
    """

    def __init__(self, params: GroupParams):
        self.params = params
        self._quat: Optional[np.ndarray] = None  # (K, 4) last output
        self._speed: Optional[np.ndarray] = None  # (K,) rad/s
        self._pts = 0.0

    def __call__(self, rotvec: np.ndarray, pts: float) -> np.ndarray:
        """(K, 3) axis-angle sample at time `pts` → (K, 3) filtered axis-angle (float64)."""
        rotvec = np.asarray(rotvec, dtype=np.float64)
        q = axis_angle_to_quaternion(rotvec)
        dt = pts - self._pts
        if self._quat is None or self._quat.shape != q.shape or not dt > 0:
            self._quat, self._speed, self._pts = q, np.zeros(len(q)), pts
            return rotvec.copy()
        p = self.params
        q = align_hemisphere(q, self._quat)
        speed = rotation_angle_between(self._quat, q) / dt
        self._speed = self._speed + smoothing_factor(p.d_cutoff, dt) * (speed - self._speed)
        alpha = smoothing_factor(p.min_cutoff + p.beta * self._speed, dt)
        self._quat = slerp(self._quat, q, alpha)
        self._pts = pts
        return quaternion_to_axis_angle(self._quat)


class CamOneEuroFilter:
    """One-Euro filter of weak-perspective cameras [s, tx, ty] in screen terms (`cam_to_screen`)."""

    def __init__(self, params: GroupParams):
        self._filter = OneEuroFilter(params)

    def __call__(self, cam: np.ndarray, pts: float) -> np.ndarray:
        """(3,) camera at time `pts` → (3,) filtered camera (float64)."""
        cam = np.asarray(cam, dtype=np.float64)
        screen = self._filter(cam_to_screen(cam), pts)
        if np.abs(screen[..., 0]).min() < 1e-9:  # a degenerate scale has no inverse: keep the sample
            return cam.copy()
        return screen_to_cam(screen)


# ----------------------------------------------------------------------------- zero-phase (files)


# Step-preserving weights: a sample counts in another's fit only while the two differ by about the
# sequence's own noise. Pure noise differs by √2 σ between two frames, which keeps 0.9 of its
# weight at 3 σ; a step or a fast move many σ high gets none, so it stays sharp with no overshoot.
RANGE_SIGMAS = 3.0


def noise_level(values: np.ndarray) -> float:
    """Robust noise σ of a (T, N) sequence: per element, the median absolute second difference
    scaled to σ for white noise (Δ²x has σ√6; MAD = 0.6745 σ), then the RMS over elements.

    Second differences cancel steady motion and the median ignores the few frames of a step, so
    this is the frame-to-frame noise even on moving footage. Returns inf with fewer than 3 frames.
    """
    x = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
    if len(x) < 3:
        return float("inf")
    sigma = np.median(np.abs(np.diff(x, n=2, axis=0)), axis=0) / (0.6745 * np.sqrt(6.0))
    return float(np.sqrt(np.mean(sigma**2)))


def increasing_times(pts) -> np.ndarray:
    """(T,) times with every step that does not go forward (a repeated or backwards timestamp) replaced by the
    median forward step, so each sample keeps its place in time order; strictly increasing input is unchanged."""
    t = np.asarray(pts, dtype=np.float64)
    steps = np.diff(t)
    if t.size < 2 or np.all(steps > 0):
        return t
    forward = steps[steps > 0]
    typical = float(np.median(forward)) if forward.size else 1.0 / 30.0
    return t[0] + np.concatenate([[0.0], np.cumsum(np.where(steps > 0, steps, typical))])


def local_regression_matrix(
    pts: Sequence[float],
    window: float,
    degree: int = 2,
    features: Optional[np.ndarray] = None,
    rows: Optional[Sequence[int]] = None,
) -> sparse.csr_matrix:
    """Linear smoother of weighted local polynomial regression over time.

    Row i holds the weights that give the fitted value at ``pts[i]`` from the samples within three
    standard deviations: a Savitzky–Golay filter for even spacing, valid for any spacing. Symmetric
    time weights make it zero-phase; the local polynomial keeps ramps and peaks where a plain
    average would flatten them, and stays unbiased at the ends of the sequence.

    With ``features``, each time weight is also multiplied by exp(−½ (d / r)²), d the RMS difference
    between the two samples' features and r = RANGE_SIGMAS · √2 · their noise level (a bilateral
    filter in time): flat stretches are averaged over the whole window while steps keep their edge.

    Args:
        pts: (T,) increasing sample times in seconds.
        window: standard deviation of the Gaussian time weights, seconds.
        degree: polynomial degree (lowered locally where too few samples carry weight).
        features: optional (T, F) values the samples are compared by (what is being smoothed).
        rows: the samples to fit (default all): the look-ahead stage needs only its centre frame.

    Returns:
        (R, T) matrix H, R = len(rows) (default T); smoothed = H @ samples. Sparse for the whole
        sequence; a dense array when `rows` is given (the look-ahead's one row: building a sparse
        matrix would cost more than the fit).
    """
    t = np.asarray(pts, dtype=np.float64)
    n = len(t)
    if n and np.any(np.diff(t) <= 0):
        raise ValueError("smooth_sequence needs strictly increasing pts")
    dense = rows is not None
    rows = range(n) if rows is None else list(rows)
    if not n or not len(rows):
        return np.zeros((len(rows), n)) if dense else sparse.csr_matrix((len(rows), n))
    if features is not None:
        features = np.asarray(features, dtype=np.float64).reshape(n, -1)
        range_scale = RANGE_SIGMAS * np.sqrt(2.0) * noise_level(features)
    lo = np.searchsorted(t, t - 3.0 * window, side="left")
    hi = np.searchsorted(t, t + 3.0 * window, side="right")
    out = np.zeros((len(rows), n)) if dense else None
    row_ids, cols, vals = [], [], []
    for r, i in enumerate(rows):
        tau = (t[lo[i] : hi[i]] - t[i]) / window  # dimensionless, for a well-conditioned fit
        w = np.exp(-0.5 * tau**2)
        if features is not None and np.isfinite(range_scale):
            d = np.sqrt(np.mean((features[lo[i] : hi[i]] - features[i]) ** 2, axis=1))
            # A noise-free sequence keeps only identical samples: it comes back unchanged.
            w = w * (np.exp(-0.5 * (d / range_scale) ** 2) if range_scale > 0 else d == 0)
        deg = min(degree, int(np.count_nonzero(w > 1e-6)) - 1)
        basis = np.vander(tau, deg + 1, increasing=True)  # (K, deg+1): 1, τ, τ²
        # Intercept of the weighted least-squares fit, e0ᵀ (BᵀWB)⁻¹ BᵀW, via the pseudo-inverse
        # of W^½B so that a fit left with few weighted samples stays well-posed.
        root = np.sqrt(w)
        coef = np.linalg.pinv(basis * root[:, None])[0] * root
        if dense:
            out[r, lo[i] : hi[i]] = coef
            continue
        row_ids.append(np.full(len(tau), r))
        cols.append(np.arange(lo[i], hi[i]))
        vals.append(coef)
    if dense:
        return out
    matrix = (np.concatenate(vals), (np.concatenate(row_ids), np.concatenate(cols)))
    return sparse.csr_matrix(matrix, shape=(len(rows), n))


def _aligned_quaternions(rotvecs: np.ndarray) -> np.ndarray:
    """(T, K, 3) axis-angle → (T, K, 4) unit quaternions, each on its predecessor's hemisphere."""
    q = axis_angle_to_quaternion(rotvecs.reshape(-1, 3)).reshape(*rotvecs.shape[:-1], 4)
    for i in range(1, len(q)):
        q[i] = align_hemisphere(q[i], q[i - 1])
    return q


def _cam_from_screen(screen: np.ndarray, cams: np.ndarray) -> np.ndarray:
    """Smoothed screen terms → (T, 3) cameras; a degenerate (zero-scale) row keeps its input camera."""
    degenerate = np.abs(screen[:, :1]) < 1e-9
    return np.where(degenerate, cams, screen_to_cam(np.where(degenerate, 1.0, screen)))


# ----------------------------------------------------------------------------- the smoother


class ParamSmoother:
    """Smooths each track's codes over time, with tuned settings per parameter group.

    Args:
        preset: "default" (tuned One-Euro) or "off" (every code passes through unchanged).
        overrides: per group, fields of `GroupParams` to change, e.g. ``{"pose": {"beta": 4.0}}``;
            ``{"landmarks": None}`` switches a group off.
    """

    def __init__(self, preset: str = "default", overrides: Optional[Mapping[str, Optional[Mapping[str, float]]]] = None):
        if preset not in PRESETS:
            raise UserError(f"unknown smoothing preset {preset!r}: use one of {', '.join(PRESETS)}")
        groups = dict(PRESETS[preset])
        for group, changes in (overrides or {}).items():
            if group not in groups:
                raise UserError(f"unknown smoothing group {group!r}: use one of {', '.join(groups)}")
            if changes is None:
                groups[group] = None
                continue
            if groups[group] is None:
                raise UserError(f"smoothing group {group!r} is off in preset {preset!r}; use preset 'default' to tune it")
            fields = {f.name for f in dataclasses.fields(GroupParams)}
            unknown = set(changes) - fields
            if unknown:
                raise UserError(
                    f"unknown smoothing parameter(s) {', '.join(sorted(unknown))} for {group!r}: "
                    f"use {', '.join(sorted(fields))}"
                )
            groups[group] = dataclasses.replace(groups[group], **{k: float(v) for k, v in changes.items()})
        self.preset = preset
        self.groups: dict[str, Optional[GroupParams]] = groups
        self._filters: dict[tuple[int, str], OneEuroFilter | RotationOneEuroFilter | CamOneEuroFilter] = {}

    def _params(self, key: str) -> Optional[GroupParams]:
        group = group_of(key)
        return None if group is None else self.groups[group]

    def smooth(self, track_id: int, codes: Mapping[str, np.ndarray], pts: float) -> dict[str, np.ndarray]:
        """Causally filter one frame's codes of one track.

        Args:
            track_id: the face's track (each track has its own filter state).
            codes: name → array (no batch dimension); pose arrays hold 3·k axis-angle values.
                Arrays with non-finite values pass through and leave the filter state as it was.
            pts: the frame time in seconds; a time at or before the previous one restarts the filters.

        Returns:
            A new dict with the same keys; smoothed arrays keep the input's shape and dtype, the
            others are the input objects themselves.
        """
        out: dict[str, np.ndarray] = {}
        for key, value in codes.items():
            params = self._params(key)
            if params is None:
                out[key] = value
                continue
            value = np.asarray(value)
            if not np.all(np.isfinite(value)):  # a failed estimate must not poison the filter state
                out[key] = value
                continue
            f = self._filters.get((track_id, key))
            if f is None:
                f = self._filters[(track_id, key)] = self._make_filter(key, params)
            if isinstance(f, RotationOneEuroFilter):
                filtered = f(value.reshape(-1, 3), pts)
            else:
                filtered = f(value, pts)
            out[key] = filtered.reshape(value.shape).astype(value.dtype, copy=False)
        return out

    @staticmethod
    def _make_filter(key: str, params: GroupParams):
        group = group_of(key)
        if group in _ROTATION_GROUPS:
            return RotationOneEuroFilter(params)
        if group == "cam":
            return CamOneEuroFilter(params)
        return OneEuroFilter(params)

    def reset(self, track_id: Optional[int] = None) -> None:
        """Forget the filter state of one track (a retired or re-found face), or of all tracks."""
        self._filters = {k: f for k, f in self._filters.items() if track_id is not None and k[0] != track_id}

    def smooth_sequence(
        self,
        codes_per_frame: Sequence[Mapping[str, np.ndarray]],
        pts: Sequence[float],
        window: Optional[float] = None,
        at: Optional[int] = None,
    ) -> list[dict[str, np.ndarray]]:
        """Zero-phase smoothing of one track's whole sequence (file processing).

        Args:
            codes_per_frame: (T) dicts of the track's codes, in time order; a key is smoothed over
                the frames that have it with finite values (the others pass through).
            pts: (T,) times in seconds (gaps are fine); repeated or backwards ones, as damaged files have, are
                replaced by ``increasing_times``.
            window: Gaussian standard deviation in seconds for every group; None uses each group's.
            at: smooth only this frame (the look-ahead stage's centre), fitted on all T; the others
                come back as given.

        Returns:
            (T) new dicts with the same keys, shapes and dtypes.
        """
        if len(codes_per_frame) != len(pts):
            raise ValueError(f"{len(codes_per_frame)} frames of codes but {len(pts)} pts")
        if window is not None and not window > 0:
            raise ValueError(f"window must be > 0 seconds, got {window}")
        pts = increasing_times(pts)
        out = [dict(codes) for codes in codes_per_frame]
        keys = dict.fromkeys(k for codes in codes_per_frame for k in codes)
        for key in keys:
            params = self._params(key)
            if params is None:
                continue
            frames = [i for i, c in enumerate(codes_per_frame) if key in c and np.all(np.isfinite(c[key]))]
            if not frames:
                continue
            wanted = frames if at is None else [i for i in frames if i == at]
            if not wanted:
                continue
            values = np.stack([np.asarray(codes_per_frame[i][key]) for i in frames])
            times = [pts[i] for i in frames]
            rows = [frames.index(i) for i in wanted] if at is not None else None
            smoothed = self._smooth_stack(key, values.astype(np.float64), times, window or params.window, rows)
            for row, i in enumerate(wanted):
                out[i][key] = smoothed[row].astype(values.dtype, copy=False)
        return out

    @staticmethod
    def _smooth_stack(key: str, values: np.ndarray, pts: Sequence[float], window: float,
                      rows: Optional[Sequence[int]] = None) -> np.ndarray:
        """(T, ...) one key's values over time → (R, ...) smoothed at `rows` (default all), in the group's own terms.

        Rotations are smoothed as sign-continuous quaternions (renormalised after), cameras as the
        screen motion they cause, the rest element-wise; the step-preserving weights compare
        samples in those same terms.
        """
        group = group_of(key)
        if group in _ROTATION_GROUPS:
            rotvecs = values.reshape(len(values), -1, 3)
            q = _aligned_quaternions(rotvecs)
            flat = q.reshape(len(q), -1)
            smoothed = local_regression_matrix(pts, window, features=flat, rows=rows) @ flat
            return quaternion_to_axis_angle(smoothed.reshape(-1, 4)).reshape(-1, *values.shape[1:])
        if group == "cam":
            cams = values.reshape(len(values), 3)
            screen = cam_to_screen(cams)
            smoothed = local_regression_matrix(pts, window, features=screen, rows=rows) @ screen
            kept = cams if rows is None else cams[list(rows)]
            return _cam_from_screen(smoothed, kept).reshape(-1, *values.shape[1:])
        flat = values.reshape(len(values), -1)
        return (local_regression_matrix(pts, window, features=flat, rows=rows) @ flat).reshape(-1, *values.shape[1:])
