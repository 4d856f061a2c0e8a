"""The add-on's "Model Defaults" switch, headless, against a real `concord serve --model tiny` subprocess.

* a new scene has it on;
* Check Server (preferences) fills view size / steps / guidance / texture size / correspondence strength from the
  server's model, and leaves them alone when the switch is off;
* a job started with the switch on captures at the model's view size, leaves steps / guidance / texture size to
  the server, and metrics.json and the panel say every setting came from the model; with the switch off the
  panel's values are used and recorded as set by hand;
* server down with the switch on: a clear error before anything is captured, settings and scene unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from addon_scene import addon_prefs as _prefs
from addon_scene import import_box as _import_box

pytestmark = pytest.mark.blender





def _not_the_models(s) -> None:
    """Values no preset recommends, so a fill is visible."""
    s.view_resolution, s.steps, s.guidance, s.texture_size = 136, 2, 9.0, "4096"
    s.attention_correspondence = 5.5


def _recommended(server) -> dict:
    from blender_addon.core.client import ConcordClient

    return ConcordClient(server.url).health()["recommended"]


def _settings_tuple(s) -> tuple:
    return s.view_resolution, s.steps, round(s.guidance, 4), s.texture_size, round(s.attention_correspondence, 4)


def _rec_tuple(rec: dict) -> tuple:
    return (rec["view_size"], rec["steps"], round(rec["guidance"], 4), str(rec["texture_size"]),
            round(rec["attention_correspondence"], 4))


def test_new_scene_has_model_defaults_on(addon, bpy_module):
    assert bpy_module.context.scene.concord.model_defaults is True


def test_check_server_fills_the_models_settings(addon, bpy_module, concord_server):
    bpy = bpy_module
    _prefs(bpy).server_url = concord_server.url
    rec = _recommended(concord_server)
    s = bpy.context.scene.concord

    s.model_defaults = False
    _not_the_models(s)
    before = _settings_tuple(s)
    assert bpy.ops.concord.check_server(blocking=True) == {"FINISHED"}
    assert _settings_tuple(s) == before  # switch off: untouched

    s.model_defaults = True
    assert bpy.ops.concord.check_server(blocking=True) == {"FINISHED"}
    assert _settings_tuple(s) == _rec_tuple(rec)
    assert s.model_defaults_from == "tiny"
    assert f"{rec['view_size']} px views" in _prefs(bpy).status_text


def test_job_with_model_defaults_uses_the_models_settings(addon, bpy_module, concord_server, tmp_path):
    bpy = bpy_module
    _prefs(bpy).server_url = concord_server.url
    rec = _recommended(concord_server)
    ob = _import_box(bpy)
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "scene.blend"))
    s = bpy.context.scene.concord
    s.prompt = "weathered red brick"
    _not_the_models(s)  # never checked: the job start must fetch the model's settings itself

    assert bpy.ops.concord.texture_mesh(blocking=True) == {"FINISHED"}

    assert _settings_tuple(s) == _rec_tuple(rec)
    state = bpy.context.window_manager.concord_job
    metrics = json.loads((Path(state.last_result) / "metrics.json").read_text())
    assert metrics["settings"] == {
        "steps": {"value": rec["steps"], "source": "model"},
        "guidance": {"value": rec["guidance"], "source": "model"},
        "texture_size": {"value": rec["texture_size"], "source": "model"},
        "view_size": {"value": rec["view_size"], "source": "model"},
        # left out under Model Defaults: the model's
        "consistency.attention_correspondence": {"value": rec["attention_correspondence"], "source": "model"},
    }
    assert metrics["view_size"] == [rec["view_size"]] * 2 and metrics["texture_size"] == rec["texture_size"]
    assert "model tiny's defaults" in state.last_settings and f"{rec['view_size']} px views" in state.last_settings
    assert ob.material_slots[0].material.name.startswith("Concord")


def test_job_without_model_defaults_uses_the_panel(addon, bpy_module, concord_server, tmp_path):
    bpy = bpy_module
    _prefs(bpy).server_url = concord_server.url
    _import_box(bpy)
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "scene.blend"))
    s = bpy.context.scene.concord
    s.prompt = "weathered red brick"
    s.model_defaults = False
    s.view_resolution, s.steps, s.guidance, s.texture_size = 72, 2, 5.0, "512"
    s.attention_correspondence = 3.0

    assert bpy.ops.concord.texture_mesh(blocking=True) == {"FINISHED"}

    assert _settings_tuple(s) == (72, 2, 5.0, "512", 3.0)
    state = bpy.context.window_manager.concord_job
    metrics = json.loads((Path(state.last_result) / "metrics.json").read_text())
    assert metrics["settings"] == {
        "steps": {"value": 2, "source": "user"},
        "guidance": {"value": 5.0, "source": "user"},
        "texture_size": {"value": 512, "source": "user"},
        "view_size": {"value": 72, "source": "user"},
        "consistency.attention_correspondence": {"value": 3.0, "source": "user"},
    }
    assert metrics["attention_correspondence"] == 3.0  # what ran
    assert "set by hand" in state.last_settings and "correspondence 3" in state.last_settings


def test_server_down_with_model_defaults_is_a_clear_error(addon, bpy_module, snapshot, free_port):
    bpy = bpy_module
    _prefs(bpy).server_url = f"http://127.0.0.1:{free_port}"
    _import_box(bpy)
    s = bpy.context.scene.concord
    s.prompt = "weathered red brick"
    _not_the_models(s)
    settings, before = _settings_tuple(s), snapshot()
    with pytest.raises(RuntimeError, match="connection refused"):
        bpy.ops.concord.texture_mesh(blocking=True)
    assert snapshot() == before and _settings_tuple(s) == settings
    state = bpy.context.window_manager.concord_job
    assert "concord serve" in state.last_report and not state.running


def test_consistency_panel_shows_the_correspondence_strength(addon, bpy_module):
    """The Consistency sub-panel draws Correspondence: greyed out (inactive) where it has no effect (Grid on,
    Shared Attention off), not editable under Model Defaults (the model's value is filled in), editable otherwise."""
    bpy = bpy_module
    from blender_addon.ui import CONCORD_PT_consistency

    drawn: dict = {}

    class Layout:
        def __init__(self, enabled=True, active=True):
            self.enabled, self.active, self.use_property_split = enabled, active, False

        def row(self, **_):
            return Layout(self.enabled, self.active)

        column = row

        def prop(self, data, name, **_):
            assert name in data.bl_rna.properties, name
            drawn[name] = (self.enabled, self.active)

    def draw() -> tuple:
        drawn.clear()
        panel = type("Panel", (), {})()
        panel.layout = Layout()
        CONCORD_PT_consistency.draw(panel, bpy.context)
        return drawn["attention_correspondence"]

    s = bpy.context.scene.concord
    s.model_defaults, s.shared_attention, s.grid = False, "all", False
    assert draw() == (True, True)
    assert list(drawn)[:2] == ["shared_attention", "attention_correspondence"]
    s.grid = True
    assert draw() == (True, False)
    s.grid, s.shared_attention = False, "off"
    assert draw() == (True, False)
    s.shared_attention, s.model_defaults = "all", True
    assert draw() == (False, True)


def test_used_summary_is_drawn_in_lines_that_fit(addon, bpy_module):
    """The panel's "Used:" summary (a label, which never wraps) comes in lines of at most USED_LINE_CHARS that
    together say all of it."""
    from blender_addon.props import describe_used
    from blender_addon.ui import USED_LINE_CHARS, used_lines

    settings = {"view_size": 128, "steps": 20, "guidance": 2.0, "texture_size": 512,
                "consistency.attention_correspondence": 8.0}
    summary = describe_used({"model": "micro", "settings": {k: {"value": v, "source": "model"} for k, v in settings.items()}})
    assert summary == "128 px views, 20 steps, guidance 2, texture 512, correspondence 8 (model micro's defaults)"
    lines = used_lines(summary)
    assert len(lines) > 1 and all(len(line) <= USED_LINE_CHARS for line in lines)
    assert " ".join(lines) == f"Used: {summary}"
