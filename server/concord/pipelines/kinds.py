"""The job kinds the server runs: each kind's parameter model, array contract, input check and sampler.

Adding a kind: a params model and a `*Job` variant in `api/schemas.py`, a module here with `ARRAYS`,
`check_inputs` and `run`, and one entry in `JOB_KINDS`. A test checks the schema union and this table agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pydantic import BaseModel

from concord.api.arrays import ArraysContract
from concord.pipelines import depth_image, stylize, texture


@dataclass(frozen=True)
class JobKind:
    name: str
    params_model: type[BaseModel]
    arrays: ArraysContract
    check_inputs: Callable[[BaseModel, dict], None]
    run: Callable  # (LoadedModel, params, arrays, JobContext) -> None
    summary: str


JOB_KINDS: dict[str, JobKind] = {
    "depth_image": JobKind(
        name="depth_image",
        params_model=depth_image.DepthImageParams,
        arrays=depth_image.ARRAYS,
        check_inputs=depth_image.check_inputs,
        run=depth_image.run,
        summary="One image from a depth map and a prompt.",
    ),
    "texture": JobKind(
        name="texture",
        params_model=texture.TextureParams,
        arrays=texture.ARRAYS,
        check_inputs=texture.check_inputs,
        run=texture.run,
        summary="Views of a mesh generated jointly so they agree, baked into its UV texture.",
    ),
    "stylize": JobKind(
        name="stylize",
        params_model=stylize.StylizeParams,
        arrays=stylize.ARRAYS,
        check_inputs=stylize.check_inputs,
        run=stylize.run,
        summary="An animation's frames restyled from a prompt, consistent from frame to frame.",
    ),
}
