"""2D Perp-Neg sampler over a diffusers Stable Diffusion pipeline (imports no threestudio)."""

from .pipeline import (
    MAX_SEEDS,
    MODES,
    SCHEDULERS,
    VIEW_AZIMUTHS,
    GenerationResult,
    PerpNegSampler,
    PromptSpec,
    make_scheduler,
    parse_prompts,
    parse_seeds,
)

__all__ = [
    "MAX_SEEDS",
    "MODES",
    "SCHEDULERS",
    "VIEW_AZIMUTHS",
    "GenerationResult",
    "PerpNegSampler",
    "PromptSpec",
    "make_scheduler",
    "parse_prompts",
    "parse_seeds",
]
