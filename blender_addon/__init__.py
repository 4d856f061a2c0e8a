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
    for module in _modules():
        module.register()


def unregister():
    for module in reversed(_modules()):
        module.unregister()
