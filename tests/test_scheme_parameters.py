"""Every documented weight-scheme parameter, varied, against the published formulas written out here.

Authors' scheme (stable-dreamfusion ``--perpneg``), with r the interpolation factor of the half:

    front half (|az| < 90°, r = 1 − |az|/90):  w_front = nw·e^(−r·fd)       if r ≤ cut, else 0
                                               w_side  = nw·e^(−(1−r)·sd)   if r ≥ 1 − cut, else 0
    back half  (r = 2 − |az|/90):              w_front = nw
                                               w_side  = nw·e^(−r·sd)/2     if r ≤ cut, else 0

threestudio's scheme, f(a, b, c; r) = a·e^(−b·r) + c: front half w_front = −f_fs(r),
w_side = −f_sf(1 − r); back half w_side = −f_sb(r), w_front = −f_fsb(r).
"""

from __future__ import annotations

import math
from typing import Tuple

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from threestudio_perpneg.core.views import (
    FRONT,
    SIDE,
    AuthorsScheme,
    ThreestudioScheme,
    make_scheme,
    scheme_from_config,
    view_weights,
)

SETTINGS = settings(max_examples=150, deadline=None)
azimuths = st.floats(-180.0, 180.0, allow_nan=False)


def r_and_half(az: float) -> Tuple[float, bool]:
    a = abs(az)
    return (2.0 - a / 90.0, True) if a >= 90.0 else (1.0 - a / 90.0, False)


def authors_ref(az: float, nw: float, fd: float, sd: float, cut: float) -> Tuple[float, float]:
    r, back = r_and_half(az)
    if back:
        return nw, (nw * math.exp(-r * sd) / 2 if r <= cut else 0.0)
    front = nw * math.exp(-r * fd) if r <= cut else 0.0
    side = nw * math.exp(-(1 - r) * sd) if r >= 1 - cut else 0.0
    return front, side


def threestudio_ref(az: float, f: dict) -> Tuple[float, float]:
    def fx(key: str, x: float) -> float:
        a, b, c = f[key]
        return a * math.exp(-b * x) + c

    r, back = r_and_half(az)
    if back:
        return -fx("f_fsb", r), -fx("f_sb", r)
    return -fx("f_fs", r), -fx("f_sf", 1 - r)


def weights(scheme, az: float) -> Tuple[float, float]:
    vw = view_weights(
        torch.zeros(1, dtype=torch.float64), torch.tensor([az], dtype=torch.float64), scheme
    )
    return float(vw.negative_weights[0, FRONT]), float(vw.negative_weights[0, SIDE])


@SETTINGS
@given(
    az=azimuths,
    nw=st.floats(-5.0, 0.0),
    fd=st.floats(0.0, 20.0),
    sd=st.floats(0.0, 20.0),
    cut=st.floats(0.0, 1.0),
)
def test_authors_every_parameter_matches_formula(az, nw, fd, sd, cut) -> None:
    r, _ = r_and_half(az)
    assume(abs(r - cut) > 1e-9 and abs(r - (1 - cut)) > 1e-9)  # off the switch points
    scheme = make_scheme(
        "authors", negative_w=nw, front_decay_factor=fd, side_decay_factor=sd, front_cutoff=cut
    )
    got = weights(scheme, az)
    ref = authors_ref(az, nw, fd, sd, cut)
    assert got == pytest.approx(ref, abs=1e-9), (az, got, ref)


@pytest.mark.parametrize("cut", [0.3, 0.5, 0.95])
def test_front_cutoff_moves_the_switch_points(cut: float) -> None:
    """Just on each side of r = cut and r = 1 − cut the weights switch on/off where ``cut`` says."""
    scheme = AuthorsScheme(front_cutoff=cut)
    eps = 1e-3
    # front half: front negative on for r < cut, off above; side negative on for r > 1 − cut
    front_on = weights(scheme, (1 - (cut - eps)) * 90)[0]
    front_off = weights(scheme, (1 - (cut + eps)) * 90)[0]
    assert front_on < 0 and front_off == 0.0
    side_off = weights(scheme, (1 - (1 - cut - eps)) * 90)[1]
    side_on = weights(scheme, (1 - (1 - cut + eps)) * 90)[1]
    assert side_off == 0.0 and side_on < 0
    # back half: side negative on for r < cut (azimuth > 90·(2 − cut)), off above
    assert weights(scheme, (2 - (cut - eps)) * 90)[1] < 0
    assert weights(scheme, (2 - (cut + eps)) * 90)[1] == 0.0


@SETTINGS
@given(
    az=azimuths,
    triples=st.lists(
        st.tuples(st.floats(-5.0, 5.0), st.floats(0.0, 3.0), st.floats(-5.0, 5.0)),
        min_size=4,
        max_size=4,
    ),
)
def test_threestudio_every_triple_matches_formula(az, triples) -> None:
    f = dict(zip(("f_fs", "f_sf", "f_sb", "f_fsb"), triples))
    got = weights(make_scheme("threestudio", **f), az)
    assert got == pytest.approx(threestudio_ref(az, f), abs=1e-9)


@pytest.mark.parametrize("key", ["f_fs", "f_sf", "f_sb", "f_fsb"])
def test_each_threestudio_triple_drives_its_own_weight(key: str) -> None:
    """Changing one triple changes exactly the weight the formula assigns it, on its half only."""
    base = ThreestudioScheme()
    f = {k: getattr(base, k) for k in ("f_fs", "f_sf", "f_sb", "f_fsb")}
    changed = dict(f, **{key: (2.5, 1.5, -0.25)})
    scheme = make_scheme("threestudio", **changed)
    for az in (20.0, 60.0, 120.0, 160.0):
        assert weights(scheme, az) == pytest.approx(threestudio_ref(az, changed), abs=1e-9)
        assert weights(base, az) == pytest.approx(threestudio_ref(az, f), abs=1e-9)
    idx = {"f_fs": (20.0, 0), "f_sf": (20.0, 1), "f_sb": (120.0, 1), "f_fsb": (120.0, 0)}[key]
    assert weights(scheme, idx[0])[idx[1]] != pytest.approx(weights(base, idx[0])[idx[1]])


def test_scheme_from_config_passes_every_authors_parameter() -> None:
    """The config keys' route: each value reaches the scheme (no default silently kept)."""
    params = {
        "negative_w": -1.25,
        "front_decay_factor": 3.5,
        "side_decay_factor": 7.0,
        "front_cutoff": 0.45,
    }
    scheme = scheme_from_config("authors", {}, params)
    for az in (5.0, 30.0, 50.0, 75.0, 95.0, 130.0, 175.0):
        assert weights(scheme, az) == pytest.approx(
            authors_ref(az, -1.25, 3.5, 7.0, 0.45), abs=1e-9
        )
    f = {"f_fs": (1.0, 2.0, 0.5), "f_sf": (2.0, 0.1, -1.0), "f_sb": (0.5, 1.0, 0.0)}
    f["f_fsb"] = (3.0, 0.2, -2.0)
    ts = scheme_from_config("threestudio", f, {})
    for az in (5.0, 50.0, 95.0, 175.0):
        assert weights(ts, az) == pytest.approx(threestudio_ref(az, f), abs=1e-9)
