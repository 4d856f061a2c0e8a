"""What the artist gets after a run, checked by the OUTCOME (tests/blender/outcome.py: the textured object
rendered through every captured camera, correlated with the generated views), in situations met daily:

* material slots: on a two-slot mesh both modes show the new texture on the whole object; the artist's
  materials and the per-face assignment come back with one undo; the report names what was replaced;
* results of a file never saved survive saving it elsewhere and clearing the temp folder;
* re-running on the same object leaves no orphans that survive a purge, and never loses the artist's material;
* several meshes selected: the report says which were not textured;
* the panel's last line is the latest outcome, also after a run that failed or could not start;
* Ctrl+C (KeyboardInterrupt) during a blocking run clears the add-on's state and cancels the server's job.

The `tiny` model's views are noise, so agreement between the render and the views is the whole test: a correct
result correlates highly on every view, a face left with another material does not (see outcome.py).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest

from outcome import check_outcome

from addon_scene import addon_prefs as _prefs

pytestmark = pytest.mark.blender

# Every view of a correctly textured object correlates at least this well with its generated view (the same bound
# as test_addon_scenes_capture.py). Measured on the two-slot sphere (orbit, 4 views of 96 px, 512 px texture, tiny
# model): 0.96-0.97 per view when every face shows the texture; 0.00-0.45 on the three views that see the half
# left with its old material (the behaviour before this fix), 0.96 on the one that does not see it. Suzanne,
# reopened from the copied results: 0.96-0.98.
GOOD = 0.9



def _job(bpy, **extra):
    s = bpy.context.scene.concord
    s.prompt = "noise"
    if hasattr(s, "model_defaults"):
        s.model_defaults = False  # these small sizes, not the model's
    s.steps = 2
    s.view_resolution = 96
    s.texture_size = "512"  # texels finer than the 96 px views' pixels: the bake blurs little
    s.rig = "ORBIT"
    s.orbit_views = 4
    for k, v in extra.items():
        setattr(s, k, v)
    return s


def _material(bpy, name, rgb):
    m = bpy.data.materials.new(name)
    if bpy.app.version < (5, 0, 0):
        m.use_nodes = True
    m.node_tree.nodes["Principled BSDF"].inputs["Base Color"].default_value = (*rgb, 1.0)
    return m


def _two_slot_sphere(bpy, location=(0, 0, 0)):
    """A UV sphere whose +x half uses slot 2 ("Blue") and the rest slot 1 ("Red"); slot 1 active."""
    bpy.ops.mesh.primitive_uv_sphere_add(segments=24, ring_count=12, location=location)
    ob = bpy.context.active_object
    ob.data.materials.append(_material(bpy, "Red", (0.8, 0.1, 0.1)))
    ob.data.materials.append(_material(bpy, "Blue", (0.1, 0.1, 0.8)))
    centers = np.empty(len(ob.data.polygons) * 3)
    ob.data.polygons.foreach_get("center", centers)
    idx = (centers.reshape(-1, 3)[:, 0] > 0).astype(np.int32)
    ob.data.polygons.foreach_set("material_index", idx)
    ob.data.update()
    ob.active_material_index = 0
    return ob


def _face_slots(ob) -> np.ndarray:
    idx = np.empty(len(ob.data.polygons), np.int32)
    ob.data.polygons.foreach_get("material_index", idx)
    return idx


def _state(bpy):
    return bpy.context.window_manager.concord_job


def _blocks(bpy):
    return (sorted(m.name for m in bpy.data.materials), sorted(i.name for i in bpy.data.images if i.type != "RENDER_RESULT"))


def _concord(blocks):
    return sorted(b.name for b in blocks if b.name.startswith("Concord"))


# ------------------------------------------------------------------------------------------- 3. material slots
def test_replace_on_two_slot_mesh_textures_whole_object_and_one_undo_restores(addon, bpy_module, concord_server):
    bpy = bpy_module
    _prefs(bpy).server_url = concord_server.url
    ob = _two_slot_sphere(bpy)
    name = ob.name
    faces = _face_slots(ob)
    assert set(faces) == {0, 1}
    _job(bpy, slot_mode="REPLACE")
    bpy.ops.ed.undo_push(message="before Concord")
    blocks = _blocks(bpy)

    assert bpy.ops.concord.texture_mesh(blocking=True) == {"FINISHED"}
    ob = bpy.data.objects[name]
    mat = ob.material_slots[0].material
    assert [s.material for s in ob.material_slots] == [mat, mat] and "concord_result" in mat.keys()
    np.testing.assert_array_equal(_face_slots(ob), faces)  # REPLACE never touches the face assignment
    assert bpy.data.materials["Red"].use_fake_user and bpy.data.materials["Blue"].use_fake_user
    report = _state(bpy).last_report
    assert "Red" in report and "Blue" in report, report
    out = Path(_state(bpy).last_result)
    result = check_outcome(ob, out)
    print(f"\nREPLACE, two slots: {result}")
    assert result.min >= GOOD, result

    bpy.ops.ed.undo()
    ob = bpy.data.objects[name]
    assert [s.material.name for s in ob.material_slots] == ["Red", "Blue"]
    np.testing.assert_array_equal(_face_slots(ob), faces)
    assert not bpy.data.materials["Red"].use_fake_user and not bpy.data.materials["Blue"].use_fake_user
    assert _blocks(bpy) == blocks


def test_new_slot_on_two_slot_mesh_textures_whole_object_reuses_its_slot_and_undoes(addon, bpy_module, concord_server):
    bpy = bpy_module
    _prefs(bpy).server_url = concord_server.url
    ob = _two_slot_sphere(bpy)
    name = ob.name
    faces = _face_slots(ob)
    _job(bpy, slot_mode="APPEND")
    bpy.ops.ed.undo_push(message="before Concord")
    blocks = _blocks(bpy)

    assert bpy.ops.concord.texture_mesh(blocking=True) == {"FINISHED"}
    ob = bpy.data.objects[name]
    names = [s.material.name for s in ob.material_slots]
    assert names[:2] == ["Red", "Blue"] and len(names) == 3
    assert (_face_slots(ob) == 2).all() and ob.active_material_index == 2
    report = _state(bpy).last_report
    assert "Red" in report and "Blue" in report and "no face" in report, report
    result = check_outcome(ob, Path(_state(bpy).last_result))
    print(f"\nNew Slot, two slots: {result}")
    assert result.min >= GOOD, result

    # a second run replaces the previous result in its own slot: no slot (and no orphan) per run
    first = ob.material_slots[2].material.name
    assert bpy.ops.concord.texture_mesh(blocking=True) == {"FINISHED"}
    ob = bpy.data.objects[name]
    assert len(ob.material_slots) == 3 and ob.material_slots[2].material.name != first
    assert first in _state(bpy).last_report and "no longer used" in _state(bpy).last_report
    assert check_outcome(ob, Path(_state(bpy).last_result)).min >= GOOD

    bpy.ops.ed.undo()
    bpy.ops.ed.undo()
    ob = bpy.data.objects[name]
    assert [s.material.name for s in ob.material_slots] == ["Red", "Blue"]
    np.testing.assert_array_equal(_face_slots(ob), faces)
    assert _blocks(bpy) == blocks


# ------------------------------------------------------------------------------------------- 6. orphans
def test_reruns_leave_only_the_latest_result_after_a_purge(addon, bpy_module, concord_server):
    bpy = bpy_module
    _prefs(bpy).server_url = concord_server.url
    bpy.ops.mesh.primitive_monkey_add()
    ob = bpy.context.active_object
    ob.data.materials.append(_material(bpy, "Mine", (0.2, 0.6, 0.2)))
    _job(bpy, slot_mode="REPLACE")
    for _ in range(3):
        assert bpy.ops.concord.texture_mesh(blocking=True) == {"FINISHED"}
    latest = ob.material_slots[0].material
    latest_name, latest_image = latest.name, latest.node_tree.nodes["Image Texture"].image.name
    assert len(_concord(bpy.data.materials)) == 3  # before the purge the earlier results are still there...

    bpy.data.orphans_purge(do_local_ids=True, do_linked_ids=True, do_recursive=True)
    # ...after it only the latest remains, and the artist's own material is never lost
    assert _concord(bpy.data.materials) == [latest_name]
    assert [n for n in _concord(bpy.data.images) if not n.endswith("views")] == [latest_image]
    assert "Mine" in bpy.data.materials and bpy.data.materials["Mine"].use_fake_user
    assert check_outcome(ob, Path(_state(bpy).last_result)).min >= GOOD


# ------------------------------------------------------------------------------------------- 4. unsaved results
def test_results_of_unsaved_file_survive_saving_elsewhere_and_temp_cleanup(addon, bpy_module, concord_server, tmp_path,
                                                                           monkeypatch):
    bpy = bpy_module
    systemp = tmp_path / "system-temp"
    systemp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systemp))  # the system temp folder, for this test only
    _prefs(bpy).server_url = concord_server.url
    assert bpy.data.filepath == ""
    bpy.ops.mesh.primitive_monkey_add()
    name = bpy.context.active_object.name
    _job(bpy)

    assert bpy.ops.concord.texture_mesh(blocking=True) == {"FINISHED"}
    temp_out = Path(_state(bpy).last_result)
    assert systemp in temp_out.parents
    assert "not saved" in _state(bpy).last_report  # warned at texture time

    blend = tmp_path / "elsewhere" / "scene.blend"
    blend.parent.mkdir()
    bpy.ops.wm.save_as_mainfile(filepath=str(blend))
    shutil.rmtree(systemp)  # the machine clears its temp folder
    bpy.ops.wm.open_mainfile(filepath=str(blend))

    ob = bpy.data.objects[name]
    image = ob.material_slots[0].material.node_tree.nodes["Image Texture"].image
    kept = blend.parent / "concord" / temp_out.name
    assert Path(bpy.path.abspath(image.filepath)).resolve() == (kept / "texture.png").resolve()
    assert image.has_data or image.pixels[0] is not None
    assert tuple(image.size) == (512, 512), "the texture is missing (Blender shows it pink)"
    monkeypatch.undo()  # the temp folder is gone; the check renders into its own folder
    (tmp_path / "check").mkdir()
    result = check_outcome(ob, kept, work_dir=tmp_path / "check")
    print(f"\nreopened after the temp folder was cleared: {result}")
    assert result.min >= GOOD, result


# ------------------------------------------------------------------------------------------- 6. reports
def test_several_meshes_selected_report_names_those_not_textured(addon, bpy_module, concord_server):
    bpy = bpy_module
    _prefs(bpy).server_url = concord_server.url
    bpy.ops.mesh.primitive_cube_add(location=(3, 0, 0))
    other = bpy.context.active_object
    other.data.materials.append(_material(bpy, "Other", (0.5, 0.5, 0.1)))
    bpy.ops.mesh.primitive_monkey_add()
    ob = bpy.context.active_object
    other.select_set(True)
    assert {o.name for o in bpy.context.selected_objects} == {ob.name, other.name}
    _job(bpy)
    assert bpy.ops.concord.texture_mesh(blocking=True) == {"FINISHED"}
    report = _state(bpy).last_report
    assert report.startswith(f"Textured {ob.name}") and other.name in report and "not textured" in report, report
    assert [s.material.name for s in other.material_slots] == ["Other"]


def test_panel_shows_latest_outcome_after_failed_runs(addon, bpy_module, concord_server, free_port):
    bpy = bpy_module
    _prefs(bpy).server_url = concord_server.url
    bpy.ops.mesh.primitive_monkey_add()
    _job(bpy)
    assert bpy.ops.concord.texture_mesh(blocking=True) == {"FINISHED"}
    assert _state(bpy).last_report.startswith("Textured")

    bpy.ops.object.select_all(action="DESELECT")  # a run that cannot start
    bpy.context.view_layer.objects.active = None
    with pytest.raises(RuntimeError, match="Nothing is selected"):
        bpy.ops.concord.texture_mesh(blocking=True)
    assert _state(bpy).last_report.startswith("Nothing is selected"), _state(bpy).last_report
    assert getattr(_state(bpy), "last_settings", "") == ""

    bpy.ops.mesh.primitive_cube_add()  # a run that fails on the way
    _prefs(bpy).server_url = f"http://127.0.0.1:{free_port}"
    with pytest.raises(RuntimeError, match="connection refused"):
        bpy.ops.concord.texture_mesh(blocking=True)
    assert "connection refused" in _state(bpy).last_report and not _state(bpy).last_report.startswith("Textured")


# ------------------------------------------------------------------------------------------- 5. Ctrl+C
def test_interrupt_clears_state_and_cancels_the_server_job(addon, bpy_module, snapshot, tiny_model, tmp_path, monkeypatch):
    bpy = bpy_module
    from blender_addon.core.client import ConcordClient
    from blender_addon.ops import texture as texture_ops
    from tests.harness import HANG_GUARD_S, InProcessServer, StepGate

    with InProcessServer(tiny_model, tmp_path / "data") as srv, StepGate(tiny_model.pipe.unet) as gate:
        _prefs(bpy).server_url = srv.url
        bpy.ops.mesh.primitive_monkey_add()
        _job(bpy, steps=5)
        before = snapshot()
        seen = {}
        original = texture_ops.CONCORD_OT_texture_mesh._on_message

        def on_message(self, context, msg):  # Ctrl+C while the job certainly runs on the server (gated)
            original(self, context, msg)
            job = texture_ops.active_job()
            if gate.reached.is_set() and job.worker is not None and job.worker.job_id:
                seen["id"] = job.worker.job_id
                raise KeyboardInterrupt

        monkeypatch.setattr(texture_ops.CONCORD_OT_texture_mesh, "_on_message", on_message)
        with pytest.raises((KeyboardInterrupt, RuntimeError), match="KeyboardInterrupt|interrupted"):
            bpy.ops.concord.texture_mesh(blocking=True)
        monkeypatch.undo()

        state = _state(bpy)
        assert texture_ops.active_job() is None and not state.running and not state.cancelling
        assert "interrupted" in state.last_report
        assert snapshot() == before
        client = ConcordClient(srv.url, None, HANG_GUARD_S)
        assert client.status(seen["id"])["message"] == "cancelling"  # told before the interrupt went on
        gate.release()
        idle, guard = threading.Event(), threading.Timer(HANG_GUARD_S, lambda: None)
        guard.start()
        while client.status(seen["id"])["state"] == "running" and guard.is_alive():  # waits on state (hang guard)
            idle.wait(0.01)
        guard.cancel()
        assert client.status(seen["id"])["state"] == "cancelled"
        assert gate.calls == 1

        # the add-on is usable again at once: no "A Concord job is already running"
        _job(bpy, steps=2)
        assert bpy.ops.concord.texture_mesh(blocking=True) == {"FINISHED"}
