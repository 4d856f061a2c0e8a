"""Where a job's results go on disk, and what the add-on reads back from them (metrics.json).

Results are written beside the .blend (``//concord/<object>_<timestamp>/``) or, for a file never saved, into
a temporary folder, BEFORE the scene changes: a crash while applying never loses the texture.

Layer rule: plain Python. No bpy, no torch, no server package.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path

RESULT_FILES = ("texture.png", "coverage.png", "grid.png", "transforms.json", "metrics.json")


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
        root = Path(temp_root or tempfile.gettempdir()) / "concord"
    base = root / f"{safe_name(object_name)}_{stamp}"
    path, i = base, 1
    while path.exists():
        path = base.with_name(f"{base.name}-{i}")
        i += 1
    return path


def read_metrics(out_dir: Path) -> dict:
    p = Path(out_dir) / "metrics.json"
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except ValueError:
        return {}
