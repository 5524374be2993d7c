"""The CPU harness for the real threestudio: nerfacc doubles and a few dreamfusion training steps.

Skipped as a whole when threestudio cannot be imported (THREESTUDIO_ROOT unset, not a checkout, or its
dependencies missing in this environment).
"""

from __future__ import annotations

import bisect
import math
import os

import pytest
from threestudio_support.fixtures import require_threestudio

threestudio = require_threestudio()  # module-level skip with the reason when unavailable

import nerfacc  # noqa: E402
import torch  # noqa: E402
from nerfacc.grid import _ray_aabb_intersect as nerfacc_python_ray_aabb_intersect  # noqa: E402

from threestudio_perpneg.threestudio_cpu.nerfacc_cpu import CALLS, installed  # noqa: E402
from threestudio_perpneg.threestudio_cpu.system import fit_steps, make_dreamfusion_system  # noqa: E402

pytestmark = pytest.mark.threestudio

STOCK_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(threestudio.__file__)), "configs", "dreamfusion-sd.yaml"
)


# --------------------------------------------------------------------------- brute-force references


def _chunks(packed_info: torch.Tensor) -> list[tuple[int, int]]:
    return [(int(s), int(c)) for s, c in packed_info.tolist()]


def _reference_scan(
    x: torch.Tensor, packed_info: torch.Tensor, *, prod: bool, exclusive: bool
) -> torch.Tensor:
    out = torch.zeros_like(x)
    for start, cnt in _chunks(packed_info):
        acc = 1.0 if prod else 0.0
        for i in range(start, start + cnt):
            if exclusive:
                out[i] = acc
            acc = acc * x[i] if prod else acc + x[i]
            if not exclusive:
                out[i] = acc
    return out


def _differentiable_reference_scan(
    x: torch.Tensor, packed_info: torch.Tensor, *, prod: bool, exclusive: bool
):
    pieces = []
    for start, cnt in _chunks(packed_info):
        chunk = x[start : start + cnt]
        if exclusive:
            chunk = torch.cat([torch.full_like(chunk[:1], 1.0 if prod else 0.0), chunk[:-1]])
        pieces.append(chunk.cumprod(0) if prod else chunk.cumsum(0))
    return torch.cat(pieces)


def _reference_traverse(o, d, binaries, aabbs, near, far, step):
    """Per-ray port of nerfacc's traverse_grids kernel (levels by sorted box entries/exits, cell by cell)."""
    n_levels, res = aabbs.shape[0], binaries.shape[1:]
    spans = []
    for box in aabbs.tolist():
        t_lo, t_hi = -math.inf, math.inf
        for a in range(3):
            t1, t2 = (box[a] - o[a]) / d[a], (box[a + 3] - o[a]) / d[a]
            t_lo, t_hi = max(t_lo, min(t1, t2)), min(t_hi, max(t1, t2))
        hit = t_lo <= t_hi and t_hi > 0
        spans.append((t_lo, t_hi, hit) if hit else (math.inf, math.inf, False))
    events = sorted(
        [(spans[lvl][0], lvl) for lvl in range(n_levels)]
        + [(spans[lvl][1], n_levels + lvl) for lvl in range(n_levels)]
    )
    t_last, continuous, samples, edges = near, False, [], []  # edges: [t, is_left, is_right]
    for i in range(2 * n_levels - 1):
        level = events[i][1] % n_levels
        if not spans[level][2]:
            continue
        if events[i][1] >= n_levels:  # leaving a box: continue in the enclosing one, if any
            if events[i + 1][1] < n_levels or not spans[events[i + 1][1] % n_levels][2]:
                continue
            level = events[i + 1][1] % n_levels
        lo, hi = max(events[i][0], near), min(events[i + 1][0], far)
        if lo >= hi:
            continue
        if not continuous:
            while t_last + step / 2 < lo:
                t_last += step
        box = aabbs[level].tolist()
        size = [(box[a + 3] - box[a]) / res[a] for a in range(3)]
        cuts = sorted(
            {lo, hi}
            | {
                (box[a] + j * size[a] - o[a]) / d[a]
                for a in range(3)
                for j in range(res[a] + 1)
                if lo < (box[a] + j * size[a] - o[a]) / d[a] < hi
            }
        )
        for ta, tb in zip(cuts[:-1], cuts[1:]):
            mid = (ta + tb) / 2
            cell = [
                min(max(int((o[a] + d[a] * mid - box[a]) / size[a]), 0), res[a] - 1)
                for a in range(3)
            ]
            if not bool(binaries[level, cell[0], cell[1], cell[2]]):
                while t_last + step / 2 < tb:
                    t_last += step
                continuous = False
                continue
            while t_last + step / 2 < tb:
                t_next = t_last + step
                if continuous:
                    edges[-1][1] = True
                    edges.append([t_next, False, True])
                else:
                    edges += [[t_last, True, False], [t_next, False, True]]
                samples.append((t_last, t_next))
                continuous, t_last = True, t_next
    return samples, edges


