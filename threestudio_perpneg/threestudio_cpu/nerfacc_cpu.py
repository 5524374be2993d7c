"""Pure-torch test double for the CUDA-only kernels of nerfacc 0.5.x.

nerfacc's Python API (`nerfacc.scan`, `nerfacc.pdf`, `nerfacc.grid`, the estimators, `volrend`) calls its
compiled kernels through the module `nerfacc.cuda` (imported there as `_C`) by attribute lookup, so replacing
those attributes swaps the kernels everywhere at once. `pack_info` has no kernel but raises for CPU tensors;
it is replaced in every loaded module that holds it. The doubles follow the CUDA sources of nerfacc 0.5.2:

- scans with `packed_info` (inclusive/exclusive sum and product, forward and backward);
- `ray_aabb_intersect`;
- `traverse_grids` (occupancy-grid marching; `cone_angle == 0` and `step_size > 0` only);
- `importance_sampling` and `searchsorted` for batched `(n_rays, n_edges)` inputs (what the proposal and
  importance estimators use).

Which estimator reaches what (measured on threestudio's nerf-volume-renderer): occgrid -> ray_aabb_intersect,
traverse_grids, pack_info, exclusive_sum; proposal -> importance_sampling, searchsorted, pack_info,
exclusive_sum; importance -> importance_sampling, pack_info, exclusive_sum. `CALLS` counts the calls.
"""

from __future__ import annotations

import collections
import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["CALLS", "RaySegmentsSpec", "ensure_installed", "install", "installed"]

CALLS: collections.Counter[str] = collections.Counter()


class RaySegmentsSpec:
    """Python stand-in of nerfacc's C++ `RaySegmentsSpec` (unset fields are None)."""

    def __init__(self) -> None:
        self.vals: Tensor | None = None
        self.chunk_starts: Tensor | None = None
        self.chunk_cnts: Tensor | None = None
        self.ray_indices: Tensor | None = None
        self.is_left: Tensor | None = None
        self.is_right: Tensor | None = None


# ------------------------------------------------------------------------------------- pack / scans


@torch.no_grad()
def pack_info(ray_indices: Tensor, n_rays: int | None = None) -> Tensor:
    CALLS["pack_info"] += 1
    assert ray_indices.dim() == 1, "ray_indices must be a 1D tensor with shape (n_samples)."
    if n_rays is None:
        n_rays = int(ray_indices.max().item()) + 1 if ray_indices.numel() else 0
    cnts = torch.zeros((n_rays,), device=ray_indices.device, dtype=ray_indices.dtype)
    cnts.index_add_(0, ray_indices, torch.ones_like(ray_indices))
    return torch.stack([cnts.cumsum(0, dtype=cnts.dtype) - cnts, cnts], dim=-1)


def _segmented_scan(
    chunk_starts: Tensor,
    chunk_cnts: Tensor,
    inputs: Tensor,
    *,
    prod: bool,
    exclusive: bool,
    reverse: bool,
) -> Tensor:
    """Scans each chunk `inputs[start:start + cnt]` independently; elements outside every chunk give 0."""
    cnts = chunk_cnts.long()
    n_chunks, total = cnts.numel(), int(cnts.sum().item())
    out = torch.zeros_like(inputs)
    if total == 0:
        return out
    chunk_id = torch.repeat_interleave(torch.arange(n_chunks, device=inputs.device), cnts)
    pos = torch.arange(total, device=inputs.device) - torch.repeat_interleave(
        cnts.cumsum(0) - cnts, cnts
    )
    flat = chunk_starts.long()[chunk_id] + pos
    identity = 1.0 if prod else 0.0
    dense = inputs.new_full((n_chunks, int(cnts.max().item())), identity)
    dense[chunk_id, pos] = inputs[flat]
    if reverse:  # padding sits on the right, so flipping puts it first where it is the identity
        dense = dense.flip(1)
    if exclusive:
        dense = torch.cat([dense.new_full((n_chunks, 1), identity), dense[:, :-1]], dim=1)
    dense = dense.cumprod(1) if prod else dense.cumsum(1)
    if reverse:
        dense = dense.flip(1)
    out[flat] = dense[chunk_id, pos]
    return out


def _sum_kernel(exclusive: bool) -> Callable[..., Tensor]:
    def kernel(
        chunk_starts: Tensor, chunk_cnts: Tensor, inputs: Tensor, normalize: bool, backward: bool
    ) -> Tensor:
        CALLS[
            ("exclusive" if exclusive else "inclusive") + "_sum" + ("_backward" if backward else "")
        ] += 1
        if normalize:
            raise NotImplementedError(
                "nerfacc_cpu: normalize=True is not implemented (threestudio never uses it)"
            )
        return _segmented_scan(
            chunk_starts, chunk_cnts, inputs, prod=False, exclusive=exclusive, reverse=backward
        )

    return kernel


