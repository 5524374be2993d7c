"""threestudio's built-in Perp-Neg, reproduced faithfully (pairing bug included) as a testbed method.

threestudio's ``stable-diffusion-guidance`` with ``prompt_processor.use_perp_neg=true`` evaluates
``4·B`` UNet rows per step: the noisy latents and timesteps repeated four times, against text rows
``[pos_0..pos_{B-1}, uncond_0..uncond_{B-1}, neg_{0,0}, neg_{0,1}, neg_{1,0}, neg_{1,1}, ...]``:
the prompt processor appends each sample's two view negatives one after the other, while the
latent of negative row ``j`` is sample ``j mod B``'s. The guidance then reads negative ``i`` of
every sample as ``noise_pred_neg[i::2]``: sample ``k``'s negative ``i`` has the right embedding and
weight but is evaluated on the latent and timestep of sample ``(2k + i) mod B``. For ``B = 1`` this
is Perp-Neg; for ``B > 1`` negatives see other cameras' images (threestudio issue #456). This
module rebuilds exactly that, from our :class:`~threestudio_perpneg.core.conditioning.StepConditioning`
and with our one projection :func:`~threestudio_perpneg.core.guidance.perpendicular_component`,
so the 3D testbed can measure what the bug costs. It imports no threestudio.

Scale convention: threestudio's, ε̂ = ε_u + s·(Δ_pos + Σ_i w_i ⊥(Δ_i, Δ_pos)), the ``cfg`` one
(threestudio's plain CFG path, ε_c + s·(ε_c − ε_u), is the other).
"""

from __future__ import annotations

from typing import Any, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ..core.conditioning import StepConditioning
from ..core.guidance import perpendicular_component
from ..core.views import wrap_azimuth
from ..engines.sd import _full_precision

__all__ = [
    "THREESTUDIO_PROJECTION_EPS",
    "ThreestudioTextBatch",
    "threestudio_negatives",
    "threestudio_text_batch",
    "threestudio_combine",
    "threestudio_guided_noise",
]

#: Floor threestudio puts on ‖Δ_pos‖² in its ``perpendicular_component``.
THREESTUDIO_PROJECTION_EPS = 1e-6

#: Negatives per sample in threestudio's built-in Perp-Neg (front/side or side/front).
N_NEGATIVES = 2


class ThreestudioTextBatch(NamedTuple):
    """The text rows of one threestudio Perp-Neg UNet call for a batch of ``B`` cameras.

    Attributes:
        embeddings: ``[4B, L, D]``: ``B`` positives, ``B`` unconditionals, then ``2B`` negatives
            sample-major (``s0n0, s0n1, s1n0, ...``), as threestudio's prompt processor stacks them.
        weights: ``[B, 2]``, the negatives' weights (zero for padded slots).
    """

    embeddings: Tensor
    weights: Tensor


def threestudio_negatives(cond: StepConditioning, azimuth: Tensor) -> Tuple[Tensor, Tensor]:
    """Dense ``[B, 2, L, D]`` negatives and ``[B, 2]`` weights in threestudio's slot order.

    threestudio lists a front-half camera's negatives as (front, side) and a back-half camera's
    as (side, front); :func:`~threestudio_perpneg.core.conditioning.step_conditioning` keeps them
    in view-table order (side, front), so front-half pairs are swapped. A sample without
    negatives (overhead) gets its unconditional embedding twice with weight 0, as threestudio
    does.

    Args:
        cond: a Perp-Neg conditioning of the ``threestudio`` scheme (view-dependent, no user
            negatives).
        azimuth: the cameras' azimuths in degrees, ``[B]``.

    Raises:
        ValueError: when ``cond`` is not Perp-Neg, or a sample has other than 0 or 2 negatives
            (user negatives, or a view weight that is exactly zero and was dropped: its slot is
            then unknown).
    """
    if not cond.perp_neg:
        raise ValueError("cond: threestudio's built-in Perp-Neg needs a Perp-Neg conditioning")
    b = cond.positive.shape[0]
    if azimuth.shape != (b,):
        raise ValueError(f"azimuth: expected shape ({b},), got {tuple(azimuth.shape)}")
    back_half = (wrap_azimuth(azimuth.to(torch.float64)).abs() >= 90.0).tolist()
    index = cond.negative_index.tolist()
    negs: List[Tensor] = []
    weights: List[Tensor] = []
    for k in range(b):
        rows = [j for j, s in enumerate(index) if s == k]
        if not rows:
            negs.append(cond.uncond[k].expand(N_NEGATIVES, -1, -1))
            weights.append(cond.negative_weight.new_zeros(N_NEGATIVES))
            continue
        if len(rows) != N_NEGATIVES:
            raise ValueError(
                f"cond: sample {k} has {len(rows)} negatives; threestudio's built-in Perp-Neg "
                f"takes 0 or {N_NEGATIVES} (its view negatives, no user negatives)"
            )
        if not back_half[k]:
            rows = rows[::-1]  # (side, front) -> threestudio's (front, side)
        negs.append(cond.negative[rows])
        weights.append(cond.negative_weight[rows])
    return torch.stack(negs).to(cond.positive), torch.stack(weights)


def threestudio_text_batch(cond: StepConditioning, azimuth: Tensor) -> ThreestudioTextBatch:
    """threestudio's ``get_text_embeddings_perp_neg`` rows from our conditioning.

    Args:
        cond: as in :func:`threestudio_negatives`.
        azimuth: the cameras' azimuths in degrees, ``[B]``.

    Returns:
        A :class:`ThreestudioTextBatch` of ``4B`` text rows and ``[B, 2]`` weights.
    """
    negs, weights = threestudio_negatives(cond, azimuth)
    emb = torch.cat([cond.positive, cond.uncond.to(cond.positive), negs.flatten(0, 1)])
    return ThreestudioTextBatch(emb, weights)


