"""An on-screen window (OpenCV highgui) showing each result's composite; ESC or 'q' asks to quit.

OpenCV's Qt backend aborts the whole process when it cannot reach the display, so before the first
window is opened a throwaway child process tries it; a failure becomes a one-line UserError.
Use one WindowSink from one thread: highgui windows belong to the thread that drives them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping

import cv2
import numpy as np

from realtime.errors import UserError
from realtime.sinks import Sink
from realtime.types import FrameResult

QUIT_KEYS = (27, ord("q"), ord("Q"))  # ESC, q, Q

_NO_WINDOW_HINT = "run without --show, or with --webrtc to watch in a browser"

_PROBE = "import cv2; cv2.namedWindow('probe'); cv2.waitKey(1); cv2.destroyAllWindows(); cv2.waitKey(1)"


def display_name(env: Mapping[str, str] = os.environ) -> str | None:
    """The display a window would open on ($DISPLAY, else $WAYLAND_DISPLAY), or None."""
    return env.get("DISPLAY") or env.get("WAYLAND_DISPLAY") or None


def probe_window(timeout_s: float = 30.0) -> str | None:
    """Open and close a window in a child process; None if that worked, else the reason (one line)."""
    try:
        probe = subprocess.run(
            [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return f"opening a test window took more than {timeout_s:.0f} s"
    if probe.returncode == 0:
        return None
    lines = [line.strip() for line in probe.stderr.splitlines() if line.strip()]
    # Qt's first complaint names the cause ("could not connect to display :1"); OpenCV's names a missing GUI.
    reason = next((line for line in lines if "could not connect" in line or "cv2.error" in line), None)
    return reason or (lines[0] if lines else f"the test window exited with status {probe.returncode}")


class WindowSink(Sink):
    """Show ``result.composite`` (else the frame) in a window; :attr:`should_quit` turns True on
    ESC/'q' or when the user closes the window."""

    def __init__(self, title: str = "EMICA Realtime"):
        display = display_name()
        if display is None:
            raise UserError(f"--show needs a display, but neither $DISPLAY nor $WAYLAND_DISPLAY is set; {_NO_WINDOW_HINT}")
        reason = probe_window()
        if reason is not None:
            raise UserError(f"--show cannot open a window on display {display}: {reason}; {_NO_WINDOW_HINT}")
        self.title = title
        self.should_quit = False
        self._opened = False
        self._closed = False

    def write(self, result: FrameResult) -> None:
        """Show one image and poll the keyboard (1 ms)."""
        if self._closed:
            return
        image = result.composite if result.composite is not None else result.frame.image
        if not self._opened:
            # GUI_NORMAL: no Qt toolbar or status bar, so the window is exactly the image
            cv2.namedWindow(self.title, cv2.WINDOW_AUTOSIZE | cv2.WINDOW_GUI_NORMAL)
            self._opened = True
        elif cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE) < 1:
            self.should_quit = True  # closed with the window manager's close button
            return
        cv2.imshow(self.title, np.ascontiguousarray(image[..., ::-1]))  # OpenCV shows BGR
        key = cv2.waitKey(1)
        if key != -1 and key & 0xFF in QUIT_KEYS:
            self.should_quit = True

    def close(self) -> None:
        """Close the window (once)."""
        if self._closed:
            return
        self._closed = True
        if self._opened:
            cv2.destroyWindow(self.title)
            cv2.waitKey(1)  # let the GUI loop process the close
