"""Shared test set-up: offline hub, Blender's user folders in a temp dir, one tiny model per session."""

from __future__ import annotations

import os
import tempfile

import pytest

# Nothing in the suite may reach a model hub; Blender must not write into the user's home.
_TMP_HOME = tempfile.mkdtemp(prefix="concord-test-home-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = os.path.join(_TMP_HOME, "hf")
os.environ.setdefault("XDG_CACHE_HOME", os.path.join(_TMP_HOME, "cache"))
os.environ.setdefault("XDG_CONFIG_HOME", os.path.join(_TMP_HOME, "config"))
os.environ.setdefault("BLENDER_USER_RESOURCES", os.path.join(_TMP_HOME, "blender"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _bpy_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("bpy") is not None


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_bpy = pytest.mark.skip(reason="needs the bpy wheel (pip install bpy==5.0.1)")
    has_gpu, has_bpy = _cuda_available(), _bpy_available()
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
        if "blender" in item.keywords and not has_bpy:
            item.add_marker(skip_bpy)


@pytest.fixture(scope="session")
def tiny_model():
    """The `tiny` preset, loaded once (on the CPU) and shared: jobs never mutate the model."""
    from concord.models.registry import load_model

    return load_model("tiny", "cpu")


@pytest.fixture
def free_port() -> int:
    from concord.serve_process import free_port as pick

    return pick()
