"""Procedural training data for the `micro` model: flat-coloured primitives with their depth maps and prompts.

What it is for: an endless, seeded stream of (prompt, depth, image) triples that a ~3M-parameter pixel-space
diffusion model can learn in half an hour on two CPU cores, and the ground truth the evaluation (`evaluate.py`)
measures the trained model against.

What a sample is
----------------
One primitive -- ``sphere``, ``box``, ``cylinder``, ``torus``, ``cone`` or ``capsule`` -- with random proportions,
random orientation (uniform over rotations), random size and a small random offset, seen by a fixed pinhole camera
(OpenCV axes, vertical/horizontal field of view 40 degrees on the shorter side, object ~3.3 units away).
It is painted in its OWN coordinates (so the paint sticks to the surface whatever the pose) with one of four
patterns, colours from `COLOURS`:

=========== ======================================== ===============================================
pattern     prompt                                   paint (p = object coordinates, |p| <= 1)
=========== ======================================== ===============================================
plain       "a red sphere"                           colour 1 everywhere
stripes     "a red and white stripes torus"          colour 1 / colour 2 in slabs along one object axis
                                                     (period 0.5: ~4 stripes across the object)
checker     "a blue and yellow checker box"          3-D checkerboard of cell 0.4 (colour 1 / colour 2)
dots        "a green and black dots cone"            colour 1 with colour-2 balls of radius 0.22 on a
                                                     lattice of period 0.55 (~27 % of the surface)
=========== ======================================== ===============================================

Each pattern gets a random phase (offset) in object coordinates. Colours are flat albedo: no shading, no lighting,
no anti-aliasing, so every object pixel is exactly one palette colour and every background pixel is exactly
`BACKGROUND_RGB` (mid grey, 128/255 per channel; not a palette colour). The model must leave the background at
that value: the evaluation measures it.

Arrays (the ViewSet contract, `concord.geometry.viewset`): images (N, H, W, 3) float32 sRGB in [0, 1], row 0 = top;
depth (N, H, W) float32 planar camera z, > 0 on the object and exactly 0 on the background; mask (N, H, W) bool;
coords (N, H, W, 3) float32 object coordinates in the unit ball (0 on the background) -- produced for tests and
future conditioning; the shipped model is conditioned on depth only (see docs/micro-model.md for why).

Rendering: exact signed distance functions (Inigo Quilez's formulas) sphere-traced in numpy (Hart 1996, "Sphere
tracing"), rays clipped to the object's bounding sphere first; ~2 ms per 64x64 sample on one core.

Multi-view sets (`generate_view_sets`): V views of ONE object -- same shape, proportions, size, paint and
phase -- from cameras orbiting it: the object's pose in view v is ``Rx(e_v) Ry(a_v) R0`` (camera axes; a rotation
about the camera's vertical axis by the azimuth, then a tilt by the elevation), with R0 the object's base pose
(half the sets upright -- the shape's axis vertical, spun at random -- as meshes usually stand, half uniformly
random). Half the sets use the texture job's Zero123++ rig (azimuths 30 + 60 k degrees, elevations +20 / -10
alternating, `concord.geometry.rigs`), half V azimuths spread evenly from a random start with random elevations in
[-15, 35] degrees. The trainer feeds such sets to the UNet with extended self-attention installed, so the model
learns to read the other views (MVDream, Shi et al. 2023: multi-view self-attention trained on views of one object).

Reproducibility: a batch is a pure function of (seed, index, split, size): `generate_batch` draws from
``numpy.random.default_rng([seed, split_tag, index])``, so the trainer's step k always sees the same batch (exact
resume) and the evaluation's held-out split ("eval") never overlaps the training stream ("train").

What this module must never do: touch torch, the filesystem or global random state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "COLOURS",
    "COLOUR_NAMES",
    "SHAPES",
    "PATTERNS",
    "BACKGROUND_RGB",
    "BACKGROUND",
    "FOV_DEGREES",
    "VOCABULARY",
    "SampleSpec",
    "MicroBatch",
    "sample_specs",
    "render",
    "generate_batch",
    "generate_view_sets",
    "RIG_AZIMUTHS",
    "RIG_ELEVATIONS",
    "prompt_for",
    "open_prompt",
    "parse_prompt",
]

#: Palette (sRGB, 0..255). Pairwise RGB distance >= ~90 so the nearest-colour test in the evaluation is unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 135, 20),
    "yellow": (245, 225, 40),
    "green": (40, 170, 50),
    "blue": (35, 70, 225),
    "purple": (140, 50, 190),
    "pink": (250, 140, 200),
    "brown": (115, 65, 25),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SHAPES: tuple[str, ...] = ("sphere", "box", "cylinder", "torus", "cone", "capsule")
PATTERNS: tuple[str, ...] = ("plain", "stripes", "checker", "dots")
#: Background colour (sRGB 0..255) of every training image and what the model must leave untouched.
BACKGROUND_RGB: tuple[int, int, int] = (128, 128, 128)
#: The same in [0, 1].
BACKGROUND = np.array(BACKGROUND_RGB, np.float32) / 255.0
FOV_DEGREES = 40.0
#: Every word a generated prompt uses (the tokenizer's vocabulary is built from it).
VOCABULARY: tuple[str, ...] = ("a", "and") + COLOUR_NAMES + PATTERNS[1:] + SHAPES

_PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], np.float32) / 255.0
# Pattern probabilities: plain, stripes, checker, dots.
_PATTERN_P = np.array([0.25, 0.25, 0.25, 0.25])
_STRIPE_PERIOD = 0.5
_CHECKER_CELL = 0.4
_DOT_PERIOD = 0.55
_DOT_RADIUS = 0.22
_MARCH_STEPS = 64


@dataclass(frozen=True)
class SampleSpec:
    """Everything that defines one sample (all randomness already drawn)."""

    shape: str
    params: tuple[float, ...]  # shape proportions in its local frame (see `_sdf_local`)
    rotation: np.ndarray  # (3, 3) object -> camera
    center: np.ndarray  # (3,) camera coordinates of the object's origin
    scale: float  # world units per local unit
    bound: float  # bounding radius in local units; object coordinates are p_local / bound
    pattern: str
    colour1: int  # index into COLOUR_NAMES
    colour2: int  # -1 for plain
    phase: np.ndarray  # (3,) pattern offset in object coordinates

    @property
    def prompt(self) -> str:
        return prompt_for(self.shape, self.pattern, self.colour1, self.colour2)


@dataclass
class MicroBatch:
    images: np.ndarray  # (N, H, W, 3) float32 sRGB [0, 1]
    depth: np.ndarray  # (N, H, W) float32 planar z, 0 background
    mask: np.ndarray  # (N, H, W) bool
    coords: np.ndarray  # (N, H, W, 3) float32 object coordinates, 0 background
    prompts: list[str]
    specs: list[SampleSpec]

    @property
    def patterns(self) -> np.ndarray:
        return np.array([PATTERNS.index(s.pattern) for s in self.specs])

    @property
    def colours(self) -> np.ndarray:
        """(N, 2) palette indices, -1 for a plain sample's second colour."""
        return np.array([(s.colour1, s.colour2) for s in self.specs])


