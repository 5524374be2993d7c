"""Testbed 2D table and negative-weight curve: ε̂ against a per-sample reference loop, paired noise,
row bookkeeping, the shipped prior end to end (tiny n and steps), the plot."""

from __future__ import annotations

import math
import sys
from typing import List

import pytest
import torch

from threestudio_perpneg.testbed import table2d
from threestudio_perpneg.testbed.table2d import (
    curve_samples,
    measure_table2d,
    negative_weight_curve,
    plot_negative_weight_curve,
    sample_guided,
    scheme_negatives,
    table2d_samples,
)

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

ROW_KEYS = {
    "mode",
    "scheme",
    "view",
    "negative_weights",
    "n",
    "successes",
    "identity_kept",
    "rate",
    "interval",
    "view_counts",
}


def _unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=16,
        cross_attention_dim=16,
        attention_head_dim=8,
    ).eval()


def _scheduler_config():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        beta_schedule="squaredcos_cap_v2", variance_type="fixed_small", clip_sample=True
    ).config


def _reference(unet, config, noise, uncond, pos, neg, weights, mode, s, steps):
    """One sample at a time, one UNet call per branch, the paper's formulas written out."""
    from diffusers import DDIMScheduler

    outs = []
    with torch.no_grad():
        for i in range(noise.shape[0]):
            sched = DDIMScheduler.from_config(config)
            sched.set_timesteps(steps)
            x = noise[i : i + 1].clone()
            for t in sched.timesteps:
                e_u = unet(x, t, encoder_hidden_states=uncond[None]).sample[0].double()
                e_p = unet(x, t, encoder_hidden_states=pos[i : i + 1]).sample[0].double()
                d_p = e_p - e_u
                total = d_p.clone()
                for k, w in enumerate(weights):
                    e_n = unet(x, t, encoder_hidden_states=neg[i, k][None]).sample[0].double()
                    d_n = e_n - e_u
                    if mode == "perpneg":
                        d_n = d_n - (d_n * d_p).sum() / (d_p * d_p).sum() * d_p
                    total = total + w * d_n
                eps = (e_u + s * total).float()[None]
                x = sched.step(eps, t, x, eta=0.0).prev_sample
            outs.append((x[0] / 2 + 0.5).clamp(0, 1))
    return torch.stack(outs)


def _inputs(b=3, k=2):
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(b, 3, 8, 8, generator=g)
    uncond = torch.randn(5, 16, generator=g)
    pos = torch.randn(b, 5, 16, generator=g)
    neg = torch.randn(b, k, 5, 16, generator=g)
    return noise, uncond, pos, neg


@pytest.mark.parametrize("mode", ["cebm", "perpneg"])
def test_guided_sampling_equals_a_per_sample_reference_loop(mode):
    unet, config = _unet(), _scheduler_config()
    noise, uncond, pos, neg = _inputs()
    weights = [-1.5, -0.4]
    out = sample_guided(
        unet, config, noise, uncond, pos, neg, weights, mode=mode, guidance_scale=5.0, steps=3
    )
    ref = _reference(unet, config, noise, uncond, pos, neg, weights, mode, 5.0, 3)
    assert out.shape == (3, 3, 8, 8)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=0)
    # The two modes really differ (the projection matters on random predictions).
    other = "cebm" if mode == "perpneg" else "perpneg"
    ref_other = _reference(unet, config, noise, uncond, pos, neg, weights, other, 5.0, 3)
    assert (out - ref_other).abs().max() > 1e-3


def test_zero_weights_are_plain_cfg_exactly_and_sd_ignores_negatives():
    unet, config = _unet(), _scheduler_config()
    noise, uncond, pos, neg = _inputs(k=1)
    kw = dict(guidance_scale=6.0, steps=3)
    sd = sample_guided(unet, config, noise, uncond, pos, mode="sd", **kw)
    for mode in ("cebm", "perpneg"):
        zero = sample_guided(unet, config, noise, uncond, pos, neg, [0.0], mode=mode, **kw)
        assert torch.equal(zero, sd)
    sd_neg = sample_guided(unet, config, noise, uncond, pos, neg, [-3.0], mode="sd", **kw)
    assert torch.equal(sd_neg, sd)
    ref = _reference(unet, config, noise, uncond, pos, neg, [], "sd", 6.0, 3)
    torch.testing.assert_close(sd, ref, atol=2e-4, rtol=0)