def _reference_importance_sampling(vals: list[float], cdfs: list[float], n: int, bias: float):
    u_lo, u_hi = cdfs[0], cdfs[-1]
    samples = []
    for sid in range(n):
        u = u_lo + (sid + bias) * (u_hi - u_lo) / n
        p = bisect.bisect_right(cdfs[:-1], u)
        p0, p1 = min(max(p - 1, 0), len(vals) - 1), min(p, len(vals) - 1)
        if cdfs[p1] - cdfs[p0] < 1e-10:
            samples.append((vals[p0] + vals[p1]) / 2)
        else:
            samples.append(
                vals[p0] + (u - cdfs[p0]) * (vals[p1] - vals[p0]) / (cdfs[p1] - cdfs[p0])
            )
    edges = [max(samples[0] - (samples[1] - samples[0]) / 2, vals[0])]
    edges += [(a + b) / 2 for a, b in zip(samples[:-1], samples[1:])]
    edges.append(min(samples[-1] + (samples[-1] - samples[-2]) / 2, vals[-1]))
    return edges, samples


def _random_packed_info(generator: torch.Generator, n_chunks: int) -> torch.Tensor:
    cnts = torch.randint(0, 6, (n_chunks,), generator=generator)
    return torch.stack([cnts.cumsum(0) - cnts, cnts], dim=-1)


# ---------------------------------------------------------------------------------- nerfacc doubles


@pytest.fixture
def nerfacc_cpu_calls():
    with installed() as calls:
        yield calls


def test_pack_info_and_scans_match_brute_force(nerfacc_cpu_calls):
    g = torch.Generator().manual_seed(0)
    ray_indices = torch.sort(torch.randint(0, 7, (40,), generator=g)).values
    packed_info = nerfacc.pack_info(ray_indices, n_rays=9)  # rays 7 and 8 are empty
    assert packed_info[:, 1].tolist() == [int((ray_indices == r).sum()) for r in range(9)]
    assert packed_info[:, 0].tolist() == [int((ray_indices < r).sum()) for r in range(9)]

    packed_info = _random_packed_info(g, 12)
    x = torch.rand(int(packed_info[:, 1].sum()), generator=g, dtype=torch.float64) + 0.5
    for fn, prod, exclusive in [
        (nerfacc.inclusive_sum, False, False),
        (nerfacc.exclusive_sum, False, True),
        (nerfacc.inclusive_prod, True, False),
        (nerfacc.exclusive_prod, True, True),
    ]:
        torch.testing.assert_close(
            fn(x, packed_info), _reference_scan(x, packed_info, prod=prod, exclusive=exclusive)
        )
        # backward goes through nerfacc's autograd.Function and the double's backward kernel
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        weights = torch.rand(x.shape, generator=g, dtype=torch.float64)
        (fn(xa, packed_info) * weights).sum().backward()
        (
            _differentiable_reference_scan(xb, packed_info, prod=prod, exclusive=exclusive)
            * weights
        ).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad)

    # nerfacc's documented examples (outputs of the CUDA kernels).
    docs_x = torch.arange(1.0, 10.0)
    docs_info = torch.tensor([[0, 2], [2, 3], [5, 4]])
    assert nerfacc.exclusive_sum(docs_x, docs_info).tolist() == [0, 1, 0, 3, 7, 0, 6, 13, 21]
    assert nerfacc.exclusive_prod(docs_x, docs_info).tolist() == [1, 1, 1, 3, 12, 1, 6, 42, 336]
    weights, trans, alphas = nerfacc.render_weight_from_density(
        torch.arange(7.0),
        torch.arange(7.0) + 1,
        torch.tensor([0.4, 0.8, 0.1, 0.8, 0.1, 0.0, 0.9]),
        ray_indices=torch.tensor([0, 0, 0, 1, 1, 2, 2]),
    )
    torch.testing.assert_close(
        weights, torch.tensor([0.33, 0.37, 0.03, 0.55, 0.04, 0.00, 0.59]), atol=5e-3, rtol=0
    )
    torch.testing.assert_close(
        trans, torch.tensor([1.00, 0.67, 0.30, 1.00, 0.45, 1.00, 1.00]), atol=5e-3, rtol=0
    )
    assert {
        "pack_info",
        "exclusive_sum",
        "exclusive_sum_backward",
        "inclusive_prod_backward",
    } <= set(nerfacc_cpu_calls)


