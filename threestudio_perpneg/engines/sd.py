"""Stable Diffusion score distillation with Perp-Neg, free of threestudio.

:class:`PerpNegSDSEngine` owns the UNet, VAE and scheduler and evaluates a whole step in one batched
UNet call: ``2·B`` positive/unconditional branches plus one branch per non-zero-weight negative,
each negative on its own sample's noisy latent and timestep. :func:`sds_step` is the full guidance
step with threestudio's semantics (same random draws in the same order, same loss normalisation,
same output keys); the threestudio adapter and the CPU smoke command both call it.

Guidance scale convention (``scale_convention``):

* ``"threestudio"`` (default): ε̂ = ε_u + (s + 1)·(Δ_pos + Σ w_i ⊥(Δ_i, Δ_pos)). With Perp-Neg off
  (or all weights zero) this is exactly threestudio's ε_c + s·(ε_c − ε_u), so ``guidance_scale: 100``
  means what it means in every threestudio config, with Perp-Neg on or off.
* ``"cfg"``: ε̂ = ε_u + s·(…), the diffusers / paper convention, also the same with Perp-Neg on or off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.conditioning import StepConditioning
from ..core.controls import PerpNegControls, apply_controls
from ..core.guidance import GuidancePredictions, perp_neg_guidance
from ..core.text import resolve_pretrained

__all__ = [
    "SCALE_CONVENTIONS",
    "WEIGHTING_STRATEGIES",
    "GuidedNoise",
    "SDSSettings",
    "draw_timesteps",
    "effective_scale",
    "load_stable_diffusion",
    "PerpNegSDSEngine",
    "sds_step",
]

SCALE_CONVENTIONS = ("threestudio", "cfg")
_F = TypeVar("_F", bound=Callable[..., Any])
#: ``(x_noisy, t, cond, scale) -> ε̂``: a guided-noise override of :func:`sds_step` and
#: :func:`~.pixel.if_sds_step` (e.g. the testbed's reproduction of threestudio's built-in Perp-Neg).
GuidedNoise = Callable[[Tensor, Tensor, StepConditioning, float], Tensor]


def _full_precision(fn: _F) -> _F:
    """Run ``fn`` outside CUDA autocast (threestudio trains under 16-mixed precision)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = (
            torch.autocast("cuda", enabled=False)
            if torch.cuda.is_available()
            else contextlib.nullcontext()
        )
        with ctx:
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


WEIGHTING_STRATEGIES = ("sds", "uniform", "fantasia3d")


@dataclass(frozen=True)
class SDSSettings:
    """Per-step settings of the score distillation loss.

    Args:
        guidance_scale: s, see the module docstring for its convention (threestudio default 100).
        scale_convention: ``"threestudio"`` (s + 1 multiplies the guidance direction) or ``"cfg"``.
        weighting_strategy: w(t) of SDS: ``sds`` (1 − ᾱ_t), ``uniform`` (1) or ``fantasia3d``
            (√ᾱ_t (1 − ᾱ_t)).
        use_sjc: score Jacobian chaining (DDPM scheduler) instead of SDS.
        var_red: SJC variance reduction (gradient relative to the clean latent).
        use_img_loss: HiFA image-space SDS, adds ``loss_sds_img`` (costs a VAE decode per step).
    """

    guidance_scale: float = 100.0
    scale_convention: str = "threestudio"
    weighting_strategy: str = "sds"
    use_sjc: bool = False
    var_red: bool = True
    use_img_loss: bool = False

    def __post_init__(self) -> None:
        if self.scale_convention not in SCALE_CONVENTIONS:
            raise ValueError(
                f"guidance_scale_convention: unknown value {self.scale_convention!r}, expected one "
                f"of {SCALE_CONVENTIONS}"
            )
        if self.weighting_strategy not in WEIGHTING_STRATEGIES:
            raise ValueError(
                f"weighting_strategy: unknown value {self.weighting_strategy!r}, expected one of "
                f"{WEIGHTING_STRATEGIES}"
            )
        gs = self.guidance_scale
        if isinstance(gs, bool) or not isinstance(gs, (int, float)) or not math.isfinite(gs):
            raise ValueError(f"guidance_scale: expected a finite number, got {gs!r}")

    @property
    def scale(self) -> float:
        return effective_scale(self.guidance_scale, self.scale_convention)


