"""A slow sink on its own thread (realtime.sinks.background): in order, nothing dropped, errors surface."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from realtime.sinks.background import BackgroundSink
from realtime.types import Frame, FrameResult


def result(index: int) -> FrameResult:
    return FrameResult(frame=Frame(index=index, pts=index / 30, image=np.zeros((2, 2, 3), np.uint8)))


class SlowSink:
    def __init__(self, delay: float = 0.0, fail_at: int | None = None, gate: threading.Event | None = None):
        self.delay, self.fail_at, self.gate = delay, fail_at, gate
        self.indices: list[int] = []
        self.threads: set[str] = set()
        self.closed = 0

    def write(self, r: FrameResult) -> None:
        if self.gate is not None:
            self.gate.wait(5)
        time.sleep(self.delay)
        if r.frame.index == self.fail_at:
            raise OSError(28, "No space left on device")
        self.indices.append(r.frame.index)
        self.threads.add(threading.current_thread().name)

    def close(self) -> None:
        self.closed += 1


def test_every_result_is_written_in_order_off_the_callers_thread():
    inner = SlowSink(delay=0.002)
    sink = BackgroundSink(inner, depth=3, name="slow")
    for i in range(40):
        sink.write(result(i))
    sink.close()
    sink.close()  # idempotent
    assert inner.indices == list(range(40)) and sink.written == 40
    assert inner.threads == {"sink:slow"} and inner.closed == 1
    with pytest.raises(ValueError, match="slow is closed"):
        sink.write(result(40))


def test_a_full_queue_blocks_the_writer_instead_of_dropping():
    gate = threading.Event()
    inner = SlowSink(gate=gate)
    sink = BackgroundSink(inner, depth=2)
    sink.write(result(0))  # taken by the worker, which waits at the gate
    time.sleep(0.05)
    sink.write(result(1))
    sink.write(result(2))  # the queue (depth 2) is now full
    done = threading.Event()
    threading.Thread(target=lambda: (sink.write(result(3)), done.set()), daemon=True).start()
    assert not done.wait(0.2)  # blocked while the sink is stuck
    gate.set()
    assert done.wait(5)
    sink.close()
    assert inner.indices == [0, 1, 2, 3]


def test_an_error_is_raised_by_the_next_write_and_close_still_closes_the_sink():
    inner = SlowSink(fail_at=2)
    sink = BackgroundSink(inner, depth=1)
    with pytest.raises(OSError, match="No space left"):
        for i in range(50):
            sink.write(result(i))
            time.sleep(0.01)
    assert inner.indices == [0, 1] and sink.written == 2  # nothing after the failure
    with pytest.raises(OSError, match="No space left"):
        sink.close()
    assert inner.closed == 1


def test_an_error_on_the_last_result_is_raised_by_close():
    inner = SlowSink(fail_at=4)
    sink = BackgroundSink(inner)
    for i in range(5):
        sink.write(result(i))
    with pytest.raises(OSError):
        sink.close()
    assert inner.closed == 1 and sink.written == 4


def test_a_sink_whose_close_fails_has_written_nothing():
    """An encoder flush or codes.npz that failed on close: none of the results is finalised, so none counts."""

    class FailingClose(SlowSink):
        def close(self) -> None:
            super().close()
            raise OSError(28, "No space left on device")

    inner = FailingClose()
    sink = BackgroundSink(inner)
    for i in range(5):
        sink.write(result(i))
    with pytest.raises(OSError, match="No space left"):
        sink.close()
    assert inner.indices == list(range(5)) and inner.closed == 1 and sink.written == 0
