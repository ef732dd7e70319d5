"""The threaded pipeline with stand-in stages: ordering, loss rules, batching, errors, stop."""

import threading
import time

import numpy as np
import pytest

from realtime.pipeline import LatestQueue, Pipeline
from realtime.types import AudioChunk, Frame, FrameResult
from tests.fakes import fake_face


def _results(n, delay=0.0, audio=False):
    for i in range(n):
        if delay:
            time.sleep(delay)
        chunks = [AudioChunk(pts=i / 30, sample_rate=48000, samples=np.full((1600, 1), i, np.float32))] if audio else []
        yield FrameResult(frame=Frame(index=i, pts=i / 30, image=np.zeros((4, 4, 3), np.uint8), audio=chunks))


class Record:
    name = "record"

    def __init__(self, delay=0.0, batched=False, fail_at=None):
        self.delay, self.batched, self.fail_at = delay, batched, fail_at
        self.batches: list[list[int]] = []
        self.thread = None

    def setup(self):
        self.thread = threading.current_thread().name

    def process(self, batch):
        self.batches.append([r.frame.index for r in batch])
        if self.fail_at is not None and any(r.frame.index == self.fail_at for r in batch):
            raise RuntimeError("stage broke")
        time.sleep(self.delay)

    def teardown(self):
        pass


def test_files_are_lossless_and_ordered_through_a_slow_stage():
    seen = []
    stage = Record(delay=0.002)
    result = Pipeline(_results(50), [stage, Record()], live=False, on_result=lambda r: seen.append(r.frame.index)).run()
    assert seen == list(range(50))
    assert result.frames_in == result.frames_out == 50 and result.dropped == 0 and result.error is None
    assert stage.thread == "record"  # setup ran in the stage's own thread (GL contexts rely on it)


def test_file_batches_fill_up_to_batch_size_counting_faces():
    stage = Record(batched=True)
    Pipeline(_results(10), [stage], live=False, batch_size=4).run()
    assert [len(b) for b in stage.batches] == [4, 4, 2]
    assert sum(stage.batches, []) == list(range(10))


def test_live_drops_oldest_counts_drops_and_keeps_audio():
    seen, audio = [], []

    def sink(r):
        seen.append(r.frame.index)
        audio.extend(int(c.samples[0, 0]) for c in r.frame.audio)

    result = Pipeline(_results(60, delay=0.001, audio=True), [Record(delay=0.02)], live=True, on_result=sink).run()
    assert result.dropped > 0 and result.frames_out < 60
    assert seen == sorted(seen) and seen[-1] == 59  # newest frame always gets through
    assert audio == list(range(60))  # every frame's sound arrives, in order, even from dropped frames
    assert result.frames_out + result.dropped == 60


def test_live_batching_never_waits_for_a_full_batch():
    stage = Record(batched=True)
    Pipeline(_results(5, delay=0.03), [stage], live=True, batch_size=8).run()
    assert all(len(b) == 1 for b in stage.batches)


def test_stage_error_stops_the_run_and_is_reported():
    seen = []
    result = Pipeline(_results(200), [Record(fail_at=5), Record()], live=False, on_result=lambda r: seen.append(r.frame.index)).run()
    assert isinstance(result.error, RuntimeError)
    assert 5 not in seen and len(seen) < 200


def test_after_a_failed_delivery_nothing_more_is_delivered():
    # The sinks took frames 0..6 and failed on 7: handing them 8, 9, ... would leave a gap in their files.
    seen = []

    def sink(r):
        if r.frame.index == 7:
            raise OSError("disk full")
        seen.append(r.frame.index)

    result = Pipeline(_results(200), [Record()], live=False, on_result=sink).run()
    assert isinstance(result.error, OSError) and seen == list(range(7)) and result.frames_out == 7


def test_abort_after_an_interrupted_run_ends_every_thread_promptly():
    # A second Ctrl-C interrupts run(); the runner then aborts before closing the input and the outputs, which
    # must not happen while the source thread still decodes or a stage still works.
    import os
    import signal

    slow = Record(delay=0.01)
    pipe = Pipeline(_results(100_000), [slow, Record()], live=False)
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        pipe.run()
    started = time.monotonic()
    assert pipe.abort(timeout=5.0)
    assert time.monotonic() - started < 1.0  # the frames in flight are dropped, not worked through
    assert not any(t.is_alive() for t in pipe._threads)
    processed = len(slow.batches)
    time.sleep(0.1)
    assert len(slow.batches) == processed < 100_000


def test_an_interrupt_during_delivery_leaves_run_at_once():
    # The signal handler raises in the main thread, often while a sink is being written: run() must not swallow it
    # as a failed frame and then work through everything in flight first.
    def sink(r):
        if r.frame.index == 3:
            raise KeyboardInterrupt

    slow = Record(delay=0.05)
    pipe = Pipeline(_results(100_000), [slow], live=False, on_result=sink)
    with pytest.raises(KeyboardInterrupt):
        pipe.run()
    assert pipe.abort(timeout=5.0) and len(slow.batches) < 30


def test_stop_finishes_frames_in_flight():
    seen = []
    pipe = None

    def sink(r):
        seen.append(r.frame.index)
        if r.frame.index == 9:
            pipe.stop()

    pipe = Pipeline(_results(1000), [Record()], live=False, on_result=sink)
    result = pipe.run()
    assert result.error is None and result.interrupted
    assert seen == list(range(len(seen))) and 10 <= len(seen) < 1000  # no gaps: everything taken in is delivered


def test_latest_queue_never_blocks_and_bounds_memory():
    q = LatestQueue(2)
    for r in _results(100):
        q.put(r)
    assert q.dropped == 98
    assert [q.get_nowait().frame.index for _ in range(2)] == [98, 99]


def test_stats_have_percentiles_per_stage():
    result = Pipeline(_results(20), [Record()], live=False).run()
    assert {"record", "latency"} <= set(result.stats)
    assert result.stats["record"]["n"] == 20 and result.stats["latency"]["p95"] >= result.stats["latency"]["p50"]


def test_faces_count_toward_batches():
    stage = Record(batched=True)
    face = fake_face()

    def two_faces():
        for r in _results(6):
            r.faces = [face, face]
            yield r

    Pipeline(two_faces(), [stage], live=False, batch_size=4).run()
    assert [len(b) for b in stage.batches] == [2, 2, 2]


@pytest.mark.parametrize("live", [False, True])
def test_source_error_is_reported(live):
    def broken():
        yield from _results(3)
        raise OSError("disk gone")

    result = Pipeline(broken(), [Record()], live=live).run()
    assert isinstance(result.error, OSError) and result.frames_out + result.dropped == 3
