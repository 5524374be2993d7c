"""CPU smoke command and 2D Perp-Neg SDS playground.

``python -m threestudio_perpneg smoke`` optimises one RGB image per camera azimuth with Perp-Neg
score distillation through the same code a threestudio run uses: :func:`load_stable_diffusion`,
:func:`text_embeddings` (with its safetensors cache), :class:`PromptBank`,
:func:`step_conditioning` and :func:`sds_step` with ``rgb_as_latents=False`` (renders resized to
512 and VAE-encoded). All azimuths share one batched UNet call per step.

Without ``--model`` a tiny seeded random Stable Diffusion checkpoint is built into
``<out>/tiny-sd`` (reused on later runs) so the whole pipeline runs on a CPU in seconds; with
``--model`` any diffusers Stable Diffusion folder or hub id is used (``--device cuda --fp16`` for a
real model).

The command line (options, types, checks) is :mod:`.smoke_args`.

Outputs, written atomically: ``<out>/grid.png`` (one labelled tile per azimuth) and
``<out>/smoke.json`` (settings, library versions, per-azimuth view bucket, r, positive mix, negative
weights, UNet branches and losses, per-step branches and losses).
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..common.io import output_folder, pil_nearest
from ..core.conditioning import PromptBank, StepConditioning, step_conditioning
from ..core.text import resolve_pretrained, text_embeddings, view_prompts
from ..core.views import VIEW_NAMES, ViewThresholds, make_scheme, view_weights
from ..engines.sd import (
    PerpNegSDSEngine,
    SDSSettings,
    branch_counts,
    load_stable_diffusion,
    sds_step,
)
from .common import (
    atomic_write,
    build_tiny,
    first_line,
    output_file_slots,
    run_command,
    tiny_path,
    versions,
    write_json,
)
from .quiet import quiet_third_party
from .smoke_args import AZIMUTH_RANGE, SmokeError, add_arguments, build_parser, resolve_args

__all__ = [
    "AZIMUTH_RANGE",
    "SmokeError",
    "add_arguments",
    "build_parser",
    "run_smoke",
    "grid_geometry",
    "MIN_TILE",
    "LABEL_HEIGHT",
    "MAX_COLUMNS",
    "MIN_STEP",
    "MAX_STEP",
]

#: threestudio's default timestep range, 0.02–0.98 of 1000 training timesteps.
MIN_STEP = 20
MAX_STEP = 980
#: Grid tiles are the final images upscaled (nearest, integer factor) to at least this many pixels.
MIN_TILE = 128
#: Height of the caption band under each tile.
LABEL_HEIGHT = 16
#: Tiles per grid row.
MAX_COLUMNS = 8
CACHE_DIR = "cache"
#: Files written into ``--out`` (besides the ``tiny-sd/`` and ``cache/`` folders).
OUTPUT_FILES = ("grid.png", "smoke.json")
TINY_NOTE = (
    "NOTE: no --model given: using a tiny RANDOM Stable Diffusion checkpoint ({path}); the tiles "
    "are noise because the model is random, not a test of image quality. Pass --model "
    "stabilityai/stable-diffusion-2-1-base (or a local diffusers folder) with --device cuda --fp16 "
    "for real images."
)


# ------------------------------------------------------------------------------------- helpers
def _num(x: Any) -> Optional[float]:
    """A JSON number (non-finite values become null so the file stays valid JSON)."""
    v = float(x)
    return v if math.isfinite(v) else None


class _RecordingEngine(PerpNegSDSEngine):
    """Keeps the step's latents (with their gradient) to split the batch loss per sample."""

    latents: Optional[Tensor] = None

    def encode_images(self, imgs: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        latents = super().encode_images(imgs, generator=generator)
        if latents.requires_grad:
            latents.retain_grad()
        self.latents = latents
        return latents


def _load_models(
    pretrained: str, device: torch.device, dtype: torch.dtype, prompts: Sequence[str], cache: Path
) -> Tuple[Any, Any, Any, Dict[str, Tensor]]:
    unet, vae, scheduler = load_stable_diffusion(pretrained, dtype=dtype, device=device)
    emb = text_embeddings(pretrained, list(prompts), cache, device=device)
    return unet, vae, scheduler, emb


def _prepare_model(
    ns: argparse.Namespace,
    out: Path,
    device: torch.device,
    dtype: torch.dtype,
    prompts: Sequence[str],
) -> Tuple[str, str, Tuple[Any, Any, Any, Dict[str, Tensor]]]:
    """(model path or id, source, (unet, vae, scheduler, embeddings)) loaded the real-run way."""
    cache = out / CACHE_DIR
    if ns.model is not None:
        try:
            resolved = resolve_pretrained(ns.model, key="--model")
        except (FileNotFoundError, ValueError) as err:
            raise SmokeError(first_line(err), 2) from None
        try:
            return resolved, "--model", _load_models(resolved, device, dtype, prompts, cache)
        except (OSError, ValueError) as err:
            msg = first_line(err).replace("pretrained_model_name_or_path: ", "", 1)
            raise SmokeError(f"--model {ns.model!r}: {msg}", 2) from err

    tiny = tiny_path(out)  # one cache key whether built or reused
    if tiny.exists() and not tiny.is_dir():
        raise SmokeError(
            f"--out {ns.out!r}: {str(tiny)!r} is a file; the tiny checkpoint needs that name "
            "for a folder (remove the file or choose another --out)",
            2,
        )
    if tiny.is_dir():
        try:
            return (
                str(tiny),
                "tiny (reused)",
                _load_models(str(tiny), device, dtype, prompts, cache),
            )
        except Exception as err:  # any unloadable leftover is rebuilt, never trusted
            print(f"{tiny} does not load ({first_line(err)}); rebuilding it", file=sys.stderr)
    # Embeddings cached for a previous tiny checkpoint at the same path would be stale.
    shutil.rmtree(cache, ignore_errors=True)
    path = build_tiny(tiny)
    return path, "tiny (built)", _load_models(path, device, dtype, prompts, cache)


def _device(ns: argparse.Namespace) -> torch.device:
    device = torch.device(ns.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SmokeError(f"--device {ns.device}: CUDA is not available on this machine", 2)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SmokeError(
                f"--device {ns.device}: only {torch.cuda.device_count()} CUDA device(s) visible",
                2,
            )
    return device


def grid_geometry(n_tiles: int, size: int) -> Dict[str, int]:
    """Layout of ``grid.png``: tile side, columns, rows and image width/height."""
    factor = max(1, math.ceil(MIN_TILE / size))
    tile = size * factor
    columns = min(n_tiles, MAX_COLUMNS)
    rows = math.ceil(n_tiles / columns)
    return {
        "tile": tile,
        "factor": factor,
        "columns": columns,
        "rows": rows,
        "width": columns * tile,
        "height": rows * (tile + LABEL_HEIGHT),
    }


def _grid_image(images: Tensor, labels: Sequence[str]) -> Any:
    """One tile per image (``[B, H, W, 3]`` in [0, 1]) with its caption underneath."""
    from PIL import Image, ImageDraw

    b, size = images.shape[0], images.shape[1]
    geo = grid_geometry(b, size)
    tile = geo["tile"]
    grid = Image.new("RGB", (geo["width"], geo["height"]), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    nearest = pil_nearest()
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    for i in range(b):
        row, col = divmod(i, geo["columns"])
        x, y = col * tile, row * (tile + LABEL_HEIGHT)
        img = Image.fromarray(pixels[i])
        grid.paste(img.resize((tile, tile), nearest), (x, y))
        draw.text((x + 3, y + tile + 2), labels[i], fill=(0, 0, 0))
    return grid


# ----------------------------------------------------------------------------------------- run
def run_smoke(args: Optional[argparse.Namespace] = None, **overrides: Any) -> Dict[str, Any]:
    """Run the smoke optimisation; returns the dict written to ``<out>/smoke.json``.

    ``args`` is a namespace from :func:`build_parser` (missing options take their defaults);
    ``overrides`` set options by their attribute names (``steps=2``, ``azimuths=[0, 90]``,
    ``perp_neg_prompt=[("a hat", -1.0)]`` or ``["a hat:-1"]``). Raises :class:`SmokeError` for
    a missing ``--model`` folder, an unloadable model or an unavailable device.
    """
    t_start = time.perf_counter()
    ns = resolve_args(args, overrides)
    device = _device(ns)
    dtype = torch.float16 if ns.fp16 else torch.float32
    settings = SDSSettings(guidance_scale=ns.guidance_scale, scale_convention=ns.scale_convention)
    scheme = make_scheme(ns.scheme)
    thresholds = ViewThresholds()
    try:
        out = output_folder("--out", ns.out)
        output_file_slots(out, OUTPUT_FILES, "--out")
        if ns.model is None and (out / CACHE_DIR).exists() and not (out / CACHE_DIR).is_dir():
            raise ValueError(
                f"--out {ns.out!r}: {str(out / CACHE_DIR)!r} is a file; the text-embedding "
                "cache needs that name for a folder"
            )
    except ValueError as err:
        raise SmokeError(str(err), 2) from None

    views_text = view_prompts(ns.prompt)
    user_texts = [t for t, _ in ns.perp_neg_prompt]
    user_weights = [w for _, w in ns.perp_neg_prompt]
    prompts = [ns.prompt, ns.negative_prompt, *views_text, *user_texts]
    model, source, (unet, vae, scheduler, emb) = _prepare_model(ns, out, device, dtype, prompts)
    random_model = ns.model is None
    if random_model:  # every run, built or reused: the tiles must not be mistaken for results
        print(TINY_NOTE.format(path=model), file=sys.stderr)

    # The PromptBank exactly as perpneg-prompt-processor builds it.
    bank = PromptBank.from_embeddings(
        emb, ns.prompt, ns.negative_prompt, views_text, user_texts, user_weights
    )
    engine = _RecordingEngine(unet, vae, scheduler, weights_dtype=dtype, device=device)
    t_loaded = time.perf_counter()

    b = len(ns.azimuths)
    azimuth = torch.tensor(ns.azimuths, dtype=torch.float32, device=device)
    elevation = torch.full_like(azimuth, float(ns.elevation))
    distances = torch.ones_like(azimuth)
    perp_neg = not ns.no_perp_neg
    cond: StepConditioning = step_conditioning(
        bank, elevation, azimuth, scheme=scheme, thresholds=thresholds, perp_neg=perp_neg
    )
    vw = view_weights(elevation, azimuth, scheme, thresholds)

    # One generator per azimuth, all seeded with --seed: same start image, timesteps and noise.
    gens = [torch.Generator(device=device).manual_seed(ns.seed) for _ in range(b)]
    vae_gen = torch.Generator(device=device).manual_seed(ns.seed)
    logits = torch.cat(
        [torch.randn((1, ns.size, ns.size, 3), generator=g, device=device) for g in gens]
    ).requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=ns.lr)
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_shape = (1, int(vae.config.latent_channels), 512 // down, 512 // down)

    from tqdm.auto import tqdm

    steps: List[Dict[str, Any]] = []
    sample_losses: List[List[Optional[float]]] = [[] for _ in range(b)]
    sample_t: List[List[int]] = [[] for _ in range(b)]
    calls_before = engine.unet_calls
    bar = tqdm(range(ns.steps), desc="Perp-Neg SDS", unit="step", dynamic_ncols=True)
    for step in bar:
        t = torch.cat(
            [torch.randint(MIN_STEP, MAX_STEP + 1, (1,), generator=g, device=device) for g in gens]
        )
        noise = torch.cat([torch.randn(latent_shape, generator=g, device=device) for g in gens])
        branches_before = engine.unet_branches
        res = sds_step(
            engine,
            torch.sigmoid(logits),
            cond,
            settings,
            min_step=MIN_STEP,
            max_step=MAX_STEP,
            elevation=elevation,
            azimuth=azimuth,
            camera_distances=distances,
            rgb_as_latents=False,
            generator=vae_gen,
            t=t,
            noise=noise,
        )
        loss = res["loss_sds"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        latents = engine.latents
        assert latents is not None and latents.grad is not None
        # loss = Σ_i ½‖z_i − target_i‖² / B, so z_i − target_i = B·∂loss/∂z_i.
        per_sample = 0.5 * (b * latents.grad.float()).pow(2).flatten(1).sum(1)
        for i in range(b):
            sample_losses[i].append(_num(per_sample[i]))
            sample_t[i].append(int(t[i]))
        engine.latents = None
        steps.append(
            {
                "step": step,
                "unet_branches": int(res["perp_neg_branches"]),
                "unet_branches_evaluated": engine.unet_branches - branches_before,
                "loss": _num(loss.detach()),
                "grad_norm": _num(res["grad_norm"]),
                "nonfinite": int(res["nonfinite"]),
            }
        )
        bar.set_postfix(loss=f"{float(loss.detach()):.4g}", branches=int(res["perp_neg_branches"]))
    bar.close()
    t_optimised = time.perf_counter()

    reports = _azimuth_reports(ns, cond, vw, perp_neg, sample_losses, sample_t)
    labels = [f"az {r['azimuth']:g} {r['view']}" for r in reports]
    geo = grid_geometry(b, ns.size)
    grid_path, json_path = out / "grid.png", out / "smoke.json"
    final = torch.sigmoid(logits.detach())
    grid = _grid_image(final, labels)
    atomic_write(grid_path, lambda tmp: grid.save(tmp, format="PNG"))

    cli = dict(vars(ns))
    cli["perp_neg_prompt"] = [[p, w] for p, w in ns.perp_neg_prompt]
    result: Dict[str, Any] = {
        "settings": {
            "args": cli,
            "model": model,
            "model_source": source,
            "random_model": random_model,
            "perp_neg": perp_neg,
            "dtype": str(dtype).replace("torch.", ""),
            "effective_scale": settings.scale,
            "min_step": MIN_STEP,
            "max_step": MAX_STEP,
            "camera_distance": 1.0,
            "rgb_as_latents": False,
            "thresholds": {
                "front": thresholds.front,
                "back": thresholds.back,
                "overhead": thresholds.overhead,
            },
            "prompts": {
                "views": dict(zip(VIEW_NAMES, views_text)),
                "uncond": ns.negative_prompt,
                "negatives": user_texts,
            },
            "versions": versions(),
        },
        "azimuths": reports,
        "steps": steps,
        "unet_calls": engine.unet_calls - calls_before,
        "grid": {"path": str(grid_path), **geo},
        "json": str(json_path),
        "timings_s": {
            "load": round(t_loaded - t_start, 3),
            "optimise": round(t_optimised - t_loaded, 3),
            "total": round(time.perf_counter() - t_start, 3),
        },
    }
    write_json(json_path, result)

    _print_summary(result)
    if random_model:
        print("(random tiny model: the tiles are noise; see --model)")
    return result


def _azimuth_reports(
    ns: argparse.Namespace,
    cond: StepConditioning,
    vw: Any,
    perp_neg: bool,
    losses: List[List[Optional[float]]],
    timesteps: List[List[int]],
) -> List[Dict[str, Any]]:
    """Per-azimuth JSON entries: bucket, r, positive mix, negative weights, branches, losses."""
    branches = branch_counts(cond)
    reports = []
    for i, az in enumerate(ns.azimuths):
        view = int(cond.view[i])
        if perp_neg:
            mix = [float(x) for x in vw.positive_mix[i]]
            view_neg = [float(x) for x in vw.negative_weights[i]]
            user = [{"prompt": p, "weight": w} for p, w in ns.perp_neg_prompt]
        else:  # plain CFG on the bucketed view prompt: no negatives are applied at all
            mix = [1.0 if k == view else 0.0 for k in range(len(VIEW_NAMES))]
            view_neg = [0.0] * len(VIEW_NAMES)
            user = [{"prompt": p, "weight": 0.0} for p, _ in ns.perp_neg_prompt]
        evaluated = [n for n, w in zip(VIEW_NAMES, view_neg) if w != 0.0] + [
            u["prompt"] for u in user if u["weight"] != 0.0
        ]
        reports.append(
            {
                "azimuth": az,
                "elevation": float(ns.elevation),
                "view": VIEW_NAMES[view],
                "r": float(vw.r[i]),
                "positive_mix": dict(zip(VIEW_NAMES, mix)),
                "negative_weights": {"views": dict(zip(VIEW_NAMES, view_neg)), "user": user},
                "negatives_evaluated": evaluated,
                "unet_branches": branches[i],
                "timesteps": timesteps[i],
                "losses": losses[i],
                "final_loss": losses[i][-1],
            }
        )
    return reports


def _print_summary(result: Dict[str, Any]) -> None:
    for rep in result["azimuths"]:
        negs = ", ".join(
            f"{n} {w:+.3g}"
            for n, w in [*rep["negative_weights"]["views"].items()]
            + [(u["prompt"], u["weight"]) for u in rep["negative_weights"]["user"]]
            if w != 0.0
        )
        first, last = rep["losses"][0], rep["final_loss"]
        print(
            f"az {rep['azimuth']:7.2f}  el {rep['elevation']:5.1f}  {rep['view']:<8} "
            f"r={rep['r']:.2f}  branches={rep['unet_branches']}  "
            f"loss {_fmt(first)} -> {_fmt(last)}  negatives: {negs or 'none'}"
        )
    steps = result["steps"]
    total = sum(s["unet_branches"] for s in steps)
    print(
        f"{len(steps)} steps x {len(result['azimuths'])} azimuths: {result['unet_calls']} UNet "
        f"calls, {total} branches, {result['timings_s']['total']:.1f} s; wrote "
        f"{result['grid']['path']} and {result['json']}"
    )


def _fmt(x: Optional[float]) -> str:
    return "nan" if x is None else f"{x:.4g}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``threestudio-perpneg smoke`` on its own (the package ``__main__`` dispatches here)."""
    args = build_parser().parse_args(argv)
    quiet_third_party(args.verbose)
    return run_command(
        "threestudio-perpneg smoke", lambda: run_smoke(args), SmokeError, interrupt=False
    )
