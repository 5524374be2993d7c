"""Scoring one object's frames with a view classifier (:func:`evaluate_object`) and aggregating
objects x seeds (:func:`aggregate`: Janus rate with a Wilson interval, mean view accuracy with a
seeded percentile-bootstrap interval)."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Optional, Protocol, Sequence, Tuple

import torch

from ...common.checks import check_float, check_int
from ..stats import wilson_interval
from .flags import (
    JanusConfig,
    camera_buckets,
    check_views,
    duplicate_cameras,
    janus_flags,
    wrap_degrees,
)
from .trials import TrialFrames

__all__ = [
    "ClassifierLike",
    "ObjectReport",
    "aggregate",
    "bootstrap_mean_interval",
    "evaluate_object",
    "wilson_interval",
]


class ClassifierLike(Protocol):
    """What the evaluator needs of a view classifier (``eval.classifier.ClassifierProtocol``)."""

    labels: Sequence[str]

    def scores(self, images: Sequence[Any], object_name: str) -> torch.Tensor: ...


@dataclass
class ObjectReport:
    """Results for one object (one run): per-frame labels and scores, accuracy and Janus flags."""

    name: str
    source: str
    kind: str
    object_name: str
    seed: Optional[int]
    experiment: Optional[str]
    iteration: Optional[int]
    labels: List[str]
    frames: List[Dict[str, Any]]
    view_accuracy: Optional[float]
    n_scored: int
    confusion: Dict[str, Dict[str, int]]
    janus: Dict[str, Any]
    config: Dict[str, Any]
    camera: Dict[str, Any]

    @property
    def is_janus(self) -> bool:
        return bool(self.janus["janus"])

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _iter_batches(n: int, batch_size: int) -> Iterable[Tuple[int, int]]:
    for start in range(0, n, batch_size):
        yield start, min(n, start + batch_size)


def evaluate_object(
    frames: TrialFrames,
    classifier: ClassifierLike,
    object_name: Optional[str] = None,
    config: Optional[JanusConfig] = None,
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> ObjectReport:
    """Classify every frame of one object and score it against its camera.

    ``object_name`` defaults to the trial's prompt (``system.prompt_processor.prompt``) or the
    manifest's ``object``. Accuracy counts frames whose camera bucket is front/side/back (and
    overhead with ``config.include_overhead``), each camera once.
    """
    config = config or JanusConfig()
    batch_size = check_int("batch_size", batch_size, 1)
    name = object_name if object_name is not None else frames.object_name
    if not name or not str(name).strip():
        raise ValueError(
            f"object_name: none given and {frames.source} records no prompt/object; pass one"
        )
    labels = check_views("classifier.labels", list(classifier.labels))
    needed = ["front", "side", "back"] + (["overhead"] if config.include_overhead else [])
    missing = [v for v in needed if v not in labels]
    if missing:
        raise ValueError(f"classifier.labels: {labels} lacks view(s) {missing}")
    allowed = [i for i, lab in enumerate(labels) if config.include_overhead or lab != "overhead"]
    front_col = labels.index("front")

    items = frames.frames
    rows: List[torch.Tensor] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc=f"classify {frames.name}", unit="frame", leave=False)
    try:
        for start, stop in _iter_batches(len(items), batch_size):
            images = [f.load() for f in items[start:stop]]
            s = classifier.scores(images, str(name))
            s = torch.as_tensor(s).detach().to("cpu", torch.float64)
            if s.shape != (stop - start, len(labels)):
                raise ValueError(
                    f"classifier.scores: expected shape {(stop - start, len(labels))}, got "
                    f"{tuple(s.shape)}"
                )
            rows.append(s)
            if bar is not None:
                bar.update(stop - start)
    finally:
        if bar is not None:
            bar.close()
    scores = torch.cat(rows) if rows else torch.zeros(0, len(labels), dtype=torch.float64)
    sub = scores[:, allowed]
    pred_idx = [allowed[int(i)] for i in sub.argmax(dim=1)]
    predicted = [labels[i] for i in pred_idx]
    others = [i for i in allowed if i != front_col]
    margins = (scores[:, front_col] - scores[:, others].max(dim=1).values).tolist()

    az = [f.azimuth for f in items]
    el = [f.elevation for f in items]
    buckets = camera_buckets(
        az,
        el,
        front=config.front_threshold,
        back=config.back_threshold,
        overhead=config.overhead_threshold,
    )
    dup = duplicate_cameras(az, el)
    flags = janus_flags(
        az,
        predicted,
        elevations=el,
        back_front_min=config.back_front_min,
        min_segment=config.min_segment,
        front_threshold=config.front_threshold,
        back_threshold=config.back_threshold,
        overhead_threshold=config.overhead_threshold,
        margins=margins,
        score_margin=config.score_margin,
    )
    confusion: Dict[str, Dict[str, int]] = {}
    frame_rows: List[Dict[str, Any]] = []
    n_scored = n_correct = 0
    for i, f in enumerate(items):
        scored = not dup[i] and (config.include_overhead or buckets[i] != "overhead")
        correct = predicted[i] == buckets[i] if scored else None
        if scored:
            n_scored += 1
            n_correct += int(bool(correct))
            row = confusion.setdefault(buckets[i], {})
            row[predicted[i]] = row.get(predicted[i], 0) + 1
        frame_rows.append(
            {
                "file": str(f.path),
                "index": f.index,
                "azimuth": f.azimuth,
                "azimuth_wrapped": wrap_degrees(f.azimuth),
                "elevation": f.elevation,
                "camera_bucket": buckets[i],
                "predicted": predicted[i],
                "scores": {lab: float(scores[i, j]) for j, lab in enumerate(labels)},
                "front_margin": float(margins[i]),
                "duplicate": dup[i],
                "scored": scored,
                "correct": correct,
                "crop_width": f.crop_width,
            }
        )
    return ObjectReport(
        name=frames.name,
        source=str(frames.source),
        kind=frames.kind,
        object_name=str(name),
        seed=frames.seed,
        experiment=frames.experiment,
        iteration=frames.iteration,
        labels=labels,
        frames=frame_rows,
        view_accuracy=(n_correct / n_scored) if n_scored else None,
        n_scored=n_scored,
        confusion=confusion,
        janus=flags,
        config=config.to_dict(),
        camera=dict(frames.camera),
    )


def bootstrap_mean_interval(
    values: Sequence[float], confidence: float = 0.95, n_boot: int = 10000, seed: int = 0
) -> Tuple[float, float]:
    """Percentile-bootstrap interval of a mean (seeded; a single value gives a zero-width one)."""
    import numpy as np

    confidence = check_float("confidence", confidence, 0.5, 0.9999)
    n_boot = check_int("n_boot", n_boot, 1)
    x = np.asarray([float(v) for v in values], dtype=np.float64)
    if x.size == 0:
        raise ValueError("values: expected at least one value")
    if x.size == 1:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _summary(
    reports: Sequence[ObjectReport], confidence: float, n_boot: int, seed: int
) -> Dict[str, Any]:
    n = len(reports)
    k = sum(r.is_janus for r in reports)
    acc = [r.view_accuracy for r in reports if r.view_accuracy is not None]
    out: Dict[str, Any] = {
        "n": n,
        "janus_count": k,
        "janus_rate": k / n if n else None,
        "janus_rate_ci": list(wilson_interval(k, n, confidence=confidence)) if n else None,
        "n_accuracy": len(acc),
        "mean_view_accuracy": float(sum(acc) / len(acc)) if acc else None,
        # a single accuracy has no spread to resample: no interval rather than a zero-width one
        "mean_view_accuracy_ci": (
            list(bootstrap_mean_interval(acc, confidence, n_boot, seed)) if len(acc) > 1 else None
        ),
        "std_view_accuracy": statistics.stdev(acc) if len(acc) > 1 else None,
        "seeds": sorted({r.seed for r in reports if r.seed is not None}),
    }
    return out


def aggregate(
    reports: Sequence[ObjectReport],
    *,
    confidence: float = 0.95,
    n_boot: int = 10000,
    seed: int = 0,
) -> Dict[str, Any]:
    """Janus rate (Wilson interval) and mean view accuracy (percentile bootstrap) over the reports
    (objects x seeds), overall, per object name and per experiment. A group with fewer than two
    accuracies gets no accuracy interval (None)."""
    if not reports:
        raise ValueError("reports: expected at least one object report")
    confidence = check_float("confidence", confidence, 0.5, 0.9999)
    n_boot = check_int("n_boot", n_boot, 1)
    by_object: Dict[str, List[ObjectReport]] = {}
    by_experiment: Dict[str, List[ObjectReport]] = {}
    for r in reports:
        by_object.setdefault(r.object_name, []).append(r)
        by_experiment.setdefault(r.experiment or "", []).append(r)
    configs = [r.config for r in reports]
    return {
        "overall": _summary(reports, confidence, n_boot, seed),
        "by_object": {k: _summary(v, confidence, n_boot, seed) for k, v in by_object.items()},
        "by_experiment": {
            k: _summary(v, confidence, n_boot, seed) for k, v in by_experiment.items()
        },
        "confidence": confidence,
        "methods": {
            "janus_rate_ci": "Wilson score interval",
            "mean_view_accuracy_ci": f"percentile bootstrap over objects x seeds "
            f"({n_boot} resamples, numpy seed {seed})",
        },
        "config": configs[0] if all(c == configs[0] for c in configs) else configs,
    }
