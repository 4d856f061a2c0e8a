"""The add-on's properties: what the user sets (``Scene.concord``) and the running job's state
(``WindowManager.concord_job``: not saved in the .blend, not part of undo, so undo never rewinds a progress bar).

"Model Defaults" (``ConcordSettings.model_defaults``, on for a new scene): view size, steps, guidance, texture
size and the correspondence strength of shared attention are the server model's recommended settings. :func:`fill_model_defaults` copies them from a health answer
into the settings; the preferences' Check Server and the texture operator (before it captures) call it on the main
thread with the answer a worker thread fetched.

All property groups are attached and detached here, in one place.

Layer rule: a bpy layer; no network, no threads.
"""

from __future__ import annotations

import bpy
from bpy.props import (
    BoolProperty,
    EnumProperty,
    FloatProperty,
    IntProperty,
    PointerProperty,
    StringProperty,
)

from ..core.packing import MAX_ATTENTION_CORRESPONDENCE

RIGS = [
    ("ZERO123PP", "Zero123++ (6 views)", "Six views: azimuths 30..330 step 60, elevations 20/-10, 30 degree lens"),
    ("ORBIT", "Orbit", "N views evenly around the object at one elevation"),
    (
        "SCENE_CAMERAS",
        "Scene Cameras",
        "Every visible perspective camera in the scene, as placed (orthographic and hidden ones are skipped)",
    ),
]
TEXTURE_SIZES = [(str(s), f"{s} px", f"{s} x {s} texels") for s in (256, 512, 1024, 2048, 4096)]
SHARED_ATTENTION = [
    ("all", "All Views", "Every view attends to every other view (most consistent, slowest)"),
    ("reference", "Reference View", "Every view attends to the reference view"),
    ("off", "Off", "Views are generated independently"),
]
SLOT_MODES = [
    ("REPLACE", "Replace Materials", "Put the new material in every slot (faces keep their slots); your materials are kept (fake user)"),
    ("APPEND", "New Slot", "Give the new material its own slot and assign every face to it; other slots keep their materials"),
]


def _uv_maps(self, context):
    ob = context.active_object if context else None
    if ob is None or ob.type != "MESH":
        return []
    return [(uv.name, uv.name, "") for uv in ob.data.uv_layers]


class ConcordSettings(bpy.types.PropertyGroup):
    """What to make: prompt, sampler settings, rig, sizes, consistency switches (saved with the scene)."""

    prompt: StringProperty(name="Prompt", default="", description="What the texture should look like")
    negative_prompt: StringProperty(name="Negative", default="", description="What it should not look like")
    seed: IntProperty(name="Seed", default=0, min=0, max=2**31 - 1)
    model_defaults: BoolProperty(
        name="Model Defaults",
        default=True,
        description="Use the server model's recommended view size, steps, guidance and texture size (filled in when "
        "the server is checked in the preferences and when a job starts)",
    )
    model_defaults_from: StringProperty(
        name="Defaults From", default="", description="The model whose recommended settings were last filled in"
    )
    steps: IntProperty(name="Steps", default=30, min=1, max=200)
    guidance: FloatProperty(name="Guidance", default=7.5, min=0.0, max=50.0)
    conditioning_scale: FloatProperty(name="Depth Strength", default=1.0, min=0.0, max=4.0)
    rig: EnumProperty(name="Rig", items=RIGS, default="ZERO123PP")
    orbit_views: IntProperty(name="Views", default=8, min=1, max=16)
    orbit_elevation: FloatProperty(name="Elevation", default=15.0, min=-89.0, max=89.0, subtype="NONE")
    view_resolution: IntProperty(
        name="View Size", default=512, min=64, max=1024, step=64, description="Pixels per side of each view"
    )
    texture_size: EnumProperty(name="Texture", items=TEXTURE_SIZES, default="1024")
    uv_map: StringProperty(name="UV Map", default="", description="UV map to texture (empty: the active render map)")
    grid: BoolProperty(name="Grid", default=False, description="Tile the views into one image while sampling")
    shared_attention: EnumProperty(name="Shared Attention", items=SHARED_ATTENTION, default="all")
    attention_correspondence: FloatProperty(
        name="Correspondence",
        default=0.0,
        min=0.0,
        max=MAX_ATTENTION_CORRESPONDENCE,
        description="Shared attention's pull towards the spots of the other views that show the same point of the "
        "object (0: plain shared attention; no effect with Grid or Shared Attention off). With Model Defaults on, "
        "the model's value is used",
    )
    uv_sync: BoolProperty(name="UV Sync", default=True, description="Average the views in UV space every step")
    uv_noise: BoolProperty(name="UV Noise", default=True, description="Start every view from noise on the surface")
    loss_guidance: BoolProperty(name="Loss Guidance", default=False, description="Gradient guidance (slow)")
    slot_mode: EnumProperty(name="Material", items=SLOT_MODES, default="REPLACE")


