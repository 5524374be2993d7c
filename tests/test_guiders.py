"""PerpNegGuidance in diffusers' Modular Diffusers, on a tiny seeded SDXL modular pipeline (CPU).

References are independent: a per-sample loop of the paper's formula in float64, diffusers' own
ClassifierFreeGuidance, and the same pipeline run one prompt at a time.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

try:
    from threestudio_perpneg.guiders import PerpNegGuidance
except ImportError as exc:  # threestudio's pinned stack: diffusers 0.19 has no guiders
    pytest.skip(f"needs diffusers with guiders: {exc}", allow_module_level=True)

from diffusers import ClassifierFreeGuidance
from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks
from helpers import (
    PAIRS,
    assert_batch_matches_one_prompt_runs,
    assert_negatives_paired,
    assert_window_rows_and_finite_images,
    raises_naming,
    seeded_latents,
    tiny_guider_pipe,
)
from helpers import perp_neg_reference as _reference

from threestudio_perpneg.core.guidance import perp_neg_guidance
from threestudio_perpneg.tiny.modular import build_tiny_sdxl_modular

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
README = Path(__file__).resolve().parents[1] / "README.md"
DOCS_GUIDER = README.parent / "docs" / "guider.md"


def _preds(batch: int = 4, k: int = 2, seed: int = 0) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 4, 8, 8, generator=g) for _ in range(2 + k)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-sdxl-modular")


def _pipe(tiny_dir: Path, guider: Any, perp_neg: bool = True) -> Any:
    return tiny_guider_pipe(
        build_tiny_sdxl_modular, StableDiffusionXLAutoBlocks(), tiny_dir, guider, perp_neg
    )


def _run(pipe: Any, steps: int = 2, **kwargs: Any) -> Dict[str, Any]:
    rows: List[int] = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, a: rows.append(int(a[0].shape[0])))
    try:
        out = pipe(num_inference_steps=steps, output=["latents", "images"], **kwargs)
    finally:
        hook.remove()
    return {"latents": out["latents"], "images": out["images"], "rows": rows}


# ---------------------------------------------------------------------------- one step
def test_one_step_equals_the_core_per_sample_at_batch_4() -> None:
    u, c, n0, n1 = _preds(batch=4)  # two prompts x two images
    guider = PerpNegGuidance(
        guidance_scale=5.0, negative_weights=[-1.0, -0.5], perp_neg_weight_scale=0.8
    )
    guider.set_state(step=0, num_inference_steps=10, timestep=torch.tensor(500))
    got = guider.forward(c, u, pred_neg_0=n0, pred_neg_1=n1).pred
    ref = _reference(u, c, [n0, n1], [-0.8, -0.4], 5.0)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    core = perp_neg_guidance(u, c, torch.stack([n0, n1], 1), torch.tensor([-0.8, -0.4]), 5.0)
    assert torch.equal(got, core)
    # a projection over the whole batch (ComfyUI's PerpNegGuider) is a different result
    flat = [t.reshape(1, -1) for t in (u, c, n0, n1)]
    whole = _reference(flat[0], flat[1], flat[2:], [-0.8, -0.4], 5.0).reshape(u.shape)
    assert not torch.allclose(got, whole, atol=1e-3)


def test_weight_zero_step_is_cfg_bit_for_bit() -> None:
    u, c, n0 = _preds(batch=4, k=1)
    ours = PerpNegGuidance(guidance_scale=7.5, negative_weights=[0.0], guidance_rescale=0.3)
    cfg = ClassifierFreeGuidance(guidance_scale=7.5, guidance_rescale=0.3)
    for g in (ours, cfg):
        g.set_state(step=0, num_inference_steps=4, timestep=torch.tensor(900))
    assert ours.num_conditions == cfg.num_conditions == 2
    assert torch.equal(ours.forward(c, u).pred, cfg.forward(c, u).pred)


def test_original_formulation_starts_from_the_conditional() -> None:
    u, c, n0 = _preds(batch=2, k=1)
    g = PerpNegGuidance(guidance_scale=3.0, negative_weights=[-1.0], use_original_formulation=True)
    got = g.forward(c, u, pred_neg_0=n0).pred
    ref = _reference(u, c, [n0], [-1.0], 3.0) + (c - u)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_prepare_inputs_splits_the_packed_negatives_per_batch() -> None:
    cond, uncond, n0, n1, shared = (torch.full((3, 2), float(i)) for i in range(5))
    g = PerpNegGuidance(negative_weights=[-1.0, -0.5])
    batches = g.prepare_inputs(
        {
            "prompt_embeds": (cond, torch.cat([uncond, n0, n1])),
            "time_ids": (cond, shared),
            "image_embeds": (None, None),
        }
    )
    names = [b.__guidance_identifier__ for b in batches]
    assert names == ["pred_cond", "pred_uncond", "pred_neg_0", "pred_neg_1"]
    assert [float(b.prompt_embeds[0, 0]) for b in batches] == [0.0, 1.0, 2.0, 3.0]
    assert [float(b.time_ids[0, 0]) for b in batches] == [0.0, 4.0, 4.0, 4.0]
    assert batches[2].image_embeds is None


def test_outside_start_stop_is_conditional_with_no_negative_batch() -> None:
    g = PerpNegGuidance(negative_weights=[-1.0], start=0.5)
    cond, packed = torch.zeros(2, 3), torch.ones(4, 3)
    g.set_state(step=1, num_inference_steps=4, timestep=torch.tensor(700))
    assert g.num_conditions == 1
    batches = g.prepare_inputs({"prompt_embeds": (cond, packed)})
    assert [b.__guidance_identifier__ for b in batches] == ["pred_cond"]
    c = torch.randn(2, 4)
    assert torch.equal(g.forward(c).pred, c)
    g.set_state(step=2, num_inference_steps=4, timestep=torch.tensor(400))
    assert g.num_conditions == 3


# ---------------------------------------------------------------------------- pipeline
def test_sdxl_pipeline_rows_per_step_window_and_finite_images(tiny_dir: Path) -> None:
    assert_window_rows_and_finite_images(
        lambda guider, steps, **kw: _run(_pipe(tiny_dir, guider), steps=steps, **kw)
    )


def _unet_inputs(pipe: Any, **kwargs: Any) -> List[Dict[str, torch.Tensor]]:
    """encoder_hidden_states and pooled text_embeds of each UNet call of a one-step run."""
    calls: List[Dict[str, torch.Tensor]] = []

    def hook(module: Any, args: Any, kw: Dict[str, Any]) -> None:
        calls.append(
            {
                "prompt": kw["encoder_hidden_states"],
                "pooled": kw["added_cond_kwargs"]["text_embeds"],
            }
        )

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(num_inference_steps=1, output="latents", **kwargs)
    finally:
        handle.remove()
    return calls


def test_sdxl_negatives_pair_with_their_own_sample(tiny_dir: Path) -> None:
    pipe = _pipe(tiny_dir, PerpNegGuidance(guidance_scale=5.0, negative_weights=[-1.0]))
    single = {p: _unet_inputs(pipe, prompt=p, negative_prompt=n) for p, n in PAIRS.items()}
    calls = _unet_inputs(
        pipe, prompt=list(PAIRS), negative_prompt=list(PAIRS.values()), num_images_per_prompt=2
    )
    assert_negatives_paired(calls, single, ("prompt", "pooled"))


def test_sdxl_two_prompts_match_one_prompt_runs(tiny_dir: Path) -> None:
    pipe = _pipe(tiny_dir, PerpNegGuidance(guidance_scale=5.0, negative_weights=[-1.0]))
    assert_batch_matches_one_prompt_runs(lambda **kw: _run(pipe, **kw), seeded_latents(2), 1e-1)


def test_sdxl_weight_zero_is_cfg_bit_for_bit(tiny_dir: Path) -> None:
    lat = seeded_latents(2)
    cfg = _run(
        _pipe(tiny_dir, ClassifierFreeGuidance(guidance_scale=5.0), perp_neg=False),
        prompt=["a cat", "a dog"],
        latents=lat,
    )
    ours = _run(
        _pipe(tiny_dir, PerpNegGuidance(guidance_scale=5.0, negative_weights=[0.0])),
        prompt=["a cat", "a dog"],
        negative_prompt="front view",
        latents=lat,
    )
    assert ours["rows"] == cfg["rows"] == [2, 2] * 2
    assert torch.equal(ours["latents"], cfg["latents"])


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, needles",
    [
        ({"negative_weights": [-1.0, 0.5]}, ["negative_weights[1]", "0.5", "<= 0"]),
        ({"negative_weights": "-1"}, ["negative_weights", "sequence"]),
        ({"perp_neg_weight_scale": -1.0}, ["perp_neg_weight_scale", ">= 0"]),
        ({"guidance_scael": 7.5}, ["unknown option", "guidance_scael=7.5", "guidance_scale"]),
        ({"start": 0.6, "stop": 0.5}, ["start/stop", "0.6/0.5"]),
    ],
)
def test_bad_guider_options_are_one_line_value_errors(
    kwargs: Dict[str, Any], needles: List[str]
) -> None:
    msg = raises_naming(lambda: PerpNegGuidance(**kwargs), *needles)
    assert "\n" not in msg


def test_weight_count_must_match_the_negatives(tiny_dir: Path) -> None:
    pipe = _pipe(tiny_dir, PerpNegGuidance(negative_weights=[-1.0, -1.0]))
    raises_naming(
        lambda: _run(pipe, prompt="a cat", negative_prompt="front view"),
        "negative_prompt/perp_neg_prompts",
        "2 negative weight(s)",
        "got 1",
    )
    raises_naming(lambda: _run(pipe, prompt="a cat"), "2 negative weight(s)", "got 0")


def test_missing_pack_step_is_named() -> None:
    g = PerpNegGuidance(negative_weights=[-1.0])
    raises_naming(
        lambda: g.prepare_inputs({"prompt_embeds": (torch.zeros(2, 3), torch.zeros(2, 3))}),
        "negative_prompt",
        "add_perp_neg",
    )
    raises_naming(
        lambda: g.prepare_inputs({"prompt_embeds": (torch.zeros(2, 3), torch.zeros(5, 3))}),
        "prompt_embeds",
        "5",
        "4",
    )


def test_per_prompt_negative_count_is_checked(tiny_dir: Path) -> None:
    pipe = _pipe(tiny_dir, PerpNegGuidance(negative_weights=[-1.0]))
    raises_naming(
        lambda: _run(pipe, prompt=["a", "b"], negative_prompt=["x", "y", "z"]),
        "negative_prompt",
        "one string per prompt (2)",
        "3 strings",
    )


def test_guider_config_round_trips(tmp_path: Path) -> None:
    g = PerpNegGuidance(guidance_scale=6.0, negative_weights=[-1.0, -0.25], start=0.1)
    g.save_pretrained(tmp_path)
    back = PerpNegGuidance.from_pretrained(tmp_path)
    assert (back.guidance_scale, back.negative_weights, back._start) == (6.0, [-1.0, -0.25], 0.1)


# ---------------------------------------------------------------------------- README
LOAD_LINES = (
    'pipe = blocks.init_pipeline("stabilityai/stable-diffusion-xl-base-1.0")\n'
    "pipe.load_components(torch_dtype=torch.float16)\n"
    'pipe.to("cuda")\n'
)


def _python_block(path: Path, needle: str) -> str:
    """The first ```python block of ``path`` that contains ``needle``."""
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), re.S)
    found = [code for code in blocks if needle in code]
    assert found, f"{path.name}: no python example containing {needle!r}"
    return found[0]


@pytest.mark.parametrize("doc", [README, DOCS_GUIDER], ids=["README", "docs-guider"])
def test_readme_example_runs(doc: Path, tiny_dir: Path) -> None:
    """The guider example of the README and of the docs' guider page runs on a tiny SDXL pipeline."""
    code = _python_block(doc, "add_perp_neg(")
    assert LOAD_LINES in code, f"{doc.name}: the example's loading lines changed: update this test"
    code = code.replace(
        LOAD_LINES,
        f"from threestudio_perpneg.tiny.modular import build_tiny_sdxl_modular\n"
        f"pipe = build_tiny_sdxl_modular({str(tiny_dir)!r}, blocks=blocks)\n",
    )
    scope: Dict[str, Any] = {}
    exec(compile(code, doc.name, "exec"), scope)
    assert len(scope["images"]) == 2 and all(im.size == (64, 64) for im in scope["images"])


def test_docs_save_load_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The save / load example of the docs' guider page round-trips the settings."""
    monkeypatch.chdir(tmp_path)
    scope: Dict[str, Any] = {"PerpNegGuidance": PerpNegGuidance}
    exec(compile(_python_block(DOCS_GUIDER, "save_pretrained"), "guider.md", "exec"), scope)
    guider = scope["guider"]
    assert (guider.guidance_scale, guider.negative_weights, guider._start) == (
        6.0,
        [-1.0, -0.25],
        0.1,
    )
