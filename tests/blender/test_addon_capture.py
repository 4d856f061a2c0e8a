"""The add-on's capture layer (Cycles passes of the EVALUATED mesh in a scratch scene) against ground truth.

1. A UV sphere (128 segments x 64 rings, smooth shaded, a Displace modifier growing it from 1.0 to 1.2)
   against the analytic sphere of radius 1.2: mask IoU >= 0.99; planar depth median relative error
   <= 1e-3 (facet sag of the tessellation is ~3e-4 of the radius); UVs, where Blender's UV sphere layout is
   ``u = atan2(y, x) / 2pi + 0.5``, ``v = asin(z / r) / pi + 0.5`` (checked on its vertices), median
   error <= 2e-3 away from the seam and the poles; normals median angle <= 0.5 deg. A big cube stands between
   the cameras and the sphere: the capture must not see it (only the selected object is rendered).
2. The glTF fixture BoxTextured.glb against the Blender-free renderer (concord.geometry.render.render_views)
   for the add-on's own Zero123++ rig: mask IoU >= 0.99 and median relative depth error <= 1e-3 per view.
3. The user's scene is exactly as before (datablocks, selection, active object and camera, render settings),
   and the UV map that is captured is the one asked for, not the render-active one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.blender

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "meshes"
SIZE = 96


def _sphere(bpy, center=(0.3, -0.2, 0.5)):
    bpy.ops.mesh.primitive_uv_sphere_add(segments=128, ring_count=64, radius=1.0, location=center)
    ob = bpy.context.active_object
    bpy.ops.object.shade_smooth()
    mod = ob.modifiers.new("Grow", "DISPLACE")  # no texture: every vertex moves strength * (1 - 0.5) outwards
    mod.strength = 0.4
    return ob


def _analytic_sphere(K, w2c, W, H, c, R):
    """Planar depth, mask, world points of rays through pixel centres hitting the sphere (c, R)."""
    Tinv = np.linalg.inv(w2c)
    o = Tinv[:3, 3]
    cols, rows = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    pix = np.stack([cols, rows, np.ones_like(cols)], -1).reshape(-1, 3)
    d = (pix @ np.linalg.inv(K).T) @ Tinv[:3, :3].T  # unit camera z: t is planar depth
    oc = o - c
    a = (d * d).sum(1)
    b = 2 * (d @ oc)
    disc = b * b - 4 * a * (oc @ oc - R * R)
    hit = disc > 0
    t = np.where(hit, (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a), 0.0)
    p = o + t[:, None] * d
    return t.reshape(H, W), hit.reshape(H, W), p.reshape(H, W, 3)


def test_uv_sphere_matches_analytic(addon, bpy_module, snapshot):
    bpy = bpy_module
    from blender_addon import capture
    from blender_addon.core import rigs

    bpy.ops.mesh.primitive_cube_add(size=3.0, location=(0.0, -4.0, 0.5))  # between the front cameras and the sphere
    ob = _sphere(bpy)
    ob.select_set(True)
    before = snapshot()
    c, r = capture.world_bounding_sphere(ob)
    assert r == pytest.approx(1.2, rel=1e-3), "the capture must see the evaluated mesh (modifiers applied)"
    np.testing.assert_allclose(c, (0.3, -0.2, 0.5), atol=1e-3)
    cams = rigs.zero123pp(c, r, SIZE, SIZE) + rigs.orbit(2, c, r, SIZE, SIZE, elevation_deg=60.0)
    arrays = capture.capture_object(ob, ob.data.uv_layers[0].name, cams, SIZE, SIZE)
    assert snapshot() == before

    R, center = 1.2, np.array([0.3, -0.2, 0.5])
    for k, cam in enumerate(cams):
        depth, mask, p = _analytic_sphere(cam.K, cam.world_to_camera, SIZE, SIZE, center, R)
        m = arrays["mask"][k]
        iou = (m & mask).sum() / (m | mask).sum()
        assert iou >= 0.99, (k, iou)
        both = m & mask
        rel = np.abs(arrays["depth"][k][both] - depth[both]) / depth[both]
        assert np.median(rel) <= 1e-3, (k, np.median(rel))
        q = (p - center) / R
        u = np.arctan2(q[..., 1], q[..., 0]) / (2 * np.pi) + 0.5
        v = np.arcsin(np.clip(q[..., 2], -1, 1)) / np.pi + 0.5
        good = both & (u > 0.02) & (u < 0.98) & (np.abs(q[..., 2]) < 0.95)
        du = np.abs(arrays["uv"][k][..., 0][good] - u[good])
        dv = np.abs(arrays["uv"][k][..., 1][good] - v[good])
        assert np.median(du) <= 2e-3 and np.median(dv) <= 2e-3, (k, np.median(du), np.median(dv))
        cos = (arrays["normal"][k][both] * q[both]).sum(-1)
        angle = np.degrees(np.arccos(np.clip(cos, -1, 1)))
        assert np.median(angle) <= 0.5, (k, np.median(angle))


def test_box_fixture_matches_blender_free_renderer(addon, bpy_module):
    bpy = bpy_module
    from blender_addon import capture
    from blender_addon.core import rigs
    from concord.geometry.mesh import load_mesh
    from concord.geometry.render import render_views

    path = FIXTURES / "boxtextured" / "BoxTextured.glb"
    bpy.ops.import_scene.gltf(filepath=str(path))
    ob = next(o for o in bpy.context.scene.objects if o.type == "MESH")
    c, r = capture.world_bounding_sphere(ob)
    cams = rigs.zero123pp(c, r, SIZE, SIZE)
    arrays = capture.capture_object(ob, ob.data.uv_layers[0].name, cams, SIZE, SIZE)

    mesh = load_mesh(path)
    B = np.asarray(mesh.blender_from_file, dtype=np.float64)
    ours = render_views(mesh, [(cam.K, cam.world_to_camera @ B) for cam in cams], SIZE, SIZE)
    for k in range(len(cams)):
        m_b, m_r = arrays["mask"][k], ours.mask[k]
        iou = (m_b & m_r).sum() / (m_b | m_r).sum()
        both = m_b & m_r
        rel = np.abs(arrays["depth"][k][both] - ours.depth[k][both]) / ours.depth[k][both]
        uv_err = np.abs(arrays["uv"][k][both] - ours.uv[k][both]).max(-1)
        print(f"view {k}: IoU {iou:.4f}, depth rel median {np.median(rel):.2e}, uv median {np.median(uv_err):.2e}")
        assert iou >= 0.99
        assert np.median(rel) <= 1e-3
        assert np.median(uv_err) <= 1e-3


def test_capture_uses_chosen_uv_map_and_leaves_scene_alone(addon, bpy_module, snapshot):
    bpy = bpy_module
    from blender_addon import capture
    from blender_addon.core import rigs

    bpy.ops.object.camera_add(location=(0, -8, 1))
    user_cam = bpy.context.active_object
    scene = bpy.context.scene
    scene.camera = user_cam
    scene.render.engine = "BLENDER_EEVEE" if "BLENDER_EEVEE" in {e.identifier for e in scene.render.bl_rna.properties["engine"].enum_items} else "BLENDER_WORKBENCH"
    scene.render.resolution_x, scene.render.resolution_y = 1234, 567
    scene.render.filepath = "//my_render_"
    ob = _sphere(bpy)
    me = ob.data
    flipped = me.uv_layers.new(name="Flipped")
    n = len(me.loops)
    uv = np.empty(2 * n, np.float32)
    me.uv_layers[0].data.foreach_get("uv", uv)
    uv = uv.reshape(-1, 2)
    uv[:, 0] = 1.0 - uv[:, 0]
    flipped.data.foreach_set("uv", uv.ravel())
    me.uv_layers[0].active_render = True  # the render-active map is NOT the one we ask for
    bpy.ops.object.select_all(action="DESELECT")
    user_cam.select_set(True)
    before = snapshot()

    c, r = capture.world_bounding_sphere(ob)
    cams = rigs.zero123pp(c, r, 64, 64)[:2]
    a = capture.capture_object(ob, me.uv_layers[0].name, cams, 64, 64)
    b = capture.capture_object(ob, "Flipped", cams, 64, 64)
    assert snapshot() == before
    m = a["mask"] & b["mask"]
    away = m & (a["uv"][..., 0] > 0.05) & (a["uv"][..., 0] < 0.95)
    np.testing.assert_allclose(b["uv"][..., 0][away], 1.0 - a["uv"][..., 0][away], atol=1e-4)
    with pytest.raises(capture.CaptureError, match="no UV map"):
        capture.capture_object(ob, "Missing", cams, 64, 64)
    assert snapshot() == before
