"""Capture: the selected object's geometry as a ViewSet, through Cycles passes, leaving the user's scene alone.

What is captured is what the final render (F12) shows of the object: :class:`CaptureSession` renders a
temporary scene that links a COPY of the object (same modifiers, parent, constraints and transform; its own
copy of the mesh data, in which the chosen UV map is made render-active) under an emission override material;
Cycles evaluates it for rendering, so

* modifiers run at their render settings (a Subdivision Surface at its Render level, modifiers shown in
  renders), with the scene's render Simplify settings, at the scene's current frame;
* the world matrix is the object's own, evaluated through its parent chain: a child rotated under a
  non-uniformly scaled parent keeps its sheared shape (copying ``matrix_world`` onto an unparented object
  would decompose it into location / rotation / scale and drop the shear);
* a mesh in Edit Mode is captured as the user sees it: its edit data is written to the mesh first
  (``Object.update_from_editmode``, what leaving Edit Mode does), or the capture would read the UVs and
  faces from before the edit.

Particle systems and instancing (``instance_type``) are dropped from the copy: only the object's own surface
carries its UVs. (Instances that geometry-nodes modifiers make are rendered as F12 renders them.) Whether the
UV map survives the modifiers is checked on the viewport evaluation.
A scratch camera is placed per view (``passes.place_camera``). The user's scenes, render settings, selection,
active object, active camera, materials and the object's mode are never changed; on close every datablock the
session made is removed (and the "Render Result" image too, if it did not exist before). Views are rendered
one at a time (``capture_next``) so a modal operator can keep the UI alive between them; a view in which the
object is not seen is an error that names the camera.

The arrays follow the ViewSet contract (server/concord/geometry/viewset.py): see ``..core.packing``.

Layer rule: bpy lives here; no network, no threads (main thread only), no torch.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Sequence

import bpy
import numpy as np

from ..core import rigs
from ..core.packing import pack_viewset
from . import passes

__all__ = [
    "CaptureSession",
    "CaptureError",
    "capture_object",
    "flush_edit_mode",
    "world_bounding_sphere",
    "scene_camera_specs",
    "passes",
]


class CaptureError(ValueError):
    """The object cannot be captured (no mesh, no such UV map, ...); the message says what to do."""


def _world_vertices(mesh: bpy.types.Mesh, matrix_world) -> np.ndarray:
    co = np.empty(len(mesh.vertices) * 3, dtype=np.float64)
    mesh.vertices.foreach_get("co", co)
    co = co.reshape(-1, 3)
    M = np.array(matrix_world, dtype=np.float64)
    return co @ M[:3, :3].T + M[:3, 3]


def flush_edit_mode(obj: bpy.types.Object) -> None:
    """Write a mesh's Edit Mode data to the mesh (what leaving Edit Mode does; the mode is kept). Until then
    the mesh, and every evaluation of it, still holds the data from before the edit."""
    if obj is not None and obj.mode == "EDIT":
        obj.update_from_editmode()


def world_bounding_sphere(obj: bpy.types.Object, depsgraph=None) -> tuple[np.ndarray, float]:
    """(centre, radius) of the evaluated mesh's vertices in world coordinates (``core.rigs.bounding_sphere``)."""
    flush_edit_mode(obj)
    depsgraph = depsgraph or bpy.context.evaluated_depsgraph_get()
    depsgraph.update()
    ob_eval = obj.evaluated_get(depsgraph)
    mesh = ob_eval.to_mesh()
    try:
        pts = _world_vertices(mesh, ob_eval.matrix_world)
    finally:
        ob_eval.to_mesh_clear()
    if len(pts) == 0:
        raise CaptureError(f"{obj.name!r} has no vertices after its modifiers")
    return rigs.bounding_sphere(pts)


