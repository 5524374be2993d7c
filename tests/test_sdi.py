"""Tests of Score Distillation via Inversion with Perp-Neg (``threestudio_perpneg.engines.sdi``).

The references are written out here: the inversion grid from the SDI paper's / threestudio's rules,
and the guided DDIM inversion sample by sample, branch by branch (direct single-row UNet calls,
the projection and the DDIM update written from their formulas), so they share no batching,
combination or scheduling code with the engine. Runs in both envs, no threestudio needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch
from test_sd import bucket, cameras, eps, expected_negatives, make_bank, perp, record_unet
from torch import Tensor

from threestudio_perpneg.core.conditioning import PromptBank, StepConditioning, step_conditioning
from threestudio_perpneg.core.controls import PerpNegControls
from threestudio_perpneg.core.text import text_embeddings, view_prompts
from threestudio_perpneg.core.views import AuthorsScheme, ThreestudioScheme, view_weights
from threestudio_perpneg.engines.sd import PerpNegSDSEngine, load_stable_diffusion
from threestudio_perpneg.engines.sdi import DDIMInversion, SDISettings, invert_noise, sdi_step

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

SCHEMES = {"threestudio": ThreestudioScheme(), "authors": AuthorsScheme()}
# front, side, back
CAMS = cameras([0.0, 10.0, 5.0], [10.0, 100.0, -170.0])
SIZE = 16  # latent side: the UNet is convolutional, 16x16 keeps every call cheap


@pytest.fixture(scope="module")
def engine(tiny_sd_path: Path) -> PerpNegSDSEngine:
    return PerpNegSDSEngine(*load_stable_diffusion(str(tiny_sd_path)))


@pytest.fixture(scope="module")
def bank(tiny_sd_path: Path, tmp_path_factory: pytest.TempPathFactory) -> PromptBank:
    prompts = ["a corgi", "", *view_prompts("a corgi"), "blurry", "low quality"]
    emb = text_embeddings(str(tiny_sd_path), prompts, tmp_path_factory.mktemp("sdi-emb"))
    return make_bank(emb)  # user negatives: blurry -0.5 and a zero-weight one


def _latents(batch: int, seed: int = 0) -> Tensor:
    return torch.randn(batch, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the schedule
class _Config(dict):
    __getattr__ = dict.__getitem__


class _Scheduler:
    def __init__(self, **cfg: Any) -> None:
        base = {"num_train_timesteps": 1000, "set_alpha_to_one": False, "steps_offset": 1}
        self.config = _Config({**base, **cfg})
        self.alphas_cumprod = torch.linspace(0.999, 0.01, 1000)


@pytest.mark.parametrize(
    "cfg,n,t,delta,expected",
    [
        # leading grid 1, 101, ..., 901: one grid step before it, those below t, then t + δ
        ({}, 10, 500, 13, [-99, 1, 101, 201, 301, 401, 513]),
        ({}, 10, 401, 0, [-99, 1, 101, 201, 301, 401]),
        ({}, 4, 990, 99, [-249, 1, 251, 501, 751, 999]),  # t + δ capped at T − 1
        ({}, 10, 1, 5, [-99, 6]),  # nothing below t: straight from the start to t + δ
        # trailing grid 99, 199, ..., 999
        ({"timestep_spacing": "trailing"}, 10, 500, 7, [-1, 99, 199, 299, 399, 499, 507]),
    ],
)
def test_inversion_schedule(cfg: Dict[str, Any], n: int, t: int, delta: int, expected: List[int]):
    assert DDIMInversion(_Scheduler(**cfg), n).schedule(t, delta) == expected


def test_delta_is_below_one_grid_step():
    inv = DDIMInversion(_Scheduler(), 10)
    assert [inv.delta(u) for u in (0.0, 0.0099, 0.5, 0.999999)] == [0, 0, 50, 99]


@pytest.mark.parametrize(
    "cfg,key",
    [
        ({"timestep_spacing": "linspace"}, "timestep_spacing"),
        ({"prediction_type": "flow"}, "prediction_type"),
        ({"thresholding": True}, "thresholding"),
    ],
)
def test_unsupported_scheduler_config_names_the_key(cfg: Dict[str, Any], key: str):
    with pytest.raises(ValueError, match=key):
        DDIMInversion(_Scheduler(**cfg), 10)


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"inversion_n_steps": 0}, "inversion_n_steps"),
        ({"inversion_eta": -0.1}, "inversion_eta"),
        ({"inversion_guidance_scale": float("nan")}, "inversion_guidance_scale"),
        ({"scale_convention": "x"}, "guidance_scale_convention"),
        ({"n_ddim_steps": 1.5}, "n_ddim_steps"),
    ],
)
def test_bad_settings_name_the_key(kwargs: Dict[str, Any], key: str):
    with pytest.raises(ValueError, match=key):
        SDISettings(**kwargs)


# --------------------------------------------------------------------------- conditioning
def test_take_keeps_each_samples_own_negatives(bank: PromptBank):
    cond = step_conditioning(bank, CAMS["elevation"], CAMS["azimuth"], scheme=AuthorsScheme())
    sub = cond.take(torch.tensor([2, 0]))
    for new, old in ((0, 2), (1, 0)):
        mine = sub.negative_index == new
        theirs = cond.negative_index == old
        assert torch.equal(sub.negative[mine], cond.negative[theirs])
        assert torch.equal(sub.negative_weight[mine], cond.negative_weight[theirs])
        assert torch.equal(sub.positive[new], cond.positive[old])
    assert sub.negative.shape[0] == int((cond.negative_index != 1).sum())
    assert torch.equal(cond.select(1).negative, cond.negative[cond.negative_index == 1])


# ------------------------------------------------------------- the inversion, per sample
def _reference_eps(
    unet: Any, bank: PromptBank, scheme: Any, x: Tensor, t: int, i: int, scale: float
) -> Tensor:
    """ε̂ of sample i of CAMS at latent x ``[4, h, w]`` and timestep t, one UNet row per branch."""
    el, az = CAMS["elevation"], CAMS["azimuth"]
    vw = view_weights(el, az, scheme)
    negs = expected_negatives(bank, scheme, {"elevation": el, "azimuth": az})[i]
    view = bucket(float(el[i]), float(az[i]))
    positive = (vw.positive_mix[i].view(4, 1, 1) * bank.views).sum(0)
    embs = [bank.uncond[view], positive, *(emb for emb, _ in negs)]
    e_u, e_pos, *e_neg = eps(unet, [(x, torch.tensor(t), emb) for emb in embs])
    d_pos = e_pos - e_u
    total = d_pos.clone()
    for e_n, (_, w) in zip(e_neg, negs):
        total += w * perp(e_n - e_u, d_pos)
    return e_u + scale * total


def _alpha(scheduler: Any, t: int) -> Tensor:
    # set_alpha_to_one is false in SD's (and the tiny) scheduler: before step 0 is ᾱ_0.
    return scheduler.alphas_cumprod[max(t, 0)]


def _reference_inversion(
    engine: PerpNegSDSEngine,
    bank: PromptBank,
    scheme: Any,
    latents: Tensor,
    schedules: List[List[int]],
    z: List[Tensor],
    eta: float,
    scale: float,
) -> Tuple[Tensor, Tensor]:
    """(x_K, ε_inv), sample by sample: DDIM inversion x_{k+1} = √ᾱ' x̂_0 + √(1−ᾱ') ε̂ + η σ z."""
    xs, noises = [], []
    for i, sched in enumerate(schedules):
        x = latents[i]
        for k, (t, t_next) in enumerate(zip(sched[:-1], sched[1:])):
            e = _reference_eps(engine.unet, bank, scheme, x, t, i, scale)
            a, a_next = _alpha(engine.scheduler, t), _alpha(engine.scheduler, t_next)
            x0 = (x - (1 - a).sqrt() * e) / a.sqrt()
            sigma2 = (1 - a) / (1 - a_next) * (1 - a_next / a)
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * e
            if eta:
                x = x + eta * sigma2.sqrt() * z[k][i]
        a_end = _alpha(engine.scheduler, sched[-1])
        xs.append(x)
        noises.append((x - a_end.sqrt() * latents[i]) / (1 - a_end).sqrt())
    return torch.stack(xs), torch.stack(noises)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_batched_inversion_equals_per_sample_reference(
    engine: PerpNegSDSEngine, bank: PromptBank, scheme: str
):
    """Front, side and back cameras at one t (t_anneal), with η noise from a private generator."""
    settings = SDISettings(inversion_n_steps=4, inversion_eta=0.3)
    inv = DDIMInversion(engine.scheduler, 4)
    cond = step_conditioning(
        bank, CAMS["elevation"], CAMS["azimuth"], scheme=SCHEMES[scheme], min_weight=0.0
    )
    latents, t = _latents(3), torch.tensor([620, 620, 620])
    with record_unet(engine.unet) as calls:
        got = invert_noise(
            engine, inv, latents, t, cond, settings, generator=torch.Generator().manual_seed(4)
        )
    # The spec's draws from the same generator: δ's uniform, then one z of the batch per step.
    g = torch.Generator().manual_seed(4)
    delta = int(float(torch.rand(1, generator=g, dtype=torch.float64)) * 1000 // 4)
    schedule = [-249, 1, 251, 501, 620 + delta]
    z = [torch.randn(3, 4, SIZE, SIZE, generator=g) for _ in schedule[1:]]
    want_x, want_noise = _reference_inversion(
        engine, bank, SCHEMES[scheme], latents, [schedule] * 3, z, 0.3, settings.inversion_scale
    )
    assert got.steps == [4, 4, 4] and got.t_end.tolist() == [620 + delta] * 3
    torch.testing.assert_close(got.latents_noisy, want_x, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.noise, want_noise, rtol=1e-4, atol=1e-4)
    # Every step is one UNet call of 2 rows per sample plus its non-zero-weight negatives only.
    n_neg = [len(n) for n in expected_negatives(bank, SCHEMES[scheme], CAMS)]
    assert [c[0].shape[0] for c in calls] == [6 + sum(n_neg)] * 4
    assert all(n >= 1 for n in n_neg)  # the check has negatives to get wrong


def test_samples_with_different_t_follow_their_own_schedules(
    engine: PerpNegSDSEngine, bank: PromptBank
):
    """t_anneal off: each sample inverts to its own t (threestudio's SDI handles batch 1 only)."""
    settings = SDISettings(inversion_n_steps=4, inversion_eta=0.0)
    inv = DDIMInversion(engine.scheduler, 4)
    scheme = ThreestudioScheme()
    cond = step_conditioning(bank, CAMS["elevation"], CAMS["azimuth"], scheme=scheme)
    latents, t = _latents(3, seed=1), torch.tensor([100, 700, 400])
    with record_unet(engine.unet) as calls:
        got = invert_noise(
            engine, inv, latents, t, cond, settings, generator=torch.Generator().manual_seed(2)
        )
    g = torch.Generator().manual_seed(2)
    delta = int(float(torch.rand(1, generator=g, dtype=torch.float64)) * 1000 // 4)
    schedules = [inv.schedule(int(x), delta) for x in t]
    assert schedules[0] == [-249, 1, 100 + delta] and schedules[1][-2] == 501
    want_x, want_noise = _reference_inversion(
        engine, bank, scheme, latents, schedules, [], 0.0, settings.inversion_scale
    )
    torch.testing.assert_close(got.latents_noisy, want_x, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.noise, want_noise, rtol=1e-4, atol=1e-4)
    assert got.steps == [2, 4, 3]
    n_neg = [len(n) for n in expected_negatives(bank, scheme, CAMS)]
    rows = [2 * len(a) + sum(n_neg[b] for b in a) for a in ([0, 1, 2], [0, 1, 2], [1, 2], [1])]
    assert [c[0].shape[0] for c in calls] == rows


def _step(engine: PerpNegSDSEngine, cond: StepConditioning, **kwargs: Any) -> Dict[str, Any]:
    lat = _latents(3, seed=3).permute(0, 2, 3, 1).contiguous().requires_grad_(True)
    out = sdi_step(
        engine,
        DDIMInversion(engine.scheduler, 3),
        lat,
        cond,
        SDISettings(inversion_n_steps=3),
        min_step=500,
        max_step=500,
        rgb_as_latents=True,
        generator=torch.Generator().manual_seed(0),
        **CAMS,
        **kwargs,
    )
    out["grad"] = torch.autograd.grad(out["loss_sdi"], [lat])[0]
    return out


def test_loss_is_half_the_mean_square_to_the_x0_target_over_b(
    engine: PerpNegSDSEngine, bank: PromptBank
):
    cond = step_conditioning(bank, CAMS["elevation"], CAMS["azimuth"], scheme=AuthorsScheme())
    out = _step(engine, cond, test_info=True)
    lat = _latents(3, seed=3)
    lat64 = torch.nn.functional.interpolate(lat, (64, 64), mode="bilinear", align_corners=False)
    target = out["target_latent"]
    assert out["noise_pred"].shape == lat64.shape and out["target"].shape == (512, 512, 3)
    assert float(out["loss_sdi"].detach()) == pytest.approx(
        float(0.5 * ((lat64 - target) ** 2).mean() / 3), rel=1e-5
    )
    assert float(out["grad_norm"].detach()) == pytest.approx(
        float((lat64 - target).norm()), rel=1e-5
    )
    # d loss / d latents = (latents − x̂_0) / (3·N), pulled back through the 16 → 64 resize
    x = lat.permute(0, 2, 3, 1).clone().requires_grad_(True)
    up = torch.nn.functional.interpolate(
        x.permute(0, 3, 1, 2), (64, 64), mode="bilinear", align_corners=False
    )
    (want,) = torch.autograd.grad((up * (lat64 - target) / (3 * lat64.numel())).sum(), [x])
    torch.testing.assert_close(out["grad"], want, rtol=1e-5, atol=1e-9)


def test_controls_act_on_inversion_and_score(engine: PerpNegSDSEngine, bank: PromptBank):
    cond = step_conditioning(bank, CAMS["elevation"], CAMS["azimuth"], scheme=AuthorsScheme())
    n_neg = int(cond.negative.shape[0])
    calls_per_step = 3 + 1  # schedule [-332, 1, 334, 500 + δ]: 3 inversion steps, then the score
    full = _step(engine, cond)
    assert full["perp_neg_branches"] == calls_per_step * (6 + n_neg)
    off = _step(engine, cond, controls=PerpNegControls(weight_scale=0.0))
    assert off["perp_neg_branches"] == calls_per_step * 6
    one = _step(engine, cond, controls=PerpNegControls(sampling="one"))
    assert one["perp_neg_branches"] == calls_per_step * 9  # 3 rows per sample, every call
    # window [0.4, 1]: negatives only where t_k / 1000 >= 0.4: the score at t = 500, not the
    # inversion steps at -332 (gated as 0), 1 and 334
    gated = _step(engine, cond, controls=PerpNegControls(t_range=(0.4, 1.0)))
    assert gated["perp_neg_branches"] == 6 * 4 + n_neg
    assert float(off["loss_sdi"].detach()) != pytest.approx(
        float(full["loss_sdi"].detach()), rel=1e-6
    )
