"""Blender's online-access setting: a server URL that is not on this computer is used only while Blender
allows online access (``bpy.app.online_access``); a loopback server always works.

No traffic leaves the loopback range: the refusal happens before any connection, and the client's transport is
replaced by one that fails the test if it is ever reached with a non-loopback URL. The address used,
192.0.2.10, is in TEST-NET-1 (RFC 5737: documentation only, never routed).
"""

from __future__ import annotations

import pytest
from addon_scene import import_box

pytestmark = pytest.mark.blender

REMOTE = "http://192.0.2.10:8765"


@pytest.fixture
def no_remote_traffic(monkeypatch):
    from blender_addon.core import client

    real = client.ConcordClient._request

    def guarded(self, *args, **kwargs):
        assert client.is_loopback_url(self.url), f"the add-on tried to reach {self.url}"
        return real(self, *args, **kwargs)

    monkeypatch.setattr(client.ConcordClient, "_request", guarded)


def _scene_with_box(bpy):
    import_box(bpy)
    s = bpy.context.scene.concord
    s.prompt, s.model_defaults, s.steps, s.view_resolution, s.texture_size = "brick", False, 2, 64, "256"


def test_remote_server_refused_while_online_access_is_off(addon, bpy_module, snapshot, no_remote_traffic):
    bpy = bpy_module
    prefs = bpy.context.preferences
    prefs.system.use_online_access = False
    assert bpy.app.online_access is False
    prefs.addons["blender_addon"].preferences.server_url = REMOTE
    _scene_with_box(bpy)
    before = snapshot()
    with pytest.raises(RuntimeError, match="online access is off.*Allow Online Access"):
        bpy.ops.concord.texture_mesh(blocking=True)
    assert snapshot() == before
    with pytest.raises(RuntimeError, match="online access is off"):
        bpy.ops.concord.check_server(blocking=True)
    assert "Allow Online Access" in prefs.addons["blender_addon"].preferences.status_text


def test_remote_server_allowed_once_online_access_is_on(addon, bpy_module, monkeypatch):
    """With online access on, the URL goes to the client (whose transport is stubbed here, so nothing is sent)."""
    bpy = bpy_module
    from blender_addon.core import client
    from blender_addon.prefs import online_access_refusal

    prefs = bpy.context.preferences
    prefs.system.use_online_access = True
    try:
        assert bpy.app.online_access is True
        assert online_access_refusal(REMOTE) is None
        reached = []

        def refuse(self, *args, **kwargs):
            reached.append(self.url)
            raise client.ServerError(f"no Concord server at {self.url} (connection refused)")

        monkeypatch.setattr(client.ConcordClient, "_request", refuse)
        prefs.addons["blender_addon"].preferences.server_url = REMOTE
        with pytest.raises(RuntimeError, match="connection refused"):
            bpy.ops.concord.check_server(blocking=True)
        assert reached == [REMOTE]
    finally:
        prefs.system.use_online_access = False


def test_loopback_server_works_with_online_access_off(addon, bpy_module, concord_server, no_remote_traffic):
    bpy = bpy_module
    bpy.context.preferences.system.use_online_access = False
    assert bpy.app.online_access is False
    for url in (concord_server.url, concord_server.url.replace("127.0.0.1", "localhost")):
        bpy.context.preferences.addons["blender_addon"].preferences.server_url = url
        assert bpy.ops.concord.check_server(blocking=True) == {"FINISHED"}
