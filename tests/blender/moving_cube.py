"""The moving-cube animation the bpy frame tests render (test_frames_exr.py: Blender's own EXR output;
test_addon_stylize.py: the add-on's Stylize Animation), set up in one place.

A 16 px cube (emission only) moves 2 px right and 1 px up per frame in front of an orthographic camera (0.1 scene
units per pixel), frames 1..4, rendered by Cycles on the CPU at one sample. Each test sets its own resolution and
output settings; the image is ``width`` pixels wide (the camera's ortho scale covers them) and ``height`` high.
"""

from __future__ import annotations

UNITS_PER_PX = 0.1  # ortho_scale = 0.1 x the image's width in pixels
CUBE = 1.6  # side in scene units: 16 px
CAMERA_Z = 10.0
EMISSION = (0.5, 0.2, 0.05)  # linear; sRGB (188, 124, 63) in Blender's Standard view
START = (-0.6, -0.3)  # the cube's centre (x, y) at frame 0, scene units
STEP = (0.2, 0.1)  # per frame: 2 px right, 1 px UP in the image
FRAMES = (1, 4)


def cycles_one_sample(scene) -> None:
    """Cycles on the CPU at one sample, without adaptive sampling or denoising (an emission-only surface renders
    exactly)."""
    scene.render.engine = "CYCLES"
    c = scene.cycles
    c.device, c.samples, c.use_adaptive_sampling, c.use_denoising = "CPU", 1, False, False


def add_moving_cube(bpy, width: int):
    """Into the current scene: Cycles at one sample, the orthographic camera (``width`` pixels across, looking down
    -Z: image x = +X, image up = +Y) and the cube, keyed on every frame from one before FRAMES to one after (exact
    positions whatever the interpolation); the scene's frame range is FRAMES. Returns the cube."""
    from blender_addon.capture.passes import plain_material

    scene = bpy.context.scene
    cycles_one_sample(scene)
    cam = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    scene.collection.objects.link(cam)
    scene.camera = cam
    cam.data.type = "ORTHO"
    cam.data.ortho_scale = width * UNITS_PER_PX
    cam.location = (0.0, 0.0, CAMERA_Z)
    bpy.ops.mesh.primitive_cube_add(size=CUBE, location=(0.0, 0.0, 0.0))
    cube = bpy.context.active_object
    mat = plain_material()  # the add-on's emission-only material, in the cube's colour
    mat.name = "Emission"
    mat.node_tree.nodes["Emission"].inputs["Color"].default_value = (*EMISSION, 1.0)
    cube.data.materials.append(mat)
    for f in range(FRAMES[0] - 1, FRAMES[1] + 2):
        cube.location = (START[0] + STEP[0] * f, START[1] + STEP[1] * f, 0.0)
        cube.keyframe_insert("location", frame=f)
    scene.frame_start, scene.frame_end = FRAMES
    return cube


def cube_rect(frame: int, width: int, height: int) -> tuple[slice, slice]:
    """The cube's pixels in Blender frame `frame` of a ``width`` x ``height`` image: (rows, cols), row 0 = top."""
    cx, cy = START[0] + STEP[0] * frame, START[1] + STEP[1] * frame
    c0 = round((cx - CUBE / 2) / UNITS_PER_PX + width / 2)
    r0 = round(height / 2 - (cy + CUBE / 2) / UNITS_PER_PX)
    side = round(CUBE / UNITS_PER_PX)
    return slice(r0, r0 + side), slice(c0, c0 + side)
