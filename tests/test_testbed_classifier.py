"""Testbed view/identity classifier: the shipped weights load and read fresh renders correctly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from threestudio_perpneg.testbed import classifier as C
from threestudio_perpneg.testbed import scenes


@pytest.fixture(scope="module")
def shipped() -> C.TestbedClassifier:
    return C.load_classifier()


def _fresh(n: int, seed: int, size: int, margin: float = 10.0):
    """Renders from cameras at least ``margin`` degrees from a bucket boundary, written here."""
    g = torch.Generator().manual_seed(seed)
    az = torch.rand(4 * n, generator=g) * 360.0 - 180.0
    a = az.abs()
    keep = ((a - 45.0).abs() >= margin) & ((a - 135.0).abs() >= margin)
    az = az[keep][:n]
    el = torch.rand(n, generator=g) * 45.0 - 5.0
    ident = torch.randint(len(scenes.IDENTITIES), (n,), generator=g)
    tex = scenes.identity_textures(
        [scenes.IDENTITIES[int(i)] for i in ident], 32, jitter=0.7, generator=g
    )
    images = scenes.render(tex, az, el, camera_distance=3.0, size=size)
    truth = ["front" if x < 45 else "back" if x > 135 else "side" for x in az.abs().tolist()]
    return images, truth, [scenes.IDENTITIES[int(i)] for i in ident]


def test_shipped_classifier_reads_fresh_renders(shipped: C.TestbedClassifier) -> None:
    images, views, idents = _fresh(400, seed=424242, size=16)
    out = shipped.classify(images)
    view_acc = sum(p == t for p, t in zip(out.views, views)) / len(views)
    id_acc = sum(p == t for p, t in zip(out.identities, idents)) / len(idents)
    assert view_acc >= 0.97, view_acc
    assert id_acc >= 0.98, id_acc
    assert torch.allclose(out.view_probs.sum(-1), torch.ones(len(views)), atol=1e-5)


def test_other_resolutions_are_resized(shipped: C.TestbedClassifier) -> None:
    images, views, _ = _fresh(120, seed=99, size=32)
    out = shipped.classify(images)
    assert sum(p == t for p, t in zip(out.views, views)) / len(views) >= 0.9


def test_scores_follow_the_eval_classifier_protocol(shipped: C.TestbedClassifier) -> None:
    from PIL import Image

    images, _, _ = _fresh(6, seed=7, size=16)
    pil = [
        Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
        for im in images
    ]
    s = shipped.scores(pil, "a cartoon clown head")
    assert s.shape == (6, len(shipped.labels))
    assert tuple(shipped.labels) == ("front", "side", "back", C.REJECT)
    assert torch.allclose(s, shipped.classify(images).view_probs, atol=0.05)
    with pytest.raises(ValueError, match=r"images\[0\]"):
        shipped.scores(["not an image"], "x")


def test_textures_without_a_head_are_not_read_as_a_front(shipped: C.TestbedClassifier) -> None:
    # Written here, unlike the training rejects: texel noise, a uniform grey and smooth stripes.
    g = torch.Generator().manual_seed(2024)
    textures = [torch.rand(3, 32, 64, generator=g) for _ in range(4)]
    textures.append(torch.full((3, 32, 64), 0.5))
    phi = torch.linspace(0, 6.283, 64)
    textures.append((0.5 + 0.4 * torch.sin(3 * phi)).expand(3, 32, 64).clone())
    az = torch.tensor([0.0, 90.0, 180.0, -90.0])
    images = torch.cat([scenes.render(t, az, torch.zeros(4), size=16) for t in textures])
    views = shipped.classify(images).views
    assert sum(v == "front" for v in views) <= 2, views
    assert sum(v == C.REJECT for v in views) >= 0.75 * len(views), views
    # A featureless head (skin all round, hair on the crown: the average head SDS can blur to),
    # built here from the identity colours, is not a front from the front.
    colours = [(scenes._LOOKS[i].skin, scenes._LOOKS[i].hair) for i in ("clown", "troll")]
    colours.append(((1.0, 0.6, 0.95), (0.9, 0.3, 0.1)))  # saturated, as a probe's SDS head was
    for skin, hair in colours:
        tex = torch.tensor(skin)[:, None, None].expand(3, 32, 64).clone()
        tex[:, :8] = torch.tensor(hair)[:, None, None]
        front_az = torch.tensor([0.0, 30.0, -30.0, 50.0])
        views = shipped.classify(scenes.render(tex, front_az, torch.zeros(4), size=16)).views
        assert "front" not in views, (skin, views)
    # Real heads are not rejected.
    heads, _, _ = _fresh(200, seed=5, size=16)
    assert sum(v == C.REJECT for v in shipped.classify(heads).views) <= 2


def test_shipped_metrics_and_recipe_are_recorded() -> None:
    folder = C.classifier_path()
    cfg = C.ClassifierConfig.from_dict(json.loads((folder / "config.json").read_text()))
    metrics = json.loads((folder / "metrics.json").read_text())
    assert cfg.resolution == 16 and cfg.identities == scenes.IDENTITIES
    assert {"held_out", "held_out_away_from_boundaries", "train_seconds"} <= set(metrics)


def test_training_writes_a_loadable_seeded_classifier(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    cfg = C.ClassifierConfig(pool_size=64, batch_size=16)
    a = C.train_classifier(tmp_path / "a", seed=1, steps=3, config=cfg, eval_n=16, progress=False)
    C.train_classifier(tmp_path / "b", seed=1, steps=3, config=cfg, eval_n=16, progress=False)
    wa, wb = load_file(str(tmp_path / "a" / C.WEIGHTS)), load_file(str(tmp_path / "b" / C.WEIGHTS))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    clf = C.load_classifier(tmp_path / "a")
    assert clf.cfg.steps == 3 and clf.cfg.seed == 1
    assert json.loads((tmp_path / "a" / C.METRICS).read_text()) == json.loads(json.dumps(a))
    init = C.ViewIdentityNet(cfg)
    with torch.no_grad():
        assert any(not torch.equal(p, wa[k]) for k, p in init.state_dict().items())


def test_bad_input_names_the_argument(tmp_path: Path, shipped: C.TestbedClassifier) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        C.load_classifier(tmp_path)
    with pytest.raises(ValueError, match="unknown key 'depth'"):
        C.ClassifierConfig.from_dict({"depth": 3})
    with pytest.raises(ValueError, match="images: expected a tensor"):
        shipped.classify(torch.zeros(2, 16, 16))
    with pytest.raises(ValueError, match="views"):
        C.ClassifierConfig(views=("front", "top"))
