"""Initial noise for an animation, frame after frame: iid, shared, mixed, progressive and motion-warped noise, drawn
as a stream so a sequence of any length (and its chunks, and a resumed job) needs one frame's state, not all frames.

What it is for
--------------
The `stylize` job starts frame i from noise eps_i. How the eps_i relate decides how alike the frames start
(MATH.md section 1). Every mode keeps each frame's every latent pixel exactly N(0, 1) and the pixels of one frame
independent (white); the tests measure both.

* ``iid``:   eps_i ~ N(0, I), independent.
* ``shared``: eps_i = eps for every frame.
* ``mixed(a)`` (Ge et al., "Preserve Your Own Correlation", ICCV'23): eps_i = s + e_i,
  s ~ N(0, a^2/(1+a^2) I) drawn once, e_i ~ N(0, 1/(1+a^2) I); corr(eps_i, eps_j) = a^2 / (1 + a^2).
* ``progressive(a)`` (same paper): eps_0 ~ N(0, I), eps_i = a/sqrt(1+a^2) eps_{i-1} + e_i,
  e_i ~ N(0, 1/(1+a^2) I); corr(eps_i, eps_{i-k}) = (a / sqrt(1 + a^2))^k.
* ``warped(r)`` (Kass & Pesare, "Coherent noise for non-photorealistic rendering", ToG 2011, in the unit-variance
  form of MATH.md section 1): eps_i(x) = r eps_{i-1}(x') + sqrt(1 - r^2) eta_i(x) where pixel x of frame i
  corresponds to x' of frame i - 1 (Blender's motion vectors with a depth test, `concord.frames.frameset.
  correspondence`), eps_i(x) = eta_i(x) where x is disoccluded.

Warping white noise without losing whiteness (the partition)
-------------------------------------------------------------
Reading eps_{i-1} at x' bilinearly lowers the variance and correlates neighbours; reading the nearest pixel
duplicates values where the motion stretches the image (two pixels of frame i read one pixel of frame i - 1), and
neighbours become equal. MATH.md asks for the integral-noise idea instead (Chang et al., "How I Warped Your Noise",
ICLR 2024, carry noise as an integral over sub-pixel cells): the stream keeps a FINE noise field F_i of k x k iid
N(0, 1) cells per latent pixel, and a latent pixel's noise is the sum of its own k^2 cells divided by k, so it is
exactly N(0, 1) and disjoint from its neighbours' (white). From one frame to the next each fine cell c of frame i
looks up, through the correspondence at its centre, the fine cell s(c) of frame i - 1 it came from. Cells claiming
the same source (a stretch) are resolved by giving the source to ONE of them (the first in raster order); the
others and the disoccluded cells draw fresh noise:

    F_i(c) = r F_{i-1}(s(c)) + sqrt(1 - r^2) eta_i(c)     for the one cell that keeps s(c),
    F_i(c) = eta_i(c)                                     otherwise.

Distinct cells of F_i then read distinct (independent) cells of F_{i-1}, so F_i is again iid N(0, 1) -- exactly,
not approximately -- and a surface point keeps its noise along its motion (correlation r per frame on the fine
cells; the latent pixel's correlation with its source pixel is r times the share of cells it carried over).

What this module must never do: import bpy, touch the network or the file system, or use the global RNG (every
draw comes from the stream's own ``torch.Generator``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["NOISE_MODES", "NoiseSpec", "FrameNoiseStream", "carry_fine_cells", "block_sum", "FINE_CELLS"]

NOISE_MODES = ("iid", "shared", "mixed", "progressive", "warped")
#: Fine cells per latent pixel side (k): k^2 cells per latent pixel.
FINE_CELLS = 4


@dataclass(frozen=True)
class NoiseSpec:
    """A noise mode and its parameter: `a` for mixed / progressive (alpha >= 0), `r` for warped (0 <= r <= 1)."""

    mode: str = "warped"
    strength: float = 1.0

    def __post_init__(self):
        if self.mode not in NOISE_MODES:
            raise ValueError(f"noise mode must be one of {', '.join(NOISE_MODES)}, got {self.mode!r}")
        s = float(self.strength)
        if not math.isfinite(s) or s < 0 or (self.mode == "warped" and s > 1):
            raise ValueError(f"noise strength {self.strength!r} out of range for {self.mode!r} "
                             "(warped: 0 <= r <= 1; mixed / progressive: a >= 0)")


def block_sum(fine: torch.Tensor, k: int) -> torch.Tensor:
    """(C, h k, w k) -> (C, h, w): the sum of each latent pixel's k x k cells divided by k (N(0, 1) from iid
    N(0, 1) cells, white: the blocks are disjoint)."""
    c, hk, wk = fine.shape
    return fine.reshape(c, hk // k, k, wk // k, k).sum((2, 4)) / k


def carry_fine_cells(
    source: np.ndarray, valid: np.ndarray, fine_hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Which fine cell of frame i - 1 each fine cell of frame i carries (module docstring, "the partition").

    source (H, W, 2): for each IMAGE pixel of frame i, its (x, y) position in frame i - 1 in pixels (centres at
    +0.5); valid (H, W) bool. fine_hw: (h k, w k). Returns (target, src): flat indices into the fine grid, target
    cells of frame i and the distinct source cells of frame i - 1 they keep (len(target) == len(set(src)))."""
    H, W = valid.shape
    fh, fw = fine_hw
    # the image pixel under each fine cell's centre
    rows = np.minimum(((np.arange(fh) + 0.5) * H / fh).astype(np.int64), H - 1)
    cols = np.minimum(((np.arange(fw) + 0.5) * W / fw).astype(np.int64), W - 1)
    # the fine cell's own centre offset from that pixel's centre, carried along with it (sub-pixel precision)
    oy = (np.arange(fh) + 0.5) * H / fh - (rows + 0.5)
    ox = (np.arange(fw) + 0.5) * W / fw - (cols + 0.5)
    sx = source[rows[:, None], cols[None, :], 0] + ox[None, :]
    sy = source[rows[:, None], cols[None, :], 1] + oy[:, None]
    ok = valid[rows[:, None], cols[None, :]].copy()
    fx = np.floor(sx * fw / W).astype(np.int64)
    fy = np.floor(sy * fh / H).astype(np.int64)
    ok &= (fx >= 0) & (fx < fw) & (fy >= 0) & (fy < fh)
    target = np.flatnonzero(ok)
    src = (fy * fw + fx).reshape(-1)[target]
    _, first = np.unique(src, return_index=True)  # one claimant per source cell: the first in raster order
    first.sort()
    return target[first], src[first]


