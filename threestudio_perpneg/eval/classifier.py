"""Zero-shot CLIP view classifier: which of front / side / back / overhead an image shows.

Each view has several text templates (``"a side view of {object}"`` ...). For an object name the
templates are filled in, encoded by CLIP's text tower, L2-normalised, averaged per view and
renormalised (prompt ensembling, as in CLIP's zero-shot ImageNet classifier). An image is encoded
by the image tower and normalised; its scores are ``softmax(logit_scale · ⟨image, view⟩)`` over the
views, with the model's own (learned) logit scale.

Backends:

* ``"transformers"`` (default): ``CLIPModel`` + ``CLIPProcessor`` from any hub id or local folder
  (``openai/clip-vit-large-patch14``, ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` ...).
* ``"open_clip"`` (optional, ``pip install open_clip_torch``): ``"ARCH:PRETRAINED"`` (e.g.
  ``"ViT-H-14:laion2b_s32b_b79k"``, PRETRAINED may be a checkpoint file) or ``"hf-hub:ORG/REPO"``.

A tiny random CLIP for tests is :func:`threestudio_perpneg.tiny.builders.build_tiny_clip`; its scores are
meaningless. This module imports torch only; transformers, open_clip and PIL load when needed.
"""

from __future__ import annotations

import math
import os
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    List,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    Union,
    runtime_checkable,
)

import torch
from torch import Tensor

from ..common.checks import check_sequence, check_text

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "BACKENDS",
    "CLASSIFIERS",
    "DEFAULT_TEMPLATES",
    "VIEW_LABELS",
    "ClassifierProtocol",
    "ViewClassifier",
    "check_labels",
    "check_templates",
    "load_view_classifier",
    "register_view_classifier",
]

#: Label order of every score matrix (a ``labels=`` subset keeps this relative order as given).
VIEW_LABELS: Tuple[str, str, str, str] = ("front", "side", "back", "overhead")

#: Several templates per view; ``{object}`` is replaced by the object name (e.g. ``"a corgi"``).
DEFAULT_TEMPLATES: Mapping[str, Tuple[str, ...]] = {
    "front": ("a front view of {object}", "the front of {object}", "{object} facing the camera"),
    "side": (
        "a side view of {object}",
        "{object} seen from the side",
        "a profile view of {object}",
    ),
    "back": ("a back view of {object}", "the back of {object}", "{object} seen from behind"),
    "overhead": (
        "an overhead view of {object}",
        "{object} seen from above",
        "a top-down view of {object}",
    ),
}

BACKENDS: Tuple[str, str] = ("transformers", "open_clip")
#: Classifiers the evaluators can use: zero-shot CLIP, or the Janus testbed's view CNN.
CLASSIFIERS: Tuple[str, str] = ("clip", "testbed")
#: Loaders of the classifiers other than CLIP, ``kind -> loader(folder or None)``, registered by
#: the layer that owns them: eval/ never imports testbed/ (docs/architecture.md), so the package
#: root (``threestudio_perpneg/__init__.py``) registers the testbed's CNN.
_LOADERS: Dict[str, Callable[[Optional[str]], Any]] = {}
PLACEHOLDER = "{object}"
_CACHE_SIZE = 64


@runtime_checkable
class ClassifierProtocol(Protocol):
    """What the evaluators need: label names and ``[N, len(labels)]`` probabilities."""

    labels: Sequence[str]

    def scores(self, images: Sequence[PILImage.Image], object_name: str) -> Tensor: ...


# ----------------------------------------------------------------------------- validation
def check_templates(
    templates: Optional[Mapping[str, Union[str, Sequence[str]]]],
) -> Dict[str, Tuple[str, ...]]:
    """Merged templates: the given views' templates replace the defaults of those views.

    A view's value is one template string or a non-empty sequence of them, each containing
    ``{object}``.

    Raises:
        `ValueError`: naming ``templates`` and the offending view: unknown view name, empty list,
            a template that is not a string or lacks ``{object}``.
    """
    out: Dict[str, Tuple[str, ...]] = {k: tuple(v) for k, v in DEFAULT_TEMPLATES.items()}
    if templates is None:
        return out
    if not isinstance(templates, Mapping):
        raise ValueError(
            f"templates: expected a mapping view -> list of templates, got {templates!r}"
        )
    unknown = [k for k in templates if k not in VIEW_LABELS]
    if unknown:
        raise ValueError(
            f"templates: unknown view name(s) {unknown}, expected keys from {list(VIEW_LABELS)}"
        )
    for view, value in templates.items():
        items = [value] if isinstance(value, str) else value
        try:
            items = list(items)
        except TypeError:
            raise ValueError(
                f"templates[{view!r}]: expected a template string or a list of them, got {value!r}"
            ) from None
        if not items:
            raise ValueError(f"templates[{view!r}]: expected at least one template, got none")
        for i, t in enumerate(items):
            if not isinstance(t, str) or PLACEHOLDER not in t:
                raise ValueError(
                    f"templates[{view!r}][{i}]: expected a string containing {PLACEHOLDER!r}, "
                    f"got {t!r}"
                )
        out[view] = tuple(items)
    return out


