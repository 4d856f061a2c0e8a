"""What each model is best run at: its recommended sampler settings and size limits, and how a job's settings are
resolved from them.

Every model the registry loads declares a `RecommendedSettings` (presets in `registry.PRESETS`, folders and single
files by their kind). Clients use them when the user sets nothing: the server fills a job's omitted `steps`,
`guidance` and `texture_size` from the loaded model (`resolve_job_settings`), and the CLI and the add-on render
their views at `view_size` unless the user chose a size. `api/schemas.py` mirrors the fields for the protocol
(`schemas.RecommendedSettings`; a test keeps the two equal).

Plain Python: no torch, no pydantic, nothing that touches a device (the protocol module and clients import it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["RecommendedSettings", "JOB_SETTINGS", "CONSISTENCY_SETTINGS", "resolve_job_settings", "view_size_note"]


@dataclass(frozen=True)
class RecommendedSettings:
    """A model's recommended settings (what it was trained or tuned for) and its limits.

    view_size: pixels per side of each view (the longest side for non-square views).
    steps: denoising steps. guidance: classifier-free guidance scale (<= 1: off).
    texture_size: texture width = height for a `texture` job (matched to what six views of `view_size` cover).
    native_size: the image size the model was trained at (its UNet's sample size in pixels).
    max_view_size: the largest view size it is meant for; larger views still run, but slowly and off the model's
        training distribution (clients warn).
    attention_correspondence: the strength of correspondence-weighted shared attention for `texture` jobs
        (`concord.attention.extended.CorrespondenceBias`): what the model was trained with and measured best at;
        0 (plain shared attention) for models never trained or measured with it.
    """

    view_size: int
    steps: int
    guidance: float
    texture_size: int
    native_size: int
    max_view_size: int
    attention_correspondence: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line for people: `128 px views, 20 steps, guidance 2, texture 512 (native 64 px, views up to 256 px)`."""
        return (
            f"{self.view_size} px views, {self.steps} steps, guidance {self.guidance:g}, texture {self.texture_size} "
            f"(native {self.native_size} px, views up to {self.max_view_size} px)"
        )


# The job parameters the server fills from the loaded model when a request leaves them out (None), per job kind.
JOB_SETTINGS: dict[str, tuple[str, ...]] = {
    "depth_image": ("steps", "guidance"),
    "texture": ("steps", "guidance", "texture_size"),
    "stylize": ("steps", "guidance"),
}
# The same for settings inside a job's `consistency` options (a client that never sends them gets the model's).
CONSISTENCY_SETTINGS: dict[str, tuple[str, ...]] = {"texture": ("attention_correspondence",)}


def resolve_job_settings(params, recommended: RecommendedSettings, kind: str):
    """(params with every omitted setting filled from `recommended`, {name: {"value", "source"}}).

    `params` is a job's pydantic params model; a setting the request carried keeps its value (source "user"), one
    it left out (None) takes the model's (source "model"); so do the `consistency` options in CONSISTENCY_SETTINGS
    (named "consistency.NAME" in the dict). The returned params are a copy; `params` is unchanged."""
    update, used = {}, {}
    for name in JOB_SETTINGS[kind]:
        value = getattr(params, name)
        if value is None:
            value = getattr(recommended, name)
            update[name] = value
            used[name] = {"value": value, "source": "model"}
        else:
            used[name] = {"value": value, "source": "user"}
    nested = {}
    for name in CONSISTENCY_SETTINGS.get(kind, ()):  # reported as "consistency.NAME"
        value = getattr(params.consistency, name)
        source = "user"
        if value is None:
            value, source = getattr(recommended, name), "model"
            nested[name] = value
        used[f"consistency.{name}"] = {"value": value, "source": source}
    if nested:
        update["consistency"] = params.consistency.model_copy(update=nested)
    return (params.model_copy(update=update) if update else params), used


def view_size_note(model_name: str, size: int, recommended: RecommendedSettings) -> str | None:
    """A warning for views larger than the model is meant for, or None."""
    if size <= recommended.max_view_size:
        return None
    return (
        f"{size} px views are larger than model {model_name!r} is meant for (up to {recommended.max_view_size} px; "
        f"recommended {recommended.view_size} px): the job will be slow and off the model's training distribution"
    )
