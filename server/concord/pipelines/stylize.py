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


def previous_plan(chunk: list[int], keyframes: list[int], use_previous: bool, start: int = 0) -> list:
    """Where each chunk frame's previous frame's keys/values come from (`concord.attention.keyframe`): None
    (no previous attention, or the sequence's first frame `start`), ("live", j) (batch frame j), ("key", m)
    (keyframe m), or ("carry",) (the previous chunk's last frame)."""
    from concord.attention.keyframe import PREVIOUS_CARRY, PREVIOUS_KEY, PREVIOUS_LIVE

    plan = []
    for j, i in enumerate(chunk):
        if not use_previous or i == start:
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
    """The server's job: work in `<data>/work/stylize-<fingerprint>` (or `sequence-<name>` for a sequence), then
    copy this request's frames and metrics into the result. A finished single request's work folder is removed; a
    sequence keeps its state (not its frames) for the next request."""
    frames = FrameSet.from_arrays(arrays, max_frames=MAX_FRAMES)
    root = Path(getattr(ctx, "work_root", None) or (Path(ctx.out_dir).parent / "work"))
    if params.sequence:
        work = root / f"sequence-{params.sequence}"
    else:
        work = root / f"stylize-{fingerprint(params, arrays_digest(frames.to_arrays()), str(getattr(model, 'name', 'model')))}"
    metrics = stylize(model, params, ArraySource(frames, params.motion_source), work, ctx, **kw)
    out = Path(ctx.out_dir)
    (out / FRAMES_DIR).mkdir(parents=True, exist_ok=True)
    names = [frame_name(params.first_frame + i) for i in range(frames.num_frames)]
    for name in names:
        shutil.copy2(work / FRAMES_DIR / name, out / FRAMES_DIR / name)
    shutil.copy2(work / "metrics.json", out / "metrics.json")
    if params.sequence:
        # A request at frame a means the client has every frame before a: those go. This request's frames stay
        # until the next request, so a client that missed this result can repeat it with resume: true.
        for f in (work / FRAMES_DIR).glob("frame_*.png"):
            if int(f.stem.split("_")[1]) < params.first_frame:
                f.unlink(missing_ok=True)
    else:
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


def _resolve_run(params: StylizeParams, state: dict | None, run_key: str, work: Path, a: int, b: int) -> tuple[dict | None, int, int]:
    """(the state to continue from or None, the sequence's first frame, the first frame still to do) for a request
    of global frames [a, b) (module docstring, "Long sequences"). Raises JobInputError when the request does not fit
    the saved run."""
    field = "params.sequence" if params.sequence else "params.resume"
    if state is not None and state.get("fingerprint") != run_key:
        if params.resume or (params.sequence and a != state.get("seq_start")):
            what = f"sequence {params.sequence!r}" if params.sequence else str(work)
            raise JobInputError(f"{what} was started with other inputs or settings", field,
                                "repeat the interrupted request exactly (a sequence's requests share every setting "
                                "but first_frame and resume), or start over without resume")
        state = None
    if state is None:
        if params.sequence and a != 0:
            raise JobInputError(f"the server has no saved state of sequence {params.sequence!r} to continue at frame {a} "
                                "(it was never started here, or the server's data folder was cleared)",
                                "params.sequence", "start the sequence again from its first request (first_frame 0)")
        return None, a, a
    seq_start, nxt = int(state["seq_start"]), int(state["next_frame"])
    if params.sequence and a == nxt and a > seq_start:
        return state, seq_start, a  # the next request of a sequence
    if not params.resume:
        if params.sequence and a != seq_start:
            raise JobInputError(f"sequence {params.sequence!r} continues at frame {nxt}, not at {a}", "params.first_frame",
                                f"send the request that starts at frame {nxt}, or resume: true to finish an interrupted one")
        return None, a, a  # a new run over the old one
    if nxt < a:
        raise JobInputError(f"the saved run continues at frame {nxt}, not at {a}", "params.first_frame",
                            f"send the request that starts at frame {nxt}")
    return state, seq_start, max(a, nxt)