def check_labels(labels: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    """The label tuple: distinct names from :data:`VIEW_LABELS`, at least two.

    A string is split at commas (``"front,side,back"``).

    Raises:
        `ValueError`: naming ``labels``: unknown view name, repeated name, fewer than two labels.
    """
    items = (
        [p.strip() for p in labels.split(",") if p.strip()] if isinstance(labels, str) else labels
    )
    try:
        items = list(items)
    except TypeError:
        raise ValueError(f"labels: expected a sequence of view names, got {labels!r}") from None
    unknown = [x for x in items if x not in VIEW_LABELS]
    if unknown:
        raise ValueError(
            f"labels: unknown view name(s) {unknown}, expected names from {list(VIEW_LABELS)}"
        )
    if len(set(items)) != len(items):
        raise ValueError(f"labels: a view name is repeated in {items}")
    if len(items) < 2:
        raise ValueError(f"labels: expected at least two view names to choose from, got {items}")
    return tuple(items)


def _check_object(object_name: Any) -> str:
    return check_text("object_name", object_name)


def _check_images(images: Any) -> List[PILImage.Image]:
    from PIL import Image

    if isinstance(images, Image.Image):
        return [images]
    items = check_sequence("images", images, "PIL images")
    for i, im in enumerate(items):
        if not isinstance(im, Image.Image):
            raise ValueError(f"images[{i}]: expected a PIL image, got {type(im).__name__}")
    return items


def _features(out: Any) -> Tensor:
    """``get_*_features`` return a tensor (transformers 4.x) or a model output (5.x)."""
    if isinstance(out, Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if isinstance(pooled, Tensor):
        return pooled
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"unexpected CLIP feature output of type {type(out).__name__}")


# ------------------------------------------------------------------------------- backends
class _TransformersBackend:
    """``CLIPModel`` + ``CLIPProcessor`` (or any model with ``get_text_features`` /
    ``get_image_features`` / ``logit_scale`` and a processor with ``tokenizer`` / images)."""

    name = "transformers"

    def __init__(self, model: Any, processor: Any, device: Union[str, torch.device]) -> None:
        self.model = model
        self.processor = processor
        self.device = torch.device(device)

    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().float().exp().item())

    @torch.no_grad()
    def encode_text(self, texts: List[str]) -> Tensor:
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        max_length = getattr(tokenizer, "model_max_length", None)
        kwargs: Dict[str, Any] = {"padding": True, "return_tensors": "pt"}
        if isinstance(max_length, int) and max_length < 10_000:
            kwargs.update(truncation=True, max_length=max_length)
        tokens = tokenizer(texts, **kwargs)
        inputs = {
            k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")
        }
        return _features(self.model.get_text_features(**inputs)).float()

    @torch.no_grad()
    def encode_images(self, images: List[PILImage.Image]) -> Tensor:
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        param = next(self.model.parameters(), None)
        dtype = param.dtype if param is not None else torch.float32
        pixel_values = pixels["pixel_values"].to(self.device, dtype)
        return _features(self.model.get_image_features(pixel_values=pixel_values)).float()


class _OpenClipBackend:
    """An open_clip model, its eval transform and its tokenizer."""

    name = "open_clip"

    def __init__(
        self, model: Any, preprocess: Callable[[Any], Tensor], tokenizer: Any, device: Any
    ) -> None:
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = torch.device(device)

    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().float().exp().item())

    @torch.no_grad()
    def encode_text(self, texts: List[str]) -> Tensor:
        tokens = self.tokenizer(texts).to(self.device)
        return self.model.encode_text(tokens).float()

    @torch.no_grad()
    def encode_images(self, images: List[PILImage.Image]) -> Tensor:
        batch = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
        return self.model.encode_image(batch).float()


