"""Reports of the 2D protocol: the success table (counts, rate, 95 % Wilson interval per mode x
requested view), the confusion counts, ``eval2d.csv`` / ``eval2d.md`` / ``eval2d.json`` and the
bar chart ``eval2d.png`` (matplotlib, imported only to draw it); all written atomically."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ...common.io import atomic_write, write_text_atomic
from ..stats import wilson_interval

__all__ = [
    "ALL",
    "CSV_NAME",
    "IMAGES_DIR",
    "JSON_NAME",
    "MD_NAME",
    "PAPER_PERPNEG",
    "PNG_NAME",
    "confusion",
    "plot_success",
    "success_table",
    "table_csv",
    "table_markdown",
    "write_reports",
]

JSON_NAME = "eval2d.json"
CSV_NAME = "eval2d.csv"
MD_NAME = "eval2d.md"
PNG_NAME = "eval2d.png"
IMAGES_DIR = "images"
#: The paper's 2D success rates with Perp-Neg (real Stable Diffusion, real CLIP).
PAPER_PERPNEG: Dict[str, float] = {"side": 0.731, "back": 0.404}
#: The ``view`` of the row that pools a mode's views.
ALL = "all"


def success_table(
    records: Sequence[Dict[str, Any]],
    modes: Sequence[str],
    views: Sequence[str],
    *,
    with_all: bool = True,
) -> List[Dict[str, Any]]:
    """Success counts per mode × requested view (rows in ``modes`` then ``views`` order).

    Each record needs ``mode``, ``view`` (requested) and ``success`` (bool). With ``with_all`` each
    mode gets an extra row with ``view == "all"`` pooling its views.

    Returns:
        rows ``{"mode", "view", "successes", "total", "rate", "ci_low", "ci_high"}``; ``rate`` is
        ``None`` for an empty cell.
    """
    rows: List[Dict[str, Any]] = []
    for mode in modes:
        cells = [
            (view, [r for r in records if r["mode"] == mode and r["view"] == view])
            for view in views
        ]
        if with_all:
            cells.append((ALL, [r for r in records if r["mode"] == mode and r["view"] in views]))
        for view, rs in cells:
            k, n = sum(1 for r in rs if r["success"]), len(rs)
            lo, hi = wilson_interval(k, n)
            rows.append(
                {
                    "mode": mode,
                    "view": view,
                    "successes": k,
                    "total": n,
                    "rate": (k / n) if n else None,
                    "ci_low": lo,
                    "ci_high": hi,
                }
            )
    return rows


def confusion(
    records: Sequence[Dict[str, Any]],
    modes: Sequence[str],
    views: Sequence[str],
    labels: Sequence[str],
) -> Dict[str, Dict[str, Dict[str, int]]]:
    """``{mode: {requested view: {predicted label: count}}}``."""
    return {
        m: {
            v: {
                lab: sum(
                    1
                    for r in records
                    if r["mode"] == m and r["view"] == v and r["predicted"] == lab
                )
                for lab in labels
            }
            for v in views
        }
        for m in modes
    }


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100.0 * x:.1f} %"


def _cell(row: Dict[str, Any]) -> str:
    if not row["total"]:
        return "n/a"
    return (
        f"{_pct(row['rate'])} ({row['successes']}/{row['total']}) "
        f"[{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}]"
    )


def table_csv(rows: Sequence[Dict[str, Any]]) -> str:
    """The success table as CSV text (rates and bounds as fractions with 6 decimals)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["mode", "view", "successes", "total", "success_rate", "ci95_low", "ci95_high"])
    for r in rows:
        rate = "" if r["rate"] is None else f"{r['rate']:.6f}"
        w.writerow(
            [
                r["mode"],
                r["view"],
                r["successes"],
                r["total"],
                rate,
                f"{r['ci_low']:.6f}",
                f"{r['ci_high']:.6f}",
            ]
        )
    return buf.getvalue()


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table_markdown(report: Dict[str, Any]) -> str:
    """The markdown report: notes, the success table, per-prompt counts, confusion, settings."""
    s = report["settings"]
    modes, views = s["modes"], s["views"]
    rows = {(r["mode"], r["view"]): r for r in report["table"]}
    cols = list(views) + ([ALL] if len(views) > 1 else [])
    lines = ["# Perp-Neg 2D view-success evaluation", ""]
    if s.get("random_models"):
        lines += [
            "> **Tiny random models** (" + ", ".join(s["random_models"]) + "): these numbers are "
            "meaningless; they only show that the pipeline runs. The paper's numbers need real "
            "checkpoints on a GPU.",
            "",
        ]
    n_per_cell = len(s["prompts"]) * len(s["seeds"])
    lines += [
        f"Success rate of the requested view: {len(s['prompts'])} prompt(s) × {len(s['seeds'])} "
        f"seed(s) = {n_per_cell} image(s) per cell, classified zero-shot by CLIP "
        f"`{s['clip']}` over the labels {', '.join(s['labels'])}. Cells: rate (successes/total) "
        "[95 % Wilson interval, %].",
        "",
        "| mode | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for m in modes:
        lines.append(f"| {m} | " + " | ".join(_cell(rows[(m, v)]) for v in cols) + " |")
    paper = ", ".join(f"{v} {100 * PAPER_PERPNEG[v]:.1f} %" for v in PAPER_PERPNEG)
    lines += ["", f"Paper (Perp-Neg, real Stable Diffusion and CLIP): {paper}.", ""]

    lines += [
        "## Per prompt",
        "",
        "| prompt | mode | " + " | ".join(views) + " |",
        "|---|---|" + "---|" * len(views),
    ]
    for i, p in enumerate(s["prompts"]):
        for m in modes:
            cells = []
            for v in views:
                rs = [
                    r
                    for r in report["images"]
                    if r["prompt_index"] == i and r["mode"] == m and r["view"] == v
                ]
                cells.append(f"{sum(r['success'] for r in rs)}/{len(rs)}")
            lines.append(f"| {_md_escape(p)} | {m} | " + " | ".join(cells) + " |")
    labels = s["labels"]
    lines += [
        "",
        "## Predicted labels (requested view → counts)",
        "",
        "| mode | requested | " + " | ".join(labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    for m in modes:
        for v in views:
            counts = report["confusion"][m][v]
            lines.append(f"| {m} | {v} | " + " | ".join(str(counts[lab]) for lab in labels) + " |")
    lines += ["", "## Settings", ""]
    for key in (
        "model",
        "clip",
        "clip_backend",
        "views",
        "modes",
        "seeds",
        "num_inference_steps",
        "guidance_scale",
        "height",
        "width",
        "scheme",
        "device",
        "dtype",
    ):
        if key in s:
            value = s[key]
            if isinstance(value, list):
                value = ", ".join(str(x) for x in value)
            lines.append(f"- {key}: `{value}`")
    lines.append(f"- images: `{IMAGES_DIR}/`, per-image labels and scores: `{JSON_NAME}`")
    return "\n".join(lines) + "\n"


def plot_success(report: Dict[str, Any], path: Path) -> None:
    """Grouped bar chart (groups = requested views, bars = modes) with Wilson error bars."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    s = report["settings"]
    modes, views = s["modes"], s["views"]
    rows = {(r["mode"], r["view"]): r for r in report["table"]}
    width = 0.8 / max(1, len(modes))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(views) + 1.5), 3.6), dpi=120)
    try:
        for i, m in enumerate(modes):
            xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(views))]
            cells = [rows[(m, v)] for v in views]
            ys = [100.0 * (c["rate"] or 0.0) for c in cells]
            err = [
                [max(0.0, y - 100.0 * c["ci_low"]) for y, c in zip(ys, cells)],
                [max(0.0, 100.0 * c["ci_high"] - y) for y, c in zip(ys, cells)],
            ]
            bars = ax.bar(xs, ys, width=width * 0.95, label=m, yerr=err, capsize=3)
            for bar, c in zip(bars, cells):
                ax.annotate(
                    f"{c['successes']}/{c['total']}",
                    (bar.get_x() + bar.get_width() / 2, 100.0 * c["ci_high"] + 1.5),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
        for j, v in enumerate(views):
            if v in PAPER_PERPNEG and "perpneg" in modes:
                ax.plot(
                    [j - 0.42, j + 0.42],
                    [100 * PAPER_PERPNEG[v]] * 2,
                    "k--",
                    linewidth=1,
                    label="paper (Perp-Neg)"
                    if j == min(k for k, w in enumerate(views) if w in PAPER_PERPNEG)
                    else None,
                )
        ax.set_xticks(range(len(views)))
        ax.set_xticklabels(views)
        ax.set_ylim(0, 118)
        ax.set_yticks(range(0, 101, 20))
        ax.set_ylabel("requested view predicted (%)")
        ax.set_xlabel("requested view")
        title = "2D view success rate (95 % Wilson intervals)"
        if s.get("random_models"):
            title += "\nTINY RANDOM MODELS: numbers are meaningless"
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="upper center", ncol=len(modes) + 1, frameon=False)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def write_reports(
    report: Dict[str, Any], out_dir: Path, *, chart: bool = True
) -> Dict[str, Optional[Path]]:
    """Writes ``eval2d.json``, ``eval2d.csv``, ``eval2d.md`` and (with matplotlib) ``eval2d.png``.

    Returns the paths; ``png`` is ``None`` when the chart was not drawn (``chart=False`` or no
    matplotlib, which is then reported on stderr and in the JSON under ``chart``).
    """
    out_dir = Path(out_dir)
    png: Optional[Path] = None
    if chart:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(
                f"warning: matplotlib is not installed; {PNG_NAME} not drawn "
                '(in the clone: pip install -e ".[eval]")',
                file=sys.stderr,
            )
            report["chart"] = None
        else:
            plot_success(report, out_dir / PNG_NAME)
            png = out_dir / PNG_NAME
            report["chart"] = PNG_NAME
    else:
        report["chart"] = None
    write_text_atomic(out_dir / CSV_NAME, table_csv(report["table"]))
    write_text_atomic(out_dir / MD_NAME, table_markdown(report))
    write_text_atomic(out_dir / JSON_NAME, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return {
        "json": out_dir / JSON_NAME,
        "csv": out_dir / CSV_NAME,
        "md": out_dir / MD_NAME,
        "png": png,
    }
