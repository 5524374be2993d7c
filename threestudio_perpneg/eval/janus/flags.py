"""Janus flags of a ring of view labels: the evaluator's thresholds, camera buckets, the
threestudio test ring and the two Janus criteria (front at the back, two front segments)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from ...common.checks import check_bool, check_choice, check_float, check_int
from ...core.views import VIEW_NAMES, ViewThresholds, classify_views

__all__ = [
    "KNOWN_VIEWS",
    "JanusConfig",
    "camera_bucket",
    "camera_buckets",
    "check_views",
    "duplicate_cameras",
    "janus_flags",
    "threestudio_test_azimuths",
    "wrap_degrees",
]

#: View labels a classifier may use; ``none`` is the testbed classifier's reject label (an image
#: that shows no head view): wrong at every camera and never a front.
KNOWN_VIEWS: Tuple[str, ...] = ("front", "side", "back", "overhead", "none")
_DUPLICATE_TOL = 1e-6


def check_views(name: str, labels: Iterable[Any]) -> List[str]:
    """Each label one of :data:`KNOWN_VIEWS`."""
    return [check_choice(name, label, KNOWN_VIEWS, what="view name") for label in labels]


@dataclass(frozen=True)
class JanusConfig:
    """Thresholds of the evaluation; every field is reported with the results.

    Args:
        front_threshold: camera buckets as :class:`threestudio_perpneg.core.views.ViewThresholds`:
            |azimuth| < front_threshold is a front camera (degrees, default 45),
        back_threshold: |azimuth| > 180 − back_threshold is a back camera (default 45),
        overhead_threshold: elevation > overhead_threshold is an overhead camera (default 60).
        include_overhead: score "overhead" as a view: predictions may be "overhead" and overhead
            cameras count in the accuracy. Off by default: predictions are the argmax over the
            other labels and overhead cameras are left out of the accuracy.
        back_front_min: number of "front" predictions at back cameras that flags Janus (>= 1).
        min_segment: frames a run of "front" predictions needs to count as a front segment (>= 1).
        score_margin: a "front" prediction counts for Janus only if its front score beats the best
            other label by at least this much (0 = any argmax front). Weaker fronts neither start
            nor split a front segment and do not count at back cameras.
    """

    front_threshold: float = 45.0
    back_threshold: float = 45.0
    overhead_threshold: float = 60.0
    include_overhead: bool = False
    back_front_min: int = 1
    min_segment: int = 1
    score_margin: float = 0.0

    def __post_init__(self) -> None:
        self.view_thresholds()  # validates the three angles, naming the argument
        check_bool("include_overhead", self.include_overhead)
        check_int("back_front_min", self.back_front_min, 1)
        check_int("min_segment", self.min_segment, 1)
        check_float("score_margin", self.score_margin, 0.0, 1.0)

    def view_thresholds(self) -> ViewThresholds:
        return ViewThresholds(
            front=self.front_threshold, back=self.back_threshold, overhead=self.overhead_threshold
        )

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Cameras and Janus flags
# --------------------------------------------------------------------------------------------


def camera_buckets(
    azimuths: Sequence[float],
    elevations: Union[float, Sequence[float]] = 0.0,
    *,
    front: float = 45.0,
    back: float = 45.0,
    overhead: float = 60.0,
) -> List[str]:
    """View bucket ("front" / "side" / "back" / "overhead") of each camera (degrees)."""
    thresholds = ViewThresholds(front=front, back=back, overhead=overhead)
    az = torch.as_tensor([float(a) for a in azimuths], dtype=torch.float64)
    if isinstance(elevations, (int, float)):
        el = torch.full_like(az, float(elevations))
    else:
        el = torch.as_tensor([float(e) for e in elevations], dtype=torch.float64)
        if el.shape != az.shape:
            raise ValueError(
                f"elevations: expected {az.numel()} values (one per azimuth), got {el.numel()}"
            )
    idx = classify_views(el, az, thresholds)
    return [VIEW_NAMES[int(i)] for i in idx]


def camera_bucket(
    azimuth_deg: float,
    elevation_deg: float = 0.0,
    *,
    front: float = 45.0,
    back: float = 45.0,
    overhead: float = 60.0,
) -> str:
    """View bucket of one camera by :func:`threestudio_perpneg.core.views.classify_views`."""
    return camera_buckets(
        [azimuth_deg], [elevation_deg], front=front, back=back, overhead=overhead
    )[0]


def wrap_degrees(azimuth: float) -> float:
    """Azimuth wrapped to (-180, 180] (as :func:`threestudio_perpneg.core.views.wrap_azimuth`), exact
    for angles already in range."""
    w = math.fmod(float(azimuth), 360.0)
    if w > 180.0:
        w -= 360.0
    elif w <= -180.0:
        w += 360.0
    return w


def threestudio_test_azimuths(n_test_views: int) -> List[float]:
    """Azimuths (degrees) of threestudio's test camera ring: ``linspace(0, 360, n)``, endpoint
    included (the last camera repeats the first)."""
    n = check_int("n_test_views", n_test_views, 1)
    if n == 1:
        return [0.0]
    return [360.0 * i / (n - 1) for i in range(n)]


def duplicate_cameras(azimuths: Sequence[float], elevations: Sequence[float]) -> List[bool]:
    """True for a camera that repeats an earlier one (same wrapped azimuth and elevation)."""
    seen: List[Tuple[float, float]] = []
    out = []
    for a, e in zip(azimuths, elevations):
        w = wrap_degrees(a)
        dup = any(
            (abs(w - sa) < _DUPLICATE_TOL or abs(abs(w - sa) - 360.0) < _DUPLICATE_TOL)
            and abs(e - se) < _DUPLICATE_TOL
            for sa, se in seen
        )
        if not dup:
            seen.append((w, float(e)))
        out.append(dup)
    return out


def _front_runs(states: Sequence[int]) -> List[Tuple[int, int]]:
    """Circular runs of non-zero states (1 weak front, 2 strong front) holding a strong front.

    Returns (start, length) pairs over the ring positions; a run may wrap past the end.
    """
    n = len(states)
    if n == 0:
        return []
    if all(s > 0 for s in states):
        return [(0, n)] if any(s == 2 for s in states) else []
    first_other = next(i for i, s in enumerate(states) if s == 0)
    runs = []
    i = 0
    while i < n:
        pos = (first_other + 1 + i) % n
        if states[pos] == 0:
            i += 1
            continue
        start, length, strong = pos, 0, False
        while i < n and states[(first_other + 1 + i) % n] != 0:
            strong = strong or states[(first_other + 1 + i) % n] == 2
            length += 1
            i += 1
        if strong:
            runs.append((start, length))
    return runs


def janus_flags(
    azimuths: Sequence[float],
    labels: Sequence[str],
    *,
    elevations: Optional[Sequence[float]] = None,
    back_front_min: int = 1,
    min_segment: int = 1,
    front_threshold: float = 45.0,
    back_threshold: float = 45.0,
    overhead_threshold: float = 60.0,
    margins: Optional[Sequence[float]] = None,
    score_margin: float = 0.0,
) -> Dict[str, Any]:
    """Janus flags of a ring of predicted labels.

    Janus is flagged if a "front" label occurs at ``back_front_min`` or more cameras whose bucket is
    "back", or if the ring has two or more separate runs of "front" labels each of at least
    ``min_segment`` frames. The ring is each elevation's frames sorted by wrapped azimuth and read
    circularly (a run across ±180° is one run); overhead cameras and cameras repeating an earlier
    one are left out. With ``margins`` (front score minus the best other score, per frame), fronts
    below ``score_margin`` are weak: they extend a run but neither start one nor count at the back.

    Returns:
        ``{"janus", "front_at_back", "n_front_at_back", "front_at_back_azimuths", "front_segments",
        "segments": [{"start_azimuth", "end_azimuth", "length", "elevation"}], "n_ring_frames",
        "thresholds": {...}}``.
    """
    back_front_min = check_int("back_front_min", back_front_min, 1)
    min_segment = check_int("min_segment", min_segment, 1)
    score_margin = check_float("score_margin", score_margin, 0.0, 1.0)
    labels = check_views("labels", labels)
    n = len(azimuths)
    if len(labels) != n:
        raise ValueError(f"labels: expected {n} labels (one per azimuth), got {len(labels)}")
    elev = [0.0] * n if elevations is None else [float(e) for e in elevations]
    if len(elev) != n:
        raise ValueError(f"elevations: expected {n} values (one per azimuth), got {len(elev)}")
    if margins is not None and len(margins) != n:
        raise ValueError(f"margins: expected {n} values (one per azimuth), got {len(margins)}")
    buckets = camera_buckets(
        azimuths,
        elev,
        front=front_threshold,
        back=back_threshold,
        overhead=overhead_threshold,
    )
    dup = duplicate_cameras(azimuths, elev)
    strong = [
        lab == "front" and (margins is None or float(margins[i]) >= score_margin)
        for i, lab in enumerate(labels)
    ]
    at_back = [i for i in range(n) if not dup[i] and buckets[i] == "back" and strong[i]]

    rings: Dict[float, List[int]] = {}
    for i in range(n):
        if dup[i] or buckets[i] == "overhead":
            continue
        rings.setdefault(round(elev[i], 6), []).append(i)
    segments = []
    max_segments = 0
    for e, members in sorted(rings.items()):
        members.sort(key=lambda i: wrap_degrees(azimuths[i]))
        states = [(2 if strong[i] else 1) if labels[i] == "front" else 0 for i in members]
        count = 0
        for start, length in _front_runs(states):
            if length < min_segment:
                continue
            count += 1
            end = members[(start + length - 1) % len(members)]
            segments.append(
                {
                    "start_azimuth": wrap_degrees(azimuths[members[start]]),
                    "end_azimuth": wrap_degrees(azimuths[end]),
                    "length": length,
                    "elevation": e,
                }
            )
        max_segments = max(max_segments, count)
    front_at_back = len(at_back) >= back_front_min
    return {
        "janus": bool(front_at_back or max_segments >= 2),
        "front_at_back": bool(front_at_back),
        "n_front_at_back": len(at_back),
        "front_at_back_azimuths": [wrap_degrees(azimuths[i]) for i in at_back],
        "front_segments": max_segments,
        "segments": segments,
        "n_ring_frames": sum(len(m) for m in rings.values()),
        "thresholds": {
            "back_front_min": back_front_min,
            "min_segment": min_segment,
            "score_margin": score_margin,
            "front_threshold": front_threshold,
            "back_threshold": back_threshold,
            "overhead_threshold": overhead_threshold,
        },
    }
