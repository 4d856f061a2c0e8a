"""The "Concord" tab in the 3D Viewport's sidebar (N panel).

Layout (top to bottom): prompt and negative prompt; seed; "Model Defaults" (on: steps, guidance, view size and
texture size are greyed out and come from the server's model, the panel says which model); steps, guidance, depth
strength; rig (Zero123++, orbit with views/elevation, scene cameras); view size and texture size; UV map of the active object (or a
one-click Smart UV Project button when it has none); material slot mode; a collapsible "Consistency"
sub-panel; then either "Texture Selected" or, while a job runs, a progress bar (stage and step) with Cancel;
finally a preview of the last job's view grid, the last report and the settings the last job used.

The drawing both Concord panels share (this one and ``ui.stylize``'s) is here: the tab (:class:`ConcordSidebar`),
the prompt column, the Model Defaults lines, the run's button or progress and Cancel, and the last report.

Layer rule: a bpy layer; draws only. No network, no data changes in draw().
"""

from __future__ import annotations

import textwrap

import bpy

# Characters per line of the "Used:" summary: a label never wraps, so a long line loses its end in a narrow sidebar
USED_LINE_CHARS = 48


def used_lines(summary: str) -> list[str]:
    """The "Used: ..." summary of the last job (``props.describe_used``) as lines of at most USED_LINE_CHARS."""
    return textwrap.wrap(f"Used: {summary}", USED_LINE_CHARS)


class ConcordSidebar:
    """Mixin of the panels in the 3D Viewport's sidebar, Concord tab."""

    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "Concord"


def progress_text(state) -> str:
    stage = state.stage or "working"
    if state.total > 0:
        return f"{stage.capitalize()} {state.step}/{state.total}"
    return stage.capitalize() + "..."


def report_icon(text: str, success: tuple[str, ...] = ("Textured",)) -> str:
    """The icon of a report: done (it starts with one of ``success``), cancelled or interrupted, or an error."""
    if text.startswith(success):
        return "CHECKMARK"
    return "CANCEL" if "cancelled" in text or "interrupted" in text else "ERROR"


def draw_progress(layout, state) -> None:
    """A progress bar (Blender 4.0+ ``layout.progress``) or a label where it does not exist."""
    text = progress_text(state)
    if hasattr(layout, "progress"):
        layout.progress(factor=state.progress, type="BAR", text=text)
    else:
        layout.label(text=f"{text} ({state.progress:.0%})", icon="SORTTIME")


def draw_prompt(layout, settings, running: bool):
    """The settings' column (greyed out while a run goes) with the prompt, the negative prompt and the seed.
    Returns the column."""
    layout.use_property_split = True
    layout.use_property_decorate = False
    col = layout.column()
    col.enabled = not running
    col.prop(settings, "prompt", text="Prompt")
    col.prop(settings, "negative_prompt", text="Negative")
    col.separator()
    col.prop(settings, "seed")
    return col


def draw_model_defaults(col, settings):
    """The Model Defaults switch, the model its values came from, and steps and guidance (greyed out while it is
    on). Returns the greyed-out sub-column, for the panel's other values from the model."""
    col.prop(settings, "model_defaults")
    if settings.model_defaults:
        col.label(
            text=f"From model {settings.model_defaults_from}" if settings.model_defaults_from
            else "Filled in from the server's model",
            icon="INFO",
        )
    sub = col.column()
    sub.enabled = not settings.model_defaults
    sub.prop(settings, "steps")
    sub.prop(settings, "guidance")
    return sub


def draw_run(layout, state, start: str, start_icon: str, cancel: str, message: bool = False) -> None:
    """The ``start`` operator's big button or, while a run goes, its progress (and, with ``message``, the state's
    message under it) and the ``cancel`` operator's button ("Cancelling..." once pressed)."""
    if state.running:
        draw_progress(layout, state)
        if message and state.message:
            layout.label(text=state.message)
        row = layout.row()
        row.enabled = not state.cancelling
        row.operator(cancel, icon="CANCEL", text="Cancelling..." if state.cancelling else "Cancel")
    else:
        row = layout.row()
        row.scale_y = 1.5
        row.operator(start, icon=start_icon)


def draw_last_report(layout, state, success: tuple[str, ...]) -> None:
    """The latest outcome (success, cancel or error), one clause per line (see :func:`report_icon`)."""
    if state.last_report:
        col = layout.column(align=True)
        for i, part in enumerate(state.last_report.split("; ")):
            col.label(text=part, icon=report_icon(state.last_report, success) if i == 0 else "BLANK1")


class CONCORD_PT_texture(ConcordSidebar, bpy.types.Panel):
    bl_idname = "CONCORD_PT_texture"
    bl_label = "Concord Texture"

    def draw(self, context):
        layout = self.layout
        s = context.scene.concord
        state = context.window_manager.concord_job
        running = state.running

        col = draw_prompt(layout, s, running)
        draw_model_defaults(col, s)
        col.prop(s, "conditioning_scale")
        col.separator()
        col.prop(s, "rig")
        if s.rig == "ORBIT":
            col.prop(s, "orbit_views")
            col.prop(s, "orbit_elevation")
        sub = col.column()
        sub.enabled = not s.model_defaults
        sub.prop(s, "view_resolution")
        sub.prop(s, "texture_size")

        ob = context.active_object
        if ob is not None and ob.type == "MESH":
            if len(ob.data.uv_layers) == 0:
                box = col.box()
                box.label(text=f"{ob.name} has no UV map", icon="ERROR")
                box.operator("concord.add_uv_map", icon="UV")
            else:
                col.prop_search(s, "uv_map", ob.data, "uv_layers", text="UV Map")
        else:
            col.label(text="Select a mesh to texture", icon="INFO")
        col.prop(s, "slot_mode")

        layout.separator()
        draw_run(layout, state, "concord.texture_mesh", "TEXTURE", "concord.cancel_job")

        image = bpy.data.images.get(state.preview_image) if state.preview_image else None
        if image is not None:
            box = layout.box()
            box.label(text=image.name, icon="IMAGE_DATA")
            box.template_icon(icon_value=layout.icon(image), scale=8.0)
        draw_last_report(layout, state, success=("Textured",))
        if state.last_settings and not running:
            col = layout.column(align=True)  # a label never wraps: the sidebar would cut the line's end off
            for line in used_lines(state.last_settings):
                col.label(text=line)


class CONCORD_PT_consistency(ConcordSidebar, bpy.types.Panel):
    bl_idname = "CONCORD_PT_consistency"
    bl_label = "Consistency"
    bl_parent_id = "CONCORD_PT_texture"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        layout = self.layout
        layout.use_property_split = True
        layout.enabled = not context.window_manager.concord_job.running
        s = context.scene.concord
        layout.prop(s, "shared_attention")
        row = layout.row()
        row.enabled = not s.model_defaults  # filled from the model, like steps and guidance
        row.active = s.shared_attention != "off" and not s.grid  # no effect there (the server warns too)
        row.prop(s, "attention_correspondence")
        layout.prop(s, "uv_sync")
        layout.prop(s, "uv_noise")
        layout.prop(s, "grid")
        layout.prop(s, "loss_guidance")


classes = (CONCORD_PT_texture, CONCORD_PT_consistency)
_register, _unregister = bpy.utils.register_classes_factory(classes)


def register():
    from . import stylize

    _register()
    stylize.register()  # the "Concord Stylize Animation" panel, below this one


def unregister():
    from . import stylize

    stylize.unregister()
    _unregister()
