"""Tests of the 3D Janus evaluator (threestudio_perpneg.eval.janus).

Expected values are derived here independently: test-ring azimuths from ``numpy.linspace`` with the
endpoint (threestudio's ``RandomCameraDataset`` for the test split), camera buckets from the
thresholds with plain ``math``, front segments by counting circular label transitions. Aggregation
logic uses a stand-in classifier that reads the view painted into synthetic renders; one end-to-end
test runs the real ViewClassifier on a tiny random CLIP.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import random
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import pytest
import torch
import yaml
from helpers import raises_naming
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from threestudio_perpneg.eval import janus
from threestudio_perpneg.eval.janus import (
    AGGREGATE_COLUMNS,
    OBJECT_COLUMNS,
    JanusConfig,
    aggregate,
    bootstrap_mean_interval,
    camera_bucket,
    evaluate_object,
    janus_flags,
    load_trial,
    wilson_interval,
    write_reports,
)
from threestudio_perpneg.eval.janus import cli as janus_cli

LABELS = ("front", "side", "back", "overhead")
COLORS = {
    "front": (255, 0, 0),
    "side": (0, 255, 0),
    "back": (0, 0, 255),
    "overhead": (255, 255, 255),
}


# --------------------------------------------------------------------------------------------
# Independent references and the stand-in classifier
# --------------------------------------------------------------------------------------------


def wrap(az: float) -> float:
    a = math.fmod(az, 360.0)
    if a > 180.0:
        a -= 360.0
    if a <= -180.0:
        a += 360.0
    return a


def true_bucket(az: float, el: float = 0.0, front=45.0, back=45.0, overhead=60.0) -> str:
    if el > overhead:
        return "overhead"
    a = abs(wrap(az))
    if a > 180.0 - back:
        return "back"
    if a < front:
        return "front"
    return "side"


def ring_segments(labels: Sequence[str]) -> int:
    """Circular runs of "front": the number of front labels whose predecessor is not front."""
    n = len(labels)
    if n and all(lab == "front" for lab in labels):
        return 1
    return sum(1 for i in range(n) if labels[i] == "front" and labels[i - 1] != "front")


class PaintedViewClassifier:
    """Stand-in classifier: the view is the colour painted into the (whole) image."""

    def __init__(self, labels: Sequence[str] = LABELS, top: float = 0.7) -> None:
        self.labels = tuple(labels)
        self.top = top
        self.sizes: List[tuple] = []
        self.objects: List[str] = []

    def scores(self, images: Sequence[Any], object_name: str) -> torch.Tensor:
        self.objects.append(object_name)
        rows = []
        for im in images:
            self.sizes.append(im.size)
            colors = im.getcolors()
            assert colors is not None and len(colors) == 1, "the render panel was not cropped"
            rgb = colors[0][1]
            view = next(v for v, c in COLORS.items() if c == rgb)
            rest = (1.0 - self.top) / (len(self.labels) - 1)
            rows.append([self.top if lab == view else rest for lab in self.labels])
        return torch.tensor(rows)


def paint(path: Path, view: str, size=(16, 16), panels: int = 1) -> None:
    """A synthetic render of ``view``; extra panels mimic threestudio's normal/opacity columns."""
    w, h = size
    img = Image.new("RGB", (w * panels, h), (128, 128, 128))
    img.paste(Image.new("RGB", (w, h), COLORS[view]), (0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def make_trial(
    root: Path,
    *,
    n: int = 12,
    view_at: Callable[[float], str] = true_bucket,
    iteration: int = 100,
    older: Optional[int] = 50,
    data: Optional[Dict[str, Any]] = None,
    data_type: str = "random-camera-datamodule",
    prompt: Optional[str] = "a corgi",
    seed: int = 3,
    name: str = "perpneg-dreamfusion-sd",
    tag: str = "a_corgi@20240101-000000",
    size=(16, 16),
) -> Path:
    """A threestudio trial folder: configs/parsed.yaml and save/it<iteration>-test/<i>.png (three
    panels wide, written in shuffled order), an older it<older>-test of back views and the mp4."""
    trial = root / name / tag
    (trial / "configs").mkdir(parents=True)
    if data is None:
        data = {
            "n_test_views": n,
            "eval_elevation_deg": 10.0,
            "eval_camera_distance": 2.0,
            "eval_width": size[0],
            "eval_height": size[1],
            "batch_size": 1,
        }
    system: Dict[str, Any] = {"prompt_processor": {}}
    if prompt is not None:
        system["prompt_processor"]["prompt"] = prompt
    cfg = {
        "name": name,
        "tag": tag,
        "seed": seed,
        "data_type": data_type,
        "data": data,
        "system_type": "dreamfusion-system",
        "system": system,
    }
    (trial / "configs" / "parsed.yaml").write_text(yaml.safe_dump(cfg))
    azimuths = np.linspace(0.0, 360.0, n)  # threestudio: linspace(0, 360, n_test_views)
    order = list(range(n))
    random.Random(0).shuffle(order)
    for it, fn in ((iteration, view_at), (older, lambda az: "back")):
        if it is None:
            continue
        for i in order:
            paint(trial / "save" / f"it{it}-test" / f"{i}.png", fn(float(azimuths[i])), size, 3)
    (trial / "save" / f"it{iteration}-test.mp4").write_bytes(b"not a video")
    return trial


def write_manifest_folder(folder: Path, rows: List[Dict[str, Any]], kind: str = "csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for r in rows:
        paint(folder / r["file"], r.pop("view"))
    if kind == "csv":
        path = folder / "manifest.csv"
        keys = sorted({k for r in rows for k in r}, key=["file", "azimuth", "elevation"].index)
        with open(path, "w", newline="") as fp:
            w = csv.DictWriter(fp, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    else:
        path = folder / "manifest.json"
        path.write_text(json.dumps({"object": "a lion bust", "seed": 7, "frames": rows}))
    return path


# --------------------------------------------------------------------------------------------
# Camera buckets and Janus flags on constructed label rings
# --------------------------------------------------------------------------------------------

RING = [float(a) for a in range(0, 360, 30)]  # 12 cameras, front at 0


def test_camera_bucket_matches_reference():
    for az in [-180, -135.1, -134.9, -45, -44.9, 0, 44.9, 45, 90, 134.9, 135.1, 180, 359, 360]:
        for el in (0.0, 15.0, 61.0):
            assert camera_bucket(az, el) == true_bucket(az, el), (az, el)
    assert camera_bucket(100, front=120, back=30) == "front"
    assert camera_bucket(0, 70, overhead=80) == "front"


def test_single_front_segment_is_not_janus():
    labels = [true_bucket(a) for a in RING]
    flags = janus_flags(RING, labels)
    assert flags["front_segments"] == 1 and not flags["front_at_back"] and not flags["janus"]
    assert flags["segments"][0]["length"] == 3  # -30, 0, 30


def test_front_at_back_is_janus():
    labels = [true_bucket(a) for a in RING]
    labels[RING.index(180.0)] = "front"
    flags = janus_flags(RING, labels)
    assert flags["front_at_back"] and flags["janus"]
    assert flags["n_front_at_back"] == 1 and flags["front_at_back_azimuths"] == [180.0]
    # threshold: one front at the back is not enough for back_front_min=2, two are
    assert not janus_flags(RING, labels, back_front_min=2, min_segment=3)["janus"]
    labels[RING.index(150.0)] = "front"
    flags = janus_flags(RING, labels, back_front_min=2, min_segment=3)
    assert flags["front_at_back"] and flags["n_front_at_back"] == 2


def test_two_front_segments_are_janus_and_min_segment():
    labels = [true_bucket(a) for a in RING]
    labels[RING.index(90.0)] = "front"  # a side camera: not front-at-back, a second segment
    flags = janus_flags(RING, labels)
    assert not flags["front_at_back"] and flags["front_segments"] == 2 and flags["janus"]
    flags = janus_flags(RING, labels, min_segment=2)  # the stray one-frame segment is ignored
    assert flags["front_segments"] == 1 and not flags["janus"]
    labels[RING.index(120.0)] = "front"  # now two frames long
    assert janus_flags(RING, labels, min_segment=2)["front_segments"] == 2
    assert janus_flags(RING, labels, min_segment=3)["front_segments"] == 1


def test_wrap_around_segment_counts_once():
    # fronts at 150, 180, 210 (= -150): one run across ±180, in any input order
    labels = ["front" if a in (150.0, 180.0, 210.0) else "side" for a in RING]
    flags = janus_flags(RING, labels, back_front_min=99)
    assert flags["front_segments"] == 1 and not flags["janus"]
    seg = flags["segments"][0]
    assert (seg["start_azimuth"], seg["end_azimuth"], seg["length"]) == (150.0, -150.0, 3)
    order = list(range(len(RING)))
    random.Random(1).shuffle(order)
    shuffled = janus_flags([RING[i] for i in order], [labels[i] for i in order], back_front_min=99)
    assert shuffled["front_segments"] == 1
    # the front segment of a 0..360 ring is split by file order (0, 30 ... 330, 360) but is one
    ring = [float(a) for a in np.linspace(0, 360, 13)]
    labels = [true_bucket(a) for a in ring]
    assert labels[0] == labels[-1] == "front" and labels[-2] == "front"
    flags = janus_flags(ring, labels)
    assert flags["front_segments"] == 1 and not flags["janus"]
    assert flags["n_ring_frames"] == 12  # 360 repeats 0


def test_score_margin_weak_fronts():
    labels = [true_bucket(a) for a in RING]
    labels[RING.index(180.0)] = "front"
    margins = [0.5] * len(RING)
    margins[RING.index(180.0)] = 0.05
    flags = janus_flags(RING, labels, margins=margins, score_margin=0.1)
    assert not flags["janus"] and flags["front_segments"] == 1
    assert janus_flags(RING, labels, margins=margins, score_margin=0.01)["janus"]
    # a weak front inside a run does not split it
    labels = ["front" if a in (330.0, 0.0, 30.0) else "side" for a in RING]
    margins = [0.5] * len(RING)
    margins[RING.index(0.0)] = 0.0
    flags = janus_flags(RING, labels, margins=margins, score_margin=0.2)
    assert flags["front_segments"] == 1 and flags["segments"][0]["length"] == 3


def test_all_front_ring_is_one_segment_and_janus_at_back():
    flags = janus_flags(RING, ["front"] * len(RING))
    assert flags["front_segments"] == 1 and flags["front_at_back"]
    flags = janus_flags(RING, ["side"] * len(RING))
    assert flags["front_segments"] == 0 and not flags["janus"]


@settings(deadline=None, max_examples=60)
@given(st.lists(st.sampled_from(["front", "side", "back"]), min_size=1, max_size=24))
def test_front_segments_match_transition_count(labels):
    n = len(labels)
    azimuths = [360.0 * i / n - 180.0 for i in range(n)]
    flags = janus_flags(azimuths, labels, back_front_min=10_000)
    assert flags["front_segments"] == ring_segments(labels)
    assert flags["janus"] == (ring_segments(labels) >= 2)


def test_janus_flags_bad_inputs():
    raises_naming(lambda: janus_flags(RING, ["front"] * 11), "labels")
    raises_naming(lambda: janus_flags(RING, ["frontal"] * 12), "labels", "frontal")
    raises_naming(lambda: janus_flags(RING, ["front"] * 12, min_segment=0), "min_segment")
    raises_naming(lambda: janus_flags(RING, ["front"] * 12, back_front_min=1.5), "back_front_min")
    raises_naming(lambda: janus_flags(RING, ["front"] * 12, score_margin=-0.1), "score_margin")
    raises_naming(lambda: janus_flags(RING, ["side"] * 12, back_threshold=200), "back_threshold")
    raises_naming(lambda: janus_flags(RING, ["side"] * 12, elevations=[0.0]), "elevations")


def test_config_validation_names_the_argument():
    for kwargs, name in [
        ({"front_threshold": -1}, "front_threshold"),
        ({"back_threshold": float("nan")}, "back_threshold"),
        ({"front_threshold": 100, "back_threshold": 100}, "back_threshold"),
        ({"overhead_threshold": 91}, "overhead_threshold"),
        ({"back_front_min": 0}, "back_front_min"),
        ({"min_segment": True}, "min_segment"),
        ({"score_margin": 2.0}, "score_margin"),
        ({"include_overhead": "yes"}, "include_overhead"),
    ]:
        raises_naming(lambda kwargs=kwargs: JanusConfig(**kwargs), name)
    assert JanusConfig().to_dict()["min_segment"] == 1


# --------------------------------------------------------------------------------------------
# Loading: threestudio trial folders
# --------------------------------------------------------------------------------------------


def test_trial_azimuths_from_config(tmp_path):
    n = 12
    trial = make_trial(tmp_path, n=n)
    frames = load_trial(trial)
    expected = np.linspace(0.0, 360.0, n)  # endpoint included: 0, 32.73, ..., 360
    assert frames.kind == "threestudio" and frames.iteration == 100
    assert len(frames.frames) == n
    for f in frames.frames:
        assert f.path.parent.name == "it100-test"
        assert f.index == int(f.path.stem)
        assert f.azimuth == pytest.approx(float(expected[f.index]), abs=1e-9)
        assert f.elevation == 10.0
        assert f.crop_width == 16
    assert [f.index for f in frames.frames] == list(range(n))
    assert frames.object_name == "a corgi" and frames.seed == 3
    assert frames.experiment == "perpneg-dreamfusion-sd"
    assert frames.name == "perpneg-dreamfusion-sd/a_corgi@20240101-000000"
    assert frames.camera["n_test_views"] == n and frames.camera["defaulted"] == []
    assert frames.camera["missing_indices"] == []
    assert frames.frames[0].load().size == (16, 16)  # first panel of the three


def test_trial_iteration_choice(tmp_path):
    trial = make_trial(tmp_path, iteration=100, older=50)
    older = load_trial(trial, iteration=50)
    assert older.iteration == 50 and {f.path.parent.name for f in older.frames} == {"it50-test"}
    raises_naming(lambda: load_trial(trial, iteration=75), "iteration", "[50, 100]")
    raises_naming(lambda: load_trial(trial, iteration=-1), "iteration")
    # the latest iteration is the largest number, not the last in lexical order
    paint(trial / "save" / "it1000-test" / "0.png", "side", panels=3)
    assert load_trial(trial).iteration == 1000


def test_trial_defaults_and_other_datamodules(tmp_path):
    # parsed.yaml holds only what the run set: threestudio's defaults fill in (120 views, 15°)
    trial = make_trial(tmp_path / "a", n=120, data={"batch_size": 1}, size=(8, 8))
    frames = load_trial(trial)
    assert frames.camera["n_test_views"] == 120
    assert "data.n_test_views" in frames.camera["defaulted"]
    assert {f.elevation for f in frames.frames} == {15.0}
    assert frames.frames[60].azimuth == pytest.approx(360.0 * 60 / 119)
    assert frames.frames[0].crop_width == 8  # panels narrower than eval_width: square panels
    # single-image runs keep the ring under data.random_camera
    trial = make_trial(
        tmp_path / "b",
        n=5,
        data_type="single-image-datamodule",
        data={"random_camera": {"n_test_views": 5, "eval_elevation_deg": 0.0}},
    )
    frames = load_trial(trial)
    assert [f.azimuth for f in frames.frames] == pytest.approx([0, 90, 180, 270, 360])
    assert {f.elevation for f in frames.frames} == {0.0}


def test_trial_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_trial(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_trial(tmp_path / "empty")
    trial = make_trial(tmp_path / "x", n=4)
    (trial / "configs" / "parsed.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="parsed.yaml"):
        load_trial(trial)
    trial = make_trial(tmp_path / "y", n=4, older=None)
    for p in (trial / "save" / "it100-test").iterdir():
        p.unlink()
    raises_naming(lambda: load_trial(trial), "no frames", "it100-test")
    (trial / "save" / "it100-test").rmdir()
    raises_naming(lambda: load_trial(trial), "no frames", "it*-test")
    trial = make_trial(tmp_path / "z", n=4)
    paint(trial / "save" / "it100-test" / "4.png", "front", panels=3)
    raises_naming(lambda: load_trial(trial), "4.png", "n_test_views=4")
    trial = make_trial(tmp_path / "w", n=4, data_type="multiview-camera-datamodule")
    raises_naming(lambda: load_trial(trial), "data_type", "manifest")


def test_trial_partial_ring_and_ignored_files(tmp_path):
    trial = make_trial(tmp_path, n=6, older=None)
    (trial / "save" / "it100-test" / "3.png").unlink()
    paint(trial / "save" / "it100-test" / "grid.png", "front")
    frames = load_trial(trial)
    assert [f.index for f in frames.frames] == [0, 1, 2, 4, 5]
    assert frames.camera["missing_indices"] == [3]
    assert frames.camera["ignored_files"] == ["grid.png"]


# --------------------------------------------------------------------------------------------
# Loading: image folders with a manifest
# --------------------------------------------------------------------------------------------


def _manifest_rows(views_at=true_bucket) -> List[Dict[str, Any]]:
    return [
        {"file": f"view_{int(a):03d}.png", "azimuth": a - 180.0, "view": views_at(a - 180.0)}
        for a in range(0, 360, 45)
    ]


def test_manifest_csv_and_json(tmp_path):
    path = write_manifest_folder(tmp_path / "csv", _manifest_rows())
    frames = load_trial(tmp_path / "csv")
    assert frames.kind == "manifest" and frames.object_name is None
    assert [f.azimuth for f in frames.frames] == [a - 180.0 for a in range(0, 360, 45)]
    assert {f.elevation for f in frames.frames} == {0.0}
    assert load_trial(path).frames == frames.frames  # the manifest file itself as the input
    rows = _manifest_rows()
    for r in rows:
        r["elevation"] = 20.0
    write_manifest_folder(tmp_path / "json", rows, kind="json")
    frames = load_trial(tmp_path / "json")
    assert frames.object_name == "a lion bust" and frames.seed == 7
    assert {f.elevation for f in frames.frames} == {20.0}


def test_manifest_mismatch_errors(tmp_path):
    path = write_manifest_folder(tmp_path / "a", _manifest_rows())
    (tmp_path / "a" / "view_045.png").unlink()
    raises_naming(lambda: load_trial(path), "manifest", "view_045.png", "missing")

    path = write_manifest_folder(tmp_path / "b", _manifest_rows())
    paint(tmp_path / "b" / "extra.png", "side")
    raises_naming(lambda: load_trial(path), "without manifest entries", "extra.png")

    path = write_manifest_folder(tmp_path / "c", _manifest_rows())
    path.write_text(path.read_text().replace("-135.0", "left"))
    raises_naming(lambda: load_trial(path), "azimuth", "'left'")

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "manifest.csv").write_text("name,angle\n")
    raises_naming(lambda: load_trial(tmp_path / "d"), "'file' column")

    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "manifest.json").write_text("[]")
    raises_naming(lambda: load_trial(tmp_path / "e"), "no frames")

    path = write_manifest_folder(tmp_path / "f", _manifest_rows())
    (tmp_path / "f" / "manifest.json").write_text("[]")
    raises_naming(lambda: load_trial(tmp_path / "f"), "manifest.json and manifest.csv")


# --------------------------------------------------------------------------------------------
# Evaluation of one object: label aggregation and view accuracy
# --------------------------------------------------------------------------------------------


def test_evaluate_true_views(tmp_path):
    n = 13  # azimuths 0, 30, ..., 360
    trial = make_trial(tmp_path, n=n)
    clf = PaintedViewClassifier()
    report = evaluate_object(load_trial(trial), clf, batch_size=5)
    assert clf.objects == ["a corgi"] * 3  # prompt from the config, 3 batches
    assert set(clf.sizes) == {(16, 16)}  # the RGB panel only
    assert report.view_accuracy == 1.0 and not report.is_janus
    assert report.n_scored == n - 1  # the 360° camera repeats the 0° one
    assert [f["duplicate"] for f in report.frames] == [False] * (n - 1) + [True]
    assert report.frames[-1]["scored"] is False and report.frames[-1]["correct"] is None
    buckets = [true_bucket(a) for a in np.linspace(0, 360, n)[:-1]]
    assert [f["camera_bucket"] for f in report.frames[:-1]] == buckets
    assert report.confusion == {v: {v: buckets.count(v)} for v in set(buckets)}
    assert report.frames[0]["scores"] == pytest.approx(
        {"front": 0.7, "side": 0.1, "back": 0.1, "overhead": 0.1}
    )
    assert report.janus["front_segments"] == 1
    assert [f["azimuth_wrapped"] for f in report.frames] == [
        wrap(a) for a in np.linspace(0, 360, n)
    ]
    assert report.config == JanusConfig().to_dict() and report.seed == 3


def test_evaluate_janus_object_and_accuracy(tmp_path):
    # a two-faced object: the back cameras (|az| > 135) see a face
    trial = make_trial(
        tmp_path, n=13, view_at=lambda az: "front" if abs(wrap(az)) > 135 else true_bucket(az)
    )
    report = evaluate_object(load_trial(trial), PaintedViewClassifier(), "a pug")
    backs = [a for a in np.linspace(0, 360, 13)[:-1] if true_bucket(a) == "back"]
    assert report.object_name == "a pug"
    assert report.is_janus and report.janus["front_at_back"]
    assert report.janus["n_front_at_back"] == len(backs) == 3
    assert report.janus["front_segments"] == 2
    assert report.view_accuracy == pytest.approx((12 - 3) / 12)
    assert report.confusion["back"] == {"front": 3}
    strict = evaluate_object(
        load_trial(trial),
        PaintedViewClassifier(),
        config=JanusConfig(back_front_min=4, min_segment=4),
    )
    assert not strict.is_janus and strict.janus["thresholds"]["back_front_min"] == 4


def test_overhead_excluded_or_included(tmp_path):
    rows = [
        {"file": f"{i}.png", "azimuth": a, "view": true_bucket(a)}
        for i, a in enumerate([0.0, 90.0, 180.0, -90.0])
    ]
    rows.append({"file": "top.png", "azimuth": 0.0, "elevation": 80.0, "view": "overhead"})
    for r in rows[:-1]:
        r["elevation"] = 0.0
    write_manifest_folder(tmp_path / "m", rows)
    frames = load_trial(tmp_path / "m")

    class PrefersOverhead(PaintedViewClassifier):
        def scores(self, images, object_name):
            s = super().scores(images, object_name)
            s[:, LABELS.index("overhead")] = 0.75  # overhead always wins the argmax
            return s

    rep = evaluate_object(frames, PrefersOverhead(), "a corgi")
    assert [f["predicted"] for f in rep.frames] == ["front", "side", "back", "side", "front"]
    assert rep.n_scored == 4 and rep.view_accuracy == 1.0  # overhead camera left out
    assert rep.frames[-1]["camera_bucket"] == "overhead" and rep.frames[-1]["scored"] is False
    rep = evaluate_object(frames, PrefersOverhead(), "a corgi", JanusConfig(include_overhead=True))
    assert [f["predicted"] for f in rep.frames] == ["overhead"] * 5
    assert rep.n_scored == 5 and rep.view_accuracy == pytest.approx(1 / 5)


def test_evaluate_bad_inputs(tmp_path):
    write_manifest_folder(tmp_path / "m", _manifest_rows())
    frames = load_trial(tmp_path / "m")
    raises_naming(lambda: evaluate_object(frames, PaintedViewClassifier()), "object_name")
    raises_naming(
        lambda: evaluate_object(frames, PaintedViewClassifier(LABELS + ("top",)), "x"),
        "classifier.labels",
        "'top'",
    )
    raises_naming(
        lambda: evaluate_object(frames, PaintedViewClassifier(("front", "back")), "x"),
        "classifier.labels",
        "side",
    )
    raises_naming(
        lambda: evaluate_object(
            frames,
            PaintedViewClassifier(("front", "side", "back")),
            "x",
            JanusConfig(include_overhead=True),
        ),
        "overhead",
    )

    class WrongShape(PaintedViewClassifier):
        def scores(self, images, object_name):
            return super().scores(images, object_name)[:, :3]

    raises_naming(lambda: evaluate_object(frames, WrongShape(), "x"), "classifier.scores")
    raises_naming(
        lambda: evaluate_object(frames, PaintedViewClassifier(), "x", batch_size=0), "batch_size"
    )


# --------------------------------------------------------------------------------------------
# Aggregation and confidence intervals
# --------------------------------------------------------------------------------------------


def test_wilson_interval_known_values_and_shrinks():
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    widths = []
    for n in (10, 40, 160, 640):
        lo, hi = wilson_interval(3 * n // 10, n)
        assert lo <= 0.3 <= hi
        widths.append(hi - lo)
    assert widths == sorted(widths, reverse=True) and widths[-1] < widths[0] / 4
    raises_naming(lambda: wilson_interval(3, 2), "successes")
    assert wilson_interval(0, 0) == (0.0, 1.0)  # one Wilson interval (eval.stats): n = 0 is (0, 1)
    raises_naming(lambda: wilson_interval(1, 2, confidence=1.5), "confidence")


def test_bootstrap_interval_seeded_contains_mean_and_shrinks():
    rng = np.random.default_rng(0)
    widths = []
    for n in (8, 32, 128):
        x = rng.uniform(0.3, 0.9, size=n).tolist()
        lo, hi = bootstrap_mean_interval(x, n_boot=2000, seed=1)
        assert lo <= float(np.mean(x)) <= hi
        assert (lo, hi) == bootstrap_mean_interval(x, n_boot=2000, seed=1)
        widths.append(hi - lo)
    assert widths == sorted(widths, reverse=True)
    assert bootstrap_mean_interval([0.4]) == (0.4, 0.4)
    raises_naming(lambda: bootstrap_mean_interval([]), "values")
    raises_naming(lambda: bootstrap_mean_interval([0.1], n_boot=0), "n_boot")


def _reports(tmp_path: Path) -> list:
    """Four objects x seeds: corgi seeds 0/1 (one Janus), lion seeds 0/1 (vanilla / perpneg)."""
    clf = PaintedViewClassifier()
    janus_view = lambda az: "front" if abs(wrap(az)) > 135 else true_bucket(az)  # noqa: E731
    specs = [
        ("corgi", 0, "perpneg", true_bucket),
        ("corgi", 1, "perpneg", janus_view),
        ("lion", 0, "vanilla", janus_view),
        ("lion", 1, "perpneg", true_bucket),
    ]
    out = []
    for obj, seed, exp, view_at in specs:
        trial = make_trial(
            tmp_path / f"{obj}{seed}{exp}",
            n=13,
            view_at=view_at,
            prompt=f"a {obj}",
            seed=seed,
            name=exp,
            tag=f"a_{obj}@x",
        )
        out.append(evaluate_object(load_trial(trial), clf))
    return out


def test_aggregate_over_objects_and_seeds(tmp_path):
    reports = _reports(tmp_path)
    agg = aggregate(reports, n_boot=500)
    overall = agg["overall"]
    assert overall["n"] == 4 and overall["janus_count"] == 2 and overall["janus_rate"] == 0.5
    assert overall["janus_rate_ci"] == pytest.approx(list(wilson_interval(2, 4)))
    accs = [r.view_accuracy for r in reports]
    assert overall["mean_view_accuracy"] == pytest.approx(sum(accs) / 4)
    lo, hi = overall["mean_view_accuracy_ci"]
    assert lo <= overall["mean_view_accuracy"] <= hi
    assert overall["seeds"] == [0, 1]
    assert agg["by_object"]["a corgi"]["janus_count"] == 1
    assert agg["by_object"]["a lion"]["n"] == 2
    assert agg["by_experiment"]["vanilla"]["janus_rate"] == 1.0
    assert agg["by_experiment"]["perpneg"]["janus_rate"] == pytest.approx(1 / 3)
    assert agg["config"] == JanusConfig().to_dict()
    single = aggregate(reports[:1])["overall"]  # one accuracy: no interval to bootstrap
    assert single["mean_view_accuracy_ci"] is None and single["janus_rate_ci"] == [
        0.0,
        pytest.approx(0.7935, abs=1e-4),
    ]
    assert aggregate(reports, n_boot=500, seed=4) == aggregate(reports, n_boot=500, seed=4)
    raises_naming(lambda: aggregate([]), "reports")


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def test_write_reports_consistent(tmp_path):
    reports = _reports(tmp_path / "trials")
    agg = aggregate(reports, n_boot=200)
    paths = write_reports(reports, agg, tmp_path / "out", plots=False, extra={"note": "test"})
    assert "plots" not in paths and not list((tmp_path / "out").glob("**/*.png"))
    doc = json.loads(paths["json"].read_text())
    assert doc["note"] == "test" and doc["aggregate"]["overall"]["janus_count"] == 2
    ids = [o["id"] for o in doc["objects"]]
    assert len(set(ids)) == 4
    with open(paths["objects_csv"]) as fp:
        objects = list(csv.DictReader(fp))
    assert tuple(objects[0]) == OBJECT_COLUMNS
    for row, obj in zip(objects, doc["objects"]):
        assert row["id"] == obj["id"] and int(row["janus"]) == obj["janus"]["janus"]
        assert float(row["view_accuracy"]) == obj["view_accuracy"]
        assert int(row["front_segments"]) == obj["janus"]["front_segments"]
        assert int(row["seed"]) == obj["seed"] and row["object"] == obj["object_name"]
    with open(paths["frames_csv"]) as fp:
        frames = list(csv.DictReader(fp))
    assert len(frames) == sum(len(o["frames"]) for o in doc["objects"]) == 4 * 13
    for row, f in zip(frames, doc["objects"][0]["frames"]):
        assert float(row["azimuth"]) == f["azimuth"] and row["predicted"] == f["predicted"]
        assert float(row["score_front"]) == f["scores"]["front"]
        assert row["correct"] == ("" if f["correct"] is None else str(int(f["correct"])))
    with open(paths["aggregate_csv"]) as fp:
        agg_rows = list(csv.DictReader(fp))
    assert tuple(agg_rows[0]) == AGGREGATE_COLUMNS
    assert agg_rows[0]["group"] == "overall" and float(agg_rows[0]["janus_rate"]) == 0.5
    lo, hi = doc["aggregate"]["overall"]["mean_view_accuracy_ci"]
    assert (
        float(agg_rows[0]["mean_view_accuracy_lo"]),
        float(agg_rows[0]["mean_view_accuracy_hi"]),
    ) == (lo, hi)
    assert {r["key"] for r in agg_rows if r["group"] == "object"} == {"a corgi", "a lion"}
    assert {r["key"] for r in agg_rows if r["group"] == "experiment"} == {"perpneg", "vanilla"}


def test_write_reports_plots(tmp_path):
    pytest.importorskip("matplotlib")
    reports = _reports(tmp_path / "trials")
    paths = write_reports(reports, aggregate(reports, n_boot=200), tmp_path / "out", thumbnails=4)
    assert len(paths["plots"]) == 4 and paths["summary_png"] == tmp_path / "out" / "summary.png"
    for png in paths["plots"] + [paths["summary_png"]]:
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width > 200
    # no thumbnails, and one object without an aggregate
    paths = write_reports(reports[:1], None, tmp_path / "out2", thumbnails=0)
    assert len(paths["plots"]) == 1 and "summary_png" not in paths


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def test_cli_with_stand_in(tmp_path, monkeypatch, capsys):
    trials = [
        make_trial(tmp_path / "t0", n=13, seed=0),
        make_trial(tmp_path / "t1", n=13, seed=1, view_at=lambda az: "front"),
    ]
    clf = PaintedViewClassifier()
    monkeypatch.setattr(janus_cli, "_build_classifier", lambda ns, out: (clf, {"model": "paint"}))
    out = tmp_path / "out"
    plots = importlib.util.find_spec("matplotlib") is not None
    argv = [str(t) for t in trials] + [
        "--out",
        str(out),
        "--min-segment",
        "2",
        "--object",
        "a pug",
        "--bootstrap",
        "200",
        "--thumbnails",
        "3",
    ]
    assert janus.main(argv + ([] if plots else ["--no-plots"])) == 0
    assert "2 object(s): Janus rate 0.500" in capsys.readouterr().out
    assert set(clf.objects) == {"a pug"}
    doc = json.loads((out / "janus_report.json").read_text())
    assert doc["classifier"] == {"model": "paint"}
    assert doc["aggregate"]["config"]["min_segment"] == 2
    assert {o["seed"] for o in doc["objects"]} == {0, 1}
    assert [o["janus"]["janus"] for o in doc["objects"]] == [False, True]
    if plots:
        assert (out / "summary.png").is_file() and len(list((out / "plots").glob("*.png"))) == 2


def test_cli_errors(tmp_path, capsys):
    assert janus.main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "missing" in capsys.readouterr().err
    trial = make_trial(tmp_path, n=4)
    assert janus.main([str(trial), "--out", str(tmp_path / "o"), "--min-segment", "0"]) == 2
    assert "min_segment" in capsys.readouterr().err
    assert janus.main([str(trial), "--out", str(tmp_path / "o"), "--front-threshold", "-5"]) == 2
    assert "front_threshold" in capsys.readouterr().err
    no_prompt = make_trial(tmp_path / "np", n=4, prompt=None)
    assert janus.main([str(no_prompt), "--out", str(tmp_path / "o")]) == 2
    assert "--object" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        janus.main(["--out", str(tmp_path / "o")])  # no input


# --------------------------------------------------------------------------------------------
# End to end on the real ViewClassifier with a tiny random CLIP
# --------------------------------------------------------------------------------------------


def _tiny_clip_builder():
    from threestudio_perpneg import tiny

    fn = getattr(tiny, "build_tiny_clip", None)
    if fn is None:
        pytest.skip("threestudio_perpneg.tiny.builders.build_tiny_clip has not landed yet")
    return fn


def test_end_to_end_tiny_clip(tmp_path, capsys):
    _tiny_clip_builder()
    from threestudio_perpneg.eval.classifier import ViewClassifier

    trials = [make_trial(tmp_path / f"t{s}", n=9, seed=s, size=(24, 24)) for s in (0, 1)]
    out = tmp_path / "out"
    # no --clip: the CLI builds a tiny random CLIP into OUT/tiny-clip and says so
    argv = [str(t) for t in trials] + ["--out", str(out), "--bootstrap", "100"]
    if importlib.util.find_spec("matplotlib") is None:
        argv.append("--no-plots")
    assert janus.main(argv) == 0  # with progress bars
    captured = capsys.readouterr()
    assert "meaningless" in captured.err and "meaningless" in captured.out
    doc = json.loads((out / "janus_report.json").read_text())
    assert doc["classifier"]["tiny_random"] is True and "meaningless" in doc["classifier"]["note"]
    assert doc["aggregate"]["overall"]["n"] == 2

    clf = ViewClassifier.from_pretrained(str(out / "tiny-clip"))
    report = evaluate_object(load_trial(trials[0]), clf)
    assert report.labels == list(LABELS)
    scores = torch.tensor([[f["scores"][lab] for lab in LABELS] for f in report.frames])
    assert scores.shape == (9, 4) and torch.allclose(scores.sum(1), torch.ones(9), atol=1e-5)
    predicted = [LABELS[int(i)] for i in scores[:, :3].argmax(1)]  # overhead excluded
    assert [f["predicted"] for f in report.frames] == predicted
    expected = janus_flags([f["azimuth"] for f in report.frames], predicted, elevations=[10.0] * 9)
    assert report.janus == expected
    scored = [f for f in report.frames if f["scored"]]
    assert report.view_accuracy == pytest.approx(
        sum(f["predicted"] == f["camera_bucket"] for f in scored) / len(scored)
    )
    assert report.frames == doc["objects"][0]["frames"]  # same model, same numbers


def test_cli_out_inside_a_file_exits_2_before_loading(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x", encoding="utf-8")
    trial = make_trial(tmp_path / "t", n=4)
    assert janus.main([str(trial), "--out", str(blocker / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err and "is a file" in err, err


def test_cli_help_shows_every_default():
    parser = janus.build_parser()
    missing = [
        a.option_strings[0]
        for a in parser._actions
        if a.option_strings
        and a.dest != "help"
        and not a.required
        and "default" not in (a.help or "")
    ]
    assert not missing, missing
    text = " ".join(parser.format_help().split())
    for shown in ("(default: 45.0)", "(default: 60.0)", "(default: 0.95)", "(default: 10000)"):
        assert shown in text
