"""Testbed dataset: statistics match the config, labels agree with the cameras, strict JSON."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import pytest
import torch

from threestudio_perpneg.core.text import DEFAULT_TEMPLATES, FRONT_TEMPLATES, view_prompts
from threestudio_perpneg.testbed import dataset as D
from threestudio_perpneg.testbed import scenes


def _within(count: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


@pytest.fixture(scope="module")
def big() -> tuple[D.DatasetConfig, D.Batch]:
    # Tiny images keep 4000 renders cheap; the statistics do not depend on the resolution.
    cfg = D.DatasetConfig(
        resolution=8,
        texture_size=8,
        view_frequencies={"front": 0.5, "side": 0.2, "back": 0.15, "overhead": 0.15},
        view_phrase_prob=0.4,
        view_phrase_matrix={
            **D.confusion_matrix(0.3),
            "overhead": {"overhead": 0.4, "front": 0.6},
        },
    )
    return cfg, D.sample_batch(cfg, 4000, torch.Generator().manual_seed(0))


def test_view_identity_and_phrase_frequencies_match_the_config(big) -> None:
    cfg, b = big
    n = len(b.views)
    views = Counter(b.views)
    for v, p in cfg.view_frequencies.items():
        assert _within(views[v], n, p), (v, views[v], p)
    ids = Counter(b.identities)
    for ident in cfg.identities:
        assert _within(ids[ident], n, 1 / len(cfg.identities)), (ident, ids[ident])
    with_phrase = sum(w is not None for w in b.written_views)
    assert _within(with_phrase, n, cfg.view_phrase_prob)
    # Written view given the true view follows the matrix row.
    for true_view, row in cfg.view_phrase_matrix.items():
        written = [w for v, w in zip(b.views, b.written_views) if v == true_view and w is not None]
        counts = Counter(written)
        for w, p in row.items():
            assert _within(counts[w], len(written), p), (true_view, w, counts[w], len(written), p)


def test_labels_cameras_and_captions_agree(big) -> None:
    cfg, b = big
    assert b.views == scenes.view_label(b.azimuth_deg, b.elevation_deg)
    lo, hi = cfg.elevation_range_deg
    el = b.elevation_deg
    over = torch.tensor([v == "overhead" for v in b.views])
    assert bool(((el[~over] >= lo - 1e-4) & (el[~over] <= hi + 1e-4)).all())
    assert bool((el[over] > 60.0).all())
    phrase = re.compile(r", (front|side|back|overhead) view")
    for cap, ident, w in zip(b.captions, b.identities, b.written_views):
        assert f"cartoon {ident} head" in cap
        found = phrase.findall(cap)
        assert found == ([] if w is None else [w]), (cap, w)
    assert b.images.shape == (4000, 3, 8, 8)
    assert float(b.images.min()) >= -1.0 and float(b.images.max()) <= 1.0
    assert float(b.images.min()) < -0.5  # the range really is [-1, 1], not [0, 1]


def test_default_config_makes_back_view_mostly_caption_non_backs() -> None:
    # The web-like default: P(true back | caption says back) < 0.5, computed from the knobs.
    cfg = D.DatasetConfig()
    f, m = cfg.view_frequencies, cfg.view_phrase_matrix
    says_back = sum(f[v] * m[v]["back"] for v in m)
    assert f["back"] * m["back"]["back"] / says_back < 0.5
    assert f["front"] >= 0.6


def test_sampling_is_deterministic() -> None:
    cfg = D.DatasetConfig(resolution=16, texture_size=16)
    a = D.sample_batch(cfg, 12, torch.Generator().manual_seed(5))
    b = D.sample_batch(cfg, 12, torch.Generator().manual_seed(5))
    c = D.sample_batch(cfg, 12, torch.Generator().manual_seed(6))
    assert torch.equal(a.images, b.images) and a.captions == b.captions and a.views == b.views
    assert not torch.equal(a.images, c.images)


def test_caption_words_cover_captions_and_guidance_view_prompts(big) -> None:
    cfg, b = big
    words = set(D.caption_words(cfg))
    for cap in b.captions:
        assert set(re.findall(r"[a-z0-9]+", cap.lower())) <= words, cap
    for ident in cfg.identities:
        for templates in (DEFAULT_TEMPLATES, FRONT_TEMPLATES):
            for p in view_prompts(cfg.base_prompt(ident), templates):
                assert set(re.findall(r"[a-z0-9]+", p.lower())) <= words, p
    # The guidance's suffix form is exactly the one captions use.
    assert view_prompts(cfg.base_prompt("alien"))[2] == D.view_prompt(
        cfg.base_prompt("alien"), "back"
    )
    assert cfg.base_prompt("alien") == "a cartoon alien head"


def test_json_round_trip_and_strict_keys() -> None:
    cfg = D.DatasetConfig(view_phrase_prob=0.5, view_phrase_matrix=D.confusion_matrix(0.1), seed=3)
    again = D.DatasetConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ValueError, match="unknown key 'view_prob'"):
        D.DatasetConfig.from_dict({**cfg.to_dict(), "view_prob": 0.3})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"view_frequencies": {"front": 0.7, "side": 0.2}},
            "view_frequencies: expected probabilities summing to 1",
        ),
        ({"view_frequencies": {"front": 0.5, "top": 0.5}}, "view_frequencies: unknown view 'top'"),
        (
            {"view_phrase_matrix": {"front": {"front": 1.0}, "side": {"side": 1.0}}},
            "expected a row for true view 'back'",
        ),
        ({"view_phrase_prob": 1.5}, "view_phrase_prob"),
        ({"templates": ["a {identity} head"]}, r"templates\[0\]"),
        ({"identities": ["dog"]}, "identities: unknown identity 'dog'"),
        ({"elevation_range_deg": (0.0, 80.0)}, "elevation_range_deg"),
        ({"resolution": 4}, "resolution"),
        (
            {"identity_view_phrase_matrix": {"dog": D.confusion_matrix(0.1)}},
            "identity_view_phrase_matrix: unknown identity 'dog'",
        ),
        (
            {"identity_view_phrase_matrix": {"alien": {"front": {"front": 1.0}}}},
            "identity_view_phrase_matrix.alien: expected a row for true view 'side'",
        ),
    ],
)
def test_bad_config_names_the_key(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        D.DatasetConfig(**kwargs)


def test_per_identity_phrase_matrices_are_followed() -> None:
    # alien: always right; troll: a "back" render is always captioned "front"; others: default.
    always = D.confusion_matrix(0.0)
    wrong = {**D.confusion_matrix(0.3), "back": {"front": 1.0, "side": 0.0, "back": 0.0}}
    cfg = D.DatasetConfig(
        resolution=8,
        texture_size=8,
        view_frequencies={"front": 0.4, "side": 0.3, "back": 0.3, "overhead": 0.0},
        view_phrase_prob=1.0,
        identity_view_phrase_matrix={"alien": always, "troll": wrong},
    )
    b = D.sample_batch(cfg, 3000, torch.Generator().manual_seed(1))
    pairs = list(zip(b.identities, b.views, b.written_views))
    alien = [(v, w) for i, v, w in pairs if i == "alien"]
    troll_backs = [w for i, v, w in pairs if i == "troll" and v == "back"]
    robot_backs = [w for i, v, w in pairs if i == "robot" and v == "back"]
    assert alien and all(v == w for v, w in alien)
    assert troll_backs and set(troll_backs) == {"front"}
    assert _within(sum(w == "back" for w in robot_backs), len(robot_backs), 0.7)
    assert (
        cfg.phrase_matrix("troll") == wrong and cfg.phrase_matrix("clown") == cfg.view_phrase_matrix
    )
    again = D.DatasetConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_calibration_reliability_is_bayes_rule() -> None:
    from threestudio_perpneg.testbed.calibrate import phrase_reliability

    cfg = D.DatasetConfig(
        view_frequencies={"front": 0.7, "side": 0.2, "back": 0.1, "overhead": 0.0},
        identity_view_phrase_matrix={"troll": D.confusion_matrix(0.5)},
    )
    # P(back | says back) = 0.1*0.5 / (0.1*0.5 + 0.7*0.25 + 0.2*0.25), by hand.
    assert phrase_reliability(cfg, "troll") == pytest.approx(0.05 / 0.275)
    assert phrase_reliability(cfg, "alien") == pytest.approx(0.07 / (0.07 + 0.105 + 0.03))
