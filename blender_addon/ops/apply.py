"""Put a finished job's texture on the object: a new image and a new material, nothing destroyed.

Called on the main thread after every result file is already on disk (``core.jobs.Done``). It makes a new
image (texture.png, relative to the .blend where saved), a new material (Principled BSDF whose Base Color is
the image sampled through a UV Map node set to the UV map the views were captured with), and either replaces
the active slot's material (the old material gets ``use_fake_user`` so it stays in the file) or appends a new
slot and assigns every face to it. The view grid is loaded as a second image for the panel's preview. If
anything fails half way, whatever was created is removed again: the scene is as before.

Layer rule: a bpy layer (ops/); no network, main thread only.
"""

from __future__ import annotations

from pathlib import Path

import bpy


class ApplyError(RuntimeError):
    pass


def _load_image(path: Path, name: str) -> bpy.types.Image:
    image = bpy.data.images.load(str(path), check_existing=False)
    image.name = name
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


def apply_texture(obj: bpy.types.Object, uv_map: str, out_dir: Path, slot_mode: str = "REPLACE") -> dict:
    """Texture ``obj`` from the results in ``out_dir``. Returns {material, image, grid_image, old_material}."""
    out_dir = Path(out_dir)
    tex_path = out_dir / "texture.png"
    if not tex_path.is_file():
        raise ApplyError(f"the server's result has no texture.png (in {out_dir})")
    if uv_map not in obj.data.uv_layers:
        raise ApplyError(f"{obj.name!r} no longer has the UV map {uv_map!r}")
    made: list[tuple[str, object]] = []
    try:
        image = _load_image(tex_path, f"Concord {obj.name}")
        made.append(("images", image))
        grid = None
        grid_path = out_dir / "grid.png"
        if grid_path.is_file():
            grid = _load_image(grid_path, f"Concord {obj.name} views")
            made.append(("images", grid))
        mat = build_material(f"Concord {obj.name}", image, uv_map)
        made.append(("materials", mat))
    except Exception:
        for kind, block in made:
            getattr(bpy.data, kind).remove(block)
        raise

    old = None
    if slot_mode == "APPEND" or len(obj.material_slots) == 0:
        obj.data.materials.append(mat)
        index = len(obj.material_slots) - 1
        if index > 0:
            n = len(obj.data.polygons)
            obj.data.polygons.foreach_set("material_index", [index] * n)
            obj.data.update()
        obj.active_material_index = index
    else:
        slot = obj.material_slots[obj.active_material_index]
        old = slot.material
        if old is not None:
            old.use_fake_user = True  # kept in the file, not deleted
        slot.material = mat
    return {"material": mat, "image": image, "grid_image": grid, "old_material": old}
