"""Arguments of the ``generate`` command: names, constants, argparse value types and the parser."""

from __future__ import annotations

import argparse
import math
import re
from typing import Callable, Dict, List, Optional, Tuple

from ...common.checks import check_names
from ..common import (
    TINY_STEPS,
    OneLineParser,
    UsageError,
    add_size_arguments,
    device_arg,
    finite_float,
    fraction_arg,
    positive_int,
    split_text_weight,
)
from ..quiet import add_verbose_argument

__all__ = ["GenerateError", "GRID_NAME", "IMAGES_DIR", "PROG", "SIDECAR_NAME", "build_parser"]

PROG = "threestudio-perpneg generate"
SIDECAR_NAME = "generate.json"
REPLAY_SIDECAR_NAME = "replay.json"
GRID_NAME = "grid.png"
IMAGES_DIR = "images"
FORMAT = "threestudio_perpneg.commands.generate/1"
SCHEDULERS = ("ddim", "euler", "euler_a", "dpm", "pndm", "lms")
DEFAULT_SWEEP = (0.0, 45.0, 90.0, 135.0, 180.0)
AZIMUTH_RANGE = (-180.0, 360.0)
#: Grid tiles are the images upscaled (nearest, integer factor) to at least this many pixels.
MIN_TILE = 128
#: Height of the column-label band on top of the grid.
LABEL_HEIGHT = 18
#: White gap between neighbouring tiles.
GAP = 2
#: Width of one character of Pillow's default bitmap font (for the row-label band).
CHAR_WIDTH = 6
#: Denoising steps with a real --model unless --steps is given.
DEFAULT_STEPS = 50
TINY_NOTE = (
    "NOTE: no --model given: using a tiny RANDOM Stable Diffusion checkpoint ({path}); the images "
    "are noise from a random model, not pictures. Pass --model stabilityai/stable-diffusion-2-1-base "
    "(or a local diffusers folder) with --device cuda --fp16 for real images."
)


class GenerateError(UsageError):
    """A user-facing error: one line, and the exit code it maps to (2 = bad argument)."""


def _weighted_text(value: str, *, negative: bool) -> Tuple[str, float]:
    """``TEXT:WEIGHT`` (split at the last colon); negative weights ≤ 0, positive weights > 0."""
    example = "'a hat:-1.5'" if negative else "'a red scarf:0.5'"
    text, w = split_text_weight(value, example, example_if_not_numeric=True)
    if not math.isfinite(w):
        raise argparse.ArgumentTypeError(f"expected a finite weight, got {value!r}")
    if negative and w > 0:
        raise argparse.ArgumentTypeError(
            f"weight must be <= 0 (a negative prompt removes a concept; use --positive for "
            f"w > 0), got {value!r}"
        )
    if not negative and w <= 0:
        raise argparse.ArgumentTypeError(
            f"weight must be > 0 (use --negative for w <= 0), got {value!r}"
        )
    return text.strip(), w


def _negative_arg(value: str) -> Tuple[str, float]:
    return _weighted_text(value, negative=True)


def _positive_arg(value: str) -> Tuple[str, float]:
    return _weighted_text(value, negative=False)


def _split_list(value: str) -> List[str]:
    return [p.strip() for p in re.split(r"[,\s]+", value.strip()) if p.strip()]


def _azimuth_list(value: str) -> List[float]:
    """Comma/space separated azimuths in degrees, each in [-180, 360]."""
    items = _split_list(value)
    if not items:
        raise argparse.ArgumentTypeError(f"expected azimuths in degrees, got {value!r}")
    out = []
    lo, hi = AZIMUTH_RANGE
    for item in items:
        a = finite_float(item, "azimuths in degrees")
        if not lo <= a <= hi:
            raise argparse.ArgumentTypeError(
                f"azimuth {a:g} is out of range: expected degrees in [{lo:g}, {hi:g}] "
                "(front = 0, side = 90, back = 180)"
            )
        out.append(a)
    return out


def _names_type(allowed: Tuple[str, ...], what: str) -> Callable[[str], List[str]]:
    """argparse type: comma/space separated names out of ``allowed``, none repeated."""

    def parse(value: str) -> List[str]:
        try:
            return check_names(what, _split_list(value), allowed, what=what)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err).split(": ", 1)[1]) from None

    return parse


def _view_list(value: str) -> List[str]:
    from ...core.views import VIEW_NAMES

    return _names_type(tuple(VIEW_NAMES), "view")(value)


