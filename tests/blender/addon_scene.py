"""Small steps the add-on's bpy tests share: its preferences, the BoxTextured fixture imported, selected and
active (the state an artist is in before pressing Texture Selected), the real server with the add-on pointed at it,
and a user pressing Cancel while a job runs on the server."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.harness import InProcessServer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "meshes"
BOX = FIXTURES / "boxtextured" / "BoxTextured.glb"


def addon_prefs(bpy):
    return bpy.context.preferences.addons["blender_addon"].preferences


def import_box(bpy):
    """Import BoxTextured.glb and make its mesh the only selected, active object; returns the object."""
    bpy.ops.import_scene.gltf(filepath=str(BOX))
    ob = next(o for o in bpy.context.scene.objects if o.type == "MESH")
    bpy.ops.object.select_all(action="DESELECT")
    ob.select_set(True)
    bpy.context.view_layer.objects.active = ob
    return ob


@contextmanager
def addon_server(bpy, tiny_model, data: Path):
    """The real Concord app with ``tiny_model`` on a loopback port (``tests.harness.InProcessServer``, so a test can
    gate the model it runs), the add-on's preferences pointed at it. Yields the server."""
    with InProcessServer(tiny_model, data) as srv:
        addon_prefs(bpy).server_url = srv.url
        yield srv


@contextmanager
def cancel_on_server(url: str, gate, active, request_cancel):
    """A user pressing Cancel while the job runs on the server, on a thread during the ``with`` block: once ``gate``
    (a ``tests.harness.StepGate``) holds the model, it waits until the add-on's run (``active()``) has its worker's
    server job id, calls ``request_cancel()``, waits until the server says the job is cancelling, and releases the
    gate. Yields a dict that holds the job's ``id`` once seen; after the block the thread is joined and the server
    must end that job as cancelled (the add-on does not wait for a slow server to confirm the cancel). Waits on
    state only."""
    from blender_addon.core.client import ConcordClient, JobCancelledError

    seen: dict = {}
    idle = threading.Event()  # never set: waits between state reads

    def press_cancel():
        gate.wait_reached()
        run = active()
        while run.worker is None or run.worker.job_id is None:
            idle.wait(0.01)
        seen["id"] = run.worker.job_id
        request_cancel()
        client = ConcordClient(url)
        while client.status(seen["id"])["message"] != "cancelling":  # the server has been told
            idle.wait(0.01)
        gate.release()

    t = threading.Thread(target=press_cancel)
    t.start()
    yield seen
    t.join()
    with pytest.raises(JobCancelledError):
        ConcordClient(url).wait(seen["id"], poll=0.01)
