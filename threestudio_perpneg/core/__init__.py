"""The pure Perp-Neg core: algebra, view weighting, per-step conditioning, text encoding and cache.

Imports no threestudio and no diffusers model code (of the package only :mod:`threestudio_perpneg.common`);
every other layer builds on it.

* :mod:`.guidance`: the projection ⊥(a, b) and the Perp-Neg combination (eq. 6 of the paper).
* :mod:`.views`: azimuth buckets, positive-prompt interpolation and the weight schemes.
* :mod:`.conditioning`: a prompt bank -> the rows one guidance step evaluates.
* :mod:`.controls`: weight scale / schedule, timestep window and one-negative sampling of those rows.
* :mod:`.text`: CLIP/T5 prompt encoding, the safetensors embedding cache, ``resolve_pretrained``.
"""

from .guidance import GuidancePredictions, perp_neg_guidance, perpendicular_component

__all__ = ["GuidancePredictions", "perp_neg_guidance", "perpendicular_component"]
