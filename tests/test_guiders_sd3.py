"""PerpNegGuidance end to end on a tiny seeded SD3 modular pipeline (flow matching, CPU).

SD3 differs from SDXL where Perp-Neg's blocks meet it: an MMDiT transformer predicting a
flow-matching velocity, a T5 encoder besides the two CLIPs, the steps that repeat the embeddings
inside each branch of its conditional denoise block, and a text encoder that writes no
unconditional embeddings without a negative prompt. References are independent: the paper's
formula per sample over the transformer's own outputs, diffusers' ClassifierFreeGuidance, and the
same pipeline run one prompt at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

try:
    from threestudio_perpneg.guiders import PerpNegGuidance
except ImportError as exc:  # threestudio's pinned stack: diffusers 0.19 has no guiders
    pytest.skip(f"needs diffusers with guiders: {exc}", allow_module_level=True)
try:
    from diffusers.modular_pipelines import StableDiffusion3AutoBlocks
except ImportError as exc:
    pytest.skip(f"needs diffusers with SD3 modular blocks: {exc}", allow_module_level=True)

from diffusers import ClassifierFreeGuidance
from helpers import (
    PAIRS,
    assert_batch_matches_one_prompt_runs,
    assert_negatives_paired,
    assert_window_rows_and_finite_images,
    perp_neg_reference,
    seeded_latents,
    tiny_guider_pipe,
)

from threestudio_perpneg.tiny.modular import build_tiny_sd3_modular

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-sd3-modular")


def _pipe(tiny_dir: Path, guider: Any, perp_neg: bool = True) -> Any:
    return tiny_guider_pipe(
        build_tiny_sd3_modular, StableDiffusion3AutoBlocks(), tiny_dir, guider, perp_neg
    )


def _run(pipe: Any, steps: int = 2, **kwargs: Any) -> Dict[str, Any]:
    """Latents, images (a tensor), and per transformer call: its inputs and its output."""
    calls: List[Dict[str, torch.Tensor]] = []

    def pre(module: Any, args: Any, kw: Dict[str, Any]) -> None:
        calls.append(
            {
                "rows": kw["hidden_states"].shape[0],
                "prompt": kw["encoder_hidden_states"],
                "pooled": kw["pooled_projections"],
            }
        )

    def post(module: Any, args: Any, kw: Dict[str, Any], out: Any) -> None:
        calls[-1]["out"] = out[0]

    hooks = [
        pipe.transformer.register_forward_pre_hook(pre, with_kwargs=True),
        pipe.transformer.register_forward_hook(post, with_kwargs=True),
    ]
    try:
        kwargs.setdefault("output_type", "pt")
        out = pipe(num_inference_steps=steps, output=["latents", "images"], **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    rows = [int(c["rows"]) for c in calls]
    return {"latents": out["latents"], "images": out["images"], "calls": calls, "rows": rows}


def test_sd3_rows_per_step_window_and_finite_images(tiny_dir: Path) -> None:
    assert_window_rows_and_finite_images(
        lambda guider, steps, **kw: _run(_pipe(tiny_dir, guider), steps=steps, **kw)
    )


def test_sd3_velocity_is_the_per_sample_formula_over_the_transformer_outputs(
    tiny_dir: Path,
) -> None:
    pipe = _pipe(
        tiny_dir,
        PerpNegGuidance(
            guidance_scale=4.0, negative_weights=[-1.0, -0.5], perp_neg_weight_scale=0.8
        ),
    )
    given: List[torch.Tensor] = []
    step = pipe.scheduler.step

    def spy(model_output: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        given.append(model_output.clone())
        return step(model_output, *args, **kwargs)

    pipe.scheduler.step = spy  # diffusers' scheduler: see the velocity the guider hands it
    try:
        out = _run(
            pipe,
            steps=1,
            prompt=["a cat", "a dog"],
            negative_prompt=["front view", "side view"],
            perp_neg_prompts=["back view"],
            latents=seeded_latents(2),
        )
    finally:
        del pipe.scheduler.step
    c, u, n0, n1 = (call["out"] for call in out["calls"])
    ref = perp_neg_reference(u, c, [n0, n1], [-0.8, -0.4], 4.0)
    assert len(given) == 1
    torch.testing.assert_close(given[0], ref, rtol=1e-4, atol=1e-5)
    # the unconditional is the empty prompt's encoding, not the (absent) pipeline default
    plain = _pipe(tiny_dir, ClassifierFreeGuidance(), perp_neg=False)
    empty = _run(plain, steps=1, prompt=["", ""], latents=seeded_latents(2))["calls"][0]
    torch.testing.assert_close(out["calls"][1]["prompt"], empty["prompt"], rtol=1e-4, atol=1e-5)


def test_sd3_negatives_pair_with_their_own_sample(tiny_dir: Path) -> None:
    pipe = _pipe(tiny_dir, PerpNegGuidance(guidance_scale=5.0, negative_weights=[-1.0]))
    single = {
        p: _run(pipe, steps=1, prompt=p, negative_prompt=n)["calls"] for p, n in PAIRS.items()
    }
    out = _run(
        pipe,
        steps=1,
        prompt=list(PAIRS),
        negative_prompt=list(PAIRS.values()),
        num_images_per_prompt=2,
    )
    assert out["rows"] == [4, 4, 4]  # conditional, unconditional, negative
    assert_negatives_paired(out["calls"], single, ("prompt", "pooled"))


def test_sd3_two_prompts_match_one_prompt_runs(tiny_dir: Path) -> None:
    pipe = _pipe(tiny_dir, PerpNegGuidance(guidance_scale=5.0, negative_weights=[-1.0]))
    assert_batch_matches_one_prompt_runs(lambda **kw: _run(pipe, **kw), seeded_latents(2), 1e-2)


def test_sd3_weight_zero_is_cfg_bit_for_bit(tiny_dir: Path) -> None:
    lat = seeded_latents(2)
    # SD3's modular pipeline runs CFG only with a negative prompt; "" is its unconditional
    cfg = _run(
        _pipe(tiny_dir, ClassifierFreeGuidance(guidance_scale=5.0), perp_neg=False),
        prompt=["a cat", "a dog"],
        negative_prompt="",
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
    assert torch.equal(ours["images"], cfg["images"])