def prompt_for(shape: str, pattern: str, colour1: int, colour2: int = -1) -> str:
    """The full prompt; ``colour1 = -1`` gives the OPEN prompt, which names the pattern and shape but no colour
    ("a checker box", "a sphere"): the colours are left for the model to choose (`open_prompt`)."""
    if colour1 < 0:
        return f"a {shape}" if pattern == "plain" else f"a {pattern} {shape}"
    if pattern == "plain":
        return f"a {COLOUR_NAMES[colour1]} {shape}"
    return f"a {COLOUR_NAMES[colour1]} and {COLOUR_NAMES[colour2]} {pattern} {shape}"


def open_prompt(spec: SampleSpec) -> str:
    """`spec`'s prompt with the colours left out: "a red and yellow checker box" -> "a checker box".

    Why: a prompt that fixes everything leaves views nothing to agree on but the pattern's phase. Real prompts
    leave most things open ("a barrel" says nothing of the wood's colour), and what they leave open is exactly
    where independently generated views disagree and shared attention must make them agree (MVDream, Shi et al.
    2023). The trainer uses these for a share of objects (`--open-prompts`); `bench/consistency.py --open`
    measures the consistency mechanisms on them."""
    return prompt_for(spec.shape, spec.pattern, -1)


def parse_prompt(prompt: str) -> tuple[str, str, int, int]:
    """Inverse of `prompt_for`: (shape, pattern, colour1, colour2), colours -1 where an open prompt names none.
    Raises ValueError on other prompts."""
    w = prompt.lower().split()
    try:
        if len(w) == 2 and w[0] == "a" and w[1] in SHAPES:
            return w[1], "plain", -1, -1
        if len(w) == 3 and w[0] == "a" and w[1] in PATTERNS[1:] and w[2] in SHAPES:
            return w[2], w[1], -1, -1
        if len(w) == 3 and w[0] == "a":
            return w[2], "plain", COLOUR_NAMES.index(w[1]), -1
        if len(w) == 6 and w[0] == "a" and w[2] == "and" and w[4] in PATTERNS[1:] and w[5] in SHAPES:
            return w[5], w[4], COLOUR_NAMES.index(w[1]), COLOUR_NAMES.index(w[3])
    except ValueError:
        pass
    raise ValueError(f"not a generator prompt: {prompt!r}")


