"""Capture: the selected object's geometry as a ViewSet, through Cycles passes, leaving the user's scene alone.

:class:`CaptureSession` renders into a temporary scene that links only a copy of the object's EVALUATED mesh
(modifiers applied, ``Mesh.new_from_object``), with the chosen UV map made render-active on the copy and an
emission override material; a scratch camera is placed per view (``passes.place_camera``). The user's
scenes, render settings, selection, active object, active camera and materials are never written; on close
every datablock the session made is removed (and the "Render Result" image too, if it did not exist before).
Views are rendered one at a time (``capture_next``) so a modal operator can keep the UI alive between them.

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

__all__ = ["CaptureSession", "CaptureError", "capture_object", "world_bounding_sphere", "scene_camera_specs", "passes"]


class CaptureError(ValueError):
    """The object cannot be captured (no mesh, no such UV map, ...); the message says what to do."""


def _world_vertices(mesh: bpy.types.Mesh, matrix_world) -> np.ndarray:
    co = np.empty(len(mesh.vertices) * 3, dtype=np.float64)
    mesh.vertices.foreach_get("co", co)
    co = co.reshape(-1, 3)
    M = np.array(matrix_world, dtype=np.float64)
    return co @ M[:3, :3].T + M[:3, 3]


def world_bounding_sphere(obj: bpy.types.Object, depsgraph=None) -> tuple[np.ndarray, float]:
    """(centre, radius) of the evaluated mesh's vertices in world coordinates (``core.rigs.bounding_sphere``)."""
    depsgraph = depsgraph or bpy.context.evaluated_depsgraph_get()
    ob_eval = obj.evaluated_get(depsgraph)
    mesh = ob_eval.to_mesh()
    try:
        pts = _world_vertices(mesh, ob_eval.matrix_world)
    finally:
        ob_eval.to_mesh_clear()
    if len(pts) == 0:
        raise CaptureError(f"{obj.name!r} has no vertices after its modifiers")
    return rigs.bounding_sphere(pts)


def scene_camera_specs(scene: bpy.types.Scene) -> list[rigs.SceneCamera]:
    """The scene's camera objects as plain numbers for ``core.rigs.scene_cameras`` (sorted by name)."""
    out = []
    for ob in sorted((o for o in scene.objects if o.type == "CAMERA"), key=lambda o: o.name):
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
            )
        )
    return out


class CaptureSession:
    """Render one view at a time of one object into a scratch scene. Use as a context manager (or close())."""

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
        ob_eval = obj.evaluated_get(depsgraph)
        mesh = self._keep(
            "meshes",
            bpy.data.meshes.new_from_object(ob_eval, preserve_all_data_layers=True, depsgraph=depsgraph),
        )
        mesh.name = "Concord Capture Mesh"
        if uv_map not in mesh.uv_layers:
            raise CaptureError(f"UV map {uv_map!r} did not survive {obj.name!r}'s modifiers; apply them or pick another map")
        mesh.uv_layers[uv_map].active_render = True
        mesh.uv_layers.active = mesh.uv_layers[uv_map]
        if len(mesh.polygons) == 0:
            raise CaptureError(f"{obj.name!r} has no faces after its modifiers")
        self.scene = self._keep("scenes", bpy.data.scenes.new("Concord Capture"))
        copy = self._keep("objects", bpy.data.objects.new("Concord Capture Object", mesh))
        copy.matrix_world = ob_eval.matrix_world.copy()
        self.scene.collection.objects.link(copy)
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
        self.views.append(passes.render_passes(self.scene, self.work_dir / f"passes_{k:02d}.exr"))
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
