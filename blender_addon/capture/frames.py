"""Capture for "Stylize Animation": one frame of the scene at a time, as the FrameSet arrays of that frame.

Per frame (``FrameCapture.capture``):

* **image** (H, W, 3) uint8 sRGB, row 0 at the top, either
  - ``RENDER`` ("Render with my engine"): the scene rendered as F12 renders it, with the user's own engine,
    samples, world, view transform, look and compositor, at that frame, written to a temporary PNG and read
    back. For that one render the scene's output is switched to the frame size, 100 %, square pixels, full frame
    (no border), the 3D scene rather than the Video Sequencer, one view (no stereo), an 8-bit RGB PNG in a
    temporary folder; **every one of those settings, and the current frame, is restored before the call
    returns**, whether the render worked or not (`_temporarily`, `_image_format_restored`). Between two frames
    the scene is exactly the user's.
  - ``SEQUENCE`` ("Existing image sequence"): the frame's file of the user's folder
    (``core.stylize.sequence_for_range``), read with OpenImageIO and resized to the frame size; it must have the
    scene's aspect ratio (the depth and motion are rendered from the scene camera). PNG/JPEG/TIFF are display
    images already; an EXR's Combined (or R, G, B) is scene-linear and is encoded with the sRGB transfer
    function (``core.stylize.linear_to_srgb_u8``).
* **depth** (H, W) planar camera z, 0 on the background, and **motion** (H, W, 2) to the previous frame in pixels
  (the contract's convention), from Cycles' Depth and Vector passes (``passes`` helpers) rendered in a scratch
  *linked copy* of the scene (``Scene.copy``: the same objects, collections, view layers and camera; its own
  render settings): Cycles on the CPU, 1 sample, an emission override material, motion blur off (Blender writes
  no Vector pass with it on), only the user's view layer. The copy is made and removed within the call. Blender's
  Vector pass (previous - current with y up) becomes the contract's motion through
  ``core.stylize.motion_from_blender_vector``; OpenImageIO reads the EXR row 0 = top.

The frame: Blender 5.0.1 renders the objects where the frame of the *context's* scene puts them, even when it is
asked to render another scene (measured: a scratch scene rendered at its own frame showed the objects at the context
scene's frame). So for each frame both the scene and the context's scene are set to it, and afterwards set back with
``Scene.frame_set`` (which evaluates the animation there again: as after F12's Render Animation, an animated
property changed by hand without a key shows its keyed value again).

The frame size (W, H) keeps the scene's displayed aspect ratio (``core.stylize.frame_size``), and both renders use
it with square pixels, so the beauty and the passes see the same framing. "Render Result" is removed again at
close if it did not exist before. Nothing here keeps more than one frame.

Version differences: ``image_settings.media_type`` exists from Blender 5.0 and is set before ``file_format``.

Layer rule: bpy lives here; no network, no threads (main thread only), no torch.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

import bpy
import numpy as np

from ..core import stylize as core
from . import CaptureError, passes

__all__ = ["FrameCapture", "render_beauty", "render_depth_motion", "read_image_rgb", "scene_frame_size"]

SOURCES = ("RENDER", "SEQUENCE")
PASS_SCENE = "Concord Stylize Passes"


def scene_frame_size(scene, longest: int) -> tuple[int, int]:
    """The frame size for ``scene``'s resolution and pixel aspect (``core.stylize.frame_size``)."""
    r = scene.render
    return core.frame_size(r.resolution_x, r.resolution_y, r.pixel_aspect_x, r.pixel_aspect_y, longest)


@contextlib.contextmanager
def _temporarily(struct, **values):
    """Set attributes of a bpy struct for the duration of the block; put every one back afterwards (reverse order),
    also when the block raises."""
    saved = [(k, getattr(struct, k)) for k in values]
    try:
        for k, v in values.items():
            setattr(struct, k, v)
        yield struct
    finally:
        for k, v in reversed(saved):
            setattr(struct, k, v)


def _writable_values(struct) -> dict:
    """Every writable plain (non-pointer, non-collection) RNA property of ``struct``, by name."""
    out = {}
    for prop in struct.bl_rna.properties:
        if prop.is_readonly or prop.type in {"POINTER", "COLLECTION"} or prop.identifier == "rna_type":
            continue
        value = getattr(struct, prop.identifier)
        if getattr(prop, "is_array", False):
            value = tuple(value)
        elif prop.type == "ENUM" and prop.is_enum_flag:
            value = set(value)
        out[prop.identifier] = value
    return out