def stylize(model, params: StylizeParams, source: FrameSource, work: Path, ctx: JobContext, *, parts=None,
            scheduler=None, on_chunk=None) -> dict:
    """Stylize every frame of `source` into `work/frames/` (module docstring), write `work/metrics.json`, return
    the metrics. `parts`/`scheduler` as in the texture job. `on_chunk(frames)`: called after each chunk's frames
    are on disk (tests, the CLI's preview). Frame numbers are global: the source's frame k is frame
    ``params.first_frame + k`` (its file name, and its place in a `sequence`)."""
    import torch

    from concord.attention.keyframe import FrameMemory, frame_attention
    from concord.frames.io import write_png_atomic
    from concord.geometry.bake import to_uint8
    from concord.noise.frame_stream import FrameNoiseStream, NoiseSpec
    from concord.pipelines.depth_image import depth_to_control
    from concord.pipelines.job_setup import job_scheduler, prepare_job
    from concord.pipelines.sampler import Hooks, fresh_scheduler, guided_output, sample

    t_all = time.perf_counter()
    n, H, W = len(source), source.height, source.width
    a = params.first_frame
    b = a + n
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
    if not _source_has_depth(source):  # every denoiser Concord runs is depth-conditioned
        raise JobInputError(
            f"model {getattr(model, 'name', parts.kind)!r} is conditioned on depth and the frames have none",
            "arrays.depth", "render the Depth pass (View Layer > Passes > Data > Z) or pass --depth DIR to concord stylize")

    # --- the work folder: what a resume or the next request of a sequence continues from ----------------------
    frames_dir, state_path = work / FRAMES_DIR, work / STATE_FILE
    model_name = str(getattr(model, "name", parts.kind))
    if params.sequence:  # the requests of a sequence share every setting but where they start
        run_key = fingerprint(params.model_copy(update={"first_frame": 0}), f"{H}x{W}:{source.motion_source}", model_name)
    else:
        run_key = fingerprint(params, f"{n}x{H}x{W}:{source.motion_source}:{_source_digest(source)}", model_name)
    state = torch.load(state_path, map_location="cpu", weights_only=False) if state_path.exists() else None
    state, seq_start, first_todo = _resolve_run(params, state, run_key, work, a, b)
    if state is None and work.exists():
        shutil.rmtree(work)
    frames_dir.mkdir(parents=True, exist_ok=True)

    total = params.sequence_frames or (b - seq_start)
    if b > seq_start + total:
        raise JobInputError(f"frames up to {b - 1} go past the sequence's {total} frames (from frame {seq_start})",
                            "params.sequence_frames", "send the whole sequence's frame count")
    keys = [seq_start + k for k in keyframe_indices(params.keyframes, total, params.keyframe_list)]
    if state is None and any(not a <= k < b for k in keys):
        raise JobInputError(f"keyframe(s) {[k for k in keys if not a <= k < b]} are not in the sequence's first request "
                            f"(frames {a}..{b - 1})", "params.keyframes",
                            "send the keyframes in the first request of a sequence, or use keyframes 'first'")
    r = _Run(
        steps=params.steps, guidance=params.guidance, keyframes=keys, use_keyframes=bool(keys),
        use_previous=params.keyframes == "first+previous", noise_mode=params.noise,
        noise_strength=params.noise_strength if params.noise_strength is not None else 1.0,
        blend_weight=params.blending.weight if has_motion else 0.0,
        blend_steps=int(np.ceil(params.blending.until * params.steps)),
    )
    spec = NoiseSpec(r.noise_mode, r.noise_strength)
    sched_template = job_scheduler(model, parts, scheduler)
    text = parts.text_embeddings(params.prompt, params.negative_prompt, guidance=cfg).to(device)

    def finished(g: int) -> bool:
        return (frames_dir / frame_name(g)).exists()

    def read(g0: int, g1: int):  # global frames [g0, g1) of this request
        return source.read(g0 - a, g1 - a)

    memory = FrameMemory(dtype=torch.float16 if device.type == "cuda" else None)
    calls = {"denoiser": 0}

    def model_output_for(emb, control_in):
        def model_output(xin, t):
            calls["denoiser"] += 1
            xin = xin.repeat(groups, 1, 1, 1)
            out = den.predict(xin, t, emb, control_in).float()
            return guided_output(out, r.guidance) if cfg else out
        return model_output

    def control_for(depth: np.ndarray, count: int):
        control = torch.from_numpy(np.stack([depth_to_control(d) for d in depth]))[:, None]
        return den.prepare_control(control.to(device), (h, w)).repeat(groups, 1, 1, 1)

    def encode(images: np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)
        return codec.encode(x).float()

    def decode_write(latents, numbers: list[int], frames: FrameSet):
        for j, g in enumerate(numbers):
            ctx.raise_if_cancelled()
            img = codec.decode(latents[j : j + 1]).float().cpu()[0].permute(1, 2, 0).numpy()
            if frames.mask is not None:
                img = np.where(frames.mask[j][..., None], img, frames.image_float(j))
            write_png_atomic(frames_dir / frame_name(g), to_uint8(img))

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
                flat[j] = torch.where(ok, (1 - r.blend_weight) * flat[j] + r.blend_weight * p[:, idx], flat[j])
            chunk_next[info.index] = flat[-1:].reshape(1, C, h, w).detach().clone()
            return flat.reshape_as(x0)
        return after_x0

    def latent_maps(frames: FrameSet, valid, prev_depth, numbers: list[int], g0: int):
        """Per chunk frame: its latent correspondence (torch idx, ok) to its previous frame, or None."""
        maps = []
        for g in numbers:
            link = _link(frames, valid, prev_depth, g, g0, seq_start)
            if link is None:
                maps.append(None)
                continue
            idx, lok = latent_correspondence(link[0], link[1], (h, w))
            maps.append((torch.from_numpy(idx).to(device), torch.from_numpy(lok).to(device)))
        return maps

    def noise_for(stream, g0: int, g1: int, frames: FrameSet, valid, prev_depth):
        """Advance `stream` over frames g0..g1-1 (all in `frames`, which starts at g0); returns their noise."""
        out = []
        for g in range(g0, g1):
            link = _link(frames, valid, prev_depth, g, g0, seq_start)
            out.append(stream.next() if link is None else stream.next(*link))
        return out

    def new_stream():
        return FrameNoiseStream(spec, (C, h, w), (H, W), torch.Generator().manual_seed(int(params.seed)))

    def set_step(i):
        ctx.raise_if_cancelled()
        memory.step = i

    def save_state(next_frame: int, stream, carry_x0: dict, last_depth) -> None:
        _save_state_atomic(state_path, {
            "fingerprint": run_key, "seq_start": seq_start, "next_frame": next_frame, "keyframes_done": True,
            "memory": memory.state_dict(), "key_x0": {s: t.cpu() for s, t in key_x0.items()},
            "noise": None if stream is None else stream.state_dict(),
            "carry_x0": {s: t.cpu() for s, t in carry_x0.items()}, "last_depth": last_depth,
        })

    done_before = sum(finished(g) for g in range(a, b))
    ctx.stage("stylizing", total=n, message=f"{done_before} of {n} frames already done" if done_before else "")
    timings = {"keyframes_s": 0.0, "frames_s": 0.0}
    peak_cache = 0
    key_x0: dict = {}
    with frame_attention(den.modules, memory), torch.no_grad():
        # --- 1. keyframes: denoised together, their attention record and x0s kept ------------------------------
        if state is not None:
            memory.load_state_dict({"keyframes": state["memory"]["keyframes"], "carry": state["memory"]["carry"]}, device)
            key_x0 = {s: t.to(device) for s, t in state["key_x0"].items()}
        elif keys:
            t0 = time.perf_counter()
            kstream, knoise, last_depth = new_stream(), {}, None
            for g0 in range(a, max(keys) + 1, params.chunk_frames):  # the noise stream up to the last keyframe
                g1 = min(g0 + params.chunk_frames, max(keys) + 1)
                fr, valid = read(g0, g1)
                for off, z in enumerate(noise_for(kstream, g0, g1, fr, valid, last_depth)):
                    if g0 + off in keys:
                        knoise[g0 + off] = z
                last_depth = fr.depth[-1]
            kf = [read(k, k + 1)[0] for k in keys]
            images = np.concatenate([x.image_float() for x in kf])
            depth = np.concatenate([x.depth for x in kf])
            mask = None if kf[0].mask is None else np.concatenate([x.mask for x in kf])
            memory.phase, memory.keyframe_count = "keyframes", len(keys)
            x0_rec: dict = {}

            def key_after_x0(info, x0):
                x0_rec[info.index] = x0.detach().clone()
                return x0

            lat = sample(model_output_for(text.repeat_interleave(len(keys), dim=0), control_for(depth, len(keys))),
                         fresh_scheduler(sched_template), torch.stack([knoise[k] for k in keys]).to(device), r.steps,
                         Hooks(before_step=set_step, after_x0=key_after_x0), device=device, copy_scheduler=False,
                         init=encode(images), strength=params.strength)
            key_x0 = x0_rec
            ctx.raise_if_cancelled()
            decode_write(lat, keys, FrameSet(images, depth, None, mask))
            save_state(a, None, {}, None)  # keyframes done; the frames start at a
            state = torch.load(state_path, map_location="cpu", weights_only=False)
            timings["keyframes_s"] += time.perf_counter() - t0
            ctx.advance(sum(finished(g) for g in range(a, b)))
        peak_cache = max(peak_cache, memory.nbytes())

        # --- 2. the other frames, chunk by chunk ------------------------------------------------------------------
        stream, carry_x0, prev_depth = new_stream(), {}, None
        if state is not None and state.get("noise") is not None:
            stream.load_state_dict(state["noise"])
            memory.carry = {k: tuple(t.to(device) for t in kv) for k, kv in state["memory"]["carry"].items()}
            carry_x0 = {s: t.to(device) for s, t in state["carry_x0"].items()}
            prev_depth = state["last_depth"]
        g = first_todo
        if state is not None and state.get("noise") is None and first_todo > a:
            raise JobInputError("the saved run has no frame state to continue from", "params.resume", "start over without resume")
        while g < b:
            t0 = time.perf_counter()
            g1 = min(g + params.chunk_frames + sum(1 for k in keys if g <= k < g + params.chunk_frames), b)
            fr, valid = read(g, g1)
            noises = noise_for(stream, g, g1, fr, valid, prev_depth)
            chunk = [k for k in range(g, g1) if k not in keys]
            if chunk:
                sel = [k - g for k in chunk]
                sub = FrameSet(fr.image[sel], fr.depth[sel], None if fr.motion is None else fr.motion[sel],
                               None if fr.mask is None else fr.mask[sel])
                memory.phase, memory.record_last = "frames", True
                memory.previous = previous_plan(chunk, keys, r.use_previous, seq_start)
                memory.use_keyframes = r.use_keyframes
                src_maps = latent_maps(fr, valid, prev_depth, chunk, g) if r.blend_weight > 0 else [None] * len(chunk)
                next_x0: dict = {}
                lat = sample(model_output_for(text.repeat_interleave(len(chunk), dim=0), control_for(sub.depth, len(chunk))),
                             fresh_scheduler(sched_template), torch.stack([noises[k - g] for k in chunk]).to(device),
                             r.steps,
                             Hooks(before_step=set_step,
                                   after_x0=blend_hook_for(previous_plan(chunk, keys, True, seq_start), src_maps,
                                                           key_x0, carry_x0, next_x0)),
                             device=device, copy_scheduler=False, init=encode(sub.image_float()), strength=params.strength)
                ctx.raise_if_cancelled()
                decode_write(lat, chunk, sub)
                memory.advance_carry()
                carry_x0 = next_x0
                peak_cache = max(peak_cache, memory.nbytes())
            prev_depth = fr.depth[-1]
            save_state(g1, stream, carry_x0, prev_depth)
            timings["frames_s"] += time.perf_counter() - t0
            ctx.advance(sum(finished(k) for k in range(a, b)))
            if on_chunk is not None and chunk:
                on_chunk(chunk)
            g = g1

    ctx.stage("measuring")
    metrics = _measure(source, frames_dir, a, n)
    metrics.update({
        "kind": "stylize",
        "model": getattr(model, "name", None),
        "model_kind": parts.kind,
        "device": str(device),
        "frames": n,
        "first_frame": a,
        "sequence": params.sequence,
        "sequence_start": seq_start,
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


def _link(frames: FrameSet, valid, prev_depth, g: int, g0: int, seq_start: int):
    """(source, valid) of global frame g (at index g - g0 of `frames`) to frame g - 1 (`correspondence`, and the
    motion's own validity when the source gives one), or None for the sequence's first frame or frames without
    motion. `prev_depth`: the depth of frame g0 - 1 (before `frames`), for its occlusion test."""
    if g == seq_start or frames.motion is None:
        return None
    k = g - g0
    d_prev = frames.depth[k - 1] if k > 0 else prev_depth
    src, ok = correspondence(frames.motion[k], frames.depth[k], d_prev)
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
