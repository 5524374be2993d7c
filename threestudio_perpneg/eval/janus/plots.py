"""Plots of the Janus evaluator (matplotlib, Agg canvas; imported lazily by
:func:`threestudio_perpneg.eval.janus.report.write_reports`).

* :func:`plot_object`: a strip plot over azimuth (−180..180, front at 0) with a row of thumbnails,
  the camera's bucket and the predicted label as coloured strips (front-at-back frames marked), and
  the classifier's scores per label.
* :func:`plot_summary`: view accuracy per object (Janus objects in red) with the mean and its
  confidence interval, and the Janus rate with its interval.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Union

from ...common.io import atomic_write

if TYPE_CHECKING:
    from .metrics import ObjectReport

__all__ = ["VIEW_COLORS", "plot_object", "plot_summary"]

VIEW_COLORS: Dict[str, str] = {
    "front": "#d62728",
    "side": "#2ca02c",
    "back": "#1f77b4",
    "overhead": "#9467bd",
    "none": "#7f7f7f",
}


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Union[str, Path]) -> Path:
    """The figure as a PNG at ``path``, written atomically."""
    out = Path(path)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    return out


def _thumbnail(frame: Mapping[str, Any], size: int) -> Any:
    from PIL import Image

    with Image.open(frame["file"]) as im:
        image = im.convert("RGB")
    crop = frame.get("crop_width")
    if crop and image.width > crop:
        image = image.crop((0, 0, crop, image.height))
    image.thumbnail((size, size))
    return image


def _spacing(az: Sequence[float]) -> float:
    if len(az) < 2:
        return 10.0
    gaps = [b - a for a, b in zip(az, az[1:]) if b - a > 1e-9]
    return min(gaps) if gaps else 10.0


def plot_object(
    report: ObjectReport, path: Union[str, Path], *, thumbnails: int = 8, thumb_size: int = 128
) -> Path:
    """Strip plot of one object's labels and scores over azimuth; returns ``path``."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    frames = sorted(
        (f for f in report.frames if not f["duplicate"]), key=lambda f: f["azimuth_wrapped"]
    )
    k = min(max(thumbnails, 0), len(frames))
    fig = _figure(12.0, 6.0 if k else 4.5)
    ratios = ([1.0] if k else []) + [0.7, 1.6]
    grid = fig.add_gridspec(len(ratios), 1, height_ratios=ratios, hspace=0.35)
    row = 0
    if k:
        sub = grid[0].subgridspec(1, k, wspace=0.05)
        picks = [round(i * (len(frames) - 1) / max(k - 1, 1)) for i in range(k)]
        for j, i in enumerate(picks):
            ax = fig.add_subplot(sub[0, j])
            f = frames[i]
            try:
                ax.imshow(_thumbnail(f, thumb_size))
            except OSError:
                ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            color = VIEW_COLORS.get(f["predicted"], "black")
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(2.5)
            ax.set_title(f"{f['azimuth_wrapped']:.0f}°: {f['predicted']}", fontsize=8, color=color)
        row = 1

    az = [f["azimuth_wrapped"] for f in frames]
    width = _spacing(az)
    ax_strip = fig.add_subplot(grid[row])
    # the camera at +180 is also drawn at -180 so both ends of the strip show it
    ends = [(a - 360.0, f) for a, f in zip(az, frames) if a == 180.0]
    strip = list(zip(az, frames)) + ends
    for y, key in ((1, "camera_bucket"), (0, "predicted")):
        ax_strip.bar(
            [a for a, _ in strip],
            0.8,
            width=width,
            bottom=y - 0.4,
            color=[VIEW_COLORS.get(f[key], "grey") for _, f in strip],
            edgecolor="none",
        )
    back_fronts = set(report.janus.get("front_at_back_azimuths", []))
    marks = [a for a, _ in strip if (a + 360.0 if a == -180.0 else a) in back_fronts]
    if marks:
        ax_strip.plot(marks, [0] * len(marks), "kx", markersize=6)
    ax_strip.set_yticks([0, 1])
    ax_strip.set_yticklabels(["predicted", "camera"])
    ax_strip.set_xlim(-180, 180)
    ax_strip.set_ylim(-0.6, 1.6)
    ax_strip.set_xticks(range(-180, 181, 45))
    handles: List[Any] = [Patch(color=VIEW_COLORS[v], label=v) for v in report.labels]
    if marks:
        handles.append(Line2D([], [], color="k", marker="x", ls="", label="front at back"))
    ax_strip.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)

    ax_scores = fig.add_subplot(grid[row + 1], sharex=ax_strip)
    for label in report.labels:
        ax_scores.plot(
            az,
            [f["scores"][label] for f in frames],
            color=VIEW_COLORS.get(label, "grey"),
            label=label,
            marker="." if len(frames) < 60 else None,
        )
    ax_scores.set_xlabel("azimuth (degrees, front at 0)")
    ax_scores.set_ylabel("score")
    ax_scores.set_ylim(0, 1)
    ax_scores.grid(alpha=0.3)

    flags = report.janus
    acc = "n/a" if report.view_accuracy is None else f"{report.view_accuracy:.2f}"
    seed = "" if report.seed is None else f", seed {report.seed}"
    fig.suptitle(
        f"{report.object_name}{seed} ({report.name}): Janus {'YES' if flags['janus'] else 'no'} "
        f"(front at back {flags['n_front_at_back']}, front segments {flags['front_segments']}), "
        f"view accuracy {acc}",
        fontsize=10,
    )
    return _save(fig, path)


def plot_summary(
    reports: Sequence[ObjectReport],
    aggregate: Mapping[str, Any],
    path: Union[str, Path],
    *,
    ids: Optional[Sequence[str]] = None,
) -> Path:
    """View accuracy per object with the mean's interval and the Janus rate; returns ``path``."""
    ids = list(ids) if ids is not None else [r.name for r in reports]
    fig = _figure(8.0, max(2.5, 0.35 * len(reports) + 1.5))
    ax = fig.add_subplot(1, 1, 1)
    ys = list(range(len(reports)))
    acc = [r.view_accuracy if r.view_accuracy is not None else 0.0 for r in reports]
    colors = [VIEW_COLORS["front"] if r.is_janus else "#7f7f7f" for r in reports]
    ax.barh(ys, acc, color=colors)
    ax.set_yticks(ys)
    ax.set_yticklabels(ids, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("view accuracy (red: Janus)")
    overall = aggregate["overall"]
    conf = int(round(aggregate.get("confidence", 0.95) * 100))
    if overall.get("mean_view_accuracy") is not None:
        if overall.get("mean_view_accuracy_ci") is not None:
            lo, hi = overall["mean_view_accuracy_ci"]
            ax.axvspan(lo, hi, color="black", alpha=0.1)
        ax.axvline(overall["mean_view_accuracy"], color="black", lw=1)
    rate = overall["janus_rate"]
    rlo, rhi = overall["janus_rate_ci"]
    ax.set_title(
        f"Janus rate {rate:.2f} [{rlo:.2f}, {rhi:.2f}] over {overall['n']} object(s); "
        f"mean accuracy line with {conf}% CI band",
        fontsize=9,
    )
    return _save(fig, path)