def scene_camera_specs(scene: bpy.types.Scene, view_layer=None) -> list[rigs.SceneCamera]:
    """The scene's camera objects as plain numbers for ``core.rigs.scene_cameras`` (sorted by name).

    ``hidden`` says why a camera is not to be used although it is in the scene: hidden in the view layer
    (eye or monitor icon, or a hidden collection), disabled in renders, or in a collection excluded from the
    view layer (``view_layer``: the scene's active one by default)."""
    view_layer = view_layer or (bpy.context.view_layer if bpy.context.scene == scene else scene.view_layers[0])
    out = []
    for ob in sorted((o for o in scene.objects if o.type == "CAMERA"), key=lambda o: o.name):
        if ob.name not in view_layer.objects:  # the view layer leaves out excluded collections
            hidden = "in a collection excluded from the view layer"
        elif ob.hide_render:
            hidden = "disabled in renders"
        elif not ob.visible_get(view_layer=view_layer):
            hidden = "hidden"
        else:
            hidden = ""
        d = ob.data
        out.append(
            rigs.SceneCamera(
                name=ob.name,
                matrix_world=np.array(ob.matrix_world, dtype=np.float64),
                type=d.type,
                lens=d.lens,
                sensor_width=d.sensor_width,
                sensor_height=d.sensor_height,
                sensor_fit=d.sensor_fit,
                shift_x=d.shift_x,
                shift_y=d.shift_y,
                hidden=hidden,
            )
        )
    return out


