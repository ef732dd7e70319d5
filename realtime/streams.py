"""Independent networks on their own CUDA streams, so small batch-1 kernels from different networks fill the GPU
together instead of queueing behind each other (EMICA's MICA, DECA and expression networks share no inputs
or outputs until FLAME).

    fork = StreamFork(device)
    mica = fork.branch(mica)          # same call, same output; inside ``with fork:`` it runs on its own stream
    with fork:                        # leaving joins: the caller's stream waits for every branch used
        shape = mica(arcface_crops)
        deca_code = deca(crops)
    flame(shape, ...)                 # safe: ordered after both

On the CPU (or outside ``with fork:``) a branch is a plain call, so results are bit-identical either way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import numpy as np
import torch
from torch import nn


class StreamFork:
    """Owns one side stream per branch; ``with fork:`` is one fork-join of the caller's current stream."""

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self.enabled = self.device.type == "cuda"
        self._active = False
        self._caller: Optional["torch.cuda.Stream"] = None
        self._used: list["torch.cuda.Stream"] = []

    def branch(self, module: Callable) -> "StreamBranch":
        """``module`` (a network, an engine: any callable) behind a wrapper that, inside ``with self:``, runs it on
        a stream of its own."""
        stream = torch.cuda.Stream(self.device) if self.enabled else None
        return StreamBranch(module, self, stream)

    def __enter__(self) -> "StreamFork":
        if self._active:
            raise RuntimeError("StreamFork is not re-entrant")
        self._active = True
        if self.enabled:
            self._caller = torch.cuda.current_stream(self.device)
        return self

    def __exit__(self, *exc) -> None:
        try:
            for stream in self._used:
                self._caller.wait_stream(stream)
        finally:
            self._used = []
            self._caller = None
            self._active = False

    def _launch(self, stream: "torch.cuda.Stream", module: Callable, inputs: tuple) -> object:
        """Run ``module`` on ``stream`` after the caller's queued work (which wrote the inputs)."""
        stream.wait_stream(self._caller)
        for x in inputs:
            if isinstance(x, torch.Tensor) and x.is_cuda:
                x.record_stream(stream)  # the caller may drop its reference before the branch has read it
        with torch.cuda.stream(stream):
            out = module(*inputs)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_cuda:
                t.record_stream(self._caller)  # made on the branch, freed after the caller's use of it
        if stream not in self._used:
            self._used.append(stream)
        return out


class StreamBranch(nn.Module):
    """A module that runs on its fork's side stream while the fork is open, else like the module itself."""

    def __init__(self, module: Callable, fork: StreamFork, stream: Optional["torch.cuda.Stream"]):
        super().__init__()
        self.module = module
        self._fork = fork
        self._stream = stream

    def forward(self, *inputs):
        if self._stream is None or not self._fork._active:
            return self.module(*inputs)
        return self._fork._launch(self._stream, self.module, inputs)


def to_host(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Tensors → float32 NumPy arrays, by name. From a GPU every copy is queued into pinned memory first and
    the caller's stream is waited for once, instead of one blocking copy (and one wait) per tensor."""
    if not any(t.is_cuda for t in tensors.values()):
        return {k: t.detach().float().numpy() for k, t in tensors.items()}
    host = {}
    for k, t in tensors.items():
        buffer = torch.empty(t.shape, dtype=torch.float32, pin_memory=True)
        buffer.copy_(t.detach().float(), non_blocking=True)
        host[k] = buffer
    torch.cuda.current_stream(next(t.device for t in tensors.values() if t.is_cuda)).synchronize()
    return {k: v.numpy() for k, v in host.items()}
