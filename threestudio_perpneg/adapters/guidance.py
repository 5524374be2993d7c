"""``perpneg-stable-diffusion-guidance``: drop-in for threestudio's ``stable-diffusion-guidance``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import threestudio
import torch
from threestudio.utils.base import BaseObject
from threestudio.utils.misc import C, cleanup, get_rank
from torch import Tensor

from ..core.conditioning import PromptBank, StepConditioning, step_conditioning
from ..core.controls import (
    PerpNegControls,
    check_eval_prob,
    check_sampling,
    check_t_range,
    check_weight_scale,
    resolve_schedule,
)
from ..core.views import VIEW_NAMES, Scheme, ThreestudioScheme, ViewThresholds, make_scheme
from ..engines.sd import PerpNegSDSEngine, SDSSettings, load_stable_diffusion, sds_step
from .state import make_generator, reseed_for_step


@threestudio.register("perpneg-stable-diffusion-guidance")
class PerpNegStableDiffusionGuidance(BaseObject):
    r"""Score distillation with Perp-Neg (https://arxiv.org/abs/2304.04968) on Stable Diffusion.

    ε̂ = ε_u + s'·(Δ_pos + Σ_i w_i ⊥(Δ_i, Δ_pos)) with s' = guidance_scale + 1 under the default
    ``threestudio`` convention (so Perp-Neg off is exactly threestudio's ε_c + s·(ε_c − ε_u)) or
    s' = guidance_scale under ``cfg``. One UNet call per step evaluates 2 branches per sample plus
    one per non-zero-weight negative, each on its own sample's noisy latent and timestep.

    Works with ``perpneg-prompt-processor`` (scheme, thresholds and user negatives come from it) and
    with threestudio's ``stable-diffusion-prompt-processor`` (its view embeddings, buckets and
    ``perp_neg_f_*`` triples, scheme ``threestudio`` unless ``perp_neg_scheme`` says otherwise).
    The config surface is that of threestudio's ``stable-diffusion-guidance`` plus the
    ``perp_neg_*`` keys, ``guidance_scale_convention`` and ``seed``.
    """

    @dataclass
    class Config(BaseObject.Config):
        #: Hub id or local diffusers folder of the Stable Diffusion checkpoint.
        pretrained_model_name_or_path: str = "stabilityai/stable-diffusion-2-1-base"
        #: xformers attention on torch < 2 (torch >= 2 uses SDPA anyway).
        enable_memory_efficient_attention: bool = False
        #: Offload UNet/VAE submodules to CPU between uses (needs accelerate; slow, saves VRAM).
        enable_sequential_cpu_offload: bool = False
        #: Sliced attention (saves VRAM, slower).
        enable_attention_slicing: bool = False
        #: channels_last UNet weights.
        enable_channels_last_format: bool = False
        #: s (threestudio/DreamFusion default 100); meaning set by guidance_scale_convention.
        guidance_scale: float = 100.0
        #: ``threestudio``: ε_u + (s+1)(…), as threestudio's vanilla SDS; ``cfg``: ε_u + s(…).
        guidance_scale_convention: str = "threestudio"
        #: Gradient clip value or schedule [start_step, start, end, end_step]; None = no clip.
        grad_clip: Optional[Any] = None
        #: fp16 UNet/VAE weights (recommended on GPU; use false on CPU).
        half_precision_weights: bool = True
        #: Lower bound of t / 1000, a float or a schedule (default 0.02).
        min_step_percent: Any = 0.02
        #: Upper bound of t / 1000, a float or a schedule (default 0.98).
        max_step_percent: Any = 0.98
        #: HiFA square-root timestep annealing over trainer_max_steps.
        sqrt_anneal: bool = False
        #: Steps of the run, for sqrt_anneal.
        trainer_max_steps: int = 25000
        #: HiFA image-space SDS (adds loss_sds_img; one more VAE decode per step).
        use_img_loss: bool = False
        #: Score Jacobian chaining (DDPM) instead of SDS.
        use_sjc: bool = False
        #: SJC variance reduction.
        var_red: bool = True
        #: SDS weighting w(t): sds, uniform or fantasia3d.
        weighting_strategy: str = "sds"
        #: ToMe token merging via tomesd (optional dependency).
        token_merging: bool = False
        #: Keyword arguments of ``tomesd.apply_patch`` (e.g. ``ratio``); {} = tomesd's defaults.
        token_merging_params: Optional[dict] = field(default_factory=dict)
        #: Condition on the camera's view (required for view negatives).
        view_dependent_prompting: bool = True
        #: Items of the batch denoised for guidance_eval images (-1 = all).
        max_items_eval: int = 4
        #: Perp-Neg on (default) or plain classifier-free guidance on the view prompt.
        use_perp_neg: bool = True
        #: Override of the weight scheme (``threestudio`` or ``authors``); None = from the processor.
        perp_neg_scheme: Optional[str] = None
        #: Negatives with |w| <= this are skipped (never evaluated); 0 skips exact zeros only.
        perp_neg_min_weight: float = 0.0
        #: Multiplier λ >= 0 of every negative weight (view and user negatives): a number or a
        #: schedule [start_step, start, end, end_step] resolved each step with threestudio's C
        #: (logged as train/perp_neg_weight_scale). Default 1 (the scheme's weights).
        perp_neg_weight_scale: Any = 1.0
        #: [lo, hi], fractions of the training timesteps: negatives are evaluated only for samples
        #: with lo <= t/1000 <= hi, the others get plain CFG on their interpolated positive (no
        #: negative rows). Default [0, 1] (every t).
        perp_neg_t_range: Any = field(default_factory=lambda: [0.0, 1.0])
        #: ``all`` (default): every negative; ``one``: one negative per sample, drawn with
        #: p_i = |w_i| / sum |w_j| from the step's generator and weighted w_i / p_i (unbiased,
        #: 3 UNet rows per sample).
        perp_neg_sampling: str = "all"
        #: Probability p in (0, 1] that a sample's negatives (after ``perp_neg_sampling``) are
        #: evaluated, their weights divided by p (unbiased); the other samples get plain CFG. With
        #: ``one``, 2 + p UNet rows per sample on average. Default 1 (always).
        perp_neg_eval_prob: float = 1.0
        #: Seed of a private generator for timesteps, noise, VAE sampling and the sampling
        #: controls' draws, re-seeded at every step from (seed, DDP rank, global_step), so ranks
        #: draw different noise and a resumed run draws what the uninterrupted run drew; None =
        #: the global RNG, seeded by threestudio.
        seed: Optional[int] = None

    cfg: Config

    def configure(self) -> None:
        cfg = self.cfg
        self.settings = SDSSettings(
            guidance_scale=cfg.guidance_scale,
            scale_convention=cfg.guidance_scale_convention,
            weighting_strategy=cfg.weighting_strategy,
            use_sjc=cfg.use_sjc,
            var_red=cfg.var_red,
            use_img_loss=cfg.use_img_loss,
        )
        if cfg.perp_neg_scheme is not None:
            make_scheme(cfg.perp_neg_scheme)  # validate now, not at the first step
        mw = cfg.perp_neg_min_weight
        if (
            isinstance(mw, bool)
            or not isinstance(mw, (int, float))
            or not math.isfinite(mw)
            or mw < 0
        ):
            raise ValueError(f"perp_neg_min_weight: expected a finite number >= 0, got {mw!r}")
        check_weight_scale(cfg.perp_neg_weight_scale)
        self._t_range = check_t_range(cfg.perp_neg_t_range)
        self._sampling = check_sampling(cfg.perp_neg_sampling)
        self._eval_prob = check_eval_prob(cfg.perp_neg_eval_prob)
        self.set_weight_scale(resolve_schedule(cfg.perp_neg_weight_scale, 0, 0))

        self.weights_dtype = torch.float16 if cfg.half_precision_weights else torch.float32
        self._load_models()
        self.num_train_timesteps = self.engine.num_train_timesteps
        self.alphas = self.engine.alphas
        # Re-seeded per step from (seed, rank, global_step) in update_step: see adapters/state.py.
        self.generator = make_generator(cfg.seed, get_rank(), self.device)
        self.grad_clip_val: Optional[float] = None
        self._warned_flag = False
        self.set_min_max_steps()
        cleanup()

    def _load_models(self) -> None:
        """Load the prior and build ``self.engine`` (subclasses swap the model family)."""
        cfg = self.cfg
        threestudio.info("Loading Stable Diffusion ...")
        self.unet, self.vae, self.scheduler = load_stable_diffusion(
            cfg.pretrained_model_name_or_path,
            dtype=self.weights_dtype,
            device=self.device,
            use_sjc=cfg.use_sjc,
        )
        self._memory_options()
        self.engine = PerpNegSDSEngine(
            self.unet,
            self.vae,
            self.scheduler,
            weights_dtype=self.weights_dtype,
            device=self.device,
        )
        threestudio.info("Loaded Stable Diffusion!")

    def _memory_options(self) -> None:
        cfg = self.cfg
        if cfg.enable_memory_efficient_attention and int(torch.__version__.split(".")[0]) < 2:
            self.unet.enable_xformers_memory_efficient_attention()
        if cfg.enable_attention_slicing:
            self.unet.set_attention_slice(1)
        if cfg.enable_channels_last_format:
            self.unet.to(memory_format=torch.channels_last)
        if cfg.enable_sequential_cpu_offload:
            from accelerate import cpu_offload

            for module in (self.unet, self.vae):
                if module is not None:  # DeepFloyd IF has no VAE
                    cpu_offload(module, self.device)
        if cfg.token_merging:
            import tomesd

            tomesd.apply_patch(self.unet, **(cfg.token_merging_params or {}))

    def set_weight_scale(self, scale: float) -> None:
        """The step's Perp-Neg controls with weight multiplier ``scale``."""
        self.perp_neg_controls = PerpNegControls(
            weight_scale=scale,
            t_range=self._t_range,
            sampling=self._sampling,
            eval_prob=self._eval_prob,
        )

    def set_min_max_steps(
        self, min_step_percent: float = 0.02, max_step_percent: float = 0.98
    ) -> None:
        self.min_step = int(self.num_train_timesteps * min_step_percent)
        self.max_step = int(self.num_train_timesteps * max_step_percent)

    # ------------------------------------------------------------------ conditioning
    def conditioning(
        self,
        prompt_utils: Any,
        elevation: Tensor,
        azimuth: Tensor,
        camera_distances: Tensor,
    ) -> StepConditioning:
        """The step's per-sample embeddings and negatives, from our or a stock prompt processor."""
        cfg = self.cfg
        if (
            getattr(prompt_utils, "use_perp_neg", False)
            and not cfg.use_perp_neg
            and not self._warned_flag
        ):
            threestudio.warn(
                "prompt_processor.use_perp_neg is true but guidance.use_perp_neg is false: "
                "running plain classifier-free guidance"
            )
            self._warned_flag = True
        bank: PromptBank
        scheme: Scheme
        view: Optional[Tensor] = None
        thresholds = ViewThresholds()
        if hasattr(prompt_utils, "perp_neg_bank"):
            bank = prompt_utils.perp_neg_bank
            scheme = prompt_utils.perp_neg_scheme
            thresholds = prompt_utils.perp_neg_thresholds
        else:
            bank, view = _stock_bank_and_views(prompt_utils, elevation, azimuth, camera_distances)
            scheme = ThreestudioScheme(
                f_fs=tuple(prompt_utils.perp_neg_f_fs),
                f_sf=tuple(prompt_utils.perp_neg_f_sf),
                f_sb=tuple(prompt_utils.perp_neg_f_sb),
                f_fsb=tuple(prompt_utils.perp_neg_f_fsb),
            )
        if cfg.perp_neg_scheme is not None and cfg.perp_neg_scheme != scheme.name:
            scheme = make_scheme(cfg.perp_neg_scheme)
        return step_conditioning(
            bank.to(self.device),
            elevation,
            azimuth,
            scheme=scheme,
            thresholds=thresholds,
            view=view,
            view_dependent=cfg.view_dependent_prompting,
            perp_neg=cfg.use_perp_neg,
            min_weight=cfg.perp_neg_min_weight,
        )

    # ----------------------------------------------------------------------- call
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
        cond = self.conditioning(prompt_utils, elevation, azimuth, camera_distances)
        out = sds_step(
            self.engine,
            rgb,
            cond,
            self.settings,
            min_step=self.min_step,
            max_step=self.max_step,
            elevation=elevation,
            azimuth=azimuth,
            camera_distances=camera_distances,
            grad_clip_val=self.grad_clip_val,
            rgb_as_latents=rgb_as_latents,
            guidance_eval=guidance_eval,
            max_items_eval=self.cfg.max_items_eval,
            generator=self.generator,
            controls=self.perp_neg_controls,
        )
        return self.with_control_logs(out)

    def with_control_logs(self, out: Dict[str, Any]) -> Dict[str, Any]:
        """Adds ``perp_neg_weight_scale`` (systems log every output key as ``train/<key>``)."""
        out["perp_neg_weight_scale"] = self.perp_neg_controls.weight_scale
        return out

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        cfg = self.cfg
        if cfg.grad_clip is not None:
            self.grad_clip_val = C(cfg.grad_clip, epoch, global_step)
        min_pct = C(cfg.min_step_percent, epoch, global_step)
        if cfg.sqrt_anneal:
            progress = (float(global_step) / cfg.trainer_max_steps) ** 0.5
            max_pct = cfg.max_step_percent
            if not isinstance(max_pct, (int, float)):
                max_pct = max_pct[1]  # a schedule's start value, as threestudio does
            current = (max_pct - min_pct) * (1 - progress) + min_pct
            self.set_min_max_steps(current, current)
        else:
            self.set_min_max_steps(min_pct, C(cfg.max_step_percent, epoch, global_step))
        self.set_weight_scale(float(C(cfg.perp_neg_weight_scale, epoch, global_step)))
        reseed_for_step(self.generator, cfg.seed, get_rank(), global_step)


def _stock_bank_and_views(
    prompt_utils: Any, elevation: Tensor, azimuth: Tensor, camera_distances: Tensor
) -> tuple[PromptBank, Tensor]:
    """Bank and view buckets from a stock threestudio ``PromptProcessorOutput``."""
    order = [prompt_utils.direction2idx[name] for name in VIEW_NAMES]
    views = prompt_utils.text_embeddings_vd[order]
    uncond = prompt_utils.uncond_text_embeddings_vd[order]
    # The stock buckets: later directions override earlier ones, as in threestudio.
    bucket = torch.zeros_like(elevation, dtype=torch.long)
    for d in prompt_utils.directions:
        mask = d.condition(elevation, azimuth, camera_distances)
        bucket = torch.where(mask, torch.full_like(bucket, VIEW_NAMES.index(d.name)), bucket)
    ld = views.shape[1:]
    bank = PromptBank(
        prompt=prompt_utils.text_embeddings[0],
        views=views,
        uncond=uncond,
        negatives=views.new_zeros((0, *ld)),
        negative_weights=views.new_zeros(0),
    )
    return bank, bucket
