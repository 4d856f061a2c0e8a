"""What the add-on's long-running operators share ("Texture Selected", "Stylize Animation"): the run's slot, the
operator machinery around it, and the Cancel button's logic.

A run is the operator's runtime state (a dataclass with at least ``worker``, ``cancel_requested`` and ``health``;
never saved). Each operator kind keeps its one run in a :class:`RunSlot`, which also names the run's state on the
window manager (``WindowManager.concord_job`` / ``concord_stylize_job``, a ``props.ConcordJobState``: what the panel
draws) and keeps the last finished run's timings (for bench/). One Concord run goes at a time, of any kind.

:class:`RunningOperator` is the operators' mixin (ARCHITECTURE.md rule 5): the ``blocking`` switch, the start checks
(another run going, online access), the server's health answer (awaited on the modal timer, or waited for in a
blocking run), the modal timer itself, the end of a run (a Cancelled or Failed message reported the same way by
every kind; the panel's last line is the latest outcome, never an older one) and the clean-up that whatever ended
the run always reaches (the server's job is cancelled, the timer removed, the panel idle). Each operator supplies
what its kind does: ``_on_health``, ``_tick_modal``, ``_run_blocking``, ``_succeed``, ``_release``, ``_timings``,
``_failure_text`` and, where it has one, ``_unfinished_note``. :class:`CancelRun` is the Cancel buttons' mixin.

Layer rule: a bpy layer (ops/). Network only through ``core.jobs.JobWorker`` and ``prefs.check_server_async``
threads; bpy only on the main thread.
"""

from __future__ import annotations

import queue

import bpy
from bpy.props import BoolProperty

from ..core import jobs
from ..prefs import online_access_refusal, server_settings

TICK_S = 0.05  # the modal timer's interval (and, in a blocking stylize run, the longest wait on a worker's queue)

_SLOTS: list[RunSlot] = []


class RunSlot:
    """The one run of an operator kind in this Blender session, the window-manager property that shows its state,
    and the last finished run's timings."""

    def __init__(self, state: str):
        self.run = None
        self.state = state
        self.last_timings: dict = {}
        _SLOTS.append(self)

    def state_of(self, context):
        return getattr(context.window_manager, self.state)

    def request_cancel(self) -> bool:
        """Ask the slot's run to stop (its worker tells the server). Returns False when none runs."""
        run = self.run
        if run is None:
            return False
        run.cancel_requested = True
        if run.worker is not None:
            run.worker.cancel()
        return True

    def press_cancel(self, context) -> bool:
        """The Cancel button: the run is asked to stop and the panel says "Cancelling..." until it ended. Returns
        False when none runs."""
        if not self.request_cancel():
            return False
        self.state_of(context).cancelling = True
        return True


def any_running() -> bool:
    """Whether a Concord run of any kind goes."""
    return any(slot.run is not None for slot in _SLOTS)


def interrupted(exc: BaseException) -> str:
    return "interrupted (Ctrl+C)" if isinstance(exc, KeyboardInterrupt) else f"stopped by {type(exc).__name__}: {exc}"


def redraw(context, area_types) -> None:
    for window in context.window_manager.windows:
        screen = window.screen
        if screen is None:
            continue
        for area in screen.areas:
            if area.type in area_types:
                area.tag_redraw()