class FrameNoiseStream:
    """Noise for frames 0, 1, 2, ... of one sequence, one call per frame (module docstring).

    shape: (C, h, w) latent noise per frame; image_hw: (H, W) of the frames (the motion's pixels), needed by
    ``warped``; generator: a CPU torch.Generator, the stream's only source of randomness. ``next(source, valid)``
    returns frame i's (C, h, w) float32 noise; ``source`` / ``valid`` (`correspondence`'s output for frame i) are
    used by ``warped`` only (None, e.g. for frame 0, means "no correspondence": fresh noise). ``state_dict`` /
    ``load_state_dict`` carry the stream across chunks and resumed jobs (the generator's state included)."""

    def __init__(self, spec: NoiseSpec, shape: tuple[int, int, int], image_hw: tuple[int, int],
                 generator: torch.Generator, fine: int = FINE_CELLS):
        self.spec = spec
        self.shape = tuple(int(s) for s in shape)
        self.image_hw = tuple(int(s) for s in image_hw)
        self.gen = generator
        self.k = int(fine)
        self.index = 0
        self.shared: torch.Tensor | None = None  # shared / mixed: the common part
        self.previous: torch.Tensor | None = None  # progressive: eps_{i-1}; warped: the fine field F_{i-1}

    def _randn(self, *shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen, dtype=torch.float32)

    def next(self, source: np.ndarray | None = None, valid: np.ndarray | None = None) -> torch.Tensor:
        c, h, w = self.shape
        mode, a = self.spec.mode, float(self.spec.strength)
        if mode == "iid":
            out = self._randn(c, h, w)
        elif mode == "shared":
            if self.shared is None:
                self.shared = self._randn(c, h, w)
            out = self.shared.clone()
        elif mode == "mixed":
            # eps_i = s + e_i, s ~ N(0, a^2/(1+a^2)), e_i ~ N(0, 1/(1+a^2))   (Ge et al. 2023)
            if self.shared is None:
                self.shared = self._randn(c, h, w) * (a / math.sqrt(1 + a * a))
            out = self.shared + self._randn(c, h, w) / math.sqrt(1 + a * a)
        elif mode == "progressive":
            # eps_i = a/sqrt(1+a^2) eps_{i-1} + e_i, e_i ~ N(0, 1/(1+a^2))     (Ge et al. 2023)
            fresh = self._randn(c, h, w)
            if self.previous is None:
                out = fresh
            else:
                out = (a * self.previous + fresh) / math.sqrt(1 + a * a)
            self.previous = out
        else:  # warped
            k = self.k
            fresh = self._randn(c, h * k, w * k)
            if self.previous is None or source is None or valid is None:
                field = fresh
            else:
                target, src = carry_fine_cells(np.asarray(source), np.asarray(valid, bool), (h * k, w * k))
                field = fresh.reshape(c, -1).clone()
                t_idx, s_idx = torch.from_numpy(target), torch.from_numpy(src)
                # F_i(c) = r F_{i-1}(s(c)) + sqrt(1 - r^2) eta_i(c)   (Kass & Pesare 2011, unit variance)
                field[:, t_idx] = a * self.previous.reshape(c, -1)[:, s_idx] + math.sqrt(max(0.0, 1 - a * a)) * field[:, t_idx]
                field = field.reshape(c, h * k, w * k)
            self.previous = field
            out = block_sum(field, k)
        self.index += 1
        return out

    def state_dict(self) -> dict:
        return {
            "spec": (self.spec.mode, self.spec.strength),
            "shape": self.shape,
            "image_hw": self.image_hw,
            "fine": self.k,
            "index": self.index,
            "shared": self.shared,
            "previous": self.previous,
            "generator": self.gen.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if (tuple(state["spec"]) != (self.spec.mode, self.spec.strength) or tuple(state["shape"]) != self.shape
                or tuple(state["image_hw"]) != self.image_hw or state["fine"] != self.k):
            raise ValueError("the saved noise state belongs to another noise setting or frame size")
        self.index = int(state["index"])
        self.shared = state["shared"]
        self.previous = state["previous"]
        self.gen.set_state(state["generator"])
