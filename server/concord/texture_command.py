"""``concord texture MESH --prompt TEXT --out DIR``: texture a mesh from a prompt, in-process or on a server.

What it is for: the Blender-free way to run the `texture` job (`concord.pipelines.texture`) on a mesh file. Steps:
load and validate the mesh (`load_mesh`; ``--unwrap`` replaces its UVs with xatlas'), frame the camera rig around
its bounding sphere (``--rig zero123pp`` or ``orbit:N``, in the mesh file's own frame), render the ViewSet
(`render_views`), then either run the job here (``load_model`` + a `JobContext` with a progress line on stderr,
into a temp folder that is moved into ``--out`` only when the job succeeded) or submit it to a running server
(``--server URL``, through the add-on's stdlib client) and download the result. Writes into ``--out``:

- ``textured.glb``    the mesh with its UVs and the generated base-colour texture
- ``texture.png``, ``coverage.png``, ``grid.png``, ``views/view_XX.png``, ``transforms.json`` (the rig, in the
  mesh file's coordinates: edit views and re-bake with ``concord bake MESH --transforms DIR/transforms.json``),
  ``metrics.json`` (coverage, cross-view disagreement, timings, options, and under ``settings`` the view size,
  steps, guidance and texture size used, each with its source: ``user`` or ``model``)

Settings left unset (``--view-size``, ``--steps``, ``--guidance``, ``--texture-size``) are the model's recommended
ones (`concord.models.recommended`): from the registry for ``--model`` in-process (nothing is loaded to read them),
from the server's ``/v1/health`` with ``--server``. Steps, guidance and texture size are left out of the job's
request, so the job itself fills them from the model it runs; the view size is needed before rendering, so the
command picks it.

What it must never do: print a traceback for a user's mistake (bad mesh, unknown rig, unreachable server, a model
that cannot load): those are one ``concord texture: error: ...`` line and exit code 1; import bpy.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from concord.models.registry import DEFAULT_MODEL

__all__ = [
    "add_arguments", "main_from_args", "main", "run_texture", "build_params", "describe_settings", "TextureCommandError",
]


class TextureCommandError(ValueError):
    """A user-facing problem with the command's inputs."""


def build_params(args: argparse.Namespace) -> dict:
    """The `TextureParams` dict (the protocol's JSON) from the parsed arguments."""
    params = {
        "prompt": args.prompt,
        "negative_prompt": args.negative or "",
        "seed": args.seed,
        "steps": args.steps,  # None: the model's recommended (filled by the job)
        "guidance": args.guidance,
        "texture_size": args.texture_size,
        "consistency": {
            "grid": bool(args.grid),
            "shared_attention": "off" if args.no_shared_attention else "all",
            "uv_sync": not args.no_uv_sync,
            "uv_noise": not args.no_uv_noise,
            "loss_guidance": bool(args.loss_guidance),
            # None: the model's recommended strength (filled by the job)
            "attention_correspondence": args.attention_correspondence,
        },
    }
    from concord.api.schemas import TextureParams
    from pydantic import ValidationError

    try:
        TextureParams.model_validate(params)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise TextureCommandError(f"invalid option {where}: {err['msg']}") from None
    return params


