"""Load a mesh file into plain arrays, validated, for the Blender-free path (CLI, tests, baking).

What it does
------------
:func:`load_mesh` reads glTF/GLB/OBJ/PLY/... through trimesh, merges every mesh the file's scene places
(node transforms applied) into one :class:`Mesh` and **validates before anything uses it**. Every problem is a
:class:`MeshError` with a message naming the problem and a hint, never a raw trimesh traceback. trimesh loads
many malformed glTF files without complaint (indices out of range, infinite coordinates, broken GLB chunks),
so the GLB/glTF container is checked here first and the arrays are checked after loading.

World frame
-----------
Coordinates are kept exactly as the file stores them (no axis conversion). The file format's convention is
recorded on the mesh instead: ``mesh.up`` and ``mesh.front`` (glTF and OBJ: up +Y, front +Z; PLY/STL/OFF:
Blender's up +Z, front -Y). Rigs take the frame explicitly (``rig.with_frame(mesh.up, mesh.front)``, see
``concord.geometry.rigs``). ``mesh.blender_from_file`` is the 4x4 matrix Blender's importer applies
(glTF/OBJ: (x, y, z) -> (x, -z, y)), for comparing with renders made inside Blender.

UVs follow Blender's convention (origin bottom-left, v up): trimesh already flips glTF's top-left UVs on load.
Vertices are split at UV seams (one UV per vertex), as trimesh loads them.

Normals: per-vertex shading normals (the file's, when present and usable; otherwise trimesh's face-angle
weighted average), unit length, in the same world frame.

UV unwrapping (``unwrap=True``) runs xatlas in a child process so that a crash cannot take the server down
(xatlas segfaults on large meshes, upstream jpcy/xatlas#151) and refuses meshes above ``max_unwrap_faces``.

Layer rule: numpy, trimesh, PIL, xatlas (in a subprocess). No bpy, no torch.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

__all__ = [
    "Mesh",
    "MeshError",
    "load_mesh",
    "unwrap_uvs",
    "icosphere_with_uv",
    "DEFAULT_MAX_UNWRAP_FACES",
]

#: xatlas crashes around 80k faces (jpcy/xatlas#151); stay well below.
DEFAULT_MAX_UNWRAP_FACES = 50_000
#: Degenerate faces are dropped (with a warning) while they are fewer than this share of all faces.
MAX_DEGENERATE_SHARE = 0.5

_Y_UP_FORMATS = {".gltf", ".glb", ".obj"}
_Y_UP = ((0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
_Z_UP = ((0.0, 0.0, 1.0), (0.0, -1.0, 0.0))
# Blender's glTF / OBJ importers: file (x, y, z) -> Blender (x, -z, y).
_BLENDER_FROM_Y_UP = np.array(
    [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)


class MeshError(ValueError):
    """A mesh file or array set that Concord cannot use. ``hint`` says what the user can do about it."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message + (f" ({hint})" if hint else ""))
        self.message = message
        self.hint = hint


