"""The depth_image job's conditioning map."""

from __future__ import annotations

import numpy as np

from concord.pipelines.depth_image import depth_to_control


def test_control_map_is_inverse_depth_normalised_with_black_background():
    depth = np.zeros((8, 8), np.float32)
    depth[2:6, 2:6] = np.linspace(2.0, 5.0, 16).reshape(4, 4)
    c = depth_to_control(depth)
    assert (c[depth == 0] == 0).all()
    fg = c[depth > 0]
    assert np.isclose(fg.max(), 1.0) and np.isclose(fg.min(), 0.1)
    # nearer is brighter, monotonically
    order = np.argsort(depth[depth > 0])
    assert np.all(np.diff(fg[order]) < 0)


def test_control_map_is_scale_invariant_and_handles_flat_depth():
    depth = np.zeros((8, 8), np.float32)
    depth[1:7, 1:7] = np.random.default_rng(0).uniform(1, 3, (6, 6))
    assert np.allclose(depth_to_control(depth), depth_to_control(depth * 10), atol=1e-6)
    flat = (depth > 0) * 2.0
    assert np.allclose(depth_to_control(flat.astype(np.float32))[depth > 0], 1.0)
    assert not depth_to_control(np.zeros((4, 4), np.float32)).any()
