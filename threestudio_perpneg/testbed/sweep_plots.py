"""Pictures of the view-knowledge sweep: 3D rates and 2D view success against P(back | "back view")."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple, Union

__all__ = ["plot_sweep", "plot_sweep2d"]

PathLike = Union[str, Path]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "sweep.png: matplotlib is needed for the sweep pictures (in the clone: "
            "pip install -e '.[eval]')"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: PathLike) -> None:
    from ..common.io import atomic_write

    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png"))


def _series(
    levels: Sequence[Dict[str, Any]], key: str, batch: int = 4
) -> Dict[str, List[Tuple[float, float, float, float]]]:
    """label -> [(p_back, rate, lo, hi)] for the 3D rows of one batch size."""
    out: Dict[str, List[Tuple[float, float, float, float]]] = {}
    for lv in levels:
        x = float(lv["p_back_given_back_phrase"])
        for row in lv["table3d"]:
            if row["batch"] != batch:
                continue
            lo, hi = row[f"{key}_ci95"]
            out.setdefault(row["label"], []).append((x, row[key] / row["seeds"], lo, hi))
    return out


def plot_sweep(levels: Sequence[Dict[str, Any]], path: PathLike) -> None:
    """``sweep.png``: Janus rate and front kept against P(back | "back view"), batch 4, 95 % bands."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110, sharex=True)
    for ax, key, title in (
        (axes[0], "janus", "Janus rate (3D, batch 4)"),
        (axes[1], "front_kept", "front kept (3D, batch 4)"),
    ):
        for label, pts in _series(levels, key).items():
            pts = sorted(pts)
            xs = [p[0] for p in pts]
            (line,) = ax.plot(xs, [p[1] for p in pts], marker="o", lw=1.4, label=label)
            ax.fill_between(
                xs, [p[2] for p in pts], [p[3] for p in pts], color=line.get_color(), alpha=0.12
            )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel('P(back | caption says "back view")')
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"Perp-Neg along the prior's view knowledge ({_seeds_title(levels)})", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _seeds_title(levels: Sequence[Dict[str, Any]]) -> str:
    """``"16 seeds per point"``, or the seeds of each level's batch-4 rows when they differ
    (a merged sweep may hold levels measured at other sizes)."""
    per = [(lv["name"], lv["table3d"][0]["seeds"]) for lv in levels if lv["table3d"]]
    if len({n for _, n in per}) <= 1:
        return f"{per[0][1] if per else 0} seeds per point"
    return "seeds per point: " + ", ".join(f"{name} {n}" for name, n in per)


def plot_sweep2d(levels: Sequence[Dict[str, Any]], path: PathLike) -> None:
    """``sweep2d.png``: 2D back / side success against P(back | "back view"), per mode, 95 % bands.

    DDIM rows of the 2D table (sd, cebm, perpneg; solid = threestudio scheme, dashed = authors)
    and 2D SDS on a free image (dotted, plain CFG on the view prompt).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110, sharex=True)
    for ax, view in zip(axes, ("back", "side")):
        series: Dict[str, List[Tuple[float, float, float, float]]] = {}
        for lv in levels:
            x = float(lv["p_back_given_back_phrase"])
            for row in lv["table2d"]:
                if row["view"] != view:
                    continue
                label = row["mode"] + (f"/{row['scheme']}" if row["scheme"] else "")
                lo, hi = row["interval"]
                series.setdefault(label, []).append((x, row["rate"], lo, hi))
            cell = lv.get("sds2d_views", {}).get(view)
            if cell:
                lo, hi = cell["interval"]
                rate = cell["successes"] / max(cell["n"], 1)
                series.setdefault("2D SDS", []).append((x, rate, lo, hi))
        for label, pts in series.items():
            pts = sorted(pts)
            xs = [p[0] for p in pts]
            style = ":" if label == "2D SDS" else ("--" if label.endswith("/authors") else "-")
            (line,) = ax.plot(xs, [p[1] for p in pts], style, marker="o", lw=1.3, label=label)
            ax.fill_between(
                xs, [p[2] for p in pts], [p[3] for p in pts], color=line.get_color(), alpha=0.1
            )
        ax.set_title(f"2D {view}-view success", fontsize=10)
        ax.set_xlabel('P(back | caption says "back view")')
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
