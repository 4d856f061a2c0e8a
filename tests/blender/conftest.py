"""bpy-backed fixtures for tests marked ``blender``: a scratch home for Blender, the Cycles pass renderer
(``cycles_passes``, a thin helper over the add-on's ``blender_addon.capture.passes``), the add-on enabled in
a fresh factory scene (``addon``), a scene snapshot for "unchanged" checks, and a real `concord serve`.

Blender writes to ~/.cache and ~/.config/blender: XDG_CACHE_HOME, XDG_CONFIG_HOME and BLENDER_USER_RESOURCES
point at a temporary folder before bpy is imported. Tests skip where the bpy wheel is not installed.
"""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

_BLENDER_HOME_VARS = ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "BLENDER_USER_RESOURCES")


@pytest.fixture(scope="session")
def bpy_module(tmp_path_factory):
    """The bpy module, imported with Blender's home folders in a scratch directory (skips without the wheel).

    The variables stay set for the rest of the session (bpy may read them after import) and are restored at
    its end.
    """
    home = tmp_path_factory.mktemp("blender-home")
    saved = {k: os.environ.get(k) for k in _BLENDER_HOME_VARS}
    for k in _BLENDER_HOME_VARS:
        os.environ[k] = str(home)
    try:
        bpy = pytest.importorskip("bpy", reason="needs the bpy wheel (pip install '.[blender]')")
        yield bpy
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def cycles_passes(bpy_module):
    """The helper module with ``new_scene_with_gltf`` and ``render_cycles_passes``."""
    import cycles_passes as helper

    return helper


# ------------------------------------------------------------------------------------------- the add-on
ADDON_MODULE = "blender_addon"  # importable from the repository root (editable install / sys.path)


@pytest.fixture
def addon(bpy_module):
    """A fresh factory scene with the Concord add-on enabled (disabled again afterwards).

    ``read_factory_settings`` resets the preferences (and with them the enabled add-ons), so the add-on is
    enabled after it. The factory startup keeps its window, which ``bpy.ops.ed.undo`` needs even in
    background mode."""
    import addon_utils

    bpy = bpy_module
    root = str(Path(__file__).resolve().parents[2])
    if root not in sys.path:
        sys.path.insert(0, root)
    bpy.ops.wm.read_factory_settings(use_empty=False)
    for ob in list(bpy.data.objects):
        bpy.data.objects.remove(ob)
    mod = addon_utils.enable(ADDON_MODULE, default_set=True, handle_error=_raise)
    assert mod is not None, "the add-on did not enable"
    yield mod
    addon_utils.disable(ADDON_MODULE, default_set=True, handle_error=_raise)


def _raise(exc):
    raise exc


def scene_snapshot(bpy) -> dict:
    """Everything a capture or a failed job must leave as it was: datablocks, selection, active object and
    camera, render settings, materials on every slot."""
    scene = bpy.context.scene
    r = scene.render
    return {
        "blocks": {
            k: sorted(x.name for x in getattr(bpy.data, k))
            for k in ("scenes", "objects", "meshes", "cameras", "materials", "images", "node_groups", "collections")
        },
        "window_scene": bpy.context.window.scene.name if bpy.context.window else None,
        "selected": sorted(o.name for o in scene.objects if o.select_get()),
        "active": bpy.context.view_layer.objects.active.name if bpy.context.view_layer.objects.active else None,
        "camera": scene.camera.name if scene.camera else None,
        "render": (r.engine, r.resolution_x, r.resolution_y, r.resolution_percentage, r.filepath,
                   r.film_transparent, r.image_settings.file_format, scene.cycles.samples,
                   tuple(v.name for v in scene.view_layers),
                   tuple((v.use_pass_z, v.use_pass_normal, v.use_pass_uv, v.material_override) for v in scene.view_layers)),
        "slots": {o.name: [s.material.name if s.material else None for s in o.material_slots] for o in bpy.data.objects},
        "uv_render": {m.name: [(u.name, u.active_render) for u in m.uv_layers] for m in bpy.data.meshes},
        "fake_users": sorted(m.name for m in bpy.data.materials if m.use_fake_user),
    }


@pytest.fixture
def snapshot(bpy_module):
    return lambda: scene_snapshot(bpy_module)


@pytest.fixture(scope="module")
def concord_server(tmp_path_factory):
    """A real `concord serve --model tiny` subprocess on a free loopback port (one per test module)."""
    from concord.serve_process import ServerProcess

    with ServerProcess(tmp_path_factory.mktemp("server-data"), model="tiny") as server:
        yield server
