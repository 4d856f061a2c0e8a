"""`micro`: Concord's embedded trained model -- a ~3M-parameter pixel-space text+depth diffusion model.

- `concord.micro.data`: the procedural training data (flat-coloured primitives, depth, prompts).
- `concord.micro.model`: the model (diffusers UNet + tiny CLIP text encoder + word tokenizer), `MicroPipeline`,
  and the multi-view sampler's parts (`micro_parts`, `micro_conditioning`, `micro_codec`; `micro_model_parts` is
  the factory the model registry names for kind "micro": nothing in `concord.pipelines` imports this package).
- `concord.micro.train`: `concord train-micro` (resumable training).
- `concord.micro.evaluate`: colour / background / pattern accuracy on held-out samples.

Model card: docs/micro-model.md. Importing this package loads nothing heavy; never import torch-free code from it
into the Blender add-on.
"""
