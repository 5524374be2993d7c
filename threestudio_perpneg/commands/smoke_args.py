"""Command line of the smoke command (:mod:`.smoke`): its options, their types and checks.

:func:`add_arguments` serves the ``smoke`` subcommand of ``threestudio-perpneg`` and the stand-alone
parser; :func:`resolve_args` merges a namespace with keyword overrides (``run_smoke(steps=2)``) and
checks both the way argparse checks the command line, raising :class:`SmokeError` (exit code 2)
with one line naming the option.
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Dict, Optional, Tuple

from ..core.views import SCHEMES
from ..engines.sd import SCALE_CONVENTIONS
from .common import (
    CommandError,
    OneLineParser,
    device_arg,
    finite_float,
    positive_int,
    split_text_weight,
)
from .quiet import add_verbose_argument

__all__ = ["AZIMUTH_RANGE", "SmokeError", "add_arguments", "build_parser", "resolve_args"]

#: Accepted azimuths in degrees (front = 0), the range of ``generate --azimuth``; wrapped to
#: (−180, 180] by the view weights.
AZIMUTH_RANGE = (-180.0, 360.0)


class SmokeError(CommandError):
    """A user-facing error of the smoke command: one line, and the exit code it maps to."""


# ---------------------------------------------------------------------------------------- CLI
def _azimuth_arg(value: str) -> float:
    """One azimuth in degrees, finite and in :data:`AZIMUTH_RANGE`."""
    a = finite_float(value, "an azimuth in degrees")
    lo, hi = AZIMUTH_RANGE
    if not lo <= a <= hi:
        raise argparse.ArgumentTypeError(
            f"azimuth {a:g} is out of range: expected degrees in [{lo:g}, {hi:g}] "
            "(front = 0, side = 90, back = 180)"
        )
    return a


def _negative_prompt_arg(value: str) -> Tuple[str, float]:
    """``TEXT:WEIGHT`` (split at the last colon), the weight finite and ≤ 0."""
    text, w = split_text_weight(value, "'a hat:-1.5'", example_if_not_numeric=False)
    if not math.isfinite(w) or w > 0:
        raise argparse.ArgumentTypeError(
            f"weight must be a finite number <= 0 (negatives remove a concept), got {value!r}"
        )
    return text, w


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the smoke command's options to ``parser`` (used by the ``smoke`` subcommand too)."""
    parser.add_argument(
        "--model",
        default=None,
        metavar="ID_OR_PATH",
        help="Stable Diffusion hub id or local diffusers folder; default: a tiny random "
        "checkpoint built into <out>/tiny-sd (reused when it exists and loads)",
    )
    parser.add_argument(
        "--prompt", default="a corgi", help="positive prompt (default: %(default)r)"
    )
    parser.add_argument(
        "--negative-prompt",
        default="",
        help="unconditional baseline ε_u, threestudio's negative_prompt (default: empty)",
    )
    parser.add_argument(
        "--perp-neg-prompt",
        dest="perp_neg_prompt",
        nargs="+",
        action="extend",
        type=_negative_prompt_arg,
        default=[],
        metavar="TEXT:WEIGHT",
        help="user negative prompts projected with Perp-Neg, weight <= 0 (e.g. 'blurry:-1')",
    )
    parser.add_argument(
        "--azimuths",
        nargs="+",
        type=_azimuth_arg,
        default=[0.0, 45.0, 90.0, 135.0, 180.0],
        metavar="DEG",
        help="camera azimuths in degrees in [-180, 360], front at 0, side 90, back 180 "
        "(default: 0 45 90 135 180)",
    )
    parser.add_argument(
        "--elevation",
        type=finite_float,
        default=0.0,
        metavar="DEG",
        help="camera elevation in degrees for every azimuth; above 60 is an overhead view "
        "(default: 0)",
    )
    parser.add_argument(
        "--scheme",
        choices=sorted(SCHEMES),
        default="threestudio",
        help="view negative weight scheme (default: %(default)s)",
    )
    parser.add_argument(
        "--steps", type=positive_int, default=4, help="SDS steps (default: %(default)s)"
    )
    parser.add_argument(
        "--size",
        type=positive_int,
        default=64,
        help="side of each optimised RGB image in pixels; renders are resized to 512 for the VAE "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--guidance-scale",
        type=finite_float,
        default=100.0,
        help="guidance scale s (default: %(default)s, threestudio's)",
    )
    parser.add_argument(
        "--scale-convention",
        choices=SCALE_CONVENTIONS,
        default="threestudio",
        help="threestudio: ε_u + (s+1)(…), as threestudio's SDS; cfg: ε_u + s(…) "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--lr", type=finite_float, default=0.05, help="Adam learning rate (default: %(default)s)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of every azimuth's generator (initial image, timesteps, noise: the same for "
        "every azimuth, so tiles differ only by their view conditioning) and of the VAE "
        "posterior sample (default: %(default)s)",
    )
    parser.add_argument(
        "--device",
        type=device_arg,
        default="cpu",
        help="cpu, cuda or cuda:N (default: %(default)s)",
    )
    parser.add_argument(
        "--fp16", action="store_true", help="half-precision UNet/VAE weights (for GPUs)"
    )
    parser.add_argument(
        "--no-perp-neg",
        dest="no_perp_neg",
        action="store_true",
        help="plain classifier-free guidance on the bucketed view prompt (threestudio's vanilla "
        "SDS): 2 UNet branches per azimuth",
    )
    parser.add_argument(
        "--out",
        default="smoke_out",
        help="output folder: grid.png, smoke.json, and without --model tiny-sd/ (the random "
        "checkpoint) and cache/ (text embeddings) (default: %(default)s)",
    )
    add_verbose_argument(parser)
    return parser


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The smoke command's stand-alone parser."""
    parser = OneLineParser(
        prog=prog or "threestudio-perpneg smoke",
        description="CPU smoke run / 2D playground of Perp-Neg score distillation: optimise one "
        "image per azimuth with batched Perp-Neg SDS, write grid.png and smoke.json.",
    )
    return add_arguments(parser)


