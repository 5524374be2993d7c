"""Perp-Neg guidance for threestudio (https://arxiv.org/abs/2304.04968).

The core (:mod:`.core`, :mod:`.views`, :mod:`.conditioning`, :mod:`.sd`, :mod:`.text`) imports no
threestudio; ``import threestudio_perpneg.adapters`` registers the ``perpneg-*`` classes with
threestudio.
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
