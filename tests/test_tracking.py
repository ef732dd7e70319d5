"""MediaPipe tracking on real faces, the crop it produces, the 68-point box subset, and the canonical mesh."""

from __future__ import annotations

import logging
import os
import zipfile
from collections import Counter

import numpy as np
import pytest
import skimage.data

from realtime.crop import ARCFACE_TEMPLATE, arcface_matrix, arcface_points, crop_matrix, warp_arcface, warp_crop
from realtime.errors import AssetError, UserError
from realtime.face_mesh import canonical_face_mesh
from realtime.sources import open_source
from realtime.tracking import BLENDSHAPE_NAMES, IBUG68_FROM_MEDIAPIPE, FaceTracker
from realtime.types import Frame

# iBUG-68 left/right mirror pairs and midline points (0-based).
IBUG_MIRROR_PAIRS = (
    [(i, 16 - i) for i in range(8)]
    + [(17, 26), (18, 25), (19, 24), (20, 23), (21, 22), (31, 35), (32, 34)]
    + [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]
    + [(48, 54), (49, 53), (50, 52), (59, 55), (58, 56), (60, 64), (61, 63), (67, 65)]
)
IBUG_MIDLINE = (8, 27, 28, 29, 30, 33, 51, 57, 62, 66)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return np.ascontiguousarray(skimage.data.astronaut())


@pytest.fixture(scope="module")
def image_tracker(face_model_path):
    with FaceTracker(face_model_path, mode="image") as tracker:
        yield tracker


@pytest.fixture(scope="module")
def astronaut_face(image_tracker, astronaut):
    faces = image_tracker.track(Frame(index=0, pts=0.0, image=astronaut))
    assert len(faces) == 1
    return faces[0]


def inside(points: np.ndarray, box) -> bool:
    left, top, right, bottom = box
    x, y = points[:, 0], points[:, 1]
    return bool(np.all((x >= left) & (x <= right) & (y >= top) & (y <= bottom)))


