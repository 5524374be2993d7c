"""From text embeddings and cameras to the per-step conditioning of one batched UNet call.

A :class:`PromptBank` holds the embeddings a run needs (the four view prompts, the unconditional
baseline and the user's negative prompts). :func:`step_conditioning` turns it, for a batch of cameras,
into a :class:`StepConditioning`: one positive and one unconditional embedding per sample, and a
ragged list of (sample, embedding, weight) negatives from which zero-weight negatives were removed,
so the UNet evaluates exactly ``2·B + N`` branches and each negative sees its own sample's latent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .views import Scheme, ViewThresholds, classify_views, view_weights

__all__ = ["PromptBank", "StepConditioning", "step_conditioning"]


@dataclass
class PromptBank:
    """Text embeddings for view-dependent Perp-Neg.

    Args:
        prompt: embedding of the plain prompt, ``[L, D]``.
        views: embeddings of the view prompts in ``side, front, back, overhead`` order, ``[4, L, D]``.
        uncond: unconditional (``negative_prompt``) embedding per view, ``[4, L, D]``.
        negatives: user negative prompts projected with Perp-Neg, ``[U, L, D]`` (U may be 0).
        negative_weights: their weights, ``[U]``, each ≤ 0.
    """

    prompt: Tensor
    views: Tensor
    uncond: Tensor
    negatives: Tensor
    negative_weights: Tensor

    def __post_init__(self) -> None:
        ld = tuple(self.prompt.shape)
        if len(ld) != 2:
            raise ValueError(f"prompt: expected an embedding of shape [L, D], got {ld}")
        for key, t, lead in (("views", self.views, 4), ("uncond", self.uncond, 4)):
            if tuple(t.shape) != (lead, *ld):
                raise ValueError(f"{key}: expected shape {(lead, *ld)}, got {tuple(t.shape)}")
        u = self.negatives.shape[0]
        if tuple(self.negatives.shape[1:]) != ld or tuple(self.negative_weights.shape) != (u,):
            raise ValueError(
                f"negatives/negative_weights: expected shapes [U, {ld[0]}, {ld[1]}] and [U], got "
                f"{tuple(self.negatives.shape)} and {tuple(self.negative_weights.shape)}"
            )

    @classmethod
    def from_embeddings(
        cls,
        embeddings: Mapping[str, Tensor],
        prompt: str,
        negative_prompt: str,
        view_prompts: Sequence[str],
        negative_prompts: Sequence[str] = (),
        negative_weights: Sequence[float] = (),
    ) -> PromptBank:
        """Bank from embeddings keyed by prompt (as :func:`~.text.text_embeddings` returns them).

        ``negative_prompt`` is the unconditional baseline of every view; ``negative_prompts`` are
        the user negatives projected with Perp-Neg, one weight each.
        """
        if len(negative_prompts) != len(negative_weights):
            raise ValueError(
                f"negative_weights: expected one weight per negative prompt ({len(negative_prompts)}),"
                f" got {len(negative_weights)}"
            )
        first = embeddings[prompt]
        negatives = (
            torch.stack([embeddings[p] for p in negative_prompts])
            if negative_prompts
            else first.new_zeros((0, *first.shape))
        )
        return cls(
            prompt=first,
            views=torch.stack([embeddings[p] for p in view_prompts]),
            uncond=torch.stack([embeddings[negative_prompt]] * len(view_prompts)),
            negatives=negatives,
            negative_weights=torch.tensor(
                list(negative_weights), dtype=first.dtype, device=first.device
            ),
        )

    def to(self, device: torch.device | str) -> PromptBank:
        return PromptBank(
            prompt=self.prompt.to(device),
            views=self.views.to(device),
            uncond=self.uncond.to(device),
            negatives=self.negatives.to(device),
            negative_weights=self.negative_weights.to(device),
        )


class StepConditioning(NamedTuple):
    """Embeddings of one guided step, per sample and per evaluated negative.

    Attributes:
        positive: ``[B, L, D]``; uncond: ``[B, L, D]``.
        negative: embeddings of the evaluated negatives, ``[N, L, D]``.
        negative_index: sample of each negative, ``[N]``; negative_weight: its weight, ``[N]``.
        view: camera bucket per sample, ``[B]`` (side/front/back/overhead index).
        perp_neg: whether the step combines with Perp-Neg (else plain classifier-free guidance).
    """

    positive: Tensor
    uncond: Tensor
    negative: Tensor
    negative_index: Tensor
    negative_weight: Tensor
    view: Tensor
    perp_neg: bool

    @property
    def branches(self) -> int:
        """UNet branches one step evaluates: 2 per sample plus one per negative."""
        return 2 * self.positive.shape[0] + self.negative.shape[0]

    def select(self, sample: int) -> StepConditioning:
        """The conditioning of one sample, as a batch of one."""
        return self.take(torch.tensor([sample], device=self.negative_index.device))

    def take(self, samples: Tensor) -> StepConditioning:
        """The conditioning of the samples ``samples`` (distinct indices, ``[K]``), as a batch of K
        in that order; their negatives keep their row order and are re-indexed into the new batch."""
        samples = samples.to(device=self.negative_index.device, dtype=torch.long)
        new_index = torch.full(
            (self.positive.shape[0],), -1, dtype=torch.long, device=samples.device
        )
        new_index[samples] = torch.arange(samples.shape[0], device=samples.device)
        mapped = new_index[self.negative_index]
        keep = mapped >= 0
        pos_samples = samples.to(self.positive.device)
        return StepConditioning(
            positive=self.positive.index_select(0, pos_samples),
            uncond=self.uncond.index_select(0, pos_samples),
            negative=self.negative[keep.to(self.negative.device)],
            negative_index=mapped[keep],
            negative_weight=self.negative_weight[keep.to(self.negative_weight.device)],
            view=self.view.index_select(0, samples.to(self.view.device)),
            perp_neg=self.perp_neg,
        )


def step_conditioning(
    bank: PromptBank,
    elevation: Tensor,
    azimuth: Tensor,
    *,
    scheme: Scheme,
    thresholds: ViewThresholds = ViewThresholds(),
    view: Optional[Tensor] = None,
    view_dependent: bool = True,
    perp_neg: bool = True,
    min_weight: float = 0.0,
) -> StepConditioning:
    """Per-sample positives and the ragged list of non-zero-weight negatives for a camera batch.

    Args:
        bank: the run's text embeddings.
        elevation, azimuth: camera angles in degrees, ``[B]`` each.
        scheme: view negative weight scheme.
        thresholds: camera buckets (ignored when ``view`` is given).
        view: precomputed bucket per sample, e.g. from a stock threestudio prompt processor.
        view_dependent: use view prompts; without it the plain prompt is the positive and only the
            user negatives apply.
        perp_neg: build Perp-Neg negatives; without it the step is plain classifier-free guidance
            on the bucketed view prompt (threestudio's behaviour).
        min_weight: negatives with ``|w| <= min_weight`` are dropped and never evaluated.
    """
    if not math.isfinite(min_weight) or min_weight < 0:
        raise ValueError(f"min_weight: expected a finite number >= 0, got {min_weight!r}")
    if elevation.dim() != 1 or elevation.shape != azimuth.shape:
        raise ValueError(
            "elevation/azimuth: expected two 1-D tensors of the same length, got "
            f"{tuple(elevation.shape)} and {tuple(azimuth.shape)}"
        )
    device = bank.views.device
    elevation, azimuth = elevation.to(device), azimuth.to(device)
    batch = elevation.shape[0]
    if view is None:
        view = classify_views(elevation, azimuth, thresholds)
    view = view.to(device=device, dtype=torch.long)
    uncond = bank.uncond[view] if view_dependent else bank.uncond[0].expand(batch, -1, -1)
    empty = bank.views.new_zeros((0, *bank.prompt.shape))
    no_index = torch.zeros(0, dtype=torch.long, device=device)

    if not perp_neg:
        positive = bank.views[view] if view_dependent else bank.prompt.expand(batch, -1, -1)
        return StepConditioning(
            positive, uncond, empty, no_index, bank.views.new_zeros(0), view, perp_neg=False
        )

    n_user = bank.negatives.shape[0]
    if view_dependent:
        vw = view_weights(elevation, azimuth, scheme, thresholds, view=view)
        mix = vw.positive_mix.to(bank.views.dtype)
        positive = torch.einsum("bv,vld->bld", mix, bank.views)
        weights = vw.negative_weights.to(bank.views.dtype)  # [B, 4]
        table = bank.views
    else:
        positive = bank.prompt.expand(batch, -1, -1)
        weights = bank.views.new_zeros(batch, 0)
        table = bank.views[:0]
    if n_user:
        user_w = bank.negative_weights.to(weights.dtype).expand(batch, -1)
        weights = torch.cat([weights, user_w], dim=1)
        table = torch.cat([table, bank.negatives], dim=0)
    keep = weights.abs() > min_weight
    sample_idx, table_idx = keep.nonzero(as_tuple=True)
    return StepConditioning(
        positive=positive,
        uncond=uncond,
        negative=table[table_idx],
        negative_index=sample_idx,
        negative_weight=weights[sample_idx, table_idx],
        view=view,
        perp_neg=True,
    )
