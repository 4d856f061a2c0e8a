"""Add-on preferences: where the Concord server is (URL, token, timeout) and a "Check Server" button.

The check runs ``ConcordClient.health()`` on a worker thread (a dead server must not freeze Blender for the
timeout); a ``bpy.app.timers`` callback picks the answer up on the main thread and shows it in the
preferences: model, device and protocol version, or exactly why not (refused/down, wrong token, protocol
mismatch, timeout). In background mode (no event loop) the operator waits for the thread instead. A successful
check also fills the current scene's view size / steps / guidance / texture size with the model's recommended
settings when its "Model Defaults" switch is on (``props.fill_model_defaults``, on the main thread), and the Stylize
Animation panel's steps / guidance / frame size when its own switch is on (``props.stylize.fill_model_defaults``).

Layer rule: a bpy layer (preferences UI). Network only through ``core.client`` on a worker thread.
"""

from __future__ import annotations

import queue
import threading

import bpy
from bpy.props import BoolProperty, FloatProperty, StringProperty

from .core.client import ConcordClient, ServerError, is_loopback_url

ADDON_ID = __package__  # "blender_addon" when enabled from a folder, "bl_ext.<repo>.concord" as an extension
DEFAULT_URL = "http://127.0.0.1:8765"


def get_preferences(context=None):
    """This add-on's preferences, or None where it is not enabled (e.g. its modules imported directly)."""
    context = context or bpy.context
    addon = context.preferences.addons.get(ADDON_ID)
    return addon.preferences if addon else None


def server_settings(context=None) -> tuple[str, str | None, float]:
    """(url, token, timeout) from the preferences, or the defaults where the add-on is not enabled."""
    p = get_preferences(context)
    if p is None:
        return DEFAULT_URL, None, 30.0
    return p.server_url.strip() or DEFAULT_URL, (p.token.strip() or None), float(p.timeout)


def online_access_refusal(url: str) -> str | None:
    """Why the add-on may not talk to ``url`` now, or None. A server on this computer (loopback) is always
    allowed; any other address only while Blender allows online access (Preferences > System > Network)."""
    if is_loopback_url(url) or getattr(bpy.app, "online_access", True):
        return None
    return (
        f"{url} is not on this computer and Blender's online access is off: allow it in Preferences > System > "
        "Network > Allow Online Access, or run the server on this computer (e.g. http://127.0.0.1:8765)"
    )


def describe_health(h: dict) -> str:
    text = (
        f"Connected: model {h.get('model')} ({h.get('model_kind')}) on {h.get('device')} {h.get('dtype')}, "
        f"protocol {h.get('protocol_version')}, server {h.get('server_version')}, "
        f"queue {h.get('queue_length')}/{h.get('queue_capacity')}"
    )
    rec = h.get("recommended")
    if isinstance(rec, dict):
        text += (
            f"; model defaults: {rec.get('view_size')} px views, {rec.get('steps')} steps, "
            f"guidance {rec.get('guidance')}, texture {rec.get('texture_size')}"
        )
    return text


class ConcordPreferences(bpy.types.AddonPreferences):
    bl_idname = ADDON_ID

    server_url: StringProperty(
        name="Server URL", default=DEFAULT_URL, description="Address of `concord serve` (loopback by default)"
    )
    token: StringProperty(
        name="Token", default="", subtype="PASSWORD", description="The server's --token, if it was started with one"
    )
    timeout: FloatProperty(
        name="Timeout", default=30.0, min=1.0, max=600.0, unit="TIME_ABSOLUTE",
        description="Seconds to wait for one answer from the server",
    )
    status_text: StringProperty(name="Status", default="Not checked yet", options={"SKIP_SAVE"})
    status_ok: BoolProperty(default=False, options={"SKIP_SAVE"})
    checking: BoolProperty(default=False, options={"SKIP_SAVE"})

    def draw(self, context):
        layout = self.layout
        layout.prop(self, "server_url")
        layout.prop(self, "token")
        layout.prop(self, "timeout")
        row = layout.row()
        row.enabled = not self.checking
        row.operator("concord.check_server", icon="URL", text="Checking..." if self.checking else "Check Server")
        box = layout.box()
        icon = "CHECKMARK" if self.status_ok else ("SORTTIME" if self.checking else "ERROR")
        for i, line in enumerate(_wrap(self.status_text, 90)):
            box.label(text=line, icon=icon if i == 0 else "BLANK1")


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