def to_uint8_hwc(crop: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray((crop.transpose(1, 2, 0) * 255.0).round().clip(0, 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------------- real faces


def test_carphone_is_tracked_on_almost_every_frame(carphone_path, face_model_path):
    tracked = 0
    centers = []
    with FaceTracker(face_model_path, mode="video") as tracker, open_source(str(carphone_path)) as source:
        for frame in source:
            faces = tracker.track(frame)
            assert len(faces) <= 1
            if not faces:
                continue
            tracked += 1
            face = faces[0]
            assert face.landmarks.shape == (478, 3) and face.landmarks.dtype == np.float32
            assert face.blendshapes.shape == (52,) and np.all((face.blendshapes >= 0) & (face.blendshapes <= 1))
            assert face.transform.shape == (4, 4)
            np.testing.assert_allclose(face.transform[3], [0, 0, 0, 1], atol=1e-5)
            assert face.index == 0 and face.track_id == 0
            np.testing.assert_allclose(face.crop_matrix, crop_matrix(face.center, face.size, 224))
            assert inside(face.landmarks[list(IBUG68_FROM_MEDIAPIPE), :2], face.box)
            centers.append(face.center)
    assert tracked >= 114  # ≥ 95 % of 120
    # The face is the same man throughout: the box moves smoothly, a few pixels per frame at most.
    assert np.abs(np.diff(np.array(centers), axis=0)).max() < 8


def test_astronaut_box_contains_the_face_and_lies_in_the_image(astronaut_face, astronaut):
    face = astronaut_face
    height, width = astronaut.shape[:2]
    left, top, right, bottom = face.box
    assert 0 <= left < right <= width and 0 <= top < bottom <= height
    features = face.landmarks[[468, 473, 1, 61, 291], :2]  # eyes, nose tip, mouth corners
    assert inside(features, face.box)
    assert inside(face.landmarks[list(IBUG68_FROM_MEDIAPIPE), :2], face.box)
    # Measured: 123 px = 24 % of 512. inferno's kpt68 box is tight around brows-to-chin; the whole
    # 478-point mesh (forehead included) would give 134 px.
    assert 0.20 * width <= face.size <= 0.60 * width
    assert face.size == float(int(face.size))
    # The features sit where a face's do: eyes above the nose, nose above the mouth, eyes level.
    eye_l, eye_r, nose, mouth_l, mouth_r = features
    assert eye_l[0] < nose[0] < eye_r[0] and mouth_l[0] < mouth_r[0]
    assert max(eye_l[1], eye_r[1]) < nose[1] < min(mouth_l[1], mouth_r[1])
    assert abs(eye_l[1] - eye_r[1]) < 0.05 * face.size


def test_astronaut_smiles(astronaut_face):
    scores = dict(zip(BLENDSHAPE_NAMES, astronaut_face.blendshapes))
    assert scores["mouthSmileLeft"] > 0.5 and scores["mouthSmileRight"] > 0.5
    assert scores["eyeBlinkLeft"] < 0.5 and scores["jawOpen"] < 0.5


def test_astronaut_crop_is_centred_on_the_face(astronaut_face, astronaut, image_tracker):
    crop = warp_crop(astronaut, astronaut_face.crop_matrix)
    nose = astronaut_face.crop_matrix @ np.r_[astronaut_face.landmarks[1, :2], 1.0]
    assert np.all(np.abs(nose - 111.5) < 0.05 * 224)
    # Tracking the crop itself finds the face again, boxed as the whole crop: the crop is inferno's framing.
    (again,) = image_tracker.track(Frame(index=1, pts=0.0, image=to_uint8_hwc(crop)))
    assert np.all(np.abs(np.array(again.center) - 111.5) < 4)
    assert again.size == pytest.approx(224, rel=0.05)
    assert np.all(np.abs(again.landmarks[1, :2] - 111.5) < 0.05 * 224)


def test_astronaut_arcface_crop_puts_the_eyes_on_the_template(astronaut_face, astronaut, image_tracker):
    matrix = arcface_matrix(arcface_points(astronaut_face.landmarks))
    eyes = astronaut_face.landmarks[[468, 473], :2]
    mapped = np.c_[eyes, np.ones(2)] @ matrix.T
    assert np.all(np.linalg.norm(mapped - ARCFACE_TEMPLATE[:2], axis=1) < 3.0)
    # The pixels agree: MediaPipe finds the eyes at the template spots in the 112×112 crop (×4 to be detectable).
    crop = warp_arcface(astronaut, matrix)
    assert crop.shape == (3, 112, 112)
    pixels = np.ascontiguousarray((crop.transpose(1, 2, 0) * 127.5 + 127.5).round().clip(0, 255).astype(np.uint8))
    enlarged = np.ascontiguousarray(np.kron(pixels, np.ones((4, 4, 1), np.uint8)))
    (face,) = image_tracker.track(Frame(index=2, pts=0.0, image=enlarged))
    assert np.all(np.linalg.norm(face.landmarks[[468, 473], :2] / 4 - ARCFACE_TEMPLATE[:2], axis=1) < 4.0)


def test_blendshape_names_are_mediapipes(face_model_path, astronaut):
    import mediapipe as mp
    from mediapipe.tasks.python import vision
    from mediapipe.tasks.python.core.base_options import BaseOptions

    options = vision.FaceLandmarkerOptions(base_options=BaseOptions(model_asset_path=str(face_model_path)),
                                           output_face_blendshapes=True)
    with vision.FaceLandmarker.create_from_options(options) as landmarker:
        result = landmarker.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=astronaut))
    assert tuple(c.category_name for c in result.face_blendshapes[0]) == BLENDSHAPE_NAMES


def test_video_mode_accepts_repeated_timestamps_and_live_mode_tracks(face_model_path, astronaut):
    frame = Frame(index=0, pts=1.0, image=astronaut)
    with FaceTracker(face_model_path, mode="video") as tracker:
        assert len(tracker.track(frame)) == 1
        assert len(tracker.track(Frame(index=1, pts=1.0, image=astronaut))) == 1  # same pts: still strictly increasing
        assert len(tracker.track(Frame(index=2, pts=0.5, image=astronaut))) == 1  # pts going back (a seek)
    with FaceTracker(face_model_path, mode="live") as tracker:
        assert [len(tracker.track(frame)) for _ in range(3)] == [1, 1, 1]


def test_no_face_gives_an_empty_list(image_tracker):
    assert image_tracker.track(Frame(index=0, pts=0.0, image=np.full((240, 320, 3), 90, np.uint8))) == []


def test_gpu_request_falls_back_to_cpu_with_one_warning(face_model_path, astronaut, caplog, capfd):
    with caplog.at_level(logging.WARNING, logger="realtime.tracking"):
        with FaceTracker(face_model_path, mode="image", device="gpu") as tracker:
            assert len(tracker.track(Frame(index=0, pts=0.0, image=astronaut))) == 1
    warnings = [r for r in caplog.records if r.name == "realtime.tracking"]
    if tracker.device == "cpu":  # no usable GL/GPU here
        assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
        assert "OpenGL ES" in warnings[0].getMessage()
    else:
        assert warnings == []
    # MediaPipe's own start-up lines (a page of EGL stack traces when the GPU fails) stay off the terminal.
    assert capfd.readouterr().err == ""


def test_native_start_up_lines_are_held_back_and_other_output_passed_on(capfd):
    from realtime.tracking import _quiet_native_stderr

    with _quiet_native_stderr():
        os.write(2, b"W0000 00:00:1795680125.6 28326 face_landmarker_graph.cc:181] Sets acceleration to xnnpack.\n"
                    b"Stack trace:\n    @     0x7f274cee20cd  absl::StatusBuilder::Create()\n"
                    b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n"
                    b"renderer: could not open the window (another thread's log line)\n")
    assert capfd.readouterr().err == "renderer: could not open the window (another thread's log line)\n"


def test_missing_and_corrupt_model_files(tmp_path):
    missing = tmp_path / "face_landmarker.task"
    with pytest.raises(AssetError) as exc:
        FaceTracker(missing)
    assert str(missing) in str(exc.value)
    corrupt = tmp_path / "broken.task"
    corrupt.write_bytes(b"this is not a zip" * 50)
    with pytest.raises(AssetError) as exc:
        FaceTracker(corrupt)
    assert str(corrupt) in str(exc.value) and "\n" not in str(exc.value)


def test_bad_options_are_user_errors(face_model_path):
    with pytest.raises(UserError, match="mode"):
        FaceTracker(face_model_path, mode="stream")
    with pytest.raises(UserError, match="device"):
        FaceTracker(face_model_path, device="tpu")


# ---------------------------------------------------------------------------------------------- 68-point subset


def test_ibug68_subset_mirrors_through_the_canonical_face(face_model_path):
    vertices, _, _ = canonical_face_mesh(face_model_path)
    index = np.array(IBUG68_FROM_MEDIAPIPE)
    assert len(index) == 68 and len(set(IBUG68_FROM_MEDIAPIPE)) == 68 and index.max() < 468
    points = vertices[index]
    for right, left in IBUG_MIRROR_PAIRS:
        np.testing.assert_allclose(points[left], points[right] * [-1, 1, 1], atol=1e-3, err_msg=f"iBUG {right}/{left}")
        assert points[right][0] < 0  # the subject's right is on the image left (x < 0)
    np.testing.assert_allclose(points[list(IBUG_MIDLINE), 0], 0.0, atol=1e-3)
    # iBUG's vertical order: brows above eyes above the nose tip above the mouth above the chin.
    brow_y, eye_y, tip_y, mouth_y, chin_y = (points[s, 1].mean() for s in
                                             (slice(17, 27), slice(36, 48), [30], slice(48, 60), [8]))
    assert brow_y > eye_y > tip_y > mouth_y > chin_y


# ---------------------------------------------------------------------------------------------- canonical mesh


def test_canonical_face_mesh_topology_and_orientation(face_model_path):
    vertices, uv, triangles = canonical_face_mesh(face_model_path)
    assert vertices.shape == (468, 3) and vertices.dtype == np.float32
    assert uv.shape == (468, 2) and uv.dtype == np.float32
    assert triangles.dtype == np.int32 and triangles.shape[1] == 3
    assert 880 <= len(triangles) <= 910
    assert triangles.min() >= 0 and triangles.max() < 468
    assert len(np.unique(triangles)) == 468  # every vertex is used
    # Consistent winding: a shared edge is walked in opposite directions by its two triangles,
    # so no directed edge occurs twice.
    directed = Counter(map(tuple, np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]])))
    assert max(directed.values()) == 1
    # Counter-clockwise from the front: the normals of the frontal region face +z (the camera).
    corners = vertices[triangles].astype(np.float64)
    normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    centroids = corners.mean(axis=1)
    frontal = (np.abs(centroids[:, 0]) < 4) & (centroids[:, 1] > 0)  # forehead, brows, eyes, upper cheeks
    assert frontal.sum() > 100 and np.mean(normals[frontal, 2] > 0) > 0.98
    assert np.mean(normals[:, 2] > 0) > 0.95
    # World frame of types.py: y up (forehead above chin), x toward the subject's left, z toward the camera.
    assert vertices[10, 1] > vertices[152, 1]
    assert vertices[263, 0] > 0 > vertices[33, 0]
    assert vertices[:, 2].argmax() == 4  # the tip of the nose is nearest the camera
    # Texture coordinates in [0, 1], v up like FLAME's: the forehead is above the chin in the texture too.
    assert uv.min() >= 0 and uv.max() <= 1
    assert uv[10, 1] > uv[152, 1]


