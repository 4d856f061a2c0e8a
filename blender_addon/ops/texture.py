"""The "Texture Selected" operator: capture -> upload -> server job -> download -> apply, without freezing.

Flow (ARCHITECTURE.md rule 5): the operator checks the selection and settings, picks the result folder,
captures the views on the main thread (one view per timer tick in interactive mode), then hands the arrays
to a ``core.jobs.JobWorker`` thread that does every network call. A modal timer drains the worker's typed
messages (Progress, Done, Failed, Cancelled) into the panel's progress bar; on Done (all files already on
disk) the texture is applied and the operator finishes, which makes ONE undo step. Cancel (the panel's
button, ``concord.cancel_job``) reaches the server through the worker. With ``blocking=True`` (scripts) or
in background mode the same steps run in a loop on the calling thread, and an undo step is pushed after
the apply.

Model Defaults (the scene setting, on by default): the views must be captured at the model's view size, so
before capturing the operator asks the server for its health on a worker thread (``prefs.check_server_async``;
the modal timer, or the blocking loop, waits for the answer), fills view size / steps / guidance / texture size
from the model's recommended settings (``props.fill_model_defaults``, main thread), and sends the job WITHOUT
steps, guidance and texture size so the server fills them from the model that runs it (metrics.json then says
``source: model``). The answer is fetched at every job start rather than cached, so a server restarted with
another model is never run at the previous model's sizes. The settings used are written to metrics.json
(``settings``; the view size's source is added here, the server cannot know it) and shown in the panel.

Edit Mode: the operator runs from it and leaves the object in it. The capture first writes the edit data to the
mesh (``capture.flush_edit_mode``: otherwise it would see the mesh from before the edit), and New Slot's face
assignment is written through the edit mesh (``apply.assign_all_faces``), which would overwrite it otherwise.
Scene Cameras: cameras that cannot be used are skipped and named in the final report (``rigs.usable_scene_cameras``).

Any failure (nothing selected, not a mesh, no UV map, server down, job failed, cancelled) is reported with
``self.report``, shown as the panel's last line (the latest outcome, never an older one) and leaves the scene
unchanged. Any exit from a run (Ctrl+C in a blocking run included: it is re-raised after the clean-up) clears
the add-on's state and cancels the server's job (``_cleanup``, ``jobs.run_blocking``). Other selected meshes
are named in the report: only the active mesh is textured. The machinery this operator shares with "Stylize
Animation" (the run's slot, the start checks, the health answer, the modal timer, the end of a run, ``_cleanup``)
is ``_running.RunningOperator``.

Layer rule: a bpy layer (ops/). Network only through the worker thread; bpy only on the main thread.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import bpy

from .. import capture
from ..core import jobs, packing, protocol, results, rigs
from ..core.client import ConcordClient
from ..prefs import check_server_async, server_settings
from ..props import describe_used, fill_model_defaults
from ._running import CancelRun, RunningOperator, RunSlot, interrupted, registration
from .apply import ApplyError, apply_texture, describe_placement


@dataclass
class ActiveJob:
    """The one job this Blender session runs (the add-on's runtime state; never saved)."""

    object_name: str
    uv_map: str
    out_dir: Path
    slot_mode: str
    session: object | None = None  # capture.CaptureSession while capturing
    worker: jobs.JobWorker | None = None
    cancel_requested: bool = False
    model_defaults: bool = False  # view size / steps / guidance / texture size from the server's model
    health: object | None = None  # Model Defaults: queue receiving the health answer, until it came
    notes: list = field(default_factory=list)  # for the final report (e.g. scene cameras skipped, and why)
    t0: float = field(default_factory=time.perf_counter)
    timings: dict = field(default_factory=dict)


_SLOT = RunSlot("concord_job")  # the running ActiveJob, if any
LAST_TIMINGS: dict = _SLOT.last_timings  # the last finished job's timings (capture, upload, server, download, apply), for bench/


def active_job() -> ActiveJob | None:
    return _SLOT.run


def request_cancel() -> bool:
    """Ask the running job to stop. Returns False when none runs."""
    return _SLOT.request_cancel()


def selected_mesh(context) -> tuple[bpy.types.Object | None, str | None]:
    """The object to texture (the active object, which must be selected and a mesh), or why there is none."""
    ob = context.active_object
    selected = list(context.selected_objects)
    if ob is None or not ob.select_get():
        if not selected:
            return None, "Nothing is selected: select the mesh to texture"
        ob = selected[0]
    if ob.type != "MESH":
        return None, f"{ob.name!r} is a {ob.type.lower()}, not a mesh: select a mesh object"
    return ob, None


def selection_notes(context, ob) -> list[str]:
    """For the report: the other selected meshes, which are not textured (texturing several objects jointly is a
    later capability; today the active mesh is textured alone)."""
    others = sorted(o.name for o in context.selected_objects if o.type == "MESH" and o.name != ob.name)
    if not others:
        return []
    names = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
    what = "mesh was" if len(others) == 1 else "meshes were"
    return [f"{len(others)} other selected {what} not textured ({names}): Concord textures the active mesh only"]


def resolve_uv_map(ob, requested: str) -> tuple[str | None, str | None]:
    uvs = ob.data.uv_layers
    if len(uvs) == 0:
        return None, f"{ob.name!r} has no UV map: click 'Add UV Map (Smart UV Project)' in the Concord panel"
    if requested:
        if requested not in uvs:
            return None, f"{ob.name!r} has no UV map named {requested!r}; pick one of {', '.join(u.name for u in uvs)}"
        return requested, None
    for uv in uvs:
        if uv.active_render:
            return uv.name, None
    return uvs[0].name, None


def rig_cameras(context, settings, ob, width: int, height: int) -> list[rigs.Camera]:
    if settings.rig == "SCENE_CAMERAS":
        return rigs.scene_cameras(capture.scene_camera_specs(context.scene, context.view_layer), width, height)
    center, radius = capture.world_bounding_sphere(ob, context.evaluated_depsgraph_get())
    if settings.rig == "ORBIT":
        return rigs.orbit(settings.orbit_views, center, radius, width, height, settings.orbit_elevation)
    return rigs.zero123pp(center, radius, width, height)


def view_size(context, settings) -> tuple[int, int]:
    """Square views, except for scene cameras: the scene's aspect ratio, longest side = view size, /8."""
    n = max(64, int(settings.view_resolution) // 8 * 8)
    if settings.rig != "SCENE_CAMERAS":
        return n, n
    r = context.scene.render
    w, h = r.resolution_x * r.pixel_aspect_x, r.resolution_y * r.pixel_aspect_y
    if w >= h:
        return n, max(8, int(round(n * h / w / 8)) * 8)
    return max(8, int(round(n * w / h / 8)) * 8), n


def new_capture_session(context, settings, ob, uv_map: str):
    """The capture of `ob` through the settings' rig at the settings' view size."""
    width, height = view_size(context, settings)
    cameras = rig_cameras(context, settings, ob, width, height)
    session = capture.CaptureSession(ob, uv_map, cameras, width, height)
    if settings.rig == "SCENE_CAMERAS":  # say which cameras were left out, and why
        _, skipped = rigs.usable_scene_cameras(capture.scene_camera_specs(context.scene, context.view_layer))
        if skipped:
            session.notes.append(f"skipped {rigs.describe_skipped(skipped)}")
    return session


def record_view_size(out_dir: Path, metrics: dict, from_model: bool) -> dict:
    """Add ``settings.view_size`` ({value, source}) to the job's metrics.json: only the add-on knows whether the
    size it captured at was the model's or the user's."""
    size = metrics.get("view_size")
    if not size:
        return metrics
    metrics.setdefault("settings", {})["view_size"] = {"value": max(size), "source": "model" if from_model else "user"}
    (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics


def surface_arrays(ob, uv_map: str, depsgraph) -> dict:
    """The texture job's optional `triangles` float32 (F, 3, 3) world positions and `triangle_uv` (F, 3, 2) of the
    evaluated mesh the capture renders (modifiers applied), so the server's coverage counts UV-island texels;
    {} when the UV map did not survive the modifiers."""
    import numpy as np

    ob_eval = ob.evaluated_get(depsgraph)
    mesh = ob_eval.to_mesh(preserve_all_data_layers=True, depsgraph=depsgraph)
    try:
        if uv_map not in mesh.uv_layers:
            return {}
        mesh.calc_loop_triangles()
        n = len(mesh.loop_triangles)
        loops = np.empty(3 * n, dtype=np.int32)
        verts = np.empty(3 * n, dtype=np.int32)
        mesh.loop_triangles.foreach_get("loops", loops)
        mesh.loop_triangles.foreach_get("vertices", verts)
        co = np.empty(3 * len(mesh.vertices), dtype=np.float64)
        mesh.vertices.foreach_get("co", co)
        uv = np.empty(2 * len(mesh.loops), dtype=np.float32)
        mesh.uv_layers[uv_map].data.foreach_get("uv", uv)
        M = np.array(ob_eval.matrix_world, dtype=np.float64)
        world = co.reshape(-1, 3) @ M[:3, :3].T + M[:3, 3]
        if n == 0 or not np.isfinite(world).all() or not np.isfinite(uv).all():
            return {}
        return {
            "triangles": world[verts].reshape(n, 3, 3).astype(np.float32),
            "triangle_uv": uv.reshape(-1, 2)[loops].reshape(n, 3, 2),
        }
    finally:
        ob_eval.to_mesh_clear()


class CONCORD_OT_texture_mesh(RunningOperator, bpy.types.Operator):
    """Texture the selected mesh from the prompt with the Concord server"""

    bl_idname = "concord.texture_mesh"
    bl_label = "Texture Selected"
    slot = _SLOT
    redraw_areas = {"VIEW_3D", "PREFERENCES"}

    # ------------------------------------------------------------------ start
    def execute(self, context):
        if self._cannot_start(context, server_settings(context)[0]):
            return {"CANCELLED"}
        settings = context.scene.concord
        ob, err = selected_mesh(context)
        if err is None:
            uv_map, err = resolve_uv_map(ob, settings.uv_map)
        if err is None:
            try:
                self._params = packing.texture_params(
                    settings.prompt,
                    negative_prompt=settings.negative_prompt,
                    seed=settings.seed,
                    steps=settings.steps,
                    guidance=settings.guidance,
                    conditioning_scale=settings.conditioning_scale,
                    texture_size=int(settings.texture_size),
                    grid=settings.grid,
                    shared_attention=settings.shared_attention,
                    # Model Defaults: left out, the server uses its model's (and the panel shows it once filled)
                    attention_correspondence=None if settings.model_defaults else settings.attention_correspondence,
                    uv_sync=settings.uv_sync,
                    uv_noise=settings.uv_noise,
                    loss_guidance=settings.loss_guidance,
                )
                if settings.model_defaults:  # left out: the server fills them from the model that runs the job
                    for key in protocol.MODEL_DEFAULT_PARAMS["texture"]:
                        self._params.pop(key, None)
                out_dir = results.result_folder(bpy.data.filepath, ob.name)
                # Model Defaults: the view size comes with the server's answer; capture starts once it is in
                session = None if settings.model_defaults else new_capture_session(context, settings, ob, uv_map)
            except (packing.PackingError, rigs.RigError, capture.CaptureError) as exc:
                err = str(exc)
        if err is not None:
            self._show(context, "ERROR", err)
            return {"CANCELLED"}

        job = _SLOT.run = ActiveJob(
            ob.name, uv_map, out_dir, settings.slot_mode, session=session, model_defaults=settings.model_defaults
        )
        job.notes.extend(selection_notes(context, ob))
        if session is None:
            url, token, timeout = server_settings(context)
            job.health = check_server_async(url, token, timeout)  # the network wait runs on a thread
            self._set_state(context, running=True, stage="connecting", step=0, total=0, message=url)
        else:
            self._set_state(context, running=True, stage="capturing", step=0, total=len(session.cameras), message="")
        return self._follow(context)

    # ------------------------------------------------------------------ blocking (scripts, background)
    def _run_blocking(self, context):
        job = _SLOT.run
        try:
            if job.health is not None:
                final = self._wait_health(context, job)
                if final is not None:
                    return self._finish(context, final)
            while not job.session.done:
                job.session.capture_next()
            self._start_worker(context)
        except Exception as exc:
            return self._finish(context, jobs.Failed(f"capture failed: {exc}"))
        except BaseException as exc:  # Ctrl+C while connecting or capturing: nothing was sent yet
            self._finish(context, jobs.Cancelled(f"{interrupted(exc)} before the job was sent"))
            raise
        try:
            final = jobs.run_blocking(job.worker, on_message=lambda m: self._on_message(context, m))
        except BaseException as exc:  # Ctrl+C while waiting: run_blocking had the server cancel the job
            self._finish(context, jobs.Cancelled(f"{interrupted(exc)}: the job was cancelled on the server"))
            raise
        return self._finish(context, final)

    # ------------------------------------------------------------------ interactive
    def _tick_modal(self, context, job):
        try:
            if job.health is not None:  # Model Defaults: waiting for the server's answer (a thread fetches it)
                return self._modal_health(context, job)
            if job.worker is None:
                if job.cancel_requested:
                    return self._finish(context, jobs.Cancelled("cancelled while capturing"))
                n = job.session.capture_next()
                self._set_state(context, stage="capturing", step=n, total=len(job.session.cameras))
                if job.session.done:
                    self._start_worker(context)
                self._redraw(context)
                return {"RUNNING_MODAL"}
        except Exception as exc:
            return self._finish(context, jobs.Failed(f"capture failed: {exc}"))
        try:
            for msg in job.worker.drain():
                if isinstance(msg, jobs.FINAL):
                    return self._finish(context, msg)
                self._on_message(context, msg)
        except Exception as exc:  # a bug while following the job: end the run (and the server's job) cleanly
            return self._finish(context, jobs.Failed(f"unexpected error: {type(exc).__name__}: {exc}"))
        self._redraw(context)
        return {"RUNNING_MODAL"}

    # ------------------------------------------------------------------ shared steps
    def _on_health(self, context, kind: str, value):
        """Model Defaults: the server answered. Fill the settings from its model's recommended ones and start
        capturing. Returns the final message when the job cannot go on, else None."""
        job = _SLOT.run
        job.health = None
        if kind != "ok":
            return jobs.Failed(str(value))
        settings = context.scene.concord
        fill_model_defaults(settings, value)
        ob = bpy.data.objects.get(job.object_name)
        if ob is None:
            return jobs.Failed(f"{job.object_name!r} was deleted before its views were captured")
        try:
            job.session = new_capture_session(context, settings, ob, job.uv_map)
        except (rigs.RigError, capture.CaptureError) as exc:
            return jobs.Failed(str(exc))
        self._set_state(context, stage="capturing", step=0, total=len(job.session.cameras), message="")
        return None

    def _start_worker(self, context) -> None:
        job = _SLOT.run
        t = time.perf_counter()
        arrays = job.session.arrays()
        ob = bpy.data.objects.get(job.object_name)
        if ob is not None:  # the triangles: the server measures coverage over the UV islands
            arrays.update(surface_arrays(ob, job.uv_map, context.evaluated_depsgraph_get()))
        job.timings["capture_s"] = sum(job.session.seconds) + (time.perf_counter() - t)
        job.timings["views"] = len(job.session.seconds)
        job.notes.extend(job.session.notes)
        job.session.close()
        job.session = None
        url, token, timeout = server_settings(context)
        job.worker = jobs.JobWorker(lambda: ConcordClient(url, token, timeout), "texture", self._params, arrays, job.out_dir)
        if job.cancel_requested:
            job.worker.cancel()
        job.worker.start()

    def _on_message(self, context, msg) -> None:
        if isinstance(msg, jobs.Progress):
            self._set_state(context, stage=msg.stage, step=msg.step, total=msg.total, message=msg.message)

    def _succeed(self, context, job, msg) -> None:
        """The job is done (its files on disk): apply the texture, report, and show the settings it used."""
        state = context.window_manager.concord_job
        ob = bpy.data.objects.get(job.object_name)
        if ob is None:
            raise ApplyError(f"{job.object_name!r} was deleted while the job ran; results are in {job.out_dir}")
        t = time.perf_counter()
        made = apply_texture(ob, job.uv_map, job.out_dir, job.slot_mode)
        job.timings["apply_s"] = time.perf_counter() - t
        job.timings.update(msg.timings)
        job.timings["total_s"] = time.perf_counter() - job.t0
        metrics = record_view_size(job.out_dir, results.read_metrics(job.out_dir), job.model_defaults)
        cov = metrics.get("coverage")
        cov_text = f", coverage {cov:.0%} of the UV islands" if isinstance(cov, (int, float)) else ""
        placement = describe_placement(made)
        text = f"Textured {ob.name} with {made['material'].name}{cov_text}"
        text += (f"; {placement}" if placement else "") + "".join(f"; {note}" for note in job.notes)
        text += f"; files in {job.out_dir}"
        if results.temporary_job_folder(job.out_dir) is not None:  # a file never saved
            unsaved = ("this file is not saved: the results are in a temporary folder until you save the "
                       ".blend, which copies them beside it")
            text += f"; {unsaved}"
            self.report({"WARNING"}, f"Concord: {unsaved}")
        state.preview_image = made["grid_image"].name if made["grid_image"] else made["image"].name
        state.last_result = str(job.out_dir)
        self._show(context, "INFO", text, settings=describe_used(metrics))
        if self._scripted(context):
            # scripts get no automatic undo step: push one so a single undo reverts the apply
            bpy.ops.ed.undo_push(message=f"Concord: texture {ob.name}")

    @staticmethod
    def _failure_text(job, exc: Exception) -> str:
        if isinstance(exc, ApplyError):
            return f"Concord: {exc}"
        # apply_texture removed what it made; the files stay on disk
        return f"Concord: applying the result failed ({type(exc).__name__}: {exc}); the files are in {job.out_dir}"

    @staticmethod
    def _timings(job) -> dict:
        return job.timings

    @staticmethod
    def _release(job) -> None:
        if job.session is not None:
            job.session.close()
        results.discard_if_empty(job.out_dir)  # reserved at the start; a run that gave nothing leaves nothing


class CONCORD_OT_cancel_job(CancelRun, bpy.types.Operator):
    """Stop the running Concord job (the server is told to cancel it); the scene stays unchanged"""

    bl_idname = "concord.cancel_job"
    slot = _SLOT
    none_running = "No Concord job is running"


class CONCORD_OT_add_uv_map(bpy.types.Operator):
    """Give the active mesh a UV map with Smart UV Project (a one-click fix when it has none)"""

    bl_idname = "concord.add_uv_map"
    bl_label = "Add UV Map (Smart UV Project)"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context):
        ob, err = selected_mesh(context)
        if err:
            self.report({"ERROR"}, err)
            return {"CANCELLED"}
        view_layer = context.view_layer
        selection = [o for o in view_layer.objects if o.select_get()]
        active, mode = view_layer.objects.active, ob.mode
        try:
            if mode != "OBJECT":
                bpy.ops.object.mode_set(mode="OBJECT")
            for o in selection:
                o.select_set(False)
            ob.select_set(True)
            view_layer.objects.active = ob
            if len(ob.data.uv_layers) == 0:
                ob.data.uv_layers.new(name="UVMap")
            bpy.ops.object.mode_set(mode="EDIT")
            bpy.ops.mesh.reveal()
            bpy.ops.mesh.select_all(action="SELECT")
            bpy.ops.uv.smart_project(angle_limit=1.15192, island_margin=0.02)
            bpy.ops.object.mode_set(mode="OBJECT")
        finally:
            ob.select_set(False)
            for o in selection:
                o.select_set(True)
            view_layer.objects.active = active
            if mode != "OBJECT" and ob.mode != mode:
                bpy.ops.object.mode_set(mode=mode)
        self.report({"INFO"}, f"{ob.name}: UV map {ob.data.uv_layers.active.name!r} made with Smart UV Project")
        return {"FINISHED"}


classes = (CONCORD_OT_texture_mesh, CONCORD_OT_cancel_job, CONCORD_OT_add_uv_map)
register, unregister = registration(classes, _SLOT)
