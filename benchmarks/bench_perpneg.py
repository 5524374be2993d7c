#!/usr/bin/env python
"""Cost of our Perp-Neg SDS step against vanilla SDS and threestudio's built-in Perp-Neg.

Two parts, both over threestudio's random-camera distribution (``random-camera-datamodule``):

(a) UNet branches per step, pure counting over many sampled camera batches: vanilla SDS evaluates
    2·B branches, threestudio's built-in Perp-Neg always 4·B (positive, unconditional and two view
    negatives per sample, overhead views included with zero-weight dummies), ours 2·B plus one per
    negative whose weight is non-zero, for both weight schemes (threestudio's and the authors').

(b) Wall time of one SDS step (conditioning + :func:`sds_step` + backward to the render), in the
    same run on the same UNet: vanilla SDS (our engine with ``perp_neg=False``), ours, and a
    threestudio-style step emulated with the same engine and a batch of 4·B UNet rows (the two
    view negatives of every sample are evaluated, zero weights included, as threestudio does).
    Warm-up, then several repeats over the same camera batches with the same timesteps and noise;
    median per-step times and their ratios are printed.

With ``--guidance if|vsd|all`` part (b) is repeated for DeepFloyd IF stage I SDS
(:func:`~threestudio_perpneg.engines.pixel.if_sds_step`, pixel space, tiny random IF from
:func:`~threestudio_perpneg.tiny.builders.build_tiny_deepfloyd_if` unless ``--if-model``) and for VSD
(:func:`~threestudio_perpneg.engines.vsd.vsd_step` with a :class:`~threestudio_perpneg.engines.vsd.LoRAUNet` on the
same SD UNet; the table adds the LoRA rows per step, 2·B guided + B training, which Perp-Neg leaves
alone). Part (a) is the same for every prior: it depends only on the cameras.

Camera sampling follows threestudio's ``RandomCameraIterableDataset.collate``: elevation is, per
batch with probability 1/2, uniform in degrees over ``elevation_range``, otherwise uniform on the
sphere (inverse-sine sampling); azimuth is uniform over ``azimuth_range`` and, with
``batch_uniform_azimuth`` (threestudio's default), stratified so a batch covers the whole range.
threestudio's datamodule defaults are ``elevation_range=(-10, 90)``, ``batch_size=1``;
``configs/dreamfusion-sd.yaml`` uses ``elevation_range: [-10, 45]``.

Examples::

    python benchmarks/bench_perpneg.py                      # tiny random SD, CPU, < 1 minute
    python benchmarks/bench_perpneg.py --guidance all       # SD, DeepFloyd IF and VSD, < 3 minutes
    python benchmarks/bench_perpneg.py --unet mid           # intermediate random UNet, CPU
    python benchmarks/bench_perpneg.py --unet full --device cuda --fp16 --batch-size 4
    python benchmarks/bench_perpneg.py --model stabilityai/stable-diffusion-2-1-base --fp16

With ``--controls`` both parts add the Perp-Neg controls of issue 12 (``perp_neg_sampling: one``,
two ``perp_neg_t_range`` windows, a decaying ``perp_neg_weight_scale``; see ``controls_variants.py``)
on the ``threestudio`` weights: rows per step over the camera and timestep distribution, and their
step time against vanilla and the threestudio-style 4·B step in the same run.

This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from threestudio_perpneg.core.conditioning import PromptBank, StepConditioning, step_conditioning
from threestudio_perpneg.core.controls import PerpNegControls
from threestudio_perpneg.core.views import FRONT, SIDE, ViewThresholds, make_scheme, view_weights
from threestudio_perpneg.engines.sd import (
    PerpNegSDSEngine,
    SDSSettings,
    load_stable_diffusion,
    sds_step,
)

SCHEME_NAMES = ("threestudio", "authors")

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


# ------------------------------------------------------------------------- cameras
def sample_cameras(
    n_batches: int,
    batch_size: int,
    elevation_range: Sequence[float],
    azimuth_range: Sequence[float],
    camera_distance_range: Sequence[float],
    *,
    batch_uniform_azimuth: bool,
    generator: torch.Generator,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(elevation, azimuth, distance), each ``[n_batches, batch_size]``, threestudio's sampler."""
    lo, hi = (float(x) for x in elevation_range)
    shape = (n_batches, batch_size)
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    uniform_deg = u * (hi - lo) + lo
    s_lo, s_hi = math.sin(math.radians(lo)), math.sin(math.radians(hi))
    on_sphere = torch.rad2deg(torch.asin(u * (s_hi - s_lo) + s_lo))
    # threestudio draws the choice once per batch (python's random.random() < 0.5).
    pick_uniform = torch.rand((n_batches, 1), generator=generator, dtype=torch.float64) < 0.5
    elevation = torch.where(pick_uniform, uniform_deg, on_sphere)

    a_lo, a_hi = (float(x) for x in azimuth_range)
    v = torch.rand(shape, generator=generator, dtype=torch.float64)
    if batch_uniform_azimuth:
        v = (v + torch.arange(batch_size, dtype=torch.float64)) / batch_size
    azimuth = v * (a_hi - a_lo) + a_lo

    d_lo, d_hi = (float(x) for x in camera_distance_range)
    distance = torch.rand(shape, generator=generator, dtype=torch.float64) * (d_hi - d_lo) + d_lo
    return elevation.float(), azimuth.float(), distance.float()


