"""A real RTSP stream on 127.0.0.1: the source survives the server going away and coming back, and the
CLI records from it. The server is a small one of our own (RTSP 1.0 with RTP/H.264 interleaved on the
TCP connection, RFC 2326 §10.12 and RFC 6184), so the test needs no ffmpeg binary or media server."""

from __future__ import annotations

import base64
import logging
import re
import socket
import struct
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from realtime.cli import main
from realtime.errors import MediaError
from realtime.live import ResilientSource
from realtime.sources import open_source

RTP_PAYLOAD = 1400  # bytes of H.264 per RTP packet: FU-A fragments beyond it
CLOCK = 90000  # RTP clock rate for video


def encode_h264(path: Path) -> tuple[list[bytes], Fraction]:
    """The clip as H.264 access units (Annex B, SPS/PPS before every keyframe, a keyframe every 15 frames)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate
        pictures = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height = pictures[0].shape[1], pictures[0].shape[0]
    encoder.pix_fmt, encoder.time_base, encoder.framerate = "yuv420p", 1 / rate, rate
    encoder.max_b_frames = 0
    encoder.options = {"preset": "ultrafast", "tune": "zerolatency", "x264-params": "keyint=15:repeat-headers=1"}
    units = []
    for i, picture in enumerate(pictures + [None]):
        frame = None
        if picture is not None:
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts = i
        units += [bytes(p) for p in encoder.encode(frame)]
    assert len(units) == len(pictures)
    return units, rate


def nal_units(access_unit: bytes) -> list[bytes]:
    """Split an Annex B access unit at its start codes."""
    return [n.lstrip(b"\x00") for n in re.split(b"\x00\x00\x01", access_unit) if n.strip(b"\x00")]


def rtp_payloads(access_unit: bytes) -> list[bytes]:
    """RFC 6184 payloads: one packet per small NAL unit, FU-A fragments for large ones."""
    out = []
    for nal in nal_units(access_unit):
        if len(nal) <= RTP_PAYLOAD:
            out.append(nal)
            continue
        indicator = (nal[0] & 0xE0) | 28
        body = nal[1:]
        for start in range(0, len(body), RTP_PAYLOAD):
            flags = (0x80 if start == 0 else 0) | (0x40 if start + RTP_PAYLOAD >= len(body) else 0)
            out.append(bytes([indicator, flags | (nal[0] & 0x1F)]) + body[start:start + RTP_PAYLOAD])
    return out


class RtspServer:
    """Serves an H.264 clip in a loop, in real time, to each RTSP client (TCP-interleaved RTP only).

    ``stop()`` drops every connection and the listening socket (a crashed camera); ``start()`` again
    listens on the same port. ``stall()`` keeps the open connections but sends nothing more on them
    (a dead network path); clients that connect afterwards are served normally.
    """

    def __init__(self, units: list[bytes], rate: Fraction) -> None:
        self.units, self.rate = units, rate
        self.port = 0
        self._listener: socket.socket | None = None
        self._clients: list[tuple[socket.socket, threading.Event]] = []
        self._lock = threading.Lock()
        self.sessions = 0
        sps, pps = (next(n for n in nal_units(units[0]) if n[0] & 0x1F == t) for t in (7, 8))
        self._fmtp = (f"packetization-mode=1;profile-level-id={sps[1:4].hex()};"
                      f"sprop-parameter-sets={base64.b64encode(sps).decode()},{base64.b64encode(pps).decode()}")

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/live"

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(4)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        self._listener.close()
        with self._lock:
            for conn, _ in self._clients:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
            self._clients.clear()

    def stall(self) -> None:
        with self._lock:
            for _, stalled in self._clients:
                stalled.set()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # stopped
            stalled = threading.Event()
            with self._lock:
                self._clients.append((conn, stalled))
            threading.Thread(target=self._session, args=(conn, stalled), daemon=True).start()

    def _session(self, conn: socket.socket, stalled: threading.Event) -> None:
        reader = conn.makefile("rb")
        send_lock = threading.Lock()
        try:
            while True:
                first = reader.read(1)
                if not first:
                    return
                if first == b"$":  # the client's interleaved RTCP: skip it
                    _, length = struct.unpack(">BH", reader.read(3))
                    reader.read(length)
                    continue
                lines = [first + reader.readline()]
                while lines[-1] not in (b"\r\n", b"\n", b""):
                    lines.append(reader.readline())
                method, url = lines[0].decode().split()[:2]
                headers = dict(l.decode().split(":", 1) for l in lines[1:-1])
                headers = {k.strip().lower(): v.strip() for k, v in headers.items()}
                reader.read(int(headers.get("content-length", 0)))
                extra, body = self._answer(method, url, headers)
                reply = f"RTSP/1.0 200 OK\r\nCSeq: {headers.get('cseq', '0')}\r\n{extra}"
                reply += f"Content-Length: {len(body)}\r\n\r\n" if body else "\r\n"
                with send_lock:
                    conn.sendall(reply.encode() + body)
                if method == "PLAY":
                    self.sessions += 1
                    threading.Thread(target=self._send, args=(conn, send_lock, stalled), daemon=True).start()
                if method == "TEARDOWN":
                    return
        except (OSError, ValueError):
            return
        finally:
            conn.close()

    def _answer(self, method: str, url: str, headers: dict[str, str]) -> tuple[str, bytes]:
        if method == "OPTIONS":
            return "Public: OPTIONS, DESCRIBE, SETUP, PLAY, TEARDOWN, GET_PARAMETER\r\n", b""
        if method == "DESCRIBE":
            sdp = ("v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=carphone\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\n"
                   "a=control:*\r\nm=video 0 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n"
                   f"a=fmtp:96 {self._fmtp}\r\na=control:trackID=0\r\n")
            return f"Content-Base: {url}/\r\nContent-Type: application/sdp\r\n", sdp.encode()
        if method == "SETUP":
            if "interleaved" not in headers.get("transport", ""):
                raise ValueError("only RTP over the RTSP connection is served")
            return "Transport: RTP/AVP/TCP;unicast;interleaved=0-1\r\nSession: 1;timeout=60\r\n", b""
        return "Session: 1\r\n", b""  # PLAY, GET_PARAMETER, TEARDOWN

    def _send(self, conn: socket.socket, send_lock: threading.Lock, stalled: threading.Event) -> None:
        """Loop the clip at its frame rate, each frame as RTP packets on interleaved channel 0."""
        start, sequence, i = time.monotonic(), 0, 0
        while not stalled.is_set():
            delay = start + i / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(float(delay))
            payloads = rtp_payloads(self.units[i % len(self.units)])
            stamp = int(i * CLOCK / self.rate) & 0xFFFFFFFF
            for k, payload in enumerate(payloads):
                marker = 0x80 if k == len(payloads) - 1 else 0  # last packet of the picture
                rtp = struct.pack(">BBHII", 0x80, marker | 96, sequence & 0xFFFF, stamp, 0x5EED) + payload
                sequence += 1
                try:
                    with send_lock:
                        conn.sendall(b"$\x00" + struct.pack(">H", len(rtp)) + rtp)
                except OSError:
                    return
            i += 1


@pytest.fixture(scope="module")
def carphone_h264(carphone_path):
    return encode_h264(carphone_path)


@pytest.fixture
def rtsp_server(carphone_h264):
    server = RtspServer(*carphone_h264)
    server.start()
    yield server
    server.stop()


def is_banner(frame) -> bool:
    """A "no signal" frame: the darkened band with white lettering across the middle."""
    middle = frame.image[frame.image.shape[0] // 2]
    # The carphone's middle row is at most 19% dark; the banner's is ~76% (the rest is lettering).
    return (middle < 64).all(axis=1).mean() > 0.5 and (middle > 200).all(axis=1).any()


def test_stream_survives_the_server_going_away_and_coming_back(rtsp_server, caplog):
    caplog.set_level(logging.INFO, logger="realtime.live")
    source = open_source(rtsp_server.url)
    assert isinstance(source, ResilientSource)
    assert (source.width, source.height) == (176, 144)
    frames, marks = [], {}
    deadline = time.monotonic() + 40
    for frame in source:
        frames.append(frame)
        n = len(frames)
        if n == 45:  # 1.5 s in: the server crashes ...
            rtsp_server.stop()
            marks["stopped"] = time.monotonic()
        if "stopped" in marks and "restarted" not in marks and time.monotonic() - marks["stopped"] > 1.0:
            rtsp_server.start()  # ... and is back a second later on the same port
            marks["restarted"] = time.monotonic()
        if "restarted" in marks and sum(not is_banner(f) for f in frames[45:]) >= 30:
            break
        assert time.monotonic() < deadline, "the stream did not come back"
    source.close()

    banner = [is_banner(f) for f in frames]
    first_gap = banner.index(True)
    resumed = first_gap + banner[first_gap:].index(False)
    assert first_gap >= 40  # real pictures before the crash ...
    assert all(banner[first_gap:resumed]) and not any(banner[resumed:])  # ... one gap, then real ones again
    # The gap was bridged at the stream's rate (29.97 fps) for the whole outage.
    gap_seconds = frames[resumed].pts - frames[first_gap - 1].pts
    assert resumed - first_gap == pytest.approx(gap_seconds * 30000 / 1001, abs=6)
    assert 1.0 <= gap_seconds < 5.0
    assert [f.index for f in frames] == list(range(len(frames)))
    assert np.all(np.diff([f.pts for f in frames]) > 0)
    # After the restart the pictures are the clip again (a man in a car), not grey or garbage.
    after = frames[resumed + 5].image
    assert after.std() > 20
    assert rtsp_server.sessions == 2 and source.reconnects == 1 and source.outages == 1
    messages = [r.getMessage() for r in caplog.records if r.name == "realtime.live"]
    assert len(messages) == 2 and "signal lost" in messages[0] and "signal back" in messages[1]


def test_a_stalled_connection_times_out_and_reconnects(rtsp_server, caplog):
    caplog.set_level(logging.INFO, logger="realtime.live")
    source = open_source(rtsp_server.url)
    frames = []
    deadline = time.monotonic() + 30
    for frame in source:
        frames.append(frame)
        if len(frames) == 30:
            rtsp_server.stall()  # the connection stays open, nothing more arrives on it
        if len(frames) > 30 and sum(not is_banner(f) for f in frames[30:]) >= 15:
            break
        assert time.monotonic() < deadline, "the stream did not come back"
    source.close()
    lost = [r.getMessage() for r in caplog.records if "signal lost" in r.getMessage()]
    back = [r.getMessage() for r in caplog.records if "signal back" in r.getMessage()]
    assert len(lost) == 1 and "no frame for 1 s" in lost[0]
    # FFmpeg's 5 s read timeout ends the dead connection; the first retry 0.5 s later succeeds.
    outage = float(re.search(r"after a ([\d.]+) s outage", back[0]).group(1))
    assert 5.0 < outage < 8.0
    assert rtsp_server.sessions == 2 and source.reconnects == 1


def test_cli_records_from_the_stream_in_real_time(rtsp_server, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    n = 120  # 4 s of stream: the live pipeline drops what arrives while MediaPipe and EGL start up
    rc = main(["--input", rtsp_server.url, "--record", str(out), "--max_frames", str(n), "--model_name", "mediapipe",
               "--no_audio", "--log_level", "warning"])
    printed = capsys.readouterr().out
    assert rc == 0
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        ticks = [p.pts for p in container.demux(stream) if p.size]
        tick = round(1 / (stream.time_base * stream.average_rate))  # time-base units per frame at 29.97 fps
        container.seek(0)
        pictures = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(pictures) == len(ticks) and f"{len(pictures)} frames at" in printed
    dropped = re.search(r"dropped (\d+) frames", printed)
    # Every frame the source handed out is in the file or was dropped to stay live (while the stages warm up).
    assert len(pictures) + (int(dropped.group(1)) if dropped else 0) == n
    assert len(pictures) >= 20
    # Once running, the pipeline keeps up: the recorded frames sit one frame interval apart on the live clock.
    steps = np.diff(sorted(ticks)) / tick
    assert np.mean(np.abs(steps - 1) < 0.5) >= 0.8
    assert pictures[0].shape == (3 * 144, 176, 3)  # inferno's three stacked panels
    assert pictures[-1][:144].std() > 20  # the original panel shows the clip


def test_unreachable_stream_fails_fast_with_one_line(capsys):
    start = time.monotonic()
    rc = main(["--input", "rtsp://127.0.0.1:9/x", "--record", "never.mp4", "--model_name", "mediapipe"])
    assert time.monotonic() - start < 5
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "rtsp://127.0.0.1:9/x" in err and "refused" in err
    with pytest.raises(MediaError):
        open_source("rtsp://127.0.0.1:9/x")
