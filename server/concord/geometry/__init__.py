"""Geometry for Concord: the ViewSet array contract, camera rigs, mesh loading/validation, the Blender-free
correspondence renderer (trimesh + embree), baking, metrics, and the UV-space latent sync the samplers use.

Layer rule: numpy / scipy / trimesh, never bpy or diffusers. One exception to "no torch": ``sync.py`` is the
torch port of the baking index that the diffusion sampler runs every step (on the job's device); nothing else
here imports it, so the rest stays usable without torch. Pipelines receive geometry as arrays (see
``concord.geometry.viewset`` for the contract).
"""
