"""WebRTCSink: real aiortc viewers on loopback receive what the pipeline publishes."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from types import SimpleNamespace
from typing import Optional

import aiohttp
import aioice.ice
import av
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpReceiver, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from realtime.errors import UserError
from realtime.sinks.webrtc import (
    STAMP_HEIGHT,
    AudioFeed,
    PacketFanout,
    VideoEncoder,
    WebRTCSink,
    decode_stamp,
    draw_stamp,
)
from realtime.types import AudioChunk, Frame, FrameResult

LEFT = np.array([200, 40, 40], np.uint8)  # published frames: left half red-ish …
RIGHT = np.array([40, 60, 210], np.uint8)  # … right half blue-ish
TONE_HZ = 440.0


@pytest.fixture(autouse=True)
def loopback_ice(monkeypatch):
    """aioice skips 127.0.0.1 when gathering; offer it so both peers meet on loopback."""
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


def two_colour_frame(index: int, width: int = 160, height: int = 120, rate: int = 48000) -> FrameResult:
    """A frame split into two known colours, carrying 1/30 s of a 440 Hz tone."""
    image = np.empty((height, width, 3), np.uint8)
    image[:, : width // 2] = LEFT
    image[:, width // 2 :] = RIGHT
    n = rate // 30
    t = (index * n + np.arange(n)) / rate
    tone = (0.5 * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32)[:, None]
    chunk = AudioChunk(pts=index * n / rate, sample_rate=rate, samples=tone)
    return FrameResult(frame=Frame(index=index, pts=index / 30, image=image, audio=[chunk]))


class Feeder:
    """Writes two-colour frames to a sink at 30 fps from its own thread (like the pipeline does)."""

    def __init__(self, sink: WebRTCSink, **frame_kwargs):
        self.sink, self.frame_kwargs = sink, frame_kwargs
        self.written = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            self.sink.write(two_colour_frame(self.written, **self.frame_kwargs))
            self.written += 1
            self._stop.wait(max(0.0, start + self.written / 30 - time.monotonic()))

    def __enter__(self) -> "Feeder":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


async def post_offer(url: str, body, headers: Optional[dict] = None) -> tuple[int, str]:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "offer", data=data, headers=headers or {}) as response:
            return response.status, await response.text()


async def http_get(url: str, headers: Optional[dict] = None) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers=headers or {}) as response:
            return response.status, await response.text()


class Viewer:
    """An aiortc peer that asks the sink for video + audio, like the viewer page does."""

    def __init__(self, video_codec: Optional[str] = None) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        video = self.pc.addTransceiver("video", direction="recvonly")
        if video_codec:  # offer only this codec (plus RTX), like a browser without VP8 would
            caps = RTCRtpReceiver.getCapabilities("video").codecs
            video.setCodecPreferences([c for c in caps if c.mimeType in (video_codec, "video/rtx")])
        self.pc.addTransceiver("audio", direction="recvonly")
        self.tracks: dict = {}
        self.pc.on("track", lambda track: self.tracks.__setitem__(track.kind, track))

    async def connect(self, url: str, headers: Optional[dict] = None) -> tuple[int, str]:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        offer = {"sdp": self.pc.localDescription.sdp, "type": self.pc.localDescription.type}
        status, text = await post_offer(url, offer, headers)
        if status == 200:
            await self.pc.setRemoteDescription(RTCSessionDescription(**json.loads(text)))
        return status, text

    async def frames(self, kind: str, n: int, timeout: float = 20.0) -> list:
        """The next ``n`` decoded frames of one kind."""
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            try:
                out.append(await asyncio.wait_for(self.tracks[kind].recv(), deadline - time.monotonic()))
            except (asyncio.TimeoutError, MediaStreamError):
                break
        return out

    async def close(self) -> None:
        await self.pc.close()


def dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


def test_viewer_receives_stamped_video_and_audio():
    with WebRTCSink(port=0, stats=True) as sink:

        async def watch():
            viewer = Viewer()
            assert (await viewer.connect(sink.url))[0] == 200
            video, audio = await asyncio.gather(viewer.frames("video", 60), viewer.frames("audio", 60))
            await viewer.close()
            return video, audio

        with Feeder(sink) as feeder:
            video, audio = asyncio.run(watch())

    assert len(video) >= 60 and len(audio) >= 60
    images = [f.to_ndarray(format="rgb24") for f in video]
    assert images[-1].shape == (120, 160, 3)
    for image in images[-10:]:
        left = image[STAMP_HEIGHT + 8 : -8, 8:72].reshape(-1, 3).mean(axis=0)
        right = image[STAMP_HEIGHT + 8 : -8, 88:152].reshape(-1, 3).mean(axis=0)
        np.testing.assert_allclose(left, LEFT, atol=20)
        np.testing.assert_allclose(right, RIGHT, atol=20)
    # The stats stamp carries the written frame index through the codec.
    stamps = [decode_stamp(image) for image in images]
    assert all(s is not None for s in stamps)
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    assert stamps[-1] < feeder.written

    rate = audio[0].sample_rate
    pcm = np.concatenate([f.to_ndarray().reshape(-1, len(f.layout.channels))[:, 0] for f in audio[-25:]])
    pcm = pcm.astype(np.float32) / 32768
    assert np.sqrt(np.mean(pcm**2)) > 0.2  # the tone, not the silence sent while priming
    assert abs(dominant_hz(pcm, rate) - TONE_HZ) < 5


def test_three_viewers_share_the_stream_and_a_fourth_is_refused(monkeypatch):
    encodes = []
    real_encode = VideoEncoder.encode

    def counting_encode(self, image, pts):
        encodes.append(pts)
        return real_encode(self, image, pts)

    monkeypatch.setattr(VideoEncoder, "encode", counting_encode)
    with WebRTCSink(port=0, max_viewers=3) as sink:

        async def crowd():
            viewers = [Viewer() for _ in range(3)]
            for viewer in viewers:
                assert (await viewer.connect(sink.url))[0] == 200
            received = await asyncio.gather(*(v.frames("video", 30) for v in viewers))
            fourth = Viewer()
            refused = await fourth.connect(sink.url)
            await fourth.close()
            for viewer in viewers:
                await viewer.close()
            return received, refused

        with Feeder(sink) as feeder:
            received, (status, reason) = asyncio.run(crowd())
            deadline = time.monotonic() + 10
            while sink.viewers and time.monotonic() < deadline:
                time.sleep(0.1)
            assert sink.viewers == 0  # closed peers are cleaned up

    assert [len(r) for r in received] == [30, 30, 30]
    for frames in received:
        image = frames[-1].to_ndarray(format="rgb24")
        np.testing.assert_allclose(image[40:80, 8:72].reshape(-1, 3).mean(axis=0), LEFT, atol=20)
    assert status == 503 and "viewer limit" in reason and "3" in reason
    # One encode per published frame, shared by all three viewers (not one per viewer).
    assert len(encodes) == len(set(encodes)) and len(encodes) <= feeder.written


def test_vp8_and_h264_viewers_are_served_side_by_side():
    with WebRTCSink(port=0) as sink:

        async def watch():
            viewers = [Viewer("video/H264"), Viewer("video/VP8")]
            answers = [await v.connect(sink.url) for v in viewers]
            received = await asyncio.gather(*(v.frames("video", 20) for v in viewers))
            for viewer in viewers:
                await viewer.close()
            return answers, received

        with Feeder(sink):
            answers, received = asyncio.run(watch())
    assert "H264/90000" in answers[0][1] and "VP8/90000" not in answers[0][1]
    assert "VP8/90000" in answers[1][1]
    for frames in received:
        assert len(frames) == 20
        image = frames[-1].to_ndarray(format="rgb24")
        np.testing.assert_allclose(image[40:80, 88:152].reshape(-1, 3).mean(axis=0), RIGHT, atol=20)


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"this is not json", "not JSON"),
        ({"type": "offer"}, "missing field(s): sdp"),
        ({"sdp": "v=0", "type": "answer"}, '"type" must be "offer"'),
        ({"sdp": "certainly not SDP", "type": "offer"}, "no video"),
        ({"sdp": "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=recvonly\r\n", "type": "offer"}, "no video"),
        (
            {"sdp": "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=recvonly\r\na=rtpmap:96 AV1/90000\r\n", "type": "offer"},
            "none of the video codecs",
        ),
    ],
)
def test_bad_offer_is_400_with_reason(body, reason):
    with WebRTCSink(port=0) as sink:
        status, text = asyncio.run(post_offer(sink.url, body))
    assert status == 400
    assert reason in text and text.count("\n") == 1  # one line


def test_offer_with_broken_transport_is_400():
    """Parseable SDP that aiortc cannot use (no ICE credentials, no DTLS fingerprint)."""
    sdp = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=recvonly\r\na=rtpmap:96 VP8/90000\r\n"
    with WebRTCSink(port=0) as sink:
        status, text = asyncio.run(post_offer(sink.url, {"sdp": sdp, "type": "offer"}))
        assert sink.viewers == 0  # the refused peer does not hold a slot
    assert status == 400 and text.startswith("offer rejected")


def test_only_page_and_offer_are_served():
    with WebRTCSink(port=0) as sink:
        page = asyncio.run(http_get(sink.url))
        missing = asyncio.run(http_get(sink.url + "viewer.js"))
    assert page[0] == 200 and "<video" in page[1] and "Unmute" in page[1]
    assert missing[0] == 404


def test_non_loopback_bind_without_token_is_refused():
    with pytest.raises(UserError, match="--webrtc_token"):
        WebRTCSink(host="0.0.0.0", port=0)


def test_token_is_required_when_set():
    with WebRTCSink(port=0, token="s3cret") as sink:
        base = sink.url.split("?")[0]
        assert sink.url == base + "?token=s3cret"

        async def probe():
            viewer = Viewer()
            with_header = await viewer.connect(base, {"Authorization": "Bearer s3cret"})
            await viewer.close()
            intruder = Viewer()
            without = await intruder.connect(base)
            wrong = await intruder.connect(base, {"Authorization": "Bearer guess"})
            await intruder.close()
            return (
                await http_get(base),
                await http_get(base + "?token=wrong"),
                await http_get(sink.url),
                await http_get(base, {"Authorization": "Bearer s3cret"}),
                without,
                wrong,
                with_header,
            )

        page_none, page_wrong, page_query, page_header, offer_none, offer_wrong, offer_ok = asyncio.run(probe())
    assert page_none[0] == page_wrong[0] == offer_none[0] == offer_wrong[0] == 401
    assert "token" in page_none[1]
    assert page_query[0] == page_header[0] == 200 and "<video" in page_query[1]
    assert offer_ok[0] == 200 and json.loads(offer_ok[1])["type"] == "answer"


def test_auto_token_prints_the_url_once(capsys):
    with WebRTCSink(port=0, token="auto") as sink:
        printed = capsys.readouterr().out
        status, _ = asyncio.run(http_get(sink.url))
    token = sink.url.split("?token=")[1]
    assert len(token) >= 16 and printed.count(sink.url) == 1
    assert status == 200


def test_busy_port_is_a_user_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UserError, match=f"127.0.0.1:{port}.*--webrtc HOST:PORT"):
            WebRTCSink(port=port)


def test_write_never_waits_for_the_encoder(monkeypatch):
    """Even with the encoder stalled, write() returns at once (latest frame wins)."""
    stalled = threading.Event()

    def slow_encode(self, image, pts):
        stalled.set()
        time.sleep(0.5)
        return []

    monkeypatch.setattr(VideoEncoder, "encode", slow_encode)
    frame = two_colour_frame(0, 640, 480)
    with WebRTCSink(port=0) as sink:

        async def scenario() -> list[float]:
            viewer = Viewer()
            await viewer.connect(sink.url)
            deadline = time.monotonic() + 10
            while not stalled.is_set() and time.monotonic() < deadline:  # until a viewer pulls frames
                sink.write(frame)
                await asyncio.sleep(0.03)
            assert stalled.is_set()
            durations = []
            for _ in range(60):
                t = time.perf_counter()
                sink.write(frame)
                durations.append(time.perf_counter() - t)
            await viewer.close()
            return durations

        durations = asyncio.run(scenario())
    assert max(durations) < 0.05  # vs 0.5 s per stalled encode


def test_close_is_idempotent_and_frees_the_port():
    sink = WebRTCSink(port=0)
    port = sink.port
    sink.close()
    sink.close()
    sink.write(two_colour_frame(0))  # after close: ignored, no error
    again = WebRTCSink(port=port)
    again.close()


@pytest.mark.parametrize("codec", ["video/VP8", "video/H264"])
def test_stamp_survives_encode_and_decode(codec):
    from skimage import data
    from skimage.transform import resize

    photo = (resize(data.astronaut(), (240, 320)) * 255).astype(np.uint8)
    assert decode_stamp(photo) is None
    encoder = VideoEncoder(codec, fps=30)
    decoder = av.CodecContext.create("libvpx" if codec == "video/VP8" else "h264", "r")
    values = [0, 1, 0xBEEF, 0x5A5A, 65535] + list(range(1000, 1020))
    decoded = []
    for i, value in enumerate(values):
        for packet in encoder.encode(draw_stamp(photo, value), pts=i * 3000):
            decoded += [f.to_ndarray(format="rgb24") for f in decoder.decode(packet)]
    assert [decode_stamp(image) for image in decoded] == values
    # The rest of the picture is the photo, within codec tolerance.
    assert np.abs(decoded[-1][40:].astype(int) - photo[40:]).mean() < 12


def test_stamp_rejects_bad_input():
    with pytest.raises(ValueError, match="too small"):
        draw_stamp(np.zeros((16, 100, 3), np.uint8), 1)
    with pytest.raises(ValueError, match="outside"):
        draw_stamp(np.zeros((16, 144, 3), np.uint8), 70000)
    assert decode_stamp(np.full((16, 144, 3), 128, np.uint8)) is None


def test_audio_feed_primes_underruns_and_caps_latency():
    feed = AudioFeed(rate=48000, channels=1, prime_s=0.06, max_s=0.3)
    tone = np.ones((960, 1), np.float32)
    feed.push(AudioChunk(0.0, 48000, tone))
    assert not feed.pull(960).any()  # 20 ms buffered < 60 ms cushion: silence
    feed.push(AudioChunk(0.02, 48000, np.repeat(tone, 3, axis=0)))
    assert feed.pull(960).all()  # cushion reached: plays
    out = feed.pull(4 * 960)  # 3 blocks left
    assert out[: 3 * 960].all() and not out[3 * 960 :].any()  # underrun → silence, not stale audio
    feed.push(AudioChunk(0.1, 48000, tone))
    assert not feed.pull(960).any()  # after an underrun it primes again
    feed.push(AudioChunk(0.12, 48000, np.ones((48000, 1), np.float32)))  # a 1 s burst
    assert feed.buffered <= 0.3 * 48000


def test_audio_feed_converts_rate_and_channels():
    feed = AudioFeed(rate=48000, channels=1, prime_s=0.0, max_s=2.0)
    t = np.arange(44100) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t)] * 2, axis=1).astype(np.float32)
    feed.push(AudioChunk(0.0, 44100, stereo))
    assert abs(feed.buffered - 48000) < 200
    out = feed.pull(24000)[:, 0]
    assert abs(dominant_hz(out[4000:], 48000) - 440) < 3


def test_fanout_starts_and_resyncs_viewers_at_keyframes():
    requests = []
    encoder = SimpleNamespace(request_keyframe=lambda: requests.append(1))
    fanout = PacketFanout(queue_size=3, encoder=encoder)
    p, key = SimpleNamespace(is_keyframe=False), SimpleNamespace(is_keyframe=True)
    early = fanout.subscribe()
    assert len(requests) == 1  # a newcomer asks for a keyframe
    fanout.publish([p, key, p])
    assert [early.get_nowait() for _ in range(early.qsize())] == [key, p]  # nothing before the keyframe
    late = fanout.subscribe()
    fanout.publish([p, p, p])  # `late` waits for a keyframe; `early` fills up
    fanout.publish([p])  # `early` overflows: backlog dropped, resync requested
    assert early.empty() and late.empty() and len(requests) == 3
    fanout.publish([key])
    assert early.get_nowait() is key and late.get_nowait() is key
    fanout.unsubscribe(late)
    assert fanout.subscribers == 1


def test_audio_fanout_drops_the_oldest_packet_when_full():
    fanout = PacketFanout(queue_size=2)
    queue = fanout.subscribe()
    packets = [SimpleNamespace(n=i) for i in range(3)]
    fanout.publish(packets)
    assert [queue.get_nowait().n for _ in range(2)] == [1, 2]
