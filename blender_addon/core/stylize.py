"""The "Stylize Animation" run as plain logic: frame sizes, chunk planning, the `stylize` job's params, Blender's
passes in the FrameSet convention, the output folder (resume, manifest) and moving a chunk's frames into it.

A run sends a frame range of the scene as a *sequence* of `stylize` jobs, one per chunk of frames, all under one
``sequence`` name (the server keeps the keyframes' attention record, the carry and the noise state between the
requests under it). Chunk k's request carries ``first_frame`` = the sequence index of its first frame (0 for the
range's first frame, each request starting right after the previous one's last frame) and ``sequence_frames`` =
the range's length; the first request holds index 0, the keyframe of the default keyframes mode. The server answers
each job with ``frames/frame_NNNN.png`` (NNNN = first_frame + i) and ``metrics.json``.

Output folder: frame f of the scene (a Blender frame number) is ``frame_<f, 4 digits>.png``; each chunk's
metrics.json is kept as ``metrics/frames_<a>-<b>.json``; ``concord_stylize.json`` (the manifest) records what the
frames were made with (the run's fingerprint: params, frame range, size, source, model) and the sequence name.
A run whose output folder already holds this fingerprint's frames continues at the first chunk with a missing
frame and sends that chunk with ``resume: true`` (every later chunk is sent too: its previous frame is new).
Frames of another fingerprint are never mixed in or overwritten (`OutputFolderError`).

Blender's conventions are converted here (the FrameSet contract: server/concord/frames/frameset.py, cited, not
restated): `motion_from_blender_vector` and `depth_from_blender` use the same formulas as the server's functions of
those names (tests/core/test_addon_core_stylize.py checks that they agree; the add-on cannot import the server).

Layer rule: plain Python + numpy. No bpy, no torch, no server package.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from .packing import check_choice, prompt_params
from .results import reserve_folder, safe_name

#: The server's limits for one `stylize` request (server/concord/pipelines/stylize.py ARRAYS, StylizeParams).
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 64, 1024, 8
MAX_FRAMES_PER_REQUEST = 256
MAX_CHUNK_FRAMES = 64
#: What the panel offers (a subset of StylizeParams' choices: `middle` and `explicit` name frames of one request).
KEYFRAME_MODES = ("first+previous", "first", "none")
NOISE_MODES = ("warped", "iid", "shared", "mixed", "progressive")
#: StylizeParams.sequence: a client-chosen name the server keeps the sequence's state under.
SEQUENCE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
BLENDER_BACKGROUND_DEPTH = 1e9  # Blender's Depth pass writes 1e10 on the background
MANIFEST = "concord_stylize.json"
MANIFEST_VERSION = 1
FRAME_FILE = re.compile(r"^frame_(-?\d+)\.png$")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".exr")
DOWNLOAD_PREFIX = ".concord-chunk-"  # hidden download folders inside the output folder


class StylizeError(ValueError):
    """Settings or frames that cannot be sent; the message says what to do."""


class OutputFolderError(StylizeError):
    """The output folder holds frames that are not this run's: nothing is written into it."""


# ---------------------------------------------------------------------------------------------------------------
# Sizes and chunks


