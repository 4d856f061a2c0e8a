"""Camera math at the Blender edge: OpenCV (K, world_to_camera) <-> Blender camera settings and matrix_world.

The ViewSet contract (server/concord/geometry/viewset.py, restated only where the add-on needs it) fixes
cameras as OpenCV pinhole K in pixels (x right, y down, pixel centres at integer + 0.5) and world_to_camera
with OpenCV axes (x right, y down, z forward). Blender's camera object uses OpenGL axes (x right, y up,
looking down -z): ``camera_to_world_gl = camera_to_world_cv @ diag(1, -1, -1, 1)``.

Blender's lens model (sensor fit, shift) <-> K:
* sensor_fit 'HORIZONTAL' (or 'AUTO' with width >= height): ``fx = lens * W / sensor_width``; shifts are in
  units of the image width. 'VERTICAL' (or 'AUTO' with height > width): ``fy = lens * H / sensor_height``
  ('AUTO' uses ``sensor_width`` for whichever side is larger); shifts in units of the image height.
* ``cx = W / 2 - shift_x * size``, ``cy = H / 2 + shift_y * size`` (positive shift_y moves the frustum up,
  image rows grow downwards).

Layer rule: plain Python + numpy. No bpy (this runs in tests and outside Blender), no torch, no server package.
"""

from __future__ import annotations

import numpy as np

SENSOR_WIDTH_MM = 36.0

# OpenCV camera axes <-> OpenGL/Blender camera axes: flip y and z (its own inverse).
FLIP_YZ = np.diag([1.0, -1.0, -1.0, 1.0])


def rigid_inverse(T: np.ndarray) -> np.ndarray:
    """Inverse of a rigid transform (4, 4) or (..., 4, 4): [R t; 0 1]^-1 = [R^T  -R^T t; 0 1]. float64."""
    T = np.asarray(T, dtype=np.float64)
    R, t = T[..., :3, :3], T[..., :3, 3]
    out = np.zeros(T.shape, dtype=np.float64)
    Rt = np.swapaxes(R, -1, -2)
    out[..., :3, :3] = Rt
    out[..., :3, 3] = -np.einsum("...ij,...j->...i", Rt, t)
    out[..., 3, 3] = 1.0
    return out


def blender_matrix_world_from_opencv(world_to_camera: np.ndarray) -> np.ndarray:
    """OpenCV world_to_camera -> a Blender camera's ``matrix_world`` (OpenGL axes)."""
    return rigid_inverse(world_to_camera) @ FLIP_YZ


def opencv_from_blender_matrix_world(matrix_world: np.ndarray) -> np.ndarray:
    """A Blender camera's ``matrix_world`` -> OpenCV world_to_camera. Scale in the matrix is removed
    (a scaled camera object still sees along its axes), so the result is rigid."""
    M = np.asarray(matrix_world, dtype=np.float64).copy()
    R = M[:3, :3]
    # Polar decomposition keeps the nearest rotation (drops scale and shear).
    u, _, vt = np.linalg.svd(R)
    M[:3, :3] = u @ vt
    return rigid_inverse(M @ FLIP_YZ)


def blender_camera_settings(K: np.ndarray, width: int, height: int) -> dict:
    """Blender camera data settings reproducing pinhole K (square pixels, no skew) at width x height."""
    K = np.asarray(K, dtype=np.float64)
    if abs(K[0, 0] - K[1, 1]) > 1e-6 * K[0, 0] or abs(K[0, 1]) > 1e-9:
        raise ValueError("Blender cameras need square pixels (fx == fy) and no skew")
    size = float(width)  # with sensor_fit 'HORIZONTAL' shifts are fractions of the image width
    return {
        "type": "PERSP",
        "sensor_fit": "HORIZONTAL",
        "sensor_width": SENSOR_WIDTH_MM,
        "lens": K[0, 0] * SENSOR_WIDTH_MM / width,
        "shift_x": (width / 2.0 - K[0, 2]) / size,
        "shift_y": (K[1, 2] - height / 2.0) / size,
    }


def intrinsics_from_blender_camera(
    lens: float,
    sensor_width: float,
    sensor_height: float,
    sensor_fit: str,
    shift_x: float,
    shift_y: float,
    width: int,
    height: int,
) -> np.ndarray:
    """OpenCV K (3, 3) of a perspective Blender camera rendered at width x height with square pixels."""
    if sensor_fit == "AUTO":
        horizontal = width >= height
        sensor = sensor_width
    elif sensor_fit == "HORIZONTAL":
        horizontal, sensor = True, sensor_width
    elif sensor_fit == "VERTICAL":
        horizontal, sensor = False, sensor_height
    else:
        raise ValueError(f"unknown sensor_fit {sensor_fit!r}")
    size = float(width if horizontal else height)
    f = lens * size / sensor
    return np.array(
        [[f, 0.0, width / 2.0 - shift_x * size], [0.0, f, height / 2.0 + shift_y * size], [0.0, 0.0, 1.0]]
    )
