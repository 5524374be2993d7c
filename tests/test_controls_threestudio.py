"""The Perp-Neg control keys inside the real threestudio (skipped when threestudio is not importable).

The keys load through the registered classes, ``update_step`` resolves the weight schedule with
threestudio's own ``C`` (checked against our ``resolve_schedule``), bad values fail at configure
time with one line naming the key, and a ``dreamfusion-system`` logs ``train/perp_neg_weight_scale``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict

import pytest
from threestudio_support.fixtures import require_threestudio

threestudio = require_threestudio()  # module-level skip with the reason when unavailable

import torch  # noqa: E402

from threestudio_perpneg.threestudio_cpu.system import (  # noqa: E402
    fit_steps,
    load_custom_extension,
    make_dreamfusion_system,
)

pytestmark = [pytest.mark.threestudio, pytest.mark.usefixtures("one_cpu_thread")]

REPO = Path(__file__).resolve().parents[1]
SHIM = REPO / "custom" / "threestudio-perpneg"
load_custom_extension(SHIM)

from threestudio.utils.misc import C  # noqa: E402

from threestudio_perpneg.core.controls import resolve_schedule  # noqa: E402

SD, IF, VSD = (
    "perpneg-stable-diffusion-guidance",
    "perpneg-deep-floyd-guidance",
    "perpneg-stable-diffusion-vsd-guidance",
)
SCHEDULE = [10, 1.0, 0.25, 110]  # λ from 1 to 0.25 over steps 10..110
CONTROLS = {
    "perp_neg_weight_scale": SCHEDULE,
    "perp_neg_t_range": [0.2, 0.8],
    "perp_neg_sampling": "one",
    # every drawn t/1000 lies in [0.3, 0.7], inside the window: all samples get a negative
    "min_step_percent": 0.3,
    "max_step_percent": 0.7,
}


@pytest.fixture(scope="module")
def tiny_if_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from threestudio_perpneg.tiny.builders import build_tiny_deepfloyd_if

    return build_tiny_deepfloyd_if(tmp_path_factory.mktemp("tiny-if") / "model", seed=0)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _guidance(name: str, model: Path, **cfg: Any) -> Any:
    base: Dict[str, Any] = {
        "pretrained_model_name_or_path": str(model),
        "half_precision_weights": False,
    }
    if name == VSD:
        base["pretrained_model_name_or_path_lora"] = str(model)
    return threestudio.find(name)({**base, **cfg})


def _processor(name: str, model: Path) -> Any:
    kind = "perpneg-deepfloyd-prompt-processor" if name == IF else "perpneg-prompt-processor"
    cfg = {
        "pretrained_model_name_or_path": str(model),
        "prompt": "a corgi",
        "spawn": False,
        "perp_neg_prompts": ["blurry"],
        "perp_neg_prompt_weights": [-0.5],
    }
    return threestudio.find(kind)(cfg)()


@pytest.mark.parametrize("name", [SD, IF, VSD])
def test_keys_load_and_update_step_resolves_with_threestudios_c(
    name: str, tiny_sd_path: Path, tiny_if_path: Path, workdir: Path
) -> None:
    model = tiny_if_path if name == IF else tiny_sd_path
    guidance = _guidance(name, model, seed=0, **CONTROLS)
    controls = guidance.perp_neg_controls
    assert (controls.t_range, controls.sampling) == ((0.2, 0.8), "one")
    for step in (0, 10, 35, 60, 109, 110, 4000):
        guidance.update_step(0, step)
        expected = C(guidance.cfg.perp_neg_weight_scale, 0, step)
        assert guidance.perp_neg_controls.weight_scale == pytest.approx(expected, abs=1e-12)
        assert resolve_schedule(SCHEDULE, 0, step) == pytest.approx(expected, abs=1e-12)
    guidance.update_step(0, 60)
    assert guidance.perp_neg_controls.weight_scale == pytest.approx(0.625)

    # One call: every camera (front, side, back) is in the window, `one` gives 3 rows per sample.
    prompt_utils = _processor(name, model)
    el = torch.tensor([0.0, 10.0, 5.0])
    az = torch.tensor([10.0, 100.0, 170.0])
    batch = {"elevation": el, "azimuth": az, "camera_distances": torch.full_like(el, 1.5)}
    rgb = torch.rand(3, 32, 32, 3)
    if name == VSD:
        g = torch.Generator().manual_seed(0)
        batch.update(
            mvp_mtx=torch.randn(3, 4, 4, generator=g), c2w=torch.randn(3, 4, 4, generator=g)
        )
    out = guidance(rgb, prompt_utils, **batch, rgb_as_latents=False)
    assert out["perp_neg_branches"] == 3 * 3
    assert out["perp_neg_weight_scale"] == pytest.approx(0.625)
    loss = out["loss_vsd" if name == VSD else "loss_sds"]
    assert math.isfinite(float(loss.detach()))


@pytest.mark.parametrize("name", [SD, IF, VSD])
def test_eval_prob_keeps_a_samples_negative_with_probability_p(
    name: str, tiny_sd_path: Path, tiny_if_path: Path, workdir: Path
) -> None:
    """``perp_neg_eval_prob: 0.5`` with ``one``: each call evaluates 2 rows per sample plus one
    per sample whose keep draw came out below p, so between 2B and 3B rows, and over a few calls
    both kept and dropped samples occur (the draws are the seeded generator's)."""
    model = tiny_if_path if name == IF else tiny_sd_path
    cfg = {**CONTROLS, "perp_neg_weight_scale": 1.0, "perp_neg_eval_prob": 0.5}
    guidance = _guidance(name, model, seed=0, **cfg)
    assert guidance.perp_neg_controls.eval_prob == 0.5
    prompt_utils = _processor(name, model)
    el = torch.tensor([0.0, 10.0, 5.0])
    az = torch.tensor([10.0, 100.0, 170.0])
    batch = {"elevation": el, "azimuth": az, "camera_distances": torch.full_like(el, 1.5)}
    if name == VSD:
        g = torch.Generator().manual_seed(0)
        batch.update(
            mvp_mtx=torch.randn(3, 4, 4, generator=g), c2w=torch.randn(3, 4, 4, generator=g)
        )
    branches = []
    for _ in range(4):
        out = guidance(torch.rand(3, 32, 32, 3), prompt_utils, **batch, rgb_as_latents=False)
        branches.append(out["perp_neg_branches"])
    assert all(6 <= b <= 9 for b in branches), branches
    assert sum(branches) - 6 * 4 not in (0, 12), branches  # some kept, some dropped


def test_epoch_schedule_agrees_with_c(tiny_sd_path: Path) -> None:
    schedule = [0, 2.0, 0.0, 4.0]  # a float end step counts epochs, as in threestudio
    guidance = _guidance(SD, tiny_sd_path, perp_neg_weight_scale=schedule)
    for epoch in range(6):
        guidance.update_step(epoch, 123)
        expected = C(guidance.cfg.perp_neg_weight_scale, epoch, 123)
        assert guidance.perp_neg_controls.weight_scale == pytest.approx(expected, abs=1e-12)
        assert resolve_schedule(schedule, epoch, 123) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("name", [SD, IF, VSD])
@pytest.mark.parametrize(
    "cfg,key",
    [
        ({"perp_neg_weight_scale": [0, 1.0, 0.5, 100, 7]}, "perp_neg_weight_scale"),
        ({"perp_neg_weight_scale": -1.0}, "perp_neg_weight_scale"),
        ({"perp_neg_t_range": [0.9, 0.1]}, "perp_neg_t_range"),
        ({"perp_neg_t_range": [0.0, 1.5]}, "perp_neg_t_range"),
        ({"perp_neg_sampling": "two"}, "perp_neg_sampling"),
        ({"perp_neg_eval_prob": 0.0}, "perp_neg_eval_prob"),
        ({"perp_neg_eval_prob": 1.5}, "perp_neg_eval_prob"),
    ],
)
def test_bad_values_fail_at_configure_in_one_line(
    name: str, cfg: Dict[str, Any], key: str, tmp_path: Path
) -> None:
    # A model folder that does not exist: the check must come before any loading.
    with pytest.raises(ValueError) as info:
        _guidance(name, tmp_path / "no-model", **cfg)
    msg = str(info.value)
    assert msg.startswith(f"{key}:") and "\n" not in msg, msg


def test_dreamfusion_system_logs_the_weight_scale(tiny_sd_path: Path, tmp_path: Path) -> None:
    system, dm = make_dreamfusion_system(
        REPO / "configs" / "perpneg-dreamfusion.yaml",
        tiny_sd_path,
        tmp_path,
        [
            "data.batch_size=2",
            "system.guidance.perp_neg_weight_scale=[0,1.0,0.0,2]",
            "system.guidance.perp_neg_sampling=one",
        ],
        extensions=[SHIM],
    )
    losses = fit_steps(system, dm, 2)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    metrics = system.trainer.callback_metrics
    # The last step is global step 1: λ = 1 + (0 − 1)·(1 − 0)/(2 − 0) = 0.5.
    assert float(metrics["train/perp_neg_weight_scale"]) == pytest.approx(0.5)
    assert 2 * 2 <= float(metrics["train/perp_neg_branches"]) <= 3 * 2
