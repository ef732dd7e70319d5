"""Wires a RunConfig into a running pipeline: opens the source, builds the stages and sinks, handles
signals, prints the summary. The CLI calls `run(cfg)`; tests and the bench call it too."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

from .config import RunConfig
from .errors import UserError
from .pipeline import Pipeline, PipelineResult
from .types import FrameResult

if TYPE_CHECKING:
    from .resume import Resume

log = logging.getLogger("realtime")


@dataclass
class RunSummary:
    ok: bool
    frames: int
    result: PipelineResult
    outputs: dict[str, Path] = field(default_factory=dict)
    model: str = ""
    signal_number: Optional[int] = None  # the SIGINT/SIGTERM that stopped it (outputs finalised), or None

    @property
    def signalled(self) -> bool:
        return self.signal_number is not None


# -- stages -----------------------------------------------------------------------------------

class TrackStage:
    name = "track"

    def __init__(self, cfg: RunConfig, mode: str, parallel=None, assign_tracks: bool = True):
        self.cfg, self.mode = cfg, mode
        self.parallel = parallel  # a ParallelTracker already tracking the file ahead, or None
        self.assign_tracks = assign_tracks  # frames of one sequence (not a folder of unrelated images)
        self.tracker = None
        self.assigner = None

    def setup(self) -> None:
        from .tracking import FaceTracker
        from .tracks import TrackAssigner

        t = self.cfg.tracking
        if self.parallel is None:
            self.tracker = FaceTracker(num_faces=t.num_faces, scale=t.scale, image_size=t.image_size, mode=self.mode,
                                       device=t.device, min_confidence=t.min_confidence)
        if self.assign_tracks:
            self.assigner = TrackAssigner()

    def process(self, batch: list[FrameResult]) -> None:
        for result in batch:
            if self.parallel is not None:
                faces = self.parallel.faces_for(result.frame)
            else:
                faces = self.tracker.track(result.frame)
            if self.assigner is not None:
                faces = self.assigner.assign(faces, result.frame.pts)
                result.retired_tracks = tuple(self.assigner.retired)
            result.faces = faces

    def teardown(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
        if self.parallel is not None:
            self.parallel.close()


class CropStage:
    """The model's input crops, cut one frame ahead of the model stage (see ``ModelReconstructor.prepare``)."""

    name = "crop"

    def __init__(self, reconstructor):
        self.reconstructor = reconstructor

    def setup(self) -> None:
        pass

    def process(self, batch: list[FrameResult]) -> None:
        for r in batch:
            if not r.replay:
                self.reconstructor.prepare(r)

    def teardown(self) -> None:
        pass


class ReconstructStage:
    name = "model"
    batched = True

    def __init__(self, reconstructor):
        self.reconstructor = reconstructor

    def setup(self) -> None:
        pass

    def process(self, batch: list[FrameResult]) -> None:
        # Replay frames come first and skip the model, so a track they retire has no state here to free.
        batch = [r for r in batch if not r.replay]
        if batch:
            self.reconstructor.reconstruct(batch)

    def teardown(self) -> None:
        pass


class RenderStage:
    name = "render"

    def __init__(self, cfg: RunConfig, frames: bool, crops: bool):
        self.cfg = cfg
        self.frames = frames  # the whole frame's render, for the composed panels
        self.crops = crops  # inferno's per-face geometry.png crop
        self.renderer = None

    def setup(self) -> None:
        from .render import Renderer

        self.renderer = Renderer()  # the GL context belongs to this thread

    def process(self, batch: list[FrameResult]) -> None:
        for result in batch:
            if result.replay:
                continue
            if self.frames:
                h, w = result.frame.image.shape[:2]
                result.rendered, result.mask = self.renderer.render(h, w, result.reconstructions,
                                                                    image_type=self.cfg.compose.image_type)
            if self.crops:
                for rec in result.reconstructions:
                    rec.crop_image = self.renderer.render_crop(rec, image_size=self.cfg.tracking.image_size)

    def teardown(self) -> None:
        if self.renderer is not None:
            self.renderer.close()


