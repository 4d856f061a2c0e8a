"""Result folders (blender_addon/core/results.py): where a job's files go, and moving them out of the temp folder
when an unsaved .blend is first saved. Plain Python, no bpy (the save handler that calls this is tested with the
bpy wheel in tests/blender/test_addon_scenes_results.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from blender_addon.core import results


def _job_folder(root: Path, name="Suzanne_20260101-120000") -> Path:
    folder = results.temp_results_root(str(root)) / name
    (folder / "views").mkdir(parents=True)
    (folder / "texture.png").write_bytes(b"png")
    (folder / "views" / "view_00.png").write_bytes(b"view")
    return folder


def test_unsaved_file_results_go_to_the_temp_root_and_are_recognised(tmp_path):
    out = results.result_folder("", "Suzanne", now=0, temp_root=str(tmp_path))
    assert out.parent == tmp_path / "concord"
    folder = _job_folder(tmp_path)
    assert results.temporary_job_folder(folder / "views" / "view_00.png", str(tmp_path)) == folder.resolve()
    assert results.temporary_job_folder(folder, str(tmp_path)) == folder.resolve()
    assert results.temporary_job_folder(tmp_path / "elsewhere" / "texture.png", str(tmp_path)) is None
    assert results.temporary_job_folder(results.temp_results_root(str(tmp_path)), str(tmp_path)) is None


def test_relocate_copies_beside_the_blend_keeps_the_original_and_never_overwrites(tmp_path):
    folder = _job_folder(tmp_path / "temp")
    blend = tmp_path / "project" / "scene.blend"
    blend.parent.mkdir()
    new = results.relocate_result(folder, str(blend))
    assert new == (blend.parent / "concord" / folder.name).resolve()
    assert (new / "texture.png").read_bytes() == b"png" and (new / "views" / "view_00.png").read_bytes() == b"view"
    assert (folder / "texture.png").is_file(), "the original stays (an undo may still point at it)"
    again = results.relocate_result(folder, str(blend))  # the name is taken: a suffix, nothing overwritten
    assert again != new and again.name.startswith(folder.name) and (again / "texture.png").is_file()
    assert not list((blend.parent / "concord").glob("*.partial"))


def test_relocate_a_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no longer exists"):
        results.relocate_result(tmp_path / "gone", str(tmp_path / "scene.blend"))