def _view_weights_arg(value: str) -> Dict[str, float]:
    """``"front=-2,side=-1"``: weights (≤ 0) of the view negatives."""
    from ...core.views import VIEW_NAMES

    out: Dict[str, float] = {}
    for item in [p for p in value.split(",") if p.strip()]:
        name, sep, weight = item.partition("=")
        name = name.strip()
        if not sep:
            raise argparse.ArgumentTypeError(
                f"expected VIEW=WEIGHT pairs (e.g. 'front=-2,side=-1'), got {item.strip()!r}"
            )
        if name not in VIEW_NAMES:
            raise argparse.ArgumentTypeError(
                f"unknown view {name!r}, expected some of {', '.join(VIEW_NAMES)}"
            )
        if name in out:
            raise argparse.ArgumentTypeError(f"view {name!r} is given twice")
        w = finite_float(weight.strip(), f"a numeric weight for {name}")
        if w > 0:
            raise argparse.ArgumentTypeError(
                f"view negative weights must be <= 0, got {name}={weight.strip()}"
            )
        out[name] = w
    if not out:
        raise argparse.ArgumentTypeError(f"expected VIEW=WEIGHT pairs, got {value!r}")
    return out


def _modes_arg(value: str) -> List[str]:
    from ...sampler.pipeline import MODES

    return _names_type(tuple(MODES), "mode")(value)


def _non_negative(value: str) -> float:
    x = finite_float(value)
    if x < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value!r}")
    return x


def _eval_prob_arg(value: str) -> float:
    x = finite_float(value, "a probability 0 < p <= 1")
    if not 0.0 < x <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability 0 < p <= 1, got {value!r}")
    return x


def _elevation_arg(value: str) -> float:
    x = finite_float(value, "degrees")
    if not -90.0 <= x <= 90.0:
        raise argparse.ArgumentTypeError(f"expected degrees in [-90, 90], got {value!r}")
    return x


def _device_arg(value: str) -> str:
    return device_arg(value, auto=True)


