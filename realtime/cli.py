"""The command line: flags → RunConfig → pipeline. `python app.py --help` lists every flag.

Flag names follow inferno's demos (`--input_video`, `--output_folder`, `--model_name`, `--path_to_models`,
`--save_images`, `--include_original`, …) so existing scripts keep working.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Optional, Sequence

from .config import BACKENDS, DEFAULT_MODEL, IMAGE_TYPES, MODES, PRECISIONS, SMOOTHING_MODES, RunConfig
from .errors import UserError

log = logging.getLogger("realtime")


def str2bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on", "y", "t"):
        return True
    if value in ("0", "false", "no", "off", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _bool_flag(group, name: str, default: bool, help: str) -> None:
    """`--flag` turns it on, `--flag false` (inferno style) or `--no-flag` turns it off."""
    group.add_argument(
        f"--{name}", nargs="?", const=True, default=default, type=str2bool, metavar="BOOL",
        help=f"{help} (default: {str(default).lower()})",
    )
    group.add_argument(f"--no-{name}", dest=name, action="store_false", help=argparse.SUPPRESS)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown once: not for flags whose help already says it (booleans: "true", not "True"), nor None, nor
    for switches that take no value (--no_audio's default True is --audio's, not the switch's)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.nargs == 0 or "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """A bad flag is one line, not the whole usage text (app.py, build_engines.py and the bench scripts)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see: python {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="app.py",
        description=(
            "EMICA Realtime: real-time 3D face reconstruction. Live webcam overlay (--input 0 --show), "
            "video files at full speed (--input video.mp4), image folders (--input photos/), RTSP/HTTP streams "
            "(--input rtsp://…), WebRTC broadcast (--webrtc 127.0.0.1:8080) and recording (--record out.mp4)."
        ),
        formatter_class=_HelpFormatter,
    )
    io = p.add_argument_group("input")
    io.add_argument(
        "--input", "--input_video", "--input_folder", dest="input", default=None,
        help="video file, image folder or image, camera index (0, 1, …) or rtsp:// / http:// URL "
             "(--input_video and --input_folder are inferno's names for it)",
    )
    _bool_flag(io, "realtime", False, "play a video file at its own frame rate, like a camera (live mode: frames may be "
               "dropped to stay real-time; for watching or broadcasting a file with --show / --webrtc)")
    io.add_argument("--max_frames", type=int, default=None, help="stop after this many frames")

    tr = p.add_argument_group("face tracking (MediaPipe FaceLandmarker)")
    tr.add_argument("--num_faces", type=int, default=1, help="faces reconstructed per frame")
    tr.add_argument("--scale", type=float, default=1.25, help="face box scale (inferno's crop scale)")
    tr.add_argument("--image_size", type=int, default=224, help="side of the encoder crop in pixels")
    tr.add_argument("--tracker_device", choices=("cpu", "gpu"), default="cpu", help="MediaPipe delegate")
    tr.add_argument("--min_confidence", type=float, default=0.5, help="face detection/tracking confidence")
    _bool_flag(tr, "per_frame_tracking", False, "detect the face in every frame on its own (MediaPipe IMAGE mode), "
               "without MediaPipe's frame-to-frame tracking and landmark smoothing: the raw per-frame input inferno "
               "uses, for comparisons with --smoothing off; jitterier and slower on video")

    md = p.add_argument_group("model")
    md.add_argument(
        "--model_name", default=None,
        help=f"reconstruction model: {DEFAULT_MODEL} (default), EMICA-CVT_flame2020, EMICA-MEAD_flame2020, "
             "EMICA-CVT_flame2023, EMOCA_v2_lr_mse_20, EMOCA_v2_lr_cos_1.5, EMOCA_v2_mp, DECA, or 'mediapipe' "
             "(MediaPipe's own 478-point mesh, needs no download; used automatically when the EMICA assets are absent)",
    )
    md.add_argument("--path_to_models", default=None, help="folder of model folders (default: ASSETS/FaceReconstruction/models)")
    md.add_argument("--assets_dir", default=None,
                    help="assets root made by download_assets.sh (FLAME/, MICA/, …) (default: assets; given, its model "
                         "must be there: no fallback to the MediaPipe mesh)")
    md.add_argument(
        "--mode", choices=MODES, default="coarse",
        help="coarse, or detail (EMOCA/DECA detail branch: UV displacement and detail normals; for EMICA the detail branch "
             "comes from --detail_model, which is conditioned on the first 50 of EMICA's 100 expression parameters)",
    )
    md.add_argument("--detail_model", default="EMOCA_v2_lr_mse_20", help="EMOCA/DECA model whose detail branch --mode detail uses with EMICA")
    md.add_argument("--device", default="cpu", help="inference device: cpu or cuda:N")
    md.add_argument("--backend", choices=BACKENDS, default="auto", help="inference backend (auto picks the fastest available and says why)")
    md.add_argument("--engines_dir", default="engines", help="where build_engines.py put the ONNX exports / TensorRT engines")
    md.add_argument("--precision", choices=PRECISIONS, default="fp32", help="inference precision")
    _bool_flag(md, "compile", False, "GPU, PyTorch backend: torch.compile the image networks before capturing their "
                                     "CUDA graphs (fused kernels; minutes more at start-up)")
    md.add_argument("--batch_size", type=int, default=4, help="faces per inference batch (files fill batches; live never waits)")
    md.add_argument("--num_workers", type=int, default=None,
                    help="tracker processes for video files (default: all cores but a quarter, at least 2, left for the "
                         "rest of the pipeline; at most the core count); each process re-detects the face at the start of "
                         "its chunk: 1 gives single-tracker results everywhere")
    _bool_flag(md, "identity_cache", True, "run MICA once per track and reuse the shape code (false: every frame, as inferno)")
    md.add_argument("--identity_refresh", type=int, default=0,
                    help="with the identity cache: measure each track's identity afresh after this many frames, e.g. "
                         "for long live sessions whose first frames were poor (0: never; the shape then stays constant)")

    vz = p.add_argument_group("video panels (inferno's reconstruction video)")
    vz.add_argument("--image_type", choices=IMAGE_TYPES, default="geometry", help="what the reconstruction panel shows")
    _bool_flag(vz, "include_original", True, "panel: the frame with the face box")
    _bool_flag(vz, "include_rec", True, "panel: the reconstruction drawn opaque over the frame")
    _bool_flag(vz, "include_transparent", True, "panel: the reconstruction at 196/255 opacity over the frame")
    _bool_flag(vz, "black_background", False, "draw the overlay panels on black instead of the frame")
    _bool_flag(vz, "use_mask", True, "blend only where the mesh is drawn")
    vz.add_argument("--cat_dim", type=int, choices=(0, 1), default=0, help="stack panels vertically (0) or horizontally (1)")

    out = p.add_argument_group("outputs")
    out.add_argument("--output_folder", default=None, help="where results go (default: video_output, or image_output for image folders)")
    out.add_argument("--processed_subfolder", default=None, help="subfolder name under the output folder (default: processed_<date>)")
    _bool_flag(out, "resume", False, "continue an interrupted run in the latest (or --processed_subfolder) folder")
    _bool_flag(out, "save_video", True, "write video_<image_type>.mp4 for a video file (image folders get per-image PNGs; live input: --record)")
    _bool_flag(out, "save_images", True, "per face: geometry.png (inferno layout)")
    _bool_flag(out, "save_codes", False, "per face: FLAME codes as .npy, plus codes.npz per video")
    _bool_flag(out, "save_mesh", False, "per face: mesh_coarse.obj")
    out.add_argument("--export", choices=("npz", "json", "csv"), default=None, help="one results file per video (codes padded to full FLAME)")
    out.add_argument("--record", default=None, help="record the composited stream to this .mp4 (with the input's sound: a stream's own, a camera's from the microphone)")
    _bool_flag(out, "show", False, "show the composited stream in a window (ESC or q quits)")
    out.add_argument("--webrtc", default=None, metavar="HOST:PORT", help="serve the stream to browsers via WebRTC")
    out.add_argument("--webrtc_token", default=None, help="token viewers must present ('auto' generates one); required off loopback")
    out.add_argument("--webrtc_max_viewers", type=int, default=8, help="concurrent WebRTC viewers")
    out.add_argument("--stream_params", default=None, metavar="udp://HOST:PORT", help="send FLAME parameters per frame and track over UDP")
    _bool_flag(out, "stream_remote", False, "allow --stream_params to send to a host other than this machine")
    out.add_argument("--smoothing", choices=SMOOTHING_MODES, default="auto",
                     help="temporal filtering: on = causal (no delay), auto = on for live input only, lookahead = video files only: "
                          "zero-phase over a few frames before and after each frame (no lag on fast moves, output held back by ~0.1 s)")
    _bool_flag(out, "audio", True, "carry audio: the file's or stream's track, or the microphone for a camera")
    out.add_argument("--no_audio", dest="audio", action="store_false", help="same as --audio false")
    out.add_argument("--audio_device", default=None, help="microphone (index or name part) for a camera or a stream without sound")

    rn = p.add_argument_group("run")
    _bool_flag(rn, "stats", False, "print per-stage latency (p50/p95) at the end, and every few seconds for live input")
    _bool_flag(rn, "progress", True, "progress bar for files (when stderr is a terminal)")
    rn.add_argument("--logger", choices=("none", "wandb"), default="none",
                    help="log config, per-stage latency, fps and the output video to Weights & Biases (pip install wandb; "
                         "WANDB_MODE=offline works without an account)")
    rn.add_argument("--log_level", default="info", choices=("debug", "info", "warning", "error"), help="logging verbosity")
    return p


