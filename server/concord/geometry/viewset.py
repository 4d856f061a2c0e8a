"""The ViewSet array contract: V views of one object, as sent between the add-on, the CLI and the server.

This docstring is the single written statement of the layout. Every producer (the add-on's capture layer,
``concord.geometry.render``) and every consumer (pipelines, baking, metrics) cites it instead of restating it.

Layout
------
A ViewSet holds V views stacked on a leading axis. Images are ``(V, H, W, C)`` with **row 0 = the TOP row of
the image** and column 0 = the left column. (Blender's render passes are stored bottom-up: producers flip
rows at the edge, consumers never do.)

=================== ============ ============== ===========================================================
field               dtype        shape          meaning
=================== ============ ============== ===========================================================
``depth``           float32      (V, H, W)      planar camera-space z: distance along the optical axis,
                                                scene units, ``> 0`` on foreground; background exactly 0.0
``mask``            bool         (V, H, W)      foreground: the object is seen at this pixel
``uv``              float32      (V, H, W, 2)   the surface's UV in Blender's convention: origin at the
                                                bottom-left of the texture, u right, v up. 0 on background.
                                                Finite; may lie outside [0, 1] (tiling): consumers wrap
                                                modulo 1 (texel row = (1 - v) * H_tex, column = u * W_tex)
``normal``          float32      (V, H, W, 3)   world-space unit normal of the surface, facing the camera;
                                                0 on background
``intrinsics``      float32      (V, 3, 3)      pinhole K in pixels, OpenCV convention: x right, y down,
                                                pixel (0, 0) spans [0, 1) x [0, 1), so pixel centres are at
                                                integer + 0.5. ``[[fx, s, cx], [0, fy, cy], [0, 0, 1]]``
``world_to_camera`` float32      (V, 4, 4)      rigid transform world -> camera, OpenCV camera axes:
                                                x right, y down, z forward (into the scene)
``image`` (opt.)    uint8 or     (V, H, W, 3)   colour, sRGB (not linear). uint8 0..255 or float32 in [0, 1]
                    float32
=================== ============ ============== ===========================================================

So a foreground pixel (row r, column c) of view k sees the world point
``X = camera_to_world[k] @ [depth * K^-1 @ (c + 0.5, r + 0.5, 1), 1]``.

World frame: whatever frame the producer's scene uses (Blender's Z-up world for the add-on; the mesh file's
own coordinates for the CLI, see ``concord.geometry.mesh``). Normals and poses share it; nothing in the
contract depends on which axis is up.

Over HTTP a ViewSet travels as one ``.npz`` whose keys are exactly the field names above
(:meth:`ViewSet.to_npz_dict` / :meth:`ViewSet.from_arrays`). ``mask`` may arrive as bool or uint8 0/1 and
float64 arrays are cast to float32.

Blender's camera (``Object.matrix_world`` of a camera) uses OpenGL axes: x right, y up, looking down -z. Use
:func:`opencv_from_blender_camera_to_world` / :func:`blender_camera_to_world_from_opencv` at the edge.

Layer rule: numpy only. No bpy, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping, Sequence

import numpy as np

from concord.errors import ContractError

__all__ = [
    "ViewSet",
    "ViewSetError",
    "FIELDS",
    "REQUIRED_FIELDS",
    "NORMAL_TOLERANCE",
    "POSE_TOLERANCE",
    "opencv_from_blender_camera_to_world",
    "blender_camera_to_world_from_opencv",
    "rigid_inverse",
]

#: |‖n‖ - 1| allowed for foreground normals (half-float EXR passes are accurate to ~5e-4).
NORMAL_TOLERANCE = 1e-2
#: max |R R^T - I| and |det R - 1| allowed for the rotation part of ``world_to_camera`` (float32 data).
POSE_TOLERANCE = 1e-3

REQUIRED_FIELDS = ("depth", "mask", "uv", "normal", "intrinsics", "world_to_camera")
FIELDS = REQUIRED_FIELDS + ("image",)

# OpenCV camera axes (x right, y down, z forward) <-> OpenGL/Blender camera axes (x right, y up, z backward):
# flip the camera's y and z axes. The matrix is its own inverse.
_FLIP_YZ = np.diag([1.0, -1.0, -1.0, 1.0])


class ViewSetError(ContractError):
    """A ViewSet breaks the array contract. ``field`` names the offending array; ``hint`` says how to fix it."""


@dataclass
class ViewSet:
    """V views of one object. See the module docstring for the contract each array follows."""

    depth: np.ndarray
    mask: np.ndarray
    uv: np.ndarray
    normal: np.ndarray
    intrinsics: np.ndarray
    world_to_camera: np.ndarray
    image: np.ndarray | None = field(default=None)

    # ------------------------------------------------------------------ shape helpers
    @property
    def num_views(self) -> int:
        return int(self.depth.shape[0])

    @property
    def height(self) -> int:
        return int(self.depth.shape[1])

    @property
    def width(self) -> int:
        return int(self.depth.shape[2])

    @property
    def camera_to_world(self) -> np.ndarray:
        """(V, 4, 4) float32 inverses of ``world_to_camera`` (OpenCV camera axes)."""
        return rigid_inverse(self.world_to_camera).astype(np.float32)

    @property
    def camera_centers(self) -> np.ndarray:
        """(V, 3) camera centres in world coordinates."""
        return self.camera_to_world[:, :3, 3]

    # ------------------------------------------------------------------ (de)serialisation
    def to_npz_dict(self) -> dict[str, np.ndarray]:
        """The arrays dict written into the HTTP ``.npz`` (``np.savez(f, **vs.to_npz_dict())``)."""
        out = {name: getattr(self, name) for name in REQUIRED_FIELDS}
        if self.image is not None:
            out["image"] = self.image
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], *, validate: bool = True) -> "ViewSet":
        """Build a ViewSet from an arrays dict (e.g. ``np.load(npz)``), normalising dtypes at the edge.

        Keys must be exactly the field names (``image`` optional). ``mask`` may be bool or an integer array
        of 0/1; float64 (and float16) arrays are cast to float32. Validates unless ``validate=False``.
        """
        keys = set(arrays.keys())
        unknown = sorted(keys - set(FIELDS))
        if unknown:
            raise ViewSetError(
                f"unknown array(s) {unknown}", unknown[0], f"expected keys: {', '.join(FIELDS)}"
            )
        for name in REQUIRED_FIELDS:
            if name not in keys:
                raise ViewSetError("missing", name, f"a ViewSet needs {', '.join(REQUIRED_FIELDS)}")
        values: dict[str, np.ndarray | None] = {}
        for name in FIELDS:
            if name not in keys or arrays[name] is None:
                values[name] = None
                continue
            a = np.asarray(arrays[name])
            if name == "mask":
                a = _mask_to_bool(a)
            elif name == "image":
                if a.dtype in (np.float64, np.float16):
                    a = a.astype(np.float32)
            elif a.dtype in (np.float64, np.float16):
                a = a.astype(np.float32)
            values[name] = a
        vs = cls(**values)  # type: ignore[arg-type]
        if validate:
            vs.validate()
        return vs

    def subset(self, indices: Sequence[int] | np.ndarray) -> "ViewSet":
        """A ViewSet with only the views ``indices`` (in that order); arrays are copies."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -self.num_views or idx.max() >= self.num_views):
            raise IndexError(f"view indices {idx.tolist()} out of range for {self.num_views} views")
        return replace(
            self,
            **{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[idx]) for f in fields(self)},
        )

    # ------------------------------------------------------------------ validation
    def validate(self) -> "ViewSet":
        """Check the contract; raise :class:`ViewSetError` naming the first offending field. Returns self."""
        self._validate_types_and_shapes()
        self._validate_values()
        return self

    def _validate_types_and_shapes(self) -> None:
        depth = self.depth
        if not isinstance(depth, np.ndarray) or depth.ndim != 3:
            raise ViewSetError(
                f"expected shape (V, H, W), got {getattr(depth, 'shape', type(depth).__name__)}",
                "depth",
                "one planar-depth map per view, images row 0 at the top",
            )
        v, h, w = depth.shape
        if v == 0 or h == 0 or w == 0:
            raise ViewSetError(f"empty shape {depth.shape}", "depth", "need at least one view of 1x1 pixels")
        expected = {
            "depth": ((v, h, w), (np.float32,)),
            "mask": ((v, h, w), (np.bool_,)),
            "uv": ((v, h, w, 2), (np.float32,)),
            "normal": ((v, h, w, 3), (np.float32,)),
            "intrinsics": ((v, 3, 3), (np.float32,)),
            "world_to_camera": ((v, 4, 4), (np.float32,)),
        }
        if self.image is not None:
            expected["image"] = ((v, h, w, 3), (np.uint8, np.float32))
        for name, (shape, dtypes) in expected.items():
            a = getattr(self, name)
            if not isinstance(a, np.ndarray):
                raise ViewSetError(f"expected a numpy array, got {type(a).__name__}", name)
            if a.shape != shape:
                raise ViewSetError(
                    f"expected shape {shape}, got {a.shape}",
                    name,
                    "all arrays share (V, H, W) with depth; images are (V, H, W, C)",
                )
            if a.dtype.type not in dtypes:
                names = " or ".join(np.dtype(d).name for d in dtypes)
                hint = "use ViewSet.from_arrays to cast float64 and uint8 masks" if name != "image" else ""
                raise ViewSetError(f"expected dtype {names}, got {a.dtype}", name, hint)

    def _validate_values(self) -> None:
        for name in ("depth", "uv", "normal", "intrinsics", "world_to_camera"):
            a = getattr(self, name)
            if not np.isfinite(a).all():
                bad = int((~np.isfinite(a)).sum())
                raise ViewSetError(f"{bad} non-finite value(s) (NaN/Inf)", name, "write 0 on background")
        if self.image is not None and self.image.dtype == np.float32:
            img = self.image
            if not np.isfinite(img).all() or img.min() < 0.0 or img.max() > 1.0:
                raise ViewSetError("float image must be finite sRGB in [0, 1]", "image")

        mask, depth = self.mask, self.depth
        for k in range(self.num_views):
            if not mask[k].any():
                raise ViewSetError(
                    f"view {k} sees nothing (empty mask)", "mask", "aim the camera at the object or drop the view"
                )
        fg_bad = mask & ~(depth > 0)
        if fg_bad.any():
            k = int(np.argwhere(fg_bad)[0, 0])
            raise ViewSetError(
                f"{int(fg_bad.sum())} foreground pixel(s) with depth <= 0 (first in view {k})",
                "depth",
                "depth is planar camera z > 0 wherever mask is true; mask and depth must agree",
            )
        bg_bad = ~mask & (depth != 0)
        if bg_bad.any():
            k = int(np.argwhere(bg_bad)[0, 0])
            raise ViewSetError(
                f"{int(bg_bad.sum())} background pixel(s) with depth != 0 (first in view {k})",
                "depth",
                "background depth is exactly 0.0 (Blender writes 1e10: map it at the edge); "
                "mask and depth must agree",
            )
        for name in ("uv", "normal"):
            a = getattr(self, name)
            if (a[~mask] != 0).any():
                raise ViewSetError("non-zero values on background pixels", name, "write 0 where mask is false")
        norms = np.linalg.norm(self.normal[mask], axis=-1)
        off = np.abs(norms - 1.0) > NORMAL_TOLERANCE
        if off.any():
            raise ViewSetError(
                f"{int(off.sum())} foreground normal(s) not of unit length (worst |n| = "
                f"{float(norms[np.argmax(np.abs(norms - 1))]):.4g}, tolerance {NORMAL_TOLERANCE})",
                "normal",
                "normalise world-space normals",
            )

        K = self.intrinsics.astype(np.float64)
        for k in range(self.num_views):
            Kk = K[k]
            if not (Kk[0, 0] > 0 and Kk[1, 1] > 0):
                raise ViewSetError(f"view {k}: focal lengths must be > 0, got fx={Kk[0,0]}, fy={Kk[1,1]}", "intrinsics")
            if not (np.allclose(Kk[2], [0, 0, 1]) and Kk[1, 0] == 0):
                raise ViewSetError(
                    f"view {k}: not a pinhole K (bottom row {Kk[2].tolist()}, K[1,0]={Kk[1,0]})",
                    "intrinsics",
                    "K = [[fx, s, cx], [0, fy, cy], [0, 0, 1]] in pixels",
                )

        P = self.world_to_camera.astype(np.float64)
        for k in range(self.num_views):
            R = P[k, :3, :3]
            err = np.abs(R @ R.T - np.eye(3)).max()
            det = np.linalg.det(R)
            if err > POSE_TOLERANCE or abs(det - 1.0) > POSE_TOLERANCE or not np.allclose(P[k, 3], [0, 0, 0, 1]):
                raise ViewSetError(
                    f"view {k}: not a rigid transform (|R R^T - I| = {err:.3g}, det R = {det:.4g}, "
                    f"bottom row {P[k, 3].tolist()})",
                    "world_to_camera",
                    "world_to_camera is a rotation + translation (no scale, no mirror); for a Blender camera "
                    "use opencv_from_blender_camera_to_world(matrix_world) on an unscaled camera",
                )


