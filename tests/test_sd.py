"""Tests of the Stable Diffusion score distillation step (``threestudio_perpneg.engines.sd``).

Everything runs on the real components of the tiny random checkpoint (``tiny_sd_path``): the UNet,
VAE and scheduler come from :func:`load_stable_diffusion`, the embeddings from
:func:`text_embeddings`. References (threestudio's vanilla SDS step, the Perp-Neg combination, the
SJC gradient, the branch bookkeeping) are written out here with direct UNet calls on rows built in
the test, so they share no batching or combination code with the engine.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from threestudio_perpneg.core.conditioning import PromptBank, StepConditioning, step_conditioning
from threestudio_perpneg.core.text import text_embeddings, view_prompts
from threestudio_perpneg.core.views import (
    BACK,
    FRONT,
    OVERHEAD,
    SIDE,
    AuthorsScheme,
    ThreestudioScheme,
    view_weights,
)
from threestudio_perpneg.engines.sd import (
    PerpNegSDSEngine,
    SDSSettings,
    branch_counts,
    effective_scale,
    load_stable_diffusion,
    sds_step,
)

PROMPT = "a corgi"
UNCOND = ""
# A weighted user negative and a zero-weight one, which must never reach the UNet.
USER_NEGATIVES: Tuple[Tuple[str, float], ...] = (("blurry", -0.5), ("low quality", 0.0))
SCALE = 7.5  # small enough that float noise of batched vs per-branch UNet calls stays tiny
MIN_STEP, MAX_STEP = 20, 980
TOL = {"rtol": 1e-4, "atol": 1e-4}

SCHEMES = {"threestudio": ThreestudioScheme(), "authors": AuthorsScheme()}


# --------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sd(tiny_sd_path: Path) -> Tuple[Any, Any, Any]:
    return load_stable_diffusion(str(tiny_sd_path))


@pytest.fixture(scope="module")
def engine(sd: Tuple[Any, Any, Any]) -> PerpNegSDSEngine:
    unet, vae, scheduler = sd
    return PerpNegSDSEngine(unet, vae, scheduler)


@pytest.fixture(scope="module")
def embeddings(tiny_sd_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Tensor]:
    prompts = [PROMPT, UNCOND, *view_prompts(PROMPT), *(p for p, _ in USER_NEGATIVES)]
    return text_embeddings(str(tiny_sd_path), prompts, tmp_path_factory.mktemp("sd-emb-cache"))


def make_bank(
    emb: Dict[str, Tensor], negatives: Sequence[Tuple[str, float]] = USER_NEGATIVES
) -> PromptBank:
    views = torch.stack([emb[p] for p in view_prompts(PROMPT)])
    ld = views.shape[1:]
    neg = torch.stack([emb[p] for p, _ in negatives]) if negatives else views.new_zeros((0, *ld))
    return PromptBank(
        prompt=emb[PROMPT],
        views=views,
        uncond=torch.stack([emb[UNCOND]] * 4),
        negatives=neg,
        negative_weights=torch.tensor([w for _, w in negatives], dtype=torch.float32),
    )


@pytest.fixture(scope="module")
def bank(embeddings: Dict[str, Tensor]) -> PromptBank:
    return make_bank(embeddings)


@pytest.fixture(scope="module")
def plain_bank(embeddings: Dict[str, Tensor]) -> PromptBank:
    return make_bank(embeddings, ())


# --------------------------------------------------------------------------------------- helpers
def cameras(elevation: Sequence[float], azimuth: Sequence[float]) -> Dict[str, Tensor]:
    el = torch.tensor(elevation, dtype=torch.float32)
    return {
        "elevation": el,
        "azimuth": torch.tensor(azimuth, dtype=torch.float32),
        "camera_distances": torch.full_like(el, 1.5),
    }


def draws(batch: int, seed: int, t: Sequence[int]) -> Tuple[Tensor, Tensor, Tensor]:
    """(latents, t, noise) of a deterministic step."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 64, 64, generator=g)
    noise = torch.randn(batch, 4, 64, 64, generator=g)
    return latents, torch.tensor(t, dtype=torch.long), noise


def latent_step(
    engine: PerpNegSDSEngine,
    latents: Tensor,
    cond: StepConditioning,
    settings: SDSSettings,
    cams: Dict[str, Tensor],
    t: Tensor,
    noise: Tensor,
    **kwargs: Any,
) -> Tuple[Dict[str, Any], Tensor]:
    """sds_step on leaf latents (``rgb_as_latents``); returns its output and B · d loss/d latents."""
    lat = latents.detach().clone().requires_grad_(True)
    out = sds_step(
        engine,
        lat.permute(0, 2, 3, 1),  # [B, 64, 64, 4]: the 64x64 resize is the identity
        cond,
        settings,
        min_step=MIN_STEP,
        max_step=MAX_STEP,
        rgb_as_latents=True,
        t=t,
        noise=noise,
        **cams,
        **kwargs,
    )
    out["loss_sds"].backward()
    assert lat.grad is not None
    return out, lat.grad * lat.shape[0]


