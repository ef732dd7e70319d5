"""Broadcast the output stream (video + audio) to browsers over WebRTC.

``WebRTCSink`` runs a small aiohttp server on its own thread and asyncio loop:

- ``GET /`` serves the viewer page (``realtime/viewer/index.html``),
- ``POST /offer`` takes a browser's SDP offer (JSON ``{sdp, type}``) and answers it.

Every frame is encoded once per codec and the packets are fanned out to all viewers (aiortc's senders
accept pre-encoded ``av.Packet`` objects), so an extra viewer costs packetisation, not an encode.
``write`` never waits: it copies the latest picture (only while someone watches) and queues its audio;
the sink's own loop encodes at most ``fps`` pictures a second, always the newest.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import fractions
import hmac
import ipaddress
import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from importlib import resources
from typing import Optional

import av
import numpy as np
from aiohttp import web
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc import sdp as aiortc_sdp
from aiortc.mediastreams import MediaStreamError

from realtime.errors import UserError
from realtime.sinks import Sink
from realtime.types import AudioChunk, FrameResult

logger = logging.getLogger(__name__)

VIDEO_CLOCK = 90_000  # RTP clock of every video codec
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK)
OPUS_RATE = 48_000  # Opus always runs at 48 kHz on the wire
OPUS_FRAME_S = 0.02  # 20 ms Opus frames, the WebRTC default
KEYFRAME_INTERVAL_S = 2.0  # late joiners and lost packets recover within this
CONNECT_TIMEOUT_S = 20.0  # a peer that has not connected by then is dropped (frees its slot)
MAX_OFFER_BYTES = 256 * 1024  # real offers are a few kB
VIDEO_QUEUE = 90  # encoded frames a stalled viewer may lag before it is resynced with a keyframe
AUDIO_QUEUE = 50  # 1 s of Opus packets
SUPPORTED_VIDEO = ("video/VP8", "video/H264")  # preference order: one encode serves every viewer that takes VP8

# ---------------------------------------------------------------------------------------------
# Frame stamp: a 16-bit counter drawn as 8x8 black/white cells, so a client can tell which frame
# it is showing and measure capture-to-display latency.
#
#   row 0:  [white][black][b15][b14] ... [b0]     (white cell = 1)
#   row 1:  [black][white][~b15][~b14] ... [~b0]  (every bit again, inverted)
#
# The first two columns give the reader its black and white levels (the "sync bar"); the inverted
# second row lets it reject pictures that carry no stamp instead of reading noise as a number.
# ---------------------------------------------------------------------------------------------

STAMP_CELL = 8
STAMP_BITS = 16
STAMP_COLS = 2 + STAMP_BITS
STAMP_WIDTH = STAMP_COLS * STAMP_CELL  # 144 px
STAMP_HEIGHT = 2 * STAMP_CELL  # 16 px
_STAMP_MIN_CONTRAST = 96.0  # grey levels between the white and black reference cells


def _stamp_cells(value: int) -> np.ndarray:
    """The stamp's cell pattern for ``value``: (2, STAMP_COLS) bool, True = white."""
    bits = [(value >> (STAMP_BITS - 1 - i)) & 1 == 1 for i in range(STAMP_BITS)]
    top = np.array([True, False] + bits)
    return np.stack([top, ~top])


def draw_stamp(image: np.ndarray, value: int) -> np.ndarray:
    """Return a copy of ``image`` with ``value`` (0..65535) stamped in its top-left 144x16 pixels.

    image: (H, W, 3) uint8 with H >= 16 and W >= 144.
    """
    if not 0 <= value < 1 << STAMP_BITS:
        raise ValueError(f"stamp value {value} is outside 0..65535")
    h, w = image.shape[:2]
    if h < STAMP_HEIGHT or w < STAMP_WIDTH:
        raise ValueError(f"a {w}x{h} image is too small for the {STAMP_WIDTH}x{STAMP_HEIGHT} stamp")
    cells = _stamp_cells(value)
    block = np.kron(cells, np.ones((STAMP_CELL, STAMP_CELL), dtype=bool))  # (16, 144)
    out = image.copy()
    out[:STAMP_HEIGHT, :STAMP_WIDTH] = np.where(block[..., None], 255, 0).astype(np.uint8)
    return out


