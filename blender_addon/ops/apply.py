"""Put a finished job's texture on the object, so that the whole object shows it, and keep results safe.

Called on the main thread after every result file is already on disk (``core.jobs.Done``). It makes a new
image (texture.png, relative to the .blend where saved) and a new material (Principled BSDF whose Base Color
is the image sampled through a UV Map node set to the UV map the views were captured with). The texture was
generated for the whole object, so every face shows it, in either material mode:

* ``REPLACE`` ("Replace Materials"): every slot of the object gets the new material. The per-face slot
  assignment is not touched, and the artist's own materials are kept in the file (``use_fake_user``).
* ``APPEND`` ("New Slot"): the new material gets a slot of its own and every face is assigned to it; the
  other slots keep their materials (now on no face). Re-running reuses the slot of the previous Concord
  result instead of adding one per run.

Re-running on the same object does not pile up orphans: a previous Concord result that the new one replaces
gets no fake user (and loses one it had), so once nothing uses it, Blender's purge (or a save and reload)
removes it and its image; its files stay on disk. The artist's own materials are never given up. Everything
is one undo step (the operator's), and ``describe_placement`` says what was replaced, for the report.

Concord's datablocks carry the ID property ``concord_result`` (the job's folder): that is how a previous
result is told from the artist's materials, and where its files are.

``keep_results_on_save`` is a ``save_pre`` handler: results of a file never saved live in the system's temp
folder (``core.results``); when the .blend is saved, each such job folder is copied beside it
(``//concord/<job>/``) and the images are pointed there before the file is written, so clearing the temp
folder never leaves the texture missing. Where the copy cannot be made, the image is packed into the .blend.

If anything fails half way through an apply, whatever was created is removed again: the scene is as before.

Layer rule: a bpy layer (ops/); no network, main thread only.
"""

from __future__ import annotations

import os
from pathlib import Path

import bpy

from ..core import results

CONCORD_TAG = "concord_result"  # ID property on Concord's materials and images: the job's result folder


class ApplyError(RuntimeError):
    pass


def is_concord(block) -> bool:
    """Whether a material or image was made by Concord (carries ``concord_result``)."""
    return block is not None and CONCORD_TAG in block.keys()


def _load_image(path: Path, name: str, out_dir: Path) -> bpy.types.Image:
    image = bpy.data.images.load(str(path), check_existing=False)
    image.name = name
    image[CONCORD_TAG] = str(out_dir)
    if bpy.data.filepath:
        try:
            image.filepath = bpy.path.relpath(str(path))
        except ValueError:  # another drive on Windows: keep it absolute
            pass
    return image


def build_material(name: str, image: bpy.types.Image, uv_map: str) -> bpy.types.Material:
    """Principled BSDF, Base Color <- Image Texture <- UV Map node (``uv_map``)."""
    mat = bpy.data.materials.new(name)
    if bpy.app.version < (5, 0, 0):
        mat.use_nodes = True
    nt = mat.node_tree
    nt.nodes.clear()
    out = nt.nodes.new("ShaderNodeOutputMaterial")
    out.location = (400, 0)
    bsdf = nt.nodes.new("ShaderNodeBsdfPrincipled")
    bsdf.location = (100, 0)
    tex = nt.nodes.new("ShaderNodeTexImage")
    tex.location = (-300, 0)
    tex.image = image
    tex.interpolation = "Linear"
    uv = nt.nodes.new("ShaderNodeUVMap")
    uv.location = (-550, 0)
    uv.uv_map = uv_map
    nt.links.new(uv.outputs["UV"], tex.inputs["Vector"])
    nt.links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
    nt.links.new(bsdf.outputs["BSDF"], out.inputs["Surface"])
    return mat


def _let_go(old: bpy.types.Material) -> bool:
    """A previous Concord result was replaced: no fake user, so once unused the purge removes it (its files
    stay on disk). Returns True when nothing uses it any more."""
    if old.use_fake_user and old.users == 1:  # only the fake user (an add-on before this one gave it)
        old.use_fake_user = False
    return old.users == 0


def _replace_every_slot(obj, mat) -> dict:
    olds: list = []
    for slot in obj.material_slots:
        if slot.material is not None and slot.material not in olds:
            olds.append(slot.material)
        slot.material = mat
    kept, dropped = [], []
    for old in olds:
        if is_concord(old):
            if _let_go(old):
                dropped.append(old.name)
        else:
            old.use_fake_user = True  # the artist's material stays in the file
            kept.append(old.name)
    return {"slots": len(obj.material_slots), "replaced": kept, "dropped": dropped}


