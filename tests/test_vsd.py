"""Tests of variational score distillation with Perp-Neg (``threestudio_perpneg.engines.vsd``), no threestudio.

Everything runs on the tiny random checkpoint (``tiny_sd_path``); the pretrained and the LoRA model share
its UNet, as threestudio does when both paths are the same. Embeddings are random tensors of the UNet's
cross-attention width: the VSD step never looks at what a prompt says.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest
import torch
from helpers import raises_naming
from torch import Tensor

from threestudio_perpneg.core.conditioning import PromptBank, StepConditioning, step_conditioning
from threestudio_perpneg.core.views import ThreestudioScheme
from threestudio_perpneg.engines.sd import PerpNegSDSEngine, branch_counts, load_stable_diffusion
from threestudio_perpneg.engines.vsd import (
    LoRAAttnProcessor,
    LoRALinearLayer,
    LoRAUNet,
    VSDSettings,
    lora_guided_noise,
    vsd_step,
)

L, D = 8, 32  # sequence length and the tiny UNet's cross_attention_dim
MIN_STEP, MAX_STEP = 20, 980
SETTINGS = VSDSettings(guidance_scale=7.5, guidance_scale_lora=1.0)
# side, front, back and overhead cameras
ELEVATION = torch.tensor([0.0, 10.0, 5.0, 80.0])
AZIMUTH = torch.tensor([100.0, 10.0, 170.0, 0.0])

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def models(tiny_sd_path: Path) -> Tuple[PerpNegSDSEngine, LoRAUNet, Any]:
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    unet, vae, scheduler = load_stable_diffusion(str(tiny_sd_path))
    engine = PerpNegSDSEngine(unet, vae, scheduler)
    lora = LoRAUNet(unet)
    lora_scheduler = DDPMScheduler.from_pretrained(str(tiny_sd_path), subfolder="scheduler")
    return engine, lora, lora_scheduler


@pytest.fixture(autouse=True)
def _fresh_lora(models: Tuple[PerpNegSDSEngine, LoRAUNet, Any]) -> Iterator[None]:
    """Each test sees the LoRA at its initial (zero ``up``) weights and no gradients."""
    lora = models[1]
    state = copy.deepcopy(lora.state_dict())
    yield
    lora.load_state_dict(state)
    lora.zero_grad(set_to_none=True)


@pytest.fixture(scope="module")
def bank() -> PromptBank:
    g = torch.Generator().manual_seed(1)
    return PromptBank(
        prompt=torch.randn(L, D, generator=g),
        views=torch.randn(4, L, D, generator=g),
        uncond=torch.randn(L, D, generator=g).expand(4, L, D).clone(),
        negatives=torch.randn(1, L, D, generator=g),
        negative_weights=torch.tensor([-0.5]),
    )


def _cond(bank: PromptBank, idx: List[int], perp_neg: bool = True) -> StepConditioning:
    return step_conditioning(
        bank, ELEVATION[idx], AZIMUTH[idx], scheme=ThreestudioScheme(), perp_neg=perp_neg
    )


def _inputs(b: int, seed: int = 2) -> Dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(b, 8, 8, 4, generator=g),  # rgb_as_latents: [B, H, W, 4]
        "noise": torch.randn(b, 4, 64, 64, generator=g),
        "t": torch.randint(MIN_STEP, MAX_STEP + 1, (b,), generator=g),
        "t_lora": torch.randint(0, 1000, (b,), generator=g),
        "noise_lora": torch.randn(b, 4, 64, 64, generator=g),
        "camera": torch.randn(b, 4, 4, generator=g),
    }


def _perturb_lora(lora: LoRAUNet, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora.lora_layers.named_parameters():
            if name.endswith("up.weight"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def _step(models, bank, idx, inp, *, perp_neg=True, rgb=None, settings=SETTINGS):
    engine, lora, lora_scheduler = models
    b = len(idx)
    return vsd_step(
        engine,
        lora,
        lora_scheduler,
        inp["latents"] if rgb is None else rgb,
        _cond(bank, idx, perp_neg),
        bank.prompt.expand(b, -1, -1),
        inp["camera"],
        settings,
        min_step=MIN_STEP,
        max_step=MAX_STEP,
        rgb_as_latents=True,
        t=inp["t"],
        noise=inp["noise"],
        t_lora=inp["t_lora"],
        noise_lora=inp["noise_lora"],
        drop_camera=False,
    )


def _slice(inp: Dict[str, Tensor], i: int) -> Dict[str, Tensor]:
    return {k: v[i : i + 1] for k, v in inp.items()}


# ------------------------------------------------------------------------------------ LoRA layers
def test_lora_is_identity_at_init_and_restores_the_pretrained_unet(models):
    engine, lora, _ = models
    inp = _inputs(2)
    x, t = inp["noise"][:, :, :8, :8], inp["t"]
    emb = torch.randn(2, L, D, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base = engine.unet(x, t, encoder_hidden_states=emb).sample
        # No camera: the LoRA model is exactly the pretrained UNet at init.
        assert torch.allclose(lora(x, t, emb, None), base, atol=1e-5, rtol=1e-5)
        # With a camera, only the class embedding differs: LoRA on equals LoRA off.
        on = lora(x, t, emb, inp["camera"], lora_scale=1.0)
        off = lora(x, t, emb, inp["camera"], lora_scale=0.0)
        assert torch.allclose(on, off, atol=1e-6)
        assert not torch.allclose(on, base, atol=1e-4)  # the camera does condition the model
        _perturb_lora(lora)
        assert not torch.allclose(lora(x, t, emb, None), base, atol=1e-4)
        # Outside LoRAUNet.forward the shared UNet is the pretrained model again.
        assert engine.unet.class_embedding is None
        assert torch.equal(engine.unet(x, t, encoder_hidden_states=emb).sample, base)
    procs = list(engine.unet.attn_processors.values())
    assert procs and all(isinstance(p, LoRAAttnProcessor) for p in procs)


def test_lora_parameters_are_the_only_module_parameters(models):
    engine, lora, _ = models
    ids = {id(p) for p in lora.parameters()}
    base = [p for n, p in engine.unet.named_parameters() if "processor" not in n]
    assert base and all(not p.requires_grad for p in base)
    assert ids.isdisjoint(id(p) for p in base)
    assert all(p.requires_grad for p in lora.parameters())


# ------------------------------------------------------------------------------------- gradients
def test_gradients_flow_to_rgb_and_lora_loss_trains_only_lora(models, bank):
    engine, lora, _ = models
    inp = _inputs(2)
    _perturb_lora(lora)  # make ε_pretrained − ε_lora a non-trivial direction
    rgb = torch.rand(2, 16, 16, 3, requires_grad=True)
    out = vsd_step(
        engine,
        lora,
        models[2],
        rgb,
        _cond(bank, [0, 1]),
        bank.prompt.expand(2, -1, -1),
        inp["camera"],
        SETTINGS,
        min_step=MIN_STEP,
        max_step=MAX_STEP,
        generator=torch.Generator().manual_seed(0),
    )
    assert set(out) >= {"loss_vsd", "loss_lora", "grad_norm", "min_step", "max_step"}
    out["loss_vsd"].backward()
    assert rgb.grad is not None and torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
    # loss_vsd carries no gradient to the LoRA model (its prediction is a detached target).
    assert all(p.grad is None for p in lora.parameters())

    out["loss_lora"].backward()
    up = [p for n, p in lora.named_parameters() if n.endswith("up.weight")]
    assert up and all(p.grad is not None and p.grad.abs().sum() > 0 for p in up)
    cam = list(lora.camera_embedding.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cam)
    frozen = [p for n, p in engine.unet.named_parameters() if "processor" not in n]
    assert all(p.grad is None for p in frozen)
    assert all(p.grad is None for p in engine.vae.parameters())


def test_lora_training_lowers_loss_lora(models, bank):
    _, lora, lora_scheduler = models
    inp = _inputs(1)
    opt = torch.optim.Adam(lora.parameters(), lr=1e-2)
    from threestudio_perpneg.engines.vsd import lora_loss

    latents = inp["noise"][:, :, :8, :8]
    losses = []
    for _ in range(8):
        loss = lora_loss(
            lora,
            lora_scheduler,
            latents,
            bank.prompt[None],
            inp["camera"],
            SETTINGS,
            t=inp["t_lora"],
            noise=inp["noise_lora"][:, :, :8, :8],
            drop_camera=False,
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


# ----------------------------------------------------------------------------------- batching
def test_batch_of_three_equals_three_batch_one_calls(models, bank):
    _perturb_lora(models[1])
    idx = [0, 1, 3]
    inp = _inputs(3)
    rgb = inp["latents"].clone().requires_grad_(True)
    batched = _step(models, bank, idx, inp, rgb=rgb)
    (batched["loss_vsd"] * 3).backward()
    singles = []
    for i, view in enumerate(idx):
        rgb_i = inp["latents"][i : i + 1].clone().requires_grad_(True)
        out = _step(models, bank, [view], _slice(inp, i), rgb=rgb_i)
        out["loss_vsd"].backward()
        singles.append((out, rgb_i.grad))
    assert float(batched["loss_vsd"].detach()) * 3 == pytest.approx(
        sum(float(o["loss_vsd"].detach()) for o, _ in singles), rel=1e-4
    )
    assert torch.allclose(rgb.grad, torch.cat([g for _, g in singles]), rtol=1e-3, atol=1e-4)
    assert batched["perp_neg_branches"] == sum(o["perp_neg_branches"] for o, _ in singles)

    # The pretrained branch alone: Perp-Neg prediction of the batch = per-sample predictions.
    engine = models[0]
    x = inp["noise"]
    cond = _cond(bank, idx)
    eps = engine.guided_noise(x, inp["t"], cond, SETTINGS.scale)
    for i in range(3):
        one = engine.guided_noise(x[i : i + 1], inp["t"][i : i + 1], cond.select(i), SETTINGS.scale)
        assert torch.allclose(eps[i : i + 1], one, rtol=1e-3, atol=1e-4)


def test_branch_counts_of_the_pretrained_unet(models, bank):
    """One pretrained UNet call per step with 2 rows per sample + 1 per non-zero negative; the LoRA
    branch (class_labels given) has 2 rows per sample for ε̂_lora and B·n for its loss."""
    engine = models[0]
    pretrained: List[int] = []
    lora_rows: List[int] = []

    def hook(module: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        rows = int(args[0].shape[0])
        (lora_rows if kwargs.get("class_labels") is not None else pretrained).append(rows)

    idx = [0, 1, 2, 3]
    handle = engine.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = _step(models, bank, idx, _inputs(4))
    finally:
        handle.remove()
    cond = _cond(bank, idx)
    # threestudio scheme: two view negatives for side/front/back, none overhead; plus the user one
    assert branch_counts(cond) == [2 + 2 + 1, 2 + 2 + 1, 2 + 2 + 1, 2 + 0 + 1]
    assert pretrained == [sum(branch_counts(cond))] == [out["perp_neg_branches"]]
    assert lora_rows == [2 * 4, 4]

    pretrained.clear()
    lora_rows.clear()
    handle = engine.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _step(models, bank, idx, _inputs(4), perp_neg=False)
    finally:
        handle.remove()
    assert pretrained == [2 * 4] and lora_rows == [2 * 4, 4]


def test_perp_neg_on_and_off_differ_and_lora_branch_is_view_independent(models, bank):
    _perturb_lora(models[1])
    inp = _inputs(2)
    on = _step(models, bank, [0, 1], inp)
    off = _step(models, bank, [0, 1], inp, perp_neg=False)
    assert float(on["loss_vsd"].detach()) != pytest.approx(
        float(off["loss_vsd"].detach()), rel=1e-6
    )
    # The LoRA loss sees the plain prompt whatever the pretrained branch does.
    assert float(on["loss_lora"].detach()) == pytest.approx(
        float(off["loss_lora"].detach()), rel=1e-6
    )


def test_lora_guidance_scale_and_v_prediction(models, bank):
    from diffusers import DDPMScheduler

    _, lora, lora_scheduler = models
    _perturb_lora(lora)
    inp = _inputs(2)
    x, t, cam = inp["noise"][:, :, :8, :8], inp["t"], inp["camera"]
    prompt = bank.prompt.expand(2, -1, -1)
    with torch.no_grad():
        e_cam = lora(x, t, prompt, cam)
        e_zero = lora(x, t, prompt, torch.zeros_like(cam))
    g1 = lora_guided_noise(lora, lora_scheduler, x, t, prompt, cam, 1.0)
    g3 = lora_guided_noise(lora, lora_scheduler, x, t, prompt, cam, 3.0)
    assert torch.allclose(g1, e_cam, atol=1e-5)
    assert torch.allclose(g3, e_zero + 3.0 * (e_cam - e_zero), atol=1e-4)
    v_sched = DDPMScheduler.from_config(lora_scheduler.config, prediction_type="v_prediction")
    gv = lora_guided_noise(lora, v_sched, x, t, prompt, cam, 1.0)
    ac = v_sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(gv, x * (1 - ac) ** 0.5 + e_cam * ac**0.5, atol=1e-5)


# ------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"camera_condition_type": "intrinsics"}, "camera_condition_type"),
        ({"lora_n_timestamp_samples": 0}, "lora_n_timestamp_samples"),
        ({"lora_n_timestamp_samples": 1.5}, "lora_n_timestamp_samples"),
        ({"guidance_scale_lora": float("nan")}, "guidance_scale_lora"),
        ({"guidance_scale": "7.5"}, "guidance_scale"),
        ({"scale_convention": "diffusers"}, "guidance_scale_convention"),
    ],
)
def test_bad_settings_name_the_key(kwargs, key):
    raises_naming(lambda: VSDSettings(**kwargs), key)


def test_bad_lora_rank_and_inputs_name_the_key(models, bank):
    raises_naming(lambda: LoRALinearLayer(4, 4, rank=0), "lora_rank")
    inp = _inputs(2)
    raises_naming(
        lambda: vsd_step(
            models[0],
            models[1],
            models[2],
            inp["latents"],
            _cond(bank, [0, 1]),
            bank.prompt.expand(1, -1, -1),
            inp["camera"],
            SETTINGS,
            min_step=MIN_STEP,
            max_step=MAX_STEP,
            rgb_as_latents=True,
        ),
        "prompt/camera",
    )
    raises_naming(
        lambda: _step(models, bank, [0, 1], inp, settings=VSDSettings(use_img_loss=True)),
        "use_img_loss",
    )
