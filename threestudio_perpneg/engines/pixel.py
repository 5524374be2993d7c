"""Pixel-space score distillation with Perp-Neg (DeepFloyd IF stage I, the Janus testbed prior).

IF stage I denoises 64×64 RGB images in pixel space (x ∈ [-1, 1]) and its UNet predicts 6 channels:
ε (the first 3) and a learned variance interpolation (the last 3, the scheduler's ``learned_range``).
Any other pixel-space UNet works too: one predicting ε only (3 output channels, a fixed-variance
scheduler, as the testbed prior of :mod:`threestudio_perpneg.testbed`) and at any native resolution,
read from ``unet.config.sample_size`` (64 for IF, so IF behaves exactly as before).
:class:`PerpNegIFEngine` reuses :class:`~.sd.PerpNegSDSEngine`'s single batched UNet call
(``2·B`` positive/unconditional branches plus one per non-zero-weight negative, each on its own
sample's noisy image and timestep), splits the output channels, combines the ε parts with
:func:`~.core.perp_neg_guidance` and keeps the positive branch's variance for the scheduler — so
``guidance_eval`` works with Perp-Neg on (threestudio's IF guidance leaves ``predicted_variance``
unbound there). The guidance scale convention is the one of :mod:`~.sd` (``threestudio``: s + 1
multiplies the guidance direction, so Perp-Neg off is exactly threestudio's IF guidance).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.conditioning import StepConditioning
from ..core.controls import PerpNegControls, apply_controls
from ..core.guidance import GuidancePredictions, perp_neg_guidance
from ..core.text import resolve_pretrained
from .sd import (
    GuidedNoise,
    PerpNegSDSEngine,
    SDSSettings,
    _full_precision,
    _replace_nonfinite,
    draw_timesteps_and_noise,
    eval_conditioning,
    eval_texts,
    reparameterised_loss,
)

__all__ = [
    "IF_RESOLUTION",
    "native_resolution",
    "load_deepfloyd_if",
    "PerpNegIFEngine",
    "if_sds_step",
]

#: Side of IF stage I's images (its ``unet.config.sample_size``); renders are resized to the UNet's.
IF_RESOLUTION = 64


def native_resolution(unet: Any) -> int:
    """Side in pixels of the square images a pixel-space UNet denoises: ``unet.config.sample_size``.

    Raises:
        ValueError: when ``sample_size`` is missing, not a positive int, or not square.
    """
    size = getattr(getattr(unet, "config", None), "sample_size", None)
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"unet.config.sample_size: expected a square size, got {size!r}")
        size = size[0]
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"unet.config.sample_size: expected a positive int, got {size!r}")
    return size


def load_deepfloyd_if(
    pretrained: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tuple[Any, Any]:
    """(unet, scheduler) of a pixel-space checkpoint (``unet/``, ``scheduler/``; no text encoder).

    IF stage I, or any folder with a pixel-space ``UNet2DConditionModel`` and a ``DDPMScheduler``
    config (the Janus testbed prior).

    With fp16 weights the checkpoint's ``fp16`` variant is read where it has one.
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel

    path = resolve_pretrained(pretrained)
    try:
        unet = None
        if dtype == torch.float16:
            try:
                unet = UNet2DConditionModel.from_pretrained(
                    path, subfolder="unet", torch_dtype=dtype, variant="fp16"
                )
            except (OSError, ValueError):
                unet = None  # no fp16 files: read the full-precision ones and cast
        if unet is None:
            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    except OSError as err:
        raise FileNotFoundError(
            f"pretrained_model_name_or_path: could not load {pretrained!r} (expected a local "
            "diffusers IF stage I folder or a hub id present in the local cache, with unet/ and "
            f"scheduler/): {err}"
        ) from err
    unet = unet.to(device).eval().requires_grad_(False)
    return unet, scheduler