class _ProgressLine:
    """A one-line progress display on stderr (tqdm when installed, else plain text)."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.stage = None
        self.bar = None
        try:
            import tqdm  # noqa: F401

            self._tqdm = True
        except ImportError:
            self._tqdm = False

    def __call__(self, stage: str, step: int, total: int, message: str = "") -> None:
        if stage != self.stage:
            self.close()
            self.stage = stage
            if self._tqdm and total:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=stage, file=self.stream, leave=False)
            elif not self._tqdm:
                print(f"concord texture: {stage}" + (f" ({total} steps)" if total else ""), file=self.stream, flush=True)
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _render(mesh_path: str, rig_spec: str, size: int, unwrap: bool):
    from concord.geometry.mesh import load_mesh
    from concord.geometry.render import render_views
    from concord.geometry.rigs import parse_rig

    mesh = load_mesh(mesh_path, unwrap="always" if unwrap else False)
    rig = parse_rig(rig_spec).with_frame(mesh.up, mesh.front)
    center, radius = mesh.bounding_sphere()
    cams = rig.cameras(center, radius, size, size)
    views = render_views(mesh, [(c.K, c.world_to_camera) for c in cams], size, size)
    seen = views.mask.reshape(len(cams), -1).any(axis=1)
    if not seen.all():
        raise TextureCommandError(f"views {list(map(int, (~seen).nonzero()[0]))} of rig {rig_spec!r} do not see the mesh")
    views.validate()
    return mesh, views


def run_texture(args: argparse.Namespace, progress=None) -> dict:
    """Run the command; returns {"paths": {...}, "metrics": {...}}. Raises user-facing errors (see main_from_args)."""
    import json

    from concord.geometry.bake_command import write_textured_glb

    if args.views_size is not None and (args.views_size % 8 or not 64 <= args.views_size <= 1024):
        raise TextureCommandError(f"--view-size must be a multiple of 8 in 64..1024, got {args.views_size}")
    params = build_params(args)
    client = None
    if args.server:
        from blender_addon.core.client import ConcordClient

        client = ConcordClient(args.server, token=args.token)
        health = client.health()
        model_name, recommended = health["model"], health["recommended"]
    else:
        from concord.models.registry import ModelUnavailable, offline_status, recommended_for

        ok, reason = offline_status(args.model, args.config)
        if not ok:  # before rendering: say so at once
            raise ModelUnavailable(f"Model {args.model!r} cannot load: {reason}")
        model_name, recommended = args.model, recommended_for(args.model).as_dict()
    size = args.views_size if args.views_size is not None else int(recommended["view_size"])
    view_size = {"value": size, "source": "user" if args.views_size is not None else "model"}
    if size > recommended["max_view_size"]:
        print(
            f"concord texture: note: {size} px views are larger than model {model_name!r} is meant for (up to "
            f"{recommended['max_view_size']} px; recommended {recommended['view_size']} px): this will be slow",
            file=sys.stderr,
        )
    mesh, views = _render(args.mesh, args.rig, size, args.unwrap)
    from concord.geometry.metrics import surface_arrays

    arrays = {**views.to_npz_dict(), **surface_arrays(mesh)}  # the triangles: coverage over the UV islands
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = progress or _ProgressLine()
    try:
        if client is not None:
            _run_remote(client, params, arrays, out, progress)
        else:
            _run_local(args, params, arrays, out, progress)
    finally:
        if hasattr(progress, "close"):
            progress.close()

    from PIL import Image
    import numpy as np

    texture = np.asarray(Image.open(out / "texture.png").convert("RGB"), dtype=np.float32) / 255.0
    write_textured_glb(mesh, texture, out / "textured.glb")
    metrics = json.loads((out / "metrics.json").read_text())
    metrics.setdefault("settings", {})["view_size"] = view_size  # only the client knows where the size came from
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    names = ("textured.glb", "texture.png", "grid.png", "views", "transforms.json", "metrics.json")
    return {"paths": {n: str(out / n) for n in names}, "metrics": metrics}


def _move_into(src: Path, dst: Path) -> None:
    for p in src.iterdir():
        target = dst / p.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        shutil.move(str(p), str(target))


def _run_local(args, params: dict, arrays: dict, out: Path, progress) -> None:
    from concord.api.arrays import validate_arrays
    from concord.api.schemas import TextureParams
    from concord.jobs.context import JobContext
    from concord.models.registry import load_model
    from concord.pipelines import texture

    p = TextureParams.model_validate(params)
    arrays = validate_arrays(arrays, texture.ARRAYS)
    texture.check_inputs(p, arrays)
    progress("loading model", 0, 0, "")
    model = load_model(args.model, args.device, config=args.config)
    with tempfile.TemporaryDirectory(prefix="concord-texture-", dir=out) as tmp:
        ctx = JobContext(Path(tmp), progress, threading.Event())
        texture.run(model, p, arrays, ctx)
        _move_into(Path(tmp), out)


def _run_remote(client, params: dict, arrays: dict, out: Path, progress) -> None:
    job_id = client.submit("texture", params, arrays)
    client.wait(job_id, on_progress=lambda pr: progress(pr.stage, pr.step, pr.total, pr.message), poll=0.2)
    with tempfile.TemporaryDirectory(prefix="concord-texture-", dir=out) as tmp:
        client.download_result(job_id, Path(tmp))
        _move_into(Path(tmp), out)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``concord texture`` (added to the CLI's subparser)."""
    parser.add_argument("mesh", help="mesh file (.glb, .gltf, .obj, .ply) with UVs, or use --unwrap")
    parser.add_argument("--prompt", required=True, help="what the surface should look like")
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--rig", default="zero123pp", help="camera rig: zero123pp (six views) or orbit:N")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model preset, diffusers folder or .safetensors (in-process; default {DEFAULT_MODEL})")
    parser.add_argument("--config", default=None, metavar="DIR",
                        help="for a .safetensors --model: a diffusers folder of its family with the configuration files (in-process)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (in-process)")
    parser.add_argument("--server", default=None, help="run on a Concord server at this URL instead of in-process")
    parser.add_argument("--token", default=None, help="the server's token, if it needs one")
    parser.add_argument("--out", default="out/texture", help="output folder (created)")
    model_default = " (default: the model's recommended; `concord models -v` lists them)"
    parser.add_argument("--view-size", "--views-size", dest="views_size", type=int, default=None,
                        help="view width = height in pixels" + model_default)
    parser.add_argument("--texture-size", type=int, default=None, help="texture width = height" + model_default)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps" + model_default)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale, <=1: off" + model_default)
    parser.add_argument("--grid", action="store_true", help="tile the views into one image (Zero123++ grid)")
    parser.add_argument("--no-shared-attention", action="store_true", help="views do not attend to each other")
    parser.add_argument("--attention-correspondence", type=float, default=None, metavar="BETA",
                        help="shared attention's bonus on other views' tokens showing the same surface point (0: plain)"
                        + model_default)
    parser.add_argument("--no-uv-sync", action="store_true", help="do not average the views in UV space")
    parser.add_argument("--no-uv-noise", action="store_true", help="independent initial noise per view")
    parser.add_argument("--loss-guidance", action="store_true", help="SyncDiffusion guidance (slow)")
    parser.add_argument("--unwrap", action="store_true", help="replace the mesh's UVs with new ones (xatlas)")
    return parser


