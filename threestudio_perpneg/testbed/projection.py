"""The mechanism behind a Perp-Neg row: how much of the front direction is left to remove.

On a back camera Perp-Neg's positive is the back-view prompt and its main negative the front-view
prompt. With Δ_pos = ε(back) − ε_u and Δ_front = ε(front) − ε_u, Perp-Neg subtracts
``w·⊥(Δ_front, Δ_pos)``; if that component is small against Δ_pos the negative can do little,
however large its weight. Measured on renders of the true back of the head (the prompted
identity's jittered textures from back-bucket cameras), noised at a few timesteps, with the same
noise for every prompt, through the core's one projection helper.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch

__all__ = ["DEFAULT_TIMESTEPS", "projection_ratios"]

#: Timesteps (of 1000) at which the ratio is reported.
DEFAULT_TIMESTEPS = (200, 500, 800)


@torch.no_grad()
def projection_ratios(
    prior_path: str,
    identity: str,
    *,
    timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
    n: int = 32,
    seed: int = 0,
    engine: Any = None,
) -> List[Dict[str, Any]]:
    """Per timestep: mean ‖⊥(Δ_front, Δ_pos)‖ / ‖Δ_pos‖ on ``n`` back views, with its parts.

    Returns rows ``{t, perp_over_pos, front_over_pos, cos_front_pos, pos_over_uncond, n}``
    (means over the images): ``front_over_pos`` = ‖Δ_front‖ / ‖Δ_pos‖, ``cos_front_pos`` the
    cosine between the two directions, ``pos_over_uncond`` = ‖Δ_pos‖ / ‖ε_u‖ (how much the back
    prompt moves ε at all).
    """
    from ..common.checks import check_int
    from ..core.guidance import perpendicular_component
    from ..core.text import text_embeddings
    from ..engines.pixel import PerpNegIFEngine, load_deepfloyd_if
    from . import scenes
    from .dataset import DatasetConfig, base_prompt, sample_cameras, view_prompt
    from .prior import load_testbed_config

    n = check_int("n", n, 1, 4096)
    ts = [check_int("timesteps", int(t), 0, 999) for t in timesteps]
    dataset = DatasetConfig.from_dict(load_testbed_config(prior_path)["dataset"])
    if engine is None:
        engine = PerpNegIFEngine(*load_deepfloyd_if(str(prior_path)))
    gen = torch.Generator().manual_seed(int(seed))
    az, el, dist = sample_cameras(dataset, ["back"] * n, gen)
    tex = scenes.identity_textures(
        [identity] * n, dataset.texture_size, jitter=dataset.texture_jitter, generator=gen
    )
    x0 = scenes.render(
        tex,
        az,
        el,
        camera_distance=dist,
        size=engine.resolution,
        fovy_deg=dataset.fovy_deg,
        background=dataset.background,
        shading=dataset.shading,
    )
    x0 = x0 * 2.0 - 1.0
    prompt = base_prompt(dataset, identity)
    back, front = view_prompt(prompt, "back"), view_prompt(prompt, "front")
    emb = text_embeddings(prior_path, [back, front, ""], None, use_cache=False)
    unet = engine.unet
    rows: List[Dict[str, Any]] = []
    for t in ts:
        noise = torch.randn(x0.shape, generator=gen)
        tt = torch.full((n,), t, dtype=torch.long)
        x_t = engine.scheduler.add_noise(x0, noise, tt)

        e_u, e_back, e_front = (
            unet(x_t, tt, encoder_hidden_states=emb[p][None].expand(n, *emb[p].shape)).sample[:, :3]
            for p in ("", back, front)
        )
        d_pos, d_front = e_back - e_u, e_front - e_u
        perp = perpendicular_component(d_front, d_pos)

        def norm(v: torch.Tensor) -> torch.Tensor:
            return v.flatten(1).norm(dim=1)

        pos_n = norm(d_pos).clamp_min(1e-12)
        cos = (d_front.flatten(1) * d_pos.flatten(1)).sum(1) / (
            pos_n * norm(d_front).clamp_min(1e-12)
        )
        rows.append(
            {
                "t": t,
                "n": n,
                "perp_over_pos": round(float((norm(perp) / pos_n).mean()), 4),
                "front_over_pos": round(float((norm(d_front) / pos_n).mean()), 4),
                "cos_front_pos": round(float(cos.mean()), 4),
                "pos_over_uncond": round(float((pos_n / norm(e_u).clamp_min(1e-12)).mean()), 4),
            }
        )
    return rows
