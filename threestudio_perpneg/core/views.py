"""View-dependent prompting for Perp-Neg, vectorised over the batch.

Conventions are threestudio's: azimuth in degrees with the front at 0, wrapped to (-180, 180];
elevation in degrees; views indexed in threestudio's direction order ``side, front, back, overhead``
so index tensors can address threestudio's ``text_embeddings_vd`` directly.

The positive embedding is interpolated between neighbouring views: on the front half
(|azimuth| < 90°) with r = 1 − |azimuth| / 90 it is r·front + (1 − r)·side, on the back half with
r = 2 − |azimuth| / 90 it is r·side + (1 − r)·back. The views that are not the target become negative
prompts whose weights depend on r under one of two published schemes (see :class:`ThreestudioScheme`
and :class:`AuthorsScheme`). Overhead views use the overhead prompt and no view negatives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "VIEW_NAMES",
    "SIDE",
    "FRONT",
    "BACK",
    "OVERHEAD",
    "REJECT",
    "ViewThresholds",
    "ThreestudioScheme",
    "AuthorsScheme",
    "Scheme",
    "ViewWeights",
    "SCHEMES",
    "make_scheme",
    "wrap_azimuth",
    "classify_views",
    "view_weights",
    "view_index",
]

VIEW_NAMES: Tuple[str, str, str, str] = ("side", "front", "back", "overhead")
SIDE, FRONT, BACK, OVERHEAD = range(4)
#: A view classifier's label for an image that shows no head view (the testbed classifier's
#: reject class): never a success and never a front. Here so that eval/ names it without
#: importing testbed/.
REJECT = "none"

Triple = Tuple[float, float, float]


def wrap_azimuth(azimuth: Tensor) -> Tensor:
    """Azimuth in degrees wrapped to (-180, 180]."""
    wrapped = 180.0 - torch.remainder(180.0 - azimuth, 360.0)
    # remainder can round a tiny negative up to 360, giving -180 for inputs just above 180.
    return torch.where(wrapped <= -180.0, wrapped + 360.0, wrapped)


def view_index(name: str) -> int:
    """Index of a view name in :data:`VIEW_NAMES`."""
    try:
        return VIEW_NAMES.index(name)
    except ValueError:
        raise ValueError(f"view: unknown view {name!r}, expected one of {VIEW_NAMES}") from None


def _check_number(key: str, value: Any, lo: float, hi: float, unit: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key}: expected a finite number in [{lo}, {hi}]{unit}, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{key}: expected a value in [{lo}, {hi}]{unit}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ViewThresholds:
    """Camera buckets, in degrees, as in threestudio's prompt processor.

    Args:
        front: |azimuth| < front is a front view (threestudio default 45).
        back: |azimuth| > 180 − back is a back view (default 45).
        overhead: elevation > overhead is an overhead view, whatever the azimuth (default 60).
    """

    front: float = 45.0
    back: float = 45.0
    overhead: float = 60.0

    def __post_init__(self) -> None:
        _check_number("front_threshold", self.front, 0.0, 180.0, " degrees")
        _check_number("back_threshold", self.back, 0.0, 180.0, " degrees")
        _check_number("overhead_threshold", self.overhead, -90.0, 90.0, " degrees")
        if self.front + self.back > 180.0:
            raise ValueError(
                "front_threshold + back_threshold: expected at most 180 degrees so the front and "
                f"back buckets do not overlap, got {self.front} + {self.back}"
            )


def classify_views(elevation: Tensor, azimuth: Tensor, thresholds: ViewThresholds) -> Tensor:
    """Per-sample view index (side/front/back/overhead); overhead wins, then back, then front."""
    az = wrap_azimuth(azimuth).abs()
    view = torch.full(az.shape, SIDE, dtype=torch.long, device=az.device)
    view = torch.where(az < thresholds.front, torch.full_like(view, FRONT), view)
    view = torch.where(az > 180.0 - thresholds.back, torch.full_like(view, BACK), view)
    return torch.where(elevation > thresholds.overhead, torch.full_like(view, OVERHEAD), view)


def _check_triple(key: str, value: Any) -> Triple:
    try:
        items = list(value)
    except TypeError:
        raise ValueError(
            f"{key}: expected a triple (a, b, c) of f(r) = a*exp(-b*r) + c, got {value!r}"
        ) from None
    if len(items) != 3:
        raise ValueError(
            f"{key}: expected a triple (a, b, c) of f(r) = a*exp(-b*r) + c, got {len(items)} "
            f"values {value!r}"
        )
    for x in items:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise ValueError(f"{key}: expected three finite numbers, got {value!r}")
    return (float(items[0]), float(items[1]), float(items[2]))


@dataclass(frozen=True)
class ThreestudioScheme:
    """threestudio's weights: f(r) = a·e^(−b·r) + c, negated.

    Front half: w_front = −f_fs(r), w_side = −f_sf(1 − r); back half: w_side = −f_sb(r),
    w_front = −f_fsb(r). Defaults are threestudio's (``perp_neg_f_*`` of its prompt processor).

    Args:
        f_fs: (a, b, c) for the front negative on the front half, default (4, 0.5, −2.426).
        f_sf: (a, b, c) for the side negative on the front half, default (4, 0.5, −2.426).
        f_sb: (a, b, c) for the side negative on the back half, default (1, 0.5, −0.606).
        f_fsb: (a, b, c) for the front negative on the back half, default (1, 0.5, 0.967).
    """

    f_fs: Triple = (4.0, 0.5, -2.426)
    f_sf: Triple = (4.0, 0.5, -2.426)
    f_sb: Triple = (1.0, 0.5, -0.606)
    f_fsb: Triple = (1.0, 0.5, 0.967)
    name = "threestudio"

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(
                self, f.name, _check_triple(f"perp_neg_{f.name}", getattr(self, f.name))
            )

    @staticmethod
    def _f(triple: Triple, r: Tensor) -> Tensor:
        a, b, c = triple
        return a * torch.exp(-b * r) + c

    def weights(self, r: Tensor, back_half: Tensor) -> Tuple[Tensor, Tensor]:
        """(w_front, w_side) for interpolation factors ``r`` on the given halves."""
        w_front = torch.where(back_half, -self._f(self.f_fsb, r), -self._f(self.f_fs, r))
        w_side = torch.where(back_half, -self._f(self.f_sb, r), -self._f(self.f_sf, 1.0 - r))
        return w_front, w_side


@dataclass(frozen=True)
class AuthorsScheme:
    """The Perp-Neg authors' weights (stable-dreamfusion ``--perpneg``).

    Front half: w_front = negative_w·e^(−r·front_decay_factor), zero for r > front_cutoff;
    w_side = negative_w·e^(−(1 − r)·side_decay_factor), zero for r < 1 − front_cutoff.
    Back half: w_front = negative_w; w_side = negative_w·e^(−r·side_decay_factor)/2, zero for
    r > front_cutoff.

    Args:
        negative_w: weight of a fully active view negative, default −2 (must be ≤ 0).
        front_decay_factor: decay of the front negative with r, default 2.
        side_decay_factor: decay of the side negative, default 10.
        front_cutoff: r above which the nearer view's negative is switched off, default 0.8.
    """

    negative_w: float = -2.0
    front_decay_factor: float = 2.0
    side_decay_factor: float = 10.0
    front_cutoff: float = 0.8
    name = "authors"

    def __post_init__(self) -> None:
        _check_number("perp_neg_negative_w", self.negative_w, -math.inf, 0.0)
        _check_number("perp_neg_front_decay_factor", self.front_decay_factor, 0.0, math.inf)
        _check_number("perp_neg_side_decay_factor", self.side_decay_factor, 0.0, math.inf)
        _check_number("perp_neg_front_cutoff", self.front_cutoff, 0.0, 1.0)

    def weights(self, r: Tensor, back_half: Tensor) -> Tuple[Tensor, Tensor]:
        """(w_front, w_side) for interpolation factors ``r`` on the given halves."""
        nw, cut = self.negative_w, self.front_cutoff
        zero = torch.zeros_like(r)
        front_fh = torch.where(r > cut, zero, nw * torch.exp(-r * self.front_decay_factor))
        side_fh = torch.where(
            r < 1.0 - cut, zero, nw * torch.exp(-(1.0 - r) * self.side_decay_factor)
        )
        side_bh = torch.where(r > cut, zero, 0.5 * nw * torch.exp(-r * self.side_decay_factor))
        w_front = torch.where(back_half, torch.full_like(r, nw), front_fh)
        w_side = torch.where(back_half, side_bh, side_fh)
        return w_front, w_side


Scheme = Union[ThreestudioScheme, AuthorsScheme]
SCHEMES: Mapping[str, type] = {"threestudio": ThreestudioScheme, "authors": AuthorsScheme}


def make_scheme(name: str, **params: Any) -> Scheme:
    """Build a weight scheme by name (``threestudio`` or ``authors``) with its parameters."""
    if name not in SCHEMES:
        raise ValueError(
            f"perp_neg_scheme: unknown scheme {name!r}, expected one of {sorted(SCHEMES)}"
        )
    cls = SCHEMES[name]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(
            f"perp_neg_scheme={name!r}: unknown parameter(s) {unknown}, expected {sorted(known)}"
        )
    return cls(**params)


class ViewWeights(NamedTuple):
    """Per-sample view conditioning over the view bank ``side, front, back, overhead``.

    Attributes:
        view: bucket index of each camera, ``[B]`` (long).
        r: interpolation factor in [0, 1], ``[B]`` (1 at the front/side end of each half).
        positive_mix: coefficients of the positive embedding over the four views, ``[B, 4]``;
            each row sums to 1.
        negative_weights: weight of each view as a negative prompt, ``[B, 4]``; zero means the
            view is not a negative for that sample and is never evaluated.
    """

    view: Tensor
    r: Tensor
    positive_mix: Tensor
    negative_weights: Tensor


def view_weights(
    elevation: Tensor,
    azimuth: Tensor,
    scheme: Scheme,
    thresholds: ViewThresholds = ViewThresholds(),
    view: Optional[Tensor] = None,
) -> ViewWeights:
    """Interpolated positive and scheme negative weights for every camera of a batch.

    ``view`` overrides the bucketing by ``thresholds`` (e.g. buckets from a stock prompt processor).
    """
    if elevation.shape != azimuth.shape or elevation.dim() != 1:
        raise ValueError(
            "elevation/azimuth: expected two 1-D tensors of the same length, got "
            f"{tuple(elevation.shape)} and {tuple(azimuth.shape)}"
        )
    dt = torch.float64 if azimuth.dtype == torch.float64 else torch.float32
    az = wrap_azimuth(azimuth.to(dt)).abs()
    back_half = az >= 90.0
    r = torch.where(back_half, 2.0 - az / 90.0, 1.0 - az / 90.0)
    if view is None:
        view = classify_views(elevation.to(dt), azimuth.to(dt), thresholds)
    elif view.shape != az.shape:
        raise ValueError(f"view: expected shape {tuple(az.shape)}, got {tuple(view.shape)}")
    overhead = view == OVERHEAD

    b = az.shape[0]
    mix = torch.zeros(b, 4, dtype=dt, device=az.device)
    mix[:, FRONT] = torch.where(back_half, torch.zeros_like(r), r)
    mix[:, SIDE] = torch.where(back_half, r, 1.0 - r)
    mix[:, BACK] = torch.where(back_half, 1.0 - r, torch.zeros_like(r))
    one_hot_overhead = torch.zeros_like(mix)
    one_hot_overhead[:, OVERHEAD] = 1.0
    mix = torch.where(overhead[:, None], one_hot_overhead, mix)

    w_front, w_side = scheme.weights(r, back_half)
    neg = torch.zeros_like(mix)
    neg[:, FRONT] = w_front
    neg[:, SIDE] = w_side
    neg = torch.where(overhead[:, None], torch.zeros_like(neg), neg)
    return ViewWeights(view=view, r=r, positive_mix=mix, negative_weights=neg)


def scheme_from_config(
    name: str,
    threestudio_triples: Mapping[str, Sequence[float]],
    authors_params: Mapping[str, float],
) -> Scheme:
    """Scheme from the config keys of either family (only the chosen family is validated)."""
    if name == "threestudio":
        return make_scheme(name, **dict(threestudio_triples))
    return make_scheme(name, **dict(authors_params))
