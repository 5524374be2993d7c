"""Perp-Neg for diffusers' Modular Diffusers: a guider and the blocks that feed it negatives.

* :class:`PerpNegGuidance` (:mod:`.perp_neg`): a ``diffusers.guiders.BaseGuidance`` computing the
  paper's Algorithm 1 with :func:`threestudio_perpneg.core.guidance.perp_neg_guidance`.
* :func:`add_perp_neg` (:mod:`.blocks`): wraps a modular pipeline's text-encoder block so the
  pipeline's ``negative_prompt`` (and ``perp_neg_prompts``) become perpendicular negatives while the
  unconditional branch stays the pipeline's own empty prompt.

Nothing here is imported with the package: the names load on first access, so ``import
threestudio_perpneg`` never imports ``diffusers.guiders``; with a diffusers that has no guiders the
access raises one ImportError naming the version needed.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["PerpNegGuidance", "PerpNegPackStep", "PerpNegTextEncoderStep", "add_perp_neg"]

_HOMES = {
    "PerpNegGuidance": ".perp_neg",
    "PerpNegPackStep": ".blocks",
    "PerpNegTextEncoderStep": ".blocks",
    "add_perp_neg": ".blocks",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name], __name__), name)
