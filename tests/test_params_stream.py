"""Live parameter stream: a UDP listener on 127.0.0.1 receives the documented messages and numbers."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest

from realtime.errors import UserError
from realtime.sinks.params_stream import MAX_DATAGRAM, ParamStreamSink, parse_udp_url
from realtime.types import Face, Frame, FrameResult, Reconstruction

KEYS = {"schema", "version", "frame", "pts", "track_id", "face_index", "model", "codes", "cam", "crop_matrix", "blendshapes", "transform"}


def make_result(rng, index: int, n_faces: int = 2, skip: tuple[int, ...] = ()) -> FrameResult:
    faces, recs = [], []
    for k in range(n_faces):
        face = Face(
            index=k,
            track_id=10 + k,
            landmarks=rng.uniform(0, 640, (478, 3)).astype(np.float32),
            blendshapes=rng.uniform(0, 1, 52).astype(np.float32),
            transform=rng.normal(size=(4, 4)).astype(np.float32),
            center=(300.0, 200.0),
            size=150.0,
            crop_matrix=rng.normal(size=(2, 3)),
        )
        faces.append(face)
        if k in skip:
            continue
        sizes = dict(shapecode=300, expcode=100, texcode=50, jawpose=3, globalpose=3, cam=3, lightcode=27)
        codes = {name: rng.normal(size=n).astype(np.float32) for name, n in sizes.items()}
        recs.append(Reconstruction(face=face, vertices=rng.normal(size=(5023, 3)).astype(np.float32),
                                   faces=np.zeros((9976, 3), np.int32), world_to_frame=np.eye(4), codes=codes))
    frame = Frame(index=index, pts=index / 30.0, image=np.zeros((4, 4, 3), np.uint8))
    return FrameResult(frame=frame, faces=faces, reconstructions=recs)


@pytest.fixture
def listener():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5.0)
    yield sock
    sock.close()


def receive(sock, n: int) -> list[tuple[bytes, dict]]:
    return [(data, json.loads(data)) for data, _ in (sock.recvfrom(65536) for _ in range(n))]


def test_listener_receives_documented_messages_with_the_numbers_sent(listener):
    port = listener.getsockname()[1]
    rng = np.random.default_rng(0)
    results = [make_result(rng, t, skip=(1,) if t == 1 else ()) for t in range(3)]
    with ParamStreamSink(f"udp://127.0.0.1:{port}", model_name="EMICA-CVT_flame2020_notexture") as sink:
        for r in results:
            sink.write(r)
        assert sink.sent == 6 and sink.errors == 0
    messages = receive(listener, 6)
    for (data, msg), (result, face) in zip(messages, [(r, f) for r in results for f in r.faces]):
        assert set(msg) == KEYS
        assert msg["schema"] == "emica-realtime/params" and msg["version"] == 1
        assert msg["model"] == "EMICA-CVT_flame2020_notexture"
        assert msg["frame"] == result.frame.index and msg["pts"] == result.frame.pts
        assert msg["track_id"] == face.track_id and msg["face_index"] == face.index
        assert len(data) < MAX_DATAGRAM and b" " not in data  # compact, no vertices
        np.testing.assert_array_equal(np.float32(msg["crop_matrix"]), face.crop_matrix.astype(np.float32))
        np.testing.assert_array_equal(np.float32(msg["blendshapes"]), face.blendshapes)
        np.testing.assert_array_equal(np.float32(msg["transform"]), face.transform)
        rec = next((x for x in result.reconstructions if x.face.index == face.index), None)
        if rec is None:  # the model skipped this face: tracking data only
            assert msg["codes"] == {} and msg["cam"] is None
            continue
        assert set(msg["codes"]) == {"shapecode", "expcode", "texcode", "jawpose", "globalpose", "lightcode"}
        for name, values in msg["codes"].items():
            np.testing.assert_array_equal(np.float32(values), rec.codes[name])  # float32-exact
        np.testing.assert_array_equal(np.float32(msg["cam"]), rec.codes["cam"])


def test_values_are_float32_rounded_and_non_finite_become_null(listener):
    port = listener.getsockname()[1]
    result = make_result(np.random.default_rng(1), 0, n_faces=1)
    result.reconstructions[0].codes = {"expcode": np.array([0.1, np.nan, -2.5e-8], np.float32), "cam": np.array([8, 0, 0], np.float32)}
    with ParamStreamSink(f"udp://127.0.0.1:{port}") as sink:
        sink.write(result)
    (data, msg), = receive(listener, 1)
    assert b'"expcode":[0.1,null,-2.5e-08]' in data
    assert msg["cam"] == [8.0, 0.0, 0.0]


def test_send_failures_and_oversize_messages_are_counted_not_raised(listener):
    port = listener.getsockname()[1]
    rng = np.random.default_rng(2)
    sink = ParamStreamSink(f"udp://localhost:{port}")
    big = make_result(rng, 0, n_faces=1)
    big.reconstructions[0].codes["detailcode"] = rng.normal(size=20000).astype(np.float32)
    sink.write(big)
    assert sink.oversize == 1 and sink.sent == 0

    class FullBuffer:
        def sendto(self, data, address):
            raise BlockingIOError(11, "Resource temporarily unavailable")

        def close(self):
            pass

    sink._sock = FullBuffer()  # what a non-blocking socket does when the send buffer is full
    sink.write(make_result(rng, 1))
    assert sink.errors == 2 and sink.sent == 0
    sink.close()
    sink.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        sink.write(make_result(rng, 2))


def test_loopback_only_unless_remote_is_allowed():
    with pytest.raises(UserError, match=r"would send face data off this machine \(192\.0\.2\.7\).*loopback"):
        ParamStreamSink("udp://192.0.2.7:9870")
    sink = ParamStreamSink("udp://192.0.2.7:9870", allow_remote=True)  # TEST-NET: may or may not route here
    sink.write(make_result(np.random.default_rng(3), 0, n_faces=1))
    assert sink.sent + sink.errors == 1
    sink.close()


def test_ipv6_loopback_counts_as_loopback():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    sink = ParamStreamSink("udp://[::1]:9870")
    assert sink.address[0] == "::1"
    sink.close()


@pytest.mark.parametrize("url", ["tcp://127.0.0.1:9870", "udp://127.0.0.1", "udp://127.0.0.1:99999", "udp://127.0.0.1:9870/x", "9870"])
def test_bad_urls_are_user_errors(url):
    with pytest.raises(UserError, match=r"use udp://HOST:PORT, e\.g\. udp://127\.0\.0\.1:9870"):
        ParamStreamSink(url)


def test_url_parsing():
    assert parse_udp_url("udp://127.0.0.1:9870") == ("127.0.0.1", 9870)
    assert parse_udp_url("udp://[::1]:5000") == ("::1", 5000)
    assert parse_udp_url("udp://:5000") == ("127.0.0.1", 5000)
    with pytest.raises(UserError, match="cannot be resolved"):
        ParamStreamSink("udp://no-such-host.invalid:9870")
