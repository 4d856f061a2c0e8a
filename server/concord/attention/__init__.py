"""Attention processors for joint multi-view / multi-frame generation (one processor per file).

Each keeps diffusers' processor contract (``__call__(attn, hidden_states, encoder_hidden_states=None,
attention_mask=None, temb=None, ...)``) and is installed with ``model.set_attn_processor({...})`` filtered by key
(``attn1`` = self-attention). Classifier-free guidance doubles the batch: cond and uncond never attend to each
other. No bpy, no HTTP, no file system.
"""

from .extended import (
    AUTO_CHUNK_BUDGET_BYTES,
    ExtendedSelfAttnProcessor,
    extended_attention,
    install_extended_attention,
    restore_attention,
    self_attention_keys,
)

__all__ = [
    "AUTO_CHUNK_BUDGET_BYTES",
    "ExtendedSelfAttnProcessor",
    "extended_attention",
    "install_extended_attention",
    "restore_attention",
    "self_attention_keys",
]
