"""Which scene cameras the add-on uses (blender_addon.core.rigs.usable_scene_cameras / scene_cameras), plain
Python: visible perspective cameras are used and named; hidden, orthographic and panoramic ones are skipped
with the reason; nothing usable is an error that lists the reasons."""

import numpy as np
import pytest

from blender_addon.core import rigs


def _cam(name, type_="PERSP", hidden=""):
    M = np.eye(4)
    M[:3, 3] = (0.0, -5.0, 0.0)
    return rigs.SceneCamera(name, M, type_, 50.0, 36.0, 24.0, "AUTO", hidden=hidden)


def test_skips_with_reasons_and_names_the_used():
    specs = [_cam("A"), _cam("B", "ORTHO"), _cam("C", hidden="hidden"), _cam("D", "PANO"), _cam("E")]
    used, skipped = rigs.usable_scene_cameras(specs)
    assert [c.name for c in used] == ["A", "E"]
    assert [name for name, _ in skipped] == ["B", "C", "D"]
    assert "orthographic" in skipped[0][1] and skipped[1][1] == "hidden" and "panoramic" in skipped[2][1]
    cams = rigs.scene_cameras(specs, 64, 48)
    assert [c.name for c in cams] == ["A", "E"]
    assert "camera 'B' (orthographic" in rigs.describe_skipped(skipped)


def test_nothing_usable_says_why():
    with pytest.raises(rigs.RigError, match=r"camera 'O' \(orthographic.*camera 'H' \(hidden\)"):
        rigs.scene_cameras([_cam("O", "ORTHO"), _cam("H", hidden="hidden")], 64, 64)