def test_sample_guided_rejects_bad_arguments():
    unet, config = _unet(), _scheduler_config()
    noise, uncond, pos, neg = _inputs()
    with pytest.raises(ValueError, match="^mode: unknown mode 'x'"):
        sample_guided(unet, config, noise, uncond, pos, mode="x")
    with pytest.raises(ValueError, match="^neg_weights: expected 2 weights"):
        sample_guided(unet, config, noise, uncond, pos, neg, [-1.0], mode="perpneg")
    with pytest.raises(ValueError, match="^steps: expected an integer >= 1"):
        sample_guided(unet, config, noise, uncond, pos, steps=0)


def test_scheme_negatives_are_the_sampler_weights_at_the_view_azimuth():
    # threestudio, back (r = 0 on the back half): w_front = -(1 + 0.967), w_side = -(1 - 0.606).
    back = scheme_negatives("back", "threestudio")
    assert set(back) == {"front", "side"}
    assert back["front"] == pytest.approx(-1.967) and back["side"] == pytest.approx(-0.394)
    side = scheme_negatives("side", "threestudio")  # r = 1: w_front = -(e^-0.5 + 0.967)
    assert side["front"] == pytest.approx(-(math.exp(-0.5) + 0.967))
    assert scheme_negatives("back", "authors") == pytest.approx({"front": -2.0, "side": -1.0})
    assert scheme_negatives("side", "authors") == pytest.approx({"front": -2.0})


# ------------------------------------------------------------------ the shipped prior (plumbing)
@pytest.fixture(scope="module")
def prior():
    from threestudio_perpneg.testbed.prior import load_prior_path

    return load_prior_path()


class _StubClassifier:
    """Says views in turn (side, back, none) and always the identity 'alien'."""

    def classify(self, images):
        n = images.shape[0]
        views = [("side", "back", "none")[i % 3] for i in range(n)]
        return views, None, ["alien"] * n, None


def _wilson(k, n, z=1.959963984540054):
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def test_table_rows_count_what_the_classifier_says(prior):
    rows = measure_table2d(prior, _StubClassifier(), n=6, steps=1, batch=4, views=("side", "back"))
    # Two views x (sd + cebm x 2 schemes + perpneg x 2 schemes).
    assert [(r["view"], r["mode"], r["scheme"]) for r in rows] == [
        (v, m, s)
        for v in ("side", "back")
        for m, s in [
            ("sd", None),
            ("cebm", "threestudio"),
            ("cebm", "authors"),
            ("perpneg", "threestudio"),
            ("perpneg", "authors"),
        ]
    ]
    for r in rows:
        assert set(r) == ROW_KEYS
        assert r["n"] == 6 and sum(r["view_counts"].values()) == 6
        assert r["view_counts"] == {"side": 2, "back": 2, "none": 2}
        assert r["successes"] == 2 and r["rate"] == pytest.approx(2 / 6)
        assert r["interval"] == pytest.approx(list(_wilson(2, 6)), abs=1e-9)
        # identities in turn: alien, robot, clown, troll, alien, robot -> two aliens.
        assert r["identity_kept"] == 2
        assert (r["negative_weights"] == {}) == (r["mode"] == "sd")
    kept = measure_table2d(prior, _StubClassifier(), identity="alien", n=3, steps=1, modes=["sd"])
    assert [r["identity_kept"] for r in kept] == [3, 3]


def test_table_with_the_testbed_classifier_end_to_end(prior):
    from threestudio_perpneg.testbed.classifier import load_classifier

    rows = measure_table2d(
        prior, load_classifier(), n=4, steps=2, views=["back"], schemes=["authors"]
    )
    assert [(r["mode"], r["scheme"]) for r in rows] == [
        ("sd", None),
        ("cebm", "authors"),
        ("perpneg", "authors"),
    ]
    for r in rows:
        assert set(r) == ROW_KEYS and sum(r["view_counts"].values()) == 4
        assert r["successes"] == r["view_counts"].get("back", 0)
        assert 0 <= r["identity_kept"] <= 4
        lo, hi = r["interval"]
        assert 0.0 <= lo <= r["rate"] <= hi <= 1.0


