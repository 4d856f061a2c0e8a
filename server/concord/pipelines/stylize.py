"""Job kind `stylize`: an animation render restyled from a prompt, frame after frame, without flicker.

Inputs: a FrameSet (`concord.frames.frameset`, the array contract: sRGB frames, planar depth, motion to the previous
frame in pixels, optional mask) and `StylizeParams` (`api/schemas.py`). Each frame is an img2img run (SDEdit; the
`strength` share of the schedule, from the noised input frame) through the one sampler loop every job kind shares
(`concord.pipelines.sampler.sample`, ARCHITECTURE rule 11) on a private copy of the model's own scheduler, conditioned
on the frame's depth. What keeps the frames consistent, each a hook or an input of that loop:

- **keyframe attention** (`concord.attention.keyframe`): every frame's self-attention also reads the keyframes'
  keys/values (first: Text2Video-Zero; middle: FateZero; an explicit list) and, with first+previous, its previous
  frame's (Pix2Video). The keyframes are denoised first and their keys/values recorded once per (layer, step).
- **initial noise** (`concord.noise.frame_stream`): iid | shared | mixed(a) | progressive(a) | warped(r) -- warped
  carries each frame's noise along Blender's exact motion vectors (Kass & Pesare 2011), white within a frame.
- **latent blending** (Rerender-A-Video, Yang et al. SIGGRAPH Asia 2023; FRESCO, Yang et al. CVPR 2024): in the
  early steps, the previous frame's clean-latent prediction at the same step, carried along the motion, is blended
  into the current one where the correspondence is valid (the `after_x0` hook):
      x0_i(p) <- (1 - w) x0_i(p) + w x0_{i-1}(p')      for valid p, step index < until * steps.

Long sequences, bounded and resumable
-------------------------------------
Frames go through in chunks of `chunk_frames`. What crosses a chunk border is small and fixed: the keyframe record,
the *carry* (the previous chunk's last frame: its attention keys/values and x0 per step), the noise stream's state.
So memory does not grow with the number of frames, and frame i sees frame i - 1 the same way whether or not a
border lies between them. Each finished frame is written at once, atomically (`frames/frame_NNNN.png` through a
temporary file and `os.replace`). After the keyframes and after every chunk the state (`state/state.pt`: the
keyframe record, the carry, the noise stream, the inputs' fingerprint) is written atomically. A run with
`resume` on the same inputs in the same work folder keeps every finished frame and continues from the saved state:
no finished frame is denoised again (the one exception: a crash in the instant between a chunk's last frame file
and its state file redoes that chunk). Different inputs under `resume` are refused, never mixed.

Where the work folder is: the server keeps it under its data folder, named by the inputs' fingerprint, so a job
cancelled or failed (or a server that died) is continued by sending the same request with `resume: true`; the
finished job's result folder gets the frames. `concord stylize --out DIR` (in-process) works in DIR itself.

Measures (metrics.json): the temporal warping error per frame and its mean (Lai et al. 2018; MATH.md section 6)
for the output and for the input frames (the floor), with the correspondence source (renderer or optical flow).

What this module must never do: write outside its work folder and `ctx.out_dir`, keep every frame in memory, leave
an attention processor installed after it returns, change the model, or run more than one denoising step after a
cancel.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from concord.api.arrays import ArraysContract, ArraySpec, DimLimit
from concord.api.schemas import StylizeParams
from concord.frames.frameset import FrameSet, FrameSetError, correspondence, latent_correspondence
from concord.jobs.context import JobContext, JobInputError

__all__ = [
    "ARRAYS",
    "MAX_FRAMES",
    "check_inputs",
    "run",
    "stylize",
    "keyframe_indices",
    "previous_plan",
    "frame_name",
    "ArraySource",
    "FrameSource",
    "fingerprint",
    "STATE_FILE",
]

#: Frames one request may carry (longer sequences: `concord stylize` streams a folder in-process).
MAX_FRAMES = 256
STATE_FILE = "state/state.pt"
FRAMES_DIR = "frames"
_FLOATS = ("float32", "float64", "float16")

ARRAYS = ArraysContract(
    specs=(
        ArraySpec("image", ("uint8", "float32"), ("N", "H", "W", 3), "the rendered frames, sRGB, row 0 at the top"),
        ArraySpec("depth", _FLOATS, ("N", "H", "W"), "planar camera z > 0, 0 on the background", required=False, cast_to="float32"),
        ArraySpec("motion", _FLOATS, ("N", "H", "W", 2), "pixels to the previous frame: (x, y) there - here, y down", required=False, cast_to="float32"),
        ArraySpec("mask", ("bool", "uint8"), ("N", "H", "W"), "where to stylize (elsewhere the input is kept)", required=False),
    ),
    dims={"N": DimLimit(1, MAX_FRAMES), "H": DimLimit(64, 1024, 8), "W": DimLimit(64, 1024, 8)},
)


class FrameSource(Protocol):
    """What the job reads frames from, a chunk at a time (bounded memory): an in-memory FrameSet (`ArraySource`)
    or a folder (`concord.frames.io.FrameFolder`). `read(start, stop)` -> (FrameSet of those frames, valid
    (n, H, W) bool or None: the motion's own validity, e.g. optical flow's forward-backward check)."""

    motion_source: str

    def __len__(self) -> int: ...

    @property
    def height(self) -> int: ...

    @property
    def width(self) -> int: ...

    def read(self, start: int, stop: int) -> tuple[FrameSet, np.ndarray | None]: ...


class ArraySource:
    """A FrameSet in memory as a FrameSource."""

    def __init__(self, frames: FrameSet, motion_source: str = "renderer"):
        self.frames = frames
        self.motion_source = motion_source if frames.motion is not None else "none"

    def __len__(self) -> int:
        return self.frames.num_frames

    @property
    def height(self) -> int:
        return self.frames.height

    @property
    def width(self) -> int:
        return self.frames.width

    def read(self, start: int, stop: int):
        return self.frames.slice(start, stop), None


# ---------------------------------------------------------------------------------------------------------------
# Pure planning


def keyframe_indices(mode: str, n: int, explicit: list[int] | tuple[int, ...] = ()) -> list[int]:
    """The keyframes of an n-frame sequence: none -> [], first / first+previous -> [0], middle -> [n // 2],
    explicit -> the list (sorted, duplicates dropped)."""
    if mode == "none":
        return []
    if mode in ("first", "first+previous"):
        return [0]
    if mode == "middle":
        return [n // 2]
    if mode == "explicit":
        return sorted(set(int(i) for i in explicit))
    raise ValueError(f"unknown keyframes mode {mode!r}")


def previous_plan(chunk: list[int], keyframes: list[int], use_previous: bool) -> list:
    """Where each chunk frame's previous frame's keys/values come from (`concord.attention.keyframe`): None
    (no previous attention, or frame 0), ("live", j) (batch frame j), ("key", m) (keyframe m), or ("carry",)
    (the previous chunk's last frame)."""
    from concord.attention.keyframe import PREVIOUS_CARRY, PREVIOUS_KEY, PREVIOUS_LIVE

    plan = []
    for j, i in enumerate(chunk):
        if not use_previous or i == 0:
            plan.append(None)
        elif j > 0 and chunk[j - 1] == i - 1:
            plan.append((PREVIOUS_LIVE, j - 1))
        elif (i - 1) in keyframes:
            plan.append((PREVIOUS_KEY, keyframes.index(i - 1)))
        else:
            plan.append((PREVIOUS_CARRY,))
    return plan


def frame_name(number: int) -> str:
    return f"frame_{number:04d}.png"


def fingerprint(params: StylizeParams, arrays_digest: str, model_name: str) -> str:
    """What identifies a run for resuming: the model, every parameter but `resume`, and the frames' content."""
    p = params.model_dump(mode="json")
    p.pop("resume", None)
    blob = json.dumps({"model": model_name, "params": p, "frames": arrays_digest}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def arrays_digest(arrays: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(k.encode() + str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Input checks (the server's; the CLI's folder reader raises FrameSetError itself)


def check_inputs(params: StylizeParams, arrays: dict) -> None:
    try:
        fs = FrameSet.from_arrays(arrays, max_frames=MAX_FRAMES)
    except FrameSetError as exc:
        raise JobInputError(f"the frames break the FrameSet contract: {exc.message}", f"arrays.{exc.field}", exc.hint or None) from None
    _check_against(params, fs.num_frames, fs.motion is not None)


def _check_against(params: StylizeParams, n: int, has_motion: bool) -> None:
    if params.keyframes == "explicit":
        if not params.keyframe_list:
            raise JobInputError("keyframes 'explicit' needs at least one frame in keyframe_list", "params.keyframe_list")
        bad = [i for i in params.keyframe_list if not 0 <= i < n]
        if bad:
            raise JobInputError(f"keyframe(s) {bad} out of range for {n} frames", "params.keyframe_list",
                                f"frame indices run from 0 to {n - 1}")
    elif params.keyframe_list:
        raise JobInputError("keyframe_list is only used with keyframes 'explicit'", "params.keyframe_list")
    if not has_motion and n > 1:
        if params.noise == "warped":
            raise JobInputError("warped noise needs motion vectors and the frames have none", "arrays.motion",
                                "render the Vector pass (View Layer > Passes > Data > Vector), let `concord stylize` "
                                "estimate optical flow, or choose another noise")
        if params.blending.weight > 0:
            raise JobInputError("latent blending needs motion vectors and the frames have none", "arrays.motion",
                                "render the Vector pass or set blending.weight to 0")
    if params.noise == "warped" and params.noise_strength is not None and params.noise_strength > 1:
        raise JobInputError(f"warped noise takes r in [0, 1], got {params.noise_strength}", "params.noise_strength")


# ---------------------------------------------------------------------------------------------------------------
# The job (server side): a work folder named by the inputs, the frames copied into the result when done


def run(model, params: StylizeParams, arrays: dict, ctx: JobContext, **kw) -> dict:
    frames = FrameSet.from_arrays(arrays, max_frames=MAX_FRAMES)
    name = getattr(model, "name", "model")
    key = fingerprint(params, arrays_digest(frames.to_arrays()), str(name))
    root = getattr(ctx, "work_root", None) or (Path(ctx.out_dir).parent / "work")
    work = Path(root) / f"stylize-{key}"
    metrics = stylize(model, params, ArraySource(frames, params.motion_source), work, ctx, **kw)
    out = Path(ctx.out_dir)
    shutil.copytree(work / FRAMES_DIR, out / FRAMES_DIR, dirs_exist_ok=True)
    shutil.copy2(work / "metrics.json", out / "metrics.json")
    shutil.rmtree(work, ignore_errors=True)  # finished: the result folder holds everything
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# The sampler over a sequence


@dataclass
class _Run:
    """Per-run settings resolved from the params and the model."""

    steps: int
    guidance: float
    keyframes: list[int]
    use_keyframes: bool
    use_previous: bool
    noise_mode: str
    noise_strength: float
    blend_weight: float
    blend_steps: int


def _save_state_atomic(path: Path, state: dict) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def stylize(model, params: StylizeParams, source: FrameSource, work: Path, ctx: JobContext, *, parts=None,
            scheduler=None, on_chunk=None) -> dict:
    """Stylize every frame of `source` into `work/frames/` (module docstring), write `work/metrics.json`, return
    the metrics. `parts`/`scheduler` as in the texture job. `on_chunk(frames)`: called after each chunk's frames
    are on disk (tests, the CLI's preview)."""
    import torch

    from concord.attention.keyframe import FrameMemory, frame_attention
    from concord.frames.io import write_png_atomic
    from concord.geometry.bake import to_uint8
    from concord.noise.frame_stream import FrameNoiseStream, NoiseSpec
    from concord.pipelines.depth_image import depth_to_control
    from concord.pipelines.job_setup import job_scheduler, prepare_job
    from concord.pipelines.sampler import Hooks, fresh_scheduler, sample

    t_all = time.perf_counter()
    n, H, W = len(source), source.height, source.width
    has_motion = source.motion_source != "none"
    _check_against(params, n, has_motion)
    work = Path(work)
    ctx.stage("encoding")
    setup = prepare_job(model, params, "stylize", W, H, "arrays.image", parts)
    parts, params, settings, recommended = setup.parts, setup.params, setup.settings, setup.recommended
    h, w = setup.latent_hw
    den, codec, device = parts.denoiser, parts.codec, parts.device
    C = den.latent_channels
    cfg = params.guidance > 1.0
    groups = 2 if cfg else 1
    keys = keyframe_indices(params.keyframes, n, params.keyframe_list)
    default_strength = 1.0
    r = _Run(
        steps=params.steps, guidance=params.guidance, keyframes=keys, use_keyframes=bool(keys),
        use_previous=params.keyframes == "first+previous", noise_mode=params.noise,
        noise_strength=params.noise_strength if params.noise_strength is not None else default_strength,
        blend_weight=params.blending.weight if has_motion else 0.0,
        blend_steps=int(np.ceil(params.blending.until * params.steps)),
    )
    spec = NoiseSpec(r.noise_mode, r.noise_strength)

    sched_template = job_scheduler(model, parts, scheduler)
    text = parts.text_embeddings(params.prompt, params.negative_prompt, guidance=cfg).to(device)

    # --- the work folder and what a resume keeps ------------------------------------------------------------
    frames_dir, state_path = work / FRAMES_DIR, work / STATE_FILE
    digest_src = f"{n}x{H}x{W}:{source.motion_source}"
    run_key = fingerprint(params, digest_src + ":" + _source_digest(source), str(getattr(model, "name", parts.kind)))
    state = None
    if params.resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state.get("fingerprint") != run_key:
            raise JobInputError(
                f"{work} holds a run of other inputs or settings; a resume must repeat the same frames and parameters",
                "params.resume", "send exactly the interrupted run's request again, or turn resume off to start over")
    elif work.exists() and not params.resume:
        shutil.rmtree(work)
    frames_dir.mkdir(parents=True, exist_ok=True)

    def finished(i: int) -> bool:
        return (frames_dir / frame_name(params.first_frame + i)).exists()

    memory = FrameMemory(dtype=torch.float16 if device.type == "cuda" else None)
    calls = {"denoiser": 0}

    def model_output_for(emb, control_in):
        def model_output(xin, t):
            calls["denoiser"] += 1
            xin = xin.repeat(groups, 1, 1, 1)
            out = den.predict(xin, t, emb, control_in).float()
            if cfg:  # classifier-free guidance (Ho & Salimans 2022): out_u + g (out_c - out_u)
                u, c = out.chunk(2)
                out = u + r.guidance * (c - u)
            return out
        return model_output

    def control_for(depth: np.ndarray | None, count: int):
        if depth is None:
            control = torch.zeros((count, 1, H, W))
        else:
            control = torch.from_numpy(np.stack([depth_to_control(d) for d in depth]))[:, None]
        return den.prepare_control(control.to(device), (h, w)).repeat(groups, 1, 1, 1)

    if not _source_has_depth(source):  # every denoiser Concord runs is depth-conditioned
        raise JobInputError(
            f"model {getattr(model, 'name', parts.kind)!r} is conditioned on depth and the frames have none",
            "arrays.depth", "render the Depth pass (View Layer > Passes > Data > Z) or pass --depth DIR to concord stylize")

    def encode(images: np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)
        with torch.no_grad():
            return codec.encode(x).float()

    def decode_write(latents, numbers: list[int], frames: FrameSet):
        written = []
        with torch.no_grad():
            for j, i in enumerate(numbers):
                ctx.raise_if_cancelled()
                img = codec.decode(latents[j : j + 1]).float().cpu()[0].permute(1, 2, 0).numpy()
                if frames.mask is not None:
                    m = frames.mask[j][..., None]
                    img = np.where(m, img, frames.image_float(j))
                write_png_atomic(frames_dir / frame_name(params.first_frame + i), to_uint8(img))
                written.append(i)
        return written

    def blend_hook_for(plan, src_maps, key_x0, carry_x0, chunk_next):
        """after_x0: latent blending (module docstring); the chunk's last frame's blended x0 per step is kept in
        `chunk_next` for the next chunk's first frame."""
        def after_x0(info, x0):
            if not (r.blend_weight > 0 and info.index < r.blend_steps):
                return x0
            x0 = x0.clone()
            flat = x0.reshape(x0.shape[0], C, -1)
            for j, prev in enumerate(plan):
                if prev is None or src_maps[j] is None:
                    continue
                if prev[0] == "live":
                    p = flat[prev[1]]
                elif prev[0] == "key":
                    p = key_x0[info.index][prev[1]].reshape(C, -1)
                else:
                    p = carry_x0[info.index][0].reshape(C, -1)
                idx, ok = src_maps[j]
                warped = p[:, idx]
                flat[j] = torch.where(ok, (1 - r.blend_weight) * flat[j] + r.blend_weight * warped, flat[j])
            chunk_next[info.index] = flat[-1:].reshape(1, C, h, w).detach().clone()
            return flat.reshape_as(x0)
        return after_x0

    def latent_maps(frames: FrameSet, valid, prev_depth, numbers: list[int], offset: int):
        """Per chunk frame: its latent correspondence (torch idx, ok) to its previous frame, or None."""
        maps = []
        for i in numbers:
            link = _link(frames, valid, prev_depth, i, offset)
            if link is None:
                maps.append(None)
                continue
            idx, lok = latent_correspondence(link[0], link[1], (h, w))
            maps.append((torch.from_numpy(idx).to(device), torch.from_numpy(lok).to(device)))
        return maps

    total_work = n
    done_count = sum(finished(i) for i in range(n))
    ctx.stage("stylizing", total=total_work, message=f"{done_count} of {n} frames already done" if done_count else "")
    timings = {"keyframes_s": 0.0, "frames_s": 0.0}
    peak_cache = 0

    # --- the noise stream: frame i's noise needs frames 0..i's motion; it is cheap (no denoiser) ---------------
    def new_stream():
        return FrameNoiseStream(spec, (C, h, w), (H, W), torch.Generator().manual_seed(int(params.seed)))

    def noise_upto(stream, start: int, stop: int, chunk_frames: FrameSet, valid, prev_depth, offset: int):
        """Advance `stream` over frames start..stop-1 (all present in chunk_frames from `offset`); returns them."""
        out = []
        for i in range(start, stop):
            link = _link(chunk_frames, valid, prev_depth, i, offset)
            out.append(stream.next() if link is None else stream.next(*link))
        return out

    key_x0: dict = {}
    with frame_attention(den.modules, memory), torch.no_grad():
        # --- 1. keyframes: denoised together, their attention record and x0s kept ------------------------------
        if keys:
            if state is not None and state.get("keyframes_done"):
                memory.load_state_dict(state["memory"], device)
                key_x0 = {s: t.to(device) for s, t in state["key_x0"].items()}
            else:
                t0 = time.perf_counter()
                kstream = new_stream()
                knoise, last_depth = {}, None
                for i in range(0, max(keys) + 1, params.chunk_frames):  # stream the noise up to the last keyframe
                    stop = min(i + params.chunk_frames, max(keys) + 1)
                    fr, valid = source.read(i, stop)
                    for off, z in enumerate(noise_upto(kstream, i, stop, fr, valid, last_depth, i)):
                        if i + off in keys:
                            knoise[i + off] = z
                    last_depth = None if fr.depth is None else fr.depth[-1]
                kf = [source.read(k, k + 1)[0] for k in keys]
                images = np.concatenate([x.image_float() for x in kf])
                depth = None if kf[0].depth is None else np.concatenate([x.depth for x in kf])
                emb = text.repeat_interleave(len(keys), dim=0)
                memory.phase, memory.keyframe_count = "keyframes", len(keys)
                x0_rec: dict = {}

                def key_after_x0(info, x0):
                    x0_rec[info.index] = x0.detach().clone()
                    return x0

                def set_step(i):
                    ctx.raise_if_cancelled()
                    memory.step = i

                sched = fresh_scheduler(sched_template)
                noise = torch.stack([knoise[k] for k in keys]).to(device)
                lat = sample(model_output_for(emb, control_for(depth, len(keys))), sched, noise, r.steps,
                             Hooks(before_step=set_step, after_x0=key_after_x0), device=device, copy_scheduler=False,
                             init=encode(images), strength=params.strength)
                key_x0 = x0_rec
                ctx.raise_if_cancelled()
                decode_write(lat, keys, FrameSet(images, depth, None, None if kf[0].mask is None else np.concatenate([x.mask for x in kf])))
                _save_state_atomic(state_path, {"fingerprint": run_key, "keyframes_done": True,
                                                "memory": memory.state_dict(),
                                                "key_x0": {s: t.cpu() for s, t in key_x0.items()},
                                                "next_frame": 0})
                state = torch.load(state_path, map_location="cpu", weights_only=False)
                timings["keyframes_s"] += time.perf_counter() - t0
                ctx.advance(sum(finished(i) for i in range(n)))
            peak_cache = max(peak_cache, memory.nbytes())

        # --- 2. the other frames, chunk by chunk ------------------------------------------------------------------
        stream = new_stream()
        carry_x0: dict = {}
        start = 0
        if state is not None and state.get("next_frame", 0) > 0:
            start = int(state["next_frame"])
            stream.load_state_dict(state["noise"])
            memory.carry = {k: tuple(t.to(device) for t in kv) for k, kv in state["carry"].items()}
            carry_x0 = {s: t.to(device) for s, t in state["carry_x0"].items()}
        prev_depth = None
        if start > 0:
            prev = source.read(start - 1, start)[0]
            prev_depth = None if prev.depth is None else prev.depth[0]
        i = start
        while i < n:
            t0 = time.perf_counter()
            stop = min(i + params.chunk_frames + sum(1 for k in keys if i <= k < i + params.chunk_frames), n)
            fr, valid = source.read(i, stop)
            noises = noise_upto(stream, i, stop, fr, valid, prev_depth, i)
            chunk = [k for k in range(i, stop) if k not in keys]
            if not chunk:  # only keyframes in this stretch
                prev_depth = None if fr.depth is None else fr.depth[-1]
                i = stop
                continue
            sel = [k - i for k in chunk]
            sub = FrameSet(fr.image[sel], None if fr.depth is None else fr.depth[sel],
                           None if fr.motion is None else fr.motion[sel], None if fr.mask is None else fr.mask[sel])
            plan = previous_plan(chunk, keys, r.use_previous)
            memory.phase, memory.previous, memory.record_last = "frames", plan, True
            memory.use_keyframes = r.use_keyframes
            src_maps = latent_maps(fr, valid, prev_depth, chunk, i) if r.blend_weight > 0 else [None] * len(chunk)
            blend_plan = previous_plan(chunk, keys, True)  # blending always reads the frame before
            next_x0: dict = {}
            emb = text.repeat_interleave(len(chunk), dim=0)

            def set_step(s):
                ctx.raise_if_cancelled()
                memory.step = s

            sched = fresh_scheduler(sched_template)
            noise = torch.stack([noises[k - i] for k in chunk]).to(device)
            lat = sample(model_output_for(emb, control_for(sub.depth, len(chunk))), sched, noise, r.steps,
                         Hooks(before_step=set_step,
                               after_x0=blend_hook_for(blend_plan, src_maps, key_x0, carry_x0, next_x0)),
                         device=device, copy_scheduler=False, init=encode(sub.image_float()), strength=params.strength)
            ctx.raise_if_cancelled()
            decode_write(lat, chunk, sub)
            memory.advance_carry()
            carry_x0 = next_x0
            peak_cache = max(peak_cache, memory.nbytes())
            _save_state_atomic(state_path, {
                "fingerprint": run_key, "keyframes_done": bool(keys), "memory": memory.state_dict() if keys else None,
                "key_x0": {s: t.cpu() for s, t in key_x0.items()}, "next_frame": stop,
                "noise": stream.state_dict(), "carry": {k: tuple(t.cpu() for t in kv) for k, kv in memory.carry.items()},
                "carry_x0": {s: t.cpu() for s, t in carry_x0.items()},
            })
            prev_depth = None if fr.depth is None else fr.depth[-1]
            timings["frames_s"] += time.perf_counter() - t0
            ctx.advance(sum(finished(k) for k in range(n)))
            if on_chunk is not None:
                on_chunk(chunk)
            i = stop

    ctx.stage("measuring")
    metrics = _measure(source, frames_dir, params.first_frame, n)
    metrics.update({
        "kind": "stylize",
        "model": getattr(model, "name", None),
        "model_kind": parts.kind,
        "device": str(device),
        "frames": n,
        "frame_size": [W, H],
        "latent_size": [w, h],
        "keyframes": keys,
        "noise": {"mode": r.noise_mode, "strength": r.noise_strength},
        "denoiser_calls": calls["denoiser"],
        "attention_cache_bytes": peak_cache,
        "scheduler": type(sched_template).__name__,
        "timings_s": {k: round(v, 3) for k, v in {**timings, "total_s": time.perf_counter() - t_all}.items()},
        "params": params.model_dump(mode="json"),
        "settings": settings,
        "recommended": recommended.as_dict(),
    })
    tmp = work / ".metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, work / "metrics.json")
    return metrics


def _link(frames: FrameSet, valid, prev_depth, i: int, offset: int):
    """(source, valid) of sequence frame i (at index i - offset of `frames`) to frame i - 1 (`correspondence`, and
    the motion's own validity when the source gives one), or None for frame 0 or frames without motion.
    `prev_depth`: the depth of frame offset - 1 (the frame before `frames`), for its occlusion test."""
    if i == 0 or frames.motion is None:
        return None
    k = i - offset
    d_prev = None
    if frames.depth is not None:
        d_prev = frames.depth[k - 1] if k > 0 else prev_depth
    src, ok = correspondence(frames.motion[k], None if frames.depth is None else frames.depth[k], d_prev)
    if valid is not None:
        ok &= valid[k]
    return src, ok


def _source_has_depth(source) -> bool:
    fr, _ = source.read(0, 1)
    return fr.depth is not None


def _source_digest(source) -> str:
    """A digest of the frames' content, read a chunk at a time."""
    h = hashlib.sha256()
    n = len(source)
    for i in range(0, n, 16):
        fr, valid = source.read(i, min(i + 16, n))
        for a in (fr.image, fr.depth, fr.motion, fr.mask, valid):
            if a is not None:
                h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _measure(source, frames_dir: Path, first: int, n: int) -> dict:
    """Temporal warping error (Lai et al. 2018; MATH.md section 6) of the output and of the input (the floor),
    per frame and mean, two frames in memory at a time."""
    from PIL import Image

    from concord.frames.frameset import warping_error

    out_err, in_err = [None], [None]
    prev_out = prev_in = prev_depth = None
    for i in range(n):
        fr, valid = source.read(i, i + 1)
        cur_out = np.asarray(Image.open(frames_dir / frame_name(first + i)).convert("RGB"))
        if i > 0 and fr.motion is not None:
            d = None if fr.depth is None else fr.depth
            v = None if valid is None else valid
            out_err.append(warping_error(cur_out[None], fr.motion, d, v, prev_out, prev_depth)[0])
            in_err.append(warping_error(fr.image[None] if fr.image.dtype == np.uint8 else fr.image_float()[None],
                                        fr.motion, d, v, prev_in, prev_depth)[0])
        elif i > 0:
            out_err.append(None)
            in_err.append(None)
        prev_out, prev_in = cur_out, fr.image
        prev_depth = None if fr.depth is None else fr.depth[0]

    def mean(xs):
        vals = [x for x in xs if x is not None]
        return float(np.mean(vals)) if vals else None

    return {
        "motion_source": source.motion_source,
        "warping_error": {"mean": mean(out_err), "per_frame": out_err},
        "input_warping_error": {"mean": mean(in_err), "per_frame": in_err},
    }
