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

Modules: :mod:`.flags` (thresholds, camera buckets, Janus flags), :mod:`.trials` (loading
trial folders and manifests), :mod:`.metrics` (scoring one object, aggregation), :mod:`.report`
(JSON / CSV writers), :mod:`.plots` (matplotlib, imported only when plotting), :mod:`.cli` (the
``eval3d`` command). This package re-exports their public names.
"""

from __future__ import annotations

from .cli import TINY_CLIP_NOTE, build_parser, main, run
from .flags import (
    KNOWN_VIEWS,
    JanusConfig,
    camera_bucket,
    camera_buckets,
    janus_flags,
    threestudio_test_azimuths,
)
from .metrics import (
    ClassifierLike,
    ObjectReport,
    aggregate,
    bootstrap_mean_interval,
    evaluate_object,
    wilson_interval,
)
from .report import AGGREGATE_COLUMNS, FRAME_COLUMNS, OBJECT_COLUMNS, write_reports
from .trials import IMAGE_SUFFIXES, THREESTUDIO_CAMERA_DEFAULTS, Frame, TrialFrames, load_trial

__all__ = [
    "KNOWN_VIEWS",
    "IMAGE_SUFFIXES",
    "THREESTUDIO_CAMERA_DEFAULTS",
    "TINY_CLIP_NOTE",
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
    "run",
]
