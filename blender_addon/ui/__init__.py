"""The "Concord" tab in the 3D Viewport's sidebar (N panel).

Layout (top to bottom): prompt and negative prompt; seed; "Model Defaults" (on: steps, guidance, view size and
texture size are greyed out and come from the server's model, the panel says which model); steps, guidance, depth
strength; rig (Zero123++, orbit with views/elevation, scene cameras); view size and texture size; UV map of the active object (or a
one-click Smart UV Project button when it has none); material slot mode; a collapsible "Consistency"
sub-panel; then either "Texture Selected" or, while a job runs, a progress bar (stage and step) with Cancel;
finally a preview of the last job's view grid, the last report and the settings the last job used.

Layer rule: a bpy layer; draws only. No network, no data changes in draw().
"""

from __future__ import annotations

import bpy



def progress_text(state) -> str:
    stage = state.stage or "working"
    if state.total > 0:
        return f"{stage.capitalize()} {state.step}/{state.total}"
    return stage.capitalize() + "..."


def report_icon(text: str) -> str:
    if text.startswith("Textured"):
        return "CHECKMARK"
    return "CANCEL" if "cancelled" in text or "interrupted" in text else "ERROR"


def draw_progress(layout, state) -> None:
    """A progress bar (Blender 4.0+ ``layout.progress``) or a label where it does not exist."""
    text = progress_text(state)
    if hasattr(layout, "progress"):
        layout.progress(factor=state.progress, type="BAR", text=text)
    else:
        layout.label(text=f"{text} ({state.progress:.0%})", icon="SORTTIME")


class CONCORD_PT_texture(bpy.types.Panel):
    bl_idname = "CONCORD_PT_texture"
    bl_label = "Concord Texture"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "Concord"

    def draw(self, context):
        layout = self.layout
        layout.use_property_split = True
        layout.use_property_decorate = False
        s = context.scene.concord
        state = context.window_manager.concord_job
        running = state.running

        col = layout.column()
        col.enabled = not running
        col.prop(s, "prompt", text="Prompt")
        col.prop(s, "negative_prompt", text="Negative")
        col.separator()
        col.prop(s, "seed")
        col.prop(s, "model_defaults")
        if s.model_defaults:
            col.label(
                text=f"From model {s.model_defaults_from}" if s.model_defaults_from else "Filled in from the server's model",
                icon="INFO",
            )
        sub = col.column()
        sub.enabled = not s.model_defaults
        sub.prop(s, "steps")
        sub.prop(s, "guidance")
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
        if running:
            draw_progress(layout, state)
            row = layout.row()
            row.enabled = not state.cancelling
            row.operator("concord.cancel_job", icon="CANCEL", text="Cancelling..." if state.cancelling else "Cancel")
        else:
            row = layout.row()
            row.scale_y = 1.5
            row.operator("concord.texture_mesh", icon="TEXTURE")

        image = bpy.data.images.get(state.preview_image) if state.preview_image else None
        if image is not None:
            box = layout.box()
            box.label(text=image.name, icon="IMAGE_DATA")
            box.template_icon(icon_value=layout.icon(image), scale=8.0)
        if state.last_report:  # the latest outcome (success, cancel or error), one clause per line
            col = layout.column(align=True)
            for i, part in enumerate(state.last_report.split("; ")):
                col.label(text=part, icon=report_icon(state.last_report) if i == 0 else "BLANK1")
        if state.last_settings and not running:
            layout.label(text=f"Used: {state.last_settings}")


class CONCORD_PT_consistency(bpy.types.Panel):
    bl_idname = "CONCORD_PT_consistency"
    bl_label = "Consistency"
    bl_parent_id = "CONCORD_PT_texture"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "Concord"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        layout = self.layout
        layout.use_property_split = True
        layout.enabled = not context.window_manager.concord_job.running
        s = context.scene.concord
        layout.prop(s, "shared_attention")
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