class CaptureSession:
    """Render one view at a time of one object into a scratch scene (a copy of the object, evaluated for the
    final render: see the module doc). Use as a context manager (or close()). ``notes``: lines for the user's
    report that the caller adds (e.g. the scene cameras it skipped)."""

    def __init__(
        self,
        obj: bpy.types.Object,
        uv_map: str,
        cameras: Sequence[rigs.Camera],
        width: int,
        height: int,
        work_dir: str | Path | None = None,
        depsgraph=None,
    ):
        if obj is None or obj.type != "MESH":
            raise CaptureError("select a mesh object to capture")
        if uv_map not in obj.data.uv_layers:
            raise CaptureError(f"{obj.name!r} has no UV map {uv_map!r}")
        self.obj_name = obj.name
        self.cameras = list(cameras)
        self.width, self.height = int(width), int(height)
        self.views: list[dict] = []
        self.notes: list[str] = []  # for the user's report (the caller adds them, e.g. scene cameras skipped)
        self.seconds: list[float] = []
        self._tmpdir = None
        if work_dir is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="concord-capture-")
            work_dir = self._tmpdir.name
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._had_render_result = "Render Result" in bpy.data.images
        self._made: list[tuple[object, object]] = []  # (collection, datablock) to remove on close
        self._closed = False
        try:
            self._build(obj, uv_map, depsgraph or bpy.context.evaluated_depsgraph_get())
        except Exception:
            self.close()
            raise

    def _keep(self, kind: str, block):
        self._made.append((kind, block))
        return block

    def _build(self, obj, uv_map, depsgraph) -> None:
        flush_edit_mode(obj)
        depsgraph.update()
        # The UV map must exist after the modifiers (a Remesh, or geometry nodes, can drop it).
        ob_eval = obj.evaluated_get(depsgraph)
        evaluated = ob_eval.to_mesh()
        try:
            if uv_map not in evaluated.uv_layers:
                raise CaptureError(
                    f"UV map {uv_map!r} did not survive {obj.name!r}'s modifiers; apply them or pick another map"
                )
            if len(evaluated.polygons) == 0:
                raise CaptureError(f"{obj.name!r} has no faces after its modifiers")
        finally:
            ob_eval.to_mesh_clear()

        user_scene = bpy.context.scene
        self.scene = self._keep("scenes", bpy.data.scenes.new("Concord Capture"))
        self.scene.frame_current = user_scene.frame_current  # animated modifiers, parents, constraints
        r, ur = self.scene.render, user_scene.render
        r.use_simplify, r.simplify_subdivision_render = ur.use_simplify, ur.simplify_subdivision_render
        # The object's copy: same modifiers, parent, constraints and transform channels, so Cycles evaluates it
        # as F12 does; its own mesh copy, whose render-active UV map is the one asked for.
        mesh = self._keep("meshes", obj.data.copy())
        mesh.name = "Concord Capture Mesh"
        mesh.uv_layers[uv_map].active_render = True
        mesh.uv_layers.active = mesh.uv_layers[uv_map]
        # (a shape-key block copied with it is freed with it)
        copy = self._keep("objects", obj.copy())
        copy.name = "Concord Capture Object"
        copy.data = mesh
        for mod in [m for m in copy.modifiers if m.type == "PARTICLE_SYSTEM"]:
            copy.modifiers.remove(mod)  # hair and particles carry no UVs of the surface
        copy.instance_type = "NONE"
        copy.hide_render = False
        copy.visible_camera = True
        copy.is_holdout = False
        copy.is_shadow_catcher = False
        self.scene.collection.objects.link(copy)
        self.copy = copy
        cam_data = self._keep("cameras", bpy.data.cameras.new("Concord Capture Camera"))
        self.camera = self._keep("objects", bpy.data.objects.new("Concord Capture Camera", cam_data))
        self.scene.collection.objects.link(self.camera)
        self.scene.camera = self.camera
        plain = self._keep("materials", passes.plain_material())
        for layer in self.scene.view_layers:
            layer.material_override = plain
        passes.configure_pass_render(self.scene, self.width, self.height)

    @property
    def done(self) -> bool:
        return len(self.views) >= len(self.cameras)

    def capture_next(self) -> int:
        """Render the next view; returns how many views are captured so far."""
        if self._closed:
            raise RuntimeError("capture session is closed")
        k = len(self.views)
        cam = self.cameras[k]
        t0 = time.perf_counter()
        passes.place_camera(self.camera, cam.K, cam.world_to_camera, self.width, self.height)
        view = passes.render_passes(self.scene, self.work_dir / f"passes_{k:02d}.exr")
        if not view["mask"].any():
            which = f"camera {cam.name!r}" if cam.name else f"view {k}"
            raise CaptureError(
                f"{which} does not see {self.obj_name!r}: aim it at the object"
                + (", or hide it (hidden cameras are not used)" if cam.name else "")
            )
        self.views.append(view)
        self.seconds.append(time.perf_counter() - t0)
        return len(self.views)

    def capture_all(self) -> dict[str, np.ndarray]:
        while not self.done:
            self.capture_next()
        return self.arrays()

    def arrays(self) -> dict[str, np.ndarray]:
        """The ViewSet arrays (``core.packing.pack_viewset``) of the views captured."""
        return pack_viewset(self.views, self.cameras[: len(self.views)])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        scene = getattr(self, "scene", None)
        if scene is not None:
            try:
                scene.render.use_persistent_data = False  # frees Cycles' kept data for this scene
            except ReferenceError:
                pass
        # scenes first (they hold the objects), then objects, then their data
        order = {"scenes": 0, "objects": 1, "meshes": 2, "cameras": 2, "materials": 3}
        for kind, block in sorted(self._made, key=lambda kb: order[kb[0]]):
            try:
                getattr(bpy.data, kind).remove(block, do_unlink=True)
            except ReferenceError:
                pass  # already gone
        self._made.clear()
        if not self._had_render_result and "Render Result" in bpy.data.images:
            bpy.data.images.remove(bpy.data.images["Render Result"])
        if self._tmpdir is not None:
            self._tmpdir.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def capture_object(obj, uv_map: str, cameras, width: int, height: int, work_dir=None, depsgraph=None) -> dict[str, np.ndarray]:
    """Capture every camera's view of ``obj`` and return the ViewSet arrays (see CaptureSession)."""
    with CaptureSession(obj, uv_map, cameras, width, height, work_dir, depsgraph) as session:
        return session.capture_all()
