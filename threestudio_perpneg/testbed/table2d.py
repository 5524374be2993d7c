"""The testbed's 2D view-success table (the paper's SD / CEBM / Perp-Neg comparison) and the
success of a requested view against a single negative weight.

Every cell samples the testbed prior with DDIM (η = 0) from the SAME seeded initial noise (sample i
of every cell starts from the same ``x_T``: a paired comparison), with the prompt
``DatasetConfig.base_prompt(identity)`` plus threestudio's view suffix
(:func:`~threestudio_perpneg.core.text.view_prompts`), classifies the samples with the testbed
classifier and counts a success when the classified view equals the requested one (the
classifier's ``none`` reject label is a failure). ε̂ per mode, as in
:mod:`threestudio_perpneg.sampler.pipeline` and all through
:func:`~threestudio_perpneg.core.guidance.perp_neg_guidance`:

* ``sd``: plain classifier-free guidance on the view prompt, ε̂ = ε_u + s·(ε_c − ε_u); no view
  negatives, so its rows have ``scheme`` None. (The 2D sampler's ``sd`` mode instead joins the
  negative views into the unconditional text; the table's ``sd`` is the paper's "view prompt
  only" baseline, the same as :mod:`.protocol2d`'s ``*_success_cfg``.)
* ``cebm``: composable diffusion, the other views' prompts with the scheme's weights added
  without projection, ε̂ = ε_u + s·(Δ_c + Σ_k w_k Δ_k) (the sampler's ``cebm``: negatives passed
  as weighted positives).
* ``perpneg``: ε̂ = ε_u + s·(Δ_c + Σ_k w_k ⊥(Δ_k, Δ_c)).

The view weights of ``cebm`` / ``perpneg`` are those of the scheme (``threestudio`` or
``authors``, :func:`~threestudio_perpneg.sampler.checks.camera_view_weights`) at the requested
view's azimuth (side 90°, back 180°), exactly what ``PerpNegSampler.generate_view`` uses; weights
that are zero are never evaluated.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..common.checks import check_float, check_int, check_names
from ..core.guidance import perp_neg_guidance
from ..core.text import view_prompts
from ..core.views import VIEW_NAMES
from ..eval.stats import wilson_interval

__all__ = [
    "TABLE_MODES",
    "TABLE_SCHEMES",
    "TABLE_VIEWS",
    "CURVE_MODES",
    "CURVE_WEIGHTS",
    "TestbedPrior",
    "load_prior",
    "initial_noise",
    "sample_guided",
    "scheme_negatives",
    "table2d_samples",
    "measure_table2d",
    "curve_samples",
    "negative_weight_curve",
    "plot_negative_weight_curve",
]

TABLE_MODES: Tuple[str, ...] = ("sd", "cebm", "perpneg")
TABLE_SCHEMES: Tuple[str, ...] = ("threestudio", "authors")
#: Views a table may request (the testbed classifier knows front, side and back).
TABLE_VIEWS: Tuple[str, ...] = ("front", "side", "back")
CURVE_WEIGHTS: Tuple[float, ...] = (0.0, -0.5, -1.0, -2.0, -3.0, -4.0)
#: Modes of the negative-weight curve (``sd`` has no weighted negatives).
CURVE_MODES: Tuple[str, ...] = ("cebm", "perpneg")
_AZIMUTH = {"front": 0.0, "side": 90.0, "back": 180.0}


class TestbedPrior(NamedTuple):
    """A loaded testbed prior: folder, UNet (eval mode), scheduler config, dataset config."""

    path: str
    unet: Any
    scheduler_config: Any
    dataset: Any


def load_prior(prior_path: str | os.PathLike) -> TestbedPrior:
    """The UNet, scheduler config and dataset config (``testbed.json``) of a testbed prior folder."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from ..core.text import resolve_pretrained
    from .dataset import DatasetConfig
    from .prior import load_testbed_config

    path = resolve_pretrained(str(prior_path), key="prior")
    data = DatasetConfig.from_dict(load_testbed_config(path)["dataset"])
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").eval()
    sched = DDPMScheduler.from_pretrained(path, subfolder="scheduler").config
    return TestbedPrior(path, unet, sched, data)


def initial_noise(n: int, size: int, seed: int) -> Tensor:
    """``[n, 3, size, size]`` standard normal noise from one generator seeded ``seed``.

    Every cell of a table uses this tensor, so sample i starts from the same ``x_T`` in every mode
    (and the result does not depend on the batch size).
    """
    return torch.randn((n, 3, size, size), generator=torch.Generator().manual_seed(seed))


