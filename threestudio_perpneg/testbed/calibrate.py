"""``testbed calibrate``: the vanilla Janus rate against the view-phrase reliability of the captions.

The shipped prior is trained with a different view-phrase reliability per identity
(``DatasetConfig.identity_view_phrase_matrix``), so one prior holds the whole sweep. For each
identity this measures, with the problem's rows only (never a Perp-Neg row):

* the 2D prior bias (front fraction without view words, back / side success with plain CFG);
* the 3D ``noview`` and ``vanilla`` (view-dependent prompts, DreamFusion) rows: Janus count and
  front kept over the same seeds;

and writes ``DIR/calibration.json`` and ``DIR/calibration.png`` (vanilla and no-view Janus rate
with 95 % Wilson intervals, and the 2D back success, against how often a "back view" caption of
that identity shows a back).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from .bench import GUIDANCE_2D, rounded_interval
from .protocol3d import Protocol3DConfig
from .table3d import MethodSpec

__all__ = ["phrase_reliability", "run_calibration", "plot_calibration"]

PathLike = Union[str, Path]

CALIBRATION_METHODS = (MethodSpec("noview", 4), MethodSpec("vanilla", 4))


def phrase_reliability(dataset: Any, identity: str, view: str = "back") -> float:
    """P(true view = ``view`` | caption says ``view``) for ``identity``'s captions (Bayes rule)."""
    from .dataset import p_view_given_phrase

    return p_view_given_phrase(dataset, view, identity)


def run_calibration(
    out: PathLike,
    *,
    prior_path: Optional[PathLike] = None,
    classifier_path: Optional[PathLike] = None,
    seeds: int = 16,
    steps3d: int = 400,
    n2d: int = 128,
    ddim_steps: int = 50,
    guidance2d: float = GUIDANCE_2D,
    identities: Optional[Sequence[str]] = None,
    base: Optional[Protocol3DConfig] = None,
    progress: bool = True,
    echo: Callable[[str], Any] = print,
) -> Dict[str, Any]:
    """Measure every identity's bias and no-view / vanilla 3D rows; write the JSON and the plot.

    ``guidance2d`` is the CFG scale of the bias samples (the bench's, :class:`.bench.BenchConfig`);
    the 3D rows use :meth:`.protocol3d.Protocol3DConfig.testbed_default` unless ``base`` is given.
    """
    from ..commands.common import versions
    from ..common.io import output_folder, write_json_atomic
    from .classifier import load_classifier
    from .dataset import DatasetConfig
    from .prior import load_prior_path, load_testbed_config
    from .protocol2d import bias_summary, measure_prior_bias
    from .table3d import run_table3d

    folder = output_folder("out", out)
    prior = str(prior_path or load_prior_path())
    dataset = DatasetConfig.from_dict(load_testbed_config(prior)["dataset"])
    names = list(identities or dataset.identities)
    classifier = load_classifier(classifier_path)
    base = base or Protocol3DConfig.testbed_default(steps3d)
    t0 = time.time()
    points: List[Dict[str, Any]] = []
    for ident in names:
        cells, _ = measure_prior_bias(
            prior,
            classifier,
            n=n2d,
            guidance_scale=guidance2d,
            steps=ddim_steps,
            identities=[ident],
            progress=progress,
        )
        bias = bias_summary(cells)
        rows, _ = run_table3d(
            prior,
            classifier,
            list(range(seeds)),
            methods=CALIBRATION_METHODS,
            base=base,
            identities=[ident],
            progress=progress,
        )
        point: Dict[str, Any] = {
            "identity": ident,
            "back_phrase_reliability": round(phrase_reliability(dataset, ident), 4),
            "side_phrase_reliability": round(phrase_reliability(dataset, ident, "side"), 4),
            "phrase_matrix": dataset.phrase_matrix(ident),
            "front_fraction_noview": bias["front_fraction_noview"],
            "back_success_cfg": bias["back_success_cfg"],
            "side_success_cfg": bias["side_success_cfg"],
        }
        for row in rows:
            key = row["method"]
            point[f"{key}_janus"] = row["janus"]
            point[f"{key}_front_kept"] = row["front_kept"]
            point[f"{key}_seeds"] = row["seeds"]
            point[f"{key}_janus_ci95"] = rounded_interval(row["janus"], row["seeds"])
            point[f"{key}_view_accuracy"] = row["view_accuracy"]
        points.append(point)
        echo(
            f"{ident:<8} P(back | 'back view') {point['back_phrase_reliability']:.2f}  "
            f"front noview {point['front_fraction_noview']:.2f}  back cfg "
            f"{point['back_success_cfg']:.2f}  Janus noview {point['noview_janus']}/{seeds} "
            f"vanilla {point['vanilla_janus']}/{seeds} (front kept {point['vanilla_front_kept']})"
        )
    report = {
        "rows_used": "noview and vanilla only (no Perp-Neg row is measured or used)",
        "points": points,
        "settings": {
            "prior": prior,
            "seeds": seeds,
            "n2d": n2d,
            "ddim_steps": ddim_steps,
            "guidance2d": guidance2d,
            "protocol3d": base.to_dict(),
            "seconds": round(time.time() - t0, 1),
            "versions": versions(),
        },
    }
    write_json_atomic(folder / "calibration.json", report, allow_nan=True)
    plot_calibration(points, folder / "calibration.png")
    return report


def plot_calibration(points: Sequence[Dict[str, Any]], path: PathLike) -> None:
    """Janus rates (with intervals) and 2D back success against the back-phrase reliability."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "calibration.png: matplotlib is needed for the plot (in the clone: "
            "pip install -e '.[eval]')"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..common.io import atomic_write

    pts = sorted(points, key=lambda p: p["back_phrase_reliability"])
    x = [p["back_phrase_reliability"] for p in pts]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
    for key, label, colour in (
        ("vanilla", "vanilla SDS (view prompts): Janus", "tab:red"),
        ("noview", "no view words: Janus", "tab:grey"),
    ):
        rate = [p[f"{key}_janus"] / p[f"{key}_seeds"] for p in pts]
        lo = [p[f"{key}_janus_ci95"][0] for p in pts]
        hi = [p[f"{key}_janus_ci95"][1] for p in pts]
        ax.plot(x, rate, "o-", color=colour, label=label)
        ax.fill_between(x, lo, hi, color=colour, alpha=0.15)
    ax.plot(
        x,
        [p["back_success_cfg"] for p in pts],
        "s--",
        color="tab:blue",
        label="2D back success (CFG)",
    )
    for p in pts:
        ax.annotate(p["identity"], (p["back_phrase_reliability"], 1.02), ha="center", fontsize=7)
    ax.set_xlabel('P(back | caption says "back view")')
    ax.set_ylabel("rate")
    ax.set_ylim(-0.02, 1.08)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
