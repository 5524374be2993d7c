"""``perp_neg_eval_prob`` in the 2D sampler and ``perpneg-2d`` (tiny random SD model, CPU).

The references are written here: the per-step draws are reproduced from a generator seeded as the
docstring of :meth:`PerpNegSampler.generate` says (``torch.Generator("cpu").manual_seed(seeds[0])``,
one float64 uniform per step inside the window, negatives evaluated when u < p), UNet rows are
counted with a forward pre-hook, and the guidance is recomputed from the raw UNet outputs with
:func:`helpers.perp_neg_reference` (a float64 loop over samples).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import pytest
import torch
from helpers import perp_neg_reference, raises_naming
from torch import Tensor

import threestudio_perpneg.sampler.pipeline as sampler_mod
from threestudio_perpneg.core.controls import step_in_window
from threestudio_perpneg.sampler.pipeline import PerpNegSampler

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

PROMPT = "a corgi"
SCALE = 7.5
KW: Dict[str, Any] = {"height": 64, "width": 64, "progress": False, "guidance_scale": SCALE}


@pytest.fixture(scope="module")
def sampler(tiny_sd_path: Path) -> PerpNegSampler:
    return PerpNegSampler.from_pretrained(str(tiny_sd_path))


@contextlib.contextmanager
def unet_io(unet: Any) -> Iterator[List[Tuple[int, Tensor]]]:
    """(batch rows, output) of every UNet forward."""
    calls: List[Tuple[int, Tensor]] = []

    def hook(module: Any, args: Tuple[Any, ...], out: Any) -> None:
        calls.append((int(args[0].shape[0]), out[0].detach().clone()))

    handle = unet.register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def expected_negative_steps(
    seed: int, p: float, steps: int, window: Tuple[float, float] = (0.0, 1.0)
) -> List[bool]:
    """Whether each step evaluates the negatives, from the documented draws (not the sampler's)."""
    g = torch.Generator("cpu").manual_seed(seed)
    out = []
    for i in range(steps):
        inside = int(window[0] * steps) <= i < int(window[1] * steps)
        if inside and p < 1.0:
            inside = torch.rand(1, generator=g, dtype=torch.float64).item() < p
        out.append(inside)
    return out


def run(sampler: PerpNegSampler, weights: Sequence[float], **kw: Any) -> Tuple[Any, List[int]]:
    with unet_io(sampler.unet) as calls:
        out = sampler.generate(PROMPT, ["a cat"], list(weights), **{**KW, **kw})
    return out, [r for r, _ in calls]


# ------------------------------------------------------------------------------ p = 1
def test_p_one_is_bit_identical_to_not_passing_it(sampler) -> None:
    kw = {"num_inference_steps": 5, "seeds": [0, 1], "perp_neg_start": 0.2}
    base, rows_base = run(sampler, [1.0, -1.5], **kw)
    same, rows_same = run(sampler, [1.0, -1.5], perp_neg_eval_prob=1.0, **kw)
    as_int, _ = run(sampler, [1.0, -1.5], perp_neg_eval_prob=1, **kw)
    assert torch.equal(same.latents, base.latents) and torch.equal(as_int.latents, base.latents)
    assert rows_same == rows_base == [2 * 2] + [3 * 2] * 4
    assert base.settings["perp_neg_eval_prob"] == same.settings["perp_neg_eval_prob"] == 1.0
    assert base.unet_rows == same.unet_rows == sum(rows_base)


# ------------------------------------------------------------------------------ p < 1
@pytest.mark.parametrize("seeds", [[3, 5], [11]])
def test_rows_per_call_follow_the_documented_draws(sampler, seeds) -> None:
    steps, p, window = 16, 0.5, (0.25, 1.0)
    out, rows = run(
        sampler,
        [1.0, -1.5],
        num_inference_steps=steps,
        seeds=seeds,
        perp_neg_start=window[0],
        perp_neg_stop=window[1],
        perp_neg_eval_prob=p,
    )
    n = len(seeds)
    evaluated = expected_negative_steps(seeds[0], p, steps, window)
    assert rows == [(3 if e else 2) * n for e in evaluated]
    # Both kinds of step occur in the window, and none with negatives before it.
    assert 3 * n in rows[4:] and 2 * n in rows[4:] and rows[:4] == [2 * n] * 4
    assert out.unet_rows == sum(rows) and out.unet_calls == steps
    assert out.settings["perp_neg_eval_prob"] == p


def test_draws_leave_the_images_generators_alone(sampler) -> None:
    """The step-0 UNet input (the seeded initial noise) is the same at p = 0.5 and p = 1, and a
    call's draws come from its first seed: image 0 of seeds [3, 5] is image 0 of seeds [3] (to
    batching rounding), while image 1 differs from seed 5 run alone (other draws)."""
    inputs: List[Tensor] = []
    handle = sampler.unet.register_forward_pre_hook(
        lambda module, args: inputs.append(args[0][:2].detach().clone())
    )
    kw: Dict[str, Any] = {**KW, "num_inference_steps": 8, "seeds": [3, 5]}
    try:
        half = sampler.generate(PROMPT, ["a cat"], [1.0, -1.5], perp_neg_eval_prob=0.5, **kw)
        n_half = len(inputs)
        sampler.generate(PROMPT, ["a cat"], [1.0, -1.5], **kw)
    finally:
        handle.remove()
    assert n_half == 8 and torch.equal(inputs[0], inputs[n_half])
    kw["seeds"] = [3]
    alone = sampler.generate(PROMPT, ["a cat"], [1.0, -1.5], perp_neg_eval_prob=0.5, **kw)
    torch.testing.assert_close(half.latents[:1], alone.latents, rtol=1e-4, atol=1e-4)
    other = sampler.generate(
        PROMPT, ["a cat"], [1.0, -1.5], perp_neg_eval_prob=0.5, **{**kw, "seeds": [5]}
    )
    assert expected_negative_steps(5, 0.5, 8) != expected_negative_steps(3, 0.5, 8)
    assert not torch.allclose(half.latents[1:], other.latents, rtol=1e-4, atol=1e-4)


def test_evaluated_steps_use_weights_over_p(sampler, monkeypatch) -> None:
    """At each step, ε̂ is Perp-Neg with w / p where the draw evaluated the negative, and plain CFG
    on the positive where it did not (both recomputed from the UNet outputs)."""
    guided: List[Tensor] = []
    real = sampler_mod.perp_neg_guidance

    def spy(*args: Any, **kwargs: Any) -> Tensor:
        noise = real(*args, **kwargs)
        guided.append(noise.detach().clone())
        return noise

    monkeypatch.setattr(sampler_mod, "perp_neg_guidance", spy)
    steps, p, w, seeds = 8, 0.4, -1.5, [2, 7]
    evaluated = expected_negative_steps(seeds[0], p, steps)
    assert any(evaluated) and not all(evaluated)
    n = len(seeds)
    with unet_io(sampler.unet) as calls:
        sampler.generate(
            PROMPT,
            ["a cat"],
            [1.0, w],
            num_inference_steps=steps,
            seeds=seeds,
            perp_neg_eval_prob=p,
            **KW,
        )
    assert len(calls) == len(guided) == steps
    for i, ((rows, out), noise, e) in enumerate(zip(calls, guided, evaluated)):
        assert rows == (3 if e else 2) * n, i
        u, c = out[:n], out[n : 2 * n]
        if e:
            ref = perp_neg_reference(u, c, [out[2 * n :]], [w / p], SCALE)
            unscaled = perp_neg_reference(u, c, [out[2 * n :]], [w], SCALE)
            assert not torch.allclose(noise, unscaled, rtol=1e-4, atol=1e-5), i
        else:
            ref = perp_neg_reference(u, c, [], [], SCALE)
        torch.testing.assert_close(noise, ref, rtol=1e-4, atol=1e-5, msg=f"step {i}")


def test_generate_view_and_cebm(sampler) -> None:
    steps, p, seeds = 10, 0.5, [4]
    rows: List[int] = []
    handle = sampler.unet.register_forward_pre_hook(
        lambda module, args: rows.append(int(args[0].shape[0]))
    )
    try:
        out = sampler.generate_view(
            PROMPT,
            view="back",
            scheme="authors",  # back: front (-2) and side (-1) negatives
            num_inference_steps=steps,
            seeds=seeds,
            perp_neg_eval_prob=p,
            **KW,
        )
        n_view = len(rows)
        cebm = sampler.generate(
            PROMPT,
            ["a cat"],
            [1.0, -1.5],
            mode="cebm",
            num_inference_steps=3,
            seeds=seeds,
            perp_neg_eval_prob=p,
            **KW,
        )
    finally:
        handle.remove()
    assert rows[:n_view] == [4 if e else 2 for e in expected_negative_steps(4, p, steps)]
    assert 4 in rows[:n_view] and 2 in rows[:n_view]
    assert out.settings["perp_neg_eval_prob"] == p
    assert rows[n_view:] == [3] * 3 and cebm.unet_rows == 9  # no negative rows: nothing to draw


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, float("nan"), float("inf"), "x", True, None])
def test_bad_values_raise_one_line_naming_the_argument(sampler, bad) -> None:
    kw = {**KW, "num_inference_steps": 2, "perp_neg_eval_prob": bad}
    msg = raises_naming(lambda: sampler.generate(PROMPT, ["a cat"], **kw), "perp_neg_eval_prob")
    assert "\n" not in msg and repr(bad) in msg
    msg = raises_naming(
        lambda: sampler.generate_view(PROMPT, view="side", **kw), "perp_neg_eval_prob"
    )
    assert "\n" not in msg


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2", "nan", "x", ""])
def test_cli_bad_value_exits_2_with_one_line(value, tmp_path: Path, capsys: Any) -> None:
    from threestudio_perpneg.commands.generate import main

    out = tmp_path / "out"
    assert main(["a corgi", "--perp-neg-eval-prob", value, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "argument --perp-neg-eval-prob:" in err, err
    assert not out.exists()


def test_cli_flag_reaches_the_sampler_and_the_records(tiny_sd_path: Path, tmp_path: Path) -> None:
    from PIL import Image

    from threestudio_perpneg.commands.generate import SIDECAR_NAME, main

    out = tmp_path / "out"
    argv = ["a corgi | a cat", "--weights", "1 | -1", "--model", str(tiny_sd_path)]
    argv += ["--out", str(out), "--steps", "12", "--height", "64", "--width", "64"]
    argv += ["--seeds", "6,9", "--no-progress", "--perp-neg-eval-prob", "0.5"]
    assert main(argv) == 0
    sidecar = json.loads((out / SIDECAR_NAME).read_text(encoding="utf-8"))
    assert sidecar["settings"]["perp_neg_eval_prob"] == 0.5
    (batch,) = sidecar["batches"]
    assert batch["kwargs"]["perp_neg_eval_prob"] == 0.5
    assert batch["sampler_settings"]["perp_neg_eval_prob"] == 0.5
    evaluated = expected_negative_steps(6, 0.5, 12)
    assert batch["unet_calls"] == [12]
    assert batch["unet_rows"] == [sum((3 if e else 2) * 2 for e in evaluated)]
    with Image.open(out / sidecar["images"][0]["file"]) as img:
        assert json.loads(img.text["perpneg"])["perp_neg_eval_prob"] == 0.5


def test_step_window_helper_matches_the_reference_count() -> None:
    """The reference above counts the window as the sampler's helper does."""
    for steps in (1, 5, 16):
        for lo, hi in ((0.0, 1.0), (0.25, 1.0), (0.2, 0.7)):
            got = [step_in_window(i, steps, lo, hi) for i in range(steps)]
            assert got == expected_negative_steps(0, 1.0, steps, (lo, hi))