def _check_mode(mode: Any) -> str:
    if mode not in TABLE_MODES:
        raise ValueError(f"mode: unknown mode {mode!r}, expected one of {TABLE_MODES}")
    return str(mode)


@torch.no_grad()
def sample_guided(
    unet: Any,
    scheduler_config: Any,
    noise: Tensor,
    uncond: Tensor,
    positive: Tensor,
    negatives: Optional[Tensor] = None,
    neg_weights: Optional[Sequence[float]] = None,
    *,
    mode: str = "perpneg",
    guidance_scale: float = 7.5,
    steps: int = 50,
) -> Tensor:
    """DDIM (η = 0) samples ``[B, 3, R, R]`` in [0, 1] of one mode, one UNet call per step.

    Args:
        unet: ε-prediction UNet with 3 channels.
        scheduler_config: the prior's scheduler config (a DDIM scheduler is built from it).
        noise: the initial ``x_T``, ``[B, 3, R, R]``.
        uncond: the empty prompt's embedding ``[L, D]``.
        positive: the view prompts' embeddings ``[B, L, D]``.
        negatives: the other views' embeddings ``[B, K, L, D]`` (None: none).
        neg_weights: K weights w_k (≤ 0 removes a view); zero weights are never evaluated.
        mode: ``sd`` (negatives ignored), ``cebm`` or ``perpneg`` (see the module docstring).
        guidance_scale: s of ε̂ = ε_u + s·(…).
        steps: DDIM steps.
    """
    from diffusers import DDIMScheduler

    mode = _check_mode(mode)
    check_int("steps", steps, 1)
    b = noise.shape[0]
    if positive.shape[0] != b:
        raise ValueError(f"positive: expected {b} embeddings, got {positive.shape[0]}")
    weights: List[float] = []
    neg = None
    if mode != "sd" and negatives is not None and negatives.shape[1] > 0:
        w = [float(x) for x in (neg_weights if neg_weights is not None else [])]
        if len(w) != negatives.shape[1]:
            raise ValueError(
                f"neg_weights: expected {negatives.shape[1]} weights, got {len(w)}: {w!r}"
            )
        keep = [k for k, x in enumerate(w) if x != 0.0]
        if keep:
            neg, weights = negatives[:, keep], [w[k] for k in keep]
    k = len(weights)
    # Rows branch-major, as the sampler's: [uncond × B, positive × B, negative_1 × B, …].
    text = [uncond.expand(b, -1, -1), positive]
    if neg is not None:
        text += [neg[:, j] for j in range(k)]
    emb = torch.cat(text)
    rows = 2 + k
    if mode == "cebm":
        pos_w = torch.tensor([1.0] + weights)
    else:
        pos_w = torch.tensor([1.0])
    neg_w = torch.tensor(weights) if mode == "perpneg" and k else None

    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps)
    x = noise.clone()
    for t in sched.timesteps:
        out = unet(torch.cat([x] * rows), t, encoder_hidden_states=emb).sample
        out = out.reshape(rows, b, *out.shape[1:])
        eps_u = out[0]
        if mode == "cebm":
            eps_hat = perp_neg_guidance(
                eps_u, out[1:].transpose(0, 1), None, None, guidance_scale, pos_weights=pos_w
            )
        else:
            eps_neg = out[2:].transpose(0, 1) if neg_w is not None else None
            eps_hat = perp_neg_guidance(
                eps_u, out[1:2].transpose(0, 1), eps_neg, neg_w, guidance_scale, pos_weights=pos_w
            )
        x = sched.step(eps_hat, t, x, eta=0.0).prev_sample
    return (x / 2 + 0.5).clamp(0, 1)


def scheme_negatives(view: str, scheme: str) -> Dict[str, float]:
    """The non-zero view-negative weights ``{view name: w}`` of ``scheme`` for a requested view,
    as ``PerpNegSampler.generate_view(view=...)`` computes them."""
    from ..sampler.checks import camera_view_weights

    if view not in _AZIMUTH:
        raise ValueError(f"view: unknown view {view!r}, expected one of {TABLE_VIEWS}")
    vw = camera_view_weights(_AZIMUTH[view], 0.0, scheme, view=VIEW_NAMES.index(view))
    mix = vw.positive_mix[0].tolist()
    if mix[VIEW_NAMES.index(view)] != 1.0:  # view names sit at the ends of the interpolation
        raise AssertionError(f"view {view!r}: positive mix {mix} is not the view prompt alone")
    w = vw.negative_weights[0].tolist()
    return {name: float(w[i]) for i, name in enumerate(VIEW_NAMES) if w[i] != 0.0}


