"""One typed configuration tree. Every CLI flag (realtime.cli) maps onto exactly one field here.

Validation lives here too, so a bad value is reported once, in one line, before anything starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import UserError

DEFAULT_MODEL = "EMICA-CVT_flame2020_notexture"
EMBEDDED_MODEL = "mediapipe"
MODES = ("coarse", "detail")
IMAGE_TYPES = ("geometry", "detail")
BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16")
SMOOTHING_MODES = ("auto", "on", "off", "lookahead")


@dataclass
class TrackingConfig:
    num_faces: int = 1
    scale: float = 1.25  # inferno's box scale
    image_size: int = 224  # encoder crop side
    device: str = "cpu"  # MediaPipe delegate: cpu | gpu
    min_confidence: float = 0.5
    per_frame: bool = False  # MediaPipe IMAGE mode on every frame: no tracking, no MediaPipe landmark smoothing


@dataclass
class ModelConfig:
    name: str = DEFAULT_MODEL
    name_given: bool = False  # the user asked for this model explicitly, by name or by its assets' folder (then missing assets are an error)
    path_to_models: Optional[str] = None  # default: <assets_dir>/FaceReconstruction/models
    assets_dir: str = "assets"
    mode: str = "coarse"
    detail_model: str = "EMOCA_v2_lr_mse_20"
    device: str = "cpu"
    backend: str = "auto"
    engines_dir: str = "engines"  # ONNX exports and TensorRT engines from build_engines.py
    precision: str = "fp32"
    compile: bool = False  # torch.compile the image networks before their CUDA graphs are captured
    batch_size: int = 4
    identity_cache: bool = True  # run MICA once per track, not every frame
    identity_refresh: int = 0  # with the cache: re-measure a track's identity after this many frames (0: never)


@dataclass
class ComposeConfig:
    include_original: bool = True
    include_rec: bool = True
    include_transparent: bool = True
    black_background: bool = False
    use_mask: bool = True
    cat_dim: int = 0
    image_type: str = "geometry"


@dataclass
class OutputConfig:
    output_folder: Optional[str] = None  # default: video_output, or image_output for image folders (inferno's)
    processed_subfolder: Optional[str] = None  # default: processed_<timestamp>; --resume reuses the latest
    resume: bool = False
    save_video: bool = True
    save_images: bool = True
    save_codes: bool = False
    save_mesh: bool = False
    record: Optional[str] = None  # explicit mp4 path (live sessions)
    show: bool = False
    webrtc: Optional[str] = None  # HOST:PORT
    webrtc_token: Optional[str] = None
    webrtc_max_viewers: int = 8
    stream_params: Optional[str] = None  # udp://HOST:PORT
    stream_remote: bool = False  # allow a non-loopback --stream_params host
    export: Optional[str] = None  # npz | json | csv results file per video
    smoothing: str = "auto"  # auto (on for live, off for files) | on | off | lookahead (files: zero-phase, delayed)
    audio: bool = True
    audio_device: Optional[str] = None


@dataclass
class RunConfig:
    input: str = ""
    realtime: bool = False  # play a file at its own frame rate as a live source (for --show / --webrtc)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    compose: ComposeConfig = field(default_factory=ComposeConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    num_workers: Optional[int] = None  # tracker processes for files; None: tracker_workers() picks
    max_frames: Optional[int] = None
    stats: bool = False
    progress: bool = True
    logger: str = "none"  # none | wandb

    def validate(self) -> "RunConfig":
        """Raise UserError (one line: the flag, the bad value, what is allowed) on a bad value."""
        t, m, c, o = self.tracking, self.model, self.compose, self.output
        if not self.input:
            raise UserError("no input given: pass --input (a video file, an image folder, a camera index like 0, or an rtsp:// URL)")
        _require(t.num_faces >= 1, f"--num_faces must be at least 1 (got {t.num_faces})")
        _require(t.scale > 0, f"--scale must be positive (got {t.scale})")
        _require(32 <= t.image_size <= 1024, f"--image_size must be between 32 and 1024 (got {t.image_size})")
        _require(t.device in ("cpu", "gpu"), f"--tracker_device must be cpu or gpu (got {t.device!r})")
        _require(0.0 < t.min_confidence <= 1.0, f"--min_confidence must be in (0, 1] (got {t.min_confidence})")
        _require(m.mode in MODES, f"--mode must be one of {', '.join(MODES)} (got {m.mode!r})")
        _require(m.backend in BACKENDS, f"--backend must be one of {', '.join(BACKENDS)} (got {m.backend!r})")
        _require(m.precision in PRECISIONS, f"--precision must be fp16 or fp32 (got {m.precision!r})")
        _require(m.batch_size >= 1, f"--batch_size must be at least 1 (got {m.batch_size})")
        _require(not m.compile or m.device.startswith("cuda"),
                 f"--compile needs a GPU (--device cuda:N); torch.compile on --device {m.device} is not supported here")
        _require(not m.compile or m.backend in ("auto", "torch"),
                 f"--compile applies to PyTorch networks, not --backend {m.backend}: use --backend torch or auto")
        _require(m.identity_refresh >= 0, f"--identity_refresh must be 0 (never) or a number of frames (got {m.identity_refresh})")
        _require(not m.identity_refresh or m.identity_cache,
                 "--identity_refresh refreshes the cached identity, but --identity_cache is false: drop one of them")
        _require(not m.compile or m.name != EMBEDDED_MODEL,
                 "--compile applies to the EMICA/EMOCA/DECA networks; the MediaPipe mesh has none to compile")
        _require(re.fullmatch(r"cpu|cuda(:\d+)?", m.device) is not None, f"--device must be cpu or cuda:N (got {m.device!r})")
        _require(c.cat_dim in (0, 1), f"--cat_dim must be 0 (vertical) or 1 (horizontal) (got {c.cat_dim})")
        _require(c.image_type in IMAGE_TYPES, f"--image_type must be one of {', '.join(IMAGE_TYPES)} (got {c.image_type!r})")
        _require(not (m.mode == "detail" and m.name == EMBEDDED_MODEL),
                 "--mode detail needs EMICA, EMOCA or DECA (--model_name): the MediaPipe mesh has no detail branch")
        _require(c.image_type != "detail" or m.mode == "detail", "--image_type detail needs --mode detail (the detail branch makes the normal map)")
        _require(
            c.include_original or c.include_rec or c.include_transparent,
            "--include_original, --include_rec and --include_transparent are all off: turn at least one panel on",
        )
        _require(self.num_workers is None or self.num_workers >= 1, f"--num_workers must be at least 1 (got {self.num_workers})")
        _require(self.max_frames is None or self.max_frames >= 1, f"--max_frames must be at least 1 (got {self.max_frames})")
        _require(not (o.resume and o.smoothing == "lookahead"),
                 "--resume cannot continue a --smoothing lookahead run exactly (its first frames would lack the earlier "
                 "neighbours); rerun without --resume, or use --smoothing on")
        _require(self.logger in ("none", "wandb"), f"--logger must be none or wandb (got {self.logger!r})")
        _require(o.smoothing in SMOOTHING_MODES, f"--smoothing must be one of {', '.join(SMOOTHING_MODES)} (got {o.smoothing!r})")
        _require(o.smoothing != "lookahead" or not self.realtime,
                 "--smoothing lookahead waits for later frames, which --realtime playback cannot: use --smoothing on or auto")
        _require(o.export in (None, "npz", "json", "csv"), f"--export must be npz, json or csv (got {o.export!r})")
        if o.webrtc is not None:
            parse_host_port(o.webrtc, "--webrtc")
        if o.record is not None:
            _require(o.record.lower().endswith(".mp4"), f"--record must name an .mp4 file (got {o.record!r})")
            _require(not Path(o.record).is_dir(), f"--record {o.record} is a folder; name an .mp4 file inside it")
            parent = Path(o.record).expanduser().resolve().parent
            _require(parent.is_dir(), f"--record {o.record}: folder {parent} does not exist; create it or choose another path")
        if o.stream_params is not None:
            _require(o.stream_params.startswith("udp://"), f"--stream_params must look like udp://HOST:PORT (got {o.stream_params!r})")
            parse_host_port(o.stream_params[len("udp://"):], "--stream_params")
        _require(o.webrtc_max_viewers >= 1, f"--webrtc_max_viewers must be at least 1 (got {o.webrtc_max_viewers})")
        return self


def parse_host_port(text: str, flag: str) -> tuple[str, int]:
    """'HOST:PORT' or ':PORT' or 'PORT' → (host, port); host defaults to 127.0.0.1."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"{flag} expects HOST:PORT with a port between 1 and 65535 (got {text!r})")
    return host, int(port)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)
