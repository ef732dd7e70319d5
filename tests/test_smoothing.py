"""Temporal smoothing: jitter goes down, steps are followed within a frame, rotations stay rotations."""

from __future__ import annotations

import numpy as np
import pytest

from realtime.errors import UserError
from realtime.smoothing import (
    ParamSmoother,
    axis_angle_to_quaternion,
    cam_to_screen,
    group_of,
    jitter,
    local_regression_matrix,
    noise_level,
    quaternion_to_axis_angle,
    rotation_angle_between,
    screen_to_cam,
    step_lag,
)

FPS = 30.0
STATIC, STEP_AT, STEP_LEN = 150, 30, 60

# Per code: the noise and the step each preset group is tuned for (see smoothing.PRESETS).
CASES = {
    "globalpose": dict(noise=0.01, step=np.array([0.0, 0.2, 0.0]), base=np.array([0.1, -0.2, 0.05])),
    "jawpose": dict(noise=0.01, step=np.array([0.2, 0.0, 0.0]), base=np.array([0.05, 0.0, 0.0])),
    "cam": dict(noise=0.005, step=np.array([0.0, 0.1, 0.0]), base=np.array([8.0, 0.01, 0.02])),
    "expcode": dict(noise=0.03, step=np.full(100, 0.5), base=np.zeros(100)),
    "blendshapes": dict(noise=0.03, step=np.full(52, 0.5), base=np.full(52, 0.2)),
    "landmarks": dict(noise=0.5, step=np.tile([10.0, 0.0], (478, 1)), base=np.full((478, 2), 100.0)),
}


def clean_value(key: str, t: int, step_at: int | None) -> np.ndarray:
    """The noiseless signal: base, plus the step from `step_at` on (cam steps in screen terms)."""
    c = CASES[key]
    on = step_at is not None and t >= step_at
    if key == "cam":
        return screen_to_cam(cam_to_screen(c["base"]) + (c["step"] if on else 0))
    return c["base"] + (c["step"] if on else 0)


def noisy_value(key: str, t: int, step_at: int | None, rng) -> np.ndarray:
    c = CASES[key]
    clean = clean_value(key, t, step_at)
    if key == "cam":  # noise on what the viewer sees
        return screen_to_cam(cam_to_screen(clean) + rng.normal(0, c["noise"], 3))
    return (clean + rng.normal(0, c["noise"], clean.shape)).astype(np.float32 if key == "expcode" else np.float64)


def as_points(key: str, values) -> np.ndarray:
    """(T, ...) values → (T, N, D) points for jitter/step_lag (rotations and cams as 3-vectors)."""
    a = np.asarray(values, dtype=np.float64)
    if key == "cam":
        a = cam_to_screen(a)
    d = {"landmarks": 2, "globalpose": 3, "jawpose": 3, "cam": 3}.get(key, 1)
    return a.reshape(len(a), -1, d)


def causal_run(key: str, n: int, step_at: int | None, seed: int, smoother=None):
    rng = np.random.default_rng(seed)
    smoother = smoother or ParamSmoother()
    raw = [noisy_value(key, t, step_at, rng) for t in range(n)]
    out = [smoother.smooth(0, {key: x}, t / FPS)[key] for t, x in enumerate(raw)]
    return raw, out


def test_metrics_on_known_signals():
    seq = np.zeros((4, 2, 2))
    seq[:, 0, 0] = [0, 3, 3, 3]  # one point moves 3 once, the other never
    assert jitter(seq) == pytest.approx(3 / 6)
    raw = np.array([0, 0, 1, 1, 1, 1], float)
    assert step_lag(raw, raw) == 0
    assert step_lag(raw, np.array([0, 0, 0.2, 0.6, 1, 1])) == 1
    assert step_lag(raw, np.array([0, 0, 0.1, 0.2, 0.4, 0.45])) == float("inf")


@pytest.mark.parametrize("key", list(CASES))
def test_default_preset_cuts_static_jitter_at_least_3x(key):
    for seed in range(3):
        raw, out = causal_run(key, STATIC, None, seed)
        ratio = jitter(as_points(key, raw[20:])) / jitter(as_points(key, out[20:]))
        assert ratio >= 3.0, f"{key}: jitter only reduced {ratio:.2f}x"


@pytest.mark.parametrize("key", list(CASES))
def test_causal_filter_lags_a_step_by_at_most_one_frame(key):
    for seed in range(3):
        _, out = causal_run(key, STEP_LEN, STEP_AT, seed)
        clean = [clean_value(key, t, STEP_AT) for t in range(STEP_LEN)]
        lag = step_lag(as_points(key, clean), as_points(key, out))
        assert 0 <= lag <= 1, f"{key}: step lag {lag} frames"


