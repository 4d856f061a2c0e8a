"""The add-on's Blender-free half: protocol mirror, HTTP client, array packing, camera math.

Plain Python + numpy only: importable and tested without bpy (ARCHITECTURE.md rule 1). Never imports torch.
"""
