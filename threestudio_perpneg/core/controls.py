"""User controls of Perp-Neg: a weight multiplier, a timestep window and single-negative sampling.

Perp-Neg is tuned blind in practice (too weak leaves faces on the back, too strong flattens the
front), and every negative costs a UNet row per sample. Three controls act on a
:class:`~.conditioning.StepConditioning` after the step's timesteps are drawn and before the UNet
call, so a negative they remove costs no row:

* ``weight_scale`` λ: every negative weight (view and user negatives) becomes λ·w_i. A float or a
  threestudio schedule ``[start_step, start, end, end_step]`` (or ``[start, end, end_step]``),
  resolved per step by :func:`resolve_schedule` with the semantics of threestudio's ``C``
  (annealed negative scales as in Classifier Score Distillation, arXiv 2310.17590).
* ``t_range`` [lo, hi]: negatives are evaluated only for samples with lo ≤ t / T ≤ hi (T the
  training timesteps); the others get plain classifier-free guidance on their interpolated
  positive, ε̂ = ε_u + s·Δ_pos (timestep gating as diffusers' guiders ``start``/``stop``).
* ``sampling``: ``all`` evaluates every negative; ``one`` evaluates a single negative per sample,
  drawn with p_i = |w_i| / Σ_j |w_j| and weighted w_i / p_i = sign(w_i)·Σ_j |w_j|. Since ε̂ is
  linear in the weighted perpendicular terms, E[ε̂_one] = ε̂_all exactly (an unbiased estimate at
  3 UNet rows per sample instead of 2 + K). Zero-weight negatives are never drawn, and a sample
  with a single negative is exactly the ``all`` result.
* ``eval_prob`` p ∈ (0, 1]: each sample keeps its negatives (after ``sampling``) with probability
  p, their weights divided by p, and otherwise gets plain classifier-free guidance on its
  interpolated positive. Again E[ε̂] is unchanged (a Bernoulli(p)/p factor on linear terms), and
  with ``one`` a step costs 2 + p UNet rows per sample on average: Perp-Neg near vanilla's price.
  p = 1 draws nothing.

This module imports no threestudio; the adapters validate their config keys with the ``check_*``
functions here (one validator per control).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .conditioning import StepConditioning

__all__ = [
    "SAMPLING_MODES",
    "PerpNegControls",
    "apply_controls",
    "check_eval_prob",
    "check_fraction_window",
    "check_sampling",
    "check_t_range",
    "check_weight_scale",
    "draw_uniforms",
    "gate_negatives",
    "keep_negatives",
    "resolve_schedule",
    "sample_one_negative",
    "scale_negatives",
    "step_in_window",
]

SAMPLING_MODES = ("all", "one")
ScheduleLike = Union[float, List[float]]


def _is_number(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def _as_list(value: Any) -> Optional[List[Any]]:
    # OmegaConf's ListConfig is a (Mutable)Sequence, not a list; strings are not schedules.
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return None
    return list(value)


# ------------------------------------------------------------------------------ validators
def check_weight_scale(value: Any, key: str = "perp_neg_weight_scale") -> ScheduleLike:
    """A finite number ≥ 0, or a schedule ``[start_step, start, end, end_step]`` / ``[start, end,
    end_step]`` with values ≥ 0 and ``end_step > start_step`` (an int end step counts training steps,
    a float one epochs, as in threestudio). Returns the float or the 4-element list."""
    if _is_number(value):
        if value < 0:
            raise ValueError(f"{key}: expected a number >= 0, got {value!r}")
        return float(value)
    items = _as_list(value)
    expected = "a number >= 0 or a schedule [start_step, start, end, end_step]"
    if items is None:
        raise ValueError(f"{key}: expected {expected}, got {value!r}")
    if len(items) == 3:
        items = [0, *items]
    if len(items) != 4:
        raise ValueError(
            f"{key}: expected {expected} (4 values), got {len(items)} values {value!r}"
        )
    start_step, start, end, end_step = items
    if not all(_is_number(x) for x in items):
        raise ValueError(f"{key}: expected finite numbers in the schedule, got {value!r}")
    if start < 0 or end < 0:
        raise ValueError(f"{key}: expected schedule values start, end >= 0, got {value!r}")
    if not end_step > start_step:
        raise ValueError(f"{key}: expected end_step > start_step in the schedule, got {value!r}")
    return [start_step, float(start), float(end), end_step]


def resolve_schedule(value: Any, epoch: int, global_step: int) -> float:
    """The value of a float or a linear schedule at a step, with threestudio's ``C`` semantics.

    ``[start_step, start, end, end_step]``: ``start`` before ``start_step``, ``end`` after
    ``end_step``, linear in between; the step counter is ``global_step`` when ``end_step`` is an
    int and ``epoch`` when it is a float. ``[start, end, end_step]`` starts at step 0.
    """
    if _is_number(value):
        return float(value)
    items = _as_list(value)
    if items is None:
        raise ValueError(f"schedule: expected a number or a list, got {value!r}")
    if len(items) == 3:
        items = [0, *items]
    if len(items) != 4:
        raise ValueError(
            f"schedule: expected [start_step, start, end, end_step], got {len(items)} values"
        )
    start_step, start, end, end_step = items
    current = global_step if isinstance(end_step, int) else epoch
    frac = max(min(1.0, (current - start_step) / (end_step - start_step)), 0.0)
    return float(start + (end - start) * frac)


def check_fraction_window(lo: Any, hi: Any, keys: Tuple[str, str]) -> Tuple[float, float]:
    """Two finite fractions with 0 ≤ lo ≤ hi ≤ 1, each error naming its key."""
    for k, x in zip(keys, (lo, hi)):
        if not _is_number(x):
            raise ValueError(f"{k}: expected a number in [0, 1], got {x!r}")
        if not 0.0 <= x <= 1.0:
            raise ValueError(f"{k}: expected a fraction in [0, 1], got {x!r}")
    if lo > hi:
        raise ValueError(
            f"{keys[0]}/{keys[1]}: expected {keys[0]} <= {keys[1]}, got {lo!r} > {hi!r}"
        )
    return float(lo), float(hi)


def check_t_range(value: Any, key: str = "perp_neg_t_range") -> Tuple[float, float]:
    """``[lo, hi]``: fractions of the training timesteps, 0 ≤ lo ≤ hi ≤ 1."""
    items = _as_list(value)
    if items is None or len(items) != 2:
        raise ValueError(f"{key}: expected [lo, hi] with 0 <= lo <= hi <= 1, got {value!r}")
    lo, hi = items
    for name, x in (("lo", lo), ("hi", hi)):
        if not _is_number(x) or not 0.0 <= x <= 1.0:
            raise ValueError(f"{key}: expected {name} a fraction in [0, 1], got {value!r}")
    if lo > hi:
        raise ValueError(f"{key}: expected lo <= hi, got {value!r}")
    return float(lo), float(hi)


def check_sampling(value: Any, key: str = "perp_neg_sampling") -> str:
    """``all`` or ``one``."""
    if value not in SAMPLING_MODES:
        raise ValueError(f"{key}: unknown value {value!r}, expected one of {SAMPLING_MODES}")
    return str(value)


def check_eval_prob(value: Any, key: str = "perp_neg_eval_prob") -> float:
    """A probability p with 0 < p ≤ 1 (p = 0 would divide the weights by zero: use
    ``use_perp_neg: false`` to turn the negatives off)."""
    if not _is_number(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"{key}: expected a probability 0 < p <= 1, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class PerpNegControls:
    """The step's Perp-Neg controls (see the module docstring).

    Args:
        weight_scale: λ ≥ 0 multiplying every negative weight, already resolved for this step
            (default 1: the weights as the scheme gives them).
        t_range: ``(lo, hi)`` fractions of the training timesteps where negatives are evaluated
            (default ``(0, 1)``: every timestep).
        sampling: ``all`` (default) or ``one`` (a single importance-sampled negative per sample).
        eval_prob: probability p ∈ (0, 1] that a sample keeps its negatives, weights divided by
            p (default 1: always).
    """

    weight_scale: float = 1.0
    t_range: Tuple[float, float] = (0.0, 1.0)
    sampling: str = "all"
    eval_prob: float = 1.0

    def __post_init__(self) -> None:
        ws = check_weight_scale(self.weight_scale)
        if not isinstance(ws, float):
            raise ValueError(
                f"perp_neg_weight_scale: expected a resolved number here, got the schedule "
                f"{self.weight_scale!r} (resolve it with resolve_schedule first)"
            )
        object.__setattr__(self, "weight_scale", ws)
        object.__setattr__(self, "t_range", check_t_range(self.t_range))
        check_sampling(self.sampling)
        object.__setattr__(self, "eval_prob", check_eval_prob(self.eval_prob))

    @property
    def is_default(self) -> bool:
        return (
            self.weight_scale == 1.0
            and self.t_range == (0.0, 1.0)
            and self.sampling == "all"
            and self.eval_prob == 1.0
        )


# ------------------------------------------------------------------------------ operations
def _keep(cond: StepConditioning, mask: Tensor) -> StepConditioning:
    return cond._replace(
        negative=cond.negative[mask],
        negative_index=cond.negative_index[mask],
        negative_weight=cond.negative_weight[mask],
    )


def scale_negatives(cond: StepConditioning, scale: float) -> StepConditioning:
    """Every negative weight times ``scale``; rows whose weight becomes exactly 0 are dropped."""
    if scale == 1.0 or cond.negative.shape[0] == 0:
        return cond
    weight = cond.negative_weight * scale
    return _keep(cond._replace(negative_weight=weight), weight != 0)


def gate_negatives(
    cond: StepConditioning, t: Tensor, num_train_timesteps: int, t_range: Tuple[float, float]
) -> StepConditioning:
    """Drop the negatives of samples whose ``t / num_train_timesteps`` lies outside ``t_range``."""
    lo, hi = t_range
    if (lo, hi) == (0.0, 1.0) or cond.negative.shape[0] == 0:
        return cond
    b = cond.positive.shape[0]
    if t.shape != (b,):
        raise ValueError(f"t: expected one timestep per sample, shape ({b},), got {tuple(t.shape)}")
    frac = t.to(torch.float64) / float(num_train_timesteps)
    active = (frac >= lo) & (frac <= hi)
    return _keep(cond, active.to(cond.negative_index.device)[cond.negative_index])


def draw_uniforms(batch: int, generator: Optional[torch.Generator]) -> Tensor:
    """``batch`` draws of U[0, 1) from ``generator`` (or the global RNG), on the CPU."""
    if generator is None:
        return torch.rand(batch, dtype=torch.float64)
    return torch.rand(
        batch, generator=generator, device=generator.device, dtype=torch.float64
    ).cpu()


def sample_one_negative(cond: StepConditioning, u: Tensor) -> StepConditioning:
    """One negative per sample, chosen by the uniform ``u[b]`` over p_i = |w_i| / Σ_j |w_j|.

    Sample b picks the first of its negatives i (in row order) with u[b] < Σ_{j≤i} p_j and weights
    it sign(w_i)·Σ_j |w_j| (= w_i / p_i); samples without negatives keep none.
    """
    b = cond.positive.shape[0]
    if u.shape != (b,):
        raise ValueError(f"u: expected one uniform per sample, shape ({b},), got {tuple(u.shape)}")
    n = cond.negative.shape[0]
    if n == 0:
        return cond
    index = cond.negative_index.cpu()
    absw = cond.negative_weight.detach().abs().to(torch.float64).cpu()
    rows: List[int] = []
    weights: List[float] = []
    for s in range(b):
        mine = (index == s).nonzero(as_tuple=True)[0]
        mine = mine[absw[mine] > 0]  # a zero weight has probability 0: never drawn
        if mine.numel() == 0:
            continue
        total = absw[mine].sum()
        cum = torch.cumsum(absw[mine] / total, dim=0)
        above = (float(u[s]) < cum).nonzero(as_tuple=True)[0]
        # Rounding can leave cum[-1] a hair below 1: a u beyond it takes the last negative.
        pick = int(mine[int(above[0])]) if above.numel() else int(mine[-1])
        rows.append(pick)
        sign = 1.0 if float(cond.negative_weight[pick]) > 0 else -1.0
        weights.append(sign * float(total))
    sel = torch.tensor(rows, dtype=torch.long, device=cond.negative.device)
    return cond._replace(
        negative=cond.negative.index_select(0, sel),
        negative_index=cond.negative_index.index_select(0, sel.to(cond.negative_index.device)),
        negative_weight=torch.tensor(
            weights, dtype=cond.negative_weight.dtype, device=cond.negative_weight.device
        ),
    )


def keep_negatives(cond: StepConditioning, p: float, u: Tensor) -> StepConditioning:
    """Sample b keeps its negatives when ``u[b] < p``, each weight divided by ``p``; the others
    lose theirs (plain CFG on their positive). ``p = 1`` returns ``cond`` unchanged."""
    b = cond.positive.shape[0]
    if u.shape != (b,):
        raise ValueError(f"u: expected one uniform per sample, shape ({b},), got {tuple(u.shape)}")
    p = check_eval_prob(p, "p")
    if p == 1.0 or cond.negative.shape[0] == 0:
        return cond
    kept = (u < p).to(cond.negative_index.device)[cond.negative_index]
    return _keep(cond._replace(negative_weight=cond.negative_weight / p), kept)


def apply_controls(
    cond: StepConditioning,
    t: Tensor,
    num_train_timesteps: int,
    controls: Optional[PerpNegControls],
    generator: Optional[torch.Generator] = None,
) -> StepConditioning:
    """Weight scale, then timestep gating, then (``one``) single-negative sampling, then (p < 1)
    the per-sample keep draw of ``eval_prob``.

    ``one`` and p < 1 each draw one uniform per sample from ``generator`` (or the global RNG), in
    that order, so call this after the step's timestep and noise draws to keep their random stream
    unchanged; ``all`` with p = 1 draws nothing.
    """
    if controls is None or not cond.perp_neg:
        return cond
    cond = scale_negatives(cond, controls.weight_scale)
    cond = gate_negatives(cond, t, num_train_timesteps, controls.t_range)
    if controls.sampling == "one":
        cond = sample_one_negative(cond, draw_uniforms(cond.positive.shape[0], generator))
    if controls.eval_prob < 1.0:
        cond = keep_negatives(
            cond, controls.eval_prob, draw_uniforms(cond.positive.shape[0], generator)
        )
    return cond


def step_in_window(step: int, num_steps: int, start: float, stop: float) -> bool:
    """Whether denoising step ``step`` (0-based of ``num_steps``) is in [start, stop), as diffusers'
    guiders count it: ``int(start·N) <= step < int(stop·N)``; ``(0, 1)`` is every step."""
    if (start, stop) == (0.0, 1.0):
        return True
    return int(start * num_steps) <= step < int(stop * num_steps)
