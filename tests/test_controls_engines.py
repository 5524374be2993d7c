"""The Perp-Neg controls through the SD, IF and VSD steps and the 2D sampler (real tiny models).

References are direct UNet calls on rows built here (one sample, one branch at a time), and the
``one`` choice is recomputed from the weights and the generator's first uniform draw, so nothing is
shared with the batching, gating or sampling code under test.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import pytest
import torch
from torch import Tensor

from threestudio_perpneg.core.conditioning import PromptBank, step_conditioning
from threestudio_perpneg.core.controls import PerpNegControls
from threestudio_perpneg.core.text import text_embeddings, view_prompts
from threestudio_perpneg.core.views import ThreestudioScheme, view_weights
from threestudio_perpneg.engines.sd import (
    PerpNegSDSEngine,
    SDSSettings,
    load_stable_diffusion,
    sds_step,
)

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

PROMPT = "a corgi"
SCALE = 7.5
MIN_STEP, MAX_STEP = 20, 980
SCHEME = ThreestudioScheme()
# front, side, back and an overhead camera: 2 view negatives each but none overhead, plus a user one
ELEVATION = [0.0, 10.0, 5.0, 80.0]
AZIMUTH = [10.0, 100.0, 170.0, 0.0]


@pytest.fixture(scope="module")
def engine(tiny_sd_path: Path) -> PerpNegSDSEngine:
    unet, vae, scheduler = load_stable_diffusion(str(tiny_sd_path))
    return PerpNegSDSEngine(unet, vae, scheduler)


@pytest.fixture(scope="module")
def bank(tiny_sd_path: Path, tmp_path_factory: pytest.TempPathFactory) -> PromptBank:
    views = view_prompts(PROMPT)
    emb = text_embeddings(
        str(tiny_sd_path), [PROMPT, "", *views, "blurry"], tmp_path_factory.mktemp("emb")
    )
    return PromptBank.from_embeddings(emb, PROMPT, "", views, ["blurry"], [-0.5])


@contextlib.contextmanager
def unet_rows(unet: Any) -> Iterator[List[Tuple[Tensor, Tensor, Tensor]]]:
    """(sample, timesteps, encoder_hidden_states) of every UNet forward."""
    calls: List[Tuple[Tensor, Tensor, Tensor]] = []

    def hook(module: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        x = args[0] if args else kwargs["sample"]
        ts = args[1] if len(args) > 1 else kwargs["timestep"]
        ehs = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
        ts = torch.as_tensor(ts).reshape(-1).expand(x.shape[0])
        calls.append((x.detach().clone(), ts.detach().clone(), ehs.detach().clone()))

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def cams(idx: Sequence[int]) -> Dict[str, Tensor]:
    el = torch.tensor([ELEVATION[i] for i in idx])
    return {
        "elevation": el,
        "azimuth": torch.tensor([AZIMUTH[i] for i in idx]),
        "camera_distances": torch.full_like(el, 1.5),
    }


def step(engine, bank, idx, t, controls, generator=None, seed=4) -> Tuple[Dict[str, Any], Tensor]:
    """sds_step on leaf latents; returns its output and B · d loss / d latents (= the SDS grad)."""
    g = torch.Generator().manual_seed(seed)
    b = len(idx)
    lat = torch.randn(b, 4, 64, 64, generator=g).requires_grad_(True)
    noise = torch.randn(b, 4, 64, 64, generator=g)
    c = cams(idx)
    cond = step_conditioning(bank, c["elevation"], c["azimuth"], scheme=SCHEME)
    out = sds_step(
        engine,
        lat.permute(0, 2, 3, 1),
        cond,
        SDSSettings(guidance_scale=SCALE, scale_convention="cfg"),
        min_step=MIN_STEP,
        max_step=MAX_STEP,
        rgb_as_latents=True,
        t=torch.tensor(t),
        noise=noise,
        generator=generator,
        controls=controls,
        **c,
    )
    out["loss_sds"].backward()
    assert lat.grad is not None
    out["_latents"], out["_noise"] = lat.detach(), noise
    return out, lat.grad * b


def negatives_of(bank: PromptBank, i: int) -> List[Tuple[Tensor, float]]:
    """(embedding, weight) of camera i's non-zero negatives: the scheme's view ones, then the user's."""
    c = cams([i])
    w = view_weights(c["elevation"], c["azimuth"], SCHEME).negative_weights[0]
    out = [(bank.views[k], float(w[k])) for k in range(4) if float(w[k]) != 0.0]
    return out + [(bank.negatives[0], float(bank.negative_weights[0]))]


