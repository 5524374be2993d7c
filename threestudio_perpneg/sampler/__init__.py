"""2D Perp-Neg sampler over a diffusers Stable Diffusion pipeline (imports no threestudio).

* :mod:`.pipeline`: :class:`PerpNegSampler` and its denoising loop.
* :mod:`.checks`: argument checks (modes, extra prompts, weights, sizes, view requests).
* :mod:`.prompts`: :func:`parse_prompts` (``"main | extra"``) and :func:`parse_seeds` (``"0-7,9"``).
* :mod:`.schedulers`: scheduler names, dtype names, pipeline loading.
* :mod:`.results`: :class:`GenerationResult`, the branch plan, image strips.
"""

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
