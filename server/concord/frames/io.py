"""Frames on disk: reading the input folder of ``concord stylize INPUT`` as FrameSets (`FrameFolder`), estimating
motion where the renderer gave none (`dis_flow`), and writing the outputs (`write_png_atomic`, `PreviewWriter`).

The arrays follow the FrameSet contract (``concord.frames.frameset``); this module converts to it and restates
nothing of it.

What a folder may hold
----------------------
Frames are the folder's files (not its sub-folders; names starting with "." are skipped) in natural order of
their names: ``frame_2.png`` comes before ``frame_10.png``. One kind per folder:

* **OpenEXR multilayer** (``.exr``), as Blender writes them with the Combined, Depth and Vector passes enabled
  (Output Properties > Output > File Format "OpenEXR MultiLayer"). Blender 5.0 writes one part per pass with
  channels ``ViewLayer.Combined.R/G/B/A``, ``ViewLayer.Depth.Z``, ``ViewLayer.Vector.X/Y/Z/W`` (``ViewLayer`` is
  the view layer's name; the first layer with a Combined pass is used unless ``layer`` names one). A plain
  single-layer EXR (channels R, G, B) is read as Combined with neither Depth nor Vector.

  - Combined is linear scene-referred light. It becomes display sRGB by clipping to [0, 1] and applying the sRGB
    transfer function (IEC 61966-2-1): Blender's "Standard" view transform, **not** AgX or Filmic, and without
    the scene's look, exposure or curves. Users who want their exact look should render PNG frames. Alpha is
    dropped (Blender's Combined is premultiplied: a transparent film gives a black background).
  - Depth via ``depth_from_blender``; a folder whose EXRs have no Depth pass gives ``depth = None``.
  - Vector via ``motion_from_blender_vector`` (``motion_source = "renderer"``). Without a Vector pass the
    folder is refused (``FrameSetError`` on field ``motion``) unless ``allow_flow``: then motion comes from
    optical flow as for PNG frames.

* **PNG or JPEG** (``.png``, ``.jpg``, ``.jpeg``; 8 or 16 bit, grey, RGB or RGBA: alpha is dropped, 16 bit is
  rounded to 8). Motion always comes from optical flow. Optional depth from ``depth_dir``: one file per frame,
  matched by natural order (not by the number in the name), at the frames' size, each either

  - ``.npy``: a float (H, W) array of planar camera z, row 0 = top; or
  - ``.exr``: a ``Depth.Z`` channel (Blender's multilayer naming), else a channel named ``Z``, else the only
    channel of a single-channel file.

  Background is 0, +inf, NaN or >= 1e9 (all become 0). 16-bit PNG depth maps are refused: they hold a
  normalised depth of unknown scale and offset (often inverted disparity), which the relative depth test of
  ``correspondence`` cannot use.

Optical flow (``motion_source = "optical_flow:dis"``)
-----------------------------------------------------
OpenCV's DIS flow (Kroeger et al., "Fast Optical Flow using Dense Inverse Search", ECCV 2016), preset MEDIUM with
the finest scale set to 0 (full resolution) and patches every 2 px instead of 3, on the frames' grey values.
Measured on a textured 48 px square moving 3-6 px per frame over a textured 160x120 background (360 cases): at the
preset's own settings (half resolution) the flow on the square was off by up to 2 px; at full resolution, more than
8 px inside the square, by under 0.02 px; the denser patches raised the share of the disoccluded strip that the
consistency check rejects from 78 % to 97 % (worst case). Flow is smoothed over about one 8 px patch across motion
boundaries. For frame i the backward
flow i -> i-1 is the contract's motion (where the pixel was in frame i - 1 minus where it is now); the forward flow
i-1 -> i checks it (`consistency_mask`). Frame 0 gets zero motion and an all-False ``valid``.

Reading is lazy: the constructor reads headers only (to fail early on a malformed folder); ``read(start, stop)``
reads those frames (and frame start - 1 when flow needs it), so memory is bounded by the chunk.

Layer rule: numpy, OpenCV, Pillow, imageio and OpenImageIO (the bindings shipped inside the bpy wheel, found
without importing bpy); no torch.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .frameset import FrameSet, FrameSetError, depth_from_blender, motion_from_blender_vector

__all__ = [
    "FrameFolder",
    "PreviewWriter",
    "write_png_atomic",
    "natural_key",
    "linear_to_srgb",
    "dis_flow",
    "consistency_mask",
    "read_exr_channels",
    "IMAGE_SUFFIXES",
    "MOTION_RENDERER",
    "MOTION_DIS",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
EXR_SUFFIX = ".exr"
DEPTH_SUFFIXES = (".npy", ".exr")
MOTION_RENDERER = "renderer"
MOTION_DIS = "optical_flow:dis"
#: OpenCV's DIS refuses frames much smaller than its 8 px patches: optical flow needs at least this width and height.
MIN_FLOW_SIZE = 16

_VECTOR_HINT = (
    "enable the Vector pass (View Layer Properties > Passes > Data > Vector; Cycles, or EEVEE with motion blur "
    "off: Blender writes no Vector pass while motion blur is on) and render again, or allow optical flow"
)


# ---------------------------------------------------------------------------------------------------------------
# Small pure helpers


def natural_key(name: str) -> tuple:
    """Sort key putting "frame_2" before "frame_10": digit runs compare as numbers, the rest case-insensitively;
    the full name breaks ties ("f_01" vs "f_1")."""
    parts = re.split(r"(\d+)", name)  # alternates text, digits, text, ...: types line up between names
    return tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts)), name


def linear_to_srgb(linear: np.ndarray) -> np.ndarray:
    """Scene-linear RGB -> display sRGB in [0, 1] (Blender's "Standard" view transform): clip to [0, 1], then the
    sRGB transfer function of IEC 61966-2-1:
        v = 12.92 x                    for x <= 0.0031308
        v = 1.055 x^(1/2.4) - 0.055    otherwise."""
    x = np.clip(np.nan_to_num(np.asarray(linear, np.float64), nan=0.0), 0.0, 1.0)  # float64: 1 -> exactly 1
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1.0 / 2.4) - 0.055).astype(np.float32)


def _to_u8(unit: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Optical flow


def consistency_mask(backward: np.ndarray, forward: np.ndarray) -> np.ndarray:
    """Which pixels of frame i have a trustworthy backward flow (H, W, 2) (i -> i-1), given the forward flow
    (H, W, 2) (i-1 -> i). Both in pixels, x right, y down. True where all three hold:

    * inside: x' = x + b(x) lies in frame i - 1;
    * forward-backward consistency (Sundaram, Brox, Keutzer, "Dense Point Trajectories by GPU-accelerated Large
      Displacement Optical Flow", ECCV 2010, section on occlusions), with f~ = f(x') read bilinearly:
          |b(x) + f~|^2 <= 0.01 (|b(x)|^2 + |f~|^2) + 0.5
      a pixel disoccluded in frame i has no partner in frame i - 1, so the two flows disagree there;
    * no motion boundary (the same paper's second criterion, as used by Ruder, Dosovitskiy, Brox, "Artistic
      Style Transfer for Videos", GCPR 2016), with central differences:
          |grad b_x|^2 + |grad b_y|^2 <= 0.01 |b(x)|^2 + 0.002
      DIS smooths flow across an object's edge by ~2 px, so a thin disoccluded strip can pass the first test
      with both flows equally wrong; the boundary test catches most of those pixels.
    """
    import cv2

    b = np.asarray(backward, np.float32)
    f = np.asarray(forward, np.float32)
    h, w = b.shape[:2]
    cols, rows = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    xs, ys = cols + b[..., 0], rows + b[..., 1]  # pixel-index coordinates (centres at integers)
    inside = (xs >= -0.5) & (xs < w - 0.5) & (ys >= -0.5) & (ys < h - 0.5)
    f_at = cv2.remap(f, xs, ys, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    lhs = ((b + f_at) ** 2).sum(-1)
    rhs = 0.01 * ((b**2).sum(-1) + (f_at**2).sum(-1)) + 0.5
    gy_x, gx_x = np.gradient(b[..., 0])
    gy_y, gx_y = np.gradient(b[..., 1])
    boundary = gx_x**2 + gy_x**2 + gx_y**2 + gy_y**2 > 0.01 * (b**2).sum(-1) + 0.002
    return inside & (lhs <= rhs) & ~boundary


def dis_flow(previous: np.ndarray, current: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DIS optical flow between two sRGB frames (H, W, 3) uint8 (module docstring): (motion, valid) for the
    current frame, motion (H, W, 2) float32 in the contract's convention, valid (H, W) bool (`consistency_mask`)."""
    import cv2

    g_prev = cv2.cvtColor(np.ascontiguousarray(previous), cv2.COLOR_RGB2GRAY)
    g_cur = cv2.cvtColor(np.ascontiguousarray(current), cv2.COLOR_RGB2GRAY)
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    dis.setFinestScale(0)
    dis.setPatchStride(2)
    backward = dis.calc(g_cur, g_prev, None)  # current(x) ~ previous(x + backward(x))
    forward = dis.calc(g_prev, g_cur, None)
    return backward.astype(np.float32), consistency_mask(backward, forward)


# ---------------------------------------------------------------------------------------------------------------
# OpenEXR through OpenImageIO

_OIIO = None


def _oiio():
    """The OpenImageIO module: importable as is (inside Blender, or a standalone install), else the copy inside the
    bpy wheel (``<site-packages>/bpy/<version>/python/lib/python3.X/site-packages``, found without importing bpy,
    the same folder as ``bpy.utils.resource_path('LOCAL')`` + ``/python/lib/python3.X/site-packages``)."""
    global _OIIO
    if _OIIO is not None:
        return _OIIO
    try:
        import OpenImageIO as oiio  # noqa: N813
    except ImportError:
        spec = importlib.util.find_spec("bpy")
        roots = list(spec.submodule_search_locations or []) if spec else []
        pattern = ("*", "python", "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}", "site-packages")
        found = [p for r in roots for p in sorted(glob.glob(os.path.join(r, *pattern)))
                 if os.path.isdir(os.path.join(p, "OpenImageIO"))]
        if not found:
            raise FrameSetError(
                "reading EXR frames needs OpenImageIO, which is not installed", "image",
                "install the Blender wheel, which ships it (pip install 'concord[blender]'), or render PNG frames",
            ) from None
        if found[-1] not in sys.path:
            sys.path.append(found[-1])
        import OpenImageIO as oiio  # noqa: N813
    _OIIO = oiio
    return oiio


@dataclass
class _ExrHeader:
    """Where each channel of one EXR lives: name -> (subimage, channel index); the size of its parts."""

    width: int
    height: int
    channels: dict[str, tuple[int, int]] = field(default_factory=dict)

    def passes(self) -> dict[str, dict[str, dict[str, str]]]:
        """layer -> pass -> channel letter -> full channel name. Names are ``layer.pass.channel`` (the layer may
        hold dots, so split from the right); a plain R/G/B(/A) file is layer "" pass Combined, a plain Z is Depth."""
        out: dict[str, dict[str, dict[str, str]]] = {}
        for name in self.channels:
            parts = name.rsplit(".", 2)
            if len(parts) == 3:
                layer, pas, ch = parts
            elif len(parts) == 2:
                layer, (pas, ch) = "", parts
            elif name in ("R", "G", "B", "A"):
                layer, pas, ch = "", "Combined", name
            elif name == "Z":
                layer, pas, ch = "", "Depth", "Z"
            else:
                continue
            out.setdefault(layer, {}).setdefault(pas, {})[ch] = name
        return out


def _exr_header(path: Path, what: str = "image") -> _ExrHeader:
    oiio = _oiio()
    inp = oiio.ImageInput.open(str(path))
    if inp is None:
        raise FrameSetError(f"cannot read {path.name}: {oiio.geterror() or 'not an OpenEXR file'}", what,
                            "re-render or remove the file")
    try:
        header = None
        sub = 0
        while inp.seek_subimage(sub, 0):
            spec = inp.spec()
            if header is None:
                header = _ExrHeader(spec.width, spec.height)
            elif (spec.width, spec.height) != (header.width, header.height):
                raise FrameSetError(f"{path.name} holds parts of different sizes", what,
                                    "render without a border/crop region")
            for c, name in enumerate(spec.channelnames):
                header.channels.setdefault(name, (sub, c))
            sub += 1
    finally:
        inp.close()
    if header is None:
        raise FrameSetError(f"{path.name} holds no image", what, "re-render or remove the file")
    return header


def read_exr_channels(path: str | os.PathLike, names: list[str], what: str = "image") -> dict[str, np.ndarray]:
    """The named channels of a (multi-part) EXR as float32 (H, W) arrays, row 0 = top (OpenImageIO's order).
    Reads only the parts that hold them. FrameSetError (field `what`) if the file cannot be read or lacks one."""
    path = Path(path)
    oiio = _oiio()
    inp = oiio.ImageInput.open(str(path))
    if inp is None:
        raise FrameSetError(f"cannot read {path.name}: {oiio.geterror() or 'not an OpenEXR file'}", what,
                            "re-render or remove the file")
    out: dict[str, np.ndarray] = {}
    try:
        sub = 0
        while inp.seek_subimage(sub, 0):
            spec = inp.spec()
            wanted = [(c, n) for c, n in enumerate(spec.channelnames) if n in names and n not in out]
            if wanted:
                pixels = inp.read_image(sub, 0, 0, spec.nchannels, "float")
                if pixels is None:
                    raise FrameSetError(f"cannot read {path.name}: {inp.geterror()}", what, "re-render the file")
                pixels = np.asarray(pixels, np.float32).reshape(spec.height, spec.width, spec.nchannels)
                for c, n in wanted:
                    out[n] = pixels[..., c].copy()
            sub += 1
    finally:
        inp.close()
    missing = [n for n in names if n not in out]
    if missing:
        raise FrameSetError(f"{path.name} has no channel(s) {missing}", what, "re-render the file")
    if len({a.shape for a in out.values()}) > 1:
        raise FrameSetError(f"{path.name} holds parts of different sizes", what, "render without a border/crop region")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Raster images (PNG / JPEG) and depth files


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size  # (width, height)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise FrameSetError(f"cannot read {path.name}: {e}", "image", "re-render or remove the file") from None


def _read_image_u8(path: Path) -> np.ndarray:
    """A PNG/JPEG as (H, W, 3) uint8 RGB: grey is repeated, alpha dropped, 16 bit rounded to 8."""
    import cv2

    try:
        data = np.fromfile(path, np.uint8)
    except OSError as e:
        raise FrameSetError(f"cannot read {path.name}: {e}", "image", "check the file's permissions") from None
    a = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if a is None:
        raise FrameSetError(f"cannot decode {path.name}", "image", "re-render or remove the file")
    if a.dtype == np.uint16:
        a = np.rint(a.astype(np.float32) / 257.0).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise FrameSetError(f"{path.name} has {a.dtype} pixels", "image", "save 8- or 16-bit PNG or JPEG frames")
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=-1)
    if a.shape[-1] == 4:
        return cv2.cvtColor(a, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(a, cv2.COLOR_BGR2RGB)


def _depth_channel(header: _ExrHeader) -> str | None:
    for layer in header.passes().values():
        if "Z" in layer.get("Depth", {}):
            return layer["Depth"]["Z"]
    if "Z" in header.channels:
        return "Z"
    return next(iter(header.channels)) if len(header.channels) == 1 else None


def _depth_file_size(path: Path) -> tuple[int, int]:
    if path.suffix.lower() == ".npy":
        try:
            a = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise FrameSetError(f"cannot read {path.name}: {e}", "depth", "save depth with numpy.save") from None
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.floating):
            raise FrameSetError(f"{path.name} is {a.dtype} {a.shape}, not a float (H, W) array", "depth",
                                "save planar camera z as float32 (H, W)")
        return a.shape[1], a.shape[0]
    header = _exr_header(path, "depth")
    if _depth_channel(header) is None:
        raise FrameSetError(f"{path.name} has no depth channel (channels {sorted(header.channels)})", "depth",
                            "write Blender's Depth pass, a channel named Z, or a single-channel EXR")
    return header.width, header.height


def _read_depth_file(path: Path) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        z = np.load(path, allow_pickle=False)
    else:
        name = _depth_channel(_exr_header(path, "depth"))
        z = read_exr_channels(path, [name], "depth")[name]
    z = np.asarray(z, np.float32)
    if (z < 0).any():
        raise FrameSetError(f"{path.name} has negative values", "depth",
                            "planar camera z is > 0 on objects and 0 (or >= 1e9, inf) on the background")
    return depth_from_blender(z, rows_bottom_up=False)


def _list_frames(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    files = [p for p in folder.iterdir() if not p.name.startswith(".") and p.suffix.lower() in suffixes and p.is_file()]
    return sorted(files, key=lambda p: natural_key(p.name))


# ---------------------------------------------------------------------------------------------------------------
# The folder reader


class FrameFolder:
    """A lazy reader of a folder of frames (module docstring).

    ``FrameFolder(path, depth_dir=None, allow_flow=True, max_frames=None, layer=None)``; ``len()``, ``height``,
    ``width``, ``paths``, ``kind`` ("exr" or "image"), ``motion_source`` ("renderer" or "optical_flow:dis"),
    ``has_depth``, ``layer`` (the EXR view layer read, or None); ``read(start, stop) -> (FrameSet, valid)``.

    The constructor reads every file's header and raises FrameSetError (with the field and what to do) for an
    empty or mixed folder, unreadable files, mixed sizes, missing passes and more frames than ``max_frames``.
    Images come as uint8 sRGB whatever the source.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        depth_dir: str | os.PathLike | None = None,
        allow_flow: bool = True,
        max_frames: int | None = None,
        layer: str | None = None,
    ):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FrameSetError(f"{self.path} is not a folder", "image",
                                "give the folder that holds the rendered frames (PNG, JPEG or OpenEXR)")
        exrs = _list_frames(self.path, (EXR_SUFFIX,))
        images = _list_frames(self.path, IMAGE_SUFFIXES)
        if exrs and images:
            raise FrameSetError(f"{self.path} holds both OpenEXR ({len(exrs)}) and PNG/JPEG ({len(images)}) frames",
                                "image", "keep one kind of frame per folder")
        if not exrs and not images:
            raise FrameSetError(f"{self.path} holds no frames", "image",
                                "render the animation to .png, .jpg or .exr files in this folder")
        self.paths: list[Path] = exrs or images
        if max_frames is not None and len(self.paths) > max_frames:
            raise FrameSetError(f"{len(self.paths)} frames, more than the limit of {max_frames}", "image",
                                f"stylize at most {max_frames} frames at a time: split the folder")
        self.kind = "exr" if exrs else "image"
        self.layer: str | None = None
        self._exr: list[dict] = []
        self._depth_paths: list[Path] | None = None

        if self.kind == "exr":
            if depth_dir is not None:
                raise FrameSetError("a depth folder was given with OpenEXR frames", "depth",
                                    "EXR frames carry their own Depth pass: leave the depth folder out")
            sizes = self._scan_exr(layer)
            has_vector = {e["vector"] is not None for e in self._exr}
            has_depth = {e["depth"] is not None for e in self._exr}
            if len(has_vector) > 1:
                bad = next(p.name for p, e in zip(self.paths, self._exr) if e["vector"] is None)
                raise FrameSetError(f"some frames have a Vector pass and others not (e.g. {bad})", "motion",
                                    "render every frame with the same passes")
            if len(has_depth) > 1:
                bad = next(p.name for p, e in zip(self.paths, self._exr) if e["depth"] is None)
                raise FrameSetError(f"some frames have a Depth pass and others not (e.g. {bad})", "depth",
                                    "render every frame with the same passes")
            self.has_depth = has_depth == {True}
            if has_vector == {True}:
                self.motion_source = MOTION_RENDERER
            elif allow_flow:
                self.motion_source = MOTION_DIS
            else:
                raise FrameSetError(f"{self.paths[0].name} has no Vector pass (motion vectors)", "motion", _VECTOR_HINT)
        else:
            sizes = [_image_size(p) for p in self.paths]
            self.motion_source = MOTION_DIS
            if not allow_flow:
                raise FrameSetError("PNG/JPEG frames carry no motion vectors", "motion",
                                    "allow optical flow, or render OpenEXR MultiLayer frames with the Vector pass")
            self.has_depth = depth_dir is not None
        self.width, self.height = sizes[0]
        for p, s in zip(self.paths, sizes):
            if s != sizes[0]:
                first = f"{self.paths[0].name} is {sizes[0][0]}x{sizes[0][1]}"
                raise FrameSetError(f"{p.name} is {s[0]}x{s[1]} but {first}", "image",
                                    "render every frame at the same resolution")
        if self.motion_source == MOTION_DIS and min(self.width, self.height) < MIN_FLOW_SIZE and len(self) > 1:
            raise FrameSetError(f"frames of {self.width}x{self.height} are too small for optical flow", "image",
                                f"render at least {MIN_FLOW_SIZE}x{MIN_FLOW_SIZE} pixels")
        if depth_dir is not None:
            self._scan_depth(Path(depth_dir))

    def _scan_exr(self, layer: str | None) -> list[tuple[int, int]]:
        sizes = []
        for p in self.paths:
            header = _exr_header(p)
            passes = header.passes()
            with_combined = [n for n, ps in passes.items() if set("RGB") <= set(ps.get("Combined", {}))]
            if layer is not None and layer not in passes:
                raise FrameSetError(f"{p.name} has no view layer {layer!r} (layers: {sorted(passes)})", "image",
                                    "name one of the layers in the file")
            chosen = layer if layer is not None else (with_combined[0] if with_combined else None)
            if chosen not in with_combined:
                raise FrameSetError(f"{p.name} has no Combined pass (channels: {sorted(header.channels)})", "image",
                                    "enable View Layer Properties > Passes > Data > Combined and render again")
            if self.layer is not None and chosen != self.layer:
                raise FrameSetError(f"{p.name}'s view layer is {chosen!r}, {self.paths[0].name}'s is {self.layer!r}",
                                    "image", "render every frame from the same view layer, or name one (layer=)")
            self.layer = chosen
            ps = passes[chosen]
            vec = ps.get("Vector", {})
            self._exr.append({
                "combined": [ps["Combined"][c] for c in "RGB"],
                "depth": ps.get("Depth", {}).get("Z"),
                "vector": [vec["X"], vec["Y"]] if {"X", "Y"} <= set(vec) else None,
            })
            sizes.append((header.width, header.height))
        return sizes

    def _scan_depth(self, folder: Path) -> None:
        if not folder.is_dir():
            raise FrameSetError(f"{folder} is not a folder", "depth", "give the folder that holds the depth maps")
        files = _list_frames(folder, DEPTH_SUFFIXES)
        if not files:
            pngs = _list_frames(folder, IMAGE_SUFFIXES)
            raise FrameSetError(
                f"{folder} holds no .npy or .exr depth maps" + (" (PNG/JPEG depth is not accepted)" if pngs else ""),
                "depth", "save planar camera z per frame as float32 .npy (H, W) or OpenEXR (Blender's Depth pass)")
        if len(files) != len(self.paths):
            raise FrameSetError(f"{len(files)} depth maps for {len(self.paths)} frames", "depth",
                                "give one depth map per frame (matched in natural name order)")
        for p in files:
            w, h = _depth_file_size(p)
            if (w, h) != (self.width, self.height):
                raise FrameSetError(f"{p.name} is {w}x{h}, the frames are {self.width}x{self.height}", "depth",
                                    "depth maps must have the frames' resolution")
        self._depth_paths = files

    def __len__(self) -> int:
        return len(self.paths)

    def _read_one(self, i: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Frame i: (image uint8 (H, W, 3), depth (H, W) or None, motion (H, W, 2) from the renderer or None)."""
        if self.kind == "image":
            image = _read_image_u8(self.paths[i])
            if image.shape[:2] != (self.height, self.width):
                raise FrameSetError(f"{self.paths[i].name} changed size since the folder was opened", "image")
            depth = _read_depth_file(self._depth_paths[i]) if self._depth_paths is not None else None
            return image, depth, None
        e = self._exr[i]
        names = e["combined"] + ([e["depth"]] if e["depth"] else []) + (e["vector"] or [])
        ch = read_exr_channels(self.paths[i], names)
        image = _to_u8(linear_to_srgb(np.stack([ch[n] for n in e["combined"]], axis=-1)))
        depth = depth_from_blender(ch[e["depth"]], rows_bottom_up=False) if e["depth"] else None
        motion = None
        if self.motion_source == MOTION_RENDERER:
            motion = motion_from_blender_vector(np.stack([ch[n] for n in e["vector"]], -1), rows_bottom_up=False)
        return image, depth, motion

    def read(self, start: int, stop: int) -> tuple[FrameSet, np.ndarray | None]:
        """Frames [start, stop) as a FrameSet, and ``valid`` (stop - start, H, W) bool from the flow's consistency
        check (None for renderer motion, whose validity ``correspondence`` decides from depth). Reads only these
        frames, plus frame start - 1 when motion comes from optical flow."""
        if not 0 <= start < stop <= len(self):
            raise IndexError(f"frames [{start}, {stop}) outside [0, {len(self)})")
        flow = self.motion_source == MOTION_DIS
        previous = self._read_one(start - 1)[0] if flow and start > 0 else None
        n = stop - start
        image = np.empty((n, self.height, self.width, 3), np.uint8)
        depth = np.empty((n, self.height, self.width), np.float32) if self.has_depth else None
        motion = np.zeros((n, self.height, self.width, 2), np.float32)
        valid = np.zeros((n, self.height, self.width), bool) if flow else None
        for k, i in enumerate(range(start, stop)):
            img, d, m = self._read_one(i)
            image[k] = img
            if depth is not None:
                depth[k] = d
            if m is not None:
                motion[k] = m
            elif flow and previous is not None:
                motion[k], valid[k] = dis_flow(previous, img)
            previous = img
        arrays = {"image": image, "depth": depth, "motion": motion}
        return FrameSet.from_arrays({k: v for k, v in arrays.items() if v is not None}), valid


# ---------------------------------------------------------------------------------------------------------------
# Writing


def _check_rgb_u8(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"{what}: expected (H, W, 3) uint8, got {a.dtype} {a.shape}")
    return a


def write_png_atomic(path: str | os.PathLike, rgb_u8: np.ndarray) -> Path:
    """Write an (H, W, 3) uint8 image as PNG so that `path` either does not exist or is complete: the data goes to
    a hidden temporary file in the same folder (same file system), is flushed to disk, then renamed over `path`
    (``os.replace`` is atomic). The temporary file is removed if anything fails."""
    from PIL import Image

    path = Path(path)
    a = _check_rgb_u8(rgb_u8, str(path))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(np.ascontiguousarray(a), "RGB").save(f, format="PNG")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


class PreviewWriter:
    """A side-by-side preview video, input | stylized, written frame by frame (H.264 in MP4 through imageio-ffmpeg,
    whose wheel ships an ffmpeg binary). Use as a context manager; ``add(input_u8, stylized_u8)`` per frame.

    The video is written to a hidden ``.<name>.partial.mp4`` beside `path` and renamed to `path` on a clean close,
    so `path` never holds a truncated video; on an exception the partial file is removed. H.264 in yuv420p needs
    even sizes: an odd height gets one black row at the bottom (the width, 2 W, is always even)."""

    def __init__(self, path: str | os.PathLike, fps: float = 12, quality: float = 7):
        self.path = Path(path)
        self.fps = fps
        self.quality = quality
        self.frames = 0
        self._tmp = self.path.with_name(f".{self.path.stem}.partial{self.path.suffix or '.mp4'}")
        self._writer = None
        self._shape: tuple[int, int, int] | None = None

    def __enter__(self) -> "PreviewWriter":
        return self

    def add(self, input_u8: np.ndarray, stylized_u8: np.ndarray) -> None:
        a = _check_rgb_u8(input_u8, "input")
        b = _check_rgb_u8(stylized_u8, "stylized")
        if a.shape != b.shape:
            raise ValueError(f"input {a.shape} and stylized {b.shape} differ in size")
        if self._shape is None:
            self._shape = a.shape
        elif a.shape != self._shape:
            raise ValueError(f"frame {self.frames} is {a.shape}, the first was {self._shape}")
        frame = np.concatenate([a, b], axis=1)
        if frame.shape[0] % 2:
            frame = np.concatenate([frame, np.zeros((1,) + frame.shape[1:], np.uint8)], axis=0)
        if self._writer is None:
            import imageio.v2 as imageio

            self._writer = imageio.get_writer(
                str(self._tmp), format="FFMPEG", mode="I", fps=self.fps, codec="libx264", pixelformat="yuv420p",
                quality=self.quality, macro_block_size=1,
            )
        self._writer.append_data(np.ascontiguousarray(frame))
        self.frames += 1

    def close(self) -> None:
        """Finish the video and move it into place (nothing is written when no frame was added)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Stop and remove the partial video."""
        if self._writer is not None:
            try:
                self._writer.close()
            finally:
                self._writer = None
                self._tmp.unlink(missing_ok=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
