"""Operators: texture the selected mesh, cancel, add a UV map. Apply logic in ``apply``.

Layer rule: a bpy layer; main thread only. Network only through ``core.jobs.JobWorker``.
"""

from . import texture


def register():
    texture.register()


def unregister():
    texture.unregister()
