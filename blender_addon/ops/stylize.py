"""The "Stylize Animation" operator: the scene's frames -> a sequence of `stylize` jobs -> numbered PNG frames
(-> an image strip in the Video Sequencer), chunk by chunk, without freezing Blender.

Flow (ARCHITECTURE.md rule 5; the texture operator's pattern): the operator checks the settings (prompt, a scene
camera, the frame range, the image-sequence folder), then asks the server for its health on a worker thread
(``prefs.check_server_async``: a server that is down is reported before anything is rendered). With the answer it
fills the Model Defaults (steps, guidance, frame size) on the main thread, picks the output folder
(``core.stylize``: a new reserved folder, or the folder of an interrupted run of the same settings, which it
continues), and plans the chunks. Then, one timer tick at a time:

* the main thread captures ONE frame per tick (``capture.frames.FrameCapture``: the user's own render or the
  sequence's image, plus Cycles' depth and Vector passes; the scene's settings and frame are restored within the
  tick), and packs a finished chunk's frames into one request's arrays;
* a ``core.jobs.JobWorker`` thread sends that chunk as one `stylize` job of the run's sequence (``sequence``,
  ``first_frame``, ``sequence_frames``; ``resume: true`` on the first chunk of a continued run), follows it and
  downloads its result into a hidden folder inside the output folder;
* while the server works on chunk k, the main thread captures chunk k + 1 (so at most two chunks are in memory);
  the next job is sent once chunk k is done and its frames have been moved into the output folder
  (``core.stylize.collect_chunk_frames``: one atomic rename per frame, so a frame file is complete or absent).

The progress bar counts stylized frames; the message says which frame is being captured. Cancel (the panel's
button, ``concord.cancel_stylize``, or Esc over Blender) stops at once: the server is told to cancel the running
job, nothing half-written is left (download folders are removed), the frames of finished chunks stay, and running
the operator again with the same settings continues after them. When every frame is on disk the image strip is
added to the scene's Video Sequencer ("Load into Video Sequencer"; a strip of the same folder is replaced): the
operator finishes, which makes ONE undo step (scripts and background mode push one). Any failure (no camera, no
prompt, server down, a bad response, a failed job) is reported (``self.report`` and the panel's last line); the
scene is unchanged, and a run that wrote no frame leaves no folder or manifest behind.

With ``blocking=True`` (scripts) or in background mode the same ticks run in a loop on the calling thread
(waiting on the worker's queue while only the server works); Ctrl+C cancels the server's job and is re-raised.
The machinery shared with the texture operator (the run's slot, the start checks, the health answer, the modal
timer, the end of a run and its clean-up) is ``_running.RunningOperator``.

Layer rule: a bpy layer (ops/). Network only through the worker thread; bpy only on the main thread.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field
from pathlib import Path

import bpy

from .. import capture
from ..capture import frames as frame_capture
from ..core import jobs, results
from ..core import stylize as core_stylize
from ..core.client import ConcordClient
from ..prefs import check_server_async, server_settings
from ..props.stylize import fill_model_defaults, frame_range
from ._running import TICK_S, CancelRun, RunningOperator, RunSlot, interrupted, registration

STRIP_PREFIX = "Concord "


@dataclass
class StylizeRun:
    """The one stylize run of this Blender session (runtime state; never saved)."""

    scene_name: str
    view_layer: str
    source: str
    images: dict | None
    chosen_output: str
    load_in_sequencer: bool
    base_params: dict
    model_defaults: bool
    frame_start: int
    frame_end: int
    chunk_size: int
    health: object | None = None  # queue receiving the health answer, until it came
    # set once the server answered (``_on_health``)
    out_dir: Path | None = None
    reserved: bool = False  # the run made the output folder: it goes again if no frame is written
    resumed: bool = False
    sequence: str = ""
    chunks: list = field(default_factory=list)
    todo: list = field(default_factory=list)  # chunks to capture, in order
    frames_total: int = 0  # frames of the range
    frames_before: int = 0  # frames already on disk when the run started (a continued run)
    frames_done: int = 0  # frames on disk now
    capture: object | None = None  # capture.frames.FrameCapture
    capturing: object | None = None  # the chunk being captured ...
    captured: list = field(default_factory=list)  # ... and its frames so far
    ready: tuple | None = None  # (chunk, arrays) captured, waiting for the server to be free
    worker: jobs.JobWorker | None = None
    worker_chunk: object | None = None
    sent_first: bool = False
    cancel_requested: bool = False
    size: tuple = (0, 0)
    notes: list = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)
    timings: dict = field(default_factory=lambda: {"capture_s": 0.0, "server_s": 0.0, "frames": 0})


_SLOT = RunSlot("concord_stylize_job")  # the running StylizeRun, if any
LAST_TIMINGS: dict = _SLOT.last_timings


def active_run() -> StylizeRun | None:
    return _SLOT.run


def request_cancel() -> bool:
    """Ask the running stylize run to stop. Returns False when none runs."""
    return _SLOT.request_cancel()


# ---------------------------------------------------------------------------------------------------------------
# The Video Sequencer (Blender 4.4 renamed `sequences` to `strips`; 5.0 removed the old name): one place


def _strip_collection(editor):
    return editor.strips if hasattr(editor, "strips") else editor.sequences


def load_into_sequencer(scene, folder: Path, frames: list[int]):
    """An image strip of ``folder``'s frames (one element per frame, starting at the first frame's number) on the
    lowest channel free over that range; an earlier strip of the same folder is replaced. Returns the strip."""
    editor = scene.sequence_editor or scene.sequence_editor_create()
    strips = _strip_collection(editor)
    folder = Path(folder).resolve()
    for strip in list(strips):
        if strip.type == "IMAGE" and Path(bpy.path.abspath(strip.directory)).resolve() == folder:
            strips.remove(strip)
    start, end = frames[0], frames[-1] + 1  # end exclusive, as frame_final_end
    busy = {s.channel for s in strips if s.frame_final_start < end and s.frame_final_end > start}
    channel = next(c for c in range(1, 129) if c not in busy)
    first = str(folder / core_stylize.frame_file(frames[0]))
    if bpy.data.filepath:
        try:
            first = bpy.path.relpath(first)
        except ValueError:  # another drive on Windows: keep it absolute
            pass
    strip = strips.new_image(name=f"{STRIP_PREFIX}{folder.name}", filepath=first, channel=channel,
                             frame_start=start, fit_method="FIT")
    for f in frames[1:]:
        strip.elements.append(core_stylize.frame_file(f))
    return strip


# ---------------------------------------------------------------------------------------------------------------


class _AllDone:
    """Every frame of the range is in the output folder."""


class CONCORD_OT_stylize_animation(RunningOperator, bpy.types.Operator):
    """Stylize the scene's animation from the prompt with the Concord server, frame after frame without flicker"""

    bl_idname = "concord.stylize_animation"
    bl_label = "Stylize Animation"
    slot = _SLOT
    redraw_areas = {"VIEW_3D", "SEQUENCE_EDITOR"}
    success = _AllDone
    noun = "run"

    # ------------------------------------------------------------------ start
    def execute(self, context):
        url, token, timeout = server_settings(context)
        if self._cannot_start(context, url):
            return {"CANCELLED"}
        scene = context.scene
        s = scene.concord_stylize
        try:
            base = core_stylize.stylize_params(
                s.prompt, negative_prompt=s.negative_prompt, seed=s.seed, strength=s.strength,
                steps=None if s.model_defaults else s.steps, guidance=None if s.model_defaults else s.guidance,
                keyframes=s.keyframes, noise=s.noise, chunk_frames=s.chunk_size,
            )
            frame_capture.check_scene(scene)
            for label, folder in (("Output", s.output_dir), ("Images", s.sequence_dir if s.source == "SEQUENCE" else "")):
                if folder.strip().startswith("//") and not bpy.data.filepath:
                    raise core_stylize.StylizeError(
                        f"the {label} folder {folder.strip()!r} is relative to the .blend file, which is not saved yet: "
                        "save it first, or choose a folder with its full path")
            start, end = frame_range(scene, s)
            core_stylize.plan_chunks(start, end, s.chunk_size)  # the range is checked before any connection
            images = None
            if s.source == "SEQUENCE":
                if not s.sequence_dir.strip():
                    raise core_stylize.StylizeError("choose the folder of the image sequence (Source: Images)")
                images = core_stylize.sequence_for_range(bpy.path.abspath(s.sequence_dir), list(range(start, end + 1)))
                if s.output_dir.strip() and _same_folder(s.output_dir, s.sequence_dir):
                    raise core_stylize.StylizeError("the output folder is the image sequence's folder: choose another "
                                                    "one, or the stylized frames would sit among your renders")
        except (core_stylize.StylizeError, capture.CaptureError) as exc:
            self._show(context, "ERROR", f"Concord: {exc}")
            return {"CANCELLED"}
        run = _SLOT.run = StylizeRun(
            scene_name=scene.name, view_layer=context.view_layer.name, source=s.source, images=images,
            chosen_output=s.output_dir.strip(), load_in_sequencer=s.load_in_sequencer, base_params=base,
            model_defaults=s.model_defaults, frame_start=start, frame_end=end, chunk_size=s.chunk_size,
        )
        run.health = check_server_async(url, token, timeout)  # the network wait runs on a thread
        self._set_state(context, running=True, cancelling=False, stage="connecting", step=0, total=end - start + 1,
                        message=url)
        return self._follow(context)

    # ------------------------------------------------------------------ blocking (scripts, background)
    def _run_blocking(self, context):
        run = _SLOT.run
        try:
            final = self._wait_health(context, run)
            while final is None:
                worked = self._tick(context)
                if worked is not True and worked is not False:
                    final = worked
                elif not worked and run.worker is not None:  # only the server works: wait on its messages
                    try:
                        msg = run.worker.messages.get(timeout=TICK_S)
                    except queue.Empty:
                        continue
                    final = self._on_worker_message(context, msg)
        except BaseException as exc:
            if isinstance(exc, Exception):
                return self._finish(context, jobs.Failed(f"unexpected error: {type(exc).__name__}: {exc}"))
            # Ctrl+C: the server's job is cancelled (and confirmed, or given up on) before the interrupt goes on
            if run.worker is not None and not run.worker.finished:
                run.worker.cancel()
                run.worker.cancel_settled.wait(jobs.INTERRUPT_SETTLE_S)
            self._finish(context, jobs.Cancelled(interrupted(exc)))
            raise
        return self._finish(context, final)

    # ------------------------------------------------------------------ interactive
    def modal(self, context, event):
        if event.type == "ESC" and event.value == "PRESS" and _SLOT.run is not None:
            _SLOT.press_cancel(context)
            return {"RUNNING_MODAL"}
        return super().modal(context, event)

    def _tick_modal(self, context, run):
        try:
            if run.health is not None:  # waiting for the server's answer (a thread fetches it)
                return self._modal_health(context, run)
            worked = self._tick(context)
            final = worked if isinstance(worked, (*jobs.FINAL, _AllDone)) else None
        except Exception as exc:
            return self._finish(context, jobs.Failed(f"unexpected error: {type(exc).__name__}: {exc}"))
        if final is not None:
            return self._finish(context, final)
        self._redraw(context)
        return {"RUNNING_MODAL"}

    # ------------------------------------------------------------------ the run
    def _on_health(self, context, kind: str, value):
        """The server answered: settings, output folder, chunks, capture. Returns a final message when the run
        cannot go on (or has nothing to do), else None."""
        run = _SLOT.run
        run.health = None
        if kind != "ok":
            return jobs.Failed(str(value))
        if "stylize" not in (value.get("job_kinds") or []):
            return jobs.Failed(f"the server ({value.get('server_version')}) does not run stylize jobs: update it to "
                               "the same Concord release as the add-on")
        scene = bpy.data.scenes.get(run.scene_name)
        if scene is None:
            return jobs.Failed(f"the scene {run.scene_name!r} was deleted")
        s = scene.concord_stylize
        if run.model_defaults:
            fill_model_defaults(s, value)
        try:
            run.size = frame_capture.scene_frame_size(scene, s.frame_size)
            source = run.source + (f":{Path(bpy.path.abspath(scene.concord_stylize.sequence_dir)).resolve()}"
                                   if run.source == "SEQUENCE" else "")
            fp = core_stylize.fingerprint(run.base_params, frame_start=run.frame_start, frame_end=run.frame_end,
                                          size=run.size, source=source, model=str(value.get("model")),
                                          scene=run.scene_name)
            if run.chosen_output:
                out = Path(bpy.path.abspath(run.chosen_output)).resolve()
                run.resumed = core_stylize.check_output_folder(out, fp)
                run.reserved = not out.exists()
                out.mkdir(parents=True, exist_ok=True)
            else:
                root = (Path(bpy.data.filepath).resolve().parent / "concord") if bpy.data.filepath \
                    else results.temp_results_root()
                out, run.resumed = core_stylize.default_output(root, run.scene_name, fp, time.strftime("%Y%m%d-%H%M%S"))
                run.reserved = not run.resumed
            run.out_dir = out
            core_stylize.remove_stale_downloads(out)
            run.sequence = core_stylize.sequence_name(fp, out)
            run.chunks = core_stylize.plan_chunks(run.frame_start, run.frame_end, run.chunk_size)
            first = core_stylize.resume_point(out, run.chunks) if run.resumed else 0
            run.todo = list(run.chunks[first:])
            run.frames_total = sum(len(c) for c in run.chunks)
            run.frames_before = run.frames_done = sum(len(c) for c in run.chunks[:first])
            core_stylize.write_manifest(out, {
                "version": core_stylize.MANIFEST_VERSION, "fingerprint": fp, "sequence": run.sequence,
                "scene": run.scene_name, "frame_start": run.frame_start, "frame_end": run.frame_end,
                "size": list(run.size), "source": source, "model": value.get("model"), "params": run.base_params,
                "complete": not run.todo,
            })
            if not run.todo:
                return _AllDone()
            run.capture = frame_capture.FrameCapture(scene, run.view_layer, *run.size, source=run.source,
                                                     images=run.images)
        except (core_stylize.StylizeError, capture.CaptureError, OSError) as exc:
            return jobs.Failed(str(exc))
        if run.resumed:
            run.notes.append(f"continued an interrupted run: {run.frames_before} of {run.frames_total} frames were "
                             "already there")
        self._progress(context, stage="capturing", message="")
        return None

    def _tick(self, context):
        """One step of the run: follow the worker, start the next job, capture one frame. Returns a final message,
        True when it did something, False when only the server works."""
        run = _SLOT.run
        if run.worker is not None:
            for msg in run.worker.drain():
                final = self._on_worker_message(context, msg)
                if final is not None:
                    return final
        if run.cancel_requested:  # the worker (if any) posts its Cancelled once the server was told
            return jobs.Cancelled("cancelled") if run.worker is None else False
        worked = False
        if run.worker is None and run.ready is not None:
            self._send(context, *run.ready)
            run.ready = None
            worked = True
        if run.ready is None and (run.capturing is not None or run.todo):
            if run.capturing is None:
                run.capturing, run.captured = run.todo.pop(0), []
            chunk = run.capturing
            frame = chunk.frames[len(run.captured)]
            self._progress(context, message=f"capturing frame {frame}")
            t = time.perf_counter()
            try:
                run.captured.append(run.capture.capture(frame))
                arrays = core_stylize.pack_frames(run.captured) if len(run.captured) == len(chunk) else None
            except (capture.CaptureError, core_stylize.StylizeError) as exc:
                return jobs.Failed(f"capturing frame {frame} failed: {exc}")
            run.timings["capture_s"] += time.perf_counter() - t
            if arrays is not None:
                run.capturing, run.captured = None, []
                self._progress(context, message="")
                if run.worker is None:
                    self._send(context, chunk, arrays)
                else:
                    run.ready = (chunk, arrays)
            return True
        if run.worker is None and run.ready is None and run.capturing is None and not run.todo:
            return _AllDone()
        return worked

    def _send(self, context, chunk, arrays) -> None:
        run = _SLOT.run
        params = core_stylize.chunk_params(run.base_params, chunk, run.sequence, run.frames_total,
                                           resume=run.resumed and not run.sent_first)
        run.sent_first = True
        url, token, timeout = server_settings(context)
        run.worker = jobs.JobWorker(lambda: ConcordClient(url, token, timeout), "stylize", params, arrays,
                                    core_stylize.download_dir(run.out_dir, chunk))
        run.worker_chunk = chunk
        if run.cancel_requested:  # a cancel that came while this chunk was captured: nothing is sent
            run.worker.cancel()
        run.worker.start()
        self._progress(context, stage="uploading")

    def _on_worker_message(self, context, msg):
        """A message of the chunk's worker. Returns a final message for the run, or None."""
        run = _SLOT.run
        chunk = run.worker_chunk
        if isinstance(msg, jobs.Progress):
            partial = 0
            if msg.stage == "stylizing" and msg.total > 0:
                partial = min(len(chunk), int(len(chunk) * msg.step / msg.total))
            # while the next chunk is captured, the message says which frame; otherwise the server's message
            self._progress(context, stage=msg.stage, partial=partial,
                           message=None if run.capturing is not None else msg.message)
            return None
        if isinstance(msg, jobs.Done):
            run.timings["server_s"] += msg.seconds
            run.worker.join(5.0)
            run.worker, run.worker_chunk = None, None
            try:
                core_stylize.collect_chunk_frames(msg.out_dir, chunk, run.out_dir)
            except core_stylize.StylizeError as exc:
                return jobs.Failed(str(exc), job_id=msg.job_id)
            run.frames_done += len(chunk)
            run.timings["frames"] += len(chunk)
            self._progress(context, stage="stylizing")
            return None
        return msg  # Failed or Cancelled

    # ------------------------------------------------------------------ the end
    def _unfinished_note(self, run) -> str:
        if run is not None and run.out_dir is not None and 0 < run.frames_done < run.frames_total:
            return f"; {run.frames_done} of {run.frames_total} frames are in {run.out_dir}: run again to continue"
        return ""

    def _succeed(self, context, run, msg) -> None:
        """Every frame is on disk: the manifest says so, the strip is added, the run is reported."""
        manifest = core_stylize.read_manifest(run.out_dir) or {}
        manifest["complete"] = True
        core_stylize.write_manifest(run.out_dir, manifest)
        frames = [f for c in run.chunks for f in c.frames]
        context.window_manager.concord_stylize_job.last_result = str(run.out_dir)
        made = run.frames_done - run.frames_before
        text = (f"Stylized {made} frame{'s' * (made != 1)} ({run.frame_start}..{run.frame_end}, "
                f"{run.size[0]} x {run.size[1]} px)" if made else
                f"All {run.frames_total} frames ({run.frame_start}..{run.frame_end}) were already stylized")
        text += "".join(f"; {note}" for note in run.notes)
        scene = bpy.data.scenes.get(run.scene_name)
        if run.load_in_sequencer and scene is not None:
            strip = load_into_sequencer(scene, run.out_dir, frames)
            text += f"; loaded into the Video Sequencer as {strip.name!r} (channel {strip.channel})"
            if self._scripted(context):
                bpy.ops.ed.undo_push(message="Concord: stylize animation")  # scripts get no automatic undo step
        text += f"; frames in {run.out_dir}"
        if results.temporary_job_folder(run.out_dir) is not None:
            text += "; this file is not saved: the frames are in a temporary folder, choose an Output folder to keep them"
        self._show(context, "INFO", text)

    @staticmethod
    def _failure_text(run, exc: Exception) -> str:  # adding the strip failed: the frames stay on disk
        return f"Concord: loading the frames failed ({type(exc).__name__}: {exc}); they are in {run.out_dir}"

    @staticmethod
    def _timings(run) -> dict:
        return {**run.timings, "total_s": time.perf_counter() - run.t0}

    @staticmethod
    def _release(run) -> None:
        if run.capture is not None:
            run.capture.close()
        run.captured, run.ready = [], None
        if run.out_dir is not None:
            core_stylize.remove_stale_downloads(run.out_dir)  # nothing half-downloaded stays
            core_stylize.discard_run_files(run.out_dir, remove_folder=run.reserved)

    def _progress(self, context, stage: str | None = None, message: str | None = None, partial: int = 0) -> None:
        run = _SLOT.run
        values = {"step": run.frames_done + partial, "total": run.frames_total or (run.frame_end - run.frame_start + 1)}
        if stage is not None:
            values["stage"] = stage
        if message is not None:
            values["message"] = message
        self._set_state(context, **values)


def _same_folder(a: str, b: str) -> bool:
    try:
        return Path(bpy.path.abspath(a)).resolve() == Path(bpy.path.abspath(b)).resolve()
    except OSError:
        return False


class CONCORD_OT_cancel_stylize(CancelRun, bpy.types.Operator):
    """Stop the running stylize run (the server is told to cancel its job); finished frames stay, a new run continues"""

    bl_idname = "concord.cancel_stylize"
    slot = _SLOT
    none_running = "No stylize run is running"


classes = (CONCORD_OT_stylize_animation, CONCORD_OT_cancel_stylize)
register, unregister = registration(classes, _SLOT)
