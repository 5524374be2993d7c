"""Janus evaluation (issue 5): view classification, the paper's 2D protocol, 3D trials, sweeps.

* :mod:`.classifier`: :class:`~.classifier.ViewClassifier`, zero-shot CLIP scoring of
  front / side / back / overhead views (transformers or open_clip).
* :mod:`.eval2d`: the paper's 2D protocol (prompts × requested views × seeds, in the modes sd, cebm
  and perpneg), success rate of the requested view per mode (``python -m threestudio_perpneg
  eval2d``; package: ``protocol``, ``report``, ``cli``).
* :mod:`.janus`: the 3D Janus evaluator (``eval3d``; package: ``flags``, ``trials``, ``metrics``,
  ``report``, ``plots``, ``cli``).
* :mod:`.sweep`: the Hydra reproduction sweep (``settings``, ``plan``, ``gpus``, ``run``,
  ``report``, ``app``).
* :mod:`.stats`: the Wilson score interval shared by the evaluators.

Importing this package imports nothing heavy: the names below load their module on first access.
Nothing here imports threestudio; matplotlib is imported only when a chart is drawn.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, List

#: public name -> submodule that defines it (loaded on first attribute access).
_EXPORTS: Dict[str, str] = {
    "VIEW_LABELS": "classifier",
    "DEFAULT_TEMPLATES": "classifier",
    "ClassifierProtocol": "classifier",
    "ViewClassifier": "classifier",
    "run_eval2d": "eval2d",
    "wilson_interval": "stats",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_EXPORTS))
