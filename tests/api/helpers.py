"""Helpers for API tests: a depth map, a job's multipart fields, polling."""

from __future__ import annotations

import json
import time

import numpy as np
from fastapi.testclient import TestClient

from blender_addon.core.client import encode_arrays
from tests.harness import HANG_GUARD_S


def sphere_depth(size: int = 64, distance: float = 3.0, radius: float = 0.8) -> np.ndarray:
    """Planar depth of a sphere seen head-on (orthographic approximation), 0 on the background."""
    yy, xx = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    r2 = xx**2 + yy**2
    inside = r2 < radius**2
    return np.where(inside, distance - np.sqrt(np.clip(radius**2 - r2, 0, None)), 0.0).astype(np.float32)


def job_files(kind: str = "depth_image", params: dict | None = None, arrays: dict | None = None):
    params = {"prompt": "a red ball", "steps": 2} if params is None else params
    arrays = {"depth": sphere_depth()} if arrays is None else arrays
    files = {"request": (None, json.dumps({"kind": kind, "params": params}), "application/json")}
    if arrays is not False:
        files["arrays"] = ("arrays.npz", encode_arrays(arrays), "application/octet-stream")
    return files


def wait_for(client: TestClient, job_id: str, timeout: float = HANG_GUARD_S, states=("done", "failed", "cancelled")) -> dict:
    """Poll the job's state until it is one of `states`. The timeout only guards against a hang."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = client.get(f"/v1/jobs/{job_id}").json()
        if st["state"] in states:
            return st
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} did not reach {states} in {timeout} s: {st}")
