"""The view-knowledge sweep's priors: one per level of view-phrase reliability, same renders.

Every level's prior sees the same pool of renders (heads, cameras, jitter, templates: the caption
knobs never move the data generator, see :func:`~threestudio_perpneg.testbed.dataset.sample_batch`)
and is trained from scratch with the same recipe and seeds; the levels differ only in how often a
caption's view phrase is right (right with probability ``1 − error``, otherwise one of the two
other views). A view phrase is in 80 % of the captions at every level.

Why so dense, and why from scratch (measured, issue 17): the first family (a view phrase in 30 %
of the captions; a shared base trained without view phrases, each level continued from it for
1000 steps) learned no view words at any level: ‖⊥(Δ_front, Δ_pos)‖ / ‖Δ_pos‖ on back cameras was
0.004-0.010, and even every caption naming the right view, continued from that base, reached only
0.07-0.18 with 2D SDS still drawing a front for "back view". Trained from scratch for 3000 steps
with the right view in every caption, the same UNet reached 1.55 / 1.08 / 0.59 at t = 200 / 500 /
800 and 2D SDS stopped drawing a front for "back view". 20 % of the captions keep no view phrase
so that the no-view prompt stays in the training distribution.

Reliability is stated as the data has it: ``P(back | caption says "back view")`` from the view
frequencies (70/20/10 front/side/back, web-like) and the level's error (Bayes,
:func:`~threestudio_perpneg.testbed.dataset.p_view_given_phrase`; the phrase rate cancels). With
70 % fronts, a caption's "back view" is wrong more often than the error alone suggests.
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
    "LEVEL_STEPS",
    "SHARP_LEVEL_STEPS",
    "SHIPPED_SHARP_LEVEL",
    "SHIPPED_SHARP_PRIORS",
    "LEVEL_PHRASE_PROB",
    "level_dataset",
    "level_recipe",
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
#: Optimiser steps of every level prior (batch 32, from scratch; about 15 min on 2 threads).
LEVEL_STEPS = 3000
#: Steps of the sharper family (``train-levels --steps 6000``; about 22 min a level on 1 free
#: thread): its samples and SDS heads show eyes where the 3000-step ones show smudges, and its view
#: words are stronger at the same caption knobs (p15, p55 and p80 in
#: ``benchmarks/results/testbed-sweep-6000/priors``, p35 in :data:`SHIPPED_SHARP_PRIORS`; p35 and
#: p55 measured in ``benchmarks/results/testbed-sweep-6000``).
SHARP_LEVEL_STEPS = 6000
#: The sharper family's level shipped inside the package (the ``demo`` command's prior, about
#: 6 MB): the one where vanilla SDS draws a second face on every object and Perp-Neg mostly not.
SHIPPED_SHARP_LEVEL = "p35"
#: Folder of the sharper family's priors inside the package (one level, :data:`SHIPPED_SHARP_LEVEL`:
#: the repository keeps one copy of it, here, so a non-editable install has it too).
SHIPPED_SHARP_PRIORS = Path(__file__).resolve().parent / "assets" / "priors-6000"
#: Share of the captions with a view phrase, at every level.
LEVEL_PHRASE_PROB = 0.8

_COMMON: Dict[str, Any] = {
    "resolution": 16,
    "texture_jitter": 0.3,
    "view_word_separation": 1.0,
}


def level_dataset(error: float) -> DatasetConfig:
    """A level's data knobs: the shared renders, a view phrase in 80 % of captions, ``error``."""
    return DatasetConfig.from_dict(
        {
            **_COMMON,
            "view_phrase_prob": LEVEL_PHRASE_PROB,
            "view_phrase_matrix": confusion_matrix(error),
        }
    )


def level_recipe(steps: int = LEVEL_STEPS, **overrides: Any) -> Any:
    """The recipe every level is trained with (same seeds: only the captions differ)."""
    from .train import TrainConfig

    return TrainConfig(**{"steps": steps, "warmup_steps": 200, **overrides})


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


def train_level(
    out: str | os.PathLike,
    level: Level,
    *,
    steps: int = LEVEL_STEPS,
    threads: int = 1,
    progress: bool = True,
    **kw: Any,
) -> Dict[str, Any]:
    """Train the level's prior from scratch into ``out``."""
    from .train import train_prior

    return train_prior(
        out,
        level.dataset(),
        SWEEP_PRIOR,
        level_recipe(steps, threads=threads),
        progress=progress,
        **kw,
    )
