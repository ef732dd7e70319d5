"""bench/bench_pipeline.py end to end on a small transcoded copy of the sample clip: the JSON it writes.

Speed is not asserted (it is the machine's); only that the report has the shape bench_all.py relies on.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = {"decode", "track", "model", "render", "compose", "sinks"}


def _bench(tmp_path: Path, *flags: str) -> dict:
    out = tmp_path / "pipeline.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_pipeline.py"), "--size", "320x240", "--max_frames", "12",
         "--model_name", "mediapipe", "--out", str(out), *flags],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_file_pipeline_report(tmp_path):
    report = _bench(tmp_path)
    assert report["input_size"] == [320, 240]
    assert report["transcoded"]["size"] == [320, 240]
    assert report["frames"] == 12
    assert report["fps"] > 0
    assert set(report["stages_ms"]) <= STAGES and "latency" not in report["stages_ms"]
    assert report["slowest_stage"] in STAGES
    for stage in report["stages_ms"].values():
        assert stage["p50"] <= stage["p95"] <= stage["p99"]
    assert "latency_ms" not in report


def test_live_pipeline_report_has_latency(tmp_path):
    report = _bench(tmp_path, "--realtime", "true", "--repeat", "1")
    assert report["realtime"] is True
    assert report["input_size"] == [320, 240]
    assert 0 < report["frames"] <= 12  # live may drop frames to stay real-time
    assert report["fps"] > 0
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
    assert report["slowest_stage"] in STAGES - {"decode"}  # live decode is mostly waiting for the frame's time


@pytest.mark.parametrize("script, flags, needle", [
    ("bench/bench_networks.py", ["--batch", "0"], "--batch"),
    ("bench/bench_networks.py", ["--repeat", "0"], "--repeat"),
    ("bench/bench_networks.py", ["--device", "tpu"], "cpu, cuda or cuda:N"),
    ("bench/bench_networks.py", ["--assets_dir", "/nonexistent_assets", "--batch", "1"], "/nonexistent_assets"),
    ("build_engines.py", [], "--model"),
])
def test_bad_bench_and_build_flags_are_one_line(script, flags, needle):
    proc = subprocess.run([sys.executable, script, *flags], cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
