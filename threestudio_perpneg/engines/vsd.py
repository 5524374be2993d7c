"""Variational score distillation (ProlificDreamer) with Perp-Neg on the pretrained branch.

Free of threestudio. VSD (Wang et al. 2023, https://arxiv.org/abs/2305.16213) replaces SDS's injected
noise by the prediction of a second diffusion model fine-tuned on the renders:

    grad = w(t) · (ε̂_pretrained − ε̂_lora),   w(t) = 1 − ᾱ_t

* ε̂_pretrained is the frozen model's guided prediction. Here it is exactly
  :meth:`~.sd.PerpNegSDSEngine.guided_noise` with a :class:`~.conditioning.StepConditioning`: one batched
  UNet call with 2 branches per sample plus one per non-zero-weight negative (Perp-Neg), or plain
  classifier-free guidance when Perp-Neg is off.
* ε̂_lora is a LoRA copy of a Stable Diffusion UNet, conditioned on the camera through a class embedding
  of the flattened 4×4 camera matrix, guided between that camera and the zero camera, always with the
  plain view-independent prompt (threestudio #135: Perp-Neg applies to the pretrained model only).
* ``loss_lora`` trains the LoRA model on the (detached) render latents with the usual denoising loss.

The LoRA layers are our own attention processor (:class:`LoRAAttnProcessor`), so they work with diffusers
0.19 (whose ``LoRAAttnProcessor`` / ``AttnProcsLayers`` threestudio uses) and with current diffusers
(where those were removed in favour of peft). The processors and the camera embedding are switched on
only inside :meth:`LoRAUNet.forward`, so the pretrained and the LoRA model can share one UNet: outside
that call the UNet is the frozen pretrained model (LoRA scale 0, no class embedding).
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..core.conditioning import StepConditioning
from ..core.controls import PerpNegControls, apply_controls
from .sd import (
    PerpNegSDSEngine,
    _full_precision,
    _randn,
    _replace_nonfinite,
    draw_timesteps_and_noise,
    effective_scale,
    renders_to_latents,
    reparameterised_loss,
)

__all__ = [
    "CAMERA_CONDITION_TYPES",
    "CameraEmbedding",
    "LoRAAttnProcessor",
    "LoRALinearLayer",
    "LoRAUNet",
    "VSDSettings",
    "install_lora",
    "vsd_step",
]

CAMERA_CONDITION_TYPES = ("extrinsics", "mvp")


class LoRALinearLayer(nn.Module):
    """x ↦ up(down(x)), rank ``rank``; ``up`` starts at zero so the layer starts as the zero map.

    Weights stay float32 whatever the UNet's dtype; inputs are cast in and the result cast back.
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 4) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"lora_rank: expected an integer >= 1, got {rank!r}")
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.down.weight, std=1.0 / rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype))).to(x.dtype)


