"""The view-knowledge sweep's prior family: same renders at every level, only the captions differ."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from threestudio_perpneg.testbed import dataset as D
from threestudio_perpneg.testbed import levels as L


@settings(max_examples=15, deadline=None)
@given(
    error=st.floats(0.0, 1.0),
    prob=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_renders_do_not_depend_on_the_caption_knobs(error: float, prob: float, seed: int) -> None:
    no_phrase = D.DatasetConfig.from_dict({**L.level_dataset(0.3).to_dict(), "view_phrase_prob": 0})
    ref = D.sample_batch(no_phrase, 24, torch.Generator().manual_seed(seed))
    knobs = {**no_phrase.to_dict(), "view_phrase_prob": prob}
    knobs["view_phrase_matrix"] = D.confusion_matrix(error)
    other = D.sample_batch(
        D.DatasetConfig.from_dict(knobs), 24, torch.Generator().manual_seed(seed)
    )
    assert torch.equal(ref.images, other.images)
    assert ref.views == other.views and ref.identities == other.identities
    assert torch.equal(ref.azimuth_deg, other.azimuth_deg)


def test_written_views_follow_the_level_matrix() -> None:
    lv = L.find_level("p35")
    batch = D.sample_batch(lv.dataset(), 6000, torch.Generator().manual_seed(3))
    for true in ("front", "side", "back"):
        written = [w for v, w in zip(batch.views, batch.written_views) if v == true and w]
        right = sum(w == true for w in written) / len(written)
        # Binomial: 1 - error within 4 standard errors.
        se = math.sqrt(lv.error * (1 - lv.error) / len(written))
        assert abs(right - (1 - lv.error)) < 4 * se, (true, right, len(written))
    phrased = sum(w is not None for w in batch.written_views) / len(batch.views)
    assert abs(phrased - 0.8) < 4 * math.sqrt(0.16 / len(batch.views))
    assert L.LEVEL_PHRASE_PROB == 0.8


def test_levels_span_inert_to_informative_by_bayes_rule() -> None:
    # P(back | "back view") = 0.1 (1 - e) / (0.1 (1 - e) + 0.9 e / 2), written out by hand.
    for lv, target in zip(L.LEVELS, (0.15, 0.35, 0.55, 0.80)):
        e = lv.error
        by_hand = 0.1 * (1 - e) / (0.1 * (1 - e) + 0.45 * e)
        assert lv.p_back() == pytest.approx(by_hand)
        assert abs(lv.p_back() - target) < 0.02, (lv.name, lv.p_back())
        side = 0.2 * (1 - e) / (0.2 * (1 - e) + 0.4 * e)
        assert lv.p_side() == pytest.approx(side)
    assert [lv.p_back() for lv in L.LEVELS] == sorted(lv.p_back() for lv in L.LEVELS)
    # Only the caption knobs differ between levels, and the recipe (seeds included) is shared.
    dicts = [lv.dataset().to_dict() for lv in L.LEVELS]
    for d in dicts:
        for key in D.CAPTION_KEYS:
            d.pop(key)
    assert all(d == dicts[0] for d in dicts)
    assert {lv.dataset().view_phrase_prob for lv in L.LEVELS} == {0.8}
    assert L.level_recipe().steps == L.LEVEL_STEPS and L.level_recipe(threads=2).seed == 0


def test_unknown_level_is_named() -> None:
    with pytest.raises(ValueError, match="level: unknown level 'p99', expected one of"):
        L.parse_levels(["p15", "p99"])
    assert [lv.name for lv in L.parse_levels(None)] == list(L.LEVEL_NAMES)


def test_a_prior_continues_on_other_captions_and_other_knobs_are_refused(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    pytest.importorskip("matplotlib")
    from threestudio_perpneg.testbed.prior import PriorConfig
    from threestudio_perpneg.testbed.train import TrainConfig, train_prior

    prior = PriorConfig(resolution=16, block_out_channels=(16, 16), cross_attention_levels=1)
    recipe = TrainConfig(steps=2, batch_size=2, pool_size=8, warmup_steps=0)
    base = tmp_path / "base"
    no_phrase = D.DatasetConfig.from_dict({**L.level_dataset(0.3).to_dict(), "view_phrase_prob": 0})
    train_prior(base, no_phrase, prior, recipe, progress=False)
    lv = L.find_level("p80")
    train_prior(tmp_path / "p80", lv.dataset(), prior, recipe, progress=False, init_from=base)
    saved = json.loads((tmp_path / "p80" / "testbed.json").read_text())
    assert saved["dataset"]["view_phrase_matrix"] == D.confusion_matrix(lv.error)
    assert saved["train"]["init_from"]["steps"] == 2
    other = D.DatasetConfig.from_dict({**lv.dataset().to_dict(), "texture_jitter": 0.9})
    with pytest.raises(ValueError, match="init_from: .* another dataset config"):
        train_prior(tmp_path / "x", other, prior, recipe, progress=False, init_from=base)


SHARP_PRIORS = Path(__file__).resolve().parents[1] / "benchmarks/results/testbed-sweep-6000/priors"
PACKAGE = Path(__file__).resolve().parents[1] / "threestudio_perpneg"


@pytest.mark.parametrize(
    "name, family",
    [(n, "sweep") for n in ("p15", "p35", "p55", "p80")]
    + [(n, "sharp") for n in ("p15", "p35", "p55", "p80")],
)
def test_shipped_level_priors_follow_their_level(name: str, family: str) -> None:
    from threestudio_perpneg.testbed.sweep import default_priors_dir, level_prior

    lv = L.find_level(name)
    priors, steps = (
        (default_priors_dir(), L.LEVEL_STEPS)
        if family == "sweep"
        else (SHARP_PRIORS, L.SHARP_LEVEL_STEPS)
    )
    folder = level_prior(priors, lv)
    if family == "sharp" and name == "p35":  # shipped in the package, one copy in the repository
        assert folder == PACKAGE / "testbed/assets/priors-6000/p35"
        assert not (SHARP_PRIORS / "p35").exists()
    saved = json.loads((folder / "testbed.json").read_text())
    assert D.DatasetConfig.from_dict(saved["dataset"]) == lv.dataset()
    assert saved["train"]["steps"] == steps and saved["train"]["init_from"] is None
    assert saved["train"]["seed"] == L.level_recipe().seed
    pytest.importorskip("diffusers")
    from threestudio_perpneg.engines.pixel import load_deepfloyd_if

    unet = load_deepfloyd_if(str(folder))[0]
    assert unet.config.block_out_channels == list(L.SWEEP_PRIOR.block_out_channels)