def resolve_args(
    args: Optional[argparse.Namespace], overrides: Dict[str, Any]
) -> argparse.Namespace:
    parser = build_parser()
    base = vars(parser.parse_args([]))
    merged = dict(base)
    if args is not None:
        merged.update({k: v for k, v in vars(args).items() if k in base})
    unknown = sorted(set(overrides) - set(base))
    if unknown:
        raise TypeError(f"run_smoke: unknown option(s) {unknown}, expected some of {sorted(base)}")
    merged.update(overrides)
    ns = argparse.Namespace(**merged)

    def check(key: str, cond: bool, expected: str) -> None:
        if not cond:
            raise SmokeError(
                f"--{key.replace('_', '-')}: expected {expected}, got {merged[key]!r}", 2
            )

    # Overrides bypass argparse: normalise and validate them the same way.
    negs = []
    for item in ns.perp_neg_prompt or []:
        try:
            negs.append(
                _negative_prompt_arg(item)
                if isinstance(item, str)
                else _negative_prompt_arg(f"{item[0]}:{item[1]}")
            )
        except (argparse.ArgumentTypeError, TypeError, IndexError) as err:
            raise SmokeError(f"--perp-neg-prompt: {err}", 2) from None
    ns.perp_neg_prompt = negs
    try:
        ns.azimuths = [float(a) for a in ns.azimuths]
    except (TypeError, ValueError):
        check("azimuths", False, "a list of numbers")
    check("azimuths", len(ns.azimuths) > 0 and all(map(math.isfinite, ns.azimuths)), "numbers")
    for a in ns.azimuths:
        try:
            _azimuth_arg(str(a))
        except argparse.ArgumentTypeError as err:
            raise SmokeError(f"--azimuths: {err}", 2) from None
    for key in ("steps", "size"):
        v = getattr(ns, key)
        check(key, isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1")
    for key in ("elevation", "guidance_scale", "lr"):
        v = getattr(ns, key)
        check(
            key,
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
            "a finite number",
        )
    check("elevation", -90.0 <= ns.elevation <= 90.0, "degrees in [-90, 90]")
    check("lr", ns.lr > 0, "a positive number")
    check("scheme", ns.scheme in SCHEMES, f"one of {sorted(SCHEMES)}")
    check("scale_convention", ns.scale_convention in SCALE_CONVENTIONS, str(SCALE_CONVENTIONS))
    check("seed", isinstance(ns.seed, int) and not isinstance(ns.seed, bool), "an integer")
    check("prompt", isinstance(ns.prompt, str) and bool(ns.prompt.strip()), "a non-empty string")
    check("negative_prompt", isinstance(ns.negative_prompt, str), "a string")
    try:
        ns.device = device_arg(str(ns.device))
    except argparse.ArgumentTypeError as err:
        raise SmokeError(f"--device: {err}", 2) from None
    ns.out = str(ns.out)
    if ns.model is not None:
        ns.model = str(ns.model)
    return ns
