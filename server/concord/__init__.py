"""Concord: consistent multi-image diffusion, served locally to Blender and the command line."""

__version__ = "0.1.0"