@dataclass
class Mesh:
    """One triangle mesh as plain arrays (see the module docstring for frames and conventions)."""

    vertices: np.ndarray  # (N, 3) float64
    faces: np.ndarray  # (F, 3) int64
    uv: np.ndarray | None  # (N, 2) float64, Blender's UV convention, or None
    normals: np.ndarray  # (N, 3) float64 unit vertex normals
    texture: Any = None  # PIL.Image.Image: the base-colour texture, if the file has one
    up: tuple[float, float, float] = _Z_UP[0]
    front: tuple[float, float, float] = _Z_UP[1]
    blender_from_file: np.ndarray = field(default_factory=lambda: np.eye(4))
    source: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def num_faces(self) -> int:
        return int(len(self.faces))

    @property
    def num_vertices(self) -> int:
        return int(len(self.vertices))

    def bounding_sphere(self) -> tuple[np.ndarray, float]:
        """(centre, radius): the bounding box centre and the farthest vertex from it (encloses the mesh)."""
        used = self.vertices[np.unique(self.faces)] if len(self.faces) else self.vertices
        c = 0.5 * (used.min(axis=0) + used.max(axis=0))
        r = float(np.linalg.norm(used - c, axis=1).max())
        return c, r

    def face_normals(self) -> np.ndarray:
        """(F, 3) unit geometric normals (right-hand winding)."""
        tri = self.vertices[self.faces]
        n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-300)

    def texture_rgb(self) -> np.ndarray | None:
        """The base-colour texture as float32 (H, W, 3) sRGB in [0, 1], row 0 = top; None without one."""
        if self.texture is None:
            return None
        return np.asarray(self.texture.convert("RGB"), dtype=np.float32) / 255.0

    def to_trimesh(self):
        """A trimesh.Trimesh of the same arrays (no processing, normals attached)."""
        import trimesh

        return trimesh.Trimesh(
            vertices=self.vertices, faces=self.faces, vertex_normals=self.normals, process=False
        )

    @classmethod
    def from_arrays(
        cls,
        vertices: np.ndarray,
        faces: np.ndarray,
        uv: np.ndarray | None = None,
        normals: np.ndarray | None = None,
        *,
        texture: Any = None,
        up: Sequence[float] = _Z_UP[0],
        front: Sequence[float] = _Z_UP[1],
        require_uv: bool = True,
        source: str = "<arrays>",
    ) -> "Mesh":
        """Build and validate a mesh from arrays (same checks as :func:`load_mesh`)."""
        vertices = np.asarray(vertices, dtype=np.float64)
        faces = np.asarray(faces)
        if vertices.ndim != 2 or vertices.shape[1] != 3:
            raise MeshError(f"{source}: vertices must be (N, 3), got {vertices.shape}")
        if faces.ndim != 2 or faces.shape[1] != 3 or not np.issubdtype(faces.dtype, np.integer):
            raise MeshError(f"{source}: faces must be integer (F, 3) triangles, got {faces.dtype} {faces.shape}")
        part = _Part(vertices, faces.astype(np.int64), None if uv is None else np.asarray(uv, np.float64),
                     None if normals is None else np.asarray(normals, np.float64), texture, "arrays")
        _check_part(part, source)
        mesh = _finish([part], source, tuple(up), tuple(front), np.eye(4))
        if require_uv and mesh.uv is None:
            raise MeshError(f"{source}: the mesh has no UV coordinates", "unwrap it first (--unwrap)")
        return mesh


# ---------------------------------------------------------------------------------------------- loading


