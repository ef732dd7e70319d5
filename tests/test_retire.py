"""Retired tracks free their per-track state downstream: the tracker lists them on the frame
(`FrameResult.retired_tracks`) and the reconstructor drops their identity codes and smoothing filters after
processing that frame, so a long session with many passers-by holds state for the live tracks only."""

from __future__ import annotations

import time

import numpy as np
import pytest

from realtime.config import ModelConfig, RunConfig
from realtime.lookahead import LookaheadPipeline, LookaheadSmoother
from realtime.pipeline import LatestQueue, Pipeline
from realtime.reconstruct import MediaPipeMeshReconstructor
from realtime.runner import ReconstructStage, TrackStage
from realtime.smoothing import ParamSmoother
from realtime.tracks import TrackAssigner
from realtime.types import Face, Frame, FrameResult
from tests.fakes import face_at

FPS = 30.0
MAX_LOST = 15  # TrackStage's TrackAssigner() default


def make_face(cx: float, cy: float, size: float, index: int = 0, track_id: int = -1) -> Face:
    half = size / 2
    # Frame pixel → crop pixel of the 224 crop, so the model stage cuts the face's own box.
    crop = np.array([[224 / size, 0, -(cx - half) * 224 / size], [0, 224 / size, -(cy - half) * 224 / size]])
    return face_at(cx, cy, size, index=index, track_id=track_id, crop_matrix=crop)


def smoothed_tracks(smoother: ParamSmoother) -> set[int]:
    """Track ids that hold filter state (reset() rebinds the dict, so read it afresh each time)."""
    return {track_id for track_id, _ in smoother._filters}


class Scene:
    """Stands in for the ParallelTracker TrackStage can take: detections per frame index, no MediaPipe.

    Face "A" stays all along; visitor k is in view for frames 10k … 10k+5 at one of five spots far apart
    (and from A), so each visitor gets a new id, and each is retired MAX_LOST + 1 frames after it leaves.
    """

    def __init__(self, frames: int):
        self.frames = frames

    @staticmethod
    def detections(t: int) -> list[tuple[float, float]]:
        dets = [(100.0, 100.0)]
        k, age = divmod(t, 10)
        if age < 6:
            dets.append((300.0 + 150.0 * (k % 5), 350.0))
        return dets

    def faces_for(self, frame: Frame) -> list[Face]:
        return [make_face(x, y, 60.0, index=i) for i, (x, y) in enumerate(self.detections(frame.index))]

    def close(self) -> None:
        pass

    def results(self, delay: float = 0.0):
        for t in range(self.frames):
            if delay:
                time.sleep(delay)
            yield FrameResult(frame=Frame(index=t, pts=t / FPS, image=np.zeros((4, 4, 3), np.uint8)))


class ProbedMesh(MediaPipeMeshReconstructor):
    """The MediaPipe mesh with a causal smoother that records, in the model thread, the ids it holds after each batch."""

    def __init__(self, delay: float = 0.0):
        super().__init__(smoother=ParamSmoother("default"))
        self.delay = delay
        self.held: list[set[int]] = []
        self.seen: set[int] = set()
        self.faces_in = self.reconstructions_out = 0

    def reconstruct(self, batch: list[FrameResult]) -> None:
        super().reconstruct(batch)
        for r in batch:
            self.seen.update(f.track_id for f in r.faces)
            self.faces_in += len(r.faces)
            self.reconstructions_out += len(r.reconstructions)
        self.held.append(smoothed_tracks(self.smoother))
        time.sleep(self.delay)


@pytest.mark.parametrize("how", ["file", "file-batched", "lookahead-batched", "live"])
def test_many_short_lived_tracks_keep_the_held_state_bounded(how):
    scene = Scene(200)
    track = TrackStage(RunConfig(), "live" if how == "live" else "video", parallel=scene)
    mesh = ProbedMesh(delay=0.01 if how == "live" else 0.0)  # live: a slow model stage makes frames drop
    stages = [track, ReconstructStage(mesh)]
    batch = 1 if how in ("file", "live") else 4
    if how == "lookahead-batched":
        pipe = LookaheadPipeline(scene.results(), stages, [], LookaheadSmoother(mesh, ParamSmoother("default"), 3),
                                 batch_size=batch)
    else:
        pipe = Pipeline(scene.results(delay=0.001 if how == "live" else 0.0), stages, live=how == "live",
                        batch_size=batch)
    result = pipe.run()
    assert result.error is None

    a = 0  # A is detection 0 of the first frame tracked, so it gets the first id
    visitors = mesh.seen - {a}
    assert mesh.reconstructions_out == mesh.faces_in  # every face was still reconstructed
    if how == "live":
        # Frames dropped between the track and model stages hand their retired ids on to the next frame.
        assert pipe._queues[1].dropped > 0
        assert len(visitors) >= 5
    else:
        assert len(visitors) == 20
        assert max(len(h) for h in mesh.held[:-1]) > 2  # several visitors overlapped (the bound below is not idle)
    # At most A plus the visitors still in view or lost for at most MAX_LOST frames (≤ 3 at 10-frame spacing),
    # against 21 ids were nothing freed.
    assert max(len(h) for h in mesh.held) <= 4
    assert all(a in h for h in mesh.held)  # the track that stays keeps its filters throughout
    # At the end exactly the tracks the assigner still keeps hold state: every retired one was freed.
    assert smoothed_tracks(mesh.smoother) == set(track.assigner.track_ids) & mesh.seen
    assert smoothed_tracks(mesh.smoother) < mesh.seen