def _identities(data: Any, identity: Optional[str], n: int) -> List[str]:
    if identity is not None and identity not in data.identities:
        raise ValueError(
            f"identity: unknown identity {identity!r}, expected one of {tuple(data.identities)}"
        )
    names = [identity] if identity is not None else list(data.identities)
    return [names[i % len(names)] for i in range(n)]


class _Cell(NamedTuple):
    mode: str
    scheme: Optional[str]
    view: str
    weights: Dict[str, float]  # negative view -> weight


def _run_cells(
    prior: TestbedPrior,
    cells: Sequence[_Cell],
    idents: List[str],
    *,
    guidance_scale: float,
    steps: int,
    seed: int,
    batch: int,
    progress: bool,
    desc: str,
) -> List[Tensor]:
    """Samples ``[n, 3, R, R]`` of each cell, all from :func:`initial_noise` (paired)."""
    from tqdm.auto import tqdm

    from ..core.text import encode_prompts

    n = len(idents)
    bases = {x: prior.dataset.base_prompt(x) for x in dict.fromkeys(idents)}
    texts = {x: dict(zip(VIEW_NAMES, view_prompts(p))) for x, p in bases.items()}
    needed = sorted({t for d in texts.values() for t in d.values()})
    emb = encode_prompts(prior.path, [""] + needed)
    uncond, by_text = emb[0], dict(zip(needed, emb[1:]))
    size = int(prior.unet.config.sample_size)
    noise = initial_noise(n, size, seed)
    chunks = [(s, min(batch, n - s)) for s in range(0, n, batch)]
    bar = tqdm(total=len(cells) * len(chunks), desc=desc, disable=not progress)
    out = []
    for cell in cells:
        names = list(cell.weights)
        wts = [cell.weights[v] for v in names]
        images = []
        for start, m in chunks:
            ids = idents[start : start + m]
            pos = torch.stack([by_text[texts[x][cell.view]] for x in ids])
            neg = None
            if names and cell.mode != "sd":
                neg = torch.stack([torch.stack([by_text[texts[x][v]] for v in names]) for x in ids])
            images.append(
                sample_guided(
                    prior.unet,
                    prior.scheduler_config,
                    noise[start : start + m],
                    uncond,
                    pos,
                    neg,
                    wts,
                    mode=cell.mode,
                    guidance_scale=guidance_scale,
                    steps=steps,
                )
            )
            bar.update(1)
        out.append(torch.cat(images))
    bar.close()
    return out


def _check_common(n: Any, steps: Any, seed: Any, batch: Any, guidance_scale: Any) -> None:
    check_int("n", n, 1)
    check_int("steps", steps, 1)
    check_int("seed", seed, 0, 2**63 - 1)
    check_int("batch", batch, 1)
    check_float("guidance_scale", guidance_scale)


def _table_cells(modes: Sequence[str], schemes: Sequence[str], views: Sequence[str]) -> List[_Cell]:
    mode_list = check_names("modes", modes, TABLE_MODES, what="mode")
    scheme_list = check_names("schemes", schemes, TABLE_SCHEMES, what="scheme")
    view_list = check_names("views", views, TABLE_VIEWS, what="view")
    cells = []
    for view in view_list:
        for mode in mode_list:
            for scheme in [None] if mode == "sd" else scheme_list:
                w = {} if scheme is None else scheme_negatives(view, scheme)
                cells.append(_Cell(mode, scheme, view, w))
    return cells


def table2d_samples(
    prior_path: str | os.PathLike,
    *,
    identity: Optional[str] = None,
    modes: Sequence[str] = TABLE_MODES,
    schemes: Sequence[str] = TABLE_SCHEMES,
    views: Sequence[str] = ("side", "back"),
    n: int = 128,
    guidance_scale: float = 7.5,
    steps: int = 50,
    seed: int = 0,
    batch: int = 128,
    progress: bool = False,
) -> Tuple[List[Dict[str, Any]], List[str], List[Tensor]]:
    """The samples behind :func:`measure_table2d`: (cells, identity of each sample, samples).

    Each cell is ``{mode, scheme, view, negative_weights}``; its samples are ``[n, 3, R, R]`` in
    [0, 1], sample i from the same initial noise in every cell. Arguments as in
    :func:`measure_table2d`.
    """
    _check_common(n, steps, seed, batch, guidance_scale)
    cells = _table_cells(modes, schemes, views)
    prior = load_prior(prior_path)
    idents = _identities(prior.dataset, identity, n)
    samples = _run_cells(
        prior,
        cells,
        idents,
        guidance_scale=guidance_scale,
        steps=steps,
        seed=seed,
        batch=batch,
        progress=progress,
        desc="table2d",
    )
    info = [
        {"mode": c.mode, "scheme": c.scheme, "view": c.view, "negative_weights": dict(c.weights)}
        for c in cells
    ]
    return info, idents, samples


