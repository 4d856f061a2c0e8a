"""ViewSet packing (blender_addon/core/packing.py) produces arrays the server's ViewSet accepts, and the
texture job's params validate against the server's TextureParams; result folders are named as documented."""

from __future__ import annotations


import numpy as np
import pytest

from blender_addon.core import packing, results, rigs
from concord.api.schemas import TextureParams
from concord.geometry.mesh import icosphere_with_uv
from concord.geometry.render import render_views
from concord.geometry.viewset import ViewSet


def _views():
    mesh = icosphere_with_uv(3)
    c, r = mesh.bounding_sphere()
    cams = rigs.zero123pp(c, r, 64, 48)
    vs = render_views(mesh, [(cam.K, cam.world_to_camera) for cam in cams], 64, 48)
    views = []
    for k in range(vs.num_views):
        depth = np.where(vs.mask[k], vs.depth[k], 1e10)  # Blender's background depth
        views.append({"depth": depth, "mask": vs.mask[k], "uv": vs.uv[k], "normal": vs.normal[k] * 1.001})
    return views, cams, vs


def test_pack_viewset_passes_server_validation():
    views, cams, vs = _views()
    arrays = packing.pack_viewset(views, cams)
    out = ViewSet.from_arrays(arrays)  # the server's own contract check
    np.testing.assert_array_equal(out.mask, vs.mask)
    np.testing.assert_allclose(out.depth, vs.depth, rtol=1e-6)
    assert out.depth[~out.mask].max() == 0.0
    assert arrays["intrinsics"].dtype == np.float32 and arrays["world_to_camera"].shape == (6, 4, 4)


def test_pack_viewset_errors():
    views, cams, _ = _views()
    with pytest.raises(packing.PackingError, match="6 views but 5 cameras"):
        packing.pack_viewset(views, cams[:5])
    empty = dict(views[2], mask=np.zeros_like(views[2]["mask"]))
    with pytest.raises(packing.PackingError, match="view 2 does not see the object"):
        packing.pack_viewset(views[:2] + [empty] + views[3:], cams)
    small = {k: v[:8] for k, v in views[1].items()}
    with pytest.raises(packing.PackingError, match="views must share a size"):
        packing.pack_viewset([views[0], small], cams[:2])
    with pytest.raises(packing.PackingError, match="no views"):
        packing.pack_viewset([], [])


def test_texture_params_validate_on_server_schema():
    p = packing.texture_params(
        "  mossy stone ", negative_prompt="blurry", seed=7, steps=3, guidance=5.0, texture_size=512,
        grid=True, shared_attention="reference", uv_sync=False, uv_noise=False, cos_power=2.0, padding=3,
    )
    model = TextureParams.model_validate(p)
    assert model.prompt == "mossy stone" and model.consistency.grid and model.consistency.shared_attention == "reference"
    assert model.bake.padding == 3
    assert set(p) <= set(TextureParams.model_fields)
    with pytest.raises(packing.PackingError, match="write a prompt"):
        packing.texture_params("   ")
    with pytest.raises(packing.PackingError, match="shared attention"):
        packing.texture_params("x", shared_attention="some")


def test_texture_params_correspondence_strength():
    """Left out by default (the server then uses its model's); sent when set; refused outside the server's bounds,
    which the add-on's constant mirrors."""
    field = TextureParams.model_fields["consistency"].annotation.model_fields["attention_correspondence"]
    bounds = {type(m).__name__: m for m in field.metadata}
    assert bounds["Ge"].ge == 0.0 and bounds["Le"].le == packing.MAX_ATTENTION_CORRESPONDENCE
    p = packing.texture_params("x")
    assert "attention_correspondence" not in p["consistency"]
    assert TextureParams.model_validate(p).consistency.attention_correspondence is None
    p = packing.texture_params("x", attention_correspondence=6.5)
    assert TextureParams.model_validate(p).consistency.attention_correspondence == 6.5
    p = packing.texture_params("x", attention_correspondence=packing.MAX_ATTENTION_CORRESPONDENCE)
    assert TextureParams.model_validate(p).consistency.attention_correspondence == packing.MAX_ATTENTION_CORRESPONDENCE
    for bad in (-0.5, packing.MAX_ATTENTION_CORRESPONDENCE + 1, float("nan")):
        with pytest.raises(packing.PackingError, match="correspondence strength"):
            packing.texture_params("x", attention_correspondence=bad)


def test_result_folder(tmp_path):
    blend = tmp_path / "proj" / "scene.blend"
    blend.parent.mkdir()
    t = 1_700_000_000.0
    p = results.result_folder(str(blend), "Cube.001 / big", now=t)
    assert p.parent == blend.parent / "concord" and p.name.startswith("Cube.001_big_")
    assert p.is_dir() and not any(p.iterdir()), "the folder is reserved (made, empty) at once"
    # another job (or another Blender session) in the same second never gets the same folder
    p2 = results.result_folder(str(blend), "Cube.001 / big", now=t)
    assert p2 != p and p2.name.startswith(p.name + "-") and p2.is_dir()
    (p2 / "texture.png").write_bytes(b"png")
    results.discard_if_empty(p)  # a run that gave nothing leaves nothing
    results.discard_if_empty(p2)  # a run with results keeps them
    assert not p.exists() and (p2 / "texture.png").is_file()
    q = results.result_folder("", "Cube", now=t, temp_root=str(tmp_path))
    assert q.parent == tmp_path / "concord"
    assert results.read_metrics(tmp_path) == {}