def load_mesh(
    path: str | os.PathLike,
    unwrap: bool | Literal["missing", "always"] = False,
    *,
    max_unwrap_faces: int = DEFAULT_MAX_UNWRAP_FACES,
    unwrap_timeout_s: float = 600.0,
) -> Mesh:
    """Load, merge and validate a mesh file. Raises :class:`MeshError` for anything Concord cannot use.

    ``unwrap``: False -> a mesh without UVs is an error; True / "missing" -> generate UVs with xatlas only when
    the file has none; "always" -> replace the file's UVs (and drop its texture, which no longer fits).
    """
    p = Path(path)
    src = str(p)
    if not p.exists():
        raise MeshError(f"{src}: file not found", "check the path")
    if p.is_dir():
        raise MeshError(f"{src}: is a folder, not a mesh file")
    if p.stat().st_size == 0:
        raise MeshError(f"{src}: file is empty (0 bytes)", "re-export the mesh")
    ext = p.suffix.lower()

    import trimesh

    supported = set(trimesh.available_formats())
    if ext.lstrip(".") not in supported:
        raise MeshError(
            f"{src}: unsupported file type {ext or '(none)'!r}",
            "export as .glb, .gltf, .obj or .ply",
        )
    if ext in (".glb", ".gltf"):
        _check_gltf_container(p)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scene = trimesh.load(src, force="scene", process=False)
    except FileNotFoundError as e:
        missing = Path(str(e.filename or (e.args[-1] if e.args else e))).name
        raise MeshError(
            f"{src}: the file refers to a file that is missing: {missing}",
            "keep .bin and texture files next to the .gltf, or export a single .glb",
        ) from None
    except MemoryError:
        raise MeshError(f"{src}: the file is too large to load") from None
    except Exception as e:  # trimesh raises many types on malformed input (JSONDecodeError, KeyError, ...)
        raise MeshError(
            f"{src}: unreadable or corrupt {ext} file ({type(e).__name__}: {str(e)[:200] or 'no detail'})",
            "open it in Blender or the Khronos glTF validator to see what is wrong, then re-export",
        ) from None

    all_geoms = dict(scene.geometry)
    surfaces = {k: g for k, g in all_geoms.items() if isinstance(g, trimesh.Trimesh) and len(g.faces) > 0}
    if not surfaces:
        what = "no meshes" if not all_geoms else "only points or lines, no triangles"
        raise MeshError(f"{src}: no geometry: the file contains {what}", "export the object as a triangle mesh")
    # check every mesh in the file (even ones no node uses) so the message names the real problem
    parts_by_name = {}
    for name, g in surfaces.items():
        part = _part_from_trimesh(g, name)
        _check_part(part, src)
        parts_by_name[name] = part

    parts = []
    for node in scene.graph.nodes_geometry:
        transform, geom_name = scene.graph[node]
        if geom_name not in parts_by_name:
            continue
        parts.append(parts_by_name[geom_name].transformed(np.asarray(transform, dtype=np.float64)))
    if not parts:
        raise MeshError(
            f"{src}: no geometry: the file defines {len(surfaces)} mesh(es) but no node of its scene uses them",
            "add the mesh to the scene (a node referencing it) and re-export",
        )

    up, front = _Y_UP if ext in _Y_UP_FORMATS else _Z_UP
    blender_from_file = _BLENDER_FROM_Y_UP.copy() if ext in _Y_UP_FORMATS else np.eye(4)
    mesh = _finish(parts, src, up, front, blender_from_file)

    mode = {False: None, True: "missing", "missing": "missing", "always": "always"}.get(unwrap, "bad")
    if mode == "bad":
        raise ValueError(f"unwrap must be False, True, 'missing' or 'always', got {unwrap!r}")
    if mode == "always" or (mode == "missing" and mesh.uv is None):
        mesh = unwrap_uvs(mesh, max_faces=max_unwrap_faces, timeout_s=unwrap_timeout_s)
    if mesh.uv is None:
        raise MeshError(
            f"{src}: the mesh has no UV coordinates (texture coordinates)",
            "run with --unwrap to generate them (xatlas), or unwrap in Blender",
        )
    return mesh


# ---------------------------------------------------------------------------------------------- glTF container


_GLB_MAGIC = b"glTF"
_CHUNK_JSON = 0x4E4F534A
_CHUNK_BIN = 0x004E4942


