"""Part (b): wall time of one guidance step (SDS, DeepFloyd IF SDS or VSD) per method, in the same
run on the same UNet, with the UNet branches and losses of every method."""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from threestudio_perpneg.core.conditioning import StepConditioning, step_conditioning
from threestudio_perpneg.core.controls import PerpNegControls
from threestudio_perpneg.core.views import ViewThresholds, make_scheme
from threestudio_perpneg.engines.sd import PerpNegSDSEngine, SDSSettings, sds_step

from .cameras import SCHEME_NAMES, c2w_matrices, sample_cameras, threestudio_style_conditioning
from .models import build_if, build_models, n_params, seeded

GUIDANCES: Dict[str, Tuple[str, ...]] = {
    "sd": ("sd",),
    "if": ("if",),
    "vsd": ("vsd",),
    "all": ("sd", "if", "vsd"),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_guidance(
    guidance: str,
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    thresholds: ViewThresholds,
    workdir: str,
) -> Dict[str, Any]:
    """Part (b) for one guidance: per-step times, UNet branches and losses of every method."""
    b = args.batch_size
    t0 = time.perf_counter()
    lora: Any = None
    lora_scheduler: Any = None
    if guidance == "if":
        from threestudio_perpneg.engines.pixel import PerpNegIFEngine, if_sds_step

        unet, scheduler, bank, what = build_if(args, device, dtype, workdir)
        engine: PerpNegSDSEngine = PerpNegIFEngine(
            unet, scheduler, weights_dtype=dtype, device=device
        )
    else:
        unet, vae, scheduler, bank, what = build_models(args, device, dtype, workdir)
        engine = PerpNegSDSEngine(unet, vae, scheduler, weights_dtype=dtype, device=device)
        if guidance == "vsd":
            from diffusers import DDPMScheduler

            from threestudio_perpneg.engines.vsd import LoRAUNet

            with seeded(args.seed + 3):
                lora = LoRAUNet(unet, weights_dtype=dtype)
            lora_scheduler = DDPMScheduler.from_config(scheduler.config)
            what += "; LoRA rank 4 on the same UNet (LoRAUNet), camera embedding"
    build_s = time.perf_counter() - t0
    if guidance == "vsd":
        from threestudio_perpneg.engines.vsd import VSDSettings, vsd_step

        vsd_settings = VSDSettings()
        guidance_scale = vsd_settings.guidance_scale
    else:
        settings = SDSSettings(guidance_scale=args.guidance_scale)
        guidance_scale = args.guidance_scale
    n_t = engine.num_train_timesteps
    min_step, max_step = int(n_t * args.min_step_percent), int(n_t * args.max_step_percent)

    gen = torch.Generator().manual_seed(args.seed + 2)
    n_cams = args.steps
    elev, azim, dist = sample_cameras(
        n_cams,
        b,
        args.elevation_range,
        args.azimuth_range,
        args.camera_distance_range,
        batch_uniform_azimuth=not args.no_batch_uniform_azimuth,
        generator=gen,
    )
    channels = 3 if (args.with_vae or guidance == "if") else 4
    size = 64
    renders = [torch.rand(b, size, size, channels, generator=gen).to(device) for _ in range(n_cams)]
    cameras = [c2w_matrices(elev[k], azim[k], dist[k]).to(device) for k in range(n_cams)]
    schemes = {name: make_scheme(name) for name in SCHEME_NAMES}

    conditioners: Dict[str, Callable[[Tensor, Tensor], StepConditioning]] = {
        "vanilla": lambda e, a: step_conditioning(
            bank, e, a, scheme=schemes["threestudio"], thresholds=thresholds, perp_neg=False
        ),
        "threestudio-4B": lambda e, a: threestudio_style_conditioning(
            bank, e, a, schemes["threestudio"], thresholds
        ),
    }
    for name in SCHEME_NAMES:
        conditioners[f"ours-{name}"] = lambda e, a, s=schemes[name]: step_conditioning(
            bank, e, a, scheme=s, thresholds=thresholds, min_weight=args.min_weight
        )
    methods = ["vanilla", "ours-threestudio", "ours-authors", "threestudio-4B"]
    controls_of: Dict[str, Optional[PerpNegControls]] = {}
    if args.controls:
        from controls_variants import VARIANTS

        for name, (_label, ctl) in VARIANTS.items():
            conditioners[name] = conditioners["ours-threestudio"]
            controls_of[name] = ctl
            methods.append(name)
    losses: Dict[str, List[float]] = {m: [] for m in methods}
    lora_rows = [0]
    if lora is not None:
        lora.register_forward_pre_hook(
            lambda _mod, inputs: lora_rows.__setitem__(0, lora_rows[0] + inputs[0].shape[0])
        )

    def step(method: str, k: int, record: bool = False) -> None:
        e, a, d = elev[k], azim[k], dist[k]
        cond = conditioners[method](e, a)
        rgb = renders[k].detach().requires_grad_(True)
        g = torch.Generator(device=device).manual_seed(args.seed * 1000 + k)
        common = dict(
            min_step=min_step, max_step=max_step, generator=g, controls=controls_of.get(method)
        )
        if guidance == "if":
            out = if_sds_step(
                engine,  # type: ignore[arg-type]
                rgb,
                cond,
                settings,
                elevation=e,
                azimuth=a,
                camera_distances=d,
                **common,  # type: ignore[arg-type]
            )
            loss = out["loss_sds"]
        elif guidance == "vsd":
            lora.zero_grad(set_to_none=True)
            prompt = bank.prompt.expand(b, -1, -1)
            out = vsd_step(
                engine,
                lora,
                lora_scheduler,
                rgb,
                cond,
                prompt,
                cameras[k],
                vsd_settings,
                rgb_as_latents=not args.with_vae,
                **common,  # type: ignore[arg-type]
            )
            loss = out["loss_vsd"]
            (out["loss_vsd"] + out["loss_lora"]).backward()
        else:
            out = sds_step(
                engine,
                rgb,
                cond,
                settings,
                elevation=e,
                azimuth=a,
                camera_distances=d,
                rgb_as_latents=not args.with_vae,
                **common,  # type: ignore[arg-type]
            )
            loss = out["loss_sds"]
        if guidance != "vsd":
            loss.backward()
        if record:
            losses[method].append(float(loss.detach()))

    # Warm-up: untimed passes over the camera batches; the first records the losses.
    for w in range(args.warmup):
        for m in methods:
            for k in range(args.steps):
                step(m, k, record=w == 0)
    sync(device)

    times: Dict[str, List[float]] = {m: [] for m in methods}
    branches: Dict[str, float] = {}
    lora_per_step: Dict[str, float] = {}
    for r in range(args.repeats):
        order = methods[r % len(methods) :] + methods[: r % len(methods)]
        for m in order:
            before, lora_before = engine.unet_branches, lora_rows[0]
            sync(device)
            t_start = time.perf_counter()
            for k in range(args.steps):
                step(m, k)
            sync(device)
            times[m].append((time.perf_counter() - t_start) / args.steps)
            branches[m] = (engine.unet_branches - before) / args.steps
            lora_per_step[m] = (lora_rows[0] - lora_before) / args.steps
    return {
        "methods": methods,
        "times": times,
        "branches": branches,
        "lora_rows": lora_per_step if lora is not None else None,
        "losses": losses,
        "what": what,
        "params": n_params(unet),
        "lora_params": n_params(lora) if lora is not None else None,
        "build_s": build_s,
        "min_step": min_step,
        "max_step": max_step,
        "guidance_scale": guidance_scale,
    }
