"""Property: no malformed request gets anything but a 4xx `{error, field, hint}`, and the server keeps serving.

Hypothesis builds requests that are wrong by construction, in every way a client can be wrong: not multipart,
broken JSON, JSON of the wrong shape, unknown kinds, bad parameters, unreadable or hostile .npz files, arrays of
the wrong name, dtype, shape, size or values. Each goes to the real app; after each, /v1/health must answer.
"""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blender_addon.core.client import encode_arrays
from concord.api.app import ServerSettings, create_app
from tests.api.helpers import sphere_depth

VALID_PARAMS = {"prompt": "a red ball", "steps": 2}


@pytest.fixture(scope="module")
def app_client(tiny_model, tmp_path_factory):
    app = create_app(ServerSettings(data_dir=tmp_path_factory.mktemp("fuzz"), max_upload_mb=4), model=tiny_model)
    with TestClient(app) as c:
        yield c


def multipart(request_text: str | None, arrays_bytes: bytes | None, extra: dict | None = None) -> dict:
    files = {}
    if request_text is not None:
        files["request"] = (None, request_text, "application/json")
    if arrays_bytes is not None:
        files["arrays"] = ("arrays.npz", arrays_bytes, "application/octet-stream")
    files.update(extra or {})
    return files


_VALID = object()


def req(params=_VALID, kind="depth_image") -> str:
    return json.dumps({"kind": kind, "params": VALID_PARAMS if params is _VALID else params})


def good_depth() -> np.ndarray:
    return sphere_depth(64)


# --- each strategy yields (description, kwargs for client.post) that must be refused --------------------------

not_multipart = st.tuples(
    st.binary(max_size=300),
    st.sampled_from(["application/json", "text/plain", "application/octet-stream", "application/x-www-form-urlencoded", ""]),
).map(lambda t: ("not multipart", {"content": t[0], "headers": {"Content-Type": t[1]} if t[1] else {}}))

broken_multipart = st.binary(max_size=300).map(
    lambda b: ("broken multipart", {"content": b"--b\r\n" + b, "headers": {"Content-Type": "multipart/form-data; boundary=b"}})
)


def _not_json(s: str) -> bool:
    try:
        json.loads(s)
    except ValueError:
        return True
    return False


bad_json = st.text(max_size=200).filter(_not_json).map(
    lambda s: ("bad json", {"files": multipart(s, encode_arrays({"depth": good_depth()}))})
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)

wrong_shape_json = json_values.filter(
    lambda v: not (isinstance(v, dict) and v.get("kind") == "depth_image")
).map(lambda v: ("wrong json shape", {"files": multipart(json.dumps(v), encode_arrays({"depth": good_depth()}))}))

unknown_kind = st.text(max_size=30).filter(lambda k: k != "depth_image").map(
    lambda k: ("unknown kind", {"files": multipart(req(kind=k), encode_arrays({"depth": good_depth()}))})
)

_bad_param_values = {
    "prompt": st.one_of(st.none(), st.integers(), st.lists(st.text(max_size=3), max_size=2), st.text(min_size=2001, max_size=2100)),
    "steps": st.one_of(st.integers(max_value=0), st.integers(min_value=201), st.text(max_size=5).filter(lambda s: not s.strip().isdigit()), st.floats(allow_nan=True).filter(lambda f: f != int(f) if f == f and abs(f) < 1e300 else True)),
    "guidance": st.one_of(st.floats(max_value=-0.001), st.floats(min_value=50.001, allow_infinity=True), st.text(max_size=3).filter(lambda s: not _is_number(s))),
    "seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=2**32)),
    "conditioning_scale": st.one_of(st.floats(min_value=4.001, allow_infinity=True), st.floats(max_value=-0.001)),
}


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


@st.composite
def bad_params(draw):
    choice = draw(st.sampled_from(["missing_prompt", "extra_key", "not_object", *_bad_param_values]))
    params = dict(VALID_PARAMS)
    if choice == "missing_prompt":
        del params["prompt"]
    elif choice == "extra_key":
        key = draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in ("prompt", "negative_prompt", "seed", "steps", "guidance", "conditioning_scale")))
        params[key] = draw(json_values)
    elif choice == "not_object":
        params = draw(st.one_of(st.lists(st.integers(), max_size=3), st.text(max_size=5), st.integers(), st.none()))
    else:
        params[choice] = draw(_bad_param_values[choice])
    return (f"bad params: {choice}", {"files": multipart(req(params), encode_arrays({"depth": good_depth()}))})