def threestudio_combine(eps: Tensor, weights: Tensor, scale: float) -> Tensor:
    """ε̂ of threestudio's built-in Perp-Neg from the UNet's outputs on its ``4B`` rows.

    The rows are the ones of :class:`ThreestudioTextBatch` with the noisy inputs and timesteps
    repeated four times. Negative ``i`` of sample ``k`` is read as row ``2B + 2k + i`` of
    ``eps`` (threestudio's ``noise_pred_neg[i::2]``), which was evaluated on sample
    ``(2k + i) mod B``'s input: threestudio issue #456 for ``B > 1``, reproduced on purpose.

    Args:
        eps: ε of the ``4B`` rows, ``[4B, *S]``.
        weights: ``[B, 2]`` negative weights.
        scale: s of ε̂ = ε_u + s·(Δ_pos + Σ_i w_i ⊥(Δ_i, Δ_pos)).

    Returns:
        ε̂, ``[B, *S]``.
    """
    b = weights.shape[0]
    if weights.dim() != 2 or eps.shape[0] != 4 * b:
        raise ValueError(
            f"eps/weights: expected [4B, *S] outputs and [B, 2] weights, got "
            f"{tuple(eps.shape)} and {tuple(weights.shape)}"
        )
    pos, uncond, neg = eps[:b], eps[b : 2 * b], eps[2 * b :]
    e_pos = pos - uncond
    n = weights.shape[1]
    accum = torch.zeros_like(e_pos)
    shape = (-1, *([1] * (eps.dim() - 1)))
    for i in range(n):
        e_neg = neg[i::n] - uncond
        w = weights[:, i].to(eps).reshape(shape)
        accum = accum + w * perpendicular_component(e_neg, e_pos, eps=THREESTUDIO_PROJECTION_EPS)
    return uncond + scale * (e_pos + accum)


def _unet_eps(model: Any, x: Tensor, t: Tensor, emb: Tensor) -> Tensor:
    """ε of UNet rows, through an engine (its UNet, dtype and row counters) or a callable."""
    unet = getattr(model, "unet", None)
    if unet is None:
        out = model(x, t, emb)
    else:
        dt = model.weights_dtype
        out = unet(x.to(dt), t.to(dt), encoder_hidden_states=emb.to(dt))
        model.unet_calls += 1
        model.unet_branches += x.shape[0]
    out = getattr(out, "sample", out).to(x.dtype)
    c = x.shape[1]
    if out.shape[1] == 2 * c:  # DeepFloyd IF: ε and the learned variance
        return out[:, :c]
    if out.shape[1] != c:
        raise ValueError(
            f"unet: expected {c} (ε) or {2 * c} (ε and variance) output channels, got {out.shape[1]}"
        )
    return out


@torch.no_grad()
@_full_precision
def threestudio_guided_noise(
    model: Any,
    x_noisy: Tensor,
    t: Tensor,
    cond: StepConditioning,
    scale: float,
    *,
    azimuth: Tensor,
    group_size: Optional[int] = None,
) -> Tensor:
    """ε̂ of one step as threestudio's built-in Perp-Neg computes it, in one UNet call.

    Works with the latent engine (:class:`~threestudio_perpneg.engines.sd.PerpNegSDSEngine`) and
    the pixel engine (:class:`~threestudio_perpneg.engines.pixel.PerpNegIFEngine`, learned
    variance channels dropped), or with any callable ``model(x, t, embeddings) -> ε``.

    Args:
        model: an engine (its ``unet``, ``weights_dtype`` and row counters are used) or a callable.
        x_noisy: noisy inputs, ``[B, C, H, W]``; t: their timesteps, ``[B]``.
        cond: the step's Perp-Neg conditioning (``threestudio`` scheme, see
            :func:`threestudio_negatives`).
        scale: s of ε̂ = ε_u + s·(…), threestudio's ``guidance_scale`` on this path.
        azimuth: the cameras' azimuths in degrees, ``[B]`` (threestudio's negative slot order).
        group_size: cameras of one threestudio call: consecutive groups of this size are laid
            out and combined separately (the pairing bug stays inside a group, as for several
            objects each optimised alone), all in the same UNet call. None: one group.

    Returns:
        ε̂, ``[B, C, H, W]``. The UNet evaluates ``4B`` rows.
    """
    b = x_noisy.shape[0]
    g = b if group_size is None else int(group_size)
    if g < 1 or b % g or t.shape != (b,) or cond.positive.shape[0] != b:
        raise ValueError(
            f"group_size/t/cond: expected {b} timesteps and samples in groups of a divisor of "
            f"{b}, got group_size={group_size}, t {tuple(t.shape)}, {cond.positive.shape[0]} samples"
        )
    negs, weights = threestudio_negatives(cond, azimuth.to(cond.positive.device))
    xs, ts, embs = [], [], []
    for s in range(0, b, g):
        part = slice(s, s + g)
        xs += [x_noisy[part]] * 4
        ts += [t[part]] * 4
        embs += [cond.positive[part], cond.uncond[part].to(cond.positive), negs[part].flatten(0, 1)]
    eps = _unet_eps(model, torch.cat(xs), torch.cat(ts), torch.cat(embs))
    out = [
        threestudio_combine(eps[4 * s : 4 * (s + g)], weights[s : s + g], scale)
        for s in range(0, b, g)
    ]
    return torch.cat(out)