class ConcordJobState(bpy.types.PropertyGroup):
    """The running (or last) job, for the panel. Lives on the window manager: never saved, never undone."""

    running: BoolProperty(default=False)
    cancelling: BoolProperty(default=False)
    stage: StringProperty(default="")
    step: IntProperty(default=0)
    total: IntProperty(default=0)
    progress: FloatProperty(default=0.0, min=0.0, max=1.0, subtype="FACTOR")
    message: StringProperty(default="")
    last_result: StringProperty(default="", subtype="DIR_PATH")
    last_report: StringProperty(default="")
    preview_image: StringProperty(default="", description="Name of the image with the last view grid")
    last_settings: StringProperty(default="", description="The settings the last job used, and where each came from")


def fill_model_defaults(settings, health: dict) -> bool:
    """Copy the model's recommended settings from a ``/v1/health`` answer into ``settings`` (a ``ConcordSettings``).

    Main thread only (it writes scene properties). Returns False, changing nothing, when the answer has none."""
    rec = health.get("recommended") if isinstance(health, dict) else None
    if not isinstance(rec, dict):
        return False
    try:
        view, steps = int(rec["view_size"]), int(rec["steps"])
        guidance, tex = float(rec["guidance"]), int(rec["texture_size"])
    except (KeyError, TypeError, ValueError):
        return False
    settings.view_resolution = max(64, min(1024, view))
    settings.steps = max(1, min(200, steps))
    settings.guidance = max(0.0, min(50.0, guidance))
    sizes = [int(k) for k, _, _ in TEXTURE_SIZES]
    settings.texture_size = str(min(sizes, key=lambda s: abs(s - tex)))
    try:  # optional in the answer: a server from before the field recommends plain shared attention
        beta = float(rec.get("attention_correspondence", 0.0))
    except (TypeError, ValueError):
        beta = 0.0
    settings.attention_correspondence = max(0.0, min(MAX_ATTENTION_CORRESPONDENCE, beta))
    settings.model_defaults_from = str(health.get("model") or "")
    return True


def describe_used(metrics: dict) -> str:
    """`128 px views, 20 steps, guidance 2, texture 512: model micro's defaults` from a job's metrics.json."""
    settings = metrics.get("settings") or {}
    labels = (
        ("view_size", "{} px views"), ("steps", "{} steps"), ("guidance", "guidance {}"), ("texture_size", "texture {}"),
        ("consistency.attention_correspondence", "correspondence {}"),
    )
    parts, sources = [], set()
    for key, fmt in labels:
        s = settings.get(key)
        if isinstance(s, dict) and "value" in s:
            parts.append(fmt.format(f"{s['value']:g}"))
            sources.add(s.get("source"))
    if not parts:
        return ""
    model = metrics.get("model") or "the model"
    origin = {frozenset({"model"}): f"model {model}'s defaults", frozenset({"user"}): "set by hand"}.get(
        frozenset(sources), f"partly model {model}'s defaults"
    )
    return f"{', '.join(parts)} ({origin})"


classes = (ConcordSettings, ConcordJobState)
_register, _unregister = bpy.utils.register_classes_factory(classes)


def register():
    from . import stylize

    _register()
    bpy.types.Scene.concord = PointerProperty(type=ConcordSettings)
    bpy.types.WindowManager.concord_job = PointerProperty(type=ConcordJobState)
    stylize.register()  # Scene.concord_stylize, WindowManager.concord_stylize_job


def unregister():
    from . import stylize

    stylize.unregister()
    del bpy.types.WindowManager.concord_job
    del bpy.types.Scene.concord
    _unregister()
