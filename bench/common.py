"""What every bench shares: one name for the machine it ran on, and one way to time a call."""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch


def device_name(device: Optional[torch.device] = None) -> str:
    """The GPU's name, or the CPU model and core count ("Intel(R) Xeon(R) Processor, 2 cores (CPU)").

    ``device`` None: the first CUDA device if there is one, else the CPU.
    """
    if device is None:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores (CPU)"


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeat: int) -> float:
    """Median wall time of ``fn()`` in ms, GPU work included (synchronised after each call)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(samples)


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH, e.g. 854x480 (got {text!r})") from None
    if w < 16 or h < 16 or w % 2 or h % 2:
        raise argparse.ArgumentTypeError(f"WxH must be even and at least 16x16 for yuv420p (got {text!r})")
    return w, h


def positive_ints(text: str) -> list[int]:
    """argparse type for a comma list of positive integers ("1,4,16")."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 1,4,16 (got {text!r})") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers (got {text!r})")
    return values


def count_arg(least: int) -> Callable[[str], int]:
    """argparse type for an integer of at least ``least`` (a number of calls, threads, …)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer (got {text!r})") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"expected at least {least} (got {value})")
        return value

    return parse


def device_arg(text: str) -> torch.device:
    """argparse type for a torch device: cpu, cuda or cuda:N."""
    if re.fullmatch(r"cpu|cuda(:\d+)?", text) is None:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N (got {text!r})")
    return torch.device(text)


def size_list(text: str) -> list[tuple[int, int]]:
    """argparse type for a comma list of WxH frame sizes ("640x480,1920x1080")."""
    return [parse_size(part) for part in text.split(",")]
