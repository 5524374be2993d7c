"""Planning of a ``generate`` run: the arguments checked and laid out as sampler calls (one per
batch) and grid cells, and the mapping of library errors onto the command-line arguments."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Dict, List, NoReturn, Optional

from .args import DEFAULT_SWEEP, GenerateError

__all__ = [
    "Batch",
    "Plan",
    "az_label",
    "cond_label",
    "fail",
    "image_name",
    "library_error",
    "make_plan",
    "strip_key",
]


@dataclass
class Batch:
    """One sampler call: ``getattr(sampler, call)(**kwargs)``; cells place its images."""

    call: str
    kwargs: Dict[str, Any]
    mode: str
    condition: Optional[Dict[str, Any]]  # {"view": name} | {"azimuth": deg} | None
    # (result index, image index, row, column, seed, view, azimuth, name) per image
    cells: List[Dict[str, Any]] = field(default_factory=list)


@dataclass
class Plan:
    settings: Dict[str, Any]
    batches: List[Batch]
    row_labels: List[str]
    column_labels: List[str]


def fail(arg: str, message: str) -> NoReturn:
    raise GenerateError.argument(arg, message)


def strip_key(message: str, key: str) -> str:
    first = message.strip().splitlines()[0] if message.strip() else message
    for prefix in (f"{key}: ", f"{key}:"):
        if first.startswith(prefix):
            return first[len(prefix) :]
    return first


def library_error(err: ValueError, default_arg: str) -> NoReturn:
    """Map a library ValueError ('weights: ...', 'prompt: ...') onto the CLI argument."""
    msg = str(err).strip() or type(err).__name__
    key = msg.split(":", 1)[0].strip()
    arg = {
        "weights": "--weights",
        "prompt": "prompt",
        "seeds": "--seeds",
        "view": "--view",
        "azimuth": "--azimuth",
        "view_weights": "--view-weights",
        "mode": "--mode",
        "scheme": "--scheme",
    }.get(key, default_arg)
    fail(arg, strip_key(msg, key))


def az_label(a: float) -> str:
    return f"az{a:g}"


def image_name(mode: str, view: Optional[str], azimuth: Optional[float], seed: int) -> str:
    parts = [mode]
    if view is not None:
        parts.append(view)
    elif azimuth is not None:
        parts.append(az_label(azimuth))
    parts.append(f"seed{seed}")
    return "_".join(parts)


def make_plan(args: argparse.Namespace) -> Plan:
    """Validate the arguments and lay out the sampler calls and the grid."""
    from ...sampler.pipeline import parse_prompts, parse_seeds

    if args.replay_image is not None:
        fail("--replay-image", "only together with --replay SIDECAR.json")
    if args.prompt is None:
        fail("prompt", "expected a prompt, e.g. 'a corgi' or 'main | extra' (or --replay)")
    if not args.prompt.strip():
        fail("prompt", "expected a non-empty prompt")
    try:
        spec = parse_prompts(args.prompt, args.weights)
    except ValueError as err:
        library_error(err, "--weights" if args.weights is not None else "prompt")
    extras = list(spec.extras)
    weights = [float(w) for w in spec.weights]
    for text, w in [*args.negative, *args.positive]:
        extras.append(text)
        weights.append(float(w))
    try:
        seeds = [int(s) for s in parse_seeds(str(args.seeds))]
    except ValueError as err:
        library_error(err, "--seeds")
    if not seeds:
        fail("--seeds", f"expected at least one seed, got {args.seeds!r}")
    if len(set(seeds)) != len(seeds):
        fail("--seeds", f"a seed is repeated in {args.seeds!r}")

    view_conditioned = bool(args.view or args.azimuth or args.sweep)
    if not view_conditioned:
        if args.view_weights is not None:
            fail("--view-weights", "only with --view, --azimuth or --sweep")
        if args.scheme is not None:
            fail("--scheme", "only with --view, --azimuth or --sweep")
    if args.azimuths is not None and not args.sweep:
        fail("--azimuths", "only with --sweep (use --azimuth for single views)")
    if args.perp_neg_start > args.perp_neg_stop:  # issue 12
        lo, hi = args.perp_neg_start, args.perp_neg_stop
        fail("--perp-neg-start", f"expected <= --perp-neg-stop, got {lo:g} > {hi:g}")
    modes = list(args.modes) if args.modes else [args.mode or "perpneg"]
    scheme = args.scheme or "threestudio"

    common: Dict[str, Any] = {
        "extra_prompts": extras,
        "weights": weights,
        "negative_prompt": args.uncond,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "height": args.height,
        "width": args.width,
        "eta": args.eta,
        "perp_neg_start": args.perp_neg_start,
        "perp_neg_stop": args.perp_neg_stop,
        "perp_neg_eval_prob": args.perp_neg_eval_prob,
    }
    view_kwargs: Dict[str, Any] = {
        "elevation": args.elevation,
        "scheme": scheme,
        "view_weights": args.view_weights,
    }
    batches: List[Batch] = []
    row_labels: List[str] = []
    if args.sweep:
        azimuths = list(args.azimuths or DEFAULT_SWEEP)
        column_labels = [f"az {a:g}" for a in azimuths]
        for mode in modes:
            for seed in seeds:
                row = len(row_labels)
                row_labels.append(f"{mode} seed {seed}" if len(seeds) > 1 else mode)
                b = Batch(
                    "view_sweep",
                    {
                        "prompt": spec.main,
                        "azimuths": azimuths,
                        "seed": seed,
                        "mode": mode,
                        **view_kwargs,
                        **common,
                    },
                    mode,
                    {"sweep": azimuths},
                )
                for col, a in enumerate(azimuths):
                    b.cells.append(
                        {
                            "result": col,
                            "image": 0,
                            "row": row,
                            "column": col,
                            "seed": seed,
                            "view": None,
                            "azimuth": a,
                            "name": image_name(mode, None, a, seed),
                        }
                    )
                batches.append(b)
    else:
        conditions: List[Optional[Dict[str, Any]]]
        if args.view:
            conditions = [{"view": name} for name in args.view]
        elif args.azimuth:
            conditions = [{"azimuth": a} for a in args.azimuth]
        else:
            conditions = [None]
        if len({cond_label(c) for c in conditions}) != len(conditions):
            fail("--azimuth", "an azimuth is repeated")
        column_labels = [f"seed {s}" for s in seeds]
        # view-major rows, so that the modes of one view are neighbours
        for cond in conditions:
            for mode in modes:
                row = len(row_labels)
                label = cond_label(cond)
                row_labels.append(f"{mode} {label}" if label else mode)
                if cond is None:
                    call = "generate"
                    kwargs = {"prompt": spec.main, "mode": mode, "seeds": seeds, **common}
                else:
                    call = "generate_view"
                    kwargs = {
                        "prompt": spec.main,
                        "view": cond.get("view"),
                        "azimuth": cond.get("azimuth"),
                        "mode": mode,
                        "seeds": seeds,
                        **view_kwargs,
                        **common,
                    }
                b = Batch(call, kwargs, mode, cond)
                for col, seed in enumerate(seeds):
                    view = cond.get("view") if cond else None
                    az = cond.get("azimuth") if cond else None
                    b.cells.append(
                        {
                            "result": 0,
                            "image": col,
                            "row": row,
                            "column": col,
                            "seed": seed,
                            "view": view,
                            "azimuth": az,
                            "name": image_name(mode, view, az, seed),
                        }
                    )
                batches.append(b)

    settings = {
        "prompt": args.prompt,
        "main": spec.main,
        "extra_prompts": extras,
        "weights": weights,
        "negative": [[t, w] for t, w in args.negative],
        "positive": [[t, w] for t, w in args.positive],
        "uncond": args.uncond,
        "modes": modes,
        "seeds": seeds,
        "view": args.view,
        "azimuth": args.azimuth,
        "sweep": bool(args.sweep),
        "azimuths": list(args.azimuths or DEFAULT_SWEEP) if args.sweep else None,
        "elevation": args.elevation,
        "scheme": scheme if view_conditioned else None,
        "view_weights": args.view_weights,
        "scheduler": args.scheduler,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "perp_neg_start": args.perp_neg_start,
        "perp_neg_stop": args.perp_neg_stop,
        "perp_neg_eval_prob": args.perp_neg_eval_prob,
        "eta": args.eta,
        "height": args.height,
        "width": args.width,
        "fp16": bool(args.fp16),
    }
    return Plan(settings, batches, row_labels, column_labels)


def cond_label(cond: Optional[Dict[str, Any]]) -> str:
    if cond is None:
        return ""
    if cond.get("view") is not None:
        return str(cond["view"])
    if cond.get("azimuth") is not None:
        return f"az {cond['azimuth']:g}"
    return ""
