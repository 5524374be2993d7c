"""Argument checks of :class:`~.pipeline.PerpNegSampler` (one line naming the argument each).

Numbers, text and seeds go through :mod:`threestudio_perpneg.common.checks`; what is particular
to the sampler (modes, extra prompts and their weights, image sizes, view requests) is here.
"""

from __future__ import annotations

import numbers
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch

from ..common.checks import (
    SEED_MAX_64,
    check_choice,
    check_float,
    check_int,
    check_seeds,
    check_sequence,
    check_text,
)
from ..core.controls import check_eval_prob, check_fraction_window
from ..core.views import SCHEMES, VIEW_NAMES, ViewThresholds, make_scheme, view_index, view_weights

__all__ = [
    "MODES",
    "VIEW_AZIMUTHS",
    "ViewRequest",
    "check_azimuths",
    "check_extras",
    "check_mode",
    "check_sampling",
    "check_size",
    "check_view_request",
    "check_weights",
    "camera_view_weights",
]

MODES: Tuple[str, str, str] = ("perpneg", "cebm", "sd")

#: Azimuth (degrees) a view name stands for in :meth:`PerpNegSampler.generate_view`.
VIEW_AZIMUTHS: Mapping[str, float] = {"front": 0.0, "side": 90.0, "back": 180.0, "overhead": 0.0}


def check_mode(mode: Any) -> str:
    return check_choice("mode", mode, MODES, what="mode")


def check_extras(extra_prompts: Any) -> List[str]:
    if isinstance(extra_prompts, str):
        raise ValueError(
            f"extra_prompts: expected a sequence of strings, got the single string "
            f"{extra_prompts!r} (wrap it in a list)"
        )
    items = check_sequence("extra_prompts", extra_prompts, "strings")
    return [check_text(f"extra_prompts[{i}] (prompt)", p) for i, p in enumerate(items)]


def check_weights(weights: Any, n_extras: int) -> List[float]:
    """``[main, *extras]`` weights; ``None`` gives main 1.0 and each extra −1.0."""
    if weights is None:
        return [1.0] + [-1.0] * n_extras
    items = check_sequence("weights", weights, "numbers")
    if len(items) != 1 + n_extras:
        raise ValueError(
            f"weights: expected {1 + n_extras} values (the main prompt's weight, then one per "
            f"extra prompt; {n_extras} extra prompt(s) given), got {len(items)}: {items!r}"
        )
    out = [check_float(f"weights[{i}]", w) for i, w in enumerate(items)]
    if out[0] <= 0.0:
        raise ValueError(
            f"weights[0]: the main prompt's weight must be > 0 (extra prompts carry the negative "
            f"weights), got {items[0]!r}"
        )
    return out


def check_size(key: str, value: Any, multiple: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) <= 0:
        raise ValueError(f"{key}: expected a positive multiple of {multiple}, got {value!r}")
    if int(value) % multiple:
        raise ValueError(f"{key}: expected a multiple of {multiple}, got {value!r}")
    return int(value)


def check_sampling(
    default_size: Tuple[int, int],
    multiple: int,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    height: Optional[int] = None,
    width: Optional[int] = None,
    seeds: Sequence[int] = (0,),
    eta: float = 0.0,
    perp_neg_start: float = 0.0,
    perp_neg_stop: float = 1.0,
    perp_neg_eval_prob: float = 1.0,
) -> Dict[str, Any]:
    """The sampling settings of one call; sizes default to ``default_size`` (height, width)."""
    steps = check_int("num_inference_steps", num_inference_steps, 1)
    window = check_fraction_window(
        perp_neg_start, perp_neg_stop, ("perp_neg_start", "perp_neg_stop")
    )
    eval_prob = check_eval_prob(perp_neg_eval_prob, "perp_neg_eval_prob")
    scale = check_float("guidance_scale", guidance_scale)
    eta_f = check_float("eta", eta)
    if eta_f < 0:
        raise ValueError(f"eta: expected a number >= 0, got {eta!r}")
    dh, dw = default_size
    h = dh if height is None else check_size("height", height, multiple)
    wd = dw if width is None else check_size("width", width, multiple)
    return {
        "num_inference_steps": steps,
        "guidance_scale": scale,
        "height": h,
        "width": wd,
        "seeds": check_seeds(seeds, "seeds", max_seed=SEED_MAX_64),
        "eta": eta_f,
        "perp_neg_start": window[0],
        "perp_neg_stop": window[1],
        "perp_neg_eval_prob": eval_prob,
    }


class ViewRequest(NamedTuple):
    """A checked view request of :meth:`PerpNegSampler.generate_view`."""

    azimuth: float
    elevation: float
    forced: Optional[int]  # view index forced by a view name (None: bucket by the azimuth)
    user_weights: Optional[Dict[str, float]]  # user view negatives (None: the scheme's)


def check_view_request(
    view: Optional[str],
    azimuth: Optional[float],
    elevation: float,
    scheme: str,
    weights: Optional[Mapping[str, float]],
) -> ViewRequest:
    if (view is None) == (azimuth is None):
        raise ValueError(
            "view/azimuth: give exactly one of view (front|side|back|overhead) or azimuth "
            f"(degrees), got view={view!r}, azimuth={azimuth!r}"
        )
    elev = check_float("elevation", elevation)
    if not -90.0 <= elev <= 90.0:
        raise ValueError(f"elevation: expected degrees in [-90, 90], got {elevation!r}")
    forced: Optional[int] = None
    if view is not None:
        if not isinstance(view, str):
            raise ValueError(f"view: expected one of {VIEW_NAMES}, got {view!r}")
        forced = view_index(view)
        az = VIEW_AZIMUTHS[view]
    else:
        az = check_float("azimuth", azimuth)
        if not -180.0 <= az <= 360.0:
            raise ValueError(f"azimuth: expected degrees in [-180, 360], got {azimuth!r}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: unknown scheme {scheme!r}, expected one of {sorted(SCHEMES)}")
    user = None
    if weights is not None:
        if not isinstance(weights, Mapping):
            raise ValueError(
                f"view_weights: expected a mapping like {{'front': -2.0}}, got {weights!r}"
            )
        unknown = sorted(set(weights) - set(VIEW_NAMES))
        if unknown:
            raise ValueError(
                f"view_weights: unknown view(s) {unknown}, expected keys from {VIEW_NAMES}"
            )
        user = {k: check_float(f"view_weights[{k!r}]", v) for k, v in weights.items()}
    return ViewRequest(az, elev, forced, user)


def check_azimuths(azimuths: Any) -> List[Any]:
    """A non-empty sequence of azimuths in [−180, 360] degrees (returned as given)."""
    az_list = check_sequence("azimuths", azimuths, "degrees")
    if not az_list:
        raise ValueError("azimuths: expected at least one azimuth, got an empty sequence")
    for i, a in enumerate(az_list):
        x = check_float(f"azimuths[{i}] (azimuth)", a)
        if not -180.0 <= x <= 360.0:
            raise ValueError(f"azimuths[{i}] (azimuth): expected degrees in [-180, 360], got {a!r}")
    return az_list


def camera_view_weights(
    azimuth: float, elevation: float, scheme: str, view: Optional[int] = None
) -> Any:
    """:func:`threestudio_perpneg.core.views.view_weights` of one camera (float64), default thresholds."""
    return view_weights(
        torch.tensor([elevation], dtype=torch.float64),
        torch.tensor([azimuth], dtype=torch.float64),
        make_scheme(scheme),
        ViewThresholds(),
        view=None if view is None else torch.tensor([view]),
    )
