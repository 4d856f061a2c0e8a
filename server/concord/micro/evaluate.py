"""How well the micro model has learned its data: colour, background and pattern accuracy on held-out samples.

What it is for: the quality table of the model card (docs/micro-model.md, produced by `bench/micro_eval.py`) and
the test that the SHIPPED weights meet their targets. `evaluate(pipeline, ...)` draws held-out samples (the
generator's "eval" split: never seen in training), generates one image per (prompt, depth) with the pipeline, and
`score`s them against the generator's ground truth:

- **plain colour accuracy** (target >= 0.95): on plain prompts ("a red sphere"), the most frequent palette colour
  among the object's pixels is the prompt's colour. Every object pixel votes for its nearest palette colour
  (RGB distance); pixels nearest the background grey do not vote.
- **pair colour accuracy** (target >= 0.9): on two-colour prompts, the two most frequent palette colours are the
  prompt's two (in any order).
- **background fidelity** (target >= 0.99): share of background pixels (depth 0) whose every channel lies within
  `BACKGROUND_TOLERANCE` (0.1, about 25/255) of the background grey `concord.micro.data.BACKGROUND`.
- **pattern accuracy** (target >= 0.6 overall; chance 0.25): a small classifier (`PatternClassifier`: features of
  the two-colour layout -- region counts, shapes, boundary length, orientation coherence -- and a 1-hidden-layer
  MLP), trained in seconds on the generator's own renders (its "classifier" split, half of them blurred and noised
  so it tolerates a model's softer pictures), names the pattern (plain, stripes, checker, dots) of each generated
  image; reported overall and per pattern, with the confusion matrix. Its accuracy on held-out ground-truth
  renders is reported beside it: the ceiling of the measure.

The object mask comes from the ground-truth depth, not from the picture, so a model that paints the background
loses background fidelity rather than moving the mask.

What this module must never do: write files (the bench does that), or change the pipeline it is given.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np

from concord.micro.data import BACKGROUND, COLOURS, COLOUR_NAMES, PATTERNS, MicroBatch, generate_batch

__all__ = [
    "TARGETS",
    "BACKGROUND_TOLERANCE",
    "background_fidelity",
    "PatternClassifier",
    "pattern_features",
    "train_pattern_classifier",
    "default_classifier",
    "colour_votes",
    "colour_pair_agreement",
    "score",
    "evaluate",
]

#: The bars the shipped model must clear (metric -> minimum).
TARGETS = {
    "plain_colour_accuracy": 0.95,
    "pair_colour_accuracy": 0.90,
    "background_fidelity": 0.99,
    "pattern_accuracy": 0.60,
}
BACKGROUND_TOLERANCE = 0.1

# Palette + background as the last entry (index len(COLOUR_NAMES)): pixels nearest it cast no colour vote.
_VOTE_COLOURS = np.concatenate([np.array([COLOURS[c] for c in COLOUR_NAMES], np.float32) / 255.0, BACKGROUND[None]])


def colour_votes(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N, len(COLOUR_NAMES)) counts of object pixels nearest each palette colour (background-grey pixels excluded)."""
    n = images.shape[0]
    d = ((images[..., None, :] - _VOTE_COLOURS) ** 2).sum(-1)  # (N, H, W, K+1)
    nearest = d.argmin(-1)
    k = len(COLOUR_NAMES)
    votes = np.zeros((n, k), np.int64)
    for i in range(n):
        votes[i] = np.bincount(nearest[i][mask[i]], minlength=k + 1)[:k]
    return votes


def colour_pair_agreement(views: np.ndarray, mask: np.ndarray) -> float:
    """How far views of ONE object agree on its colours: the share of views whose two most frequent palette colours
    (over their object pixels, `colour_votes`) are the most common such pair among the views. 1 when all agree;
    1/V when every view picked its own pair. `views` (V, H, W, 3) in [0, 1] or uint8; `mask` (V, H, W) bool."""
    views = np.asarray(views)
    if views.dtype == np.uint8:
        views = views.astype(np.float32) / 255.0
    votes = colour_votes(views.astype(np.float32), np.asarray(mask, bool))
    pairs = [frozenset(np.argsort(-v, kind="stable")[:2].tolist()) for v in votes]
    return max(pairs.count(p) for p in pairs) / len(pairs)


