"""A slow sink (the video encoder, per-frame image files) on a thread of its own.

Delivery then waits only for the fast sinks (window, WebRTC, parameter stream): the composited frame is out
when it is handed over, and encoding overlaps the next frames. Nothing is dropped: ``write`` blocks while
``depth`` results are queued, so a sink that cannot keep up slows the pipeline down instead of losing frames.
"""

from __future__ import annotations

import queue
import threading
from typing import Optional

from realtime.sinks import Sink
from realtime.types import FrameResult

_END = object()


class BackgroundSink(Sink):
    """Runs ``sink.write`` on a worker thread, in order; ``close`` writes what is queued, then closes ``sink``.

    The first error the worker meets is raised by the next ``write`` (later results are then not written)
    or by ``close``, which still closes ``sink`` so its files are finalised or discarded as the sink decides.
    ``written`` counts the results in the sink's output: those it took without an error, or 0 once its
    ``close`` failed (then nothing it took was finalised).
    """

    def __init__(self, sink: Sink, depth: int = 8, name: Optional[str] = None):
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.sink = sink
        self.name = name or type(sink).__name__
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: Optional[BaseException] = None
        self._closed = False
        self.written = 0  # results the sink took without an error (0 if its close failed)
        self._thread = threading.Thread(target=self._work, name=f"sink:{self.name}", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if self._error is None:  # after a failure, keep draining so writers never block forever
                try:
                    self.sink.write(item)
                    self.written += 1
                except BaseException as err:  # noqa: BLE001 - handed to the writer's thread
                    self._error = err

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, result: FrameResult) -> None:
        if self._closed:
            raise ValueError(f"{self.name} is closed")
        self._raise()
        self._queue.put(result)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(_END)
        self._thread.join()
        try:
            self.sink.close()
        except BaseException:
            # Its file was not finalised (an encoder flush or codes.npz that failed): none of what it took is
            # safely written, so --resume must redo it all.
            self.written = 0
            self._raise()  # the first error is the one to report
            raise
        self._raise()
