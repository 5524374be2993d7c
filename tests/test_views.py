"""Tests of view bucketing and the two published Perp-Neg view weight schemes.

Reference weights are re-derived here from the published formulas with ``math.exp``, one azimuth at
a time; they never call the functions under test.
"""

from __future__ import annotations

import math
from typing import Tuple

import pytest
import torch
from helpers import raises_naming
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from threestudio_perpneg.core.views import (
    BACK,
    FRONT,
    OVERHEAD,
    SIDE,
    VIEW_NAMES,
    AuthorsScheme,
    ThreestudioScheme,
    ViewThresholds,
    classify_views,
    make_scheme,
    scheme_from_config,
    view_weights,
    wrap_azimuth,
)

SETTINGS = settings(deadline=None, max_examples=40)

azimuths = st.floats(min_value=-720.0, max_value=720.0, allow_nan=False, allow_infinity=False)

# --------------------------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------------------------

TS_DEFAULTS = {
    "f_fs": (4.0, 0.5, -2.426),
    "f_sf": (4.0, 0.5, -2.426),
    "f_sb": (1.0, 0.5, -0.606),
    "f_fsb": (1.0, 0.5, 0.967),
}


def _abs_wrapped(az: float) -> float:
    """|azimuth| after wrapping to (-180, 180], in plain Python."""
    a = math.fmod(az, 360.0)
    if a > 180.0:
        a -= 360.0
    if a <= -180.0:
        a += 360.0
    return abs(a)


def _r_and_half(az: float) -> Tuple[float, bool]:
    a = _abs_wrapped(az)
    if a < 90.0:
        return 1.0 - a / 90.0, False
    return 2.0 - a / 90.0, True


def ref_threestudio(az: float, f: dict = TS_DEFAULTS) -> Tuple[float, float]:
    """(w_front, w_side) of threestudio's perp-neg prompt processor."""

    def shifted_exp(triple: Tuple[float, float, float], r: float) -> float:
        a, b, c = triple
        return a * math.exp(-b * r) + c

    r, back = _r_and_half(az)
    if not back:
        return -shifted_exp(f["f_fs"], r), -shifted_exp(f["f_sf"], 1.0 - r)
    return -shifted_exp(f["f_fsb"], r), -shifted_exp(f["f_sb"], r)


def ref_authors(
    az: float, nw: float = -2.0, front_decay: float = 2.0, side_decay: float = 10.0
) -> Tuple[float, float]:
    """(w_front, w_side) of stable-dreamfusion's ``get_pos_neg_text_embeddings``."""
    r, back = _r_and_half(az)
    if not back:
        w_front = 0.0 if r > 0.8 else nw * math.exp(-r * front_decay)
        w_side = 0.0 if r < 0.2 else nw * math.exp(-(1.0 - r) * side_decay)
        return w_front, w_side
    w_side = 0.0 if r > 0.8 else nw * math.exp(-r * side_decay) / 2.0
    return nw, w_side


def ref_mix(az: float) -> list:
    """Positive mix over (side, front, back, overhead)."""
    r, back = _r_and_half(az)
    if not back:
        return [1.0 - r, r, 0.0, 0.0]
    return [r, 0.0, 1.0 - r, 0.0]


def _near_cutoff(az: float) -> bool:
    r, _ = _r_and_half(az)
    return min(abs(r - 0.2), abs(r - 0.8)) < 1e-4


def _vw(az, el=None, scheme=None, dtype=torch.float64, **kw):
    az_t = torch.as_tensor(az, dtype=dtype).reshape(-1)
    el_t = torch.zeros_like(az_t) if el is None else torch.as_tensor(el, dtype=dtype).reshape(-1)
    return view_weights(el_t, az_t, scheme or ThreestudioScheme(), **kw)


# --------------------------------------------------------------------------------------------
# wrap_azimuth / classify_views
# --------------------------------------------------------------------------------------------


