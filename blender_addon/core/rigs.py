"""Camera rigs for the add-on, in Blender's Z-up world, without the server package (the add-on ships alone).

The same conventions as the server's ``concord.geometry.rigs`` (tests/core/test_addon_core_rigs.py checks
both give the same cameras for the same bounding sphere):

* World frame: up = +Z, front = -Y (azimuth 0 is Blender's Front view, camera on -Y; azimuth 90 is the Right
  view, camera on +X). Azimuth turns counter-clockwise seen from above, from front towards right = up x front.
  Camera position ``c + d (cos(el) (cos(az) front + sin(az) right) + sin(el) up)``.
* Cameras look at the bounding-sphere centre with no roll; OpenCV axes: z = forward, x = forward x up, y = z x x.
* K: square pixels, principal point at the image centre, ``fy = (H / 2) / tan(fov_y / 2)``.
* Framing: ``d = margin * r / sin(fov_min / 2)`` puts the bounding sphere inside the narrower field of view.

Rigs: Zero123++ v1.2 (six views, azimuths 30..330 step 60, elevations 20/-10 alternating, fov 30 degrees),
an orbit of N views at one elevation, and the scene's own cameras (``scene_cameras`` takes their
``matrix_world`` and lens settings as plain numbers; the bpy side reads them). Of the scene's cameras only
the visible perspective ones are used (``usable_scene_cameras`` says which others were skipped and why): the
ViewSet contract is a pinhole camera, which an orthographic or panoramic camera is not.

Layer rule: plain Python + numpy; never imports bpy, torch or the server package.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .camera import intrinsics_from_blender_camera, opencv_from_blender_matrix_world

UP = (0.0, 0.0, 1.0)
FRONT = (0.0, -1.0, 0.0)

ZERO123PP_AZIMUTHS = (30.0, 90.0, 150.0, 210.0, 270.0, 330.0)
ZERO123PP_ELEVATIONS = (20.0, -10.0, 20.0, -10.0, 20.0, -10.0)
ZERO123PP_FOV_Y = 30.0
DEFAULT_FOV_Y = 30.0
DEFAULT_MARGIN = 1.1


class RigError(ValueError):
    """A rig that cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class Camera:
    """One ViewSet camera: K (3, 3) pixels, world_to_camera (4, 4) OpenCV axes, both float64."""

    K: np.ndarray
    world_to_camera: np.ndarray
    name: str = ""  # the scene camera's name (scene_cameras); "" for the generated rigs


def intrinsics_from_fov(fov_y_deg: float, width: int, height: int) -> np.ndarray:
    fy = (height / 2.0) / math.tan(math.radians(fov_y_deg) / 2.0)
    return np.array([[fy, 0.0, width / 2.0], [0.0, fy, height / 2.0], [0.0, 0.0, 1.0]])


def look_at(eye: Sequence[float], target: Sequence[float], up: Sequence[float] = UP) -> np.ndarray:
    """OpenCV world_to_camera of a camera at ``eye`` looking at ``target``, no roll about ``up``."""
    eye = np.asarray(eye, dtype=np.float64)
    fwd = np.asarray(target, dtype=np.float64) - eye
    fwd /= np.linalg.norm(fwd)
    right = np.cross(fwd, np.asarray(up, dtype=np.float64))
    n = np.linalg.norm(right)
    if n < 1e-9:
        raise RigError("a camera looks straight along the up axis; its roll is undefined (use elevations in (-90, 90))")
    right /= n
    down = np.cross(fwd, right)
    T = np.eye(4)
    T[:3, :3] = np.stack([right, down, fwd])
    T[:3, 3] = -T[:3, :3] @ eye
    return T


def spherical_cameras(
    azimuths_deg: Sequence[float],
    elevations_deg: Sequence[float],
    center: Sequence[float],
    radius: float,
    width: int,
    height: int,
    fov_y_deg: float = DEFAULT_FOV_Y,
    margin: float = DEFAULT_MARGIN,
) -> list[Camera]:
    """Cameras on a sphere around (center, radius), framed so the whole bounding sphere is in view."""
    if len(azimuths_deg) != len(elevations_deg) or not azimuths_deg:
        raise RigError("need one elevation per azimuth and at least one camera")
    if width <= 0 or height <= 0:
        raise RigError(f"view size must be positive, got {width}x{height}")
    if not (np.isfinite(radius) and radius > 0):
        raise RigError(f"the object has no size (bounding-sphere radius {radius}); is the mesh empty?")
    if not (0.0 < fov_y_deg < 180.0):
        raise RigError(f"field of view must be in (0, 180) degrees, got {fov_y_deg}")
    c = np.asarray(center, dtype=np.float64).reshape(3)
    K = intrinsics_from_fov(fov_y_deg, width, height)
    fov_x = 2.0 * math.atan(width / (2.0 * K[0, 0]))
    fov_min = min(math.radians(fov_y_deg), fov_x)
    d = margin * radius / math.sin(fov_min / 2.0)
    up, front = np.array(UP), np.array(FRONT)
    right = np.cross(up, front)
    out = []
    for az, el in zip(azimuths_deg, elevations_deg):
        if not -90.0 < el < 90.0:
            raise RigError(f"elevation {el} must be strictly between -90 and 90 degrees")
        a, e = math.radians(az), math.radians(el)
        direction = math.cos(e) * (math.cos(a) * front + math.sin(a) * right) + math.sin(e) * up
        out.append(Camera(K.copy(), look_at(c + d * direction, c, up)))
    return out


