"""Small helpers shared by the test modules (importable because tests/ is on sys.path)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import pytest


def raises_naming(fn: Callable[[], Any], *needles: str) -> str:
    """Assert ``fn()`` raises ValueError whose message contains every needle; return the message."""
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


def perp_neg_reference(u: Any, c: Any, negs: Sequence[Any], ws: Sequence[float], s: float) -> Any:
    """The paper's eq. per sample, in float64, one sample at a time (an independent loop)."""
    import torch

    out = []
    for b in range(u.shape[0]):
        ub, pos = u[b].double(), c[b].double() - u[b].double()
        total = pos.clone()
        for n, w in zip(negs, ws):
            d = n[b].double() - ub
            total += w * (d - (d * pos).sum() / (pos * pos).sum() * pos)
        out.append(ub + s * total)
    return torch.stack(out).float()


# ------------------------------------------------------------- guider pipelines (SDXL, SD3)
#: Two prompts, each with its own negative (tests/test_guiders*.py).
PAIRS = {"a cat": "front view", "a dog": "side view"}


def tiny_guider_pipe(
    build: Callable[..., Any], blocks: Any, folder: Any, guider: Any, perp_neg: bool
) -> Any:
    """``build(folder, blocks=...)`` (a ``threestudio_perpneg.tiny.modular`` builder) with
    ``add_perp_neg`` on ``blocks`` when ``perp_neg``, and ``guider`` as its guider."""
    from threestudio_perpneg.guiders import add_perp_neg

    pipe = build(folder, seed=0, blocks=add_perp_neg(blocks) if perp_neg else blocks)
    pipe.update_components(guider=guider)
    return pipe


def seeded_latents(batch: int, seed: int = 1) -> Any:
    """Initial latents of the tiny modular pipelines (4 channels, 8 x 8)."""
    import torch

    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def assert_window_rows_and_finite_images(run: Callable[..., Any]) -> None:
    """Two negatives from step 2 of 4 on 2 prompts x 2 images: B = 4 denoiser rows per call, one
    call per step outside ``[start, stop)`` and 2 + K = 4 inside; finite 64 x 64 images.

    ``run(steps=..., guider=..., **pipeline_inputs)`` returns ``{"rows", "latents", "images"}``
    (the rows of each denoiser call, images as a tensor).
    """
    import torch

    from threestudio_perpneg.guiders import PerpNegGuidance

    out = run(
        steps=4,
        guider=PerpNegGuidance(guidance_scale=5.0, negative_weights=[-1.0, -0.5], start=0.5),
        prompt=list(PAIRS),
        negative_prompt="front view",
        perp_neg_prompts=["side view"],
        num_images_per_prompt=2,
        output_type="pt",
    )
    assert out["rows"] == [4, 4] + [4] * 8
    assert tuple(out["images"].shape) == (4, 3, 64, 64)
    assert torch.isfinite(out["images"]).all() and torch.isfinite(out["latents"]).all()


def _close(a: Any, b: Any) -> bool:
    import torch

    return torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def assert_negatives_paired(calls: Sequence[Any], single: Any, fields: Sequence[str]) -> None:
    """Each negative row sits with its own sample.

    ``calls``: the (conditional, unconditional, negative) denoiser inputs (``{field: tensor}``) of a
    one-step run of ``PAIRS`` as two prompts with 2 images each; ``single[p]``: the same of ``p``
    run alone. Batched and single-prompt text encodings agree to rounding, not bit for bit.
    """
    assert len(calls) == 3
    for field in fields:
        seen = []
        for r in range(4):
            # whichever prompt the pipeline put in row r of this field, its own negative is there
            owner = [p for p in PAIRS if _close(calls[0][field][r], single[p][0][field][0])]
            assert len(owner) == 1, (field, r)
            assert _close(calls[2][field][r], single[owner[0]][2][field][0]), (field, r)
            assert not _close(calls[2][field][r], calls[1][field][r]), (field, r)
            seen.append(owner[0])
        assert sorted(seen) == ["a cat", "a cat", "a dog", "a dog"], field


def assert_batch_matches_one_prompt_runs(
    run: Callable[..., Any], latents: Any, swap_atol: float
) -> None:
    """``PAIRS`` as one batch equals each prompt run alone; swapping the negatives changes it.

    ``run(prompt=..., negative_prompt=..., latents=...)`` returns ``{"latents", "rows"}`` of a
    two-step run with one negative.
    """
    import torch

    both = run(prompt=list(PAIRS), negative_prompt=list(PAIRS.values()), latents=latents)
    assert both["rows"] == [2, 2, 2] * 2
    for j, (p, n) in enumerate(PAIRS.items()):
        alone = run(prompt=p, negative_prompt=n, latents=latents[j : j + 1])
        torch.testing.assert_close(
            both["latents"][j : j + 1], alone["latents"], rtol=1e-3, atol=1e-3
        )
    swapped = run(prompt=list(PAIRS), negative_prompt=list(PAIRS.values())[::-1], latents=latents)
    assert not torch.allclose(swapped["latents"], both["latents"], atol=swap_atol)