def test_wrap_azimuth_fixed_points() -> None:
    az = torch.tensor([180.0, -180.0, 540.0, -540.0, 0.0, 360.0, -360.0, 90.0, -90.0, 270.0, 181.0])
    expected = torch.tensor([180.0, 180.0, 180.0, 180.0, 0.0, 0.0, 0.0, 90.0, -90.0, -90.0, -179.0])
    torch.testing.assert_close(wrap_azimuth(az), expected)
    torch.testing.assert_close(wrap_azimuth(az.double()), expected.double())


@SETTINGS
@given(az=azimuths, dtype=st.sampled_from([torch.float32, torch.float64]))
def test_wrap_azimuth_range_and_congruence(az: float, dtype: torch.dtype) -> None:
    x = torch.tensor([az], dtype=dtype)
    out = wrap_azimuth(x)
    assert out.dtype == dtype
    w = float(out)
    assert -180.0 < w <= 180.0, (az, w)
    diff = (float(x) - w) / 360.0
    assert abs(diff - round(diff)) < 1e-5, (az, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wrap_azimuth_just_past_half_turn_stays_in_range(dtype: torch.dtype) -> None:
    # The next representable values above 180 (and below -180) must wrap to just above -180, or
    # round to 180: never to -180, which lies outside (-180, 180].
    x = torch.tensor([180.0, -180.0], dtype=dtype)
    beyond = torch.nextafter(x, torch.tensor([1e4, -1e4], dtype=dtype))
    out = wrap_azimuth(beyond)
    assert torch.all(out > -180.0) and torch.all(out <= 180.0), (
        f"wrap_azimuth({beyond.tolist()}) = {out.tolist()} leaves (-180, 180]"
    )


def test_classify_views_boundaries_default_thresholds() -> None:
    t = ViewThresholds()
    cases = [
        # (elevation, azimuth, expected view)
        (0.0, 0.0, FRONT),
        (0.0, 44.999, FRONT),
        (0.0, -44.999, FRONT),
        (0.0, 45.0, SIDE),  # strict: |az| < front
        (0.0, -45.0, SIDE),
        (0.0, 90.0, SIDE),
        (0.0, 135.0, SIDE),  # strict: |az| > 180 - back
        (0.0, -135.0, SIDE),
        (0.0, 135.001, BACK),
        (0.0, 180.0, BACK),
        (0.0, -180.0, BACK),
        (0.0, 540.0, BACK),
        (0.0, 360.0, FRONT),
        (0.0, 315.5, FRONT),  # wraps to -44.5
        (60.0, 0.0, FRONT),  # strict: elevation > overhead
        (60.001, 0.0, OVERHEAD),  # overhead wins over front...
        (89.0, 180.0, OVERHEAD),  # ...and over back
        (75.0, 90.0, OVERHEAD),
        (-80.0, 0.0, FRONT),
    ]
    el = torch.tensor([c[0] for c in cases], dtype=torch.float64)
    az = torch.tensor([c[1] for c in cases], dtype=torch.float64)
    out = classify_views(el, az, t)
    assert out.dtype == torch.long
    assert out.tolist() == [c[2] for c in cases]


def test_classify_views_custom_thresholds() -> None:
    t = ViewThresholds(front=30.0, back=60.0, overhead=30.0)
    el = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 30.0, 30.5, -10.0])
    az = torch.tensor([29.0, 30.0, 120.0, 121.0, -150.0, 0.0, 100.0, -119.0])
    assert classify_views(el, az, t).tolist() == [
        FRONT,
        SIDE,
        SIDE,
        BACK,
        BACK,
        FRONT,
        OVERHEAD,
        SIDE,
    ]
    # front + back = 180: no side bucket left except the shared boundary.
    t = ViewThresholds(front=90.0, back=90.0, overhead=90.0)
    el = torch.zeros(4)
    assert classify_views(el, torch.tensor([89.0, 90.0, 91.0, -91.0]), t).tolist() == [
        FRONT,
        SIDE,
        BACK,
        BACK,
    ]
    # front = 0: never a front view.
    t = ViewThresholds(front=0.0)
    assert classify_views(torch.zeros(2), torch.tensor([0.0, -0.0]), t).tolist() == [SIDE, SIDE]


