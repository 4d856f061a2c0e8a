"""The "Concord Stylize Animation" panel in the 3D Viewport's sidebar (Concord tab), below the texture panel.

Layout (top to bottom): prompt and negative prompt; seed and strength; "Model Defaults" (on: steps, guidance and
the frame size are greyed out and come from the server's model); steps, guidance, frame size (with the W x H it
gives for the scene's aspect ratio); keyframes and noise; the frame range (the scene's or a custom one); the source
(render with my engine, or an existing image sequence and its folder); the output folder (empty: a new folder
beside the .blend); "Load into Video Sequencer"; chunk size; then "Stylize Animation" or, while it runs, a progress
bar (stage and frames) with Cancel; finally the last report.

Layer rule: a bpy layer; draws only. No network, no data changes in draw().
"""

from __future__ import annotations

import bpy

from ..core.stylize import StylizeError, frame_size


def report_icon(text: str) -> str:
    if text.startswith("Stylized") or text.startswith("All "):
        return "CHECKMARK"
    return "CANCEL" if "cancelled" in text or "interrupted" in text else "ERROR"


class CONCORD_PT_stylize(bpy.types.Panel):
    bl_idname = "CONCORD_PT_stylize"
    bl_label = "Concord Stylize Animation"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "Concord"

    def draw(self, context):
        from .. import ui  # the texture panel's progress bar

        layout = self.layout
        layout.use_property_split = True
        layout.use_property_decorate = False
        scene = context.scene
        s = scene.concord_stylize
        state = context.window_manager.concord_stylize_job
        running = state.running

        col = layout.column()
        col.enabled = not running
        col.prop(s, "prompt", text="Prompt")
        col.prop(s, "negative_prompt", text="Negative")
        col.separator()
        col.prop(s, "seed")
        col.prop(s, "strength")
        col.prop(s, "model_defaults")
        if s.model_defaults:
            col.label(text=f"From model {s.model_defaults_from}" if s.model_defaults_from
                      else "Filled in from the server's model", icon="INFO")
        sub = col.column()
        sub.enabled = not s.model_defaults
        sub.prop(s, "steps")
        sub.prop(s, "guidance")
        sub.prop(s, "frame_size")
        r = scene.render
        try:
            w, h = frame_size(r.resolution_x, r.resolution_y, r.pixel_aspect_x, r.pixel_aspect_y, s.frame_size)
            col.label(text=f"Frames of {w} x {h} px (the scene's aspect ratio)")
        except StylizeError as exc:
            col.label(text=str(exc), icon="ERROR")
        col.prop(s, "keyframes")
        col.prop(s, "noise")
        col.separator()
        col.prop(s, "range_mode")
        if s.range_mode == "CUSTOM":
            row = col.row(align=True)
            row.prop(s, "frame_start")
            row.prop(s, "frame_end")
        else:
            col.label(text=f"Frames {scene.frame_start} to {scene.frame_end}")
        col.prop(s, "source")
        if s.source == "SEQUENCE":
            col.prop(s, "sequence_dir")
        if scene.camera is None:
            col.label(text="The scene has no camera", icon="ERROR")
        col.prop(s, "output_dir")
        if not s.output_dir.strip():
            col.label(text="Empty: a new folder in //concord/", icon="INFO")
        col.prop(s, "load_in_sequencer")
        col.prop(s, "chunk_size")

        layout.separator()
        if running:
            ui.draw_progress(layout, state)
            if state.message:
                layout.label(text=state.message)
            row = layout.row()
            row.enabled = not state.cancelling
            row.operator("concord.cancel_stylize", icon="CANCEL", text="Cancelling..." if state.cancelling else "Cancel")
        else:
            row = layout.row()
            row.scale_y = 1.5
            row.operator("concord.stylize_animation", icon="RENDER_ANIMATION")
        if state.last_report:  # the latest outcome, one clause per line
            col = layout.column(align=True)
            for i, part in enumerate(state.last_report.split("; ")):
                col.label(text=part, icon=report_icon(state.last_report) if i == 0 else "BLANK1")


classes = (CONCORD_PT_stylize,)
register, unregister = bpy.utils.register_classes_factory(classes)
