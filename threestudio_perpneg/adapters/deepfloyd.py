"""DeepFloyd IF for threestudio: ``perpneg-deep-floyd-guidance`` and ``perpneg-deepfloyd-prompt-processor``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

import threestudio
from torch import Tensor

from ..engines.pixel import PerpNegIFEngine, if_sds_step, load_deepfloyd_if
from .guidance import PerpNegStableDiffusionGuidance
from .prompt_processor import PerpNegPromptProcessor

IF_CHECKPOINT = "DeepFloyd/IF-I-XL-v1.0"


@threestudio.register("perpneg-deep-floyd-guidance")
class PerpNegDeepFloydGuidance(PerpNegStableDiffusionGuidance):
    r"""Score distillation with Perp-Neg (https://arxiv.org/abs/2304.04968) on DeepFloyd IF stage I.

    Drop-in for threestudio's ``deep-floyd-guidance``: renders are resized to the UNet's native
    resolution (``unet.config.sample_size``: 64×64 for IF) in [-1, 1]; the UNet's 6 output channels
    are ε (guided with Perp-Neg) and the learned variance (taken from the positive branch, used by
    ``guidance_eval``, which works with Perp-Neg on). A UNet with 3 output channels (ε only, a
    fixed-variance DDPM scheduler) works too: the Janus testbed prior
    (``threestudio_perpneg.testbed.load_prior_path()``, 16-32 px, with its CLIP text encoder read by
    ``perpneg-prompt-processor``). Conditioning, scale
    convention, ``perp_neg_*`` keys, ``seed`` and the step schedules are those of
    ``perpneg-stable-diffusion-guidance`` (one batched UNet call, 2 branches per sample plus one per
    non-zero-weight negative). Works with ``perpneg-deepfloyd-prompt-processor`` and threestudio's
    ``deep-floyd-prompt-processor``. The SD-only keys ``use_sjc``, ``use_img_loss`` and
    ``token_merging`` are rejected.
    """

    @dataclass
    class Config(PerpNegStableDiffusionGuidance.Config):
        #: Hub id or local diffusers folder of the IF stage I checkpoint (unet/, scheduler/), or
        #: of another pixel-space UNet (e.g. the Janus testbed prior).
        pretrained_model_name_or_path: str = IF_CHECKPOINT
        #: s (threestudio's IF default 20); meaning set by guidance_scale_convention.
        guidance_scale: float = 20.0
        #: channels_last UNet weights (threestudio's IF default).
        enable_channels_last_format: bool = True

    cfg: Config

    def configure(self) -> None:
        for key in ("use_sjc", "use_img_loss", "token_merging"):
            if self.cfg.get(key):
                raise ValueError(f"{key}: not supported by perpneg-deep-floyd-guidance")
        super().configure()

    def _load_models(self) -> None:
        threestudio.info("Loading Deep Floyd ...")
        self.unet, self.scheduler = load_deepfloyd_if(
            self.cfg.pretrained_model_name_or_path, dtype=self.weights_dtype, device=self.device
        )
        self.vae = None
        self._memory_options()
        self.if_engine = PerpNegIFEngine(
            self.unet, self.scheduler, weights_dtype=self.weights_dtype, device=self.device
        )
        self.engine = self.if_engine
        threestudio.info("Loaded Deep Floyd!")

    def __call__(
        self,
        rgb: Tensor,
        prompt_utils: Any,
        elevation: Tensor,
        azimuth: Tensor,
        camera_distances: Tensor,
        rgb_as_latents: bool = False,
        guidance_eval: bool = False,
        **kwargs: Any,
    ) -> Dict[str, Any]:
        if rgb_as_latents:
            raise ValueError("rgb_as_latents: DeepFloyd IF has no latent space, pass RGB renders")
        cond = self.conditioning(prompt_utils, elevation, azimuth, camera_distances)
        out = if_sds_step(
            self.if_engine,
            rgb,
            cond,
            self.settings,
            min_step=self.min_step,
            max_step=self.max_step,
            elevation=elevation,
            azimuth=azimuth,
            camera_distances=camera_distances,
            grad_clip_val=self.grad_clip_val,
            guidance_eval=guidance_eval,
            max_items_eval=self.cfg.max_items_eval,
            generator=self.generator,
            controls=self.perp_neg_controls,
        )
        return self.with_control_logs(out)


@threestudio.register("perpneg-deepfloyd-prompt-processor")
class PerpNegDeepFloydPromptProcessor(PerpNegPromptProcessor):
    """``perpneg-prompt-processor`` with IF's T5 text encoder (77 tokens, as threestudio).

    Same view prompts, user negatives, safetensors cache (namespace ``t5``) and rank-0 encoding;
    only the encoder differs.
    """

    #: Text encoder of :func:`~threestudio_perpneg.core.text.encode_prompts`.
    text_encoder_kind = "t5"

    @dataclass
    class Config(PerpNegPromptProcessor.Config):
        #: Hub id or local diffusers folder whose ``text_encoder``/``tokenizer`` (T5) encode prompts.
        pretrained_model_name_or_path: str = IF_CHECKPOINT

    cfg: Config