def bucket(elevation: float, azimuth: float) -> int:
    """threestudio's default buckets: overhead > 60°, front |az| < 45°, back |az| > 135°."""
    az = abs((azimuth + 180.0) % 360.0 - 180.0)
    if elevation > 60.0:
        return OVERHEAD
    if az < 45.0:
        return FRONT
    if az > 135.0:
        return BACK
    return SIDE


@torch.no_grad()
def eps(unet: Any, rows: Sequence[Tuple[Tensor, Tensor, Tensor]]) -> List[Tensor]:
    """ε(x, t, emb) of each (x, t, emb) row, in one direct UNet call."""
    x = torch.stack([r[0] for r in rows])
    t = torch.stack([r[1].reshape(()) for r in rows]).float()
    emb = torch.stack([r[2] for r in rows])
    return list(unet(x, t, encoder_hidden_states=emb).sample)


def cfg_reference(
    unet: Any, x: Tensor, t: Tensor, cond: Sequence[Tensor], uncond: Sequence[Tensor]
) -> Tuple[Tensor, Tensor]:
    """(ε_c, ε_u) per sample, each sample's two branches on its own latent and timestep."""
    b = x.shape[0]
    out = eps(
        unet,
        [(x[i], t[i], cond[i]) for i in range(b)] + [(x[i], t[i], uncond[i]) for i in range(b)],
    )
    return torch.stack(out[:b]), torch.stack(out[b:])


