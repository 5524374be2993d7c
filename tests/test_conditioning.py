"""Tests of the per-step conditioning (threestudio_perpneg.core.conditioning)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import raises_naming
from hypothesis import given, settings
from hypothesis import strategies as st

from threestudio_perpneg.core.conditioning import PromptBank, StepConditioning, step_conditioning
from threestudio_perpneg.core.guidance import perp_neg_guidance
from threestudio_perpneg.core.views import (
    BACK,
    FRONT,
    OVERHEAD,
    SIDE,
    AuthorsScheme,
    ThreestudioScheme,
    ViewThresholds,
    view_weights,
)

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


L, D = 5, 8
USER_W = (-1.5, -0.5)
AUTHORS = AuthorsScheme()
THREESTUDIO = ThreestudioScheme()


def make_bank(seed: int = 0, n_user: int = 2, dtype: torch.dtype = torch.float32) -> PromptBank:
    g = torch.Generator().manual_seed(seed)
    return PromptBank(
        prompt=torch.randn(L, D, generator=g).to(dtype),
        views=torch.randn(4, L, D, generator=g).to(dtype),
        uncond=torch.randn(4, L, D, generator=g).to(dtype),
        negatives=torch.randn(n_user, L, D, generator=g).to(dtype),
        negative_weights=torch.tensor(USER_W[:n_user], dtype=dtype),
    )


def _cams(*pairs: tuple) -> tuple:
    el = torch.tensor([p[0] for p in pairs], dtype=torch.float32)
    az = torch.tensor([p[1] for p in pairs], dtype=torch.float32)
    return el, az


def _row_of(table: torch.Tensor, emb: torch.Tensor) -> int:
    """Index of the row of ``table`` equal to ``emb`` (embeddings are random, so unique)."""
    hits = [i for i in range(table.shape[0]) if torch.equal(table[i], emb)]
    assert len(hits) == 1, hits
    return hits[0]


def _authors_w(az: float) -> tuple:
    """(w_front, w_side) of the authors' scheme, written out independently."""
    a = abs(((az + 180.0) % 360.0) - 180.0)
    if a < 90.0:
        r = 1.0 - a / 90.0
        return (
            0.0 if r > 0.8 else -2.0 * math.exp(-2.0 * r),
            0.0 if r < 0.2 else -2.0 * math.exp(-10.0 * (1.0 - r)),
        )
    r = 2.0 - a / 90.0
    return -2.0, 0.0 if r > 0.8 else -math.exp(-10.0 * r)


# --------------------------------------------------------------------------------------------
# threestudio's vanilla behaviour (perp_neg=False)
# --------------------------------------------------------------------------------------------


def test_vanilla_view_dependent_uses_bucketed_views() -> None:
    bank = make_bank()
    el, az = _cams((0, 0), (0, 90), (0, 180), (70, 30), (0, -30), (0, 135))
    sc = step_conditioning(bank, el, az, scheme=AUTHORS, perp_neg=False)
    assert isinstance(sc, StepConditioning)
    assert sc.perp_neg is False
    expected_view = [FRONT, SIDE, BACK, OVERHEAD, FRONT, SIDE]
    assert sc.view.tolist() == expected_view
    assert torch.equal(sc.positive, bank.views[expected_view])
    assert torch.equal(sc.uncond, bank.uncond[expected_view])
    assert sc.negative.shape == (0, L, D)
    assert sc.negative_index.shape == (0,) and sc.negative_weight.shape == (0,)
    assert sc.branches == 2 * 6


