"""The add-on's own costs: capture time per view, and its overhead around a job.

1. Capture (blender_addon.capture.CaptureSession: Cycles Depth/UV/Normal passes of the evaluated mesh in a
   scratch scene, EXR read back with OpenImageIO) per view at 512^2 of a ~20k-face mesh (a UV sphere, 160
   segments x 64 rings: 20,160 triangles). Target: <= 0.2 s per view on 2 cores.
2. One `texture` job through the operator in blocking mode against a real `concord serve --model tiny`:
   capture + upload + download + apply (the add-on's part) as a share of the total wall time.
   The tiny model's denoising is cheap, so this share is an upper bound; with a real model it is far smaller.

Run: .venv/bin/python bench/capture.py  (writes bench/results/capture.json)
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

_HOME = tempfile.mkdtemp(prefix="concord-bench-home-")
for _v in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "BLENDER_USER_RESOURCES"):
    os.environ[_v] = _HOME

from _common import report, timed  # noqa: E402


def _sphere(bpy, segments=160, rings=64):
    bpy.ops.mesh.primitive_uv_sphere_add(segments=segments, ring_count=rings, radius=1.0)
    ob = bpy.context.active_object
    ob.select_set(True)
    return ob


def bench_capture(bpy, size=512, views=6) -> dict:
    from blender_addon import capture
    from blender_addon.core import rigs

    bpy.ops.wm.read_factory_settings(use_empty=True)
    ob = _sphere(bpy)
    faces = sum(len(p.vertices) - 2 for p in ob.data.polygons)
    c, r = capture.world_bounding_sphere(ob)
    cams = rigs.zero123pp(c, r, size, size)[:views]
    per_view = []

    def run():
        with capture.CaptureSession(ob, ob.data.uv_layers[0].name, cams, size, size) as s:
            s.capture_all()
            per_view.extend(s.seconds)

    t = timed(run, repeat=3, warmup=1)
    return {
        "case": f"capture {views} views",
        "triangles": faces,
        "size": size,
        "s_per_view": t["median_s"] / views,
        "s_per_view_render_only": sorted(per_view)[len(per_view) // 2],
        "target_s_per_view": 0.2,
        "ok": t["median_s"] / views <= 0.2,
    }


def bench_job_overhead(bpy, size=128, steps=10, texture="512") -> dict:
    import addon_utils

    from blender_addon.ops import texture as texture_ops
    from concord.serve_process import ServerProcess

    bpy.ops.wm.read_factory_settings(use_empty=False)
    for o in list(bpy.data.objects):
        bpy.data.objects.remove(o)
    addon_utils.enable("blender_addon", default_set=True, handle_error=None)
    ob = _sphere(bpy)
    bpy.context.view_layer.objects.active = ob
    s = bpy.context.scene.concord
    s.model_defaults = False  # the case's own sizes, not tiny's recommended ones
    s.prompt, s.steps, s.view_resolution, s.texture_size = "marble", steps, size, texture
    with tempfile.TemporaryDirectory() as data, ServerProcess(Path(data), model="tiny") as server:
        bpy.context.preferences.addons["blender_addon"].preferences.server_url = server.url
        bpy.ops.concord.texture_mesh(blocking=True)  # warm-up (first job loads lazily-built parts)
        t0 = time.perf_counter()
        assert bpy.ops.concord.texture_mesh(blocking=True) == {"FINISHED"}
        total = time.perf_counter() - t0
    tm = dict(texture_ops.LAST_TIMINGS)
    addon = tm["capture_s"] + tm["upload_s"] + tm["download_s"] + tm["apply_s"]
    return {
        "case": f"texture job, tiny, 6 views {size}px, {steps} steps, texture {texture}",
        "triangles": sum(len(p.vertices) - 2 for p in ob.data.polygons),
        "size": size,
        "total_s": total,
        "capture_s": tm["capture_s"],
        "upload_s": tm["upload_s"],
        "server_s": tm["server_s"],
        "download_s": tm["download_s"],
        "apply_s": tm["apply_s"],
        "addon_share": addon / total,
    }


def main() -> None:
    import bpy

    rows = [bench_capture(bpy), bench_capture(bpy, size=256), bench_job_overhead(bpy)]
    report(
        "capture",
        rows,
        ["case", "triangles", "size", "s_per_view", "s_per_view_render_only", "target_s_per_view", "ok",
         "total_s", "capture_s", "upload_s", "server_s", "download_s", "apply_s", "addon_share"],
    )


if __name__ == "__main__":
    main()