# --------------------------------------------------------------------- conditioning
def threestudio_style_conditioning(
    bank: PromptBank,
    elevation: Tensor,
    azimuth: Tensor,
    scheme: Any,
    thresholds: ViewThresholds,
) -> StepConditioning:
    """Our conditioning padded to threestudio's 4·B rows: front and side negatives for every
    sample, zero-weight ones (overhead views, cut-offs) included, so the UNet runs 4·B branches
    and the guided prediction equals ours."""
    ours = step_conditioning(bank, elevation, azimuth, scheme=scheme, thresholds=thresholds)
    b = elevation.shape[0]
    vw = view_weights(
        elevation.to(bank.views.device), azimuth.to(bank.views.device), scheme, thresholds
    )
    cols = torch.tensor([FRONT, SIDE], device=bank.views.device)
    weights = vw.negative_weights[:, cols].to(bank.views.dtype)  # [B, 2]
    index = torch.arange(b, device=bank.views.device).repeat_interleave(2)
    return StepConditioning(
        positive=ours.positive,
        uncond=ours.uncond,
        negative=bank.views[cols.repeat(b)],
        negative_index=index,
        negative_weight=weights.reshape(-1),
        view=ours.view,
        perp_neg=True,
    )


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


# --------------------------------------------------------------------------- models
def _n_params(module: Any) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
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
    with _seeded(args.seed):
        unet = UNet2DConditionModel(**config)
    vae = None
    if args.with_vae:
        with _seeded(args.seed + 1):
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


# -------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_branches(
    args: argparse.Namespace, thresholds: ViewThresholds
) -> Tuple[List[List[str]], Dict[str, float]]:
    """Rows of table (a) and the mean branches per step of each method."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    n, b = args.count_batches, args.batch_size
    elev, azim, _ = sample_cameras(
        n,
        b,
        args.elevation_range,
        args.azimuth_range,
        args.camera_distance_range,
        batch_uniform_azimuth=not args.no_batch_uniform_azimuth,
        generator=gen,
    )
    bank = PromptBank(
        prompt=torch.zeros(1, 1),
        views=torch.zeros(4, 1, 1),
        uncond=torch.zeros(4, 1, 1),
        negatives=torch.zeros(0, 1, 1),
        negative_weights=torch.zeros(0),
    )
    rows = []
    means: Dict[str, float] = {"vanilla": 2.0 * b, "threestudio-4B": 4.0 * b}
    rows.append(["vanilla SDS (CFG)", f"{2 * b}", f"{2 * b}", f"{2 * b}", "0.500", "1.000"])
    rows.append(
        ["threestudio built-in Perp-Neg", f"{4 * b}", f"{4 * b}", f"{4 * b}", "1.000", "2.000"]
    )
    for name in SCHEME_NAMES:
        scheme = make_scheme(name)
        cond = step_conditioning(
            bank,
            elev.reshape(-1),
            azim.reshape(-1),
            scheme=scheme,
            thresholds=thresholds,
            min_weight=args.min_weight,
        )
        per_step = 2 * b + torch.bincount(cond.negative_index // b, minlength=n).double()
        mean = float(per_step.mean())
        means[f"ours-{name}"] = mean
        rows.append(
            [
                f"ours, {name} weights",
                f"{mean:.3f}",
                f"{int(per_step.min())}",
                f"{int(per_step.max())}",
                f"{mean / (4 * b):.3f}",
                f"{mean / (2 * b):.3f}",
            ]
        )
    return rows, means


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = str(cells[0]).ljust(widths[0])
        rest = [str(c).rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join([first, *rest])

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def _quiet_hf() -> None:
    """No download bars, and the commands' quiet default for diffusers/transformers/accelerate."""
    from threestudio_perpneg.commands.quiet import quiet_third_party

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    quiet_third_party()


