"""Read and write nerfstudio / instant-ngp ``transforms.json`` camera files.

What it is for: ``concord bake`` takes photos (or renders, or the views a texture job generated) together with
their cameras in this widely used format, and the texture job writes its rig in it so users can edit views
and re-bake. The format (nerfstudio "data conventions", instant-ngp ``nerf_loader``):

- ``frames``: list of ``{"file_path": ..., "transform_matrix": 4x4 camera-to-world}``. The camera axes are
  Blender's / OpenGL's (x right, y up, looking down -z). Concord takes the matrices to be in the MESH FILE's
  own coordinates (what trimesh loads; for glTF that is Y-up).
- intrinsics, global or per frame (a frame's keys win): ``fl_x, fl_y, cx, cy, w, h`` (pixels; cx, cy with
  pixel centres at +0.5, as nerfstudio and OpenCV do), or ``camera_angle_x`` (+ optional
  ``camera_angle_y``) -- horizontal / vertical field of view in radians, principal point at the centre.
  ``w``/``h`` missing: taken from the image file. ``fl_y`` missing: ``fl_x``.
- ``file_path`` is relative to the json's folder; the extension may be left out (nerfstudio allows it): the
  path is tried as is, then with ``.png``, ``.jpg``, ``.jpeg``.

Lens distortion (``k1..k4, p1, p2`` non-zero) and fisheye models are refused with a clear error rather than
baked wrongly: undistort the images first.

Output of the reader is in the project's camera contract (:mod:`concord.geometry.viewset`): OpenCV
world-to-camera matrices (x right, y down, z forward) and OpenCV K matrices.

What it must never do: import bpy or torch, or fail with a bare KeyError/traceback on a user's file -- every
problem is a :class:`TransformsError` with a message and a hint.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from concord.geometry.viewset import blender_camera_to_world_from_opencv, opencv_from_blender_camera_to_world

__all__ = [
    "Transforms",
    "TransformsError",
    "TransformsFrame",
    "read_transforms_json",
    "write_transforms_json",
]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")


class TransformsError(ValueError):
    """A transforms.json problem a user can fix; ``str()`` gives the message and the hint."""

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message}\n  hint: {hint}")


@dataclass
class TransformsFrame:
    """One camera: ``image_path`` resolved, ``camera_to_world_gl`` as in the file, ``intrinsics`` OpenCV K."""

    file_path: str
    image_path: Path
    camera_to_world_gl: np.ndarray  # (4,4) float64, OpenGL camera axes
    intrinsics: np.ndarray  # (3,3) float64
    width: int
    height: int

    @property
    def world_to_camera_cv(self) -> np.ndarray:
        """(4,4) float64 world-to-camera with OpenCV camera axes."""
        return opencv_from_blender_camera_to_world(self.camera_to_world_gl)


@dataclass
class Transforms:
    """The cameras of a transforms.json, in file order."""

    path: Path
    frames: list[TransformsFrame]

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def width(self) -> int:
        return self.frames[0].width

    @property
    def height(self) -> int:
        return self.frames[0].height

    @property
    def intrinsics(self) -> np.ndarray:
        """(V,3,3) float32 OpenCV K."""
        return np.stack([f.intrinsics for f in self.frames]).astype(np.float32)

    @property
    def world_to_camera(self) -> np.ndarray:
        """(V,4,4) float32 OpenCV world-to-camera."""
        return np.stack([f.world_to_camera_cv for f in self.frames]).astype(np.float32)

    @property
    def camera_to_world_gl(self) -> np.ndarray:
        return np.stack([f.camera_to_world_gl for f in self.frames])

    @property
    def image_paths(self) -> list[Path]:
        return [f.image_path for f in self.frames]

    def check_same_size(self) -> None:
        sizes = {(f.width, f.height) for f in self.frames}
        if len(sizes) > 1:
            raise TransformsError(
                f"{self.path}: frames have different image sizes {sorted(sizes)}",
                "bake needs all views at one size; resize the images (and scale fl_x, fl_y, cx, cy) to match",
            )

    def load_images(self) -> np.ndarray:
        """(V,H,W,3) uint8 sRGB, row 0 = top. Alpha is dropped; greyscale is expanded. Sizes are checked."""
        from PIL import Image

        self.check_same_size()
        out = []
        for f in self.frames:
            with Image.open(f.image_path) as im:
                if im.size != (f.width, f.height):
                    raise TransformsError(
                        f"{f.image_path}: image is {im.size[0]}x{im.size[1]} but transforms.json says "
                        f"{f.width}x{f.height}",
                        "fix w/h (and fl_x, fl_y, cx, cy) in transforms.json or resize the image",
                    )
                arr = np.asarray(im.convert("RGB"))
            out.append(arr)
        return np.stack(out)


def _number(d: dict, key: str, where: str) -> float:
    value = d[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TransformsError(f"{where}: '{key}' must be a finite number, got {value!r}")
    return float(value)


def _resolve_image(base: Path, file_path: str, where: str) -> Path:
    p = Path(file_path)
    candidate = p if p.is_absolute() else base / p
    tried = [candidate]
    if candidate.is_file():
        return candidate
    for suffix in _IMAGE_SUFFIXES:
        alt = candidate.with_name(candidate.name + suffix)
        tried.append(alt)
        if alt.is_file():
            return alt
    raise TransformsError(
        f"{where}: image file not found: {file_path!r} (tried {', '.join(str(t) for t in tried)})",
        "file_path is relative to the folder holding transforms.json",
    )


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception as exc:  # PIL raises several types for unreadable files
        raise TransformsError(f"{path}: cannot read image ({exc})") from None


def _matrix(frame: dict, where: str) -> np.ndarray:
    if "transform_matrix" not in frame:
        raise TransformsError(
            f"{where}: missing 'transform_matrix'", "each frame needs a 4x4 camera-to-world 'transform_matrix'"
        )
    try:
        m = np.asarray(frame["transform_matrix"], dtype=np.float64)
    except (TypeError, ValueError):
        raise TransformsError(f"{where}: 'transform_matrix' is not a numeric 4x4 matrix") from None
    if m.shape == (3, 4):
        m = np.vstack([m, [0.0, 0.0, 0.0, 1.0]])
    if m.shape != (4, 4):
        raise TransformsError(f"{where}: 'transform_matrix' has shape {m.shape}, expected 4x4")
    if not np.all(np.isfinite(m)):
        raise TransformsError(f"{where}: 'transform_matrix' contains NaN or infinity")
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0], atol=1e-6):
        raise TransformsError(f"{where}: 'transform_matrix' last row is {m[3].tolist()}, expected [0, 0, 0, 1]")
    rot = m[:3, :3]
    det = np.linalg.det(rot)
    if abs(det) < 1e-9:
        raise TransformsError(
            f"{where}: 'transform_matrix' is not invertible (det of its 3x3 part = {det:.3g})",
            "it must be a camera-to-world rigid transform",
        )
    if not np.allclose(rot.T @ rot, np.eye(3), atol=1e-3) or det < 0:
        raise TransformsError(
            f"{where}: 'transform_matrix' rotation part is not a rotation (it scales, shears or mirrors)",
            "camera-to-world matrices must be rigid; put scale into the mesh instead",
        )
    return m


def _intrinsics(d: dict, top: dict, where: str, image_path: Path) -> tuple[np.ndarray, int, int]:
    """K (3,3), w, h from a frame's keys with the file's global keys as fallback."""

    def get(key):
        if key in d:
            return d, where
        if key in top:
            return top, "transforms.json"
        return None, None

    for key in _DISTORTION_KEYS:
        src, w_ = get(key)
        if src is not None and _number(src, key, w_) != 0.0:
            raise TransformsError(
                f"{w_}: lens distortion '{key}' = {src[key]} is not supported",
                "undistort the images first (e.g. ns-process-data / COLMAP image_undistorter) and drop k1..p2",
            )
    src, w_ = get("camera_model")
    if src is not None and "FISHEYE" in str(src["camera_model"]).upper():
        raise TransformsError(
            f"{w_}: camera_model {src['camera_model']!r} is not supported", "use pinhole (undistorted) images"
        )

    sw, ww = get("w")
    sh, wh = get("h")
    if sw is not None and sh is not None:
        width, height = _number(sw, "w", ww), _number(sh, "h", wh)
        if width < 1 or height < 1 or width != int(width) or height != int(height):
            raise TransformsError(f"{where}: w/h must be positive integers, got {width}x{height}")
        width, height = int(width), int(height)
    else:
        width, height = _image_size(image_path)

    sfx, wfx = get("fl_x")
    sax, wax = get("camera_angle_x")
    if sfx is not None:
        fx = _number(sfx, "fl_x", wfx)
        sfy, wfy = get("fl_y")
        fy = _number(sfy, "fl_y", wfy) if sfy is not None else fx
    elif sax is not None:
        angle_x = _number(sax, "camera_angle_x", wax)
        if not 0.0 < angle_x < math.pi:
            raise TransformsError(f"{wax}: camera_angle_x = {angle_x} must be in (0, pi) radians")
        fx = 0.5 * width / math.tan(0.5 * angle_x)
        say, way = get("camera_angle_y")
        if say is not None:
            angle_y = _number(say, "camera_angle_y", way)
            if not 0.0 < angle_y < math.pi:
                raise TransformsError(f"{way}: camera_angle_y = {angle_y} must be in (0, pi) radians")
            fy = 0.5 * height / math.tan(0.5 * angle_y)
        else:
            fy = fx
    else:
        raise TransformsError(
            f"{where}: no intrinsics: neither 'fl_x' nor 'camera_angle_x' (in the frame or at the top level)",
            "give fl_x, fl_y, cx, cy, w, h in pixels, or camera_angle_x in radians",
        )
    if fx <= 0 or fy <= 0:
        raise TransformsError(f"{where}: focal lengths must be positive, got fl_x={fx}, fl_y={fy}")
    scx, wcx = get("cx")
    scy, wcy = get("cy")
    cx = _number(scx, "cx", wcx) if scx is not None else width / 2.0
    cy = _number(scy, "cy", wcy) if scy is not None else height / 2.0
    k = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=np.float64)
    return k, width, height


def read_transforms_json(path: str | Path, *, require_images: bool = True) -> Transforms:
    """Parse a transforms.json; resolve images (they must exist when ``require_images``).

    Raises :class:`TransformsError` for every problem (unreadable json, missing keys, non-invertible or
    non-rigid matrices, missing images, no intrinsics, distortion). Image sizes are checked against w/h
    when the images are loaded (:meth:`Transforms.load_images`).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "transforms.json"
    if not path.is_file():
        raise TransformsError(f"{path}: no such file", "pass the path of a nerfstudio/instant-ngp transforms.json")
    try:
        top = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TransformsError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(top, dict):
        raise TransformsError(f"{path}: the top level must be an object with a 'frames' list")
    frames_in = top.get("frames")
    if not isinstance(frames_in, list) or not frames_in:
        raise TransformsError(f"{path}: missing or empty 'frames' list", "each frame needs file_path and transform_matrix")
    base = path.parent
    frames = []
    for i, fr in enumerate(frames_in):
        where = f"{path.name} frame {i}"
        if not isinstance(fr, dict):
            raise TransformsError(f"{where}: a frame must be an object")
        if "file_path" not in fr or not isinstance(fr["file_path"], str) or not fr["file_path"]:
            raise TransformsError(f"{where}: missing 'file_path'", "the image file, relative to transforms.json")
        where = f"{path.name} frame {i} ({fr['file_path']})"
        m = _matrix(fr, where)
        if require_images:
            image_path = _resolve_image(base, fr["file_path"], where)
        else:
            p = Path(fr["file_path"])
            image_path = p if p.is_absolute() else base / p
        k, w, h = _intrinsics(fr, top, where, image_path)
        frames.append(TransformsFrame(fr["file_path"], image_path, m, k, w, h))
    return Transforms(path=path, frames=frames)