def decode_stamp(image: np.ndarray) -> Optional[int]:
    """Read the value written by :func:`draw_stamp`, or None if the picture carries no readable stamp.

    image: (H, W, 3) uint8, e.g. a decoded video frame (codec noise is tolerated: each cell is read
    from its central 4x4 pixels, away from block edges where compression smears).
    """
    h, w = image.shape[:2]
    if h < STAMP_HEIGHT or w < STAMP_WIDTH:
        return None
    luma = image[:STAMP_HEIGHT, :STAMP_WIDTH].astype(np.float32).mean(axis=2)
    q = STAMP_CELL // 4
    centres = luma.reshape(2, STAMP_CELL, STAMP_COLS, STAMP_CELL)[:, q : 3 * q, :, q : 3 * q]
    levels = centres.mean(axis=(1, 3))  # (2, STAMP_COLS)
    white = (levels[0, 0] + levels[1, 1]) / 2
    black = (levels[0, 1] + levels[1, 0]) / 2
    if white - black < _STAMP_MIN_CONTRAST:
        return None
    bits = levels > (white + black) / 2
    if not (bits[0, 2:] != bits[1, 2:]).all():
        return None
    return int("".join("1" if b else "0" for b in bits[0, 2:]), 2)


# ---------------------------------------------------------------------------------------------
# Encoders: one per codec, shared by every viewer of that codec.
# ---------------------------------------------------------------------------------------------


def _video_bitrate(width: int, height: int, fps: float) -> int:
    """Constant bit rate for a stream: ~0.1 bit per pixel, clamped to what a LAN/browser handles well."""
    return int(min(8_000_000, max(300_000, 0.1 * width * height * fps)))


def _even(image: np.ndarray) -> np.ndarray:
    """Pad odd sizes by one replicated row/column: 4:2:0 encoders (x264) need even dimensions."""
    h, w = image.shape[:2]
    if h % 2 == 0 and w % 2 == 0:
        return image
    return np.pad(image, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


class VideoEncoder:
    """Encode RGB pictures to VP8 or H.264 packets for RTP (low latency, no B-frames).

    The codec context is rebuilt when the picture size changes; ``request_keyframe`` makes the next
    picture a keyframe (a new viewer can start decoding there).
    """

    def __init__(self, mime_type: str, fps: float):
        if mime_type not in SUPPORTED_VIDEO:
            raise ValueError(f"unsupported video codec {mime_type}")
        self.mime_type = mime_type
        self.fps = fps
        self._codec: Optional[av.VideoCodecContext] = None
        self._keyframe = True
        self._keyframe_lock = threading.Lock()  # requests come from the loop, encodes run in a worker

    def request_keyframe(self) -> None:
        with self._keyframe_lock:
            self._keyframe = True

    def _open(self, width: int, height: int) -> av.VideoCodecContext:
        gop = max(1, round(KEYFRAME_INTERVAL_S * self.fps))
        bitrate = _video_bitrate(width, height, self.fps)
        if self.mime_type == "video/VP8":
            codec = av.CodecContext.create("libvpx", "w")
            codec.options = {
                "deadline": "realtime",
                "cpu-used": "8",  # fastest realtime speed setting
                "lag-in-frames": "0",  # no look-ahead: a frame leaves as soon as it is encoded
                "error-resilient": "1",  # tolerate loss between keyframes
                "auto-alt-ref": "0",
                "minrate": str(bitrate),  # minrate = maxrate = bitrate: constant bit rate
                "maxrate": str(bitrate),
                "bufsize": str(bitrate),
            }
            codec.qmin, codec.qmax = 4, 48
        else:
            codec = av.CodecContext.create("libx264", "w")
            codec.profile = "Baseline"  # what aiortc negotiates (profile-level-id 42e01f / 42001f)
            codec.options = {
                "preset": "veryfast",
                "tune": "zerolatency",  # no B-frames, no look-ahead
                "level": "31",
                "forced-idr": "1",
                # Keyframes only on schedule or request, never on scene cuts (bursts hurt latency).
                "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0",
            }
        codec.width, codec.height = width, height
        codec.pix_fmt = "yuv420p"
        codec.time_base = VIDEO_TIME_BASE
        codec.framerate = fractions.Fraction(self.fps).limit_denominator(1001)
        codec.bit_rate = bitrate
        codec.gop_size = gop
        codec.thread_count = max(1, min(4, (os.cpu_count() or 1) // 2))
        codec.open()
        return codec

    def encode(self, image: np.ndarray, pts: int) -> list[av.Packet]:
        """Encode one picture.

        image: (H, W, 3) uint8 RGB; pts: presentation time in 1/90000 s, strictly increasing.
        Returns the packets (each stamped with ``pts`` and the 90 kHz time base).
        """
        image = _even(image)
        h, w = image.shape[:2]
        with self._keyframe_lock:
            keyframe, self._keyframe = self._keyframe, False
        if self._codec is None or (self._codec.width, self._codec.height) != (w, h):
            self._codec = self._open(w, h)
            keyframe = True
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24").reformat(format="yuv420p")
        frame.pts = pts
        frame.time_base = VIDEO_TIME_BASE
        frame.pict_type = av.video.frame.PictureType.I if keyframe else av.video.frame.PictureType.NONE
        packets = self._codec.encode(frame)
        for packet in packets:
            packet.pts = pts  # no reordering (no B-frames): each packet is this picture
            packet.time_base = VIDEO_TIME_BASE
        return packets


class OpusEncoder:
    """Encode fixed 20 ms blocks of float audio to Opus packets (48 kHz on the wire).

    samples fed to ``encode``: (round(rate * 0.02), channels) float32 in [-1, 1].
    """

    def __init__(self, rate: int, channels: int):
        layout = "mono" if channels == 1 else "stereo"
        self.rate, self.channels = rate, channels
        self._codec = av.CodecContext.create("libopus", "w")
        self._codec.sample_rate = OPUS_RATE
        self._codec.layout = layout
        self._codec.format = "s16"
        self._codec.bit_rate = 64_000 * channels
        self._codec.time_base = fractions.Fraction(1, OPUS_RATE)
        self._codec.options = {"application": "lowdelay"}
        self._codec.open()
        frame_size = round(OPUS_RATE * OPUS_FRAME_S)
        self._resampler = av.AudioResampler(format="s16", layout=layout, rate=OPUS_RATE, frame_size=frame_size)
        self._in_pts = 0
        self._first_pts: Optional[int] = None

    def encode(self, samples: np.ndarray) -> list[av.Packet]:
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples.T, dtype=np.float32), format="fltp", layout=self._codec.layout.name
        )
        frame.sample_rate = self.rate
        frame.pts = self._in_pts
        frame.time_base = fractions.Fraction(1, self.rate)
        self._in_pts += samples.shape[0]
        packets = []
        for resampled in self._resampler.resample(frame):
            packets += self._codec.encode(resampled)
        for packet in packets:
            # Opus starts at a negative pts (encoder pre-skip); RTP timestamps start from zero.
            if self._first_pts is None:
                self._first_pts = packet.pts
            packet.pts -= self._first_pts
            packet.time_base = fractions.Fraction(1, OPUS_RATE)
        return packets


def _to_layout(samples: np.ndarray, channels: int) -> np.ndarray:
    """(n, c) float32 → (n, channels): average down to mono, repeat mono up, else keep the first ones."""
    if samples.ndim == 1:
        samples = samples[:, None]
    c = samples.shape[1]
    if c == channels:
        return samples.astype(np.float32, copy=False)
    if channels == 1:
        return samples.mean(axis=1, keepdims=True, dtype=np.float32)
    if c == 1:
        return np.repeat(samples, channels, axis=1).astype(np.float32, copy=False)
    return samples[:, :channels].astype(np.float32, copy=False)


class AudioFeed:
    """A jitter buffer between bursty producers (audio arrives with each video frame) and the
    20 ms wall-clock paced Opus encoder.

    After an underrun it waits until ``prime_s`` is buffered before playing again (silence meanwhile);
    beyond ``max_s`` it drops the oldest audio, which bounds the added latency.
    """

    def __init__(self, rate: int, channels: int, prime_s: float = 0.06, max_s: float = 0.3):
        self.rate, self.channels = rate, channels
        self._prime = round(prime_s * rate)
        self._max = round(max_s * rate)
        self._blocks: collections.deque[np.ndarray] = collections.deque()
        self._buffered = 0
        self._priming = True
        self._resamplers: dict[int, av.AudioResampler] = {}

    @property
    def buffered(self) -> int:
        return self._buffered

    def push(self, chunk: AudioChunk) -> None:
        samples = _to_layout(np.asarray(chunk.samples, dtype=np.float32), self.channels)
        if chunk.sample_rate != self.rate:
            samples = self._resample(samples, chunk.sample_rate)
        if len(samples):
            self._blocks.append(samples)
            self._buffered += len(samples)
        while self._buffered > self._max:
            self._drop(self._buffered - self._prime)

    def _resample(self, samples: np.ndarray, rate: int) -> np.ndarray:
        layout = "mono" if self.channels == 1 else "stereo"
        resampler = self._resamplers.get(rate)
        if resampler is None:
            resampler = self._resamplers[rate] = av.AudioResampler(format="fltp", layout=layout, rate=self.rate)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples.T), format="fltp", layout=layout)
        frame.sample_rate = rate
        out = [f.to_ndarray().T for f in resampler.resample(frame)]
        return np.concatenate(out) if out else np.zeros((0, self.channels), np.float32)

    def _drop(self, n: int) -> None:
        while n > 0 and self._blocks:
            head = self._blocks[0]
            if len(head) <= n:
                self._blocks.popleft()
                n -= len(head)
                self._buffered -= len(head)
            else:
                self._blocks[0] = head[n:]
                self._buffered -= n
                n = 0

    def pull(self, n: int) -> np.ndarray:
        """Exactly ``n`` samples: (n, channels) float32, silence where the buffer has none."""
        out = np.zeros((n, self.channels), np.float32)
        if self._priming and self._buffered < self._prime:
            return out
        self._priming = False
        filled = 0
        while filled < n and self._blocks:
            head = self._blocks[0]
            take = min(n - filled, len(head))
            out[filled : filled + take] = head[:take]
            filled += take
            self._buffered -= take
            if take == len(head):
                self._blocks.popleft()
            else:
                self._blocks[0] = head[take:]
        if filled < n:
            self._priming = True  # underrun: rebuild a cushion before playing on
        return out

    def clear(self) -> None:
        self._blocks.clear()
        self._buffered = 0
        self._priming = True