def zero123pp(center, radius, width, height, margin: float = DEFAULT_MARGIN) -> list[Camera]:
    """Zero123++ v1.2's six cameras around the bounding sphere."""
    return spherical_cameras(
        ZERO123PP_AZIMUTHS, ZERO123PP_ELEVATIONS, center, radius, width, height, ZERO123PP_FOV_Y, margin
    )


def orbit(
    n: int,
    center,
    radius,
    width,
    height,
    elevation_deg: float = 15.0,
    fov_y_deg: float = DEFAULT_FOV_Y,
    margin: float = DEFAULT_MARGIN,
) -> list[Camera]:
    """``n`` cameras at evenly spaced azimuths from 0 (the front), one elevation."""
    if int(n) != n or n < 1 or n > 360:
        raise RigError(f"an orbit needs 1 to 360 views, got {n!r}")
    az = [360.0 * i / int(n) for i in range(int(n))]
    return spherical_cameras(az, [float(elevation_deg)] * len(az), center, radius, width, height, fov_y_deg, margin)


@dataclass(frozen=True)
class SceneCamera:
    """What the add-on reads off a Blender camera object (plain numbers, so this module needs no bpy)."""

    name: str
    matrix_world: np.ndarray  # (4, 4)
    type: str  # 'PERSP', 'ORTHO', 'PANO'
    lens: float
    sensor_width: float
    sensor_height: float
    sensor_fit: str
    shift_x: float = 0.0
    shift_y: float = 0.0
    hidden: str = ""  # why the camera is not to be used though it is in the scene ("hidden", ...); "" = visible


_UNSUPPORTED = {"ORTHO": "orthographic", "PANO": "panoramic"}


def usable_scene_cameras(cameras: Sequence[SceneCamera]) -> tuple[list[SceneCamera], list[tuple[str, str]]]:
    """(the cameras to use, [(name, why skipped), ...]): visible perspective cameras are used; hidden ones
    and orthographic / panoramic ones (not pinhole cameras: the ViewSet contract has no place for them) are
    skipped."""
    used, skipped = [], []
    for cam in cameras:
        if cam.hidden:
            skipped.append((cam.name, cam.hidden))
        elif cam.type != "PERSP":
            kind = _UNSUPPORTED.get(cam.type, cam.type)
            skipped.append((cam.name, f"{kind}; only perspective cameras can be used"))
        else:
            used.append(cam)
    return used, skipped


def describe_skipped(skipped: Sequence[tuple[str, str]]) -> str:
    """'camera 'A' (orthographic; ...), camera 'B' (hidden)' for a report; '' when none."""
    return ", ".join(f"camera {name!r} ({why})" for name, why in skipped)


def scene_cameras(cameras: Sequence[SceneCamera], width: int, height: int) -> list[Camera]:
    """The scene's visible perspective cameras as ViewSet cameras at width x height (square pixels), named.
    Raises RigError when there is none (saying why each camera was skipped)."""
    if not cameras:
        raise RigError("the scene has no cameras: add one, or choose the Zero123++ or Orbit rig")
    used, skipped = usable_scene_cameras(cameras)
    if not used:
        raise RigError(f"no camera of the scene can be used: {describe_skipped(skipped)}")
    out = []
    for cam in used:
        K = intrinsics_from_blender_camera(
            cam.lens, cam.sensor_width, cam.sensor_height, cam.sensor_fit, cam.shift_x, cam.shift_y, width, height
        )
        out.append(Camera(K, opencv_from_blender_matrix_world(cam.matrix_world), cam.name))
    return out


def bounding_sphere(points: np.ndarray) -> tuple[np.ndarray, float]:
    """(centre, radius) as the server computes it: bounding-box centre, farthest point's distance."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if len(p) == 0:
        raise RigError("the mesh has no vertices")
    c = 0.5 * (p.min(axis=0) + p.max(axis=0))
    return c, float(np.linalg.norm(p - c, axis=1).max())
