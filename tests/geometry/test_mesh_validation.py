"""Mesh loading and validation (concord.geometry.mesh): every malformed fixture gives a MeshError that names
its problem (never a raw trimesh traceback), good fixtures load, unwrapping is guarded."""

from pathlib import Path

import numpy as np
import pytest

from concord.geometry import mesh as mesh_mod
from concord.geometry.mesh import Mesh, MeshError, icosphere_with_uv, load_mesh

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
BAD = FIXTURES / "bad"

# (file under tests/fixtures/bad, fragment the message must contain). The fragment is the problem the
# Khronos validator's report (or the file's name) describes; files with no usable mesh say "no geometry".
MALFORMED = [
    ("assimp/BoxBadNormals-glTF-Binary/BoxBadNormals.glb", "no UV coordinates"),  # normals fixed, UVs absent
    ("assimp/BoxWithInfinites-glTF-Binary/BoxWithInfinites.glb", "non-finite coordinates"),
    ("assimp/IncorrectVertexArrays/Cube.gltf", "does not fit its buffer"),
    ("assimp/IndexOutOfRange/AllIndicesOutOfRange.gltf", "12 of 12 faces use vertex indices out of range"),
    ("assimp/IndexOutOfRange/IndexOutOfRange.gltf", "1 of 12 faces use vertex indices out of range"),
    ("assimp/MissingBin/BoxTextured.gltf", "missing: BoxTextured0.bin"),
    ("trimesh/joined_tetrahedra.obj", "no UV coordinates"),
    ("trimesh/rabbit.obj", "no UV coordinates"),
    ("validator/glb/bom.glb", "byte-order mark"),
    ("validator/glb/chunk_too_big.glb", "too small"),
    ("validator/glb/empty_file.glb", "empty"),
    ("validator/glb/empty_json_chunk.glb", "JSON chunk is empty"),
    ("validator/glb/empty_json_object.glb", "missing 'asset'"),
    ("validator/glb/extra_data.glb", "no geometry"),
    ("validator/glb/invalid_json_chunk.glb", "invalid glTF JSON"),
    ("validator/glb/invalid_magic.glb", "not a GLB file"),
    ("validator/glb/invalid_version.glb", "unsupported GLB version"),
    ("validator/glb/json_and_two_buffers.glb", "duplicate"),
    ("validator/glb/length_mismatch.glb", "truncated GLB"),
    ("validator/glb/misplaced_bin_chunk.glb", "BIN chunk must be the second"),
    ("validator/glb/no_header.glb", "truncated GLB"),
    ("validator/glb/only_bin_chunk.glb", "first GLB chunk must be JSON"),
    ("validator/glb/only_header.glb", "too small"),
    ("validator/glb/truncated_chunk_data.glb", "truncated GLB"),
    ("validator/glb/truncated_chunk_header.glb", "too small"),
    ("validator/glb/two_bin_chunks.glb", "first GLB chunk must be JSON"),
    ("validator/glb/two_empty_bin_chunks.glb", "first GLB chunk must be JSON"),
    ("validator/glb/two_empty_json_chunks.glb", "duplicate"),
    ("validator/glb/two_images.glb", "no geometry"),
    ("validator/glb/two_valid_json_chunks.glb", "duplicate"),
    ("validator/glb/unaligned_chunk.glb", "no geometry"),
    ("validator/glb/unknown_chunk.glb", "first GLB chunk must be JSON"),
    ("validator/glb/valid.glb", "no geometry"),  # a valid file without a mesh
    ("validator/glb/valid_buffer.glb", "no geometry"),
    ("validator/glb/zero_chunk_header.glb", "first GLB chunk must be JSON"),
    ("validator/glb/zero_length.glb", "too small"),
    ("validator/json/bom.gltf", "byte-order mark"),
    ("validator/json/empty_file.gltf", "empty"),
    ("validator/json/integer_written_as_float.gltf", "invalid glTF"),
    ("validator/json/invalid_object.gltf", "JSON root must be an object"),
    ("validator/json/invalid_syntax.gltf", "invalid glTF JSON"),
    ("validator/mesh_data/colors_non_clamped.gltf", "degenerate"),
    ("validator/mesh_data/index_buffer_degenerate_triangle.gltf", "all 3 faces are degenerate"),
    ("validator/mesh_data/index_buffer_oob.gltf", "out of range"),
    ("validator/mesh_data/index_buffer_primitive_restart.gltf", "degenerate"),
    ("validator/mesh_data/joints_no_weights.gltf", "does not fit its buffer"),
    ("validator/mesh_data/joints_weights_complex.gltf", "no geometry"),
    ("validator/mesh_data/normals_tangents_non_unit_invalid_sign.gltf", "degenerate"),
]


def test_every_bad_fixture_is_listed():
    on_disk = {
        str(p.relative_to(BAD))
        for p in BAD.rglob("*")
        if p.suffix.lower() in {".glb", ".gltf", ".obj"}
    }
    assert on_disk == {f for f, _ in MALFORMED}


