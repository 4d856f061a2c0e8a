"""Camera rigs: where the V cameras of a ViewSet stand, as (K, world_to_camera) pairs in the ViewSet contract.

Conventions (shared with ``concord.geometry.mesh`` and the add-on's rig code):

* A rig lives in a world frame given by two unit vectors: ``up`` and ``front``. ``front`` points from the
  object's centre towards the camera at azimuth 0, elevation 0 ("the front view").
  - Blender's world (the default, :data:`BLENDER_FRAME`): up = +Z, front = -Y. Azimuth 0 is Blender's Front
    view (numpad 1, camera on -Y looking at +Y); azimuth 90 is the Right view (numpad 3, camera on +X).
  - glTF / OBJ file coordinates (:data:`GLTF_FRAME`): up = +Y, front = +Z (glTF's "front of an asset faces
    +Z"). Blender's glTF and OBJ importers map file (x, y, z) to Blender (x, -z, y), which sends GLTF_FRAME to
    BLENDER_FRAME, so the same rig gives the same views of a glTF asset whether it is rendered from the file
    (``concord.geometry.render``) or inside Blender after import. :class:`concord.geometry.mesh.Mesh` carries
    the frame of its file (``mesh.up``, ``mesh.front``); pass them on.
* Azimuth turns counter-clockwise seen from above (right-handed about ``up``), from ``front`` towards
  ``right = up x front`` (+X in both frames above). Elevation is positive above the equator.
  Camera position: ``c + d (cos(el) (cos(az) front + sin(az) right) + sin(el) up)``.
* Cameras look at the bounding-sphere centre ``c``, image "up" along the projection of ``up``, no roll.
  OpenCV axes: z_cam = forward = (c - eye)/|c - eye|, x_cam = forward x up (normalised), y_cam = z_cam x x_cam.
* Intrinsics: square pixels, principal point at the image centre, ``fy = (H / 2) / tan(fov_y / 2)``, ``fx = fy``.
* Framing: the camera distance puts the whole bounding sphere (radius r) inside the narrower field of view
  with a margin: a sphere subtends half-angle asin(r / d), so ``d = margin * r / sin(fov_min / 2)``.

Zero123++ v1.2 (Shi et al. 2023, README "Camera Poses"): six views at azimuths 30, 90, 150, 210, 270, 330
degrees relative to the input view, elevations alternating 20 and -10 degrees (20 first), 30 degree field of
view. Its input view is our azimuth 0 (the front). Zero123++ fixes the camera distance; we frame from the
bounding sphere instead, which keeps the object the same size in every view.

Layer rule: numpy only. No bpy, no torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

__all__ = [
    "Camera",
    "CameraRig",
    "RigError",
    "BLENDER_FRAME",
    "GLTF_FRAME",
    "zero123pp",
    "orbit",
    "explicit",
    "parse_rig",
    "intrinsics_from_fov",
    "look_at",
    "framing_distance",
]

#: (up, front) of Blender's world: Z-up, front view looks from -Y.
BLENDER_FRAME = ((0.0, 0.0, 1.0), (0.0, -1.0, 0.0))
#: (up, front) of glTF/OBJ files: Y-up, the asset's front faces +Z.
GLTF_FRAME = ((0.0, 1.0, 0.0), (0.0, 0.0, 1.0))

ZERO123PP_AZIMUTHS = (30.0, 90.0, 150.0, 210.0, 270.0, 330.0)
ZERO123PP_ELEVATIONS = (20.0, -10.0, 20.0, -10.0, 20.0, -10.0)
ZERO123PP_FOV_Y = 30.0

DEFAULT_FOV_Y = 30.0
DEFAULT_MARGIN = 1.1
DEFAULT_ORBIT_ELEVATIONS = (15.0,)


class RigError(ValueError):
    """A rig description that cannot be used; the message says what is wrong and what is accepted."""


class Camera(NamedTuple):
    """One camera of the ViewSet contract: K (3, 3) in pixels and world_to_camera (4, 4), OpenCV axes."""

    K: np.ndarray
    world_to_camera: np.ndarray


@dataclass(frozen=True)
class CameraRig:
    """A set of cameras around an object, described independently of the object's size.

    Either spherical (``azimuths_deg``/``elevations_deg`` per camera, framed from the bounding sphere at
    :meth:`cameras` time) or ``explicit`` (fixed cameras, used as given).
    """

    name: str
    azimuths_deg: tuple[float, ...] = ()
    elevations_deg: tuple[float, ...] = ()
    fov_y_deg: float = DEFAULT_FOV_Y
    margin: float = DEFAULT_MARGIN
    up: tuple[float, float, float] = BLENDER_FRAME[0]
    front: tuple[float, float, float] = BLENDER_FRAME[1]
    explicit: tuple[Camera, ...] | None = None

    def __post_init__(self) -> None:
        if self.explicit is not None:
            return
        if len(self.azimuths_deg) != len(self.elevations_deg):
            raise RigError("azimuths and elevations must have one entry per camera")
        if not self.azimuths_deg:
            raise RigError(f"rig {self.name!r} has no cameras")
        if not (0.0 < self.fov_y_deg < 180.0):
            raise RigError(f"fov_y_deg must be in (0, 180), got {self.fov_y_deg}")
        if not self.margin >= 1.0:
            raise RigError(f"margin must be >= 1 (1 = sphere touches the frame), got {self.margin}")
        for e in self.elevations_deg:
            if not -90.0 < e < 90.0:
                raise RigError(f"elevation {e} must be strictly between -90 and 90 degrees")
        _frame_basis(self.up, self.front)  # raises on a bad frame

    @property
    def num_views(self) -> int:
        return len(self.explicit) if self.explicit is not None else len(self.azimuths_deg)

    def with_frame(self, up: Sequence[float], front: Sequence[float]) -> "CameraRig":
        """The same rig in another world frame (e.g. ``rig.with_frame(mesh.up, mesh.front)``)."""
        from dataclasses import replace

        return replace(self, up=tuple(float(x) for x in up), front=tuple(float(x) for x in front))

    def cameras(
        self, center: Sequence[float], radius: float, width: int, height: int
    ) -> list[Camera]:
        """The rig's cameras for an object whose bounding sphere is (center, radius), images width x height."""
        if self.explicit is not None:
            return [Camera(np.array(c.K, dtype=np.float64), np.array(c.world_to_camera, dtype=np.float64))
                    for c in self.explicit]
        if width <= 0 or height <= 0:
            raise RigError(f"image size must be positive, got {width}x{height}")
        if not (np.isfinite(radius) and radius > 0):
            raise RigError(f"bounding-sphere radius must be > 0, got {radius}")
        c = np.asarray(center, dtype=np.float64).reshape(3)
        K = intrinsics_from_fov(self.fov_y_deg, width, height)
        fov_x = 2.0 * math.atan(width / (2.0 * K[0, 0]))
        fov_min = min(math.radians(self.fov_y_deg), fov_x)
        d = framing_distance(radius, fov_min, self.margin)
        up, front, right = _frame_basis(self.up, self.front)
        out = []
        for az, el in zip(self.azimuths_deg, self.elevations_deg):
            a, e = math.radians(az), math.radians(el)
            direction = math.cos(e) * (math.cos(a) * front + math.sin(a) * right) + math.sin(e) * up
            eye = c + d * direction
            out.append(Camera(K.copy(), look_at(eye, c, up)))
        return out


