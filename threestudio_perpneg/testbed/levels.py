"""The view-knowledge sweep's priors: one per level of view-phrase reliability, same renders.

Every level's prior sees the same pool of renders (heads, cameras, jitter, templates: the caption
knobs never move the data generator, see :func:`~threestudio_perpneg.testbed.dataset.sample_batch`)
and differs only in how often a caption's view phrase is right. To make a family affordable on
two CPU cores the levels share a base: the base is trained on captions without any view phrase
(``view_phrase_prob = 0``), then each level continues from it for the same number of steps on
its own captions (30 % with a view phrase, right with probability ``1 − error``, otherwise one
of the two other views). The base knows heads and identities but no view word; everything a
level's prior knows about views comes from its own captions.

Reliability is stated as the data has it: ``P(back | caption says "back view")`` from the view
frequencies (70/20/10 front/side/back, web-like) and the level's error (Bayes,
:func:`~threestudio_perpneg.testbed.dataset.p_view_given_phrase`). With 70 % fronts, a
caption's "back view" is wrong more often than the error alone suggests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .dataset import DatasetConfig, confusion_matrix, p_view_given_phrase
from .prior import PriorConfig

__all__ = [
    "Level",
    "LEVELS",
    "LEVEL_NAMES",
    "SWEEP_PRIOR",
    "BASE_STEPS",
    "LEVEL_STEPS",
    "level_dataset",
    "base_dataset",
    "level_recipe",
    "base_recipe",
    "train_base",
    "train_level",
]


@dataclass(frozen=True)
class Level:
    """One level of the sweep.

    Args:
        name: folder and table name (``p15`` = P(back | "back view") about 0.15).
        error: probability that a caption's view phrase names a wrong view (uniform over the
            two others), the only knob that differs between levels.
    """

    name: str
    error: float

    def dataset(self) -> DatasetConfig:
        return level_dataset(self.error)

    def p_back(self) -> float:
        """P(back | caption says "back view") of the level's training data."""
        return p_view_given_phrase(self.dataset(), "back")

    def p_side(self) -> float:
        """P(side | caption says "side view") of the level's training data."""
        return p_view_given_phrase(self.dataset(), "side")


#: From inert to informative. error = 0.1(1−p) / (0.45p + 0.1(1−p)) gives P(back | "back view")
#: = p with 70/20/10 view frequencies; rounded, so the exact p is the one reported.
LEVELS: Tuple[Level, ...] = (
    Level("p15", 0.56),
    Level("p35", 0.29),
    Level("p55", 0.15),
    Level("p80", 0.05),
)
LEVEL_NAMES: Tuple[str, ...] = tuple(lv.name for lv in LEVELS)

#: The sweep's UNet: cross attention on the text at 8 px and 4 px (and the mid block). The
#: attempt-5 prior attended only at 4 px.
SWEEP_PRIOR = PriorConfig(resolution=16, block_out_channels=(32, 48, 64), cross_attention_levels=2)
#: Optimiser steps of the shared base and of each level's continuation (batch 32). The
#: continuation's weight average decays faster (0.995: a window of about 200 steps), so the
#: saved level is the continued model, not a blend with the base.
BASE_STEPS = 4000
LEVEL_STEPS = 1000
LEVEL_EMA_DECAY = 0.995

_COMMON: Dict[str, Any] = {
    "resolution": 16,
    "texture_jitter": 0.3,
    "view_word_separation": 1.0,
}


def level_dataset(error: float) -> DatasetConfig:
    """A level's data knobs: the shared renders, a view phrase in 30 % of captions, ``error``."""
    return DatasetConfig.from_dict(
        {**_COMMON, "view_phrase_prob": 0.3, "view_phrase_matrix": confusion_matrix(error)}
    )


def base_dataset() -> DatasetConfig:
    """The shared base's data knobs: the same renders, captions without any view phrase."""
    return DatasetConfig.from_dict({**_COMMON, "view_phrase_prob": 0.0})


def base_recipe(steps: int = BASE_STEPS, **overrides: Any) -> Any:
    from .train import TrainConfig

    return TrainConfig(**{"steps": steps, "warmup_steps": 200, **overrides})


def level_recipe(steps: int = LEVEL_STEPS, **overrides: Any) -> Any:
    from .train import TrainConfig

    return TrainConfig(
        **{
            "steps": steps,
            "warmup_steps": 100,
            "ema_decay": LEVEL_EMA_DECAY,
            **overrides,
        }
    )


def find_level(name: str) -> Level:
    for lv in LEVELS:
        if lv.name == name:
            return lv
    raise ValueError(f"level: unknown level {name!r}, expected one of {LEVEL_NAMES}")


def parse_levels(names: Optional[Sequence[str]]) -> List[Level]:
    """Levels by name (all when None), in the given order; an unknown name raises ``ValueError``."""
    if names is None:
        return list(LEVELS)
    return [find_level(n) for n in names]


def train_base(
    out: str | os.PathLike, *, steps: int = BASE_STEPS, progress: bool = True, **kw: Any
) -> Dict[str, Any]:
    """Train the shared base (no view phrases) into ``out``."""
    from .train import train_prior

    return train_prior(
        out, base_dataset(), SWEEP_PRIOR, base_recipe(steps), progress=progress, **kw
    )


def train_level(
    out: str | os.PathLike,
    level: Level,
    base: str | os.PathLike,
    *,
    steps: int = LEVEL_STEPS,
    progress: bool = True,
    **kw: Any,
) -> Dict[str, Any]:
    """Continue the base at ``base`` on the level's captions into ``out``."""
    from .train import train_prior

    return train_prior(
        out,
        level.dataset(),
        SWEEP_PRIOR,
        level_recipe(steps),
        progress=progress,
        init_from=Path(base),
        **kw,
    )
