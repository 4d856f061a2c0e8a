"""bench/stylize.py's pure helpers (no timing): its lazy frame source renders the same animation as the eager one,
chunk by chunk, and its step count for img2img is the one the sampler runs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from concord.micro.animation import spinning_frames
from concord.pipelines.sampler import sample

BENCH = Path(__file__).resolve().parents[2] / "bench" / "stylize.py"


@pytest.fixture(scope="module")
def bench():
    path = list(sys.path)  # the benchmark puts bench/ first on sys.path (where `coverage.py` etc. live): undo it
    try:
        spec = importlib.util.spec_from_file_location("concord_bench_stylize", BENCH)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = path
    return module


def test_lazy_source_reads_the_animation_chunk_by_chunk(bench):
    eager, prompt = spinning_frames(7, size=64)
    lazy = bench.SpinningSource(7, size=64)
    assert (len(lazy), lazy.height, lazy.width, lazy.prompt, lazy.motion_source) == (7, 64, 64, prompt, "renderer")
    chunks = [lazy.read(a, b) for a, b in ((0, 3), (3, 4), (4, 7))]
    assert all(valid is None for _, valid in chunks)
    for name in ("image", "depth", "motion"):
        np.testing.assert_array_equal(np.concatenate([getattr(fs, name) for fs, _ in chunks]), getattr(eager, name))
    for a, b in ((-1, 2), (5, 8), (3, 3)):
        with pytest.raises(IndexError):
            lazy.read(a, b)


@pytest.mark.parametrize("steps,strength", [(20, 0.7), (10, 0.7), (4, 0.1), (5, 1.0), (7, 0.5)])
def test_steps_run_is_what_the_sampler_runs(bench, steps, strength):
    calls = []

    def model_output(x, t):
        calls.append(t)
        return torch.zeros_like(x)

    init = torch.zeros(1, 4, 8, 8)
    sample(model_output, DDIMScheduler(), torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), steps,
           init=init, strength=strength)
    assert len(calls) == bench.steps_run(steps, strength)