def effective_scale(guidance_scale: float, convention: str) -> float:
    """The s of ε̂ = ε_u + s·(…) for a configured guidance scale and convention."""
    if convention not in SCALE_CONVENTIONS:
        raise ValueError(
            f"guidance_scale_convention: unknown value {convention!r}, expected one of "
            f"{SCALE_CONVENTIONS}"
        )
    return float(guidance_scale) + (1.0 if convention == "threestudio" else 0.0)


def load_stable_diffusion(
    pretrained: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    use_sjc: bool = False,
) -> Tuple[Any, Any, Any]:
    """(unet, vae, scheduler) of a Stable Diffusion checkpoint, via ``from_pretrained``.

    The scheduler is DDIM, or DDPM with SD's betas for score Jacobian chaining.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel

    path = resolve_pretrained(pretrained)
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype)
        if use_sjc:
            scheduler = DDPMScheduler.from_pretrained(
                path,
                subfolder="scheduler",
                beta_start=0.00085,
                beta_end=0.0120,
                beta_schedule="scaled_linear",
            )
        else:
            scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler")
    except OSError as err:
        raise FileNotFoundError(
            f"pretrained_model_name_or_path: could not load {pretrained!r} (expected a local "
            "diffusers folder or a hub id present in the local cache, with unet/, vae/ and "
            f"scheduler/): {err}"
        ) from err
    unet = unet.to(device).eval().requires_grad_(False)
    vae = vae.to(device).eval().requires_grad_(False)
    return unet, vae, scheduler


class PerpNegSDSEngine:
    """Batched Perp-Neg noise prediction and SDS/SJC gradients over a diffusers UNet.

    Args:
        unet: ``UNet2DConditionModel`` (frozen).
        vae: ``AutoencoderKL`` (frozen).
        scheduler: DDIM (SDS) or DDPM (SJC) scheduler; only its ``alphas_cumprod``, ``add_noise``
            and config are used.
        weights_dtype: dtype the UNet and VAE run in (inputs are cast, outputs cast back).
        device: where the models live.
    """

    def __init__(
        self,
        unet: Any,
        vae: Any,
        scheduler: Any,
        *,
        weights_dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.unet = unet
        self.vae = vae
        self.scheduler = scheduler
        self.weights_dtype = weights_dtype
        self.device = torch.device(device)
        self.num_train_timesteps: int = int(scheduler.config.num_train_timesteps)
        self.alphas: Tensor = scheduler.alphas_cumprod.to(self.device)
        self.us: Tensor = torch.sqrt((1 - self.alphas) / self.alphas)
        self.unet_calls = 0
        self.unet_branches = 0
        self._eval_scheduler: Any = None

    # ----------------------------------------------------------------- VAE
    @_full_precision
    def encode_images(self, imgs: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Latents ``[B, 4, h/8, w/8]`` of images in [0, 1] (a posterior sample, scaled)."""
        input_dtype = imgs.dtype
        posterior = self.vae.encode((imgs * 2.0 - 1.0).to(self.weights_dtype)).latent_dist
        latents = posterior.sample(generator=generator) * self.vae.config.scaling_factor
        return latents.to(input_dtype)

    @_full_precision
    def decode_latents(
        self, latents: Tensor, latent_height: int = 64, latent_width: int = 64
    ) -> Tensor:
        """Images in [0, 1] of latents resized to ``latent_height × latent_width``."""
        input_dtype = latents.dtype
        latents = F.interpolate(
            latents, (latent_height, latent_width), mode="bilinear", align_corners=False
        )
        image = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.weights_dtype))
        return (image.sample * 0.5 + 0.5).clamp(0, 1).to(input_dtype)

    # ---------------------------------------------------------------- UNet
    @torch.no_grad()
    @_full_precision
    def predict(
        self, latents_noisy: Tensor, t: Tensor, cond: StepConditioning
    ) -> GuidancePredictions:
        """All branches of a step in one UNet call, returned by name."""
        b = latents_noisy.shape[0]
        if cond.positive.shape[0] != b or t.shape != (b,):
            raise ValueError(
                f"predict: batch mismatch, latents {b}, timesteps {tuple(t.shape)}, "
                f"conditioning {cond.positive.shape[0]}"
            )
        idx = cond.negative_index.to(latents_noisy.device)
        x = torch.cat([latents_noisy, latents_noisy, latents_noisy.index_select(0, idx)])
        ts = torch.cat([t, t, t.index_select(0, idx)])
        emb = torch.cat([cond.positive, cond.uncond, cond.negative.to(cond.positive)])
        out = self.unet(
            x.to(self.weights_dtype),
            ts.to(self.weights_dtype),
            encoder_hidden_states=emb.to(self.weights_dtype),
        ).sample.to(latents_noisy.dtype)
        self.unet_calls += 1
        self.unet_branches += x.shape[0]
        return GuidancePredictions(
            uncond=out[b : 2 * b],
            positive=out[:b],
            negative=out[2 * b :],
            negative_index=idx,
            negative_weight=cond.negative_weight.to(out.device),
        )

    def guided_noise(
        self, latents_noisy: Tensor, t: Tensor, cond: StepConditioning, scale: float
    ) -> Tensor:
        """ε̂ of one step: Perp-Neg (or plain CFG when ``cond`` has no negatives)."""
        p = self.predict(latents_noisy, t, cond)
        return perp_neg_guidance(
            p.uncond,
            p.positive,
            p.negative,
            p.negative_weight,
            scale,
            neg_index=p.negative_index,
        )

    def sds_weight(self, t: Tensor, strategy: str) -> Tensor | float:
        """w(t) of the SDS gradient."""
        a = self.alphas[t].view(-1, 1, 1, 1)
        if strategy == "sds":
            return 1 - a
        if strategy == "uniform":
            return 1.0
        if strategy == "fantasia3d":
            return a**0.5 * (1 - a)
        raise ValueError(
            f"weighting_strategy: unknown value {strategy!r}, expected one of {WEIGHTING_STRATEGIES}"
        )

    # ------------------------------------------------------- guidance eval
    @torch.no_grad()
    @_full_precision
    def guidance_eval(
        self,
        t_orig: Tensor,
        latents_noisy: Tensor,
        noise_pred: Tensor,
        cond: StepConditioning,
        scale: float,
        max_items: int = 4,
        generator: Optional[torch.Generator] = None,
        controls: Optional[PerpNegControls] = None,
        n_steps: int = 50,
    ) -> Dict[str, Any]:
        """threestudio's guidance_eval images, each sample denoised with its own conditioning.

        ``n_steps`` DDIM steps span the schedule (threestudio: 50; SDI: its ``n_ddim_steps``).

        ``cond`` is the step's conditioning before the controls; ``controls`` (weight scale and
        timestep window) apply at every denoising step, with ``all`` negatives (the expectation of
        ``one``, and no draws from ``generator`` beyond the scheduler's).
        """
        from diffusers import DDIMScheduler

        if self._eval_scheduler is None:
            self._eval_scheduler = DDIMScheduler.from_config(self.scheduler.config)
        sched = self._eval_scheduler
        sched.set_timesteps(n_steps)
        timesteps = sched.timesteps.to(self.device)
        b = latents_noisy.shape[0]
        bs = min(max_items, b) if max_items > 0 else b
        # First of the 50 (descending) timesteps that is not above t: the nearest step at or below.
        idxs = (timesteps.expand(bs, -1) > t_orig[:bs].unsqueeze(-1)).to(torch.uint8).argmin(dim=1)
        t = timesteps[idxs]
        fracs = [float(x) for x in (t.float() / self.num_train_timesteps).cpu()]
        imgs_noisy = self.decode_latents(latents_noisy[:bs]).permute(0, 2, 3, 1)

        one_step, orig = [], []
        for i in range(bs):
            out = sched.step(
                noise_pred[i : i + 1], t[i], latents_noisy[i : i + 1], eta=1, generator=generator
            )
            one_step.append(out.prev_sample)
            orig.append(out.pred_original_sample)
        latents_1step = torch.cat(one_step)
        imgs_1step = self.decode_latents(latents_1step).permute(0, 2, 3, 1)
        imgs_1orig = self.decode_latents(torch.cat(orig)).permute(0, 2, 3, 1)

        finals = []
        for i in range(bs):
            sample_cond = cond.select(i)
            lat = latents_1step[i : i + 1]
            for ts in sched.timesteps[int(idxs[i]) + 1 :]:
                ts_b = ts.reshape(1).to(self.device)
                c = eval_conditioning(sample_cond, ts_b, self.num_train_timesteps, controls)
                eps = self.guided_noise(lat, ts_b, c, scale)
                lat = sched.step(eps, ts, lat, eta=1, generator=generator).prev_sample
            finals.append(lat)
        imgs_final = self.decode_latents(torch.cat(finals)).permute(0, 2, 3, 1)
        return {
            "bs": bs,
            "noise_levels": fracs,
            "imgs_noisy": imgs_noisy,
            "imgs_1step": imgs_1step,
            "imgs_1orig": imgs_1orig,
            "imgs_final": imgs_final,
        }