@SETTINGS
@given(
    el=st.floats(-90.0, 90.0),
    az=azimuths,
    front=st.floats(0.0, 90.0),
    back=st.floats(0.0, 90.0),
    overhead=st.floats(-90.0, 90.0),
)
def test_classify_views_matches_scalar_rule(
    el: float, az: float, front: float, back: float, overhead: float
) -> None:
    a = _abs_wrapped(az)
    assume(min(abs(a - front), abs(a - (180.0 - back)), abs(el - overhead)) > 1e-3)
    if el > overhead:
        expected = OVERHEAD
    elif a > 180.0 - back:
        expected = BACK
    elif a < front:
        expected = FRONT
    else:
        expected = SIDE
    t = ViewThresholds(front=front, back=back, overhead=overhead)
    out = classify_views(torch.tensor([el], dtype=torch.float64), torch.tensor([az]).double(), t)
    assert out.tolist() == [expected]


def test_view_names_order() -> None:
    assert VIEW_NAMES == ("side", "front", "back", "overhead")
    assert (SIDE, FRONT, BACK, OVERHEAD) == (0, 1, 2, 3)


# --------------------------------------------------------------------------------------------
# Weight tables
# --------------------------------------------------------------------------------------------

ANCHORS_THREESTUDIO = [
    # azimuth, (w_front, w_side)
    (0.0, (0.0, -1.574)),
    (45.0, (-0.689, -0.689)),
    (90.0, (-1.574, 0.0)),
    (180.0, (-1.967, -0.394)),
]
ANCHORS_AUTHORS = [
    (0.0, (0.0, -2.0)),
    (45.0, (-2.0 * math.exp(-1.0), -2.0 * math.exp(-5.0))),  # ≈ (-0.736, -0.0135)
    (90.0, (-2.0, 0.0)),
    (180.0, (-2.0, -1.0)),
]


@pytest.mark.parametrize(
    "scheme, anchors",
    [(ThreestudioScheme(), ANCHORS_THREESTUDIO), (AuthorsScheme(), ANCHORS_AUTHORS)],
    ids=["threestudio", "authors"],
)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_anchor_weights(scheme, anchors, sign: float) -> None:
    az = [sign * a for a, _ in anchors]
    vw = _vw(az, scheme=scheme)
    expected_front = torch.tensor([w[0] for _, w in anchors], dtype=torch.float64)
    expected_side = torch.tensor([w[1] for _, w in anchors], dtype=torch.float64)
    torch.testing.assert_close(vw.negative_weights[:, FRONT], expected_front, rtol=0, atol=1e-3)
    torch.testing.assert_close(vw.negative_weights[:, SIDE], expected_side, rtol=0, atol=1e-3)
    # Only the front and side views are ever negatives.
    assert torch.all(vw.negative_weights[:, BACK] == 0)
    assert torch.all(vw.negative_weights[:, OVERHEAD] == 0)


def test_authors_anchors_exact_zeros() -> None:
    vw = _vw([0.0, 90.0, -90.0], scheme=AuthorsScheme())
    assert vw.negative_weights[0, FRONT] == 0.0  # r = 1 > 0.8: front negative off
    assert vw.negative_weights[1, SIDE] == 0.0 and vw.negative_weights[2, SIDE] == 0.0
    assert torch.all(vw.negative_weights[1:, FRONT] == -2.0)


@SETTINGS
@given(az=azimuths, dtype=st.sampled_from([torch.float32, torch.float64]))
def test_threestudio_weights_match_formula(az: float, dtype: torch.dtype) -> None:
    vw = _vw([az], scheme=ThreestudioScheme(), dtype=dtype)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    w_front, w_side = ref_threestudio(float(torch.tensor(az, dtype=dtype)))
    got = vw.negative_weights[0].double()
    assert math.isclose(float(got[FRONT]), w_front, abs_tol=tol), (az, got, w_front)
    assert math.isclose(float(got[SIDE]), w_side, abs_tol=tol), (az, got, w_side)