def check_server_async(url: str, token: str | None, timeout: float) -> "queue.SimpleQueue":
    """Start a health check on a thread; its queue receives ("ok", health) or ("error", message)."""
    out: queue.SimpleQueue = queue.SimpleQueue()

    def work():
        try:
            out.put(("ok", ConcordClient(url, token, timeout).health()))
        except ServerError as exc:
            message = str(exc)
            if exc.status == 401:
                message = f"wrong or missing token: {message}"
            out.put(("error", message))
        except Exception as exc:  # a malformed URL and the like
            out.put(("error", f"cannot check {url}: {exc}"))

    threading.Thread(target=work, name="concord-health", daemon=True).start()
    return out


class CONCORD_OT_check_server(bpy.types.Operator):
    """Ask the Concord server for its health: model, device, protocol version (or why it cannot be reached)"""

    bl_idname = "concord.check_server"
    bl_label = "Check Server"
    bl_options = {"REGISTER"}

    blocking: BoolProperty(
        name="Blocking", default=False, options={"SKIP_SAVE", "HIDDEN"},
        description="Wait for the answer (scripts, background mode)",
    )

    def execute(self, context):
        url, token, timeout = server_settings(context)
        prefs = get_preferences(context)
        refusal = online_access_refusal(url)
        if refusal is not None:  # refused before any connection is made
            text, _ = _store(prefs, "error", refusal)
            self.report({"ERROR"}, text)
            return {"CANCELLED"}
        answers = check_server_async(url, token, timeout)
        if self.blocking or bpy.app.background:
            kind, value = answers.get(timeout=timeout + 5.0)
            text, ok = _store(prefs, kind, value)
            self.report({"INFO"} if ok else {"ERROR"}, text)
            return {"FINISHED"} if ok else {"CANCELLED"}
        if prefs is not None:
            prefs.checking = True
            prefs.status_text = f"Checking {url}..."

        def poll_answer():
            try:
                kind, value = answers.get_nowait()
            except queue.Empty:
                return 0.1
            p = get_preferences()
            _store(p, kind, value)
            for window in bpy.context.window_manager.windows:
                for area in window.screen.areas:
                    area.tag_redraw()
            return None

        bpy.app.timers.register(poll_answer, first_interval=0.1)
        return {"FINISHED"}


def _store(prefs, kind: str, value) -> tuple[str, bool]:
    ok = kind == "ok"
    text = describe_health(value) if ok else f"Not connected: {value}"
    if prefs is not None:
        prefs.status_text, prefs.status_ok, prefs.checking = text, ok, False
    if ok:
        _fill_scene_defaults(value)
    return text, ok


def _fill_scene_defaults(health: dict) -> None:
    """The current scene takes the server model's recommended settings where its Model Defaults switches (texture,
    stylize) are on."""
    from .props import fill_model_defaults

    scene = getattr(bpy.context, "scene", None)
    settings = getattr(scene, "concord", None) if scene is not None else None
    if settings is not None and settings.model_defaults:
        fill_model_defaults(settings, health)
    stylize = getattr(scene, "concord_stylize", None) if scene is not None else None
    if stylize is not None and stylize.model_defaults:  # the Stylize Animation panel's own switch
        from .props.stylize import fill_model_defaults as fill_stylize_defaults

        fill_stylize_defaults(stylize, health)


classes = (ConcordPreferences, CONCORD_OT_check_server)
register, unregister = bpy.utils.register_classes_factory(classes)