def _check_gltf_container(p: Path) -> dict:
    """Check a .glb's binary container / a .gltf's JSON (the part trimesh does not validate); return the JSON.

    Follows the glTF 2.0 spec's GLB layout: 12-byte header (magic "glTF", version 2, total length), then
    chunks (length, type, data); the first chunk is JSON, an optional BIN chunk must be second.
    """
    src = str(p)
    data = p.read_bytes()
    bad = "the file is damaged or was not written completely; re-export it"
    if p.suffix.lower() == ".glb":
        if len(data) < 12:
            raise MeshError(f"{src}: truncated GLB: {len(data)} bytes, shorter than the 12-byte header", bad)
        magic, version, length = data[:4], *struct.unpack_from("<II", data, 4)
        if magic != _GLB_MAGIC:
            raise MeshError(f"{src}: not a GLB file (header magic {magic!r}, expected b'glTF')", bad)
        if version != 2:
            raise MeshError(f"{src}: unsupported GLB version {version} (only glTF 2.0 is supported)", bad)
        if length < 20:
            raise MeshError(f"{src}: GLB declares a length of {length} bytes, too small to hold a JSON chunk", bad)
        if length > len(data):
            raise MeshError(f"{src}: truncated GLB: header declares {length} bytes, file has {len(data)}", bad)
        offset, chunks = 12, []
        while offset < length:
            if offset + 8 > length:
                raise MeshError(f"{src}: GLB chunk header at byte {offset} is cut off", bad)
            clen, ctype = struct.unpack_from("<II", data, offset)
            if offset + 8 + clen > length:
                raise MeshError(
                    f"{src}: GLB chunk at byte {offset} claims {clen} bytes, more than the file holds", bad
                )
            chunks.append((ctype, data[offset + 8 : offset + 8 + clen], offset))
            offset += 8 + clen  # (chunk lengths should be multiples of 4; tolerated here, as most readers do)
        if not chunks or chunks[0][0] != _CHUNK_JSON:
            raise MeshError(f"{src}: the first GLB chunk must be JSON", bad)
        types = [c[0] for c in chunks]
        if types.count(_CHUNK_JSON) > 1 or types.count(_CHUNK_BIN) > 1:
            raise MeshError(f"{src}: GLB has duplicate JSON or BIN chunks", bad)
        if _CHUNK_BIN in types and types.index(_CHUNK_BIN) != 1:
            raise MeshError(f"{src}: the GLB BIN chunk must be the second chunk", bad)
        if len(chunks[0][1]) == 0:
            raise MeshError(f"{src}: GLB JSON chunk is empty", bad)
        text = chunks[0][1]
    else:
        text = data
    if text.startswith(b"\xef\xbb\xbf"):
        raise MeshError(f"{src}: invalid glTF JSON: starts with a UTF-8 byte-order mark (not allowed)", bad)
    try:
        doc = json.loads(text.decode("utf-8").rstrip(" \x00"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MeshError(f"{src}: invalid glTF JSON ({e})", bad) from None
    if not isinstance(doc, dict):
        raise MeshError(f"{src}: invalid glTF: the JSON root must be an object, got {type(doc).__name__}", bad)
    asset = doc.get("asset")
    if not isinstance(asset, dict) or not str(asset.get("version", "")).startswith("2"):
        raise MeshError(f"{src}: invalid glTF: missing 'asset' with version 2.x", bad)
    if not doc.get("meshes"):
        raise MeshError(f"{src}: no geometry: the glTF file has no meshes", "export the object as a mesh")
    is_glb = p.suffix.lower() == ".glb"
    bin_len = len(chunks[1][1]) if is_glb and len(chunks) > 1 and chunks[1][0] == _CHUNK_BIN else None
    _check_gltf_structure(doc, src, is_glb, bin_len)
    return doc


_COMPONENT_SIZE = {5120: 1, 5121: 1, 5122: 2, 5123: 2, 5125: 4, 5126: 4}
_TYPE_COUNT = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT2": 4, "MAT3": 9, "MAT4": 16}


def _check_gltf_structure(doc: dict, src: str, is_glb: bool, bin_len: int | None) -> None:
    """The glTF JSON's references and byte ranges (glTF 2.0 spec, sections 3.6 Buffers and 3.7 Meshes).

    trimesh reads these without checking and either crashes (AssertionError, KeyError) or returns garbage.
    Index *values* are checked after loading (see ``_check_part``).
    """
    bad = "the file is damaged or written by a broken exporter; re-export it"

    def ref(value: Any, table: str, where: str) -> dict:
        items = doc.get(table) or []
        if isinstance(value, bool) or not isinstance(value, int):
            raise MeshError(f"{src}: invalid glTF: {where} must be an integer index into {table}, got {value!r}", bad)
        if not 0 <= value < len(items) or not isinstance(items[value], dict):
            raise MeshError(f"{src}: invalid glTF: {where} = {value} does not exist ({len(items)} {table})", bad)
        return items[value]

    for i, buf in enumerate(doc.get("buffers") or []):
        if not isinstance(buf, dict) or not isinstance(buf.get("byteLength"), int):
            raise MeshError(f"{src}: invalid glTF: buffers[{i}] needs an integer byteLength", bad)
        if "uri" not in buf:
            if not (is_glb and i == 0):
                raise MeshError(f"{src}: invalid glTF: buffers[{i}] has no uri (only a .glb's first buffer may)", bad)
            if bin_len is None or buf["byteLength"] > bin_len:
                raise MeshError(f"{src}: invalid GLB: buffers[0] needs {buf['byteLength']} bytes, the BIN chunk has "
                                f"{bin_len or 0}", bad)
    for i, view in enumerate(doc.get("bufferViews") or []):
        where = f"bufferViews[{i}]"
        if not isinstance(view, dict):
            raise MeshError(f"{src}: invalid glTF: {where} is not an object", bad)
        buf = ref(view.get("buffer"), "buffers", f"{where}.buffer")
        off, length = view.get("byteOffset", 0), view.get("byteLength")
        if not isinstance(off, int) or not isinstance(length, int) or off < 0 or length < 1:
            raise MeshError(f"{src}: invalid glTF: {where} has a bad byteOffset/byteLength", bad)
        if off + length > buf["byteLength"]:
            raise MeshError(f"{src}: invalid glTF: {where} (bytes {off}..{off + length}) does not fit its buffer "
                            f"({buf['byteLength']} bytes)", bad)
    for i, acc in enumerate(doc.get("accessors") or []):
        where = f"accessors[{i}]"
        if not isinstance(acc, dict) or not isinstance(acc.get("count"), int) or acc["count"] < 1:
            raise MeshError(f"{src}: invalid glTF: {where} needs an integer count >= 1", bad)
        size = _COMPONENT_SIZE.get(acc.get("componentType"))
        ncomp = _TYPE_COUNT.get(acc.get("type"))
        if size is None or ncomp is None:
            raise MeshError(f"{src}: invalid glTF: {where} has an unknown componentType/type", bad)
        if "bufferView" in acc:
            view = ref(acc["bufferView"], "bufferViews", f"{where}.bufferView")
            elem = size * ncomp
            stride = view.get("byteStride") or elem
            need = acc.get("byteOffset", 0) + (acc["count"] - 1) * stride + elem
            if need > view["byteLength"]:
                raise MeshError(f"{src}: invalid glTF: {where} needs {need} bytes, its bufferView holds "
                                f"{view['byteLength']}", bad)
    for m, mesh in enumerate(doc.get("meshes") or []):
        prims = mesh.get("primitives") if isinstance(mesh, dict) else None
        if not isinstance(prims, list) or not prims:
            raise MeshError(f"{src}: invalid glTF: meshes[{m}] has no primitives", bad)
        for k, prim in enumerate(prims):
            where = f"meshes[{m}].primitives[{k}]"
            attrs = prim.get("attributes") if isinstance(prim, dict) else None
            if not isinstance(attrs, dict) or "POSITION" not in attrs:
                raise MeshError(f"{src}: invalid glTF: {where} has no POSITION attribute", bad)
            counts = {name: ref(a, "accessors", f"{where}.attributes.{name}")["count"] for name, a in attrs.items()}
            if len(set(counts.values())) > 1:
                raise MeshError(f"{src}: invalid glTF: {where}'s attributes have different counts {counts}", bad)
            if prim.get("mode", 4) == 4:  # TRIANGLES
                n = ref(prim["indices"], "accessors", f"{where}.indices")["count"] if "indices" in prim \
                    else counts["POSITION"]
                if n % 3:
                    raise MeshError(f"{src}: invalid glTF: {where} draws triangles from {n} indices "
                                    f"(not a multiple of 3)", bad)


# ---------------------------------------------------------------------------------------------- parts


@dataclass
class _Part:
    vertices: np.ndarray
    faces: np.ndarray
    uv: np.ndarray | None
    normals: np.ndarray | None
    texture: Any
    name: str

    def transformed(self, T: np.ndarray) -> "_Part":
        A, t = T[:3, :3], T[:3, 3]
        v = self.vertices @ A.T + t
        faces = self.faces
        n = self.normals
        if n is not None:
            # normals transform by the inverse transpose: n' = A^-T n  (rows: n @ A^-1)
            n = n @ np.linalg.inv(A)
        if np.linalg.det(A) < 0:  # a mirroring transform flips the winding
            faces = faces[:, ::-1].copy()
        return _Part(v, faces, self.uv, n, self.texture, self.name)


def _part_from_trimesh(g, name: str) -> _Part:
    uv = getattr(g.visual, "uv", None)
    uv = None if uv is None or len(uv) == 0 else np.asarray(uv, dtype=np.float64)
    texture = None
    material = getattr(g.visual, "material", None)
    if material is not None:
        texture = getattr(material, "baseColorTexture", None) or getattr(material, "image", None)
    normals = None
    # vertex normals stored in the file (trimesh keeps them in its cache; computing would hide broken ones)
    cache = getattr(g, "_cache", None)
    if cache is not None and "vertex_normals" in cache:
        normals = np.asarray(g.vertex_normals, dtype=np.float64)
    return _Part(
        np.asarray(g.vertices, dtype=np.float64), np.asarray(g.faces, dtype=np.int64), uv, normals, texture, name
    )


def _check_part(part: _Part, src: str) -> None:
    nv = len(part.vertices)
    label = f"{src}: mesh {part.name!r}"
    if len(part.faces) == 0:
        raise MeshError(f"{label} has no faces")
    fmin, fmax = int(part.faces.min()), int(part.faces.max())
    if fmin < 0 or fmax >= nv:
        n_bad = int(((part.faces < 0) | (part.faces >= nv)).any(axis=1).sum())
        raise MeshError(
            f"{label}: {n_bad} of {len(part.faces)} faces use vertex indices out of range "
            f"(indices {fmin}..{fmax}, the mesh has {nv} vertices)",
            "the index buffer is corrupt; re-export the mesh",
        )
    tri = part.vertices[part.faces]
    if np.isfinite(tri).all() and _degenerate_faces(tri).all():
        raise MeshError(
            f"{label}: all {len(part.faces)} faces are degenerate (zero area or repeated vertices)",
            "the mesh is probably corrupt; check it in a modelling tool",
        )
    finite = np.isfinite(part.vertices).all(axis=1)
    if not finite.all():
        raise MeshError(
            f"{label}: {int((~finite).sum())} of {nv} vertices have non-finite coordinates (NaN or Inf)",
            "fix or delete those vertices in a modelling tool and re-export",
        )
    if part.uv is not None:
        if part.uv.shape != (nv, 2):
            raise MeshError(f"{label}: UV array has shape {part.uv.shape}, expected ({nv}, 2)")
        uv_ok = np.isfinite(part.uv).all(axis=1)
        if not uv_ok.all():
            raise MeshError(
                f"{label}: {int((~uv_ok).sum())} vertices have NaN/Inf UV coordinates",
                "re-unwrap the mesh (or load with --unwrap=always to replace its UVs)",
            )


def _finish(parts: list[_Part], src: str, up, front, blender_from_file) -> Mesh:
    """Merge validated parts, drop degenerate faces, settle normals, UVs and texture."""
    notes: list[str] = []
    offsets = np.cumsum([0] + [len(p.vertices) for p in parts])
    vertices = np.concatenate([p.vertices for p in parts])
    faces = np.concatenate([p.faces + o for p, o in zip(parts, offsets[:-1])])

    has_uv = [p.uv is not None for p in parts]
    uv = None
    texture = None
    if all(has_uv):
        textures = [p.texture for p in parts]
        distinct = {id(t) for t in textures if t is not None}
        if len(parts) == 1 or len(distinct) <= 1:
            uv = np.concatenate([p.uv for p in parts])
            texture = next((t for t in textures if t is not None), None)
        else:
            uv, texture = _pack_textures(parts)
            notes.append(f"{len(distinct)} base-colour textures packed into one atlas (UVs rescaled)")
    elif any(has_uv):
        missing = [p.name for p in parts if p.uv is None]
        notes.append(f"parts without UVs: {missing}; the merged mesh has no UVs")

    # degenerate faces: repeated indices or (near-)zero area relative to the longest edge
    degenerate = _degenerate_faces(vertices[faces])
    n_deg = int(degenerate.sum())
    if n_deg:
        if n_deg == len(faces) or n_deg >= MAX_DEGENERATE_SHARE * len(faces):
            raise MeshError(
                f"{src}: {n_deg} of {len(faces)} faces are degenerate (zero area or repeated vertices)",
                "the mesh is probably corrupt; check it in a modelling tool",
            )
        faces = faces[~degenerate]
        notes.append(f"dropped {n_deg} degenerate faces of {len(degenerate)}")

    # normals: the file's where every part has usable ones, else computed from the geometry
    normals = None
    if all(p.normals is not None for p in parts):
        normals = np.concatenate([p.normals for p in parts])
        lengths = np.linalg.norm(normals, axis=1)
        used = np.zeros(len(vertices), dtype=bool)
        used[faces.ravel()] = True
        ok = np.isfinite(normals).all(axis=1) & (lengths > 1e-6)
        if not ok[used].all():
            notes.append(f"{int((~ok[used]).sum())} vertex normals in the file are zero or invalid; recomputed all")
            normals = None
        else:
            normals = normals / np.where(lengths > 1e-6, lengths, 1.0)[:, None]
    if normals is None:
        normals = _vertex_normals(vertices, faces)

    return Mesh(
        vertices=vertices,
        faces=faces.astype(np.int64),
        uv=uv,
        normals=normals,
        texture=texture,
        up=tuple(float(x) for x in up),
        front=tuple(float(x) for x in front),
        blender_from_file=np.asarray(blender_from_file, dtype=np.float64),
        source=src,
        warnings=notes,
    )


def _degenerate_faces(tri: np.ndarray) -> np.ndarray:
    """(F,) bool: zero area relative to the longest edge (|e1 x e2| <= 1e-12 |e_max|^2) or all corners equal."""
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    twice_area = np.linalg.norm(np.cross(e1, e2), axis=1)
    longest2 = np.max(np.stack([(e1**2).sum(1), (e2**2).sum(1), ((tri[:, 2] - tri[:, 1]) ** 2).sum(1)]), axis=0)
    return (twice_area <= 1e-12 * longest2) | (longest2 == 0)


def _vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Angle-weighted vertex normals (trimesh's), unit length; (0, 0, 1) for unused vertices."""
    import trimesh

    tm = trimesh.Trimesh(vertices=vertices, faces=faces, process=False)
    n = np.array(tm.vertex_normals, dtype=np.float64)
    lengths = np.linalg.norm(n, axis=1)
    n[lengths < 1e-12] = (0.0, 0.0, 1.0)
    return n / np.linalg.norm(n, axis=1, keepdims=True)


def _pack_textures(parts: list[_Part]):
    """Several parts with different textures: let trimesh pack the textures into one atlas."""
    import trimesh
    from trimesh.visual.material import PBRMaterial
    from trimesh.visual.texture import TextureVisuals

    visuals = [
        TextureVisuals(uv=p.uv, material=PBRMaterial(baseColorTexture=p.texture) if p.texture is not None else None)
        for p in parts
    ]
    try:
        merged = trimesh.visual.concatenate(visuals)
        uv = np.asarray(merged.uv, dtype=np.float64)
        texture = getattr(merged.material, "baseColorTexture", None) or getattr(merged.material, "image", None)
    except Exception as e:  # pragma: no cover - trimesh internals
        raise MeshError(
            f"could not merge {len(parts)} textured parts into one texture ({type(e).__name__}: {e})",
            "join the objects and bake to one material in Blender, or load with --unwrap=always",
        ) from None
    return uv, texture


# ---------------------------------------------------------------------------------------------- unwrapping

_XATLAS_CHILD = r"""
import sys, numpy as np, xatlas
d = np.load(sys.argv[1])
vmapping, indices, uvs = xatlas.parametrize(d["vertices"], d["faces"])
np.savez(sys.argv[2], vmapping=vmapping.astype(np.int64), indices=indices.astype(np.int64), uvs=uvs.astype(np.float64))
"""


def unwrap_uvs(mesh: Mesh, *, max_faces: int = DEFAULT_MAX_UNWRAP_FACES, timeout_s: float = 600.0) -> Mesh:
    """New UVs from xatlas (run in a child process); vertices are split at the new seams.

    The mesh's texture is dropped (it belonged to the old UVs). Raises MeshError above ``max_faces`` faces,
    if xatlas crashes or times out.
    """
    if mesh.num_faces > max_faces:
        raise MeshError(
            f"{mesh.source}: {mesh.num_faces} faces is too many to unwrap here (limit {max_faces}; xatlas "
            f"crashes on large meshes, jpcy/xatlas#151)",
            "decimate the mesh or unwrap it in Blender (Smart UV Project) and export it with UVs",
        )
    with tempfile.TemporaryDirectory(prefix="concord-xatlas-") as tmp:
        inp, out = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
        np.savez(inp, vertices=mesh.vertices.astype(np.float32), faces=mesh.faces.astype(np.uint32))
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _XATLAS_CHILD, inp, out],
                capture_output=True,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            raise MeshError(
                f"{mesh.source}: UV unwrapping took longer than {timeout_s:.0f} s and was stopped",
                "unwrap the mesh in Blender and export it with UVs",
            ) from None
        if proc.returncode != 0:
            if proc.returncode < 0:
                try:
                    why = f"crashed ({signal.Signals(-proc.returncode).name})"
                except ValueError:
                    why = f"was killed by signal {-proc.returncode}"
            else:
                tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
                why = f"failed: {tail[0][:200]}"
            raise MeshError(
                f"{mesh.source}: UV unwrapping (xatlas) {why}",
                "unwrap the mesh in Blender (Smart UV Project) and export it with UVs",
            )
        res = np.load(out)
        vmapping, indices, uvs = res["vmapping"], res["indices"], res["uvs"]
    notes = list(mesh.warnings) + ["UVs generated by xatlas"]
    if mesh.texture is not None:
        notes.append("the file's texture was dropped: it does not fit the new UVs")
    return Mesh(
        vertices=mesh.vertices[vmapping],
        faces=indices.reshape(-1, 3),
        uv=uvs,
        normals=mesh.normals[vmapping],
        texture=None,
        up=mesh.up,
        front=mesh.front,
        blender_from_file=mesh.blender_from_file,
        source=mesh.source,
        warnings=notes,
    )


# ---------------------------------------------------------------------------------------------- test meshes


def icosphere_with_uv(subdivisions: int = 5, radius: float = 1.0, center: Sequence[float] = (0, 0, 0)) -> Mesh:
    """A sphere with equirectangular UVs, seams handled (for tests and benchmarks). Z-up frame.

    ``u = atan2(y, x) / (2 pi) + 0.5``, ``v = asin(z / r) / pi + 0.5`` (v up, as Blender).
    Every face gets its own three vertices' UVs: faces crossing the u = 0/1 seam get u + 1 on the wrapped
    corners (values up to ~1.03, the contract allows tiling), and pole corners take the mean u of the face's
    other corners, so linear interpolation inside each face is smooth. subdivisions=5 gives 20480 faces.
    """
    import trimesh

    ico = trimesh.creation.icosphere(subdivisions=subdivisions, radius=1.0)
    p = ico.vertices[ico.faces]  # (F, 3, 3) corners, unshared
    u = np.arctan2(p[..., 1], p[..., 0]) / (2 * np.pi) + 0.5
    v = np.arcsin(np.clip(p[..., 2], -1, 1)) / np.pi + 0.5
    # seam: corners on both sides of u=0/1 -> lift the small ones by 1
    wrap = (u.max(axis=1) - u.min(axis=1)) > 0.5
    u = np.where(wrap[:, None] & (u < 0.5), u + 1.0, u)
    pole = np.abs(p[..., 2]) > 1 - 1e-9
    if pole.any():
        others = np.where(pole, np.nan, u)
        mean_u = np.nanmean(others, axis=1)
        u = np.where(pole, mean_u[:, None], u)
    vertices = p.reshape(-1, 3) * radius + np.asarray(center, dtype=np.float64)
    faces = np.arange(len(vertices)).reshape(-1, 3)
    uv = np.stack([u, v], axis=-1).reshape(-1, 2)
    normals = p.reshape(-1, 3)
    return Mesh.from_arrays(vertices, faces, uv, normals, source=f"icosphere({subdivisions})")
