"""Measure what each consistency mechanism buys: the texture job run with switches on and off, same seeds.

MATH.md section 6's cross-view disagreement (each view baked alone into UV; over texels seen by two or more
views, the mean absolute difference between views, sRGB 0..1) of the final generated views, for:

  independent        every view generated on its own (no shared attention, no UV sync, iid noise)
  shared attention   extended self-attention across all views only (plain: no correspondence weighting)
  correspondence     shared attention with correspondence weighting (attention_correspondence = CORRESPONDENCE)
  UV sync            UV-space synchronisation of the predicted clean latents only
  both               shared attention + UV sync
  all                both + UV-space initial noise
  (both and all run shared attention as the model recommends it: with its correspondence strength)
  grid               grid stacking (Zero123++; every view a cell of one canvas, ordinary self-attention over it) only

Used by `bench/consistency.py` (a table and JSON) and the consistency tests (bounds on the ratios). Runs the
real job code in-process; writes only into the folder it is given.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np

#: The correspondence-weighting strength (beta) the "correspondence" row runs at: the strongest micro was trained
#: with (``concord train-micro --correspondence 0,4,8``).
CORRESPONDENCE = 8.0

CONFIGS: dict[str, dict] = {
    "independent": {"shared_attention": "off", "uv_sync": False, "uv_noise": False},
    "shared attention": {"shared_attention": "all", "uv_sync": False, "uv_noise": False, "attention_correspondence": 0.0},
    "correspondence": {"shared_attention": "all", "uv_sync": False, "uv_noise": False,
                       "attention_correspondence": CORRESPONDENCE},
    "UV sync": {"shared_attention": "off", "uv_sync": True, "uv_noise": False},
    "both": {"shared_attention": "all", "uv_sync": True, "uv_noise": False},
    "all": {"shared_attention": "all", "uv_sync": True, "uv_noise": True},
    "grid": {"shared_attention": "all", "grid": True, "uv_sync": False, "uv_noise": False},
}


#: Held-out procedural objects: meshes the micro model never saw as meshes (its training renders exact SDFs of its
#: own primitives), unwrapped by xatlas, with prompts of its grammar. (name, trimesh constructor, prompt)
PROCEDURAL_OBJECTS = (
    ("box", lambda tm: tm.creation.box(extents=(1.0, 0.8, 1.2)), "a blue and white checker box"),
    ("capsule", lambda tm: tm.creation.capsule(height=0.9, radius=0.45, count=[24, 24]), "a green and black dots capsule"),
    ("cylinder", lambda tm: tm.creation.cylinder(radius=0.5, height=1.1, sections=32), "a red and yellow checker cylinder"),
)


def procedural_mesh_file(name: str, folder: Path) -> Path:
    """One of PROCEDURAL_OBJECTS written as a GLB (axis of revolution up, +Y as glTF wants) into `folder`."""
    import trimesh

    build = {n: f for n, f, _ in PROCEDURAL_OBJECTS}[name]
    mesh = build(trimesh)
    mesh.apply_transform(trimesh.transformations.rotation_matrix(-np.pi / 2, [1, 0, 0]))  # z-up -> y-up
    path = Path(folder) / f"{name}.glb"
    mesh.export(path)
    return path


def render_fixture_views(mesh_path: str | Path, size: int = 64, rig: str = "zero123pp", unwrap: bool = False):
    """A ViewSet of a mesh file from a rig (the same path `concord texture` takes; `unwrap`: xatlas UVs)."""
    from concord.geometry.mesh import load_mesh
    from concord.geometry.render import render_views
    from concord.geometry.rigs import parse_rig

    mesh = load_mesh(mesh_path, unwrap="always" if unwrap else False)
    cams = parse_rig(rig).with_frame(mesh.up, mesh.front).cameras(*mesh.bounding_sphere(), size, size)
    views = render_views(mesh, [(c.K, c.world_to_camera) for c in cams], size, size)
    return views.validate()


def run_config(model, viewset, prompt: str, consistency: dict, seed: int, steps: int, texture_size: int, out_dir: Path,
               guidance: float = 2.0) -> dict:
    """One texture job in-process; returns its metrics.json."""
    from concord.api.arrays import validate_arrays
    from concord.api.schemas import TextureParams
    from concord.jobs.context import JobContext
    from concord.pipelines import texture

    params = TextureParams(
        prompt=prompt, seed=seed, steps=steps, guidance=guidance, texture_size=texture_size, consistency=consistency
    )
    arrays = validate_arrays(viewset.to_npz_dict(), texture.ARRAYS)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = JobContext(out_dir, lambda *a: None, threading.Event())
    texture.run(model, params, arrays, ctx)
    return json.loads((out_dir / "metrics.json").read_text())


def views_of(out_dir: Path, config: str, seed: int) -> np.ndarray:
    """The generated views (V, H, W, 3) uint8 that `measure(..., out_dir=out_dir)` wrote for one configuration and
    seed."""
    from PIL import Image

    folder = Path(out_dir) / config.replace(" ", "_") / f"seed{seed}" / "views"
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in sorted(folder.glob("view_*.png"))])


def measure(model, viewset, prompt: str, seeds=(0, 1, 2), steps: int = 20, texture_size: int = 256,
            out_dir: Path | None = None, configs: dict[str, dict] | None = None, guidance: float = 2.0) -> list[dict]:
    """Rows {config, disagreement (mean over seeds), per_seed, coverage, seconds} for each configuration."""
    import tempfile

    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="concord-consistency-"))
    rows = []
    for name, switches in (configs or CONFIGS).items():
        per_seed, cover, t0 = [], [], time.perf_counter()
        for seed in seeds:
            m = run_config(model, viewset, prompt, switches, seed, steps, texture_size,
                           out_dir / name.replace(" ", "_") / f"seed{seed}", guidance)
            per_seed.append(m["disagreement"])  # the decoded views' cross-view disagreement (the headline)
            cover.append(m["coverage"])
        rows.append(
            {
                "config": name,
                "disagreement": float(np.mean(per_seed)),
                "per_seed": [round(v, 5) for v in per_seed],
                # the share of UV-island texels the views see; None: these jobs get no triangles (metrics.json)
                "coverage": None if None in cover else float(np.mean(cover)),
                "seconds": round((time.perf_counter() - t0) / len(seeds), 3),
            }
        )
    base = rows[0]["disagreement"]
    for r in rows:
        r["ratio_to_independent"] = r["disagreement"] / base if base > 0 else float("nan")
    return rows
