"""``concord bake MESH --transforms transforms.json --out DIR``: bake photos or renders onto a mesh's UVs.

What it is for: the Blender-free back-projection path (MATH.md section 5). The views come with their cameras
in a nerfstudio / instant-ngp ``transforms.json`` (:mod:`concord.geometry.transforms_json`), in the MESH FILE's
own coordinates; the texture job writes its rig in the same format, so users can edit or replace views and
re-bake. Steps: load and validate the mesh (:func:`concord.geometry.mesh.load_mesh`; ``--unwrap`` replaces
its UVs by xatlas'), render correspondence maps for every camera at the images' size
(:func:`concord.geometry.render.render_views`), back-project (:func:`concord.geometry.bake.bake_views`),
measure (:mod:`concord.geometry.metrics`) and write into ``--out``:

- ``texture.png``   the baked base colour, sRGB, row 0 = top (Blender UV convention)
- ``coverage.png``  white where some view sees the texel's surface point, grey on the UV islands where no view
  does (the colour there is guessed by the fill), black outside the islands
- ``textured.glb``  the mesh with its UVs and a PBR material whose baseColorTexture is ``texture.png``
  (glTF is Y-up: a Z-up source such as PLY/STL is rotated the way Blender's glTF exporter does)
- ``metrics.json``  coverage (the share of UV-island texels the views see, :func:`concord.geometry.metrics.
  surface_coverage`), cross-view disagreement, texture size, view count, timings, warnings

The lead's CLI wires :func:`add_arguments` / :func:`main_from_args` into ``concord bake``.

What it must never do: import bpy or torch; print a traceback for a user's mistake (bad mesh, bad
transforms.json, unwritable folder): those are one ``concord bake: error: ...`` line and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from concord.geometry import bake as B
from concord.geometry.mesh import Mesh, MeshError, load_mesh
from concord.geometry.metrics import (
    coverage_image,
    coverage_metrics,
    cross_view_disagreement,
    surface_arrays,
    surface_coverage,
)
from concord.geometry.render import render_views
from concord.geometry.transforms_json import TransformsError, read_transforms_json

__all__ = ["run_bake", "add_arguments", "main_from_args", "BakeCommandError", "write_textured_glb"]

MAX_TEXTURE_SIZE = 16384

# glTF is Y-up; Blender's glTF exporter maps Blender/Z-up (x, y, z) to (x, z, -y).
_Y_UP_FROM_Z_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


class BakeCommandError(ValueError):
    """A problem with the bake's inputs that is neither the mesh's nor the transforms.json's."""


def write_textured_glb(mesh: Mesh, texture: np.ndarray, path: str | Path) -> Path:
    """Write the mesh (its UVs kept) with a PBR material whose baseColorTexture is ``texture`` (S,S,3) sRGB."""
    import trimesh
    from PIL import Image
    from trimesh.visual.material import PBRMaterial
    from trimesh.visual.texture import TextureVisuals

    image = Image.fromarray(B.to_uint8(texture))
    vertices, normals = mesh.vertices, mesh.normals
    if tuple(mesh.up) == (0.0, 0.0, 1.0):
        vertices = vertices @ _Y_UP_FROM_Z_UP.T
        normals = normals @ _Y_UP_FROM_Z_UP.T
    material = PBRMaterial(baseColorTexture=image, metallicFactor=0.0, roughnessFactor=1.0, doubleSided=False)
    tm = trimesh.Trimesh(
        vertices=vertices,
        faces=mesh.faces,
        vertex_normals=normals,
        visual=TextureVisuals(uv=mesh.uv, material=material),
        process=False,
    )
    path = Path(path)
    tm.export(path, file_type="glb")
    return path


