"""Outcome checker for bpy-wheel tests: does the textured object, rendered through each captured camera, show
what the generated views show?

Usage (after a texture job finished and was applied, in Object Mode)::

    from outcome import check_outcome            # tests/blender is on sys.path (conftest.py)
    result = check_outcome(ob, result_dir)       # result_dir: the job's folder (transforms.json, views/)
    assert result.min >= 0.9, result             # result.correlations: one Pearson r per view

What it does, and why it is truthful:

* Cameras and images come from the job's own ``transforms.json`` and ``views/view_XX.png`` (read with
  ``concord.geometry.transforms_json``): the cameras the add-on captured, in Blender's world (the add-on
  sends world coordinates, so the file's frame is Blender's).
* The object is rendered with **Cycles, final-render settings** (F12: render subdivision levels, render
  visibility of modifiers), through a copy of the object that shares its mesh data, modifiers, parent
  (so the full world matrix, shear included: the check asserts the copy's evaluated matrix equals the
  object's) and face material indices. Only its materials are swapped,
  per object-level slot, for copies in which the shader that reaches the Material Output is replaced by an
  Emission of whatever feeds its Base Color / Color (Image Texture <- UV Map node, as the artist's material
  samples it). Lighting therefore plays no part: a pixel shows the texture as the material samples it on
  the final geometry. A face whose slot holds some other material shows that material's colour, so a
  material assigned to no face scores low, as it should.
* Cycles: CPU, 1 sample through each pixel centre (0.01 px filter), Standard view transform; the linear
  Combined pass is converted with the sRGB transfer function (IEC 61966-2-1) to compare with the PNG views.
* The score per view is the Pearson correlation over the object's pixels (rendered alpha > 0.5), channels
  pooled after removing each channel's mean: ``r = sum(a b) / sqrt(sum(a^2) sum(b^2))`` with a, b the
  centred rendered and generated values. A correct result scores about 1 (less where the views disagree
  with each other and the bake blends them); a texture scrambled on the surface about 0; a one-pixel
  misregistration clearly lower.

The user's scene is not modified: the check renders in a scratch scene and removes everything it made.
It refuses an object in Edit Mode (leave it first: what must be checked is what survives leaving it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["Outcome", "OutcomeError", "check_outcome", "render_emission_views", "pooled_correlation", "srgb_encode"]


class OutcomeError(RuntimeError):
    pass


@dataclass
class Outcome:
    correlations: list[float]
    pixels: list[int]  # object pixels per view
    rendered: list[np.ndarray] = field(repr=False, default_factory=list)  # (H, W, 3) sRGB [0, 1]
    masks: list[np.ndarray] = field(repr=False, default_factory=list)  # (H, W) bool
    views: list[np.ndarray] = field(repr=False, default_factory=list)  # (H, W, 3) sRGB [0, 1]

    @property
    def min(self) -> float:
        return float(min(self.correlations))

    @property
    def mean(self) -> float:
        return float(np.mean(self.correlations))

    def __str__(self) -> str:
        rs = ", ".join(f"{r:.3f}" for r in self.correlations)
        return f"Outcome(correlations=[{rs}], pixels={self.pixels})"


def srgb_encode(linear: np.ndarray) -> np.ndarray:
    """IEC 61966-2-1 sRGB transfer function, linear [0, 1] -> encoded [0, 1]."""
    x = np.clip(linear, 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1.0 / 2.4) - 0.055)


def pooled_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Pearson r between (H, W, C) images a and b over mask pixels, each channel centred, channels pooled."""
    x = np.asarray(a, np.float64)[mask]
    y = np.asarray(b, np.float64)[mask]
    if len(x) < 2:
        return float("nan")
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else float("nan")


# --------------------------------------------------------------------------------------------- materials
_COLOR_INPUTS = ("Base Color", "Color")


def _output_node(nt):
    outs = [n for n in nt.nodes if n.type == "OUTPUT_MATERIAL"]
    for n in outs:
        if n.is_active_output and n.target in {"ALL", "CYCLES"}:
            return n
    return outs[0] if outs else None


def _emission_copy(bpy, mat):
    """A copy of ``mat`` whose surface is Emission(<what fed the shader's Base Color / Color>)."""
    copy = mat.copy()
    copy.name = f"outcome check {mat.name}"
    nt = copy.node_tree
    out = _output_node(nt) if nt is not None else None
    if out is None or not out.inputs["Surface"].links:
        raise OutcomeError(f"material {mat.name!r} has no node tree reaching a Material Output's Surface")
    shader = out.inputs["Surface"].links[0].from_node
    sock = next((shader.inputs[k] for k in _COLOR_INPUTS if k in shader.inputs), None)
    if sock is None:
        raise OutcomeError(f"material {mat.name!r}: {shader.bl_idname} has no Base Color/Color input to check")
    emission = nt.nodes.new("ShaderNodeEmission")
    emission.inputs["Strength"].default_value = 1.0
    if sock.links:
        nt.links.new(sock.links[0].from_socket, emission.inputs["Color"])
    else:
        emission.inputs["Color"].default_value = tuple(sock.default_value)
    nt.links.new(emission.outputs["Emission"], out.inputs["Surface"])
    return copy