def test_off_preset_is_bit_identical():
    smoother = ParamSmoother("off")
    rng = np.random.default_rng(0)
    frames = [{k: noisy_value(k, t, None, rng) for k in CASES} for t in range(5)]
    for t, codes in enumerate(frames):
        out = smoother.smooth(3, codes, t / FPS)
        assert out.keys() == codes.keys()
        assert all(out[k] is codes[k] for k in codes)
    seq = smoother.smooth_sequence(frames, [t / FPS for t in range(5)])
    assert all(seq[t][k] is frames[t][k] for t in range(5) for k in CASES)


def test_identity_codes_pass_through_and_dtypes_are_kept():
    smoother = ParamSmoother()
    shape = np.arange(300, dtype=np.float32)
    for t in range(3):
        exp = np.full(100, float(t), np.float32)
        out = smoother.smooth(0, {"shapecode": shape, "expcode": exp}, t / FPS)
        assert out["shapecode"] is shape
        assert out["expcode"].dtype == np.float32 and out["expcode"].shape == (100,)
    assert 0 < out["expcode"][0] < 2  # filtered: behind the raw value 2


def test_tracks_are_filtered_independently_and_reset_restarts():
    smoother = ParamSmoother()
    smoother.smooth(1, {"expcode": np.zeros(3)}, 0.0)
    smoother.smooth(2, {"expcode": np.full(3, 5.0)}, 0.0)
    a = smoother.smooth(1, {"expcode": np.ones(3)}, 1 / FPS)["expcode"]
    b = smoother.smooth(2, {"expcode": np.full(3, 5.0)}, 1 / FPS)["expcode"]
    assert np.all((a > 0) & (a < 1)) and np.allclose(b, 5.0)
    smoother.reset(1)
    np.testing.assert_array_equal(smoother.smooth(1, {"expcode": np.full(3, 9.0)}, 2 / FPS)["expcode"], 9.0)
    assert np.all(smoother.smooth(2, {"expcode": np.full(3, 9.0)}, 2 / FPS)["expcode"] < 9.0)  # untouched


def test_irregular_timesteps():
    smoother = ParamSmoother()
    # Dropped frames: a long gap lets the filter move much further in one update than a short one.
    smoother.smooth(0, {"landmarks": np.zeros((1, 2))}, 0.0)
    short = smoother.smooth(0, {"landmarks": np.ones((1, 2))}, 1 / FPS)["landmarks"][0, 0]
    smoother.reset(0)
    smoother.smooth(0, {"landmarks": np.zeros((1, 2))}, 0.0)
    long = smoother.smooth(0, {"landmarks": np.ones((1, 2))}, 2.0)["landmarks"][0, 0]
    assert short < 0.3 and long > 0.85
    # A constant signal stays exactly constant whatever the spacing; pts going backwards restarts.
    for pts in (0.0, 0.01, 0.5, 0.51, 3.0):
        out = ParamSmoother().smooth(0, {"cam": np.array([7.0, 0.1, -0.2])}, pts)
    np.testing.assert_allclose(out["cam"], [7.0, 0.1, -0.2])
    smoother.smooth(0, {"expcode": np.zeros(2)}, 5.0)
    np.testing.assert_array_equal(smoother.smooth(0, {"expcode": np.ones(2)}, 1.0)["expcode"], 1.0)


def test_rotations_are_filtered_on_the_sphere_across_the_axis_angle_wrap():
    # A head turning slowly through 180° about y: axis-angle jumps from (0, ~π, 0) to (0, ~−π, 0).
    angles = np.deg2rad(np.linspace(170, 190, 21))
    rotvecs = [quaternion_to_axis_angle(axis_angle_to_quaternion(np.array([[0.0, a, 0.0]])))[0] for a in angles]
    assert rotvecs[0][1] > 2.9 and rotvecs[-1][1] < -2.9  # the representation really wraps
    smoother = ParamSmoother()
    out = [smoother.smooth(0, {"globalpose": r}, t / FPS)["globalpose"] for t, r in enumerate(rotvecs)]
    q_in = axis_angle_to_quaternion(np.array(rotvecs))
    q_out = axis_angle_to_quaternion(np.array(out))
    err = np.rad2deg(rotation_angle_between(q_in, q_out))
    assert err.max() < 3.0, f"filtered pose strays {err.max():.1f}° from the input"
    # A component-wise filter would have passed near the identity (a 180° error) at the wrap.
    assert np.all(np.linalg.norm(np.array(out), axis=1) > 2.9)


def test_posecode_holds_two_rotations():
    smoother = ParamSmoother()
    pose = np.array([0.1, 0.2, 0.3, 0.2, 0.0, 0.0], np.float32)
    for t in range(4):
        out = smoother.smooth(0, {"posecode": pose}, t / FPS)["posecode"]
    assert out.shape == (6,) and out.dtype == np.float32
    np.testing.assert_allclose(out, pose, atol=1e-6)