def run_bake(
    mesh_path: str | Path,
    transforms_path: str | Path,
    out_dir: str | Path,
    texture_size: int = 2048,
    unwrap: bool = False,
    *,
    cos_power: float = B.DEFAULT_COS_POWER,
    edge_falloff_px: float = B.DEFAULT_EDGE_FALLOFF_PX,
    padding: int = B.DEFAULT_PADDING,
    splat: str = "bilinear",
) -> dict:
    """Bake the images of ``transforms_path`` onto the mesh; write the outputs into ``out_dir``.

    ``unwrap``: replace the mesh's UVs with xatlas' (needed when it has none, or when its UVs overlap, e.g.
    every face of BoxTextured maps to the same square). Returns a dict with the output ``paths``, the
    ``metrics`` written to metrics.json and the ``masks`` bool (S,S): ``baked`` (texels view pixels were
    splatted into), ``seen`` and ``islands`` (:class:`concord.geometry.metrics.SurfaceCoverage`). Raises
    MeshError, TransformsError or BakeCommandError (all ValueError) for bad inputs, OSError when the output
    cannot be written.
    """
    timings: dict[str, float] = {}
    warnings_out: list[str] = []
    if not (isinstance(texture_size, (int, np.integer)) and 1 <= texture_size <= MAX_TEXTURE_SIZE):
        raise BakeCommandError(f"--texture-size must be a whole number in 1..{MAX_TEXTURE_SIZE}, got {texture_size}")
    t0 = time.perf_counter()
    transforms = read_transforms_json(transforms_path)
    transforms.check_same_size()
    images = transforms.load_images()
    timings["read_transforms_and_images_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    mesh = load_mesh(mesh_path, unwrap="always" if unwrap else False)
    warnings_out += list(mesh.warnings)
    timings["load_mesh_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    width, height = transforms.width, transforms.height
    cameras = list(zip(transforms.intrinsics.astype(np.float64), transforms.world_to_camera.astype(np.float64)))
    views = render_views(mesh, cameras, width, height)
    timings["render_views_s"] = time.perf_counter() - t0
    seen = views.mask.reshape(len(cameras), -1).any(axis=1)
    if not seen.any():
        raise BakeCommandError(
            f"none of the {len(cameras)} cameras in {transforms.path} sees the mesh (are the matrices in the "
            "mesh file's coordinates, camera-to-world, OpenGL camera axes?)"
        )
    if not seen.all():
        for i in np.flatnonzero(~seen):
            warnings_out.append(f"view {i} ({transforms.frames[i].file_path}) does not see the mesh: skipped")
        keep = np.flatnonzero(seen)
        views = views.subset(keep)
        images = images[keep]
    views.validate()

    t0 = time.perf_counter()
    index = B.build_texel_index(
        views, texture_size, splat=splat, cos_power=cos_power, edge_falloff_px=edge_falloff_px
    )
    timings["texel_index_s"] = time.perf_counter() - t0
    result = B.bake_views(views, images, texture_size, index=index, padding=padding)
    timings["bake_s"] = sum(result.timings.values())

    t0 = time.perf_counter()
    disagreement = cross_view_disagreement(index, images)
    timings["metrics_s"] = time.perf_counter() - t0
    tris = surface_arrays(mesh)
    surface = surface_coverage(views, tris["triangles"], tris["triangle_uv"], texture_size)
    timings["coverage_s"] = surface.seconds

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    t0 = time.perf_counter()
    paths = {
        "texture": out / "texture.png",
        "coverage": out / "coverage.png",
        "mesh": out / "textured.glb",
        "metrics": out / "metrics.json",
    }
    Image.fromarray(B.to_uint8(result.texture)).save(paths["texture"])
    Image.fromarray(coverage_image(result.coverage, surface)).save(paths["coverage"])
    write_textured_glb(mesh, result.texture, paths["mesh"])
    timings["write_s"] = time.perf_counter() - t0

    metrics = {
        "texture_size": int(texture_size),
        "view_count": int(views.num_views),
        "image_size": [int(width), int(height)],
        **coverage_metrics(result.coverage, surface),
        "cross_view_disagreement": disagreement.as_dict(),
        "settings": {
            "cos_power": cos_power,
            "edge_falloff_px": edge_falloff_px,
            "padding": padding,
            "splat": splat,
            "unwrap": bool(unwrap),
        },
        "mesh": {"source": str(mesh_path), "faces": mesh.num_faces, "vertices": mesh.num_vertices},
        "timings_s": {k: round(v, 4) for k, v in {**timings, **result.timings}.items()},
        "warnings": warnings_out,
    }
    paths["metrics"].write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    masks = {"baked": result.coverage, "seen": surface.seen, "islands": surface.islands}
    return {"paths": {k: str(v) for k, v in paths.items()}, "metrics": metrics, "masks": masks}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``concord bake`` (added to the lead's subparser)."""
    parser.add_argument("mesh", help="mesh file (.glb, .gltf, .obj, .ply) with UVs, or use --unwrap")
    parser.add_argument(
        "--transforms",
        required=True,
        help="nerfstudio/instant-ngp transforms.json: images + camera-to-world matrices in the mesh file's "
        "coordinates",
    )
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--texture-size", type=int, default=2048, help="texture width = height (default 2048)")
    parser.add_argument(
        "--unwrap", action="store_true", help="replace the mesh's UVs with new ones (xatlas); needed without UVs"
    )
    parser.add_argument(
        "--cos-power", type=float, default=B.DEFAULT_COS_POWER,
        help=f"view weight cos(theta)^g, g (default {B.DEFAULT_COS_POWER:g}); higher favours frontal views",
    )
    parser.add_argument(
        "--edge-falloff", type=float, default=B.DEFAULT_EDGE_FALLOFF_PX,
        help=f"pixels over which silhouettes/occlusion edges fade in (default {B.DEFAULT_EDGE_FALLOFF_PX:g})",
    )
    parser.add_argument(
        "--padding", type=int, default=B.DEFAULT_PADDING,
        help=f"texels of padding around UV islands (default {B.DEFAULT_PADDING})",
    )
    parser.add_argument("--splat", choices=("bilinear", "nearest"), default="bilinear", help=argparse.SUPPRESS)
    return parser


def main_from_args(args: argparse.Namespace) -> int:
    """Run ``concord bake`` from parsed arguments; print a summary or one error line. Returns the exit code."""
    try:
        res = run_bake(
            args.mesh,
            args.transforms,
            args.out,
            texture_size=args.texture_size,
            unwrap=args.unwrap,
            cos_power=args.cos_power,
            edge_falloff_px=args.edge_falloff,
            padding=args.padding,
            splat=getattr(args, "splat", "bilinear"),
        )
    except (MeshError, TransformsError, BakeCommandError) as exc:
        print(f"concord bake: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"concord bake: error: cannot write the output: {exc}", file=sys.stderr)
        return 1
    m = res["metrics"]
    for w in m["warnings"]:
        print(f"concord bake: warning: {w}", file=sys.stderr)
    d = m["cross_view_disagreement"]["mean_abs_difference"]
    print(
        f"baked {m['view_count']} views into {m['texture_size']}x{m['texture_size']}: "
        f"coverage {100 * m['coverage']:.1f}% of the UV islands, "
        f"cross-view disagreement {d:.4f}"
    )
    for name, path in res["paths"].items():
        print(f"  {name:9s} {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m concord.geometry.bake_command``); the CLI uses main_from_args."""
    parser = add_arguments(argparse.ArgumentParser(prog="concord bake", description=__doc__.split("\n")[0]))
    return main_from_args(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