@SETTINGS
@given(
    az=azimuths,
    triples=st.lists(
        st.tuples(st.floats(-5.0, 5.0), st.floats(0.0, 3.0), st.floats(-5.0, 5.0)),
        min_size=4,
        max_size=4,
    ),
)
def test_threestudio_custom_triples_match_formula(az: float, triples: list) -> None:
    f = dict(zip(("f_fs", "f_sf", "f_sb", "f_fsb"), triples))
    scheme = make_scheme("threestudio", **f)
    vw = _vw([az], scheme=scheme)
    w_front, w_side = ref_threestudio(az, f)
    assert math.isclose(float(vw.negative_weights[0, FRONT]), w_front, abs_tol=1e-9)
    assert math.isclose(float(vw.negative_weights[0, SIDE]), w_side, abs_tol=1e-9)


@SETTINGS
@given(az=azimuths, dtype=st.sampled_from([torch.float32, torch.float64]))
def test_authors_weights_match_formula(az: float, dtype: torch.dtype) -> None:
    az = float(torch.tensor(az, dtype=dtype))
    assume(not _near_cutoff(az))
    vw = _vw([az], scheme=AuthorsScheme(), dtype=dtype)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    w_front, w_side = ref_authors(az)
    got = vw.negative_weights[0].double()
    assert math.isclose(float(got[FRONT]), w_front, abs_tol=tol), (az, got, w_front)
    assert math.isclose(float(got[SIDE]), w_side, abs_tol=tol), (az, got, w_side)


@SETTINGS
@given(
    az=azimuths,
    nw=st.floats(-5.0, 0.0),
    front_decay=st.floats(0.0, 20.0),
    side_decay=st.floats(0.0, 20.0),
)
def test_authors_custom_parameters_match_formula(
    az: float, nw: float, front_decay: float, side_decay: float
) -> None:
    assume(not _near_cutoff(az))
    scheme = make_scheme(
        "authors", negative_w=nw, front_decay_factor=front_decay, side_decay_factor=side_decay
    )
    vw = _vw([az], scheme=scheme)
    w_front, w_side = ref_authors(az, nw, front_decay, side_decay)
    assert math.isclose(float(vw.negative_weights[0, FRONT]), w_front, abs_tol=1e-9)
    assert math.isclose(float(vw.negative_weights[0, SIDE]), w_side, abs_tol=1e-9)


def test_weight_table_vectors() -> None:
    """Full tables over a grid of azimuths against the per-azimuth references."""
    grid = [float(a) for a in range(-180, 181, 5)] + [-172.5, -97.5, 12.5, 100.0, 359.0, -361.0]
    grid = [a for a in grid if not _near_cutoff(a)]
    for scheme, ref in ((ThreestudioScheme(), ref_threestudio), (AuthorsScheme(), ref_authors)):
        vw = _vw(grid, scheme=scheme)
        expected = torch.tensor([ref(a) for a in grid], dtype=torch.float64)
        torch.testing.assert_close(vw.negative_weights[:, FRONT], expected[:, 0], rtol=0, atol=1e-9)
        torch.testing.assert_close(vw.negative_weights[:, SIDE], expected[:, 1], rtol=0, atol=1e-9)


@SETTINGS
@given(az=azimuths)
def test_positive_mix(az: float) -> None:
    vw = _vw([az, -az], scheme=AuthorsScheme())
    mix = vw.positive_mix
    torch.testing.assert_close(mix.sum(1), torch.ones(2, dtype=torch.float64))
    assert torch.all(mix >= 0) and torch.all(mix <= 1)
    expected = torch.tensor([ref_mix(az), ref_mix(-az)], dtype=torch.float64)
    torch.testing.assert_close(mix, expected, rtol=0, atol=1e-9)
    # Symmetric in ±azimuth, weights included.
    torch.testing.assert_close(mix[0], mix[1])
    torch.testing.assert_close(vw.negative_weights[0], vw.negative_weights[1])
    torch.testing.assert_close(vw.r[0], vw.r[1])
    r, _ = _r_and_half(az)
    assert math.isclose(float(vw.r[0]), r, abs_tol=1e-9)


