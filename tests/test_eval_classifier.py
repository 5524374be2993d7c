"""Tests of the zero-shot CLIP view classifier (``threestudio_perpneg.eval.classifier``) and of the
tiny random CLIP builder (``threestudio_perpneg.tiny.builders.build_tiny_clip``).

Everything runs on the CPU on a tiny seeded random CLIP. The reference computations below use the
raw ``CLIPModel`` (``get_text_features`` / ``get_image_features``) and ``CLIPProcessor`` directly.
One test makes the true view known by construction: synthetic renders of an object from the four
views are drawn, and the (real) model's visual projection is solved so that each render's image
embedding is its view's text embedding.
"""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path
from typing import Any, Dict, List, Sequence

import pytest
import torch
from PIL import Image, ImageDraw

from threestudio_perpneg.eval.classifier import (
    DEFAULT_TEMPLATES,
    VIEW_LABELS,
    ClassifierProtocol,
    ViewClassifier,
    check_labels,
    check_templates,
)
from threestudio_perpneg.tiny.builders import build_tiny_clip

OBJECT = "a corgi"

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


# ---------------------------------------------------------------------------- helpers
def _features(out: Any) -> torch.Tensor:
    """transformers 4.x returns a tensor, 5.x a model output whose pooler_output is projected."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _load_raw(path: Path) -> tuple:
    from transformers import CLIPModel, CLIPProcessor

    return CLIPModel.from_pretrained(str(path)).eval(), CLIPProcessor.from_pretrained(str(path))


@torch.no_grad()
def _manual_text(model: Any, processor: Any, texts: Sequence[str]) -> torch.Tensor:
    tokens = processor.tokenizer(list(texts), padding=True, return_tensors="pt")
    feats = _features(
        model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
    )
    return feats / feats.norm(dim=-1, keepdim=True)


@torch.no_grad()
def _manual_view_embeddings(
    model: Any, processor: Any, templates: Dict[str, Sequence[str]], labels: Sequence[str], obj: str
) -> torch.Tensor:
    """Each view: fill the templates, encode, normalise, average, renormalise."""
    rows = []
    for view in labels:
        texts = [t.replace("{object}", obj) for t in templates[view]]
        mean = _manual_text(model, processor, texts).mean(dim=0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


@torch.no_grad()
def _manual_image(model: Any, processor: Any, images: Sequence[Image.Image]) -> torch.Tensor:
    pixels = processor(images=list(images), return_tensors="pt").pixel_values
    feats = _features(model.get_image_features(pixel_values=pixels))
    return feats / feats.norm(dim=-1, keepdim=True)


def _render(view: str, size: int = 64) -> Image.Image:
    """A crude synthetic 'corgi' seen from one view (the true view is known by construction)."""
    im = Image.new("RGB", (size, size), (235, 235, 225))
    d = ImageDraw.Draw(im)
    s = size / 64
    fur, dark = (205, 120, 50), (40, 30, 20)
    if view == "front":  # face: round head, two eyes, nose, ears
        d.ellipse((16 * s, 14 * s, 48 * s, 46 * s), fill=fur)
        d.polygon([(16 * s, 18 * s), (20 * s, 2 * s), (28 * s, 14 * s)], fill=fur)
        d.polygon([(48 * s, 18 * s), (44 * s, 2 * s), (36 * s, 14 * s)], fill=fur)
        d.ellipse((23 * s, 24 * s, 29 * s, 30 * s), fill=dark)
        d.ellipse((35 * s, 24 * s, 41 * s, 30 * s), fill=dark)
        d.ellipse((29 * s, 34 * s, 35 * s, 39 * s), fill=dark)
    elif view == "side":  # profile: long body, head to the right, four legs
        d.ellipse((6 * s, 26 * s, 46 * s, 44 * s), fill=fur)
        d.ellipse((40 * s, 16 * s, 58 * s, 32 * s), fill=fur)
        d.ellipse((52 * s, 22 * s, 57 * s, 27 * s), fill=dark)
        for x in (10, 18, 32, 40):
            d.rectangle((x * s, 42 * s, (x + 4) * s, 54 * s), fill=fur)
    elif view == "back":  # from behind: round rump, tail, no face
        d.ellipse((14 * s, 18 * s, 50 * s, 54 * s), fill=fur)
        d.ellipse((28 * s, 10 * s, 36 * s, 22 * s), fill=(250, 250, 245))
        d.line((32 * s, 30 * s, 32 * s, 54 * s), fill=dark, width=max(1, int(2 * s)))
    else:  # overhead: elongated outline from above, back stripe
        d.ellipse((22 * s, 4 * s, 42 * s, 60 * s), fill=fur)
        d.ellipse((26 * s, 0, 38 * s, 12 * s), fill=fur)
        d.rectangle((31 * s, 12 * s, 33 * s, 56 * s), fill=dark)
    return im


def _noise_images(n: int, seed: int = 0, size: int = 48) -> List[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    arrays = (torch.rand(n, size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    return [Image.fromarray(a) for a in arrays]


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip") / "clip", seed=0)


@pytest.fixture(scope="module")
def raw(clip_path: Path) -> tuple:
    return _load_raw(clip_path)


@pytest.fixture(scope="module")
def clf(clip_path: Path) -> ViewClassifier:
    return ViewClassifier.from_pretrained(str(clip_path))


@pytest.fixture(scope="module")
def images() -> List[Image.Image]:
    return [_render(v) for v in VIEW_LABELS] + _noise_images(3)


# ---------------------------------------------------------------------- tiny CLIP builder
def test_tiny_clip_layout_and_config(clip_path: Path, raw: tuple) -> None:
    files = sorted(p.name for p in clip_path.iterdir())
    assert files == [
        "config.json",
        "merges.txt",
        "model.safetensors",
        "preprocessor_config.json",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.json",
    ]  # no tokenizer.json: transformers 4.28 cannot read the one transformers 5 writes
    assert not list(clip_path.parent.glob(".*"))  # no temporary folders left behind
    model, processor = raw
    text, vision = model.config.text_config, model.config.vision_config
    assert (text.hidden_size, text.num_hidden_layers) == (32, 2)
    assert (vision.hidden_size, vision.num_hidden_layers) == (32, 2)
    assert (vision.image_size, vision.patch_size) == (32, 8)
    assert type(model).__name__ == "CLIPModel"
    assert type(processor).__name__ == "CLIPProcessor"
    assert processor.tokenizer.model_max_length == 77
    pixels = processor(images=[Image.new("RGB", (50, 40))], return_tensors="pt").pixel_values
    assert tuple(pixels.shape) == (1, 3, 32, 32)
    ids = processor.tokenizer(["the front view"]).input_ids[0]
    assert (
        ids[0] == processor.tokenizer.bos_token_id and ids[-1] == processor.tokenizer.eos_token_id
    )
    # the eos token has the largest id, so old (argmax) and new (first eos) pooling agree
    assert processor.tokenizer.eos_token_id == max(processor.tokenizer.get_vocab().values())


def test_tiny_clip_weights_load_exactly_and_are_seeded(
    clip_path: Path, raw: tuple, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    model, _ = raw
    stored = load_file(str(clip_path / "model.safetensors"))
    assert all(
        k.startswith(("text_model.", "vision_model.", "text_projection", "visual_projection"))
        or k == "logit_scale"
        for k in stored
    )
    state = model.state_dict()
    for key, value in stored.items():
        assert torch.equal(state[key], value), key  # loaded, not re-initialised
    again = load_file(str(build_tiny_clip(tmp_path / "same", seed=0) / "model.safetensors"))
    other = load_file(str(build_tiny_clip(tmp_path / "other", seed=1) / "model.safetensors"))
    assert all(torch.equal(stored[k], again[k]) for k in stored)
    assert not all(torch.equal(stored[k], other[k]) for k in stored)
    with pytest.raises(FileExistsError):
        build_tiny_clip(tmp_path / "same")
    build_tiny_clip(tmp_path / "same", seed=1, overwrite=True)
    replaced = load_file(str(tmp_path / "same" / "model.safetensors"))
    assert all(torch.equal(replaced[k], other[k]) for k in other)


# ------------------------------------------------------------------------- scoring basics
def test_scores_shape_normalisation_and_label_order(
    clf: ViewClassifier, images: List[Image.Image]
) -> None:
    assert clf.labels == VIEW_LABELS == ("front", "side", "back", "overhead")
    assert isinstance(clf, ClassifierProtocol)
    s = clf.scores(images, OBJECT)
    assert s.shape == (len(images), 4) and s.dtype == torch.float32 and s.device.type == "cpu"
    assert torch.all(s >= 0) and torch.allclose(s.sum(dim=-1), torch.ones(len(images)), atol=1e-6)
    labels = clf.classify(images, OBJECT)
    assert labels == [VIEW_LABELS[int(i)] for i in s.argmax(dim=-1)]
    assert torch.allclose(clf.logits(images, OBJECT).softmax(-1), s)
    assert clf.scores([], OBJECT).shape == (0, 4)
    one = clf.scores(images[0], OBJECT)  # a single image is accepted
    assert torch.allclose(one, s[:1], atol=1e-6)


def test_template_averaging_matches_the_raw_model(
    clf: ViewClassifier, raw: tuple, images: List[Image.Image]
) -> None:
    model, processor = raw
    text = _manual_view_embeddings(model, processor, DEFAULT_TEMPLATES, VIEW_LABELS, OBJECT)
    assert torch.allclose(clf.text_embeddings(OBJECT), text, atol=1e-5)
    img = _manual_image(model, processor, images)
    scale = model.logit_scale.exp().item()
    assert clf.logit_scale == pytest.approx(scale)
    expected = (scale * img @ text.T).softmax(dim=-1)
    assert torch.allclose(clf.scores(images, OBJECT), expected, atol=1e-5)
    # averaging matters: a single template per view gives other embeddings
    first = _manual_view_embeddings(
        model, processor, {v: DEFAULT_TEMPLATES[v][:1] for v in VIEW_LABELS}, VIEW_LABELS, OBJECT
    )
    assert not torch.allclose(first, text, atol=1e-3)
    assert clf.prompts(OBJECT)["back"] == [
        "a back view of a corgi",
        "the back of a corgi",
        "a corgi seen from behind",
    ]


def test_custom_templates_single_string_and_partial_override(
    clip_path: Path, raw: tuple, images: List[Image.Image]
) -> None:
    model, processor = raw
    custom = {"side": "{object}, side view", "back": ["{object}, back view", "rear of {object}"]}
    c = ViewClassifier.from_pretrained(str(clip_path), templates=custom)
    assert c.templates["side"] == ("{object}, side view",)
    assert c.templates["front"] == DEFAULT_TEMPLATES["front"]  # views not named keep defaults
    merged = {**{k: list(v) for k, v in DEFAULT_TEMPLATES.items()}, **{"side": [custom["side"]]}}
    merged["back"] = list(custom["back"])
    text = _manual_view_embeddings(model, processor, merged, VIEW_LABELS, "a lion")
    assert torch.allclose(c.text_embeddings("a lion"), text, atol=1e-5)
    desc = c.describe()
    assert desc["backend"] == "transformers" and desc["labels"] == list(VIEW_LABELS)
    assert desc["templates"]["back"] == custom["back"]
    json.dumps(desc)


def test_labels_subset_and_order(
    clip_path: Path, clf: ViewClassifier, images: List[Image.Image]
) -> None:
    full = clf.logits(images, OBJECT)
    sub = ViewClassifier.from_pretrained(str(clip_path), labels=("front", "side", "back"))
    assert sub.labels == ("front", "side", "back")
    s = sub.scores(images, OBJECT)
    assert s.shape == (len(images), 3)
    assert torch.allclose(sub.logits(images, OBJECT), full[:, :3], atol=1e-5)
    assert torch.allclose(s, full[:, :3].softmax(-1), atol=1e-5)
    rev = ViewClassifier.from_pretrained(str(clip_path), labels="back,front")
    assert rev.labels == ("back", "front")
    assert torch.allclose(rev.logits(images, OBJECT), full[:, [2, 0]], atol=1e-5)


def test_batching_and_text_cache(clip_path: Path, clf: ViewClassifier) -> None:
    small = ViewClassifier.from_pretrained(str(clip_path), batch_size=3)
    calls = {"images": [], "text": 0}
    encode_images, encode_text = small.backend.encode_images, small.backend.encode_text

    def count_images(batch: List[Image.Image]) -> torch.Tensor:
        calls["images"].append(len(batch))
        return encode_images(batch)

    def count_text(texts: List[str]) -> torch.Tensor:
        calls["text"] += 1
        return encode_text(texts)

    small.backend.encode_images = count_images
    small.backend.encode_text = count_text
    imgs = _noise_images(7, seed=3)
    s1 = small.scores(imgs, OBJECT)
    assert calls["images"] == [3, 3, 1]
    assert torch.allclose(s1, clf.scores(imgs, OBJECT), atol=1e-5)
    small.scores(imgs[:2], OBJECT)
    assert calls["text"] == 1  # the view embeddings of one object are encoded once
    small.scores(imgs[:2], "a lion")
    assert calls["text"] == 2


# ----------------------------------------------------------- true view known by construction
def _controlled(path: Path, labels: Sequence[str], obj: str) -> tuple:
    """A real tiny CLIP whose visual projection maps each view's render onto that view's text
    embedding (solved by least squares), logit scale 100 as in OpenAI CLIP."""
    model, processor = _load_raw(path)
    text = _manual_view_embeddings(model, processor, DEFAULT_TEMPLATES, labels, obj)
    renders = [_render(v) for v in labels]
    with torch.no_grad():
        pixels = processor(images=renders, return_tensors="pt").pixel_values
        hidden = model.vision_model(pixel_values=pixels).pooler_output  # [V, 32]
        # W @ hidden_v = text_v for every view: W = text^T pinv(hidden^T)
        w = text.double().T @ torch.linalg.pinv(hidden.double().T)
        model.visual_projection.weight.copy_(w.float())
        model.logit_scale.fill_(math.log(100.0))
        assert torch.allclose(_manual_image(model, processor, renders), text, atol=1e-4)
    return model, processor, renders


@pytest.mark.parametrize("labels", [VIEW_LABELS, ("front", "side", "back")])
def test_true_view_known_by_construction(clip_path: Path, labels: Sequence[str]) -> None:
    model, processor, renders = _controlled(clip_path, labels, OBJECT)
    c = ViewClassifier.from_model(model, processor, labels=labels)
    assert c.logit_scale == pytest.approx(100.0, rel=1e-5)
    assert c.classify(renders, OBJECT) == list(labels)
    s = c.scores(renders, OBJECT)
    diag = s.diagonal()
    off = s.masked_fill(torch.eye(len(labels), dtype=torch.bool), -1.0).max(dim=-1).values
    assert torch.all(diag > off)
    # the same renders in another order are classified in that order
    order = [2, 0, 1] + list(range(3, len(labels)))
    assert c.classify([renders[i] for i in order], OBJECT) == [labels[i] for i in order]


# ------------------------------------------------------------------------------ bad inputs
def test_validation_errors(clf: ViewClassifier, clip_path: Path) -> None:
    with pytest.raises(ValueError, match="templates: unknown view name.*'top'"):
        check_templates({"top": ["a top view of {object}"]})
    with pytest.raises(ValueError, match=r"templates\['side'\]\[1\].*\{object\}"):
        check_templates({"side": ["{object} from the side", "no placeholder"]})
    with pytest.raises(ValueError, match=r"templates\['back'\]: expected at least one"):
        check_templates({"back": []})
    with pytest.raises(ValueError, match="templates: expected a mapping"):
        check_templates(["a side view of {object}"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="labels: unknown view name.*'top'"):
        check_labels(("front", "top"))
    with pytest.raises(ValueError, match="labels: a view name is repeated"):
        check_labels("front,front,back")
    with pytest.raises(ValueError, match="labels: expected at least two"):
        check_labels(["front"])
    with pytest.raises(ValueError, match="labels: unknown view name.*'top'"):
        ViewClassifier.from_pretrained(str(clip_path), labels=("front", "top"))
    with pytest.raises(ValueError, match="templates: unknown view name.*'below'"):
        ViewClassifier.from_pretrained(str(clip_path), templates={"below": "{object}"})
    with pytest.raises(ValueError, match="object_name"):
        clf.scores(_noise_images(1), "  ")
    with pytest.raises(ValueError, match=r"images\[1\]: expected a PIL image"):
        clf.scores([_noise_images(1)[0], torch.zeros(3, 8, 8)], OBJECT)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="images: expected a sequence"):
        clf.scores("corgi.png", OBJECT)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend: unknown CLIP backend 'clip'"):
        ViewClassifier.from_pretrained(str(clip_path), backend="clip")
    with pytest.raises(ValueError, match="batch_size"):
        ViewClassifier.from_pretrained(str(clip_path), batch_size=0)


def test_missing_or_unloadable_checkpoint(tmp_path: Path) -> None:
    missing = str(tmp_path / "no" / "such" / "clip")
    with pytest.raises(FileNotFoundError, match="clip.*does not exist") as info:
        ViewClassifier.from_pretrained(missing)
    assert missing in str(info.value)
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="clip.*is a file"):
        ViewClassifier.from_pretrained(str(a_file))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="clip.*could not load"):
        ViewClassifier.from_pretrained(str(empty))


# ------------------------------------------------------------------------- open_clip backend
def test_open_clip_missing_gives_a_clear_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip -> ImportError
    with pytest.raises(ImportError, match="open_clip_torch"):
        ViewClassifier.from_pretrained("ViT-B-32:openai", backend="open_clip")


def test_open_clip_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ValueError, match="clip: open_clip models are named 'ARCH:PRETRAINED'"):
        ViewClassifier.from_pretrained("ViT-B-32", backend="open_clip")
    with pytest.raises(FileNotFoundError, match="clip: open_clip checkpoint file"):
        ViewClassifier.from_pretrained(f"ViT-B-32:{tmp_path}/missing.pt", backend="open_clip")


def test_open_clip_backend_wiring(
    monkeypatch: pytest.MonkeyPatch, raw: tuple, clf: ViewClassifier, images: List[Image.Image]
) -> None:
    """A stand-in open_clip module wrapping the tiny transformers CLIP: the open_clip backend must
    give the transformers backend's scores."""
    model, processor = raw
    seen: Dict[str, Any] = {}

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.clip = model
            self.logit_scale = model.logit_scale

        def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
            return _features(self.clip.get_text_features(input_ids=tokens))

        def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
            return _features(self.clip.get_image_features(pixel_values=pixels))

    def create_model_and_transforms(arch: str, pretrained: Any = None, device: Any = "cpu") -> Any:
        seen.update(arch=arch, pretrained=pretrained, device=device)

        def preprocess(im: Image.Image) -> torch.Tensor:
            return processor(images=[im], return_tensors="pt").pixel_values[0]

        return Wrapped(), None, preprocess

    def get_tokenizer(arch: str) -> Any:
        seen["tokenizer"] = arch
        tok = processor.tokenizer
        return lambda texts: (
            tok(list(texts), padding="max_length", max_length=77, return_tensors="pt").input_ids
        )

    fake = types.ModuleType("open_clip")
    fake.create_model_and_transforms = create_model_and_transforms  # type: ignore[attr-defined]
    fake.get_tokenizer = get_tokenizer  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "open_clip", fake)
    oc = ViewClassifier.from_pretrained("ViT-B-32:laion2b_s34b_b79k", backend="open_clip")
    assert seen == {
        "arch": "ViT-B-32",
        "pretrained": "laion2b_s34b_b79k",
        "device": "cpu",
        "tokenizer": "ViT-B-32",
    }
    assert oc.describe()["backend"] == "open_clip"
    assert oc.logit_scale == pytest.approx(clf.logit_scale)
    assert torch.allclose(oc.scores(images, OBJECT), clf.scores(images, OBJECT), atol=1e-5)
    ViewClassifier.from_pretrained("hf-hub:org/repo", backend="open_clip")
    assert seen["arch"] == "hf-hub:org/repo" and seen["pretrained"] is None