def test_vanilla_without_view_dependence_uses_plain_prompt() -> None:
    bank = make_bank()
    el, az = _cams((0, 0), (0, 90), (80, 180))
    for perp_neg in (False, True):
        sc = step_conditioning(
            bank, el, az, scheme=AUTHORS, view_dependent=False, perp_neg=perp_neg
        )
        assert sc.positive.shape == (3, L, D)
        for i in range(3):
            assert torch.equal(sc.positive[i], bank.prompt)
        # One unconditional embedding shared by all samples, taken from the bank.
        assert all(torch.equal(sc.uncond[i], sc.uncond[0]) for i in range(3))
        _row_of(bank.uncond, sc.uncond[0])
    sc = step_conditioning(bank, el, az, scheme=AUTHORS, view_dependent=False, perp_neg=False)
    assert sc.negative.shape[0] == 0
    # Perp-Neg without view prompts: only the user negatives, for every sample.
    sc = step_conditioning(bank, el, az, scheme=AUTHORS, view_dependent=False, perp_neg=True)
    assert sc.negative_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert sc.negative_weight.tolist() == list(USER_W) * 3
    for n in range(6):
        assert torch.equal(sc.negative[n], bank.negatives[n % 2])
    assert sc.branches == 2 * 3 + 6


def test_view_override() -> None:
    bank = make_bank()
    el, az = _cams((0, 0), (0, 0))
    view = torch.tensor([BACK, OVERHEAD])
    sc = step_conditioning(bank, el, az, scheme=AUTHORS, view=view, perp_neg=False)
    assert sc.view.tolist() == [BACK, OVERHEAD]
    assert torch.equal(sc.positive, bank.views[[BACK, OVERHEAD]])
    assert torch.equal(sc.uncond, bank.uncond[[BACK, OVERHEAD]])


# --------------------------------------------------------------------------------------------
# Perp-Neg conditioning
# --------------------------------------------------------------------------------------------


def test_positive_is_mix_of_views() -> None:
    bank = make_bank()
    el, az = _cams((0, 0), (0, 45), (0, 90), (0, 135), (0, 180), (0, -60), (75, 10), (0, 330))
    for scheme in (AUTHORS, THREESTUDIO):
        sc = step_conditioning(bank, el, az, scheme=scheme)
        mix = view_weights(el, az, scheme).positive_mix
        torch.testing.assert_close(sc.positive, torch.einsum("bv,vld->bld", mix, bank.views))
    # Independent anchors: pure views at 0/90/180, halves at 45/135, overhead prompt overhead.
    v = bank.views
    expected = [
        v[FRONT],
        0.5 * v[FRONT] + 0.5 * v[SIDE],
        v[SIDE],
        0.5 * v[SIDE] + 0.5 * v[BACK],
        v[BACK],
        (1 / 3) * v[FRONT] + (2 / 3) * v[SIDE],
        v[OVERHEAD],
        (2 / 3) * v[FRONT] + (1 / 3) * v[SIDE],
    ]
    torch.testing.assert_close(sc.positive, torch.stack(expected), rtol=1e-5, atol=1e-5)
    assert sc.view.tolist() == [FRONT, SIDE, SIDE, SIDE, BACK, SIDE, OVERHEAD, FRONT]
    assert torch.equal(sc.uncond, bank.uncond[sc.view])


def test_authors_front_has_one_view_negative_overhead_none() -> None:
    bank = make_bank(n_user=0)
    el, az = _cams((0, 0), (80, 0), (0, 180))
    sc = step_conditioning(bank, el, az, scheme=AUTHORS)
    assert sc.perp_neg is True
    # az 0: the front negative is cut off (r = 1 > 0.8), the side negative has weight -2.
    # overhead: none. az 180: front (-2) and side (-1).
    got = sorted(
        (int(i), _row_of(bank.views, e), float(w))
        for i, e, w in zip(sc.negative_index, sc.negative, sc.negative_weight)
    )
    assert got == sorted([(0, SIDE, -2.0), (2, FRONT, -2.0), (2, SIDE, -1.0)])
    assert sc.branches == 2 * 3 + 3
    assert sc.select(1).negative.shape == (0, L, D)


