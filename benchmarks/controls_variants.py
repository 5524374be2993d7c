"""The Perp-Neg control variants of ``bench_perpneg.py --controls`` (issue 12).

Each variant is our Perp-Neg step with the ``threestudio`` weights (the default scheme of
``perpneg-prompt-processor`` and of the stock processor) plus one setting of
:class:`~threestudio_perpneg.core.controls.PerpNegControls`. Rows per step depend on the cameras and,
for the timestep windows, on t ~ U{min_step..max_step}; they are counted here with the library's own
:func:`~threestudio_perpneg.core.controls.apply_controls` over the benchmark's camera distribution.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from threestudio_perpneg.core.conditioning import PromptBank, step_conditioning
from threestudio_perpneg.core.controls import PerpNegControls, apply_controls
from threestudio_perpneg.core.views import ViewThresholds, make_scheme

#: name -> (label, controls). The weight schedule [0, 1, 0, N] is shown at mid-run (λ = 0.5):
#: until λ reaches 0 a weight scale changes no row count, only the negatives' strength.
VARIANTS: Dict[str, Tuple[str, PerpNegControls]] = {
    "ctl-one": ("ours, perp_neg_sampling=one", PerpNegControls(sampling="one")),
    "ctl-t-low": ("ours, perp_neg_t_range=[0, 0.5]", PerpNegControls(t_range=(0.0, 0.5))),
    "ctl-t-high": ("ours, perp_neg_t_range=[0.5, 1]", PerpNegControls(t_range=(0.5, 1.0))),
    "ctl-decay": (
        "ours, weight schedule [0,1,0,N] at N/2 (λ=0.5)",
        PerpNegControls(weight_scale=0.5),
    ),
    "ctl-one-t-low": (
        "ours, one + t_range=[0, 0.5]",
        PerpNegControls(sampling="one", t_range=(0.0, 0.5)),
    ),
}


def count_rows(
    elevation: Tensor,
    azimuth: Tensor,
    batch_size: int,
    thresholds: ViewThresholds,
    min_step: int,
    max_step: int,
    min_weight: float,
    seed: int,
    num_train_timesteps: int = 1000,
) -> List[List[str]]:
    """Table rows (label, mean, min, max, vs 4B, vs 2B) of UNet rows per step for each variant.

    ``elevation``/``azimuth`` are ``[n_batches, batch_size]``; t is drawn per sample uniformly in
    ``[min_step, max_step]`` as the SDS step draws it.
    """
    n, b = elevation.shape
    bank = PromptBank(
        prompt=torch.zeros(1, 1),
        views=torch.zeros(4, 1, 1),
        uncond=torch.zeros(4, 1, 1),
        negatives=torch.zeros(0, 1, 1),
        negative_weights=torch.zeros(0),
    )
    cond = step_conditioning(
        bank,
        elevation.reshape(-1),
        azimuth.reshape(-1),
        scheme=make_scheme("threestudio"),
        thresholds=thresholds,
        min_weight=min_weight,
    )
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(min_step, max_step + 1, (n * b,), generator=g)
    rows = []
    variants: Sequence[Tuple[str, PerpNegControls]] = [
        ("ours, threestudio weights (default controls)", PerpNegControls())
    ] + list(VARIANTS.values())
    for label, controls in variants:
        out = apply_controls(cond, t, num_train_timesteps, controls, g)
        per_step = 2 * b + torch.bincount(out.negative_index // b, minlength=n).double()
        mean = float(per_step.mean())
        rows.append(
            [
                label,
                f"{mean:.3f}",
                f"{int(per_step.min())}",
                f"{int(per_step.max())}",
                f"{mean / (4 * b):.3f}",
                f"{mean / (2 * b):.3f}",
            ]
        )
    return rows
