"""DeepFloyd IF engine and T5 text path on a tiny seeded random IF (no threestudio, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from threestudio_perpneg.core.conditioning import PromptBank, step_conditioning
from threestudio_perpneg.core.text import (
    EmbeddingCache,
    encode_prompts,
    text_embeddings,
    view_prompts,
)
from threestudio_perpneg.core.views import make_scheme
from threestudio_perpneg.engines.pixel import PerpNegIFEngine, if_sds_step, load_deepfloyd_if
from threestudio_perpneg.engines.sd import SDSSettings, branch_counts

PROMPT = "a corgi"
VIEWS = view_prompts(PROMPT)
NEGATIVES = ["blurry"]


@pytest.fixture(scope="module")
def tiny_if_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from threestudio_perpneg.tiny.builders import build_tiny_deepfloyd_if

    return build_tiny_deepfloyd_if(tmp_path_factory.mktemp("tiny-if") / "model", seed=0)


@pytest.fixture(scope="module")
def engine(tiny_if_path: Path) -> PerpNegIFEngine:
    unet, scheduler = load_deepfloyd_if(str(tiny_if_path))
    return PerpNegIFEngine(unet, scheduler)


@pytest.fixture(scope="module")
def bank(tiny_if_path: Path) -> PromptBank:
    emb = text_embeddings(str(tiny_if_path), [PROMPT, "", *VIEWS, *NEGATIVES], None, encoder="t5")
    return PromptBank.from_embeddings(emb, PROMPT, "", VIEWS, NEGATIVES, [-1.0])


def _cams(azimuth, elevation=None):
    az = torch.tensor(azimuth, dtype=torch.float32)
    el = torch.tensor(elevation or [0.0] * len(azimuth), dtype=torch.float32)
    return el, az, torch.full_like(az, 1.5)


def _cond(bank, el, az, perp_neg=True, min_weight=0.0):
    return step_conditioning(
        bank, el, az, scheme=make_scheme("authors"), perp_neg=perp_neg, min_weight=min_weight
    )


def _step(engine, rgb, cond, cams, settings=SDSSettings(guidance_scale=20.0), **kw):
    el, az, dist = cams
    kw.setdefault("min_step", 20)
    kw.setdefault("max_step", 980)
    return if_sds_step(
        engine, rgb, cond, settings, elevation=el, azimuth=az, camera_distances=dist, **kw
    )


def test_tiny_if_layout(tiny_if_path, engine):
    cfg = engine.scheduler.config
    assert (cfg.beta_schedule, cfg.variance_type, cfg.num_train_timesteps) == (
        "squaredcos_cap_v2",
        "learned_range",
        1000,
    )
    u = engine.unet.config
    assert (u.in_channels, u.out_channels, u.sample_size) == (3, 6, 64)
    assert u.encoder_hid_dim == 16 and u.cross_attention_dim == 32
    emb = encode_prompts(str(tiny_if_path), [PROMPT, "zebra!"], encoder="t5")
    assert emb.shape == (2, 77, 16) and torch.isfinite(emb).all()


def test_gradients_flow_to_rgb(engine, bank):
    cams = _cams([0.0, 90.0])
    rgb = torch.rand(2, 64, 64, 3, requires_grad=True)
    out = _step(engine, rgb, _cond(bank, cams[0], cams[1]), cams)
    out["loss_sds"].backward()
    assert rgb.grad is not None and torch.isfinite(rgb.grad).all()
    assert float(out["nonfinite"]) == 0.0
    # At 64 px x = 2·rgb − 1 and loss = ½‖g‖²/B with d loss/d x = g/B, so d loss/d rgb = 2g/B and
    # loss = B·‖d loss/d rgb‖²/8: the gradient reaches the renders with the mapping's factor 2.
    expected = 2 * float(rgb.grad.double().pow(2).sum()) / 8
    assert float(out["loss_sds"].detach()) == pytest.approx(expected, rel=1e-4)
    assert expected > 0


def test_batch_of_three_equals_three_single_calls(engine, bank):
    cams = _cams([0.0, 100.0, -150.0], [5.0, 20.0, 70.0])
    cond = _cond(bank, cams[0], cams[1])
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 64, 64, generator=gen) * 2 - 1
    t = torch.tensor([50, 400, 900])
    eps, var = engine.guided_noise_and_variance(x, t, cond, 21.0)
    for i in range(3):
        e_i, v_i = engine.guided_noise_and_variance(
            x[i : i + 1], t[i : i + 1], cond.select(i), 21.0
        )
        torch.testing.assert_close(eps[i : i + 1], e_i, rtol=1e-3, atol=1e-3)  # scale 21 amplifies
        torch.testing.assert_close(var[i : i + 1], v_i, rtol=1e-4, atol=1e-5)

    rgb = torch.rand(3, 32, 32, 3, generator=gen)
    noise = torch.randn(3, 3, 64, 64, generator=gen)
    whole = _step(engine, rgb, cond, cams, t=t, noise=noise)
    singles = [
        _step(
            engine,
            rgb[i : i + 1],
            cond.select(i),
            tuple(c[i : i + 1] for c in cams),
            t=t[i : i + 1],
            noise=noise[i : i + 1],
        )
        for i in range(3)
    ]
    # loss is 0.5·Σ/B: the batch's loss times B is the sum of the single losses.
    total = sum(float(s["loss_sds"]) for s in singles)
    assert 3 * float(whole["loss_sds"]) == pytest.approx(total, rel=1e-4)


def test_one_unet_call_with_exact_branch_counts(engine, bank):
    seen = []
    hook = engine.unet.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    try:
        # front, side, overhead: the authors' scheme has one view negative for the first two.
        cams = _cams([0.0, 90.0, 30.0], [0.0, 0.0, 80.0])
        cond = _cond(bank, cams[0], cams[1])
        assert branch_counts(cond) == [2 + 1 + 1, 2 + 1 + 1, 2 + 0 + 1]
        out = _step(engine, torch.rand(3, 32, 32, 3), cond, cams)
        assert seen == [cond.branches] == [out["perp_neg_branches"]] == [11]
        seen.clear()
        off = _cond(bank, cams[0], cams[1], perp_neg=False)
        _step(engine, torch.rand(3, 32, 32, 3), off, cams)
        assert seen == [6]
        seen.clear()
        dropped = _cond(bank, cams[0], cams[1], min_weight=1.0)  # |w| <= 1: user negative gone
        _step(engine, torch.rand(3, 32, 32, 3), dropped, cams)
        assert seen == [dropped.branches] and dropped.branches < 11
    finally:
        hook.remove()


def test_perp_neg_off_is_threestudio_if_guidance(engine, bank):
    """ε_c + s(ε_c − ε_u) under the threestudio convention; variance of the positive branch."""
    cams = _cams([30.0, 200.0])
    cond = _cond(bank, cams[0], cams[1], perp_neg=False)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    t = torch.tensor([100, 700])
    settings = SDSSettings(guidance_scale=20.0)
    eps, var = engine.guided_noise_and_variance(x, t, cond, settings.scale)
    with torch.no_grad():
        text = engine.unet(x, t, encoder_hidden_states=cond.positive).sample
        uncond = engine.unet(x, t, encoder_hidden_states=cond.uncond).sample
    expected = text[:, :3] + 20.0 * (text[:, :3] - uncond[:, :3])
    # The engine runs both branches in one batch, the reference one at a time: their ~5e-6
    # roundoff difference is multiplied by 1 + s = 21 (a clean clone's CI once saw 1.07e-4).
    torch.testing.assert_close(eps, expected, rtol=1e-4, atol=21 * 2e-5)
    torch.testing.assert_close(var, text[:, 3:], rtol=1e-4, atol=1e-5)
    assert engine.model_output(eps, var).shape == (2, 6, 64, 64)


def test_guidance_eval_with_perp_neg_returns_images(engine, bank):
    cams = _cams([0.0, 180.0])
    cond = _cond(bank, cams[0], cams[1])
    assert cond.perp_neg and cond.negative.shape[0] > 0
    rgb = torch.rand(2, 64, 64, 3)
    t, noise = torch.tensor([25, 30]), torch.randn(2, 3, 64, 64)
    out = _step(
        engine,
        rgb,
        cond,
        cams,
        min_step=20,
        max_step=30,
        guidance_eval=True,
        max_items_eval=2,
        generator=torch.Generator().manual_seed(0),
        t=t,
        noise=noise,
    )
    ev = out["eval"]
    assert ev["bs"] == 2 and len(ev["texts"]) == 2 and len(ev["noise_levels"]) == 2
    for key in ("imgs_noisy", "imgs_1step", "imgs_1orig", "imgs_final"):
        assert ev[key].shape == (2, 64, 64, 3)
        assert torch.isfinite(ev[key]).all()
    # The noisy images are x_t = √ᾱ·(2·rgb − 1) + σ·ε shown in [0, 1], per sample.
    ac = engine.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = ac.sqrt() * (rgb.permute(0, 3, 1, 2) * 2 - 1) + (1 - ac).sqrt() * noise
    expected = (x_t / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    torch.testing.assert_close(ev["imgs_noisy"], expected, rtol=1e-5, atol=1e-5)
    # Noise levels: the 50-step grid's step at or below each t, over 1000.
    assert all(0 < n <= tt / 1000 for n, tt in zip(ev["noise_levels"], [25, 30]))
    # The training scheduler was not switched to 50 inference steps.
    assert engine.scheduler.num_inference_steps is None


@pytest.mark.parametrize(
    "call,words",
    [
        (
            lambda e, c, k: _step(e, torch.rand(1, 8, 8, 3), c, k, SDSSettings(use_sjc=True)),
            ["use_sjc"],
        ),
        (
            lambda e, c, k: _step(e, torch.rand(1, 8, 8, 3), c, k, SDSSettings(use_img_loss=True)),
            ["use_img_loss"],
        ),
        (lambda e, c, k: _step(e, torch.rand(1, 8, 8, 4), c, k), ["rgb", "(1, 8, 8, 4)"]),
        (lambda e, c, k: SDSSettings(weighting_strategy="nope"), ["weighting_strategy", "nope"]),
        (lambda e, c, k: SDSSettings(scale_convention="x"), ["guidance_scale_convention"]),
        (
            lambda e, c, k: encode_prompts("DeepFloyd/IF", ["a"], encoder="bert"),
            ["encoder", "bert"],
        ),
    ],
)
def test_bad_settings_raise_naming_the_key(engine, bank, call, words):
    cams = _cams([0.0])
    with pytest.raises(ValueError) as info:
        call(engine, _cond(bank, cams[0], cams[1]), cams)
    for word in words:
        assert word in str(info.value)


def test_missing_model_path(tmp_path):
    missing = str(tmp_path / "no" / "model")
    for fn in (
        lambda: load_deepfloyd_if(missing),
        lambda: encode_prompts(missing, ["a"], encoder="t5"),
    ):
        with pytest.raises(FileNotFoundError) as info:
            fn()
        assert "pretrained_model_name_or_path" in str(info.value)
        assert "no/model" in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="pretrained_model_name_or_path"):
        load_deepfloyd_if(str(tmp_path / "empty"))


def test_t5_embedding_cache_round_trip(tiny_if_path, tmp_path):
    model = str(tiny_if_path)
    prompts = [PROMPT, "", *VIEWS]
    first = text_embeddings(model, prompts, tmp_path, encoder="t5")
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == len(prompts)
    t5, clip = EmbeddingCache(tmp_path, "t5"), EmbeddingCache(tmp_path, "clip")
    assert t5.path(model, PROMPT) in files and clip.path(model, PROMPT) not in files
    stamps = [f.stat().st_mtime_ns for f in files]
    again = text_embeddings(model, prompts, tmp_path, encoder="t5")
    assert [f.stat().st_mtime_ns for f in files] == stamps  # read, not rewritten
    fresh = text_embeddings(model, prompts, None, encoder="t5")
    for p in prompts:
        assert first[p].shape == (77, 16)
        assert torch.equal(first[p], again[p])
        torch.testing.assert_close(first[p], fresh[p])
    assert not torch.equal(first[VIEWS[0]], first[VIEWS[1]])
