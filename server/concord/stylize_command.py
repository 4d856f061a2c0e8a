"""``concord stylize INPUT --prompt TEXT --out DIR``: stylize an animation's frames, in-process or on a server.

INPUT is a folder of OpenEXR multilayer frames as Blender writes them with the Combined, Depth and Vector passes,
or a folder of PNG/JPEG frames with an optional ``--depth DIR`` (`concord.frames.io.FrameFolder`). Without motion
vectors, motion comes from OpenCV's DIS optical flow with a forward-backward occlusion check, and metrics.json
says so (``motion_source``). A model conditioned on depth that gets none fails with a message naming the remedy.

In-process (the default) the job works in ``--out`` itself, reading the frames a chunk at a time (memory bounded
by the chunk, not the sequence), writing each finished frame at once (``--out/frames/frame_NNNN.png``, atomically)
and its state after every chunk: an interrupted run continues with ``--resume`` and recomputes no finished frame.
With ``--server URL`` the frames go in one request (up to the job's frame limit) and the result is downloaded.

Writes into ``--out``: ``frames/frame_NNNN.png``, ``metrics.json`` (the temporal warping error per frame and mean,
with the input's as the floor, the correspondence source, settings with their source), and ``preview.mp4`` (input
| stylized, side by side).

Settings left unset (``--steps``, ``--guidance``) are the model's recommended ones (`concord.models.recommended`).

What it must never do: print a traceback for a user's mistake (bad folder, missing passes, unreachable server, a
model that cannot load): those are one ``concord stylize: error: ...`` line and exit code 1; import bpy.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from concord.models.registry import DEFAULT_MODEL

__all__ = ["add_arguments", "main_from_args", "main", "run_stylize", "build_params"]

PROG = "concord stylize"


def build_params(args: argparse.Namespace, motion_source: str) -> dict:
    """The job's params from the command line; unset sampler settings are left out (the model's then apply)."""
    p = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "seed": args.seed,
        "strength": args.strength,
        "keyframes": args.keyframes,
        "noise": args.noise,
        "chunk_frames": args.chunk_frames,
        "motion_source": motion_source,
        "resume": bool(args.resume),
    }
    if args.keyframe_list:
        p["keyframes"] = "explicit"
        p["keyframe_list"] = [int(x) for x in args.keyframe_list.split(",") if x.strip()]
    for name in ("steps", "guidance", "noise_strength"):
        if getattr(args, name) is not None:
            p[name] = getattr(args, name)
    if args.blend:
        p["blending"] = {"weight": args.blend, "until": args.blend_until}
    return p


def run_stylize(args: argparse.Namespace, progress=None) -> dict:
    """Run the command; returns the metrics. Raises user-facing errors (see main_from_args)."""
    from concord.api.schemas import StylizeParams
    from concord.frames.io import FrameFolder
    from concord.jobs.context import JobContext

    from concord.jobs.context import JobInputError

    folder = FrameFolder(args.input, depth_dir=args.depth, allow_flow=not args.no_flow)
    if not folder.has_depth:  # every model Concord runs is depth-conditioned: say so before loading one
        raise JobInputError("the frames have no depth, and the model is conditioned on depth", "depth",
                            "render the Depth pass into the EXR frames, or pass --depth DIR with one .npy or EXR "
                            "depth map per frame")
    params = build_params(args, folder.motion_source)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = progress or (lambda *a: None)
    if args.server:
        metrics = _run_remote(args, folder, params, out, progress)
    else:
        from concord.models.registry import ModelUnavailable, load_model, offline_status
        from concord.pipelines.stylize import stylize

        ok, reason = offline_status(args.model, None)
        if not ok:
            raise ModelUnavailable(f"Model {args.model!r} cannot load: {reason}")
        model = load_model(args.model, args.device)
        ctx = JobContext(out, progress, threading.Event())
        metrics = stylize(model, StylizeParams(**params), folder, out, ctx)
    _write_preview(folder, out, params_first_frame=0, fps=args.fps)
    return metrics


def _run_remote(args, folder, params: dict, out: Path, progress) -> dict:
    import json

    from blender_addon.core.client import ConcordClient
    from concord.pipelines.stylize import MAX_FRAMES

    if len(folder) > MAX_FRAMES:
        from concord.frames.frameset import FrameSetError

        raise FrameSetError(f"{len(folder)} frames, more than one request's limit of {MAX_FRAMES}", "image",
                            "run in-process (without --server), which streams any number of frames")
    fs, _valid = folder.read(0, len(folder))
    client = ConcordClient(args.server, token=args.token)
    client.health()
    job_id = client.submit("stylize", {k: v for k, v in params.items() if k != "resume"}, fs.to_arrays())
    client.wait(job_id, on_progress=lambda pr: progress(pr.stage, pr.step, pr.total, pr.message), poll=0.2)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        client.download_result(job_id, Path(tmp))
        for item in Path(tmp).iterdir():
            dst = out / item.name
            if dst.is_dir():
                shutil.rmtree(dst)
            shutil.move(str(item), dst)
    return json.loads((out / "metrics.json").read_text())


def _write_preview(folder, out: Path, params_first_frame: int, fps: int) -> None:
    """preview.mp4: input | stylized, a frame at a time."""
    from PIL import Image

    from concord.frames.io import PreviewWriter
    from concord.pipelines.stylize import frame_name

    with PreviewWriter(out / "preview.mp4", fps=fps) as pv:
        for i in range(len(folder)):
            fs, _ = folder.read(i, i + 1)
            src = fs.image[0] if fs.image.dtype == np.uint8 else (fs.image_float(0) * 255).round().astype(np.uint8)
            pv.add(src, np.asarray(Image.open(out / "frames" / frame_name(params_first_frame + i)).convert("RGB")))


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("input", help="a folder of multilayer EXR frames (Combined, Depth, Vector) or PNG/JPEG frames")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--out", required=True, help="output folder: frames/, metrics.json, preview.mp4")
    parser.add_argument("--depth", default=None, metavar="DIR", help="depth maps for PNG/JPEG frames (.npy planar z or EXR)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model preset, diffusers folder or .safetensors (in-process; default {DEFAULT_MODEL})")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (in-process)")
    parser.add_argument("--strength", type=float, default=0.7, help="img2img strength in (0, 1] (default 0.7)")
    parser.add_argument("--keyframes", default="first+previous", choices=["none", "first", "middle", "first+previous"],
                        help="cross-frame attention (default first+previous)")
    parser.add_argument("--keyframe-list", default=None, metavar="I,J,...", help="explicit keyframes (0-based frame indices)")
    parser.add_argument("--noise", default="warped", choices=["iid", "shared", "mixed", "progressive", "warped"],
                        help="initial noise across frames (default warped)")
    parser.add_argument("--noise-strength", type=float, default=None, help="r for warped (0..1), a for mixed/progressive")
    parser.add_argument("--blend", type=float, default=0.0, help="latent blending weight (0 = off)")
    parser.add_argument("--blend-until", type=float, default=0.5, help="fraction of the steps blending applies to")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-frames", type=int, default=8, help="frames denoised together (default 8)")
    parser.add_argument("--no-flow", action="store_true", help="refuse frames without motion vectors instead of estimating optical flow")
    parser.add_argument("--fps", type=int, default=12, help="the preview's frame rate")
    parser.add_argument("--server", default=None, metavar="URL", help="run on a Concord server instead of in-process")
    parser.add_argument("--token", default=None, help="the server's token, if it has one")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out (same inputs)")
    return parser


def main_from_args(args: argparse.Namespace) -> int:
    from blender_addon.core.client import ServerError
    from concord.frames.frameset import FrameSetError
    from concord.jobs.context import JobInputError
    from concord.models.registry import ModelUnavailable
    from concord.texture_command import _ProgressLine

    t0 = time.perf_counter()
    bar = _ProgressLine()
    try:
        m = run_stylize(args, progress=bar)
    except (FrameSetError, ModelUnavailable, ServerError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except JobInputError as exc:
        hint = f" ({exc.hint})" if exc.hint else ""
        print(f"{PROG}: error: {exc}{hint}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{PROG}: error: cannot read or write: {exc}", file=sys.stderr)
        return 1
    finally:
        bar.close()
    we, floor = m["warping_error"]["mean"], m["input_warping_error"]["mean"]
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    print(f"stylized {m['frames']} frames of {m['frame_size'][0]}x{m['frame_size'][1]}: warping error {fmt(we)} "
          f"(input {fmt(floor)}; motion from {m['motion_source']}) in {time.perf_counter() - t0:.1f} s")
    out = Path(args.out)
    print(f"  frames           {out / 'frames'}")
    print(f"  preview          {out / 'preview.mp4'}")
    print(f"  metrics          {out / 'metrics.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from concord.models.registry import quiet_libraries

    quiet_libraries()
    parser = argparse.ArgumentParser(prog=PROG, description="stylize an animation's frames consistently")
    add_arguments(parser)
    return main_from_args(parser.parse_args(argv))