def test_cam_screen_transform_round_trips():
    cam = np.array([[8.0, 0.01, -0.03], [-2.0, 0.5, 0.1]])
    np.testing.assert_allclose(screen_to_cam(cam_to_screen(cam)), cam, rtol=1e-12)


def test_overrides_and_bad_settings():
    assert ParamSmoother(overrides={"pose": {"beta": 4.0}}).groups["pose"].beta == 4.0
    smoother = ParamSmoother(overrides={"landmarks": None})
    lms = np.ones((478, 2))
    smoother.smooth(0, {"landmarks": np.zeros((478, 2))}, 0.0)
    assert smoother.smooth(0, {"landmarks": lms}, 0.1)["landmarks"] is lms
    with pytest.raises(UserError, match="unknown smoothing preset 'fast'"):
        ParamSmoother("fast")
    with pytest.raises(UserError, match="unknown smoothing group 'eyes'"):
        ParamSmoother(overrides={"eyes": {"beta": 1.0}})
    with pytest.raises(UserError, match="unknown smoothing parameter"):
        ParamSmoother(overrides={"pose": {"speed": 1.0}})
    with pytest.raises(UserError, match="min_cutoff must be > 0"):
        ParamSmoother(overrides={"pose": {"min_cutoff": 0.0}})


@pytest.mark.parametrize("key", list(CASES))
def test_file_mode_is_zero_phase_and_cuts_jitter(key):
    smoother = ParamSmoother()
    rng = np.random.default_rng(7)
    raw = [noisy_value(key, t, None, rng) for t in range(STATIC)]
    out = [d[key] for d in smoother.smooth_sequence([{key: x} for x in raw], [t / FPS for t in range(STATIC)])]
    assert jitter(as_points(key, raw)) / jitter(as_points(key, out)) >= 3.0
    raw = [noisy_value(key, t, STEP_AT, rng) for t in range(STEP_LEN)]
    out = [d[key] for d in smoother.smooth_sequence([{key: x} for x in raw], [t / FPS for t in range(STEP_LEN)])]
    clean = [clean_value(key, t, STEP_AT) for t in range(STEP_LEN)]
    assert step_lag(as_points(key, clean), as_points(key, out)) == 0
    assert out[0].dtype == raw[0].dtype


def step_overshoot(points: np.ndarray, clean: np.ndarray) -> float:
    """How far (T, N, D) `points` go beyond either level of the (T, N, D) step `clean`, in steps (0 = none)."""
    pts = points.reshape(len(points), -1)
    ref = clean.reshape(len(clean), -1)
    direction = ref[-1] - ref[0]
    progress = (pts - ref[0]) @ direction / (direction @ direction)
    return float(max(progress.max() - 1.0, -progress.min(), 0.0))


@pytest.mark.parametrize("key", list(CASES))
def test_file_mode_keeps_a_step_sharp_without_overshoot(key):
    # A plain local quadratic fit rings at a step (the edge frames overshoot by about 4 % of it);
    # the step-preserving weights leave the two sides to themselves. Averaging the output over noise
    # draws leaves the systematic part, the ringing.
    clean = [clean_value(key, t, STEP_AT) for t in range(STEP_LEN)]
    pts = [t / FPS for t in range(STEP_LEN)]
    runs = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        raw = [noisy_value(key, t, STEP_AT, rng) for t in range(STEP_LEN)]
        runs.append(as_points(key, [d[key] for d in ParamSmoother().smooth_sequence([{key: x} for x in raw], pts)]))
    mean = np.mean(runs, axis=0)
    window = ParamSmoother().groups[group_of(key)].window
    plain = local_regression_matrix(pts, window) @ as_points(key, clean).reshape(STEP_LEN, -1)
    ringing = step_overshoot(plain.reshape(mean.shape), as_points(key, clean))
    assert ringing > 0.03  # what the time weights alone do, even without noise
    # Many-element codes compare samples reliably and lose nearly all of it; 3-vectors (pose, cam) most.
    assert step_overshoot(mean, as_points(key, clean)) < (0.1 if key in ("expcode", "blendshapes", "landmarks") else 0.5) * ringing, key
    assert step_lag(as_points(key, clean), mean) == 0, key


def test_noise_level_is_the_noise_sigma_whatever_the_motion():
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.5, (300, 40))
    assert noise_level(noise) == pytest.approx(0.5, rel=0.1)
    t = np.arange(300)[:, None] / 30.0
    ramp_and_step = 20.0 * t + 10.0 * (t > 5) + noise  # steady motion and one jump
    assert noise_level(ramp_and_step) == pytest.approx(0.5, rel=0.1)
    assert noise_level(noise[:2]) == float("inf")