def _mask_to_bool(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.bool_:
        return a
    if np.issubdtype(a.dtype, np.integer):
        if a.size and (a.min() < 0 or a.max() > 1):
            raise ViewSetError("integer mask must hold only 0 and 1", "mask", "send bool or uint8 0/1")
        return a.astype(bool)
    raise ViewSetError(f"expected bool or uint8 0/1, got {a.dtype}", "mask")


def rigid_inverse(T: np.ndarray) -> np.ndarray:
    """Inverse of rigid transform(s) ``T`` (..., 4, 4): ``[R t; 0 1]^-1 = [R^T  -R^T t; 0 1]``. float64 out."""
    T = np.asarray(T, dtype=np.float64)
    R = T[..., :3, :3]
    t = T[..., :3, 3]
    out = np.zeros(T.shape, dtype=np.float64)
    Rt = np.swapaxes(R, -1, -2)
    out[..., :3, :3] = Rt
    out[..., :3, 3] = -np.einsum("...ij,...j->...i", Rt, t)
    out[..., 3, 3] = 1.0
    return out


def opencv_from_blender_camera_to_world(c2w_gl: np.ndarray) -> np.ndarray:
    """Blender camera ``matrix_world`` (OpenGL axes: x right, y up, looking down -z) -> OpenCV world_to_camera.

    ``c2w_cv = c2w_gl @ diag(1, -1, -1, 1)`` (flip the camera's y and z axes), then invert rigidly.
    Accepts (4, 4) or (V, 4, 4); returns float64. The camera must be unscaled (scale would make it non-rigid).
    """
    c2w_cv = np.asarray(c2w_gl, dtype=np.float64) @ _FLIP_YZ
    return rigid_inverse(c2w_cv)


def blender_camera_to_world_from_opencv(world_to_camera_cv: np.ndarray) -> np.ndarray:
    """Inverse of :func:`opencv_from_blender_camera_to_world`: OpenCV world_to_camera -> Blender ``matrix_world``."""
    return rigid_inverse(world_to_camera_cv) @ _FLIP_YZ