def _import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as err:
        raise ImportError(
            "backend='open_clip' needs the open_clip package (pip install open_clip_torch; "
            'in the clone: pip install -e ".[open_clip]"); '
            "it is not installed (use backend='transformers' for CLIPModel checkpoints)"
        ) from err
    return open_clip


def _parse_open_clip_name(name: str) -> Tuple[str, Optional[str]]:
    """``"hf-hub:ORG/REPO"`` -> (name, None); ``"ARCH:PRETRAINED"`` -> (ARCH, PRETRAINED)."""
    if name.startswith("hf-hub:"):
        if len(name) <= len("hf-hub:"):
            raise ValueError(f"clip: expected 'hf-hub:ORG/REPO', got {name!r}")
        return name, None
    arch, sep, pretrained = name.partition(":")
    if not sep or not arch.strip() or not pretrained.strip():
        raise ValueError(
            f"clip: open_clip models are named 'ARCH:PRETRAINED' (e.g. 'ViT-H-14:laion2b_s32b_b79k', "
            f"PRETRAINED may be a checkpoint file) or 'hf-hub:ORG/REPO', got {name!r}"
        )
    pretrained = pretrained.strip()
    looks_like_file = pretrained.startswith((".", "/", "~")) or pretrained.endswith(
        (".pt", ".pth", ".bin", ".safetensors")
    )
    if looks_like_file:
        path = os.path.expanduser(pretrained)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"clip: open_clip checkpoint file {pretrained!r} does not exist"
            )
        pretrained = path
    return arch.strip(), pretrained


