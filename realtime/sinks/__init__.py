"""Output sinks: where finished :class:`~realtime.types.FrameResult` objects go.

Every sink follows :class:`Sink`: ``write`` one result at a time (in frame order), ``close`` once at
the end (idempotent; it finalises files even after an error), and ``with sink:`` closes it.
The concrete sinks live in submodules so importing this package pulls in neither PyAV nor OpenCV:
``realtime.sinks.recorder.Recorder``, ``realtime.sinks.outputs.FrameOutputs``,
``realtime.sinks.window.WindowSink``.
"""

from __future__ import annotations

from types import TracebackType
from typing import Protocol, TypeVar, runtime_checkable

from realtime.types import FrameResult

_S = TypeVar("_S", bound="Sink")


@runtime_checkable
class Sink(Protocol):
    """The interface every output sink implements.

    Subclass it explicitly to inherit the context-manager methods, which call :meth:`close`.
    """

    def write(self, result: FrameResult) -> None:
        """Consume one frame's result."""
        ...

    def close(self) -> None:
        """Finish all output. Safe to call more than once and after a failed ``write``."""
        ...

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


__all__ = ["Sink"]