_SPLIT_TAGS = {"train": 0, "eval": 1, "classifier": 2, "test": 3}


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniform random rotation from a uniform unit quaternion (Shoemake 1992)."""
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _shape_params(shape: str, rng: np.random.Generator) -> tuple[tuple[float, ...], float]:
    """Proportions and bounding radius (local units)."""
    u = rng.uniform
    if shape == "sphere":
        return (1.0,), 1.0
    if shape == "box":
        a, b, c = u(0.35, 0.8, size=3)
        return (a, b, c), float(np.sqrt(a * a + b * b + c * c))
    if shape == "cylinder":
        r, h = u(0.35, 0.75), u(0.4, 0.85)
        return (r, h), float(np.hypot(r, h))
    if shape == "torus":
        big, small = u(0.5, 0.7), u(0.18, 0.32)
        return (big, small), big + small
    if shape == "cone":
        r, h = u(0.45, 0.8), u(0.5, 0.85)
        return (r, h), float(np.hypot(r, h))
    if shape == "capsule":
        r, h = u(0.3, 0.5), u(0.25, 0.55)
        return (r, h), r + h
    raise ValueError(f"unknown shape {shape!r}")


def sample_specs(rng: np.random.Generator, n: int) -> list[SampleSpec]:
    """Draw n sample descriptions from `rng` (shape, pose, size, pattern, colours)."""
    specs = []
    for _ in range(n):
        shape = SHAPES[rng.integers(len(SHAPES))]
        params, bound = _shape_params(shape, rng)
        radius = rng.uniform(0.7, 1.05)  # world radius of the bounding sphere
        center = np.array([rng.uniform(-0.15, 0.15), rng.uniform(-0.15, 0.15), rng.uniform(3.1, 3.5)])
        pattern = PATTERNS[rng.choice(len(PATTERNS), p=_PATTERN_P)]
        c1 = int(rng.integers(len(COLOUR_NAMES)))
        c2 = -1
        if pattern != "plain":
            c2 = int(rng.integers(len(COLOUR_NAMES) - 1))
            c2 += c2 >= c1  # a different colour
        specs.append(
            SampleSpec(
                shape=shape,
                params=params,
                rotation=_random_rotation(rng),
                center=center,
                scale=radius / bound,
                bound=bound,
                pattern=pattern,
                colour1=c1,
                colour2=c2,
                phase=rng.uniform(0.0, 1.0, size=3),
            )
        )
    return specs


# ---------------------------------------------------------------------------------------------------------------
# Exact signed distances in the local frame (Quilez, "Distance functions", iquilezles.org). Axis of revolution: z.


def _sdf_local(shape: str, params: tuple[float, ...], p: np.ndarray) -> np.ndarray:
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    if shape == "sphere":
        return np.sqrt(x * x + y * y + z * z) - params[0]
    if shape == "box":
        q = np.abs(p) - np.asarray(params)
        outside = np.sqrt((np.maximum(q, 0.0) ** 2).sum(1))
        return outside + np.minimum(q.max(1), 0.0)
    if shape == "cylinder":
        r, h = params
        dx = np.sqrt(x * x + y * y) - r
        dz = np.abs(z) - h
        return np.minimum(np.maximum(dx, dz), 0.0) + np.sqrt(np.maximum(dx, 0.0) ** 2 + np.maximum(dz, 0.0) ** 2)
    if shape == "torus":
        big, small = params
        qx = np.sqrt(x * x + y * y) - big
        return np.sqrt(qx * qx + z * z) - small
    if shape == "cone":
        # sdCappedCone(h, r1 = r at z = -h, r2 = 0 at z = +h)
        r1, h = params
        r2 = 0.0
        qx, qy = np.sqrt(x * x + y * y), z
        k1 = np.array([r2, h])
        k2 = np.array([r2 - r1, 2.0 * h])
        cax = qx - np.minimum(qx, np.where(qy < 0.0, r1, r2))
        cay = np.abs(qy) - h
        tt = np.clip(((k1[0] - qx) * k2[0] + (k1[1] - qy) * k2[1]) / (k2 @ k2), 0.0, 1.0)
        cbx = qx - k1[0] + k2[0] * tt
        cby = qy - k1[1] + k2[1] * tt
        s = np.where((cbx < 0.0) & (cay < 0.0), -1.0, 1.0)
        return s * np.sqrt(np.minimum(cax * cax + cay * cay, cbx * cbx + cby * cby))
    if shape == "capsule":
        r, h = params
        zc = np.clip(z, -h, h)
        return np.sqrt(x * x + y * y + (z - zc) ** 2) - r
    raise ValueError(f"unknown shape {shape!r}")


def _paint(spec: SampleSpec, q: np.ndarray) -> np.ndarray:
    """Palette index (per point) of the paint at object coordinates q (M, 3)."""
    c1, c2 = spec.colour1, spec.colour2
    if spec.pattern == "plain":
        return np.full(len(q), c1)
    if spec.pattern == "stripes":
        axis = 0 if spec.shape in ("torus", "box") else 2
        second = np.floor(q[:, axis] / _STRIPE_PERIOD * 2.0 + 2.0 * spec.phase[axis]).astype(np.int64) % 2 == 1
    elif spec.pattern == "checker":
        cells = np.floor(q / _CHECKER_CELL + spec.phase).astype(np.int64).sum(1)
        second = cells % 2 == 1
    elif spec.pattern == "dots":
        g = q / _DOT_PERIOD + spec.phase
        d = (g - np.round(g)) * _DOT_PERIOD
        second = (d * d).sum(1) < _DOT_RADIUS**2
    else:
        raise ValueError(f"unknown pattern {spec.pattern!r}")
    return np.where(second, c2, c1)


def _camera(height: int, width: int) -> np.ndarray:
    """Pinhole K (OpenCV, pixel centres at +0.5): field of view FOV_DEGREES across the shorter side."""
    f = 0.5 * min(height, width) / np.tan(np.radians(FOV_DEGREES) / 2.0)
    return np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]])


def _ray_directions(height: int, width: int) -> np.ndarray:
    K = _camera(height, width)
    cols, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    d = np.stack([(cols - K[0, 2]) / K[0, 0], (rows - K[1, 2]) / K[1, 1], np.ones_like(cols)], -1).reshape(-1, 3)
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def render(spec: SampleSpec, height: int = 64, width: int = 64, dirs: np.ndarray | None = None):
    """(image (H, W, 3) float32, depth (H, W) float32, coords (H, W, 3) float32) of one sample.

    Rays start at the camera centre (the origin) along unit directions d; the object's SDF in camera space is
    scale * sdf_local(R^T (x - c) / scale). Sphere tracing: t <- t + sdf(t d) from the bounding sphere's entry
    until sdf < 1e-4 * t (hit) or t passes the bounding sphere's exit (miss)."""
    if dirs is None:
        dirs = _ray_directions(height, width)
    n = len(dirs)
    c, R, s = spec.center, spec.rotation, spec.scale
    rad = spec.bound * s
    # Ray / bounding sphere: |t d - c|^2 = rad^2  ->  t = b +- sqrt(b^2 - (|c|^2 - rad^2)), b = d.c
    b = dirs @ c
    disc = b * b - (c @ c - rad * rad)
    idx = np.nonzero(disc > 0.0)[0]
    sq = np.sqrt(disc[idx])
    t = np.maximum(b[idx] - sq, 0.0)
    t_exit = b[idx] + sq
    d = dirs[idx]
    hit_t = np.full(n, np.inf)
    for _ in range(_MARCH_STEPS):
        if idx.size == 0:
            break
        x = t[:, None] * d
        local = ((x - c) @ R) / s  # R^T (x - c) / s, row vectors
        dist = s * _sdf_local(spec.shape, spec.params, local)
        done = dist < 1e-4 * t
        hit_t[idx[done]] = t[done]
        t = t + dist
        keep = ~done & (t < t_exit)
        idx, t, t_exit, d = idx[keep], t[keep], t_exit[keep], d[keep]
    hit = np.isfinite(hit_t)
    image = np.empty((n, 3), np.float32)
    image[:] = BACKGROUND
    depth = np.zeros(n, np.float32)
    coords = np.zeros((n, 3), np.float32)
    if hit.any():
        th = hit_t[hit]
        x = th[:, None] * dirs[hit]
        q = ((x - c) @ R) / (s * spec.bound)
        depth[hit] = x[:, 2]
        coords[hit] = q
        image[hit] = _PALETTE[_paint(spec, q)]
    return image.reshape(height, width, 3), depth.reshape(height, width), coords.reshape(height, width, 3)


