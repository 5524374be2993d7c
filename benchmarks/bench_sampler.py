#!/usr/bin/env python
"""Time per image of the batched 2D Perp-Neg sampler against the sequential per-prompt scheme.

Both run in the same process on the same UNet, VAE, text embeddings, scheduler, seeds and sizes:

* ours: :meth:`threestudio_perpneg.sampler.pipeline.PerpNegSampler.generate` — all images, the
  unconditional branch and every prompt in ONE batched UNet call per step
  (rows = images × (2 + K)).
* sequential: the official Perp-Neg repository's scheme (``pipeline_perpneg_stable_diffusion.py``):
  one image at a time, one UNet call per prompt per step with batch 1 (1 + 1 + K calls per step),
  then the same combination (:func:`threestudio_perpneg.core.guidance.perp_neg_guidance`) and scheduler step,
  one VAE decode per image.

for K = 1, 2, 4 extra (negative) prompts. Each timed call includes the VAE decode; the text
embeddings are cached by the warm-up. Median over ``--repeats`` after ``--warmup`` untimed runs;
the maximum latent difference between the two methods is printed as a check that they compute the
same images.

Examples::

    python benchmarks/bench_sampler.py                          # tiny random SD, CPU, < 2 minutes
    python benchmarks/bench_sampler.py --unet mid --height 128 --width 128
    python benchmarks/bench_sampler.py --model stabilityai/stable-diffusion-2-1-base \\
        --device cuda --fp16 --steps 30 --images 4 --height 512 --width 512

This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from threestudio_perpneg.core.guidance import perp_neg_guidance
from threestudio_perpneg.sampler.pipeline import SCHEDULERS, PerpNegSampler

#: Intermediate random UNet (as ``bench_perpneg.MID_UNET_CONFIG``): SD's layout, much narrower.
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

EXTRA_POOL: Tuple[Tuple[str, float], ...] = (
    ("a cat", -1.5),
    ("blurry, low quality", -0.5),
    ("a red ball", -0.3),
    ("green grass", -0.2),
)


def extras_for(k: int) -> Tuple[List[str], List[float]]:
    pool = [EXTRA_POOL[i % len(EXTRA_POOL)] for i in range(k)]
    texts = [t if i < len(EXTRA_POOL) else f"{t} {i}" for i, (t, _) in enumerate(pool)]
    return texts, [1.0] + [w for _, w in pool]


@contextlib.contextmanager
def _seeded(seed: int) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_sampler(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype, workdir: str
) -> Tuple[PerpNegSampler, str]:
    if args.model:
        sampler = PerpNegSampler.from_pretrained(
            args.model, scheduler=args.scheduler, torch_dtype=dtype, device=device
        )
        return sampler, f"{args.model} (pretrained weights)"
    from threestudio_perpneg.tiny.builders import build_tiny_stable_diffusion

    path = build_tiny_stable_diffusion(os.path.join(workdir, "tiny-sd"), seed=args.seed)
    sampler = PerpNegSampler.from_pretrained(
        str(path), scheduler=args.scheduler, torch_dtype=dtype, device=device
    )
    if args.unet == "tiny":
        return (
            sampler,
            "tiny random SD (threestudio_perpneg.tiny.builders), CLIP text encoder dim 32",
        )

    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    p = sampler.pipe
    cfg = p.text_encoder.config
    with _seeded(args.seed):
        unet = UNet2DConditionModel(**MID_UNET_CONFIG)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=cfg.vocab_size,
                bos_token_id=cfg.bos_token_id,
                eos_token_id=cfg.eos_token_id,
                pad_token_id=cfg.pad_token_id,
                hidden_size=int(MID_UNET_CONFIG["cross_attention_dim"]),
                intermediate_size=512,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=cfg.max_position_embeddings,
                hidden_act="quick_gelu",
            )
        )
    pipe: Any = StableDiffusionPipeline(
        vae=p.vae,
        text_encoder=text_encoder.to(device, dtype).eval(),
        tokenizer=p.tokenizer,
        unet=unet.to(device, dtype).eval(),
        scheduler=p.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return PerpNegSampler(pipe), (
        "mid random UNet (block_out_channels (64, 128, 256), cross_attention_dim 256), "
        "random CLIP text encoder dim 256, tiny VAE"
    )


@torch.no_grad()
def sequential_generate(
    sampler: PerpNegSampler,
    prompt: str,
    extras: Sequence[str],
    weights: Sequence[float],
    seeds: Sequence[int],
    steps: int,
    scale: float,
    height: int,
    width: int,
) -> Tuple[Tensor, List[Any], int]:
    """The official repository's scheme: per image, per step, one batch-1 UNet call per prompt."""
    unet, device, dtype = sampler.unet, sampler.device, sampler.dtype
    uncond = sampler.encode("")[None].to(device, dtype)
    embs = [sampler.encode(t)[None].to(device, dtype) for t in [prompt, *extras]]
    pos = [i for i, w in enumerate(weights) if w > 0]
    neg = [i for i, w in enumerate(weights) if w < 0]
    pos_w = torch.tensor([weights[i] for i in pos], device=device)
    neg_w = torch.tensor([weights[i] for i in neg], device=device)
    f = sampler.vae_scale_factor
    finals, images, calls = [], [], 0
    for seed in seeds:
        sched = type(sampler.scheduler).from_config(sampler.scheduler.config)
        sched.set_timesteps(steps, device=device)
        g = torch.Generator(device=device).manual_seed(seed)
        shape = (1, int(unet.config.in_channels), height // f, width // f)
        lat = torch.randn(shape, generator=g, device=device, dtype=dtype) * sched.init_noise_sigma
        for t in sched.timesteps:
            x = sched.scale_model_input(lat, t)
            eps_u = unet(x, t, encoder_hidden_states=uncond, return_dict=False)[0]
            eps = [unet(x, t, encoder_hidden_states=e, return_dict=False)[0] for e in embs]
            calls += 1 + len(embs)
            noise = perp_neg_guidance(
                eps_u,
                torch.stack([eps[i] for i in pos], dim=1),
                torch.stack([eps[i] for i in neg], dim=1) if neg else None,
                neg_w if neg else None,
                scale,
                pos_weights=pos_w,
            )
            lat = sched.step(noise, t, lat, return_dict=False)[0]
        finals.append(lat)
        images.extend(sampler.decode(lat))
    return torch.cat(finals), images, calls


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(
    fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int
) -> Tuple[float, Any]:
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            [str(cells[0]).ljust(widths[0])]
            + [str(c).rjust(w) for c, w in zip(cells[1:], widths[1:])]
        )

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def _quiet_hf() -> None:
    """No download bars, and the commands' quiet default for diffusers/transformers/accelerate."""
    from threestudio_perpneg.commands.quiet import quiet_third_party

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    quiet_third_party()


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--unet", choices=("tiny", "mid"), default="tiny", help="random UNet size")
    p.add_argument(
        "--model", default=None, help="diffusers folder or cached hub id (overrides --unet)"
    )
    p.add_argument(
        "--scheduler", choices=sorted(SCHEDULERS), default=None, help="default: the model's"
    )
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--fp16", action="store_true", help="float16 models (CUDA only)")
    p.add_argument("--steps", type=int, default=10, help="num_inference_steps")
    p.add_argument("--images", type=int, default=2, help="images (seeds) per call")
    p.add_argument("--extras", default="1,2,4", help="comma-separated K (extra prompts)")
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--prompt", default="a corgi")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: stable ratios on shared CPUs; 0 keeps torch's default)",
    )
    args = p.parse_args(argv)
    for key in ("steps", "images", "repeats", "warmup", "height", "width"):
        if getattr(args, key) < 1:
            p.error(f"--{key}: expected at least 1, got {getattr(args, key)}")
    try:
        args.k_list = [int(x) for x in args.extras.split(",") if x.strip()]
    except ValueError:
        p.error(f"--extras: expected comma-separated integers, got {args.extras!r}")
    if not args.k_list or min(args.k_list) < 0:
        p.error(f"--extras: expected integers >= 0, got {args.extras!r}")
    for key in ("height", "width"):
        if getattr(args, key) % 8:
            p.error(f"--{key}: expected a multiple of 8, got {getattr(args, key)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.fp16 and device.type != "cuda":
        print("bench_sampler: error: --fp16 needs a CUDA device", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = torch.float16 if args.fp16 else torch.float32
    import diffusers

    _quiet_hf()
    with tempfile.TemporaryDirectory(prefix="bench-sampler-") as workdir:
        t0 = time.perf_counter()
        sampler, what = build_sampler(args, device, dtype, workdir)
        build_s = time.perf_counter() - t0
        n_unet = sum(p.numel() for p in sampler.unet.parameters()) / 1e6
        print("2D Perp-Neg sampler benchmark (threestudio_perpneg.sampler.pipeline)")
        print(
            f"  python {platform.python_version()}, torch {torch.__version__}, diffusers "
            f"{diffusers.__version__}, device {device}"
            + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
            + f", {torch.get_num_threads()} CPU threads, dtype {str(dtype).replace('torch.', '')}"
        )
        print(f"  model: {what}; UNet {n_unet:.2f}M parameters; built/loaded in {build_s:.1f} s")
        print(
            f"  {args.images} image(s) of {args.height}x{args.width}, {args.steps} steps "
            f"({type(sampler.scheduler).__name__}), guidance scale {args.guidance_scale}; "
            f"median of {args.repeats} after {args.warmup} warm-up; VAE decode included"
        )
        seeds = list(range(args.seed, args.seed + args.images))
        rows = []
        for k in args.k_list:
            extras, weights = extras_for(k)

            def ours(extras: List[str] = extras, weights: List[float] = weights) -> Any:
                return sampler.generate(
                    args.prompt,
                    extras,
                    weights,
                    num_inference_steps=args.steps,
                    guidance_scale=args.guidance_scale,
                    height=args.height,
                    width=args.width,
                    seeds=seeds,
                    progress=False,
                )

            def sequential(extras: List[str] = extras, weights: List[float] = weights) -> Any:
                return sequential_generate(
                    sampler,
                    args.prompt,
                    extras,
                    weights,
                    seeds,
                    args.steps,
                    args.guidance_scale,
                    args.height,
                    args.width,
                )

            t_ours, res = _time(ours, device, args.warmup, args.repeats)
            t_seq, (lat_seq, _, seq_calls) = _time(sequential, device, args.warmup, args.repeats)
            diff = (res.latents.float() - lat_seq.float()).abs().max().item()
            rel = diff / max(lat_seq.float().abs().max().item(), 1e-12)
            n = args.images
            rows.append(
                [
                    f"{k}",
                    f"{res.unet_calls} x {n * (2 + k)} rows",
                    f"{seq_calls} x 1 row",
                    f"{1e3 * t_ours / n:.1f}",
                    f"{1e3 * t_seq / n:.1f}",
                    f"{t_seq / t_ours:.2f}x",
                    f"{diff:.2e} ({rel:.1e} rel)",
                ]
            )
        print()
        print(
            _table(
                [
                    "K extras",
                    "ours: UNet calls (all images)",
                    "sequential: UNet calls (all images)",
                    "ours ms/image",
                    "sequential ms/image",
                    "speed-up",
                    "max |latent diff|",
                ],
                rows,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