def test_user_negatives_for_every_sample_including_overhead() -> None:
    bank = make_bank(n_user=2)
    el, az = _cams((0, 0), (80, 0), (85, 120))
    sc = step_conditioning(bank, el, az, scheme=AUTHORS)
    # Sample 0: side view negative + 2 user negatives; overhead samples: the 2 user negatives.
    assert sc.negative_index.tolist() == [0, 0, 0, 1, 1, 2, 2]
    for i in (1, 2):
        one = sc.select(i)
        assert one.negative.shape[0] == 2
        assert torch.equal(one.negative, bank.negatives)
        assert torch.equal(one.negative_weight, bank.negative_weights)
    one = sc.select(0)
    assert torch.equal(one.negative[0], bank.views[SIDE])
    assert torch.equal(one.negative[1:], bank.negatives)
    assert sc.branches == 2 * 3 + 7


@pytest.mark.parametrize("scheme", [AUTHORS, THREESTUDIO], ids=["authors", "threestudio"])
def test_branch_count_is_2b_plus_nonzero(scheme) -> None:
    bank = make_bank(n_user=1)
    el = torch.tensor([0.0, 0.0, 0.0, 0.0, 70.0, 10.0, -20.0])
    az = torch.tensor([0.0, 10.0, 70.0, 100.0, 45.0, 170.0, -95.0])
    sc = step_conditioning(bank, el, az, scheme=scheme)
    w = view_weights(el, az, scheme).negative_weights
    nonzero = int((w != 0).sum()) + el.shape[0] * 1  # one user negative per sample
    assert sc.negative.shape[0] == nonzero
    assert sc.branches == 2 * 7 + nonzero
    assert torch.all(sc.negative_weight != 0)


@settings(deadline=None, max_examples=25)
@given(
    cams=st.lists(
        st.tuples(st.floats(-30.0, 89.0), st.floats(-360.0, 360.0)), min_size=1, max_size=6
    ),
    n_user=st.integers(0, 2),
    authors=st.booleans(),
    min_weight=st.sampled_from([0.0, 0.05, 0.5, 1.5]),
)
def test_pairing_matches_per_sample_loop(
    cams: list, n_user: int, authors: bool, min_weight: float
) -> None:
    scheme = AUTHORS if authors else THREESTUDIO
    bank = make_bank(seed=1, n_user=n_user)
    el = torch.tensor([c[0] for c in cams])
    az = torch.tensor([c[1] for c in cams])
    sc = step_conditioning(bank, el, az, scheme=scheme, min_weight=min_weight)
    assert sc.negative.shape[0] == sc.negative_index.shape[0] == sc.negative_weight.shape[0]
    assert torch.all(sc.negative_weight.abs() > min_weight)
    table = torch.cat([bank.views, bank.negatives])
    total = 0
    for i in range(len(cams)):
        single = step_conditioning(
            bank, el[i : i + 1], az[i : i + 1], scheme=scheme, min_weight=min_weight
        )
        picked = sc.select(i)
        # Batched and single einsum may sum in a different order: equal up to float32 rounding.
        torch.testing.assert_close(picked.positive, single.positive, rtol=1e-6, atol=1e-6)
        assert torch.equal(picked.uncond, single.uncond)
        assert torch.equal(picked.view, single.view)
        assert torch.equal(picked.negative, single.negative)
        torch.testing.assert_close(
            picked.negative_weight, single.negative_weight, rtol=1e-6, atol=1e-7
        )
        assert picked.negative_index.tolist() == [0] * picked.negative.shape[0]
        assert torch.equal(single.negative_index, picked.negative_index)
        # Each negative is a view or user embedding with the weight it has for THIS sample.
        vw = view_weights(el[i : i + 1], az[i : i + 1], scheme).negative_weights[0]
        expected_w = torch.cat([vw, bank.negative_weights])
        expected_rows = [j for j in range(table.shape[0]) if abs(float(expected_w[j])) > min_weight]
        rows = [_row_of(table, e) for e in picked.negative]
        assert rows == expected_rows
        torch.testing.assert_close(picked.negative_weight, expected_w[expected_rows])
        total += len(rows)
    assert sc.branches == 2 * len(cams) + total


