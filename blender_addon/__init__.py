"""Concord's Blender add-on (a Blender 4.2+ extension).

Only `ui/`, `ops/`, `props/`, `capture/` and `prefs.py` touch bpy; `core/` is plain Python + numpy and is also
used outside Blender (the command line and tests import `blender_addon.core`). Importing this package must not
require bpy: bpy-facing modules are imported inside `register()`.

Relative imports only: Blender installs the extension as `bl_ext.<repository>.concord`.
"""


def _modules():
    from . import ops, prefs, props, ui

    return (prefs, props, ops, ui)


def register():
    from .ops import apply

    for module in _modules():
        module.register()
    apply.register_handlers()  # save_pre: results of an unsaved file move beside the .blend when it is saved


def unregister():
    from .ops import apply

    apply.unregister_handlers()
    for module in reversed(_modules()):
        module.unregister()
