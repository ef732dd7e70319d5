"""Soak: a minute of a synthetic live camera (with two drop-outs) through the whole pipeline into a
recording, with the process's memory sampled every second. bench/soak.py is the longer version."""

from __future__ import annotations

import pytest

from bench.soak import WARMUP_S, soak

SECONDS = 60.0


@pytest.mark.slow
def test_a_minute_live_keeps_memory_flat_and_survives_drop_outs(tmp_path):
    report = soak(SECONDS, drop_every=20.0, model_name="mediapipe", record_to=tmp_path / "soak.mp4")
    memory = report["memory"]
    print(f"soak: RSS {memory['rss_at_warmup_mb']:.1f} MiB at {WARMUP_S:g} s → {memory['rss_at_end_mb']:.1f} MiB "
          f"at the end ({memory['growth_mb']:+.1f} MiB), {report['frames_out']}/{report['frames_in']} frames")
    # Memory: flat after the first half minute (a leak of one 176x144 frame per frame would be +2 MiB/s).
    assert memory["growth_mb"] < 30
    assert memory["peak_after_warmup_mb"] - memory["rss_at_warmup_mb"] < 30
    assert len(report["rss_mb"]) >= SECONDS - 5  # sampled every second throughout
    # The camera ran in real time for the whole minute and came back after each drop-out.
    assert report["seconds"] == pytest.approx(SECONDS, rel=0.1)
    assert report["frames_in"] == round(SECONDS * 30000 / 1001)
    assert report["outages"] == report["reconnects"] == 2
    assert report["no_signal_frames"] == pytest.approx(2 * 0.5 * 30, abs=10)  # 0.5 s to the first retry, each time
    # Everything that reached the end of the pipeline is in the recording, and the pipeline kept up.
    assert report["frames_recorded"] == report["frames_out"]
    assert report["frames_out"] + report["dropped"] == report["frames_in"]
    assert report["frames_out"] > 0.5 * report["frames_in"]
    assert report["latency_ms"]["p95"] < 1000
