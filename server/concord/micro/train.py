"""`concord train-micro`: train the micro model on the procedural data, resumably, on a CPU or one GPU.

What it is for: producing the shipped `micro` weights with one documented command (docs/micro-model.md):

    concord train-micro --minutes 35 --out runs/micro --seed 0          # ~35 min on 2 CPU cores
    concord train-micro --minutes 35 --out runs/micro --seed 0 --resume # continue after an interruption

then copying ``runs/micro/model`` to ``server/concord/models/weights/micro``.

Objective: v-prediction (Salimans & Ho 2022, "Progressive Distillation", section 4) under the cosine schedule
(Nichol & Dhariwal 2021, "Improved DDPM", eq. 17), on pixel-unshuffled images (`concord.micro.model`):
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,   v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0,
    loss = E_{x0, eps, t ~ U{0..T-1}} || v_theta([x_t, c], t, text) - v ||^2        (mean over pixels)
(`--edge-weight` makes the mean a weighted one, heavier on object outlines: `edge_weights`; `--self-correct`
trains a share of steps' background pixels on the model's own sampling trajectory: `own_trajectory_input`;
`--loss-weight-cap C` caps every pixel's x0-loss weight at C: `capped_loss_weight`)
with the prompt dropped (replaced by "") for 10 % of samples so classifier-free guidance works (Ho & Salimans 2022).
A model with a pixel head (preset micro-head) predicts v through it (`concord.micro.model.micro_predict`);
`--train-only head` trains the head alone on a frozen UNet and text encoder (the shipped model's fourth stage).
UNet and text encoder train together with AdamW (Loshchilov & Hutter 2019), linear warm-up, gradient norm clipped
at 1; an exponential moving average of the weights (Polyak averaging; diffusers' `EMAModel` with warm-up
decay 1 - (1 + step)^-3/4, capped at `--ema-decay`) is what gets saved: EMA weights sample markedly better than
the raw ones after short training (Karras et al. 2024 study the effect; Ho et al. 2020 already sampled from EMA).

Reproducible from `--seed`: batch k is `generate_batch(batch, seed, index=k)`, and step k's timesteps, noise and
prompt drops come from generators seeded by (seed, k), so a resumed run takes exactly the steps an uninterrupted
one would (tested). The time budget decides only WHERE training stops; `--steps N` stops at an exact step count.
`--minutes` is the TOTAL training time over all resumed runs.

Files in --out: `checkpoint.pt` (model, EMA, optimizer, step, RNG states; rewritten every
`--checkpoint-minutes` and at the end, atomically), `loss.csv` (step, samples, train_seconds, loss, lr),
`train_config.json`, and `model/` (the EMA weights as a `MicroPipeline.save_pretrained` folder, fp16, refreshed at
every checkpoint, with `training.json` describing the run).

What this module must never do: run anything in parallel with the training step on the CPU (no DataLoader
workers, no background threads: the machines it targets have two cores), download anything, or write outside
`--out`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = ["TrainConfig", "train", "add_arguments", "main_from_args", "CHECKPOINT", "LOSS_LOG", "MODEL_DIR"]

CHECKPOINT = "checkpoint.pt"
LOSS_LOG = "loss.csv"
MODEL_DIR = "model"
_LOG_COLUMNS = ["step", "samples", "train_seconds", "loss", "lr"]


@dataclass
class TrainConfig:
    out: str
    minutes: float = 40.0
    steps: int | None = None  # total step cap (exact stop); None = time budget only
    seed: int = 0
    resume: bool = False
    batch: int | None = None  # None: 32 on the CPU, 128 on CUDA
    device: str = "auto"
    lr: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    text_drop: float = 0.1
    checkpoint_minutes: float = 5.0
    log_every: int = 10
    preset: str = "micro"
    size: int = 64
    threads: int = 2
    init_from: str | None = None  # a save_pretrained folder to start from (warm start; see `_warm_start`)
    views: int = 1  # > 1: multi-view steps on sets of this many views with extended attention installed
    single_share: float = 0.25  # with views > 1: the share of steps that train on single images (V = 1)
    # "all"; "attention": only the UNet's attention blocks train; "head": only the pixel head (`MicroPixelHead`)
    train_only: str = "all"
    open_share: float = 0.0  # the share of objects whose prompt leaves the colours open (`data.open_prompt`)
    set_timesteps: str = "independent"  # multi-view sets: "independent" (a t per view) or "shared" (one t per set)
    edge_weight: float = 1.0  # loss weight of pixels on the object's outline (`edge_weights`); 1 = plain mean
    # multi-view steps: correspondence-weighted attention strengths, one drawn per step (`_step_bias`); () = plain
    correspondence: tuple[float, ...] = ()
    # the share of steps whose background pixels start from the model's own prediction (`own_trajectory_input`)
    self_correct: float = 0.0
    self_correct_snr_cap: float = 5.0  # min-SNR cap of those pixels' loss weight (`self_correction_weight`)
    loss_weight_cap: float | None = None  # every pixel's x0-loss weight min(SNR + 1, cap) (`capped_loss_weight`)


class TrainError(ValueError):
    """A user error (bad arguments, a run folder in the way): one line, exit 2."""


def _resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda but CUDA is not available here")
    return dev


def _step_seed(seed: int, step: int, stream: int) -> int:
    """A 63-bit seed for (run seed, step, stream) via numpy's SeedSequence (no collisions between neighbours)."""
    return int(np.random.SeedSequence([int(seed), int(step), int(stream)]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up to cfg.lr over cfg.warmup_steps, then constant (the stop time is not known in advance)."""
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))


def _views_at(cfg: TrainConfig, step: int) -> int:
    """Views per object at `step`: 1 (single images) or cfg.views, a seeded draw per step (exact on resume)."""
    if cfg.views == 1:
        return 1
    return 1 if np.random.default_rng(_step_seed(cfg.seed, step, 3)).random() < cfg.single_share else cfg.views


def _step_prompts(cfg: TrainConfig, step: int, data, views: int) -> list[str]:
    """The prompts step `step` trains on: each object's full prompt, its open form (no colours named,
    `data.open_prompt`) with probability cfg.open_share, or "" with probability cfg.text_drop (classifier-free
    guidance). Both draws are per OBJECT -- a set's views share one prompt, as they do in a texture job -- from
    generators seeded by (seed, step), so a resumed run draws the same."""
    from concord.micro.data import open_prompt

    objects = len(data.prompts) // views
    drop = np.repeat(np.random.default_rng(_step_seed(cfg.seed, step, 1)).random(objects) < cfg.text_drop, views)
    opened = np.repeat(np.random.default_rng(_step_seed(cfg.seed, step, 4)).random(objects) < cfg.open_share, views)
    return ["" if d else (open_prompt(spec) if o else p) for d, o, p, spec in zip(drop, opened, data.prompts, data.specs)]


def _step_timesteps(gen, n: int, views: int, shared: bool, T: int):
    """The step's timesteps (n,): one draw per image, or with `shared` one per set of `views` consecutive images
    repeated over the set, so a set trains at one noise level as the texture job samples its views (every view at
    the same t, as MVDream, Shi et al. 2023, trains its multi-view sets). Tried as micro's attempt 4: it did not
    improve what shared attention does (docs/micro-model.md, "Training")."""
    import torch

    if shared and views > 1:
        return torch.randint(0, T, (n // views,), generator=gen).repeat_interleave(views)
    return torch.randint(0, T, (n,), generator=gen)


def _higher_timesteps(gen, t, views: int, shared: bool, T: int):
    """For each image's timestep t (n,), a draw t' uniform in [t, T - 1]: where the self-correction's input starts
    (`own_trajectory_input`). With `shared`, one draw per set of `views` consecutive images (whose t is shared too,
    `_step_timesteps`), so the set's views start at one noise level as they are sampled."""
    import torch

    if shared and views > 1:
        per = t.view(-1, views)[:, 0]
        return (per + (torch.rand(per.shape, generator=gen) * (T - per)).long()).repeat_interleave(views)
    return t + (torch.rand(t.shape, generator=gen) * (T - t)).long()


def _step_bias(cfg: TrainConfig, step: int, data, views: int, latent_hw: tuple[int, int]):
    """The step's correspondence-weighted attention (``concord.attention.extended.CorrespondenceBias``) or None:
    with ``cfg.correspondence`` set, a multi-view step draws one strength from it (seeded by the step, exact on
    resume; 0 = plain extended attention). The tokens' surface points are the renders' object coordinates (the
    views of a set share the object, so its coordinates are the set's common frame), on the token grid of every
    attention level, per set."""
    if views == 1 or not cfg.correspondence:
        return None
    from concord.attention.extended import CorrespondenceBias, attention_levels
    from concord.geometry.sync import token_grid

    rng = np.random.default_rng(_step_seed(cfg.seed, step, 5))
    beta = float(cfg.correspondence[int(rng.integers(len(cfg.correspondence)))])
    if beta == 0.0:
        return None
    sets = len(data.prompts) // views
    levels = []
    for hw, block in attention_levels(data.mask.shape[1:3], latent_hw):
        pts, fg = token_grid(data.coords, data.mask, hw, block)
        levels.append((pts.reshape(sets, views, *hw, 3), fg.reshape(sets, views, *hw)))
    return CorrespondenceBias(levels, beta)


def _self_correct_at(cfg: TrainConfig, step: int) -> bool:
    """Whether step `step` trains its background pixels on the model's own trajectory (`own_trajectory_input`):
    a seeded draw per step with probability cfg.self_correct (exact on resume)."""
    if cfg.self_correct <= 0.0:
        return False
    return bool(np.random.default_rng(_step_seed(cfg.seed, step, 6)).random() < cfg.self_correct)


def own_trajectory_input(x_t, x0, v_hat_hi, abar_hi, abar_lo, eps_lo, own):
    """The denoiser's training input at the lower noise level abar_lo, with the pixels where `own` is true taken from
    the model's own sampling trajectory instead of from the forward process; and the v target that takes every
    pixel back to the clean x0.

    Why: the shipped micro model paints the object's colour into the first ring of background pixels early in
    sampling (high t), and the later, low-t steps never remove it: in training, a low-t input never holds such a
    bleed, so the model learned to keep what it is given (measured: the x0 prediction's background fidelity is
    0.981 from step 6 of 20 to the end, while from ground truth noised to t = 99 it is 0.994). Training on inputs
    from the model's own earlier prediction is scheduled sampling (Bengio et al. 2015, "Scheduled Sampling for
    Sequence Prediction with Recurrent Neural Networks") against diffusion's exposure bias (Ning et al. 2023,
    "Input Perturbation Reduces Exposure Bias in Diffusion Models", and 2024, "Elucidating the Exposure Bias in
    Diffusion Models"). It is applied to background pixels only: there the clean value is known from the depth
    (the grey), so the correction is learnable; on the object the model's early guess cannot be corrected to one
    particular pattern, and training it to would teach it to blur.

    x_t is the forward-process input at abar_hi: x_t = sqrt(abar_hi) x0 + sqrt(1 - abar_hi) eps, and v_hat_hi the
    model's v prediction there (no gradient). With v-parametrisation (Salimans & Ho 2022):
        x0_hat  = sqrt(abar_hi) x_t - sqrt(1 - abar_hi) v_hat_hi
        eps_hat = sqrt(1 - abar_hi) x_t + sqrt(abar_hi) v_hat_hi
    one deterministic DDIM step (Song et al. 2021, eq. 12 with sigma = 0) takes it to abar_lo:
        x_own = sqrt(abar_lo) x0_hat + sqrt(1 - abar_lo) eps_hat
    the input is x_own where `own`, else the forward process x_fwd = sqrt(abar_lo) x0 + sqrt(1 - abar_lo) eps_lo,
    and the target is the v whose x0 is the clean one:  v = (sqrt(abar_lo) x_in - x0) / sqrt(1 - abar_lo)
    (equal to sqrt(abar_lo) eps_lo - sqrt(1 - abar_lo) x0 on the forward-process pixels).

    Tensors broadcast: abar_* (N, 1, 1, 1), `own` a bool tensor shaped like x0 (or broadcastable). Returns
    (x_in, v_target)."""
    import torch

    from concord.pipelines.sampler import output_from_x0, x0_from_output

    x0_hat = x0_from_output(v_hat_hi, x_t, abar_hi, "v_prediction")
    eps_hat = (1.0 - abar_hi).sqrt() * x_t + abar_hi.sqrt() * v_hat_hi  # exact in v form, even where abar_hi -> 1
    s_lo, n_lo = abar_lo.sqrt(), (1.0 - abar_lo).sqrt()
    x_own = s_lo * x0_hat + n_lo * eps_hat
    x_fwd = s_lo * x0 + n_lo * eps_lo
    x_in = torch.where(own, x_own, x_fwd)
    return x_in, output_from_x0(x0, x_in, abar_lo, "v_prediction")


def latent_layout(per_pixel: np.ndarray):
    """A per-pixel map (N, H, W) in micro's pixel-unshuffle latent layout (N, 3 colours x 2x2 pixels, H/2, W/2), as
    a float tensor: where each pixel's three colour values sit in the codec's latents."""
    import torch

    from concord.micro.model import FACTOR

    m = torch.from_numpy(np.asarray(per_pixel, np.float32))[:, None].expand(-1, 3, -1, -1)
    return torch.nn.functional.pixel_unshuffle(m, FACTOR)


def self_correction_weight(abar, cap: float):
    """Loss weight, on the v error, of a pixel trained on the model's own trajectory: min(SNR, cap) / (SNR + 1) with
    SNR = abar / (1 - abar). The v error of such a pixel is its x0 error times 1 / sqrt(1 - abar) = sqrt(SNR + 1),
    which at low noise would let a handful of bleeding pixels dominate the batch; the weight makes it an x0 error
    weighted min(SNR, cap) -- min-SNR weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    Weighting Strategy"), here for those pixels only."""
    snr = abar / (1.0 - abar)
    return snr.clamp(max=cap) / (snr + 1.0)


def capped_loss_weight(abar, cap: float):
    """Loss weight, on the v error, that caps the x0 error's weight at `cap`: min(1, cap / (SNR + 1)).

    The plain v loss is the x0 loss weighted SNR + 1 (v - v_hat = (x0_hat - x0) / sqrt(1 - abar); Salimans & Ho
    2022, section 4, "SNR+1" weighting), which near t = 0 reaches 1 / (1 - abar) ~ 2.5e4 under the cosine schedule.
    A part that only corrects x0 (the pixel head, `--train-only head`) would then be trained almost entirely on
    nearly clean inputs, where there is nothing to correct; capping the weight, as min-SNR weighting does (Hang et
    al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"), keeps every noise level in play."""
    return (cap * (1.0 - abar)).clamp(max=1.0)


def edge_weights(mask: np.ndarray, weight: float) -> np.ndarray:
    """Per-pixel loss weights (N, H, W) float32: `weight` on the object's outline -- every pixel whose 3x3
    neighbourhood holds both object and background, i.e. the last object pixel and the first background pixel --
    and 1 elsewhere.

    Why: the outline is ~8 % of a 64x64 training picture (measured on 64 samples), so a plain mean barely charges
    the model for painting the object's colour one pixel into the background, which is exactly where the shipped
    model lost its background fidelity (every failing pixel was in that first background ring, most inside a 2x2
    block it shares with the object; docs/micro-model.md). Weighting the loss per pixel is the usual remedy for thin
    structures (e.g. the border weights of Ronneberger et al. 2015, "U-Net", eq. 2). Tried as micro's attempt 4
    (weight 4): background fidelity did not move (docs/micro-model.md, "Training")."""
    m = np.asarray(mask, bool)
    pad = np.pad(m, ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = m.shape[1:]
    shifts = [pad[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    any_obj = np.logical_or.reduce(shifts)
    any_bg = ~np.logical_and.reduce(shifts)
    return np.where(any_obj & any_bg, np.float32(weight), np.float32(1.0)).astype(np.float32)


def _warm_start(comps: dict, folder: Path) -> None:
    """Load a trained model's weights into freshly built components of a LARGER architecture (e.g. "micro-v1"
    -> "micro", which adds attention at 16x16). Every tensor whose name and shape match is copied; the new
    attention blocks' output projections (``proj_out``) are zeroed, so each new block adds exactly 0 to its
    residual stream and the grown model computes what the trained one did (tested) -- training then teaches the
    new blocks to contribute (ControlNet's zero convolutions, Zhang et al. 2023, use the same idea). Raises
    TrainError when a tensor of the trained model has no place in the new one."""
    import torch

    from concord.micro.model import MicroPipeline

    src = MicroPipeline.from_pretrained(str(folder))
    names = ("unet", "text_encoder") + (("head",) if comps.get("head") is not None and src.head is not None else ())
    if src.head is not None and comps.get("head") is None:
        raise TrainError(f"--init-from {folder}: that model has a pixel head and the preset being trained has none")
    for name in names:
        target, source = comps[name], getattr(src, name)
        own = target.state_dict()
        theirs = source.state_dict()
        misfit = [k for k, v in theirs.items() if k not in own or own[k].shape != v.shape]
        if misfit:
            raise TrainError(f"--init-from {folder}: {name} tensor {misfit[0]} does not fit the {name} being trained")
        missing = [k for k in own if k not in theirs]
        target.load_state_dict({k: v.float() for k, v in theirs.items()}, strict=False)
        with torch.no_grad():
            for k in missing:
                if ".proj_out." in k:
                    target.get_parameter(k).zero_()


def _atomic_torch_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rewrite_log(path: Path, upto_step: int) -> None:
    """Keep loss.csv rows up to the checkpoint's step (a crash after the last checkpoint leaves later rows)."""
    if not path.exists():
        return
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= upto_step]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_LOG_COLUMNS)
        w.writeheader()
        w.writerows(rows)


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    """Run (or resume) training as `cfg` says. Returns a summary dict (also written to model/training.json)."""
    import torch

    from concord.micro.model import PRESET_CONFIGS

    if cfg.preset not in PRESET_CONFIGS:
        raise TrainError(f"--preset must be one of {', '.join(PRESET_CONFIGS)}")
    if cfg.minutes <= 0 and cfg.steps is None:
        raise TrainError("--minutes must be > 0 (or give --steps)")
    if cfg.size % 8:
        raise TrainError("--size must be a multiple of 8")
    if cfg.views < 1:
        raise TrainError("--views must be >= 1")
    if not 0.0 <= cfg.single_share <= 1.0:
        raise TrainError("--single-share must be in [0, 1]")
    if cfg.train_only not in ("all", "attention", "head"):
        raise TrainError("--train-only must be all, attention or head")
    if cfg.train_only == "head" and PRESET_CONFIGS[cfg.preset].head_channels <= 0:
        raise TrainError(f"--train-only head: preset {cfg.preset} has no pixel head (try micro-head)")
    if cfg.train_only == "head" and cfg.init_from is None:
        raise TrainError("--train-only head needs --init-from: the head corrects a trained model, not a random one")
    if cfg.loss_weight_cap is not None and not cfg.loss_weight_cap >= 1.0:
        raise TrainError("--loss-weight-cap must be >= 1")
    if cfg.set_timesteps not in ("independent", "shared"):
        raise TrainError("--set-timesteps must be independent or shared")
    if not cfg.edge_weight >= 1.0:
        raise TrainError("--edge-weight must be >= 1")
    if not 0.0 <= cfg.self_correct <= 1.0:
        raise TrainError("--self-correct must be in [0, 1]")
    if not cfg.self_correct_snr_cap > 0.0:
        raise TrainError("--self-correct-snr-cap must be > 0")
    if cfg.init_from is not None and not (Path(cfg.init_from) / "model_index.json").is_file():
        raise TrainError(f"--init-from {cfg.init_from}: not a micro model folder (no model_index.json)")
    device = _resolve_device(cfg.device)
    batch = cfg.batch or (128 if device.type == "cuda" else 32)
    if batch < 1:
        raise TrainError("--batch must be >= 1")
    old_threads = torch.get_num_threads()
    if device.type == "cpu" and cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, progress, device, batch)
    finally:
        torch.set_num_threads(old_threads)


def _train(cfg: TrainConfig, progress: bool, device, batch: int) -> dict:
    import torch
    from diffusers.training_utils import EMAModel

    from concord.attention import extended_attention
    from concord.micro.data import generate_batch, generate_view_sets
    from concord.micro.model import build_components, micro_codec, micro_conditioning, micro_predict, tokenize

    out = Path(cfg.out)
    ckpt_path, log_path = out / CHECKPOINT, out / LOSS_LOG
    if ckpt_path.exists() and not cfg.resume:
        raise TrainError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)

    comps = build_components(cfg.preset, seed=cfg.seed)
    if cfg.init_from is not None and not (cfg.resume and ckpt_path.exists()):
        _warm_start(comps, Path(cfg.init_from))
    unet, text_encoder, tokenizer = comps["unet"].to(device), comps["text_encoder"].to(device), comps["tokenizer"]
    head = comps["head"].to(device) if comps["head"] is not None else None
    unet.train()
    text_encoder.train()
    networks_train = cfg.train_only != "head"  # UNet and text encoder run without gradients when only the head trains
    if cfg.train_only == "head":
        for m in (unet, text_encoder):
            m.requires_grad_(False)
            m.eval()
        head.train()
        params = list(head.parameters())
    elif cfg.train_only == "attention":  # the transformer blocks (self/cross attention, feed-forward, their norms)
        for m in (unet, text_encoder) + ((head,) if head is not None else ()):
            m.requires_grad_(False)
        params = [prm for name, prm in unet.named_parameters() if ".attentions." in name]
        for prm in params:
            prm.requires_grad_(True)
    else:
        params = list(unet.parameters()) + list(text_encoder.parameters())
        params += list(head.parameters()) if head is not None else []
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    alphas_cumprod = comps["scheduler"].alphas_cumprod.to(device=device, dtype=torch.float32)
    T = len(alphas_cumprod)
    codec = micro_codec()

    step, samples, train_seconds = 0, 0, 0.0
    if cfg.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        same = ("preset", "seed", "views", "single_share", "init_from", "train_only", "open_share", "set_timesteps",
                "edge_weight", "correspondence", "self_correct", "self_correct_snr_cap", "loss_weight_cap",
                "weight_decay")
        if any(ck["config"].get(k, TrainConfig.__dataclass_fields__[k].default) != getattr(cfg, k) for k in same) or ck["batch"] != batch:
            written = " ".join(f"{k}={ck['config'].get(k)}" for k in same)
            raise TrainError(f"{ckpt_path} was written with {written} batch={ck['batch']}; resume with the same values")
        unet.load_state_dict(ck["unet"])
        text_encoder.load_state_dict(ck["text_encoder"])
        if head is not None:
            head.load_state_dict(ck["head"])
        opt.load_state_dict(ck["optimizer"])
        ema.load_state_dict(ck["ema"])
        ema.to(device)
        step, samples, train_seconds = ck["step"], ck["samples"], ck["train_seconds"]
        torch.set_rng_state(ck["rng"]["torch"])
        random.setstate(ck["rng"]["python"])
        np.random.set_state(ck["rng"]["numpy"])
        if device.type == "cuda" and ck["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
        _rewrite_log(log_path, step)
    else:
        log_path.unlink(missing_ok=True)
    (out / "train_config.json").write_text(json.dumps({**asdict(cfg), "batch": batch, "device": str(device)}, indent=2))

    def save_checkpoint() -> None:
        _atomic_torch_save(
            {
                "unet": unet.state_dict(),
                "text_encoder": text_encoder.state_dict(),
                "head": head.state_dict() if head is not None else None,
                "optimizer": opt.state_dict(),
                "ema": ema.state_dict(),
                "step": step,
                "samples": samples,
                "train_seconds": train_seconds,
                "batch": batch,
                "config": asdict(cfg),
                "rng": {
                    "torch": torch.get_rng_state(),
                    "python": random.getstate(),
                    "numpy": np.random.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
                },
            },
            ckpt_path,
        )

    def export_model(final_loss: float | None) -> dict:
        """EMA weights -> out/model (fp16 save_pretrained) without disturbing the training weights."""
        from concord.micro.model import MicroPipeline, count_parameters

        ema.store(params)
        ema.copy_to(params)
        try:
            pipe = MicroPipeline(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=comps["scheduler"],
                                 head=head)
            pipe.save_pretrained(out / MODEL_DIR)
        finally:
            ema.restore(params)
        summary = {
            "model": "concord micro",
            "preset": cfg.preset,
            "seed": cfg.seed,
            "steps": step,
            "samples_seen": samples,
            "train_minutes": round(train_seconds / 60.0, 2),
            "batch": batch,
            "lr": cfg.lr,
            "ema_decay": cfg.ema_decay,
            "image_size": cfg.size,
            "device": str(device),
            "parameters": count_parameters(unet) + count_parameters(text_encoder)
            + (count_parameters(head) if head is not None else 0),
            "final_loss": final_loss,
            "views": cfg.views,
            "train_only": cfg.train_only,
            "single_share": cfg.single_share if cfg.views > 1 else None,
            "init_from": cfg.init_from,
            "open_share": cfg.open_share,
            "warmup_steps": cfg.warmup_steps,
            "set_timesteps": cfg.set_timesteps,
            "edge_weight": cfg.edge_weight,
            "correspondence": list(cfg.correspondence),
            "self_correct": cfg.self_correct,
            "self_correct_snr_cap": cfg.self_correct_snr_cap,
            "loss_weight_cap": cfg.loss_weight_cap,
            "command": f"concord train-micro --minutes {cfg.minutes:g} --out {cfg.out} --seed {cfg.seed}"
            + (f" --preset {cfg.preset}" if cfg.preset != "micro" else "")
            + (f" --batch {cfg.batch}" if cfg.batch else "")
            + (f" --steps {cfg.steps}" if cfg.steps else "")
            + (f" --views {cfg.views} --single-share {cfg.single_share:g}" if cfg.views > 1 else "")
            + (f" --init-from {cfg.init_from}" if cfg.init_from else "")
            + (f" --train-only {cfg.train_only}" if cfg.train_only != "all" else "")
            + (f" --warmup-steps {cfg.warmup_steps}" if cfg.warmup_steps != 200 else "")
            + (f" --open-prompts {cfg.open_share:g}" if cfg.open_share else "")
            + (f" --set-timesteps {cfg.set_timesteps}" if cfg.set_timesteps != "independent" else "")
            + (f" --edge-weight {cfg.edge_weight:g}" if cfg.edge_weight != 1.0 else "")
            + (" --correspondence " + ",".join(f"{b:g}" for b in cfg.correspondence) if cfg.correspondence else "")
            + (f" --self-correct {cfg.self_correct:g}" if cfg.self_correct else "")
            + (f" --self-correct-snr-cap {cfg.self_correct_snr_cap:g}" if cfg.self_correct_snr_cap != 5.0 else "")
            + (f" --loss-weight-cap {cfg.loss_weight_cap:g}" if cfg.loss_weight_cap is not None else "")
            + (f" --weight-decay {cfg.weight_decay:g}" if cfg.weight_decay != 0.01 else "")
            + (f" --lr {cfg.lr:g}" if cfg.lr != 1e-3 else ""),
        }
        (out / MODEL_DIR / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    budget_s = cfg.minutes * 60.0 if cfg.minutes > 0 else float("inf")

    def finished() -> bool:
        return (cfg.steps is not None and step >= cfg.steps) or train_seconds >= budget_s

    new_log = not log_path.exists()
    log_f = log_path.open("a", newline="")
    log = csv.writer(log_f)
    if new_log:
        log.writerow(_LOG_COLUMNS)
    bar = None
    if progress:
        from tqdm import tqdm

        if cfg.steps is not None:
            bar = tqdm(total=cfg.steps, initial=step, unit="step", desc="train-micro", dynamic_ncols=True)
        else:
            bar = tqdm(total=round(budget_s), initial=round(train_seconds), unit="s", desc="train-micro", dynamic_ncols=True)

    last_ckpt = time.perf_counter()
    loss_acc, loss_n, last_loss = 0.0, 0, None
    try:
        while not finished():
            t_start = time.perf_counter()
            lr = _lr_at(cfg, step)
            for g in opt.param_groups:
                g["lr"] = lr
            views = _views_at(cfg, step)
            if views == 1:
                data = generate_batch(batch, cfg.seed, index=step, height=cfg.size, width=cfg.size, split="train")
            else:
                data = generate_view_sets(max(1, batch // views), views, cfg.seed, index=step, height=cfg.size,
                                          width=cfg.size, split="train")
            n = len(data.prompts)
            prompts = _step_prompts(cfg, step, data, views)
            gen = torch.Generator().manual_seed(_step_seed(cfg.seed, step, 2))
            x0 = codec.encode(torch.from_numpy(data.images).permute(0, 3, 1, 2))
            cond = micro_conditioning(data.depth)
            t = _step_timesteps(gen, n, views, cfg.set_timesteps == "shared", T)
            eps = torch.randn(x0.shape, generator=gen)
            x0, cond, eps, t = x0.to(device), cond.to(device), eps.to(device), t.to(device)
            abar = alphas_cumprod[t].view(-1, 1, 1, 1)
            # x_t = sqrt(abar) x0 + sqrt(1 - abar) eps;  v = sqrt(abar) eps - sqrt(1 - abar) x0  (Salimans & Ho 2022)
            x_t = abar.sqrt() * x0 + (1.0 - abar).sqrt() * eps
            v = abar.sqrt() * eps - (1.0 - abar).sqrt() * x0
            ids = tokenize(tokenizer, prompts).to(device)
            with torch.set_grad_enabled(networks_train):
                emb = text_encoder(ids)[0]
            bias = _step_bias(cfg, step, data, views, tuple(x_t.shape[-2:]))
            w = None
            if cfg.edge_weight != 1.0:
                w = latent_layout(edge_weights(data.mask, cfg.edge_weight)).to(device)
            if _self_correct_at(cfg, step):
                # the views' own prediction at a higher t (a draw between t and T - 1 per image), one DDIM step
                # down to t on the background pixels (`own_trajectory_input`)
                t_hi = _higher_timesteps(gen, t.cpu(), views, cfg.set_timesteps == "shared", T).to(device)
                abar_hi = alphas_cumprod[t_hi].view(-1, 1, 1, 1)
                eps_hi = torch.randn(x0.shape, generator=gen).to(device)
                x_hi = abar_hi.sqrt() * x0 + (1.0 - abar_hi).sqrt() * eps_hi
                with torch.no_grad(), extended_attention([unet] if views > 1 else [], views, bias=bias):
                    v_hat = micro_predict(unet, head, alphas_cumprod, torch.cat([x_hi, cond], 1), t_hi,
                                          emb.detach()).float()
                own = latent_layout(~data.mask).to(device) > 0.5
                x_t, v = own_trajectory_input(x_hi, x0, v_hat, abar_hi, abar, eps, own)
                w_own = torch.where(own, self_correction_weight(abar, cfg.self_correct_snr_cap), 1.0)
                w = w_own if w is None else w * w_own
            with extended_attention([unet] if views > 1 else [], views, bias=bias):
                pred = micro_predict(unet, head, alphas_cumprod, torch.cat([x_t, cond], 1), t, emb,
                                     unet_grad=networks_train)
            if cfg.loss_weight_cap is not None:
                w_cap = capped_loss_weight(abar, cfg.loss_weight_cap).expand_as(v)
                w = w_cap if w is None else w * w_cap
            if w is None:
                loss = torch.nn.functional.mse_loss(pred.float(), v)
            else:  # weighted mean
                loss = (w * (pred.float() - v) ** 2).sum() / w.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            ema.step(params)
            step += 1
            samples += n
            lv = float(loss.detach())
            loss_acc += lv
            loss_n += 1
            train_seconds += time.perf_counter() - t_start
            if step % cfg.log_every == 0 or finished():
                last_loss = loss_acc / loss_n
                log.writerow([step, samples, f"{train_seconds:.2f}", f"{last_loss:.6f}", f"{lr:.6g}"])
                log_f.flush()
                loss_acc, loss_n = 0.0, 0
            if bar is not None:
                if cfg.steps is not None:
                    bar.update(1)
                else:
                    bar.n = min(round(train_seconds), bar.total)
                    bar.refresh()
                bar.set_postfix(step=step, loss=f"{lv:.4f}", sps=f"{samples / max(train_seconds, 1e-9):.1f}")
            if time.perf_counter() - last_ckpt >= cfg.checkpoint_minutes * 60.0 and not finished():
                save_checkpoint()
                export_model(last_loss)
                last_ckpt = time.perf_counter()
    finally:
        if bar is not None:
            bar.close()
        log_f.close()
    save_checkpoint()
    return export_model(last_loss)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="run folder: checkpoint.pt, loss.csv, model/ (the result)")
    parser.add_argument("--minutes", type=float, default=40.0, help="total training time over all resumed runs (default 40)")
    parser.add_argument("--steps", type=int, default=None, help="stop after exactly this many steps in total")
    parser.add_argument("--seed", type=int, default=0, help="data, noise and initial weights (default 0)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default 32 on the CPU, 128 on CUDA)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate after warm-up (default 1e-3)")
    parser.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay cap (default 0.999)")
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0, help="checkpoint interval (default 5)")
    parser.add_argument("--log-every", type=int, default=10, help="steps per loss.csv row (default 10)")
    parser.add_argument("--preset", default="micro", help="model size: micro-head (shipped), micro (the same without the pixel head), micro-v1 (stage 1), test, test-head (unit-test sizes)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2; 0 = torch's default)")
    parser.add_argument("--init-from", default=None, help="start from this trained model folder (may be a smaller "
                        "architecture: new attention blocks start as identity)")
    parser.add_argument("--views", type=int, default=1, help="> 1: train on sets of this many views of one object "
                        "with extended attention installed (default 1: single images)")
    parser.add_argument("--train-only", default="all", choices=["all", "attention", "head"],
                        help="attention: train only the UNet's attention blocks, the rest frozen; head: only the "
                        "pixel head of a preset that has one (micro-head) (default all)")
    parser.add_argument("--loss-weight-cap", type=float, default=None, help="cap every pixel's x0-loss weight "
                        "(SNR + 1 in the plain v loss) at this value (default: no cap)")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    parser.add_argument("--warmup-steps", type=int, default=200, help="linear learning-rate warm-up (default 200)")
    parser.add_argument("--single-share", type=float, default=0.25, help="with --views > 1, the share of steps on "
                        "single images (default 0.25)")
    parser.add_argument("--open-prompts", type=float, default=0.0, help="the share of objects whose prompt names "
                        "no colours, e.g. 'a checker box' (default 0); views must then agree on colours themselves")
    parser.add_argument("--set-timesteps", default="independent", choices=["independent", "shared"],
                        help="multi-view sets: a noise level per view, or one per set as the texture job samples "
                        "(default independent)")
    parser.add_argument("--edge-weight", type=float, default=1.0, help="loss weight of the pixels on each object's "
                        "outline (default 1: a plain mean)")
    parser.add_argument("--correspondence", default="", help="multi-view steps: comma-separated strengths of "
                        "correspondence-weighted shared attention, one drawn per step, e.g. 0,4,8 (default: plain "
                        "extended attention)")
    parser.add_argument("--self-correct", type=float, default=0.0, help="the share of steps whose background "
                        "pixels start from the model's own prediction one DDIM step higher, so it learns to remove "
                        "colour it bled into the background (default 0)")
    parser.add_argument("--self-correct-snr-cap", type=float, default=5.0, help="min-SNR cap of those pixels' "
                        "loss weight (default 5)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parse_strengths(text: str) -> tuple[float, ...]:
    """"0,4,8" -> (0.0, 4.0, 8.0); "" -> (). TrainError on anything else."""
    if not text.strip():
        return ()
    try:
        vals = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise TrainError(f"--correspondence takes comma-separated numbers, e.g. 0,4,8; got {text!r}") from None
    if any(not (v >= 0.0) for v in vals):
        raise TrainError(f"--correspondence strengths must be >= 0; got {text!r}")
    return vals


def main_from_args(args: argparse.Namespace) -> int:
    """Run `concord train-micro` with parsed `args` (see `add_arguments`). 0 on success, 2 on a user error."""
    import diffusers
    import transformers

    # Our own tqdm bar is the progress report; the libraries' per-save bars ("Writing model shards") are noise.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    cfg = TrainConfig(
        out=args.out,
        minutes=args.minutes,
        steps=args.steps,
        seed=args.seed,
        resume=args.resume,
        batch=args.batch,
        device=args.device,
        lr=args.lr,
        ema_decay=args.ema_decay,
        checkpoint_minutes=args.checkpoint_minutes,
        log_every=max(1, args.log_every),
        preset=args.preset,
        threads=args.threads,
        init_from=args.init_from,
        views=args.views,
        single_share=args.single_share,
        train_only=args.train_only,
        warmup_steps=args.warmup_steps,
        open_share=args.open_prompts,
        set_timesteps=args.set_timesteps,
        edge_weight=args.edge_weight,
        correspondence=_parse_strengths(args.correspondence),
        self_correct=args.self_correct,
        self_correct_snr_cap=args.self_correct_snr_cap,
        loss_weight_cap=args.loss_weight_cap,
        weight_decay=args.weight_decay,
    )
    try:
        summary = train(cfg, progress=not args.no_progress)
    except TrainError as exc:
        print(f"concord train-micro: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"concord train-micro: interrupted; continue with --resume (checkpoints in {cfg.out})", file=sys.stderr)
        return 130
    print(
        f"concord train-micro: {summary['steps']} steps, {summary['samples_seen']} samples in "
        f"{summary['train_minutes']} min; final loss {summary['final_loss']}; model in {Path(cfg.out) / MODEL_DIR}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m concord.micro.train ...` (the same as `concord train-micro ...`)."""
    from concord.models.registry import quiet_libraries

    quiet_libraries()
    parser = argparse.ArgumentParser(prog="concord train-micro", description="train the micro model")
    add_arguments(parser)
    return main_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