# ---------------------------------------------------------------------------------------------
# Fan-out of encoded packets to viewers.
# ---------------------------------------------------------------------------------------------


class PacketFanout:
    """Hands every packet of one shared encoder to each subscribed viewer track (loop thread only).

    Video viewers start, and restart after their queue overflowed, at a keyframe: packets before it
    would only decode to garbage.
    """

    def __init__(self, queue_size: int, encoder: Optional[VideoEncoder] = None):
        self.encoder = encoder
        self._queue_size = queue_size
        self._queues: set[asyncio.Queue] = set()
        self._awaiting_keyframe: set[asyncio.Queue] = set()

    @property
    def subscribers(self) -> int:
        return len(self._queues)

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(self._queue_size)
        self._queues.add(queue)
        if self.encoder is not None:
            self._awaiting_keyframe.add(queue)
            self.encoder.request_keyframe()
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self._queues.discard(queue)
        self._awaiting_keyframe.discard(queue)

    def publish(self, packets: list[av.Packet]) -> None:
        for queue in self._queues:
            for packet in packets:
                if queue.full():
                    self._overflow(queue)
                if queue in self._awaiting_keyframe:
                    if not packet.is_keyframe:
                        continue
                    self._awaiting_keyframe.discard(queue)
                queue.put_nowait(packet)

    def _overflow(self, queue: asyncio.Queue) -> None:
        if self.encoder is None:
            queue.get_nowait()  # audio: drop the oldest 20 ms
            return
        # Video: this viewer stalled; drop its backlog and resume it at the next keyframe.
        while not queue.empty():
            queue.get_nowait()
        self._awaiting_keyframe.add(queue)
        self.encoder.request_keyframe()