def frame_size(res_x: int, res_y: int, pixel_aspect_x: float = 1.0, pixel_aspect_y: float = 1.0,
               longest: int = 512) -> tuple[int, int]:
    """(W, H) of the frames sent: the scene's displayed aspect ratio (resolution x pixel aspect), the longest side
    ``longest`` rounded down to a multiple of 8, the other side rounded to the nearest multiple of 8; both within
    the server's 64..1024 (a very wide frame keeps its short side at 64 and gets a longer long side, up to 1024)."""
    w, h = float(res_x) * float(pixel_aspect_x), float(res_y) * float(pixel_aspect_y)
    if not (w > 0 and h > 0):
        raise StylizeError(f"the scene's resolution {res_x} x {res_y} is empty: set Output Properties > Resolution")
    n = max(MIN_SIDE, min(MAX_SIDE, int(longest) // SIDE_MULTIPLE * SIDE_MULTIPLE))
    wide = w >= h
    aspect = w / h if wide else h / w  # >= 1
    short = int(round(n / aspect / SIDE_MULTIPLE)) * SIDE_MULTIPLE
    if short < MIN_SIDE:
        short = MIN_SIDE
        n = max(MIN_SIDE, min(MAX_SIDE, int(round(MIN_SIDE * aspect / SIDE_MULTIPLE)) * SIDE_MULTIPLE))
    return (n, short) if wide else (short, n)


@dataclass(frozen=True)
class Chunk:
    """One request: Blender frames ``frames`` (consecutive), the first of which is sequence index ``first_index``."""

    index: int
    first_index: int
    frames: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def label(self) -> str:
        return f"{self.frames[0]}-{self.frames[-1]}"


def plan_chunks(frame_start: int, frame_end: int, chunk_size: int) -> list[Chunk]:
    """The frame range [frame_start, frame_end] (inclusive, Blender frame numbers) in consecutive chunks of at most
    ``chunk_size`` frames, in order; chunk 0 starts at sequence index 0 and each chunk right after the previous."""
    frame_start, frame_end, chunk_size = int(frame_start), int(frame_end), int(chunk_size)
    if frame_end < frame_start:
        raise StylizeError(f"the frame range {frame_start}..{frame_end} is empty: the end must not be before the start")
    if not 1 <= chunk_size <= MAX_CHUNK_FRAMES:
        raise StylizeError(f"chunk size {chunk_size} is outside 1..{MAX_CHUNK_FRAMES}")
    chunks, first = [], 0
    for start in range(frame_start, frame_end + 1, chunk_size):
        frames = tuple(range(start, min(start + chunk_size, frame_end + 1)))
        chunks.append(Chunk(len(chunks), first, frames))
        first += len(frames)
    return chunks


def frame_file(frame: int) -> str:
    """The output file of Blender frame ``frame``."""
    return f"frame_{int(frame):04d}.png"


def server_frame_file(index: int) -> str:
    """The server's file for sequence index ``index`` (server/concord/pipelines/stylize.py frame_name)."""
    return f"frame_{int(index):04d}.png"


def chunk_done(out_dir: str | os.PathLike, chunk: Chunk) -> bool:
    out = Path(out_dir)
    return all((out / frame_file(f)).is_file() for f in chunk.frames)


def resume_point(out_dir: str | os.PathLike, chunks: Sequence[Chunk]) -> int:
    """Index of the first chunk with a frame missing in ``out_dir`` (len(chunks) when every frame is there). That
    chunk and every later one are sent: a later chunk's frames follow a frame that is made again."""
    for k, chunk in enumerate(chunks):
        if not chunk_done(out_dir, chunk):
            return k
    return len(chunks)


# ---------------------------------------------------------------------------------------------------------------
# The job's params


def stylize_params(
    prompt: str,
    *,
    negative_prompt: str = "",
    seed: int = 0,
    strength: float = 0.7,
    steps: int | None = 30,
    guidance: float | None = 7.5,
    keyframes: str = "first+previous",
    noise: str = "warped",
    chunk_frames: int = 8,
) -> dict:
    """The params every request of a run shares (server/concord/api/schemas.py StylizeParams), as JSON-ready
    values. ``steps`` / ``guidance`` None: left out, the server fills them from its model (Model Defaults)."""
    params = prompt_params(prompt, negative_prompt, seed, "the stylized animation", StylizeError)
    check_choice("keyframes", keyframes, KEYFRAME_MODES, StylizeError)
    check_choice("noise", noise, NOISE_MODES, StylizeError)
    if not 0.0 < float(strength) <= 1.0:
        raise StylizeError(f"strength must be in (0, 1], got {strength}")
    if not 1 <= int(chunk_frames) <= MAX_CHUNK_FRAMES:
        raise StylizeError(f"chunk size {chunk_frames} is outside 1..{MAX_CHUNK_FRAMES}")
    params.update({
        "strength": float(strength),
        "keyframes": keyframes,
        "noise": noise,
        "chunk_frames": int(chunk_frames),
        "motion_source": "renderer",
    })
    if steps is not None:
        params["steps"] = int(steps)
    if guidance is not None:
        params["guidance"] = float(guidance)
    return params


def chunk_params(base: Mapping, chunk: Chunk, sequence: str, sequence_frames: int, resume: bool) -> dict:
    """One request's params: the run's ``base`` plus where the chunk lies in the sequence. Everything else is the
    same in every request of a sequence (the server refuses a request whose other settings differ)."""
    if not SEQUENCE_NAME.match(sequence):
        raise StylizeError(f"sequence name {sequence!r} is not 1..64 letters, digits, '_' or '-'")
    return {
        **base,
        "first_frame": int(chunk.first_index),
        "sequence": sequence,
        "sequence_frames": int(sequence_frames),
        "resume": bool(resume),
    }


def fingerprint(base_params: Mapping, *, frame_start: int, frame_end: int, size: tuple[int, int], source: str,
                model: str, scene: str) -> str:
    """What the frames of a run depend on (beside the scene's content): a resume continues only under the same."""
    blob = json.dumps({"params": dict(base_params), "frames": [int(frame_start), int(frame_end)],
                       "size": [int(size[0]), int(size[1])], "source": source, "model": model, "scene": scene},
                      sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def sequence_name(fingerprint_: str, out_dir: str | os.PathLike) -> str:
    """The server-side name of a run: its fingerprint and its output folder (two folders never share state)."""
    digest = hashlib.sha256(f"{fingerprint_}|{Path(out_dir).resolve()}".encode()).hexdigest()[:24]
    return f"blender-{digest}"


# ---------------------------------------------------------------------------------------------------------------
# Blender's passes in the FrameSet convention (same formulas as concord.frames.frameset's functions)


def motion_from_blender_vector(vector: np.ndarray, rows_bottom_up: bool = True) -> np.ndarray:
    """Blender's Vector pass (..., H, W, >=2): XY = previous - current in pixels with y UP, rows bottom-up (Blender's
    memory) or top-down (``rows_bottom_up=False``: an EXR read with OpenImageIO) -> the contract's motion
    (..., H, W, 2): rows top-down, (dx, dy) = previous - current with y DOWN, i.e. (X, -Y)."""
    v = np.asarray(vector, np.float32)
    if v.ndim < 3 or v.shape[-1] < 2:
        raise StylizeError(f"a Vector pass is (H, W, 4), got shape {v.shape}")
    xy = np.flip(v[..., :2], axis=-3) if rows_bottom_up else v[..., :2]
    return np.stack([xy[..., 0], -xy[..., 1]], axis=-1).astype(np.float32)


def depth_from_blender(z: np.ndarray, rows_bottom_up: bool = True) -> np.ndarray:
    """Blender's Depth pass (planar z, >= 1e9 on the background) -> the contract's depth: rows top-down, 0 on the
    background (NaN and infinite values count as background)."""
    d = np.asarray(z, np.float32)
    d = (np.flip(d, axis=-2) if rows_bottom_up else d).copy()
    d[~np.isfinite(d) | (d >= BLENDER_BACKGROUND_DEPTH)] = 0.0
    return d


def linear_to_srgb_u8(linear: np.ndarray) -> np.ndarray:
    """Scene-linear RGB (an EXR's Combined) -> display sRGB uint8: clip to [0, 1], then the sRGB transfer function
    of IEC 61966-2-1 (v = 12.92 x for x <= 0.0031308, else 1.055 x^(1/2.4) - 0.055): Blender's "Standard" view."""
    x = np.clip(np.nan_to_num(np.asarray(linear, np.float64), nan=0.0), 0.0, 1.0)
    v = np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1.0 / 2.4) - 0.055).astype(np.float32)
    return np.clip(np.rint(v * 255.0), 0, 255).astype(np.uint8)


def pack_frames(frames: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack per-frame dicts {image (H, W, 3) uint8, depth (H, W), motion (H, W, 2)} into one request's arrays and
    check them against the FrameSet contract and the server's limits (a broken capture is reported here, before
    any upload)."""
    if not frames:
        raise StylizeError("no frames were captured")
    if len(frames) > MAX_FRAMES_PER_REQUEST:
        raise StylizeError(f"{len(frames)} frames in one request, more than {MAX_FRAMES_PER_REQUEST}: use smaller chunks")
    image = np.stack([np.asarray(f["image"]) for f in frames])
    n, h, w = image.shape[:3]
    if image.dtype != np.uint8 or image.shape[-1] != 3:
        raise StylizeError(f"image: expected uint8 (N, H, W, 3), got {image.dtype} {image.shape}")
    for side, name in ((h, "height"), (w, "width")):
        if not MIN_SIDE <= side <= MAX_SIDE or side % SIDE_MULTIPLE:
            raise StylizeError(f"frame {name} {side} is not a multiple of 8 in {MIN_SIDE}..{MAX_SIDE}")
    depth = np.stack([np.asarray(f["depth"], np.float32) for f in frames])
    motion = np.stack([np.asarray(f["motion"], np.float32) for f in frames])
    if depth.shape != (n, h, w):
        raise StylizeError(f"depth: expected {(n, h, w)}, got {depth.shape}")
    if motion.shape != (n, h, w, 2):
        raise StylizeError(f"motion: expected {(n, h, w, 2)}, got {motion.shape}")
    if not np.isfinite(depth).all() or (depth < 0).any():
        raise StylizeError("depth must be finite, > 0 where something is hit and 0 on the background")
    if not np.isfinite(motion).all():
        raise StylizeError("motion holds NaN or infinite values")
    return {"image": image, "depth": depth, "motion": motion}


# ---------------------------------------------------------------------------------------------------------------
# An existing image sequence as the source


def image_sequence_files(names: Iterable[str]) -> dict[int, str]:
    """Frame number -> file name for the images of a folder: the number is the last run of digits in the name
    (``render_0012.png`` is frame 12, as Blender numbers its output); hidden files and names without digits are
    skipped. Two images with one number are an error."""
    out: dict[int, str] = {}
    for name in sorted(names):
        p = Path(name)
        if name.startswith(".") or p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        digits = re.findall(r"\d+", p.stem)
        if not digits:
            continue
        number = int(digits[-1])
        if number in out:
            raise StylizeError(f"two images for frame {number}: {out[number]} and {name}; keep one per frame")
        out[number] = name
    return out


def sequence_for_range(folder: str | os.PathLike, frames: Sequence[int]) -> dict[int, Path]:
    """The image of each frame in ``frames`` from ``folder`` (`image_sequence_files`), or a StylizeError naming
    what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StylizeError(f"the image sequence folder {folder} does not exist: choose the folder with the frames")
    found = image_sequence_files(p.name for p in folder.iterdir() if p.is_file())
    if not found:
        raise StylizeError(f"{folder} has no numbered images ({', '.join(IMAGE_SUFFIXES)}): choose the folder with "
                           "the rendered frames")
    missing = [f for f in frames if f not in found]
    if missing:
        shown = ", ".join(str(f) for f in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        have = sorted(found)
        raise StylizeError(f"{folder} has no image for frame {shown} (its images are numbered {have[0]}..{have[-1]}): "
                           "set the frame range to the images' numbers")
    return {f: folder / found[f] for f in frames}


# ---------------------------------------------------------------------------------------------------------------
# The output folder


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
    p = Path(out_dir) / MANIFEST
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_manifest(out_dir: str | os.PathLike, manifest: Mapping) -> Path:
    """Write the manifest atomically (a temporary file renamed over it)."""
    p = Path(out_dir) / MANIFEST
    tmp = p.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps(dict(manifest), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, p)
    return p


def frame_files_in(out_dir: str | os.PathLike) -> list[str]:
    out = Path(out_dir)
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.is_file() and FRAME_FILE.match(p.name))


def check_output_folder(out_dir: str | os.PathLike, fingerprint_: str) -> bool:
    """Whether ``out_dir`` may take this run's frames. Returns True when it holds frames of this very run (a
    resume), False when it is new or holds no frames of any run; raises OutputFolderError when it holds frames of
    another run, or frame files Concord did not write (nothing of the user's is overwritten)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"the output {out} is a file, not a folder: choose a folder")
    manifest = read_manifest(out)
    frames = frame_files_in(out)
    if manifest is None:
        if frames:
            raise OutputFolderError(
                f"{out} holds frame files ({frames[0]}, ...) that Concord did not make: choose an empty folder")
        return False
    if manifest.get("fingerprint") == fingerprint_:
        return True
    if frames:
        raise OutputFolderError(
            f"{out} holds frames of another Concord run (a different prompt, setting, frame range, size or model): "
            "choose an empty folder, or delete its frames and concord_stylize.json to start over")
    return False


def find_resumable(root: str | os.PathLike, prefix: str, fingerprint_: str) -> Path | None:
    """The newest folder ``root/<prefix>_*`` whose manifest is this run's and which lacks frames (an interrupted run
    to continue), or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    best = None
    for d in root.iterdir():
        if not d.is_dir() or not d.name.startswith(f"{prefix}_"):
            continue
        m = read_manifest(d)
        if m and m.get("fingerprint") == fingerprint_ and not m.get("complete"):
            if best is None or d.stat().st_mtime > best.stat().st_mtime:
                best = d
    return best


