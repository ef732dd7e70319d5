"""WindowSink: clear errors without a display; real frames and keys under Xvfb when it is installed."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import shutil
import signal
import struct
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from realtime.errors import UserError
from realtime.sinks import Sink
from realtime.sinks.window import WindowSink
from realtime.types import Frame, FrameResult

needs_xvfb = pytest.mark.skipif(shutil.which("Xvfb") is None, reason="Xvfb is not installed")


def test_window_sink_is_a_sink():
    assert issubclass(WindowSink, Sink)


def test_no_display_is_a_one_line_user_error(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(UserError) as info:
        WindowSink()
    message = str(info.value)
    assert message.startswith("--show needs a display")
    assert "without --show" in message and "--webrtc" in message
    assert "\n" not in message


def test_unreachable_display_is_a_user_error_not_an_abort(monkeypatch, tmp_path):
    # Qt would abort the whole process here; the sink must turn it into an error we can print.
    monkeypatch.setenv("DISPLAY", ":987")
    monkeypatch.setenv("XAUTHORITY", str(tmp_path / "none"))
    with pytest.raises(UserError, match=r"--show cannot open a window on display :987: .*--webrtc"):
        WindowSink()


def read_xwd(path: Path) -> np.ndarray:
    """Xvfb's -fbdir screen dump (XWD, 24-bit TrueColor, 32 bpp) → (H, W, 3) RGB."""
    raw = path.read_bytes()
    fields = struct.unpack(">25I", raw[:100])
    header_size, width, height = fields[0], fields[4], fields[5]
    byte_order, bits_per_pixel, bytes_per_line, ncolors = fields[7], fields[11], fields[12], fields[19]
    assert bits_per_pixel == 32, bits_per_pixel
    start = header_size + 12 * ncolors
    pixels = np.frombuffer(raw, np.uint8, count=height * bytes_per_line, offset=start)
    pixels = pixels.reshape(height, bytes_per_line)[:, : width * 4].reshape(height, width, 4)
    if byte_order == 1:  # MSBFirst: X R G B
        return pixels[..., 1:4].copy()
    return pixels[..., 2::-1].copy()  # LSBFirst: B G R X


def die_with_parent() -> None:
    """In the child: get SIGTERM when pytest dies, so a killed test run leaves no Xvfb behind."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def x_server_answers(number: int) -> bool:
    """Whether display ``number`` accepts an X connection on the abstract socket libxcb tries first."""
    import socket

    setup = b"l\0" + struct.pack("<HHHH", 11, 0, 0, 0) + b"\0\0"  # byte order, protocol 11.0, no auth
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(2)
            conn.connect(f"\0/tmp/.X11-unix/X{number}")
            conn.sendall(setup)
            return conn.recv(1) == b"\1"  # 1 = Success; 0 = Failed, 2 = Authenticate
    except OSError:
        return False


@pytest.fixture
def xvfb(monkeypatch, tmp_path):
    """A private Xvfb server; yields the folder holding its live screen dump `Xvfb_screen0`.

    The display number is random and high, and the server is only used once it answers an X
    handshake: on a shared host a low number such as :0 may be some other server's (its abstract
    socket is visible across /tmp namespaces), and Qt aborts on a display it cannot open.
    """
    import random

    for number in random.sample(range(200, 60000), 8):
        server = subprocess.Popen(
            # -noreset: without it the server resets when its last client leaves (our handshake probe, or the
            # previous window), and a connection made during that reset is refused.
            ["Xvfb", f":{number}", "-screen", "0", "320x240x24", "-fbdir", str(tmp_path), "-nolisten", "tcp",
             "-noreset"],
            preexec_fn=die_with_parent,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while server.poll() is None and time.monotonic() < deadline and not x_server_answers(number):
            time.sleep(0.05)
        if server.poll() is None and x_server_answers(number):
            break
        server.terminate()
        server.wait(timeout=10)
    else:
        pytest.fail("no Xvfb display answered an X handshake after 8 tries")
    try:
        monkeypatch.setenv("DISPLAY", f":{number}")
        monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
        yield tmp_path
    finally:
        server.terminate()
        server.wait(timeout=10)


def solid_result(rgb: tuple[int, int, int], index: int = 0) -> FrameResult:
    frame = Frame(index, index / 30.0, np.zeros((60, 80, 3), np.uint8))
    composite = np.full((100, 120, 3), rgb, np.uint8)
    return FrameResult(frame=frame, composite=composite)


def count_colour(screen: np.ndarray, rgb: tuple[int, int, int]) -> int:
    return int(np.all(screen == rgb, axis=-1).sum())


# Qt binds a process to the first display it opens and exits when that server goes away, so each
# windowed check runs in a fresh (spawned) interpreter, never in the pytest process itself.
def in_child(fn, *args):
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result(timeout=60)


def show_solid(display: str, fbdir: str, rgb: tuple[int, int, int]) -> tuple[int, int, bool]:
    """Show a solid composite; return (pixels of that colour, pixels of its R/B swap, should_quit)."""
    os.environ["DISPLAY"] = display
    with WindowSink(title="EMICA test") as sink:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            sink.write(solid_result(rgb))
            screen = read_xwd(Path(fbdir) / "Xvfb_screen0")
            if count_colour(screen, rgb) >= 100 * 120:
                break
        return count_colour(screen, rgb), count_colour(screen, rgb[::-1]), sink.should_quit


def press_key(display: str, key: str) -> tuple[bool, bool]:
    """Show frames, press ``key`` in the window; return should_quit (before, after) the key."""
    os.environ["DISPLAY"] = display
    title = f"EMICA quit {key}"
    with WindowSink(title=title) as sink:
        sink.write(solid_result((0, 200, 0)))
        search = ["xdotool", "search", "--sync", "--name", title]
        window = subprocess.run(search, capture_output=True, text=True, timeout=10).stdout.split()[0]
        sink.write(solid_result((0, 200, 0), 1))
        before = sink.should_quit
        subprocess.run(["xdotool", "key", "--window", window, key], check=True, timeout=10)
        deadline, i = time.monotonic() + 10, 2
        while not sink.should_quit and time.monotonic() < deadline:
            sink.write(solid_result((0, 200, 0), i))
            i += 1
        return before, sink.should_quit


@needs_xvfb
def test_shows_the_composite_in_rgb_order(xvfb):
    red_ish = (250, 10, 20)
    shown, swapped, quit_ = in_child(show_solid, os.environ["DISPLAY"], str(xvfb), red_ish)
    assert shown == 100 * 120  # the whole composite, unscaled
    assert swapped == 0  # not shown with R and B swapped
    assert not quit_


@needs_xvfb
@pytest.mark.skipif(shutil.which("xdotool") is None, reason="xdotool is not installed")
@pytest.mark.parametrize("key", ["q", "Escape"])
def test_q_or_escape_sets_should_quit(xvfb, key):
    before, after = in_child(press_key, os.environ["DISPLAY"], key)
    assert (before, after) == (False, True)