@pytest.mark.parametrize("name, fragment", MALFORMED, ids=[f for f, _ in MALFORMED])
def test_malformed_file_gives_mesh_error(name, fragment):
    with pytest.raises(MeshError) as info:
        load_mesh(BAD / name)
    err = info.value
    assert isinstance(err, ValueError)
    assert fragment in err.message, err.message
    assert str(BAD / name) in err.message  # names the file
    assert err.__cause__ is None or isinstance(err.__cause__, MeshError)  # no chained trimesh traceback


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(MeshError, match="file not found"):
        load_mesh(tmp_path / "nope.glb")
    with pytest.raises(MeshError, match="folder"):
        load_mesh(tmp_path)
    (tmp_path / "x.xyz123").write_text("hello")
    with pytest.raises(MeshError, match="unsupported file type"):
        load_mesh(tmp_path / "x.xyz123")
    (tmp_path / "garbage.glb").write_bytes(b"\x00" * 100)
    with pytest.raises(MeshError, match="not a GLB"):
        load_mesh(tmp_path / "garbage.glb")


@pytest.mark.parametrize(
    "name, faces, verts",
    [("meshes/boxtextured/BoxTextured.glb", 12, 24), ("meshes/barrel/barrel.glb", 1148, 856)],
)
def test_good_fixtures_load(name, faces, verts):
    m = load_mesh(FIXTURES / name)
    assert m.faces.shape == (faces, 3) and m.vertices.shape == (verts, 3)
    assert m.faces.dtype == np.int64 and m.vertices.dtype == np.float64
    assert m.uv.shape == (verts, 2) and np.isfinite(m.uv).all()
    np.testing.assert_allclose(np.linalg.norm(m.normals, axis=1), 1.0, atol=1e-6)
    assert m.texture is not None and m.texture_rgb().shape[2] == 3
    assert m.up == (0.0, 1.0, 0.0) and m.front == (0.0, 0.0, 1.0)  # glTF: file coordinates kept
    assert m.warnings == []
    c, r = m.bounding_sphere()
    assert np.all(np.linalg.norm(m.vertices - c, axis=1) <= r + 1e-12)


def test_box_node_transform_applied():
    # BoxTextured's node rotates the mesh by -90 deg about X (a Z-up export); the loaded box is the rotated one
    m = load_mesh(FIXTURES / "meshes/boxtextured/BoxTextured.glb")
    np.testing.assert_allclose(m.vertices.min(0), [-0.5, -0.5, -0.5], atol=1e-6)
    # normals rotate with the geometry: each vertex normal is parallel to its face normals
    fn = m.face_normals()
    for k in range(3):
        np.testing.assert_allclose(np.abs((m.normals[m.faces[:, k]] * fn).sum(1)), 1.0, atol=1e-6)


def test_bad_normals_are_recomputed_when_unwrapped():
    m = load_mesh(BAD / "assimp/BoxBadNormals-glTF-Binary/BoxBadNormals.glb", unwrap=True)
    assert any("normals" in w for w in m.warnings) and any("xatlas" in w for w in m.warnings)
    np.testing.assert_allclose(np.linalg.norm(m.normals, axis=1), 1.0, atol=1e-9)
    assert m.uv is not None and m.uv.shape == (len(m.vertices), 2)
    assert np.all((m.uv >= 0) & (m.uv <= 1))


def test_unwrap_obj_without_uvs():
    m = load_mesh(BAD / "trimesh/joined_tetrahedra.obj", unwrap=True)
    assert m.uv is not None and len(m.faces) == 8


def test_unwrap_face_limit(monkeypatch):
    with pytest.raises(MeshError, match="too many to unwrap") as info:
        load_mesh(BAD / "trimesh/rabbit.obj", unwrap=True, max_unwrap_faces=1000)
    assert "Blender" in info.value.hint


def test_unwrap_crash_is_contained(monkeypatch):
    # a crashing xatlas (it segfaults on large meshes) must not take the caller down
    monkeypatch.setattr(mesh_mod, "_XATLAS_CHILD", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    with pytest.raises(MeshError, match="crashed \\(SIGSEGV\\)"):
        load_mesh(BAD / "trimesh/joined_tetrahedra.obj", unwrap=True)


def test_from_arrays_checks():
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1.0]])
    f = np.array([[0, 1, 2], [0, 2, 3], [0, 1, 3], [1, 1, 2]])  # the last face is degenerate
    uv = np.zeros((4, 2))
    m = Mesh.from_arrays(v, f, uv)
    assert len(m.faces) == 3 and any("degenerate" in w for w in m.warnings)
    with pytest.raises(MeshError, match="out of range"):
        Mesh.from_arrays(v, f + 1, uv)
    with pytest.raises(MeshError, match="NaN/Inf UV"):
        Mesh.from_arrays(v, f, np.full((4, 2), np.nan))
    with pytest.raises(MeshError, match="non-finite"):
        Mesh.from_arrays(np.where(v == 1, np.inf, v), f, uv)
    with pytest.raises(MeshError, match="no UV"):
        Mesh.from_arrays(v, f)
    with pytest.raises(MeshError, match="3 of 4 faces are degenerate"):
        Mesh.from_arrays(v, np.array([[0, 1, 2], [1, 1, 2], [2, 2, 2], [3, 3, 0]]), uv)


def test_icosphere_with_uv_seams():
    m = icosphere_with_uv(4)
    assert m.faces.shape == (5120, 3)
    # no face spans more than a small part of u (seam faces are lifted by +1, not interpolated across 0..1)
    fu = m.uv[m.faces][..., 0]
    assert (fu.max(1) - fu.min(1)).max() < 0.3
