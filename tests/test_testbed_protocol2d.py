"""2D prior-bias protocol: CFG sampling against an independent DDIM loop, cell bookkeeping."""

from __future__ import annotations

from typing import List, NamedTuple

import pytest
import torch

from threestudio_perpneg.eval.stats import wilson_interval
from threestudio_perpneg.testbed.protocol2d import CELLS, BiasCell, bias_summary, sample_cfg

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


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


def test_sample_cfg_equals_an_independent_ddim_loop():
    from diffusers import DDIMScheduler

    unet, config = _unet(), _scheduler_config()
    gen = torch.Generator().manual_seed(0)
    cond = torch.randn(3, 5, 16, generator=gen)
    uncond = torch.randn(5, 16, generator=gen)
    out = sample_cfg(
        unet, config, cond, uncond, 4.0, steps=4, generator=torch.Generator().manual_seed(7)
    )

    sched = DDIMScheduler.from_config(config)
    sched.set_timesteps(4)
    x = torch.randn((3, 3, 8, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for t in sched.timesteps:
            e_c = unet(x, t, encoder_hidden_states=cond).sample
            e_u = unet(x, t, encoder_hidden_states=uncond.expand(3, -1, -1)).sample
            x = sched.step(e_u + 4.0 * (e_c - e_u), t, x).prev_sample
    torch.testing.assert_close(out, (x / 2 + 0.5).clamp(0, 1), rtol=1e-4, atol=1e-5)
    assert out.min() >= 0 and out.max() <= 1


def test_sample_cfg_rejects_bad_steps():
    with pytest.raises(ValueError, match="steps: expected a positive integer, got 0"):
        sample_cfg(
            _unet(), _scheduler_config(), torch.zeros(1, 5, 16), torch.zeros(5, 16), 1.0, steps=0
        )


def test_cells_and_summary():
    assert [c[0] for c in CELLS] == [
        "front_fraction_noview",
        "back_success_cfg",
        "side_success_cfg",
    ]
    cell = BiasCell("back_success_cfg", "back", "back", 128, 30, 120, {"back": 30, "front": 98})
    d = bias_summary([cell])
    assert d["back_success_cfg"] == pytest.approx(30 / 128)
    assert d["cells"][0]["ci95"] == list(wilson_interval(30, 128))
    assert d["cells"][0]["view_counts"] == {"back": 30, "front": 98}


class _Pred(NamedTuple):
    views: List[str]
    view_probs: torch.Tensor
    identities: List[str]
    identity_probs: torch.Tensor


class _BrightnessClassifier:
    """An input to the protocol (not code under test): front if the image is bright, else back."""

    def classify(self, images):
        bright = images.mean(dim=(1, 2, 3)) > 0.5
        views = ["front" if b else "back" for b in bright]
        return _Pred(
            views, torch.zeros(len(views), 3), ["alien"] * len(views), torch.zeros(len(views), 4)
        )


def test_measure_prior_bias_counts_what_the_classifier_says(tmp_path):
    """A tiny 2-step prior: the counts must match the classifier run on the returned samples."""
    from threestudio_perpneg.testbed.prior import PriorConfig
    from threestudio_perpneg.testbed.protocol2d import measure_prior_bias
    from threestudio_perpneg.testbed.train import TrainConfig, shipped_dataset_config, train_prior

    out = tmp_path / "p"
    prior = PriorConfig(block_out_channels=(16, 32), text_hidden_size=32, text_layers=1)
    recipe = TrainConfig(steps=1, batch_size=2, pool_size=8, warmup_steps=0, log_every=1, threads=1)
    train_prior(out, shipped_dataset_config(), prior, recipe, progress=False)
    clf = _BrightnessClassifier()
    cells, samples = measure_prior_bias(out, clf, n=6, steps=2, batch_size=4)
    assert [c.key for c in cells] == [c[0] for c in CELLS]
    for cell in cells:
        views = clf.classify(samples[cell.key]).views
        assert cell.n == 6 and samples[cell.key].shape == (6, 3, 16, 16)
        assert cell.successes == sum(v == cell.target for v in views)
        assert sum(cell.view_counts.values()) == 6
        # identities cycle alien, robot, clown, troll: the stub says alien, kept for samples 0 and 4.
        assert cell.identity_kept == 2
    with pytest.raises(ValueError, match="identities"):
        measure_prior_bias(out, clf, n=2, steps=1, identities=["corgi"])
