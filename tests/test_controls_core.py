"""The Perp-Neg controls on plain tensors (``threestudio_perpneg.core.controls``).

References are written out here per sample (⊥ and the Perp-Neg sum by hand, the sampling
probabilities p_i = |w_i| / Σ|w_j| from the weights), so they share no code with the module.
"""

from __future__ import annotations

import itertools
import math
from typing import List, Sequence, Tuple

import pytest
import torch
from helpers import raises_naming
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from threestudio_perpneg.core.conditioning import StepConditioning
from threestudio_perpneg.core.controls import (
    PerpNegControls,
    apply_controls,
    check_eval_prob,
    check_fraction_window,
    check_sampling,
    check_t_range,
    check_weight_scale,
    gate_negatives,
    keep_negatives,
    resolve_schedule,
    sample_one_negative,
    scale_negatives,
    step_in_window,
)
from threestudio_perpneg.core.guidance import perp_neg_guidance

S = (2, 3, 3)  # per-sample prediction shape
SCALE = 7.5


# ------------------------------------------------------------------------------- fixtures
def make_cond(per_sample: Sequence[Sequence[float]], seed: int = 0) -> StepConditioning:
    """Conditioning with the given negative weights per sample; embeddings carry (sample, k)."""
    rows, index, weights = [], [], []
    for s, ws in enumerate(per_sample):
        for k, w in enumerate(ws):
            rows.append(torch.full((1, 2), 100.0 * s + k))
            index.append(s)
            weights.append(w)
    b = len(per_sample)
    return StepConditioning(
        positive=torch.zeros(b, 1, 2),
        uncond=torch.zeros(b, 1, 2),
        negative=torch.stack(rows) if rows else torch.zeros(0, 1, 2),
        negative_index=torch.tensor(index, dtype=torch.long),
        negative_weight=torch.tensor(weights, dtype=torch.float64),
        view=torch.zeros(b, dtype=torch.long),
        perp_neg=True,
    )