# ---------------------------------------------------------------------------------------------------------------
# The pattern classifier: features of the two-colour layout, then a small MLP.
#
# Each object pixel is labelled with its nearest palette colour; A = the most frequent colour's pixels, B = the
# second's. Features (all invariant to which colours they are):
#   share of B, share of neither;  number of A and of B regions (connected components >= 3 px, per 100 object px);
#   share of the largest region among A pixels and among B pixels;  mean roundness of B regions (smaller / larger
#   eigenvalue of the region's second-moment matrix: ~1 for dots and checker squares, small for stripes);
#   A/B boundary pixels per object pixel;  structure-tensor coherence of B (Bigun & Granlund 1987:
#   ((Jxx - Jyy)^2 + 4 Jxy^2) / (Jxx + Jyy)^2 after Gaussian smoothing; ~1 where the layout is stripes).
# Stripes: few elongated regions, high coherence; checker: many square regions of both colours; dots: round B
# regions in one connected A; plain: no B.

N_FEATURES = 11


def pattern_features(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N, N_FEATURES) float32 features of images (N, H, W, 3) in [0, 1] with object mask (N, H, W)."""
    from scipy import ndimage

    n = images.shape[0]
    feats = np.zeros((n, N_FEATURES), np.float32)
    d = ((images[..., None, :] - _VOTE_COLOURS) ** 2).sum(-1)
    nearest = d.argmin(-1)
    k = len(COLOUR_NAMES)
    structure = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]])
    for i in range(n):
        m = mask[i]
        area = int(m.sum())
        if area == 0:
            continue
        lab = np.where(m, nearest[i], k)
        counts = np.bincount(lab[m], minlength=k + 1)[:k]
        ca, cb = np.argsort(-counts, kind="stable")[:2]
        A, B = (lab == ca), (lab == cb) & (counts[cb] > 0)
        f = feats[i]
        f[0] = B.sum() / area
        f[1] = 1.0 - (A.sum() + B.sum()) / area
        for j, region in enumerate((A, B)):
            labels, num = ndimage.label(region, structure)
            sizes = np.bincount(labels.ravel())[1:]
            big = sizes >= 3
            f[2 + j] = 100.0 * big.sum() / area
            f[4 + j] = sizes.max() / max(1, region.sum()) if num else 0.0
            if j == 1 and big.any():
                ys, xs = np.nonzero(labels)
                lb = labels[ys, xs]
                cnt = np.bincount(lb, minlength=num + 1).astype(np.float64)
                c = np.maximum(cnt, 1)
                mx, my = np.bincount(lb, xs, num + 1) / c, np.bincount(lb, ys, num + 1) / c
                sxx = np.bincount(lb, xs * xs, num + 1) / c - mx * mx
                syy = np.bincount(lb, ys * ys, num + 1) / c - my * my
                sxy = np.bincount(lb, xs * ys, num + 1) / c - mx * my
                tr, det = sxx + syy + 1e-6, sxx * syy - sxy * sxy
                disc = np.sqrt(np.maximum(tr * tr / 4 - det, 0.0))
                ratio = (tr / 2 - disc + 1 / 12) / (tr / 2 + disc + 1 / 12)  # + pixel's own variance
                sel = np.nonzero(cnt >= 3)[0]
                sel = sel[sel > 0]
                f[6] = float(np.average(ratio[sel], weights=cnt[sel]))
        Bf = B.astype(np.float32)
        edges = (np.abs(np.diff(Bf, axis=0)) * m[1:] * m[:-1]).sum() + (np.abs(np.diff(Bf, axis=1)) * m[:, 1:] * m[:, :-1]).sum()
        f[7] = edges / area
        gy, gx = np.gradient(ndimage.gaussian_filter(Bf, 0.7))
        jxx, jyy, jxy = (ndimage.gaussian_filter(g, 3.0) for g in (gx * gx, gy * gy, gx * gy))
        energy = jxx + jyy
        w = energy * m
        if w.sum() > 1e-8:
            coh = ((jxx - jyy) ** 2 + 4 * jxy**2) / np.maximum(energy, 1e-12) ** 2
            f[8] = float((coh * w).sum() / w.sum())
        f[9] = np.log1p(area) / 8.0
        f[10] = f[0] * (1.0 - f[0]) * 4.0
    return feats


def _degrade(images: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A generated picture is softer and noisier than a render: box blur mixed in at a random strength, colour
    gain and pixel noise, background kept."""
    from scipy import ndimage

    out = images.copy()
    for i in range(len(out)):
        s = rng.uniform(0.0, 1.0)
        out[i] = (1 - s) * out[i] + s * ndimage.uniform_filter(out[i], size=(3, 3, 1))
        out[i] = out[i] * (1.0 + 0.06 * rng.normal(size=3)) + rng.uniform(0, 0.06) * rng.normal(size=out[i].shape)
    out = np.clip(out, 0.0, 1.0)
    out[~mask] = BACKGROUND
    return out.astype(np.float32)


