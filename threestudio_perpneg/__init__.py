"""Perp-Neg guidance for threestudio (https://arxiv.org/abs/2304.04968).

Layers (one folder each; docs/architecture.md says what each may import):

* :mod:`.common`: input checks and atomic writes shared by every entry point (pure).
* :mod:`.core`: the Perp-Neg algebra, view weight schemes, conditioning, text encoding (pure).
* :mod:`.engines`: score distillation per prior (Stable Diffusion, DeepFloyd IF, VSD).
* :mod:`.adapters`: the registered ``perpneg-*`` threestudio classes, the only code importing
  threestudio (``import threestudio_perpneg.adapters`` registers them).
* :mod:`.sampler`: the 2D Perp-Neg sampler; :mod:`.commands`: the command lines;
  :mod:`.eval`: view classifier, 2D protocol, Janus evaluator, sweep; :mod:`.tiny`: tiny models.

The package root exports the algebra and the weight schemes only; it also registers the testbed's
view classifier with the evaluators (``eval2d`` / ``eval3d --classifier testbed``).
"""

import os
from typing import Any, Optional

from .core.guidance import GuidancePredictions, perp_neg_guidance, perpendicular_component
from .core.views import AuthorsScheme, ThreestudioScheme, ViewThresholds, make_scheme, view_weights
from .eval.classifier import register_view_classifier as _register_view_classifier

__version__ = "0.1.0"


def _load_testbed_view_classifier(path: Optional[str]) -> Any:
    """The Janus testbed's view CNN for ``load_view_classifier("testbed", path)``.

    Wired here, above both layers: eval/ never imports testbed/ (docs/architecture.md), and the
    testbed is imported only when its classifier is asked for."""
    from .testbed.classifier import classifier_path, load_classifier

    folder = os.fspath(classifier_path()) if path is None else path
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"classifier path: {str(folder)!r} is not a folder, expected a testbed classifier "
            "folder (config.json + model.safetensors)"
        )
    clf = load_classifier(folder)
    clf.name = f"testbed:{folder}"
    return clf


_register_view_classifier("testbed", _load_testbed_view_classifier)

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