def _row(classifier: Any, cell: Dict[str, Any], idents: List[str], x: Tensor) -> Dict[str, Any]:
    pred = classifier.classify(x)
    views, ids = list(pred[0]), list(pred[2])
    counts: Dict[str, int] = {}
    for v in views:
        counts[v] = counts.get(v, 0) + 1
    n = len(views)
    successes = sum(v == cell["view"] for v in views)
    lo, hi = wilson_interval(successes, n)
    return {
        **cell,
        "n": n,
        "successes": successes,
        "identity_kept": sum(a == b for a, b in zip(ids, idents)),
        "rate": successes / n,
        "interval": [lo, hi],
        "view_counts": counts,
    }


def measure_table2d(
    prior_path: str | os.PathLike,
    classifier: Any,
    *,
    identity: Optional[str] = None,
    modes: Sequence[str] = TABLE_MODES,
    schemes: Sequence[str] = TABLE_SCHEMES,
    views: Sequence[str] = ("side", "back"),
    n: int = 128,
    guidance_scale: float = 7.5,
    steps: int = 50,
    seed: int = 0,
    batch: int = 128,
    progress: bool = False,
) -> List[Dict[str, Any]]:
    """View success of each mode × scheme × requested view on a testbed prior.

    Args:
        prior_path: a testbed prior folder (``testbed.json`` holds its dataset config).
        classifier: the testbed classifier (``classify(images) -> (views, view_probs,
            identities, identity_probs)``, :func:`~.classifier.load_classifier`).
        identity: the identity of every prompt; None: the dataset's identities in turn.
        modes: some of ``sd``, ``cebm``, ``perpneg`` (rows in this order within a view).
        schemes: view-negative weight schemes of ``cebm`` and ``perpneg`` (``sd`` has none).
        views: requested views, some of ``front``, ``side``, ``back``.
        n: samples per row.
        guidance_scale: s (diffusers convention).
        steps: DDIM steps.
        seed: seed of the initial noise, shared by every row (paired comparison).
        batch: samples per UNet call (each call has ``batch × (2 + negatives)`` rows).
        progress: a tqdm bar over the UNet batches.

    Returns:
        One dict per row, views outer, then modes, then schemes: ``mode``, ``scheme`` (None for
        ``sd``), ``view``, ``negative_weights`` ({view: w}, empty for ``sd``), ``n``,
        ``successes`` (classified view == requested view), ``identity_kept`` (classified as the
        prompt's identity), ``rate``, ``interval`` ([lo, hi], 95 % Wilson), ``view_counts``
        ({classified view: count}, summing to n; ``none`` for rejects).
    """
    cells, idents, samples = table2d_samples(
        prior_path,
        identity=identity,
        modes=modes,
        schemes=schemes,
        views=views,
        n=n,
        guidance_scale=guidance_scale,
        steps=steps,
        seed=seed,
        batch=batch,
        progress=progress,
    )
    return [_row(classifier, c, idents, x) for c, x in zip(cells, samples)]


def _curve_cells(
    modes: Sequence[str], view: str, weights: Sequence[float], negative_views: Sequence[str]
) -> List[_Cell]:
    mode_list = check_names("modes", modes, CURVE_MODES, what="mode")
    if view not in TABLE_VIEWS:
        raise ValueError(f"view: unknown view {view!r}, expected one of {TABLE_VIEWS}")
    negs = check_names("negative_views", negative_views, TABLE_VIEWS, what="view")
    if view in negs:
        raise ValueError(f"negative_views: {negs} include the requested view {view!r}")
    if isinstance(weights, (str, bytes)) or not list(weights):
        raise ValueError(f"weights: expected a non-empty sequence of numbers, got {weights!r}")
    ws = [check_float(f"weights[{i}]", w, hi=0.0) for i, w in enumerate(weights)]
    return [_Cell(mode, None, view, {v: w for v in negs}) for mode in mode_list for w in ws]