class ComposeStage:
    """The output panels, on a thread of its own so that composing frame k overlaps rendering frame k+1."""

    name = "compose"

    def __init__(self, cfg: RunConfig):
        from .compose import ComposeOptions

        c = cfg.compose
        self.opts = ComposeOptions(include_original=c.include_original, include_rec=c.include_rec,
                                   include_transparent=c.include_transparent, black_background=c.black_background,
                                   use_mask=c.use_mask, cat_dim=c.cat_dim)

    def setup(self) -> None:
        pass

    def process(self, batch: list[FrameResult]) -> None:
        from .compose import compose

        for result in batch:
            if not result.replay:
                result.composite = compose(result.frame.image, result.rendered, result.mask, result.faces, self.opts)

    def teardown(self) -> None:
        pass


# -- sources ----------------------------------------------------------------------------------

class FrameFeed:
    """Source frames as FrameResults; remembers whether the source ran out (vs. a stop or max_frames)."""

    def __init__(self, source, max_frames: Optional[int], microphone=None, replay_frames: int = 0):
        self.source, self.max_frames, self.microphone = source, max_frames, microphone
        self.replay_frames = replay_frames  # --resume: frames an earlier run already wrote
        self.exhausted = False

    def __iter__(self) -> Iterator[FrameResult]:
        it = iter(self.source)
        count = 0
        while self.max_frames is None or count < self.max_frames:
            t0 = time.perf_counter()
            try:
                frame = next(it)
            except StopIteration:
                self.exhausted = True
                return
            decode_ms = (time.perf_counter() - t0) * 1000.0
            if self.microphone is not None:
                frame.audio.extend(self.microphone.read())
            replay = frame.index < self.replay_frames
            if not replay:
                count += 1
            yield FrameResult(frame=frame, timings={"decode": decode_ms}, replay=replay)


