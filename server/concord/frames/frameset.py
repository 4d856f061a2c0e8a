"""The FrameSet array contract: N consecutive frames of an animation, as sent between the add-on, the CLI and the
server for the `stylize` job; correspondences between neighbouring frames; the temporal warping error.

This docstring is the single written statement of the layout (as ``concord.geometry.viewset`` is the ViewSet's).
Every producer (the add-on's capture, ``concord.frames.io``'s folder readers) and every consumer (the stylize
job, its noise and its metrics) cites it instead of restating it.

Layout
------
Frames are stacked on a leading axis in time order. Images are ``(N, H, W, C)`` with **row 0 = the TOP row**
and column 0 = the left column; pixel (r, c) covers [c, c + 1) x [r, r + 1), its centre is (c + 0.5, r + 0.5).

=============== ============ ============== ===========================================================
field           dtype        shape          meaning
=============== ============ ============== ===========================================================
``image``       uint8 or     (N, H, W, 3)   the rendered frame, sRGB (not linear); uint8 0..255 or
                float32                     float32 in [0, 1]
``depth``       float32      (N, H, W)      planar camera z, scene units, > 0 where something was hit,
                (optional)                  exactly 0 on the background (the ViewSet's convention)
``motion``      float32      (N, H, W, 2)   for each pixel of frame i: (dx, dy) = (where the same surface
                (optional)                  point was in frame i - 1) - (where it is now), in pixels, x right,
                                            y DOWN. Frame 0's entry is unused (zeros)
``mask``        bool or      (N, H, W)      where to stylize (True); elsewhere the output keeps the input
                uint8 0/1
                (optional)
=============== ============ ============== ===========================================================

Blender's conventions are converted at the edge, here and nowhere else (`motion_from_blender_vector`,
`depth_from_blender`): its Vector pass holds previous - current in XY and current - next in ZW, in pixels, with
y up; its Depth pass is planar z with 1e10 (or more) on the background. Blender's pixel buffers in memory
(``Image.pixels``) are stored rows bottom-up; an EXR file read with OpenImageIO comes row 0 = top already
(checked on a Blender 5.0.1 render, tests/blender/test_frames_exr.py), so readers of files pass
``rows_bottom_up=False``.

Correspondences (`correspondence`): pixel x of frame i corresponds to x' = x + motion_i(x) in frame i - 1 when
x' lies inside the frame, and, with depth, both are foreground (or both background) and their depths agree within
a relative tolerance (an occlusion test: a point that was hidden behind something nearer in frame i - 1 has a
much smaller depth at x' there). Everything else is disoccluded: no valid correspondence. A motion field from
optical flow brings its own validity (forward-backward check, ``concord.frames.io``) through ``valid``.

Temporal warping error (Lai et al., "Learning Blind Video Temporal Consistency", ECCV 2018; MATH.md section 6):
    E_i = mean over valid x of |O_i(x) - O_{i-1}(x')|      (sRGB in [0, 1], averaged over the channels)
reported per frame (i >= 1) and as the mean over frames. O_{i-1}(x') is read at the nearest pixel: bilinear
reading would blur the previous frame and understate the error of a sharp, flickering one.

Layer rule: numpy only. No bpy, no torch, no files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from concord.errors import ContractError

__all__ = [
    "FrameSet",
    "FrameSetError",
    "FIELDS",
    "BLENDER_BACKGROUND_DEPTH",
    "motion_from_blender_vector",
    "depth_from_blender",
    "correspondence",
    "sample_nearest",
    "latent_correspondence",
    "warping_error",
    "DEPTH_TOLERANCE",
]

FIELDS = ("image", "depth", "motion", "mask")
#: Blender's Depth pass is at least this on the background (it writes 1e10).
BLENDER_BACKGROUND_DEPTH = 1e9
#: Relative depth difference above which a correspondence counts as occluded.
DEPTH_TOLERANCE = 0.05


class FrameSetError(ContractError):
    """A FrameSet breaks the array contract. ``field`` names the offending array; ``hint`` says how to fix it."""


@dataclass
class FrameSet:
    """N frames (module docstring). ``image`` is kept as given (uint8 or float32); see `image_float`."""

    image: np.ndarray
    depth: np.ndarray | None = None
    motion: np.ndarray | None = None
    mask: np.ndarray | None = None

    @property
    def num_frames(self) -> int:
        return int(self.image.shape[0])

    @property
    def height(self) -> int:
        return int(self.image.shape[1])

    @property
    def width(self) -> int:
        return int(self.image.shape[2])

    def image_float(self, i: int | slice | None = None) -> np.ndarray:
        """Frames as float32 sRGB in [0, 1] (all, one index or a slice)."""
        a = self.image if i is None else self.image[i]
        return a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)

    def slice(self, start: int, stop: int) -> "FrameSet":
        """Frames [start, stop) as a FrameSet (views, not copies)."""
        pick = lambda a: None if a is None else a[start:stop]  # noqa: E731
        return FrameSet(self.image[start:stop], pick(self.depth), pick(self.motion), pick(self.mask))

    @classmethod
    def from_arrays(cls, arrays: dict, max_frames: int | None = None) -> "FrameSet":
        """Check `arrays` (keys from FIELDS; others are refused) against the contract and build a FrameSet.
        Raises FrameSetError naming the field and what to do."""
        unknown = sorted(set(arrays) - set(FIELDS))
        if unknown:
            raise FrameSetError(f"unknown array(s) {unknown}", unknown[0], f"a FrameSet has {', '.join(FIELDS)}")
        if "image" not in arrays:
            raise FrameSetError("missing", "image", "every frame needs its rendered image (N, H, W, 3)")
        image = np.asarray(arrays["image"])
        if image.ndim != 4 or image.shape[-1] != 3:
            raise FrameSetError(f"shape {image.shape} is not (N, H, W, 3)", "image")
        n, h, w = image.shape[:3]
        if n == 0:
            raise FrameSetError("no frames", "image", "send at least one frame")
        if max_frames is not None and n > max_frames:
            raise FrameSetError(f"{n} frames, more than the limit of {max_frames}", "image",
                                f"send at most {max_frames} frames per request (longer sequences go in chunks)")
        if image.dtype == np.uint8:
            pass
        elif image.dtype in (np.float32, np.float64, np.float16):
            image = image.astype(np.float32)
            if not np.isfinite(image).all():
                raise FrameSetError("holds NaN or infinite values", "image")
            if image.min() < 0.0 or image.max() > 1.0:
                raise FrameSetError("float values outside [0, 1]", "image", "send sRGB in [0, 1] or uint8")
        else:
            raise FrameSetError(f"dtype {image.dtype} is not uint8 or float32", "image")

        def checked(name: str, shape: tuple, dtype) -> np.ndarray | None:
            if name not in arrays or arrays[name] is None:
                return None
            a = np.asarray(arrays[name])
            if a.shape != shape:
                raise FrameSetError(f"shape {a.shape} does not match the images: expected {shape}", name,
                                    "every array has one entry per frame, at the images' size")
            if dtype is bool:
                if a.dtype != bool and not np.issubdtype(a.dtype, np.integer):
                    raise FrameSetError(f"dtype {a.dtype} is not bool or uint8", name)
                if a.dtype != bool and not np.isin(a, (0, 1)).all():
                    raise FrameSetError("values other than 0 and 1", name)
                return a.astype(bool)
            if not np.issubdtype(a.dtype, np.floating):
                raise FrameSetError(f"dtype {a.dtype} is not a float type", name)
            a = a.astype(np.float32)
            if not np.isfinite(a).all():
                bad = int((~np.isfinite(a)).sum())
                raise FrameSetError(f"holds {bad} NaN or infinite value(s)", name,
                                    "Blender's background depth (1e10) must become 0: see depth_from_blender"
                                    if name == "depth" else "send finite values")
            return a

        depth = checked("depth", (n, h, w), np.float32)
        if depth is not None and (depth < 0).any():
            raise FrameSetError("negative values", "depth", "planar z is > 0 on the object and 0 on the background")
        motion = checked("motion", (n, h, w, 2), np.float32)
        mask = checked("mask", (n, h, w), bool)
        return cls(image=image, depth=depth, motion=motion, mask=mask)

    def to_arrays(self) -> dict:
        """The arrays by field name (absent optional fields left out): what travels as one .npz."""
        out = {"image": self.image}
        for k in ("depth", "motion", "mask"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out


# ---------------------------------------------------------------------------------------------------------------
# Blender's conventions, converted here only


def motion_from_blender_vector(vector: np.ndarray, rows_bottom_up: bool = True) -> np.ndarray:
    """Blender's Vector pass, (H, W, 4) or (N, H, W, 4) (XY = previous - current in pixels, y up; rows
    bottom-up as in Blender's memory, or top-down with ``rows_bottom_up=False``, as OpenImageIO reads an EXR)
    -> the contract's motion (..., H, W, 2): rows top-down, (dx, dy) to the previous frame with y down. ZW
    (current - next) is not needed: the contract carries motion to the previous frame only."""
    v = np.asarray(vector, np.float32)
    if v.shape[-1] < 2:
        raise FrameSetError(f"shape {v.shape} has no XY channels", "motion")
    flipped = np.flip(v[..., :2], axis=-3) if rows_bottom_up else v[..., :2]  # rows bottom-up -> top-down
    return np.stack([flipped[..., 0], -flipped[..., 1]], axis=-1).astype(np.float32)


def depth_from_blender(z: np.ndarray, rows_bottom_up: bool = True) -> np.ndarray:
    """Blender's Depth pass (>= 1e9 on the background; rows bottom-up as in Blender's memory, or top-down with
    ``rows_bottom_up=False``, as OpenImageIO reads an EXR) -> the contract's depth (rows top-down, 0 on the
    background; NaN and infinite values count as background)."""
    d = np.asarray(z, np.float32)
    d = (np.flip(d, axis=-2) if rows_bottom_up else d).copy()
    d[~np.isfinite(d) | (d >= BLENDER_BACKGROUND_DEPTH)] = 0.0
    return d


# ---------------------------------------------------------------------------------------------------------------
# Correspondences and the warping error


def correspondence(
    motion: np.ndarray,
    depth: np.ndarray | None = None,
    depth_previous: np.ndarray | None = None,
    tolerance: float = DEPTH_TOLERANCE,
) -> tuple[np.ndarray, np.ndarray]:
    """For frame i's motion (H, W, 2): (source, valid). source (H, W, 2) float32 = the pixel centre x' in frame
    i - 1 as (x, y) pixel coordinates (centres at +0.5); valid (H, W) bool (module docstring: inside the frame
    and, with both depths, the same foreground/background and depths within `tolerance` relative)."""
    m = np.asarray(motion, np.float32)
    h, w = m.shape[:2]
    cols, rows = np.meshgrid(np.arange(w, dtype=np.float32) + 0.5, np.arange(h, dtype=np.float32) + 0.5)
    src = np.stack([cols + m[..., 0], rows + m[..., 1]], axis=-1)
    valid = (src[..., 0] >= 0) & (src[..., 0] < w) & (src[..., 1] >= 0) & (src[..., 1] < h)
    if depth is not None and depth_previous is not None:
        sc = np.clip(np.floor(src[..., 0]).astype(np.int64), 0, w - 1)
        sr = np.clip(np.floor(src[..., 1]).astype(np.int64), 0, h - 1)
        d_now = np.asarray(depth, np.float32)
        d_then = np.asarray(depth_previous, np.float32)[sr, sc]
        fg_now, fg_then = d_now > 0, d_then > 0
        close = np.abs(d_then - d_now) <= tolerance * np.maximum(d_now, 1e-12)
        valid &= (fg_now == fg_then) & (~fg_now | close)
    return src, valid


def sample_nearest(image: np.ndarray, source: np.ndarray) -> np.ndarray:
    """image (H, W, ...) read at the nearest pixel to each (x, y) of source (H', W', 2) (clamped to the frame)."""
    h, w = image.shape[:2]
    sc = np.clip(np.floor(source[..., 0]).astype(np.int64), 0, w - 1)
    sr = np.clip(np.floor(source[..., 1]).astype(np.int64), 0, h - 1)
    return image[sr, sc]


def latent_correspondence(source: np.ndarray, valid: np.ndarray, latent_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """`correspondence`'s output at the latent grid: for each latent pixel (row-major, h * w of them) the flat index
    of the latent pixel of frame i - 1 under the source of its centre, and whether that is valid (the image pixel at
    the centre is valid and its source lies inside the frame). Nearest: a latent pixel is not interpolated."""
    H, W = valid.shape
    h, w = latent_hw
    rows = np.minimum(((np.arange(h) + 0.5) * H / h).astype(np.int64), H - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * W / w).astype(np.int64), W - 1)
    sx = source[rows[:, None], cols[None, :], 0]
    sy = source[rows[:, None], cols[None, :], 1]
    lx = np.floor(sx * w / W).astype(np.int64)
    ly = np.floor(sy * h / H).astype(np.int64)
    ok = valid[rows[:, None], cols[None, :]] & (lx >= 0) & (lx < w) & (ly >= 0) & (ly < h)
    idx = np.where(ok, ly * w + lx, 0).reshape(-1)
    return idx, ok.reshape(-1)


def warping_error(
    frames: np.ndarray,
    motion: np.ndarray,
    depth: np.ndarray | None = None,
    valid: np.ndarray | None = None,
    previous: np.ndarray | None = None,
    previous_depth: np.ndarray | None = None,
) -> list[float | None]:
    """Temporal warping error per frame (module docstring). frames (N, H, W, 3) float in [0, 1] (or uint8),
    motion (N, H, W, 2), depth (N, H, W) or None, valid (N, H, W) or None (then from `correspondence`).
    `previous` (H, W, 3) / `previous_depth`: the frame before frames[0] (a chunk's predecessor), so frame 0 gets
    an error too; without it frame 0's entry is None. A frame with no valid pixel gets None."""
    f = frames.astype(np.float32) / 255.0 if frames.dtype == np.uint8 else frames.astype(np.float32)
    prev = None
    if previous is not None:
        prev = previous.astype(np.float32) / 255.0 if previous.dtype == np.uint8 else previous.astype(np.float32)
    out: list[float | None] = []
    for i in range(len(f)):
        before = f[i - 1] if i > 0 else prev
        if before is None:
            out.append(None)
            continue
        d_before = (depth[i - 1] if i > 0 else previous_depth) if depth is not None else None
        src, ok = correspondence(motion[i], None if depth is None else depth[i], d_before)
        if valid is not None:
            ok = ok & valid[i]
        if not ok.any():
            out.append(None)
            continue
        diff = np.abs(f[i] - sample_nearest(before, src)).mean(-1)
        out.append(float(diff[ok].mean()))
    return out