def main_from_args(args: argparse.Namespace) -> int:
    """Run ``concord texture``; print where the results are, or one error line. Returns the exit code."""
    from concord.geometry.mesh import MeshError
    from concord.geometry.rigs import RigError
    from concord.geometry.transforms_json import TransformsError
    from concord.jobs.context import JobInputError
    from concord.models.registry import ModelUnavailable

    from blender_addon.core.client import ServerError

    t0 = time.perf_counter()
    try:
        res = run_texture(args)
    except (MeshError, RigError, TextureCommandError, TransformsError, ModelUnavailable, ServerError) as exc:
        print(f"concord texture: error: {exc}", file=sys.stderr)
        return 1
    except JobInputError as exc:
        hint = f" ({exc.hint})" if exc.hint else ""
        print(f"concord texture: error: {exc}{hint}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"concord texture: error: cannot write the output: {exc}", file=sys.stderr)
        return 1
    m = res["metrics"]
    d = m["cross_view_disagreement"]["mean_abs_difference"]
    print(
        f"textured {Path(args.mesh).name}: {m['views']} views of {m['view_size'][0]}x{m['view_size'][1]} into "
        f"{m['texture_size']}x{m['texture_size']}, {_coverage_text(m)}, cross-view disagreement "
        f"{d if d is None else round(d, 4)} ({time.perf_counter() - t0:.1f} s)"
    )
    print(f"  settings         {describe_settings(m)}")
    for name, path in res["paths"].items():
        print(f"  {name:16s} {path}")
    return 0


def _coverage_text(m: dict) -> str:
    """`coverage 97.3% of the UV islands` (the share of island texels some view sees), or why it is unknown."""
    cov = m.get("coverage")
    if cov is None:
        return "coverage unknown (the job got no triangles)"
    return f"coverage {100 * cov:.1f}% of the UV islands"


def describe_settings(metrics: dict) -> str:
    """`view size 128 (model's), steps 20 (model's), guidance 2 (model's), texture 512 (set)` from metrics.json."""
    labels = (("view_size", "view size"), ("steps", "steps"), ("guidance", "guidance"), ("texture_size", "texture"),
              ("consistency.attention_correspondence", "attention correspondence"))
    settings = metrics.get("settings") or {}
    parts = []
    for key, label in labels:
        s = settings.get(key)
        if s:
            origin = f"model {metrics.get('model')}'s" if s["source"] == "model" else "set"
            parts.append(f"{label} {s['value']:g} ({origin})")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="concord texture", description=__doc__.split("\n")[0]))
    return main_from_args(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
