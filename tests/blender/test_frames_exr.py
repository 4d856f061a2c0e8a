"""concord.frames.io on OpenEXR frames rendered by Blender itself (the bpy wheel, Cycles on the CPU).

A 16 px cube (emission only) moves by a known number of pixels per frame in front of an orthographic camera
(0.1 scene units per pixel, 64x48 px; the scene: tests/blender/moving_cube.py). Blender writes the animation as multilayer EXR through its own render
output, exactly as a user would (Output Properties > File Format "OpenEXR MultiLayer", Render Animation), and
FrameFolder must recover the image, the planar depth and the motion in the FrameSet contract's conventions
(rows top-down, motion = previous - current with y down).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from concord.frames.frameset import FrameSetError
from concord.frames.io import FrameFolder, _exr_header, _oiio

from moving_cube import CAMERA_Z, CUBE, EMISSION, FRAMES, STEP, UNITS_PER_PX, add_moving_cube, cube_rect

pytestmark = pytest.mark.blender

W, H = 64, 48  # the camera's ortho scale covers the 64 px width


def render_moving_cube(bpy, out: Path, *, vector: bool = True, depth: bool = True) -> Path:
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    r = scene.render
    r.resolution_x, r.resolution_y, r.resolution_percentage = W, H, 100
    r.use_motion_blur = False  # Blender writes no Vector pass with motion blur on
    add_moving_cube(bpy, W)  # Cycles at one sample, the camera, the keyed cube, frames 1..4
    scene.cycles.filter_width = 0.01  # one ray through each pixel's centre
    layer = scene.view_layers[0]
    layer.use_pass_z = depth
    layer.use_pass_vector = vector
    settings = r.image_settings
    if hasattr(settings, "media_type"):  # Blender 5.0+: before file_format
        settings.media_type = "MULTI_LAYER_IMAGE"
    settings.file_format = "OPEN_EXR_MULTILAYER"
    out.mkdir(parents=True, exist_ok=True)
    r.filepath = str(out / "frame_")
    bpy.ops.render.render(animation=True)
    return out


@pytest.fixture(scope="module")
def rendered(bpy_module, tmp_path_factory):
    root = tmp_path_factory.mktemp("exr")
    return {
        "full": render_moving_cube(bpy_module, root / "full"),
        "no_vector": render_moving_cube(bpy_module, root / "no_vector", vector=False),
        "no_depth": render_moving_cube(bpy_module, root / "no_depth", depth=False),
    }


def test_blender_writes_the_channels_the_reader_expects(rendered):
    names = list(_exr_header(rendered["full"] / "frame_0001.exr").channels)
    assert names == [
        "ViewLayer.Combined.R", "ViewLayer.Combined.G", "ViewLayer.Combined.B", "ViewLayer.Combined.A",
        "ViewLayer.Depth.Z",
        "ViewLayer.Vector.X", "ViewLayer.Vector.Y", "ViewLayer.Vector.Z", "ViewLayer.Vector.W",
    ]


def test_exr_frames_give_image_depth_and_motion_in_the_contracts_conventions(rendered):
    folder = FrameFolder(rendered["full"], allow_flow=False)
    assert (len(folder), folder.height, folder.width) == (FRAMES[1] - FRAMES[0] + 1, H, W)
    assert (folder.motion_source, folder.layer, folder.has_depth) == ("renderer", "ViewLayer", True)
    fs, valid = folder.read(0, len(folder))
    assert valid is None and fs.image.dtype == np.uint8
    # Combined holds the linear emission; the frames hold it sRGB-encoded (IEC 61966-2-1), written out here
    colour = np.rint([(1.055 * v ** (1 / 2.4) - 0.055) * 255 for v in EMISSION])  # [188, 124, 63]
    # per frame in pixels, contract convention: the cube moves 2 px right and 1 px up, so it was 2 px left
    # (dx = -2) and 1 px lower (dy = +1, y down) in the previous frame
    expected_motion = (-STEP[0] / UNITS_PER_PX, STEP[1] / UNITS_PER_PX)
    for k in range(len(folder)):
        rect = cube_rect(FRAMES[0] + k, W, H)
        on_cube = np.zeros((H, W), bool)
        on_cube[rect] = True
        np.testing.assert_array_equal(fs.depth[k] > 0, on_cube)  # rows top-down: the same rectangle
        np.testing.assert_allclose(fs.depth[k][on_cube], CAMERA_Z - CUBE / 2, rtol=1e-5)  # planar z of the top face
        assert np.abs(fs.image[k][on_cube].astype(int) - colour).max() <= 1
        assert not fs.image[k][~on_cube].any()
        np.testing.assert_allclose(fs.motion[k][on_cube], np.broadcast_to(expected_motion, (on_cube.sum(), 2)),
                                   atol=0.25)
        np.testing.assert_array_equal(fs.motion[k][~on_cube], 0.0)
    chunk, _ = folder.read(2, 4)
    np.testing.assert_array_equal(chunk.motion, fs.motion[2:])
    np.testing.assert_array_equal(chunk.depth, fs.depth[2:])


def test_exr_without_vector_pass_needs_optical_flow(rendered):
    with pytest.raises(FrameSetError) as err:
        FrameFolder(rendered["no_vector"], allow_flow=False)
    assert err.value.field == "motion" and "Vector" in err.value.hint
    folder = FrameFolder(rendered["no_vector"])
    assert folder.motion_source == "optical_flow:dis" and folder.has_depth
    fs, valid = folder.read(1, 3)
    assert valid.shape == (2, H, W) and fs.depth is not None


def test_exr_without_depth_pass_gives_no_depth(rendered):
    folder = FrameFolder(rendered["no_depth"], allow_flow=False)
    assert not folder.has_depth and folder.motion_source == "renderer"
    fs, _ = folder.read(0, 2)
    assert fs.depth is None and fs.motion is not None


def _write_exr(path: Path, channels: dict[str, np.ndarray]) -> None:
    oiio = _oiio()
    h, w = next(iter(channels.values())).shape
    spec = oiio.ImageSpec(w, h, len(channels), "float")
    spec.channelnames = tuple(channels)
    out = oiio.ImageOutput.create(str(path))
    assert out.open(str(path), spec)
    assert out.write_image(np.stack(list(channels.values()), -1).astype(np.float32))
    out.close()


def test_malformed_exr_folders_name_the_field(bpy_module, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "frame_0001.exr").write_bytes(b"not an OpenEXR file")
    with pytest.raises(FrameSetError) as err:
        FrameFolder(bad)
    assert err.value.field == "image" and "frame_0001.exr" in str(err.value)

    no_combined = tmp_path / "no_combined"
    no_combined.mkdir()
    _write_exr(no_combined / "f_1.exr", {"ViewLayer.Depth.Z": np.ones((20, 20), np.float32)})
    with pytest.raises(FrameSetError) as err:
        FrameFolder(no_combined)
    assert err.value.field == "image" and "no Combined pass" in str(err.value)


def test_depth_folder_of_exr_maps(bpy_module, tmp_path):
    from PIL import Image

    frames, depths = tmp_path / "frames", tmp_path / "depth"
    frames.mkdir()
    depths.mkdir()
    z = np.random.default_rng(1).uniform(1, 9, (2, 20, 24)).astype(np.float32)
    z[:, 0, 0] = 1e10
    for k in range(2):
        Image.fromarray(np.full((20, 24, 3), 50 * k, np.uint8)).save(frames / f"f_{k}.png")
    _write_exr(depths / "z_0.exr", {"Z": z[0]})  # a channel named Z
    _write_exr(depths / "z_1.exr", {"V": z[1]})  # the only channel
    fs, _ = FrameFolder(frames, depth_dir=depths).read(0, 2)
    expected = z.copy()
    expected[:, 0, 0] = 0.0
    np.testing.assert_array_equal(fs.depth, expected)