class RunningOperator:
    """Mixin of an operator that follows one run (see the module's docstring); the class sets ``slot``,
    ``redraw_areas``, ``success`` (the final message type of a run that made its result) and ``noun``. A run that
    makes its result is one undo step."""

    bl_options = {"REGISTER", "UNDO"}

    slot: RunSlot
    redraw_areas: set = {"VIEW_3D"}
    success: type = jobs.Done
    noun = "job"

    blocking: BoolProperty(
        name="Blocking",
        default=False,
        options={"SKIP_SAVE", "HIDDEN"},
        description="Run to the end before returning (scripts and background mode)",
    )

    _timer = None

    # ------------------------------------------------------------------ start
    def invoke(self, context, event):
        return self.execute(context)

    def _cannot_start(self, context, url: str) -> bool:
        """True, reported, when a Concord run goes already or online access refuses ``url`` (checked before any
        capture or connection)."""
        if any_running():
            self.report({"ERROR"}, "A Concord job is already running: wait for it or cancel it")
            return True
        refusal = online_access_refusal(url)
        if refusal is not None:
            self._show(context, "ERROR", f"Concord: {refusal}")
            return True
        return False

    def _scripted(self, context) -> bool:
        """Scripts and background mode: the run goes to its end on the calling thread, and no undo step is made
        automatically."""
        return self.blocking or bpy.app.background or context.window is None

    def _follow(self, context):
        """After the start: run to the end here (scripts, background mode), or follow the run on a modal timer."""
        if self._scripted(context):
            return self._run_blocking(context)
        wm = context.window_manager
        self._timer = wm.event_timer_add(TICK_S, window=context.window)
        wm.modal_handler_add(self)
        return {"RUNNING_MODAL"}

    # ------------------------------------------------------------------ the server's health answer
    def _wait_health(self, context, run):
        """Blocking runs: wait for the health answer (up to the timeout + 5 s) and hand it to ``_on_health``.
        Returns the final message when the run cannot go on, else None."""
        timeout = server_settings(context)[2]
        try:
            answer = run.health.get(timeout=timeout + 5.0)
        except queue.Empty:
            return jobs.Failed(f"the server did not answer within {timeout:g} s")
        return self._on_health(context, *answer)

    def _modal_health(self, context, run):
        """One timer tick while the health answer is awaited (a thread fetches it); returns the tick's result."""
        if run.cancel_requested:
            return self._finish(context, jobs.Cancelled("cancelled while connecting"))
        try:
            answer = run.health.get_nowait()
        except queue.Empty:
            return {"RUNNING_MODAL"}
        final = self._on_health(context, *answer)
        if final is not None:
            return self._finish(context, final)
        self._redraw(context)
        return {"RUNNING_MODAL"}

    # ------------------------------------------------------------------ interactive
    def modal(self, context, event):
        run = self.slot.run
        if run is None:
            return self._finish(context, jobs.Cancelled(f"the {self.noun} was dropped"))
        if event.type != "TIMER":
            return {"PASS_THROUGH"}
        return self._tick_modal(context, run)

    def cancel(self, context):  # Blender quits or the file is closed while modal
        self.slot.request_cancel()
        self._cleanup(context)

    # ------------------------------------------------------------------ the end
    def _finish(self, context, msg):
        """End the run with its final message: the result made (``success``), or a cancel or failure reported and
        shown as the panel's last line; the timings kept; the clean-up done whatever happened."""
        run = self.slot.run
        result = {"CANCELLED"}
        try:
            if isinstance(msg, self.success):
                self._succeed(context, run, msg)
                result = {"FINISHED"}
            elif isinstance(msg, jobs.Cancelled):
                self._show(context, "WARNING",
                           f"Concord: {msg.message}; the scene is unchanged{self._unfinished_note(run)}")
            else:
                self._show(context, "ERROR", f"Concord: {msg}{self._unfinished_note(run)}")
        except Exception as exc:
            self._show(context, "ERROR", self._failure_text(run, exc))
        finally:
            if run is not None:
                self.slot.last_timings.clear()
                self.slot.last_timings.update(self._timings(run))
            self._cleanup(context)
        return result

    def _unfinished_note(self, run) -> str:
        """What a run that ended early leaves behind, as a clause for the report ("" when nothing)."""
        return ""

    def _cleanup(self, context) -> None:
        run = self.slot.run
        if run is not None:
            if run.worker is not None and not run.worker.finished:
                run.worker.cancel()  # whatever ended the run, its job must not go on running on the server
            self._release(run)
        self.slot.run = None
        if self._timer is not None:
            context.window_manager.event_timer_remove(self._timer)
            self._timer = None
        self._set_state(context, running=False, cancelling=False)
        self._redraw(context)

    # ------------------------------------------------------------------ the panel
    def _show(self, context, level: str, text: str, settings: str = "") -> None:
        """Report ``text`` and make it the panel's last line (the latest outcome, never an older one), with
        ``settings`` as the line of the settings the run used ("" where it used none: a refusal, cancel or
        failure)."""
        self.report({level}, text)
        state = self.slot.state_of(context)
        state.last_report = text
        state.last_settings = settings

    def _set_state(self, context, **values) -> None:
        state = self.slot.state_of(context)
        for key, value in values.items():
            setattr(state, key, value)
        if "step" in values or "total" in values:
            state.progress = (state.step / state.total) if state.total > 0 else 0.0

    def _redraw(self, context) -> None:
        redraw(context, self.redraw_areas)


def registration(classes, slot: RunSlot):
    """(register, unregister) of an operator module's ``classes`` (``bpy.utils.register_classes_factory``);
    unregistering first asks the ``slot``'s run to stop."""
    register, unregister_classes = bpy.utils.register_classes_factory(classes)

    def unregister():
        slot.request_cancel()
        unregister_classes()

    return register, unregister


class CancelRun:
    """Mixin of a Cancel button's operator: the ``slot``'s run is asked to stop (``RunSlot.press_cancel``);
    ``none_running`` is the warning when none runs."""

    bl_label = "Cancel"
    bl_options = {"REGISTER"}

    slot: RunSlot
    none_running: str

    def execute(self, context):
        if not self.slot.press_cancel(context):
            self.report({"WARNING"}, self.none_running)
            return {"CANCELLED"}
        return {"FINISHED"}
