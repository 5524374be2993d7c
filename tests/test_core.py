"""Property tests of the Perp-Neg algebra (threestudio_perpneg.core.guidance).

The references below are written independently with plain torch (per-sample Python loops); they
never call the functions under test.
"""

from __future__ import annotations

import math
from typing import Sequence

import pytest
import torch
from helpers import raises_naming
from hypothesis import given, settings
from hypothesis import strategies as st

from threestudio_perpneg.core.guidance import (
    GuidancePredictions,
    perp_neg_guidance,
    perpendicular_component,
)

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


SETTINGS = settings(deadline=None, max_examples=25)

seeds = st.integers(min_value=0, max_value=2**31 - 1)
batches = st.integers(min_value=1, max_value=4)
channels = st.integers(min_value=1, max_value=6)
# Sample shapes S of rank 1 to 4 with small sides.
sample_shapes = st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=4).map(tuple)
scales = st.one_of(st.just(0.0), st.floats(0.25, 20.0), st.floats(-20.0, -0.25))


def _randn(seed: int, *shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _ref_perp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """⊥(a, b) for ONE sample (any shape), in float64, no eps handling (b must be non-zero)."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    coef = float((a64 * b64).sum()) / float((b64 * b64).sum())
    return (a64 - coef * b64).reshape(a.shape)


def _ref_guidance(
    u: torch.Tensor,
    delta_pos: torch.Tensor,
    rows: Sequence[torch.Tensor],
    index: Sequence[int],
    weights: Sequence[float],
    scale: Sequence[float],
) -> torch.Tensor:
    """ε_u + s_b (Δ_pos + Σ_{i: index_i = b} w_i ⊥(row_i − ε_u, Δ_pos)) sample by sample."""
    out = torch.empty_like(u, dtype=torch.float64)
    for b in range(u.shape[0]):
        total = delta_pos[b].double().clone()
        for row, i, w in zip(rows, index, weights):
            if i == b:
                total += float(w) * _ref_perp(row.double() - u[b].double(), delta_pos[b])
        out[b] = u[b].double() + float(scale[b]) * total
    return out


# --------------------------------------------------------------------------------------------
# perpendicular_component
# --------------------------------------------------------------------------------------------


@SETTINGS
@given(seed=seeds, batch=batches, shape=sample_shapes)
def test_perpendicular_is_orthogonal_per_sample(seed: int, batch: int, shape: tuple) -> None:
    a = _randn(seed, batch, *shape)
    b = _randn(seed + 1, batch, *shape) * 3.0 + 0.5
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        perp = perpendicular_component(a.to(dtype), b.to(dtype))
        # ⟨⊥(a, b), b⟩ relative to ‖a‖‖b‖ (the scale of the projection that was removed).
        dot = (perp.double().flatten(1) * b.to(dtype).double().flatten(1)).sum(1).abs()
        bound = a.flatten(1).norm(dim=1) * b.flatten(1).norm(dim=1)
        assert torch.all(dot <= tol * bound), (dtype, dot, bound)
        torch.testing.assert_close(
            perp.double(),
            torch.stack([_ref_perp(a[i], b[i]) for i in range(batch)]),
            rtol=1e-4 if dtype == torch.float32 else 1e-10,
            atol=1e-4 if dtype == torch.float32 else 1e-10,
        )


@SETTINGS
@given(seed=seeds, batch=batches, c=channels, d=st.integers(1, 3), h=st.integers(1, 4))
def test_perpendicular_is_rank_agnostic(seed: int, batch: int, c: int, d: int, h: int) -> None:
    w = h + 1
    for shape in ((batch, c), (batch, c, h, w), (batch, c, d, h, w)):
        a = _randn(seed, *shape)
        b = _randn(seed + 7, *shape)
        flat = perpendicular_component(a.reshape(batch, -1), b.reshape(batch, -1))
        shaped = perpendicular_component(a, b)
        assert shaped.shape == a.shape
        torch.testing.assert_close(shaped.reshape(batch, -1), flat, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(seed=seeds, batch=batches, n=st.integers(16, 300), mag=st.sampled_from([1.0, 40.0]))
def test_perpendicular_half_precision_computes_in_float32(
    seed: int, batch: int, n: int, mag: float
) -> None:
    # mag=40 with n up to 300 makes ‖b‖² ≈ 1600·n overflow float16 (max 65504): a half-precision
    # computation would return inf/nan or drop the projection.
    for dtype in (torch.float16, torch.bfloat16):
        a = (_randn(seed, batch, n) * mag).to(dtype)
        b = (_randn(seed + 3, batch, n) * mag).to(dtype)
        out = perpendicular_component(a, b)
        assert out.dtype == dtype
        assert torch.isfinite(out.float()).all()
        # Independent float32 reference on the same (rounded) inputs.
        a32, b32 = a.float(), b.float()
        coef = (a32 * b32).sum(1, keepdim=True) / (b32 * b32).sum(1, keepdim=True)
        ref = (a32 - coef * b32).to(dtype)
        # At most one rounding step of the output dtype apart (float32 summation order may differ).
        ulp = 2.0**-10 if dtype == torch.float16 else 2.0**-7
        err = (out.float() - ref.float()).abs()
        bound = ulp * (ref.float().abs() + mag * 1e-3) + 1e-6
        assert torch.all(err <= bound), (dtype, err.max())


@SETTINGS
@given(seed=seeds, batch=batches, shape=sample_shapes)
def test_perpendicular_zero_b_returns_a(seed: int, batch: int, shape: tuple) -> None:
    a = _randn(seed, batch, *shape, dtype=torch.float32)
    out = perpendicular_component(a, torch.zeros_like(a))
    assert torch.equal(out, a)
    # Only the zero sample falls back to a; the others are still projected.
    if batch > 1:
        b = _randn(seed + 1, batch, *shape, dtype=torch.float32)
        b[0] = 0.0
        out = perpendicular_component(a, b)
        assert torch.equal(out[0], a[0])
        torch.testing.assert_close(
            out[1:].double(),
            torch.stack([_ref_perp(a[i], b[i]) for i in range(1, batch)]),
            rtol=1e-4,
            atol=1e-4,
        )


def test_perpendicular_of_parallel_and_orthogonal_vectors() -> None:
    b = torch.tensor([[1.0, 2.0, -2.0], [0.0, 3.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(perpendicular_component(-2.5 * b, b), torch.zeros_like(b))
    ortho = torch.tensor([[2.0, -1.0, 0.0], [5.0, 4.0, -3.0]], dtype=torch.float64)
    torch.testing.assert_close(perpendicular_component(ortho, b), ortho)
    # Hand-worked: a = (1, 1, 0), b = (1, 0, 0) → (0, 1, 0).
    out = perpendicular_component(torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]]))
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.0, 0.0]]))


def test_perpendicular_one_dimensional_input_is_per_sample_or_rejected() -> None:
    # A [B] tensor has no non-batch dims: each sample is a scalar and its component perpendicular
    # to a non-zero scalar is 0. Samples must never be mixed together.
    a = torch.tensor([1.0, -2.0, 3.0, 0.5])
    b = torch.tensor([2.0, 1.0, -1.0, 4.0])
    try:
        out = perpendicular_component(a, b)
    except ValueError:
        return
    assert torch.allclose(out, torch.zeros_like(a)), (
        f"perpendicular_component on 1-D input mixes samples: got {out.tolist()}, expected zeros "
        "(or a ValueError)"
    )


# --------------------------------------------------------------------------------------------
# perp_neg_guidance: algebra
# --------------------------------------------------------------------------------------------


def _case(seed: int, batch: int, shape: tuple, k: int, dtype: torch.dtype = torch.float64):
    u = _randn(seed, batch, *shape, dtype=dtype)
    p = _randn(seed + 1, batch, *shape, dtype=dtype)
    n = _randn(seed + 2, batch, k, *shape, dtype=dtype)
    w = -2.0 * torch.rand(batch, k, generator=torch.Generator().manual_seed(seed + 3)).double()
    return u, p, n, w


@SETTINGS
@given(seed=seeds, batch=batches, shape=sample_shapes, k=st.integers(0, 3), s=scales)
def test_zero_weights_is_exactly_plain_cfg(
    seed: int, batch: int, shape: tuple, k: int, s: float
) -> None:
    u, p, n, _ = _case(seed, batch, shape, k, dtype=torch.float32)
    plain = u + s * (p - u)
    out = perp_neg_guidance(u, p, n, torch.zeros(batch, k), s)
    assert torch.equal(out, plain)
    assert torch.equal(perp_neg_guidance(u, p, None, None, s), plain)
    assert torch.equal(perp_neg_guidance(u, p, scale=s), plain)


@SETTINGS
@given(
    seed=seeds,
    batch=batches,
    shape=sample_shapes,
    ks=st.lists(st.floats(-5.0, 5.0, allow_nan=False), min_size=1, max_size=3),
    s=scales,
)
def test_negative_parallel_to_positive_changes_nothing(
    seed: int, batch: int, shape: tuple, ks: list, s: float
) -> None:
    u, p, _, _ = _case(seed, batch, shape, 0)
    delta = p - u
    n = torch.stack([u + k * delta for k in ks], dim=1)  # Δ_i = k·Δ_pos
    w = -1.0 - torch.arange(len(ks), dtype=torch.float64)
    out = perp_neg_guidance(u, p, n, w, s)
    torch.testing.assert_close(out, u + s * delta, rtol=1e-9, atol=1e-9 * (1 + abs(s)))


@SETTINGS
@given(seed=seeds, batch=batches, shape=sample_shapes, k=st.integers(1, 3), s=scales)
def test_dense_matches_loop_reference(
    seed: int, batch: int, shape: tuple, k: int, s: float
) -> None:
    u, p, n, w = _case(seed, batch, shape, k)
    rows = [n[b, j] for b in range(batch) for j in range(k)]
    index = [b for b in range(batch) for _ in range(k)]
    weights = [float(w[b, j]) for b in range(batch) for j in range(k)]
    ref = _ref_guidance(u, p - u, rows, index, weights, [s] * batch)
    torch.testing.assert_close(perp_neg_guidance(u, p, n, w, s), ref, rtol=1e-9, atol=1e-9)
    # [K] weights are shared by every sample.
    ref_shared = _ref_guidance(
        u, p - u, rows, index, [float(w[0, j]) for j in range(k)] * batch, [s] * batch
    )
    torch.testing.assert_close(
        perp_neg_guidance(u, p, n, w[0], s), ref_shared, rtol=1e-9, atol=1e-9
    )


@SETTINGS
@given(
    seed=seeds,
    batch=batches,
    shape=sample_shapes,
    index=st.lists(st.integers(0, 3), min_size=1, max_size=7),
    s=scales,
)
def test_ragged_matches_loop_reference_and_dense(
    seed: int, batch: int, shape: tuple, index: list, s: float
) -> None:
    index = [i % batch for i in index]  # unsorted, repeats, some samples without negatives
    n_rows = len(index)
    u, p, _, _ = _case(seed, batch, shape, 0)
    rows = _randn(seed + 5, n_rows, *shape)
    w = -3.0 * torch.rand(n_rows, generator=torch.Generator().manual_seed(seed + 6)).double()
    out = perp_neg_guidance(u, p, rows, w, s, neg_index=torch.tensor(index))
    ref = _ref_guidance(u, p - u, list(rows), index, w.tolist(), [s] * batch)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)

    # The same negatives in dense form: pad every sample to K rows with zero-weight copies.
    k = max(index.count(b) for b in range(batch))
    dense = u.unsqueeze(1).repeat(1, k, *([1] * len(shape))).clone() + 1.0
    dense_w = torch.zeros(batch, k, dtype=torch.float64)
    fill = [0] * batch
    for row, i, wi in zip(rows, index, w):
        dense[i, fill[i]] = row
        dense_w[i, fill[i]] = wi
        fill[i] += 1
    torch.testing.assert_close(
        perp_neg_guidance(u, p, dense, dense_w, s), out, rtol=1e-9, atol=1e-9
    )


@SETTINGS
@given(seed=seeds, batch=st.integers(2, 5), shape=sample_shapes, k=st.integers(1, 3), s=scales)
def test_samples_are_paired_with_their_own_negatives(
    seed: int, batch: int, shape: tuple, k: int, s: float
) -> None:
    u, p, n, w = _case(seed, batch, shape, k)
    scale = torch.linspace(0.5, 1.5, batch, dtype=torch.float64) * s
    out = perp_neg_guidance(u, p, n, w, scale)

    # Dense: permuting samples permutes outputs.
    perm = torch.randperm(batch, generator=torch.Generator().manual_seed(seed))
    out_perm = perp_neg_guidance(u[perm], p[perm], n[perm], w[perm], scale[perm])
    torch.testing.assert_close(out_perm, out[perm], rtol=1e-12, atol=1e-12)

    # Ragged: permuting samples and relabelling neg_index permutes outputs too.
    rows = n.flatten(0, 1)
    index = torch.arange(batch).repeat_interleave(k)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(batch)
    out_ragged = perp_neg_guidance(
        u[perm], p[perm], rows, w.flatten(), scale[perm], neg_index=inv[index]
    )
    torch.testing.assert_close(out_ragged, out[perm], rtol=1e-12, atol=1e-12)

    # Changing the negatives (and weights) of sample j leaves every other sample untouched.
    j = seed % batch
    n2, w2 = n.clone(), w.clone()
    n2[j] = _randn(seed + 11, k, *shape) * 10.0
    w2[j] = -5.0
    out2 = perp_neg_guidance(u, p, n2, w2, scale)
    others = [i for i in range(batch) if i != j]
    assert torch.equal(out2[others], out[others])
    if abs(s) >= 0.25 and math.prod(shape) > 1:  # otherwise ⊥ or the scale vanishes
        assert not torch.allclose(out2[j], out[j])


@SETTINGS
@given(
    seed=seeds,
    batch=batches,
    shape=sample_shapes,
    n_pos=st.integers(1, 3),
    k=st.integers(0, 2),
    per_sample=st.booleans(),
)
def test_several_positives_match_manual_sum(
    seed: int, batch: int, shape: tuple, n_pos: int, k: int, per_sample: bool
) -> None:
    u, _, n, w = _case(seed, batch, shape, k)
    pos = _randn(seed + 9, batch, n_pos, *shape)
    g = torch.Generator().manual_seed(seed + 10)
    v = torch.rand(batch, n_pos, generator=g).double() * 2 - 0.5
    v_arg = v if per_sample else v[0]
    v_used = v if per_sample else v[0].expand(batch, -1)
    delta = torch.zeros_like(u)
    for b in range(batch):
        for j in range(n_pos):
            delta[b] += float(v_used[b, j]) * (pos[b, j] - u[b])
    rows = [n[b, j] for b in range(batch) for j in range(k)]
    index = [b for b in range(batch) for _ in range(k)]
    weights = [float(w[b, j]) for b in range(batch) for j in range(k)]
    ref = _ref_guidance(u, delta, rows, index, weights, [3.0] * batch)
    out = perp_neg_guidance(u, pos, n, w, 3.0, pos_weights=v_arg)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)

    # Default pos_weights: every positive with weight 1.
    delta1 = (pos - u.unsqueeze(1)).sum(1)
    ref1 = _ref_guidance(u, delta1, rows, index, weights, [3.0] * batch)
    torch.testing.assert_close(perp_neg_guidance(u, pos, n, w, 3.0), ref1, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(seed=seeds, batch=batches, shape=sample_shapes, k=st.integers(0, 2))
def test_per_sample_scale_tensor(seed: int, batch: int, shape: tuple, k: int) -> None:
    u, p, n, w = _case(seed, batch, shape, k)
    scale = torch.rand(batch, generator=torch.Generator().manual_seed(seed)).double() * 100
    rows = [n[b, j] for b in range(batch) for j in range(k)]
    index = [b for b in range(batch) for _ in range(k)]
    weights = [float(w[b, j]) for b in range(batch) for j in range(k)]
    ref = _ref_guidance(u, p - u, rows, index, weights, scale.tolist())
    out = perp_neg_guidance(u, p, n, w, scale)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    # A 0-d tensor and a float are the same scale.
    s0 = float(scale[0])
    torch.testing.assert_close(
        perp_neg_guidance(u, p, n, w, torch.tensor(s0)), perp_neg_guidance(u, p, n, w, s0)
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("ragged", [False, True])
def test_output_dtype_and_shape_follow_eps_uncond(dtype: torch.dtype, ragged: bool) -> None:
    u, p, n, w = _case(3, 2, (4, 3, 3), 2)
    u, p, n = u.to(dtype), p.to(dtype), n.to(dtype)
    if ragged:
        out = perp_neg_guidance(
            u, p, n.flatten(0, 1), w.flatten(), 7.5, neg_index=torch.tensor([1, 0, 1, 0])
        )
    else:
        w = w.to(dtype)  # the reference below uses the same rounded weights
        out = perp_neg_guidance(u, p, n, w, 7.5)
    assert out.dtype == dtype
    assert out.shape == u.shape
    # Half precision is combined in float32: compare with the float64 reference of the same inputs.
    index = [1, 0, 1, 0] if ragged else [0, 0, 1, 1]
    ref = _ref_guidance(
        u,
        p.double() - u.double(),
        list(n.flatten(0, 1)),
        index,
        w.double().flatten().tolist(),
        [7.5, 7.5],
    )
    rtol, atol = {
        torch.float16: (1e-3, 1e-3),
        torch.bfloat16: (8e-3, 1e-2),
        torch.float32: (1e-5, 1e-5),
        torch.float64: (1e-12, 1e-12),
    }[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)


def test_guidance_predictions_fields() -> None:
    u = torch.zeros(2, 3)
    preds = GuidancePredictions(uncond=u, positive=u)
    assert preds.negative is None and preds.negative_index is None and preds.negative_weight is None
    assert preds._fields == (
        "uncond",
        "positive",
        "negative",
        "negative_index",
        "negative_weight",
    )


# --------------------------------------------------------------------------------------------
# perp_neg_guidance: bad input
# --------------------------------------------------------------------------------------------


def test_perpendicular_mismatched_shapes() -> None:
    raises_naming(
        lambda: perpendicular_component(torch.zeros(2, 3), torch.zeros(2, 4)),
        "shape",
        "(2, 3)",
        "(2, 4)",
    )


def test_guidance_mismatched_positive_shape() -> None:
    u = torch.zeros(2, 4, 3)
    raises_naming(lambda: perp_neg_guidance(u, torch.zeros(2, 4, 5)), "eps_pos", "(2, 4, 5)")
    raises_naming(lambda: perp_neg_guidance(u, torch.zeros(3, 2, 4, 3)), "eps_pos", "(3, 2, 4, 3)")


def test_guidance_mismatched_dense_negative_shape() -> None:
    u = torch.zeros(2, 4)
    for bad in ((3, 1, 4), (2, 1, 5), (2, 4)):
        raises_naming(
            lambda bad=bad: perp_neg_guidance(u, u, torch.zeros(*bad), torch.zeros(1)),
            "eps_neg",
            str(bad),
        )


def test_guidance_mismatched_ragged_negative_shape() -> None:
    u = torch.zeros(2, 4)
    raises_naming(
        lambda: perp_neg_guidance(
            u, u, torch.zeros(3, 5), torch.zeros(3), neg_index=torch.tensor([0, 1, 0])
        ),
        "eps_neg",
        "(3, 5)",
    )


def test_guidance_neg_weights_missing() -> None:
    u = torch.zeros(2, 4)
    raises_naming(lambda: perp_neg_guidance(u, u, torch.zeros(2, 1, 4)), "neg_weights")
    raises_naming(lambda: perp_neg_guidance(u, u, None, torch.ones(2, 1)), "eps_neg")


def test_guidance_ragged_index_out_of_range() -> None:
    u = torch.zeros(2, 4)
    rows = torch.zeros(3, 4)
    raises_naming(
        lambda: perp_neg_guidance(u, u, rows, -torch.ones(3), neg_index=torch.tensor([0, 2, 1])),
        "neg_index",
        "2",
    )
    raises_naming(
        lambda: perp_neg_guidance(u, u, rows, -torch.ones(3), neg_index=torch.tensor([0, -1, 1])),
        "neg_index",
        "-1",
    )
    raises_naming(
        lambda: perp_neg_guidance(u, u, rows, -torch.ones(3), neg_index=torch.tensor([0, 1])),
        "neg_index",
        "(2,)",
    )


def test_guidance_wrong_neg_weights_shape() -> None:
    u = torch.zeros(2, 4)
    dense = torch.zeros(2, 3, 4)
    for bad in ((2,), (4,), (3, 3), (2, 3, 1), ()):
        raises_naming(
            lambda bad=bad: perp_neg_guidance(u, u, dense, torch.zeros(bad)),
            "neg_weights",
            str(bad),
        )
    raises_naming(
        lambda: perp_neg_guidance(
            u, u, torch.zeros(3, 4), torch.zeros(2), neg_index=torch.tensor([0, 1, 1])
        ),
        "neg_weights",
        "(2,)",
    )


def test_guidance_wrong_pos_weights_shape() -> None:
    u = torch.zeros(2, 4)
    pos = torch.zeros(2, 3, 4)
    for bad in ((2,), (4,), (3, 3), (1, 3), (2, 3, 1)):
        raises_naming(
            lambda bad=bad: perp_neg_guidance(u, pos, pos_weights=torch.ones(bad)),
            "pos_weights",
            str(bad),
        )
    # pos_weights with a single positive is ambiguous and rejected.
    raises_naming(
        lambda: perp_neg_guidance(u, u, pos_weights=torch.ones(1)), "pos_weights", "(2, 4)"
    )


def test_guidance_wrong_scale_and_uncond_shape() -> None:
    u = torch.zeros(2, 4)
    raises_naming(lambda: perp_neg_guidance(u, u, scale=torch.ones(3)), "scale", "(3,)")
    raises_naming(lambda: perp_neg_guidance(u, u, scale=torch.ones(2, 1)), "scale", "(2, 1)")
    raises_naming(lambda: perp_neg_guidance(torch.zeros(4), torch.zeros(4)), "eps_uncond", "(4,)")
