"""Tests of the paper's 2D view-success protocol (``threestudio_perpneg.eval.eval2d``).

* end to end on the tiny random Stable Diffusion and CLIP (2 prompts × 2 views × 2 seeds × 3 modes,
  2 denoising steps at 64×64): every output is written and the counts agree across them;
* the success-rate arithmetic with a stand-in sampler and a stand-in classifier whose labels are
  known (the test is about aggregation, not about CLIP);
* the command line: tiny default models, and errors that exit 2 naming the argument.
"""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence

import pytest
import torch
from PIL import Image

from threestudio_perpneg.eval import eval2d
from threestudio_perpneg.eval.classifier import VIEW_LABELS, ViewClassifier
from threestudio_perpneg.eval.eval2d import (
    CSV_NAME,
    IMAGES_DIR,
    JSON_NAME,
    MD_NAME,
    PNG_NAME,
    build_parser,
    main,
    run_eval2d,
    success_table,
    wilson_interval,
)
from threestudio_perpneg.tiny.builders import build_tiny_clip

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a corgi", "a lion"]
VIEWS = ["side", "back"]
MODES = ["sd", "cebm", "perpneg"]
SEEDS = [0, 1]
SMALL = ["--steps", "2", "--height", "64", "--width", "64", "--no-progress"]

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _csv_rows(path: Path) -> List[Dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip") / "clip", seed=0)


@pytest.fixture(scope="module")
def e2e(
    tiny_sd_path: Path, tiny_clip_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Dict[str, Any]:
    """The full protocol on the tiny random models, through the command line."""
    out = tmp_path_factory.mktemp("eval2d")
    argv = [
        "--model",
        str(tiny_sd_path),
        "--clip",
        str(tiny_clip_path),
        "--prompts",
        "|".join(PROMPTS),
        "--views",
        ",".join(VIEWS),
        "--modes",
        ",".join(MODES),
        "--seeds",
        "0-1",
        "--out",
        str(out),
        *SMALL,
    ]
    assert main(argv) == 0
    return {"out": out, "report": json.loads((out / JSON_NAME).read_text(encoding="utf-8"))}


# ------------------------------------------------------------------------------- end to end
def test_end_to_end_outputs_and_consistent_counts(
    e2e: Dict[str, Any], tiny_clip_path: Path
) -> None:
    out, report = e2e["out"], e2e["report"]
    for name in (JSON_NAME, CSV_NAME, MD_NAME):
        assert (out / name).is_file()
    s = report["settings"]
    assert s["prompts"] == PROMPTS and s["views"] == VIEWS and s["modes"] == MODES
    assert s["seeds"] == SEEDS and s["num_inference_steps"] == 2
    assert (s["height"], s["width"], s["scheme"], s["device"]) == (64, 64, "threestudio", "cpu")
    assert s["clip"] == str(tiny_clip_path) and s["random_models"] == []
    assert s["labels"] == list(VIEW_LABELS)
    assert s["classifier"]["templates"]["side"][0] == "a side view of {object}"

    images = report["images"]
    assert len(images) == len(PROMPTS) * len(VIEWS) * len(MODES) * len(SEEDS) == 24
    keys = {(r["prompt"], r["view"], r["mode"], r["seed"]) for r in images}
    assert len(keys) == 24
    for r in images:
        assert (out / r["file"]).is_file()
        assert r["file"].startswith(f"{IMAGES_DIR}/")
        assert set(r["scores"]) == set(VIEW_LABELS)
        assert sum(r["scores"].values()) == pytest.approx(1.0, abs=1e-5)
        assert r["predicted"] == max(r["scores"], key=r["scores"].get)
        assert r["success"] == (r["predicted"] == r["view"])
    assert len(list((out / IMAGES_DIR).glob("*.png"))) == 24
    with Image.open(out / images[0]["file"]) as im:
        assert im.size == (64, 64)

    # one sampler call per prompt x view x mode (both seeds batched), with its weights
    assert len(report["calls"]) == 12 and all(c["seeds"] == SEEDS for c in report["calls"])
    assert all(c["weights"]["view"]["view"] == c["view"] for c in report["calls"])

    table = {(r["mode"], r["view"]): r for r in report["table"]}
    assert set(table) == {(m, v) for m in MODES for v in [*VIEWS, "all"]}
    for (m, v), row in table.items():
        rs = [r for r in images if r["mode"] == m and (v == "all" or r["view"] == v)]
        assert row["total"] == len(rs) == (8 if v == "all" else 4)
        assert row["successes"] == sum(r["success"] for r in rs)
        assert row["rate"] == pytest.approx(row["successes"] / row["total"])
        assert (row["ci_low"], row["ci_high"]) == pytest.approx(
            wilson_interval(row["successes"], row["total"])
        )
    for m in MODES:
        for v in VIEWS:
            counts = report["confusion"][m][v]
            assert sum(counts.values()) == 4
            assert counts[v] == table[(m, v)]["successes"]

    rows = _csv_rows(out / CSV_NAME)
    assert [(r["mode"], r["view"]) for r in rows] == [
        (r["mode"], r["view"]) for r in report["table"]
    ]
    for r, t in zip(rows, report["table"]):
        assert int(r["successes"]) == t["successes"] and int(r["total"]) == t["total"]
        assert float(r["success_rate"]) == pytest.approx(t["rate"], abs=1e-6)
        assert float(r["ci95_low"]) == pytest.approx(t["ci_low"], abs=1e-6)

    md = (out / MD_NAME).read_text(encoding="utf-8")
    assert "| mode | side | back | all |" in md
    for m in MODES:
        cell = table[(m, "side")]
        assert f"| {m} | {100 * cell['rate']:.1f} % ({cell['successes']}/4)" in md
    assert "73.1 %" in md and "40.4 %" in md
    assert "meaningless" not in md  # real (user-given) model paths: no tiny-model warning

    if _has_matplotlib():
        assert report["chart"] == PNG_NAME
        with Image.open(out / PNG_NAME) as im:
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200
    else:
        assert report["chart"] is None


def test_images_match_the_sampler(e2e: Dict[str, Any], tiny_sd_path: Path) -> None:
    """A saved image is the sampler's image for that prompt / view / mode / seeds."""
    from threestudio_perpneg.sampler.pipeline import PerpNegSampler

    out, report = e2e["out"], e2e["report"]
    rec = next(
        r
        for r in report["images"]
        if r["mode"] == "perpneg" and r["view"] == "back" and r["seed"] == 1
    )
    sampler = PerpNegSampler.from_pretrained(str(tiny_sd_path))
    res = sampler.generate_view(
        rec["prompt"],
        view="back",
        mode="perpneg",
        seeds=SEEDS,
        num_inference_steps=2,
        height=64,
        width=64,
        progress=False,
    )
    with Image.open(out / rec["file"]) as im:
        assert im.convert("RGB").tobytes() == res.images[1].convert("RGB").tobytes()


# --------------------------------------------------------------- aggregation with stand-ins
class StubResult:
    def __init__(self, images: List[Image.Image], weights: Dict[str, Any]) -> None:
        self.images = images
        self.weights = weights


class StubSampler:
    """Returns 8×8 images whose pixel encodes (mode, view, seed); records every call."""

    def __init__(self) -> None:
        self.calls: List[Dict[str, Any]] = []

    def generate_view(self, prompt: str, **kw: Any) -> StubResult:
        self.calls.append({"prompt": prompt, **kw})
        mode, view = MODES.index(kw["mode"]), VIEW_LABELS.index(kw["view"])
        images = [Image.new("RGB", (8, 8), (mode, view, seed)) for seed in kw["seeds"]]
        return StubResult(images, {"view": {"view": kw["view"]}})


#: successes by construction: mode -> the seeds whose image is classified as the requested view
RIGHT = {"sd": {0}, "cebm": {0, 1}, "perpneg": {0, 1, 2}}


class StubClassifier:
    """Labels known by construction: the requested view when the seed is in RIGHT[mode], else
    'front' (or 'side' when front was requested)."""

    labels = VIEW_LABELS

    def __init__(self) -> None:
        self.objects: List[str] = []

    def scores(self, images: Sequence[Image.Image], object_name: str) -> torch.Tensor:
        self.objects.append(object_name)
        rows = []
        for im in images:
            mode_i, view_i, seed = im.getpixel((0, 0))
            if seed in RIGHT[MODES[mode_i]]:
                label = view_i
            else:
                label = 0 if view_i != 0 else 1
            row = torch.full((4,), 0.1)
            row[label] = 0.7
            rows.append(row)
        return torch.stack(rows)


def test_success_rate_arithmetic_with_stand_ins(tmp_path: Path) -> None:
    sampler, clf = StubSampler(), StubClassifier()
    report = run_eval2d(
        sampler,
        clf,
        ["a corgi", "a lion", "a tiger cub"],
        tmp_path,
        views=["side", "back"],
        modes=MODES,
        seeds="0-4",
        num_inference_steps=7,
        guidance_scale=5.0,
        scheme="authors",
        batch_size=2,
        progress=False,
        chart=False,
    )
    # seeds 0-4 in chunks of at most 2 -> 3 calls per prompt x view x mode
    assert len(sampler.calls) == 3 * 2 * 3 * 3
    assert [c["seeds"] for c in sampler.calls[:3]] == [[0, 1], [2, 3], [4]]
    first = sampler.calls[0]
    assert first["prompt"] == "a corgi" and first["view"] == "side" and first["mode"] == "sd"
    assert (first["num_inference_steps"], first["guidance_scale"], first["scheme"]) == (
        7,
        5.0,
        "authors",
    )
    assert first["progress"] is False and first["height"] is None
    assert set(clf.objects) == {"a corgi", "a lion", "a tiger cub"}  # object name = the prompt

    table = {(r["mode"], r["view"]): r for r in report["table"]}
    n = 3 * 5  # prompts x seeds per cell
    for mode, right in RIGHT.items():
        k = 3 * len(right)
        for view in ("side", "back"):
            row = table[(mode, view)]
            assert (row["successes"], row["total"]) == (k, n)
            assert row["rate"] == pytest.approx(k / n)
            assert (row["ci_low"], row["ci_high"]) == pytest.approx(wilson_interval(k, n))
        assert (table[(mode, "all")]["successes"], table[(mode, "all")]["total"]) == (2 * k, 2 * n)
    assert table[("perpneg", "side")]["rate"] == pytest.approx(0.6)
    assert report["confusion"]["sd"]["back"] == {"front": 12, "side": 0, "back": 3, "overhead": 0}
    wrong = [r for r in report["images"] if not r["success"]]
    assert all(r["predicted"] == "front" and r["seed"] not in RIGHT[r["mode"]] for r in wrong)

    rows = _csv_rows(tmp_path / CSV_NAME)
    assert rows[0] == {
        "mode": "sd",
        "view": "side",
        "successes": "3",
        "total": "15",
        "success_rate": "0.200000",
        "ci95_low": f"{wilson_interval(3, 15)[0]:.6f}",
        "ci95_high": f"{wilson_interval(3, 15)[1]:.6f}",
    }
    md = (tmp_path / MD_NAME).read_text(encoding="utf-8")
    lo, hi = wilson_interval(9, 15)
    assert f"| perpneg | 60.0 % (9/15) [{100 * lo:.1f}, {100 * hi:.1f}] |" in md
    assert "| a tiger cub | perpneg | 3/5 | 3/5 |" in md
    assert report["chart"] is None and not (tmp_path / PNG_NAME).exists()
    assert len(report["images"]) == 90 and len(list((tmp_path / IMAGES_DIR).iterdir())) == 90


def test_bar_chart_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    report = run_eval2d(
        StubSampler(), StubClassifier(), ["a corgi"], tmp_path, seeds=[0, 1], progress=False
    )
    assert report["chart"] == PNG_NAME
    with Image.open(tmp_path / PNG_NAME) as im:
        assert im.format == "PNG"


def test_wilson_interval_known_values() -> None:
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    assert wilson_interval(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-5)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(731, 1000)
    assert lo < 0.731 < hi and hi - lo == pytest.approx(
        2 * 1.96 * math.sqrt(0.731 * 0.269 / 1000), rel=0.02
    )
    for bad in ((3, 2), (-1, 2), (1, -1)):
        with pytest.raises(ValueError, match="successes|total"):
            wilson_interval(*bad)


def test_success_table_empty_cell() -> None:
    rows = success_table([], ["perpneg"], ["side"], with_all=False)
    assert rows == [
        {
            "mode": "perpneg",
            "view": "side",
            "successes": 0,
            "total": 0,
            "rate": None,
            "ci_low": 0.0,
            "ci_high": 1.0,
        }
    ]


def test_library_validation(tmp_path: Path) -> None:
    class Front3(StubClassifier):
        labels = ("front", "side", "back")

    with pytest.raises(ValueError, match=r"views: requested view\(s\) \['overhead'\]"):
        run_eval2d(
            StubSampler(), Front3(), ["a corgi"], tmp_path, views=["overhead"], progress=False
        )
    with pytest.raises(ValueError, match="views: unknown name 'top'"):
        run_eval2d(
            StubSampler(), StubClassifier(), ["a corgi"], tmp_path, views=["top"], progress=False
        )
    with pytest.raises(ValueError, match="modes: unknown name 'dds'"):
        run_eval2d(
            StubSampler(), StubClassifier(), ["a corgi"], tmp_path, modes=["dds"], progress=False
        )
    with pytest.raises(ValueError, match="prompts: the prompt 'a corgi' is repeated"):
        run_eval2d(
            StubSampler(), StubClassifier(), ["a corgi", "a corgi"], tmp_path, progress=False
        )
    with pytest.raises(ValueError, match="prompts: expected a list"):
        run_eval2d(StubSampler(), StubClassifier(), "a corgi", tmp_path, progress=False)
    with pytest.raises(ValueError, match="seeds"):
        run_eval2d(
            StubSampler(), StubClassifier(), ["a corgi"], tmp_path, seeds="3-1", progress=False
        )


# ------------------------------------------------------------------------------- command line
def test_parser_defaults() -> None:
    ns = build_parser().parse_args(["--prompts", "a corgi"])
    assert ns.views == ["side", "back"] and ns.modes == ["sd", "cebm", "perpneg"]
    assert ns.seeds == "0-3" and ns.steps == 50 and ns.guidance_scale == 7.5
    assert ns.scheme == "threestudio" and ns.labels == list(VIEW_LABELS)
    assert ns.model is None and ns.clip is None and ns.clip_backend == "transformers"


def test_docstring_states_the_paper_numbers_need_real_checkpoints() -> None:
    doc = eval2d.__doc__ or ""
    assert "73.1 %" in doc and "40.4 %" in doc and "GPU" in doc and "meaningless" in doc


def test_cli_tiny_default_models(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# paper prompts\na corgi\n\n", encoding="utf-8")
    argv = ["--prompts-file", str(prompts), "--views", "back", "--modes", "perpneg", "--seeds", "3"]
    assert main([*argv, "--out", str(out), "--steps", "1", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert (
        "tiny RANDOM Stable Diffusion" in err and "tiny RANDOM CLIP" in err and "MEANINGLESS" in err
    )
    report = json.loads((out / JSON_NAME).read_text(encoding="utf-8"))
    s = report["settings"]
    assert s["random_models"] == ["Stable Diffusion", "CLIP"]
    assert (s["height"], s["width"]) == (64, 64) and s["prompts"] == ["a corgi"]
    assert len(report["images"]) == 1 and report["images"][0]["seed"] == 3
    assert (out / "tiny-sd" / "model_index.json").is_file() and (
        out / "tiny-clip" / "config.json"
    ).is_file()
    assert "meaningless" in (out / MD_NAME).read_text(encoding="utf-8")


def _error(argv: List[str], capsys: pytest.CaptureFixture) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "argv, needle",
    [
        ([], "argument --prompts"),
        (["--prompts", "a corgi||a lion"], "argument --prompts"),
        (["--prompts", "a corgi|a corgi"], "argument --prompts"),
        (["--prompts-file", "/no/such/prompts.txt"], "argument --prompts-file"),
        (["--prompts", "a corgi", "--views", "side,top"], "argument --views"),
        (["--prompts", "a corgi", "--modes", "perpneg,dds"], "argument --modes"),
        (["--prompts", "a corgi", "--seeds", "3-1"], "argument --seeds"),
        (["--prompts", "a corgi", "--seeds", "1,1"], "argument --seeds"),
        (["--prompts", "a corgi", "--steps", "0"], "argument --steps"),
        (["--prompts", "a corgi", "--height", "30"], "argument --height"),
        (["--prompts", "a corgi", "--scheme", "magic"], "argument --scheme"),
        (["--prompts", "a corgi", "--labels", "front"], "argument --labels"),
        (["--prompts", "a corgi", "--labels", "front,up"], "argument --labels"),
        (["--prompts", "a corgi", "--labels", "front,side", "--views", "back"], "argument --views"),
        (["--prompts", "a corgi", "--model", "/no/such/sd-model"], "argument --model"),
        (["--prompts", "a corgi", "--clip", "/no/such/clip-model"], "argument --clip"),
        (["--prompts", "a corgi", "--clip-backend", "open_clip"], "argument --clip"),
        (["--prompts", "a corgi", "--device", "tpu"], "argument --device"),
        (["--prompts", "a corgi", "--fp16", "--device", "cpu"], "argument --fp16"),
    ],
)
def test_cli_errors_exit_2_naming_the_argument(
    argv: List[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    err = _error([*argv, "--out", str(out)], capsys)
    assert needle in err
    assert not out.exists()  # nothing is written for a bad argument


def test_cli_file_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n", encoding="utf-8")
    assert "argument --prompts-file" in _error(["--prompts-file", str(empty)], capsys)
    bad_json = tmp_path / "t.json"
    bad_json.write_text("{not json", encoding="utf-8")
    assert "argument --templates" in _error(
        ["--prompts", "a corgi", "--templates", str(bad_json)], capsys
    )
    unknown = tmp_path / "u.json"
    unknown.write_text(json.dumps({"top": ["a top view of {object}"]}), encoding="utf-8")
    err = _error(["--prompts", "a corgi", "--templates", str(unknown)], capsys)
    assert "argument --templates" in err and "'top'" in err
    a_file = tmp_path / "file"
    a_file.write_text("x", encoding="utf-8")
    assert "argument --out" in _error(["--prompts", "a corgi", "--out", str(a_file)], capsys)
    monkeypatch.setitem(sys.modules, "open_clip", None)
    err = _error(
        [
            "--prompts",
            "a corgi",
            "--clip",
            "ViT-B-32:openai",
            "--clip-backend",
            "open_clip",
            "--out",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert "argument --clip-backend" in err and "open_clip_torch" in err


def test_cli_templates_and_labels_reach_the_classifier(
    tiny_sd_path: Path, tiny_clip_path: Path, tmp_path: Path
) -> None:
    templates = tmp_path / "templates.json"
    templates.write_text(json.dumps({"back": ["{object}, back view"]}), encoding="utf-8")
    out = tmp_path / "out"
    argv = ["--model", str(tiny_sd_path), "--clip", str(tiny_clip_path), "--prompts", "a corgi"]
    argv += ["--views", "back", "--modes", "sd", "--seeds", "0", "--labels", "front,back"]
    assert main([*argv, "--templates", str(templates), "--out", str(out), *SMALL]) == 0
    report = json.loads((out / JSON_NAME).read_text(encoding="utf-8"))
    clf = report["settings"]["classifier"]
    assert clf["labels"] == ["front", "back"] and clf["templates"]["back"] == [
        "{object}, back view"
    ]
    assert set(report["images"][0]["scores"]) == {"front", "back"}
    expected = ViewClassifier.from_pretrained(
        str(tiny_clip_path), labels=("front", "back"), templates={"back": "{object}, back view"}
    )
    with Image.open(out / report["images"][0]["file"]) as im:
        s = expected.scores([im.convert("RGB")], "a corgi")[0]
    assert report["images"][0]["scores"]["back"] == pytest.approx(float(s[1]), abs=1e-5)


def test_package_import_is_light() -> None:
    code = (
        "import sys, threestudio_perpneg.eval as e\n"
        "heavy = [m for m in ('matplotlib', 'transformers', 'diffusers', 'threestudio') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert e.ViewClassifier.__name__ == 'ViewClassifier' and callable(e.wilson_interval)\n"
        "import threestudio_perpneg.eval.eval2d\n"
        "assert 'matplotlib' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.parametrize("inside", [False, True], ids=["out-is-a-file", "out-inside-a-file"])
def test_out_that_is_or_is_inside_a_file_exits_2(
    inside: bool, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x", encoding="utf-8")
    out = blocker / "out" if inside else blocker
    err = _error(["--prompts", "a corgi", "--out", str(out)], capsys)
    assert "argument --out:" in err and "is a file" in err
