"""`concord demo` (`make demo`): texture an object THROUGH THE BLENDER ADD-ON's own code path, end to end.

What it does, all on this machine and offline:
1. starts a real `concord serve --model MODEL` subprocess on a free loopback port (the embedded `micro` model by
   default: it paints the prompt's colours and simple patterns; `tiny` has random weights and paints noise);
2. imports Blender as a Python module (the bpy wheel), enables the Concord add-on (``blender_addon``), builds
   the object in code (Suzanne from Blender's primitives, a Subdivision Surface modifier, Smart UV Project
   through the add-on's own one-click fix operator), saves ``demo.blend`` into OUT;
3. runs the add-on's operator ``concord.texture_mesh(blocking=True)`` twice (capture with Cycles passes ->
   upload -> server job -> download into ``OUT/concord/<object>_<timestamp>/`` -> new image + material): once
   with every view on its own, once jointly (shared attention, UV sync, UV noise), and puts their views side
   by side in ``consistency.png``;
4. animates the textured object turning (12 frames), renders it with Cycles, and stylizes it through the add-on's
   own ``concord.stylize_animation`` operator twice -- frames on their own, then Concord's defaults (keyframe and
   previous-frame attention, noise warped along Blender's motion vectors) -- writing ``stylize.png`` (rows: input,
   independent, Concord), ``stylize_preview.mp4`` and ``stylize.json`` (the warping errors; docs/stylize.md);
5. renders a Cycles turntable (8 frames, 256 px, 16 samples) and tiles it into ``turntable.png`` with PIL;
6. writes into OUT: ``demo.blend``, ``texture.png``, ``grid.png`` (the generated views), ``turntable.png``,
   ``panel.png`` (the add-on's sidebar panel, drawn from its own ``draw()``: a headless Blender cannot take a
   screenshot), and prints where.

Runs in about 90 s on 2 CPU cores. Blender's user folders (XDG_CONFIG_HOME, XDG_CACHE_HOME,
BLENDER_USER_RESOURCES) are pointed at a temporary folder so the demo never touches the user's Blender set-up.

Layer rule: a command-line driver. It may import bpy and the add-on (it is Blender's user here), never the
server's internals: the server is a subprocess spoken to over HTTP, as a user's Blender would.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# What the demo asks of each embedded model. `micro` knows only its training words (colours, patterns, simple
# shapes: docs/micro-model.md) and was trained on 64 px views; `tiny` has random weights.
# micro runs at its recommended settings (the add-on's Model Defaults, what a user who sets nothing gets); tiny
# (random weights) at explicit, larger settings so the demo's pictures show something.
DEMO_SETTINGS = {
    "micro": dict(prompt="a red and yellow checker sphere"),
    "tiny": dict(prompt="a bronze statue of a monkey head, weathered green patina", view_size=256, steps=10,
                 guidance=7.5, texture_size="1024"),
}
TURNTABLE_FRAMES = 8
TURNTABLE_SIZE = 256
TURNTABLE_SAMPLES = 16
STYLIZE_FRAMES = 12  # Suzanne turning, 6 degrees a frame
STYLIZE_PROMPT = {"micro": "a blue and white checker sphere", "tiny": "a watercolour painting of a monkey head"}


def _say(msg: str) -> None:
    print(f"concord demo: {msg}", flush=True)


def _import_bpy(home: Path):
    for var in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "BLENDER_USER_RESOURCES"):
        os.environ[var] = str(home)
    try:
        import bpy  # noqa: F401
    except ImportError:
        raise SystemExit(
            "concord demo: error: needs the bpy wheel (Blender as a Python module): pip install 'concord[blender]' "
            "(bpy==5.0.1, Python 3.11)"
        ) from None
    return sys.modules["bpy"]


def build_object(bpy):
    """Suzanne, smooth, with a level-2 Subdivision Surface modifier (captured evaluated), UVs by Smart UV."""
    bpy.ops.mesh.primitive_monkey_add(size=2.0, location=(0.0, 0.0, 0.0))
    ob = bpy.context.active_object
    ob.name = "Monkey"
    bpy.ops.object.shade_smooth()
    ob.modifiers.new("Subdivision", "SUBSURF").levels = 2
    while ob.data.uv_layers:  # start without UVs, as an unprepared model would
        ob.data.uv_layers.remove(ob.data.uv_layers[0])
    result = bpy.ops.concord.add_uv_map()  # the add-on's one-click fix (Smart UV Project)
    if result != {"FINISHED"}:
        raise RuntimeError(f"Smart UV Project failed: {result}")
    return ob


def side_by_side(left: Path, right: Path, out_png: Path) -> Path:
    """The generated views of two runs side by side (the top half of each grid.png: views, not depth)."""
    from PIL import Image

    tiles = []
    for path in (left, right):
        img = Image.open(path).convert("RGB")
        tiles.append(img.crop((0, 0, img.width, img.height // 2)))
    gap = 16
    sheet = Image.new("RGB", (tiles[0].width + gap + tiles[1].width, max(t.height for t in tiles)), (255, 255, 255))
    sheet.paste(tiles[0], (0, 0))
    sheet.paste(tiles[1], (tiles[0].width + gap, 0))
    sheet.save(out_png)
    return out_png


def _look_at(bpy, cam, target):
    from mathutils import Vector

    direction = Vector(target) - cam.location
    cam.rotation_euler = direction.to_track_quat("-Z", "Y").to_euler()


def render_turntable(bpy, ob, out_png: Path, frames: int = TURNTABLE_FRAMES, size: int = TURNTABLE_SIZE,
                     samples: int = TURNTABLE_SAMPLES) -> Path:
    """Cycles renders from ``frames`` azimuths around the object, tiled 4 per row into one PNG."""
    from PIL import Image

    scene = bpy.context.scene
    r = scene.render
    r.engine = "CYCLES"
    r.use_sequencer = False  # the stylized strip is in the Video Sequencer: render the 3D scene, not the strip
    r.resolution_x = r.resolution_y = size
    r.resolution_percentage = 100
    r.film_transparent = False
    r.image_settings.file_format = "PNG"
    scene.cycles.device = "CPU"
    scene.cycles.samples = samples
    scene.cycles.use_adaptive_sampling = False
    scene.cycles.use_denoising = False
    scene.view_settings.view_transform = "Standard"
    world = scene.world or bpy.data.worlds.new("World")
    scene.world = world
    bg = world.node_tree.nodes.get("Background") if world.node_tree else None
    if bg is not None:
        bg.inputs["Color"].default_value = (0.25, 0.25, 0.27, 1.0)
        bg.inputs["Strength"].default_value = 1.0
    sun = bpy.data.objects.new("Demo Sun", bpy.data.lights.new("Demo Sun", "SUN"))
    sun.data.energy = 4.0
    sun.rotation_euler = (math.radians(50), 0.0, math.radians(30))
    scene.collection.objects.link(sun)
    cam = bpy.data.objects.new("Turntable Camera", bpy.data.cameras.new("Turntable Camera"))
    cam.data.lens = 50.0
    scene.collection.objects.link(cam)
    scene.camera = cam
    center = ob.matrix_world.translation.copy()
    radius = max(ob.dimensions) * 0.5
    dist = 1.25 * radius / math.sin(math.atan(18.0 / cam.data.lens))
    tiles = []
    with tempfile.TemporaryDirectory(prefix="concord-turntable-") as tmp:
        for i in range(frames):
            a = 2 * math.pi * i / frames
            cam.location = (center.x + dist * math.sin(a), center.y - dist * math.cos(a), center.z + 0.35 * dist)
            _look_at(bpy, cam, center)
            r.filepath = os.path.join(tmp, f"frame_{i:02d}.png")
            bpy.ops.render.render(write_still=True)
            tiles.append(Image.open(r.filepath).convert("RGB"))
    cols = min(4, frames)
    rows = math.ceil(frames / cols)
    sheet = Image.new("RGB", (cols * size, rows * size))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % cols) * size, (i // cols) * size))
    sheet.save(out_png)
    return out_png


def _warp_error_of(folder: Path) -> float | None:
    """The mean temporal warping error over the frames of a stylized run, from the server's per-request metrics
    (each request's first frame has no previous frame inside its request, so it is left out)."""
    import json

    values = []
    for f in sorted((folder / "metrics").glob("*.json")):
        values += [v for v in json.loads(f.read_text())["warping_error"]["per_frame"] if v is not None]
    return sum(values) / len(values) if values else None


def stylize_turning(bpy, ob, out_dir: Path, model: str) -> dict:
    """Animate the textured object turning (STYLIZE_FRAMES frames), render it with the scene's own engine, and
    stylize it through the add-on's own operator twice: frames on their own (no keyframe attention, iid noise)
    and Concord's defaults (keyframe + previous-frame attention, noise warped along Blender's motion vectors).
    Writes OUT/stylize/{input,independent,concord}/, stylize.png (rows: input, independent, Concord),
    stylize_preview.mp4 (input | Concord) and stylize.json (the warping errors)."""
    import json

    import numpy as np
    from PIL import Image

    from concord.frames.io import PreviewWriter

    scene = bpy.context.scene
    root = out_dir / "stylize"
    shutil.rmtree(root, ignore_errors=True)
    ob.rotation_euler = (0.0, 0.0, 0.0)
    ob.keyframe_insert("rotation_euler", frame=1)
    ob.rotation_euler = (0.0, 0.0, math.radians(6.0 * (STYLIZE_FRAMES - 1)))
    ob.keyframe_insert("rotation_euler", frame=STYLIZE_FRAMES)
    for fc in ob.animation_data.action.fcurves if hasattr(ob.animation_data.action, "fcurves") else []:
        for k in fc.keyframe_points:
            k.interpolation = "LINEAR"
    scene.frame_start, scene.frame_end = 1, STYLIZE_FRAMES
    cam = bpy.data.objects.new("Stylize Camera", bpy.data.cameras.new("Stylize Camera"))
    cam.data.lens = 50.0
    scene.collection.objects.link(cam)
    cam.location = (0.0, -5.5, 0.9)
    _look_at(bpy, cam, ob.matrix_world.translation)
    scene.camera = cam
    sun = bpy.data.objects.new("Stylize Sun", bpy.data.lights.new("Stylize Sun", "SUN"))
    sun.data.energy = 4.0
    sun.rotation_euler = (math.radians(50), 0.0, math.radians(30))
    scene.collection.objects.link(sun)
    r = scene.render
    r.engine = "CYCLES"
    r.resolution_x = r.resolution_y = 128
    r.resolution_percentage = 100
    scene.cycles.device, scene.cycles.samples = "CPU", 16
    scene.cycles.use_denoising = False
    scene.view_settings.view_transform = "Standard"

    # the input, as the user's own render shows it
    (root / "input").mkdir(parents=True)
    for f in range(1, STYLIZE_FRAMES + 1):
        scene.frame_set(f)
        r.filepath = str(root / "input" / f"frame_{f:04d}.png")
        bpy.ops.render.render(write_still=True)
    scene.frame_set(1)

    s = scene.concord_stylize
    s.prompt = STYLIZE_PROMPT.get(model, STYLIZE_PROMPT["tiny"])
    s.model_defaults = True
    s.seed = 1
    s.chunk_size = 6
    runs = {}
    for label, keyframes, noise in (("independent", "none", "iid"), ("concord", "first+previous", "warped")):
        s.keyframes, s.noise = keyframes, noise
        s.output_dir = str(root / label)
        s.load_in_sequencer = label == "concord"
        t0 = time.perf_counter()
        result = bpy.ops.concord.stylize_animation(blocking=True)
        if result != {"FINISHED"}:
            raise RuntimeError(bpy.context.window_manager.concord_stylize_job.last_report)
        runs[label] = {"seconds": round(time.perf_counter() - t0, 1), "warping_error": _warp_error_of(root / label),
                       "keyframes": keyframes, "noise": noise}
        _say(f"stylized {STYLIZE_FRAMES} frames through the add-on ({label}) in {runs[label]['seconds']} s, "
             f"warping error {runs[label]['warping_error']:.4f}")

    frames = {k: [np.asarray(Image.open(p).convert("RGB")) for p in sorted((root / k).glob("frame_*.png"))]
              for k in ("input", "independent", "concord")}
    pick = list(range(0, STYLIZE_FRAMES, 2))
    strip = np.concatenate([np.concatenate([frames[k][i] for i in pick], 1) for k in ("input", "independent", "concord")], 0)
    Image.fromarray(strip).save(out_dir / "stylize.png")
    with PreviewWriter(out_dir / "stylize_preview.mp4", fps=8) as pv:
        for a, b in zip(frames["input"], frames["concord"]):
            pv.add(a, b)
    ind, con = runs["independent"]["warping_error"], runs["concord"]["warping_error"]
    summary = {"frames": STYLIZE_FRAMES, "model": model, "prompt": s.prompt, "runs": runs,
               "ratio_concord_to_independent": None if not (ind and con) else round(con / ind, 3)}
    (out_dir / "stylize.json").write_text(json.dumps(summary, indent=2) + "\n")
    scene.camera = None
    for o in (cam, sun):
        bpy.data.objects.remove(o)
    return summary


def draw_panel_png(bpy, context, out_png: Path) -> Path:
    """Draw the add-on's sidebar panel as a PNG from its own ``draw()`` (a headless Blender has no screen).

    A recording stand-in for ``UILayout`` collects what ``CONCORD_PT_texture.draw`` and the Consistency
    sub-panel put on screen (labels, properties with their current values, buttons, the progress bar), then
    PIL draws those rows in Blender's dark theme. It shows the panel's content and order, not its pixels.
    """
    from PIL import Image, ImageDraw

    from blender_addon.ui import CONCORD_PT_consistency, CONCORD_PT_texture

    rows: list[tuple[str, str, str]] = []  # (kind, label, value)

    class Recorder:
        def __init__(self, indent=0):
            self.indent = indent
            self.enabled = True
            self.scale_y = 1.0
            self.use_property_split = False
            self.use_property_decorate = False

        def _pad(self, text):
            return "  " * self.indent + text

        def column(self, **_):
            return self

        row = column

        def box(self):
            rows.append(("sep", "", ""))
            return Recorder(self.indent + 1)

        def separator(self, **_):
            rows.append(("sep", "", ""))

        def label(self, text="", icon=None, **_):
            rows.append(("label", self._pad(text), ""))

        def prop(self, data, name, text=None, **_):
            p = data.bl_rna.properties[name]
            value = getattr(data, name)
            if p.type == "ENUM":
                value = next((i.name for i in p.enum_items if i.identifier == value), value)
            elif p.type == "FLOAT":
                value = f"{value:.2f}"
            elif p.type == "BOOLEAN":
                value = "[x]" if value else "[ ]"
            rows.append(("prop", self._pad(text if text is not None else p.name), str(value) or "..."))

        def prop_search(self, data, name, _search_data, _search_name, text=None, **_):
            self.prop(data, name, text=text)

        def operator(self, idname, text=None, icon=None, **_):
            mod, op = idname.split(".")
            label = text or getattr(getattr(bpy.ops, mod), op).get_rna_type().name
            rows.append(("button", self._pad(label), ""))
            return type("OpProps", (), {})()

        def progress(self, factor=0.0, text="", **_):
            rows.append(("progress", text, f"{factor:.0%}"))

        def template_icon(self, **_):
            rows.append(("label", self._pad("[view grid preview]"), ""))

        def icon(self, _data):
            return 0

    class Panel:
        pass

    for cls, title in ((CONCORD_PT_texture, "Concord Texture"), (CONCORD_PT_consistency, "Consistency")):
        rows.append(("title", title, ""))
        panel = Panel()
        panel.layout = Recorder()
        cls.draw(panel, context)

    width, line = 420, 22
    img = Image.new("RGB", (width, 12 + line * len(rows)), (48, 48, 48))
    d = ImageDraw.Draw(img)
    y = 6
    for kind, label, value in rows:
        if kind == "title":
            d.rectangle([0, y, width, y + line - 2], fill=(61, 61, 61))
            d.text((10, y + 5), "v " + label, fill=(230, 230, 230))
        elif kind == "prop":
            d.text((14, y + 5), label, fill=(200, 200, 200))
            d.rounded_rectangle([190, y + 1, width - 12, y + line - 3], 4, fill=(34, 34, 34))
            d.text((198, y + 5), value, fill=(230, 230, 230))
        elif kind == "button":
            d.rounded_rectangle([14, y + 1, width - 12, y + line - 3], 4, fill=(84, 84, 84))
            d.text((width // 2 - 4 * len(label.strip()), y + 5), label.strip(), fill=(240, 240, 240))
        elif kind == "progress":
            frac = float(value.rstrip("%")) / 100
            d.rounded_rectangle([14, y + 1, width - 12, y + line - 3], 4, fill=(34, 34, 34))
            d.rounded_rectangle([14, y + 1, 14 + int((width - 26) * frac), y + line - 3], 4, fill=(71, 114, 179))
            d.text((20, y + 5), label, fill=(240, 240, 240))
        elif kind == "label":
            d.text((14, y + 5), label, fill=(180, 180, 180))
        y += line
    img.save(out_png)
    return out_png


def main(out_dir: Path, model: str = "micro") -> int:
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    home = Path(tempfile.mkdtemp(prefix="concord-demo-home-"))
    try:
        bpy = _import_bpy(home)
        import addon_utils

        from concord.serve_process import ServerProcess

        bpy.ops.wm.read_factory_settings(use_empty=False)
        for ob in list(bpy.data.objects):
            bpy.data.objects.remove(ob)
        if addon_utils.enable("blender_addon", default_set=True, handle_error=None) is None:
            print("concord demo: error: the Concord add-on (blender_addon) could not be enabled", file=sys.stderr)
            return 1
        ob = build_object(bpy)
        blend = out_dir / "demo.blend"
        bpy.ops.wm.save_as_mainfile(filepath=str(blend))  # results then go beside it: OUT/concord/...

        demo = DEMO_SETTINGS.get(model, DEMO_SETTINGS["tiny"])
        settings = bpy.context.scene.concord
        settings.prompt = demo["prompt"]
        settings.negative_prompt = "" if model == "micro" else "blurry, low quality"
        settings.seed = 1
        settings.model_defaults = "steps" not in demo
        if not settings.model_defaults:
            settings.steps = demo["steps"]
            settings.guidance = demo["guidance"]
            settings.view_resolution = demo["view_size"]
            settings.texture_size = demo["texture_size"]
        settings.rig = "ZERO123PP"

        _say(f"starting `concord serve --model {model}`...")
        with ServerProcess(out_dir / "server-data", model=model) as server:
            _say(f"server up at {server.url} in {server.startup_seconds:.1f} s")
            bpy.context.preferences.addons["blender_addon"].preferences.server_url = server.url
            bpy.ops.concord.check_server(blocking=True)
            _say(bpy.context.preferences.addons["blender_addon"].preferences.status_text)
            # First every view on its own (no shared attention, no UV sync, iid noise), then jointly: the
            # side-by-side picture shows what the consistency machinery buys. The second run is what stays
            # on the object (the first one's material is kept in the file, as the add-on always does).
            grids = {}
            for label, joint in (("independent", False), ("joint", True)):
                settings.shared_attention = "all" if joint else "off"
                settings.uv_sync = settings.uv_noise = joint
                t0 = time.perf_counter()
                try:
                    result = bpy.ops.concord.texture_mesh(blocking=True)
                except RuntimeError as exc:  # the operator's error report
                    print(f"concord demo: error: {exc}", file=sys.stderr)
                    return 1
                if result != {"FINISHED"}:
                    print(f"concord demo: error: {bpy.context.window_manager.concord_job.last_report}", file=sys.stderr)
                    return 1
                grids[label] = Path(bpy.context.window_manager.concord_job.last_result) / "grid.png"
                _say(f"textured through the add-on ({label} views) in {time.perf_counter() - t0:.1f} s")
            side_by_side(grids["independent"], grids["joint"], out_dir / "consistency.png")
            styl = stylize_turning(bpy, ob, out_dir, model)
        shutil.rmtree(out_dir / "server-data", ignore_errors=True)

        state = bpy.context.window_manager.concord_job
        result_dir = Path(state.last_result)
        shutil.copyfile(result_dir / "texture.png", out_dir / "texture.png")
        shutil.copyfile(result_dir / "grid.png", out_dir / "grid.png")
        draw_panel_png(bpy, bpy.context, out_dir / "panel.png")
        t0 = time.perf_counter()
        render_turntable(bpy, ob, out_dir / "turntable.png")
        _say(f"turntable rendered in {time.perf_counter() - t0:.1f} s")
        bpy.ops.wm.save_as_mainfile(filepath=str(blend))
    finally:
        shutil.rmtree(home, ignore_errors=True)

    _say(f"done in {time.perf_counter() - t_start:.0f} s. Results in {out_dir}:")
    for name in ("demo.blend", "texture.png", "grid.png", "consistency.png", "turntable.png", "panel.png",
                 "stylize.png", "stylize_preview.mp4", "stylize.json"):
        print(f"  {out_dir / name}")
    print(f"  stylized animation: warping error {styl['ratio_concord_to_independent']}x that of frames stylized "
          f"on their own (frames in {out_dir / 'stylize'})")
    print(f"  {result_dir}  (everything the server returned: views/, coverage.png, metrics.json, transforms.json)")
    if model == "tiny":
        print("  (the `tiny` model has random weights: its texture is coloured noise; pass --model for a real one)")
    return 0
