"""Gradients of the SD, VSD and IF steps against references written here from the formulas.

Every reference calls the models directly (UNet, VAE, the LoRA model's forward) on inputs built in the
test and combines the predictions with the formula written out below; nothing calls the engines'
combination, noising, decoding or loss code. Signs are checked separately: a descent step must move
the render towards the pretrained model's denoised estimate.

* SD HiFA image loss: d loss_sds_img / d x_512 = w·(x − x̂₀(ε̂))·√ᾱ/σ / B, x̂₀ = D((z_t − σ ε̂)/√ᾱ).
* VSD: d loss_vsd / d z = w·(ε̂_pre − ε̂_lora) / B; image space: w·(x̂₀(ε̂_lora) − x̂₀(ε̂_pre))·√ᾱ/σ / B.
* IF: renders in [0, 1] become x = 2·rgb − 1 at 64×64 (bilinear), and d loss_sds / d x = w·(ε̂ − ε) / B.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterator, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from threestudio_perpneg.core.conditioning import PromptBank, step_conditioning
from threestudio_perpneg.core.views import BACK, FRONT, SIDE, ThreestudioScheme
from threestudio_perpneg.engines.pixel import PerpNegIFEngine, if_sds_step, load_deepfloyd_if
from threestudio_perpneg.engines.sd import (
    PerpNegSDSEngine,
    SDSSettings,
    load_stable_diffusion,
    sds_step,
)
from threestudio_perpneg.engines.vsd import LoRAUNet, VSDSettings, vsd_step

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

L, D = 8, 32  # tiny SD: sequence length of the random embeddings, cross_attention_dim
# front, back, side cameras; threestudio's buckets (front |az| < 45, back |az| > 135)
ELEVATION = torch.tensor([10.0, 0.0, 20.0])
AZIMUTH = torch.tensor([10.0, 170.0, 100.0])
VIEWS = [FRONT, BACK, SIDE]
T = torch.tensor([250, 700, 480])
MIN_STEP, MAX_STEP = 20, 980


# ---------------------------------------------------------------------------------- references
def alpha_sigma(scheduler: Any, t: Tensor) -> Tuple[Tensor, Tensor]:
    ac = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    return ac.sqrt(), (1 - ac).sqrt()


@torch.no_grad()
def cfg_eps(unet: Any, x: Tensor, t: Tensor, cond: Tensor, uncond: Tensor, s: float) -> Tensor:
    """ε_u + s·(ε_c − ε_u), the first x.shape[1] output channels, one UNet call per branch."""
    c = x.shape[1]
    e_c = unet(x, t.float(), encoder_hidden_states=cond).sample[:, :c]
    e_u = unet(x, t.float(), encoder_hidden_states=uncond).sample[:, :c]
    return e_u + s * (e_c - e_u)


@torch.no_grad()
def decode(vae: Any, z: Tensor) -> Tensor:
    """Image in [0, 1] of 64×64 latents."""
    return (vae.decode(z / vae.config.scaling_factor).sample * 0.5 + 0.5).clamp(0, 1)


@torch.no_grad()
def posterior_sample(vae: Any, rgb_bchw_512: Tensor, seed: int) -> Tensor:
    """The latents a step draws first from a generator seeded with ``seed``."""
    dist = vae.encode(rgb_bchw_512 * 2 - 1).latent_dist
    return dist.sample(generator=torch.Generator().manual_seed(seed)) * vae.config.scaling_factor


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def bank() -> PromptBank:
    g = torch.Generator().manual_seed(1)
    return PromptBank(
        prompt=torch.randn(L, D, generator=g),
        views=torch.randn(4, L, D, generator=g),
        uncond=torch.randn(4, L, D, generator=g),  # a different baseline per view
        negatives=torch.zeros(0, L, D),
        negative_weights=torch.zeros(0),
    )


@pytest.fixture(scope="module")
def sd(tiny_sd_path: Path) -> PerpNegSDSEngine:
    return PerpNegSDSEngine(*load_stable_diffusion(str(tiny_sd_path)))


@pytest.fixture(scope="module")
def vsd_models(tiny_sd_path: Path) -> Tuple[PerpNegSDSEngine, LoRAUNet, Any]:
    """A second copy of the checkpoint: the pretrained UNet shared with a LoRA model."""
    from diffusers import DDPMScheduler

    unet, vae, scheduler = load_stable_diffusion(str(tiny_sd_path))
    torch.manual_seed(0)
    lora = LoRAUNet(unet)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in lora.lora_layers.named_parameters():
            if name.endswith("up.weight"):  # zero at init: ε̂_lora would be the pretrained ε
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    lora_scheduler = DDPMScheduler.from_pretrained(str(tiny_sd_path), subfolder="scheduler")
    return PerpNegSDSEngine(unet, vae, scheduler), lora, lora_scheduler


@pytest.fixture(autouse=True)
def _lora_unchanged(request: pytest.FixtureRequest) -> Iterator[None]:
    if "vsd_models" not in request.fixturenames:
        yield
        return
    lora = request.getfixturevalue("vsd_models")[1]
    state = copy.deepcopy(lora.state_dict())
    yield
    lora.load_state_dict(state)
    lora.zero_grad(set_to_none=True)


def plain_cond(bank: PromptBank, b: int):
    return step_conditioning(
        bank, ELEVATION[:b], AZIMUTH[:b], scheme=ThreestudioScheme(), perp_neg=False
    )


# ----------------------------------------------------------------------------- SD HiFA image loss
def test_sd_image_loss_gradient_and_sign(sd: PerpNegSDSEngine, bank: PromptBank) -> None:
    b, s, seed = 2, 7.5, 5
    rgb = torch.rand(b, 512, 512, 3, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(b, 4, 64, 64, generator=torch.Generator().manual_seed(1))
    t = T[:b]
    x = rgb.clone().requires_grad_(True)
    out = sds_step(
        sd,
        x,
        plain_cond(bank, b),
        SDSSettings(guidance_scale=s, scale_convention="cfg", use_img_loss=True),
        min_step=MIN_STEP,
        max_step=MAX_STEP,
        elevation=ELEVATION[:b],
        azimuth=AZIMUTH[:b],
        camera_distances=torch.full((b,), 1.5),
        generator=torch.Generator().manual_seed(seed),  # only the VAE sample: t, noise given
        t=t,
        noise=noise,
    )
    out["loss_sds_img"].backward()

    x512 = rgb.permute(0, 3, 1, 2)  # 512 px already: the resize is the identity
    z = posterior_sample(sd.vae, x512, seed)
    a, sigma = alpha_sigma(sd.scheduler, t)
    z_t = a * z + sigma * noise
    views = torch.tensor(VIEWS[:b])
    e_hat = cfg_eps(sd.unet, z_t, t, bank.views[views], bank.uncond[views], s)
    x0 = decode(sd.vae, (z_t - sigma * e_hat) / a)
    w = 1 - a**2
    expected = w * (x512 - x0) * a / sigma / b
    got = x.grad.permute(0, 3, 1, 2)
    assert rel(got, expected) < 1e-4
    # Sign: a descent step moves the render towards the denoised estimate x̂₀.
    assert float((got * (x0 - x512)).sum()) < 0


# ------------------------------------------------------------------------------------------ VSD
def _lora_eps(
    lora: LoRAUNet, sched: Any, z_t: Tensor, t: Tensor, prompt: Tensor, cam: Tensor, s: float
):
    """ε̂_lora = ε(∅) + s·(ε(cam) − ε(∅)); a v prediction becomes ε = σ·z_t + √ᾱ·v."""
    with torch.no_grad():
        out_cam = lora(z_t, t, prompt, cam.reshape(cam.shape[0], -1))
        out_zero = lora(z_t, t, prompt, torch.zeros(cam.shape[0], 16))
    if sched.config.prediction_type == "v_prediction":
        a, sigma = alpha_sigma(sched, t)
        out_cam, out_zero = sigma * z_t + a * out_cam, sigma * z_t + a * out_zero
    return out_zero + s * (out_cam - out_zero)


def _vsd_inputs(b: int):
    g = torch.Generator().manual_seed(7)
    return {
        "noise": torch.randn(b, 4, 64, 64, generator=g),
        "t_lora": torch.randint(0, 1000, (b,), generator=g),
        "noise_lora": torch.randn(b, 4, 64, 64, generator=g),
        "camera": torch.randn(b, 4, 4, generator=g),
    }


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_vsd_latent_gradient_and_lora_loss(vsd_models, bank: PromptBank, prediction: str) -> None:
    from diffusers import DDPMScheduler

    engine, lora, base_sched = vsd_models
    sched = DDPMScheduler.from_config(base_sched.config, prediction_type=prediction)
    b, s, s_lora = 3, 7.5, 1.5
    inp = _vsd_inputs(b)
    z = torch.randn(b, 4, 64, 64, generator=torch.Generator().manual_seed(2))
    x = z.permute(0, 2, 3, 1).clone().requires_grad_(True)  # rgb_as_latents at 64 px: identity
    prompt = bank.prompt.expand(b, -1, -1)
    out = vsd_step(
        engine,
        lora,
        sched,
        x,
        plain_cond(bank, b),
        prompt,
        inp["camera"],
        VSDSettings(guidance_scale=s, guidance_scale_lora=s_lora),
        min_step=MIN_STEP,
        max_step=MAX_STEP,
        rgb_as_latents=True,
        t=T[:b],
        noise=inp["noise"],
        t_lora=inp["t_lora"],
        noise_lora=inp["noise_lora"],
        drop_camera=False,
    )
    out["loss_vsd"].backward()

    t = T[:b]
    a, sigma = alpha_sigma(engine.scheduler, t)
    z_t = a * z + sigma * inp["noise"]
    views = torch.tensor(VIEWS[:b])
    e_pre = cfg_eps(engine.unet, z_t, t, bank.views[views], bank.uncond[views], s)
    e_lora = _lora_eps(lora, sched, z_t, t, prompt, inp["camera"], s_lora)
    expected = (1 - a**2) * (e_pre - e_lora) / b
    got = x.grad.permute(0, 3, 1, 2)
    assert rel(expected, (1 - a**2) * e_pre / b) > 1e-2  # the LoRA branch matters here
    assert rel(got, expected) < 1e-4

    # loss_lora: the LoRA model's denoising loss on the clean latents, ε or v target.
    a_l, sigma_l = alpha_sigma(sched, inp["t_lora"])
    n = inp["noise_lora"]
    target = n if prediction == "epsilon" else a_l * n - sigma_l * z
    with torch.no_grad():
        pred = lora(a_l * z + sigma_l * n, inp["t_lora"], prompt, inp["camera"].reshape(b, -1))
    assert float(out["loss_lora"].detach()) == pytest.approx(
        float(F.mse_loss(pred, target)), rel=1e-4
    )


def test_vsd_image_loss_gradient_and_sign(vsd_models, bank: PromptBank) -> None:
    engine, lora, sched = vsd_models
    b, s, s_lora, seed = 2, 7.5, 1.0, 9
    inp = _vsd_inputs(b)
    rgb = torch.rand(b, 512, 512, 3, generator=torch.Generator().manual_seed(4))
    x = rgb.clone().requires_grad_(True)
    prompt = bank.prompt.expand(b, -1, -1)
    out = vsd_step(
        engine,
        lora,
        sched,
        x,
        plain_cond(bank, b),
        prompt,
        inp["camera"],
        VSDSettings(guidance_scale=s, guidance_scale_lora=s_lora, use_img_loss=True),
        min_step=MIN_STEP,
        max_step=MAX_STEP,
        generator=torch.Generator().manual_seed(seed),  # only the VAE sample: the rest is given
        t=T[:b],
        noise=inp["noise"],
        t_lora=inp["t_lora"],
        noise_lora=inp["noise_lora"],
        drop_camera=False,
    )
    out["loss_vsd_img"].backward()

    t = T[:b]
    x512 = rgb.permute(0, 3, 1, 2)
    z = posterior_sample(engine.vae, x512, seed)
    a, sigma = alpha_sigma(engine.scheduler, t)
    z_t = a * z + sigma * inp["noise"]
    views = torch.tensor(VIEWS[:b])
    e_pre = cfg_eps(engine.unet, z_t, t, bank.views[views], bank.uncond[views], s)
    e_lora = _lora_eps(lora, sched, z_t, t, prompt, inp["camera"], s_lora)
    img_pre = decode(engine.vae, (z_t - sigma * e_pre) / a)
    img_lora = decode(engine.vae, (z_t - sigma * e_lora) / a)
    expected = (1 - a**2) * (img_lora - img_pre) * a / sigma / b
    got = x.grad.permute(0, 3, 1, 2)
    assert float(expected.norm()) > 0
    assert rel(got, expected) < 1e-4
    # Sign: descent moves the render from the LoRA's estimate towards the pretrained one.
    assert float((got * (img_pre - img_lora)).sum()) < 0


# -------------------------------------------------------------------------------- IF input map
@pytest.fixture(scope="module")
def deepfloyd(tmp_path_factory: pytest.TempPathFactory) -> Tuple[PerpNegIFEngine, PromptBank]:
    from threestudio_perpneg.core.text import text_embeddings, view_prompts
    from threestudio_perpneg.tiny.builders import build_tiny_deepfloyd_if

    path = build_tiny_deepfloyd_if(tmp_path_factory.mktemp("tiny-if-ref") / "model", seed=0)
    engine = PerpNegIFEngine(*load_deepfloyd_if(str(path)))
    views = view_prompts("a corgi")
    emb = text_embeddings(str(path), ["a corgi", "", *views], None, encoder="t5")
    return engine, PromptBank.from_embeddings(emb, "a corgi", "", views)


@pytest.mark.parametrize("size", [32, 64, 100])
def test_if_maps_renders_to_minus_one_one_at_64px(deepfloyd, size: int) -> None:
    engine, bank = deepfloyd
    b, s = 2, 5.0
    rgb = torch.rand(b, size, size, 3, generator=torch.Generator().manual_seed(size))
    noise = torch.randn(b, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    t = T[:b]
    x = rgb.clone().requires_grad_(True)
    out = if_sds_step(
        engine,
        x,
        plain_cond(bank, b),
        SDSSettings(guidance_scale=s, scale_convention="cfg"),
        min_step=MIN_STEP,
        max_step=MAX_STEP,
        elevation=ELEVATION[:b],
        azimuth=AZIMUTH[:b],
        camera_distances=torch.full((b,), 1.5),
        t=t,
        noise=noise,
    )
    out["loss_sds"].backward()

    r = rgb.clone().requires_grad_(True)
    x64 = F.interpolate(r.permute(0, 3, 1, 2), (64, 64), mode="bilinear", align_corners=False)
    x64 = x64 * 2 - 1
    a, sigma = alpha_sigma(engine.scheduler, t)
    views = torch.tensor(VIEWS[:b])
    e_hat = cfg_eps(
        engine.unet, a * x64.detach() + sigma * noise, t, bank.views[views], bank.uncond[views], s
    )
    g = (1 - a**2) * (e_hat - noise)
    (x64 * g).sum().div(b).backward()
    assert rel(x.grad, r.grad) < 1e-4