def test_ray_aabb_intersect_matches_nerfacc_python_reference(nerfacc_cpu_calls):
    g = torch.Generator().manual_seed(1)
    rays_o = torch.randn(64, 3, generator=g, dtype=torch.float64) * 2
    rays_d = torch.nn.functional.normalize(
        torch.randn(64, 3, generator=g, dtype=torch.float64), dim=-1
    )
    centers = torch.randn(3, 3, generator=g, dtype=torch.float64) * 0.5
    aabbs = torch.cat([centers - 1.0, centers + 1.0], dim=-1)
    got = nerfacc.ray_aabb_intersect(rays_o, rays_d, aabbs)
    want = nerfacc_python_ray_aabb_intersect(rays_o, rays_d, aabbs)
    assert torch.equal(got[2], want[2]) and 0 < int(got[2].sum()) < got[2].numel()
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    # Near/far clamp only the hit range (tmin from below, tmax from above), misses get miss_value.
    t_min, t_max, hit = nerfacc.ray_aabb_intersect(
        torch.tensor([[-3.0, 0.0, 0.0], [-3.0, 5.0, 0.0]]),
        torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]),
        torch.tensor([[-1.0, -1.0, -1.0, 1.0, 1.0, 1.0]]),
        near_plane=2.5,
        far_plane=3.5,
        miss_value=-7.0,
    )
    assert hit[:, 0].tolist() == [True, False]
    assert t_min[:, 0].tolist() == [2.5, -7.0] and t_max[:, 0].tolist() == [3.5, -7.0]


def test_occupancy_grid_marching_matches_kernel_port(nerfacc_cpu_calls):
    # Hand-checkable case: a ray along +x through [-1, 1]^3 from x = -2, every cell occupied.
    estimator = nerfacc.OccGridEstimator(
        roi_aabb=[-1.0, -1.0, -1.0, 1.0, 1.0, 1.0], resolution=4, levels=1
    )
    estimator.binaries.fill_(True)
    ray_indices, t_starts, t_ends = estimator.sampling(
        torch.tensor([[-2.0, 0.1, 0.2]]), torch.tensor([[1.0, 0.0, 0.0]]), render_step_size=0.5
    )
    assert ray_indices.tolist() == [0, 0, 0, 0]
    assert t_starts.tolist() == [1.0, 1.5, 2.0, 2.5] and t_ends.tolist() == [1.5, 2.0, 2.5, 3.0]

    # Random two-level grid against a per-ray port of the CUDA kernel.
    g = torch.Generator().manual_seed(2)
    aabbs = torch.tensor(
        [[-1.0, -1.0, -1.0, 1.0, 1.0, 1.0], [-2.0, -2.0, -2.0, 2.0, 2.0, 2.0]], dtype=torch.float64
    )
    binaries = torch.rand(2, 4, 4, 4, generator=g) < 0.5
    rays_o = torch.randn(40, 3, generator=g, dtype=torch.float64) * 1.5
    rays_d = torch.nn.functional.normalize(
        torch.randn(40, 3, generator=g, dtype=torch.float64), dim=-1
    )
    near = torch.rand(40, generator=g, dtype=torch.float64) * 0.3
    far = torch.full((40,), 5.0, dtype=torch.float64)
    far[:5] = 0.8  # a few rays stop early
    step = 0.07
    intervals, samples = nerfacc.traverse_grids(
        rays_o, rays_d, binaries, aabbs, near, far, step_size=step
    )

    n_samples = 0
    for r in range(40):
        ref_samples, ref_edges = _reference_traverse(
            rays_o[r].tolist(),
            rays_d[r].tolist(),
            binaries,
            aabbs,
            float(near[r]),
            float(far[r]),
            step,
        )
        start, cnt = samples.packed_info[r].tolist()
        assert cnt == len(ref_samples)
        got_mid = samples.vals[start : start + cnt]
        torch.testing.assert_close(
            got_mid, torch.tensor([(a + b) / 2 for a, b in ref_samples], dtype=torch.float64)
        )
        assert samples.ray_indices[start : start + cnt].eq(r).all()
        # Interval edges: same starts/ends (the kernel may also split a run at an empty cell that
        # holds no sample midpoint; starts/ends are the same either way).
        mine = intervals.ray_indices == r
        got_starts, got_ends = (
            intervals.vals[mine & intervals.is_left],
            intervals.vals[mine & intervals.is_right],
        )
        torch.testing.assert_close(
            got_starts, torch.tensor([a for a, _ in ref_samples], dtype=torch.float64)
        )
        torch.testing.assert_close(
            got_ends, torch.tensor([b for _, b in ref_samples], dtype=torch.float64)
        )
        assert len(ref_edges) >= int(mine.sum()) >= cnt + (1 if cnt else 0)
        n_samples += cnt
    assert n_samples > 100 and intervals.packed_info[:, 1].sum() == intervals.vals.numel()
    assert nerfacc_cpu_calls["traverse_grids"] == 2


