"""The "Texture Selected" operator: capture -> upload -> server job -> download -> apply, without freezing.

Flow (ARCHITECTURE.md rule 5): the operator checks the selection and settings, picks the result folder,
captures the views on the main thread (one view per timer tick in interactive mode), then hands the arrays
to a ``core.jobs.JobWorker`` thread that does every network call. A modal timer drains the worker's typed
messages (Progress, Done, Failed, Cancelled) into the panel's progress bar; on Done (all files already on
disk) the texture is applied and the operator finishes, which makes ONE undo step. Cancel (the panel's
button, ``concord.cancel_job``) reaches the server through the worker. With ``blocking=True`` (scripts) or
in background mode the same steps run in a loop on the calling thread, and an undo step is pushed after
the apply.

Any failure (nothing selected, not a mesh, no UV map, server down, job failed, cancelled) is reported with
``self.report`` and leaves the scene unchanged.

Layer rule: a bpy layer (ops/). Network only through the worker thread; bpy only on the main thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import bpy
from bpy.props import BoolProperty

from .. import capture
from ..core import jobs, packing, results, rigs
from ..core.client import ConcordClient
from ..prefs import server_settings
from .apply import ApplyError, apply_texture


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
    t0: float = field(default_factory=time.perf_counter)
    timings: dict = field(default_factory=dict)


_ACTIVE: ActiveJob | None = None
LAST_TIMINGS: dict = {}  # the last finished job's timings (capture, upload, server, download, apply), for bench/


def active_job() -> ActiveJob | None:
    return _ACTIVE


def request_cancel() -> bool:
    """Ask the running job to stop. Returns False when none runs."""
    job = _ACTIVE
    if job is None:
        return False
    job.cancel_requested = True
    if job.worker is not None:
        job.worker.cancel()
    return True


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
        return rigs.scene_cameras(capture.scene_camera_specs(context.scene), width, height)
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


def _redraw(context) -> None:
    wm = context.window_manager
    for window in wm.windows:
        screen = window.screen
        if screen is None:
            continue
        for area in screen.areas:
            if area.type in {"VIEW_3D", "PREFERENCES"}:
                area.tag_redraw()


class CONCORD_OT_texture_mesh(bpy.types.Operator):
    """Texture the selected mesh from the prompt with the Concord server"""

    bl_idname = "concord.texture_mesh"
    bl_label = "Texture Selected"
    bl_options = {"REGISTER", "UNDO"}

    blocking: BoolProperty(
        name="Blocking",
        default=False,
        options={"SKIP_SAVE", "HIDDEN"},
        description="Run to the end before returning (scripts and background mode)",
    )

    _timer = None

    # ------------------------------------------------------------------ start
    def invoke(self, context, event):
        return self.execute(context)

    def execute(self, context):
        global _ACTIVE
        if _ACTIVE is not None:
            self.report({"ERROR"}, "A Concord job is already running: wait for it or cancel it")
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
                    uv_sync=settings.uv_sync,
                    uv_noise=settings.uv_noise,
                    loss_guidance=settings.loss_guidance,
                )
                width, height = view_size(context, settings)
                cameras = rig_cameras(context, settings, ob, width, height)
                out_dir = results.result_folder(bpy.data.filepath, ob.name)
                session = capture.CaptureSession(ob, uv_map, cameras, width, height)
            except (packing.PackingError, rigs.RigError, capture.CaptureError) as exc:
                err = str(exc)
        if err is not None:
            self.report({"ERROR"}, err)
            return {"CANCELLED"}

        _ACTIVE = ActiveJob(ob.name, uv_map, out_dir, settings.slot_mode, session=session)
        self._set_state(context, running=True, stage="capturing", step=0, total=len(cameras), message="")
        if self.blocking or bpy.app.background or context.window is None:
            return self._run_blocking(context)
        wm = context.window_manager
        self._timer = wm.event_timer_add(0.05, window=context.window)
        wm.modal_handler_add(self)
        return {"RUNNING_MODAL"}

    # ------------------------------------------------------------------ blocking (scripts, background)
    def _run_blocking(self, context):
        job = _ACTIVE
        try:
            while not job.session.done:
                job.session.capture_next()
            self._start_worker(context)
        except Exception as exc:
            return self._finish(context, jobs.Failed(f"capture failed: {exc}"))
        final = jobs.run_blocking(job.worker, on_message=lambda m: self._on_message(context, m))
        return self._finish(context, final)

    # ------------------------------------------------------------------ interactive
    def modal(self, context, event):
        job = _ACTIVE
        if job is None:
            return self._finish(context, jobs.Cancelled("the job was dropped"))
        if event.type != "TIMER":
            return {"PASS_THROUGH"}
        try:
            if job.worker is None:
                if job.cancel_requested:
                    return self._finish(context, jobs.Cancelled("cancelled while capturing"))
                n = job.session.capture_next()
                self._set_state(context, stage="capturing", step=n, total=len(job.session.cameras))
                if job.session.done:
                    self._start_worker(context)
                _redraw(context)
                return {"RUNNING_MODAL"}
        except Exception as exc:
            return self._finish(context, jobs.Failed(f"capture failed: {exc}"))
        for msg in job.worker.drain():
            if isinstance(msg, jobs.FINAL):
                return self._finish(context, msg)
            self._on_message(context, msg)
        _redraw(context)
        return {"RUNNING_MODAL"}

    def cancel(self, context):  # Blender quits or the file is closed while modal
        request_cancel()
        self._cleanup(context)

    # ------------------------------------------------------------------ shared steps
    def _start_worker(self, context) -> None:
        job = _ACTIVE
        t = time.perf_counter()
        arrays = job.session.arrays()
        job.timings["capture_s"] = sum(job.session.seconds) + (time.perf_counter() - t)
        job.timings["views"] = len(job.session.seconds)
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

    def _finish(self, context, msg):
        job = _ACTIVE
        state = context.window_manager.concord_job
        result = {"CANCELLED"}
        try:
            if isinstance(msg, jobs.Done):
                ob = bpy.data.objects.get(job.object_name)
                if ob is None:
                    raise ApplyError(f"{job.object_name!r} was deleted while the job ran; results are in {job.out_dir}")
                t = time.perf_counter()
                made = apply_texture(ob, job.uv_map, job.out_dir, job.slot_mode)
                job.timings["apply_s"] = time.perf_counter() - t
                job.timings.update(msg.timings)
                job.timings["total_s"] = time.perf_counter() - job.t0
                metrics = results.read_metrics(job.out_dir)
                cov = metrics.get("coverage")
                cov_text = f", coverage {cov:.0%}" if isinstance(cov, (int, float)) else ""
                text = f"Textured {ob.name} with {made['material'].name}{cov_text}; files in {job.out_dir}"
                state.preview_image = made["grid_image"].name if made["grid_image"] else made["image"].name
                state.last_result = str(job.out_dir)
                self.report({"INFO"}, text)
                state.last_report = text
                if self.blocking or bpy.app.background or context.window is None:
                    # scripts get no automatic undo step: push one so a single undo reverts the apply
                    bpy.ops.ed.undo_push(message=f"Concord: texture {ob.name}")
                result = {"FINISHED"}
            elif isinstance(msg, jobs.Cancelled):
                text = f"Concord: {msg.message}; the scene is unchanged"
                self.report({"WARNING"}, text)
                state.last_report = text
            else:
                text = f"Concord: {msg}"
                self.report({"ERROR"}, text)
                state.last_report = text
        except ApplyError as exc:
            self.report({"ERROR"}, f"Concord: {exc}")
            state.last_report = str(exc)
        finally:
            if job is not None:
                LAST_TIMINGS.clear()
                LAST_TIMINGS.update(job.timings)
            self._cleanup(context)
        return result

    def _cleanup(self, context) -> None:
        global _ACTIVE
        job = _ACTIVE
        if job is not None and job.session is not None:
            job.session.close()
        _ACTIVE = None
        if self._timer is not None:
            context.window_manager.event_timer_remove(self._timer)
            self._timer = None
        self._set_state(context, running=False, cancelling=False)
        _redraw(context)

    @staticmethod
    def _set_state(context, **values) -> None:
        state = context.window_manager.concord_job
        for key, value in values.items():
            setattr(state, key, value)
        if "step" in values or "total" in values:
            state.progress = (state.step / state.total) if state.total > 0 else 0.0


class CONCORD_OT_cancel_job(bpy.types.Operator):
    """Stop the running Concord job (the server is told to cancel it); the scene stays unchanged"""

    bl_idname = "concord.cancel_job"
    bl_label = "Cancel"
    bl_options = {"REGISTER"}

    def execute(self, context):
        if not request_cancel():
            self.report({"WARNING"}, "No Concord job is running")
            return {"CANCELLED"}
        context.window_manager.concord_job.cancelling = True
        return {"FINISHED"}


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
_register, _unregister = bpy.utils.register_classes_factory(classes)


def register():
    _register()


def unregister():
    request_cancel()
    _unregister()