def test_canonical_face_mesh_asset_errors(tmp_path):
    with pytest.raises(AssetError) as exc:
        canonical_face_mesh(tmp_path / "missing.task")
    assert "missing.task" in str(exc.value)
    no_mesh = tmp_path / "other.task"
    with zipfile.ZipFile(no_mesh, "w") as bundle:
        bundle.writestr("face_detector.tflite", b"\0" * 16)
    with pytest.raises(AssetError) as exc:
        canonical_face_mesh(no_mesh)
    assert str(no_mesh) in str(exc.value)
    damaged = tmp_path / "damaged.task"
    with zipfile.ZipFile(damaged, "w") as bundle:
        bundle.writestr("geometry_pipeline_metadata_landmarks.binarypb", b"\x0a\xff\xff\xff\x0f\x01")  # truncated
    with pytest.raises(AssetError) as exc:
        canonical_face_mesh(damaged)
    assert str(damaged) in str(exc.value)


@pytest.mark.parametrize("realtime", [False, True])
def test_per_frame_tracking_is_mediapipe_image_mode_on_every_frame(tmp_path, carphone_path, face_model_path, realtime):
    # --per_frame_tracking gives the raw per-frame detections (no MediaPipe tracking or landmark smoothing),
    # for files and live input alike, and still numbers the face as one track.
    from realtime.cli import main
    from realtime.export import load_results

    def landmarks(name: str, *flags: str) -> dict:
        rc = main(["--input", str(carphone_path), "--output_folder", str(tmp_path / name), "--model_name", "mediapipe",
                   "--export", "npz", "--max_frames", "12", "--save_images", "false", "--save_video", "false",
                   "--progress", "false", "--smoothing", "off", *flags])
        assert rc == 0
        (path,) = (tmp_path / name).rglob("results.npz")
        return load_results(path)

    if realtime:  # live input: frames may be dropped, so compare the frames that came through
        got = landmarks("per_frame", "--per_frame_tracking", "--realtime", "--show", "false", "--record", str(tmp_path / "r.mp4"))
    else:
        got = landmarks("per_frame", "--per_frame_tracking")
        assert len(got["frame_index"]) == 12
    assert set(got["track_id"].tolist()) == {0}
    with FaceTracker(face_model_path, mode="image") as tracker, open_source(str(carphone_path)) as source:
        want = {frame.index: tracker.track(frame)[0].landmarks[:, :2] for frame, _ in zip(source, range(12))}
    for index, points in zip(got["frame_index"].tolist(), got["landmarks_mediapipe"]):
        np.testing.assert_allclose(points, want[index], atol=1e-3)
    if not realtime:  # the default VIDEO mode is different input: tracked, smoothed by MediaPipe
        tracked = landmarks("video")
        assert np.abs(tracked["landmarks_mediapipe"][1:] - got["landmarks_mediapipe"][1:]).max() > 0.05


def test_live_sessions_export_into_their_own_folders(tmp_path, carphone_path, monkeypatch):
    # Two live sessions started within the same second must not overwrite each other's results file.
    import realtime.runner
    from realtime.cli import main
    from realtime.export import load_results

    monkeypatch.setattr(realtime.runner.time, "strftime", lambda fmt, *a: "session_2026_Nov_26_05-00-00")

    for _ in range(2):
        assert main(["--input", str(carphone_path), "--realtime", "--show", "false", "--output_folder", str(tmp_path),
                     "--model_name", "mediapipe", "--export", "json", "--max_frames", "3", "--progress", "false"]) == 0
    files = sorted(tmp_path.glob("session_*/results.json"))
    assert [f.parent.name for f in files] == ["session_2026_Nov_26_05-00-00", "session_2026_Nov_26_05-00-00_2"]
    for path in files:
        assert len(load_results(path)["frame_index"]) >= 1
