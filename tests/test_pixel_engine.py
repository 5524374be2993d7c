"""The pixel-space engine generalised beyond DeepFloyd IF: ε-only UNets at their native resolution.

A tiny seeded UNet with 3 output channels (no learned variance) and ``sample_size`` 16, a DDPM
scheduler with a fixed variance (the Janus testbed prior's layout). IF's own behaviour (6 channels,
64 px) is covered unchanged by ``test_deepfloyd.py``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from threestudio_perpneg.core.conditioning import PromptBank, step_conditioning
from threestudio_perpneg.core.text import view_prompts
from threestudio_perpneg.core.views import make_scheme
from threestudio_perpneg.engines.pixel import (
    IF_RESOLUTION,
    PerpNegIFEngine,
    if_sds_step,
    native_resolution,
)
from threestudio_perpneg.engines.sd import SDSSettings

PROMPT = "a head"
VIEWS = view_prompts(PROMPT)
DIM = 32
SIZE = 16

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _unet(out_channels: int = 3, sample_size: int = SIZE):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=3,
        out_channels=out_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=16,
        cross_attention_dim=DIM,
        attention_head_dim=8,
    )
    return unet.eval().requires_grad_(False)


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        variance_type="fixed_small",
        clip_sample=True,
    )


@pytest.fixture(scope="module")
def engine() -> PerpNegIFEngine:
    return PerpNegIFEngine(_unet(), _scheduler())


@pytest.fixture(scope="module")
def bank() -> PromptBank:
    gen = torch.Generator().manual_seed(1)
    emb = {p: torch.randn(8, DIM, generator=gen) for p in [PROMPT, "", *VIEWS]}
    return PromptBank.from_embeddings(emb, PROMPT, "", VIEWS)


def _cams(azimuth):
    az = torch.tensor(azimuth, dtype=torch.float32)
    return torch.zeros_like(az), az, torch.full_like(az, 3.0)


def _cond(bank, cams, perp_neg=True):
    el, az, _ = cams
    return step_conditioning(bank, el, az, scheme=make_scheme("authors"), perp_neg=perp_neg)


def test_native_resolution_reads_sample_size():
    assert native_resolution(SimpleNamespace(config=SimpleNamespace(sample_size=24))) == 24
    assert native_resolution(SimpleNamespace(config=SimpleNamespace(sample_size=[32, 32]))) == 32
    assert IF_RESOLUTION == 64  # IF stage I's sample_size: its renders are still resized to 64
    for bad in (None, 0, 16.0, True, (16, 32)):
        with pytest.raises(ValueError, match="sample_size"):
            native_resolution(SimpleNamespace(config=SimpleNamespace(sample_size=bad)))


def test_engine_resolution_follows_the_unet(engine):
    assert engine.resolution == SIZE
    assert PerpNegIFEngine(_unet(sample_size=32), _scheduler()).resolution == 32


def test_cfg_step_equals_an_independent_reference(engine, bank):
    """Renders resized to 16 px; ε̂ = ε_c + s(ε_c − ε_u); loss 0.5·‖w(t)(ε̂ − ε)‖² / B."""
    cams = _cams([0.0, 180.0])
    cond = _cond(bank, cams, perp_neg=False)
    gen = torch.Generator().manual_seed(2)
    rgb = torch.rand(2, 40, 40, 3, generator=gen, requires_grad=True)
    noise = torch.randn(2, 3, SIZE, SIZE, generator=gen)
    t = torch.tensor([150, 700])
    settings = SDSSettings(guidance_scale=7.0)
    seen = []
    hook = engine.unet.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    try:
        el, az, dist = cams
        out = if_sds_step(
            engine, rgb, cond, settings, min_step=20, max_step=980, elevation=el, azimuth=az,
            camera_distances=dist, t=t, noise=noise,
        )  # fmt: skip
    finally:
        hook.remove()
    assert seen == [(4, 3, SIZE, SIZE)]  # one call: 2 branches x 2 samples at the native size

    with torch.no_grad():
        x = F.interpolate(rgb.permute(0, 3, 1, 2) * 2 - 1, (SIZE, SIZE), mode="bilinear")
        abar = engine.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = abar.sqrt() * x + (1 - abar).sqrt() * noise
        front_back = torch.stack([bank.views[1], bank.views[2]])  # side, front, back, overhead
        eps_c = engine.unet(x_t, t, encoder_hidden_states=front_back).sample
        eps_u = engine.unet(x_t, t, encoder_hidden_states=bank.uncond[[1, 2]]).sample
        eps_hat = eps_c + 7.0 * (eps_c - eps_u)
        grad = (1 - abar) * (eps_hat - noise)
    expected = 0.5 * grad.pow(2).sum() / 2
    assert float(out["loss_sds"]) == pytest.approx(float(expected), rel=1e-4)
    out["loss_sds"].backward()
    # d loss / d x = grad / B, pulled back through the resize.
    x_req = rgb.detach().clone().requires_grad_(True)
    x_small = F.interpolate(x_req.permute(0, 3, 1, 2) * 2 - 1, (SIZE, SIZE), mode="bilinear")
    (x_small * grad).sum().div(2).backward()
    # (batched vs separate UNet calls differ by float rounding, amplified by s = 8)
    torch.testing.assert_close(rgb.grad, x_req.grad, rtol=1e-3, atol=2e-5)


def test_perp_neg_has_no_variance_and_guidance_eval_steps_the_scheduler(engine, bank):
    cams = _cams([0.0, 170.0])
    cond = _cond(bank, cams)
    assert cond.perp_neg and cond.negative.shape[0] > 0
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    t = torch.tensor([30, 40])
    eps, variance = engine.guided_noise_and_variance(x, t, cond, 8.0)
    assert variance is None and eps.shape == x.shape
    assert engine.model_output(eps, variance) is eps

    el, az, dist = cams
    out = if_sds_step(
        engine, torch.rand(2, 24, 24, 3), cond, SDSSettings(guidance_scale=7.0), min_step=20,
        max_step=30, elevation=el, azimuth=az, camera_distances=dist, guidance_eval=True,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    ev = out["eval"]
    for key in ("imgs_noisy", "imgs_1step", "imgs_1orig", "imgs_final"):
        assert ev[key].shape == (2, SIZE, SIZE, 3) and torch.isfinite(ev[key]).all()
    assert engine.scheduler.num_inference_steps is None


def test_other_channel_counts_are_refused(bank):
    engine = PerpNegIFEngine(_unet(out_channels=5), _scheduler())
    cams = _cams([0.0])
    with pytest.raises(ValueError, match="unet: expected 3 .* or 6 .* got 5"):
        engine.guided_noise_and_variance(
            torch.zeros(1, 3, SIZE, SIZE), torch.tensor([10]), _cond(bank, cams), 7.0
        )