def _frame_basis(up: Sequence[float], front: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    u = np.asarray(up, dtype=np.float64).reshape(3)
    f = np.asarray(front, dtype=np.float64).reshape(3)
    nu, nf = np.linalg.norm(u), np.linalg.norm(f)
    if not (nu > 0 and nf > 0) or abs(float(u @ f)) / (nu * nf) > 1e-6:
        raise RigError(f"up {tuple(u)} and front {tuple(f)} must be non-zero and perpendicular")
    u, f = u / nu, f / nf
    return u, f, np.cross(u, f)


def intrinsics_from_fov(fov_y_deg: float, width: int, height: int) -> np.ndarray:
    """Pinhole K (OpenCV, pixels) with vertical field of view ``fov_y_deg``, square pixels, centred."""
    fy = (height / 2.0) / math.tan(math.radians(fov_y_deg) / 2.0)
    return np.array([[fy, 0.0, width / 2.0], [0.0, fy, height / 2.0], [0.0, 0.0, 1.0]])


def framing_distance(radius: float, fov_rad: float, margin: float = DEFAULT_MARGIN) -> float:
    """Distance at which a sphere of ``radius`` fits a view cone of full angle ``fov_rad``, times ``margin``."""
    return margin * radius / math.sin(fov_rad / 2.0)


def look_at(eye: Sequence[float], target: Sequence[float], up: Sequence[float]) -> np.ndarray:
    """OpenCV world_to_camera (4, 4) of a camera at ``eye`` looking at ``target`` with no roll about ``up``."""
    eye = np.asarray(eye, dtype=np.float64)
    fwd = np.asarray(target, dtype=np.float64) - eye
    fwd /= np.linalg.norm(fwd)
    right = np.cross(fwd, np.asarray(up, dtype=np.float64))
    n = np.linalg.norm(right)
    if n < 1e-9:
        raise RigError("camera looks straight along the up axis; its roll is undefined")
    right /= n
    down = np.cross(fwd, right)
    R = np.stack([right, down, fwd])  # rows: camera axes in world coordinates
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = -R @ eye
    return T


def zero123pp(
    up: Sequence[float] = BLENDER_FRAME[0],
    front: Sequence[float] = BLENDER_FRAME[1],
    margin: float = DEFAULT_MARGIN,
) -> CameraRig:
    """Zero123++ v1.2's six cameras (azimuths 30..330 step 60, elevations 20/-10 alternating, fov 30)."""
    return CameraRig(
        name="zero123pp",
        azimuths_deg=ZERO123PP_AZIMUTHS,
        elevations_deg=ZERO123PP_ELEVATIONS,
        fov_y_deg=ZERO123PP_FOV_Y,
        margin=margin,
        up=tuple(float(x) for x in up),
        front=tuple(float(x) for x in front),
    )


def orbit(
    n: int,
    elevations_deg: Sequence[float] = DEFAULT_ORBIT_ELEVATIONS,
    fov_y_deg: float = DEFAULT_FOV_Y,
    up: Sequence[float] = BLENDER_FRAME[0],
    front: Sequence[float] = BLENDER_FRAME[1],
    margin: float = DEFAULT_MARGIN,
) -> CameraRig:
    """``n`` azimuths evenly spaced from 0 at each elevation (ring by ring): ``n * len(elevations)`` cameras."""
    if int(n) != n or n < 1:
        raise RigError(f"orbit needs a positive whole number of azimuths, got {n!r}")
    elevations = tuple(float(e) for e in elevations_deg)
    if not elevations:
        raise RigError("orbit needs at least one elevation")
    az = tuple(360.0 * i / int(n) for i in range(int(n)))
    label = ",".join(f"{e:g}" for e in elevations)
    return CameraRig(
        name=f"orbit:{int(n)}@{label}",
        azimuths_deg=az * len(elevations),
        elevations_deg=tuple(e for e in elevations for _ in az),
        fov_y_deg=fov_y_deg,
        margin=margin,
        up=tuple(float(x) for x in up),
        front=tuple(float(x) for x in front),
    )


def explicit(cameras: Sequence[tuple[np.ndarray, np.ndarray]], name: str = "explicit") -> CameraRig:
    """A rig of fixed cameras, each (K 3x3 in pixels, world_to_camera 4x4 OpenCV)."""
    cams = []
    for i, (K, T) in enumerate(cameras):
        K = np.asarray(K, dtype=np.float64)
        T = np.asarray(T, dtype=np.float64)
        if K.shape != (3, 3) or T.shape != (4, 4):
            raise RigError(f"camera {i}: expected K (3, 3) and world_to_camera (4, 4), got {K.shape}, {T.shape}")
        cams.append(Camera(K, T))
    if not cams:
        raise RigError("explicit rig needs at least one camera")
    return CameraRig(name=name, explicit=tuple(cams))


_ORBIT_RE = re.compile(r"^orbit:(?P<n>[^@]*)(?:@(?P<elev>.*))?$")


def parse_rig(
    spec: str,
    up: Sequence[float] = BLENDER_FRAME[0],
    front: Sequence[float] = BLENDER_FRAME[1],
    fov_y_deg: float | None = None,
) -> CameraRig:
    """Parse a rig name: ``"zero123pp"``, ``"orbit:N"`` or ``"orbit:N@e1,e2,..."`` (elevations in degrees).

    ``fov_y_deg`` overrides the orbit's field of view (Zero123++'s is fixed by the model).
    """
    accepted = "accepted: 'zero123pp', 'orbit:N', 'orbit:N@ELEV[,ELEV...]' (e.g. 'orbit:8@0,30')"
    s = spec.strip().lower() if isinstance(spec, str) else None
    if not s:
        raise RigError(f"empty rig name; {accepted}")
    if s == "zero123pp":
        if fov_y_deg is not None and fov_y_deg != ZERO123PP_FOV_Y:
            raise RigError("zero123pp's field of view is fixed at 30 degrees (the model was trained with it)")
        return zero123pp(up=up, front=front)
    m = _ORBIT_RE.match(s)
    if not m:
        raise RigError(f"unknown rig {spec!r}; {accepted}")
    try:
        n = int(m.group("n"))
    except ValueError:
        raise RigError(f"rig {spec!r}: N must be a whole number of views; {accepted}") from None
    if n < 1 or n > 360:
        raise RigError(f"rig {spec!r}: N must be between 1 and 360")
    elevations: tuple[float, ...] = DEFAULT_ORBIT_ELEVATIONS
    if m.group("elev") is not None:
        try:
            elevations = tuple(float(x) for x in m.group("elev").split(","))
        except ValueError:
            raise RigError(f"rig {spec!r}: elevations must be numbers in degrees separated by commas") from None
    return orbit(n, elevations, fov_y_deg=fov_y_deg if fov_y_deg is not None else DEFAULT_FOV_Y, up=up, front=front)
