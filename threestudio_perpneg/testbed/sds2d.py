"""2D SDS on a free image: the cheapest view of what score distillation gets out of the prior.

A free ``[3, R, R]`` image (sigmoid of logits, grey start) is optimised by SDS through the same
pixel-space engine as the 3D protocol (:func:`~threestudio_perpneg.engines.pixel.if_sds_step`),
with one fixed prompt and plain classifier-free guidance. Nothing 3D is involved: no camera,
no renderer, no view-dependent prompt. Two uses:

* **sanity** (issue 17, 1a): with ``"<prompt>, front view"`` the classifier must read a front and
  the prompted identity. If it does not, SDS itself fails on this prior and no 3D number means
  anything.
* **view knowledge**: with ``"<prompt>, back view"`` / ``", side view"``, how often SDS draws the
  requested view. A prior whose view words are inert draws a front for every prompt (SDS seeks
  the mode), which is the 2D image of the Janus problem.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["SDS2DConfig", "SDS2DResult", "run_sds2d", "sds2d_success"]


@dataclass(frozen=True)
class SDS2DConfig:
    """Settings of 2D SDS on a free image (every field saved with the results).

    Args:
        steps: Adam steps. Default 600.
        lr: Adam learning rate of the image logits. Default 0.03.
        guidance_scale: CFG scale s (ε_u + s·(ε_c − ε_u)). Default 20.
        min_step_percent / max_step_percent: timestep range as fractions of the training
            timesteps. Default 0.02 / 0.6: with the top at 0.98 SDS on the 16 px prior converges
            to a featureless disc (measured, issue 17), at 0.6 it draws eyes and a mouth.
        weighting_strategy: SDS w(t): ``sds`` (1 − ᾱ_t), ``uniform`` or ``fantasia3d``.
    """

    steps: int = 600
    lr: float = 0.03
    guidance_scale: float = 20.0
    min_step_percent: float = 0.02
    max_step_percent: float = 0.6
    weighting_strategy: str = "sds"

    def __post_init__(self) -> None:
        from ..common.checks import check_float, check_int

        check_int("steps", self.steps, 1, 100_000)
        check_float("lr", self.lr, 0.0, 10.0)
        check_float("guidance_scale", self.guidance_scale, 0.0, 1000.0)
        check_float("min_step_percent", self.min_step_percent, 0.0, 1.0)
        check_float("max_step_percent", self.max_step_percent, 0.0, 1.0)
        if self.min_step_percent > self.max_step_percent:
            raise ValueError(
                f"min_step_percent/max_step_percent: expected min <= max, got "
                f"{self.min_step_percent} and {self.max_step_percent}"
            )

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


class SDS2DResult(NamedTuple):
    """Free images after SDS and their classification.

    Attributes:
        images: ``[n, 3, R, R]`` in [0, 1], one per seed.
        views: the classifier's view label of each image (``none`` included).
        identities: the classifier's identity label of each image (or None).
        seconds: wall time of the optimisation.
    """

    images: Tensor
    views: List[str]
    identities: Optional[List[str]]
    seconds: float


def run_sds2d(
    engine: Any,
    embedding: Tensor,
    uncond: Tensor,
    seeds: Sequence[int],
    classifier: Any,
    cfg: SDS2DConfig = SDS2DConfig(),
) -> SDS2DResult:
    """Optimise one free image per seed by SDS on one prompt, together in one UNet call a step.

    Args:
        engine: a :class:`~threestudio_perpneg.engines.pixel.PerpNegIFEngine` (the prior).
        embedding: the prompt's text embedding ``[L, D]``.
        uncond: the empty prompt's embedding ``[L, D]``.
        seeds: one image per seed; each seed's generator draws its timesteps and noise, so an
            image is the same whether optimised alone or with others (up to batched arithmetic).
        classifier: the testbed classifier (``classify`` → views, identities).
        cfg: the settings.
    """
    from ..core.conditioning import StepConditioning
    from ..engines.pixel import if_sds_step
    from ..engines.sd import SDSSettings

    n = len(seeds)
    if n == 0:
        raise ValueError("seeds: expected at least one seed, got none")
    size = engine.resolution
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    logits = torch.zeros(n, 3, size, size, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=cfg.lr)
    settings = SDSSettings(
        guidance_scale=cfg.guidance_scale,
        scale_convention="cfg",
        weighting_strategy=cfg.weighting_strategy,
    )
    n_train = int(engine.scheduler.config.num_train_timesteps)
    lo, hi = int(n_train * cfg.min_step_percent), int(n_train * cfg.max_step_percent)
    zeros = torch.zeros(n)
    ld = tuple(embedding.shape)
    cond = StepConditioning(
        positive=embedding[None].expand(n, *ld).clone(),
        uncond=uncond[None].expand(n, *ld).clone(),
        negative=embedding.new_zeros(0, *ld),
        negative_index=torch.zeros(0, dtype=torch.long),
        negative_weight=embedding.new_zeros(0),
        view=torch.zeros(n, dtype=torch.long),
        perp_neg=False,
    )
    t0 = time.time()
    for _ in range(cfg.steps):
        t = torch.cat([torch.randint(lo, hi + 1, [1], dtype=torch.long, generator=g) for g in gens])
        noise = torch.cat([torch.randn(1, 3, size, size, generator=g) for g in gens])
        rgb = torch.sigmoid(logits).permute(0, 2, 3, 1)
        out = if_sds_step(
            engine,
            rgb,
            cond,
            settings,
            min_step=lo,
            max_step=hi,
            elevation=zeros,
            azimuth=zeros,
            camera_distances=zeros,
            t=t,
            noise=noise,
        )
        opt.zero_grad()
        (out["loss_sds"] * n).backward()  # each image's gradient as if alone
        opt.step()
    seconds = time.time() - t0
    images = torch.sigmoid(logits.detach())
    predicted = classifier.classify(images)
    ids = getattr(predicted, "identities", None)
    return SDS2DResult(images, list(predicted.views), None if ids is None else list(ids), seconds)


def sds2d_success(result: SDS2DResult, view: str, identity: Optional[str] = None) -> List[int]:
    """``[successes, n]``: images read as ``view`` (and as ``identity`` when given)."""
    ok = 0
    for k, v in enumerate(result.views):
        same = identity is None or (
            result.identities is not None and result.identities[k] == identity
        )
        ok += int(v == view and same)
    return [ok, len(result.views)]
