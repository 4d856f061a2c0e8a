"""Job kind `texture`: V views of a mesh generated jointly so they agree, then baked into its UV texture.

Inputs: a ViewSet (`concord.geometry.viewset`, the array contract) and `TextureParams` (`api/schemas.py`); optionally
the mesh's `triangles` and `triangle_uv`, without which metrics.json's `coverage` (the share of UV-island texels the
views see, `concord.geometry.metrics.surface_coverage`) is null. The sampler
is the one loop every job kind shares (`concord.pipelines.sampler.sample`, ARCHITECTURE rule 11) over all views at
once, stepping a private copy of the loaded model's own diffusers scheduler (DDIM by default; its `clip_sample`,
thresholding and the like in force), talking only to a `Codec` and a `Denoiser` (`concord.pipelines.denoiser`,
ARCHITECTURE rule 7); the consistency methods below are its hooks. What makes the views
agree, each switch independent of the others (`ConsistencyOptions`):

- **grid stacking** (Zero123++, Shi et al. 2023): views tiled row-major into one rows x cols latent canvas per CFG
  half, control maps tiled the same way; untiled after every denoiser call (`tile_views` / `untile_views`). Empty
  cells (rows * cols > V) hold extra "filler" views: noise that is denoised along and dropped at the end,
  conditioned as an all-background view (the background's control map, prepared like the others).
- **shared attention** (MATH.md section 3): `concord.attention.extended.extended_attention` on the UNet and ControlNet;
  groups are the V views of one CFG half (with the grid on: each canvas alone, `num_views=1`; "reference" mode is
  refused on a grid, JobInputError).
- **UV-space initial noise** (MATH.md section 1): `concord.noise.uv_noise.uv_space_noise`, or iid.
- **UV sync** (MATH.md section 2; MultiDiffusion, Bar-Tal et al. 2023; SyncMVD, Liu et al. 2023): each step's
  predicted clean latents are averaged on the surface (`concord.geometry.sync.LatentSync`) for steps in
  [sync_start, sync_end) * steps (the sampler's `after_x0` hook); the scheduler's step is then taken from the
  synced x0, passed back as a model output of the scheduler's prediction type with the noise re-derived from x_t
  (for DDIM exactly `synced_ddim_step`).
- **loss guidance** (MATH.md section 4; SyncDiffusion, Lee et al. 2023): `loss_guidance_gradient`, early steps only
  (the sampler's `before_denoise` hook).

metrics.json's headline `disagreement` is the decoded views' cross-view disagreement (MATH.md section 6);
`latent_disagreement_through_sync_index` is measured through UV sync's own index (near zero whenever sync ran).

Result files (in `ctx.out_dir`): `texture.png`, `coverage.png`, `views/view_XX.png`, `grid.png` (views tiled, the
control maps tiled below them), `transforms.json` (the rig, for `concord bake`), `metrics.json` (its `settings`:
steps, guidance and texture size actually used, each with its source, `user` or `model`: a request that leaves one
out gets the loaded model's recommended value, `concord.models.recommended`).

What this module must never do: touch the queue or the job record, write anywhere but `ctx.out_dir`, leave an
attention processor installed after it returns (the context manager restores them), change the model's weights,
scheduler or device, or keep running more than one denoising step after a cancel.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np

from concord.api.arrays import ArraysContract, ArraySpec, DimLimit
from concord.api.schemas import TextureParams
from concord.jobs.context import JobContext, JobInputError
from concord.pipelines.depth_image import depth_to_control

__all__ = [
    "ARRAYS",
    "check_inputs",
    "run",
    "grid_shape",
    "tile_views",
    "untile_views",
    "synced_ddim_step",
    "sync_active",
    "loss_guidance_gradient",
    "downsampled_l2",
    "picture_grid",
    "state_control",
    "RESULT_FILES",
]

MAX_VIEWS = 16
_FLOATS = ("float32", "float64", "float16")

ARRAYS = ArraysContract(
    specs=(
        ArraySpec("depth", _FLOATS, ("V", "H", "W"), "planar camera z > 0 on the object, 0 on the background", cast_to="float32"),
        ArraySpec("mask", ("bool", "uint8"), ("V", "H", "W"), "foreground: the object is seen at this pixel"),
        ArraySpec("uv", _FLOATS, ("V", "H", "W", 2), "surface UV (Blender convention, origin bottom-left), 0 on background", cast_to="float32"),
        ArraySpec("normal", _FLOATS, ("V", "H", "W", 3), "world-space unit normal, 0 on background", cast_to="float32"),
        ArraySpec("intrinsics", _FLOATS, ("V", 3, 3), "pinhole K in pixels (OpenCV)", cast_to="float32"),
        ArraySpec("world_to_camera", _FLOATS, ("V", 4, 4), "world -> camera, OpenCV axes", cast_to="float32"),
        ArraySpec("image", ("uint8", "float32"), ("V", "H", "W", 3), "optional, ignored by the texture job", required=False),
        # The surface (optional; both or neither): coverage in metrics.json is then measured over the UV islands.
        ArraySpec("triangles", _FLOATS, ("F", 3, 3), "optional: the mesh's triangles, corner positions in the views' world frame", required=False, cast_to="float32"),
        ArraySpec("triangle_uv", _FLOATS, ("F", 3, 2), "optional: the same triangles' corner UVs (Blender convention)", required=False, cast_to="float32"),
    ),
    dims={"V": DimLimit(1, MAX_VIEWS), "H": DimLimit(64, 1024, 8), "W": DimLimit(64, 1024, 8), "F": DimLimit(1, 20_000_000)},
)

RESULT_FILES = ("texture.png", "coverage.png", "grid.png", "transforms.json", "metrics.json")
SURFACE_ARRAYS = ("triangles", "triangle_uv")  # not ViewSet fields (concord.geometry.metrics.surface_arrays)


# ---------------------------------------------------------------------------------------------------------------
# Input checks


def grid_shape(num_views: int, rows: int | None = None, cols: int | None = None) -> tuple[int, int]:
    """(rows, cols) of the view grid: 3 x 2 for six views (Zero123++ v1.2's layout), else near square
    (cols = ceil(sqrt(V)), rows = ceil(V / cols)); one given side fixes the other. Raises ValueError when
    rows * cols < V."""
    if rows is None and cols is None:
        if num_views == 6:
            return 3, 2
        cols = math.ceil(math.sqrt(num_views))
        return math.ceil(num_views / cols), cols
    if rows is None:
        rows = math.ceil(num_views / cols)
    elif cols is None:
        cols = math.ceil(num_views / rows)
    if rows * cols < num_views:
        raise ValueError(f"a {rows} x {cols} grid has {rows * cols} cells for {num_views} views")
    return int(rows), int(cols)


def check_inputs(params: TextureParams, arrays: dict[str, np.ndarray]) -> None:
    """The checks only the texture job can make: the ViewSet contract and the options against V."""
    from concord.geometry.viewset import ViewSet, ViewSetError

    try:
        vs = ViewSet.from_arrays({k: a for k, a in arrays.items() if k not in SURFACE_ARRAYS})
    except ViewSetError as exc:
        raise JobInputError(f"the views break the ViewSet contract: {exc.message}", f"arrays.{exc.field}", exc.hint or None) from None
    given = [k for k in SURFACE_ARRAYS if k in arrays]
    if len(given) == 1:
        missing = next(k for k in SURFACE_ARRAYS if k not in arrays)
        raise JobInputError(f"`{given[0]}` came without `{missing}`", f"arrays.{missing}",
                            "send both (F, 3, 3) corner positions and (F, 3, 2) corner UVs of the same triangles, or neither")
    v = vs.num_views
    c = params.consistency
    bad = [r for r in c.reference_views if not 0 <= r < v]
    if bad:
        raise JobInputError(
            f"reference view(s) {bad} out of range for {v} views",
            "params.consistency.reference_views",
            f"view indices run from 0 to {v - 1}",
        )
    if c.shared_attention == "reference" and not c.reference_views:
        raise JobInputError(
            "shared_attention 'reference' needs at least one reference view", "params.consistency.reference_views"
        )
    _check_reference_grid(c)
    try:
        grid_shape(v, c.grid_rows, c.grid_cols)
    except ValueError as exc:
        raise JobInputError(str(exc), "params.consistency.grid_rows", "rows x cols must hold every view") from None
    if c.sync_start > c.sync_end:
        raise JobInputError(
            f"sync_start ({c.sync_start}) is after sync_end ({c.sync_end})",
            "params.consistency.sync_start",
            "UV sync runs for steps in [sync_start, sync_end) x steps",
        )


def _check_reference_grid(c) -> None:
    """Reference attention cannot be expressed on a grid: the views are cells of one canvas, whose self-attention
    tokens (at every UNet level, after convolutions that cross the cells' borders) do not belong to one view, so
    "attend only to the reference views' keys" has no key set to restrict to."""
    if c.grid and c.shared_attention == "reference":
        raise JobInputError(
            "shared_attention 'reference' does not work with grid stacking: the grid puts every view into one "
            "canvas, so there are no separate reference views to attend to",
            "params.consistency.shared_attention",
            "use shared_attention 'all' (on a grid that is ordinary self-attention over the whole canvas) or 'off' "
            "with the grid, or turn the grid off to use reference views",
        )


# ---------------------------------------------------------------------------------------------------------------
# Pure sampler pieces


def tile_views(x, rows: int, cols: int, fill: float = 0.0):
    """Grid stacking (Zero123++, Shi et al. 2023, section 3.1: six 320x320 views in a 3 x 2 grid): N <= rows*cols
    views (N, C, h, w) -> one image (1, C, rows*h, cols*w), view k at row k // cols, column k % cols (row-major).
    Cells past N hold `fill`. Works on torch tensors and numpy arrays."""
    n, c, h, w = x.shape
    cells = rows * cols
    if n > cells:
        raise ValueError(f"{n} views do not fit a {rows} x {cols} grid")
    if hasattr(x, "new_full"):  # torch
        import torch

        if n < cells:
            x = torch.cat([x, x.new_full((cells - n, c, h, w), fill)], 0)
        return x.reshape(rows, cols, c, h, w).permute(2, 0, 3, 1, 4).reshape(1, c, rows * h, cols * w)
    if n < cells:
        x = np.concatenate([x, np.full((cells - n, c, h, w), fill, dtype=x.dtype)], 0)
    return x.reshape(rows, cols, c, h, w).transpose(2, 0, 3, 1, 4).reshape(1, c, rows * h, cols * w)


def untile_views(canvas, rows: int, cols: int, num_views: int | None = None):
    """Inverse of `tile_views`: (1, C, rows*h, cols*w) -> the first `num_views` (default rows*cols) views
    (N, C, h, w). untile_views(tile_views(x, r, c), r, c, len(x)) == x exactly (a pure permutation)."""
    _, c, hh, ww = canvas.shape
    if hh % rows or ww % cols:
        raise ValueError(f"a {hh}x{ww} canvas does not split into a {rows} x {cols} grid")
    h, w = hh // rows, ww // cols
    x = canvas.reshape(c, rows, h, cols, w)
    x = x.permute(1, 3, 0, 2, 4) if hasattr(x, "permute") else x.transpose(1, 3, 0, 2, 4)
    x = x.reshape(rows * cols, c, h, w)
    return x if num_views is None else x[:num_views]


def sync_active(step_index: int, steps: int, start: float, end: float) -> bool:
    """UV sync runs for step indices i with start * steps <= i < end * steps."""
    return start * steps <= step_index < end * steps


# UV-synchronised DDIM step (MATH.md section 2). Given x_t, the model's x0 prediction and the synced x0s
# (x0 averaged on the surface: T(u) = sum_v w_v x0_v / sum_v w_v, written back x0s_v(p) = T(u_v(p))):
#   eps'    = (x_t - sqrt(abar_t) x0s) / sqrt(1 - abar_t)                       (Ho et al. 2020, eq. 4 for eps)
#   x_{t-1} = sqrt(abar_{t-1}) x0s + sqrt(1 - abar_{t-1}) eps'                  (Song et al. 2021, eq. 12, eta = 0)
# Choice: eps is RE-DERIVED from x_t and the synced x0 rather than kept from the model. Then (x0s, eps') is an
# exact decomposition of the current x_t, and the step is the deterministic DDIM interpolation between x_t and x0s;
# this is the eta = 0 counterpart of SyncMVD's step (Liu et al. 2023, "Text-Guided Texturing by Synchronized
# Multi-View Diffusion", arXiv:2311.12891, section 4.1; its `step_tex` forms the DDPM posterior mean from the synced
# x0 and x_t). Keeping the model's eps instead would pair a synced x0 with noise that no longer explains x_t.
# Where nothing was synced (background), x0s = x0 and eps' = the model's eps, so the step is the plain DDIM step.
def synced_ddim_step(x_t, x0_synced, abar_t, abar_prev):
    from concord.pipelines.denoiser import ddim_step, eps_from_x0

    return ddim_step(x0_synced, eps_from_x0(x_t, x0_synced, abar_t), abar_prev)


def downsampled_l2(images, anchor, size: int = 64):
    """The default perceptual distance of loss guidance: mean squared difference of the images average-pooled to at
    most `size` px on the long side. images (B, 3, H, W), anchor (1, 3, H, W) in [0, 1] -> (B,).

    LPIPS (what SyncDiffusion uses) needs pretrained weights that cannot be downloaded here; a low-pass L2 pulls
    the views towards the anchor's overall colours and layout, which is what the guidance is for in the early steps,
    at a negligible cost next to the decoder. Pass any other differentiable `distance(images, anchor) -> (B,)`."""
    import torch.nn.functional as F

    h, w = images.shape[-2:]
    k = max(1, math.ceil(max(h, w) / size))
    a = F.avg_pool2d(images, k) if k > 1 else images
    b = F.avg_pool2d(anchor, k) if k > 1 else anchor
    return ((a - b) ** 2).flatten(1).mean(1)


# Loss-guided denoising (SyncDiffusion, Lee et al. NeurIPS 2023, eq. 6 / Algorithm 1; MATH.md section 4):
#   x_t^(i) <- x_t^(i) - w * grad_{x_t^(i)} L( D(x0(x_t^(i))), D(x0(x_t^(0))) ),   anchor i = 0, i != 0 updated.
# This returns grad_{x_t} sum_{i != anchor} L(D(x0_i), stopgrad(D(x0_anchor))), with rows of the anchor (and of
# views not in `views`) zeroed. One denoiser forward + one decode of every view + one backward through both:
# roughly 3x a plain step (more memory: the activations are kept). Under shared attention the views' predictions
# depend on each other, so view i's gradient also carries its effect on the other views' losses.
def loss_guidance_gradient(
    x_t,
    predict_x0: Callable,
    decode: Callable,
    distance: Callable = downsampled_l2,
    anchor: int = 0,
    views: int | None = None,
):
    """x_t (N, C, h, w) float32; predict_x0(x) -> (N, C, h, w) (differentiable); decode(latents) -> images [0,1].
    `views`: only the first `views` rows are real views (grid filler rows get no loss and no gradient)."""
    import torch

    n = x_t.shape[0] if views is None else views
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        x0 = predict_x0(x)
        images = decode(x0[:n])
        target = images[anchor : anchor + 1].detach()
        others = [i for i in range(n) if i != anchor]
        if not others:
            return torch.zeros_like(x_t)
        loss = distance(images[others], target).sum()
        (grad,) = torch.autograd.grad(loss, x)
    grad = grad.detach()
    grad[anchor] = 0
    grad[n:] = 0
    return grad


def state_control(den, control, n_state: int, latent_hw: tuple[int, int]):
    """The denoiser's prepared control (n_state, ...) for V view control maps (V, 1, H, W) in [0, 1] (0 =
    background) and n_state - V grid filler cells. The fillers are conditioned as an all-background view: the
    background's control map (all 0) is padded BEFORE `prepare_control`, so every codec kind sees its own "no
    object" value there (ControlNet: 0; depth-concatenating SD2-depth and micro: -1), never a padded 0 that a
    concatenating model reads as mid-depth."""
    import torch

    v = control.shape[0]
    if n_state > v:
        control = torch.cat([control, control.new_zeros((n_state - v, *control.shape[1:]))], 0)
    return den.prepare_control(control, latent_hw)


def correspondence_note(c) -> str | None:
    """A warning when correspondence weighting was asked for but cannot run (grid stacking, shared attention off)."""
    if not c.attention_correspondence:  # 0, or None before the model's default is filled in
        return None
    if c.shared_attention == "off":
        return "attention_correspondence has no effect with shared_attention 'off'"
    if c.grid:
        return ("attention_correspondence is not applied on a grid: the grid's views are cells of one canvas; "
                "turn the grid off to weight shared attention by correspondences")
    return None


def correspondence_bias(viewset, latent_hw: tuple[int, int], strength: float):
    """The :class:`concord.attention.extended.CorrespondenceBias` of a job: token surface points for every
    attention level the denoiser can have (the latent grid and each stride-2 downsampling of it, odd sides rounded
    up: ``attention_levels``)."""
    from concord.attention.extended import CorrespondenceBias, attention_levels
    from concord.geometry.sync import pixel_surface_points, token_grid

    pts, fg = pixel_surface_points(viewset)  # once: every level coarsens the same per-pixel points
    levels = attention_levels(viewset.depth.shape[1:3], latent_hw)
    return CorrespondenceBias([token_grid(pts, fg, hw, block) for hw, block in levels], strength)


def picture_grid(images: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*H, cols*W, C) picture, row-major, black where no image."""
    t = tile_views(np.ascontiguousarray(images.transpose(0, 3, 1, 2)), rows, cols, fill=0)
    return t[0].transpose(1, 2, 0)


# ---------------------------------------------------------------------------------------------------------------
# The job


def run(
    model,
    params: TextureParams,
    arrays: dict[str, np.ndarray],
    ctx: JobContext,
    *,
    distance: Callable | None = None,
    parts=None,
    scheduler=None,
) -> dict:
    """Generate the views, bake them, write the result files into ctx.out_dir. Returns the metrics dict.

    `distance`: loss guidance's perceptual distance (default `downsampled_l2`). `parts`: a
    `concord.pipelines.denoiser.DiffusionParts` to use instead of `denoiser_from_model(model)` (another codec or
    denoiser, e.g. a pixel-space model; `model` then only names it in metrics.json). `scheduler`: a diffusers
    scheduler class (or an instance: its class) to step with instead of the model's own scheduler class, on the
    model's scheduler config (default: the class of `model.pipe.scheduler`, else the config's, else DDIM)."""
    import torch
    from PIL import Image

    from concord.geometry.bake import bake_views, to_uint8
    from concord.geometry.metrics import coverage_image, coverage_metrics, cross_view_disagreement, surface_coverage
    from concord.geometry.transforms_json import write_transforms_json
    from concord.geometry.viewset import ViewSet
    from concord.models.recommended import view_size_note
    from concord.pipelines.job_setup import job_scheduler, prepare_job
    from concord.pipelines.sampler import Hooks, guided_output, sample

    timings: dict[str, float] = {}
    c = params.consistency
    _check_reference_grid(c)
    vs = ViewSet.from_arrays({k: a for k, a in arrays.items() if k not in SURFACE_ARRAYS}, validate=False)
    V, H, W = vs.num_views, vs.height, vs.width

    ctx.stage("encoding")
    t0 = time.perf_counter()
    # Settings the request left out (None) are the model's recommended ones; metrics.json says which were which.
    setup = prepare_job(model, params, "texture", W, H, "arrays.depth", parts)
    parts, params, settings, recommended = setup.parts, setup.params, setup.settings, setup.recommended
    c = params.consistency  # with the model's attention_correspondence when the request left it out
    h, w = setup.latent_hw
    note = view_size_note(getattr(model, "name", parts.kind), max(W, H), recommended)
    den, codec, device = parts.denoiser, parts.codec, parts.device
    C = den.latent_channels
    grid = c.grid
    rows, cols = grid_shape(V, c.grid_rows, c.grid_cols) if grid else (1, V)
    n_state = rows * cols if grid else V  # grid filler views join the state and are dropped at the end
    cfg = params.guidance > 1.0
    groups = 2 if cfg else 1

    # A private copy of the model's own scheduler (its class and config): clip_sample, thresholding, timestep
    # spacing and the scheduler kind are the model's, as in its own pipeline (ARCHITECTURE rule 11).
    sched = job_scheduler(model, parts, scheduler)

    text = parts.text_embeddings(params.prompt, params.negative_prompt, guidance=cfg).to(device)

    control_np = np.stack([depth_to_control(d) for d in vs.depth])  # (V, H, W) in [0, 1]
    control = state_control(den, torch.from_numpy(control_np)[:, None].to(device), n_state, (h, w))
    if grid:
        control_in = tile_views(control, rows, cols).repeat(groups, 1, 1, 1)
    else:
        control_in = control.repeat(groups, 1, 1, 1)
    per_group = 1 if grid else n_state
    emb = text.repeat_interleave(per_group, dim=0)

    from concord.geometry.sync import LatentSync

    sync = LatentSync.from_viewset(vs, (h, w), cos_power=params.bake.cos_power, device=device, dtype=torch.float32)

    gen = torch.Generator(device="cpu").manual_seed(int(params.seed))
    if c.uv_noise:
        from concord.noise.uv_noise import uv_space_noise

        noise = uv_space_noise(vs.uv, vs.mask, (C, h, w), gen, dtype=torch.float32)
    else:
        noise = torch.randn((V, C, h, w), generator=gen, dtype=torch.float32)
    if n_state > V:
        noise = torch.cat([noise, torch.randn((n_state - V, C, h, w), generator=gen, dtype=torch.float32)], 0)
    timings["encoding_s"] = time.perf_counter() - t0

    def model_output(xin, t):
        """The guided model output for every state view (n_state, C, h, w), float32, on the scaled input."""
        xin = xin.repeat(groups, 1, 1, 1)
        if grid:
            xin = torch.cat([tile_views(xg, rows, cols) for xg in xin.chunk(groups)])
        out = den.predict(xin, t, emb, control_in).float()
        if grid:
            out = torch.cat([untile_views(o[None], rows, cols) for o in out])
        return guided_output(out, params.guidance) if cfg else out

    def decode(latents):
        return codec.decode(latents)

    correspondence_applied = 0.0  # the correspondence weighting that ran (metrics.json)
    if c.shared_attention != "off":
        from concord.attention.extended import extended_attention

        refs = None if c.shared_attention == "all" else list(c.reference_views)
        bias = None
        if c.attention_correspondence > 0 and not grid:
            bias = correspondence_bias(vs, (h, w), c.attention_correspondence)
            correspondence_applied = c.attention_correspondence
        attention = extended_attention(den.modules, 1 if grid else n_state, reference_views=refs,
                                       chunk_size=c.attention_chunk, bias=bias)
    else:
        attention = contextlib.nullcontext()

    lg_window = math.ceil(c.loss_guidance_until * params.steps) if c.loss_guidance else 0
    lg_on = lg_window > 0 and c.loss_guidance_scale > 0 and V > 1  # what actually runs (reported as such)
    dist = distance or downsampled_l2
    counts = {"synced": 0, "guided": 0}
    lg_seconds = [0.0]

    # The consistency methods, as hooks of the one sampler loop (concord.pipelines.sampler).
    def before_denoise(info, x):  # loss guidance (SyncDiffusion), early steps only
        if not (lg_on and info.index < lg_window):
            return x
        tg = time.perf_counter()
        grad = loss_guidance_gradient(x, info.predict_x0, decode, dist, anchor=0, views=V)
        lg_seconds[0] += time.perf_counter() - tg
        counts["guided"] += 1
        ctx.raise_if_cancelled()
        return x - c.loss_guidance_scale * grad

    def after_x0(info, x0):  # UV sync: average the clean-latent predictions on the surface
        if not (c.uv_sync and sync_active(info.index, params.steps, c.sync_start, c.sync_end)):
            return x0
        x0 = x0.clone()
        x0[:V] = sync.sync(x0[:V])
        counts["synced"] += 1
        return x0

    hooks = Hooks(before_step=lambda i: ctx.raise_if_cancelled(), before_denoise=before_denoise, after_x0=after_x0,
                  after_step=ctx.advance)
    ctx.stage("denoising", total=params.steps)
    t0 = time.perf_counter()
    with attention, torch.no_grad():
        x = sample(model_output, sched, noise, params.steps, hooks, generator=gen, device=device, copy_scheduler=False)
    synced_steps, lg_steps = counts["synced"], counts["guided"]
    timings["denoising_s"] = time.perf_counter() - t0
    if lg_steps:
        timings["loss_guidance_s"] = lg_seconds[0]
    ctx.raise_if_cancelled()

    ctx.stage("decoding", total=V)
    t0 = time.perf_counter()
    latents = x[:V]
    # Measured through the same latent-pixel -> texel index UV sync averages through, so with sync on it is near
    # zero by construction: a diagnostic of the sync itself, not of how well the views agree (that is `disagreement`).
    latent_disagreement = float(sync.disagreement(latents))
    images = []
    with torch.no_grad():
        for k in range(0, V, 2):
            ctx.raise_if_cancelled()
            images.append(decode(latents[k : k + 2]).float().cpu())
            ctx.advance(min(k + 2, V))
    views = torch.cat(images).permute(0, 2, 3, 1).numpy()  # (V, H, W, 3) sRGB [0, 1]
    views_u8 = to_uint8(views)
    timings["decoding_s"] = time.perf_counter() - t0

    ctx.stage("baking")
    t0 = time.perf_counter()
    bake = bake_views(vs, views_u8, params.texture_size, cos_power=params.bake.cos_power, padding=params.bake.padding)
    disagreement = cross_view_disagreement(bake.index, views_u8)
    timings["baking_s"] = time.perf_counter() - t0
    surface = None
    if "triangles" in arrays:  # coverage of the UV islands (concord.geometry.metrics.surface_coverage)
        surface = surface_coverage(vs, arrays["triangles"], arrays["triangle_uv"], params.texture_size)
        timings["coverage_s"] = surface.seconds

    ctx.stage("saving")
    t0 = time.perf_counter()
    out = Path(ctx.out_dir)
    (out / "views").mkdir(parents=True, exist_ok=True)
    names = [f"views/view_{k:02d}.png" for k in range(V)]
    for k, name in enumerate(names):
        Image.fromarray(views_u8[k]).save(out / name)
    Image.fromarray(to_uint8(bake.texture)).save(out / "texture.png")
    Image.fromarray(coverage_image(bake.coverage, surface)).save(out / "coverage.png")
    pr, pc = grid_shape(V, c.grid_rows, c.grid_cols) if grid else grid_shape(V)
    ctrl_u8 = np.repeat(to_uint8(control_np)[..., None], 3, axis=-1)
    picture = np.concatenate([picture_grid(views_u8, pr, pc), picture_grid(ctrl_u8, pr, pc)], axis=0)
    Image.fromarray(picture).save(out / "grid.png")
    write_transforms_json(out / "transforms.json", vs.intrinsics, vs.world_to_camera, names, W, H)
    timings["saving_s"] = time.perf_counter() - t0

    metrics = {
        "kind": "texture",
        "model": getattr(model, "name", None),
        "model_kind": parts.kind,
        "device": str(device),
        "views": V,
        "view_size": [W, H],
        "latent_size": [w, h],
        "texture_size": params.texture_size,
        **coverage_metrics(bake.coverage, surface),  # coverage of the UV islands, or None without triangles
        # the headline: the decoded views' cross-view disagreement (MATH.md section 6; sRGB 0..1, each view baked
        # alone, texels seen by 2+ views), the full record below it
        "disagreement": disagreement.as_dict()["mean_abs_difference"],
        "cross_view_disagreement": disagreement.as_dict(),
        "latent_disagreement_through_sync_index": latent_disagreement,
        "grid": [rows, cols] if grid else None,
        "attention_correspondence": correspondence_applied,  # 0 when shared attention was plain, off or on a grid
        "synced_steps": synced_steps,  # steps whose x0 UV sync averaged
        "loss_guided_steps": lg_steps,  # steps that ran loss guidance (0 when it was off or had nothing to move)
        "scheduler": type(sched).__name__,
        "prediction_type": den.prediction_type,
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "params": params.model_dump(mode="json"),
        "settings": settings,  # {steps, guidance, texture_size: {value, source: "user" | "model"}}
        "recommended": recommended.as_dict(),
        "warnings": [n for n in (note, correspondence_note(c)) if n],
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics
