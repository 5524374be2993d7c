"""A small CNN that tells the view (front / side / back) and the identity of a testbed render.

It replaces CLIP for testbed images: trained in minutes on ground-truth renders of
:mod:`.scenes` (cameras uniform on the circle, labels from threestudio's view buckets), augmented
with texture jitter, pixel noise, blur and contrast changes so it also reads the prior's samples.
The shipped weights live in ``assets/classifier/`` (``model.safetensors``, ``config.json`` with the
recipe, ``metrics.json`` with the held-out accuracy); :func:`load_classifier` loads them.

Labels are ``front``, ``side``, ``back`` and :data:`REJECT` (``"none"``): an image that shows no
head view (noise, colour fields, a featureless head from the front), so an unfinished or blurred
texture is never counted as a front (before this class, a random texture read as "front" from
every side). Protocols count ``"none"`` as a failure of any requested view and as not-front.

``scores(images, object_name)`` follows ``threestudio_perpneg.eval.classifier.ClassifierProtocol``
(``[N, len(labels)]`` view probabilities), so the Janus evaluators can use it instead of CLIP.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import (
    Any,
    Callable,
    Dict,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.views import ViewThresholds
from . import scenes

__all__ = [
    "REJECT",
    "ClassifierConfig",
    "Classification",
    "ViewIdentityNet",
    "TestbedClassifier",
    "classifier_path",
    "load_classifier",
    "render_labelled",
    "render_rejects",
    "evaluate",
    "evaluate_hard_negatives",
    "held_out_summary",
    "train_classifier",
]

PathLike = Union[str, Path]
#: Label of images that show no head view (noise, colour fields): never a front.
REJECT = "none"
WEIGHTS, CONFIG, METRICS = "model.safetensors", "config.json", "metrics.json"


def classifier_path() -> Path:
    """The shipped classifier folder (``threestudio_perpneg/testbed/assets/classifier``)."""
    return Path(__file__).resolve().parent / "assets" / "classifier"


@dataclass
class ClassifierConfig:
    """Architecture and training recipe (saved as ``config.json`` next to the weights).

    Args:
        resolution: input side in pixels; other sizes are resized (area) first. Default 16,
            the prior's native resolution.
        views: view classes, in output order. Default front, side, back (the 3D ring and the 2D
            protocol never ask for overhead).
        identities: identity classes, in output order. Default :data:`scenes.IDENTITIES`.
        channels: channels of the three conv stages. Default (16, 32, 64).
        elevation_range_deg: training camera elevations (degrees). Default (-10, 45).
        camera_distance_range: training camera distances (head radii). Default (2.6, 3.4).
        fovy_deg: field of view of the training renders (degrees). Default 45.
        seed: seed of the weights and the training renders. Default 0.
        steps: optimiser steps. Default 6000 (with the hard negatives; 2500 before them).
        batch_size: renders per step. Default 96.
        lr: AdamW learning rate (cosine decay to 0). Default 3e-3.
        pool_size: distinct training renders (re-augmented every step). Default 32000.
        reject_fraction: share of the pool that shows no head view (random noise and colour
            fields on the sphere, or a texture mostly overwritten by them), labelled
            :data:`REJECT`, so an unfinished or garbled texture is not read as a front. 0 drops
            the class. Default 0.2.
        hard_negative_fraction: share of the pool drawn from
            :func:`~threestudio_perpneg.testbed.hard_negatives.render_hard_negatives` (heads in
            the identities' colours with no face, a faint, smeared or eyeless face, crown-only
            hair, noise or blur), labelled :data:`REJECT`: the heads SDS converges to on an
            uninformed prior. Default 0.3.
    """

    resolution: int = 16
    views: Tuple[str, ...] = ("front", "side", "back")
    identities: Tuple[str, ...] = scenes.IDENTITIES
    channels: Tuple[int, int, int] = (16, 32, 64)
    elevation_range_deg: Tuple[float, float] = (-10.0, 45.0)
    camera_distance_range: Tuple[float, float] = (2.6, 3.4)
    fovy_deg: float = scenes.DEFAULT_FOVY
    seed: int = 0
    steps: int = 6000
    batch_size: int = 96
    lr: float = 3e-3
    pool_size: int = 32000
    reject_fraction: float = 0.2
    hard_negative_fraction: float = 0.3

    def __post_init__(self) -> None:
        for key, lo in (
            ("resolution", 8),
            ("steps", 0),
            ("batch_size", 1),
            ("pool_size", 1),
            ("seed", 0),
        ):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{key}: expected an integer >= {lo}, got {v!r}")
        self.views = tuple(self.views)
        if not self.views or any(v not in ("front", "side", "back") for v in self.views):
            raise ValueError(
                f"views: expected a subset of ('front', 'side', 'back'), got {self.views!r}"
            )
        self.identities = tuple(self.identities)
        if not self.identities or any(i not in scenes.IDENTITIES for i in self.identities):
            raise ValueError(
                f"identities: expected a subset of {scenes.IDENTITIES}, got {self.identities!r}"
            )
        self.channels = tuple(self.channels)  # type: ignore[assignment]
        if len(self.channels) != 3 or any(
            isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in self.channels
        ):
            raise ValueError(f"channels: expected three positive integers, got {self.channels!r}")
        self.elevation_range_deg = _pair(
            "elevation_range_deg", self.elevation_range_deg, -89.0, 60.0
        )
        self.camera_distance_range = _pair(
            "camera_distance_range", self.camera_distance_range, 1.05, 100.0
        )
        if (
            not isinstance(self.lr, (int, float))
            or isinstance(self.lr, bool)
            or not 0 < self.lr < 1
        ):
            raise ValueError(f"lr: expected a learning rate in (0, 1), got {self.lr!r}")
        if not isinstance(self.fovy_deg, (int, float)) or not 1.0 <= float(self.fovy_deg) <= 170.0:
            raise ValueError(f"fovy_deg: expected degrees in [1, 170], got {self.fovy_deg!r}")
        rf = self.reject_fraction
        if isinstance(rf, bool) or not isinstance(rf, (int, float)) or not 0.0 <= rf < 1.0:
            raise ValueError(f"reject_fraction: expected a number in [0, 1), got {rf!r}")
        hf = self.hard_negative_fraction
        if isinstance(hf, bool) or not isinstance(hf, (int, float)) or not 0.0 <= hf < 1.0:
            raise ValueError(f"hard_negative_fraction: expected a number in [0, 1), got {hf!r}")
        if rf + hf >= 1.0:
            raise ValueError(
                f"reject_fraction + hard_negative_fraction: expected a sum below 1 (some clean "
                f"renders), got {rf!r} + {hf!r}"
            )

    @property
    def labels(self) -> Tuple[str, ...]:
        """Output classes of the view head: the views, then :data:`REJECT` if trained."""
        rejects = self.reject_fraction > 0 or self.hard_negative_fraction > 0
        return self.views + ((REJECT,) if rejects else ())

    def to_dict(self) -> Dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassifierConfig:
        """Strict: an unknown key raises ``ValueError`` naming it.

        A folder written before the hard negatives existed has no ``hard_negative_fraction``: it
        was trained without them (0), not with today's default.
        """
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise ValueError(
                    f"classifier config: unknown key {key!r}, expected one of {sorted(known)}"
                )
        return cls(**{"hard_negative_fraction": 0.0, **dict(data)})


def _pair(key: str, value: Any, lo: float, hi: float) -> Tuple[float, float]:
    try:
        a, b = (float(x) for x in value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: expected a pair [low, high], got {value!r}") from None
    if not (lo <= a <= b <= hi):
        raise ValueError(f"{key}: expected low <= high within [{lo}, {hi}], got {value!r}")
    return (a, b)


class ViewIdentityNet(nn.Module):
    """Three conv stages (two 3×3 convs each, average-pooled), global pooling, two linear heads."""

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        c_in = 3
        for i, c in enumerate(cfg.channels):
            layers += [
                nn.Conv2d(c_in, c, 3, padding=1),
                nn.GroupNorm(4 if c % 4 == 0 else 1, c),
                nn.SiLU(),
            ]
            layers += [nn.Conv2d(c, c, 3, padding=1), nn.SiLU()]
            if i < len(cfg.channels) - 1:
                layers.append(nn.AvgPool2d(2))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.view_head = nn.Linear(c_in, len(cfg.labels))
        self.identity_head = nn.Linear(c_in, len(cfg.identities))

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Logits (view ``[B, V]``, identity ``[B, I]``) of images in [0, 1] (centred inside)."""
        h = self.features(x * 2.0 - 1.0).mean(dim=(2, 3))
        return self.view_head(h), self.identity_head(h)


class Classification(NamedTuple):
    """Predictions of :meth:`TestbedClassifier.classify` for a batch."""

    views: List[str]  # a view name, or REJECT for an image that shows no head view
    view_probs: Tensor  # [B, len(labels)]
    identities: List[str]
    identity_probs: Tensor  # [B, len(identities)]


class TestbedClassifier:
    """View and identity of testbed renders.

    Args:
        net: the trained :class:`ViewIdentityNet` (put in eval mode).
        cfg: its :class:`ClassifierConfig`.
    """

    def __init__(self, net: ViewIdentityNet, cfg: ClassifierConfig) -> None:
        self.net = net.eval()
        self.cfg = cfg
        self.labels: Tuple[str, ...] = cfg.labels
        self.name = "testbed-cnn"  # the evaluators record it (load_view_classifier: the folder)

    def _prepare(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images: expected a tensor [B, 3, H, W] in [0, 1], got {got}")
        x = images.detach().float().cpu().clamp(0.0, 1.0)
        r = self.cfg.resolution
        if x.shape[-2:] != (r, r):
            x = F.interpolate(x, size=(r, r), mode="area" if x.shape[-1] > r else "bilinear")
        return x

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        """Raw (view, identity) logits of ``[B, 3, H, W]`` images in [0, 1]."""
        return self.net(self._prepare(images))

    def classify(self, images: Tensor) -> Classification:
        """Labels and probabilities of ``[B, 3, H, W]`` images in [0, 1] (any size; resized)."""
        v, i = self.logits(images)
        pv, pi = v.softmax(-1), i.softmax(-1)
        return Classification(
            [self.labels[int(k)] for k in pv.argmax(-1)],
            pv,
            [self.cfg.identities[int(k)] for k in pi.argmax(-1)],
            pi,
        )

    def scores(self, images: Sequence[Any], object_name: str = "") -> Tensor:
        """``[N, len(labels)]`` view probabilities (``ClassifierProtocol``); PIL images or tensors.

        ``object_name`` is ignored: the classifier knows only the testbed's heads.
        """
        if isinstance(images, Tensor):
            return self.classify(images).view_probs
        import numpy as np

        arrays = []
        for k, im in enumerate(images):
            try:
                a = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
            except AttributeError:
                raise ValueError(
                    f"images[{k}]: expected a PIL image, got {type(im).__name__}"
                ) from None
            arrays.append(
                F.interpolate(
                    torch.from_numpy(a).permute(2, 0, 1)[None],
                    size=(self.cfg.resolution,) * 2,
                    mode="area",
                )
            )
        if not arrays:
            raise ValueError("images: expected at least one image, got none")
        return self.classify(torch.cat(arrays)).view_probs

    def describe(self) -> Dict[str, Any]:
        """JSON-serialisable settings."""
        return {"model": "testbed-cnn", "labels": list(self.labels), **self.cfg.to_dict()}


def load_classifier(path: Optional[PathLike] = None) -> TestbedClassifier:
    """Load a classifier folder (``model.safetensors`` + ``config.json``); the shipped one if None."""
    from safetensors.torch import load_file

    folder = Path(path) if path is not None else classifier_path()
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"classifier path: {folder} has no {name}; expected a folder written by train_classifier"
            )
    cfg = ClassifierConfig.from_dict(json.loads((folder / CONFIG).read_text(encoding="utf-8")))
    net = ViewIdentityNet(cfg)
    net.load_state_dict(load_file(str(folder / WEIGHTS)))
    return TestbedClassifier(net, cfg)


# ------------------------------------------------------------------------------------ data
def render_labelled(
    cfg: ClassifierConfig, n: int, generator: torch.Generator, *, jitter: float = 1.0
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``n`` ground-truth renders in [0, 1]: (images, view index, identity index, azimuth).

    Cameras are uniform on the circle (so every bucket boundary is covered) at random elevation
    and distance; the view index follows threestudio's buckets, restricted to ``cfg.views``.
    """
    az = torch.rand(n, generator=generator) * 360.0 - 180.0
    lo, hi = cfg.elevation_range_deg
    el = lo + (hi - lo) * torch.rand(n, generator=generator)
    dlo, dhi = cfg.camera_distance_range
    dist = dlo + (dhi - dlo) * torch.rand(n, generator=generator)
    ident = torch.randint(len(cfg.identities), (n,), generator=generator)
    tex_size = max(16, cfg.resolution)
    textures = scenes.identity_textures(
        [cfg.identities[int(i)] for i in ident], tex_size, jitter=jitter, generator=generator
    )
    images = scenes.render(
        textures, az, el, camera_distance=dist, size=cfg.resolution, fovy_deg=cfg.fovy_deg
    )
    labels = scenes.view_label(az, el, ViewThresholds(overhead=90.0))
    view = torch.tensor([cfg.views.index(v) if v in cfg.views else -1 for v in labels])
    return images, view, ident, az


def render_rejects(cfg: ClassifierConfig, n: int, generator: torch.Generator) -> Tensor:
    """``n`` renders in [0, 1] of the sphere with textures that show no head view.

    A third each: random colour fields at a random scale (2×4 blobs to texel noise, random
    contrast); such a field laid over an identity texture with opacity 0.75-1 (a texture SDS has
    not finished or has garbled); and a featureless head (skin and hair, no face, no ears; half
    of them with hair on the crown only, the blurred average head SDS can converge to) seen from
    |azimuth| ≤ 60°, where a real head clearly shows its face; half of these in the identity
    colours, half in random skin and hair colours. (From the side a real head differs
    from a featureless one only by a small ear, from behind not at all, so featureless heads are
    not rendered there: a featureless head seen from the side reads "side".)
    """
    size = max(16, cfg.resolution)
    fields = []
    for _ in range(n):
        h = int(2 ** int(torch.randint(1, 6, (), generator=generator)))  # 2 .. 32 texels
        contrast = 0.3 + 2.7 * float(torch.rand((), generator=generator))
        noise = torch.randn(1, 3, h, 2 * h, generator=generator) * contrast
        fields.append(F.interpolate(noise, size=(size, 2 * size), mode="bilinear").sigmoid()[0])
    tex = torch.stack(fields)
    ident = [
        cfg.identities[int(i)]
        for i in torch.randint(len(cfg.identities), (n,), generator=generator)
    ]
    heads = scenes.identity_textures(ident, size, jitter=1.0, generator=generator)
    bald = scenes.identity_textures(ident, size, jitter=1.0, generator=generator, features=False)
    # Crown-only hair: the front half's hair band (above the hairline) copied all around.
    crown = bald[..., :, size // 2 : size // 2 + 1].expand_as(bald)
    bald = torch.where(torch.rand(n, 1, 1, 1, generator=generator) < 0.5, crown, bald)
    # Half of the featureless heads in random colours: SDS can saturate or shift the colours.
    skin = torch.rand(n, 3, 1, 1, generator=generator)
    hair = torch.rand(n, 3, 1, 1, generator=generator)
    rows = torch.arange(size).view(1, 1, size, 1)
    hairline = torch.randint(2, size // 2, (n, 1, 1, 1), generator=generator)
    plain = torch.where(rows < hairline, hair, skin).expand(n, 3, size, 2 * size)
    bald = torch.where(torch.rand(n, 1, 1, 1, generator=generator) < 0.5, plain, bald)
    kind = torch.randint(3, (n,), generator=generator)  # 0 field, 1 overlay, 2 featureless
    alpha = (0.75 + 0.25 * torch.rand(n, 1, 1, 1, generator=generator)) * (kind == 1).view(
        n, 1, 1, 1
    )
    alpha = torch.where((kind == 0).view(n, 1, 1, 1), torch.ones_like(alpha), alpha)
    tex = alpha * tex + (1 - alpha) * heads
    tex = torch.where((kind == 2).view(n, 1, 1, 1), bald, tex)
    az = torch.rand(n, generator=generator) * 360.0 - 180.0
    az = torch.where(kind == 2, az * (60.0 / 180.0), az)
    lo, hi = cfg.elevation_range_deg
    el = lo + (hi - lo) * torch.rand(n, generator=generator)
    dlo, dhi = cfg.camera_distance_range
    dist = dlo + (dhi - dlo) * torch.rand(n, generator=generator)
    return scenes.render(
        tex, az, el, camera_distance=dist, size=cfg.resolution, fovy_deg=cfg.fovy_deg
    )


def _hard_negatives(
    cfg: ClassifierConfig, n: int, generator: torch.Generator
) -> Tuple[Tensor, Tensor]:
    """Hard negatives (images, kind) rendered with the classifier's cameras and resolution."""
    from .hard_negatives import render_hard_negatives

    return render_hard_negatives(
        n,
        generator,
        identities=cfg.identities,
        resolution=cfg.resolution,
        elevation_range_deg=cfg.elevation_range_deg,
        camera_distance_range=cfg.camera_distance_range,
        fovy_deg=cfg.fovy_deg,
    )


def _augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Noise, blur, contrast/brightness and background changes, as a prior's samples show."""
    from .hard_negatives import binomial_blur

    n = x.shape[0]
    # Contrast and brightness around mid-grey.
    c = 1.0 + 0.25 * (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1)
    b = 0.08 * (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1)
    x = (x - 0.5) * c + 0.5 + b
    # Blur half of the batch with a 3x3 binomial kernel.
    blurred = binomial_blur(x)
    x = torch.where(torch.rand(n, 1, 1, 1, generator=generator) < 0.5, blurred, x)
    # Gaussian pixel noise of a random strength up to 0.12.
    sigma = 0.12 * torch.rand(n, 1, 1, 1, generator=generator)
    x = x + sigma * torch.randn(x.shape, generator=generator)
    return x.clamp(0.0, 1.0)


# ------------------------------------------------------------------------------- evaluation
def evaluate(
    clf: TestbedClassifier,
    n: int = 2000,
    seed: int = 12345,
    *,
    jitter: float = 1.0,
    margin_deg: float = 0.0,
) -> Dict[str, Any]:
    """Accuracy on ``n`` fresh renders (a seed not used in training).

    Args:
        clf: the classifier.
        n: renders.
        seed: seed of the renders.
        jitter: texture jitter of the renders.
        margin_deg: leave out cameras within this many degrees of a bucket boundary (45°, 135°).

    Returns:
        ``view_accuracy``, ``identity_accuracy``, ``n`` and per-view accuracies.
    """
    g = torch.Generator().manual_seed(seed)
    images, view, ident, az = render_labelled(clf.cfg, n, g, jitter=jitter)
    boundary = torch.stack([(az.abs() - b).abs() for b in (45.0, 135.0)]).min(0).values
    keep = (view >= 0) & (boundary >= margin_deg)
    out = clf.classify(images)
    pv = out.view_probs.argmax(-1)
    pi = out.identity_probs.argmax(-1)
    per_view = {}
    for k, name in enumerate(clf.cfg.views):
        sel = keep & (view == k)
        per_view[name] = float((pv[sel] == k).float().mean()) if sel.any() else math.nan
    metrics: Dict[str, Any] = {
        "n": int(keep.sum()),
        "seed": seed,
        "margin_deg": margin_deg,
        "view_accuracy": float((pv[keep] == view[keep]).float().mean()),
        "identity_accuracy": float((pi == ident).float().mean()),
        "view_accuracy_per_view": per_view,
    }
    if REJECT in clf.labels:
        # Heads read as "no head", and noise textures (fresh draws) read as "no head" / as a front.
        metrics["heads_rejected"] = float((pv[keep] == clf.labels.index(REJECT)).float().mean())
        rejects = clf.classify(render_rejects(clf.cfg, max(n // 4, 1), g)).views
        metrics["rejects_recognised"] = sum(v == REJECT for v in rejects) / len(rejects)
        metrics["rejects_read_as_front"] = sum(v == "front" for v in rejects) / len(rejects)
    return metrics


def evaluate_hard_negatives(
    clf: TestbedClassifier, n: int = 2000, seed: int = 54321
) -> Dict[str, Any]:
    """How often fresh hard negatives (a seed not used in training) read ``none``, per kind too."""
    from .hard_negatives import HARD_NEGATIVE_KINDS

    images, kind = _hard_negatives(clf.cfg, n, torch.Generator().manual_seed(seed))
    views = clf.classify(images).views
    none = torch.tensor([v == REJECT for v in views])
    front = torch.tensor([v == "front" for v in views])
    per_kind = {
        name: float(none[kind == k].float().mean()) if (kind == k).any() else math.nan
        for k, name in enumerate(HARD_NEGATIVE_KINDS)
    }
    return {
        "n": n,
        "seed": seed,
        "none_rate": float(none.float().mean()),
        "read_as_front": float(front.float().mean()),
        "none_rate_per_kind": per_kind,
    }


def held_out_summary(clean: Mapping[str, Any], hard: Mapping[str, Any]) -> Dict[str, Any]:
    """The four figures issue 17 asks of the classifier, from the two held-out evaluations."""
    return {
        "clean_view_accuracy": clean["view_accuracy"],
        "hard_negative_none_rate": hard["none_rate"],
        "n_clean": clean["n"],
        "n_hard": hard["n"],
    }


# -------------------------------------------------------------------------------- training
def _masked_ce(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy over the rows with a target (>= 0); 0 when there is none."""
    keep = target >= 0
    if not keep.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[keep], target[keep])


def train_classifier(
    out_dir: PathLike,
    seed: int = 0,
    steps: Optional[int] = None,
    *,
    config: Optional[ClassifierConfig] = None,
    eval_n: int = 4000,
    progress: bool = True,
) -> Dict[str, Any]:
    """Train the classifier and write ``model.safetensors``, ``config.json``, ``metrics.json``.

    Args:
        out_dir: output folder (created; files written atomically).
        seed: seed of weights and data (overrides ``config.seed``).
        steps: optimiser steps (overrides ``config.steps`` unless None).
        config: the rest of the recipe; defaults of :class:`ClassifierConfig` if None.
        eval_n: fresh held-out renders for the reported accuracy.
        progress: show a tqdm progress bar.

    Returns:
        The metrics written to ``metrics.json``.
    """
    from safetensors.torch import save_file

    from ..commands.common import atomic_write, write_json

    base = config or ClassifierConfig()
    cfg = ClassifierConfig.from_dict(
        {**base.to_dict(), "seed": seed, "steps": base.steps if steps is None else steps}
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    pool, pool_view, pool_id = [], [], []
    n_reject = int(round(cfg.pool_size * cfg.reject_fraction))
    n_hard = int(round(cfg.pool_size * cfg.hard_negative_fraction))
    n_heads = cfg.pool_size - n_reject - n_hard
    for start in range(0, n_heads, 2000):
        x, v, i, _ = render_labelled(cfg, min(2000, n_heads - start), g)
        pool.append(x)
        pool_view.append(v)
        pool_id.append(i)
    rejects: Tuple[Tuple[int, Callable[[int], Tensor]], ...] = (
        (n_reject, lambda m: render_rejects(cfg, m, g)),
        (n_hard, lambda m: _hard_negatives(cfg, m, g)[0]),
    )
    for n_kind, draw in rejects:
        for start in range(0, n_kind, 2000):
            m = min(2000, n_kind - start)
            pool.append(draw(m))
            pool_view.append(torch.full((m,), cfg.labels.index(REJECT)))
            pool_id.append(torch.full((m,), -1))  # no identity: left out of the identity loss
    images, views, idents = torch.cat(pool), torch.cat(pool_view), torch.cat(pool_id)
    data_s = time.time() - t0
    net = ViewIdentityNet(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / max(cfg.steps, 1)))
    )
    steps_iter: Any = range(cfg.steps)
    if progress:
        from tqdm.auto import tqdm

        steps_iter = tqdm(steps_iter, desc="train classifier", unit="step")
    losses: List[float] = []
    net.train()
    for _ in steps_iter:
        idx = torch.randint(images.shape[0], (cfg.batch_size,), generator=g)
        x = _augment(images[idx], g)
        # Random horizontal flips mirror the azimuth: the view label is unchanged (|azimuth|).
        flip = torch.rand(cfg.batch_size, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        lv, li = net(x)
        v = views[idx]
        loss = _masked_ce(lv, v) + _masked_ce(li, idents[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress and hasattr(steps_iter, "set_postfix") and len(losses) % 50 == 0:
            steps_iter.set_postfix(loss=f"{sum(losses[-50:]) / 50:.3f}")
    net.eval()
    clf = TestbedClassifier(net, cfg)
    clean = evaluate(clf, eval_n, seed=cfg.seed + 1_000_003)
    hard = evaluate_hard_negatives(clf, eval_n, seed=cfg.seed + 3_000_003)
    metrics = {
        "train_seconds": round(time.time() - t0, 1),
        "data_seconds": round(data_s, 1),
        "final_loss": sum(losses[-50:]) / max(len(losses[-50:]), 1) if losses else None,
        "held_out_summary": held_out_summary(clean, hard),
        "held_out": clean,
        "held_out_hard_negatives": hard,
        "held_out_away_from_boundaries": evaluate(
            clf, eval_n, seed=cfg.seed + 1_000_003, margin_deg=10.0
        ),
        "held_out_canonical_textures": evaluate(clf, eval_n, seed=cfg.seed + 2_000_003, jitter=0.0),
        "parameters": sum(p.numel() for p in net.parameters()),
        "torch_threads": torch.get_num_threads(),
    }
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    atomic_write(out / WEIGHTS, lambda tmp: save_file(state, tmp))
    write_json(out / CONFIG, cfg.to_dict())
    write_json(out / METRICS, metrics)
    return metrics