# --------------------------------------------------------------------------------------------- rendering
def _configure(scene, width: int, height: int) -> None:
    """The capture's own Cycles set-up (one ray per pixel centre, no bounces, multilayer EXR), plus a colour
    pipeline that leaves emitted sRGB colours as they are."""
    from blender_addon.capture.passes import configure_pass_render

    configure_pass_render(scene, width, height)
    scene.view_settings.view_transform = "Standard"
    scene.view_settings.look = "None"
    scene.view_settings.exposure = 0.0
    scene.view_settings.gamma = 1.0


def render_emission_views(ob, cameras, width: int, height: int, work_dir) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Render ``ob`` (base colours as emission, see the module doc) through OpenCV cameras [(K, w2c), ...] in a
    scratch scene. Returns (sRGB images (H, W, 3) in [0, 1], masks (H, W) bool)."""
    import bpy

    from blender_addon.capture.passes import find_pass, place_camera, read_multilayer_exr

    if ob.mode == "EDIT":
        raise OutcomeError(f"{ob.name!r} is in Edit Mode: leave it before checking the outcome")
    made = []  # (collection name, datablock)
    had_render_result = "Render Result" in bpy.data.images
    try:
        scene = bpy.data.scenes.new("outcome check")
        made.append(("scenes", scene))
        copy = ob.copy()  # shares mesh data; keeps modifiers, parent, matrix_parent_inverse
        made.append(("objects", copy))
        scene.collection.objects.link(copy)
        for k, slot in enumerate(ob.material_slots):
            copy.material_slots[k].link = "OBJECT"
            if slot.material is not None:
                m = _emission_copy(bpy, slot.material)
                made.append(("materials", m))
                copy.material_slots[k].material = m
        # The copy must stand where the object stands, shear included (evaluated through the same parents).
        scene.view_layers[0].update()  # builds and evaluates the scratch scene's depsgraph
        dg = scene.view_layers[0].depsgraph
        want = np.array(ob.evaluated_get(bpy.context.evaluated_depsgraph_get()).matrix_world)
        got = np.array(copy.evaluated_get(dg).matrix_world)
        if not np.allclose(got, want, atol=1e-6):
            raise OutcomeError(f"the check's copy of {ob.name!r} is not where the object is:\n{got}\n{want}")
        cam = bpy.data.objects.new("outcome camera", bpy.data.cameras.new("outcome camera"))
        made.append(("cameras", cam.data))
        made.append(("objects", cam))
        scene.collection.objects.link(cam)
        scene.camera = cam
        _configure(scene, width, height)
        images, masks = [], []
        for k, (K, w2c) in enumerate(cameras):
            place_camera(cam, np.asarray(K, np.float64), np.asarray(w2c, np.float64), width, height)
            path = Path(work_dir) / f"outcome_{k:02d}.exr"
            scene.render.filepath = str(path)
            bpy.ops.render.render(write_still=True, scene=scene.name)
            ch = read_multilayer_exr(path)
            rgba = find_pass(ch, "Combined", "RGBA")
            images.append(srgb_encode(rgba[..., :3].astype(np.float64)))
            masks.append(rgba[..., 3] > 0.5)
        scene.render.use_persistent_data = False
        return images, masks
    finally:
        order = {"scenes": 0, "objects": 1, "cameras": 2, "materials": 3}
        for kind, block in sorted(made, key=lambda kb: order[kb[0]]):
            try:
                getattr(bpy.data, kind).remove(block, do_unlink=True)
            except ReferenceError:
                pass
        if not had_render_result and "Render Result" in bpy.data.images:
            bpy.data.images.remove(bpy.data.images["Render Result"])


def check_outcome(ob, result_dir, work_dir=None) -> Outcome:
    """Render ``ob`` through every camera of the job in ``result_dir`` and correlate with its generated views.

    ``work_dir`` (optional) holds the EXRs; by default a temporary folder that is removed afterwards."""
    import tempfile

    from concord.geometry.transforms_json import read_transforms_json

    tr = read_transforms_json(Path(result_dir) / "transforms.json")
    views = tr.load_images().astype(np.float64) / 255.0
    cameras = list(zip(tr.intrinsics.astype(np.float64), [f.world_to_camera_cv for f in tr.frames]))
    if work_dir is None:
        with tempfile.TemporaryDirectory(prefix="outcome-") as tmp:
            images, masks = render_emission_views(ob, cameras, tr.width, tr.height, tmp)
    else:
        images, masks = render_emission_views(ob, cameras, tr.width, tr.height, work_dir)
    corr = [pooled_correlation(img, view, m) for img, view, m in zip(images, views, masks)]
    return Outcome(corr, [int(m.sum()) for m in masks], images, masks, list(views))
