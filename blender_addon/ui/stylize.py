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
from . import ConcordSidebar, draw_last_report, draw_model_defaults, draw_prompt, draw_run

DONE = ("Stylized", "All ")  # how a report of a finished run starts


class CONCORD_PT_stylize(ConcordSidebar, bpy.types.Panel):
    bl_idname = "CONCORD_PT_stylize"
    bl_label = "Concord Stylize Animation"

    def draw(self, context):
        layout = self.layout
        scene = context.scene
        s = scene.concord_stylize
        state = context.window_manager.concord_stylize_job
        running = state.running

        col = draw_prompt(layout, s, running)
        col.prop(s, "strength")
        sub = draw_model_defaults(col, s)
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
        draw_run(layout, state, "concord.stylize_animation", "RENDER_ANIMATION", "concord.cancel_stylize", message=True)
        draw_last_report(layout, state, success=DONE)


classes = (CONCORD_PT_stylize,)
register, unregister = bpy.utils.register_classes_factory(classes)
