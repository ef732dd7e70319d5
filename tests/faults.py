"""Bad and odd inputs for the fault-injection tests, generated on the fly from the bundled real footage.

Every writer takes the destination path and returns it. Videos are small (tens of frames) so the CLI
runs on them stay fast.
"""

from __future__ import annotations

import struct
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence

import av
import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
CARPHONE = REPO / "realtime" / "data" / "carphone_pristine.mp4"  # 176x144, 29.97 fps, 120 frames


# -- videos -------------------------------------------------------------------------------------

def carphone_frames(count: int) -> list[np.ndarray]:
    """The first ``count`` frames of the carphone clip: (144, 176, 3) uint8 RGB each."""
    frames = []
    with av.open(str(CARPHONE)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == count:
                break
    return frames


def write_video(
    path: Path,
    frames: Sequence[np.ndarray],
    *,
    fps: Fraction = Fraction(30000, 1001),
    pix_fmt: str = "yuv420p",
    pts_ms: Optional[Sequence[int]] = None,
    faststart: bool = False,
) -> Path:
    """H.264 in the container ``path``'s suffix names.

    Args:
        frames: (H, W, 3) uint8 RGB pictures; odd sizes need ``pix_fmt="yuv444p"`` (4:2:0 needs even).
        pts_ms: per-frame presentation times in milliseconds (a variable frame rate); default: 1/fps apart.
        faststart: put the mp4 index (moov) before the data, as streaming-ready files have it.
    """
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
            stream.time_base = Fraction(1, 1000)
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def remux_head(src: Path, dst: Path, packets: int, *, faststart: bool = False) -> Path:
    """The first ``packets`` video packets of ``src`` copied bit for bit (no re-encode) into a new mp4
    (whatever ``dst``'s suffix says)."""
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(src)) as inp, av.open(str(dst), "w", format="mp4", options=options) as out:
        source = inp.streams.video[0]
        stream = out.add_stream_from_template(source)
        copied = 0
        for packet in inp.demux(source):
            if packet.dts is None:  # the demuxer's end-of-stream marker
                continue
            packet.stream = stream
            out.mux(packet)
            copied += 1
            if copied == packets:
                break
    return dst


def decodable_frames(path: Path) -> tuple[int, int]:
    """(frames a tolerant decoder gets from ``path``, how many of them FFmpeg flags as corrupt).

    Packets that fail to decode are skipped and a demuxer error ends the count, as a player does.
    Single-threaded: FFmpeg's frame threads can silently lose the frames next to an error, so this
    is the most any decoder recovers.
    """
    frames = corrupt = 0
    with av.open(str(path)) as container:
        container.streams.video[0].thread_type = "NONE"
        packets = container.demux(container.streams.video[0])
        while True:
            try:
                packet = next(packets)
            except (StopIteration, av.FFmpegError):
                break
            try:
                decoded = packet.decode()
            except av.FFmpegError:
                continue
            for frame in decoded:
                frames += 1
                corrupt += bool(frame.is_corrupt)
    return frames, corrupt


def video_frame_count(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def video_size(path: Path) -> tuple[int, int]:
    """(width, height) of the first video stream."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return stream.width, stream.height


def mp4_box(path: Path, name: bytes) -> tuple[int, int]:
    """(offset, size) of the top-level mp4 box ``name`` (e.g. ``b"mdat"``)."""
    data = path.read_bytes()
    pos = 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if size == 1:  # 64-bit size follows the type
            size = struct.unpack(">Q", data[pos + 8:pos + 16])[0]
        if kind == name:
            return pos, size
        if size < 8:
            break
        pos += size
    raise ValueError(f"no {name!r} box in {path}")


def truncated_copy(src: Path, dst: Path, fraction: float) -> Path:
    """The first ``fraction`` of ``src``'s bytes, like an interrupted download or copy."""
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def flipped_copy(src: Path, dst: Path, at: float, count: int) -> Path:
    """``src`` with ``count`` bytes inverted starting ``at`` (0..1) of the way into its mdat payload."""
    data = bytearray(src.read_bytes())
    offset, size = mp4_box(src, b"mdat")
    start = offset + 8 + int((size - 8) * at)
    for i in range(start, start + count):
        data[i] ^= 0xFF
    dst.write_bytes(bytes(data))
    return dst


def garbled_copy(src: Path, dst: Path, seed: int = 0) -> Path:
    """``src`` with its whole mdat payload replaced by random bytes: the index is intact, no frame decodes."""
    data = bytearray(src.read_bytes())
    offset, size = mp4_box(src, b"mdat")
    payload = np.random.default_rng(seed).integers(0, 256, size - 8, dtype=np.uint8)
    data[offset + 8:offset + size] = payload.tobytes()
    dst.write_bytes(bytes(data))
    return dst


def write_audio_only(path: Path, seconds: float = 1.0, rate: int = 48000) -> Path:
    """An AAC tone and no video stream (an .m4a)."""
    t = np.arange(int(seconds * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=rate)
        stream.layout = "mono"
        for i in range(0, len(tone), 1024):
            frame = av.AudioFrame.from_ndarray(tone[None, i:i + 1024], format="fltp", layout="mono")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_unknown_codec(path: Path) -> Path:
    """An AVI whose video fourcc no FFmpeg decoder knows (a valid MJPEG file with its tags renamed)."""
    with av.open(str(path), "w", format="avi") as out:
        stream = out.add_stream("mjpeg", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        for i in range(5):
            image = np.full((48, 64, 3), 40 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    data = path.read_bytes()
    assert b"MJPG" in data
    path.write_bytes(data.replace(b"MJPG", b"QQQQ"))
    return path


# -- images -------------------------------------------------------------------------------------

def astronaut_portrait() -> np.ndarray:
    """(640, 512, 3) uint8 RGB: the astronaut photo on a black portrait canvas (face in the top half)."""
    from skimage import data

    canvas = np.zeros((640, 512, 3), np.uint8)
    canvas[:512] = data.astronaut()
    return canvas


def write_png(path: Path, image: np.ndarray) -> Path:
    """Write with OpenCV's channel order as given: (H, W) gray, (H, W, 3) BGR or (H, W, 4) BGRA, 8/16-bit."""
    ok, encoded = cv2.imencode(".png", image)
    assert ok
    path.write_bytes(encoded.tobytes())
    return path


def write_exif_rotated_jpeg(path: Path, upright_rgb: np.ndarray) -> Path:
    """A JPEG whose pixels are stored turned 90° left with EXIF orientation 6, as phones save portraits:
    a viewer that honours EXIF shows ``upright_rgb``; one that ignores it shows it on its side."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    stored = np.ascontiguousarray(np.rot90(upright_rgb, k=1))
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    return path
