"""The "Texture Selected" operator end to end, headless, against a real `concord serve --model tiny` subprocess.

What is asserted (the `tiny` model's pictures are noise; the plumbing is what is tested):
* blocking mode textures BoxTextured.glb: a new image and a new material (Principled BSDF <- Image Texture <-
  UV Map node with the captured map) replace the active slot's material, the old one is kept with a fake user,
  texture.png and the view grid are on disk in ``//concord/<object>_<timestamp>/`` beside the saved .blend,
  and metrics.json's `coverage` (the share of the mesh's UV-island texels the views see; the add-on sends the
  triangles) is >= 90 % and agrees with coverage.png's white texels over ``concord.geometry.metrics.
  uv_island_mask`` of the mesh's UV triangles. Rig: Zero123++; BoxTextured's own UVs put the six faces on one
  square, so a texel counts as seen when any of its faces is (measured 1.000).
* one undo reverts the whole apply;
* nothing selected, not a mesh, no UV map (and the one-click Smart UV fix), server down and cancel: a clear
  error (bpy.ops raises RuntimeError carrying the report for ERROR reports) and the scene unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.harness import StepGate

from addon_scene import addon_prefs as _prefs
from addon_scene import addon_server, cancel_on_server
from addon_scene import import_box as _import_box

pytestmark = pytest.mark.blender

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "meshes"
BOX = FIXTURES / "boxtextured" / "BoxTextured.glb"




def _small_job(bpy, **extra):
    s = bpy.context.scene.concord
    s.model_defaults = False  # these tests set their own (small) sizes; tests/blender/test_model_defaults.py covers it
    s.prompt = "weathered red brick"
    s.steps = 2
    s.view_resolution = 64
    s.texture_size = "256"
    for k, v in extra.items():
        setattr(s, k, v)
    return s


def _island_coverage(ob, coverage_png: Path, uv_map: str) -> float:
    from concord.geometry.metrics import uv_island_mask

    me = ob.data
    me.calc_loop_triangles()
    tri_loops = np.empty(len(me.loop_triangles) * 3, np.int64)
    me.loop_triangles.foreach_get("loops", tri_loops)
    uv = np.empty(len(me.loops) * 2, np.float64)
    me.uv_layers[uv_map].data.foreach_get("uv", uv)
    uv = uv.reshape(-1, 2)[tri_loops]
    cov = np.asarray(Image.open(coverage_png)) == 255  # seen (grey: on an island, seen by no view)
    islands = uv_island_mask(uv, np.arange(len(uv)).reshape(-1, 3), cov.shape[0])
    return float((cov & islands).sum() / islands.sum())


def test_textures_fixture_headless(addon, bpy_module, concord_server, tmp_path):
    bpy = bpy_module
    _prefs(bpy).server_url = concord_server.url
    ob = _import_box(bpy)
    uv_map = ob.data.uv_layers[0].name
    old = ob.material_slots[0].material
    blend = tmp_path / "scene.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(blend))
    _small_job(bpy, rig="ZERO123PP", view_resolution=192)

    assert bpy.ops.concord.texture_mesh(blocking=True) == {"FINISHED"}

    ob = bpy.data.objects[ob.name]
    mat = ob.material_slots[0].material
    assert mat.name.startswith("Concord") and mat is not old
    assert old.name in bpy.data.materials and old.use_fake_user
    nodes = mat.node_tree.nodes
    bsdf = next(n for n in nodes if n.type == "BSDF_PRINCIPLED")
    tex = bsdf.inputs["Base Color"].links[0].from_node
    assert tex.type == "TEX_IMAGE" and tex.image.name.startswith("Concord")
    uvnode = tex.inputs["Vector"].links[0].from_node
    assert uvnode.type == "UVMAP" and uvnode.uv_map == uv_map

    out = Path(bpy.context.window_manager.concord_job.last_result)
    assert out.parent == tmp_path / "concord" and out.name.startswith(f"{ob.name}_")
    assert (out / "texture.png").is_file() and (out / "grid.png").is_file()
    assert Path(bpy.path.abspath(tex.image.filepath)).resolve() == (out / "texture.png").resolve()
    assert tex.image.size[0] == 256
    preview = bpy.context.window_manager.concord_job.preview_image
    assert preview in bpy.data.images
    metrics = json.loads((out / "metrics.json").read_text())
    island = _island_coverage(ob, out / "coverage.png", uv_map)
    print(f"\ncoverage of the UV islands {metrics['coverage']:.3f} (coverage.png: {island:.3f})")
    assert metrics["coverage"] >= 0.9 and abs(island - metrics["coverage"]) < 0.01


def test_one_undo_reverts(addon, bpy_module, concord_server):
    bpy = bpy_module
    _prefs(bpy).server_url = concord_server.url
    ob = _import_box(bpy)
    name, old_name = ob.name, ob.material_slots[0].material.name
    _small_job(bpy)
    bpy.ops.ed.undo_push(message="before Concord")
    materials = sorted(m.name for m in bpy.data.materials)
    images = sorted(i.name for i in bpy.data.images if i.type != "RENDER_RESULT")

    assert bpy.ops.concord.texture_mesh(blocking=True) == {"FINISHED"}
    assert bpy.data.objects[name].material_slots[0].material.name.startswith("Concord")

    bpy.ops.ed.undo()
    ob = bpy.data.objects[name]
    assert ob.material_slots[0].material.name == old_name
    assert not bpy.data.materials[old_name].use_fake_user
    assert sorted(m.name for m in bpy.data.materials) == materials
    assert sorted(i.name for i in bpy.data.images if i.type != "RENDER_RESULT") == images


def test_append_slot_mode(addon, bpy_module, concord_server):
    bpy = bpy_module
    _prefs(bpy).server_url = concord_server.url
    ob = _import_box(bpy)
    _small_job(bpy, slot_mode="APPEND")
    assert bpy.ops.concord.texture_mesh(blocking=True) == {"FINISHED"}
    assert len(ob.material_slots) == 2 and ob.material_slots[1].material.name.startswith("Concord")
    idx = np.empty(len(ob.data.polygons), np.int32)
    ob.data.polygons.foreach_get("material_index", idx)
    assert (idx == 1).all() and ob.active_material_index == 1


def test_server_down_clear_error_scene_unchanged(addon, bpy_module, snapshot, free_port, tmp_path):
    bpy = bpy_module
    _prefs(bpy).server_url = f"http://127.0.0.1:{free_port}"
    _import_box(bpy)
    _small_job(bpy)
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "scene.blend"))  # results would go to tmp_path/concord
    before = snapshot()
    with pytest.raises(RuntimeError, match="connection refused"):
        bpy.ops.concord.texture_mesh(blocking=True)
    assert snapshot() == before
    assert not any((tmp_path / "concord").iterdir()), "a run that gave nothing leaves no result folder"
    assert "concord serve" in bpy.context.window_manager.concord_job.last_report
    assert not bpy.context.window_manager.concord_job.running


def test_selection_errors(addon, bpy_module, snapshot):
    bpy = bpy_module
    _small_job(bpy)
    before = snapshot()
    with pytest.raises(RuntimeError, match="Nothing is selected"):
        bpy.ops.concord.texture_mesh(blocking=True)
    bpy.ops.object.light_add(type="POINT")
    before = snapshot()
    with pytest.raises(RuntimeError, match="not a mesh"):
        bpy.ops.concord.texture_mesh(blocking=True)
    assert snapshot() == before
    bpy.context.scene.concord.prompt = ""
    bpy.ops.mesh.primitive_cube_add()
    with pytest.raises(RuntimeError, match="write a prompt"):
        bpy.ops.concord.texture_mesh(blocking=True)


def test_no_uv_map_then_one_click_fix(addon, bpy_module, snapshot, concord_server):
    bpy = bpy_module
    _prefs(bpy).server_url = concord_server.url
    bpy.ops.mesh.primitive_monkey_add()
    ob = bpy.context.active_object
    while ob.data.uv_layers:
        ob.data.uv_layers.remove(ob.data.uv_layers[0])
    bpy.ops.mesh.primitive_cube_add(location=(4, 0, 0))  # another selected object: the fix must not touch it
    cube = bpy.context.active_object
    ob.select_set(True)
    bpy.context.view_layer.objects.active = ob
    _small_job(bpy)
    before = snapshot()
    with pytest.raises(RuntimeError, match="no UV map"):
        bpy.ops.concord.texture_mesh(blocking=True)
    assert snapshot() == before
    cube_uv = np.empty(len(cube.data.loops) * 2)
    cube.data.uv_layers[0].data.foreach_get("uv", cube_uv)

    assert bpy.ops.concord.add_uv_map() == {"FINISHED"}
    assert len(ob.data.uv_layers) == 1 and ob.mode == "OBJECT"
    assert {o.name for o in bpy.context.selected_objects} == {ob.name, cube.name}
    after_uv = np.empty_like(cube_uv)
    cube.data.uv_layers[0].data.foreach_get("uv", after_uv)
    np.testing.assert_array_equal(cube_uv, after_uv)
    assert bpy.ops.concord.texture_mesh(blocking=True) == {"FINISHED"}


def test_cancel_reaches_server_and_scene_unchanged(addon, bpy_module, snapshot, tiny_model, tmp_path):
    bpy = bpy_module
    from blender_addon.ops import texture as texture_ops

    # The real app on a loopback port in this process, its denoiser held at the first step: the cancel
    # arrives while the job certainly runs on the server, however fast or slow the machine is.
    with addon_server(bpy, tiny_model, tmp_path / "data") as srv, StepGate(tiny_model.pipe.unet) as gate:
        _import_box(bpy)
        _small_job(bpy, steps=5, view_resolution=64)
        before = snapshot()
        with cancel_on_server(srv.url, gate, texture_ops.active_job, texture_ops.request_cancel):
            assert bpy.ops.concord.texture_mesh(blocking=True) == {"CANCELLED"}
        assert gate.calls == 1, "no step starts after the cancel"
    assert snapshot() == before
    assert "cancelled" in bpy.context.window_manager.concord_job.last_report
