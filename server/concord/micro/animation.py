"""Animations of micro's procedural objects with EXACT motion vectors, for the `stylize` job's tests, benchmark
and the consistency measurements on micro: `spinning_frames` turns one object about the vertical axis; every
object pixel's surface point (its object coordinates from the renderer) is projected into the previous frame's
pose with the pinhole camera, so the motion is exact (up to float rounding), not estimated. The background is
static (motion 0). The FrameSet contract: `concord.frames.frameset`.

What this module must never do: touch torch or the file system, or use global random state."""

from __future__ import annotations

import numpy as np

from concord.frames.frameset import FrameSet
from concord.micro.data import SampleSpec, _camera, _rot_x, _rot_y, _upright, render, sample_specs


__all__ = ["spinning_frames", "spinning_frame_range"]


def spinning_frames(n: int = 6, degrees_per_frame: float = 8.0, seed: int = 0, size: int = 64,
                    shape: str | None = "box", pattern: str | None = "checker") -> tuple[FrameSet, str]:
    """(FrameSet of n frames, the object's prompt): a random object of `shape` / `pattern` (None: any) drawn from
    the seeded `sample_specs` stream, upright, tilted 15 degrees towards the camera, turning by
    `degrees_per_frame` per frame."""
    return spinning_frame_range(0, n, degrees_per_frame, seed, size, shape, pattern)


def spinning_frame_range(start: int, stop: int, degrees_per_frame: float = 8.0, seed: int = 0, size: int = 64,
                         shape: str | None = "box", pattern: str | None = "checker") -> tuple[FrameSet, str]:
    """Frames [start, stop) of the same animation (a chunk of an arbitrarily long one: memory by the chunk). Frame
    `start`'s motion is to frame start - 1 (zeros for frame 0)."""
    rng = np.random.default_rng(seed)
    while True:
        base = sample_specs(rng, 1)[0]
        if (shape is None or base.shape == shape) and (pattern is None or base.pattern == pattern):
            break
    r0 = _upright(rng)
    centre = np.array([0.0, 0.0, base.center[2]])
    K = _camera(size, size)
    pose = lambda i: _rot_x(15.0) @ _rot_y(degrees_per_frame * i) @ r0  # noqa: E731
    images, depth, motion = [], [], []
    for i in range(start, stop):
        R = pose(i)
        spec = SampleSpec(shape=base.shape, params=base.params, rotation=R, center=centre, scale=base.scale,
                          bound=base.bound, pattern=base.pattern, colour1=base.colour1, colour2=base.colour2,
                          phase=base.phase)
        img, d, q = render(spec, size, size)
        m = np.zeros((size, size, 2), np.float32)
        if i > 0:
            fg = d > 0
            local = q[fg] * (spec.scale * spec.bound)  # object-frame point (world units)
            x_prev = local @ pose(i - 1).T + centre  # the same point in the previous pose
            u = K[0, 0] * x_prev[:, 0] / x_prev[:, 2] + K[0, 2]
            v = K[1, 1] * x_prev[:, 1] / x_prev[:, 2] + K[1, 2]
            rows, cols = np.nonzero(fg)
            m[rows, cols, 0] = u - (cols + 0.5)
            m[rows, cols, 1] = v - (rows + 0.5)
        images.append(img)
        depth.append(d)
        motion.append(m)
    fs = FrameSet(image=(np.stack(images) * 255).round().astype(np.uint8), depth=np.stack(depth),
                  motion=np.stack(motion))
    return fs, base.prompt
