"""Schemathesis hooks for Concord: the one thing docs/openapi.json cannot say, said in code.

The `arrays` part of `POST /v1/jobs` is binary (an .npz), so a schema-driven fuzzer can only send random bytes
there, and the server rightly refuses them: JSON Schema cannot describe the members of a zip. These hooks fill
exactly that gap and nothing else:

- a strategy for the part's declared media type (`application/octet-stream`) that draws a real .npz holding a
  valid `depth` map (the `depth_image` contract in the part's description): sizes 32..64, multiples of 8, an
  object in front of a background of exact zeros;
- a filter that keeps only the *positive* (schema-valid) job requests of kind `depth_image`: the .npz must match
  the kind, and a `texture` request's valid arrays depend on rules between its parameters and its views
  (`reference_views` < number of views, `sync_start` <= `sync_end`, a grid that holds every view) that JSON
  Schema cannot state either. Negative requests of both kinds go through unfiltered.

Loaded by the schemathesis CLI through `SCHEMATHESIS_HOOKS=tests.api.schemathesis_hooks` (see
tests/api/test_openapi_conformance.py and bench/fuzz.py).
"""

from __future__ import annotations

import io

import numpy as np
import schemathesis
from hypothesis import strategies as st

ARRAYS_MEDIA_TYPE = "application/octet-stream"  # `encoding.arrays.contentType` in docs/openapi.json


@st.composite
def depth_npz(draw) -> bytes:
    h = draw(st.integers(4, 8)) * 8
    w = draw(st.integers(4, 8)) * 8
    radius = draw(st.floats(0.3, 0.9))
    distance = draw(st.floats(1.5, 10.0))
    yy, xx = np.mgrid[-1 : 1 : h * 1j, -1 : 1 : w * 1j]
    r2 = xx**2 + yy**2
    depth = np.where(r2 < radius**2, distance - np.sqrt(np.clip(radius**2 - r2, 0, None)), 0.0).astype(np.float32)
    buf = io.BytesIO()
    np.savez(buf, depth=depth)
    return buf.getvalue()


schemathesis.openapi.media_type(ARRAYS_MEDIA_TYPE, depth_npz())


@schemathesis.hook
def filter_case(context, case) -> bool:
    if case.method != "POST" or case.path != "/v1/jobs":
        return True
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return True
    body = case.body
    request = body.get("request") if isinstance(body, dict) else None
    return isinstance(request, dict) and request.get("kind") == "depth_image"
