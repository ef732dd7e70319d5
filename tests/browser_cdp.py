"""Drive a real headless Chromium over the DevTools protocol (a websocket, via aiohttp).

Used by the browser test and bench/bench_webrtc.py. Only what they need: open pages, evaluate
JavaScript (awaiting promises), and collect console errors and uncaught exceptions.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import aiohttp

CHROMIUM = Path("/usr/bin/chromium")

# Headless, no network chatter, autoplay allowed, and WebRTC over loopback with plain IPs
# (no mDNS names) so an aiortc server on 127.0.0.1 can pair with the page.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--autoplay-policy=no-user-gesture-required",
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    # Headless pages count as hidden; keep timers and video callbacks at full rate.
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
]


class CDPError(RuntimeError):
    """Chromium answered a command with an error, or a page script threw."""


class Page:
    """One tab, attached with its own DevTools session."""

    def __init__(self, browser: "Browser", session_id: str):
        self._browser = browser
        self.session_id = session_id
        self.errors: list[str] = []  # console errors and uncaught exceptions, in order

    async def send(self, method: str, params: Optional[dict] = None) -> dict:
        return await self._browser.send(method, params, self.session_id)

    async def navigate(self, url: str) -> None:
        await self.send("Page.navigate", {"url": url})

    async def evaluate(self, expression: str, timeout: float = 30.0) -> Any:
        """Run ``expression`` in the page, await it if it is a promise, and return its JSON value."""
        reply = await asyncio.wait_for(
            self.send(
                "Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True}
            ),
            timeout,
        )
        if "exceptionDetails" in reply:
            details = reply["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CDPError(f"page script failed: {text}")
        return reply["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 15.0) -> Any:
        """Poll ``expression`` until it is truthy; return its value."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"page never satisfied: {expression}")
            await asyncio.sleep(0.1)

    def _event(self, method: str, params: dict) -> None:
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(details.get("exception", {}).get("description") or details.get("text", ""))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            self.errors.append(params["entry"].get("text", ""))


class Browser:
    """``async with Browser() as browser: page = await browser.new_page()``."""

    def __init__(self, executable: Path = CHROMIUM, extra_flags: tuple[str, ...] = ()):
        self._executable = executable
        self._extra_flags = extra_flags
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._pages: dict[str, Page] = {}
        self._stderr_tail: list[str] = []

    async def __aenter__(self) -> "Browser":
        self._profile = tempfile.mkdtemp(prefix="emica-chromium-")
        self._process = await asyncio.create_subprocess_exec(
            str(self._executable),
            *CHROMIUM_FLAGS,
            *self._extra_flags,
            f"--user-data-dir={self._profile}",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            "about:blank",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            endpoint = await asyncio.wait_for(self._devtools_endpoint(), 30)
        except BaseException:
            await self._stop_process()
            raise
        self._drain = asyncio.ensure_future(self._drain_stderr())
        self._http = aiohttp.ClientSession()
        self._ws = await self._http.ws_connect(endpoint, max_msg_size=0)
        self._reader = asyncio.ensure_future(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._reader.cancel()
        await self._ws.close()
        await self._http.close()
        await self._stop_process()
        self._drain.cancel()
        shutil.rmtree(self._profile, ignore_errors=True)

    async def _stop_process(self) -> None:
        if self._process.returncode is None:
            self._process.terminate()
            try:
                await asyncio.wait_for(self._process.wait(), 10)
            except asyncio.TimeoutError:
                self._process.kill()
                await self._process.wait()

    async def _devtools_endpoint(self) -> str:
        while True:
            line = await self._process.stderr.readline()
            if not line:
                raise CDPError("chromium exited before DevTools started: " + " | ".join(self._stderr_tail[-5:]))
            text = line.decode(errors="replace").strip()
            self._stderr_tail.append(text)
            match = re.search(r"DevTools listening on (ws://\S+)", text)
            if match:
                return match.group(1)

    async def _drain_stderr(self) -> None:
        # Chromium blocks if nobody reads its stderr pipe.
        while await self._process.stderr.readline():
            pass

    async def _read(self) -> None:
        async for message in self._ws:
            data = json.loads(message.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    if "error" in data:
                        future.set_exception(CDPError(f"{data['error'].get('message')} ({data['error'].get('data', '')})"))
                    else:
                        future.set_result(data.get("result", {}))
            elif data.get("sessionId") in self._pages:
                self._pages[data["sessionId"]]._event(data["method"], data.get("params", {}))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(CDPError("DevTools connection closed"))

    async def send(self, method: str, params: Optional[dict] = None, session_id: Optional[str] = None) -> dict:
        message: dict[str, Any] = {"id": next(self._ids), "method": method, "params": params or {}}
        if session_id:
            message["sessionId"] = session_id
        future = asyncio.get_running_loop().create_future()
        self._pending[message["id"]] = future
        await self._ws.send_str(json.dumps(message))
        return await future

    async def new_page(self) -> Page:
        """A blank tab with console capture on; navigate it yourself (so no early error is missed)."""
        # Its own window: a background tab of a headless browser is hidden and renders no video.
        target = await self.send("Target.createTarget", {"url": "about:blank", "newWindow": True})
        attached = await self.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        page = Page(self, attached["sessionId"])
        self._pages[page.session_id] = page
        for domain in ("Page", "Runtime", "Log"):
            await page.send(f"{domain}.enable")
        return page
