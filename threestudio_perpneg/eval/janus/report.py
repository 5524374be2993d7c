"""Reports of the Janus evaluator: ``janus_report.json``, ``objects.csv``, ``frames.csv``,
``aggregate.csv`` and (with matplotlib) one PNG per object plus ``summary.png``; all written
atomically."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from ...common.checks import unique_slugs
from ...common.io import atomic_write, write_json_atomic
from .metrics import ObjectReport

__all__ = ["AGGREGATE_COLUMNS", "FRAME_COLUMNS", "OBJECT_COLUMNS", "object_ids", "write_reports"]

PathLike = Union[str, Path]


def object_ids(names: Sequence[str]) -> List[str]:
    """File-safe, unique ids of the objects (case and ``. _ -`` kept; repeats get ``-2`` ...)."""
    return unique_slugs(names, lower=False, keep="._-", fallback="object")


def _fmt(x: Any) -> Any:
    if x is None:
        return ""
    if isinstance(x, bool):
        return int(x)
    if isinstance(x, float):
        return repr(x)
    return x


OBJECT_COLUMNS: Tuple[str, ...] = (
    "id",
    "object",
    "seed",
    "experiment",
    "iteration",
    "source",
    "n_frames",
    "n_scored",
    "view_accuracy",
    "janus",
    "front_at_back",
    "n_front_at_back",
    "front_segments",
)
FRAME_COLUMNS: Tuple[str, ...] = (
    "id",
    "file",
    "index",
    "azimuth",
    "azimuth_wrapped",
    "elevation",
    "camera_bucket",
    "predicted",
    "scored",
    "correct",
    "duplicate",
)  # followed by score_<label> for every label
AGGREGATE_COLUMNS: Tuple[str, ...] = (
    "group",
    "key",
    "n",
    "janus_count",
    "janus_rate",
    "janus_rate_lo",
    "janus_rate_hi",
    "n_accuracy",
    "mean_view_accuracy",
    "mean_view_accuracy_lo",
    "mean_view_accuracy_hi",
)


def _write_csv(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fp:
            w = csv.writer(fp)
            w.writerow(columns)
            for row in rows:
                w.writerow([_fmt(row.get(c)) for c in columns])

    atomic_write(path, write)
    return path


def write_reports(
    reports: Sequence[ObjectReport],
    aggregate_result: Optional[Mapping[str, Any]],
    out_dir: PathLike,
    *,
    plots: bool = True,
    thumbnails: int = 8,
    extra: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """Write ``janus_report.json``, ``objects.csv``, ``frames.csv``, ``aggregate.csv`` and (with
    ``plots``) ``plots/<object>.png`` per object plus ``summary.png``. Returns the paths.

    ``extra`` is merged into the JSON's top level (e.g. the classifier used).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slugs = object_ids([r.name for r in reports])
    paths: Dict[str, Any] = {}

    doc: Dict[str, Any] = dict(extra or {})
    doc["aggregate"] = dict(aggregate_result) if aggregate_result is not None else None
    doc["objects"] = [dict(r.to_dict(), id=s) for r, s in zip(reports, slugs)]
    paths["json"] = out / "janus_report.json"
    write_json_atomic(paths["json"], doc, allow_nan=True)

    all_labels: List[str] = []
    for r in reports:
        all_labels += [lab for lab in r.labels if lab not in all_labels]
    object_rows = [
        {
            "id": s,
            "object": r.object_name,
            "seed": r.seed,
            "experiment": r.experiment,
            "iteration": r.iteration,
            "source": r.source,
            "n_frames": len(r.frames),
            "n_scored": r.n_scored,
            "view_accuracy": r.view_accuracy,
            "janus": int(r.is_janus),
            "front_at_back": int(r.janus["front_at_back"]),
            "n_front_at_back": r.janus["n_front_at_back"],
            "front_segments": r.janus["front_segments"],
        }
        for r, s in zip(reports, slugs)
    ]
    frame_rows = [
        dict(
            {key: f[key] for key in FRAME_COLUMNS[1:]},
            id=s,
            scored=int(f["scored"]),
            duplicate=int(f["duplicate"]),
            correct=None if f["correct"] is None else int(f["correct"]),
            **{f"score_{lab}": f["scores"].get(lab) for lab in all_labels},
        )
        for r, s in zip(reports, slugs)
        for f in r.frames
    ]
    paths["objects_csv"] = _write_csv(out / "objects.csv", OBJECT_COLUMNS, object_rows)
    paths["frames_csv"] = _write_csv(
        out / "frames.csv",
        FRAME_COLUMNS + tuple(f"score_{lab}" for lab in all_labels),
        frame_rows,
    )
    if aggregate_result is not None:
        groups: List[Tuple[str, str, Mapping[str, Any]]] = [
            ("overall", "", aggregate_result["overall"])
        ]
        groups += [("object", k, v) for k, v in aggregate_result["by_object"].items()]
        groups += [("experiment", k, v) for k, v in aggregate_result["by_experiment"].items()]
        agg_rows = []
        for group, key, sm in groups:
            rci = sm["janus_rate_ci"] or [None, None]
            aci = sm["mean_view_accuracy_ci"] or [None, None]
            agg_rows.append(
                {
                    "group": group,
                    "key": key,
                    "n": sm["n"],
                    "janus_count": sm["janus_count"],
                    "janus_rate": sm["janus_rate"],
                    "janus_rate_lo": rci[0],
                    "janus_rate_hi": rci[1],
                    "n_accuracy": sm["n_accuracy"],
                    "mean_view_accuracy": sm["mean_view_accuracy"],
                    "mean_view_accuracy_lo": aci[0],
                    "mean_view_accuracy_hi": aci[1],
                }
            )
        paths["aggregate_csv"] = _write_csv(out / "aggregate.csv", AGGREGATE_COLUMNS, agg_rows)

    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ImportError(
                'plots: matplotlib is not installed (in the clone: pip install -e ".[eval]"), or '
                "skip the plots "
                f"(--no-plots / plots=False); the JSON and CSV reports are in {out}"
            ) from None
        from .plots import plot_object, plot_summary

        plot_dir = out / "plots"
        plot_dir.mkdir(exist_ok=True)
        paths["plots"] = []
        for r, s in zip(reports, slugs):
            paths["plots"].append(plot_object(r, plot_dir / f"{s}.png", thumbnails=thumbnails))
        if aggregate_result is not None:
            paths["summary_png"] = plot_summary(
                reports, aggregate_result, out / "summary.png", ids=slugs
            )
    return paths