# ----------------------------------------------------------------------------- classifier
class ViewClassifier:
    """Zero-shot CLIP classifier of the view (front / side / back / overhead) an image shows.

    Build it with :meth:`from_pretrained` (or :meth:`from_model` for a loaded ``CLIPModel`` and
    ``CLIPProcessor``).

    Args:
        backend: an object with ``encode_text(list[str]) -> [T, D]``,
            ``encode_images(list[PIL.Image]) -> [N, D]`` and ``logit_scale() -> float`` (the
            exponentiated scale).
        templates (`Mapping[str, str | Sequence[str]]`, *optional*): per-view templates with
            ``{object}``; views not given keep :data:`DEFAULT_TEMPLATES`.
        labels (`Sequence[str]` or `str`, defaults to :data:`VIEW_LABELS`): the views to choose
            from, in the column order of :meth:`scores` (e.g. ``("front", "side", "back")``).
        batch_size (`int`, defaults to 32): images per forward pass of the image tower.

    Example::

        clf = ViewClassifier.from_pretrained("openai/clip-vit-large-patch14", device="cuda")
        clf.classify([Image.open("corgi.png")], "a corgi")   # ["side"]
    """

    def __init__(
        self,
        backend: Any,
        *,
        templates: Optional[Mapping[str, Union[str, Sequence[str]]]] = None,
        labels: Union[str, Sequence[str]] = VIEW_LABELS,
        batch_size: int = 32,
        name: str = "",
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        self.backend = backend
        self.templates: Dict[str, Tuple[str, ...]] = check_templates(templates)
        self.labels: Tuple[str, ...] = check_labels(labels)
        self.batch_size = batch_size
        self.name = name
        self._text_cache: Dict[str, Tensor] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(
        cls,
        model: Any,
        processor: Any,
        *,
        device: Union[str, torch.device] = "cpu",
        **kwargs: Any,
    ) -> ViewClassifier:
        """A classifier over an already loaded ``CLIPModel`` and ``CLIPProcessor`` (moved to
        ``device`` and put in eval mode); ``kwargs`` as in the constructor."""
        model = model.to(device).eval()
        return cls(_TransformersBackend(model, processor, device), **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device: Union[str, torch.device] = "cpu",
        templates: Optional[Mapping[str, Union[str, Sequence[str]]]] = None,
        labels: Union[str, Sequence[str]] = VIEW_LABELS,
        backend: str = "transformers",
        batch_size: int = 32,
    ) -> ViewClassifier:
        """Loads a CLIP model from a hub id or a local folder.

        Args:
            name_or_path (`str`): with ``backend="transformers"`` a hub id or a folder holding a
                ``CLIPModel`` and ``CLIPProcessor``; with ``backend="open_clip"``
                ``"ARCH:PRETRAINED"`` or ``"hf-hub:ORG/REPO"``.
            device (`str` or `torch.device`, defaults to ``"cpu"``).
            templates, labels, batch_size: as in the constructor.
            backend (`str`, defaults to ``"transformers"``): ``"transformers"`` or ``"open_clip"``.

        Raises:
            `FileNotFoundError`: naming ``clip`` for a missing local folder / checkpoint, or a
                checkpoint that cannot be loaded (e.g. a hub id absent from the cache offline).
            `ImportError`: ``backend="open_clip"`` without the open_clip package.
            `ValueError`: naming ``backend``, ``templates``, ``labels``, ``clip``.
        """
        if backend not in BACKENDS:
            raise ValueError(
                f"backend: unknown CLIP backend {backend!r}, expected one of {BACKENDS}"
            )
        # Validate the cheap arguments before loading anything.
        check_templates(templates)
        check_labels(labels)
        if backend == "open_clip":
            impl: Any = _load_open_clip(name_or_path, device)
        else:
            impl = _load_transformers(name_or_path, device)
        return cls(
            impl, templates=templates, labels=labels, batch_size=batch_size, name=name_or_path
        )

    # ------------------------------------------------------------------ embeddings
    @property
    def logit_scale(self) -> float:
        """The model's exponentiated logit scale (100 for OpenAI CLIP)."""
        return float(self.backend.logit_scale())

    def prompts(self, object_name: str) -> Dict[str, List[str]]:
        """The filled-in templates of every label, in label order."""
        obj = _check_object(object_name)
        return {v: [t.replace(PLACEHOLDER, obj) for t in self.templates[v]] for v in self.labels}

    def text_embeddings(self, object_name: str) -> Tensor:
        """``[V, D]`` unit-norm view embeddings: each view's templates encoded, normalised,
        averaged and renormalised (rows in :attr:`labels` order); cached per object name."""
        prompts = self.prompts(object_name)
        key = _check_object(object_name)
        if key in self._text_cache:
            return self._text_cache[key]
        texts = [t for v in self.labels for t in prompts[v]]
        feats = torch.nn.functional.normalize(self.backend.encode_text(texts).float(), dim=-1)
        rows, start = [], 0
        for v in self.labels:
            n = len(prompts[v])
            rows.append(feats[start : start + n].mean(dim=0))
            start += n
        emb = torch.nn.functional.normalize(torch.stack(rows), dim=-1)
        if len(self._text_cache) >= _CACHE_SIZE:
            self._text_cache.pop(next(iter(self._text_cache)))
        self._text_cache[key] = emb
        return emb

    def image_embeddings(self, images: Sequence[PILImage.Image]) -> Tensor:
        """``[N, D]`` unit-norm image embeddings, computed in batches of :attr:`batch_size`."""
        items = _check_images(images)
        chunks = [
            self.backend.encode_images(items[i : i + self.batch_size])
            for i in range(0, len(items), self.batch_size)
        ]
        if not chunks:
            return torch.zeros(0, 0)
        return torch.nn.functional.normalize(torch.cat(chunks).float(), dim=-1)

    # ------------------------------------------------------------------ scoring
    def logits(self, images: Sequence[PILImage.Image], object_name: str) -> Tensor:
        """``[N, V]`` logits ``logit_scale · ⟨image, view⟩`` (float32, CPU)."""
        text = self.text_embeddings(object_name)
        items = _check_images(images)
        if not items:
            return torch.zeros(0, len(self.labels))
        img = self.image_embeddings(items)
        scale = self.logit_scale
        if not math.isfinite(scale):
            raise ValueError(f"logit_scale: the model's logit scale is not finite ({scale})")
        return (scale * img @ text.to(img.device).T).cpu()

    def scores(self, images: Sequence[PILImage.Image], object_name: str) -> Tensor:
        """``[N, V]`` probabilities (softmax over :attr:`labels`, rows sum to 1), float32 on CPU.

        Raises:
            `ValueError`: naming ``images`` / ``images[i]`` (not PIL images) or ``object_name``
                (empty).
        """
        return self.logits(images, object_name).softmax(dim=-1)

    def classify(self, images: Sequence[PILImage.Image], object_name: str) -> List[str]:
        """The most probable label of each image."""
        s = self.scores(images, object_name)
        return [self.labels[int(i)] for i in s.argmax(dim=-1)]

    def describe(self) -> Dict[str, Any]:
        """JSON-serialisable settings: model name, backend, labels, templates, logit scale."""
        return {
            "name": self.name,
            "backend": getattr(self.backend, "name", type(self.backend).__name__),
            "labels": list(self.labels),
            "templates": {v: list(self.templates[v]) for v in self.labels},
            "logit_scale": self.logit_scale,
            "aggregation": "mean of L2-normalised template embeddings, renormalised",
        }

    def __repr__(self) -> str:
        return f"ViewClassifier(name={self.name!r}, labels={self.labels})"


# --------------------------------------------------------------------------------- loading
def _load_transformers(name_or_path: str, device: Union[str, torch.device]) -> _TransformersBackend:
    from ..core.text import resolve_pretrained

    key = "clip (pretrained path)"
    try:
        path = resolve_pretrained(name_or_path, key=key)
    except FileNotFoundError as err:
        if os.path.exists(os.path.expanduser(str(name_or_path))):
            raise FileNotFoundError(
                f"{key}: {name_or_path!r} is a file, expected a CLIP model folder"
            ) from err
        raise FileNotFoundError(
            f"{key}: local folder {name_or_path!r} does not exist (expected a CLIP model folder "
            "with config.json, the weights and the CLIPProcessor files, or a hub id)"
        ) from err
    from transformers import CLIPModel, CLIPProcessor

    try:
        model: Any = CLIPModel.from_pretrained(path)
        processor: Any = CLIPProcessor.from_pretrained(path)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(
            f"{key}: could not load {name_or_path!r} as a CLIPModel + CLIPProcessor (a local "
            f"folder with config.json, model weights, preprocessor_config.json and tokenizer "
            f"files, or a hub id in the local cache): {first}"
        ) from err
    model = model.to(device).eval()
    return _TransformersBackend(model, processor, device)


def _load_open_clip(name: str, device: Union[str, torch.device]) -> _OpenClipBackend:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"clip: expected an open_clip model name, got {name!r}")
    arch, pretrained = _parse_open_clip_name(name.strip())
    open_clip = _import_open_clip()
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=pretrained, device=device
        )
        tokenizer = open_clip.get_tokenizer(arch)
    except (OSError, RuntimeError) as err:
        raise FileNotFoundError(
            f"clip: could not load open_clip model {name!r}: {str(err).strip().splitlines()[0]}"
        ) from err
    model.eval()
    return _OpenClipBackend(model, preprocess, tokenizer, device)


