"""Statistics shared by the evaluators: the Wilson score interval of a binomial proportion."""

from __future__ import annotations

import math
import statistics
from typing import Optional, Tuple

from ..common.checks import check_float

__all__ = ["Z_95", "wilson_interval", "z_value"]

#: Two-sided 95 % standard-normal quantile.
Z_95 = 1.959963984540054


def z_value(confidence: float) -> float:
    """Two-sided standard-normal quantile of a confidence level (about 1.96 for 0.95)."""
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson_interval(
    successes: int, total: int, z: float = Z_95, *, confidence: Optional[float] = None
) -> Tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % for the default ``z``).

    ``confidence`` (in [0.5, 0.9999]), when given, replaces ``z`` by :func:`z_value` of it.
    ``(0.0, 1.0)`` when ``total`` is 0; the low end is exactly 0 when ``successes`` is 0 and the
    high end exactly 1 when ``successes == total``.

    Raises:
        `ValueError`: naming ``successes`` / ``total`` when not ``0 <= successes <= total``, and
            ``confidence`` when out of range.
    """
    if confidence is not None:
        z = z_value(check_float("confidence", confidence, 0.5, 0.9999))
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise ValueError(f"total: expected an integer >= 0, got {total!r}")
    if isinstance(successes, bool) or not isinstance(successes, int):
        raise ValueError(f"successes: expected an integer, got {successes!r}")
    if not 0 <= successes <= total:
        raise ValueError(f"successes: expected 0 <= successes <= total={total}, got {successes}")
    if total == 0:
        return 0.0, 1.0
    n, p = total, successes / total
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == total else min(1.0, centre + half)
    return lo, hi
