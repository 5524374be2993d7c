"""Part (a): UNet branches per step over many sampled camera batches (pure counting)."""

from __future__ import annotations

import argparse
from typing import Dict, List, Tuple

import torch

from threestudio_perpneg.core.conditioning import PromptBank, step_conditioning
from threestudio_perpneg.core.views import ViewThresholds, make_scheme

from .cameras import SCHEME_NAMES, sample_cameras


def count_branches(
    args: argparse.Namespace, thresholds: ViewThresholds
) -> Tuple[List[List[str]], Dict[str, float]]:
    """Rows of table (a) and the mean branches per step of each method."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    n, b = args.count_batches, args.batch_size
    elev, azim, _ = sample_cameras(
        n,
        b,
        args.elevation_range,
        args.azimuth_range,
        args.camera_distance_range,
        batch_uniform_azimuth=not args.no_batch_uniform_azimuth,
        generator=gen,
    )
    bank = PromptBank(
        prompt=torch.zeros(1, 1),
        views=torch.zeros(4, 1, 1),
        uncond=torch.zeros(4, 1, 1),
        negatives=torch.zeros(0, 1, 1),
        negative_weights=torch.zeros(0),
    )
    rows = []
    means: Dict[str, float] = {"vanilla": 2.0 * b, "threestudio-4B": 4.0 * b}
    rows.append(["vanilla SDS (CFG)", f"{2 * b}", f"{2 * b}", f"{2 * b}", "0.500", "1.000"])
    rows.append(
        ["threestudio built-in Perp-Neg", f"{4 * b}", f"{4 * b}", f"{4 * b}", "1.000", "2.000"]
    )
    for name in SCHEME_NAMES:
        scheme = make_scheme(name)
        cond = step_conditioning(
            bank,
            elev.reshape(-1),
            azim.reshape(-1),
            scheme=scheme,
            thresholds=thresholds,
            min_weight=args.min_weight,
        )
        per_step = 2 * b + torch.bincount(cond.negative_index // b, minlength=n).double()
        mean = float(per_step.mean())
        means[f"ours-{name}"] = mean
        rows.append(
            [
                f"ours, {name} weights",
                f"{mean:.3f}",
                f"{int(per_step.min())}",
                f"{int(per_step.max())}",
                f"{mean / (4 * b):.3f}",
                f"{mean / (2 * b):.3f}",
            ]
        )
    return rows, means