@torch.no_grad()
def reference_grad(engine, bank, i, x0, noise, t, negatives) -> Tensor:
    """(1 − ᾱ_t)(ε̂ − ε) of camera i, every branch its own UNet call."""
    c = cams([i])
    vw = view_weights(c["elevation"], c["azimuth"], SCHEME)
    a = engine.scheduler.alphas_cumprod[t]
    x = a.sqrt() * x0 + (1 - a).sqrt() * noise
    positive = (vw.positive_mix[0].view(4, 1, 1) * bank.views).sum(0)

    def eps(emb: Tensor) -> Tensor:
        tt = torch.tensor([float(t)])
        return engine.unet(x[None], tt, encoder_hidden_states=emb[None]).sample[0]

    e_u = eps(bank.uncond[int(vw.view[0])])
    d_pos = eps(positive) - e_u
    total = d_pos.clone()
    for emb, w in negatives:
        d = eps(emb) - e_u
        total += w * (d - (d * d_pos).sum() / (d_pos * d_pos).sum() * d_pos)
    return (1 - a) * (e_u + SCALE * total - noise)


# ------------------------------------------------------------------------------- SD engine
def test_default_controls_change_nothing_and_draw_nothing(engine, bank) -> None:
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    a, grad_a = step(engine, bank, [0, 1, 3], [100, 500, 900], None, g1)
    b, grad_b = step(engine, bank, [0, 1, 3], [100, 500, 900], PerpNegControls(), g2)
    assert torch.equal(grad_a, grad_b) and torch.equal(a["loss_sds"], b["loss_sds"])
    assert a["perp_neg_branches"] == b["perp_neg_branches"] == 2 * 3 + 3 + 3 + 1
    assert torch.equal(g1.get_state(), g2.get_state())


