"""Live parameter streaming: one small JSON datagram per frame and face over UDP.

Any program on the machine (a game engine driving an avatar, a plotting script) can listen on the
port and get each face's model codes a few milliseconds after the frame was reconstructed. UDP
suits live data: no connection, nothing queues up when the listener is slow or absent, and a lost
datagram is simply superseded by the next frame. The message schema is in docs/export_format.md.

Parameters leave the machine only when asked: a host that is not a loopback address needs
``allow_remote=True``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
from typing import Any, Optional
from urllib.parse import urlsplit

import numpy as np

from realtime.errors import UserError
from realtime.export import face_records, float32_shortest
from realtime.sinks import Sink
from realtime.types import Face, FrameResult, Reconstruction

log = logging.getLogger(__name__)

SCHEMA = "emica-realtime/params"
VERSION = 1
DEFAULT_URL = "udp://127.0.0.1:9870"
# Well under the 65,507-byte UDP payload limit, so one message is one datagram on loopback.
MAX_DATAGRAM = 60_000
# Codes a reconstruction may repeat from MediaPipe; they are sent once, from the face.
_FACE_CODE_KEYS = ("blendshapes", "transform")


def parse_udp_url(url: str) -> tuple[str, int]:
    """'udp://HOST:PORT' → (host, port); IPv6 hosts in brackets ('udp://[::1]:9870'); no host = 127.0.0.1."""
    fix = f"use udp://HOST:PORT, e.g. {DEFAULT_URL}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise UserError(f"parameter stream URL {url!r} is not valid ({e}); {fix}") from e
    if parts.scheme != "udp" or port is None or port == 0:
        raise UserError(f"parameter stream URL {url!r} is not valid; {fix}")
    if parts.path not in ("", "/") or parts.query or parts.username:
        raise UserError(f"parameter stream URL {url!r} has extra parts; {fix}")
    return parts.hostname or "127.0.0.1", port


def json_floats(arrays: list[np.ndarray]) -> list[Any]:
    """Each array's numbers as float32-rounded Python floats (shortest text), nested as the array.

    Non-finite numbers become None. All arrays are converted in one pass, which is what makes a
    message cheap to build (one vectorised conversion instead of one per code).
    """
    arrays = [np.asarray(a, dtype=np.float32) for a in arrays]
    if not arrays:
        return []
    flat = float32_shortest(np.concatenate([a.reshape(-1) for a in arrays]))
    finite = np.isfinite(flat)
    if not finite.all():
        flat = np.where(finite, flat, None)
    pieces = np.split(flat, np.cumsum([a.size for a in arrays])[:-1])
    return [piece.reshape(a.shape).tolist() for piece, a in zip(pieces, arrays)]


def params_message(face: Face, rec: Optional[Reconstruction], frame_index: int, pts: float, model: str) -> dict[str, Any]:
    """The JSON object sent for one face of one frame (see docs/export_format.md)."""
    codes = rec.codes if rec is not None else {}
    names = [k for k in codes if k != "cam" and k not in _FACE_CODE_KEYS]
    has_cam = "cam" in codes
    face_arrays = [np.asarray(face.crop_matrix).reshape(2, 3), face.blendshapes, np.asarray(face.transform).reshape(4, 4)]
    values = json_floats([codes[k] for k in names] + ([codes["cam"]] if has_cam else []) + face_arrays)
    crop, blendshapes, transform = values[-3:]
    return {
        "schema": SCHEMA,
        "version": VERSION,
        "frame": int(frame_index),
        "pts": float(pts),
        "track_id": int(face.track_id),
        "face_index": int(face.index),
        "model": model,
        "codes": dict(zip(names, values)),
        "cam": values[len(names)] if has_cam else None,
        "crop_matrix": crop,
        "blendshapes": blendshapes,
        "transform": transform,
    }


class ParamStreamSink(Sink):
    """Sends every face's parameters as one UDP datagram per frame (non-blocking, never raises on send).

    Args:
        url: ``udp://HOST:PORT`` of the listener.
        model_name: put in each message, so a listener knows the code layout.
        allow_remote: permit a host that is not a loopback address.

    Attributes:
        sent: datagrams handed to the network.
        errors: datagrams the socket refused (full buffer, unreachable network …).
        oversize: messages over `MAX_DATAGRAM` bytes, not sent.
    """

    def __init__(self, url: str = DEFAULT_URL, model_name: str = "", allow_remote: bool = False):
        host, port = parse_udp_url(url)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except socket.gaierror as e:
            raise UserError(f"parameter stream host {host!r} in {url!r} cannot be resolved ({e.strerror}); check the name") from e
        family, _, _, _, address = infos[0]
        if not ipaddress.ip_address(address[0].split("%")[0]).is_loopback and not allow_remote:
            raise UserError(
                f"parameter stream {url!r} would send face data off this machine ({address[0]}); "
                f"use a loopback host such as {DEFAULT_URL}, or allow remote streaming explicitly (--stream_remote)"
            )
        self.url = url
        self.model_name = model_name
        self.address = address
        self._sock: Optional[socket.socket] = socket.socket(family, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self.sent = 0
        self.errors = 0
        self.oversize = 0

    def write(self, result: FrameResult) -> None:
        """Send one datagram per face of the frame."""
        if self._sock is None:
            raise ValueError(f"parameter stream {self.url} is closed")
        frame = result.frame
        for face, rec in face_records(result):
            message = params_message(face, rec, frame.index, frame.pts, self.model_name)
            data = json.dumps(message, separators=(",", ":"), allow_nan=False).encode()
            if len(data) > MAX_DATAGRAM:
                if not self.oversize:
                    log.warning("parameter message of %d bytes exceeds %d; such messages are not sent", len(data), MAX_DATAGRAM)
                self.oversize += 1
                continue
            try:
                self._sock.sendto(data, self.address)
                self.sent += 1
            except OSError as e:
                # A live stream must not stop the pipeline: count, warn once, go on.
                if not self.errors:
                    log.warning("parameter stream %s: send failed (%s); counting further failures", self.url, e)
                self.errors += 1

    def close(self) -> None:
        """Close the socket (idempotent)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
