"""Arrays on the wire: decode an uploaded `.npz` safely and check it against a job kind's array specs.

A job's arrays travel as one `.npz` (numpy's zip of `.npy` members, written by `numpy.savez`; pickled object
arrays are refused). Each job kind declares `ArraySpec`s: name, accepted dtypes, a symbolic shape such as
("V", "H", "W", 2) whose letters must agree across arrays, bounds per letter, and whether values must be
finite. Everything a client can get wrong becomes an `ArrayError` naming the field and what to do.

Pure numpy: no torch, no web framework.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field

import numpy as np


class ArrayError(ValueError):
    def __init__(self, message: str, field: str = "arrays", hint: str | None = None):
        super().__init__(message)
        self.field = field
        self.hint = hint


@dataclass(frozen=True)
class ArraySpec:
    name: str
    dtypes: tuple[str, ...]
    shape: tuple[str | int, ...]
    description: str = ""
    required: bool = True
    finite: bool = True
    cast_to: str | None = None  # canonical dtype handed to the pipeline


@dataclass(frozen=True)
class DimLimit:
    low: int
    high: int
    multiple_of: int = 1


@dataclass(frozen=True)
class ArraysContract:
    specs: tuple[ArraySpec, ...]
    dims: dict[str, DimLimit] = field(default_factory=dict)

    def describe(self) -> list[dict]:
        return [
            {
                "name": s.name,
                "dtypes": list(s.dtypes),
                "shape": [str(d) for d in s.shape],
                "required": s.required,
                "description": s.description,
            }
            for s in self.specs
        ]


def decode_npz(data: bytes, max_uncompressed_bytes: int) -> dict[str, np.ndarray]:
    """Read an .npz upload. Refuses pickles, non-zip data and archives that inflate past the limit."""
    if not data:
        raise ArrayError("the `arrays` part is empty", hint="send a .npz written by numpy.savez")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        members = zf.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise ArrayError(
            f"the `arrays` part is not a readable .npz file ({exc})", hint="send a .npz written by numpy.savez"
        ) from None
    total = sum(m.file_size for m in members)
    if total > max_uncompressed_bytes:
        raise ArrayError(
            f"the arrays inflate to {total} bytes, over the server's limit of {max_uncompressed_bytes}",
            hint="send fewer or smaller views, or raise --max-upload-mb on the server",
        )
    arrays: dict[str, np.ndarray] = {}
    for m in members:
        if not m.filename.endswith(".npy"):
            raise ArrayError(f"the .npz holds `{m.filename}`, which is not an .npy array", hint="use numpy.savez")
        name = m.filename[: -len(".npy")]
        try:
            with zf.open(m) as fh:
                arrays[name] = np.lib.format.read_array(fh, allow_pickle=False)
        except ValueError as exc:
            raise ArrayError(
                f"array `{name}` cannot be read without pickles ({exc})",
                field=f"arrays.{name}",
                hint="send plain numeric arrays; object arrays are refused",
            ) from None
        except (zipfile.BadZipFile, EOFError, OSError, RuntimeError) as exc:
            raise ArrayError(
                f"array `{name}` is corrupt ({exc})", field=f"arrays.{name}", hint="write the file again"
            ) from None
    return arrays


def validate_arrays(arrays: dict[str, np.ndarray], contract: ArraysContract) -> dict[str, np.ndarray]:
    """Check names, dtypes, shapes (with consistent symbolic dims), bounds and finiteness; cast; return them."""
    known = {s.name for s in contract.specs}
    extra = sorted(set(arrays) - known)
    if extra:
        raise ArrayError(
            f"unexpected array `{extra[0]}`",
            field=f"arrays.{extra[0]}",
            hint=f"this job kind takes: {', '.join(sorted(known)) or 'no arrays'}",
        )
    dims: dict[str, int] = {}
    out: dict[str, np.ndarray] = {}
    for spec in contract.specs:
        fld = f"arrays.{spec.name}"
        if spec.name not in arrays:
            if spec.required:
                raise ArrayError(
                    f"missing array `{spec.name}`", field=fld, hint=f"expected shape {_shape_text(spec.shape)}"
                )
            continue
        a = arrays[spec.name]
        if a.dtype.name not in spec.dtypes:
            raise ArrayError(
                f"array `{spec.name}` has dtype {a.dtype.name}",
                field=fld,
                hint=f"send it as {' or '.join(spec.dtypes)}",
            )
        if a.ndim != len(spec.shape):
            raise ArrayError(
                f"array `{spec.name}` has shape {tuple(a.shape)}",
                field=fld,
                hint=f"expected shape {_shape_text(spec.shape)}",
            )
        for axis, (want, got) in enumerate(zip(spec.shape, a.shape)):
            if isinstance(want, int):
                if got != want:
                    raise ArrayError(
                        f"array `{spec.name}` has {got} on axis {axis}, expected {want}",
                        field=fld,
                        hint=f"expected shape {_shape_text(spec.shape)}",
                    )
                continue
            if want in dims and dims[want] != got:
                raise ArrayError(
                    f"array `{spec.name}` has {want}={got} but another array has {want}={dims[want]}",
                    field=fld,
                    hint="all arrays of a job must agree on their shared dimensions",
                )
            limit = contract.dims.get(want)
            if limit is not None:
                if not (limit.low <= got <= limit.high) or got % limit.multiple_of:
                    mult = f", a multiple of {limit.multiple_of}" if limit.multiple_of > 1 else ""
                    raise ArrayError(
                        f"array `{spec.name}` has {want}={got}",
                        field=fld,
                        hint=f"{want} must be between {limit.low} and {limit.high}{mult}",
                    )
            dims[want] = got
        if spec.finite and a.dtype.kind == "f" and not np.isfinite(a).all():
            bad = int((~np.isfinite(a)).sum())
            raise ArrayError(
                f"array `{spec.name}` has {bad} NaN or infinite values",
                field=fld,
                hint="use the documented background value instead of NaN/Inf",
            )
        out[spec.name] = a.astype(spec.cast_to, copy=False) if spec.cast_to else a
    return out


def _shape_text(shape: tuple[str | int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"

