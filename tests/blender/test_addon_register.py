"""The add-on registers and unregisters cleanly, and ships as a valid Blender extension zip that installs.

`make addon` builds dist/concord-<version>.zip with Blender's own packager and validator (inside the bpy
wheel); this test runs the same two commands into a temporary folder and installs the zip with
``bpy.ops.extensions.package_install_files``.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.blender

ROOT = Path(__file__).resolve().parents[2]
ADDON_DIR = ROOT / "blender_addon"


def _blender_ext(bpy) -> Path:
    path = Path(bpy.utils.system_resource("SCRIPTS")) / "addons_core" / "bl_pkg" / "cli" / "blender_ext.py"
    assert path.is_file(), path
    return path


def test_enable_disable_twice(bpy_module):
    import addon_utils

    bpy = bpy_module
    bpy.ops.wm.read_factory_settings(use_empty=True)
    for _ in range(2):
        mod = addon_utils.enable("blender_addon", default_set=True, handle_error=None)
        assert mod is not None
        assert hasattr(bpy.types.Scene, "concord") and hasattr(bpy.types.WindowManager, "concord_job")
        assert hasattr(bpy.types, "CONCORD_PT_texture")
        assert "blender_addon" in bpy.context.preferences.addons
        assert bpy.context.preferences.addons["blender_addon"].preferences.server_url == "http://127.0.0.1:8765"
        assert hasattr(bpy.types.Scene, "concord_stylize") and hasattr(bpy.types, "CONCORD_PT_stylize")
        for op in ("texture_mesh", "cancel_job", "add_uv_map", "check_server", "stylize_animation", "cancel_stylize"):
            assert hasattr(bpy.ops.concord, op)
        addon_utils.disable("blender_addon", default_set=True, handle_error=None)
        assert not hasattr(bpy.types.Scene, "concord")
        assert not hasattr(bpy.types.WindowManager, "concord_job")
        assert not hasattr(bpy.types, "CONCORD_PT_texture")
        assert not hasattr(bpy.types.Scene, "concord_stylize") and not hasattr(bpy.types, "CONCORD_PT_stylize")
        assert "blender_addon" not in bpy.context.preferences.addons


def test_core_imports_without_bpy():
    # the add-on's core is plain Python: a fresh interpreter without bpy imported must load it
    code = (
        "import sys; import blender_addon, blender_addon.core.rigs, blender_addon.core.jobs, "
        "blender_addon.core.packing, blender_addon.core.results, blender_addon.core.camera, "
        "blender_addon.core.stylize; "
        "bad = [m for m in ('bpy', 'torch', 'diffusers', 'concord') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_manifest_fields():
    m = tomllib.loads((ADDON_DIR / "blender_manifest.toml").read_text())
    assert m["id"] == "concord" and m["type"] == "add-on"
    assert m["blender_version_min"] == "4.2.0" and m["license"] == ["SPDX:MIT"]
    assert isinstance(m["permissions"], dict) and {"network", "files"} <= set(m["permissions"])


def test_build_validate_and_install_zip(bpy_module, tmp_path):
    bpy = bpy_module
    tool = _blender_ext(bpy)
    # stray files the zip must not carry
    (ADDON_DIR / "core" / "__pycache__").mkdir(exist_ok=True)
    version = tomllib.loads((ADDON_DIR / "blender_manifest.toml").read_text())["version"]
    run = lambda *args: subprocess.run([sys.executable, str(tool), *args], capture_output=True, text=True)
    r = run("validate", str(ADDON_DIR))
    assert r.returncode == 0, r.stdout + r.stderr
    r = run("build", "--source-dir", str(ADDON_DIR), "--output-dir", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    zpath = tmp_path / f"concord-{version}.zip"
    assert zpath.is_file()
    r = run("validate", str(zpath))
    assert r.returncode == 0, r.stdout + r.stderr
    names = zipfile.ZipFile(zpath).namelist()
    assert "blender_manifest.toml" in names and "core/client.py" in names and "capture/passes.py" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or n.startswith("tests/")]

    bpy.ops.wm.read_factory_settings(use_empty=True)
    result = bpy.ops.extensions.package_install_files(filepath=str(zpath), repo="user_default", enable_on_install=True)
    assert result == {"FINISHED"}
    try:
        assert "bl_ext.user_default.concord" in bpy.context.preferences.addons
        prefs = bpy.context.preferences.addons["bl_ext.user_default.concord"].preferences
        assert prefs.server_url == "http://127.0.0.1:8765"
        assert hasattr(bpy.types.Scene, "concord")
        assert bpy.ops.concord.texture_mesh.poll() in (True, False)
    finally:
        bpy.ops.extensions.package_uninstall(repo_index=_user_repo_index(bpy), pkg_id="concord")
    assert not hasattr(bpy.types.Scene, "concord")


def _user_repo_index(bpy) -> int:
    for i, repo in enumerate(bpy.context.preferences.extensions.repos):
        if repo.module == "user_default":
            return i
    raise AssertionError("no user_default repository")
