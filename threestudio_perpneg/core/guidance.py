"""Perp-Neg algebra on plain tensors.

Perp-Neg (Armandpour et al. 2023, https://arxiv.org/abs/2304.04968) removes from every negative
prompt's guidance direction the component it shares with the positive direction, so that a negative
prompt can push away from a concept without undoing the positive prompt:

    Δ_pos = Σ_j v_j (ε(c_pos,j) − ε_u)                 (v_0 = 1 for a single positive)
    Δ_i   = ε(c_neg,i) − ε_u
    ε̂     = ε_u + s · (Δ_pos + Σ_i w_i · ⊥(Δ_i, Δ_pos)),   ⊥(a, b) = a − (⟨a, b⟩ / ‖b‖²) · b

with the inner product taken per sample over all non-batch dimensions. This module imports no
threestudio: every guidance, the 2D sampler and the smoke command call :func:`perp_neg_guidance`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

__all__ = [
    "GuidancePredictions",
    "perpendicular_component",
    "perp_neg_guidance",
]

ScaleLike = Union[float, Tensor]


class GuidancePredictions(NamedTuple):
    """UNet predictions of one guided step, named instead of relying on chunk order.

    Args:
        uncond: ε_u, shape ``[B, *S]``.
        positive: ε(c_pos), shape ``[B, *S]`` (one positive) or ``[B, P, *S]`` (several).
        negative: ε(c_neg) rows, shape ``[N, *S]``, or ``None`` when no negative was evaluated.
        negative_index: for each negative row, the sample (``0..B-1``) it belongs to, shape ``[N]``.
        negative_weight: for each negative row, its weight w_i (≤ 0 removes a concept), shape ``[N]``.
    """

    uncond: Tensor
    positive: Tensor
    negative: Optional[Tensor] = None
    negative_index: Optional[Tensor] = None
    negative_weight: Optional[Tensor] = None


def _compute_dtype(x: Tensor) -> torch.dtype:
    # Half-precision dot products over 16k elements lose the projection entirely.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def perpendicular_component(a: Tensor, b: Tensor, eps: float = 1e-12) -> Tensor:
    """⊥(a, b) = a − (⟨a, b⟩ / max(‖b‖², eps)) · b, per sample over all non-batch dims.

    ``a`` and ``b`` share the leading batch dimension and must have the same shape; the result has
    ``a``'s dtype, the arithmetic runs in float32 (float64 for float64 input).
    """
    if a.shape != b.shape:
        raise ValueError(
            f"perpendicular_component: shapes must match, got a={tuple(a.shape)} and "
            f"b={tuple(b.shape)}"
        )
    dt = _compute_dtype(a)
    # Flattening makes the reduction rank-agnostic, 1-D [B] input included.
    a32 = a.to(dt).flatten(1) if a.dim() > 1 else a.to(dt).unsqueeze(1)
    b32 = b.to(dt).flatten(1) if b.dim() > 1 else b.to(dt).unsqueeze(1)
    dot = (a32 * b32).sum(dim=1, keepdim=True)
    norm2 = (b32 * b32).sum(dim=1, keepdim=True).clamp_min(eps)
    return (a32 - (dot / norm2) * b32).reshape(a.shape).to(a.dtype)


def _as_batch_vector(
    value: ScaleLike, batch: int, name: str, device: torch.device, dtype: torch.dtype
) -> Tensor:
    t = torch.as_tensor(value, device=device, dtype=dtype)
    if t.dim() == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"{name}: expected a scalar or shape ({batch},), got {tuple(t.shape)}")
    return t


def _positive_direction(
    eps_uncond: Tensor, eps_pos: Tensor, pos_weights: Optional[Tensor], dt: torch.dtype
) -> Tensor:
    u = eps_uncond.to(dt)
    if eps_pos.shape == eps_uncond.shape:
        if pos_weights is not None:
            raise ValueError(
                "pos_weights: given for a single positive of shape "
                f"{tuple(eps_pos.shape)}; pass positives as [B, P, *S] to weight several"
            )
        return eps_pos.to(dt) - u
    if eps_pos.dim() != eps_uncond.dim() + 1 or (
        eps_pos.shape[0] != eps_uncond.shape[0] or eps_pos.shape[2:] != eps_uncond.shape[1:]
    ):
        raise ValueError(
            f"eps_pos: expected shape {tuple(eps_uncond.shape)} or [B, P, *S] with "
            f"B={eps_uncond.shape[0]} and S={tuple(eps_uncond.shape[1:])}, got {tuple(eps_pos.shape)}"
        )
    batch, n_pos = eps_pos.shape[:2]
    if pos_weights is None:
        w = torch.ones(batch, n_pos, device=eps_pos.device, dtype=dt)
    else:
        w = pos_weights.to(device=eps_pos.device, dtype=dt)
        if w.dim() == 1:
            w = w.expand(batch, -1)
        if w.shape != (batch, n_pos):
            raise ValueError(
                f"pos_weights: expected shape ({n_pos},) or ({batch}, {n_pos}), got "
                f"{tuple(pos_weights.shape)}"
            )
    deltas = eps_pos.to(dt) - u.unsqueeze(1)
    w = w.reshape(batch, n_pos, *([1] * (eps_uncond.dim() - 1)))
    return (w * deltas).sum(dim=1)


def perp_neg_guidance(
    eps_uncond: Tensor,
    eps_pos: Tensor,
    eps_neg: Optional[Tensor] = None,
    neg_weights: Optional[Tensor] = None,
    scale: ScaleLike = 1.0,
    *,
    neg_index: Optional[Tensor] = None,
    pos_weights: Optional[Tensor] = None,
    eps: float = 1e-12,
) -> Tensor:
    """ε̂ = ε_u + s · (Δ_pos + Σ_i w_i · ⊥(Δ_i, Δ_pos)) — the one Perp-Neg combination.

    Negatives come either dense, ``eps_neg`` of shape ``[B, K, *S]`` with ``neg_weights`` ``[B, K]``
    or ``[K]``, or ragged, ``eps_neg`` of shape ``[N, *S]`` with ``neg_weights`` ``[N]`` and
    ``neg_index`` ``[N]`` naming each row's sample — the form a batched UNet call produces when
    zero-weight negatives were never evaluated. Each negative is projected against the positive
    direction of its own sample.

    Args:
        eps_uncond: ε_u, ``[B, *S]``.
        eps_pos: ε(c_pos), ``[B, *S]``, or ``[B, P, *S]`` for several positives combined as
            Δ_pos = Σ_j v_j Δ_j (the paper's generalisation to composed positive prompts).
        eps_neg: negative predictions (dense or ragged), or ``None`` for plain classifier-free
            guidance.
        neg_weights: w_i; negative values remove a concept, zero is exactly plain guidance.
        scale: guidance scale s, a float or a ``[B]`` tensor.
        neg_index: sample index of each ragged negative row.
        pos_weights: v_j for several positives, ``[P]`` or ``[B, P]`` (default all ones).
        eps: floor on ‖Δ_pos‖² so a zero positive direction leaves negatives unprojected.

    Returns:
        ε̂ with the dtype and shape of ``eps_uncond``; arithmetic is done in float32 or better.
    """
    if eps_uncond.dim() < 2:
        raise ValueError(
            f"eps_uncond: expected shape [B, *S] with at least one non-batch dim, got "
            f"{tuple(eps_uncond.shape)}"
        )
    batch = eps_uncond.shape[0]
    dt = _compute_dtype(eps_uncond)
    u = eps_uncond.to(dt)
    delta_pos = _positive_direction(eps_uncond, eps_pos, pos_weights, dt)
    total = delta_pos

    if eps_neg is not None and eps_neg.shape[0] > 0:
        if neg_weights is None:
            raise ValueError("neg_weights: required when eps_neg is given")
        rows, weights, index = _ragged_negatives(eps_uncond, eps_neg, neg_weights, neg_index)
        delta_neg = rows.to(dt) - u.index_select(0, index)
        perp = perpendicular_component(delta_neg, delta_pos.index_select(0, index), eps=eps)
        shaped_w = weights.to(dt).reshape(-1, *([1] * (u.dim() - 1)))
        total = total.index_add(0, index, shaped_w * perp)
    elif eps_neg is None and neg_weights is not None and neg_weights.numel() > 0:
        raise ValueError("eps_neg: neg_weights were given without negative predictions")

    s = _as_batch_vector(scale, batch, "scale", u.device, dt)
    s = s.reshape(batch, *([1] * (u.dim() - 1)))
    return (u + s * total).to(eps_uncond.dtype)


def _ragged_negatives(
    eps_uncond: Tensor, eps_neg: Tensor, neg_weights: Tensor, neg_index: Optional[Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    batch, sample_shape = eps_uncond.shape[0], eps_uncond.shape[1:]
    device = eps_uncond.device
    if neg_index is None:
        if (
            eps_neg.dim() != eps_uncond.dim() + 1
            or eps_neg.shape[0] != batch
            or (eps_neg.shape[2:] != sample_shape)
        ):
            raise ValueError(
                f"eps_neg: expected dense shape [B={batch}, K, *{tuple(sample_shape)}] (or ragged "
                f"[N, *S] with neg_index), got {tuple(eps_neg.shape)}"
            )
        k = eps_neg.shape[1]
        w = neg_weights.to(device)
        if w.dim() == 1:
            w = w.expand(batch, -1)
        if w.shape != (batch, k):
            raise ValueError(
                f"neg_weights: expected shape ({k},) or ({batch}, {k}) for dense negatives, got "
                f"{tuple(neg_weights.shape)}"
            )
        index = torch.arange(batch, device=device).repeat_interleave(k)
        return eps_neg.flatten(0, 1), w.reshape(-1), index
    if eps_neg.shape[1:] != sample_shape:
        raise ValueError(
            f"eps_neg: ragged rows must have shape [N, *{tuple(sample_shape)}], got "
            f"{tuple(eps_neg.shape)}"
        )
    n = eps_neg.shape[0]
    if neg_index.shape != (n,) or neg_weights.shape != (n,):
        raise ValueError(
            f"neg_index/neg_weights: expected shape ({n},) each for {n} ragged negatives, got "
            f"{tuple(neg_index.shape)} and {tuple(neg_weights.shape)}"
        )
    index = neg_index.to(device=device, dtype=torch.long)
    if n and (int(index.min()) < 0 or int(index.max()) >= batch):
        raise ValueError(
            f"neg_index: sample indices must lie in [0, {batch - 1}], got "
            f"[{int(index.min())}, {int(index.max())}]"
        )
    return eps_neg, neg_weights.to(device), index