def config_from_args(args: argparse.Namespace) -> RunConfig:
    cfg = RunConfig(input=args.input or "", realtime=args.realtime, num_workers=args.num_workers, max_frames=args.max_frames,
                    stats=args.stats, progress=args.progress, logger=args.logger)
    t = cfg.tracking
    t.num_faces, t.scale, t.image_size = args.num_faces, args.scale, args.image_size
    t.device, t.min_confidence = args.tracker_device, args.min_confidence
    t.per_frame = args.per_frame_tracking
    m = cfg.model
    m.name_given = args.model_name is not None or args.assets_dir is not None or args.path_to_models is not None
    m.name = args.model_name or DEFAULT_MODEL
    m.path_to_models, m.mode, m.detail_model = args.path_to_models, args.mode, args.detail_model
    m.assets_dir = args.assets_dir if args.assets_dir is not None else m.assets_dir
    m.device, m.backend, m.precision, m.batch_size = args.device, args.backend, args.precision, args.batch_size
    m.compile = args.compile
    m.engines_dir = args.engines_dir
    m.identity_cache, m.identity_refresh = args.identity_cache, args.identity_refresh
    c = cfg.compose
    c.include_original, c.include_rec, c.include_transparent = args.include_original, args.include_rec, args.include_transparent
    c.black_background, c.use_mask, c.cat_dim, c.image_type = args.black_background, args.use_mask, args.cat_dim, args.image_type
    o = cfg.output
    o.output_folder = args.output_folder
    o.processed_subfolder, o.resume = args.processed_subfolder, args.resume
    o.save_video, o.save_images, o.save_codes, o.save_mesh = args.save_video, args.save_images, args.save_codes, args.save_mesh
    o.export, o.record, o.show = args.export, args.record, args.show
    o.webrtc, o.webrtc_token, o.webrtc_max_viewers = args.webrtc, args.webrtc_token, args.webrtc_max_viewers
    o.stream_params, o.stream_remote = args.stream_params, args.stream_remote
    o.smoothing, o.audio, o.audio_device = args.smoothing, args.audio, args.audio_device
    return cfg.validate()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(message)s", stream=sys.stderr)
    if args.log_level != "debug":  # WebRTC's ICE and DTLS narrate every candidate pair at INFO
        for noisy in ("aioice", "aiortc"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    # MediaPipe/TFLite log to stderr through glog unless told otherwise; keep the terminal for our own lines.
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        cfg = config_from_args(args)
        from .runner import run  # heavy imports (torch, mediapipe) only after the flags are valid

        summary = run(cfg)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as err:
        note = getattr(err, "note", "")
        print(f"interrupted ({note})" if note else "interrupted", file=sys.stderr)
        return _signal_status(getattr(err, "signal_number", signal.SIGINT))
    if summary.signalled:  # stopped, with everything done so far finalised
        return _signal_status(summary.signal_number)
    return 0 if summary.ok else 1


def _signal_status(signal_number: int) -> int:
    """The shell's convention for a run a signal stopped: 128 + its number (130 Ctrl-C, 143 SIGTERM)."""
    return 128 + signal_number
