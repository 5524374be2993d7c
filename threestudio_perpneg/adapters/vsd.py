"""``perpneg-stable-diffusion-vsd-guidance``: threestudio's ``stable-diffusion-vsd-guidance`` with Perp-Neg."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import threestudio
import torch
from threestudio.utils.base import BaseModule
from torch import Tensor

from ..core.text import resolve_pretrained
from ..engines.sd import PerpNegSDSEngine, eval_conditioning, load_stable_diffusion
from ..engines.vsd import LoRAUNet, VSDSettings, sample_latents, vsd_step
from .guidance import PerpNegStableDiffusionGuidance


@threestudio.register("perpneg-stable-diffusion-vsd-guidance")
class PerpNegStableDiffusionVSDGuidance(BaseModule, PerpNegStableDiffusionGuidance):
    r"""Variational score distillation (ProlificDreamer) with Perp-Neg on the pretrained model.

    grad = (1 − ᾱ_t)·(ε̂_pretrained − ε̂_lora). ε̂_pretrained is the Perp-Neg prediction of the frozen
    model (one batched UNet call, 2 branches per sample plus one per non-zero-weight negative), or plain
    classifier-free guidance with ``use_perp_neg: false``. ε̂_lora comes from a LoRA copy of
    ``pretrained_model_name_or_path_lora`` conditioned on the camera (``camera_condition_type``), with
    the plain view-independent prompt (Perp-Neg applies to the pretrained model only, threestudio #135),
    trained every step by ``loss_lora``. Output keys are threestudio's (``loss_vsd``, ``loss_lora``,
    ``grad_norm``, ``min_step``, ``max_step``) plus ``perp_neg_branches`` and ``nonfinite``.

    The config surface is threestudio's ``stable-diffusion-vsd-guidance`` plus the ``perp_neg_*`` keys of
    ``perpneg-stable-diffusion-guidance``, ``guidance_scale_convention`` (default ``cfg``, the diffusers
    convention threestudio's VSD uses), ``lora_rank`` and ``seed``. The parameters of this module (the
    ``guidance`` entry of a system's optimizer) are the LoRA layers and the camera embedding only.
    """

    @dataclass
    class Config(PerpNegStableDiffusionGuidance.Config):
        #: BaseModule: optional checkpoint to load this module's weights from.
        weights: Optional[str] = None
        #: Model fine-tuned with LoRA; the same as pretrained_model_name_or_path (or None) shares one
        #: UNet between the two branches.
        pretrained_model_name_or_path_lora: Optional[str] = "stabilityai/stable-diffusion-2-1"
        guidance_scale: float = 7.5
        guidance_scale_convention: str = "cfg"
        #: Scale of the LoRA branch between the camera and the zero camera (diffusers convention).
        guidance_scale_lora: float = 1.0
        #: Zero the camera for 10% of the LoRA's training steps (classifier-free camera guidance).
        lora_cfg_training: bool = True
        #: Timesteps drawn per render for the LoRA's loss (loss_lora) each step.
        lora_n_timestamp_samples: int = 1
        #: Rank of the LoRA layers of the camera-conditioned copy (>= 1).
        lora_rank: int = 4
        #: ``extrinsics`` (c2w) or ``mvp``.
        camera_condition_type: str = "extrinsics"

    cfg: Config  # type: ignore[assignment]

    def configure(self) -> None:
        cfg = self.cfg
        if cfg.use_sjc:
            raise ValueError("use_sjc: not supported by the VSD guidance, expected false")
        if cfg.weighting_strategy != "sds":
            raise ValueError(
                f"weighting_strategy: the VSD guidance uses w(t) = 1 - alpha_bar_t (sds), got "
                f"{cfg.weighting_strategy!r}"
            )
        rank = cfg.lora_rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"lora_rank: expected an integer >= 1, got {rank!r}")
        self.vsd_settings = VSDSettings(
            guidance_scale=cfg.guidance_scale,
            guidance_scale_lora=cfg.guidance_scale_lora,
            scale_convention=cfg.guidance_scale_convention,
            lora_cfg_training=cfg.lora_cfg_training,
            lora_n_timestamp_samples=cfg.lora_n_timestamp_samples,
            camera_condition_type=cfg.camera_condition_type,
            use_img_loss=cfg.use_img_loss,
        )
        for key in ("enable_sequential_cpu_offload", "enable_attention_slicing", "token_merging"):
            if getattr(cfg, key):
                threestudio.warn(f"{key}: not supported by the VSD guidance, ignored")
        PerpNegStableDiffusionGuidance.configure(
            self
        )  # BaseModule.configure comes first in the MRO

    def _load_models(self) -> None:
        cfg = self.cfg
        threestudio.info("Loading Stable Diffusion (VSD) ...")
        unet, vae, scheduler = load_stable_diffusion(
            cfg.pretrained_model_name_or_path, dtype=self.weights_dtype, device=self.device
        )
        lora_path = cfg.pretrained_model_name_or_path_lora or cfg.pretrained_model_name_or_path
        self.single_model = resolve_pretrained(lora_path) == resolve_pretrained(
            cfg.pretrained_model_name_or_path
        )
        from diffusers import DDPMScheduler, UNet2DConditionModel

        if self.single_model:
            unet_lora = unet
        else:
            unet_lora = UNet2DConditionModel.from_pretrained(
                resolve_pretrained(lora_path, "pretrained_model_name_or_path_lora"),
                subfolder="unet",
                torch_dtype=self.weights_dtype,
            )
            unet_lora = unet_lora.to(self.device).eval().requires_grad_(False)
        if cfg.enable_channels_last_format:
            unet.to(memory_format=torch.channels_last)
            unet_lora.to(memory_format=torch.channels_last)
        self.lora_scheduler = DDPMScheduler.from_pretrained(
            resolve_pretrained(lora_path, "pretrained_model_name_or_path_lora"),
            subfolder="scheduler",
        )
        if scheduler.config.prediction_type != "epsilon":
            raise ValueError(
                "pretrained_model_name_or_path: the pretrained model must predict epsilon, got "
                f"{scheduler.config.prediction_type!r}"
            )
        # A plain object: the frozen models stay out of this module's parameters and state_dict.
        self.engine = PerpNegSDSEngine(
            unet, vae, scheduler, weights_dtype=self.weights_dtype, device=self.device
        )
        self.lora = LoRAUNet(unet_lora, rank=cfg.lora_rank, weights_dtype=self.weights_dtype)
        threestudio.info("Loaded Stable Diffusion (VSD)!")

    # ------------------------------------------------------------------ helpers
    def camera_condition(self, mvp_mtx: Tensor, c2w: Tensor) -> Tensor:
        if self.cfg.camera_condition_type == "extrinsics":
            return c2w
        return mvp_mtx  # validated in VSDSettings

    def plain_prompt(self, prompt_utils: Any, batch: int) -> Tensor:
        """The view-independent prompt embedding of every sample, ``[B, L, D]`` (LoRA branch)."""
        if hasattr(prompt_utils, "perp_neg_bank"):
            emb = prompt_utils.perp_neg_bank.prompt
        else:
            emb = prompt_utils.text_embeddings[0]
        return emb.to(self.device).unsqueeze(0).expand(batch, -1, -1)

    # ----------------------------------------------------------------------- call
    def forward(
        self,
        rgb: Tensor,
        prompt_utils: Any,
        elevation: Tensor,
        azimuth: Tensor,
        camera_distances: Tensor,
        mvp_mtx: Tensor,
        c2w: Tensor,
        rgb_as_latents: bool = False,
        **kwargs: Any,
    ) -> Dict[str, Any]:
        cond = self.conditioning(prompt_utils, elevation, azimuth, camera_distances)
        out = vsd_step(
            self.engine,
            self.lora,
            self.lora_scheduler,
            rgb,
            cond,
            self.plain_prompt(prompt_utils, rgb.shape[0]),
            self.camera_condition(mvp_mtx, c2w),
            self.vsd_settings,
            min_step=self.min_step,
            max_step=self.max_step,
            grad_clip_val=self.grad_clip_val,
            rgb_as_latents=rgb_as_latents,
            generator=self.generator,
            controls=self.perp_neg_controls,
        )
        return self.with_control_logs(out)

    # ------------------------------------------------------------------ samples
    def _decode_sample(self, latents: Tensor) -> Tensor:
        size = latents.shape[-2:]
        return self.engine.decode_latents(latents, size[0], size[1]).permute(0, 2, 3, 1).float()

    @torch.no_grad()
    def sample(
        self,
        prompt_utils: Any,
        elevation: Tensor,
        azimuth: Tensor,
        camera_distances: Tensor,
        seed: int = 0,
        **kwargs: Any,
    ) -> Tensor:
        """Images ``[B, H, W, 3]`` of the pretrained model with the step's (Perp-Neg) guidance."""
        from diffusers import DPMSolverMultistepScheduler

        cond = self.conditioning(prompt_utils, elevation, azimuth, camera_distances)
        sched = DPMSolverMultistepScheduler.from_config(self.engine.scheduler.config)
        unet = self.engine.unet
        shape = (
            elevation.shape[0],
            unet.config.in_channels,
            unet.config.sample_size,
            unet.config.sample_size,
        )
        gen = torch.Generator(device=self.device).manual_seed(seed)
        scale = self.vsd_settings.scale
        n_train = self.engine.num_train_timesteps
        controls = self.perp_neg_controls
        latents = sample_latents(
            lambda x, t: self.engine.guided_noise(
                x, t, eval_conditioning(cond, t, n_train, controls), scale
            ),
            sched,
            shape,
            device=self.device,
            generator=gen,
        )
        return self._decode_sample(latents)

    @torch.no_grad()
    def sample_lora(
        self,
        prompt_utils: Any,
        elevation: Tensor,
        azimuth: Tensor,
        camera_distances: Tensor,
        mvp_mtx: Tensor,
        c2w: Tensor,
        seed: int = 0,
        **kwargs: Any,
    ) -> Tensor:
        """Images ``[B, H, W, 3]`` of the LoRA model for the batch's cameras (plain prompt)."""
        from diffusers import DPMSolverMultistepScheduler

        from ..engines.vsd import lora_guided_noise

        batch = elevation.shape[0]
        prompt = self.plain_prompt(prompt_utils, batch)
        camera = self.camera_condition(mvp_mtx, c2w)
        # lora_guided_noise returns ε (v predictions are converted), so the sampler takes ε.
        sched = DPMSolverMultistepScheduler.from_config(
            self.lora_scheduler.config, prediction_type="epsilon"
        )
        unet = self.lora.unet
        shape = (batch, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        scale = self.cfg.guidance_scale_lora
        latents = sample_latents(
            lambda x, t: lora_guided_noise(
                self.lora, self.lora_scheduler, x, t, prompt, camera, scale
            ),
            sched,
            shape,
            device=self.device,
            generator=gen,
        )
        return self._decode_sample(latents)