@contextlib.contextmanager
def _image_format_restored(settings):
    """Restore an ``ImageFormatSettings`` after the block: the format first (``media_type`` before ``file_format`` in
    5.x; setting the format resets the depth, mode and codec), then every other setting it had."""
    saved = _writable_values(settings)
    try:
        yield settings
    finally:
        first = [k for k in ("media_type", "file_format") if k in saved]
        for key in first:
            setattr(settings, key, saved[key])
        for key, value in saved.items():
            if key in first:
                continue
            try:
                setattr(settings, key, value)
            except (TypeError, ValueError, AttributeError):
                pass  # not settable for this format (it had the format's own value)


def render_beauty(scene, width: int, height: int, path: str | os.PathLike) -> np.ndarray:
    """Render ``scene``'s current frame with its own engine and settings at width x height (module docstring) and
    return the image (H, W, 3) uint8; the scene's output settings are restored before this returns."""
    path = Path(path)
    r = scene.render
    settings = r.image_settings
    frame = scene.frame_current
    with _temporarily(r, filepath=str(path), use_file_extension=True, resolution_x=int(width),
                      resolution_y=int(height), resolution_percentage=100, pixel_aspect_x=1.0, pixel_aspect_y=1.0,
                      use_border=False, use_sequencer=False, use_multiview=False), \
            _image_format_restored(settings):
        if hasattr(settings, "media_type"):  # Blender 5.0+: before file_format
            settings.media_type = "IMAGE"
        settings.file_format = "PNG"
        settings.color_mode = "RGB"
        settings.color_depth = "8"
        try:
            bpy.ops.render.render(write_still=True, scene=scene.name)
        except RuntimeError as exc:
            raise CaptureError(f"rendering frame {frame} with {r.engine} failed: {exc}") from None
    if not path.is_file():
        raise CaptureError(f"rendering frame {frame} with {scene.render.engine} wrote no image: check the render "
                           "with F12 first")
    try:
        return read_image_rgb(path, width, height)
    finally:
        path.unlink(missing_ok=True)


