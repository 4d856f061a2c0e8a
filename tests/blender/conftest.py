"""bpy-backed fixtures for tests marked ``blender``: a scratch home for Blender and the Cycles pass renderer.

Blender writes to ~/.cache and ~/.config/blender: XDG_CACHE_HOME, XDG_CONFIG_HOME and BLENDER_USER_RESOURCES
point at a temporary folder before bpy is imported. Tests skip where the bpy wheel is not installed.
"""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

_BLENDER_HOME_VARS = ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "BLENDER_USER_RESOURCES")


@pytest.fixture(scope="session")
def bpy_module(tmp_path_factory):
    """The bpy module, imported with Blender's home folders in a scratch directory (skips without the wheel).

    The variables stay set for the rest of the session (bpy may read them after import) and are restored at
    its end.
    """
    home = tmp_path_factory.mktemp("blender-home")
    saved = {k: os.environ.get(k) for k in _BLENDER_HOME_VARS}
    for k in _BLENDER_HOME_VARS:
        os.environ[k] = str(home)
    try:
        bpy = pytest.importorskip("bpy", reason="needs the bpy wheel (pip install '.[blender]')")
        yield bpy
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def cycles_passes(bpy_module):
    """The helper module with ``new_scene_with_gltf`` and ``render_cycles_passes``."""
    import cycles_passes as helper

    return helper
