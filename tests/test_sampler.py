"""Tests of the 2D Perp-Neg sampler (``threestudio_perpneg.sampler.pipeline``).

Everything runs on the tiny random Stable Diffusion checkpoint (``tiny_sd_path``) on the CPU, at
64×64 pixels (8×8 latents) with a few steps. The references are written out here: a sequential
sampler that calls the UNet once per prompt and per image and combines the predictions in plain
torch, the diffusers pipeline itself (plain CFG, negative prompts), and
:func:`threestudio_perpneg.core.views.view_weights` for the view conditioning.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence

import numpy as np
import pytest
import torch
from helpers import raises_naming
from torch import Tensor

import threestudio_perpneg.sampler.pipeline as sampler_mod
from threestudio_perpneg.core.text import view_prompts
from threestudio_perpneg.core.views import OVERHEAD, VIEW_NAMES, make_scheme, view_weights
from threestudio_perpneg.sampler.pipeline import (
    MODES,
    SCHEDULERS,
    GenerationResult,
    PerpNegSampler,
    PromptSpec,
    make_scheduler,
    parse_prompts,
    parse_seeds,
)

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

SIZE = 64
STEPS = 4
SCALE = 7.5
PROMPT = "a corgi"
#: One negative and one positive extra prompt.
EXTRAS = ["a cat", "green grass"]
WEIGHTS = [1.0, -1.5, 0.7]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sampler(tiny_sd_path: Path) -> PerpNegSampler:
    return PerpNegSampler.from_pretrained(str(tiny_sd_path))


def with_scheduler(base: PerpNegSampler, name: str) -> PerpNegSampler:
    """A sampler over a new pipeline sharing ``base``'s models, with scheduler ``name``."""
    from diffusers import StableDiffusionPipeline

    p = base.pipe
    pipe = StableDiffusionPipeline(
        vae=p.vae,
        text_encoder=p.text_encoder,
        tokenizer=p.tokenizer,
        unet=p.unet,
        scheduler=make_scheduler(name, p.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return PerpNegSampler(pipe)


@pytest.fixture(scope="module")
def samplers(sampler: PerpNegSampler) -> Dict[str, PerpNegSampler]:
    out = {name: with_scheduler(sampler, name) for name in ("euler", "euler_a", "dpm")}
    out["ddim"] = sampler
    return out


def gen(sampler: PerpNegSampler, *args: Any, **kwargs: Any) -> GenerationResult:
    kwargs = {
        "num_inference_steps": STEPS,
        "guidance_scale": SCALE,
        "height": SIZE,
        "width": SIZE,
        "progress": False,
        **kwargs,
    }
    return sampler.generate(*args, **kwargs)


def gen_view(sampler: PerpNegSampler, *args: Any, **kwargs: Any) -> GenerationResult:
    kwargs = {
        "num_inference_steps": STEPS,
        "guidance_scale": SCALE,
        "height": SIZE,
        "width": SIZE,
        "progress": False,
        **kwargs,
    }
    return sampler.generate_view(*args, **kwargs)


@contextlib.contextmanager
def unet_spy(unet: Any) -> Iterator[List[Dict[str, Any]]]:
    """Records every real UNet forward: batch rows, input dtypes, encoder hidden states."""
    calls: List[Dict[str, Any]] = []

    def hook(module: Any, args: Any, kwargs: Any) -> None:
        sample = args[0] if args else kwargs["sample"]
        states = kwargs.get("encoder_hidden_states")
        if states is None and len(args) > 2:
            states = args[2]
        calls.append({"rows": sample.shape[0], "dtype": sample.dtype, "states": states.clone()})

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


# --------------------------------------------------------------------------- references
@torch.no_grad()
def encode(pipe: Any, text: str) -> Tensor:
    """CLIP embedding ``[1, 77, D]`` of one prompt, as diffusers' ``encode_prompt`` does it."""
    tok = pipe.tokenizer(
        [text],
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return pipe.text_encoder(tok.input_ids)[0]


@torch.no_grad()
def sequential_reference(
    pipe: Any,
    prompt: str,
    extras: Sequence[str],
    weights: Sequence[float],
    seeds: Sequence[int],
    *,
    mode: str = "perpneg",
    eta: float = 0.0,
) -> Tensor:
    """The official repository's scheme: one image at a time, one UNet call per prompt per step
    (batch 1), the combination in plain torch, a fresh scheduler and generator per image."""
    texts = [prompt, *extras]
    emb = {t: encode(pipe, t) for t in ["", *texts]}
    finals = []
    for seed in seeds:
        sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
        sched.set_timesteps(STEPS)
        g = torch.Generator().manual_seed(seed)
        lat = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=g) * sched.init_noise_sigma
        params = inspect.signature(sched.step).parameters
        step_kwargs: Dict[str, Any] = {}
        if "eta" in params:
            step_kwargs["eta"] = eta
        if "generator" in params:
            step_kwargs["generator"] = g
        for t in sched.timesteps:
            x = sched.scale_model_input(lat, t)
            eps_u = pipe.unet(x, t, encoder_hidden_states=emb[""]).sample
            deltas = [pipe.unet(x, t, encoder_hidden_states=emb[p]).sample - eps_u for p in texts]
            if mode == "cebm":
                total = sum(w * d for w, d in zip(weights, deltas))
            else:
                pos = sum(w * d for w, d in zip(weights, deltas) if w > 0)
                total = pos
                for w, d in zip(weights, deltas):
                    if w < 0:
                        coef = (d * pos).sum() / (pos * pos).sum()
                        total = total + w * (d - coef * pos)
            eps = eps_u + SCALE * total
            lat = sched.step(eps, t, lat, **step_kwargs).prev_sample
        finals.append(lat)
    return torch.cat(finals)


def pipeline_latents(
    sampler: PerpNegSampler, prompt: str, negative_prompt: str, seeds: Sequence[int], **kw: Any
) -> Any:
    """The diffusers pipeline's own output (plain CFG with a negative prompt)."""
    return sampler.pipe(
        prompt,
        negative_prompt=negative_prompt,
        guidance_scale=SCALE,
        num_inference_steps=STEPS,
        height=SIZE,
        width=SIZE,
        num_images_per_prompt=len(seeds),
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        **kw,
    ).images


def png_bytes(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def assert_close(a: Tensor, b: Tensor, tol: float = 1e-4) -> None:
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


# --------------------------------------------------------------------------- batched == sequential
@pytest.mark.parametrize("scheduler", ["ddim", "euler", "euler_a", "dpm"])
def test_batched_perpneg_equals_sequential_reference(
    samplers: Dict[str, PerpNegSampler], scheduler: str
) -> None:
    s = samplers[scheduler]
    out = gen(s, PROMPT, EXTRAS, WEIGHTS, seeds=[3, 11])
    ref = sequential_reference(s.pipe, PROMPT, EXTRAS, WEIGHTS, [3, 11])
    assert out.latents.shape == (2, 4, SIZE // 8, SIZE // 8)
    assert_close(out.latents, ref)
    # The test has teeth: without the projection (cebm) the result is far from it.
    unprojected = sequential_reference(s.pipe, PROMPT, EXTRAS, WEIGHTS, [3, 11], mode="cebm")
    assert (unprojected - ref).abs().max() > 100 * 1e-4 * (1 + ref.abs().max())


def test_cebm_equals_unprojected_weighted_sum(sampler: PerpNegSampler) -> None:
    out = gen(sampler, PROMPT, EXTRAS, WEIGHTS, seeds=[3, 11], mode="cebm")
    assert_close(
        out.latents,
        sequential_reference(sampler.pipe, PROMPT, EXTRAS, WEIGHTS, [3, 11], mode="cebm"),
    )
    assert out.weights["positive"] == [[PROMPT, 1.0], ["a cat", -1.5], ["green grass", 0.7]]
    assert out.weights["negative"] == []
    perp = gen(sampler, PROMPT, EXTRAS, WEIGHTS, seeds=[3, 11])
    assert not torch.allclose(out.latents, perp.latents, atol=1e-2)


def test_several_negatives_and_positives(sampler: PerpNegSampler) -> None:
    extras = ["a cat", "green grass", "blurry", "a red ball"]
    weights = [1.0, -1.0, 0.5, -0.3, 0.25]
    out = gen(sampler, PROMPT, extras, weights, seeds=[5])
    assert_close(out.latents, sequential_reference(sampler.pipe, PROMPT, extras, weights, [5]))
    assert out.weights["positive"] == [[PROMPT, 1.0], ["green grass", 0.5], ["a red ball", 0.25]]
    assert out.weights["negative"] == [["a cat", -1.0], ["blurry", -0.3]]


# --------------------------------------------------------------------------- plain CFG / sd mode
@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm"])
def test_zero_weights_equal_plain_cfg_and_the_pipeline(
    samplers: Dict[str, PerpNegSampler], scheduler: str
) -> None:
    s = samplers[scheduler]
    seeds = [2, 9]
    zero = gen(s, PROMPT, EXTRAS, [1.0, 0.0, 0.0], seeds=seeds)
    plain = gen(s, PROMPT, seeds=seeds)
    # Zero-weight prompts are never evaluated: same rows, bit-identical result.
    assert torch.equal(zero.latents, plain.latents)
    assert zero.weights["negative"] == [] and zero.weights["positive"] == [[PROMPT, 1.0]]
    cebm_zero = gen(s, PROMPT, EXTRAS, [1.0, 0.0, 0.0], seeds=seeds, mode="cebm")
    assert torch.equal(cebm_zero.latents, plain.latents)
    # The diffusers pipeline's own CFG with the same seeds (one generator per image).
    assert_close(plain.latents, pipeline_latents(s, PROMPT, "", seeds, output_type="latent"), 1e-5)
    if scheduler == "ddim":
        images = pipeline_latents(s, PROMPT, "", seeds, output_type="np")
        ours = np.stack([np.asarray(im, dtype=np.float64) / 255.0 for im in plain.images])
        assert ours.shape == images.shape == (2, SIZE, SIZE, 3)
        assert np.abs(ours - images).max() <= 0.5 / 255 + 1e-4


def test_sd_mode_equals_pipeline_with_joined_negative_prompt(sampler: PerpNegSampler) -> None:
    extras = ["a cat", "blurry", "sunny", "zero"]
    weights = [1.0, -1.0, -0.25, 2.0, 0.0]
    out = gen(sampler, PROMPT, extras, weights, seeds=[4, 1], mode="sd", negative_prompt="ugly")
    ref = pipeline_latents(
        sampler, "a corgi, sunny", "a cat, blurry, ugly", [4, 1], output_type="latent"
    )
    assert_close(out.latents, ref, 1e-5)
    assert out.weights["positive"] == [["a corgi, sunny", 1.0]]
    assert out.weights["uncond"] == "a cat, blurry, ugly"
    assert "ignored" in out.weights["note"]
    # Only the signs matter.
    other = gen(
        sampler,
        PROMPT,
        extras,
        [3.0, -7.0, -1.0, 0.1, 0.0],
        seeds=[4, 1],
        mode="sd",
        negative_prompt="ugly",
    )
    assert torch.equal(other.latents, out.latents)


def test_negative_prompt_is_the_unconditional_branch(sampler: PerpNegSampler) -> None:
    out = gen(sampler, PROMPT, seeds=[6], negative_prompt="blurry")
    assert out.weights["uncond"] == "blurry"
    assert_close(
        out.latents, pipeline_latents(sampler, PROMPT, "blurry", [6], output_type="latent"), 1e-5
    )


# --------------------------------------------------------------------------- batching
def test_one_unet_call_per_step_with_all_branches(
    sampler: PerpNegSampler, monkeypatch: pytest.MonkeyPatch
) -> None:
    combine_calls: List[int] = []
    core = sampler_mod.perp_neg_guidance

    def spy(*args: Any, **kwargs: Any) -> Tensor:
        combine_calls.append(1)
        return core(*args, **kwargs)

    monkeypatch.setattr(sampler_mod, "perp_neg_guidance", spy)
    extras = ["a cat", "green grass", "blurry"]
    seeds = [0, 1, 2]
    for mode, weights, branches in [
        ("perpneg", [1.0, -1.0, 0.0, 0.5], 3),  # main + 2 non-zero extras
        ("cebm", [1.0, -1.0, 0.0, 0.5], 3),
        ("sd", [1.0, -1.0, 0.0, 0.5], 1),
        ("perpneg", [1.0, 0.0, 0.0, 0.0], 1),
    ]:
        combine_calls.clear()
        with unet_spy(sampler.pipe.unet) as calls:
            out = gen(sampler, PROMPT, extras, weights, seeds=seeds, mode=mode)
        assert len(calls) == out.unet_calls == STEPS, mode
        assert [c["rows"] for c in calls] == [len(seeds) * (1 + branches)] * STEPS, mode
        # The combination is the core function, once per step.
        assert len(combine_calls) == STEPS


def test_unet_calls_follow_the_scheduler_timesteps(sampler: PerpNegSampler) -> None:
    # PNDM (PRK warm-up, the tiny config does not skip it) has more timesteps than steps.
    pndm = with_scheduler(sampler, "pndm")
    with unet_spy(pndm.pipe.unet) as calls:
        out = gen(pndm, PROMPT, EXTRAS, WEIGHTS, seeds=[0, 1], num_inference_steps=10)
    assert out.unet_calls == len(calls) == len(pndm.scheduler.timesteps) > 10
    assert {c["rows"] for c in calls} == {2 * 4}
    raises_naming(
        lambda: gen(pndm, PROMPT, seeds=[0], num_inference_steps=3), "num_inference_steps"
    )


def test_default_weights_make_extras_negative(sampler: PerpNegSampler) -> None:
    out = gen(sampler, PROMPT, ["a cat"], seeds=[0], num_inference_steps=1)
    assert out.weights["negative"] == [["a cat", -1.0]]
    assert out.weights["requested"] == [[PROMPT, 1.0], ["a cat", -1.0]]


# --------------------------------------------------------------------------- seeds
def test_seeds_reproduce_bit_for_bit_and_are_per_image(samplers: Dict[str, PerpNegSampler]) -> None:
    s = samplers["euler_a"]  # ancestral: the step draws noise from each image's generator
    a = gen(s, PROMPT, EXTRAS, WEIGHTS, seeds=[7, 8])
    b = gen(s, PROMPT, EXTRAS, WEIGHTS, seeds=[7, 8])
    assert torch.equal(a.latents, b.latents)
    assert [png_bytes(im) for im in a.images] == [png_bytes(im) for im in b.images]
    assert a.seeds == [7, 8]
    assert not torch.allclose(a.latents[0], a.latents[1], atol=1e-2)
    single = gen(s, PROMPT, EXTRAS, WEIGHTS, seeds=[8])
    assert_close(a.latents[1:], single.latents)
    swapped = gen(s, PROMPT, EXTRAS, WEIGHTS, seeds=[8, 7])
    assert_close(swapped.latents.flip(0), a.latents)


def test_ddim_eta_uses_the_per_image_generators(sampler: PerpNegSampler) -> None:
    a = gen(sampler, PROMPT, seeds=[1, 2], eta=1.0)
    b = gen(sampler, PROMPT, seeds=[2], eta=1.0)
    c = gen(sampler, PROMPT, seeds=[1, 2], eta=0.0)
    assert_close(a.latents[1:], b.latents)
    assert not torch.allclose(a.latents, c.latents, atol=1e-3)
    assert a.settings["eta"] == 1.0


def test_result_is_json_serialisable_and_regenerates(sampler: PerpNegSampler) -> None:
    out = gen(sampler, PROMPT, EXTRAS, WEIGHTS, seeds=[3])
    record = json.loads(json.dumps({"weights": out.weights, "settings": out.settings}))
    st = record["settings"]
    assert st["scheduler"] == type(sampler.pipe.scheduler).__name__
    again = sampler.generate(
        st["prompt"],
        st["extra_prompts"],
        st["weights"],
        mode=st["mode"],
        negative_prompt=st["negative_prompt"],
        num_inference_steps=st["num_inference_steps"],
        guidance_scale=st["guidance_scale"],
        height=st["height"],
        width=st["width"],
        seeds=st["seeds"],
        eta=st["eta"],
        progress=False,
    )
    assert torch.equal(again.latents, out.latents)
    assert out.images[0].size == (SIZE, SIZE) and out.images[0].mode == "RGB"


def test_fp16_pipeline_casts_to_the_unet_dtype(tiny_sd_path: Path, sampler: PerpNegSampler) -> None:
    half = PerpNegSampler.from_pretrained(str(tiny_sd_path), torch_dtype=torch.float16)
    assert half.dtype == torch.float16
    with unet_spy(half.pipe.unet) as calls:
        out = gen(half, PROMPT, EXTRAS, WEIGHTS, seeds=[3, 11], num_inference_steps=3)
    assert all(c["dtype"] == torch.float16 and c["states"].dtype == torch.float16 for c in calls)
    assert out.latents.dtype == torch.float16 and torch.isfinite(out.latents).all()
    full = gen(sampler, PROMPT, EXTRAS, WEIGHTS, seeds=[3, 11], num_inference_steps=3)
    err = (out.latents.float() - full.latents).abs().max()
    assert err < 0.05 * full.latents.abs().max()


# --------------------------------------------------------------------------- views
VIEW_CASES = [
    {"view": "front"},
    {"view": "side"},
    {"view": "back"},
    {"view": "overhead"},
    {"azimuth": 0.0},
    {"azimuth": 30.0},
    {"azimuth": 60.0},
    {"azimuth": 90.0},
    {"azimuth": 135.0},
    {"azimuth": 180.0},
    {"azimuth": -150.0},
    {"azimuth": 300.0},
    {"azimuth": 45.0, "elevation": 70.0},
]


def expected_view(case: Dict[str, Any], scheme: str) -> Dict[str, Any]:
    """The view conditioning recomputed from views.view_weights."""
    canonical = {"front": 0.0, "side": 90.0, "back": 180.0, "overhead": 0.0}
    az = canonical[case["view"]] if "view" in case else case["azimuth"]
    elev = case.get("elevation", 0.0)
    forced = None if "view" not in case else torch.tensor([VIEW_NAMES.index(case["view"])])
    vw = view_weights(
        torch.tensor([elev], dtype=torch.float64),
        torch.tensor([az], dtype=torch.float64),
        make_scheme(scheme),
        view=forced,
    )
    return {
        "view": VIEW_NAMES[int(vw.view[0])],
        "r": float(vw.r[0]),
        "mix": {n: float(m) for n, m in zip(VIEW_NAMES, vw.positive_mix[0])},
        "neg": {n: float(w) for n, w in zip(VIEW_NAMES, vw.negative_weights[0])},
    }


@pytest.mark.parametrize("scheme", ["threestudio", "authors"])
def test_view_names_and_azimuths_map_to_buckets_mixes_and_weights(
    sampler: PerpNegSampler, scheme: str
) -> None:
    texts = dict(zip(VIEW_NAMES, view_prompts(PROMPT)))
    for case in VIEW_CASES:
        with unet_spy(sampler.pipe.unet) as calls:
            out = gen_view(sampler, PROMPT, scheme=scheme, num_inference_steps=1, seeds=[0], **case)
        exp = expected_view(case, scheme)
        got = out.weights["view"]
        assert got["view"] == exp["view"], case
        assert got["scheme"] == scheme
        assert math.isclose(got["r"], exp["r"], abs_tol=1e-5), case
        for name in VIEW_NAMES:
            assert math.isclose(got["positive_mix"][name], exp["mix"][name], abs_tol=1e-5), case
            assert math.isclose(got["negative_weights"][name], exp["neg"][name], abs_tol=1e-5), case
        negs = [[texts[n], w] for n, w in exp["neg"].items() if w != 0.0]
        assert len(out.weights["negative"]) == len(negs), case
        for (t, w), (et, ew) in zip(out.weights["negative"], negs):
            assert t == et and math.isclose(w, ew, rel_tol=1e-5, abs_tol=1e-6), case
        assert calls[0]["rows"] == 1 + 1 + len(negs), case

    # Hand-checked anchors: the view names.
    front = gen_view(sampler, PROMPT, view="front", scheme=scheme, num_inference_steps=1)
    assert front.weights["view"]["positive_mix"] == {
        "side": 0.0,
        "front": 1.0,
        "back": 0.0,
        "overhead": 0.0,
    }
    back = gen_view(sampler, PROMPT, view="back", scheme=scheme, num_inference_steps=1)
    assert back.weights["view"]["positive_mix"]["back"] == 1.0
    expected_back = {"threestudio": (-1.967, -0.394), "authors": (-2.0, -1.0)}[scheme]
    nw = back.weights["view"]["negative_weights"]
    assert math.isclose(nw["front"], expected_back[0], abs_tol=1e-6)
    assert math.isclose(nw["side"], expected_back[1], abs_tol=1e-6)
    overhead = gen_view(sampler, PROMPT, view="overhead", scheme=scheme, num_inference_steps=1)
    assert overhead.weights["view"]["view"] == VIEW_NAMES[OVERHEAD]
    assert overhead.weights["positive"] == [[texts["overhead"], 1.0]]
    assert overhead.weights["negative"] == []


def test_view_positive_is_the_interpolated_embedding(sampler: PerpNegSampler) -> None:
    emb = {t: encode(sampler.pipe, t)[0] for t in view_prompts(PROMPT)}
    side, front = view_prompts(PROMPT)[0], view_prompts(PROMPT)[1]
    with unet_spy(sampler.pipe.unet) as calls:
        out = gen_view(sampler, PROMPT, azimuth=30.0, num_inference_steps=1, seeds=[0, 1])
    r = 1.0 - 30.0 / 90.0
    expected = r * emb[front] + (1.0 - r) * emb[side]
    states = calls[0]["states"]  # [rows, 77, D]: uncond ×2, positive ×2, negatives ×2 …
    assert states.shape[0] == 2 * (1 + 1 + len(out.weights["negative"]))
    assert_close(states[2], expected, 1e-5)
    assert_close(states[3], expected, 1e-5)
    assert out.weights["view"]["positive_mix"]["front"] == pytest.approx(r)
    assert front in out.weights["positive"][0][0] and side in out.weights["positive"][0][0]


def test_user_view_weights_override_the_scheme(sampler: PerpNegSampler) -> None:
    texts = dict(zip(VIEW_NAMES, view_prompts(PROMPT)))
    with unet_spy(sampler.pipe.unet) as calls:
        out = gen_view(
            sampler,
            PROMPT,
            view="side",
            view_weights={"back": -1.25, "front": -0.5},
            extra_prompts=["a cat"],
            weights=[1.0, -0.75],
            num_inference_steps=1,
        )
    v = out.weights["view"]
    assert v["scheme"] == "user"
    assert v["negative_weights"] == {"side": 0.0, "front": -0.5, "back": -1.25, "overhead": 0.0}
    assert out.weights["negative"] == [
        [texts["front"], -0.5],
        [texts["back"], -1.25],
        ["a cat", -0.75],
    ]
    assert out.weights["positive"] == [[texts["side"], 1.0]]
    assert calls[0]["rows"] == 1 + 1 + 3


def test_authors_and_threestudio_schemes_differ(sampler: PerpNegSampler) -> None:
    a = gen_view(sampler, PROMPT, azimuth=135.0, scheme="authors", seeds=[0])
    t = gen_view(sampler, PROMPT, azimuth=135.0, scheme="threestudio", seeds=[0])
    assert a.weights["view"]["negative_weights"] != t.weights["view"]["negative_weights"]
    assert a.weights["view"]["positive_mix"] == t.weights["view"]["positive_mix"]
    assert not torch.allclose(a.latents, t.latents, atol=1e-3)


def test_view_modes_cebm_and_sd(sampler: PerpNegSampler) -> None:
    texts = dict(zip(VIEW_NAMES, view_prompts(PROMPT)))
    sd = gen_view(
        sampler, PROMPT, view="back", mode="sd", extra_prompts=["a cat"], num_inference_steps=1
    )
    assert sd.weights["uncond"] == f"{texts['side']}, {texts['front']}, a cat"
    assert sd.weights["positive"] == [[texts["back"], 1.0]]
    sd_pos = gen_view(
        sampler,
        PROMPT,
        view="back",
        mode="sd",
        extra_prompts=["red"],
        weights=[1.0, 1.0],
        num_inference_steps=1,
    )
    assert sd_pos.weights["positive"] == [["a corgi, red, back view", 1.0]]
    cebm = gen_view(sampler, PROMPT, view="back", mode="cebm", num_inference_steps=1)
    assert cebm.weights["negative"] == []
    assert [t for t, _ in cebm.weights["positive"]] == [
        texts["back"],
        texts["side"],
        texts["front"],
    ]


def test_view_sweep_strip(sampler: PerpNegSampler) -> None:
    azimuths = (0, 45, 90, 135, 180)
    strip, results = sampler.view_sweep(
        PROMPT, azimuths, seed=3, num_inference_steps=2, height=SIZE, width=SIZE, progress=False
    )
    assert strip.size == (len(azimuths) * SIZE, SIZE)
    assert [r.weights["view"]["azimuth"] for r in results] == list(azimuths)
    assert [r.weights["view"]["view"] for r in results] == ["front", "side", "side", "side", "back"]
    assert all(r.seeds == [3] for r in results)
    # Each tile is its result's image (below the label).
    for i, r in enumerate(results):
        tile = np.asarray(strip.crop((i * SIZE, SIZE // 2, (i + 1) * SIZE, SIZE)))
        assert np.array_equal(tile, np.asarray(r.images[0])[SIZE // 2 :])
    one = gen_view(sampler, PROMPT, azimuth=135, seeds=[3], num_inference_steps=2)
    assert torch.equal(one.latents, results[3].latents)


# --------------------------------------------------------------------------- parsing
def test_parse_prompts() -> None:
    spec = parse_prompts("a peacock, back view | a peacock, front view", "1 | -3.5")
    assert spec == PromptSpec("a peacock, back view", ["a peacock, front view"], [1.0, -3.5])
    spec = parse_prompts(
        "an astronaut riding a horse|a jumping horse | a white horse", "1|-0.3|-0.1"
    )
    assert spec.extras == ["a jumping horse", "a white horse"] and spec.weights == [1.0, -0.3, -0.1]
    assert parse_prompts("a | b | c").weights == [1.0, -1.0, -1.0]
    assert parse_prompts("just one").weights == [1.0]


def test_parse_seeds() -> None:
    assert parse_seeds("0-7") == list(range(8))
    assert parse_seeds("1,3,5") == [1, 3, 5]
    assert parse_seeds("30") == [30]
    assert parse_seeds(" 0-3, 10 ") == [0, 1, 2, 3, 10]


# --------------------------------------------------------------------------- bad input
def test_bad_input_names_the_argument(sampler: PerpNegSampler) -> None:
    s = sampler

    def g(**kw: Any) -> Any:
        kw = {
            "prompt": PROMPT,
            "num_inference_steps": 1,
            "height": SIZE,
            "width": SIZE,
            "progress": False,
            **kw,
        }
        return lambda: s.generate(**kw)

    def v(**kw: Any) -> Any:
        kw = {
            "prompt": PROMPT,
            "num_inference_steps": 1,
            "height": SIZE,
            "width": SIZE,
            "progress": False,
            **kw,
        }
        return lambda: s.generate_view(**kw)

    with unet_spy(s.pipe.unet) as calls:
        # weights count not matching the prompts
        raises_naming(g(extra_prompts=["a cat"], weights=[1.0]), "weights", "2")
        raises_naming(g(extra_prompts=["a cat"], weights=[1.0, -1.0, -2.0]), "weights")
        raises_naming(g(extra_prompts=["a cat"], weights=[1.0, float("nan")]), "weights")
        raises_naming(g(weights=[0.0]), "weights")
        raises_naming(v(view="front", extra_prompts=["a"], weights=[1, 2, 3]), "weights")
        # empty prompts
        raises_naming(g(prompt=""), "prompt")
        raises_naming(g(prompt="   "), "prompt")
        raises_naming(g(extra_prompts=["a cat", " "]), "extra_prompts[1]")
        raises_naming(g(extra_prompts="a cat"), "extra_prompts")
        raises_naming(v(prompt="", view="front"), "prompt")
        # mode
        raises_naming(g(mode="negprompt"), "mode", "negprompt")
        raises_naming(v(view="front", mode="PERPNEG"), "mode")
        # height / width
        raises_naming(g(height=63), "height", "63")
        raises_naming(g(width=100), "width", "100")
        raises_naming(g(height=0), "height")
        raises_naming(g(width=-8), "width")
        raises_naming(g(height=64.0), "height")
        # seeds
        raises_naming(g(seeds=[]), "seeds")
        raises_naming(g(seeds=[-1]), "seeds")
        raises_naming(g(seeds="0-3"), "seeds")
        # other sampling settings
        raises_naming(g(num_inference_steps=0), "num_inference_steps")
        raises_naming(g(guidance_scale=float("inf")), "guidance_scale")
        raises_naming(g(eta=-0.1), "eta")
        raises_naming(g(negative_prompt=None), "negative_prompt")
        # views
        raises_naming(v(view="left"), "view", "left")
        raises_naming(v(azimuth=361.0), "azimuth", "361")
        raises_naming(v(azimuth=-180.5), "azimuth")
        raises_naming(v(azimuth=float("nan")), "azimuth")
        raises_naming(v(), "view", "azimuth")
        raises_naming(v(view="front", azimuth=0.0), "view", "azimuth")
        raises_naming(v(azimuth=0.0, elevation=91.0), "elevation")
        raises_naming(v(view="front", scheme="mine"), "scheme", "mine")
        raises_naming(v(view="front", view_weights={"left": -1.0}), "view_weights", "left")
        raises_naming(v(view="front", view_weights={"side": float("nan")}), "view_weights")
        raises_naming(lambda: s.view_sweep(PROMPT, azimuths=[]), "azimuths")
        raises_naming(lambda: s.view_sweep(PROMPT, azimuths=[0, 400]), "azimuth")
        raises_naming(lambda: s.view_sweep(PROMPT, azimuths=[0], view="front"), "view")
    assert calls == []  # everything is checked before the first UNet call


def test_bad_text_input_names_the_argument() -> None:
    raises_naming(lambda: parse_prompts("a | b", "1 | -1 | -2"), "weights", "3", "2")
    raises_naming(lambda: parse_prompts("a | b | c", "1"), "weights")
    raises_naming(lambda: parse_prompts("a | b", "1 | x"), "weights", "x")
    raises_naming(lambda: parse_prompts("a | b", "1 | nan"), "weights")
    raises_naming(lambda: parse_prompts("a || b"), "prompt")
    raises_naming(lambda: parse_prompts(" | b"), "prompt")
    raises_naming(lambda: parse_prompts(""), "prompt")
    for bad in ["7-0", "a-b", "", "  ", "-3", "1,,2", "1-", "1.5", "0-99999999"]:
        raises_naming(lambda bad=bad: parse_seeds(bad), "seeds")


def test_from_pretrained(tiny_sd_path: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model"):
        PerpNegSampler.from_pretrained(str(tmp_path / "missing" / "model"))
    with pytest.raises(FileNotFoundError, match="model"):
        PerpNegSampler.from_pretrained(str(tmp_path))  # a folder without a checkpoint
    raises_naming(
        lambda: PerpNegSampler.from_pretrained(str(tiny_sd_path), scheduler="magic"),
        "scheduler",
        "magic",
    )
    raises_naming(lambda: make_scheduler("magic", {}), "scheduler")
    euler = PerpNegSampler.from_pretrained(str(tiny_sd_path), scheduler="euler")
    assert type(euler.scheduler).__name__ == SCHEDULERS["euler"] == "EulerDiscreteScheduler"
    assert euler.default_size() == (512, 512)
    out = gen(euler, PROMPT, seeds=[0], num_inference_steps=2)
    assert out.settings["scheduler"] == "EulerDiscreteScheduler"
    assert MODES == ("perpneg", "cebm", "sd")


def test_module_imports_diffusers_and_pil_lazily() -> None:
    code = (
        "import sys, threestudio_perpneg.sampler.pipeline; "
        "print(sorted(m for m in ('diffusers', 'PIL', 'transformers') if m in sys.modules))"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "[]"
