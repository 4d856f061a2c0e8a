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
are named in the report: only the active mesh is textured.

Layer rule: a bpy layer (ops/). Network only through the worker thread; bpy only on the main thread.
"""

from __future__ import annotations

import json
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path

import bpy
from bpy.props import BoolProperty

from .. import capture
from ..core import jobs, packing, protocol, results, rigs
from ..core.client import ConcordClient
from ..prefs import check_server_async, online_access_refusal, server_settings
from ..props import describe_used, fill_model_defaults
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


def selection_notes(context, ob) -> list[str]:
    """For the report: the other selected meshes, which are not textured (texturing several objects jointly is a
    later capability; today the active mesh is textured alone)."""
    others = sorted(o.name for o in context.selected_objects if o.type == "MESH" and o.name != ob.name)
    if not others:
        return []
    names = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
    what = "mesh was" if len(others) == 1 else "meshes were"
    return [f"{len(others)} other selected {what} not textured ({names}): Concord textures the active mesh only"]


def _interrupted(exc: BaseException) -> str:
    return "interrupted (Ctrl+C)" if isinstance(exc, KeyboardInterrupt) else f"stopped by {type(exc).__name__}: {exc}"


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
        from .stylize import stylize_running

        if _ACTIVE is not None or stylize_running():
            self.report({"ERROR"}, "A Concord job is already running: wait for it or cancel it")
            return {"CANCELLED"}
        refusal = online_access_refusal(server_settings(context)[0])
        if refusal is not None:  # before any capture or connection
            self._refuse(context, f"Concord: {refusal}")
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
                if settings.model_defaults:  # left out: the server fills them from the model that runs the job
                    for key in protocol.MODEL_DEFAULT_PARAMS["texture"]:
                        self._params.pop(key, None)
                out_dir = results.result_folder(bpy.data.filepath, ob.name)
                # Model Defaults: the view size comes with the server's answer; capture starts once it is in
                session = None if settings.model_defaults else new_capture_session(context, settings, ob, uv_map)
            except (packing.PackingError, rigs.RigError, capture.CaptureError) as exc:
                err = str(exc)
        if err is not None:
            self._refuse(context, err)
            return {"CANCELLED"}

        _ACTIVE = ActiveJob(
            ob.name, uv_map, out_dir, settings.slot_mode, session=session, model_defaults=settings.model_defaults
        )
        _ACTIVE.notes.extend(selection_notes(context, ob))
        if session is None:
            url, token, timeout = server_settings(context)
            _ACTIVE.health = check_server_async(url, token, timeout)  # the network wait runs on a thread
            self._set_state(context, running=True, stage="connecting", step=0, total=0, message=url)
        else:
            self._set_state(context, running=True, stage="capturing", step=0, total=len(session.cameras), message="")
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
            if job.health is not None:
                timeout = server_settings(context)[2]
                try:
                    answer = job.health.get(timeout=timeout + 5.0)
                except queue.Empty:
                    return self._finish(context, jobs.Failed(f"the server did not answer within {timeout:g} s"))
                final = self._start_capture(context, *answer)
                if final is not None:
                    return self._finish(context, final)
            while not job.session.done:
                job.session.capture_next()
            self._start_worker(context)
        except Exception as exc:
            return self._finish(context, jobs.Failed(f"capture failed: {exc}"))
        except BaseException as exc:  # Ctrl+C while connecting or capturing: nothing was sent yet
            self._finish(context, jobs.Cancelled(f"{_interrupted(exc)} before the job was sent"))
            raise
        try:
            final = jobs.run_blocking(job.worker, on_message=lambda m: self._on_message(context, m))
        except BaseException as exc:  # Ctrl+C while waiting: run_blocking had the server cancel the job
            self._finish(context, jobs.Cancelled(f"{_interrupted(exc)}: the job was cancelled on the server"))
            raise
        return self._finish(context, final)

    # ------------------------------------------------------------------ interactive
    def modal(self, context, event):
        job = _ACTIVE
        if job is None:
            return self._finish(context, jobs.Cancelled("the job was dropped"))
        if event.type != "TIMER":
            return {"PASS_THROUGH"}
        try:
            if job.health is not None:  # Model Defaults: waiting for the server's answer (a thread fetches it)
                if job.cancel_requested:
                    return self._finish(context, jobs.Cancelled("cancelled while connecting"))
                try:
                    answer = job.health.get_nowait()
                except queue.Empty:
                    return {"RUNNING_MODAL"}
                final = self._start_capture(context, *answer)
                if final is not None:
                    return self._finish(context, final)
                _redraw(context)
                return {"RUNNING_MODAL"}
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
        try:
            for msg in job.worker.drain():
                if isinstance(msg, jobs.FINAL):
                    return self._finish(context, msg)
                self._on_message(context, msg)
        except Exception as exc:  # a bug while following the job: end the run (and the server's job) cleanly
            return self._finish(context, jobs.Failed(f"unexpected error: {type(exc).__name__}: {exc}"))
        _redraw(context)
        return {"RUNNING_MODAL"}

    def cancel(self, context):  # Blender quits or the file is closed while modal
        request_cancel()
        self._cleanup(context)

    # ------------------------------------------------------------------ shared steps
    def _start_capture(self, context, kind: str, value):
        """Model Defaults: the server answered. Fill the settings from its model's recommended ones and start
        capturing. Returns the final message when the job cannot go on, else None."""
        job = _ACTIVE
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
        job = _ACTIVE
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
                metrics = record_view_size(job.out_dir, results.read_metrics(job.out_dir), job.model_defaults)
                state.last_settings = describe_used(metrics)
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
                state.last_settings = ""  # the panel shows this run's outcome, not the previous run's settings
            else:
                text = f"Concord: {msg}"
                self.report({"ERROR"}, text)
                state.last_report = text
                state.last_settings = ""
        except ApplyError as exc:
            self.report({"ERROR"}, f"Concord: {exc}")
            state.last_report = f"Concord: {exc}"
            state.last_settings = ""
        except Exception as exc:  # apply_texture removed what it made; the files stay on disk
            text = f"Concord: applying the result failed ({type(exc).__name__}: {exc}); the files are in {job.out_dir}"
            self.report({"ERROR"}, text)
            state.last_report = text
            state.last_settings = ""
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
        if job is not None and job.worker is not None and not job.worker.finished:
            job.worker.cancel()  # whatever ended the run, the job must not go on running on the server
        if job is not None:
            results.discard_if_empty(job.out_dir)  # reserved at the start; a run that gave nothing leaves nothing
        _ACTIVE = None
        if self._timer is not None:
            context.window_manager.event_timer_remove(self._timer)
            self._timer = None
        self._set_state(context, running=False, cancelling=False)
        _redraw(context)

    def _refuse(self, context, text: str) -> None:
        """A run that could not start: reported, and the panel's last line shows it (not an older outcome)."""
        self.report({"ERROR"}, text)
        context.window_manager.concord_job.last_report = text
        context.window_manager.concord_job.last_settings = ""

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
