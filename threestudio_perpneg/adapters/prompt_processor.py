"""``perpneg-prompt-processor``: view prompts, user negatives and a safe embedding cache."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import threestudio
from threestudio.models.prompt_processors.base import (
    DirectionConfig,
    PromptProcessor,
    PromptProcessorOutput,
)
from threestudio.utils.misc import cleanup
from torch import Tensor

from ..core.conditioning import PromptBank
from ..core.text import (
    DEFAULT_TEMPLATES,
    FRONT_TEMPLATES,
    encode_prompts,
    text_embeddings,
    view_prompts,
)
from ..core.views import VIEW_NAMES, Scheme, ViewThresholds, classify_views, scheme_from_config


@dataclass
class PerpNegPromptProcessorOutput(PromptProcessorOutput):
    """threestudio's ``PromptProcessorOutput`` plus what Perp-Neg needs.

    Stock threestudio guidances read only the parent fields, so they keep working.

    Args:
        perp_neg_bank: the embeddings (plain, views, unconditional, user negatives).
        perp_neg_scheme: view negative weight scheme.
        perp_neg_thresholds: camera buckets in degrees.
        perp_neg_prompts: the user negative prompts, in bank order.
    """

    perp_neg_bank: PromptBank
    perp_neg_scheme: Scheme
    perp_neg_thresholds: ViewThresholds
    perp_neg_prompts: List[str]


def _condition(index: int, thresholds: ViewThresholds) -> Any:
    def condition(elevation: Tensor, azimuth: Tensor, camera_distances: Tensor) -> Tensor:
        return classify_views(elevation, azimuth, thresholds) == index

    return condition


@threestudio.register("perpneg-prompt-processor")
class PerpNegPromptProcessor(PromptProcessor):
    """Stable Diffusion (CLIP) prompt processor for Perp-Neg guidance.

    Everything threestudio's ``stable-diffusion-prompt-processor`` reads is kept (``prompt``,
    ``prompt_front/side/back/overhead``, ``negative_prompt`` as the unconditional baseline, the
    thresholds, ``view_dependent_prompt_front``, ``use_cache``, ``lib:`` prompts, prompt debiasing);
    added are configurable view templates, user negative prompts projected with Perp-Neg, a choice
    of weight scheme, and a cache folder of safetensors files written atomically on rank 0.
    """

    @dataclass
    class Config(PromptProcessor.Config):
        #: Hub id or local diffusers folder whose ``text_encoder``/``tokenizer`` encode prompts.
        pretrained_model_name_or_path: str = "stabilityai/stable-diffusion-2-1-base"
        #: Folder of the embedding cache (one ``.safetensors`` per model and prompt).
        cache_dir: str = ".threestudio_cache/perpneg_text_embeddings"
        #: View prompt templates, ``{view: "... {prompt} ..."}``; missing views use the defaults.
        view_templates: Optional[Dict[str, str]] = None
        #: Weight scheme of the view negatives: ``threestudio`` (perp_neg_f_*) or ``authors``.
        perp_neg_scheme: str = "threestudio"
        #: ``authors`` scheme: weight of a fully active view negative (paper: -2).
        perp_neg_negative_w: float = -2.0
        #: ``authors`` scheme: decay of the front negative with r (paper: 2).
        perp_neg_front_decay_factor: float = 2.0
        #: ``authors`` scheme: decay of the side negative (paper: 10).
        perp_neg_side_decay_factor: float = 10.0
        #: ``authors`` scheme: r above which the nearer view's negative is off (paper: 0.8).
        perp_neg_front_cutoff: float = 0.8
        #: User negative prompts, projected ⊥ to the positive direction like the view negatives.
        perp_neg_prompts: List[str] = field(default_factory=list)
        #: Their weights (each ≤ 0), one per prompt.
        perp_neg_prompt_weights: List[float] = field(default_factory=list)

    cfg: Config

    #: Text encoder of :func:`~threestudio_perpneg.core.text.encode_prompts` (``clip`` or ``t5``).
    text_encoder_kind = "clip"

    # threestudio's base class spawns a process to encode; we encode in-process on rank 0.
    def configure_text_encoder(self) -> None:
        pass

    def destroy_text_encoder(self) -> None:
        pass

    def configure(self) -> None:
        cfg = self.cfg
        self.thresholds = ViewThresholds(
            front=cfg.front_threshold, back=cfg.back_threshold, overhead=cfg.overhead_threshold
        )
        self.scheme = scheme_from_config(
            cfg.perp_neg_scheme,
            {
                "f_fs": cfg.perp_neg_f_fs,
                "f_sf": cfg.perp_neg_f_sf,
                "f_sb": cfg.perp_neg_f_sb,
                "f_fsb": cfg.perp_neg_f_fsb,
            },
            {
                "negative_w": cfg.perp_neg_negative_w,
                "front_decay_factor": cfg.perp_neg_front_decay_factor,
                "side_decay_factor": cfg.perp_neg_side_decay_factor,
                "front_cutoff": cfg.perp_neg_front_cutoff,
            },
        )
        self.user_negatives, self.user_weights = _user_negatives(
            list(cfg.perp_neg_prompts), list(cfg.perp_neg_prompt_weights)
        )
        if not isinstance(cfg.prompt, str) or not cfg.prompt.strip():
            raise ValueError(f"prompt: expected a non-empty string, got {cfg.prompt!r}")

        templates = dict(FRONT_TEMPLATES if cfg.view_dependent_prompt_front else DEFAULT_TEMPLATES)
        templates.update(dict(cfg.view_templates or {}))
        self.directions = [
            DirectionConfig(
                name,
                _apply_template(templates.get(name, "")),
                lambda s: s,
                _condition(i, self.thresholds),
            )
            for i, name in enumerate(VIEW_NAMES)
        ]
        self.direction2idx = {d.name: i for i, d in enumerate(self.directions)}

        library = "load/prompt_library.json"
        self.prompt_library = {}
        if os.path.exists(library):
            with open(library) as f:
                self.prompt_library = json.load(f)
        self.prompt = self.preprocess_prompt(cfg.prompt)
        self.negative_prompt = cfg.negative_prompt
        overrides = {name: cfg.get(f"prompt_{name}", None) for name in VIEW_NAMES}
        if cfg.use_prompt_debiasing:
            if any(overrides[v] for v in ("side", "back", "overhead")):
                raise ValueError(
                    "use_prompt_debiasing: cannot be combined with prompt_side/back/overhead"
                )
            debiased = self.get_debiased_prompt(self.prompt)
            self.prompts_vd = [
                view_prompts(p, templates, overrides)[i] for i, p in enumerate(debiased)
            ]
        else:
            self.prompts_vd = view_prompts(self.prompt, templates, overrides)
        self.negative_prompts_vd = [self.negative_prompt] * len(VIEW_NAMES)
        threestudio.info(
            f"Perp-Neg prompts: [{self.prompt}] | uncond [{self.negative_prompt}] | views "
            + " ".join(f"[{n}]:[{p}]" for n, p in zip(VIEW_NAMES, self.prompts_vd))
            + (
                f" | negatives {list(zip(self.user_negatives, self.user_weights))}"
                if self.user_negatives
                else ""
            )
        )
        self._load_embeddings()

    def _load_embeddings(self) -> None:
        cfg = self.cfg
        prompts = [self.prompt, self.negative_prompt, *self.prompts_vd, *self.user_negatives]
        emb = text_embeddings(
            cfg.pretrained_model_name_or_path,
            prompts,
            cfg.cache_dir,
            use_cache=cfg.use_cache,
            device=self.device,
            encoder=self.text_encoder_kind,
        )
        cleanup()
        self.bank = PromptBank.from_embeddings(
            emb,
            self.prompt,
            self.negative_prompt,
            self.prompts_vd,
            self.user_negatives,
            self.user_weights,
        )
        self.text_embeddings = self.bank.prompt[None]
        self.uncond_text_embeddings = emb[self.negative_prompt][None]
        self.text_embeddings_vd = self.bank.views
        self.uncond_text_embeddings_vd = self.bank.uncond

    def prepare_text_embeddings(self) -> None:  # the base class's spawned encoder is not used
        pass

    def load_text_embeddings(self) -> None:
        self._load_embeddings()

    def get_text_embeddings(
        self, prompt: Union[str, List[str]], negative_prompt: Union[str, List[str]]
    ) -> Tuple[Tensor, Tensor]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
        emb = encode_prompts(
            self.cfg.pretrained_model_name_or_path,
            prompts + negatives,
            self.device,
            encoder=self.text_encoder_kind,
        )
        return emb[: len(prompts)], emb[len(prompts) :]

    def __call__(self) -> PerpNegPromptProcessorOutput:
        cfg = self.cfg
        return PerpNegPromptProcessorOutput(
            text_embeddings=self.text_embeddings,
            uncond_text_embeddings=self.uncond_text_embeddings,
            text_embeddings_vd=self.text_embeddings_vd,
            uncond_text_embeddings_vd=self.uncond_text_embeddings_vd,
            directions=self.directions,
            direction2idx=self.direction2idx,
            use_perp_neg=cfg.use_perp_neg,
            perp_neg_f_sb=cfg.perp_neg_f_sb,
            perp_neg_f_fsb=cfg.perp_neg_f_fsb,
            perp_neg_f_fs=cfg.perp_neg_f_fs,
            perp_neg_f_sf=cfg.perp_neg_f_sf,
            prompt=self.prompt,
            prompts_vd=self.prompts_vd,
            perp_neg_bank=self.bank,
            perp_neg_scheme=self.scheme,
            perp_neg_thresholds=self.thresholds,
            perp_neg_prompts=list(self.user_negatives),
        )


def _apply_template(template: str) -> Any:
    return lambda s: template.replace("{prompt}", s)


def _user_negatives(prompts: List[Any], weights: List[Any]) -> Tuple[List[str], List[float]]:
    if len(prompts) != len(weights):
        raise ValueError(
            f"perp_neg_prompt_weights: expected one weight per prompt in perp_neg_prompts "
            f"({len(prompts)}), got {len(weights)} weights {weights!r}"
        )
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"perp_neg_prompts: expected non-empty strings, got {p!r}")
    out = []
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w > 0:
            raise ValueError(
                f"perp_neg_prompt_weights: expected finite numbers <= 0 (negatives remove a "
                f"concept), got {w!r}"
            )
        out.append(float(w))
    return [str(p) for p in prompts], out