def tracker_workers(requested: Optional[int], cores: int) -> int:
    """MediaPipe processes for a video file (each about one core, re-detecting at its chunk's start).

    ``requested`` (--num_workers) is kept up to the core count. By default every core but a quarter of them
    (at least 2) tracks: the rest decode, feed the model, render, compose and encode. 16 cores: 12 trackers;
    8: 6; 4: 2; 2 cores: 1, the single tracker.
    """
    if requested is not None:
        return max(1, min(requested, cores))
    return max(1, cores - max(2, cores // 4))


PROCESSED_FORMAT = "processed_%Y_%b_%d_%H-%M-%S"  # inferno's folder names


def sound_from_microphone(source) -> bool:
    """Live input with no sound of its own (a camera, a silent stream) records the microphone; files and streams
    with an audio track keep theirs (both at once would fight over the same stretch of time)."""
    from .sources import ImageFolderSource, VideoFileSource

    return source.live and not isinstance(source, (VideoFileSource, ImageFolderSource)) and not source.audio_rate


def results_folder(processed: Path, stem: str, model_name: str) -> Path:
    """inferno's layout: <processed_…>/<video stem>/results/<model>/."""
    return processed / stem / "results" / model_name


def _processed_folder(cfg: RunConfig, base: Path, stem: str, model_name: str) -> Path:
    from .resume import PROGRESS_FILE

    o = cfg.output
    if o.processed_subfolder:
        return base / o.processed_subfolder

    def holds_run(folder: Path) -> bool:
        return (results_folder(folder, stem, model_name) / PROGRESS_FILE).is_file()

    if o.resume:
        # The latest folder holding a run of this input, by the time in its name (as text, Jan sorts after Feb).
        runs = [p for p in base.glob("processed_*") if holds_run(p)]
        if runs:
            return max(runs, key=_started_at)
    # A new run never joins one of the same input started in the same second: the next free second's name.
    now = time.time()
    return next(folder for k in range(3600)
                if not holds_run(folder := base / time.strftime(PROCESSED_FORMAT, time.localtime(now + k))))


def _started_at(folder: Path) -> tuple[float, str]:
    try:
        return time.mktime(time.strptime(folder.name, PROCESSED_FORMAT)), folder.name
    except ValueError:
        return folder.stat().st_mtime, folder.name  # a name of the user's own: when it last changed


def resume_settings(cfg: RunConfig) -> dict:
    """The flags that shape a video's outputs, as `{flag: value}`: progress.json records them and a --resume
    with other values is refused (the joined video and files would mix two kinds of output)."""
    c, o, t, m = cfg.compose, cfg.output, cfg.tracking, cfg.model
    settings = {
        "--image_type": c.image_type, "--include_original": c.include_original, "--include_rec": c.include_rec,
        "--include_transparent": c.include_transparent, "--black_background": c.black_background,
        "--use_mask": c.use_mask, "--cat_dim": c.cat_dim,
        "--save_video": o.save_video, "--save_images": o.save_images, "--save_codes": o.save_codes,
        "--save_mesh": o.save_mesh, "--export": o.export, "--audio": o.audio, "--smoothing": o.smoothing,
        "--num_faces": t.num_faces, "--scale": t.scale, "--image_size": t.image_size,
        "--min_confidence": t.min_confidence, "--per_frame_tracking": t.per_frame,
        "--identity_cache": m.identity_cache, "--identity_refresh": m.identity_refresh, "--mode": m.mode,
        # Where the frames done so far are (--record replaces the folder's video), and how many tracker processes
        # cut the file into chunks (a chunk's first frame is a fresh detection; the default follows the cores).
        "--record": str(Path(o.record).resolve()) if o.record else None,
        "--num_workers": tracker_workers(cfg.num_workers, os.cpu_count() or 1),
    }
    if m.mode == "detail":
        settings["--detail_model"] = m.detail_model
    return settings


def _video_size(cfg: RunConfig, source) -> tuple[int, int]:
    """(width, height) of the composed panels: the recorder's frame size before padding to even."""
    from .compose import ComposeOptions, panel_shape

    c = cfg.compose
    ph, pw = panel_shape(source.height, source.width, ComposeOptions(
        include_original=c.include_original, include_rec=c.include_rec,
        include_transparent=c.include_transparent, cat_dim=c.cat_dim))
    return pw, ph


# -- run --------------------------------------------------------------------------------------

def run(cfg: RunConfig) -> RunSummary:
    from .reconstruct import create_reconstructor
    from .resume import Resume
    from .sources import DEFAULT_FPS, ImageFolderSource, VideoFileSource, open_source

    source = open_source(cfg.input, live=True if cfg.realtime else None)
    live = source.live
    is_folder = isinstance(source, ImageFolderSource)
    if cfg.output.resume and (live or is_folder):
        log.warning("--resume continues video files only: %s is processed from the start", source.description)
    if cfg.output.smoothing == "lookahead" and (live or is_folder):
        source.close()
        if live:
            raise UserError(f"--smoothing lookahead waits for later frames, which live input {cfg.input} does not have: "
                            "use --smoothing on or auto")
        raise UserError(f"--smoothing lookahead needs a video: the images of folder {cfg.input} are separate photos; "
                        "use --smoothing off")
    from_device = sound_from_microphone(source)
    try:
        reconstructor = create_reconstructor(cfg, live=live, stable_tracks=not is_folder)
    except BaseException:
        source.close()
        raise
    model_name = reconstructor.name
    log.info("input: %s | model: %s", source.description, model_name)

    o = cfg.output
    outputs: dict[str, Path] = {}
    resume = None
    if not live:
        try:
            base = Path(o.output_folder or ("image_output" if is_folder else "video_output"))
            stem = Path(cfg.input).stem
            outfolder = base / model_name if is_folder else results_folder(_processed_folder(cfg, base, stem, model_name), stem, model_name)
            _make_folder(outfolder)
            outputs["folder"] = outfolder
            if o.save_video and not is_folder:
                outputs["video"] = outfolder / f"video_{cfg.compose.image_type}.mp4"
            if not is_folder:
                # Checks only: nothing in the folder changes before the pipeline has run.
                width, height = _video_size(cfg, source)
                video = Path(o.record) if o.record else outputs.get("video")  # what the recorder will write
                resume = Resume(outfolder, cfg.input, video, enabled=o.resume,
                                settings=resume_settings(cfg), frame_size=(width + width % 2, height + height % 2))
        except BaseException:
            source.close()
            raise
        if resume is not None and resume.already_complete:
            source.close()
            print(f"nothing to do: {outfolder} is complete (progress.json); delete it to run again")
            return RunSummary(ok=True, frames=0, result=PipelineResult(), outputs=outputs, model=model_name)
        if resume is not None and resume.resuming and o.smoothing == "on":
            log.warning("--smoothing on: the filter starts afresh at frame %d, so about a second after it can differ "
                        "slightly from an uninterrupted run", resume.frames_done)
    elif o.export:
        # Live motion capture: the session's parameters in one results file, written when it ends.
        folder = _new_session_folder(Path(o.output_folder or "live_output"))
        outputs["export"] = folder / f"results.{o.export}"
    if o.record:
        outputs["video"] = Path(o.record)

    from .logger import create_logger

    sinks: list = []
    microphone = None
    feed = None
    parallel = None
    pipeline = None
    result = PipelineResult()
    delivered = 0  # frames handed to every sink (read in `finally`, also after a second Ctrl-C)
    with_faces = 0  # of them, frames in which a face was found
    run_logger = create_logger(cfg.logger)
    run_logger.log_config(cfg)
    signals = _Signals()
    signals.install()
    try:
        if from_device and o.audio and ("video" in outputs or o.webrtc):
            from .audio import MicrophoneCapture

            # The same clock as the live source's pts, so sound and picture line up.
            microphone = MicrophoneCapture(device=o.audio_device, clock_origin=getattr(source, "clock_origin", None))
            microphone.start()
        sinks = _build_sinks(cfg, source, outputs, model_name, resume, microphone is not None)
        if live and not sinks:
            raise UserError("live input needs somewhere to go: add --show, --webrtc 127.0.0.1:8080 or --record out.mp4")

        # --per_frame_tracking: MediaPipe IMAGE mode on every frame, still with track ids across frames.
        track_mode = "image" if is_folder or cfg.tracking.per_frame else ("live" if live else "video")
        workers = tracker_workers(cfg.num_workers, os.cpu_count() or 1)
        if isinstance(source, VideoFileSource) and not live and workers > 1:
            from .parallel_tracking import ParallelTracker

            t = cfg.tracking
            replayed = resume.frames_done if resume is not None else 0
            parallel = ParallelTracker(cfg.input, workers=workers,
                                       max_frames=None if cfg.max_frames is None else replayed + cfg.max_frames,
                                       num_faces=t.num_faces, scale=t.scale, image_size=t.image_size,
                                       device=t.device, min_confidence=t.min_confidence, mode=track_mode)
        panels = "video" in outputs or o.show or bool(o.webrtc)  # the sinks that show the composed panels
        crops = o.save_images and not live
        # Nothing is drawn that no output shows (an export-only or --stream_params run renders nothing).
        stages = [TrackStage(cfg, track_mode, parallel, assign_tracks=not is_folder),
                  *([CropStage(reconstructor)] if hasattr(reconstructor, "prepare") else []),
                  ReconstructStage(reconstructor),
                  *([RenderStage(cfg, frames=panels, crops=crops)] if panels or crops else []),
                  *([ComposeStage(cfg)] if panels else [])]
        progress = _progress_bar(cfg, source, live)
        window = next((s for s in sinks if hasattr(s, "should_quit")), None)
        started = time.perf_counter()

        def deliver(item: FrameResult) -> None:
            # After a failed delivery the pipeline calls this no more (a later frame would leave a gap).
            nonlocal delivered, with_faces
            if item.replay:
                if progress is not None:
                    progress.update(1)  # re-tracking the frames done before: the bar moves while it takes
                return
            with_faces += bool(item.faces)
            t0 = time.perf_counter()
            for sink in sinks:
                sink.write(item)
            item.timings["sinks"] = (time.perf_counter() - t0) * 1000.0
            delivered += 1
            run_logger.log_frame_stats(delivered, item.timings, delivered / max(time.perf_counter() - started, 1e-9))
            if progress is not None:
                progress.update(1)
            if window is not None and window.should_quit:
                pipeline.stop()

        feed = FrameFeed(source, cfg.max_frames, microphone, replay_frames=resume.frames_done if resume else 0)
        if cfg.output.smoothing == "lookahead":
            pipeline = _lookahead_pipeline(feed, stages, reconstructor, source.fps or DEFAULT_FPS, cfg.model.batch_size, deliver)
        else:
            pipeline = Pipeline(feed, stages, live=live, batch_size=cfg.model.batch_size, on_result=deliver,
                                stats_every=5.0 if (cfg.stats and live) else None)
        signals.running(pipeline)
        try:
            result = pipeline.run()
        except Interrupted:
            # A second signal: drop the frames in flight, but let the threads end before the input and the
            # outputs are closed under them.
            if not pipeline.abort():
                log.warning("some pipeline threads did not stop in time; closing the outputs anyway")
            raise
        if progress is not None:
            progress.close()
    finally:
        signals.finishing()  # from here on a signal only gets a note: the outputs are being finalised
        try:
            result.frames_out = delivered
            failed: list[BaseException] = []

            def attempt(what: str, action) -> bool:
                try:
                    action()
                    return True
                except BaseException as err:  # noqa: BLE001 - finish the rest first, then report it
                    log.error("%s failed: %s", what, err)
                    failed.append(err)
                    if result.error is None and isinstance(err, Exception):
                        result.error = err  # an output that could not be finalised makes the run fail
                    return False

            if parallel is not None:
                attempt("stopping the tracker processes", parallel.close)
            if microphone is not None:
                attempt("stopping the microphone", microphone.stop)
            # Every sink is closed, whatever the others do. One that writes its file on close (the results file)
            # and failed holds none of this run's frames; a background sink counts what reached its file itself.
            finalised = True
            for sink in sinks:
                if not attempt(f"closing {getattr(sink, 'name', type(sink).__name__)}", sink.close):
                    finalised = finalised and hasattr(sink, "written")
            attempt("closing the input", source.close)
            if resume is not None and feed is not None:
                # Only what every output holds counts as done: a background sink may have failed on a delivered frame.
                written = min([delivered] + [s.written for s in sinks if hasattr(s, "written")]) if finalised else 0
                attempt("recording the progress", lambda: resume.finish(frames=written,
                                                                         complete=feed.exhausted and result.error is None))
                aborted = sys.exc_info()[1]  # in flight through this finally: a second signal's abort
                if isinstance(aborted, Interrupted) and not resume.complete:
                    aborted.note = _stopped_note(resume, o.smoothing)
            if outputs.get("video") is not None and outputs["video"].is_file() and result.error is None:
                attempt("logging the video", lambda: run_logger.log_video(outputs["video"]))
            attempt("finishing the run log", lambda: run_logger.finish(exit_code=0 if result.error is None else 1))
            uncaught = next((e for e in failed if not isinstance(e, Exception)), None)
            if uncaught is not None:
                raise uncaught
        finally:
            signals.restore()

    if result.error is not None:
        raise result.error
    if cfg.stats:
        print("per-stage latency (ms):\n" + pipeline.times.format())
    where = outputs.get("video") or outputs.get("folder") or outputs.get("export")
    note = f" ({_stopped_note(resume, o.smoothing)})" if resume is not None and not resume.complete else ""
    print(f"{result.frames_out} frames at {result.fps:.1f} fps{note}" + (f" → {where}" if where else ""))
    if outputs.get("export") is not None and where != outputs["export"]:
        print(f"results → {outputs['export']}")
    if result.frames_out and not with_faces:
        log.warning("no face was found in any of the %d frames of %s, so nothing was reconstructed (faces must be "
                    "visible and not tiny; --min_confidence %.2f could be lowered)",
                    result.frames_out, source.description, cfg.tracking.min_confidence)
    if result.dropped:
        print(f"dropped {result.dropped} frames to stay live")
    # A signal that came after the last frame was read stopped nothing: the run is complete.
    stopped = not (feed is not None and feed.exhausted)  # a signal after the last frame was read stopped nothing
    return RunSummary(ok=True, frames=result.frames_out, result=result, outputs=outputs, model=model_name,
                      signal_number=signals.received if stopped else None)


def _stopped_note(resume: "Resume", smoothing: str) -> str:
    """What a run that stopped early says about going on."""
    if smoothing == "lookahead":  # --resume refuses it (the first frames would lack earlier neighbours)
        return f"stopped after frame {resume.frames_done}; a --smoothing lookahead run cannot be resumed"
    return f"stopped after frame {resume.frames_done}; continue with --resume"


def _lookahead_pipeline(feed: FrameFeed, stages: list, reconstructor, fps: float, batch_size: int, deliver):
    """track → model → look-ahead smoothing (held back K frames) → render → compose → sinks, for
    `--smoothing lookahead`."""
    from .lookahead import LookaheadPipeline, LookaheadSmoother, lookahead_frames
    from .smoothing import ParamSmoother

    params = ParamSmoother("default")
    k = lookahead_frames(params, fps)
    log.info("look-ahead smoothing: output held back %d frames (%.2f s)", k, k / fps)
    upstream = [s for s in stages if not isinstance(s, (RenderStage, ComposeStage))]
    downstream = [s for s in stages if isinstance(s, (RenderStage, ComposeStage))]
    return LookaheadPipeline(feed, upstream, downstream, LookaheadSmoother(reconstructor, params, k),
                             batch_size=batch_size, on_result=deliver)


def _new_session_folder(base: Path) -> Path:
    """A fresh `session_<date>` folder under `base`; a second session in the same second gets `_2`, `_3`, …"""
    _make_folder(base)
    stem = time.strftime("session_%Y_%b_%d_%H-%M-%S")
    for n in range(1, 1000):
        folder = base / (stem if n == 1 else f"{stem}_{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
        except OSError as err:
            raise UserError(f"cannot create output folder {folder}: {err.strerror}; choose another --output_folder") from err
    raise UserError(f"{base} already has 999 sessions started at {stem[8:]}; choose another --output_folder")


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        # The OS names the folder it was making; the user needs the file that blocks it (maybe a parent).
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), err.filename)
        raise UserError(f"cannot create output folder {folder}: a file is in the way ({blocker}); choose another --output_folder") from err
    except OSError as err:
        raise UserError(f"cannot create output folder {folder}: {err.strerror}; choose another --output_folder") from err


def _build_sinks(cfg: RunConfig, source, outputs: dict[str, Path], model_name: str, resume: Optional["Resume"],
                 microphone: bool) -> list:
    """The run's sinks; if one cannot be made, those already made are closed (no temp file is left behind)."""
    sinks: list = []
    try:
        _add_sinks(sinks, cfg, source, outputs, model_name, resume, microphone)
    except BaseException:
        for sink in reversed(sinks):
            try:
                sink.close()
            except Exception as err:  # noqa: BLE001 - the error that stopped the start-up is the one to report
                log.debug("closing %s after a failed start: %s", getattr(sink, "name", type(sink).__name__), err)
        raise
    return sinks


def _add_sinks(sinks: list, cfg: RunConfig, source, outputs: dict[str, Path], model_name: str,
               resume: Optional["Resume"], microphone: bool) -> None:
    from .sinks.background import BackgroundSink
    from .sources import DEFAULT_FPS

    o = cfg.output
    resuming = resume is not None and resume.resuming
    if "folder" in outputs and (o.save_images or o.save_codes or o.save_mesh):
        from .sinks.outputs import FrameOutputs

        frame_outputs = FrameOutputs(outputs["folder"], save_images=o.save_images, save_codes=o.save_codes,
                                     save_mesh=o.save_mesh, render_crop=lambda rec: rec.crop_image)
        if resuming:
            frame_outputs.resume(resume.frames_done)
        sinks.append(BackgroundSink(frame_outputs, name="per-frame outputs"))
    if o.export and "folder" in outputs:
        outputs["export"] = outputs["folder"] / f"results.{o.export}"
    if "export" in outputs:
        from .export import ResultsWriter

        writer = ResultsWriter(outputs["export"], fmt=o.export, model_name=model_name, fps=source.fps or 0.0)
        if resuming:
            writer.resume(resume.frames_done)  # the earlier frames' rows, so the file holds every frame
        sinks.append(writer)
    if "video" in outputs:
        from .sinks.recorder import Recorder

        pw, ph = _video_size(cfg, source)
        if microphone:
            audio_rate, channels = 48000, 1
        elif o.audio and source.audio_rate:
            audio_rate, channels = source.audio_rate, source.audio_channels
        else:
            audio_rate, channels = None, None
        path = resume.recording_path if resume is not None else outputs["video"]
        # "auto": h264_nvenc where an NVIDIA GPU is usable (encoding off the CPU), else libx264.
        recorder = Recorder(path, fps=source.fps or DEFAULT_FPS, width=pw, height=ph,
                            audio_rate=audio_rate, audio_channels=channels, codec="auto",
                            known_as=outputs["video"], chosen_with="--record path" if o.record else "--output_folder")
        sinks.append(BackgroundSink(recorder, name=f"recorder ({path.name})"))
    if o.show:
        from .sinks.window import WindowSink

        sinks.append(WindowSink())
    if o.webrtc:
        from .config import parse_host_port
        from .sinks.webrtc import WebRTCSink

        host, port = parse_host_port(o.webrtc, "--webrtc")
        sinks.append(WebRTCSink(host=host, port=port, token=o.webrtc_token, max_viewers=o.webrtc_max_viewers,
                                fps=source.fps or DEFAULT_FPS, stats=cfg.stats))
    if o.stream_params:
        from .sinks.params_stream import ParamStreamSink

        sinks.append(ParamStreamSink(o.stream_params, model_name=model_name, allow_remote=o.stream_remote))


def _progress_bar(cfg: RunConfig, source, live: bool):
    if live or not cfg.progress or not sys.stderr.isatty():  # a log file would fill with carriage-return redraws
        return None
    from tqdm import tqdm

    total = source.frame_count
    if cfg.max_frames is not None and total is not None:
        total = min(total, cfg.max_frames)
    return tqdm(total=total, unit="frame", dynamic_ncols=True, leave=False)


class Interrupted(KeyboardInterrupt):
    """Raised by a signal during start-up, or a second one while running; says which (exit status 128 + it) and,
    once the outputs are finalised, where a --resume would go on (``note``)."""

    def __init__(self, signal_number: int):
        super().__init__(signal_number)
        self.signal_number = signal_number
        self.note = ""


class _Signals:
    """SIGINT/SIGTERM for the whole run, from start-up to the last file finalised.

    Starting up: abort (Interrupted, a KeyboardInterrupt; nothing is written yet). Running: the first signal
    finishes the frames in flight and finalises the outputs, a second stops at once (Interrupted). Finishing (closing
    the outputs, joining a resumed video): a signal is only noted, so no output is left half-closed.
    """

    def __init__(self):
        self.pipeline: Optional[Pipeline] = None
        self.previous: dict[int, object] = {}
        self.received: Optional[int] = None  # the first signal's number
        self.phase = "starting"

    def _handler(self, signum, frame):
        if self.phase == "finishing":
            log.warning("finishing the outputs; please wait")
            return
        first = self.received is None
        if first:
            self.received = signum
        if self.phase == "starting" or not first:
            if self.phase == "running":
                self.phase = "finishing"  # a third signal must not cut short the abort and the closing that follow
            raise Interrupted(signum)
        log.warning("stopping: finishing the current frames and closing the outputs (press Ctrl-C again to abort)")
        self.pipeline.stop()

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handler)

    def running(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.phase = "running"

    def finishing(self) -> None:
        self.phase = "finishing"

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()