def noisy(scheduler: Any, latents: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def perp(a: Tensor, b: Tensor) -> Tensor:
    return a - (a * b).sum() / (b * b).sum() * b


def expected_negatives(
    bank: PromptBank, scheme: Any, cams: Dict[str, Tensor]
) -> List[List[Tuple[Tensor, float]]]:
    """Per sample, the (embedding, weight) of every non-zero-weight negative."""
    vw = view_weights(cams["elevation"], cams["azimuth"], scheme)
    out = []
    for i in range(cams["elevation"].shape[0]):
        negs = [(bank.views[k], float(w)) for k, w in enumerate(vw.negative_weights[i]) if w != 0]
        negs += [
            (bank.negatives[j], float(w)) for j, w in enumerate(bank.negative_weights) if w != 0
        ]
        out.append(negs)
    return out


def reference_perp_neg_grad(
    unet: Any,
    scheduler: Any,
    bank: PromptBank,
    scheme: Any,
    cams: Dict[str, Tensor],
    latents: Tensor,
    t: Tensor,
    noise: Tensor,
    scale: float,
) -> Tensor:
    """(1 − ᾱ_t)(ε̂ − ε) with ε̂ = ε_u + s(Δ_pos + Σ w ⊥(Δ_neg, Δ_pos)), branch by branch."""
    x = noisy(scheduler, latents, noise, t)
    vw = view_weights(cams["elevation"], cams["azimuth"], scheme)
    negs = expected_negatives(bank, scheme, cams)
    grads = []
    for i in range(latents.shape[0]):
        view = bucket(float(cams["elevation"][i]), float(cams["azimuth"][i]))
        positive = (vw.positive_mix[i].view(4, 1, 1) * bank.views).sum(0)
        embs = [bank.uncond[view], positive, *(emb for emb, _ in negs[i])]
        e_u, e_pos, *e_neg = eps(unet, [(x[i], t[i], emb) for emb in embs])
        d_pos = e_pos - e_u
        total = d_pos.clone()
        for e_n, (_, w) in zip(e_neg, negs[i]):
            total += w * perp(e_n - e_u, d_pos)
        eps_hat = e_u + scale * total
        a = scheduler.alphas_cumprod[t[i]]
        grads.append((1 - a) * (eps_hat - noise[i]))
    return torch.stack(grads)


@contextlib.contextmanager
def record_unet(unet: Any) -> Iterator[List[Tuple[Tensor, Tensor, Tensor]]]:
    """Records (sample, timestep, encoder_hidden_states) of every UNet forward."""
    calls: List[Tuple[Tensor, Tensor, Tensor]] = []

    def hook(module: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        ehs = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
        ts = torch.as_tensor(timestep).reshape(-1).expand(sample.shape[0])
        calls.append((sample.detach().clone(), ts.detach().clone(), ehs.detach().clone()))

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def settings(**kwargs: Any) -> SDSSettings:
    kwargs.setdefault("guidance_scale", SCALE)
    return SDSSettings(**kwargs)


# ------------------------------------------------------------------------- gradient and the loss
def test_loss_backpropagates_to_rgb(engine: PerpNegSDSEngine, bank: PromptBank) -> None:
    cams = cameras([20.0], [200.0])
    cond = step_conditioning(bank, cams["elevation"], cams["azimuth"], scheme=ThreestudioScheme())
    rgb = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    rgb.requires_grad_(True)
    t, noise = (
        torch.tensor([300]),
        torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(2)),
    )
    out = sds_step(
        engine,
        rgb,
        cond,
        settings(),
        min_step=MIN_STEP,
        max_step=MAX_STEP,
        generator=torch.Generator().manual_seed(1),  # the VAE sample only: t and noise given
        t=t,
        noise=noise,
        **cams,
    )
    loss = out["loss_sds"]
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert rgb.grad is not None
    # Independent chain: 512 px bilinear resize, x ↦ 2x − 1, VAE posterior sample · scaling factor,
    # then the branch-by-branch Perp-Neg gradient pulled back through it.
    r = rgb.detach().clone().requires_grad_(True)
    x512 = F.interpolate(r.permute(0, 3, 1, 2), (512, 512), mode="bilinear", align_corners=False)
    dist = engine.vae.encode(x512 * 2 - 1).latent_dist
    z = dist.sample(generator=torch.Generator().manual_seed(1)) * engine.vae.config.scaling_factor
    g = reference_perp_neg_grad(
        engine.unet,
        engine.scheduler,
        bank,
        ThreestudioScheme(),
        cams,
        z.detach(),
        t,
        noise,
        settings().scale,
    )
    (z * g).sum().backward()
    assert float((rgb.grad - r.grad).norm() / r.grad.norm()) < 1e-3
    assert out["min_step"] == MIN_STEP and out["max_step"] == MAX_STEP
    assert out["perp_neg_branches"] == cond.branches
    assert float(out["nonfinite"]) == 0.0


def test_loss_is_the_sds_reparameterisation(
    engine: PerpNegSDSEngine, sd: Tuple[Any, Any, Any], bank: PromptBank
) -> None:
    unet, _, scheduler = sd
    cams = cameras([0.0, 15.0], [20.0, 120.0])
    scheme = ThreestudioScheme()
    latents, t, noise = draws(2, seed=2, t=[300, 700])
    cond = step_conditioning(bank, cams["elevation"], cams["azimuth"], scheme=scheme)
    out, grad = latent_step(engine, latents, cond, settings(), cams, t, noise)

    expected = reference_perp_neg_grad(
        unet,
        scheduler,
        bank,
        scheme,
        cams,
        latents,
        t,
        noise,
        effective_scale(SCALE, "threestudio"),
    )
    # d loss / d latents = grad / B, i.e. loss = 0.5 ‖latents − stopgrad(latents − grad)‖² / B.
    torch.testing.assert_close(grad, expected, **TOL)
    torch.testing.assert_close(out["grad_norm"], expected.norm(), rtol=1e-4, atol=0.0)
    torch.testing.assert_close(
        out["loss_sds"].detach(), 0.5 * expected.pow(2).sum() / 2, rtol=1e-4, atol=0.0
    )


def test_grad_clip_bounds_every_element(engine: PerpNegSDSEngine, bank: PromptBank) -> None:
    cams = cameras([0.0], [0.0])
    latents, t, noise = draws(1, seed=3, t=[500])
    cond = step_conditioning(bank, cams["elevation"], cams["azimuth"], scheme=ThreestudioScheme())
    _, free = latent_step(engine, latents, cond, settings(), cams, t, noise)
    clip = 0.1 * float(free.abs().max())
    out, clipped = latent_step(
        engine, latents, cond, settings(), cams, t, noise, grad_clip_val=clip
    )
    assert float(clipped.abs().max()) <= clip * (1 + 1e-5)
    torch.testing.assert_close(clipped, free.clamp(-clip, clip))
    torch.testing.assert_close(out["grad_norm"], clipped.norm())


# ------------------------------------------------------------------------------------ batching
def test_batch_equals_single_sample_calls(engine: PerpNegSDSEngine, bank: PromptBank) -> None:
    el, az = [0.0, 10.0, 75.0], [0.0, 130.0, -40.0]  # front, back half, overhead
    cams = cameras(el, az)
    scheme = ThreestudioScheme()
    latents, t, noise = draws(3, seed=4, t=[150, 500, 850])
    cond = step_conditioning(bank, cams["elevation"], cams["azimuth"], scheme=scheme)
    assert cond.negative.shape[0] > 0  # user negatives and view negatives are present
    out, grad = latent_step(engine, latents, cond, settings(), cams, t, noise)

    losses, branches = [], 0
    for i in range(3):
        cams_i = cameras(el[i : i + 1], az[i : i + 1])
        cond_i = step_conditioning(bank, cams_i["elevation"], cams_i["azimuth"], scheme=scheme)
        out_i, grad_i = latent_step(
            engine, latents[i : i + 1], cond_i, settings(), cams_i, t[i : i + 1], noise[i : i + 1]
        )
        torch.testing.assert_close(grad[i : i + 1], grad_i, **TOL)
        losses.append(out_i["loss_sds"].detach())
        branches += out_i["perp_neg_branches"]
    torch.testing.assert_close(out["loss_sds"].detach() * 3, sum(losses), rtol=1e-4, atol=0.0)
    assert out["perp_neg_branches"] == branches


# ------------------------------------------------------------------------ UNet branch accounting
@pytest.mark.parametrize("scheme_name", ["threestudio", "authors"])
def test_unet_sees_exactly_the_promised_branches(
    engine: PerpNegSDSEngine, sd: Tuple[Any, Any, Any], bank: PromptBank, scheme_name: str
) -> None:
    unet, _, scheduler = sd
    scheme = SCHEMES[scheme_name]
    cams = cameras([0.0, 10.0, 75.0], [0.0, 130.0, 40.0])  # sample 2 is an overhead view
    latents, t, noise = draws(3, seed=5, t=[100, 500, 900])
    cond = step_conditioning(bank, cams["elevation"], cams["azimuth"], scheme=scheme)

    # Independent expectation: non-zero weights of the scheme's view negatives and the user's.
    vw = view_weights(cams["elevation"], cams["azimuth"], scheme)
    assert (vw.negative_weights[2] == 0).all()  # overhead: no view negatives
    n_user = int((bank.negative_weights != 0).sum())
    per_sample = [int((vw.negative_weights[i] != 0).sum()) + n_user for i in range(3)]
    assert per_sample[2] == n_user == 1
    expected_rows = 2 * 3 + sum(per_sample)

    with record_unet(unet) as calls:
        out, _ = latent_step(engine, latents, cond, settings(), cams, t, noise)
    assert len(calls) == 1, "one batched UNet call per step"
    x, ts, ehs = calls[0]
    assert x.shape[0] == ts.shape[0] == ehs.shape[0] == expected_rows
    assert out["perp_neg_branches"] == expected_rows == cond.branches
    assert branch_counts(cond) == [2 + n for n in per_sample]

    # Positive and unconditional rows: every sample's own noisy latent and timestep.
    x_noisy = noisy(scheduler, latents, noise, t)
    torch.testing.assert_close(x[:3], x_noisy, rtol=1e-5, atol=1e-5)
    assert torch.equal(x[3:6], x[:3])
    assert torch.equal(ts[:3], t.to(ts.dtype)) and torch.equal(ts[3:6], t.to(ts.dtype))
    mixed = torch.einsum("bv,vld->bld", vw.positive_mix.float(), bank.views)
    torch.testing.assert_close(ehs[:3], mixed)
    for i in range(3):
        view = bucket(float(cams["elevation"][i]), float(cams["azimuth"][i]))
        assert torch.equal(ehs[3 + i], bank.uncond[view])

    # Negative rows: identify each row's sample by its latent, then check timestep and embedding.
    expected = expected_negatives(bank, scheme, cams)
    seen: List[List[Tensor]] = [[] for _ in range(3)]
    for r in range(6, expected_rows):
        owners = [i for i in range(3) if torch.equal(x[r], x[i])]
        assert len(owners) == 1, f"negative row {r} does not carry one sample's noisy latent"
        i = owners[0]
        assert ts[r] == t[i].to(ts.dtype), f"negative row {r} has another sample's timestep"
        seen[i].append(ehs[r])
    for i in range(3):
        assert len(seen[i]) == per_sample[i]
        remaining = [emb for emb, _ in expected[i]]
        for emb in seen[i]:
            match = [k for k, e in enumerate(remaining) if torch.equal(e, emb)]
            assert match, f"sample {i}: an evaluated negative is not one of its negatives"
            remaining.pop(match[0])
        assert not remaining
    # The zero-weight user negative is never evaluated.
    zero_user = bank.negatives[1]
    assert not any(torch.equal(ehs[r], zero_user) for r in range(expected_rows))


def test_authors_front_view_has_one_view_negative(
    engine: PerpNegSDSEngine, sd: Tuple[Any, Any, Any], plain_bank: PromptBank
) -> None:
    unet = sd[0]
    cams = cameras([0.0], [0.0])
    latents, t, noise = draws(1, seed=6, t=[400])
    cond = step_conditioning(plain_bank, cams["elevation"], cams["azimuth"], scheme=AuthorsScheme())
    with record_unet(unet) as calls:
        out, _ = latent_step(engine, latents, cond, settings(), cams, t, noise)
    assert len(calls) == 1
    x, _, ehs = calls[0]
    assert x.shape[0] == 3 == out["perp_neg_branches"]
    assert torch.equal(ehs[2], plain_bank.views[SIDE])  # the only negative: the side view


def test_overhead_views_run_no_view_negatives(
    engine: PerpNegSDSEngine, sd: Tuple[Any, Any, Any], plain_bank: PromptBank
) -> None:
    unet = sd[0]
    cams = cameras([70.0, 80.0], [0.0, 150.0])
    latents, t, noise = draws(2, seed=7, t=[400, 600])
    for scheme in SCHEMES.values():
        cond = step_conditioning(plain_bank, cams["elevation"], cams["azimuth"], scheme=scheme)
        with record_unet(unet) as calls:
            latent_step(engine, latents, cond, settings(), cams, t, noise)
        assert [c[0].shape[0] for c in calls] == [4]
        assert torch.equal(calls[0][2][:2], plain_bank.views[[OVERHEAD, OVERHEAD]])


# ---------------------------------------------------------------------- references and settings
def test_vanilla_step_matches_threestudio(
    engine: PerpNegSDSEngine, sd: Tuple[Any, Any, Any], plain_bank: PromptBank
) -> None:
    unet, _, scheduler = sd
    el, az = [10.0, 20.0, 70.0], [260.0, 170.0, 10.0]  # side (wrapped), back, overhead
    cams = cameras(el, az)
    latents, t, noise = draws(3, seed=8, t=[50, 480, 930])
    cond = step_conditioning(
        plain_bank, cams["elevation"], cams["azimuth"], scheme=ThreestudioScheme(), perp_neg=False
    )
    with record_unet(unet) as calls:
        out, grad = latent_step(engine, latents, cond, settings(), cams, t, noise)
    assert [c[0].shape[0] for c in calls] == [6]

    # threestudio's StableDiffusionGuidance.compute_grad_sds, without Perp-Neg.
    x = noisy(scheduler, latents, noise, t)
    views = [SIDE, BACK, OVERHEAD]
    assert [bucket(e, a) for e, a in zip(el, az)] == views
    e_c, e_u = cfg_reference(unet, x, t, plain_bank.views[views], plain_bank.uncond[views])
    noise_pred = e_c + SCALE * (e_c - e_u)
    w = (1 - scheduler.alphas_cumprod[t]).view(-1, 1, 1, 1)
    ref = w * (noise_pred - noise)
    torch.testing.assert_close(grad, ref, **TOL)
    torch.testing.assert_close(
        out["loss_sds"].detach(), 0.5 * F.mse_loss(latents, latents - ref, reduction="sum") / 3
    )
    assert out["perp_neg_branches"] == 6


# At 0°, 90° and 180° the interpolated positive is exactly the bucketed view prompt.
@pytest.mark.parametrize(
    "convention, azimuth, views",
    [("threestudio", [0.0, 90.0], [FRONT, SIDE]), ("cfg", [90.0, 180.0], [SIDE, BACK])],
)
def test_scale_means_the_same_with_perp_neg_on_and_off(
    engine: PerpNegSDSEngine,
    sd: Tuple[Any, Any, Any],
    bank: PromptBank,
    plain_bank: PromptBank,
    convention: str,
    azimuth: List[float],
    views: List[int],
) -> None:
    unet, _, scheduler = sd
    el, az = [0.0, 0.0], azimuth
    cams = cameras(el, az)
    latents, t, noise = draws(2, seed=9, t=[200, 700])
    st = settings(scale_convention=convention)
    scheme = ThreestudioScheme()

    off = step_conditioning(bank, cams["elevation"], cams["azimuth"], scheme=scheme, perp_neg=False)
    on = step_conditioning(bank, cams["elevation"], cams["azimuth"], scheme=scheme)
    assert on.negative.shape[0] > 0
    forced = on._replace(negative_weight=torch.zeros_like(on.negative_weight))  # evaluated, w = 0
    _, g_off = latent_step(engine, latents, off, st, cams, t, noise)
    out_forced, g_forced = latent_step(engine, latents, forced, st, cams, t, noise)
    assert out_forced["perp_neg_branches"] == forced.branches > 4
    torch.testing.assert_close(g_forced, g_off, **TOL)

    # A scheme whose weights are all zero (and no user negatives): nothing extra is evaluated.
    zero = ThreestudioScheme(
        f_fs=(0.0, 0.0, 0.0), f_sf=(0.0, 0.0, 0.0), f_sb=(0.0, 0.0, 0.0), f_fsb=(0.0, 0.0, 0.0)
    )
    on_zero = step_conditioning(plain_bank, cams["elevation"], cams["azimuth"], scheme=zero)
    assert on_zero.perp_neg and on_zero.branches == 4
    _, g_zero = latent_step(engine, latents, on_zero, st, cams, t, noise)
    torch.testing.assert_close(g_zero, g_off, **TOL)

    # The convention itself: ε_u + (s + 1)·(ε_c − ε_u) or ε_u + s·(ε_c − ε_u).
    s = SCALE + 1.0 if convention == "threestudio" else SCALE
    assert st.scale == s == effective_scale(SCALE, convention)
    assert [bucket(e, a) for e, a in zip(el, az)] == views
    e_c, e_u = cfg_reference(
        unet, noisy(scheduler, latents, noise, t), t, bank.views[views], bank.uncond[views]
    )
    w = (1 - scheduler.alphas_cumprod[t]).view(-1, 1, 1, 1)
    torch.testing.assert_close(g_off, w * (e_u + s * (e_c - e_u) - noise), **TOL)


def test_threestudio_scale_is_cfg_scale_plus_one(
    engine: PerpNegSDSEngine, bank: PromptBank
) -> None:
    cams = cameras([0.0, 30.0], [60.0, 150.0])
    latents, t, noise = draws(2, seed=10, t=[300, 600])
    cond = step_conditioning(bank, cams["elevation"], cams["azimuth"], scheme=AuthorsScheme())
    _, g_ts = latent_step(engine, latents, cond, SDSSettings(guidance_scale=7.5), cams, t, noise)
    _, g_cfg = latent_step(
        engine,
        latents,
        cond,
        SDSSettings(guidance_scale=8.5, scale_convention="cfg"),
        cams,
        t,
        noise,
    )
    torch.testing.assert_close(g_ts, g_cfg, rtol=1e-6, atol=1e-6)


def test_sjc(tiny_sd_path: Path, sd: Tuple[Any, Any, Any], plain_bank: PromptBank) -> None:
    from diffusers import DDPMScheduler

    unet, vae, scheduler = load_stable_diffusion(str(tiny_sd_path), use_sjc=True)
    assert isinstance(scheduler, DDPMScheduler)
    sjc = PerpNegSDSEngine(unet, vae, scheduler)
    cams = cameras([0.0, 10.0], [0.0, 100.0])
    latents, t, noise = draws(2, seed=11, t=[250, 750])
    cond = step_conditioning(
        plain_bank, cams["elevation"], cams["azimuth"], scheme=ThreestudioScheme(), perp_neg=False
    )
    results = {}
    for var_red in (True, False):
        st = settings(use_sjc=True, var_red=var_red)
        out, grad = latent_step(sjc, latents, cond, st, cams, t, noise)
        assert torch.isfinite(out["loss_sds"]) and out["loss_sds"].item() > 0
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        results[var_red] = grad
    assert not torch.allclose(results[True], results[False])

    # SJC: z = x + σε, input z/√(1+σ²), D = z − σε̂; var_red: −(D − x)/σ = ε̂ − ε, else −(D − z)/σ = ε̂.
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    sigma = ((1 - a) / a).sqrt()
    model_input = (latents + sigma * noise) / (1 + sigma**2).sqrt()
    s = effective_scale(SCALE, "threestudio")
    views = [FRONT, SIDE]
    e_c, e_u = cfg_reference(
        unet, model_input, t, plain_bank.views[views], plain_bank.uncond[views]
    )
    ref = e_u + s * (e_c - e_u)
    torch.testing.assert_close(results[True], ref - noise, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(results[False], ref, rtol=1e-3, atol=1e-3)


def test_weighting_strategies(
    engine: PerpNegSDSEngine, sd: Tuple[Any, Any, Any], bank: PromptBank
) -> None:
    scheduler = sd[2]
    cams = cameras([0.0, 20.0], [45.0, 100.0])
    latents, t, noise = draws(2, seed=12, t=[600, 600])
    cond = step_conditioning(
        bank, cams["elevation"], cams["azimuth"], scheme=ThreestudioScheme(), perp_neg=False
    )
    grads = {
        name: latent_step(engine, latents, cond, settings(weighting_strategy=name), cams, t, noise)[
            1
        ]
        for name in ("sds", "uniform", "fantasia3d")
    }
    a = scheduler.alphas_cumprod[600]
    # uniform: w = 1 (ε̂ − ε itself); sds: 1 − ᾱ_t; fantasia3d: √ᾱ_t (1 − ᾱ_t).
    torch.testing.assert_close(grads["sds"], (1 - a) * grads["uniform"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        grads["fantasia3d"], a.sqrt() * (1 - a) * grads["uniform"], rtol=1e-5, atol=1e-5
    )
    assert not torch.allclose(grads["sds"], grads["uniform"])
    assert SDSSettings().weighting_strategy == "sds"


# ------------------------------------------------------------------------------- non-finite
@contextlib.contextmanager
def poison_unet(unet: Any, writes: Sequence[Tuple[Any, float]]) -> Iterator[None]:
    """Overwrite elements of the UNet output (``index``, value) in place."""

    def hook(module: Any, args: Any, output: Any) -> Any:
        for index, value in writes:
            output.sample[index] = value
        return output

    handle = unet.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_nonfinite_predictions_are_counted_and_dropped(
    engine: PerpNegSDSEngine, sd: Tuple[Any, Any, Any], plain_bank: PromptBank
) -> None:
    unet = sd[0]
    cams = cameras([0.0, 10.0], [0.0, 100.0])
    latents, t, noise = draws(2, seed=13, t=[300, 700])
    cond = step_conditioning(
        plain_bank, cams["elevation"], cams["azimuth"], scheme=ThreestudioScheme(), perp_neg=False
    )
    _, clean = latent_step(engine, latents, cond, settings(), cams, t, noise)
    # Rows: [pos0, pos1, unc0, unc1]; 6 NaNs in sample 0's positive, one inf in sample 1's uncond.
    nan_idx = (0, 0, slice(0, 2), slice(0, 3))
    inf_idx = (3, 2, 5, 7)
    with poison_unet(unet, [(nan_idx, math.nan), (inf_idx, math.inf)]):
        out, grad = latent_step(engine, latents, cond, settings(), cams, t, noise)
    assert float(out["nonfinite"]) == 7.0
    assert torch.isfinite(out["loss_sds"]) and torch.isfinite(out["grad_norm"])
    assert torch.isfinite(grad).all()
    bad = torch.zeros_like(grad, dtype=torch.bool)
    bad[0, 0, 0:2, 0:3] = True
    bad[1, 2, 5, 7] = True
    assert (grad[bad] == 0).all()  # replaced elements carry no gradient
    torch.testing.assert_close(grad[~bad], clean[~bad])


def test_nonfinite_negative_branch_keeps_loss_finite(
    engine: PerpNegSDSEngine, sd: Tuple[Any, Any, Any], bank: PromptBank
) -> None:
    unet = sd[0]
    cams = cameras([0.0, 10.0], [0.0, 100.0])
    latents, t, noise = draws(2, seed=14, t=[300, 700])
    cond = step_conditioning(bank, cams["elevation"], cams["azimuth"], scheme=ThreestudioScheme())
    first_neg = 4  # rows 0-3 are positives and unconds; row 4 is a negative of sample 0
    assert int(cond.negative_index[0]) == 0
    _, clean = latent_step(engine, latents, cond, settings(), cams, t, noise)
    with poison_unet(unet, [((first_neg, 1, 3, 3), math.nan)]):
        out, grad = latent_step(engine, latents, cond, settings(), cams, t, noise)
    assert float(out["nonfinite"]) >= 1.0
    assert torch.isfinite(out["loss_sds"]) and torch.isfinite(grad).all()
    torch.testing.assert_close(grad[1], clean[1])  # the other sample is untouched


# ------------------------------------------------------------------------------------ random draws
@pytest.mark.parametrize("source", ["global", "generator"])
def test_random_draws_follow_threestudio_order(
    engine: PerpNegSDSEngine, sd: Tuple[Any, Any, Any], plain_bank: PromptBank, source: str
) -> None:
    _, vae, _ = sd
    cams = cameras([20.0], [200.0])
    cond = step_conditioning(
        plain_bank, cams["elevation"], cams["azimuth"], scheme=ThreestudioScheme(), perp_neg=False
    )
    rgb = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))

    def rng() -> Any:
        """Re-seeds the source and returns the generator argument for it."""
        if source == "global":
            torch.manual_seed(2024)
            return None
        return torch.Generator().manual_seed(2024)

    def step(generator: Any, **kwargs: Any) -> Dict[str, Any]:
        return sds_step(
            engine,
            rgb,
            cond,
            settings(),
            min_step=MIN_STEP,
            max_step=MAX_STEP,
            generator=generator,
            **cams,
            **kwargs,
        )

    global_before = torch.get_rng_state()
    gen = rng()
    drawn = step(gen)
    after = torch.get_rng_state() if gen is None else gen.get_state()
    if gen is not None:
        # A seeded generator: the global RNG is untouched and the step repeats exactly.
        assert torch.equal(torch.get_rng_state(), global_before)
        again = step(rng())
        assert torch.equal(again["loss_sds"], drawn["loss_sds"])
        assert torch.equal(again["grad_norm"], drawn["grad_norm"])

    # threestudio: VAE posterior sample, then torch.randint for t, then randn_like for the noise.
    gen = rng()
    with torch.no_grad():
        rgb_512 = F.interpolate(
            rgb.permute(0, 3, 1, 2), (512, 512), mode="bilinear", align_corners=False
        )
        posterior = vae.encode(rgb_512 * 2.0 - 1.0).latent_dist
        latents = posterior.sample(generator=gen) * vae.config.scaling_factor
    t = torch.randint(MIN_STEP, MAX_STEP + 1, [1], dtype=torch.long, generator=gen)
    if gen is None:
        noise = torch.randn_like(latents)
    else:
        noise = torch.randn(latents.shape, generator=gen, dtype=latents.dtype)
    manual_after = torch.get_rng_state() if gen is None else gen.get_state()
    assert torch.equal(after, manual_after), "sds_step drew a different amount of randomness"

    gen = rng()  # the VAE sample is drawn again; t and noise are the manual draws
    replayed = step(gen, t=t, noise=noise)
    assert torch.equal(replayed["loss_sds"], drawn["loss_sds"])
    assert torch.equal(replayed["grad_norm"], drawn["grad_norm"])
    # Another t (same noise) changes the step: the replay really depends on the drawn t.
    shifted = step(rng(), t=t + 7, noise=noise)
    assert not torch.equal(shifted["loss_sds"], drawn["loss_sds"])


# ------------------------------------------------------------------------ evaluation and HiFA
def test_guidance_eval(engine: PerpNegSDSEngine, bank: PromptBank) -> None:
    cams = cameras([0.0, 20.0], [30.0, 200.0])
    cond = step_conditioning(bank, cams["elevation"], cams["azimuth"], scheme=ThreestudioScheme())
    rgb = torch.rand(2, 32, 32, 4, generator=torch.Generator().manual_seed(0))
    out = sds_step(
        engine,
        rgb,
        cond,
        settings(),
        min_step=MIN_STEP,
        max_step=MAX_STEP,
        rgb_as_latents=True,
        guidance_eval=True,
        max_items_eval=2,
        t=torch.tensor([30, 30]),
        noise=torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(1)),
        **cams,
    )
    ev = out["eval"]
    assert ev["bs"] == 2
    for key in ("imgs_noisy", "imgs_1step", "imgs_1orig", "imgs_final"):
        assert tuple(ev[key].shape) == (2, 512, 512, 3), key
        assert torch.isfinite(ev[key]).all() and ev[key].min() >= 0 and ev[key].max() <= 1
    assert len(ev["noise_levels"]) == 2
    assert all(0 < n <= 30 / 1000 for n in ev["noise_levels"])
    texts = ev["texts"]
    assert len(texts) == 2 and all(isinstance(s, str) for s in texts)
    assert texts[1].split("\n")[1:] == ["e20.0", "a200.0", "c1.50"]
    assert torch.isfinite(out["loss_sds"])