def test_importance_sampling_and_searchsorted_match_brute_force(nerfacc_cpu_calls):
    # nerfacc's documented example (outputs of the CUDA kernel), in batched form.
    intervals, samples = nerfacc.importance_sampling(
        nerfacc.RayIntervals(vals=torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])),
        torch.tensor([[0.0, 0.5, 0.5], [0.0, 0.5, 1.0]]),
        2,
    )
    assert intervals.vals.tolist() == [[0.0, 0.5, 1.0], [0.0, 1.0, 2.0]]
    assert samples.vals.tolist() == [[0.25, 0.75], [0.5, 1.5]]

    g = torch.Generator().manual_seed(3)
    vals = torch.sort(torch.rand(6, 9, generator=g, dtype=torch.float64) * 4, dim=-1).values
    weights = torch.rand(6, 8, generator=g, dtype=torch.float64) * (
        torch.rand(6, 8, generator=g) > 0.3
    )
    cdfs = torch.cat([torch.zeros(6, 1, dtype=torch.float64), weights.cumsum(-1)], dim=-1)
    cdfs = cdfs / cdfs[:, -1:]
    intervals, samples = nerfacc.importance_sampling(
        nerfacc.RayIntervals(vals=vals), cdfs, 5, stratified=False
    )
    for r in range(6):
        ref_edges, ref_samples = _reference_importance_sampling(
            vals[r].tolist(), cdfs[r].tolist(), 5, 0.5
        )
        torch.testing.assert_close(samples.vals[r], torch.tensor(ref_samples, dtype=torch.float64))
        torch.testing.assert_close(intervals.vals[r], torch.tensor(ref_edges, dtype=torch.float64))
    torch.manual_seed(0)
    jittered, _ = nerfacc.importance_sampling(
        nerfacc.RayIntervals(vals=vals), cdfs, 5, stratified=True
    )
    assert (jittered.vals.diff(dim=-1) >= 0).all()
    assert (jittered.vals >= vals[:, :1]).all() and (jittered.vals <= vals[:, -1:]).all()

    query = nerfacc.RayIntervals(vals=torch.rand(6, 7, generator=g, dtype=torch.float64) * 5 - 0.5)
    ids_left, ids_right = nerfacc.searchsorted(nerfacc.RayIntervals(vals=vals), query)
    for r in range(6):
        key = vals[r].tolist()
        for j, q in enumerate(query.vals[r].tolist()):
            p = bisect.bisect_right(key[:-1], q)
            assert (ids_left[r, j], ids_right[r, j]) == (min(max(p - 1, 0), 8), min(p, 8))
    assert {"importance_sampling", "searchsorted"} <= set(nerfacc_cpu_calls)


# ------------------------------------------------------------------------ real threestudio training


def _geometry_snapshot(system) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in system.geometry.named_parameters()}


def test_stock_dreamfusion_sd_trains_on_cpu(tiny_sd_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the helper must keep .threestudio_cache/ in its own workdir
    system, datamodule = make_dreamfusion_system(STOCK_CONFIG, tiny_sd_path, tmp_path / "run")
    assert system.renderer.cfg.estimator == "occgrid"
    assert type(system.geometry.encoding.encoding).__name__ == "ProgressiveBandFrequency"
    before = _geometry_snapshot(system)

    CALLS.clear()
    losses = fit_steps(system, datamodule, 3)

    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses), losses
    after = _geometry_snapshot(system)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[name], after[name]) for name in before), (
        "geometry parameters did not change"
    )
    assert system.guidance.unet.dtype == torch.float32
    assert (tmp_path / "run" / ".threestudio_cache" / "text_embeddings").is_dir()
    assert not (tmp_path / ".threestudio_cache").exists()
    # the default occupancy-grid estimator reaches these nerfacc kernels (all replaced by the CPU double)
    assert {"ray_aabb_intersect", "traverse_grids", "pack_info", "exclusive_sum"} <= set(CALLS)
    assert "exclusive_sum_backward" in CALLS


@pytest.mark.parametrize(
    ("estimator", "kernels"),
    [
        ("importance", {"importance_sampling", "pack_info", "exclusive_sum"}),
        ("proposal", {"importance_sampling", "searchsorted", "pack_info", "exclusive_sum"}),
    ],
)
def test_nerf_renderer_estimators_train_on_cpu(tiny_sd_path, tmp_path, estimator, kernels):
    small = [
        f"system.renderer.estimator={estimator}",
        "data.width=32",
        "data.height=32",
        "system.renderer.num_samples_per_ray=16",
        "system.renderer.num_samples_per_ray_importance=16",
        "system.renderer.num_samples_per_ray_proposal=16",
    ]
    system, datamodule = make_dreamfusion_system(STOCK_CONFIG, tiny_sd_path, tmp_path, small)
    CALLS.clear()
    losses = fit_steps(system, datamodule, 2)
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses), losses
    assert kernels <= set(CALLS), dict(CALLS)
