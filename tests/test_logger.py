"""--logger: an offline wandb run holds the config, every frame's metrics and the video; clear errors otherwise."""

import json
import struct
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from realtime.config import RunConfig
from realtime.errors import MediaError, UserError
from realtime.logger import NullLogger, WandbLogger, create_logger, frame_metrics


def _wandb_records(run_file: Path) -> list:
    """Decode a ``run-<id>.wandb`` file into wandb's ``Record`` protobufs.

    The file is a 7-byte ``:W&B`` header followed by a LevelDB-style log: 32 KiB blocks of chunks, each
    with a 7-byte header (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last); a block tail shorter
    than a header is zero padding.
    """
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _flushed_records(run_dir: Path) -> list:
    """The run's records once wandb's service has written them: ``finish()`` returns before its
    background process flushes the file; ``wandb.teardown()`` waits for that process to exit."""
    import wandb

    wandb.teardown()
    (run_file,) = run_dir.glob("run-*.wandb")
    return _wandb_records(run_file)


def _by_type(records: list, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def _history_rows(records: list) -> dict[int, dict]:
    rows = {}
    for history in _by_type(records, "history"):
        row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in history.item}
        rows[int(row["_step"])] = row
    return rows


def _small_video(path: Path, frames: int = 5) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=Fraction(30))
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            image = np.full((48, 64, 3), 40 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture
def fresh_wandb():
    """wandb reads its WANDB_* settings once per process; tear its singleton down around each test."""
    wandb = pytest.importorskip("wandb")
    wandb.teardown()
    yield
    wandb.teardown()


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch, fresh_wandb):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    return tmp_path


def test_offline_run_holds_config_metrics_and_video(offline_wandb, tmp_path):
    cfg = RunConfig(input="clip.mp4")
    cfg.model.batch_size = 3
    cfg.compose.cat_dim = 1
    video = _small_video(tmp_path / "video_geometry.mp4")
    timings = [{"decode": 1.5 + i, "track": 12.25, "model": 30.0 - i, "render": 4.0} for i in range(6)]

    logger = WandbLogger(project="emica-realtime-test")
    logger.log_config(cfg)
    for step, t in enumerate(timings):
        logger.log_frame_stats(step, t, fps=25.0 + step)
    logger.log_video(video)
    logger.finish()

    run_dir = logger.run_dir
    assert run_dir.parent == tmp_path / "wandb" and run_dir.name.startswith("offline-run-")
    records = _flushed_records(run_dir)

    (run,) = _by_type(records, "run")
    assert run.project == "emica-realtime-test"
    config = {item.key: json.loads(item.value_json) for c in _by_type(records, "config") for item in c.update}
    config.update({item.key: json.loads(item.value_json) for item in run.config.update})
    assert config["input"] == "clip.mp4"
    assert config["model"]["batch_size"] == 3
    assert config["compose"]["cat_dim"] == 1
    assert config["tracking"]["scale"] == pytest.approx(1.25)

    rows = _history_rows(records)
    assert sorted(rows) == list(range(6))
    for step, t in enumerate(timings):
        assert rows[step]["fps"] == pytest.approx(25.0 + step)
        for stage, ms in t.items():
            assert rows[step][f"latency_ms/{stage}"] == pytest.approx(ms)

    media = [f.path for files in _by_type(records, "files") for f in files.files if f.path.startswith("media/videos/")]
    assert len(media) == 1 and media[0].endswith(".mp4")
    stored = run_dir / "files" / media[0]
    assert stored.read_bytes() == video.read_bytes()
    assert rows[5]["video/path"] == media[0]  # the video rides on the last frame's row

    (exit_record,) = _by_type(records, "exit")
    assert exit_record.exit_code == 0


def test_failed_run_is_marked_and_finish_is_idempotent(offline_wandb):
    logger = WandbLogger(project="emica-realtime-test")
    logger.log_frame_stats(0, {"track": 3.0}, fps=1.0)
    logger.finish(exit_code=2)
    logger.finish(exit_code=0)  # the runner's cleanup may call it again: no second exit record
    records = _flushed_records(logger.run_dir)
    assert [e.exit_code for e in _by_type(records, "exit")] == [2]


def test_log_video_names_a_missing_file(offline_wandb, tmp_path):
    logger = WandbLogger(project="emica-realtime-test")
    try:
        with pytest.raises(MediaError, match="nothing.mp4.*does not exist"):
            logger.log_video(tmp_path / "nothing.mp4")
    finally:
        logger.finish()


def test_not_logged_in_says_how_to_log_in_or_go_offline(tmp_path, monkeypatch, fresh_wandb):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_SILENT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    with pytest.raises(UserError) as info:
        WandbLogger(project="emica-realtime-test", mode="online")
    message = str(info.value)
    assert "wandb login" in message and "WANDB_MODE=offline" in message
    assert "\n" not in message


def test_missing_wandb_says_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(UserError, match="pip install wandb"):
        create_logger("wandb")


def test_create_logger_picks_by_name_and_rejects_others():
    assert isinstance(create_logger("none"), NullLogger)
    with pytest.raises(UserError, match=r"--logger must be one of none, wandb \(got 'tensorboard'\)"):
        create_logger("tensorboard")


def test_frame_metrics_names():
    assert frame_metrics({"track": 2, "model": 7.5}, fps=30) == {
        "latency_ms/track": 2.0, "latency_ms/model": 7.5, "fps": 30.0,
    }