def test_guidance_eval_is_reproducible_with_a_generator(
    engine: PerpNegSDSEngine, bank: PromptBank
) -> None:
    cams = cameras([0.0], [30.0])
    cond = step_conditioning(bank, cams["elevation"], cams["azimuth"], scheme=ThreestudioScheme())
    rgb = torch.rand(1, 32, 32, 4, generator=torch.Generator().manual_seed(0))

    def run(global_seed: int) -> Dict[str, Any]:
        torch.manual_seed(global_seed)  # must not matter: every draw comes from the generator
        return sds_step(
            engine,
            rgb,
            cond,
            settings(),
            min_step=MIN_STEP,
            max_step=MAX_STEP,
            rgb_as_latents=True,
            guidance_eval=True,
            generator=torch.Generator().manual_seed(0),
            t=torch.tensor([60]),
            **cams,
        )["eval"]

    a, b = run(1), run(2)
    for key in ("imgs_1step", "imgs_final"):
        assert torch.equal(a[key], b[key]), key


def test_img_loss_needs_rgb_renders(engine: PerpNegSDSEngine, bank: PromptBank) -> None:
    cams = cameras([0.0], [30.0])
    cond = step_conditioning(bank, cams["elevation"], cams["azimuth"], scheme=ThreestudioScheme())
    with pytest.raises(ValueError, match="use_img_loss.*rgb_as_latents"):
        sds_step(
            engine,
            torch.rand(1, 32, 32, 4),
            cond,
            settings(use_img_loss=True),
            min_step=MIN_STEP,
            max_step=MAX_STEP,
            rgb_as_latents=True,
            **cams,
        )