def test_every_cell_starts_from_the_same_noise(prior):
    # With s = 0 every mode is ε̂ = ε_u: equal samples iff the initial noise is shared (up to
    # the float noise of UNet batches with different row counts).
    cells, idents, samples = table2d_samples(prior, n=3, steps=2, guidance_scale=0.0, batch=2)
    assert len(cells) == 10 and idents == ["alien", "robot", "clown"]
    for x in samples[1:]:
        torch.testing.assert_close(x, samples[0], atol=1e-5, rtol=0)
    _, _, other = table2d_samples(prior, n=3, steps=2, guidance_scale=0.0, modes=["sd"], seed=1)
    assert (other[0] - samples[0]).abs().max() > 0.1
    # The samples do not depend on the batch size.
    _, _, whole = table2d_samples(prior, n=3, steps=2, guidance_scale=0.0, modes=["sd"], batch=3)
    torch.testing.assert_close(whole[0], samples[0], atol=1e-5, rtol=0)


def test_curve_at_weight_zero_is_the_table_sd_row(prior):
    cells, _, samples = curve_samples(prior, n=2, steps=2, weights=(0.0, -2.0), view="back")
    assert [(c["mode"], c["weight"]) for c in cells] == [
        ("cebm", 0.0),
        ("cebm", -2.0),
        ("perpneg", 0.0),
        ("perpneg", -2.0),
    ]
    assert all(c["negative_views"] == ["front"] for c in cells)
    _, _, sd = table2d_samples(prior, n=2, steps=2, views=["back"], modes=["sd"])
    assert torch.equal(samples[0], sd[0]) and torch.equal(samples[2], sd[0])
    assert not torch.equal(samples[1], samples[3])  # projection changes the cebm samples


def test_curve_rows_for_each_weight(prior):
    weights = (0.0, -1.0, -4.0)
    rows = negative_weight_curve(
        prior, _StubClassifier(), n=3, steps=1, weights=weights, view="side"
    )
    assert [(r["mode"], r["weight"]) for r in rows] == [
        (m, w) for m in ("cebm", "perpneg") for w in weights
    ]
    for r in rows:
        assert r["view"] == "side" and r["negative_views"] == ["front"]
        assert r["n"] == 3 and r["successes"] == 1 and sum(r["view_counts"].values()) == 3
        assert r["interval"] == pytest.approx(list(_wilson(1, 3)), abs=1e-9)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"modes": ["sd", "x"]}, "^modes: unknown mode 'x'"),
        ({"views": ["top"]}, "^views: unknown view 'top'"),
        ({"schemes": ["mine"]}, "^schemes: unknown scheme 'mine'"),
        ({"n": 0}, "^n: expected an integer >= 1, got 0"),
        ({"batch": 0}, "^batch: expected an integer >= 1, got 0"),
        ({"guidance_scale": float("nan")}, "^guidance_scale: expected a finite number"),
        ({"identity": "dragon"}, "^identity: unknown identity 'dragon'"),
    ],
)
def test_table_rejects_bad_arguments(prior, kwargs, message):
    with pytest.raises(ValueError, match=message):
        measure_table2d(prior, _StubClassifier(), **{"n": 1, "steps": 1, **kwargs})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weights": (0.0, 1.0)}, r"^weights\[1\]: expected a value <= 0.0, got 1.0"),
        ({"weights": ()}, "^weights: expected a non-empty sequence"),
        ({"view": "top"}, "^view: unknown view 'top'"),
        ({"view": "back", "negative_views": ["back"]}, "^negative_views: .* include the requested"),
        ({"modes": ["sd"]}, "^modes: unknown mode 'sd'"),
    ],
)
def test_curve_rejects_bad_arguments(prior, kwargs, message):
    with pytest.raises(ValueError, match=message):
        negative_weight_curve(prior, _StubClassifier(), **{"n": 1, "steps": 1, **kwargs})


def _curve_rows() -> List[dict]:
    return [
        {"mode": m, "weight": w, "view": "back", "rate": 0.5, "interval": [0.3, 0.7]}
        for m in ("cebm", "perpneg")
        for w in (0.0, -1.0)
    ]


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_negative_weight_curve(_curve_rows(), tmp_path / "curve.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["curve.png"]  # no temporary left
    with pytest.raises(ValueError, match=r"^rows\[0\]: missing key\(s\) \['interval'\]"):
        plot_negative_weight_curve([{"mode": "a", "weight": 0, "rate": 0}], tmp_path / "x.png")


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[eval\]'"):
        plot_negative_weight_curve(_curve_rows(), tmp_path / "curve.png")
    assert not (tmp_path / "curve.png").exists()


def test_module_exports():
    for name in table2d.__all__:
        assert hasattr(table2d, name)