def test_pairing_mixed_batch_authors_reference() -> None:
    """Mixed azimuths against weights derived here from the authors' formulas."""
    bank = make_bank(n_user=1)
    azs = [180.0, 0.0, 30.0, -100.0, 60.0, 150.0]
    el = torch.zeros(len(azs))
    sc = step_conditioning(bank, el, torch.tensor(azs), scheme=AUTHORS)
    index = sc.negative_index.tolist()
    for i, az in enumerate(azs):
        w_front, w_side = _authors_w(az)
        expected = [(FRONT, w_front), (SIDE, w_side)]
        expected = sorted((v, w) for v, w in expected if w != 0.0)
        mine = [n for n in range(len(index)) if index[n] == i]
        got_views = sorted(
            (_row_of(bank.views, sc.negative[n]), float(sc.negative_weight[n]))
            for n in mine[: len(expected)]
        )
        assert [v for v, _ in got_views] == [v for v, _ in expected], (az, got_views, expected)
        for (_, gw), (_, ew) in zip(got_views, expected):
            assert math.isclose(gw, ew, rel_tol=1e-5, abs_tol=1e-6), (az, gw, ew)
        # The user negative comes last for every sample.
        assert len(mine) == len(expected) + 1
        assert torch.equal(sc.negative[mine[-1]], bank.negatives[0])
        assert float(sc.negative_weight[mine[-1]]) == USER_W[0]


def test_min_weight_prunes_inclusive() -> None:
    bank = make_bank(n_user=2)  # user weights -1.5, -0.5
    el, az = _cams((0, 0), (0, 180), (0, 45))
    full = step_conditioning(bank, el, az, scheme=AUTHORS)
    pruned = step_conditioning(bank, el, az, scheme=AUTHORS, min_weight=0.5)
    # |w| <= 0.5 is dropped: the -0.5 user negative everywhere, the -0.0135 side negative at 45°.
    keep = full.negative_weight.abs() > 0.5
    assert torch.equal(pruned.negative_index, full.negative_index[keep])
    assert torch.equal(pruned.negative_weight, full.negative_weight[keep])
    assert torch.equal(pruned.negative, full.negative[keep])
    assert -0.5 not in pruned.negative_weight.tolist()
    assert pruned.negative.shape[0] < full.negative.shape[0]
    # A threshold above every weight leaves plain guidance on the mixed positive.
    none = step_conditioning(bank, el, az, scheme=AUTHORS, min_weight=10.0)
    assert none.negative.shape[0] == 0 and none.branches == 6
    assert torch.equal(none.positive, full.positive)


def test_select_reindexes_rows() -> None:
    bank = make_bank(n_user=1)
    el, az = _cams((0, 180), (0, 90), (70, 0))
    sc = step_conditioning(bank, el, az, scheme=AUTHORS)
    for i in range(3):
        one = sc.select(i)
        mask = sc.negative_index == i
        assert one.positive.shape == (1, L, D) and one.uncond.shape == (1, L, D)
        assert torch.equal(one.positive[0], sc.positive[i])
        assert torch.equal(one.uncond[0], sc.uncond[i])
        assert one.view.tolist() == [sc.view[i].item()]
        assert torch.equal(one.negative, sc.negative[mask])
        assert torch.equal(one.negative_weight, sc.negative_weight[mask])
        assert one.negative_index.tolist() == [0] * int(mask.sum())
        assert one.negative_index.dtype == torch.long
        assert one.perp_neg is True
        assert one.branches == 2 + int(mask.sum())