def default_output(root: str | os.PathLike, scene_name: str, fingerprint_: str, stamp: str) -> tuple[Path, bool]:
    """(folder, resumed) for a run without a chosen output folder: an interrupted run of the same fingerprint under
    ``root`` is continued; otherwise a new folder ``root/<scene>_stylize_<stamp>`` is reserved (`reserve_folder`)."""
    prefix = f"{safe_name(scene_name)}_stylize"
    found = find_resumable(root, prefix, fingerprint_)
    if found is not None:
        return found, True
    return reserve_folder(Path(root) / f"{prefix}_{stamp}"), False


def remove_stale_downloads(out_dir: str | os.PathLike) -> None:
    """Hidden download folders an earlier run left (a crash); never frames."""
    out = Path(out_dir)
    if not out.is_dir():
        return
    for p in out.iterdir():
        if p.is_dir() and (p.name.startswith(DOWNLOAD_PREFIX) or p.name.startswith("." + DOWNLOAD_PREFIX)):
            shutil.rmtree(p, ignore_errors=True)


def download_dir(out_dir: str | os.PathLike, chunk: Chunk) -> Path:
    """Where a chunk's result is downloaded: a hidden folder inside the output folder (same file system, so moving
    a frame out of it is an atomic rename)."""
    return Path(out_dir) / f"{DOWNLOAD_PREFIX}{chunk.first_index:06d}"


