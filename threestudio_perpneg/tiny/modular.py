"""A tiny seeded Stable Diffusion XL modular pipeline (diffusers' Modular Diffusers), built on CPU.

For the guider tests and benchmark: two CLIP text encoders (the second with a projection), an SDXL
UNet with ``text_time`` additional embeddings, a small VAE and an Euler scheduler, all random and
seeded; tokenizers are written to ``folder`` and loaded back (no hub). Needs diffusers >= 0.35.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from .builders import (
    BOS_TOKEN,
    EOS_TOKEN,
    TEXT_ENCODER_CONFIG,
    VAE_CONFIG,
    _tokenizer_vocab,
    write_tokenizer,
)

__all__ = ["SDXL_UNET_CONFIG", "build_tiny_sdxl_modular"]

#: Cross-attention width = both text encoders' hidden sizes (32 + 32); the additional embedding is
#: 6 time ids x 8 + the pooled projection (32).
SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "transformer_layers_per_block": (1, 1),
    "projection_class_embeddings_input_dim": 80,
    "cross_attention_dim": 64,
    "norm_num_groups": 32,
}


def build_tiny_sdxl_modular(folder: str | os.PathLike, seed: int = 0, blocks: Any = None) -> Any:
    """A ``StableDiffusionXLModularPipeline`` of tiny random components (tokenizers in ``folder``).

    ``blocks`` defaults to diffusers' ``StableDiffusionXLAutoBlocks()``; the guider is diffusers'
    default (``ClassifierFreeGuidance``) until ``update_components(guider=...)``.
    """
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    root = pathlib.Path(folder)
    vocab = _tokenizer_vocab()
    for name in ("tokenizer", "tokenizer_2"):
        if not (root / name).exists():
            write_tokenizer(root / name, vocab)
    text_config = CLIPTextConfig(
        vocab_size=len(vocab),
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[EOS_TOKEN],
        projection_dim=32,
        **TEXT_ENCODER_CONFIG,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**VAE_CONFIG)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(text_config)
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(text_config)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    chosen: Any = StableDiffusionXLAutoBlocks() if blocks is None else blocks
    pipe = chosen.init_pipeline()
    pipe.update_components(
        unet=unet.eval(),  # type: ignore[attr-defined]
        vae=vae.eval(),  # type: ignore[attr-defined]
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(root / "tokenizer_2"),
        scheduler=scheduler,
    )
    return pipe