class LoRAAttnProcessor(nn.Module):
    """Scaled-dot-product attention with low-rank updates of ``to_q``, ``to_k``, ``to_v``, ``to_out``.

    The call signature ``(attn, hidden_states, encoder_hidden_states, attention_mask, temb)`` is the
    one diffusers' ``Attention.forward`` uses in 0.19 and in current releases. ``scale`` multiplies
    every low-rank update; 0 (the default) is the unmodified attention.
    """

    def __init__(
        self, hidden_size: int, cross_attention_dim: Optional[int] = None, rank: int = 4
    ) -> None:
        super().__init__()
        kv_dim = hidden_size if cross_attention_dim is None else cross_attention_dim
        self.to_q_lora = LoRALinearLayer(hidden_size, hidden_size, rank)
        self.to_k_lora = LoRALinearLayer(kv_dim, hidden_size, rank)
        self.to_v_lora = LoRALinearLayer(kv_dim, hidden_size, rank)
        self.to_out_lora = LoRALinearLayer(hidden_size, hidden_size, rank)
        self.scale = 0.0

    @classmethod
    def for_attention(cls, attn: Any, rank: int = 4) -> LoRAAttnProcessor:
        """A processor sized from the projections of a diffusers ``Attention`` module."""
        hidden = int(attn.to_q.out_features)
        kv_dim = int(attn.to_k.in_features)
        q_in = int(attn.to_q.in_features)
        if q_in != hidden:
            raise ValueError(
                f"LoRA: attention with to_q {q_in} -> {hidden} features is not supported"
            )
        return cls(hidden, None if kv_dim == hidden else kv_dim, rank)

    def forward(
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        temb: Optional[Tensor] = None,
        *args: Any,
        **kwargs: Any,
    ) -> Tensor:
        s = self.scale
        residual = hidden_states
        if getattr(attn, "spatial_norm", None) is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, seq_len, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if getattr(attn, "group_norm", None) is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        if s != 0.0:
            query = query + s * self.to_q_lora(hidden_states)
            key = key + s * self.to_k_lora(encoder_hidden_states)
            value = value + s * self.to_v_lora(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        out = attn.to_out[0](hidden_states)
        if s != 0.0:
            out = out + s * self.to_out_lora(hidden_states)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def install_lora(unet: Any, rank: int = 4) -> nn.ModuleDict:
    """Installs a :class:`LoRAAttnProcessor` in every attention of ``unet`` (scale 0).

    Returns the processors in a ``ModuleDict`` (keys are the processor names with ``.`` → ``_``),
    for optimizers and checkpoints; the UNet's own weights are left untouched.
    """
    names = list(unet.attn_processors.keys())
    procs: Dict[str, LoRAAttnProcessor] = {}
    for module_name, module in unet.named_modules():
        key = f"{module_name}.processor"
        if key in names:
            procs[key] = LoRAAttnProcessor.for_attention(module, rank)
    missing = sorted(set(names) - set(procs))
    if missing:
        raise ValueError(f"LoRA: attention processors without an attention module: {missing}")
    first = next(unet.parameters())
    layers = nn.ModuleDict({k.replace(".", "_"): p for k, p in procs.items()})
    layers.to(first.device)
    unet.set_attn_processor(dict(procs))
    return layers


class CameraEmbedding(nn.Module):
    """Class embedding of a flattened camera matrix: diffusers' ``TimestepEmbedding(in_dim, dim)``.

    This is what a UNet built with ``class_embed_type="projection"`` and
    ``projection_class_embeddings_input_dim=16`` holds; threestudio attaches the same module to its LoRA
    UNet. Inputs are cast to the embedding's dtype (float32).
    """

    def __init__(self, in_dim: int, time_embed_dim: int) -> None:
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding

        self.embedding = TimestepEmbedding(in_dim, time_embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.embedding(x.to(self.embedding.linear_1.weight.dtype))


class LoRAUNet(nn.Module):
    """A UNet seen through its LoRA processors and a camera class embedding.

    ``unet`` may be the pretrained UNet itself (LoRA and camera embedding are switched on only inside
    :meth:`forward`); it is not registered as a submodule, so ``parameters()`` / ``state_dict()`` hold
    the trainable LoRA layers and camera embedding only.
    """

    def __init__(
        self,
        unet: Any,
        *,
        rank: int = 4,
        camera_dim: int = 16,
        weights_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self._unet = (unet,)  # a tuple keeps it out of the module tree
        self.weights_dtype = weights_dtype
        self.lora_layers = install_lora(unet, rank)
        time_embed_dim = int(unet.time_embedding.linear_2.out_features)
        self.camera_embedding = CameraEmbedding(camera_dim, time_embed_dim).to(
            next(unet.parameters()).device
        )
        self.calls = 0

    @property
    def unet(self) -> Any:
        return self._unet[0]

    @contextlib.contextmanager
    def _enabled(self, lora_scale: float, camera: bool) -> Iterator[None]:
        unet = self.unet
        previous = unet.class_embedding
        for proc in self.lora_layers.values():
            proc.scale = lora_scale  # type: ignore[assignment]
        if camera:
            unet.class_embedding = self.camera_embedding
        try:
            yield
        finally:
            for proc in self.lora_layers.values():
                proc.scale = 0.0  # type: ignore[assignment]
            unet.class_embedding = previous

    @_full_precision
    def forward(
        self,
        latents: Tensor,
        t: Tensor,
        encoder_hidden_states: Tensor,
        camera: Optional[Tensor] = None,
        *,
        lora_scale: float = 1.0,
    ) -> Tensor:
        """ε (or v) prediction of the LoRA model; ``camera`` is ``[B, 4, 4]`` or ``[B, 16]``."""
        dt = self.weights_dtype
        labels = None if camera is None else camera.reshape(camera.shape[0], -1)
        with self._enabled(lora_scale, labels is not None):
            out = self.unet(
                latents.to(dt),
                t.to(dt),
                encoder_hidden_states=encoder_hidden_states.to(dt),
                class_labels=labels,
            ).sample
        self.calls += 1
        return out.to(latents.dtype)


@dataclass(frozen=True)
class VSDSettings:
    """Per-step settings of VSD.

    Args:
        guidance_scale: s of the pretrained branch; threestudio's VSD uses the diffusers convention
            ε_u + s·(ε_c − ε_u) (``scale_convention="cfg"``, default 7.5).
        guidance_scale_lora: s of the LoRA branch, between the camera and the zero camera (diffusers
            convention, default 1: the camera-conditioned prediction).
        scale_convention: ``"cfg"`` or ``"threestudio"`` (s + 1), for the pretrained branch.
        lora_cfg_training: drop the camera (zero it) for 10% of LoRA training steps.
        lora_n_timestamp_samples: timesteps drawn per render for the LoRA loss.
        camera_condition_type: ``extrinsics`` (c2w) or ``mvp`` as the LoRA's camera condition.
        use_img_loss: HiFA image-space loss (adds ``loss_vsd_img``).
    """

    guidance_scale: float = 7.5
    guidance_scale_lora: float = 1.0
    scale_convention: str = "cfg"
    lora_cfg_training: bool = True
    lora_n_timestamp_samples: int = 1
    camera_condition_type: str = "extrinsics"
    use_img_loss: bool = False

    def __post_init__(self) -> None:
        for key, value in (
            ("guidance_scale", self.guidance_scale),
            ("guidance_scale_lora", self.guidance_scale_lora),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                raise ValueError(f"{key}: expected a finite number, got {value!r}")
        effective_scale(self.guidance_scale, self.scale_convention)  # validates the convention
        n = self.lora_n_timestamp_samples
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"lora_n_timestamp_samples: expected an integer >= 1, got {n!r}")
        if self.camera_condition_type not in CAMERA_CONDITION_TYPES:
            raise ValueError(
                f"camera_condition_type: unknown value {self.camera_condition_type!r}, expected "
                f"one of {CAMERA_CONDITION_TYPES}"
            )

    @property
    def scale(self) -> float:
        return effective_scale(self.guidance_scale, self.scale_convention)


def _lora_epsilon(pred: Tensor, latents_noisy: Tensor, t: Tensor, lora_scheduler: Any) -> Tensor:
    """ε from the LoRA model's output (ε itself, or converted from a v prediction)."""
    kind = lora_scheduler.config.prediction_type
    if kind == "epsilon":
        return pred
    if kind == "v_prediction":
        ac = lora_scheduler.alphas_cumprod.to(device=pred.device, dtype=pred.dtype)
        alpha = (ac[t] ** 0.5).view(-1, 1, 1, 1)
        sigma = ((1 - ac[t]) ** 0.5).view(-1, 1, 1, 1)
        return latents_noisy * sigma + pred * alpha
    raise ValueError(f"prediction_type: unsupported LoRA model prediction type {kind!r}")


def lora_guided_noise(
    lora: LoRAUNet,
    lora_scheduler: Any,
    latents_noisy: Tensor,
    t: Tensor,
    prompt: Tensor,
    camera: Tensor,
    scale: float,
) -> Tensor:
    """ε̂_lora = ε(∅ camera) + s·(ε(camera) − ε(∅ camera)) with the view-independent ``prompt``."""
    b = latents_noisy.shape[0]
    cam = camera.reshape(b, -1)
    with torch.no_grad():
        pred = lora(
            torch.cat([latents_noisy, latents_noisy]),
            torch.cat([t, t]),
            torch.cat([prompt, prompt]),
            torch.cat([cam, torch.zeros_like(cam)]),
        )
        eps = _lora_epsilon(
            pred, torch.cat([latents_noisy, latents_noisy]), torch.cat([t, t]), lora_scheduler
        )
    eps_cam, eps_uncond = eps.chunk(2)
    return eps_uncond + scale * (eps_cam - eps_uncond)


def lora_loss(
    lora: LoRAUNet,
    lora_scheduler: Any,
    latents: Tensor,
    prompt: Tensor,
    camera: Tensor,
    settings: VSDSettings,
    *,
    generator: Optional[torch.Generator] = None,
    t: Optional[Tensor] = None,
    noise: Optional[Tensor] = None,
    drop_camera: Optional[bool] = None,
) -> Tensor:
    """Denoising loss of the LoRA model on the detached render latents (threestudio's train_lora)."""
    b = latents.shape[0]
    n = settings.lora_n_timestamp_samples
    latents = latents.detach().repeat(n, 1, 1, 1)
    num_train = int(lora_scheduler.config.num_train_timesteps)
    if t is None:
        t = torch.randint(
            0, num_train, [b * n], dtype=torch.long, device=latents.device, generator=generator
        )
    t = t.to(latents.device)
    if noise is None:
        noise = _randn(latents.shape, latents, generator)
    noisy = lora_scheduler.add_noise(latents, noise, t)
    kind = lora_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = lora_scheduler.get_velocity(latents, noise, t)
    else:
        raise ValueError(f"prediction_type: unsupported LoRA model prediction type {kind!r}")
    if drop_camera is None:
        if not settings.lora_cfg_training:
            drop_camera = False
        elif generator is None:
            drop_camera = random.random() < 0.1
        else:
            u = torch.rand((), generator=generator, device=generator.device)
            drop_camera = bool(u < 0.1)
    cam = camera.reshape(b, -1)
    if drop_camera:
        cam = torch.zeros_like(cam)
    pred = lora(noisy, t, prompt.repeat(n, 1, 1), cam.repeat(n, 1))
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def vsd_step(
    engine: PerpNegSDSEngine,
    lora: LoRAUNet,
    lora_scheduler: Any,
    rgb: Tensor,
    cond: StepConditioning,
    prompt: Tensor,
    camera: Tensor,
    settings: VSDSettings,
    *,
    min_step: int,
    max_step: int,
    grad_clip_val: Optional[float] = None,
    rgb_as_latents: bool = False,
    generator: Optional[torch.Generator] = None,
    t: Optional[Tensor] = None,
    noise: Optional[Tensor] = None,
    t_lora: Optional[Tensor] = None,
    noise_lora: Optional[Tensor] = None,
    drop_camera: Optional[bool] = None,
    controls: Optional[PerpNegControls] = None,
) -> Dict[str, Any]:
    """One VSD step on renders ``rgb`` ``[B, H, W, C]`` with threestudio's output contract.

    Args:
        engine: the frozen pretrained model; its Perp-Neg prediction is ``engine.guided_noise``.
        lora: the LoRA model; lora_scheduler: its noise scheduler (ε or v prediction).
        cond: pretrained-branch conditioning (view prompts and Perp-Neg negatives).
        prompt: the view-independent prompt embedding of every sample, ``[B, L, D]`` (LoRA branch).
        camera: the LoRA's camera condition, ``[B, 4, 4]`` (c2w or mvp).

    Returns ``loss_vsd`` (0.5·‖latents − (latents − grad)‖² / B), ``loss_lora``, ``grad_norm``,
    ``min_step``, ``max_step``, ``perp_neg_branches``, ``nonfinite`` and ``loss_vsd_img`` when asked.
    The random draws are threestudio's, in its order: VAE posterior sample, t, noise (VSD), then t,
    noise and camera dropout of the LoRA loss; the keyword arguments override them. ``controls``
    act on ``cond`` right after the VSD t and noise (before the LoRA draws), as in
    :func:`~.sd.sds_step`.
    """
    if rgb.dim() != 4:
        raise ValueError(f"rgb: expected shape [B, H, W, C], got {tuple(rgb.shape)}")
    batch = rgb.shape[0]
    if rgb_as_latents and settings.use_img_loss:
        raise ValueError(
            "use_img_loss: the image-space loss needs RGB renders, got rgb_as_latents=True"
        )
    if prompt.shape[0] != batch or camera.shape[0] != batch:
        raise ValueError(
            f"prompt/camera: expected {batch} rows each, got {tuple(prompt.shape)} and "
            f"{tuple(camera.shape)}"
        )
    rgb_512, latents = renders_to_latents(engine, rgb, rgb_as_latents, generator)
    t, noise = draw_timesteps_and_noise(engine, latents, min_step, max_step, generator, t, noise)
    cond = apply_controls(cond, t, engine.num_train_timesteps, controls, generator)

    with torch.no_grad():
        latents_noisy = engine.scheduler.add_noise(latents, noise, t)
        eps_pretrained = engine.guided_noise(latents_noisy, t, cond, settings.scale)
        eps_pretrained, nonfinite = _replace_nonfinite(eps_pretrained, noise)
        eps_lora = lora_guided_noise(
            lora, lora_scheduler, latents_noisy, t, prompt, camera, settings.guidance_scale_lora
        )
        w = (1 - engine.alphas[t]).view(-1, 1, 1, 1)
        grad = w * (eps_pretrained - eps_lora)
        grad_img = None
        if settings.use_img_loss:
            alpha = (engine.alphas[t] ** 0.5).view(-1, 1, 1, 1)
            sigma = ((1 - engine.alphas[t]) ** 0.5).view(-1, 1, 1, 1)
            img_pre = engine.decode_latents((latents_noisy - sigma * eps_pretrained) / alpha)
            img_est = engine.decode_latents((latents_noisy - sigma * eps_lora) / alpha)
            grad_img = w * (img_est - img_pre) * alpha / sigma

    loss_vsd, grad = reparameterised_loss(latents, grad, grad_clip_val)
    loss_lora_value = lora_loss(
        lora,
        lora_scheduler,
        latents,
        prompt,
        camera,
        settings,
        generator=generator,
        t=t_lora,
        noise=noise_lora,
        drop_camera=drop_camera,
    )
    out: Dict[str, Any] = {
        "loss_vsd": loss_vsd,
        "loss_lora": loss_lora_value,
        "grad_norm": grad.norm(),
        "min_step": min_step,
        "max_step": max_step,
        "perp_neg_branches": cond.branches,
        "nonfinite": nonfinite,
    }
    if grad_img is not None:
        out["loss_vsd_img"] = reparameterised_loss(rgb_512, grad_img, grad_clip_val)[0]
    return out


def sample_latents(
    denoise: Any,
    scheduler: Any,
    shape: Tuple[int, ...],
    *,
    steps: int = 25,
    device: torch.device | str = "cpu",
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Latents sampled with ``scheduler`` (e.g. DPM-Solver) from ``denoise(latents, t) -> ε``."""
    scheduler.set_timesteps(steps, device=device)
    latents = torch.randn(shape, generator=generator, device=device) * scheduler.init_noise_sigma
    for ts in scheduler.timesteps:
        model_in = scheduler.scale_model_input(latents, ts)
        eps = denoise(model_in, ts.reshape(1).expand(shape[0]).to(device))
        latents = scheduler.step(eps, ts, latents).prev_sample
    return latents