def assign_all_faces(obj, index: int) -> int:
    """Assign every face to slot ``index`` (in Edit Mode through the edit mesh); returns how many moved."""
    me = obj.data
    if obj.mode == "EDIT":
        import bmesh

        bm = bmesh.from_edit_mesh(me)
        moved = sum(1 for f in bm.faces if f.material_index != index)
        for f in bm.faces:
            f.material_index = index
        bmesh.update_edit_mesh(me)
        return moved
    import numpy as np

    idx = np.empty(len(me.polygons), np.int32)
    me.polygons.foreach_get("material_index", idx)
    moved = int((idx != index).sum())
    me.polygons.foreach_set("material_index", np.full(len(me.polygons), index, np.int32))
    me.update()
    return moved


def _own_slot(obj, mat) -> dict:
    slot_index = next((i for i in reversed(range(len(obj.material_slots))) if is_concord(obj.material_slots[i].material)), None)
    dropped = []
    if slot_index is None:
        obj.data.materials.append(mat)
        slot_index = len(obj.material_slots) - 1
        new_slot = True
    else:  # the previous Concord result's slot: reuse it
        old = obj.material_slots[slot_index].material
        obj.material_slots[slot_index].material = mat
        if old is not mat and _let_go(old):
            dropped.append(old.name)
        new_slot = False
    moved = assign_all_faces(obj, slot_index)
    obj.active_material_index = slot_index
    unused = [s.material.name for i, s in enumerate(obj.material_slots) if i != slot_index and s.material is not None]
    return {"slot": slot_index, "new_slot": new_slot, "moved_faces": moved, "unused": unused, "dropped": dropped}


def _slots_snapshot(obj) -> dict:
    import numpy as np

    idx = np.empty(len(obj.data.polygons), np.int32)
    obj.data.polygons.foreach_get("material_index", idx)
    return {
        "n": len(obj.data.materials),
        "slots": [s.material for s in obj.material_slots],
        "fake": {s.material.name: s.material.use_fake_user for s in obj.material_slots if s.material is not None},
        "faces": idx,
        "active": obj.active_material_index,
    }


def _restore_slots(obj, snap: dict) -> None:
    """Undo a half-done placement (an error or Ctrl+C in the middle of it)."""
    while len(obj.data.materials) > snap["n"]:
        obj.data.materials.pop()
    for slot, mat in zip(obj.material_slots, snap["slots"]):
        slot.material = mat
    for name, fake in snap["fake"].items():
        if name in bpy.data.materials:
            bpy.data.materials[name].use_fake_user = fake
    if obj.mode != "EDIT":
        obj.data.polygons.foreach_set("material_index", snap["faces"])
        obj.data.update()
    obj.active_material_index = snap["active"]


def apply_texture(obj: bpy.types.Object, uv_map: str, out_dir: Path, slot_mode: str = "REPLACE") -> dict:
    """Texture ``obj`` from the results in ``out_dir`` (see the module doc for the two modes).

    Returns {material, image, grid_image, mode, shared_with, ...placement}: for REPLACE ``replaced`` (the
    artist's materials taken out of the slots, kept with a fake user) and ``slots``; for APPEND ``slot``,
    ``new_slot``, ``moved_faces`` and ``unused`` (materials left on slots with no face); for both ``dropped``
    (previous Concord results now unused)."""
    out_dir = Path(out_dir)
    tex_path = out_dir / "texture.png"
    if not tex_path.is_file():
        raise ApplyError(f"the server's result has no texture.png (in {out_dir})")
    if uv_map not in obj.data.uv_layers:
        raise ApplyError(f"{obj.name!r} no longer has the UV map {uv_map!r}")
    made: list[tuple[str, object]] = []
    before = _slots_snapshot(obj)
    try:
        image = _load_image(tex_path, f"Concord {obj.name}", out_dir)
        made.append(("images", image))
        grid = None
        grid_path = out_dir / "grid.png"
        if grid_path.is_file():
            grid = _load_image(grid_path, f"Concord {obj.name} views", out_dir)
            made.append(("images", grid))
        mat = build_material(f"Concord {obj.name}", image, uv_map)
        mat[CONCORD_TAG] = str(out_dir)
        made.append(("materials", mat))
        if slot_mode == "APPEND" or len(obj.material_slots) == 0:
            placed = {"mode": "APPEND", **_own_slot(obj, mat)}
        else:
            placed = {"mode": "REPLACE", **_replace_every_slot(obj, mat)}
    except BaseException:  # including Ctrl+C half way: nothing half-made stays behind
        _restore_slots(obj, before)
        for kind, block in made:
            try:
                getattr(bpy.data, kind).remove(block)
            except ReferenceError:
                pass
        raise
    shared = obj.data.users - 1 if obj.data.users > 1 else 0
    return {"material": mat, "image": image, "grid_image": grid, "shared_with": shared, **placed}