def test_frame_carries_the_ids_its_assign_call_retired():
    scene = Scene(40)
    track = TrackStage(RunConfig(), "video", parallel=scene)
    track.setup()
    results = list(scene.results())
    track.process(results)
    retired = {r.frame.index: r.retired_tracks for r in results if r.retired_tracks}
    ids = [[f.track_id for f in r.faces] for r in results]
    # Visitor 0 is last seen at frame 5 and retired MAX_LOST + 1 frames later; visitor 1 likewise after frame 15.
    assert retired == {5 + MAX_LOST + 1: (ids[0][1],), 15 + MAX_LOST + 1: (ids[10][1],)}
    assert isinstance(results[0].retired_tracks, tuple) and results[0].retired_tracks == ()


def test_mesh_frees_a_retired_track_after_the_frame_that_retires_it_within_a_batch():
    mesh = MediaPipeMeshReconstructor(smoother=ParamSmoother("default"))
    image = np.zeros((4, 4, 3), np.uint8)
    f0 = FrameResult(frame=Frame(0, 0.0, image), faces=[make_face(100, 100, 60, 0, track_id=5), make_face(400, 100, 60, 1, track_id=6)])
    f1 = FrameResult(frame=Frame(1, 1 / FPS, image), faces=[make_face(400, 100, 60, 0, track_id=6)], retired_tracks=(5, 99))
    mesh.reconstruct([f0, f1])  # 5 has a face in the batch's first frame and is retired by its second
    assert len(f0.reconstructions) == 2 and len(f1.reconstructions) == 1
    assert smoothed_tracks(mesh.smoother) == {6}  # 99 was never seen: forgetting it is no error
    MediaPipeMeshReconstructor().reconstruct([FrameResult(frame=Frame(2, 2 / FPS, image), retired_tracks=(6,))])  # no smoother


def test_live_queue_hands_a_dropped_frames_retired_ids_to_the_next_frame():
    q = LatestQueue(2)
    for i in range(5):
        q.put(FrameResult(frame=Frame(i, i / FPS, np.zeros((4, 4, 3), np.uint8)), retired_tracks=(10 + i,)))
    kept = [q.get_nowait() for _ in range(2)]
    assert [r.frame.index for r in kept] == [3, 4]
    assert [r.retired_tracks for r in kept] == [(10, 11, 12, 13), (14,)]  # in stream order, none lost


def test_emica_frees_identity_code_and_filters_of_retired_tracks(synthetic_assets, tmp_path):
    from realtime.model_runtime import ModelReconstructor

    cfg = RunConfig(model=ModelConfig(assets_dir=str(synthetic_assets), device="cpu", backend="torch",
                                      engines_dir=str(tmp_path)))
    model = ModelReconstructor(cfg, smoother=ParamSmoother("default"), identity_cache=True)
    assigner = TrackAssigner(max_lost_frames=1)
    image = np.random.default_rng(1).integers(0, 255, (240, 560, 3), dtype=np.uint8)
    a, b = (100.0, 120.0), (420.0, 120.0)
    scene = [[a, b], [a, b], [a], [a], [], [], []]  # B leaves after frame 1, A after frame 3
    results = []
    for t, dets in enumerate(scene):
        faces = assigner.assign([make_face(x, y, 150.0, index=i) for i, (x, y) in enumerate(dets)], pts=t / FPS)
        results.append(FrameResult(frame=Frame(t, t / FPS, image), faces=faces, retired_tracks=tuple(assigner.retired)))
    id_a, id_b = (f.track_id for f in results[0].faces)
    assert results[3].retired_tracks == (id_b,) and results[5].retired_tracks == (id_a,)

    def held():
        return set(model.identity._ids), smoothed_tracks(model.smoother)

    model.reconstruct(results[0:1])
    assert held() == ({id_a, id_b}, {id_a, id_b})
    model.reconstruct(results[1:4])  # B's last face and its retirement in one batch
    assert [len(r.reconstructions) for r in results[1:4]] == [2, 1, 1]
    assert held() == ({id_a}, {id_a})  # B is gone; A, still tracked, keeps its identity and filters
    model.reconstruct(results[4:7])  # frames without faces still retire A
    assert held() == (set(), set())
