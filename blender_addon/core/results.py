"""Where a job's results go on disk, and what the add-on reads back from them (metrics.json).

Results are written beside the .blend (``//concord/<object>_<timestamp>/``) or, for a file never saved, into
``<system temp>/concord/<object>_<timestamp>/``, BEFORE the scene changes: a crash while applying never loses
the texture. The temp folder does not outlive the machine's clean-ups, so when such a file is first saved the
add-on copies each job folder it uses beside the .blend (``relocate_result``, called from a save handler in
``ops.apply``) and points the images there.

Layer rule: plain Python. No bpy, no torch, no server package.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path


def safe_name(name: str) -> str:
    """An object name as a folder name: letters, digits, '-', '_' and '.' kept, the rest '_'."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return s or "object"


def result_folder(blend_filepath: str, object_name: str, now: float | None = None, temp_root: str | None = None) -> Path:
    """``<blend dir>/concord/<object>_<YYYYmmdd-HHMMSS>`` or ``<temp>/concord/...`` for an unsaved file.

    A numeric suffix keeps two jobs started in the same second apart."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))
    if blend_filepath:
        root = Path(blend_filepath).resolve().parent / "concord"
    else:
        root = temp_results_root(temp_root)
    return reserve_folder(root / f"{safe_name(object_name)}_{stamp}")


def reserve_folder(base: Path) -> Path:
    """Create and return ``base``, or ``base-1``, ``base-2``, ... if taken: the folder is made here, with one atomic
    ``mkdir`` per try, so two jobs (or two Blender sessions sharing the temp folder) started in the same second never
    pick the same folder. It starts empty; :func:`discard_if_empty` removes it again if the job gives nothing."""
    base.parent.mkdir(parents=True, exist_ok=True)
    path, i = base, 1
    while True:
        if not path.with_name(path.name + ".partial").exists():
            try:
                path.mkdir()
                return path
            except FileExistsError:
                pass
        path = base.with_name(f"{base.name}-{i}")
        i += 1


def discard_if_empty(folder: str | Path) -> None:
    """Remove a reserved result folder that stayed empty (the job failed or was cancelled); keep anything else."""
    try:
        Path(folder).rmdir()
    except OSError:  # not empty, already gone, or not ours to remove
        pass


def temp_results_root(temp_root: str | None = None) -> Path:
    """Where results of a file never saved go: ``<system temp>/concord``."""
    return Path(temp_root or tempfile.gettempdir()) / "concord"


def temporary_job_folder(path: str | Path, temp_root: str | None = None) -> Path | None:
    """The job folder (a direct child of ``temp_results_root``) that holds ``path``, or None if ``path`` is
    not inside the temp results root."""
    root = temp_results_root(temp_root).resolve()
    try:
        rel = Path(path).resolve().relative_to(root)
    except ValueError:
        return None
    return root / rel.parts[0] if rel.parts else None


def relocate_result(folder: str | Path, blend_filepath: str) -> Path:
    """Copy a job folder into ``<blend dir>/concord/<same name>`` (a ``-N`` suffix if that name is taken) and
    return the new folder. The copy is made in ``<name>.partial`` and renamed into place, so a half-made copy
    never looks like a result. The original stays where it was (an undo may still point at it)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"the result folder {folder} no longer exists")
    target = reserve_folder(Path(blend_filepath).resolve().parent / "concord" / folder.name)
    partial = target.with_name(target.name + ".partial")
    try:
        shutil.copytree(folder, partial)
        target.rmdir()  # the reserved, empty folder makes way for the complete copy
        os.replace(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        discard_if_empty(target)
        raise
    return target


def read_metrics(out_dir: Path) -> dict:
    p = Path(out_dir) / "metrics.json"
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except ValueError:
        return {}