def write_transforms_json(
    path: str | Path,
    intrinsics: np.ndarray,
    world_to_camera_cv: np.ndarray,
    image_names: list[str],
    w: int,
    h: int,
) -> Path:
    """Write cameras (OpenCV K (V,3,3) and world-to-camera (V,4,4)) as a nerfstudio transforms.json.

    Matrices are written camera-to-world with OpenGL camera axes; intrinsics as ``fl_x, fl_y, cx, cy`` --
    at the top level when all views share them, else per frame -- plus ``w, h`` and ``camera_angle_x``
    (for instant-ngp/NeRF tools that only read that). ``image_names`` are written as given (relative to the
    json's folder). Returns the path written.
    """
    path = Path(path)
    k = np.asarray(intrinsics, dtype=np.float64).reshape(-1, 3, 3)
    w2c = np.asarray(world_to_camera_cv, dtype=np.float64).reshape(-1, 4, 4)
    if not (len(k) == len(w2c) == len(image_names)):
        raise ValueError(f"{len(k)} intrinsics, {len(w2c)} matrices and {len(image_names)} names differ in count")
    params = [
        {"fl_x": float(ki[0, 0]), "fl_y": float(ki[1, 1]), "cx": float(ki[0, 2]), "cy": float(ki[1, 2])} for ki in k
    ]
    shared = all(p == params[0] for p in params)
    doc: dict = {"camera_model": "OPENCV", "w": int(w), "h": int(h)}
    if shared:
        doc.update(params[0])
        doc["camera_angle_x"] = 2.0 * math.atan(0.5 * w / params[0]["fl_x"])
    frames = []
    for i, name in enumerate(image_names):
        c2w_gl = blender_camera_to_world_from_opencv(w2c[i])
        fr: dict = {"file_path": str(name), "transform_matrix": c2w_gl.tolist()}
        if not shared:
            fr.update(params[i])
        frames.append(fr)
    doc["frames"] = frames
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return path