# ------------------------------------------------------------------------------------- parser


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``generate`` command's parser."""
    from ...core.views import SCHEMES, VIEW_NAMES
    from ...sampler.pipeline import MODES

    p = OneLineParser(
        prog=prog or PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate images with Perp-Neg (arXiv 2304.04968) and its baselines (cebm, sd)\n"
        "on a diffusers Stable Diffusion checkpoint. Writes <out>/grid.png (rows = modes or\n"
        "views, columns = seeds), <out>/images/*.png and <out>/generate.json (every setting,\n"
        "the weights used, library versions), from which --replay regenerates the images.",
        epilog="examples:\n"
        '  %(prog)s "a peacock, back view | a peacock, front view" --weights "1 | -3.5" \\\n'
        "      --seeds 30 --model CompVis/stable-diffusion-v1-4 --device cuda --fp16\n"
        '  %(prog)s "a corgi" --view back --modes perpneg,cebm,sd --seeds 0-3 \\\n'
        "      --model stabilityai/stable-diffusion-2-1-base --device cuda --fp16\n"
        '  %(prog)s "a corgi" --sweep --seeds 0 --scheme authors     # tiny random model, CPU\n'
        "  %(prog)s --replay out/generate.json --replay-image perpneg_seed0",
    )
    g = p.add_argument_group("prompts")
    g.add_argument(
        "prompt",
        nargs="?",
        default=None,
        help="'main | extra1 | extra2' (split at '|'); with --view/--azimuth/--sweep the main "
        "prompt is the object prompt and the view prompts are '<prompt>, <view> view'",
    )
    g.add_argument(
        "--weights",
        default=None,
        metavar='"W0 | W1 | ..."',
        help="one weight per prompt of the positional argument, '|'-separated, main first "
        "(the official Perp-Neg convention, e.g. '1 | -1.5 | -0.3'); default: 1 for the main "
        "prompt and -1 for each extra. Negative = concept removal, positive = extra concept",
    )
    g.add_argument(
        "--negative",
        action="append",
        type=_negative_arg,
        default=[],
        metavar="TEXT:WEIGHT",
        help="extra negative prompt with weight <= 0 (repeatable), e.g. --negative 'a hat:-1.5'",
    )
    g.add_argument(
        "--positive",
        action="append",
        type=_positive_arg,
        default=[],
        metavar="TEXT:WEIGHT",
        help="extra positive prompt with weight > 0 (repeatable)",
    )
    g.add_argument(
        "--uncond",
        default="",
        metavar="TEXT",
        help="text of the unconditional branch ε_u (diffusers' negative_prompt; default empty)",
    )

    v = p.add_argument_group("view-conditioned generation")
    vx = v.add_mutually_exclusive_group()
    vx.add_argument(
        "--view",
        type=_view_list,
        default=None,
        metavar="VIEW[,VIEW...]",
        help=f"target view(s), {' | '.join(VIEW_NAMES)}; several give one grid row each",
    )
    vx.add_argument(
        "--azimuth",
        type=_azimuth_list,
        default=None,
        metavar="DEG[,DEG...]",
        help="target azimuth(s) in degrees, front = 0, in [-180, 360]; several give one row each",
    )
    vx.add_argument(
        "--sweep",
        action="store_true",
        help="one seed across --azimuths, one horizontal strip per mode (and seed)",
    )
    v.add_argument(
        "--azimuths",
        type=_azimuth_list,
        default=None,
        metavar="DEG[,DEG...]",
        help="azimuths of --sweep (default: 0,45,90,135,180)",
    )
    v.add_argument(
        "--elevation",
        type=_elevation_arg,
        default=0.0,
        metavar="DEG",
        help="camera elevation in degrees; above 60 is the overhead view (default: 0)",
    )
    v.add_argument(
        "--scheme",
        choices=sorted(SCHEMES),
        default=None,
        help="view negative weight scheme (default: threestudio)",
    )
    v.add_argument(
        "--view-weights",
        type=_view_weights_arg,
        default=None,
        metavar="VIEW=W,...",
        help="user weights (<= 0) of the view negatives instead of the scheme's, "
        "e.g. 'front=-2,side=-1'",
    )

    m = p.add_argument_group("sampling")
    mx = m.add_mutually_exclusive_group()
    mx.add_argument(
        "--mode",
        choices=MODES,
        default=None,
        help="perpneg (projected negatives), cebm (composable sum, no projection) or sd "
        "(plain negative prompt) (default: perpneg)",
    )
    mx.add_argument(
        "--modes",
        type=_modes_arg,
        default=None,
        metavar="MODE[,MODE...]",
        help="several modes side by side, one grid row each, e.g. perpneg,cebm,sd",
    )
    m.add_argument(
        "--seeds",
        default="0",
        help="seeds: '0-7' (inclusive), '1,3,5', '30' or '0-3,10' (default: 0); one grid "
        "column each",
    )
    m.add_argument(
        "--model",
        default=None,
        metavar="ID_OR_PATH",
        help="Stable Diffusion hub id or local diffusers folder; default: a tiny RANDOM "
        "checkpoint built into <out>/tiny-sd (images are noise; for CPU smoke runs)",
    )
    m.add_argument(
        "--scheduler",
        choices=SCHEDULERS,
        default=None,
        help="replace the checkpoint's scheduler (dpm = DPM-Solver++ multistep, euler_a = "
        "Euler ancestral); default: the checkpoint's own",
    )
    m.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help=f"denoising steps (default: {DEFAULT_STEPS}; {TINY_STEPS} with the tiny random model)",
    )
    m.add_argument(
        "--guidance-scale",
        type=finite_float,
        default=7.5,
        metavar="S",
        help="guidance scale s, ε̂ = ε_u + s·(…) (diffusers / paper; default: %(default)s)",
    )
    m.add_argument("--eta", type=_non_negative, default=0.0, help="DDIM eta (default: %(default)s)")
    add_size_arguments(m)
    m.add_argument(
        "--device",
        type=_device_arg,
        default=None,
        help="auto, cpu, cuda or cuda:N (default: auto = cuda when available; with --replay: "
        "the recorded device)",
    )
    m.add_argument("--fp16", action="store_true", help="half-precision weights (GPU)")
    m.add_argument(
        "--perp-neg-start",
        type=fraction_arg,
        default=0.0,
        metavar="F",
        help="fraction of the denoising steps before which negatives are off (default: 0)",
    )
    m.add_argument(
        "--perp-neg-stop",
        type=fraction_arg,
        default=1.0,
        metavar="F",
        help="fraction of the denoising steps from which negatives are off (default: 1)",
    )
    m.add_argument(
        "--perp-neg-eval-prob",
        type=_eval_prob_arg,
        default=1.0,
        metavar="P",
        help="probability 0 < P <= 1 that a step inside the window evaluates the negatives, "
        "their weights divided by P; otherwise plain guidance on the positives (default: 1)",
    )

    o = p.add_argument_group("output and replay")
    o.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="output folder (default: perpneg_out; with --replay: <sidecar folder>/replay)",
    )
    o.add_argument(
        "--replay",
        default=None,
        metavar="SIDECAR.json",
        help="regenerate the images of a generate.json with its exact settings and report "
        "whether each PNG is byte-identical (only --out, --device, --model, --no-progress apply)",
    )
    o.add_argument(
        "--replay-image",
        default=None,
        metavar="NAME",
        help="with --replay: only this image (its file name, with or without .png)",
    )
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_verbose_argument(o)
    return p