def test_img_loss_adds_loss_sds_img(engine: PerpNegSDSEngine, bank: PromptBank) -> None:
    cams = cameras([0.0], [30.0])
    cond = step_conditioning(bank, cams["elevation"], cams["azimuth"], scheme=ThreestudioScheme())
    rgb = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))

    def run(use_img_loss: bool) -> Tuple[Dict[str, Any], Tensor]:
        x = rgb.clone().requires_grad_(True)
        out = sds_step(
            engine,
            x,
            cond,
            settings(use_img_loss=use_img_loss),
            min_step=MIN_STEP,
            max_step=MAX_STEP,
            generator=torch.Generator().manual_seed(5),
            **cams,
        )
        return out, x

    plain, _ = run(False)
    assert "loss_sds_img" not in plain
    out, x = run(True)
    img = out["loss_sds_img"]
    assert img.dim() == 0 and torch.isfinite(img) and img.item() > 0
    assert torch.equal(out["loss_sds"].detach(), plain["loss_sds"].detach())
    img.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("path", ["/nonexistent/model", "./nope/model"])
def test_load_missing_local_path(path: str) -> None:
    with pytest.raises(FileNotFoundError, match="pretrained_model_name_or_path") as info:
        load_stable_diffusion(path)
    assert repr(path) in str(info.value) or path in str(info.value)