def _prod_forward(exclusive: bool) -> Callable[..., Tensor]:
    def kernel(chunk_starts: Tensor, chunk_cnts: Tensor, inputs: Tensor) -> Tensor:
        CALLS[("exclusive" if exclusive else "inclusive") + "_prod"] += 1
        return _segmented_scan(
            chunk_starts, chunk_cnts, inputs, prod=True, exclusive=exclusive, reverse=False
        )

    return kernel


def _prod_backward(exclusive: bool) -> Callable[..., Tensor]:
    # Same formula as the CUDA kernel: reverse (in/ex)clusive sum of grad * out, divided by the input.
    def kernel(
        chunk_starts: Tensor, chunk_cnts: Tensor, inputs: Tensor, outputs: Tensor, grad: Tensor
    ) -> Tensor:
        CALLS[("exclusive" if exclusive else "inclusive") + "_prod_backward"] += 1
        summed = _segmented_scan(
            chunk_starts, chunk_cnts, grad * outputs, prod=False, exclusive=exclusive, reverse=True
        )
        return summed / inputs.clamp_min(1e-10)

    return kernel


# -------------------------------------------------------------------------------------------- grids


@torch.no_grad()
def ray_aabb_intersect(
    rays_o: Tensor, rays_d: Tensor, aabbs: Tensor, near: float, far: float, miss_value: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Slab test per (ray, aabb) pair as in the CUDA device function (touching hits, tmax <= 0 misses)."""
    CALLS["ray_aabb_intersect"] += 1
    inv = (1.0 / rays_d)[:, None, :]
    t1 = (aabbs[None, :, :3] - rays_o[:, None, :]) * inv
    t2 = (aabbs[None, :, 3:] - rays_o[:, None, :]) * inv
    t_near, t_far = torch.where(inv >= 0, t1, t2), torch.where(inv >= 0, t2, t1)
    t_min, t_max = t_near.amax(-1), t_far.amin(-1)
    hits = (t_min <= t_max) & (t_max > 0)
    t_min, t_max = t_min.clamp_min(near), t_max.clamp_max(far)
    miss = torch.full_like(t_min, miss_value)
    return torch.where(hits, t_min, miss), torch.where(hits, t_max, miss), hits


@torch.no_grad()
def traverse_grids(
    rays_o: Tensor,
    rays_d: Tensor,
    binaries: Tensor,
    aabbs: Tensor,
    t_mins: Tensor,
    t_maxs: Tensor,
    hits: Tensor,
    near_planes: Tensor,
    far_planes: Tensor,
    step_size: float,
    cone_angle: float,
    compute_intervals: bool,
    compute_samples: bool,
) -> tuple[RaySegmentsSpec, RaySegmentsSpec]:
    """
    Marches every ray from its near plane in steps of `step_size`; step k is `[near + k dt, near + (k+1) dt]`
    and is kept when its midpoint lies within the ray's hit range and in an occupied cell of the finest grid
    level containing it. Consecutive kept steps share interval edges (one run = one continuous segment).
    """
    CALLS["traverse_grids"] += 1
    if cone_angle != 0.0 or step_size <= 0.0:
        raise NotImplementedError(
            "nerfacc_cpu.traverse_grids supports cone_angle == 0 and step_size > 0 only"
        )
    device, n_rays = rays_o.device, rays_o.shape[0]
    inf = torch.full_like(t_mins, float("inf"))
    lo = torch.maximum(torch.where(hits, t_mins, inf).amin(-1), near_planes)
    hi = torch.minimum(torch.where(hits, t_maxs, -inf).amax(-1), far_planes)
    valid = hits.any(-1) & (lo < hi)
    k_start = torch.ceil((lo - near_planes) / step_size - 0.5).clamp_min(0)
    k_end = torch.ceil((hi - near_planes) / step_size - 0.5)
    counts = torch.where(valid, (k_end - k_start).clamp_min(0), torch.zeros_like(k_end)).long()

    ray_ids = torch.repeat_interleave(torch.arange(n_rays, device=device), counts)
    k = (
        k_start.long()[ray_ids]
        + torch.arange(ray_ids.numel(), device=device)
        - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    )
    t0 = near_planes[ray_ids] + k.to(rays_o.dtype) * step_size
    t1 = t0 + step_size
    points = rays_o[ray_ids] + rays_d[ray_ids] * ((t0 + t1) * 0.5)[:, None]

    # Finest (lowest-index) hit level whose box contains the midpoint; fall back to the last hit level.
    eps = 1e-6
    inside = (
        (points[:, None, :] >= aabbs[None, :, :3] - eps)
        & (points[:, None, :] <= aabbs[None, :, 3:] + eps)
    ).all(-1)
    inside &= hits[ray_ids]
    n_levels = aabbs.shape[0]
    level_order = torch.arange(n_levels, device=device)
    fallback = (
        torch.where(hits[ray_ids], level_order, torch.full_like(level_order, -1))
        .amax(-1)
        .clamp_min(0)
    )
    first_inside = torch.where(inside, level_order, torch.full_like(level_order, n_levels)).amin(-1)
    level = torch.where(first_inside < n_levels, first_inside, fallback)
    res = torch.tensor(binaries.shape[1:], device=device)
    box_min, box_max = aabbs[level, :3], aabbs[level, 3:]
    cell = ((points - box_min) / (box_max - box_min) * res).floor().long()
    cell = torch.minimum(cell.clamp_min(0), res - 1)
    keep = binaries[level, cell[:, 0], cell[:, 1], cell[:, 2]]
    ray_ids, k, t0, t1 = ray_ids[keep], k[keep], t0[keep], t1[keep]
    kept_per_ray = torch.bincount(ray_ids, minlength=n_rays)

    samples = RaySegmentsSpec()
    if compute_samples:
        samples.vals = (t0 + t1) * 0.5
        samples.chunk_cnts = kept_per_ray
        samples.chunk_starts = kept_per_ray.cumsum(0) - kept_per_ray
        samples.ray_indices = ray_ids

    intervals = RaySegmentsSpec()
    if compute_intervals:
        n = ray_ids.numel()
        new_run = torch.ones(n, dtype=torch.bool, device=device)
        if n > 1:
            new_run[1:] = (ray_ids[1:] != ray_ids[:-1]) | (k[1:] != k[:-1] + 1)
        edges_per_sample = 1 + new_run.long()
        right_pos = edges_per_sample.cumsum(0) - 1
        left_pos = right_pos[new_run] - 1
        n_edges = n + int(new_run.sum().item())
        vals = t0.new_empty(n_edges)
        vals[left_pos], vals[right_pos] = t0[new_run], t1
        edge_rays = torch.empty(n_edges, dtype=torch.long, device=device)
        edge_rays[left_pos], edge_rays[right_pos] = ray_ids[new_run], ray_ids
        is_left = torch.zeros(n_edges, dtype=torch.bool, device=device)
        is_right = torch.zeros(n_edges, dtype=torch.bool, device=device)
        is_left[left_pos] = True
        continues = torch.zeros(n, dtype=torch.bool, device=device)
        continues[:-1] = ~new_run[1:]
        is_left[right_pos[continues]] = True
        is_right[right_pos] = True
        cnts = torch.bincount(edge_rays, minlength=n_rays)
        intervals.vals, intervals.ray_indices, intervals.is_left, intervals.is_right = (
            vals,
            edge_rays,
            is_left,
            is_right,
        )
        intervals.chunk_cnts, intervals.chunk_starts = cnts, cnts.cumsum(0) - cnts
    return intervals, samples


# ---------------------------------------------------------------------------------------------- pdf


def _require_batched(spec: RaySegmentsSpec, what: str) -> Tensor:
    if spec.vals is None or spec.vals.dim() < 2:
        raise NotImplementedError(
            f"nerfacc_cpu.{what} supports batched (n_rays, n_edges) inputs only"
        )
    return spec.vals


@torch.no_grad()
def importance_sampling(
    ray_segments: RaySegmentsSpec, cdfs: Tensor, n_intervals_per_ray: Any, stratified: bool
) -> tuple[RaySegmentsSpec, RaySegmentsSpec]:
    """Inverse-CDF sampling, one jitter per ray; edges are sample midpoints clipped to the range."""
    CALLS["importance_sampling"] += 1
    vals = _require_batched(ray_segments, "importance_sampling")
    if isinstance(n_intervals_per_ray, Tensor):
        raise NotImplementedError(
            "nerfacc_cpu.importance_sampling supports an int n_intervals_per_ray only"
        )
    n = int(n_intervals_per_ray)
    lead = vals.shape[:-1]
    vals2, cdfs2 = vals.reshape(-1, vals.shape[-1]), cdfs.reshape(-1, vals.shape[-1])
    u_floor, u_ceil = cdfs2[:, :1], cdfs2[:, -1:]
    bias = torch.rand_like(u_floor) if stratified else torch.full_like(u_floor, 0.5)
    sid = torch.arange(n, device=vals.device, dtype=vals.dtype)
    u = u_floor + (sid + bias) * ((u_ceil - u_floor) / n)
    # upper_bound over all but the last edge ("right" searchsorted), then clamp to valid edges.
    p = torch.searchsorted(cdfs2[:, :-1].contiguous(), u.contiguous(), right=True)
    last = vals2.shape[-1] - 1
    p0, p1 = (p - 1).clamp(0, last), p.clamp(0, last)
    u_lo, u_hi = cdfs2.gather(1, p0), cdfs2.gather(1, p1)
    t_lo, t_hi = vals2.gather(1, p0), vals2.gather(1, p1)
    flat = (u_hi - u_lo) < 1e-10
    t = torch.where(
        flat,
        (t_lo + t_hi) * 0.5,
        (u - u_lo) * (t_hi - t_lo) / torch.where(flat, 1.0, u_hi - u_lo) + t_lo,
    )

    edges = t.new_empty(t.shape[0], n + 1)
    if n > 1:
        edges[:, 1:n] = (t[:, 1:] + t[:, :-1]) * 0.5
        edges[:, :1] = torch.maximum(t[:, :1] - (t[:, 1:2] - t[:, :1]) * 0.5, vals2[:, :1])
        edges[:, n:] = torch.minimum(t[:, -1:] + (t[:, -1:] - t[:, -2:-1]) * 0.5, vals2[:, -1:])
    else:  # the CUDA kernel reads out of bounds here; use the whole range
        edges[:, :1], edges[:, 1:] = vals2[:, :1], vals2[:, -1:]

    intervals, samples = RaySegmentsSpec(), RaySegmentsSpec()
    intervals.vals, samples.vals = edges.reshape(*lead, n + 1), t.reshape(*lead, n)
    return intervals, samples


@torch.no_grad()
def searchsorted(query: RaySegmentsSpec, key: RaySegmentsSpec) -> tuple[Tensor, Tensor]:
    """ids (relative to each ray) with key[left] <= query < key[right], clamped to the key's edges."""
    CALLS["searchsorted"] += 1
    q, kv = _require_batched(query, "searchsorted"), _require_batched(key, "searchsorted")
    last = kv.shape[-1] - 1
    p = torch.searchsorted(kv[..., :-1].contiguous(), q.contiguous(), right=True)
    return (p - 1).clamp(0, last), p.clamp(0, last)


# ----------------------------------------------------------------------------------------- patching

_KERNELS: dict[str, Callable[..., Any]] = {
    "RaySegmentsSpec": RaySegmentsSpec,
    "inclusive_sum": _sum_kernel(exclusive=False),
    "exclusive_sum": _sum_kernel(exclusive=True),
    "inclusive_prod_forward": _prod_forward(exclusive=False),
    "exclusive_prod_forward": _prod_forward(exclusive=True),
    "inclusive_prod_backward": _prod_backward(exclusive=False),
    "exclusive_prod_backward": _prod_backward(exclusive=True),
    "ray_aabb_intersect": ray_aabb_intersect,
    "traverse_grids": traverse_grids,
    "importance_sampling": importance_sampling,
    "searchsorted": searchsorted,
}


def install() -> Callable[[], None]:
    """Swaps nerfacc's CUDA kernels and `pack_info` for the pure-torch doubles; returns the undo."""
    import nerfacc
    import nerfacc.cuda
    import nerfacc.pack

    undo: list[tuple[Any, str, Any]] = []
    for name, double in _KERNELS.items():
        undo.append((nerfacc.cuda, name, getattr(nerfacc.cuda, name)))
        setattr(nerfacc.cuda, name, double)
    original_pack_info = nerfacc.pack.pack_info
    if original_pack_info is not pack_info:
        for module in list(sys.modules.values()):
            if module is not None and getattr(module, "pack_info", None) is original_pack_info:
                undo.append((module, "pack_info", original_pack_info))
                module.pack_info = pack_info  # type: ignore[attr-defined]
    if nerfacc.pack_info is not pack_info:
        raise RuntimeError("nerfacc_cpu: nerfacc.pack_info could not be replaced")

    def _undo() -> None:
        for module, attr, old in reversed(undo):
            setattr(module, attr, old)
        undo.clear()

    return _undo


_PROCESS_WIDE_UNDO: list[Callable[[], None]] = []


def ensure_installed() -> None:
    """Installs the doubles for the rest of the process (idempotent); used by the system helpers."""
    if not _PROCESS_WIDE_UNDO:
        _PROCESS_WIDE_UNDO.append(install())


@contextlib.contextmanager
def installed() -> Iterator[collections.Counter[str]]:
    """Context manager form of `install()`; yields `CALLS` (cleared on entry)."""
    CALLS.clear()
    undo = install()
    try:
        yield CALLS
    finally:
        undo()