def describe_placement(made: dict) -> str:
    """What the apply did to the object's materials, in the artist's words (for the report)."""
    parts = []
    if made["mode"] == "REPLACE":
        if made["replaced"]:
            names = ", ".join(made["replaced"])
            where = f"in all {made['slots']} slots, " if made["slots"] > 1 else ""
            parts.append(f"{where}replacing {names} (kept in the file)")
    else:
        where = f"a new slot {made['slot'] + 1}" if made["new_slot"] else f"its slot {made['slot'] + 1}"
        parts.append(f"in {where}, every face assigned to it")
        if made["unused"]:
            parts.append(f"{', '.join(made['unused'])} stay on slots no face uses (Ctrl+Z restores the assignment)")
    if made["dropped"]:
        parts.append(f"the previous result {', '.join(made['dropped'])} is no longer used (its files stay on disk)")
    if made.get("shared_with"):
        parts.append(f"the mesh is shared: {made['shared_with']} other object(s) show it too")
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------- saving
@bpy.app.handlers.persistent
def keep_results_on_save(filepath="", *_args) -> None:
    """``save_pre``: copy job folders still in the temp folder beside the .blend being written, and point
    their images (and Concord materials' ``concord_result``) there; pack an image where that fails."""
    if not isinstance(filepath, str) or not filepath:
        filepath = bpy.data.filepath
    if not filepath:
        return
    moved: dict[Path, Path | None] = {}

    def new_home(folder: Path) -> Path | None:
        if folder not in moved:
            try:
                moved[folder] = results.relocate_result(folder, filepath)
            except OSError as exc:
                print(f"Concord: could not copy {folder} beside {filepath} ({exc}); packing its images into the .blend")
                moved[folder] = None
        return moved[folder]

    blend_dir = os.path.dirname(os.path.abspath(filepath))
    for image in bpy.data.images:
        if image.source != "FILE" or image.packed_file is not None or not image.filepath:
            continue
        path = Path(bpy.path.abspath(image.filepath))
        folder = results.temporary_job_folder(path)
        if folder is None:
            continue
        home = new_home(folder)
        if home is None:
            try:
                image.pack()
            except RuntimeError as exc:
                print(f"Concord: could not pack {image.name!r}: {exc}")
            continue
        target = home / path.resolve().relative_to(folder)
        try:
            image.filepath = bpy.path.relpath(str(target), start=blend_dir)
        except ValueError:  # another drive on Windows
            image.filepath = str(target)
    for block in list(bpy.data.materials) + list(bpy.data.images):
        if is_concord(block):
            folder = results.temporary_job_folder(Path(block[CONCORD_TAG]))
            if folder is not None and moved.get(folder) is not None:
                block[CONCORD_TAG] = str(moved[folder])
    state = getattr(bpy.context.window_manager, "concord_job", None) if bpy.context.window_manager else None
    if state is not None and state.last_result:
        folder = results.temporary_job_folder(Path(state.last_result))
        if folder is not None and moved.get(folder) is not None:
            state.last_result = str(moved[folder])


def register_handlers() -> None:
    if keep_results_on_save not in bpy.app.handlers.save_pre:
        bpy.app.handlers.save_pre.append(keep_results_on_save)


def unregister_handlers() -> None:
    for fn in list(bpy.app.handlers.save_pre):  # also a copy left by an earlier load of this module
        if getattr(fn, "__name__", "") == keep_results_on_save.__name__ and getattr(fn, "__module__", "") == __name__:
            bpy.app.handlers.save_pre.remove(fn)
