"""The offline `tiny` model: Stable Diffusion's pipeline classes built from config with random weights.

It exists so that the server, the tests and a first-time demo run anywhere, with no download, in seconds on a
CPU, through exactly the code paths a real checkpoint takes (UNet + depth ControlNet + VAE + CLIP text encoder +
tokenizer + scheduler). Its pictures are noise: it has learned nothing. Sizes follow diffusers' own test
fixtures (`get_dummy_components()`); the weights come from a fixed seed so every run builds the same model.

Never downloads anything and never touches the filesystem.
"""

from __future__ import annotations

import torch

# The tokenizer's vocabulary is built in code: CLIP's byte-to-unicode alphabet, each symbol alone and as a word end.
# With no merges every word is spelled out letter by letter, which is all a random-weight model needs.
_SPECIAL = ["<|startoftext|>", "<|endoftext|>"]


def _byte_alphabet() -> list[str]:
    """CLIP/GPT-2's reversible byte -> printable unicode map (Radford et al. 2019), as a list of 256 symbols."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    symbols, extra = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def build_tokenizer():
    """A CLIPTokenizer whose vocabulary is made in code (no files, no hub)."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    vocab_list = _SPECIAL + alphabet + [s + "</w>" for s in alphabet]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    return tok


TINY_TEXT_DIM = 32


def build_components(seed: int = 0) -> dict:
    """Every component of a StableDiffusionControlNetPipeline, tiny and seeded."""
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer()
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=TINY_TEXT_DIM,
            norm_num_groups=8,
            attention_head_dim=8,
        )
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 16))
        # ControlNet starts with zero convolutions (every output projection), so untrained it ignores the depth;
        # and at default init its conditioning encoder's 8 stacked convolutions shrink the signal until only their
        # biases remain. Variance-preserving weights there and small random output projections make the depth
        # change the image, so tests can tell whether conditioning reaches the UNet.
        torch.manual_seed(seed + 1)
        for conv in controlnet.controlnet_cond_embedding.modules():
            if isinstance(conv, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                torch.nn.init.zeros_(conv.bias)
        for conv in list(controlnet.controlnet_down_blocks) + [controlnet.controlnet_mid_block]:
            torch.nn.init.normal_(conv.weight, std=0.1)
        # Four blocks: the latent is 1/8 of the image, as in Stable Diffusion, so latent-to-texel geometry and
        # memory scale the way they do with real checkpoints.
        vae = AutoencoderKL(
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=8,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
                hidden_size=TINY_TEXT_DIM,
                intermediate_size=37,
                layer_norm_eps=1e-05,
                num_attention_heads=4,
                num_hidden_layers=2,
                vocab_size=len(tokenizer),
                projection_dim=32,
            )
        )
    finally:
        torch.random.set_rng_state(gen_state)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return {
        "unet": unet,
        "controlnet": controlnet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
    }


def build_pipeline(seed: int = 0):
    """The tiny StableDiffusionControlNetPipeline (fp32, CPU; move it with `.to()`)."""
    from diffusers import StableDiffusionControlNetPipeline

    comps = build_components(seed)
    pipe = StableDiffusionControlNetPipeline(**comps, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
