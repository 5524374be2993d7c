"""``perpneg-stable-diffusion-sdi-guidance``: drop-in for threestudio's ``stable-diffusion-sdi-guidance``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import threestudio
from threestudio.utils.misc import C, get_rank
from torch import Tensor

from ..engines.sdi import DDIMInversion, SDISettings, sdi_step
from .guidance import PerpNegStableDiffusionGuidance
from .state import reseed_for_step


@threestudio.register("perpneg-stable-diffusion-sdi-guidance")
class PerpNegStableDiffusionSDIGuidance(PerpNegStableDiffusionGuidance):
    r"""Score Distillation via Inversion (https://arxiv.org/abs/2405.15891) with Perp-Neg
    (https://arxiv.org/abs/2304.04968) on Stable Diffusion.

    The noise of each step comes from ``inversion_n_steps`` DDIM inversion steps of the render's
    latents towards t (plus a random δ < T / ``inversion_n_steps``), each driven by the guided
    prediction at ``inversion_guidance_scale``; the loss 0.5·mean((x − x̂_0)²) / B pulls the latents x
    to x̂_0 of the inverted latent under the guided prediction at ``guidance_scale``. Every guided
    prediction is Perp-Neg, ε̂ = ε_u + s'·(Δ_pos + Σ_i w_i ⊥(Δ_i, Δ_pos)), in one UNet call with 2 rows
    per sample plus one per non-zero-weight negative, each negative on its own sample's latent.

    The config surface is threestudio's ``stable-diffusion-sdi-guidance`` (same keys, defaults and
    meaning, ``loss_sdi`` and the ``test_info`` images of the ``sdi-system``) plus the ``perp_neg_*``
    keys, ``guidance_scale_convention`` and ``seed`` of ``perpneg-stable-diffusion-guidance``. The
    convention defaults to ``cfg``: ``sdi.yaml`` turns Perp-Neg on, where threestudio's SDI combines as
    ε_u + s·(…) (its Perp-Neg-off path is ε_c + s·(ε_c − ε_u), the ``threestudio`` convention).
    ``grad_clip`` clamps x − x̂_0 (threestudio's SDI resolves it but never applies it);
    ``use_img_loss``, ``var_red`` and ``weighting_strategy`` are accepted and unused, as in
    threestudio's SDI.
    """

    @dataclass
    class Config(PerpNegStableDiffusionGuidance.Config):
        #: s of the final score (threestudio's default 100; its ``sdi.yaml`` sets 7.5).
        guidance_scale: float = 100.0
        #: ``cfg`` (default): ε_u + s(…), threestudio's SDI with Perp-Neg on; ``threestudio``:
        #: ε_u + (s+1)(…), threestudio's SDI with Perp-Neg off. Applies to both scales.
        guidance_scale_convention: str = "cfg"
        #: Steps of the run, for t_anneal (threestudio's SDI default 10000).
        trainer_max_steps: int = 10000
        #: DDIM steps of the guidance_eval images (default 50).
        n_ddim_steps: int = 50
        #: Invert for the noise (SDI, default); false = random noise as in SDS, same x̂_0 loss.
        enable_sdi: bool = True
        #: s of every inversion step (paper and threestudio: -7.5, away from the prompt).
        inversion_guidance_scale: float = -7.5
        #: DDIM inversion grid: steps of T / n timesteps below t, plus the last step (default 10).
        inversion_n_steps: int = 10
        #: η >= 0: fresh noise added at each inversion step, in units of DDIM's step std (0.3).
        inversion_eta: float = 0.3
        #: Linear t annealing from max_step_percent to min_step_percent over trainer_max_steps,
        #: one t for the whole batch (default true, as the paper).
        t_anneal: bool = True

    cfg: Config

    def configure(self) -> None:
        cfg = self.cfg
        for key in ("use_sjc", "sqrt_anneal"):
            if getattr(cfg, key):
                raise ValueError(
                    f"{key}: not supported by the SDI guidance (t_anneal is its annealing), "
                    "expected false"
                )
        if cfg.use_img_loss:
            threestudio.warn("use_img_loss: not used by SDI (as in threestudio's SDI), ignored")
        self.sdi_settings = SDISettings(
            guidance_scale=cfg.guidance_scale,
            inversion_guidance_scale=cfg.inversion_guidance_scale,
            scale_convention=cfg.guidance_scale_convention,
            enable_sdi=cfg.enable_sdi,
            inversion_n_steps=cfg.inversion_n_steps,
            inversion_eta=cfg.inversion_eta,
            n_ddim_steps=cfg.n_ddim_steps,
        )
        PerpNegStableDiffusionGuidance.configure(self)
        self.inversion = DDIMInversion(self.scheduler, cfg.inversion_n_steps)

    def __call__(
        self,
        rgb: Tensor,
        prompt_utils: Any,
        elevation: Tensor,
        azimuth: Tensor,
        camera_distances: Tensor,
        rgb_as_latents: bool = False,
        guidance_eval: bool = False,
        test_info: bool = False,
        call_with_defined_noise: Optional[Tensor] = None,
        **kwargs: Any,
    ) -> Dict[str, Any]:
        cond = self.conditioning(prompt_utils, elevation, azimuth, camera_distances)
        out = sdi_step(
            self.engine,
            self.inversion,
            rgb,
            cond,
            self.sdi_settings,
            min_step=self.min_step,
            max_step=self.max_step,
            elevation=elevation,
            azimuth=azimuth,
            camera_distances=camera_distances,
            grad_clip_val=self.grad_clip_val,
            rgb_as_latents=rgb_as_latents,
            guidance_eval=guidance_eval,
            test_info=test_info,
            max_items_eval=self.cfg.max_items_eval,
            generator=self.generator,
            noise=call_with_defined_noise,
            controls=self.perp_neg_controls,
        )
        return self.with_control_logs(out)

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        cfg = self.cfg
        if not cfg.t_anneal:
            PerpNegStableDiffusionGuidance.update_step(self, epoch, global_step, on_load_weights)
            return
        if cfg.grad_clip is not None:
            self.grad_clip_val = C(cfg.grad_clip, epoch, global_step)
        # Linear in the run's progress, not clamped past trainer_max_steps (as threestudio's SDI).
        progress = float(global_step) / cfg.trainer_max_steps
        max_pct = cfg.max_step_percent
        if not isinstance(max_pct, (int, float)):
            max_pct = max_pct[1]  # a schedule's start value, as threestudio does
        min_pct = C(cfg.min_step_percent, epoch, global_step)
        current = (max_pct - min_pct) * (1 - progress) + min_pct
        self.set_min_max_steps(current, current)
        self.set_weight_scale(float(C(cfg.perp_neg_weight_scale, epoch, global_step)))
        reseed_for_step(self.generator, cfg.seed, get_rank(), global_step)