def eval_conditioning(
    cond: StepConditioning, t: Tensor, num_train_timesteps: int, controls: Optional[PerpNegControls]
) -> StepConditioning:
    """``cond`` under the weight scale and timestep window of ``controls``, every negative kept.

    For multi-step denoising (guidance_eval, sampling) where a per-step draw of ``one`` would only
    add noise to the images: they show the expectation."""
    if controls is None:
        return cond
    return apply_controls(
        cond, t, num_train_timesteps, dataclasses.replace(controls, sampling="all")
    )


def _randn(shape: torch.Size, like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    if generator is None:
        return torch.randn_like(like)
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


def _replace_nonfinite(eps_hat: Tensor, noise: Tensor) -> Tuple[Tensor, Tensor]:
    # Where the guided prediction broke, use the injected noise: those elements get no gradient.
    bad = ~torch.isfinite(eps_hat)
    return torch.where(bad, noise, eps_hat), bad.sum().to(torch.float32)


def renders_to_latents(
    engine: PerpNegSDSEngine,
    rgb: Tensor,
    rgb_as_latents: bool,
    generator: Optional[torch.Generator],
) -> Tuple[Tensor, Tensor]:
    """(renders at 512 px ``[B, C, 512, 512]``, latents ``[B, 4, 64, 64]``) of ``[B, H, W, C]`` renders."""
    rgb_bchw = rgb.permute(0, 3, 1, 2)
    rgb_512 = F.interpolate(rgb_bchw, (512, 512), mode="bilinear", align_corners=False)
    if rgb_as_latents:
        return rgb_512, F.interpolate(rgb_bchw, (64, 64), mode="bilinear", align_corners=False)
    return rgb_512, engine.encode_images(rgb_512, generator=generator)


def draw_timesteps(
    engine: PerpNegSDSEngine,
    batch: int,
    min_step: int,
    max_step: int,
    generator: Optional[torch.Generator],
) -> Tensor:
    """t ~ U{min_step..max_step}, one per sample (threestudio's ``torch.randint`` draw)."""
    return torch.randint(
        min_step,
        max_step + 1,
        [batch],
        dtype=torch.long,
        device=engine.device,
        generator=generator,
    )


def draw_timesteps_and_noise(
    engine: PerpNegSDSEngine,
    x: Tensor,
    min_step: int,
    max_step: int,
    generator: Optional[torch.Generator],
    t: Optional[Tensor] = None,
    noise: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """t ~ U{min_step..max_step} per sample, then ε ~ N(0, I) like ``x``: threestudio's order."""
    t = draw_timesteps(engine, x.shape[0], min_step, max_step, generator) if t is None else t
    t = t.to(engine.device)
    if noise is None:
        noise = _randn(x.shape, x, generator)
    return t, noise


def reparameterised_loss(
    x: Tensor, grad: Tensor, grad_clip_val: Optional[float]
) -> Tuple[Tensor, Tensor]:
    """(0.5·‖x − sg(x − g)‖² / B, g): d loss / d x = g, with g made finite and clipped."""
    grad = torch.nan_to_num(grad)
    if grad_clip_val is not None:
        grad = grad.clamp(-grad_clip_val, grad_clip_val)
    target = (x - grad).detach()
    return 0.5 * F.mse_loss(x, target, reduction="sum") / x.shape[0], grad


def eval_texts(
    noise_levels: List[float], elevation: Tensor, azimuth: Tensor, camera_distances: Tensor
) -> List[str]:
    """threestudio's captions of guidance_eval images."""
    return [
        f"n{n:.02f}\ne{e.item():.01f}\na{a.item():.01f}\nc{c.item():.02f}"
        for n, e, a, c in zip(noise_levels, elevation, azimuth, camera_distances)
    ]


def sds_step(
    engine: PerpNegSDSEngine,
    rgb: Tensor,
    cond: StepConditioning,
    settings: SDSSettings,
    *,
    min_step: int,
    max_step: int,
    elevation: Tensor,
    azimuth: Tensor,
    camera_distances: Tensor,
    grad_clip_val: Optional[float] = None,
    rgb_as_latents: bool = False,
    guidance_eval: bool = False,
    max_items_eval: int = 4,
    generator: Optional[torch.Generator] = None,
    t: Optional[Tensor] = None,
    noise: Optional[Tensor] = None,
    controls: Optional[PerpNegControls] = None,
    guided_noise: Optional[GuidedNoise] = None,
) -> Dict[str, Any]:
    """One guidance step on renders ``rgb`` ``[B, H, W, C]`` with threestudio's output contract.

    Returns ``loss_sds`` (0.5·‖latents − (latents − grad)‖² / B, so ``lambda_sds`` keeps its
    meaning), ``grad_norm``, ``min_step``, ``max_step``, ``perp_neg_branches`` (UNet branches of the
    step), ``nonfinite`` (guided-prediction elements that were not finite and were replaced), and
    ``loss_sds_img`` / ``eval`` when asked. ``t`` and ``noise`` override the random draws (for tests
    and reproductions); otherwise they are drawn from ``generator`` or the global RNG in threestudio's
    order: VAE posterior sample, timesteps, noise. ``controls`` (weight scale, timestep window,
    ``one`` sampling, see :mod:`~..core.controls`) act on ``cond`` after those draws, so negatives
    they drop cost no UNet row; ``perp_neg_branches`` counts the rows actually evaluated.
    ``guided_noise`` replaces ``engine.guided_noise`` (its rows are counted by the engine's
    ``unet_branches``; no ``guidance_eval`` with it).
    """
    if guided_noise is not None and guidance_eval:
        raise ValueError("guidance_eval: not available with a guided_noise override")
    if rgb.dim() != 4:
        raise ValueError(f"rgb: expected shape [B, H, W, C], got {tuple(rgb.shape)}")
    if rgb_as_latents and settings.use_img_loss:
        raise ValueError(
            "use_img_loss: the image-space loss needs RGB renders, got rgb_as_latents=True"
        )
    rgb_512, latents = renders_to_latents(engine, rgb, rgb_as_latents, generator)
    t, noise = draw_timesteps_and_noise(engine, latents, min_step, max_step, generator, t, noise)
    full_cond = cond
    cond = apply_controls(cond, t, engine.num_train_timesteps, controls, generator)

    scale = settings.scale
    guide = engine.guided_noise if guided_noise is None else guided_noise
    rows_before = engine.unet_branches
    with torch.no_grad():
        if settings.use_sjc:
            sigma = engine.us[t].view(-1, 1, 1, 1)
            zs = latents + sigma * noise
            model_input = zs / torch.sqrt(1 + sigma**2)
            eps_hat = guide(model_input, t, cond, scale)
            eps_hat, nonfinite = _replace_nonfinite(eps_hat, noise)
            ds = zs - sigma * eps_hat
            grad = -(ds - latents) / sigma if settings.var_red else -(ds - zs) / sigma
            grad_img = None
        else:
            model_input = engine.scheduler.add_noise(latents, noise, t)
            eps_hat = guide(model_input, t, cond, scale)
            eps_hat, nonfinite = _replace_nonfinite(eps_hat, noise)
            w = engine.sds_weight(t, settings.weighting_strategy)
            grad = w * (eps_hat - noise)
            grad_img = None
            if settings.use_img_loss:
                alpha = (engine.alphas[t] ** 0.5).view(-1, 1, 1, 1)
                sigma = ((1 - engine.alphas[t]) ** 0.5).view(-1, 1, 1, 1)
                denoised = engine.decode_latents((model_input - sigma * eps_hat) / alpha)
                grad_img = w * (rgb_512 - denoised) * alpha / sigma

    loss_sds, grad = reparameterised_loss(latents, grad, grad_clip_val)
    branches = cond.branches if guided_noise is None else engine.unet_branches - rows_before

    out: Dict[str, Any] = {
        "loss_sds": loss_sds,
        "grad_norm": grad.norm(),
        "min_step": min_step,
        "max_step": max_step,
        "perp_neg_branches": branches,
        "nonfinite": nonfinite,
    }
    if grad_img is not None:
        out["loss_sds_img"] = reparameterised_loss(rgb_512, grad_img, grad_clip_val)[0]

    if guidance_eval:
        ev = engine.guidance_eval(
            t,
            model_input,
            eps_hat,
            full_cond,
            scale,
            max_items_eval,
            generator=generator,
            controls=controls,
        )
        ev["texts"] = eval_texts(ev["noise_levels"], elevation, azimuth, camera_distances)
        out["eval"] = ev
    return out


def branch_counts(cond: StepConditioning) -> List[int]:
    """UNet branches per sample: 2 + its number of evaluated negatives."""
    counts = torch.bincount(cond.negative_index, minlength=cond.positive.shape[0])
    return [2 + int(c) for c in counts]