def generate_batch(n: int, seed: int = 0, index: int = 0, height: int = 64, width: int = 64, split: str = "train") -> MicroBatch:
    """Batch `index` of the stream `(seed, split)`: a pure function of its arguments.

    split: "train" (the trainer), "eval" (held-out evaluation), "classifier" (the evaluation's pattern classifier),
    "test" (unit tests)."""
    if split not in _SPLIT_TAGS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_TAGS)}")
    rng = np.random.default_rng([int(seed), _SPLIT_TAGS[split], int(index)])
    specs = sample_specs(rng, n)
    dirs = _ray_directions(height, width)
    images = np.empty((n, height, width, 3), np.float32)
    depth = np.empty((n, height, width), np.float32)
    coords = np.empty((n, height, width, 3), np.float32)
    for i, spec in enumerate(specs):
        images[i], depth[i], coords[i] = render(spec, height, width, dirs)
    return MicroBatch(images=images, depth=depth, mask=depth > 0, coords=coords, prompts=[s.prompt for s in specs], specs=specs)


#: The texture job's Zero123++ rig (`concord.geometry.rigs.ZERO123PP_*`), repeated here so this module stays
#: free of the geometry package (it must not import torch-using code); a test checks they agree.
RIG_AZIMUTHS: tuple[float, ...] = (30.0, 90.0, 150.0, 210.0, 270.0, 330.0)
RIG_ELEVATIONS: tuple[float, ...] = (20.0, -10.0, 20.0, -10.0, 20.0, -10.0)
_SET_TAG = 16  # view-set streams: split tag + 16, apart from the single-image streams


