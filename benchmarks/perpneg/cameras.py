"""Cameras: threestudio's random-camera sampler and matrices, and the conditioning of a
threestudio-style Perp-Neg step (4·B rows)."""

from __future__ import annotations

import math
from typing import Any, Sequence, Tuple

import torch
from torch import Tensor

from threestudio_perpneg.core.conditioning import PromptBank, StepConditioning, step_conditioning
from threestudio_perpneg.core.views import FRONT, SIDE, ViewThresholds, view_weights

SCHEME_NAMES = ("threestudio", "authors")


def sample_cameras(
    n_batches: int,
    batch_size: int,
    elevation_range: Sequence[float],
    azimuth_range: Sequence[float],
    camera_distance_range: Sequence[float],
    *,
    batch_uniform_azimuth: bool,
    generator: torch.Generator,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(elevation, azimuth, distance), each ``[n_batches, batch_size]``, threestudio's sampler."""
    lo, hi = (float(x) for x in elevation_range)
    shape = (n_batches, batch_size)
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    uniform_deg = u * (hi - lo) + lo
    s_lo, s_hi = math.sin(math.radians(lo)), math.sin(math.radians(hi))
    on_sphere = torch.rad2deg(torch.asin(u * (s_hi - s_lo) + s_lo))
    # threestudio draws the choice once per batch (python's random.random() < 0.5).
    pick_uniform = torch.rand((n_batches, 1), generator=generator, dtype=torch.float64) < 0.5
    elevation = torch.where(pick_uniform, uniform_deg, on_sphere)

    a_lo, a_hi = (float(x) for x in azimuth_range)
    v = torch.rand(shape, generator=generator, dtype=torch.float64)
    if batch_uniform_azimuth:
        v = (v + torch.arange(batch_size, dtype=torch.float64)) / batch_size
    azimuth = v * (a_hi - a_lo) + a_lo

    d_lo, d_hi = (float(x) for x in camera_distance_range)
    distance = torch.rand(shape, generator=generator, dtype=torch.float64) * (d_hi - d_lo) + d_lo
    return elevation.float(), azimuth.float(), distance.float()


# --------------------------------------------------------------------- conditioning
def threestudio_style_conditioning(
    bank: PromptBank,
    elevation: Tensor,
    azimuth: Tensor,
    scheme: Any,
    thresholds: ViewThresholds,
) -> StepConditioning:
    """Our conditioning padded to threestudio's 4·B rows: front and side negatives for every
    sample, zero-weight ones (overhead views, cut-offs) included, so the UNet runs 4·B branches
    and the guided prediction equals ours."""
    ours = step_conditioning(bank, elevation, azimuth, scheme=scheme, thresholds=thresholds)
    b = elevation.shape[0]
    vw = view_weights(
        elevation.to(bank.views.device), azimuth.to(bank.views.device), scheme, thresholds
    )
    cols = torch.tensor([FRONT, SIDE], device=bank.views.device)
    weights = vw.negative_weights[:, cols].to(bank.views.dtype)  # [B, 2]
    index = torch.arange(b, device=bank.views.device).repeat_interleave(2)
    return StepConditioning(
        positive=ours.positive,
        uncond=ours.uncond,
        negative=bank.views[cols.repeat(b)],
        negative_index=index,
        negative_weight=weights.reshape(-1),
        view=ours.view,
        perp_neg=True,
    )


def c2w_matrices(elevation: Tensor, azimuth: Tensor, distance: Tensor) -> Tensor:
    """Camera-to-world ``[B, 4, 4]`` looking at the origin, z up (threestudio's convention)."""
    e, a = torch.deg2rad(elevation.float()), torch.deg2rad(azimuth.float())
    pos = torch.stack(
        [distance * torch.cos(e) * torch.cos(a), distance * torch.cos(e) * torch.sin(a),
         distance * torch.sin(e)],
        dim=-1,
    )  # fmt: skip
    up = torch.tensor([0.0, 0.0, 1.0]).expand_as(pos)
    lookat = torch.nn.functional.normalize(-pos, dim=-1)
    right = torch.nn.functional.normalize(torch.cross(lookat, up, dim=-1), dim=-1)
    up = torch.nn.functional.normalize(torch.cross(right, lookat, dim=-1), dim=-1)
    c2w = torch.zeros(pos.shape[0], 4, 4)
    c2w[:, :3, :3] = torch.stack([right, up, -lookat], dim=-1)
    c2w[:, :3, 3] = pos
    c2w[:, 3, 3] = 1.0
    return c2w