def test_file_mode_returns_a_noise_free_step_unchanged():
    frames = [{"expcode": np.full(10, 0.0 if t < 20 else 1.0)} for t in range(40)]
    out = ParamSmoother().smooth_sequence(frames, [t / FPS for t in range(40)])
    for o, f in zip(out, frames):
        np.testing.assert_allclose(o["expcode"], f["expcode"], atol=1e-12)


def test_file_mode_follows_a_ramp_without_lag_even_with_gaps():
    # Irregular sampling with a hole; a quadratic trajectory is reproduced exactly (local quadratic fit).
    pts = np.concatenate([np.arange(0, 1, 1 / 30), np.arange(1.5, 2.5, 1 / 25)])
    traj = [np.array([3.0 * t - t**2, 0.5 * t]) for t in pts]
    frames = [{"expcode": v, "shapecode": np.zeros(2)} for v in traj]
    frames[10] = {"shapecode": np.zeros(2)}  # a frame without the code
    out = ParamSmoother().smooth_sequence(frames, list(pts))
    assert "expcode" not in out[10]
    for i, (o, v) in enumerate(zip(out, traj)):
        if i != 10:
            np.testing.assert_allclose(o["expcode"], v, atol=1e-9)
    # The causal filter lags the same ramp (sanity check that the comparison means something).
    causal = ParamSmoother()
    late = [causal.smooth(0, {"expcode": v}, t)["expcode"] for t, v in zip(pts[:30], traj[:30])]
    assert abs(late[-1][1] - traj[29][1]) > 1e-3


def test_non_finite_estimates_pass_through_without_poisoning_the_filter():
    smoother = ParamSmoother()
    smoother.smooth(0, {"expcode": np.zeros(2)}, 0.0)
    bad = np.array([np.nan, 1.0])
    assert smoother.smooth(0, {"expcode": bad}, 1 / FPS)["expcode"] is bad
    after = smoother.smooth(0, {"expcode": np.zeros(2)}, 2 / FPS)["expcode"]
    np.testing.assert_array_equal(after, 0.0)
    frames = [{"expcode": np.full(2, float(t))} for t in range(10)]
    frames[4] = {"expcode": np.array([np.inf, 0.0])}
    out = smoother.smooth_sequence(frames, [t / FPS for t in range(10)])
    assert out[4]["expcode"] is frames[4]["expcode"]
    assert all(np.isfinite(o["expcode"]).all() for i, o in enumerate(out) if i != 4)
    np.testing.assert_allclose(out[5]["expcode"], 5.0, atol=1e-9)  # a ramp through the hole stays exact


@pytest.mark.parametrize("key", list(CASES))
def test_smoothing_one_frame_equals_that_frame_of_the_whole_sequence(key):
    # The look-ahead stage fits only its centre frame; it must be the same number as a full fit.
    rng = np.random.default_rng(5)
    raw = [{key: noisy_value(key, t, 4, rng), "shapecode": np.zeros(3)} for t in range(9)]
    pts = [t / FPS for t in range(9)]
    full = ParamSmoother().smooth_sequence(raw, pts)
    for at in (0, 4, 8):
        one = ParamSmoother().smooth_sequence(raw, pts, at=at)
        np.testing.assert_allclose(one[at][key], full[at][key], rtol=1e-12, atol=1e-12)
        assert all(one[i][key] is raw[i][key] for i in range(9) if i != at)  # the others untouched


def test_repeated_or_backwards_timestamps_do_not_stop_file_smoothing():
    """Damaged files can repeat a timestamp or step back; look-ahead smoothing must go on, treating such a frame
    as one typical step after the previous one."""
    from realtime.smoothing import increasing_times

    assert increasing_times([0.0, 0.1, 0.2]).tolist() == [0.0, 0.1, 0.2]  # already fine: unchanged
    np.testing.assert_allclose(increasing_times([0.0, 0.1, 0.1, 0.05, 0.2, 0.3]), [0.0, 0.1, 0.2, 0.3, 0.45, 0.55])
    smoother = ParamSmoother("default")
    rng = np.random.default_rng(0)
    codes = [{"expcode": rng.normal(size=5).astype(np.float32)} for _ in range(9)]
    broken = [0.0, 1 / 30, 1 / 30, 3 / 30, 2 / 30, 5 / 30, 6 / 30, 7 / 30, 8 / 30]
    out = smoother.smooth_sequence(codes, broken)
    want = smoother.smooth_sequence(codes, increasing_times(broken))
    for a, b in zip(out, want):
        np.testing.assert_array_equal(a["expcode"], b["expcode"])
