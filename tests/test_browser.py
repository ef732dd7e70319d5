"""The viewer page in a real headless Chromium: it connects, decodes, displays and stays error-free."""

from __future__ import annotations

import asyncio

import aioice.ice
import numpy as np
import pytest

from realtime.sinks.webrtc import WebRTCSink, decode_stamp
from tests.browser_cdp import CHROMIUM, Browser
from tests.test_webrtc import LEFT, RIGHT, Feeder

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)"),
]

# Count displayed frames, read the decoder's stats, and sample pixels of the displayed picture.
WATCH_JS = """
(async () => {
  const video = document.querySelector("video");
  let callbacks = 0;
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`only ${callbacks} video frames in 20 s`)), 20000);
    const step = () => {
      callbacks += 1;
      if (callbacks >= 30) { clearTimeout(timer); resolve(); } else video.requestVideoFrameCallback(step);
    };
    video.requestVideoFrameCallback(step);
  });
  let framesDecoded = 0, audioPackets = 0;
  (await window.emicaViewer.pc.getStats()).forEach((report) => {
    if (report.type !== "inbound-rtp") return;
    if (report.kind === "video") framesDecoded = report.framesDecoded;
    if (report.kind === "audio") audioPackets = report.packetsReceived;
  });
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  const context = canvas.getContext("2d");
  context.drawImage(video, 0, 0);
  const pixels = Array.from(context.getImageData(0, 0, canvas.width, canvas.height).data);
  return {callbacks, framesDecoded, audioPackets, width: canvas.width, height: canvas.height, pixels,
          status: document.getElementById("status").textContent, paused: video.paused};
})()
"""


def test_browser_plays_the_stream(monkeypatch):
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])

    async def run(url: str):
        async with Browser() as browser:
            page = await browser.new_page()
            await page.navigate(url)
            await page.wait_for("window.emicaViewer !== undefined")
            result = await page.evaluate(WATCH_JS, timeout=40)
            await page.evaluate('document.getElementById("unmute").click()')
            muted = await page.evaluate('document.querySelector("video").muted')
            return result, muted, page.errors

    with WebRTCSink(port=0, token="browser-test", stats=True) as sink:
        with Feeder(sink, width=320, height=240):
            result, muted, errors = asyncio.run(run(sink.url))

    assert errors == []
    assert result["callbacks"] >= 30 and result["framesDecoded"] >= 30
    assert result["audioPackets"] > 0
    assert result["status"] == "Live" and not result["paused"] and muted is False
    assert (result["width"], result["height"]) == (320, 240)
    image = np.array(result["pixels"], np.uint8).reshape(240, 320, 4)[..., :3]
    np.testing.assert_allclose(image[40:200, 16:144].reshape(-1, 3).mean(axis=0), LEFT, atol=20)
    np.testing.assert_allclose(image[40:200, 176:304].reshape(-1, 3).mean(axis=0), RIGHT, atol=20)
    assert decode_stamp(image) is not None  # the stats stamp survives to the screen


def test_browser_without_token_sees_the_reason(monkeypatch):
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])

    async def run(url: str):
        async with Browser() as browser:
            page = await browser.new_page()
            await page.navigate(url)
            return await page.wait_for('document.body && document.body.innerText')

    with WebRTCSink(port=0, token="browser-test") as sink:
        text = asyncio.run(run(sink.url.split("?")[0]))
    assert "missing or wrong token" in text