@st.composite
def bad_arrays(draw):
    choice = draw(
        st.sampled_from(
            ["none", "not_zip", "truncated", "wrong_dtype", "wrong_ndim", "bad_size", "nonfinite", "extra", "renamed",
             "empty_view", "negative", "pickle", "not_npy_member", "arrays_as_text", "extra_part"]
        )
    )
    depth = good_depth()
    if choice == "none":
        return (choice, {"files": multipart(req(), None)})
    if choice == "not_zip":
        return (choice, {"files": multipart(req(), draw(st.binary(min_size=1, max_size=200)).replace(b"PK", b"XX"))})
    if choice == "truncated":
        blob = encode_arrays({"depth": depth})
        cut = draw(st.integers(1, len(blob) - 1))
        return (choice, {"files": multipart(req(), blob[:cut])})
    if choice == "wrong_dtype":
        dt = draw(st.sampled_from([np.int32, np.int64, np.uint8, np.bool_, np.complex64]))
        return (choice, {"files": multipart(req(), encode_arrays({"depth": depth.astype(dt)}))})
    if choice == "wrong_ndim":
        shape = draw(st.sampled_from([(64,), (64, 64, 1), (1, 64, 64), (2, 64, 64, 1), ()]))
        return (choice, {"files": multipart(req(), encode_arrays({"depth": np.ones(shape, np.float32)}))})
    if choice == "bad_size":
        h = draw(st.one_of(st.integers(1, 31), st.integers(33, 200).filter(lambda v: v % 8)))
        w = draw(st.integers(32, 128))
        return (choice, {"files": multipart(req(), encode_arrays({"depth": np.ones((h, w), np.float32)}))})
    if choice == "nonfinite":
        bad = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        y, x = draw(st.integers(0, 63)), draw(st.integers(0, 63))
        depth[y, x] = bad
        return (choice, {"files": multipart(req(), encode_arrays({"depth": depth}))})
    if choice == "extra":
        name = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10).filter(lambda s: s != "depth"))
        return (choice, {"files": multipart(req(), encode_arrays({"depth": depth, name: np.zeros(3, np.float32)}))})
    if choice == "renamed":
        name = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=10).filter(lambda s: s != "depth"))
        return (choice, {"files": multipart(req(), encode_arrays({name: depth}))})
    if choice == "empty_view":
        return (choice, {"files": multipart(req(), encode_arrays({"depth": np.zeros((64, 64), np.float32)}))})
    if choice == "negative":
        depth[draw(st.integers(0, 63)), draw(st.integers(0, 63))] = -draw(st.floats(0.001, 100))
        return (choice, {"files": multipart(req(), encode_arrays({"depth": depth}))})
    if choice == "pickle":
        buf = io.BytesIO()
        np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        zbuf = io.BytesIO()
        with zipfile.ZipFile(zbuf, "w") as zf:
            zf.writestr("depth.npy", buf.getvalue())
        return (choice, {"files": multipart(req(), zbuf.getvalue())})
    if choice == "not_npy_member":
        zbuf = io.BytesIO()
        with zipfile.ZipFile(zbuf, "w") as zf:
            zf.writestr(draw(st.sampled_from(["depth.txt", "x", "depth.npy.bak"])), draw(st.binary(max_size=50)))
        return (choice, {"files": multipart(req(), zbuf.getvalue())})
    if choice == "arrays_as_text":
        return (choice, {"files": {"request": (None, req(), "application/json"), "arrays": (None, "not a file")}})
    name = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8).filter(lambda s: s not in ("request", "arrays")))
    return (choice, {"files": multipart(req(), encode_arrays({"depth": depth}), extra={name: (None, "x")})})


zip_bomb = st.just(None).map(lambda _: ("zip bomb", {"files": multipart(req(), _zip_bomb())}))


def _zip_bomb() -> bytes:
    buf = io.BytesIO()
    big = np.zeros((4096, 4096), np.float32)  # 64 MiB of zeros, compresses to ~60 KiB
    np.savez_compressed(buf, depth=big)
    return buf.getvalue()


malformed = st.one_of(
    not_multipart, broken_multipart, bad_json, wrong_shape_json, unknown_kind, bad_params(), bad_arrays(), zip_bomb
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=malformed)
def test_malformed_requests_get_a_4xx_and_the_server_keeps_serving(app_client, case):
    what, kwargs = case
    r = app_client.post("/v1/jobs", **kwargs)
    assert 400 <= r.status_code < 500, (what, r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"error", "field", "hint"}, (what, body)
    assert body["error"], what
    assert app_client.get("/v1/health").status_code == 200


def test_a_valid_request_still_passes_after_the_storm(app_client):
    """The fuzz cases above are malformed by construction; this control proves the route accepts a good one."""
    r = app_client.post("/v1/jobs", files=multipart(req(), encode_arrays({"depth": good_depth()})))
    assert r.status_code == 202, r.text
