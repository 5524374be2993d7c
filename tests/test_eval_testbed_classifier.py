"""``--classifier testbed`` in eval2d and eval3d: end to end on tiny inputs, bad values exit 2."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from PIL import Image

from threestudio_perpneg.eval import eval2d, janus
from threestudio_perpneg.eval.classifier import load_view_classifier
from threestudio_perpneg.testbed import scenes
from threestudio_perpneg.testbed.classifier import classifier_path, load_classifier

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

TESTBED_LABELS = ["front", "side", "back", "none"]


def test_load_view_classifier_testbed_follows_the_protocol():
    clf = load_view_classifier("testbed")
    assert list(clf.labels) == TESTBED_LABELS and clf.name.startswith("testbed:")
    images = [Image.new("RGB", (32, 32), (200, 100, 50)), Image.new("RGB", (16, 16), (0, 0, 0))]
    s = clf.scores(images, "ignored")
    assert s.shape == (2, 4)
    torch.testing.assert_close(s.sum(1), torch.ones(2))
    with pytest.raises(ValueError, match="^classifier: unknown classifier 'cnn'"):
        load_view_classifier("cnn")
    with pytest.raises(FileNotFoundError, match="^classifier path: '/no/such' is not a folder"):
        load_view_classifier("testbed", "/no/such")


def _render_ring(folder: Path, azimuths: List[float]) -> Path:
    """Ground-truth testbed renders of the alien head, with a manifest of their cameras."""
    folder.mkdir(parents=True)
    tex = scenes.identity_textures(["alien"] * len(azimuths), 32)
    imgs = scenes.render(tex, azimuths, [10.0] * len(azimuths), size=32)
    rows = []
    for i, (az, x) in enumerate(zip(azimuths, imgs)):
        a = (x.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(a).save(folder / f"{i}.png")
        rows.append({"file": f"{i}.png", "azimuth": az, "elevation": 10.0})
    with open(folder / "manifest.csv", "w", newline="") as fp:
        w = csv.DictWriter(fp, fieldnames=["file", "azimuth", "elevation"])
        w.writeheader()
        w.writerows(rows)
    return folder


def test_eval3d_with_the_testbed_classifier(tmp_path, capsys):
    azimuths = [0.0, 20.0, 90.0, -90.0, 180.0, 160.0]
    ring = _render_ring(tmp_path / "ring", azimuths)
    out = tmp_path / "out"
    argv = [str(ring), "--object", "alien", "--out", str(out), "--classifier", "testbed"]
    assert janus.main([*argv, "--bootstrap", "50", "--no-plots", "--no-progress"]) == 0
    doc = json.loads((out / "janus_report.json").read_text())
    assert doc["classifier"]["backend"] == "testbed" and doc["classifier"]["tiny_random"] is False
    frames = doc["objects"][0]["frames"]
    assert set(frames[0]["scores"]) == set(TESTBED_LABELS)
    # The scores are the testbed classifier's on the written images.
    clf = load_classifier()
    images = [Image.open(ring / f"{i}.png") for i in range(len(azimuths))]
    ref = clf.scores(images)
    got = torch.tensor(
        [[f["scores"][k] for k in TESTBED_LABELS] for f in frames], dtype=torch.float64
    )
    torch.testing.assert_close(got, ref.double(), atol=1e-6, rtol=0)
    # Clean renders away from the bucket boundaries: the classifier reads most of them right.
    assert doc["objects"][0]["view_accuracy"] >= 4 / 6
    assert "meaningless" not in capsys.readouterr().out


def test_eval2d_with_the_testbed_classifier(tiny_sd_path, tmp_path):
    out = tmp_path / "out"
    argv = ["--prompts", "a cartoon alien head", "--model", str(tiny_sd_path)]
    argv += ["--classifier", "testbed", "--views", "back,side", "--modes", "sd,perpneg"]
    argv += ["--seeds", "0-1", "--steps", "1", "--height", "32", "--width", "32"]
    assert eval2d.main([*argv, "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / eval2d.JSON_NAME).read_text(encoding="utf-8"))
    s = report["settings"]
    assert s["classifier_kind"] == "testbed" and s["labels"] == TESTBED_LABELS
    assert s["classifier"]["model"] == "testbed-cnn"
    assert s["random_models"] == [] and s["clip"].startswith("testbed:")
    assert len(report["images"]) == 2 * 2 * 2
    clf = load_classifier()
    for rec in report["images"]:
        ref = clf.scores([Image.open(out / rec["file"])])[0]
        got = torch.tensor([rec["scores"][k] for k in TESTBED_LABELS])
        torch.testing.assert_close(got, ref, atol=2e-6, rtol=0)
        assert rec["success"] == (rec["predicted"] == rec["view"])
    assert not (out / "tiny-clip").exists()  # no CLIP was built


def _one_line_error(main, argv, capsys) -> str:
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own usage errors (eval3d's parser exits itself)
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--classifier", "cnn"], ["argument --classifier", "'cnn'", "clip", "testbed"]),
        (["--classifier", "testbed", "--clip", "x/clip"], ["argument --clip", "'x/clip'"]),
        (["--classifier", "testbed", "--labels", "front,side"], ["argument --labels"]),
        (["--classifier", "testbed", "--clip-backend", "open_clip"], ["--clip-backend"]),
        (["--classifier-path", "some/dir"], ["argument --classifier-path", "'some/dir'"]),
        (
            ["--classifier", "testbed", "--classifier-path", "/no/such"],
            ["argument --classifier-path", "/no/such", "not a folder"],
        ),
        (
            ["--classifier", "testbed", "--views", "overhead"],
            ["argument --views", "overhead", "testbed classifier's labels"],
        ),
        (
            ["--model", str(Path(scenes.__file__).parent / "assets" / "prior")],
            ["argument --model", "testbed pixel-space prior", "PerpNegSampler"],
        ),
    ],
)
def test_eval2d_bad_classifier_values_exit_2(argv, needles, tmp_path, capsys):
    out = tmp_path / "out"
    err = _one_line_error(eval2d.main, ["--prompts", "a", *argv, "--out", str(out)], capsys)
    for needle in needles:
        assert needle in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--classifier", "cnn"], ["argument --classifier", "'cnn'"]),
        (["--classifier", "testbed", "--clip", "x/clip"], ["--clip: 'x/clip'", "testbed"]),
        (["--classifier-path", "some/dir"], ["--classifier-path: 'some/dir'"]),
        (
            ["--classifier", "testbed", "--classifier-path", "/no/such"],
            ["--classifier-path", "/no/such", "not a folder"],
        ),
    ],
)
def test_eval3d_bad_classifier_values_exit_2(argv, needles, tmp_path, capsys):
    ring = _render_ring(tmp_path / "ring", [0.0, 180.0])
    out = tmp_path / "out"
    argv = [str(ring), "--object", "alien", "--out", str(out), "--no-progress", *argv]
    err = _one_line_error(janus.main, argv, capsys)
    for needle in needles:
        assert needle in err, err


def test_shipped_classifier_folder_is_the_default():
    assert load_view_classifier("testbed").name == f"testbed:{classifier_path()}"


def test_the_reject_label_eval_uses_is_the_testbed_classifiers():
    # eval/ names the reject label from core/ (it never imports testbed/): the two must agree.
    from threestudio_perpneg.core.views import REJECT
    from threestudio_perpneg.testbed.classifier import REJECT as TESTBED_REJECT

    assert REJECT == TESTBED_REJECT == TESTBED_LABELS[-1]
    assert tuple(load_classifier().labels) == ("front", "side", "back", REJECT)


def test_only_non_clip_kinds_can_be_registered():
    from threestudio_perpneg.eval.classifier import register_view_classifier

    for kind in ("clip", "cnn"):
        with pytest.raises(ValueError, match=f"^classifier: cannot register '{kind}'"):
            register_view_classifier(kind, lambda path: None)