def test_conditioning_drives_batched_guidance_like_per_sample() -> None:
    """End to end with a toy linear 'UNet': one batched ragged call == per-sample calls."""
    bank = make_bank(n_user=1, seed=3)
    g = torch.Generator().manual_seed(5)
    proj = torch.randn(L * D, 2 * 3 * 3, generator=g)
    el, az = _cams((0, 10), (0, 100), (75, 0), (0, -170))
    latents = torch.randn(4, 2, 3, 3, generator=g)

    def unet(x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return x * 0.5 + (emb.flatten(1) @ proj).reshape(x.shape)

    def guide(sc: StepConditioning, x: torch.Tensor) -> torch.Tensor:
        eps_u = unet(x, sc.uncond)
        eps_p = unet(x, sc.positive)
        eps_n = unet(x[sc.negative_index], sc.negative)
        return perp_neg_guidance(
            eps_u, eps_p, eps_n, sc.negative_weight, 7.5, neg_index=sc.negative_index
        )

    sc = step_conditioning(bank, el, az, scheme=THREESTUDIO)
    batched = guide(sc, latents)
    for i in range(4):
        single = guide(sc.select(i), latents[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], single, rtol=1e-5, atol=1e-5)


def test_prompt_bank_to_and_dtype() -> None:
    bank = make_bank(dtype=torch.float64)
    moved = bank.to("cpu")
    assert torch.equal(moved.views, bank.views) and torch.equal(moved.negatives, bank.negatives)
    el, az = _cams((0, 30), (0, 120))
    sc = step_conditioning(moved, el, az, scheme=AUTHORS)
    assert sc.positive.dtype == torch.float64 and sc.negative.dtype == torch.float64
    assert sc.negative_weight.dtype == torch.float64


def test_thresholds_are_used() -> None:
    bank = make_bank(n_user=0)
    el, az = _cams((40, 0))
    default = step_conditioning(bank, el, az, scheme=AUTHORS)
    low = step_conditioning(bank, el, az, scheme=AUTHORS, thresholds=ViewThresholds(overhead=30))
    assert default.view.tolist() == [FRONT] and low.view.tolist() == [OVERHEAD]
    assert low.negative.shape[0] == 0
    assert torch.equal(low.positive[0], bank.views[OVERHEAD])


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_prompt_bank_bad_shapes() -> None:
    ok = make_bank()
    fields = dict(
        prompt=ok.prompt,
        views=ok.views,
        uncond=ok.uncond,
        negatives=ok.negatives,
        negative_weights=ok.negative_weights,
    )

    def bank(**override):
        return lambda: PromptBank(**{**fields, **override})

    raises_naming(bank(prompt=torch.zeros(1, L, D)), "prompt", f"(1, {L}, {D})")
    raises_naming(bank(views=torch.zeros(3, L, D)), "views", f"(3, {L}, {D})")
    raises_naming(bank(views=torch.zeros(4, L, D + 1)), "views", f"(4, {L}, {D + 1})")
    raises_naming(bank(uncond=torch.zeros(4, L + 1, D)), "uncond", f"(4, {L + 1}, {D})")
    raises_naming(bank(negatives=torch.zeros(2, L, D - 1)), "negatives", f"(2, {L}, {D - 1})")
    raises_naming(bank(negative_weights=torch.zeros(3)), "negative_weights", "(3,)")
    raises_naming(bank(negative_weights=torch.zeros(2, 1)), "negative_weights", "(2, 1)")
    # No user negatives is fine.
    PromptBank(**{**fields, "negatives": torch.zeros(0, L, D), "negative_weights": torch.zeros(0)})


def test_step_conditioning_bad_arguments() -> None:
    bank = make_bank()
    el, az = _cams((0, 0), (0, 90))
    raises_naming(
        lambda: step_conditioning(bank, el, az, scheme=AUTHORS, min_weight=-0.1),
        "min_weight",
        "-0.1",
    )
    raises_naming(
        lambda: step_conditioning(bank, el, az, scheme=AUTHORS, min_weight=float("nan")),
        "min_weight",
        "nan",
    )
    raises_naming(
        lambda: step_conditioning(bank, el, az[:1], scheme=AUTHORS),
        "elevation",
        "azimuth",
        "(2,)",
        "(1,)",
    )
    raises_naming(
        lambda: step_conditioning(bank, el[:, None], az[:, None], scheme=AUTHORS),
        "elevation",
        "(2, 1)",
    )