def load_view_classifier(
    kind: str, path: Optional[str | os.PathLike] = None, **clip_kwargs: Any
) -> Any:
    """A view classifier with :class:`ClassifierProtocol`'s ``labels`` / ``scores`` (and
    ``describe`` and ``name``) for the evaluators.

    Args:
        kind: ``"clip"`` (:meth:`ViewClassifier.from_pretrained` of ``path``, a hub id or folder,
            with ``clip_kwargs``) or ``"testbed"`` (the Janus testbed's CNN,
            :func:`threestudio_perpneg.testbed.classifier.load_classifier`, registered by the
            package root with :func:`register_view_classifier`; ``path`` is a classifier
            folder, None for the shipped one). The testbed classifier's labels are
            ``front``, ``side``, ``back`` and ``none`` (an image that shows no head view: never a
            success and never a front); it ignores the object name and reads testbed heads only.

    Raises:
        `ValueError`: naming ``classifier`` for an unknown kind or a CLIP without ``path``.
        `FileNotFoundError`: naming the classifier path when a folder lacks its files.
    """
    if kind not in CLASSIFIERS:
        raise ValueError(f"classifier: unknown classifier {kind!r}, expected one of {CLASSIFIERS}")
    if kind == "clip":
        if path is None:
            raise ValueError("classifier: a CLIP classifier needs a hub id or folder, got none")
        return ViewClassifier.from_pretrained(str(path), **clip_kwargs)
    if clip_kwargs:
        raise ValueError(
            f"classifier: the testbed classifier takes no CLIP settings, got {sorted(clip_kwargs)}"
        )
    loader = _LOADERS.get(kind)
    if loader is None:
        raise ValueError(
            f"classifier: no loader registered for {kind!r} (importing threestudio_perpneg "
            "registers the testbed's)"
        )
    return loader(None if path is None else os.fspath(path))


def register_view_classifier(kind: str, loader: Callable[[Optional[str]], Any]) -> None:
    """Makes ``load_view_classifier(kind, path)`` return ``loader(path)`` (``path`` a folder, or
    None for the loader's default); ``kind`` is one of :data:`CLASSIFIERS` other than ``"clip"``.

    Raises:
        `ValueError`: naming ``classifier`` for another kind.
    """
    if kind not in CLASSIFIERS or kind == "clip":
        raise ValueError(f"classifier: cannot register {kind!r}, expected one of {CLASSIFIERS[1:]}")
    _LOADERS[kind] = loader