def _rot_x(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _rot_y(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _upright(rng: np.random.Generator) -> np.ndarray:
    """A base pose with the shape's axis (local z) along the camera's vertical (y), spun about it at random."""
    to_vertical = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])  # local z -> camera -y (up)
    return _rot_y(rng.uniform(0.0, 360.0)) @ to_vertical


def _set_cameras(rng: np.random.Generator, views: int) -> list[tuple[float, float]]:
    """(azimuth, elevation) in degrees for the views of one set (module docstring)."""
    if views == len(RIG_AZIMUTHS) and rng.random() < 0.5:
        return list(zip(RIG_AZIMUTHS, RIG_ELEVATIONS))
    start = rng.uniform(0.0, 360.0)
    return [(start + 360.0 * v / views + rng.uniform(-10.0, 10.0), rng.uniform(-15.0, 35.0)) for v in range(views)]


def generate_view_sets(
    sets: int, views: int, seed: int = 0, index: int = 0, height: int = 64, width: int = 64, split: str = "train"
) -> MicroBatch:
    """Batch `index` of the multi-view stream `(seed, split)`: `sets` objects, each seen in `views` views, laid out
    set-major (sample ``s * views + v`` is view v of object s) -- the layout extended attention groups by. A pure
    function of its arguments; the streams never overlap the single-image ones of `generate_batch`."""
    if split not in _SPLIT_TAGS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_TAGS)}")
    if sets < 1 or views < 1:
        raise ValueError("sets and views must be >= 1")
    rng = np.random.default_rng([int(seed), _SPLIT_TAGS[split] + _SET_TAG, int(index)])
    bases = sample_specs(rng, sets)
    dirs = _ray_directions(height, width)
    n = sets * views
    images = np.empty((n, height, width, 3), np.float32)
    depth = np.empty((n, height, width), np.float32)
    coords = np.empty((n, height, width, 3), np.float32)
    specs: list[SampleSpec] = []
    for s, base in enumerate(bases):
        r0 = _upright(rng) if rng.random() < 0.5 else base.rotation
        centre = np.array([0.0, 0.0, base.center[2]])  # the orbit's centre: the object stays in the middle
        for v, (az, el) in enumerate(_set_cameras(rng, views)):
            spec = SampleSpec(
                shape=base.shape, params=base.params, rotation=_rot_x(el) @ _rot_y(az) @ r0, center=centre,
                scale=base.scale, bound=base.bound, pattern=base.pattern, colour1=base.colour1,
                colour2=base.colour2, phase=base.phase,
            )
            i = s * views + v
            images[i], depth[i], coords[i] = render(spec, height, width, dirs)
            specs.append(spec)
    return MicroBatch(images=images, depth=depth, mask=depth > 0, coords=coords, prompts=[s.prompt for s in specs], specs=specs)