def test_load_folder_without_components(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pretrained_model_name_or_path") as info:
        load_stable_diffusion(str(tmp_path))
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"scale_convention": "diffusers"}, "guidance_scale_convention"),
        ({"scale_convention": ""}, "guidance_scale_convention"),
        ({"weighting_strategy": "dreamfusion"}, "weighting_strategy"),
        ({"guidance_scale": math.nan}, "guidance_scale"),
        ({"guidance_scale": math.inf}, "guidance_scale"),
        ({"guidance_scale": -math.inf}, "guidance_scale"),
        ({"guidance_scale": "100"}, "guidance_scale"),
        ({"guidance_scale": True}, "guidance_scale"),
    ],
)
def test_settings_errors_name_the_key(kwargs: Dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=key) as info:
        SDSSettings(**kwargs)
    value = next(iter(kwargs.values()))
    assert repr(value) in str(info.value)


def test_effective_scale() -> None:
    assert effective_scale(100, "threestudio") == 101.0
    assert effective_scale(100, "cfg") == 100.0
    assert SDSSettings().scale == 101.0
    assert SDSSettings(guidance_scale=7.5, scale_convention="cfg").scale == 7.5


def test_predict_rejects_mismatched_batches(engine: PerpNegSDSEngine, bank: PromptBank) -> None:
    cams = cameras([0.0, 10.0], [0.0, 90.0])
    cond = step_conditioning(bank, cams["elevation"], cams["azimuth"], scheme=ThreestudioScheme())
    with pytest.raises(ValueError, match="batch mismatch"):
        engine.predict(torch.zeros(3, 4, 64, 64), torch.tensor([1, 2, 3]), cond)
    with pytest.raises(ValueError, match="rgb"):
        sds_step(
            engine,
            torch.zeros(32, 32, 3),
            cond,
            settings(),
            min_step=MIN_STEP,
            max_step=MAX_STEP,
            **cams,
        )
