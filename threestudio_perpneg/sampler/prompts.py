"""Text forms of the sampler's inputs: ``"main | extra"`` prompts with weights, and seed ranges."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

# parse_seeds ("0-7,9" -> seeds, ValueError naming ``seeds``) is the package's one seed parser,
# re-exported here as part of the sampler's API.
from ..common.checks import MAX_SEEDS, parse_seeds

__all__ = ["MAX_SEEDS", "PromptSpec", "parse_prompts", "parse_seeds"]


@dataclass
class PromptSpec:
    """A main prompt, extra prompts and their weights (``weights[0]`` is the main prompt's).

    Args:
        main (`str`): the main prompt.
        extras (`List[str]`): extra prompts, in order.
        weights (`List[float]`): ``1 + len(extras)`` weights: the main prompt's, then one per extra
            (negative = remove the concept, positive = add it).
    """

    main: str
    extras: List[str]
    weights: List[float]


def parse_prompts(text: str, weights: Optional[str] = None) -> PromptSpec:
    """Parses ``"main | extra1 | extra2"`` with ``"1 | -1.5 | -0.3"`` (the official repository's form).

    Args:
        text (`str`): prompts separated by ``|``; the first is the main prompt.
        weights (`str`, *optional*): as many ``|``-separated numbers as prompts. ``None`` gives the
            main prompt 1.0 and every extra prompt −1.0.

    Returns:
        [`PromptSpec`].

    Raises:
        `ValueError`: naming ``prompt`` when any prompt is empty, ``weights`` when a weight is not
            a finite number or the count does not match the prompts.
    """
    if not isinstance(text, str):
        raise ValueError(f"prompt: expected a string, got {text!r}")
    parts = [p.strip() for p in text.split("|")]
    for i, p in enumerate(parts):
        if not p:
            what = "the main prompt" if i == 0 else f"extra prompt {i}"
            raise ValueError(f"prompt: {what} is empty in {text!r}")
    if weights is None:
        return PromptSpec(parts[0], parts[1:], [1.0] + [-1.0] * (len(parts) - 1))
    if not isinstance(weights, str):
        raise ValueError(f"weights: expected a string like '1 | -1.5', got {weights!r}")
    values: List[float] = []
    for i, w in enumerate(weights.split("|")):
        try:
            x = float(w.strip())
        except ValueError:
            raise ValueError(
                f"weights: item {i} {w.strip()!r} of {weights!r} is not a number"
            ) from None
        if not math.isfinite(x):
            raise ValueError(f"weights: item {i} of {weights!r} is not finite")
        values.append(x)
    if len(values) != len(parts):
        raise ValueError(
            f"weights: got {len(values)} weight(s) {weights!r} for {len(parts)} prompt(s) "
            f"{text!r}; give one per prompt, the main prompt's first"
        )
    if values[0] <= 0.0:
        raise ValueError(f"weights: the main prompt's weight must be > 0, got {values[0]!r}")
    return PromptSpec(parts[0], parts[1:], values)
