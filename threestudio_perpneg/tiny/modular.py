"""Tiny seeded SDXL and SD3 modular pipelines (diffusers' Modular Diffusers), built on CPU.

For the guider tests and benchmark, all random and seeded; tokenizers are written to ``folder`` and
loaded back (no hub).

* SDXL (:func:`build_tiny_sdxl_modular`, diffusers >= 0.35): two CLIP text encoders (the second
  with a projection), an SDXL UNet with ``text_time`` additional embeddings, a small VAE and an
  Euler scheduler.
* SD3 (:func:`build_tiny_sd3_modular`, a flow-matching pipeline; diffusers with
  ``StableDiffusion3AutoBlocks``, 0.42 has it): two CLIP text encoders with projections, a T5
  encoder (its Unigram tokenizer built from a handful of pieces), an MMDiT
  ``SD3Transformer2DModel``, a small VAE and a flow-matching Euler scheduler.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Callable

from .builders import (
    BOS_TOKEN,
    EOS_TOKEN,
    TEXT_ENCODER_CONFIG,
    VAE_CONFIG,
    _tokenizer_vocab,
    write_tokenizer,
)

__all__ = [
    "SD3_TRANSFORMER_CONFIG",
    "SDXL_UNET_CONFIG",
    "build_tiny_sd3_modular",
    "build_tiny_sdxl_modular",
]

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


#: SD3's text embeddings are [CLIP 1 ; CLIP 2] (32 + 32 wide, zero-padded to the T5 width) stacked
#: over T5's tokens, so ``joint_attention_dim`` is the T5 width (80 > 64, the padding is exercised);
#: the pooled projection is both CLIP projections (32 + 32).
SD3_TRANSFORMER_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 1,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 80,
    "caption_projection_dim": 16,
    "pooled_projection_dim": 64,
    "pos_embed_max_size": 16,
}

T5_CONFIG: dict[str, Any] = {
    "d_model": 80,
    "d_kv": 8,
    "d_ff": 32,
    "num_layers": 1,
    "num_heads": 2,
    "relative_attention_num_buckets": 8,
    "dropout_rate": 0.0,
}

#: T5 Unigram pieces (``▁`` starts a word), log-probabilities chosen so whole words win.
T5_PIECES: tuple[tuple[str, float], ...] = (
    ("<pad>", 0.0),
    ("</s>", 0.0),
    ("<unk>", 0.0),
    *((c, -5.0) for c in "▁abcdefghijklmnopqrstuvwxyz"),
    *((f"▁{w}", -1.0) for w in ("a", "cat", "dog", "front", "side", "back", "view", "photo")),
)


def _seeded(seed: int, *makers: Callable[[], Any]) -> list[Any]:
    """``makers[i]()`` after ``torch.manual_seed(seed + i)``; the global RNG is left as it was."""
    import torch

    out = []
    with torch.random.fork_rng(devices=[]):
        for i, make in enumerate(makers):
            torch.manual_seed(seed + i)
            out.append(make())
    return out


def _pipeline(blocks: Any, **components: Any) -> Any:
    """``blocks`` (an instance, or a class to instantiate) as a pipeline of ``components``."""
    import torch

    pipe = (blocks() if isinstance(blocks, type) else blocks).init_pipeline()
    pipe.update_components(
        **{k: v.eval() if isinstance(v, torch.nn.Module) else v for k, v in components.items()}
    )
    return pipe


def _clip_config(vocab: dict[str, int]) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(vocab),
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[EOS_TOKEN],
        projection_dim=32,
        **TEXT_ENCODER_CONFIG,
    )


def _clip_tokenizers(root: pathlib.Path, vocab: dict[str, int]) -> dict[str, Any]:
    from transformers import CLIPTokenizer

    for name in ("tokenizer", "tokenizer_2"):
        if not (root / name).exists():
            write_tokenizer(root / name, vocab)
    return {
        name: CLIPTokenizer.from_pretrained(root / name) for name in ("tokenizer", "tokenizer_2")
    }


def build_tiny_sdxl_modular(folder: str | os.PathLike, seed: int = 0, blocks: Any = None) -> Any:
    """A ``StableDiffusionXLModularPipeline`` of tiny random components (tokenizers in ``folder``).

    ``blocks`` defaults to diffusers' ``StableDiffusionXLAutoBlocks()``; the guider is diffusers'
    default (``ClassifierFreeGuidance``) until ``update_components(guider=...)``.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    vocab = _tokenizer_vocab()
    tokenizers = _clip_tokenizers(pathlib.Path(folder), vocab)
    text_config = _clip_config(vocab)
    unet, vae, text_encoder, text_encoder_2 = _seeded(
        seed,
        lambda: UNet2DConditionModel(**SDXL_UNET_CONFIG),
        lambda: AutoencoderKL(**VAE_CONFIG),
        lambda: CLIPTextModel(text_config),
        lambda: CLIPTextModelWithProjection(text_config),
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    return _pipeline(
        StableDiffusionXLAutoBlocks if blocks is None else blocks,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        scheduler=scheduler,
        **tokenizers,
    )


def build_tiny_sd3_modular(folder: str | os.PathLike, seed: int = 0, blocks: Any = None) -> Any:
    """A ``StableDiffusion3ModularPipeline`` of tiny random components (tokenizers in ``folder``).

    ``blocks`` defaults to diffusers' ``StableDiffusion3AutoBlocks()``; the guider is diffusers'
    default (``ClassifierFreeGuidance``) until ``update_components(guider=...)``.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers.modular_pipelines import StableDiffusion3AutoBlocks
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5Tokenizer

    root = pathlib.Path(folder)
    vocab = _tokenizer_vocab()
    tokenizers = _clip_tokenizers(root, vocab)
    if not (root / "tokenizer_3").exists():
        T5Tokenizer(vocab=list(T5_PIECES), extra_ids=0).save_pretrained(root / "tokenizer_3")
    t5_config = T5Config(vocab_size=len(T5_PIECES), pad_token_id=0, eos_token_id=1, **T5_CONFIG)
    transformer, vae, text_encoder, text_encoder_2, text_encoder_3 = _seeded(
        seed,
        lambda: SD3Transformer2DModel(**SD3_TRANSFORMER_CONFIG),
        lambda: AutoencoderKL(**VAE_CONFIG, shift_factor=0.0),
        lambda: CLIPTextModelWithProjection(_clip_config(vocab)),
        lambda: CLIPTextModelWithProjection(_clip_config(vocab)),
        lambda: T5EncoderModel(t5_config),
    )
    return _pipeline(
        StableDiffusion3AutoBlocks if blocks is None else blocks,
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=T5Tokenizer.from_pretrained(root / "tokenizer_3"),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        **tokenizers,
    )