# ------------------------------------------------------------------- other priors
GUIDANCES: Dict[str, Tuple[str, ...]] = {
    "sd": ("sd",),
    "if": ("if",),
    "vsd": ("vsd",),
    "all": ("sd", "if", "vsd"),
}

GUIDANCE_TITLES = {
    "sd": "SDS",
    "if": "DeepFloyd IF SDS",
    "vsd": "VSD",
}


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


def c2w_matrices(elevation: Tensor, azimuth: Tensor, distance: Tensor) -> Tensor:
    """Camera-to-world ``[B, 4, 4]`` looking at the origin, z up (threestudio's convention)."""
    e, a = torch.deg2rad(elevation.float()), torch.deg2rad(azimuth.float())
    pos = torch.stack(
        [distance * torch.cos(e) * torch.cos(a), distance * torch.cos(e) * torch.sin(a),
         distance * torch.sin(e)],
        dim=-1,
    )  # fmt: skip
    up = torch.tensor([0.0, 0.0, 1.0]).expand_as(pos)
    lookat = torch.nn.functional.normalize(-pos, dim=-1)
    right = torch.nn.functional.normalize(torch.cross(lookat, up, dim=-1), dim=-1)
    up = torch.nn.functional.normalize(torch.cross(right, lookat, dim=-1), dim=-1)
    c2w = torch.zeros(pos.shape[0], 4, 4)
    c2w[:, :3, :3] = torch.stack([right, up, -lookat], dim=-1)
    c2w[:, :3, 3] = pos
    c2w[:, 3, 3] = 1.0
    return c2w


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

            with _seeded(args.seed + 3):
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
    _sync(device)

    times: Dict[str, List[float]] = {m: [] for m in methods}
    branches: Dict[str, float] = {}
    lora_per_step: Dict[str, float] = {}
    for r in range(args.repeats):
        order = methods[r % len(methods) :] + methods[: r % len(methods)]
        for m in order:
            before, lora_before = engine.unet_branches, lora_rows[0]
            _sync(device)
            t_start = time.perf_counter()
            for k in range(args.steps):
                step(m, k)
            _sync(device)
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
        "params": _n_params(unet),
        "lora_params": _n_params(lora) if lora is not None else None,
        "build_s": build_s,
        "min_step": min_step,
        "max_step": max_step,
        "guidance_scale": guidance_scale,
    }