def collect_chunk_frames(downloaded: str | os.PathLike, chunk: Chunk, out_dir: str | os.PathLike) -> list[Path]:
    """Move a chunk's downloaded frames into the output folder under their Blender frame numbers (each with one
    ``os.replace``: a frame file is complete or absent) and keep its metrics.json as ``metrics/frames_<a>-<b>.json``;
    the download folder is removed. Every frame must be there first: a result without one is a bad response
    (StylizeError) and nothing is moved."""
    src, out = Path(downloaded), Path(out_dir)
    names = [(src / "frames" / server_frame_file(chunk.first_index + i), out / frame_file(f))
             for i, f in enumerate(chunk.frames)]
    missing = [a.name for a, _ in names if not a.is_file()]
    if missing:
        raise StylizeError(f"the server's result for frames {chunk.label} lacks {', '.join(missing[:3])}: a bad "
                           "response; run again to retry these frames")
    moved = []
    for a, b in names:
        os.replace(a, b)
        moved.append(b)
    if (src / "metrics.json").is_file():
        (out / "metrics").mkdir(exist_ok=True)
        os.replace(src / "metrics.json", out / "metrics" / f"frames_{chunk.label}.json")
    shutil.rmtree(src, ignore_errors=True)
    return moved


def discard_run_files(out_dir: str | os.PathLike, remove_folder: bool) -> None:
    """A run that wrote no frame leaves nothing: its manifest and download folders go, and (``remove_folder``: a
    folder the run reserved) the folder itself when it is then empty."""
    out = Path(out_dir)
    if not out.is_dir() or frame_files_in(out):
        return
    remove_stale_downloads(out)
    try:
        (out / MANIFEST).unlink()
    except FileNotFoundError:
        pass
    if remove_folder:
        try:
            out.rmdir()
        except OSError:
            pass
