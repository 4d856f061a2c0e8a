"""Operators: texture the selected mesh, cancel, add a UV map (``texture``; apply logic in ``apply``); stylize the
scene's animation and cancel it (``stylize``); what the two long-running operators share (``_running``).

Layer rule: a bpy layer; main thread only. Network only through ``core.jobs.JobWorker``.
"""

from . import stylize, texture


def register():
    texture.register()
    stylize.register()


def unregister():
    stylize.unregister()
    texture.unregister()