def report(
    guidance: str,
    args: argparse.Namespace,
    res: Dict[str, Any],
    means: Dict[str, float],
    dtype: torch.dtype,
) -> None:
    """Prints part (b) of one guidance."""
    b = args.batch_size
    methods, times, branches = res["methods"], res["times"], res["branches"]
    min_step, max_step = res["min_step"], res["max_step"]
    med = {m: statistics.median(times[m]) for m in methods}
    title = GUIDANCE_TITLES[guidance]
    if guidance == "sd":
        labels = {
            "vanilla": "vanilla SDS (ours, perp_neg=False)",
            "ours-threestudio": "ours Perp-Neg, threestudio weights",
            "ours-authors": "ours Perp-Neg, authors weights",
            "threestudio-4B": "threestudio-style Perp-Neg (4B rows)",
        }
        head = "(b)"
    else:
        labels = {
            "vanilla": f"vanilla {title} (ours, perp_neg=False)",
            "ours-threestudio": "ours Perp-Neg, threestudio weights",
            "ours-authors": "ours Perp-Neg, authors weights",
            "threestudio-4B": "threestudio-style Perp-Neg (4B rows)",
        }
        head = f"(b, {guidance})"
    if args.controls:
        from controls_variants import VARIANTS

        labels.update({name: label for name, (label, _ctl) in VARIANTS.items()})
    step_name = "VSD" if guidance == "vsd" else "SDS"
    print()
    print(
        f"{head} wall time per {step_name} step{'' if guidance in ('sd', 'vsd') else f' ({title})'}: "
        f"{args.steps} camera batches x {args.repeats} repeats after "
        f"{args.warmup} warm-up pass(es), median of repeats"
    )
    print(
        f"  UNet: {res['what']}; {res['params']:.1f}M parameters, "
        f"{str(dtype).replace('torch.', '')}"
        + (f"; LoRA {res['lora_params'] * 1e3:.1f}K parameters" if res["lora_params"] else "")
    )
    if guidance == "sd":
        print(
            f"  step = conditioning + sds_step ({'VAE encode of 512x512 renders' if args.with_vae else 'rgb_as_latents=True, no VAE'}) "
            f"+ backward; guidance_scale {args.guidance_scale}, t in [{min_step}, {max_step}]; "
            f"models built in {res['build_s']:.1f} s"
        )
    elif guidance == "if":
        print(
            "  step = conditioning + if_sds_step (64x64 RGB renders, pixel space, 6-channel UNet) "
            f"+ backward; guidance_scale {res['guidance_scale']}, t in [{min_step}, {max_step}]; "
            f"models built in {res['build_s']:.1f} s"
        )
    else:
        print(
            f"  step = conditioning + vsd_step ({'VAE encode of 512x512 renders' if args.with_vae else 'rgb_as_latents=True, no VAE'}; "
            "pretrained branch + LoRA guided prediction + LoRA loss) + backward of "
            f"loss_vsd + loss_lora; guidance_scale {res['guidance_scale']} (cfg, threestudio's VSD "
            f"default), t in [{min_step}, {max_step}]; models built in {res['build_s']:.1f} s"
        )
    rows_b = []
    for m in methods:
        spread = f"{min(times[m]) * 1e3:.1f}-{max(times[m]) * 1e3:.1f}"
        row = [labels[m], f"{branches[m]:.2f}"]
        if res["lora_rows"] is not None:
            row.append(f"{res['lora_rows'][m]:.2f}")
        row += [
            f"{med[m] * 1e3:.2f}",
            spread,
            f"{med[m] / med['vanilla']:.3f}",
            f"{med[m] / med['threestudio-4B']:.3f}",
        ]
        rows_b.append(row)
    header = ["method", "branches/step"]
    if res["lora_rows"] is not None:
        header.append("LoRA rows/step")
    header += ["median ms", "range ms", "vs vanilla", "vs 4B"]
    print(_table(header, rows_b))

    # Equivalence: zero-weight negatives contribute nothing, so ours and the 4B emulation agree.
    losses = res["losses"]
    a_, b_ = losses["ours-threestudio"], losses["threestudio-4B"]
    rel = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a_, b_))
    loss_name = "loss_vsd" if guidance == "vsd" else "loss_sds"
    print()
    print(
        f"check: {loss_name} of ours (threestudio weights) vs the 4B emulation over {len(a_)} steps, "
        f"max relative difference {rel:.2e} (same t and noise; expected ~0 up to float rounding)"
    )
    # Cost model: linear in UNet rows between the vanilla (2B) and 4B measurements.
    t2, t4 = med["vanilla"], med["threestudio-4B"]

    def linear(rows: float) -> float:
        return t2 + (t4 - t2) * (rows - 2 * b) / (2 * b)

    for name in SCHEME_NAMES:
        m = f"ours-{name}"
        print(
            f"{m}: timed batches average {branches[m]:.2f} branches/step (distribution mean "
            f"{means[m]:.2f}); linear-in-rows model predicts {linear(branches[m]) * 1e3:.2f} ms, "
            f"measured {med[m] * 1e3:.2f} ms; at the distribution mean: "
            f"{linear(means[m]) / t2:.3f}x vanilla, {linear(means[m]) / t4:.3f}x the 4B step"
        )


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--unet", choices=("tiny", "mid", "full"), default="tiny", help="random UNet size"
    )
    p.add_argument(
        "--model",
        default=None,
        help="diffusers folder or cached hub id (real weights; overrides --unet)",
    )
    p.add_argument("--prompt", default="a corgi", help="prompt for CLIP embeddings (tiny/--model)")
    p.add_argument(
        "--guidance",
        choices=tuple(GUIDANCES),
        default="sd",
        help="prior(s) of part (b): Stable Diffusion SDS, DeepFloyd IF SDS, VSD, or all three",
    )
    p.add_argument(
        "--if-model",
        default=None,
        help="DeepFloyd IF stage I folder or cached hub id (default: tiny random IF)",
    )
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--fp16", action="store_true", help="UNet/VAE in float16 (CUDA only)")
    p.add_argument("--steps", type=int, default=6, help="timed camera batches per repeat")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed passes over the camera batches per method"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--batch-size", type=int, default=1, help="cameras per step (threestudio default 1)"
    )
    p.add_argument(
        "--elevation-range",
        type=float,
        nargs=2,
        default=(-10.0, 90.0),
        metavar=("LO", "HI"),
        help="degrees; threestudio datamodule default -10 90 (dreamfusion-sd.yaml: -10 45)",
    )
    p.add_argument(
        "--azimuth-range", type=float, nargs=2, default=(-180.0, 180.0), metavar=("LO", "HI")
    )
    p.add_argument(
        "--camera-distance-range", type=float, nargs=2, default=(1.0, 1.5), metavar=("LO", "HI")
    )
    p.add_argument(
        "--no-batch-uniform-azimuth",
        action="store_true",
        help="i.i.d. azimuths instead of threestudio's default stratified batch",
    )
    p.add_argument("--count-batches", type=int, default=20000, help="camera batches for part (a)")
    p.add_argument("--with-vae", action="store_true", help="encode 512x512 renders with the VAE")
    p.add_argument(
        "--min-weight",
        type=float,
        default=0.0,
        help="ours: skip negatives with |w| <= this (perp_neg_min_weight, default 0)",
    )
    p.add_argument(
        "--controls",
        action="store_true",
        help="also count and time the Perp-Neg controls (sampling one, t windows, weight scale)",
    )
    p.add_argument("--guidance-scale", type=float, default=100.0)
    p.add_argument("--min-step-percent", type=float, default=0.02)
    p.add_argument("--max-step-percent", type=float, default=0.98)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: stable ratios on shared CPUs; 0 keeps torch's default)",
    )
    args = p.parse_args(argv)
    for key in ("steps", "repeats", "batch_size", "count_batches"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')}: expected at least 1, got {getattr(args, key)}")
    if args.warmup < 1:
        p.error(f"--warmup: expected at least 1, got {args.warmup}")
    if not math.isfinite(args.min_weight) or args.min_weight < 0:
        p.error(f"--min-weight: expected a finite number >= 0, got {args.min_weight}")
    lo, hi = args.elevation_range
    if not -90.0 <= lo <= hi <= 90.0:
        p.error(f"--elevation-range: expected -90 <= LO <= HI <= 90, got {lo} {hi}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.fp16 and device.type != "cuda":
        print("bench_perpneg: error: --fp16 needs a CUDA device", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = torch.float16 if args.fp16 else torch.float32
    thresholds = ViewThresholds()
    b = args.batch_size

    import diffusers

    _quiet_hf()

    print("Perp-Neg benchmark (threestudio_perpneg)")
    print(
        f"  python {platform.python_version()}, torch {torch.__version__}, diffusers "
        f"{diffusers.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f", {torch.get_num_threads()} CPU threads"
    )
    print(
        f"  cameras: threestudio random-camera-datamodule sampler, batch_size {b}, elevation "
        f"{tuple(args.elevation_range)}, azimuth {tuple(args.azimuth_range)}, "
        f"batch_uniform_azimuth {not args.no_batch_uniform_azimuth}; view thresholds "
        f"front {thresholds.front}, back {thresholds.back}, overhead {thresholds.overhead}; "
        f"ours skips negatives with |w| <= {args.min_weight}"
    )

    # (a) counting
    rows, means = count_branches(args, thresholds)
    print()
    print(f"(a) UNet branches per step, mean over {args.count_batches} sampled camera batches")
    print(
        _table(
            ["method", "mean", "min", "max", "vs threestudio 4B", "vs vanilla 2B"],
            rows,
        )
    )
    if args.controls:
        from controls_variants import count_rows

        gen = torch.Generator().manual_seed(args.seed + 1)
        elev, azim, _ = sample_cameras(
            args.count_batches,
            b,
            args.elevation_range,
            args.azimuth_range,
            args.camera_distance_range,
            batch_uniform_azimuth=not args.no_batch_uniform_azimuth,
            generator=gen,
        )
        lo, hi = int(1000 * args.min_step_percent), int(1000 * args.max_step_percent)
        print()
        print(
            f"(a, controls) UNet rows per step with the Perp-Neg controls, threestudio weights, "
            f"t ~ U{{{lo}..{hi}}} per sample, same camera batches"
        )
        print(
            _table(
                ["variant", "mean", "min", "max", "vs threestudio 4B", "vs vanilla 2B"],
                count_rows(elev, azim, b, thresholds, lo, hi, args.min_weight, args.seed + 5),
            )
        )
    if args.guidance != "sd":
        print(
            "  (the same for every prior: SD, DeepFloyd IF and VSD's pretrained branch; the "
            "branches depend only on the cameras)"
        )

    for guidance in GUIDANCES[args.guidance]:
        if guidance == "vsd":
            print()
            print(
                "(a') VSD: the pretrained branch counts as above (Perp-Neg applies to it only); the "
                "LoRA model adds, per step, 2·B rows of its camera/zero-camera guided prediction "
                f"and B·n rows of its training loss (n = lora_n_timestamp_samples = 1): "
                f"{3 * b} LoRA rows, independent of the cameras and of Perp-Neg"
            )
        with tempfile.TemporaryDirectory(prefix="bench-perpneg-") as workdir:
            result = time_guidance(guidance, args, device, dtype, thresholds, workdir)
        report(guidance, args, result, means, dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
