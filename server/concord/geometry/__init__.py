"""Geometry for Concord: the ViewSet array contract, camera rigs, mesh loading/validation and the
Blender-free correspondence renderer (trimesh + embree), plus baking helpers.

Layer rule: plain numpy / scipy / trimesh only. Nothing in this package imports bpy, torch or diffusers;
pipelines receive geometry as arrays (see ``concord.geometry.viewset`` for the contract).
"""