class PacketTrack(MediaStreamTrack):
    """One viewer's track: yields the shared encoder's packets (aiortc only packetises them).

    It subscribes on the first ``recv`` (when the connection is up), so no stale backlog is sent.
    """

    def __init__(self, kind: str, fanout: PacketFanout):
        super().__init__()
        self.kind = kind
        self._fanout = fanout
        self._queue: Optional[asyncio.Queue] = None

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        if self._queue is None:
            self._queue = self._fanout.subscribe()
        return await self._queue.get()

    def stop(self) -> None:
        super().stop()
        if self._queue is not None:
            self._fanout.unsubscribe(self._queue)
            self._queue = None


# ---------------------------------------------------------------------------------------------
# Signalling helpers
# ---------------------------------------------------------------------------------------------


class OfferError(ValueError):
    """A client's offer cannot be used; the message is the one-line HTTP 400 reason."""


@dataclass
class ParsedOffer:
    sdp: str
    video_codecs: list[str]  # mime types offered for the first receiving video m-line, in order
    has_audio: bool  # the offer receives audio and takes Opus


def parse_offer(body: bytes) -> ParsedOffer:
    """Validate a POST /offer body (JSON ``{"sdp": ..., "type": "offer"}``) → ParsedOffer, or OfferError."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise OfferError(f"offer is not JSON ({e})") from None
    if not isinstance(data, dict):
        raise OfferError('offer must be a JSON object {"sdp": ..., "type": "offer"}')
    missing = [k for k in ("sdp", "type") if k not in data]
    if missing:
        raise OfferError(f"offer is missing field(s): {', '.join(missing)}")
    if data["type"] != "offer":
        raise OfferError(f'offer "type" must be "offer", got {data["type"]!r}')
    if not isinstance(data["sdp"], str) or not data["sdp"].strip():
        raise OfferError('offer "sdp" must be a non-empty string')
    try:
        description = aiortc_sdp.SessionDescription.parse(data["sdp"])
    except Exception as e:  # the parser raises assorted errors on malformed text
        raise OfferError(f"offer SDP cannot be parsed ({type(e).__name__}: {e})") from None
    receiving = [m for m in description.media if m.direction in ("recvonly", "sendrecv")]
    video = [m for m in receiving if m.kind == "video"]
    if not video:
        raise OfferError("offer has no video m-line that receives (add a recvonly video transceiver)")
    codecs = [c.mimeType for c in video[0].rtp.codecs]
    if not any(c.lower() in (s.lower() for s in SUPPORTED_VIDEO) for c in codecs):
        raise OfferError(f"offer supports none of the video codecs {', '.join(SUPPORTED_VIDEO)}")
    has_audio = any(
        m.kind == "audio" and any(c.mimeType.lower() == "audio/opus" for c in m.rtp.codecs) for m in receiving
    )
    return ParsedOffer(sdp=data["sdp"], video_codecs=codecs, has_audio=has_audio)


def negotiated_codec(answer_sdp: str, kind: str) -> Optional[str]:
    """The codec the first ``kind`` m-line of our answer sends with (the first listed one)."""
    for media in aiortc_sdp.SessionDescription.parse(answer_sdp).media:
        if media.kind == kind and media.rtp.codecs:
            return media.rtp.codecs[0].mimeType
    return None


def _codec_preferences(kind: str, mime_types: tuple[str, ...]) -> list:
    """aiortc capabilities for ``mime_types`` (in that order), plus RTX so NACKed packets are resent."""
    caps = RTCRtpSender.getCapabilities(kind).codecs
    ordered = [c for m in mime_types for c in caps if c.mimeType.lower() == m.lower()]
    return ordered + [c for c in caps if c.mimeType.lower().endswith("/rtx")]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _request_token(request: web.Request) -> Optional[str]:
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.query.get("token")


def _report_crash(task: asyncio.Future) -> None:
    """A media loop must never stop silently: viewers would see a frozen stream and no reason."""
    if not task.cancelled() and task.exception() is not None:
        logger.error("WebRTC media loop stopped", exc_info=task.exception())


def _text(status: int, message: str, **headers: str) -> web.Response:
    return web.Response(status=status, text=message + "\n", headers=headers)


# ---------------------------------------------------------------------------------------------
# The sink
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)  # identity semantics: a set of live viewers
class _Viewer:
    pc: RTCPeerConnection
    tracks: list[PacketTrack]


class WebRTCSink(Sink):
    """Serve the output to browsers over WebRTC.

    host/port: where the page and signalling listen (port 0 = any free port; see ``port``/``url``).
    token: required by ``/`` and ``/offer`` (query ``token=`` or ``Authorization: Bearer``); mandatory
        when binding a non-loopback address; ``"auto"`` generates one and prints the URL once.
    max_viewers: connections beyond it are refused with HTTP 503.
    fps: most video frames sent per second (the latest written frame wins).
    audio_rate/audio_channels: the format audio is sent in (chunks in other formats are converted).
    stats: stamp each sent frame with its 16-bit frame index (see ``decode_stamp``).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8080,
        token: Optional[str] = None,
        max_viewers: int = 8,
        fps: float = 30.0,
        audio_rate: int = 48000,
        audio_channels: int = 1,
        stats: bool = False,
    ):
        if not _is_loopback(host) and not token:
            raise UserError(
                f"refusing to serve WebRTC on {host} without a token: anyone on the network could watch; "
                f"add --webrtc_token SECRET (or --webrtc_token auto), or serve on --webrtc 127.0.0.1:{port}"
            )
        if max_viewers < 1:
            raise UserError(f"--webrtc_max_viewers must be at least 1, got {max_viewers}")
        if not fps > 0:
            raise UserError(f"WebRTC fps must be positive, got {fps}")
        if audio_channels not in (1, 2):
            raise UserError(f"WebRTC audio must be mono or stereo, got {audio_channels} channels")
        self._token = secrets.token_urlsafe(16) if token == "auto" else token
        self.host = host
        self.port = port
        self.max_viewers = max_viewers
        self.fps = fps
        self.stats = stats
        self._page = resources.files("realtime").joinpath("viewer", "index.html").read_bytes()

        # Written by the caller's thread, read by the loop: a (sequence, image, index) tuple swap is atomic.
        self._latest: Optional[tuple[int, np.ndarray, int]] = None
        self._written = 0
        self._audio_in: collections.deque[AudioChunk] = collections.deque(maxlen=256)
        self._frame_ready: Optional[asyncio.Event] = None
        self._stamp_warned = False

        self._audio_feed = AudioFeed(audio_rate, audio_channels)
        self._video_fanouts = {m: PacketFanout(VIDEO_QUEUE, VideoEncoder(m, fps)) for m in SUPPORTED_VIDEO}
        self._audio_fanout = PacketFanout(AUDIO_QUEUE)
        self._opus = OpusEncoder(audio_rate, audio_channels)
        self._viewers: set[_Viewer] = set()
        self._encode_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="webrtc-encode")
        self._runner: Optional[web.AppRunner] = None
        self._tasks: list[asyncio.Future] = []
        self._closed = False
        self._close_lock = threading.Lock()

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="webrtc-sink", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        except OSError as e:
            self.close()
            raise UserError(
                f"cannot serve WebRTC on {host}:{port} ({e.strerror or e}); choose another port with "
                "--webrtc HOST:PORT or stop the program using it"
            ) from None
        except BaseException:
            self.close()
            raise
        if token == "auto":
            print(f"WebRTC viewer: {self.url}", flush=True)

    # -- public API -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The viewer page's address, with the token when one is set."""
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()  # the address other machines reach
        elif ":" in host:
            host = f"[{host}]"
        url = f"http://{host}:{self.port}/"
        return f"{url}?token={self._token}" if self._token else url

    @property
    def viewers(self) -> int:
        """Peer connections currently open (connected or connecting)."""
        return len(self._viewers)

    def write(self, result: FrameResult) -> None:
        """Publish ``result.composite`` (else the input picture) and its audio. Never blocks."""
        if self._closed:
            return
        if not self._viewers:
            return  # nobody watches: no copies, no encoding, no audio backlog
        image = result.composite if result.composite is not None else result.frame.image
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"WebRTC frames must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        self._written += 1
        # A copy: the caller may reuse its buffer while the encoder thread still reads this one.
        self._latest = (self._written, image.copy(), result.frame.index)
        self._audio_in.extend(result.frame.audio)
        try:
            self._loop.call_soon_threadsafe(self._frame_ready.set)
        except RuntimeError:  # the loop closed between the check above and here
            pass

    def close(self) -> None:
        """Disconnect every viewer and stop the server (safe to call twice)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
            except (concurrent.futures.TimeoutError, RuntimeError) as e:
                logger.warning("WebRTC shutdown did not finish cleanly: %s", e)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._loop.is_running():
            self._loop.close()
        self._encode_pool.shutdown(wait=True)

    # -- server lifecycle (loop thread) ---------------------------------------------------------

    async def _start(self) -> None:
        self._frame_ready = asyncio.Event()
        app = web.Application(client_max_size=MAX_OFFER_BYTES)
        app.router.add_get("/", self._handle_page)
        app.router.add_post("/offer", self._handle_offer)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._tasks = [asyncio.ensure_future(self._video_loop()), asyncio.ensure_future(self._audio_loop())]
        for task in self._tasks:
            task.add_done_callback(_report_crash)

    async def _shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(self._drop(v) for v in list(self._viewers)), return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        # A peer that was still connecting leaves aiortc tasks (ICE checks, DTLS handshake) that close() does not
        # end; cancelled here, they do not die "destroyed but pending" with the loop.
        rest = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    # -- HTTP handlers --------------------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        if self._token is None:
            return True
        given = _request_token(request) or ""
        return hmac.compare_digest(given.encode(), self._token.encode())

    def _unauthorized(self) -> web.Response:
        return _text(
            401,
            "missing or wrong token: open the URL printed at start (it ends in ?token=...)",
            **{"WWW-Authenticate": "Bearer"},
        )

    async def _handle_page(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        return web.Response(
            body=self._page,
            content_type="text/html",
            charset="utf-8",
            headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff"},
        )

    async def _handle_offer(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        try:
            offer = parse_offer(await request.read())
        except OfferError as e:
            return _text(400, str(e))
        if len(self._viewers) >= self.max_viewers:
            return _text(503, f"viewer limit reached ({self.max_viewers} connected); try again later")

        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # no STUN: nothing leaves the network
        viewer = _Viewer(pc, [])
        self._viewers.add(viewer)  # counts against the cap from now on, even while negotiating
        try:
            return await self._negotiate(request, offer, viewer)
        except BaseException:  # a failed or cancelled negotiation must not hold a viewer slot
            await asyncio.shield(self._drop(viewer))
            raise

    async def _negotiate(self, request: web.Request, offer, viewer: _Viewer) -> web.Response:
        pc = viewer.pc
        video = pc.addTransceiver("video", direction="sendonly")
        video.setCodecPreferences(_codec_preferences("video", SUPPORTED_VIDEO))
        audio = None
        if offer.has_audio:
            audio = pc.addTransceiver("audio", direction="sendonly")
            audio.setCodecPreferences(_codec_preferences("audio", ("audio/opus",)))
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer.sdp, type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as e:  # aiortc reports unusable SDP with assorted exception types
            await self._drop(viewer)
            return _text(400, f"offer rejected ({type(e).__name__}: {' '.join(str(e).split())})")

        codec = negotiated_codec(pc.localDescription.sdp, "video")
        family = next((m for m in SUPPORTED_VIDEO if m.lower() == (codec or "").lower()), None)
        if family is None:
            await self._drop(viewer)
            return _text(400, f"offer rejected: no video codec in common (this server sends "
                              f"{', '.join(m.split('/')[1] for m in SUPPORTED_VIDEO)})")
        viewer.tracks.append(PacketTrack("video", self._video_fanouts[family]))
        video.sender.replaceTrack(viewer.tracks[-1])
        if audio is not None:
            viewer.tracks.append(PacketTrack("audio", self._audio_fanout))
            audio.sender.replaceTrack(viewer.tracks[-1])

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            logger.info("WebRTC viewer %s: %s", request.remote, pc.connectionState)
            if pc.connectionState in ("failed", "closed"):
                await self._drop(viewer)

        self._loop.call_later(CONNECT_TIMEOUT_S, self._expire, viewer)
        logger.info("WebRTC viewer %s: offer accepted (%s)", request.remote, family)
        answer = {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}
        return web.json_response(answer, headers={"Cache-Control": "no-store"})

    def _expire(self, viewer: _Viewer) -> None:
        if viewer in self._viewers and viewer.pc.connectionState != "connected":
            logger.info("WebRTC viewer did not connect within %.0f s; dropped", CONNECT_TIMEOUT_S)
            asyncio.ensure_future(self._drop(viewer))

    async def _drop(self, viewer: _Viewer) -> None:
        if viewer not in self._viewers:
            return
        self._viewers.discard(viewer)
        for track in viewer.tracks:
            track.stop()
        await viewer.pc.close()

    # -- media loops (loop thread) -------------------------------------------------------------

    async def _video_loop(self) -> None:
        """Encode the latest frame (at most ``fps`` per second) once per codec in use; fan out."""
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        last_seq, last_pts = 0, -1
        next_due = t0
        while True:
            await self._frame_ready.wait()
            self._frame_ready.clear()
            wait = next_due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)  # frames written meanwhile replace this one
            latest = self._latest
            if latest is None or latest[0] == last_seq:
                continue
            last_seq, image, index = latest
            now = time.monotonic()
            next_due = max(next_due + 1 / self.fps, now)
            active = [f for f in self._video_fanouts.values() if f.subscribers]
            if not active:
                continue
            pts = max(last_pts + 1, round((now - t0) * VIDEO_CLOCK))
            last_pts = pts
            encoded = await loop.run_in_executor(self._encode_pool, self._encode, image, index, pts, active)
            for fanout, packets in zip(active, encoded):
                fanout.publish(packets)

    def _encode(self, image: np.ndarray, index: int, pts: int, fanouts: list[PacketFanout]) -> list[list[av.Packet]]:
        if self.stats:
            try:
                image = draw_stamp(image, index & 0xFFFF)
            except ValueError as e:
                if not self._stamp_warned:
                    logger.warning("WebRTC stats stamp skipped: %s", e)
                    self._stamp_warned = True
        return [f.encoder.encode(image, pts) for f in fanouts]

    async def _audio_loop(self) -> None:
        """Every 20 ms of wall clock, send 20 ms of audio (silence when the feed runs dry)."""
        n = round(self._audio_feed.rate * OPUS_FRAME_S)
        due = time.monotonic()
        while True:
            due += OPUS_FRAME_S
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.2:
                due = time.monotonic()  # the loop was starved: resume the pace instead of bursting
            while self._audio_in:
                self._audio_feed.push(self._audio_in.popleft())
            if not self._audio_fanout.subscribers:
                self._audio_feed.clear()
                continue
            self._audio_fanout.publish(self._opus.encode(self._audio_feed.pull(n)))
