"""Perp-Neg guidance for threestudio (https://arxiv.org/abs/2304.04968).

Layers (one folder each; docs/architecture.md says what each may import):

* :mod:`.common`: input checks and atomic writes shared by every entry point (pure).
* :mod:`.core`: the Perp-Neg algebra, view weight schemes, conditioning, text encoding (pure).
* :mod:`.engines`: score distillation per prior (Stable Diffusion, DeepFloyd IF, VSD).
* :mod:`.adapters`: the registered ``perpneg-*`` threestudio classes, the only code importing
  threestudio (``import threestudio_perpneg.adapters`` registers them).
* :mod:`.sampler`: the 2D Perp-Neg sampler; :mod:`.commands`: the command lines;
  :mod:`.eval`: view classifier, 2D protocol, Janus evaluator, sweep; :mod:`.tiny`: tiny models.

The package root exports the algebra and the weight schemes only.
"""

from .core.guidance import GuidancePredictions, perp_neg_guidance, perpendicular_component
from .core.views import AuthorsScheme, ThreestudioScheme, ViewThresholds, make_scheme, view_weights

__version__ = "0.1.0"

__all__ = [
    "AuthorsScheme",
    "GuidancePredictions",
    "ThreestudioScheme",
    "ViewThresholds",
    "__version__",
    "make_scheme",
    "perp_neg_guidance",
    "perpendicular_component",
    "view_weights",
]
