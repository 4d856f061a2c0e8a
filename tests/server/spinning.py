"""A spinning procedural object (micro's renderer) as a FrameSet with EXACT motion vectors: every object pixel's
surface point is projected into the previous frame's pose. The background is static (motion 0)."""

from __future__ import annotations

import numpy as np

from concord.frames.frameset import FrameSet
from concord.micro.data import SampleSpec, _camera, _rot_x, _rot_y, _upright, render, sample_specs


def spinning_frames(n: int = 6, degrees_per_frame: float = 8.0, seed: int = 0, size: int = 64,
                    shape: str | None = "box", pattern: str | None = "checker") -> tuple[FrameSet, str]:
    rng = np.random.default_rng(seed)
    while True:
        base = sample_specs(rng, 1)[0]
        if (shape is None or base.shape == shape) and (pattern is None or base.pattern == pattern):
            break
    r0 = _upright(rng)
    centre = np.array([0.0, 0.0, base.center[2]])
    K = _camera(size, size)
    poses = [_rot_x(15.0) @ _rot_y(degrees_per_frame * i) @ r0 for i in range(n)]
    images, depth, motion = [], [], []
    for i, R in enumerate(poses):
        spec = SampleSpec(shape=base.shape, params=base.params, rotation=R, center=centre, scale=base.scale,
                          bound=base.bound, pattern=base.pattern, colour1=base.colour1, colour2=base.colour2,
                          phase=base.phase)
        img, d, q = render(spec, size, size)
        m = np.zeros((size, size, 2), np.float32)
        if i > 0:
            fg = d > 0
            local = q[fg] * (spec.scale * spec.bound)  # object-frame point (world units)
            x_prev = local @ poses[i - 1].T + centre  # the same point in the previous pose
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
