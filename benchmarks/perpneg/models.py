"""Models of the benchmark: random UNets of three sizes, the tiny / pretrained Stable Diffusion
and DeepFloyd IF, and their prompt banks (random, CLIP or T5 text embeddings)."""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import Any, Dict, Iterator, Tuple

import torch
from torch import Tensor

from threestudio_perpneg.core.conditioning import PromptBank
from threestudio_perpneg.engines.sd import load_stable_diffusion

#: Intermediate random UNet: a step in well under a second on a laptop CPU.
MID_UNET_CONFIG: Dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (64, 128, 256),
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "cross_attention_dim": 256,
    "attention_head_dim": 8,
}

#: stabilityai/stable-diffusion-2-1-base unet/config.json (865M parameters), random weights.
SD21_BASE_UNET_CONFIG: Dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
    "upcast_attention": False,
    "use_linear_projection": True,
}

#: stabilityai/stable-diffusion-2-1-base vae/config.json, random weights (for --with-vae).
SD21_BASE_VAE_CONFIG: Dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 768,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 0.18215,
}

TEXT_LENGTH = 77


def random_bank(dim: int, device: torch.device, generator: torch.Generator) -> PromptBank:
    """Random text embeddings of CLIP's shape (77 tokens × ``dim``), roughly unit-scaled."""

    def r(*shape: int) -> Tensor:
        return torch.randn(shape, generator=generator).to(device)

    return PromptBank(
        prompt=r(TEXT_LENGTH, dim),
        views=r(4, TEXT_LENGTH, dim),
        uncond=r(TEXT_LENGTH, dim).expand(4, -1, -1).contiguous(),
        negatives=torch.zeros(0, TEXT_LENGTH, dim, device=device),
        negative_weights=torch.zeros(0, device=device),
    )


def clip_bank(pretrained: str, prompt: str, device: torch.device) -> PromptBank:
    """Embeddings from the checkpoint's own CLIP text encoder (threestudio's view suffixes)."""
    from threestudio_perpneg.core.text import encode_prompts, view_prompts

    emb = encode_prompts(pretrained, [prompt, *view_prompts(prompt), ""], device="cpu")
    dim = emb.shape[-1]
    return PromptBank(
        prompt=emb[0],
        views=emb[1:5],
        uncond=emb[5].expand(4, -1, -1).contiguous(),
        negatives=torch.zeros(0, emb.shape[1], dim),
        negative_weights=torch.zeros(0),
    ).to(device)


def t5_bank(pretrained: str, prompt: str, device: torch.device) -> PromptBank:
    """Embeddings from the IF checkpoint's own T5 encoder (threestudio's view suffixes)."""
    from threestudio_perpneg.core.text import encode_prompts, view_prompts

    emb = encode_prompts(
        pretrained, [prompt, *view_prompts(prompt), ""], device="cpu", encoder="t5"
    )
    dim = emb.shape[-1]
    return PromptBank(
        prompt=emb[0],
        views=emb[1:5],
        uncond=emb[5].expand(4, -1, -1).contiguous(),
        negatives=torch.zeros(0, emb.shape[1], dim),
        negative_weights=torch.zeros(0),
    ).to(device)


def n_params(module: Any) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_models(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype, workdir: str
) -> Tuple[Any, Any, Any, PromptBank, str]:
    """(unet, vae, scheduler, prompt bank, description)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from threestudio_perpneg.tiny.builders import SCHEDULER_CONFIG, VAE_CONFIG

    bank_gen = torch.Generator().manual_seed(args.seed + 7)
    if args.model or args.unet == "tiny":
        if args.model:
            pretrained, what = args.model, f"{args.model} (pretrained weights)"
        else:
            from threestudio_perpneg.tiny.builders import build_tiny_stable_diffusion

            pretrained = str(
                build_tiny_stable_diffusion(os.path.join(workdir, "tiny-sd"), args.seed)
            )
            what = "tiny random SD (threestudio_perpneg.tiny.builders.build_tiny_stable_diffusion)"
        unet, vae, scheduler = load_stable_diffusion(pretrained, dtype=dtype, device=device)
        bank = clip_bank(pretrained, args.prompt, device)
        return unet, vae, scheduler, bank, what + f"; CLIP text embeddings of {args.prompt!r}"

    config, vae_config = (
        (MID_UNET_CONFIG, VAE_CONFIG)
        if args.unet == "mid"
        else (SD21_BASE_UNET_CONFIG, SD21_BASE_VAE_CONFIG)
    )
    with seeded(args.seed):
        unet = UNet2DConditionModel(**config)
    vae = None
    if args.with_vae:
        with seeded(args.seed + 1):
            vae = AutoencoderKL(**vae_config).to(device, dtype).eval().requires_grad_(False)
    unet = unet.to(device, dtype).eval().requires_grad_(False)
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    dim = int(config["cross_attention_dim"])
    bank = random_bank(dim, device, bank_gen)
    what = {
        "mid": "mid random UNet (block_out_channels (64, 128, 256), cross_attention_dim 256)",
        "full": "SD 2.1 base UNet config, random weights",
    }[args.unet]
    return unet, vae, scheduler, bank, what + f"; RANDOM text embeddings [77, {dim}]"


def build_if(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype, workdir: str
) -> Tuple[Any, Any, PromptBank, str]:
    """(unet, scheduler, prompt bank, description) of DeepFloyd IF stage I."""
    from threestudio_perpneg.engines.pixel import load_deepfloyd_if

    if args.if_model:
        pretrained, what = args.if_model, f"{args.if_model} (pretrained weights)"
    else:
        from threestudio_perpneg.tiny.builders import build_tiny_deepfloyd_if

        pretrained = str(build_tiny_deepfloyd_if(os.path.join(workdir, "tiny-if"), args.seed))
        what = "tiny random IF stage I (threestudio_perpneg.tiny.builders.build_tiny_deepfloyd_if)"
    unet, scheduler = load_deepfloyd_if(pretrained, dtype=dtype, device=device)
    bank = t5_bank(pretrained, args.prompt, device)
    return unet, scheduler, bank, what + f"; T5 text embeddings of {args.prompt!r}"