def test_positive_mix_anchors() -> None:
    vw = _vw([0.0, 45.0, 90.0, 135.0, 180.0, -90.0])
    expected = torch.tensor(
        [
            # side, front, back, overhead
            [0.0, 1.0, 0.0, 0.0],
            [0.5, 0.5, 0.0, 0.0],
            [1.0, 0.0, 0.0, 0.0],
            [0.5, 0.0, 0.5, 0.0],
            [0.0, 0.0, 1.0, 0.0],
            [1.0, 0.0, 0.0, 0.0],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(vw.positive_mix, expected)
    torch.testing.assert_close(vw.r, torch.tensor([1.0, 0.5, 1.0, 0.5, 0.0, 1.0]).double())


@pytest.mark.parametrize("scheme", [ThreestudioScheme(), AuthorsScheme()], ids=["ts", "authors"])
def test_overhead_is_one_hot_without_negatives(scheme) -> None:
    az = [0.0, 45.0, 90.0, 180.0, -120.0]
    vw = _vw(az, el=[61.0, 70.0, 80.0, 89.0, 60.5], scheme=scheme)
    assert vw.view.tolist() == [OVERHEAD] * 5
    expected = torch.zeros(5, 4, dtype=torch.float64)
    expected[:, OVERHEAD] = 1.0
    assert torch.equal(vw.positive_mix, expected)
    assert torch.equal(vw.negative_weights, torch.zeros(5, 4, dtype=torch.float64))
    # At the threshold itself the camera is not overhead.
    vw = _vw([0.0], el=[60.0], scheme=scheme)
    assert vw.view.tolist() == [FRONT] and vw.positive_mix[0, OVERHEAD] == 0
    # Custom threshold.
    vw = _vw([0.0, 0.0], el=[20.0, 40.0], scheme=scheme, thresholds=ViewThresholds(overhead=30.0))
    assert vw.view.tolist() == [FRONT, OVERHEAD]


def test_view_override() -> None:
    az = torch.tensor([0.0, 180.0, 90.0], dtype=torch.float64)
    el = torch.tensor([80.0, 0.0, 0.0], dtype=torch.float64)
    view = torch.tensor([FRONT, OVERHEAD, SIDE])
    vw = view_weights(el, az, AuthorsScheme(), view=view)
    assert vw.view.tolist() == view.tolist()
    # The override decides overhead, not the elevation.
    torch.testing.assert_close(vw.positive_mix[0], torch.tensor([0.0, 1.0, 0.0, 0.0]).double())
    torch.testing.assert_close(vw.positive_mix[1], torch.tensor([0.0, 0.0, 0.0, 1.0]).double())
    assert torch.all(vw.negative_weights[1] == 0)
    assert vw.negative_weights[0, SIDE] == -2.0


@pytest.mark.parametrize("scheme", [ThreestudioScheme(), AuthorsScheme()], ids=["ts", "authors"])
def test_weights_continuous_across_side(scheme) -> None:
    d = 1e-6
    az = torch.tensor([90.0 - d, 90.0, 90.0 + d, -90.0 + d, -90.0, -90.0 - d], dtype=torch.float64)
    vw = view_weights(torch.zeros_like(az), az, scheme)
    w = vw.negative_weights
    # threestudio's fitted constants make the two halves agree to ~1e-3 at the side view.
    tol = 2e-3 if isinstance(scheme, ThreestudioScheme) else 1e-5
    for row in range(1, 6):
        torch.testing.assert_close(w[row], w[0], rtol=0, atol=tol)
    torch.testing.assert_close(vw.positive_mix[0], vw.positive_mix[2], rtol=0, atol=1e-6)
    torch.testing.assert_close(vw.positive_mix[1], torch.tensor([1.0, 0, 0, 0]).double())
    # Also continuous at the front (0) and back (180) for the mix.
    e = torch.tensor([-1e-6, 1e-6, 180 - 1e-6, -180 + 1e-6], dtype=torch.float64)
    vw = view_weights(torch.zeros_like(e), e, scheme)
    torch.testing.assert_close(vw.positive_mix[0], vw.positive_mix[1])
    torch.testing.assert_close(vw.positive_mix[2], vw.positive_mix[3])
    torch.testing.assert_close(vw.negative_weights[2], vw.negative_weights[3])


@settings(deadline=None, max_examples=15)
@given(
    values=st.lists(st.tuples(st.floats(-90.0, 90.0), azimuths), min_size=1, max_size=8),
    authors=st.booleans(),
)
def test_vectorised_equals_scalar_loop(values: list, authors: bool) -> None:
    scheme = AuthorsScheme() if authors else ThreestudioScheme()
    el = torch.tensor([v[0] for v in values], dtype=torch.float32)
    az = torch.tensor([v[1] for v in values], dtype=torch.float32)
    batch = view_weights(el, az, scheme)
    assert batch.positive_mix.shape == (len(values), 4)
    assert batch.negative_weights.shape == (len(values), 4)
    for i in range(len(values)):
        one = view_weights(el[i : i + 1], az[i : i + 1], scheme)
        assert torch.equal(one.view, batch.view[i : i + 1])
        torch.testing.assert_close(one.r, batch.r[i : i + 1], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(
            one.positive_mix, batch.positive_mix[i : i + 1], rtol=1e-6, atol=1e-7
        )
        torch.testing.assert_close(
            one.negative_weights, batch.negative_weights[i : i + 1], rtol=1e-6, atol=1e-7
        )


def test_dtypes() -> None:
    az = torch.tensor([10.0, 100.0])
    assert _vw(az, dtype=torch.float32).negative_weights.dtype == torch.float32
    assert _vw(az, dtype=torch.float64).negative_weights.dtype == torch.float64
    half = _vw(az, dtype=torch.float16)
    assert half.negative_weights.dtype in (torch.float32, torch.float16)
    torch.testing.assert_close(
        half.negative_weights.double(), _vw(az).negative_weights, rtol=0, atol=1e-2
    )


def test_make_scheme_defaults_and_scheme_from_config() -> None:
    ts = make_scheme("threestudio")
    assert isinstance(ts, ThreestudioScheme)
    assert (ts.f_fs, ts.f_sf, ts.f_sb, ts.f_fsb) == tuple(TS_DEFAULTS.values())
    au = make_scheme("authors")
    assert isinstance(au, AuthorsScheme)
    assert (au.negative_w, au.front_decay_factor, au.side_decay_factor) == (-2.0, 2.0, 10.0)
    # Lists (as OmegaConf gives them) become tuples.
    s = scheme_from_config("threestudio", {"f_fs": [1, 2, 3]}, {"negative_w": 5.0})
    assert isinstance(s, ThreestudioScheme) and s.f_fs == (1.0, 2.0, 3.0)
    # Only the chosen family is validated.
    s = scheme_from_config("authors", {"f_fs": [1, 2]}, {"negative_w": -1.0})
    assert isinstance(s, AuthorsScheme) and s.negative_w == -1.0


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_unknown_scheme_name() -> None:
    raises_naming(lambda: make_scheme("author"), "perp_neg_scheme", "'author'", "threestudio")
    raises_naming(lambda: scheme_from_config("perpneg", {}, {}), "perp_neg_scheme", "'perpneg'")


def test_bad_triples() -> None:
    raises_naming(
        lambda: make_scheme("threestudio", f_fs=(4.0, 0.5)), "perp_neg_f_fs", "(4.0, 0.5)"
    )
    raises_naming(
        lambda: make_scheme("threestudio", f_sb=(1, 2, 3, 4)), "perp_neg_f_sb", "(1, 2, 3, 4)"
    )
    raises_naming(lambda: make_scheme("threestudio", f_sf=("a", 0.5, 1.0)), "perp_neg_f_sf", "'a'")
    raises_naming(
        lambda: make_scheme("threestudio", f_fsb=(1.0, None, 1.0)), "perp_neg_f_fsb", "None"
    )
    raises_naming(lambda: ThreestudioScheme(f_fs=(1.0, float("nan"), 0.0)), "perp_neg_f_fs", "nan")
    raises_naming(lambda: ThreestudioScheme(f_fs=(True, 0.5, 0.0)), "perp_neg_f_fs", "True")
    raises_naming(lambda: ThreestudioScheme(f_fs=5), "perp_neg_f_fs", "5")
    raises_naming(
        lambda: scheme_from_config("threestudio", {"f_fs": [4.0, 0.5]}, {}),
        "perp_neg_f_fs",
        "[4.0, 0.5]",
    )
    raises_naming(
        lambda: scheme_from_config("threestudio", {"f_sb": ["x", 1, 2]}, {}),
        "perp_neg_f_sb",
        "'x'",
    )


def test_scheme_from_config_non_sequence_triple() -> None:
    # A scalar where a triple is expected (e.g. `perp_neg_f_fs: 4.0` in a YAML config) must be a
    # ValueError naming the key, as it is for ThreestudioScheme(f_fs=4.0), not a TypeError.
    try:
        scheme_from_config("threestudio", {"f_fs": 4.0}, {})
    except ValueError as e:
        assert "perp_neg_f_fs" in str(e) and "4.0" in str(e), str(e)
    except TypeError as e:
        pytest.fail(f"scheme_from_config raised TypeError instead of ValueError: {e}")
    else:
        pytest.fail("scheme_from_config accepted a scalar triple")


def test_bad_thresholds() -> None:
    raises_naming(lambda: ViewThresholds(front=-1.0), "front_threshold", "-1.0")
    raises_naming(lambda: ViewThresholds(back=181.0), "back_threshold", "181.0")
    raises_naming(lambda: ViewThresholds(overhead=95.0), "overhead_threshold", "95.0")
    raises_naming(lambda: ViewThresholds(overhead=-91.0), "overhead_threshold", "-91.0")
    raises_naming(lambda: ViewThresholds(front=float("nan")), "front_threshold", "nan")
    raises_naming(lambda: ViewThresholds(front="45"), "front_threshold", "'45'")
    raises_naming(
        lambda: ViewThresholds(front=100.0, back=90.0),
        "front_threshold",
        "back_threshold",
        "100.0",
        "90.0",
    )
    ViewThresholds(front=90.0, back=90.0, overhead=-90.0)  # limits are allowed


def test_bad_authors_parameters() -> None:
    raises_naming(lambda: make_scheme("authors", negative_w=0.5), "perp_neg_negative_w", "0.5")
    raises_naming(lambda: AuthorsScheme(negative_w=float("-inf")), "perp_neg_negative_w", "-inf")
    raises_naming(
        lambda: AuthorsScheme(front_decay_factor=-1.0), "perp_neg_front_decay_factor", "-1.0"
    )
    raises_naming(
        lambda: AuthorsScheme(side_decay_factor="10"), "perp_neg_side_decay_factor", "'10'"
    )
    raises_naming(lambda: AuthorsScheme(front_cutoff=1.5), "perp_neg_front_cutoff", "1.5")
    raises_naming(
        lambda: scheme_from_config("authors", {}, {"negative_w": 2.0}), "perp_neg_negative_w", "2.0"
    )


def test_unknown_scheme_parameter() -> None:
    raises_naming(
        lambda: make_scheme("authors", negative_weight=-2.0), "negative_weight", "'authors'"
    )
    raises_naming(
        lambda: make_scheme("threestudio", negative_w=-2.0), "negative_w", "'threestudio'"
    )
    raises_naming(lambda: make_scheme("threestudio", f_xx=(1, 2, 3)), "f_xx")


def test_mismatched_elevation_azimuth() -> None:
    s = AuthorsScheme()
    raises_naming(
        lambda: view_weights(torch.zeros(3), torch.zeros(2), s),
        "elevation",
        "azimuth",
        "(3,)",
        "(2,)",
    )
    raises_naming(
        lambda: view_weights(torch.zeros(2, 1), torch.zeros(2, 1), s), "elevation", "(2, 1)"
    )
    raises_naming(
        lambda: view_weights(
            torch.zeros(2), torch.zeros(2), s, view=torch.zeros(3, dtype=torch.long)
        ),
        "view",
        "(3,)",
    )