@dataclass
class PatternClassifier:
    """An MLP (N_FEATURES -> 32 -> 4) on standardised `pattern_features`."""

    net: object  # torch.nn.Module
    mean: np.ndarray
    std: np.ndarray
    holdout_accuracy: float  # on held-out ground-truth renders, undegraded

    def predict(self, images: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Pattern index (into PATTERNS) per image; images (N, H, W, 3) in [0, 1], mask (N, H, W) bool."""
        import torch

        f = (pattern_features(np.asarray(images, np.float32), np.asarray(mask, bool)) - self.mean) / self.std
        with torch.no_grad():
            return self.net(torch.from_numpy(f.astype(np.float32))).argmax(1).numpy()


def train_pattern_classifier(n_train: int = 1536, steps: int = 600, seed: int = 0, size: int = 64) -> PatternClassifier:
    """Train on the generator's "classifier" split, half of it degraded (`_degrade`); seeded and deterministic.
    A few seconds on one core."""
    import torch

    data = generate_batch(n_train, seed, index=0, height=size, width=size, split="classifier")
    held = generate_batch(256, seed, index=1, height=size, width=size, split="classifier")
    rng = np.random.default_rng([seed, 99])
    imgs = data.images.copy()
    half = np.arange(n_train) % 2 == 1
    imgs[half] = _degrade(imgs[half], data.mask[half], rng)
    feats = pattern_features(imgs, data.mask)
    mean, std = feats.mean(0), feats.std(0) + 1e-6
    x = torch.from_numpy(((feats - mean) / std).astype(np.float32))
    y = torch.from_numpy(data.patterns)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(N_FEATURES, 32), torch.nn.ReLU(), torch.nn.Linear(32, len(PATTERNS)))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):  # full batch
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    clf = PatternClassifier(net=net, mean=mean, std=std, holdout_accuracy=0.0)
    clf.holdout_accuracy = float((clf.predict(held.images, held.mask) == held.patterns).mean())
    return clf


@functools.lru_cache(maxsize=4)
def default_classifier(seed: int = 0, size: int = 64) -> PatternClassifier:
    """The classifier `evaluate` uses, trained once per process (and per seed/size)."""
    return train_pattern_classifier(seed=seed, size=size)


# ---------------------------------------------------------------------------------------------------------------
# Scoring


def background_fidelity(images: np.ndarray, mask: np.ndarray, tolerance: float = BACKGROUND_TOLERANCE) -> float:
    """The share of background pixels (~mask) of `images` (N, H, W, 3) in [0, 1] whose every channel lies within
    `tolerance` of the background grey."""
    bg = ~np.asarray(mask, bool)
    ok = (np.abs(np.asarray(images, np.float32) - BACKGROUND).max(-1) <= tolerance) & bg
    return float(ok.sum() / max(1, bg.sum()))


def score(
    batch: MicroBatch,
    images: np.ndarray,
    classifier: PatternClassifier | None = None,
    tolerance: float = BACKGROUND_TOLERANCE,
) -> dict:
    """The metrics of `images` (N, H, W, 3) in [0, 1] generated for `batch`'s prompts and depth maps.

    With `classifier=None` the pattern metrics are left out."""
    images = np.asarray(images, np.float32)
    if images.shape != batch.images.shape:
        raise ValueError(f"images {images.shape} do not match the batch's {batch.images.shape}")
    mask = batch.mask
    colours = batch.colours
    patterns = batch.patterns
    votes = colour_votes(images, mask)
    order = np.argsort(-votes, axis=1, kind="stable")
    plain = patterns == 0
    out: dict = {"n_samples": int(len(images)), "n_plain": int(plain.sum()), "n_pair": int((~plain).sum())}
    out["plain_colour_accuracy"] = float((order[plain, 0] == colours[plain, 0]).mean()) if plain.any() else None
    if (~plain).any():
        top2 = np.sort(order[~plain, :2], axis=1)
        want = np.sort(colours[~plain], axis=1)
        out["pair_colour_accuracy"] = float((top2 == want).all(1).mean())
    else:
        out["pair_colour_accuracy"] = None
    out["background_fidelity"] = background_fidelity(images, mask, tolerance)
    out["background_tolerance"] = tolerance
    if classifier is not None:
        pred = classifier.predict(images, mask)
        out["pattern_accuracy"] = float((pred == patterns).mean())
        out["pattern_accuracy_by_pattern"] = {
            name: (float((pred[patterns == k] == k).mean()) if (patterns == k).any() else None)
            for k, name in enumerate(PATTERNS)
        }
        out["pattern_confusion"] = {
            name: {p: int(((patterns == k) & (pred == j)).sum()) for j, p in enumerate(PATTERNS)}
            for k, name in enumerate(PATTERNS)
        }
        out["pattern_classifier_holdout_accuracy"] = classifier.holdout_accuracy
    out["passed"] = {k: (out.get(k) is not None and out[k] >= v) for k, v in TARGETS.items() if k in out}
    return out


def evaluate(
    pipeline,
    n_samples: int = 200,
    seed: int = 1234,
    steps: int = 20,
    guidance_scale: float = 2.0,
    batch_size: int = 16,
    size: int = 64,
    classifier: PatternClassifier | None = None,
    tolerance: float = BACKGROUND_TOLERANCE,
) -> dict:
    """Generate `n_samples` held-out samples with `pipeline` (a `MicroPipeline`, or anything called like one:
    `pipeline(prompt=[...], depth=(B, H, W), num_inference_steps=, guidance_scale=, generator=, output_type="np")`
    returning `.images` (B, H, W, 3) in [0, 1]) and `score` them. Deterministic for a given seed."""
    import torch

    if classifier is None:
        classifier = default_classifier(size=size)
    batches, images = [], []
    t0 = time.perf_counter()
    for i, start in enumerate(range(0, n_samples, batch_size)):
        b = generate_batch(min(batch_size, n_samples - start), seed, index=i, height=size, width=size, split="eval")
        gen = torch.Generator().manual_seed(seed * 100_003 + i)
        res = pipeline(
            prompt=b.prompts,
            depth=b.depth,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=gen,
            output_type="np",
        )
        batches.append(b)
        images.append(np.asarray(res.images, np.float32))
    elapsed = time.perf_counter() - t0
    full = MicroBatch(
        images=np.concatenate([b.images for b in batches]),
        depth=np.concatenate([b.depth for b in batches]),
        mask=np.concatenate([b.mask for b in batches]),
        coords=np.concatenate([b.coords for b in batches]),
        prompts=[p for b in batches for p in b.prompts],
        specs=[s for b in batches for s in b.specs],
    )
    out = score(full, np.concatenate(images), classifier, tolerance)
    out.update(
        seed=seed,
        steps=steps,
        guidance_scale=guidance_scale,
        size=size,
        seconds_per_image=elapsed / max(1, n_samples),
    )
    return out
