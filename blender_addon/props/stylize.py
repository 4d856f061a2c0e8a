"""Properties of "Stylize Animation": what the user sets (``Scene.concord_stylize``, saved with the scene) and the
running stylize job's state (``WindowManager.concord_stylize_job``: a ``ConcordJobState``, never saved, never undone).

"Model Defaults" (on for a new scene) works as the texture panel's: steps, guidance and the frame size are the
server model's recommended settings (:func:`fill_model_defaults`, called on the main thread with the health answer
the operator's worker thread fetched); the requests then leave steps and guidance out, so the server fills them.

Layer rule: a bpy layer; no network, no threads.
"""

from __future__ import annotations

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty, StringProperty

KEYFRAMES = [
    ("first+previous", "First + Previous", "Every frame attends to the first frame and to the frame before it (Pix2Video)"),
    ("first", "First", "Every frame attends to the first frame (Text2Video-Zero)"),
    ("none", "None", "No cross-frame attention"),
]
NOISE = [
    ("warped", "Warped", "Each frame's noise is the previous frame's carried along the motion vectors"),
    ("iid", "Independent", "Fresh noise for every frame (flickers most)"),
    ("shared", "Shared", "The same noise for every frame"),
    ("mixed", "Mixed", "Shared noise mixed with fresh noise per frame"),
    ("progressive", "Progressive", "Each frame's noise is the previous frame's mixed with fresh noise"),
]
RANGES = [
    ("SCENE", "Scene Range", "The scene's frame range (Output Properties > Frame Range)"),
    ("CUSTOM", "Custom", "A frame range of your own"),
]
SOURCES = [
    ("RENDER", "Render with My Engine", "Render each frame as F12 does (your engine and settings); depth and motion "
     "come from Cycles passes"),
    ("SEQUENCE", "Existing Image Sequence", "Frames you rendered already, from a folder (numbered as Blender numbers "
     "them); depth and motion come from Cycles passes of the scene"),
]


class ConcordStylizeSettings(bpy.types.PropertyGroup):
    """What to make of the animation (saved with the scene)."""

    prompt: StringProperty(name="Prompt", default="", description="What the stylized animation should look like")
    negative_prompt: StringProperty(name="Negative", default="", description="What it should not look like")
    seed: IntProperty(name="Seed", default=0, min=0, max=2**31 - 1)
    strength: FloatProperty(
        name="Strength", default=0.7, min=0.01, max=1.0, subtype="FACTOR",
        description="How far each frame is redrawn: low keeps the render's colours, 1 keeps only its shapes (depth)",
    )
    model_defaults: BoolProperty(
        name="Model Defaults", default=True,
        description="Use the server model's recommended steps, guidance and frame size (filled in when a run starts)",
    )
    model_defaults_from: StringProperty(name="Defaults From", default="")
    steps: IntProperty(name="Steps", default=30, min=1, max=200)
    guidance: FloatProperty(name="Guidance", default=7.5, min=0.0, max=50.0)
    frame_size: IntProperty(
        name="Frame Size", default=512, min=64, max=1024, step=64,
        description="Pixels of the frames' longest side (the scene's aspect ratio is kept; multiples of 8)",
    )
    keyframes: EnumProperty(name="Keyframes", items=KEYFRAMES, default="first+previous")
    noise: EnumProperty(name="Noise", items=NOISE, default="warped")
    range_mode: EnumProperty(name="Frames", items=RANGES, default="SCENE")
    frame_start: IntProperty(name="Start", default=1, min=0)
    frame_end: IntProperty(name="End", default=250, min=0)
    source: EnumProperty(name="Source", items=SOURCES, default="RENDER")
    sequence_dir: StringProperty(
        name="Images", default="", subtype="DIR_PATH",
        description="Folder of the rendered frames (PNG, JPEG, TIFF or EXR; the number in a file's name is its frame)",
    )
    output_dir: StringProperty(
        name="Output", default="", subtype="DIR_PATH",
        description="Folder for the stylized frames (empty: a new folder in //concord/ beside the .blend; an "
        "interrupted run continues in its folder)",
    )
    load_in_sequencer: BoolProperty(
        name="Load into Video Sequencer", default=True,
        description="Add the stylized frames to this scene's Video Sequencer as an image strip",
    )
    chunk_size: IntProperty(
        name="Chunk Size", default=8, min=1, max=64,
        description="Frames per request: the server holds this many in memory; a cancelled run resumes per chunk",
    )


def frame_range(scene, settings) -> tuple[int, int]:
    """The frames to stylize: the scene's range, or the custom one."""
    if settings.range_mode == "CUSTOM":
        return int(settings.frame_start), int(settings.frame_end)
    return int(scene.frame_start), int(scene.frame_end)


def fill_model_defaults(settings, health: dict) -> bool:
    """Copy the model's recommended steps, guidance and view size (as the frame size) from a ``/v1/health`` answer
    into ``settings``. Main thread only. Returns False, changing nothing, when the answer has none."""
    rec = health.get("recommended") if isinstance(health, dict) else None
    if not isinstance(rec, dict):
        return False
    try:
        size, steps, guidance = int(rec["view_size"]), int(rec["steps"]), float(rec["guidance"])
    except (KeyError, TypeError, ValueError):
        return False
    settings.frame_size = max(64, min(1024, size))
    settings.steps = max(1, min(200, steps))
    settings.guidance = max(0.0, min(50.0, guidance))
    settings.model_defaults_from = str(health.get("model") or "")
    return True


classes = (ConcordStylizeSettings,)
_register, _unregister = bpy.utils.register_classes_factory(classes)


def register():
    from . import ConcordJobState

    _register()
    bpy.types.Scene.concord_stylize = PointerProperty(type=ConcordStylizeSettings)
    bpy.types.WindowManager.concord_stylize_job = PointerProperty(type=ConcordJobState)


def unregister():
    del bpy.types.WindowManager.concord_stylize_job
    del bpy.types.Scene.concord_stylize
    _unregister()