def test_one_sampling_runs_3_rows_per_sample_and_is_the_drawn_negative(engine, bank) -> None:
    idx, t = [0, 1, 2, 3], [150, 420, 760, 600]
    seed = 21
    with unet_rows(engine.unet) as calls:
        out, grad = step(
            engine,
            bank,
            idx,
            t,
            PerpNegControls(sampling="one"),
            torch.Generator().manual_seed(seed),
        )
    assert len(calls) == 1 and calls[0][0].shape[0] == 3 * 4 == out["perp_neg_branches"]
    # t and noise are given, so the choice is the generator's first uniform per sample.
    u = torch.rand(4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for s, i in enumerate(idx):
        negs = negatives_of(bank, i)
        total = sum(abs(w) for _, w in negs)
        acc, chosen = 0.0, len(negs) - 1
        for k, (_, w) in enumerate(negs):
            acc += abs(w) / total
            if float(u[s]) < acc:
                chosen = k
                break
        emb, w = negs[chosen]
        # The UNet evaluated exactly that negative for this sample, on its own latent.
        neg_rows = [r for r in range(8, 12) if torch.equal(calls[0][0][r], calls[0][0][s])]
        assert len(neg_rows) == 1 and torch.equal(calls[0][2][neg_rows[0]], emb)
        ref = reference_grad(
            engine, bank, i, out["_latents"][s], out["_noise"][s], t[s], [(emb, w * total / abs(w))]
        )
        torch.testing.assert_close(grad[s], ref, rtol=1e-4, atol=1e-4)


def test_t_range_is_vanilla_outside_and_perp_neg_inside_one_batch(engine, bank) -> None:
    idx, t = [0, 1, 2], [100, 500, 900]
    with unet_rows(engine.unet) as calls:
        out, grad = step(engine, bank, idx, t, PerpNegControls(t_range=(0.3, 0.7)))
    inside = 1  # 500 / 1000 in [0.3, 0.7]
    assert out["perp_neg_branches"] == 2 * 3 + len(negatives_of(bank, idx[inside]))
    assert calls[0][0].shape[0] == out["perp_neg_branches"]
    for s, i in enumerate(idx):
        negs = negatives_of(bank, i) if s == inside else []
        ref = reference_grad(engine, bank, i, out["_latents"][s], out["_noise"][s], t[s], negs)
        torch.testing.assert_close(grad[s], ref, rtol=1e-4, atol=1e-4)


def test_weight_scale_multiplies_the_negatives_and_zero_is_vanilla(engine, bank) -> None:
    idx, t = [0, 2], [300, 700]
    out, grad = step(engine, bank, idx, t, PerpNegControls(weight_scale=0.4))
    for s, i in enumerate(idx):
        negs = [(e, 0.4 * w) for e, w in negatives_of(bank, i)]
        ref = reference_grad(engine, bank, i, out["_latents"][s], out["_noise"][s], t[s], negs)
        torch.testing.assert_close(grad[s], ref, rtol=1e-4, atol=1e-4)
    zero, grad0 = step(engine, bank, idx, t, PerpNegControls(weight_scale=0.0))
    assert zero["perp_neg_branches"] == 4
    for s, i in enumerate(idx):
        ref = reference_grad(engine, bank, i, zero["_latents"][s], zero["_noise"][s], t[s], [])
        torch.testing.assert_close(grad0[s], ref, rtol=1e-4, atol=1e-4)


def test_guidance_eval_applies_the_window_at_every_denoising_step(engine, bank) -> None:
    c = cams([0])
    cond = step_conditioning(bank, c["elevation"], c["azimuth"], scheme=SCHEME)
    lat = torch.randn(1, 64, 64, 4, generator=torch.Generator().manual_seed(0))
    with unet_rows(engine.unet) as calls:
        out = sds_step(
            engine,
            lat,
            cond,
            SDSSettings(guidance_scale=SCALE),
            min_step=MIN_STEP,
            max_step=MAX_STEP,
            rgb_as_latents=True,
            t=torch.tensor([700]),
            guidance_eval=True,
            controls=PerpNegControls(t_range=(0.0, 0.5), sampling="one"),
            generator=torch.Generator().manual_seed(1),
            **c,
        )
    assert out["perp_neg_branches"] == 2  # t = 700 is outside [0, 500]
    for x, ts, _ in calls[1:]:  # the eval's denoising calls: all negatives below t = 500
        expected = 2 + 3 if float(ts[0]) / 1000 <= 0.5 else 2
        assert x.shape[0] == expected, (float(ts[0]), x.shape[0])
    assert torch.isfinite(out["eval"]["imgs_final"]).all()


# ------------------------------------------------------------------------------- IF and VSD
def test_if_step_one_sampling_rows(tmp_path_factory: pytest.TempPathFactory) -> None:
    from threestudio_perpneg.engines.pixel import PerpNegIFEngine, if_sds_step, load_deepfloyd_if
    from threestudio_perpneg.tiny.builders import build_tiny_deepfloyd_if

    path = build_tiny_deepfloyd_if(tmp_path_factory.mktemp("tiny-if") / "model", seed=0)
    unet, scheduler = load_deepfloyd_if(str(path))
    eng = PerpNegIFEngine(unet, scheduler)
    views = view_prompts(PROMPT)
    emb = text_embeddings(str(path), [PROMPT, "", *views, "blurry"], None, encoder="t5")
    if_bank = PromptBank.from_embeddings(emb, PROMPT, "", views, ["blurry"], [-1.0])
    c = cams([0, 1, 2])
    cond = step_conditioning(if_bank, c["elevation"], c["azimuth"], scheme=SCHEME)
    assert cond.branches == 2 * 3 + 3 * 3
    rgb = torch.rand(3, 32, 32, 3, generator=torch.Generator().manual_seed(0))

    def run(controls: Any) -> Tuple[Dict[str, Any], List[Any]]:
        with unet_rows(eng.unet) as calls:
            out = if_sds_step(
                eng,
                rgb,
                cond,
                SDSSettings(guidance_scale=20.0),
                min_step=MIN_STEP,
                max_step=MAX_STEP,
                t=torch.tensor([100, 500, 900]),
                generator=torch.Generator().manual_seed(3),
                controls=controls,
                **c,
            )
        return out, calls

    out, calls = run(PerpNegControls(sampling="one"))
    assert out["perp_neg_branches"] == calls[0][0].shape[0] == 3 * 3
    out, calls = run(PerpNegControls(t_range=(0.4, 0.6)))
    assert out["perp_neg_branches"] == calls[0][0].shape[0] == 2 * 3 + 3


def test_vsd_step_controls_act_on_the_pretrained_branch(tiny_sd_path: Path, bank) -> None:
    from diffusers import DDPMScheduler

    from threestudio_perpneg.engines.vsd import LoRAUNet, VSDSettings, vsd_step

    # A UNet of its own: the LoRA processors must not leak into the other tests' engine.
    engine = PerpNegSDSEngine(*load_stable_diffusion(str(tiny_sd_path)))
    lora = LoRAUNet(engine.unet)
    lora_scheduler = DDPMScheduler.from_config(engine.scheduler.config)
    idx = [0, 1, 2, 3]
    c = cams(idx)
    cond = step_conditioning(bank, c["elevation"], c["azimuth"], scheme=SCHEME)
    g = torch.Generator().manual_seed(0)
    inputs = {
        "rgb": torch.randn(4, 8, 8, 4, generator=g),
        "noise": torch.randn(4, 4, 64, 64, generator=g),
        "noise_lora": torch.randn(4, 4, 64, 64, generator=g),
        "camera": torch.randn(4, 4, 4, generator=g),
    }

    def pretrained_rows(controls: Any) -> Tuple[List[int], Dict[str, Any]]:
        rows: List[int] = []

        def hook(module: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
            if kwargs.get("class_labels") is None:
                rows.append(int(args[0].shape[0]))

        handle = engine.unet.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            out = vsd_step(
                engine,
                lora,
                lora_scheduler,
                inputs["rgb"],
                cond,
                bank.prompt.expand(4, -1, -1),
                inputs["camera"],
                VSDSettings(),
                min_step=MIN_STEP,
                max_step=MAX_STEP,
                rgb_as_latents=True,
                t=torch.tensor([100, 300, 600, 900]),
                noise=inputs["noise"],
                t_lora=torch.tensor([10, 20, 30, 40]),
                noise_lora=inputs["noise_lora"],
                drop_camera=False,
                generator=torch.Generator().manual_seed(5),
                controls=controls,
            )
        finally:
            handle.remove()
        return rows, out

    rows, out = pretrained_rows(None)
    assert rows == [2 * 4 + 3 * 3 + 1] == [out["perp_neg_branches"]]
    rows, out = pretrained_rows(PerpNegControls(sampling="one"))
    assert rows == [3 * 4] == [out["perp_neg_branches"]]
    rows, out = pretrained_rows(PerpNegControls(t_range=(0.5, 1.0), weight_scale=2.0))
    assert (
        rows == [2 * 4 + 3 + 1] == [out["perp_neg_branches"]]
    )  # t = 600 (back: 3) and 900 (overhead: 1)


# ------------------------------------------------------------------------------- 2D sampler
@pytest.fixture(scope="module")
def sampler(tiny_sd_path: Path) -> Any:
    from threestudio_perpneg.sampler import PerpNegSampler

    return PerpNegSampler.from_pretrained(str(tiny_sd_path))


def _generate(sampler: Any, weights: Sequence[float], **kw: Any) -> Tuple[Any, List[int]]:
    rows: List[int] = []

    def hook(module: Any, args: Tuple[Any, ...]) -> None:
        rows.append(int(args[0].shape[0]))

    handle = sampler.unet.register_forward_pre_hook(hook)
    try:
        out = sampler.generate(
            PROMPT,
            ["a cat"],
            list(weights),
            num_inference_steps=6,
            height=64,
            width=64,
            seeds=[0, 1],
            progress=False,
            **kw,
        )
    finally:
        handle.remove()
    return out, rows


def test_sampler_window_runs_negative_rows_only_inside(sampler) -> None:
    # int(0.5·6) = 3 <= i < int(1.0·6) = 6: the last three steps run the negative.
    out, rows = _generate(sampler, [1.0, -1.5], perp_neg_start=0.5, perp_neg_stop=1.0)
    assert rows == [2 * 2] * 3 + [3 * 2] * 3
    assert out.settings["perp_neg_start"] == 0.5 and out.settings["perp_neg_stop"] == 1.0
    # An empty window is exactly plain guidance: the negative with weight 0 is never evaluated.
    none, rows_none = _generate(sampler, [1.0, -1.5], perp_neg_start=0.0, perp_neg_stop=0.0)
    plain, rows_plain = _generate(sampler, [1.0, 0.0])
    assert rows_none == rows_plain == [2 * 2] * 6
    assert torch.equal(none.latents, plain.latents)
    full, rows_full = _generate(sampler, [1.0, -1.5])
    assert rows_full == [3 * 2] * 6 and not torch.equal(full.latents, plain.latents)
    assert not torch.equal(out.latents, full.latents) and not torch.equal(
        out.latents, plain.latents
    )


def test_generate_view_takes_the_window(sampler) -> None:
    rows: List[int] = []
    handle = sampler.unet.register_forward_pre_hook(
        lambda module, args: rows.append(int(args[0].shape[0]))
    )
    try:
        out = sampler.generate_view(
            PROMPT,
            view="back",
            scheme="authors",  # back: front (-2) and side (-1) negatives
            num_inference_steps=4,
            height=64,
            width=64,
            seeds=[0],
            progress=False,
            perp_neg_start=0.5,
            perp_neg_stop=1.0,
        )
    finally:
        handle.remove()
    assert len(out.weights["negative"]) == 2
    assert rows == [2, 2, 4, 4]


def test_sampler_window_errors_name_the_argument(sampler) -> None:
    from helpers import raises_naming

    raises_naming(
        lambda: _generate(sampler, [1.0, -1.0], perp_neg_start=0.8, perp_neg_stop=0.2),
        "perp_neg_start",
        "0.8 > 0.2",
    )
    raises_naming(
        lambda: _generate(sampler, [1.0, -1.0], perp_neg_stop=1.5), "perp_neg_stop", "1.5"
    )


@pytest.mark.parametrize(
    "argv,arg",
    [
        (["--perp-neg-start", "0.8", "--perp-neg-stop", "0.2"], "--perp-neg-start"),
        (["--perp-neg-stop", "1.5"], "--perp-neg-stop"),
        (["--perp-neg-start", "soon"], "--perp-neg-start"),
    ],
)
def test_cli_window_errors_exit_2(argv, arg, tmp_path: Path, capsys: Any) -> None:
    from threestudio_perpneg.commands.generate import main

    out = tmp_path / "out"
    assert main(["a corgi", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"argument {arg}:" in err, err
    assert not out.exists()


def test_cli_window_reaches_the_sampler(tiny_sd_path: Path, tmp_path: Path) -> None:
    import json

    from threestudio_perpneg.commands.generate import SIDECAR_NAME, main

    out = tmp_path / "out"
    argv = ["a corgi | a cat", "--weights", "1 | -1", "--model", str(tiny_sd_path)]
    argv += ["--out", str(out), "--steps", "4", "--height", "64", "--width", "64", "--no-progress"]
    assert main([*argv, "--perp-neg-start", "0.25", "--perp-neg-stop", "0.75"]) == 0
    text = json.dumps(json.loads((out / SIDECAR_NAME).read_text(encoding="utf-8")))
    assert '"perp_neg_start": 0.25' in text and '"perp_neg_stop": 0.75' in text


def test_cli_records_the_window_in_the_sidecar_and_the_png(tmp_path: Path) -> None:
    """The negatives' window is part of what made an image: the sidecar and each PNG keep it."""
    import json

    from PIL import Image

    from threestudio_perpneg.commands.generate import main

    out = tmp_path / "out"
    argv = ["a corgi", "--view", "back", "--steps", "2", "--seeds", "0", "--out", str(out)]
    assert main([*argv, "--perp-neg-start", "0.25", "--perp-neg-stop", "0.75"]) == 0
    sidecar = json.loads((out / "generate.json").read_text())
    settings = sidecar["settings"]
    assert (settings["perp_neg_start"], settings["perp_neg_stop"]) == (0.25, 0.75)
    (record,) = sidecar["images"]
    with Image.open(out / record["file"]) as img:
        meta = json.loads(img.text["perpneg"])
    assert meta["perp_neg_window"] == [0.25, 0.75]
