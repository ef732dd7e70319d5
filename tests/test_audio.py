"""Microphone capture: device choice, timestamps, and real capture from PulseAudio's 440 Hz source."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import av
import numpy as np
import pytest

import realtime.audio as audio
from realtime.audio import InputDevice, MicrophoneCapture, SampleClock, list_input_devices, resolve_input_device
from realtime.errors import MediaError, UserError
from realtime.types import Frame, FrameResult

DEVICES = [
    InputDevice(0, "HDA Intel PCH: ALC892 Analog (hw:0,0)", 2, 44100.0, "ALSA"),
    InputDevice(3, "USB Audio Device: Webcam Mic (hw:1,0)", 1, 48000.0, "ALSA"),
    InputDevice(5, "pulse", 32, 44100.0, "ALSA"),
    InputDevice(6, "default", 32, 44100.0, "ALSA"),
]

pulse = pytest.mark.skipif(
    os.environ.get("EMICA_TEST_PULSE") != "1",
    reason="needs PulseAudio with a 440 Hz sine source (source .ci/pulse.sh; start_pulse)",
)


def dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


# -- choosing a device -------------------------------------------------------------------------


def test_device_by_default_index_and_name():
    assert resolve_input_device(None, DEVICES, 6).name == "default"
    assert resolve_input_device(3, DEVICES, 6).index == 3
    assert resolve_input_device("3", DEVICES, 6).index == 3  # as typed on the command line
    assert resolve_input_device("webcam", DEVICES, 6).index == 3  # unique, case-insensitive part
    assert resolve_input_device("PULSE", DEVICES, 6).index == 5  # exact name wins


@pytest.mark.parametrize(
    "device, default, message",
    [
        ("zoom", 6, "no microphone matches 'zoom'"),
        ("a", 6, "matches several microphones"),
        (7, 6, "audio device 7 is not a microphone"),
        (None, -1, "there is no default microphone"),
    ],
)
def test_device_errors_say_how_to_fix(device, default, message):
    with pytest.raises(MediaError, match=message) as error:
        resolve_input_device(device, DEVICES, default)
    assert "--audio_device" in str(error.value) and "\n" not in str(error.value)


def test_no_input_device_is_a_user_error(monkeypatch):
    monkeypatch.setattr(audio, "list_input_devices", lambda: [])
    with pytest.raises(UserError, match="no microphone found") as error:
        MicrophoneCapture()
    assert "--audio_device" in str(error.value) and "--no_audio" in str(error.value)


# -- timestamps -------------------------------------------------------------------------------


def test_sample_clock_follows_samples_not_callback_jitter():
    clock = SampleClock(48000, tolerance=0.02)
    rng = np.random.default_rng(0)
    true_starts = np.arange(50) * 0.02
    stamps = [clock.stamp(t + rng.uniform(-0.008, 0.008), 960) for t in true_starts]
    np.testing.assert_allclose(np.diff(stamps), 0.02, atol=1e-9)  # exactly 960 samples apart
    assert abs(stamps[0] - true_starts[0]) < 0.01


def test_sample_clock_reanchors_after_lost_input_and_stays_monotonic():
    clock = SampleClock(48000, tolerance=0.02)
    a = clock.stamp(0.0, 960)
    b = clock.stamp(0.5, 960)  # 480 ms of input lost: follow the device clock
    c = clock.stamp(0.3, 960)  # a device clock that jumps back: order is kept
    assert a == 0.0 and b == 0.5 and b < c < 0.53


# -- the capture callback, fed by hand ----------------------------------------------------------


@pytest.fixture
def fake_mic(monkeypatch):
    """A MicrophoneCapture on a fake one-device system; tests call its PortAudio callback directly."""
    try:
        sd = audio._sounddevice()
    except MediaError as e:
        pytest.skip(str(e))
    monkeypatch.setattr(audio, "list_input_devices", lambda: [InputDevice(0, "Fake Mic", 2, 48000.0, "ALSA")])
    monkeypatch.setattr(sd.default, "device", [0, -1])
    monkeypatch.setattr(sd, "check_input_settings", lambda **kwargs: None)

    def make(**kwargs) -> MicrophoneCapture:
        return MicrophoneCapture(clock_origin=time.monotonic(), **kwargs)

    return make


def feed(mic: MicrophoneCapture, blocks: int, adc: bool = True) -> None:
    """Deliver ``blocks`` 20 ms blocks captured back to back, the last one just now."""
    for k in range(blocks):
        info = SimpleNamespace(inputBufferAdcTime=(500.0 + 0.02 * k) if adc else 0.0, currentTime=500.0 + 0.02 * blocks)
        samples = np.full((960, 1), k + 1, np.float32)
        mic._callback(samples, 960, info, SimpleNamespace(input_overflow=False))


def test_callback_stamps_chunks_with_their_capture_time(fake_mic):
    mic = fake_mic()
    assert mic.device.name == "Fake Mic"
    feed(mic, 5)
    now = time.monotonic() - mic.clock_origin
    chunks = mic.read()
    assert [int(c.samples[0, 0]) for c in chunks] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(np.diff([c.pts for c in chunks]), 0.02, atol=1e-9)
    assert abs(chunks[0].pts - (now - 0.1)) < 0.01  # the first block was captured 100 ms ago
    assert mic.read() == []


def test_callback_without_device_timing_uses_arrival_time(fake_mic):
    mic = fake_mic()
    feed(mic, 1, adc=False)
    (chunk,) = mic.read()
    assert abs(chunk.pts - (time.monotonic() - mic.clock_origin - 0.02)) < 0.01


def test_unread_audio_is_bounded(fake_mic):
    mic = fake_mic(max_buffered_s=0.05)
    feed(mic, 5)
    assert sum(len(c.samples) for c in mic.read()) <= 0.05 * 48000
    assert mic.dropped_samples == 3 * 960


def test_read_until_cuts_at_the_given_time_and_keeps_the_rest(fake_mic):
    mic = fake_mic()
    feed(mic, 3)
    start = mic._chunks[0].pts
    assert mic.read_until(start + 1e-6) == []  # less than half a sample: nothing to hand out
    head = mic.read_until(start + 0.03, timeout=0)
    assert sum(len(c.samples) for c in head) == 1440 and int(head[-1].samples[-1, 0]) == 2
    rest = mic.read()
    assert abs(rest[0].pts - (start + 0.03)) < 1e-9 and sum(len(c.samples) for c in rest) == 1440


# -- real capture (PulseAudio sine source) ------------------------------------------------------


@pytest.mark.pulse
@pulse
def test_pulse_source_is_listed_and_selectable():
    names = [d.name for d in list_input_devices()]
    assert "pulse" in names
    mic = MicrophoneCapture(device="pulse")
    assert mic.device.name == "pulse"
    with pytest.raises(MediaError, match="no microphone matches"):
        MicrophoneCapture(device="no such microphone")


@pytest.mark.pulse
@pulse
def test_capture_two_seconds_of_440_hz():
    origin = time.monotonic()
    mic = MicrophoneCapture(samplerate=48000, channels=1, clock_origin=origin)
    chunks = []
    with mic:
        deadline = time.monotonic() + 8
        while sum(len(c.samples) for c in chunks) < 2 * 48000 and time.monotonic() < deadline:
            time.sleep(0.05)
            chunks += mic.read()
    samples = np.concatenate([c.samples for c in chunks])
    assert samples.dtype == np.float32 and samples.shape[1] == 1 and len(samples) >= 2 * 48000
    assert abs(dominant_hz(samples[:, 0], 48000) - 440) < 2
    pts = np.array([c.pts for c in chunks])
    assert (np.diff(pts) > 0).all()
    # The capture clock runs at ~48000 samples/s: pts (from the device's capture times) advance
    # as fast as the samples do.
    rate = sum(len(c.samples) for c in chunks[:-1]) / (pts[-1] - pts[0])
    assert abs(rate - 48000) < 48000 * 0.03
    # pts are on the caller's clock: nothing was captured after "now".
    assert pts[-1] + len(chunks[-1].samples) / 48000 <= time.monotonic() - origin + 0.01


@pytest.mark.pulse
@pulse
def test_microphone_and_video_recorded_in_sync(tmp_path):
    try:
        from realtime.sinks.recorder import Recorder
    except ImportError:
        pytest.skip("realtime.sinks.recorder is not available yet")
    fps, n_frames, path = 30, 60, tmp_path / "live.mp4"
    image = np.full((120, 160, 3), 90, np.uint8)
    origin = time.monotonic()
    recorder = Recorder(path, fps=fps, width=160, height=120, audio_rate=48000, audio_channels=1)
    with MicrophoneCapture(clock_origin=origin) as mic:
        for i in range(n_frames):
            time.sleep(max(0.0, origin + i / fps - time.monotonic()))
            pts = time.monotonic() - origin
            chunks = mic.read() if i < n_frames - 1 else mic.read_until(pts + 1 / fps, timeout=5)
            recorder.write(FrameResult(frame=Frame(index=i, pts=pts, image=image, audio=chunks)))
    recorder.close()

    with av.open(str(path)) as container:
        video_s = float(container.streams.video[0].duration * container.streams.video[0].time_base)
        sound = [f.to_ndarray() for f in container.decode(audio=0)]
        audio_stream = container.streams.audio[0]
        audio_s = float(audio_stream.duration * audio_stream.time_base)
    pcm = np.concatenate(sound, axis=1)[0]
    assert abs(video_s - n_frames / fps) < 0.2  # live pacing: the frames were 1/30 s apart
    assert abs(audio_s - video_s) <= 1 / fps
    assert abs(dominant_hz(pcm, audio_stream.rate) - 440) < 2
    assert np.sqrt(np.mean(pcm[4800:] ** 2)) > 0.2  # sound throughout, not silence padding