class PerpNegIFEngine(PerpNegSDSEngine):
    """Batched Perp-Neg noise prediction over a pixel-space UNet (IF stage I or the testbed prior).

    Args:
        unet: ``UNet2DConditionModel`` (frozen), 3 input channels and either 6 output channels
            (IF: ε and learned variance) or 3 (ε only); its ``config.sample_size`` is the native
            resolution renders are resized to (:attr:`resolution`).
        scheduler: its ``DDPMScheduler`` (``learned_range`` variance for IF, a fixed variance for
            an ε-only UNet); ``alphas_cumprod``, ``add_noise`` and config are used, and
            ``guidance_eval`` steps a copy of it.
        weights_dtype: dtype the UNet runs in (inputs are cast, outputs cast back).
        device: where the UNet lives.
    """

    def __init__(
        self,
        unet: Any,
        scheduler: Any,
        *,
        weights_dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(unet, None, scheduler, weights_dtype=weights_dtype, device=device)
        #: Side of the images the UNet denoises (``unet.config.sample_size``; 64 for IF).
        self.resolution: int = native_resolution(unet)

    def encode_images(self, imgs: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        raise NotImplementedError("DeepFloyd IF works in pixel space: there is no VAE")

    def decode_latents(self, latents: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        raise NotImplementedError("DeepFloyd IF works in pixel space: there is no VAE")

    def predict_split(
        self, x_noisy: Tensor, t: Tensor, cond: StepConditioning
    ) -> Tuple[GuidancePredictions, Optional[Tensor]]:
        """ε of every branch (one UNet call) and the positive branch's learned variance.

        The variance is ``None`` for a UNet that predicts ε only.
        """
        full = PerpNegSDSEngine.predict(self, x_noisy, t, cond)
        c = x_noisy.shape[1]
        channels = full.uncond.shape[1]
        if channels not in (c, 2 * c):
            raise ValueError(
                f"unet: expected {c} (ε) or {2 * c} (ε and learned variance) output channels, "
                f"got {channels}"
            )
        negative = full.negative
        eps = GuidancePredictions(
            uncond=full.uncond[:, :c],
            positive=full.positive[:, :c],
            negative=None if negative is None else negative[:, :c],
            negative_index=full.negative_index,
            negative_weight=full.negative_weight,
        )
        variance = full.positive[:, c:] if channels == 2 * c else None
        return eps, variance

    def predict(self, x_noisy: Tensor, t: Tensor, cond: StepConditioning) -> GuidancePredictions:
        """All branches' ε of a step in one UNet call (the variance channels dropped)."""
        return self.predict_split(x_noisy, t, cond)[0]

    def guided_noise_and_variance(
        self, x_noisy: Tensor, t: Tensor, cond: StepConditioning, scale: float
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """ε̂ of one step (Perp-Neg, or plain CFG without negatives) and the positive's variance."""
        p, variance = self.predict_split(x_noisy, t, cond)
        eps_hat = perp_neg_guidance(
            p.uncond,
            p.positive,
            p.negative,
            p.negative_weight,
            scale,
            neg_index=p.negative_index,
        )
        return eps_hat, variance

    def guided_noise(
        self, x_noisy: Tensor, t: Tensor, cond: StepConditioning, scale: float
    ) -> Tensor:
        return self.guided_noise_and_variance(x_noisy, t, cond, scale)[0]

    @staticmethod
    def model_output(eps: Tensor, variance: Optional[Tensor]) -> Tensor:
        """What the scheduler's ``step`` expects: ε, with the learned variance appended if any."""
        return eps if variance is None else torch.cat([eps, variance.to(eps)], dim=1)

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
        """threestudio's guidance_eval images in pixel space, each sample with its own conditioning.

        ``noise_pred`` is the scheduler's model output (ε̂, with the learned variance appended for
        a 6-channel UNet).
        ``cond``, ``controls`` and ``n_steps`` as in :meth:`~.sd.PerpNegSDSEngine.guidance_eval`.
        """
        if self._eval_scheduler is None:
            # A copy: set_timesteps must not touch the training scheduler.
            self._eval_scheduler = type(self.scheduler).from_config(self.scheduler.config)
        sched = self._eval_scheduler
        sched.set_timesteps(n_steps)
        timesteps = sched.timesteps.to(self.device)
        b = latents_noisy.shape[0]
        bs = min(max_items, b) if max_items > 0 else b
        # First of the 50 (descending) timesteps that is not above t: the nearest step at or below.
        idxs = (timesteps.expand(bs, -1) > t_orig[:bs].unsqueeze(-1)).to(torch.uint8).argmin(dim=1)
        t = timesteps[idxs]
        fracs = [float(x) for x in (t.float() / self.num_train_timesteps).cpu()]

        def image(x: Tensor) -> Tensor:
            return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)

        one_step, orig = [], []
        for i in range(bs):
            out = sched.step(
                noise_pred[i : i + 1], t[i], latents_noisy[i : i + 1], generator=generator
            )
            one_step.append(out.prev_sample)
            orig.append(out.pred_original_sample)
        x_1step = torch.cat(one_step)

        finals = []
        for i in range(bs):
            sample_cond = cond.select(i)
            x = x_1step[i : i + 1]
            for ts in sched.timesteps[int(idxs[i]) + 1 :]:
                ts_b = ts.reshape(1).to(self.device)
                c = eval_conditioning(sample_cond, ts_b, self.num_train_timesteps, controls)
                eps, variance = self.guided_noise_and_variance(x, ts_b, c, scale)
                x = sched.step(
                    self.model_output(eps, variance), ts, x, generator=generator
                ).prev_sample
            finals.append(x)
        return {
            "bs": bs,
            "noise_levels": fracs,
            "imgs_noisy": image(latents_noisy[:bs]),
            "imgs_1step": image(x_1step),
            "imgs_1orig": image(torch.cat(orig)),
            "imgs_final": image(torch.cat(finals)),
        }


def if_sds_step(
    engine: PerpNegIFEngine,
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
    guidance_eval: bool = False,
    max_items_eval: int = 4,
    generator: Optional[torch.Generator] = None,
    t: Optional[Tensor] = None,
    noise: Optional[Tensor] = None,
    controls: Optional[PerpNegControls] = None,
    guided_noise: Optional[GuidedNoise] = None,
) -> Dict[str, Any]:
    """One pixel-space guidance step on renders ``rgb`` ``[B, H, W, 3]`` in [0, 1], threestudio's contract.

    Renders are mapped to [-1, 1] and resized to the UNet's native resolution
    (``engine.resolution``: 64×64 for IF). Returns ``loss_sds`` (0.5·‖x − (x − grad)‖²
    / B), ``grad_norm``, ``min_step``, ``max_step``, ``perp_neg_branches``, ``nonfinite`` and ``eval``
    when asked. ``t`` and ``noise`` override the random draws, otherwise drawn from ``generator``
    or the global RNG in threestudio's order (timesteps, then noise); ``controls`` act on ``cond``
    after them, as in :func:`~.sd.sds_step`. ``guided_noise`` replaces the engine's guided noise
    as there (the learned variance is then not used; no ``guidance_eval`` with it).
    """
    if guided_noise is not None and guidance_eval:
        raise ValueError("guidance_eval: not available with a guided_noise override")
    if rgb.dim() != 4 or rgb.shape[-1] != 3:
        raise ValueError(f"rgb: expected shape [B, H, W, 3], got {tuple(rgb.shape)}")
    if settings.use_sjc:
        raise ValueError("use_sjc: score Jacobian chaining is not implemented for DeepFloyd IF")
    if settings.use_img_loss:
        raise ValueError("use_img_loss: DeepFloyd IF already works in image space")
    x = rgb.permute(0, 3, 1, 2) * 2.0 - 1.0
    size = engine.resolution
    x = F.interpolate(x, (size, size), mode="bilinear", align_corners=False)

    t, noise = draw_timesteps_and_noise(engine, x, min_step, max_step, generator, t, noise)
    full_cond = cond
    cond = apply_controls(cond, t, engine.num_train_timesteps, controls, generator)

    scale = settings.scale
    with torch.no_grad():
        x_noisy = engine.scheduler.add_noise(x, noise, t)
        rows_before = engine.unet_branches
        if guided_noise is None:
            eps_hat, variance = engine.guided_noise_and_variance(x_noisy, t, cond, scale)
        else:
            eps_hat, variance = guided_noise(x_noisy, t, cond, scale), None
        eps_hat, nonfinite = _replace_nonfinite(eps_hat, noise)
        w = engine.sds_weight(t, settings.weighting_strategy)
        grad = w * (eps_hat - noise)

    loss_sds, grad = reparameterised_loss(x, grad, grad_clip_val)
    branches = cond.branches if guided_noise is None else engine.unet_branches - rows_before

    out: Dict[str, Any] = {
        "loss_sds": loss_sds,
        "grad_norm": grad.norm(),
        "min_step": min_step,
        "max_step": max_step,
        "perp_neg_branches": branches,
        "nonfinite": nonfinite,
    }
    if guidance_eval:
        ev = engine.guidance_eval(
            t,
            x_noisy,
            engine.model_output(eps_hat, variance),
            full_cond,
            scale,
            max_items_eval,
            generator=generator,
            controls=controls,
        )
        ev["texts"] = eval_texts(ev["noise_levels"], elevation, azimuth, camera_distances)
        out["eval"] = ev
    return out