def curve_samples(
    prior_path: str | os.PathLike,
    *,
    identity: Optional[str] = None,
    view: str = "back",
    weights: Sequence[float] = CURVE_WEIGHTS,
    negative_views: Optional[Sequence[str]] = None,
    modes: Sequence[str] = CURVE_MODES,
    n: int = 128,
    guidance_scale: float = 7.5,
    steps: int = 50,
    seed: int = 0,
    batch: int = 128,
    progress: bool = False,
) -> Tuple[List[Dict[str, Any]], List[str], List[Tensor]]:
    """The samples behind :func:`negative_weight_curve`: (cells, identities, samples)."""
    _check_common(n, steps, seed, batch, guidance_scale)
    negs = list(negative_views) if negative_views is not None else _default_negatives(view)
    cells = _curve_cells(modes, view, weights, negs)
    prior = load_prior(prior_path)
    idents = _identities(prior.dataset, identity, n)
    samples = _run_cells(
        prior,
        cells,
        idents,
        guidance_scale=guidance_scale,
        steps=steps,
        seed=seed,
        batch=batch,
        progress=progress,
        desc="negative-weight curve",
    )
    info = [
        {
            "mode": c.mode,
            "weight": next(iter(c.weights.values())),
            "view": c.view,
            "negative_views": list(c.weights),
        }
        for c in cells
    ]
    return info, idents, samples


def _default_negatives(view: Any) -> List[str]:
    return ["back"] if view == "front" else ["front"]


def negative_weight_curve(
    prior_path: str | os.PathLike,
    classifier: Any,
    *,
    identity: Optional[str] = None,
    view: str = "back",
    weights: Sequence[float] = CURVE_WEIGHTS,
    negative_views: Optional[Sequence[str]] = None,
    modes: Sequence[str] = CURVE_MODES,
    n: int = 128,
    guidance_scale: float = 7.5,
    steps: int = 50,
    seed: int = 0,
    batch: int = 128,
    progress: bool = False,
) -> List[Dict[str, Any]]:
    """View success against one global negative weight w on the other views' prompts.

    For the requested ``view`` the positive is its view prompt and every prompt of
    ``negative_views`` (default: the front view's, or the back view's for ``view="front"``) is a
    negative with weight w, combined per mode as in :func:`measure_table2d` (``cebm``: no
    projection, ``perpneg``: perpendicular). At w = 0 every mode is plain CFG on the view prompt
    (the zero-weight rows are never evaluated), i.e. the table's ``sd`` row; all weights and
    modes share the initial noise.

    Args:
        weights: the weights w (each ≤ 0), one row per mode × weight.
        negative_views: the negative views (not the requested one).
        Others as in :func:`measure_table2d`.

    Returns:
        One dict per mode × weight (modes outer): ``mode``, ``weight``, ``view``,
        ``negative_views``, ``n``, ``successes``, ``rate``, ``interval`` (95 % Wilson),
        ``identity_kept``, ``view_counts``.
    """
    cells, idents, samples = curve_samples(
        prior_path,
        identity=identity,
        view=view,
        weights=weights,
        negative_views=negative_views,
        modes=modes,
        n=n,
        guidance_scale=guidance_scale,
        steps=steps,
        seed=seed,
        batch=batch,
        progress=progress,
    )
    return [_row(classifier, c, idents, x) for c, x in zip(cells, samples)]


def plot_negative_weight_curve(
    rows: Sequence[Dict[str, Any]], path: str | os.PathLike, *, title: str = ""
) -> Path:
    """Success rate against the negative weight, one line per mode with its 95 % Wilson band;
    a PNG written atomically (matplotlib's Agg backend). Returns ``path``.

    Raises:
        ImportError: matplotlib is missing (in the clone: ``pip install -e '.[eval]'``).
        ValueError: ``rows`` is empty or a row lacks ``mode`` / ``weight`` / ``rate`` /
            ``interval``.
    """
    if not rows:
        raise ValueError("rows: expected the rows of negative_weight_curve, got none")
    for i, r in enumerate(rows):
        missing = [k for k in ("mode", "weight", "rate", "interval") if k not in r]
        if missing:
            raise ValueError(f"rows[{i}]: missing key(s) {missing}")
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "negative-weight curve: matplotlib is needed for the plot (in the clone: "
            "pip install -e '.[eval]')"
        ) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..common.io import atomic_write

    out = Path(path)
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=110)
    for mode in dict.fromkeys(r["mode"] for r in rows):
        pts = sorted((float(r["weight"]), r) for r in rows if r["mode"] == mode)
        xs = [w for w, _ in pts]
        ax.plot(xs, [r["rate"] for _, r in pts], marker="o", lw=1.4, label=mode)
        ax.fill_between(
            xs, [r["interval"][0] for _, r in pts], [r["interval"][1] for _, r in pts], alpha=0.2
        )
    view = rows[0].get("view", "")
    ax.set_xlabel("negative weight w")
    ax.set_ylabel(f"{view} view success" if view else "view success")
    ax.set_ylim(0.0, 1.0)
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return out