def render_depth_motion(scene, view_layer: str, width: int, height: int,
                        exr_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Depth (H, W) and motion (H, W, 2) of ``scene``'s current frame from Cycles' passes in a scratch linked copy
    of the scene (module docstring); the copy and its material are removed before this returns. The render
    evaluates the objects at the frame of the context's scene: the caller sets it (``FrameCapture.capture``)."""
    exr_path = Path(exr_path)
    frame = scene.frame_current
    scratch = scene.copy()
    material = None
    try:
        scratch.name = PASS_SCENE
        scratch.frame_current = frame
        passes.configure_pass_render(scratch, width, height)
        r = scratch.render
        r.use_persistent_data = False  # a new scene per frame: nothing to keep
        r.use_motion_blur = False
        r.use_multiview = False
        r.use_stamp = False
        r.filepath = str(exr_path)
        material = passes.plain_material()
        if view_layer not in scratch.view_layers:
            view_layer = scratch.view_layers[0].name
        for layer in scratch.view_layers:
            layer.use = layer.name == view_layer
            layer.use_pass_vector = True
            layer.material_override = material
        try:
            bpy.ops.render.render(write_still=True, scene=scratch.name)
        except RuntimeError as exc:
            raise CaptureError(f"rendering the depth and motion passes of frame {frame} failed: {exc}") from None
        if not exr_path.is_file():
            raise CaptureError(f"rendering the depth and motion passes of frame {frame} wrote nothing")
        channels = passes.read_multilayer_exr(exr_path)
        z = passes.find_pass(channels, "Depth", "Z")[..., 0]
        vector = passes.find_pass(channels, "Vector", "XYZW")
    finally:
        try:
            scratch.render.use_persistent_data = False
        except ReferenceError:
            pass
        bpy.data.scenes.remove(scratch, do_unlink=True)
        if material is not None:
            bpy.data.materials.remove(material, do_unlink=True)
        exr_path.unlink(missing_ok=True)
    return core.depth_from_blender(z, rows_bottom_up=False), core.motion_from_blender_vector(vector, rows_bottom_up=False)


def _rgb_from_exr(path: Path) -> np.ndarray:
    channels = passes.read_multilayer_exr(path)
    for names in (None, ("R", "G", "B")):
        try:
            if names is None:
                rgb = passes.find_pass(channels, "Combined", "RGB")
            else:
                rgb = np.stack([channels[n] for n in names], axis=-1)
            return core.linear_to_srgb_u8(rgb)
        except KeyError:
            continue
    raise CaptureError(f"{path.name} has no Combined (or R, G, B) channels: render the frames with the Combined pass")


def read_image_rgb(path: str | os.PathLike, width: int, height: int) -> np.ndarray:
    """An image file as (height, width, 3) uint8 sRGB, row 0 at the top (OpenImageIO). Grey is repeated, alpha
    dropped; a file of another size with the same aspect ratio (within 1 %) is resized; another aspect ratio is an
    error (the frames would not line up with the scene camera's depth)."""
    path = Path(path)
    oiio = passes._oiio()
    if path.suffix.lower() == ".exr":
        rgb = _rgb_from_exr(path).astype(np.float32) / 255.0
    else:
        buf = oiio.ImageBuf(str(path))
        if buf.has_error:
            raise CaptureError(f"cannot read {path}: {buf.geterror()}")
        px = np.asarray(buf.get_pixels(oiio.FLOAT), np.float32)
        if px.ndim == 2:
            px = px[..., None]
        if px.ndim != 3 or px.shape[-1] == 0:
            raise CaptureError(f"cannot read {path}: unexpected pixel layout {px.shape}")
        c = px.shape[-1]
        rgb = np.repeat(px[..., :1], 3, axis=-1) if c < 3 else px[..., :3]
    h, w = rgb.shape[:2]
    if (w, h) != (width, height):
        if abs((w / h) / (width / height) - 1.0) > 0.01:
            raise CaptureError(
                f"{path.name} is {w} x {h} px, a different shape from the scene's frames ({width} x {height}): the "
                "images must have the scene's aspect ratio (Output Properties > Resolution), or the depth and motion "
                "rendered from the scene camera would not line up with them")
        spec = oiio.ImageSpec(w, h, 3, oiio.FLOAT)
        src = oiio.ImageBuf(spec)
        src.set_pixels(oiio.ROI(0, w, 0, h, 0, 1, 0, 3), np.ascontiguousarray(rgb))
        dst = oiio.ImageBufAlgo.resize(src, roi=oiio.ROI(0, width, 0, height, 0, 1, 0, 3))
        if dst.has_error:
            raise CaptureError(f"cannot resize {path.name}: {dst.geterror()}")
        rgb = np.asarray(dst.get_pixels(oiio.FLOAT), np.float32).reshape(height, width, 3)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


class FrameCapture:
    """Capture frames of one scene one at a time (module docstring). ``source``: RENDER or SEQUENCE (then
    ``images``: frame -> file). Use as a context manager (or close())."""

    def __init__(self, scene, view_layer: str, width: int, height: int, source: str = "RENDER",
                 images: dict[int, Path] | None = None):
        if source not in SOURCES:
            raise CaptureError(f"unknown source {source!r}: one of {SOURCES}")
        check_scene(scene)
        if source == "SEQUENCE" and not images:
            raise CaptureError("choose the folder of the image sequence to stylize")
        self.scene_name = scene.name
        self.view_layer = view_layer
        self.width, self.height = int(width), int(height)
        self.source = source
        self.images = dict(images or {})
        self.seconds: list[float] = []
        self._had_render_result = "Render Result" in bpy.data.images
        self._tmp = tempfile.TemporaryDirectory(prefix="concord-stylize-")
        self._closed = False

    def capture(self, frame: int) -> dict[str, np.ndarray]:
        """{image, depth, motion} of Blender frame ``frame``."""
        if self._closed:
            raise RuntimeError("frame capture is closed")
        scene = bpy.data.scenes.get(self.scene_name)
        if scene is None:
            raise CaptureError(f"the scene {self.scene_name!r} was deleted")
        check_scene(scene)
        t0 = time.perf_counter()
        work = Path(self._tmp.name)
        # A render evaluates the objects at the frame of the context's scene (measured with Blender 5.0.1: a
        # scratch scene rendered at its own frame shows the objects where the context scene's frame has them),
        # so both are set; afterwards the user's frame is set again, which re-evaluates the animation there.
        scenes = [scene] + [s for s in (getattr(bpy.context, "scene", None),) if s is not None and s != scene]
        saved = [(s, s.frame_current, s.frame_subframe) for s in scenes]
        try:
            for s in scenes:
                s.frame_current = int(frame)
            if self.source == "RENDER":
                image = render_beauty(scene, self.width, self.height, work / f"beauty_{frame:06d}.png")
            else:
                if frame not in self.images:
                    raise CaptureError(f"no image for frame {frame}")
                image = read_image_rgb(self.images[frame], self.width, self.height)
            depth, motion = render_depth_motion(scene, self.view_layer, self.width, self.height,
                                                work / f"passes_{frame:06d}.exr")
        finally:
            for s, f, sub in reversed(saved):
                s.frame_set(f, subframe=sub)
        self.seconds.append(time.perf_counter() - t0)
        return {"image": image, "depth": depth, "motion": motion}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._had_render_result and "Render Result" in bpy.data.images:
            bpy.data.images.remove(bpy.data.images["Render Result"])
        self._tmp.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_scene(scene) -> None:
    """The scene can be captured: it has an active camera."""
    if scene.camera is None:
        raise CaptureError(
            f"the scene {scene.name!r} has no camera: add one (Add > Camera) and make it the scene's camera "
            "(Scene Properties > Camera)")
