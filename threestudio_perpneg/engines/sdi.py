"""Score Distillation via Inversion (SDI) with Perp-Neg, free of threestudio.

SDI (Lukoianov et al. 2024, "Score Distillation via Reparametrized DDIM",
https://arxiv.org/abs/2405.15891) replaces the random noise of SDS by noise found with a few DDIM
inversion steps of the current render, each step driven by a guided prediction:

    x_{k+1} = √ᾱ_{k+1}·x̂_0 + √(1 − ᾱ_{k+1})·ε̂_k + η·σ_k·z,   x̂_0 = (x_k − √(1 − ᾱ_k)·ε̂_k) / √ᾱ_k
    ε_inv   = (x_K − √ᾱ_K·x_0) / √(1 − ᾱ_K)

with ε̂_k the guided prediction at the inversion scale (``inversion_guidance_scale``, negative: the
inversion walks away from the prompt), σ_k DDIM's η = 1 standard deviation between the two steps and
z ~ N(0, I). The loss pulls the latents towards x̂_0 of the inverted latent x_K at the step's t and the
guidance scale. :func:`sdi_step` has threestudio's ``stable-diffusion-sdi-guidance`` semantics
(timestep grid, random last step t + δ, η noise, x_K evaluated at t, loss normalisation, output keys,
the same random draws in the same order at batch 1) with every guided prediction, the inversion's
and the final score's, made by :meth:`~.sd.PerpNegSDSEngine.guided_noise`: each sample's negatives on
its own latent, zero-weight negatives never evaluated. threestudio's version evaluates 4 rows per
sample with the ``[i::2]`` negative stride, so at batch > 1 it would corrupt the inverted noise itself
(and its inversion schedule only works at batch 1); here every sample has its own schedule.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.conditioning import StepConditioning
from ..core.controls import PerpNegControls, apply_controls, draw_uniforms, gate_negatives
from .sd import (
    PerpNegSDSEngine,
    _randn,
    draw_timesteps,
    effective_scale,
    eval_texts,
    renders_to_latents,
)

__all__ = [
    "PREDICTION_TYPES",
    "DDIMInversion",
    "InvertedNoise",
    "SDISettings",
    "invert_noise",
    "sdi_step",
]

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing")


def _check_number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key}: expected a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SDISettings:
    """Per-step settings of Score Distillation via Inversion.

    Args:
        guidance_scale: s of the final score (threestudio's ``sdi.yaml``: 7.5).
        inversion_guidance_scale: s of every inversion step (paper and threestudio: −7.5).
        scale_convention: ``"cfg"`` (ε_u + s·(…)) or ``"threestudio"`` (ε_u + (s + 1)·(…)), see
            :mod:`~.sd`; applies to both scales.
        enable_sdi: invert for the noise; false = SDS-style random noise with SDI's x̂_0 loss.
        inversion_n_steps: DDIM grid of the inversion (steps of ``T / n`` timesteps; default 10).
        inversion_eta: η ≥ 0, weight of the fresh noise added at each inversion step (default 0.3).
        n_ddim_steps: denoising steps of the ``guidance_eval`` images (default 50).
    """

    guidance_scale: float = 7.5
    inversion_guidance_scale: float = -7.5
    scale_convention: str = "cfg"
    enable_sdi: bool = True
    inversion_n_steps: int = 10
    inversion_eta: float = 0.3
    n_ddim_steps: int = 50

    def __post_init__(self) -> None:
        _check_number("guidance_scale", self.guidance_scale)
        _check_number("inversion_guidance_scale", self.inversion_guidance_scale)
        effective_scale(0.0, self.scale_convention)  # validates the convention
        for key in ("inversion_n_steps", "n_ddim_steps"):
            n = getattr(self, key)
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{key}: expected an integer >= 1, got {n!r}")
        if _check_number("inversion_eta", self.inversion_eta) < 0:
            raise ValueError(f"inversion_eta: expected a number >= 0, got {self.inversion_eta!r}")

    @property
    def scale(self) -> float:
        return effective_scale(self.guidance_scale, self.scale_convention)

    @property
    def inversion_scale(self) -> float:
        return effective_scale(self.inversion_guidance_scale, self.scale_convention)


class DDIMInversion:
    """The DDIM inversion of a DDIM scheduler's noise schedule, one timestep per sample.

    Args:
        scheduler: a diffusers ``DDIMScheduler`` (its ``alphas_cumprod`` and config: prediction
            type, ``set_alpha_to_one``, ``clip_sample``, ``timestep_spacing``, ``steps_offset``).
        n_steps: inversion grid size (``inversion_n_steps``).
    """

    def __init__(self, scheduler: Any, n_steps: int) -> None:
        cfg = scheduler.config
        self.num_train_timesteps = int(cfg.num_train_timesteps)
        self.n_steps = int(n_steps)
        self.alphas_cumprod: Tensor = scheduler.alphas_cumprod.detach().cpu()
        # DDIM's ᾱ before the first timestep (threestudio: the inverse scheduler's initial_alpha).
        self.alpha_before = (
            torch.tensor(1.0) if cfg.get("set_alpha_to_one", True) else self.alphas_cumprod[0]
        )
        self.prediction_type = str(cfg.get("prediction_type", "epsilon"))
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type: unknown value {self.prediction_type!r}, expected one of "
                f"{PREDICTION_TYPES}"
            )
        if cfg.get("thresholding", False):
            raise ValueError("thresholding: dynamic thresholding is not supported, expected false")
        self.clip_sample = bool(cfg.get("clip_sample", False))
        self.clip_sample_range = float(cfg.get("clip_sample_range", 1.0))
        self.spacing = str(cfg.get("timestep_spacing", "leading"))
        if self.spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"timestep_spacing: {self.spacing!r} is not supported by the inversion, expected "
                f"one of {TIMESTEP_SPACINGS}"
            )
        self.steps_offset = int(cfg.get("steps_offset", 0))

    # ------------------------------------------------------------------ schedule
    def grid(self) -> tuple[List[int], float]:
        """(the inversion grid, ascending, and its step ratio), as diffusers' inverse DDIM."""
        n_train, n = self.num_train_timesteps, self.n_steps
        if self.spacing == "leading":
            ratio = n_train // n
            ts = (np.arange(0, n) * ratio).round().astype(np.int64) + self.steps_offset
            return [int(x) for x in ts], float(ratio)
        ratio_f = n_train / n
        ts = np.round(np.arange(n_train, 0, -ratio_f)[::-1]).astype(np.int64) - 1
        return [int(x) for x in ts], ratio_f

    def delta(self, u: float) -> int:
        """δ of the random last step from a uniform ``u`` in [0, 1): ⌊u·T / n⌋."""
        return int(u * self.num_train_timesteps // self.n_steps)

    def schedule(self, invert_to_t: int, delta_t: int) -> List[int]:
        """Timesteps of one sample's inversion: one grid step below the first grid timestep, the
        grid timesteps below ``invert_to_t``, then ``min(invert_to_t + delta_t, T − 1)``."""
        grid, ratio = self.grid()
        below = [x for x in grid if x < int(invert_to_t)]
        start = int((below or grid)[0] - ratio)
        last = min(int(invert_to_t) + int(delta_t), self.num_train_timesteps - 1)
        return [start, *below, last]

    # ---------------------------------------------------------------------- math
    def alpha(self, t: Tensor, like: Tensor) -> Tensor:
        """ᾱ_t per sample, shaped to broadcast over ``like``; t < 0 is before the first step."""
        ac = self.alphas_cumprod.to(like.device)
        t = t.to(like.device)
        a = torch.where(t >= 0, ac[t.clamp_min(0)], self.alpha_before.to(like.device))
        return a.view(-1, *([1] * (like.dim() - 1)))

    def x0_and_eps(
        self, model_output: Tensor, sample: Tensor, alpha: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(x̂_0, ε̂) of a model output at ᾱ ``alpha``, x̂_0 clipped as the scheduler says."""
        beta = 1 - alpha
        if self.prediction_type == "epsilon":
            x0 = (sample - beta ** (0.5) * model_output) / alpha ** (0.5)
            eps = model_output
        elif self.prediction_type == "sample":
            x0 = model_output
            eps = (sample - alpha ** (0.5) * x0) / beta ** (0.5)
        else:
            x0 = alpha**0.5 * sample - beta**0.5 * model_output
            eps = alpha**0.5 * model_output + beta**0.5 * sample
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return x0, eps

    def step(
        self,
        model_output: Tensor,
        t: Tensor,
        t_next: Tensor,
        sample: Tensor,
        eta: float,
        z: Tensor,
    ) -> Tensor:
        """One inversion step t → t_next (per sample), plus η·σ·z."""
        a_t = self.alpha(t, sample)
        a_next = self.alpha(t_next, sample)
        x0, eps = self.x0_and_eps(model_output, sample, a_t)
        out = a_next ** (0.5) * x0 + (1 - a_next) ** (0.5) * eps
        # DDIM's η = 1 variance between the two steps (the later one as "t", the earlier as "prev").
        variance = ((1 - a_t) / (1 - a_next)) * (1 - a_next / a_t)
        return out + eta * z * variance ** (0.5)

    def noise_from_target(self, target: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """ε with x = √ᾱ_t·target + √(1 − ᾱ_t)·ε."""
        a = self.alpha(t, x)
        return (x - target * a ** (0.5)) / ((1 - a) ** (0.5))


class InvertedNoise(NamedTuple):
    """Result of :func:`invert_noise`.

    Attributes:
        latents_noisy: x_K, the inverted latents ``[B, 4, h, w]`` (at noise level ``t_end``).
        noise: ε_inv of x_K relative to the clean latents.
        t_end: the last timestep of each sample's schedule, ``[B]``.
        steps: inversion steps (UNet calls) per sample.
    """

    latents_noisy: Tensor
    noise: Tensor
    t_end: Tensor
    steps: List[int]


def _gate(
    cond: StepConditioning, t: Tensor, n_train: int, controls: Optional[PerpNegControls]
) -> StepConditioning:
    if controls is None:
        return cond
    # The first inversion step sits before timestep 0: gate it as t = 0.
    return gate_negatives(cond, t.clamp_min(0), n_train, controls.t_range)


@torch.no_grad()
def invert_noise(
    engine: PerpNegSDSEngine,
    inversion: DDIMInversion,
    latents: Tensor,
    t: Tensor,
    cond: StepConditioning,
    settings: SDISettings,
    *,
    generator: Optional[torch.Generator] = None,
    controls: Optional[PerpNegControls] = None,
) -> InvertedNoise:
    """Noise of ``latents`` by DDIM inversion to ``t`` (plus a random δ), guided by ``cond``.

    Each sample follows its own schedule (:meth:`DDIMInversion.schedule` of its t, one δ for the
    batch); samples at the same inversion step share one batched UNet call, each on its own latent
    and timestep with its own negatives. ``cond`` is the step's conditioning after the weight scale
    and ``one`` sampling; ``controls``' timestep window gates it at every inversion timestep.
    Random draws: δ from Python's ``random`` (``generator``: one uniform from it), then one
    ``randn`` of the stepping samples' shape per inversion step (threestudio's order at batch 1).
    """
    u = random.random() if generator is None else float(draw_uniforms(1, generator)[0])
    delta = inversion.delta(u)
    schedules = [inversion.schedule(int(tb), delta) for tb in t.tolist()]
    x = latents.clone()
    n_train = inversion.num_train_timesteps
    for k in range(max(len(s) for s in schedules) - 1):
        active = [b for b, s in enumerate(schedules) if len(s) > k + 1]
        idx = torch.tensor(active, dtype=torch.long, device=latents.device)
        t_k = torch.tensor([schedules[b][k] for b in active], device=latents.device)
        t_next = torch.tensor([schedules[b][k + 1] for b in active], device=latents.device)
        everyone = len(active) == x.shape[0]
        # The whole batch keeps x's memory format: randn_like draws depend on it (threestudio's).
        sub, x_k = (cond, x) if everyone else (cond.take(idx), x.index_select(0, idx))
        eps = engine.guided_noise(
            x_k, t_k, _gate(sub, t_k, n_train, controls), settings.inversion_scale
        )
        z = _randn(x_k.shape, x_k, generator)
        x_next = inversion.step(eps, t_k, t_next, x_k, settings.inversion_eta, z)
        x = x_next if everyone else x.index_copy(0, idx, x_next)
    t_end = torch.tensor([s[-1] for s in schedules], device=latents.device)
    noise = inversion.noise_from_target(latents, x, t_end)
    return InvertedNoise(x, noise, t_end, [len(s) - 1 for s in schedules])


def sdi_step(
    engine: PerpNegSDSEngine,
    inversion: DDIMInversion,
    rgb: Tensor,
    cond: StepConditioning,
    settings: SDISettings,
    *,
    min_step: int,
    max_step: int,
    elevation: Tensor,
    azimuth: Tensor,
    camera_distances: Tensor,
    grad_clip_val: Optional[float] = None,
    rgb_as_latents: bool = False,
    guidance_eval: bool = False,
    test_info: bool = False,
    max_items_eval: int = 4,
    generator: Optional[torch.Generator] = None,
    t: Optional[Tensor] = None,
    noise: Optional[Tensor] = None,
    controls: Optional[PerpNegControls] = None,
) -> Dict[str, Any]:
    """One SDI step on renders ``rgb`` ``[B, H, W, C]`` with threestudio's output contract.

    Returns ``loss_sdi`` (0.5·mean((latents − x̂_0)²) / B, threestudio's normalisation, so
    ``lambda_sdi`` keeps its meaning), ``grad_norm`` (‖latents − x̂_0‖), ``min_step``, ``max_step``,
    ``perp_neg_branches`` (UNet rows of the step: inversion and final score), ``nonfinite``
    (elements of x̂_0 that were not finite and got no gradient), and ``eval`` when asked. With
    ``test_info`` it returns threestudio's validation images instead (``target``, ``target_latent``,
    ``noisy_img``, ``noise_img``, ``noise_pred``). ``noise`` is threestudio's
    ``call_with_defined_noise`` (no inversion); ``t`` overrides the timestep draw. Draws, from
    ``generator`` or the global RNGs: VAE posterior sample, timesteps, the ``one`` sampling uniforms
    (only with ``perp_neg_sampling: one``), then the inversion's (see :func:`invert_noise`).
    ``controls``: the weight scale and ``one`` sampling act once per step (the same negatives for
    the inversion and the score), the timestep window at every guided prediction's own timestep.
    """
    if rgb.dim() != 4:
        raise ValueError(f"rgb: expected shape [B, H, W, C], got {tuple(rgb.shape)}")
    _, latents = renders_to_latents(engine, rgb, rgb_as_latents, generator)
    t = draw_timesteps(engine, latents.shape[0], min_step, max_step, generator) if t is None else t
    t = t.to(engine.device)
    full_cond = cond
    if controls is not None:
        cond = apply_controls(
            cond,
            t,
            engine.num_train_timesteps,
            dataclasses.replace(controls, t_range=(0.0, 1.0)),
            generator,
        )
    n_train = engine.num_train_timesteps
    rows_before = engine.unet_branches
    with torch.no_grad():
        if noise is not None:
            noise = noise.to(latents).clone()
            latents_noisy = engine.scheduler.add_noise(latents, noise, t)
        elif settings.enable_sdi:
            inv = invert_noise(
                engine,
                inversion,
                latents,
                t,
                cond,
                settings,
                generator=generator,
                controls=controls,
            )
            latents_noisy, noise = inv.latents_noisy, inv.noise
        else:
            noise = _randn(latents.shape, latents, generator)
            latents_noisy = engine.scheduler.add_noise(latents, noise, t)
        eps_hat = engine.guided_noise(
            latents_noisy, t, _gate(cond, t, n_train, controls), settings.scale
        )
        target, _ = inversion.x0_and_eps(eps_hat, latents_noisy, inversion.alpha(t, latents_noisy))
        bad = ~torch.isfinite(target)
        target = torch.where(bad, latents.detach(), target)
        if grad_clip_val is not None:
            g = (latents.detach() - target).clamp(-grad_clip_val, grad_clip_val)
            target = latents.detach() - g

    batch = latents.shape[0]
    out: Dict[str, Any] = {
        "loss_sdi": 0.5 * F.mse_loss(latents, target.detach(), reduction="mean") / batch,
        "grad_norm": (latents - target).norm(),
        "min_step": min_step,
        "max_step": max_step,
        "perp_neg_branches": engine.unet_branches - rows_before,
        "nonfinite": bad.sum().to(torch.float32),
    }
    if test_info:
        out["target"] = engine.decode_latents(target)[0].permute(1, 2, 0)
        out["target_latent"] = target
        out["noisy_img"] = engine.decode_latents(latents_noisy)[0].permute(1, 2, 0)
        out["noise_img"] = engine.decode_latents(noise)[0].permute(1, 2, 0)
        out["noise_pred"] = eps_hat
        return out
    if guidance_eval:
        ev = engine.guidance_eval(
            t,
            latents_noisy,
            eps_hat,
            full_cond,
            settings.scale,
            max_items_eval,
            generator=generator,
            controls=controls,
            n_steps=settings.n_ddim_steps,
        )
        ev["texts"] = eval_texts(ev["noise_levels"], elevation, azimuth, camera_distances)
        out["eval"] = ev
    return out
