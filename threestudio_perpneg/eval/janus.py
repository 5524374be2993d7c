"""Janus evaluator for 3D runs: per-azimuth view labels, view accuracy and a Janus flag.

Input is either a threestudio trial folder or any folder of images with an azimuth manifest.

**threestudio trials.** The frames are ``save/it<step>-test/<index>.png`` (the latest ``<step>``
unless an iteration is requested). Their cameras are not guessed from the file order: they are
rebuilt from the run's ``configs/parsed.yaml`` with the convention of threestudio's
``RandomCameraDataset`` (``threestudio/data/uncond.py``) for the test split:

* ``n = data.n_test_views`` cameras (default 120), frame ``<index>.png`` is camera ``index``;
* azimuth ``index * 360 / (n - 1)`` degrees, i.e. ``linspace(0, 360, n)`` *with* the endpoint, so
  the first camera looks at the front (azimuth 0) and the last one (360) repeats it;
* elevation ``data.eval_elevation_deg`` (default 15) and distance ``data.eval_camera_distance``
  (default 1.5) for every camera.

The defaults are those of threestudio's ``RandomCameraDataModuleConfig``; ``parsed.yaml`` only holds
the keys a run set, so the report says which values were defaulted. ``single-image-datamodule``
runs take the same keys from ``data.random_camera``. A test frame is a horizontal grid whose first
panel is the RGB render (``eval_width`` wide; normals and opacity follow), so only that panel is
classified.

**Image folders.** A ``manifest.csv`` / ``manifest.json`` in the folder (or a manifest file given
directly) lists ``file, azimuth[, elevation]`` (degrees, front at azimuth 0, elevation default 0);
JSON is a list of such objects or ``{"object": ..., "seed": ..., "experiment": ..., "frames":
[...]}``. Every listed file must exist and every image beside them must be listed.

**Per object** (:func:`evaluate_object`): each frame's scores from a view classifier (anything
with ``labels`` and ``scores(images, object_name) -> [N, V]``, e.g.
:class:`threestudio_perpneg.eval.classifier.ViewClassifier`), its predicted label (argmax; the
overhead label is left out unless ``include_overhead``), the camera's bucket by
:func:`threestudio_perpneg.core.views.classify_views`, the view accuracy, and Janus flags
(:func:`janus_flags`): a "front" prediction where the camera looks at the back, or two or more
separate "front" segments around the ring. A camera that repeats an earlier one (the closing 360°
frame of a threestudio ring) is reported but neither scored nor counted twice.

**Over objects x seeds** (:func:`aggregate`): Janus rate with a Wilson interval and mean view
accuracy with a seeded percentile-bootstrap interval, overall, per object and per experiment.
:func:`write_reports` writes JSON, CSV and PNG plots; :func:`main` is the ``eval3d`` command.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import (
    Any,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    Union,
)

import torch

from ..core.views import VIEW_NAMES, ViewThresholds, classify_views
from . import stats

__all__ = [
    "KNOWN_VIEWS",
    "IMAGE_SUFFIXES",
    "THREESTUDIO_CAMERA_DEFAULTS",
    "ClassifierLike",
    "Frame",
    "TrialFrames",
    "JanusConfig",
    "ObjectReport",
    "camera_bucket",
    "camera_buckets",
    "threestudio_test_azimuths",
    "janus_flags",
    "load_trial",
    "evaluate_object",
    "wilson_interval",
    "bootstrap_mean_interval",
    "aggregate",
    "write_reports",
    "OBJECT_COLUMNS",
    "FRAME_COLUMNS",
    "AGGREGATE_COLUMNS",
    "build_parser",
    "main",
]

PathLike = Union[str, Path]

KNOWN_VIEWS: Tuple[str, ...] = ("front", "side", "back", "overhead")
IMAGE_SUFFIXES: Tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MANIFEST_NAMES: Tuple[str, ...] = ("manifest.json", "manifest.csv")

# threestudio's RandomCameraDataModuleConfig defaults (threestudio/data/uncond.py) for the keys the
# test camera ring uses; parsed.yaml only holds what a run set explicitly.
THREESTUDIO_CAMERA_DEFAULTS: Dict[str, Any] = {
    "n_test_views": 120,
    "eval_elevation_deg": 15.0,
    "eval_camera_distance": 1.5,
    "eval_height": 512,
    "eval_width": 512,
}
# data_type -> where its test-camera keys live inside ``data`` (None: ``data`` itself).
RING_DATAMODULES: Dict[str, Optional[str]] = {
    "random-camera-datamodule": None,
    "eff-random-camera-datamodule": None,
    "single-image-datamodule": "random_camera",
}
_TEST_DIR = re.compile(r"^it(\d+)-test$")
_DUPLICATE_TOL = 1e-6


class ClassifierLike(Protocol):
    """What the evaluator needs of a view classifier (``eval.classifier.ClassifierProtocol``)."""

    labels: Sequence[str]

    def scores(self, images: Sequence[Any], object_name: str) -> torch.Tensor: ...


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name}: expected an integer >= {lo}, got {value!r}")
    return int(value)


def _check_float(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number in [{lo}, {hi}], got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name}: expected a value in [{lo}, {hi}], got {value!r}")
    return float(value)


def _check_views(name: str, labels: Iterable[Any]) -> List[str]:
    out = []
    for label in labels:
        if label not in KNOWN_VIEWS:
            raise ValueError(f"{name}: unknown view name {label!r}, expected one of {KNOWN_VIEWS}")
        out.append(str(label))
    return out


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


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
        if not isinstance(self.include_overhead, bool):
            raise ValueError(f"include_overhead: expected a bool, got {self.include_overhead!r}")
        _check_int("back_front_min", self.back_front_min, 1)
        _check_int("min_segment", self.min_segment, 1)
        _check_float("score_margin", self.score_margin, 0.0, 1.0)

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


def _wrap(azimuth: float) -> float:
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
    n = _check_int("n_test_views", n_test_views, 1)
    if n == 1:
        return [0.0]
    return [360.0 * i / (n - 1) for i in range(n)]


def _duplicates(azimuths: Sequence[float], elevations: Sequence[float]) -> List[bool]:
    """True for a camera that repeats an earlier one (same wrapped azimuth and elevation)."""
    seen: List[Tuple[float, float]] = []
    out = []
    for a, e in zip(azimuths, elevations):
        w = _wrap(a)
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
    back_front_min = _check_int("back_front_min", back_front_min, 1)
    min_segment = _check_int("min_segment", min_segment, 1)
    score_margin = _check_float("score_margin", score_margin, 0.0, 1.0)
    labels = _check_views("labels", labels)
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
    dup = _duplicates(azimuths, elev)
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
        members.sort(key=lambda i: _wrap(azimuths[i]))
        states = [(2 if strong[i] else 1) if labels[i] == "front" else 0 for i in members]
        count = 0
        for start, length in _front_runs(states):
            if length < min_segment:
                continue
            count += 1
            end = members[(start + length - 1) % len(members)]
            segments.append(
                {
                    "start_azimuth": _wrap(azimuths[members[start]]),
                    "end_azimuth": _wrap(azimuths[end]),
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
        "front_at_back_azimuths": [_wrap(azimuths[i]) for i in at_back],
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


# --------------------------------------------------------------------------------------------
# Loading frames
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """One image and its camera (degrees, front at azimuth 0)."""

    path: Path
    azimuth: float
    elevation: float
    index: Optional[int] = None
    crop_width: Optional[int] = None  # keep only the first panel this wide (threestudio grids)

    def load(self) -> Any:
        """The (cropped) image as an RGB ``PIL.Image``."""
        from PIL import Image

        with Image.open(self.path) as im:
            image = im.convert("RGB")
        if self.crop_width is not None and image.width > self.crop_width:
            image = image.crop((0, 0, self.crop_width, image.height))
        return image


@dataclass
class TrialFrames:
    """Frames of one object (one run), with where their cameras came from."""

    source: Path
    kind: str  # "threestudio" or "manifest"
    frames: List[Frame]
    name: str
    object_name: Optional[str] = None
    seed: Optional[int] = None
    experiment: Optional[str] = None
    iteration: Optional[int] = None
    camera: Dict[str, Any] = field(default_factory=dict)


def _images_in(folder: Path) -> List[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _load_yaml(path: Path) -> Dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as fp:
            data = yaml.safe_load(fp)
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _first_panel_width(size: Tuple[int, int], eval_w: int, eval_h: int) -> Optional[int]:
    """Width of the RGB panel of a threestudio test grid of the given (width, height)."""
    w, h = size
    if h == eval_h and w % eval_w == 0 and w > eval_w:
        return eval_w
    if h > 0 and w % h == 0 and w > h:  # square panels of another size
        return h
    return None


def _load_threestudio(folder: Path, iteration: Optional[int]) -> TrialFrames:
    cfg_path = folder / "configs" / "parsed.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{cfg_path}: not found; a threestudio trial folder needs its configs/parsed.yaml for "
            "the test cameras (or give a folder of images with a manifest.csv/manifest.json)"
        )
    cfg = _load_yaml(cfg_path)
    save = folder / "save"
    tests = {}
    if save.is_dir():
        for p in save.iterdir():
            m = _TEST_DIR.match(p.name)
            if m and p.is_dir():
                tests[int(m.group(1))] = p
    if not tests:
        raise ValueError(
            f"no frames: {folder} has no save/it*-test/ folder (run threestudio --test)"
        )
    if iteration is None:
        iteration = max(tests)
    elif iteration not in tests:
        raise ValueError(
            f"iteration: {folder} has no save/it{iteration}-test/; available: {sorted(tests)}"
        )
    test_dir = tests[iteration]

    data_type = cfg.get("data_type")
    data = cfg.get("data") or {}
    if data_type not in RING_DATAMODULES:
        raise ValueError(
            f"{cfg_path}: data_type {data_type!r} has no known test camera ring (known: "
            f"{sorted(RING_DATAMODULES)}); write a manifest.csv (file, azimuth[, elevation]) for "
            "its frames instead"
        )
    sub = RING_DATAMODULES[data_type]
    if data_type == "single-image-datamodule" and data.get("use_random_camera") is False:
        raise ValueError(
            f"{cfg_path}: data.use_random_camera is false, so the test frames have no camera "
            "ring; write a manifest.csv (file, azimuth[, elevation]) for them instead"
        )
    ring_cfg = (data.get(sub) or {}) if sub else data
    if not isinstance(ring_cfg, dict):
        raise ValueError(f"{cfg_path}: data{'.' + sub if sub else ''} is not a mapping")
    prefix = f"data.{sub}." if sub else "data."
    camera: Dict[str, Any] = {"data_type": data_type, "config": str(cfg_path), "defaulted": []}
    for key, default in THREESTUDIO_CAMERA_DEFAULTS.items():
        if key in ring_cfg and ring_cfg[key] is not None:
            camera[key] = ring_cfg[key]
        else:
            camera[key] = default
            camera["defaulted"].append(prefix + key)
    n = camera["n_test_views"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{cfg_path}: {prefix}n_test_views must be an integer >= 1, got {n!r}")
    elevation = camera["eval_elevation_deg"]
    if isinstance(elevation, bool) or not isinstance(elevation, (int, float)):
        raise ValueError(f"{cfg_path}: {prefix}eval_elevation_deg must be a number")
    azimuths = threestudio_test_azimuths(n)
    camera["azimuth_convention"] = "linspace(0, 360, n_test_views), endpoint included"

    frames: List[Frame] = []
    ignored: List[str] = []
    crop: Optional[int] = None
    for path in _images_in(test_dir):
        if not path.stem.isdigit():
            ignored.append(path.name)
            continue
        index = int(path.stem)
        if index >= n:
            raise ValueError(
                f"{path}: frame index {index} is outside the test ring of {prefix}n_test_views={n}"
            )
        if crop is None:
            from PIL import Image

            with Image.open(path) as im:
                crop = _first_panel_width(
                    im.size, int(camera["eval_width"]), int(camera["eval_height"])
                )
            crop = crop or 0
        frames.append(Frame(path, azimuths[index], float(elevation), index, crop or None))
    if not frames:
        raise ValueError(f"no frames: {test_dir} holds no <index>.png test frames")
    frames.sort(key=lambda f: f.index if f.index is not None else -1)
    present = {f.index for f in frames}
    camera["missing_indices"] = [i for i in range(n) if i not in present]
    camera["ignored_files"] = ignored
    camera["first_panel_width"] = crop or None

    prompt = ((cfg.get("system") or {}).get("prompt_processor") or {}).get("prompt")
    seed = cfg.get("seed")
    experiment = cfg.get("name")
    return TrialFrames(
        source=folder,
        kind="threestudio",
        frames=frames,
        name=f"{folder.parent.name}/{folder.name}" if folder.parent.name else folder.name,
        object_name=str(prompt) if prompt else None,
        seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
        experiment=str(experiment) if experiment is not None else None,
        iteration=iteration,
        camera=camera,
    )


def _number(manifest: Path, where: str, key: str, value: Any) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"manifest {manifest}: {where}: {key} {value!r} is not a number") from None
    if not math.isfinite(x):
        raise ValueError(f"manifest {manifest}: {where}: {key} {value!r} is not finite")
    return x


def _read_manifest(manifest: Path) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    meta: Dict[str, Any] = {}
    if manifest.suffix.lower() == ".json":
        try:
            with open(manifest, encoding="utf-8") as fp:
                data = json.load(fp)
        except json.JSONDecodeError as err:
            raise ValueError(f"manifest {manifest}: not valid JSON ({err})") from None
        if isinstance(data, dict):
            meta = {k: v for k, v in data.items() if k != "frames"}
            data = data.get("frames")
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ValueError(
                f"manifest {manifest}: expected a list of {{file, azimuth[, elevation]}} objects "
                "or {'frames': [...]}"
            )
        rows = [{str(k).strip().lower(): v for k, v in r.items()} for r in data]
    elif manifest.suffix.lower() == ".csv":
        with open(manifest, newline="", encoding="utf-8") as fp:
            reader = csv.DictReader(fp)
            fields = [str(f).strip().lower() for f in (reader.fieldnames or [])]
            for need in ("file", "azimuth"):
                if need not in fields:
                    raise ValueError(
                        f"manifest {manifest}: no {need!r} column (header must name file, "
                        f"azimuth[, elevation]; got {fields})"
                    )
            rows = [
                {str(k).strip().lower(): v for k, v in r.items() if k is not None} for r in reader
            ]
    else:
        raise ValueError(f"manifest {manifest}: expected a .csv or .json file")
    return rows, meta


def _load_manifest(manifest: Path) -> TrialFrames:
    rows, meta = _read_manifest(manifest)
    base = manifest.parent
    frames: List[Frame] = []
    listed: Dict[Path, int] = {}
    for n, row in enumerate(rows, start=1):
        where = f"entry {n}"
        name = row.get("file")
        if not name or not str(name).strip():
            raise ValueError(f"manifest {manifest}: {where} has no file")
        path = (base / str(name).strip()).resolve()
        if path in listed:
            raise ValueError(f"manifest {manifest}: file {name!r} is listed twice")
        if not path.is_file():
            raise ValueError(f"manifest {manifest}: file {name!r} is listed but missing ({path})")
        listed[path] = n
        if "azimuth" not in row or row["azimuth"] in (None, ""):
            raise ValueError(f"manifest {manifest}: {where} ({name}) has no azimuth")
        az = _number(manifest, f"{where} ({name})", "azimuth", row["azimuth"])
        el_raw = row.get("elevation")
        el = 0.0 if el_raw in (None, "") else _number(manifest, where, "elevation", el_raw)
        frames.append(Frame(path, az, el, None, None))
    if not frames:
        raise ValueError(f"no frames: manifest {manifest} lists no frames")
    unlisted: List[str] = []
    for folder in sorted({p.parent for p in listed} | {base.resolve()}):
        unlisted += [str(p) for p in _images_in(folder) if p.resolve() not in listed]
    if unlisted:
        shown = ", ".join(unlisted[:5]) + (" ..." if len(unlisted) > 5 else "")
        raise ValueError(
            f"manifest {manifest}: {len(unlisted)} image(s) without manifest entries: {shown}"
        )
    seed = meta.get("seed")
    obj = meta.get("object")
    experiment = meta.get("experiment")
    return TrialFrames(
        source=base,
        kind="manifest",
        frames=frames,
        name=base.name or str(base),
        object_name=str(obj) if obj else None,
        seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
        experiment=str(experiment) if experiment is not None else None,
        camera={"manifest": str(manifest), "elevation_default": 0.0},
    )


def load_trial(path: PathLike, *, iteration: Optional[int] = None) -> TrialFrames:
    """Frames and cameras of a threestudio trial folder, an image folder with a manifest, or a
    manifest file.

    Raises:
        FileNotFoundError: ``path`` (or a trial's ``configs/parsed.yaml``) does not exist, or a
            folder is neither a trial nor holds a manifest.
        ValueError: no frames, an unknown ``iteration``, a manifest that does not match its folder,
            or a config without a known test camera ring.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such folder")
    if iteration is not None:
        _check_int("iteration", iteration, 0)
    if p.is_file():
        if iteration is not None:
            raise ValueError(f"iteration: only applies to threestudio trial folders, not {p}")
        return _load_manifest(p)
    if (p / "configs" / "parsed.yaml").exists() or (p / "save").is_dir():
        return _load_threestudio(p, iteration)
    manifests = [p / m for m in MANIFEST_NAMES if (p / m).is_file()]
    if len(manifests) > 1:
        raise ValueError(f"{p}: holds both manifest.json and manifest.csv; keep one")
    if manifests:
        if iteration is not None:
            raise ValueError(f"iteration: only applies to threestudio trial folders, not {p}")
        return _load_manifest(manifests[0])
    raise FileNotFoundError(
        f"{p}: neither a threestudio trial (configs/parsed.yaml, save/it*-test/) nor a folder "
        "with a manifest.csv or manifest.json (file, azimuth[, elevation])"
    )


# --------------------------------------------------------------------------------------------
# Evaluation of one object
# --------------------------------------------------------------------------------------------


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
    batch_size = _check_int("batch_size", batch_size, 1)
    name = object_name if object_name is not None else frames.object_name
    if not name or not str(name).strip():
        raise ValueError(
            f"object_name: none given and {frames.source} records no prompt/object; pass one"
        )
    labels = _check_views("classifier.labels", list(classifier.labels))
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
    dup = _duplicates(az, el)
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
                "azimuth_wrapped": _wrap(f.azimuth),
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


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Tuple[float, float]:
    """Wilson score interval of a binomial proportion at a ``confidence`` level (``n >= 1``)."""
    n = _check_int("n", n, 1)
    confidence = _check_float("confidence", confidence, 0.5, 0.9999)
    return stats.wilson_interval(successes, n, stats.z_value(confidence))


def bootstrap_mean_interval(
    values: Sequence[float], confidence: float = 0.95, n_boot: int = 10000, seed: int = 0
) -> Tuple[float, float]:
    """Percentile-bootstrap interval of a mean (seeded; a single value gives a zero-width one)."""
    import numpy as np

    confidence = _check_float("confidence", confidence, 0.5, 0.9999)
    n_boot = _check_int("n_boot", n_boot, 1)
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
        "janus_rate_ci": list(wilson_interval(k, n, confidence)) if n else None,
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
    confidence = _check_float("confidence", confidence, 0.5, 0.9999)
    n_boot = _check_int("n_boot", n_boot, 1)
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


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "object"


def _unique_slugs(names: Sequence[str]) -> List[str]:
    used: Dict[str, int] = {}
    out = []
    for name in names:
        s = _slug(name)
        if s in used:
            used[s] += 1
            s = f"{s}-{used[s]}"
        else:
            used[s] = 1
        out.append(s)
    return out


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
    with open(path, "w", newline="", encoding="utf-8") as fp:
        w = csv.writer(fp)
        w.writerow(columns)
        for row in rows:
            w.writerow([_fmt(row.get(c)) for c in columns])
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
    slugs = _unique_slugs([r.name for r in reports])
    paths: Dict[str, Any] = {}

    doc: Dict[str, Any] = dict(extra or {})
    doc["aggregate"] = dict(aggregate_result) if aggregate_result is not None else None
    doc["objects"] = [dict(r.to_dict(), id=s) for r, s in zip(reports, slugs)]
    paths["json"] = out / "janus_report.json"
    with open(paths["json"], "w", encoding="utf-8") as fp:
        json.dump(doc, fp, indent=2)

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
                "plots: matplotlib is not installed (pip install matplotlib), or skip the plots "
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


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

TINY_CLIP_NOTE = (
    "no --clip given: the classifier is a tiny RANDOM CLIP built for smoke tests; its labels, "
    "accuracies and Janus flags are meaningless"
)


def build_parser(prog: str = "threestudio-perpneg eval3d") -> argparse.ArgumentParser:
    """Parser of the ``eval3d`` command."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Janus evaluator: classify the test renders of threestudio trials (or image "
        "folders with an azimuth manifest) into front/side/back with zero-shot CLIP, score them "
        "against the cameras, flag Janus objects, and aggregate over objects x seeds. Writes "
        "janus_report.json, objects.csv, frames.csv, aggregate.csv and PNG plots to --out.",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="TRIAL_OR_FOLDER",
        help="threestudio trial folder (configs/parsed.yaml + save/it*-test/), image folder "
        "with manifest.csv/manifest.json (file, azimuth[, elevation]), or a manifest file",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--clip",
        metavar="MODEL",
        help="CLIP hub id or local folder (default: a tiny random CLIP; meaningless numbers)",
    )
    p.add_argument(
        "--backend",
        choices=("transformers", "open_clip"),
        default="transformers",
        help="CLIP implementation (default transformers)",
    )
    p.add_argument(
        "--object",
        metavar="TEXT",
        help='object name in the view prompts, e.g. "a corgi" (default: each trial\'s '
        "system.prompt_processor.prompt, or a JSON manifest's object)",
    )
    p.add_argument(
        "--iteration", type=int, help="use save/it<N>-test/ (default: the latest iteration)"
    )
    p.add_argument("--device", default="cpu", help="torch device of the classifier (default cpu)")
    p.add_argument("--batch-size", type=int, default=16, help="images per classifier call")
    g = p.add_argument_group("thresholds (reported in the output)")
    g.add_argument("--front-threshold", type=float, default=45.0, help="front camera: |az| < T")
    g.add_argument("--back-threshold", type=float, default=45.0, help="back camera: |az| > 180-T")
    g.add_argument(
        "--overhead-threshold", type=float, default=60.0, help="overhead camera: elevation > T"
    )
    g.add_argument(
        "--include-overhead",
        action="store_true",
        help="score 'overhead' as a view (default: predictions among front/side/back only and "
        "overhead cameras excluded from the accuracy)",
    )
    g.add_argument(
        "--back-front-min",
        type=int,
        default=1,
        help="front predictions at back cameras that flag Janus (default 1)",
    )
    g.add_argument(
        "--min-segment",
        type=int,
        default=1,
        help="frames a run of front predictions needs to count as a segment (default 1)",
    )
    g.add_argument(
        "--score-margin",
        type=float,
        default=0.0,
        help="front must beat the next label's score by this much to count for Janus (default 0)",
    )
    a = p.add_argument_group("aggregation")
    a.add_argument("--confidence", type=float, default=0.95, help="CI level (default 0.95)")
    a.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples")
    a.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    o = p.add_argument_group("output")
    o.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    o.add_argument("--thumbnails", type=int, default=8, help="thumbnails per plot (default 8)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    from ..commands.quiet import add_verbose_argument  # issue 9: quiet by default

    add_verbose_argument(o)
    return p


def _build_classifier(ns: argparse.Namespace, out: Path) -> Tuple[Any, Dict[str, Any]]:
    from .classifier import ViewClassifier

    if ns.clip:
        clf = ViewClassifier.from_pretrained(ns.clip, device=ns.device, backend=ns.backend)
        return clf, {"model": ns.clip, "backend": ns.backend, "tiny_random": False}
    from ..tiny.builders import build_tiny_clip

    target = (out / "tiny-clip").absolute()
    print(f"eval3d: building a tiny random CLIP in {target} ...", file=sys.stderr)
    path = build_tiny_clip(target, seed=0, overwrite=True)
    clf = ViewClassifier.from_pretrained(str(path), device=ns.device)
    info = {"model": str(path), "backend": "transformers", "tiny_random": True}
    return clf, dict(info, note=TINY_CLIP_NOTE)


def run(ns: argparse.Namespace) -> Dict[str, Any]:
    """Run the ``eval3d`` command from parsed arguments; returns the written paths."""
    config = JanusConfig(
        front_threshold=ns.front_threshold,
        back_threshold=ns.back_threshold,
        overhead_threshold=ns.overhead_threshold,
        include_overhead=ns.include_overhead,
        back_front_min=ns.back_front_min,
        min_segment=ns.min_segment,
        score_margin=ns.score_margin,
    )
    _check_int("batch_size", ns.batch_size, 1)
    _check_int("thumbnails", ns.thumbnails, 0)
    _check_float("confidence", ns.confidence, 0.5, 0.9999)
    _check_int("bootstrap", ns.bootstrap, 1)
    trials = [load_trial(p, iteration=ns.iteration) for p in ns.inputs]
    for t in trials:
        if ns.object is None and not t.object_name:
            raise ValueError(
                f'object: {t.source} records no prompt/object name; pass --object "a corgi"'
            )
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    classifier, info = _build_classifier(ns, out)
    if info.get("tiny_random"):
        print(f"eval3d: warning: {TINY_CLIP_NOTE}", file=sys.stderr)
    progress = not ns.no_progress
    reports = []
    if progress:
        from tqdm.auto import tqdm

        iterator: Iterable[TrialFrames] = tqdm(trials, desc="eval3d", unit="object")
    else:
        iterator = trials
    for t in iterator:
        reports.append(
            evaluate_object(
                t, classifier, ns.object, config, batch_size=ns.batch_size, progress=progress
            )
        )
    agg = aggregate(reports, confidence=ns.confidence, n_boot=ns.bootstrap, seed=ns.seed)
    paths = write_reports(
        reports,
        agg,
        out,
        plots=not ns.no_plots,
        thumbnails=ns.thumbnails,
        extra={"classifier": info, "inputs": [str(p) for p in ns.inputs]},
    )
    overall = agg["overall"]
    rate, (lo, hi) = overall["janus_rate"], overall["janus_rate_ci"]
    line = f"eval3d: {overall['n']} object(s): Janus rate {rate:.3f} [{lo:.3f}, {hi:.3f}]"
    if overall["mean_view_accuracy"] is not None:
        line += f", mean view accuracy {overall['mean_view_accuracy']:.3f}"
        if overall["mean_view_accuracy_ci"] is not None:
            alo, ahi = overall["mean_view_accuracy_ci"]
            line += f" [{alo:.3f}, {ahi:.3f}]"
    print(line + f" ({int(agg['confidence'] * 100)}% CI) -> {paths['json']}")
    if info.get("tiny_random"):
        print("eval3d: (tiny random CLIP: these numbers are meaningless)")
    return paths


def main(argv: Optional[Sequence[str]] = None, prog: str = "threestudio-perpneg eval3d") -> int:
    """``eval3d`` entry point; returns the exit code (2 for bad inputs)."""
    parser = build_parser(prog)
    ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        run(ns)
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