class Preds:
    """Random ε_u, ε_pos per sample and ε_neg per (sample, k), looked up by a row's embedding."""

    def __init__(self, per_sample: Sequence[Sequence[float]], seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        b = len(per_sample)
        self.u = torch.randn(b, *S, generator=g, dtype=torch.float64)
        self.pos = torch.randn(b, *S, generator=g, dtype=torch.float64)
        self.neg = {
            (s, k): torch.randn(*S, generator=g, dtype=torch.float64)
            for s, ws in enumerate(per_sample)
            for k in range(len(ws))
        }

    def key(self, emb: Tensor) -> Tuple[int, int]:
        v = int(emb.flatten()[0])
        return v // 100, v % 100

    def guided(self, cond: StepConditioning) -> Tensor:
        """ε̂ of the rows ``cond`` evaluates, via the library's combination."""
        rows = [self.neg[self.key(e)] for e in cond.negative]
        eps_neg = torch.stack(rows) if rows else None
        return perp_neg_guidance(
            self.u,
            self.pos,
            eps_neg,
            cond.negative_weight if rows else None,
            SCALE,
            neg_index=cond.negative_index if rows else None,
        )

    def reference(self, s: int, weights: Sequence[Tuple[int, float]]) -> Tensor:
        """ε̂ of sample s with negatives (k, w), by hand."""
        d_pos = self.pos[s] - self.u[s]
        total = d_pos.clone()
        for k, w in weights:
            d = self.neg[(s, k)] - self.u[s]
            total += w * (d - (d * d_pos).sum() / (d_pos * d_pos).sum() * d_pos)
        return self.u[s] + SCALE * total


# ----------------------------------------------------------------------------- validators
@pytest.mark.parametrize(
    "value,needles",
    [
        (-0.5, ["perp_neg_weight_scale", "-0.5", ">= 0"]),
        (float("nan"), ["perp_neg_weight_scale", "nan"]),
        ("strong", ["perp_neg_weight_scale", "'strong'", "schedule"]),
        ([0, 1.0], ["4 values", "[0, 1.0]"]),
        ([0, 1.0, 0.5, 100, 3], ["perp_neg_weight_scale", "5 values"]),
        ([0, -1.0, 0.5, 100], ["perp_neg_weight_scale", ">= 0", "-1.0"]),
        ([100, 1.0, 0.5, 100], ["perp_neg_weight_scale", "end_step > start_step"]),
        ([0, "a", 0.5, 100], ["perp_neg_weight_scale", "finite numbers"]),
    ],
)
def test_weight_scale_errors_are_one_line_and_name_key_and_value(value, needles) -> None:
    msg = raises_naming(lambda: check_weight_scale(value), "perp_neg_weight_scale", *needles)
    assert "\n" not in msg


@pytest.mark.parametrize(
    "value,needles",
    [
        ([0.6, 0.2], ["lo <= hi", "[0.6, 0.2]"]),
        ([-0.1, 0.5], ["fraction in [0, 1]", "[-0.1, 0.5]"]),
        ([0.1, 1.5], ["fraction in [0, 1]", "1.5"]),
        ([0.1], ["[lo, hi]", "[0.1]"]),
        (0.5, ["[lo, hi]", "0.5"]),
        ("0,1", ["[lo, hi]", "'0,1'"]),
    ],
)
def test_t_range_errors(value, needles) -> None:
    msg = raises_naming(lambda: check_t_range(value), "perp_neg_t_range", *needles)
    assert "\n" not in msg


def test_sampling_and_window_errors() -> None:
    msg = raises_naming(lambda: check_sampling("two"), "perp_neg_sampling", "'two'", "'one'")
    assert "\n" not in msg
    keys = ("perp_neg_start", "perp_neg_stop")
    raises_naming(lambda: check_fraction_window(0.7, 0.2, keys), "perp_neg_start", "0.7 > 0.2")
    raises_naming(lambda: check_fraction_window(0.0, 1.2, keys), "perp_neg_stop", "1.2")
    raises_naming(lambda: PerpNegControls(sampling="some"), "perp_neg_sampling", "'some'")
    raises_naming(lambda: PerpNegControls(weight_scale=[0, 1, 0, 10]), "resolve")  # type: ignore[arg-type]
    assert check_weight_scale([1.0, 0.0, 500]) == [0, 1.0, 0.0, 500]
    assert check_t_range((0.25, 0.75)) == (0.25, 0.75)


# ------------------------------------------------------------------------------ schedules
def c_reference(value, epoch: int, step: int) -> float:
    """threestudio's C for [start_step, start, end, end_step], written out."""
    if len(value) == 3:
        value = [0, *value]
    s0, v0, v1, s1 = value
    cur = step if isinstance(s1, int) else epoch
    if cur <= s0:
        return v0
    if cur >= s1:
        return v1
    return v0 + (v1 - v0) * (cur - s0) / (s1 - s0)


@settings(max_examples=60, deadline=None)
@given(
    s0=st.integers(0, 500),
    span=st.integers(1, 2000),
    v0=st.floats(0, 4),
    v1=st.floats(0, 4),
    step=st.integers(0, 3000),
    epoch=st.integers(0, 30),
    by_epoch=st.booleans(),
    short=st.booleans(),
)
def test_resolve_schedule_is_threestudios_linear_schedule(
    s0, span, v0, v1, step, epoch, by_epoch, short
) -> None:
    end = float(s0 + span) if by_epoch else s0 + span
    value = [v0, v1, end] if short else [s0, v0, v1, end]
    if short and by_epoch:
        value = [v0, v1, float(span)]
    got = resolve_schedule(value, epoch, step)
    assert got == pytest.approx(c_reference(value, epoch, step), rel=1e-12, abs=1e-12)
    assert resolve_schedule(1.25, epoch, step) == 1.25


# ------------------------------------------------------------------------ weight and t gate
def test_weight_scale_multiplies_every_negative_and_zero_drops_rows() -> None:
    per = [[-2.0, -0.5], [-1.0]]
    cond, preds = make_cond(per), Preds(per)
    scaled = scale_negatives(cond, 0.3)
    got = preds.guided(scaled)
    for s, ws in enumerate(per):
        ref = preds.reference(s, [(k, 0.3 * w) for k, w in enumerate(ws)])
        torch.testing.assert_close(got[s], ref, rtol=1e-10, atol=1e-10)
    off = scale_negatives(cond, 0.0)
    assert off.negative.shape[0] == 0 and off.branches == 4
    torch.testing.assert_close(preds.guided(off), preds.u + SCALE * (preds.pos - preds.u))


def test_t_gate_is_plain_cfg_outside_and_perp_neg_inside_one_batch() -> None:
    per = [[-2.0, -0.5], [-1.0, -1.5], [-0.7], [-3.0]]
    cond, preds = make_cond(per), Preds(per, seed=3)
    t = torch.tensor([100, 450, 700, 999])  # t/1000 = 0.1, 0.45, 0.7, 0.999
    gated = gate_negatives(cond, t, 1000, (0.45, 0.7))  # both ends inclusive
    inside = {1, 2}
    assert gated.branches == 2 * 4 + sum(len(per[s]) for s in inside)
    assert sorted(set(gated.negative_index.tolist())) == sorted(inside)
    got = preds.guided(gated)
    for s, ws in enumerate(per):
        weights = list(enumerate(ws)) if s in inside else []
        torch.testing.assert_close(got[s], preds.reference(s, weights), rtol=1e-10, atol=1e-10)
    # Plain CFG outside, written out: ε_u + s·(ε_pos − ε_u).
    torch.testing.assert_close(got[0], preds.u[0] + SCALE * (preds.pos[0] - preds.u[0]))
    assert gate_negatives(cond, t, 1000, (0.0, 1.0)) is cond


# ---------------------------------------------------------------------------- one sampling
def choices(ws: Sequence[float]) -> List[Tuple[int, float, float]]:
    """(k, p_k, u inside k's interval) for every non-zero weight, p_k = |w_k| / Σ|w|."""
    total = sum(abs(w) for w in ws)
    out, acc = [], 0.0
    for k, w in enumerate(ws):
        p = abs(w) / total if total else 0.0
        if p > 0:
            out.append((k, p, acc + p / 2))
        acc += p
    return out


def enumerated_expectation(per: Sequence[Sequence[float]], preds: Preds) -> Tensor:
    """Σ over every joint choice of Π p · ε̂(choice), through sample_one_negative."""
    cond = make_cond(per)
    b = len(per)
    options = [choices(ws) or [(-1, 1.0, 0.5)] for ws in per]
    expect = torch.zeros(b, *S, dtype=torch.float64)
    for combo in itertools.product(*options):
        u = torch.tensor([c[2] for c in combo], dtype=torch.float64)
        one = sample_one_negative(cond, u)
        # Exactly the chosen negative, weighted w_k / p_k.
        for s, (k, p, _) in enumerate(combo):
            mine = (one.negative_index == s).nonzero(as_tuple=True)[0]
            if k < 0:
                assert mine.numel() == 0
                continue
            assert mine.numel() == 1
            assert preds.key(one.negative[int(mine)]) == (s, k)
            assert float(one.negative_weight[int(mine)]) == pytest.approx(per[s][k] / p, rel=1e-12)
        prob = math.prod(c[1] for c in combo)
        expect += prob * preds.guided(one)
    return expect


def test_one_sampling_expectation_equals_all_exactly() -> None:
    per = [[-2.0, -0.5, -1.25], [-1.0], [], [-0.3, 0.0, -0.9]]  # a zero weight, an empty sample
    preds = Preds(per, seed=7)
    full = preds.guided(make_cond(per))
    torch.testing.assert_close(enumerated_expectation(per, preds), full, rtol=1e-10, atol=1e-10)
    for s, ws in enumerate(per):  # and the "all" result is the hand-written Perp-Neg sum
        torch.testing.assert_close(full[s], preds.reference(s, list(enumerate(ws))))


@settings(max_examples=25, deadline=None)
@given(
    per=st.lists(
        st.lists(st.one_of(st.just(0.0), st.floats(-4.0, -0.01)), min_size=0, max_size=4),
        min_size=1,
        max_size=3,
    ),
    seed=st.integers(0, 1000),
)
def test_one_sampling_is_unbiased_for_any_weights(per, seed) -> None:
    preds = Preds(per, seed=seed)
    full = preds.guided(make_cond(per))
    torch.testing.assert_close(enumerated_expectation(per, preds), full, rtol=1e-9, atol=1e-9)


def test_one_with_a_single_negative_is_all_exactly_and_zero_weights_are_never_drawn() -> None:
    per = [[-1.7], [0.0, -0.4, 0.0]]
    cond = make_cond(per)
    for u in torch.linspace(0, 1 - 1e-12, 101, dtype=torch.float64):
        one = sample_one_negative(cond, torch.stack([u, u]))
        assert one.negative_weight.tolist()[0] == -1.7  # w / 1, bit for bit
        assert one.negative.shape[0] == 2
        assert float(one.negative.flatten()[-1]) == 101.0  # sample 1 always takes k = 1
        assert one.negative_weight.tolist()[1] == -0.4


def test_apply_controls_draws_after_the_step_from_its_generator() -> None:
    per = [[-2.0, -0.5], [-1.0, -1.0, -1.0]]
    cond, t = make_cond(per), torch.tensor([300, 600])
    g = torch.Generator().manual_seed(11)
    state = g.get_state()
    # Defaults: the conditioning is unchanged and nothing is drawn.
    same = apply_controls(cond, t, 1000, PerpNegControls(), g)
    assert torch.equal(same.negative_weight, cond.negative_weight)
    assert torch.equal(g.get_state(), state)
    one = apply_controls(cond, t, 1000, PerpNegControls(sampling="one", weight_scale=0.5), g)
    u = torch.rand(2, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    expected = sample_one_negative(scale_negatives(cond, 0.5), u)
    assert torch.equal(one.negative, expected.negative)
    assert torch.equal(one.negative_weight, expected.negative_weight)
    assert one.branches == 2 * 2 + 2  # 3 rows per sample
    # Gating first: a sample outside the window keeps no negative, so its draw picks nothing.
    gated = apply_controls(cond, t, 1000, PerpNegControls(t_range=(0.5, 1.0), sampling="one"), g)
    assert gated.negative_index.tolist() == [1]


@settings(max_examples=25, deadline=None)
@given(
    per=st.lists(st.lists(st.floats(-4.0, -0.01), min_size=0, max_size=3), min_size=1, max_size=3),
    p=st.floats(0.05, 1.0),
    seed=st.integers(0, 1000),
)
def test_eval_prob_keeps_each_sample_with_p_and_is_unbiased(per, p, seed) -> None:
    """E over the keep draw of ε̂ is the ``all`` result (by hand), per sample: kept with
    probability p at weights w / p, else plain CFG on the positive."""
    preds = Preds(per, seed=seed)
    cond = make_cond(per)
    b = len(per)
    kept = keep_negatives(cond, p, torch.zeros(b, dtype=torch.float64))  # every u < p
    dropped = keep_negatives(cond, p, torch.ones(b, dtype=torch.float64))  # no u < p
    if p < 1.0:
        assert dropped.negative.shape[0] == 0
    for s, ws in enumerate(per):
        mine = (kept.negative_index == s).nonzero(as_tuple=True)[0]
        got = sorted(float(w) for w in kept.negative_weight[mine])
        assert got == pytest.approx(sorted(w / p for w in ws), rel=1e-12)
        full = preds.reference(s, list(enumerate(ws)))
        plain = preds.reference(s, [])
        hand = p * preds.reference(s, [(k, w / p) for k, w in enumerate(ws)]) + (1 - p) * (
            full if p == 1.0 else plain
        )
        expect = p * preds.guided(kept)[s] + (1 - p) * preds.guided(dropped)[s]
        torch.testing.assert_close(expect, full, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(hand, full, rtol=1e-9, atol=1e-9)


def test_eval_prob_mixes_samples_and_draws_after_one_from_the_generator() -> None:
    per = [[-2.0, -0.5], [-1.0, -1.0, -1.0], [-0.7]]
    cond, t = make_cond(per), torch.tensor([300, 600, 900])
    # Sample 0 draws u = 0.1 < 0.5 (kept), sample 1 u = 0.5 (not < p: dropped), sample 2 kept.
    half = keep_negatives(cond, 0.5, torch.tensor([0.1, 0.5, 0.49], dtype=torch.float64))
    assert half.negative_index.tolist() == [0, 0, 2]
    assert half.negative_weight.tolist() == [-4.0, -1.0, -1.4]
    assert keep_negatives(cond, 1.0, torch.ones(3, dtype=torch.float64)) is cond
    g = torch.Generator().manual_seed(5)
    got = apply_controls(cond, t, 1000, PerpNegControls(sampling="one", eval_prob=0.25), g)
    ref = torch.Generator().manual_seed(5)
    u_one = torch.rand(3, generator=ref, dtype=torch.float64)
    u_keep = torch.rand(3, generator=ref, dtype=torch.float64)
    expected = keep_negatives(sample_one_negative(cond, u_one), 0.25, u_keep)
    assert torch.equal(got.negative, expected.negative)
    assert torch.equal(got.negative_weight, expected.negative_weight)
    assert got.branches == 2 * 3 + int((u_keep < 0.25).sum())
    assert torch.equal(g.get_state(), ref.get_state())  # two draws per step, no more


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), "half", True, None])
def test_eval_prob_errors_name_the_key_and_value(bad) -> None:
    msg = raises_naming(lambda: check_eval_prob(bad), "perp_neg_eval_prob", repr(bad), "0 < p <= 1")
    assert "\n" not in msg
    raises_naming(lambda: PerpNegControls(eval_prob=bad), "perp_neg_eval_prob", repr(bad))


def test_step_window_counts_steps_as_diffusers_guiders() -> None:
    # int(0.2·10) = 2 <= i < int(0.5·10) = 5
    assert [i for i in range(10) if step_in_window(i, 10, 0.2, 0.5)] == [2, 3, 4]
    assert all(step_in_window(i, 7, 0.0, 1.0) for i in range(7))
    assert not any(step_in_window(i, 7, 0.0, 0.0) for i in range(7))
    assert [i for i in range(50) if step_in_window(i, 50, 0.5, 1.0)] == list(range(25, 50))
