"""Job kind `depth_image`: one picture from a depth map and a prompt, through the loaded model's depth conditioning.

The first job kind: small, real (the model's own diffusers pipeline), and the building block the multi-view
`texture` job generalises. Works with every model kind the registry loads (ControlNet, SD2 depth2img, SDXL
ControlNet, Concord's micro).

Result files: `image.png` (sRGB), `control.png` (the conditioning the model saw), `result.json`.
"""

from __future__ import annotations

import json
import time

import numpy as np
from PIL import Image

from concord.api.arrays import ArraysContract, ArraySpec, DimLimit
from concord.api.schemas import DepthImageParams
from concord.jobs.context import JobContext, JobInputError

ARRAYS = ArraysContract(
    specs=(
        ArraySpec(
            "depth",
            ("float32", "float64", "float16"),
            ("H", "W"),
            "planar camera z (scene units) > 0 on the object, exactly 0 on the background",
            cast_to="float32",
        ),
    ),
    dims={"H": DimLimit(32, 2048, 8), "W": DimLimit(32, 2048, 8)},
)


def check_inputs(params: DepthImageParams, arrays: dict[str, np.ndarray]) -> None:
    depth = arrays["depth"]
    if (depth < 0).any():
        raise JobInputError(
            "depth has negative values", "arrays.depth", "depth is planar z in front of the camera: >0, or 0 for background"
        )
    if not (depth > 0).any():
        raise JobInputError(
            "the depth map sees nothing (every pixel is background)",
            "arrays.depth",
            "point the camera at the object; background pixels are 0",
        )


def depth_to_control(depth: np.ndarray) -> np.ndarray:
    """Depth (planar z, 0 = background) -> the [0, 1] map depth ControlNets expect.

    ControlNet's depth models (Zhang et al. 2023, "Adding Conditional Control...", annotator MiDaS/DPT) were
    trained on relative inverse depth normalised per image, near = bright, far background = 0. We map the
    object's disparity 1/z linearly to [0.1, 1] (its farthest point stays distinguishable from the background) and
    leave the background at 0.
    """
    out = np.zeros(depth.shape, np.float32)
    fg = depth > 0
    if not fg.any():
        return out
    disp = 1.0 / depth[fg]
    lo, hi = float(disp.min()), float(disp.max())
    scaled = (disp - lo) / (hi - lo) if hi > lo else np.ones_like(disp)
    out[fg] = 0.1 + 0.9 * scaled
    return out


def run(model, params: DepthImageParams, arrays: dict[str, np.ndarray], ctx: JobContext) -> None:
    import torch

    from concord.models.recommended import resolve_job_settings
    from concord.models.registry import model_settings

    recommended = model_settings(model)
    params, settings = resolve_job_settings(params, recommended, "depth_image")  # omitted settings: the model's
    depth = arrays["depth"]
    height, width = depth.shape
    control = depth_to_control(depth)
    control_img = Image.fromarray((control * 255.0 + 0.5).astype(np.uint8)).convert("RGB")
    generator = torch.Generator(device="cpu").manual_seed(params.seed)
    common = dict(
        prompt=params.prompt,
        negative_prompt=params.negative_prompt or None,
        num_inference_steps=params.steps,
        guidance_scale=params.guidance,
        generator=generator,
        output_type="np",
        callback_on_step_end=ctx.diffusers_callback(),
    )
    ctx.stage("denoising", total=params.steps)
    t0 = time.perf_counter()
    if model.kind == "micro":
        # Concord's pixel-space model takes the planar depth itself and normalises it as in its training.
        out = model.pipe(depth=depth, height=height, width=width, **common)
    elif model.kind == "depth2img":
        # SD2-depth normalises the map itself; strength 1 starts from pure noise, so the grey image is unused.
        depth_map = torch.from_numpy(control)[None]
        grey = Image.new("RGB", (width, height), (128, 128, 128))
        out = model.pipe(image=grey, depth_map=depth_map, strength=1.0, **common)
    else:
        out = model.pipe(
            image=control_img,
            controlnet_conditioning_scale=params.conditioning_scale,
            height=height,
            width=width,
            **common,
        )
    elapsed = time.perf_counter() - t0
    ctx.raise_if_cancelled()
    ctx.stage("saving")
    image = np.clip(out.images[0] * 255.0 + 0.5, 0, 255).astype(np.uint8)
    Image.fromarray(image).save(ctx.out_dir / "image.png")
    control_img.save(ctx.out_dir / "control.png")
    (ctx.out_dir / "result.json").write_text(
        json.dumps(
            {
                "kind": "depth_image",
                "model": model.name,
                "device": model.device,
                "width": width,
                "height": height,
                "seed": params.seed,
                "steps": params.steps,
                "guidance": params.guidance,
                "settings": settings,
                "recommended": recommended.as_dict(),
                "sampling_seconds": round(elapsed, 4),
            },
            indent=2,
        )
    )
