"""``testbed sweep``: Perp-Neg measured along a sweep of the prior's view knowledge (issue 17).

One prior per level of view-phrase reliability (:mod:`.levels`: same renders, only the captions
differ). Every level is measured with the same settings:

* ``bias``: plain-CFG DDIM samples of the bench identity (front fraction without view words,
  back/side success with them), as ``testbed bench``;
* ``sanity``: ``sds2d_front`` (2D SDS on a free image with the front-view prompt: read front and
  the right identity) and ``front_cameras_3d`` (3D SDS, plain prompt, cameras within ±30° of the
  front: front kept). Neither involves a Perp-Neg row; if they fail, the level's 3D rows mean
  nothing;
* ``sds2d_views``: 2D SDS with the back-view and side-view prompts (the cheapest view of Janus:
  an inert prior draws a front for every prompt);
* ``table2d``: sd / cebm / perpneg × both schemes × side and back (DDIM at CFG 3);
* ``table3d``: the 3D methods at batch 4 (and threestudio's built-in and batch 1 at the middle
  levels), Janus and front kept with Wilson intervals, view accuracy, identity kept, UNet rows;
* ``projection``: ‖⊥(Δ_front, Δ_pos)‖ / ‖Δ_pos‖ on back cameras at t = 200, 500, 800.

The pre-declared hypothesis is evaluated on the 3D rows (:func:`evaluate_hypothesis`), and the
pictures are drawn by :mod:`.sweep_plots`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from .levels import LEVEL_NAMES, Level, parse_levels
from .table3d import MethodSpec

__all__ = [
    "SweepConfig",
    "SWEEP_METHODS",
    "MIDDLE_METHODS",
    "default_priors_dir",
    "level_prior",
    "sharp_priors_dir",
    "evaluate_hypothesis",
    "is_middle",
    "run_level_table3d",
    "run_sweep",
    "write_rings",
]

PathLike = Union[str, Path]

#: Rows of every level at batch 4 (16 seeds in the full sweep).
SWEEP_METHODS = (
    MethodSpec("noview", 4),
    MethodSpec("vanilla", 4),
    MethodSpec("ours", 4, "threestudio"),
    MethodSpec("ours", 4, "authors"),
    MethodSpec("ours", 4, "threestudio", (("perp_neg_sampling", "one"),)),
)
#: Extra rows of the middle levels (8 seeds in the full sweep).
MIDDLE_METHODS = (
    MethodSpec("threestudio-builtin", 4, "threestudio"),
    MethodSpec("vanilla", 1),
    MethodSpec("ours", 1, "threestudio"),
)

#: The hypothesis, declared before any level was measured (issue 17).
HYPOTHESIS = (
    "at some level where vanilla's Janus rate is >= 0.5, ours (either scheme) lowers it by "
    ">= 0.3 while keeping the front within 0.1 of vanilla"
)


@dataclass(frozen=True)
class SweepConfig:
    """Sizes and settings of one sweep (``--quick`` shrinks the sizes, never the settings).

    Args:
        seeds: 3D objects per batch-4 row (seeds ``first_seed ..``). Full 16, quick 2.
        seeds_middle: objects per middle-level extra row. Full 8, quick 2.
        first_seed: first 3D seed (the sweep's other seeds follow). Default 0.
        steps3d: SDS steps per 3D object. Full 600, quick 60.
        n2d: samples per 2D DDIM cell (bias, table2d). Full 64, quick 8.
        ddim_steps: DDIM steps of the 2D samples. Full 25, quick 8.
        n_sds2d: free images per 2D SDS cell (sanity and view knowledge). Full 16, quick 2.
        sds2d_steps: Adam steps of 2D SDS. Full 600, quick 60.
        n_projection: back views per projection timestep. Full 32, quick 4.
        identity: the prompted identity. Default troll (the bench identity).
        guidance2d: CFG scale of the 2D DDIM samples (3, as the bench).
    """

    seeds: int = 16
    seeds_middle: int = 8
    first_seed: int = 0
    steps3d: int = 600
    n2d: int = 64
    ddim_steps: int = 25
    n_sds2d: int = 16
    sds2d_steps: int = 600
    n_projection: int = 32
    identity: str = "troll"
    guidance2d: float = 3.0

    @classmethod
    def quick(cls, **overrides: Any) -> SweepConfig:
        small = cls(
            seeds=2,
            seeds_middle=2,
            steps3d=60,
            n2d=8,
            ddim_steps=8,
            n_sds2d=2,
            sds2d_steps=60,
            n_projection=4,
        )
        return replace(small, **overrides)


def default_priors_dir() -> Path:
    """Where a clone keeps the shipped level priors (``benchmarks/results/testbed-sweep/priors``)."""
    return (
        Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "testbed-sweep" / "priors"
    )


def sharp_priors_dir() -> Path:
    """Where a clone keeps the sharper (6000-step) family (``benchmarks/results/testbed-sweep-6000/priors``;
    its p35 lives in the package, :data:`~.levels.SHIPPED_SHARP_PRIORS`, see :func:`level_prior`)."""
    return default_priors_dir().parents[1] / "testbed-sweep-6000" / "priors"


def _is_prior(folder: Path) -> bool:
    return (folder / "unet").is_dir() and (folder / "testbed.json").is_file()


def level_prior(priors: PathLike, level: Level) -> Path:
    """The level's prior folder under ``priors``, or ``FileNotFoundError`` naming the fix.

    A level the package ships (the sharper family's p35) is found in the package when ``priors``
    is the sharper family's folder of a clone: the repository keeps one copy of it.
    """
    from .levels import SHIPPED_SHARP_PRIORS

    folder = Path(priors) / level.name
    shipped = SHIPPED_SHARP_PRIORS / level.name
    if not _is_prior(folder) and _is_prior(shipped) and _same_folder(priors, sharp_priors_dir()):
        folder = shipped
    if not _is_prior(folder):
        raise FileNotFoundError(
            f"--priors: no prior for level {level.name!r} in {folder} (train the family with "
            f"'python -m threestudio_perpneg testbed train-levels --out {Path(priors)}')"
        )
    return folder


def _same_folder(a: PathLike, b: PathLike) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _sds2d_cells(
    prior: str, engine: Any, classifier: Any, cfg: SweepConfig, views: Sequence[str]
) -> Dict[str, Any]:
    from ..core.text import text_embeddings
    from .dataset import DatasetConfig, base_prompt, view_prompt
    from .prior import load_testbed_config
    from .sds2d import SDS2DConfig, run_sds2d, sds2d_success

    dataset = DatasetConfig.from_dict(load_testbed_config(prior)["dataset"])
    prompt = base_prompt(dataset, cfg.identity)
    seeds = list(range(cfg.first_seed, cfg.first_seed + cfg.n_sds2d))
    out: Dict[str, Any] = {}
    for view in views:
        text = view_prompt(prompt, view)
        emb = text_embeddings(prior, [text, ""], None, use_cache=False)
        res = run_sds2d(
            engine, emb[text], emb[""], seeds, classifier, SDS2DConfig(steps=cfg.sds2d_steps)
        )
        ok, n = sds2d_success(res, view, cfg.identity if view == "front" else None)
        counts: Dict[str, int] = {}
        for v in res.views:
            counts[v] = counts.get(v, 0) + 1
        out[view] = {"successes": ok, "n": n, "view_counts": counts, "images": res.images}
    return out


def evaluate_hypothesis(levels: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Whether the pre-declared hypothesis holds, and at which levels (batch-4 rows).

    Holds at a level when vanilla's Janus rate is >= 0.5 and, for ours with either scheme
    (``all`` negatives), Janus rate <= vanilla's − 0.3 and front-kept rate >= vanilla's − 0.1.
    """
    holds_at: List[str] = []
    detail: List[Dict[str, Any]] = []
    for lv in levels:
        rows = {
            (r["method"], r["batch"], r["scheme"], bool(r["controls"])): r for r in lv["table3d"]
        }
        van = rows.get(("vanilla", 4, None, False))
        if van is None:
            continue
        v_j, v_f = van["janus"] / van["seeds"], van["front_kept"] / van["seeds"]
        for scheme in ("threestudio", "authors"):
            ours = rows.get(("ours", 4, scheme, False))
            if ours is None:
                continue
            o_j, o_f = ours["janus"] / ours["seeds"], ours["front_kept"] / ours["seeds"]
            ok = v_j >= 0.5 and o_j <= v_j - 0.3 and o_f >= v_f - 0.1
            detail.append(
                {
                    "level": lv["name"],
                    "scheme": scheme,
                    "vanilla_janus": round(v_j, 4),
                    "ours_janus": round(o_j, 4),
                    "vanilla_front_kept": round(v_f, 4),
                    "ours_front_kept": round(o_f, 4),
                    "holds": ok,
                }
            )
            if ok and lv["name"] not in holds_at:
                holds_at.append(lv["name"])
    return {"holds": bool(holds_at), "levels": holds_at, "text": HYPOTHESIS, "detail": detail}


def is_middle(level: Level) -> bool:
    """Whether ``level`` lies strictly inside the family (not p15 or p80): it adds MIDDLE_METHODS."""
    return level.name in LEVEL_NAMES[1:-1]


def run_level_table3d(
    level: Level, prior: str, classifier: Any, cfg: SweepConfig, *, progress: bool = True
) -> Any:
    """A level's 3D rows and objects: SWEEP_METHODS on ``cfg.seeds`` seeds and, at a middle
    level, MIDDLE_METHODS on ``cfg.seeds_middle``; returns ``(rows, results)`` as ``run_table3d``."""
    from .protocol3d import Protocol3DConfig
    from .table3d import run_table3d

    base = Protocol3DConfig.testbed_default(cfg.steps3d)
    seeds = list(range(cfg.first_seed, cfg.first_seed + cfg.seeds))
    rows, results = run_table3d(
        prior,
        classifier,
        seeds,
        methods=SWEEP_METHODS,
        base=base,
        identities=[cfg.identity],
        progress=progress,
    )
    if is_middle(level):
        extra_seeds = list(range(cfg.first_seed, cfg.first_seed + cfg.seeds_middle))
        more, more_results = run_table3d(
            prior,
            classifier,
            extra_seeds,
            methods=MIDDLE_METHODS,
            base=base,
            identities=[cfg.identity],
            progress=progress,
        )
        rows += more
        results.update(more_results)
    return rows, results


def write_rings(folder: Path, level: Level, prior: str, results: Any, cfg: SweepConfig) -> Path:
    """``folder/rings_<level>.png``: three seeds of every row under the identity's clean head."""
    from .protocol3d import Protocol3DConfig
    from .table3d import reference_ring, save_rings

    base = Protocol3DConfig.testbed_default(cfg.steps3d)
    reference = reference_ring(prior, cfg.identity, base)
    return save_rings(folder / f"rings_{level.name}.png", results, max_seeds=3, reference=reference)


def run_level(
    level: Level,
    prior: str,
    classifier: Any,
    cfg: SweepConfig,
    *,
    folder: Path,
    progress: bool = True,
    echo: Callable[[str], Any] = print,
) -> Dict[str, Any]:
    """Every measurement of one level (see the module docstring); writes ``rings_<level>.png``."""
    from ..engines.pixel import PerpNegIFEngine, load_deepfloyd_if
    from .bench import add_intervals, format_bias, format_table2d, format_table3d, rounded_interval
    from .projection import projection_ratios
    from .protocol2d import bias_summary, measure_prior_bias
    from .protocol3d import Protocol3DConfig
    from .table2d import measure_table2d
    from .table3d import run_table3d

    t0 = time.time()
    engine = PerpNegIFEngine(*load_deepfloyd_if(prior))
    seconds: Dict[str, float] = {}
    cells, _ = measure_prior_bias(
        prior,
        classifier,
        n=cfg.n2d,
        guidance_scale=cfg.guidance2d,
        steps=cfg.ddim_steps,
        seed=cfg.first_seed,
        identities=[cfg.identity],
        progress=progress,
    )
    bias = bias_summary(cells)
    echo(f"[{level.name}] " + format_bias(bias))
    seconds["bias"] = time.time() - t0

    t = time.time()
    sds = _sds2d_cells(prior, engine, classifier, cfg, ("front", "back", "side"))
    front_cams = Protocol3DConfig.testbed_default(cfg.steps3d, azimuth_range_deg=(-30.0, 30.0))
    seeds = list(range(cfg.first_seed, cfg.first_seed + cfg.seeds))
    sanity_rows, _ = run_table3d(
        prior,
        classifier,
        seeds,
        methods=[MethodSpec("noview", 4)],
        base=front_cams,
        identities=[cfg.identity],
        progress=progress,
    )
    sanity = {
        "sds2d_front": [sds["front"]["successes"], sds["front"]["n"]],
        "front_cameras_3d": [sanity_rows[0]["front_kept"], sanity_rows[0]["seeds"]],
    }
    sds2d_views = {
        v: {
            "successes": sds[v]["successes"],
            "n": sds[v]["n"],
            "interval": rounded_interval(sds[v]["successes"], sds[v]["n"]),
            "view_counts": sds[v]["view_counts"],
        }
        for v in ("back", "side")
    }
    echo(
        f"[{level.name}] sanity: 2D SDS front {sanity['sds2d_front']}, 3D front cameras "
        f"{sanity['front_cameras_3d']}; 2D SDS back {sds2d_views['back']['successes']}/"
        f"{sds2d_views['back']['n']}, side {sds2d_views['side']['successes']}/{sds2d_views['side']['n']}"
    )
    seconds["sanity_sds2d"] = time.time() - t

    t = time.time()
    table2d = measure_table2d(
        prior,
        classifier,
        identity=cfg.identity,
        n=cfg.n2d,
        guidance_scale=cfg.guidance2d,
        steps=cfg.ddim_steps,
        seed=cfg.first_seed,
        progress=progress,
    )
    echo(format_table2d(table2d))
    seconds["table2d"] = time.time() - t

    t = time.time()
    rows, results = run_level_table3d(level, prior, classifier, cfg, progress=progress)
    add_intervals(rows)
    echo(format_table3d(rows))
    write_rings(folder, level, prior, results, cfg)
    seconds["table3d"] = time.time() - t

    t = time.time()
    projection = projection_ratios(
        prior, cfg.identity, n=cfg.n_projection, seed=cfg.first_seed, engine=engine
    )
    seconds["projection"] = time.time() - t
    echo(
        f"[{level.name}] |perp(d_front, d_pos)| / |d_pos|: "
        + ", ".join(f"t={r['t']}: {r['perp_over_pos']:.3f}" for r in projection)
    )
    seconds["total"] = time.time() - t0
    return {
        "name": level.name,
        "error": level.error,
        "p_back_given_back_phrase": round(level.p_back(), 4),
        "p_side_given_side_phrase": round(level.p_side(), 4),
        "prior": str(prior),
        "bias": bias,
        "sanity": sanity,
        "sds2d_views": sds2d_views,
        "table2d": table2d,
        "table3d": rows,
        "projection": projection,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }


def run_sweep(
    out: PathLike,
    config: Optional[SweepConfig] = None,
    *,
    levels: Optional[Sequence[str]] = None,
    priors: Optional[PathLike] = None,
    classifier_path: Optional[PathLike] = None,
    progress: bool = True,
    echo: Callable[[str], Any] = print,
    jobs: int = 1,
) -> Dict[str, Any]:
    """Measure every level and write ``out/sweep.json``, ``sweep.png``, ``sweep2d.png`` and rings.

    Args:
        out: output folder (created; a file in its place raises ``ValueError``).
        config: sizes (default the full :class:`SweepConfig`).
        levels: level names (default all of :data:`.levels.LEVELS`).
        priors: folder holding one prior folder per level (default :func:`default_priors_dir`).
        classifier_path: a testbed classifier folder (default the shipped one).
        jobs: levels measured at once, each in its own process with one torch thread (the
            results are the same as with one job; the workers print their tables unprefixed).
    """
    from ..commands.common import versions
    from ..common.io import output_folder
    from .classifier import load_classifier

    config = config or SweepConfig()
    chosen = parse_levels(levels)
    priors = Path(priors) if priors is not None else default_priors_dir()
    folders = {lv.name: level_prior(priors, lv) for lv in chosen}  # fail before measuring
    folder = output_folder("out", out)
    classifier = load_classifier(classifier_path)
    t0 = time.time()
    args = [(lv.name, str(folders[lv.name]), classifier_path, config, folder) for lv in chosen]
    if jobs <= 1 or len(args) == 1:
        measured = [
            run_level(
                parse_levels([a[0]])[0],
                a[1],
                classifier,
                config,
                folder=folder,
                progress=progress,
                echo=echo,
            )
            for a in args
        ]
    else:  # one process per level, one torch thread each (a 2-core machine runs two at once)
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            measured = list(pool.map(_level_job, args))
    hypothesis = evaluate_hypothesis(measured)
    report: Dict[str, Any] = {
        "levels": measured,
        "classifier": classifier_summary(classifier_path),
        "hypothesis": hypothesis,
        "settings": {
            "sweep": asdict(config),
            "levels": [lv.name for lv in chosen],
            "priors": str(priors),
            "classifier": str(classifier_path or "shipped"),
            "protocol3d": _protocol_settings(config),
            "seconds": round(time.time() - t0, 1),
            "versions": versions(),
        },
    }
    _write_report(folder, report, echo)
    echo(f"wrote {folder / 'sweep.json'} and the pictures in {time.time() - t0:.0f} s")
    return report


def _write_report(folder: Path, report: Dict[str, Any], echo: Callable[[str], Any]) -> None:
    """``sweep.json``, ``sweep.png`` and ``sweep2d.png`` of a report, and the verdict echoed."""
    from ..common.io import write_json_atomic
    from .sweep_plots import plot_sweep, plot_sweep2d

    write_json_atomic(folder / "sweep.json", report, allow_nan=True)
    plot_sweep(report["levels"], folder / "sweep.png")
    plot_sweep2d(report["levels"], folder / "sweep2d.png")
    hypothesis = report["hypothesis"]
    verdict = "holds" if hypothesis["holds"] else "does not hold"
    where = f" at {', '.join(hypothesis['levels'])}" if hypothesis["levels"] else ""
    echo(f"hypothesis {verdict}{where}: {HYPOTHESIS}")


def _level_job(args: Any) -> Dict[str, Any]:
    """One level in a worker process (``run_sweep(jobs > 1)``)."""
    import torch

    from .classifier import load_classifier

    name, prior, classifier_path, config, folder = args
    torch.set_num_threads(1)
    return run_level(
        parse_levels([name])[0],
        prior,
        load_classifier(classifier_path),
        config,
        folder=folder,
        progress=False,
    )


def _protocol_settings(config: SweepConfig) -> Dict[str, Any]:
    from .protocol3d import Protocol3DConfig

    return Protocol3DConfig.testbed_default(config.steps3d).to_dict()


def classifier_summary(path: Optional[PathLike] = None) -> Dict[str, Any]:
    """``clean_view_accuracy``, ``hard_negative_none_rate``, ``n_clean``, ``n_hard`` of a classifier."""
    from ..common.io import read_json
    from .classifier import classifier_path

    folder = Path(path) if path is not None else classifier_path()
    metrics = read_json(folder / "metrics.json")
    keys = ("clean_view_accuracy", "hard_negative_none_rate", "n_clean", "n_hard")
    held = metrics.get("held_out_summary", {})
    return {k: held.get(k) for k in keys}
