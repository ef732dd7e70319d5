"""Experiment logging (``--logger wandb``): the run's configuration, per-frame stage timings and fps,
and the result video.

Every logger implements :class:`RunLogger`; :func:`create_logger` picks one by its flag value. The
runner calls ``log_config`` once before the first frame, ``log_frame_stats`` once per delivered frame
(increasing ``step``), ``log_video`` for each video it finalised, and ``finish`` last, also after a
failure. Weights & Biases is imported only when asked for, so it stays an optional dependency
(``pip install 'emica-realtime[wandb]'``); ``WANDB_MODE=offline`` logs to ``$WANDB_DIR/wandb``
without an account, for ``wandb sync`` later.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Protocol

from .config import RunConfig
from .errors import MediaError, UserError

log = logging.getLogger("realtime")

LOGGERS = ("none", "wandb")
# What wandb.Video accepts as a file; anything else would raise deep inside wandb.
WANDB_VIDEO_FORMATS = (".mp4", ".webm", ".ogg", ".gif")


class RunLogger(Protocol):
    def log_config(self, cfg: RunConfig) -> None:
        """Record the full configuration of the run (once, before the first frame)."""

    def log_frame_stats(self, step: int, timings: Mapping[str, float], fps: float) -> None:
        """Record one frame: ``timings`` maps stage name → milliseconds; ``fps`` is the running rate."""

    def log_video(self, path: str | os.PathLike[str]) -> None:
        """Attach a finished video file to the run."""

    def finish(self, exit_code: int = 0) -> None:
        """Close the run (idempotent); a non-zero ``exit_code`` marks it failed."""


class NullLogger:
    """``--logger none``: records nothing."""

    def log_config(self, cfg: RunConfig) -> None:
        pass

    def log_frame_stats(self, step: int, timings: Mapping[str, float], fps: float) -> None:
        pass

    def log_video(self, path: str | os.PathLike[str]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def config_dict(cfg: RunConfig) -> dict[str, Any]:
    """The configuration as nested plain dicts (``{"model": {"batch_size": 4, …}, …}``)."""
    return dataclasses.asdict(cfg)


def frame_metrics(timings: Mapping[str, float], fps: float) -> dict[str, float]:
    """One frame's metrics under stable names: ``fps`` and ``latency_ms/<stage>``.

    The ``latency_ms/`` prefix groups the stages into one panel section in the wandb UI.
    """
    metrics = {f"latency_ms/{stage}": float(ms) for stage, ms in timings.items()}
    metrics["fps"] = float(fps)
    return metrics


def _import_wandb():
    try:
        import wandb
    except ImportError as err:
        raise UserError(
            "--logger wandb needs the wandb package: pip install wandb (or pip install 'emica-realtime[wandb]')"
        ) from err
    return wandb


class WandbLogger:
    """Logs to a Weights & Biases run.

    Args:
        project: the wandb project the run goes to.
        mode: ``"online"``, ``"offline"`` or ``"disabled"``; None lets wandb decide (``WANDB_MODE``,
            else online, which needs ``wandb login`` or ``WANDB_API_KEY``).
        name: the run's display name; None lets wandb pick one.

    Raises:
        UserError: wandb is not installed, or it cannot start a run (not logged in, bad mode).
    """

    def __init__(self, project: str = "emica-realtime", mode: Optional[str] = None, name: Optional[str] = None):
        self._wandb = _import_wandb()
        try:
            self._run = self._wandb.init(project=project, mode=mode, name=name)
        except self._wandb.errors.Error as err:
            raise UserError(
                f"--logger wandb could not start a run in project {project!r}: {err} "
                "Log in with `wandb login`, or set WANDB_MODE=offline to log locally."
            ) from err
        self._finished = False

    @property
    def run_dir(self) -> Path:
        """The run's local folder (``…/wandb/<offline-|>run-<date>-<id>``)."""
        return Path(self._run.dir).parent

    def log_config(self, cfg: RunConfig) -> None:
        self._run.config.update(config_dict(cfg), allow_val_change=True)

    def log_frame_stats(self, step: int, timings: Mapping[str, float], fps: float) -> None:
        self._run.log(frame_metrics(timings, fps), step=step)

    def log_video(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        if not path.is_file():
            raise MediaError(f"cannot log video {path} to wandb: the file does not exist")
        if path.suffix.lower() not in WANDB_VIDEO_FORMATS:
            # A finished run should not fail over its attachment; say why it is missing instead.
            log.warning("wandb: not attaching %s: wandb shows only %s videos", path, ", ".join(WANDB_VIDEO_FORMATS))
            return
        self._run.log({"video": self._wandb.Video(str(path))})

    def finish(self, exit_code: int = 0) -> None:
        if not self._finished:
            self._finished = True
            self._run.finish(exit_code=exit_code)


def create_logger(kind: str, project: str = "emica-realtime") -> RunLogger:
    """The logger for ``--logger KIND`` (one of :data:`LOGGERS`)."""
    if kind == "none":
        return NullLogger()
    if kind == "wandb":
        return WandbLogger(project=project)
    raise UserError(f"--logger must be one of {', '.join(LOGGERS)} (got {kind!r})")
