"""Captioned head renders with web-like view statistics, every knob in one :class:`DatasetConfig`.

Web images of objects are mostly canonical (front) views, a view phrase appears in few captions, it
is a minor part of a longer caption, and it is often wrong: most images captioned "back view" are
not backs. The prior trained on this data inherits that bias, which is what makes the Janus problem
appear (issue 11). The config is saved with the checkpoint (``testbed.json``) so a prior's data is
always known.

A caption is a template with the identity word and an optional view phrase, e.g.
``"a cartoon clown head, back view, 3d render"``. The view phrase has exactly the form threestudio's
prompt processor appends (``"{prompt}, back view"``, :data:`threestudio_perpneg.core.text`), so the
guidance's view-dependent prompts (``"a cartoon clown head, back view"``) are in-distribution.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..core.views import VIEW_NAMES, ViewThresholds
from . import scenes

__all__ = [
    "DatasetConfig",
    "Batch",
    "CAPTION_KEYS",
    "confusion_matrix",
    "p_view_given_phrase",
    "sample_batch",
    "sample_cameras",
    "caption_words",
    "base_prompt",
    "view_prompt",
]

#: The knobs that change only the captions, never a render (see :func:`sample_batch`).
CAPTION_KEYS = ("view_phrase_prob", "view_phrase_matrix", "identity_view_phrase_matrix")

#: The guidance's view suffix (threestudio's ``"{prompt}, side view"``), without the prompt.
VIEW_PHRASE = ", {view} view"


def confusion_matrix(
    error: float, views: Sequence[str] = ("front", "side", "back")
) -> Dict[str, Dict[str, float]]:
    """True view -> written view distribution: correct with 1 − error, else uniform over the others.

    With the default view frequencies (70/20/10) and ``error = 0.3``, only about a third of the
    captions saying "back view" show a back, as on the web.
    """
    if isinstance(error, bool) or not isinstance(error, (int, float)) or not 0 <= error <= 1:
        raise ValueError(f"error: expected a probability in [0, 1], got {error!r}")
    out: Dict[str, Dict[str, float]] = {}
    for v in views:
        others = [w for w in views if w != v]
        row = {w: (error / len(others) if others else 0.0) for w in others}
        row[v] = 1.0 - error if others else 1.0
        out[v] = {w: row[w] for w in views}
    return out


def p_view_given_phrase(cfg: DatasetConfig, view: str, identity: Optional[str] = None) -> float:
    """P(the image shows ``view`` | its caption says "``view`` view"), from the knobs (Bayes).

    The reliability of a view phrase as the prior's training data has it: the view frequencies
    times the phrase matrix of ``identity`` (the shared matrix when None), normalised over the
    images whose caption names ``view``. NaN when no caption can name it.
    """
    matrix = cfg.phrase_matrix(identity) if identity else cfg.view_phrase_matrix
    joint = {v: cfg.view_frequencies.get(v, 0.0) * matrix.get(v, {}).get(view, 0.0) for v in matrix}
    total = sum(joint.values())
    return joint.get(view, 0.0) / total if total > 0 else math.nan


def _default_templates() -> Tuple[str, ...]:
    return (
        "a cartoon {identity} head{view}",
        "a cartoon {identity} head{view}, 3d render",
        "a cartoon {identity} head{view}, plain white background",
        "a cartoon {identity} head{view}, studio lighting, high quality",
        "3d render of a cartoon {identity} head{view}, toy figure",
    )


@dataclass
class DatasetConfig:
    """Every knob of the testbed's captioned renders (saved with the checkpoint as JSON).

    Args:
        resolution: image side in pixels (the prior's native resolution), 8-128. Default 32.
        texture_size: texture height in texels (width twice that); 32 gives about one texel
            per pixel at 32 px and keeps a batch cheap. Default 32.
        view_frequencies: probability of each true view among the renders (the canonical bias),
            keys from ``front, side, back, overhead``, summing to 1. Default front 0.7, side 0.2,
            back 0.1, overhead 0. A view's azimuth is uniform inside its bucket (front
            |a| < 45°, side 45°-135°, back > 135°, threestudio's buckets).
        elevation_range_deg: camera elevation range (degrees) for front/side/back renders, below
            the overhead threshold (60°). Default (-10, 45).
        overhead_elevation_range_deg: elevation range (degrees) of overhead renders, above 60°.
            Default (65, 90).
        camera_distance_range: camera distance range (head radii). Default (2.7, 3.3).
        fovy_deg: vertical field of view (degrees). Default 45.
        background: background grey level in [0, 1]. Default 1 (white).
        shading: head-light Lambert shading of the renders. Default True.
        texture_jitter: per-render variation of the identity texture in [0, 1] (colours,
            feature positions and sizes; see :func:`scenes.identity_texture`). Default 0.5.
        view_phrase_prob: probability that a caption carries a view phrase. Default 0.3.
        view_phrase_matrix: for each true view, the distribution of the written view when a
            phrase is present (rows sum to 1; the off-diagonal mass is how often the phrase is
            wrong and in which direction). Default: correct 70 %, otherwise uniform over the
            other two of front/side/back (:func:`confusion_matrix` with 0.3); an overhead row is
            needed only when overhead renders are drawn.
        identity_view_phrase_matrix: per-identity replacements of ``view_phrase_matrix``
            (identity word -> matrix of the same form); identities not named use
            ``view_phrase_matrix``. One prior trained with a different view-phrase reliability
            per identity is a calibration sweep in a single training run (the shipped prior does
            this). Default {} (every identity uses ``view_phrase_matrix``).
        templates: caption templates, each with ``{identity}`` and ``{view}`` (replaced by
            ``", back view"`` or by nothing), the view phrase a minor part of a longer caption.
            The first template with an empty view is the protocols' base prompt.
        identities: identity words drawn uniformly (a subset of :data:`scenes.IDENTITIES`).
        view_word_separation: how strongly the prior's text encoder separates the view words
            at the start (≥ 0): their token-embedding rows are set to ``m + s·(e_v − m)``
            (``m`` their mean) at initialisation, so 1 = as initialised, 0 = the view words are
            indistinguishable, > 1 = exaggerated
            (:func:`threestudio_perpneg.testbed.prior.apply_view_word_separation`); they then
            train unless the recipe freezes them (``TrainConfig.freeze_view_words``). It lives
            here so it is saved with the data knobs. Default 1.
        seed: seed of the data stream used by training. Default 0.
    """

    resolution: int = 32
    texture_size: int = 32
    view_frequencies: Dict[str, float] = field(
        default_factory=lambda: {"front": 0.7, "side": 0.2, "back": 0.1, "overhead": 0.0}
    )
    elevation_range_deg: Tuple[float, float] = (-10.0, 45.0)
    overhead_elevation_range_deg: Tuple[float, float] = (65.0, 90.0)
    camera_distance_range: Tuple[float, float] = (2.7, 3.3)
    fovy_deg: float = scenes.DEFAULT_FOVY
    background: float = scenes.DEFAULT_BACKGROUND
    shading: bool = True
    texture_jitter: float = 0.5
    view_phrase_prob: float = 0.3
    view_phrase_matrix: Dict[str, Dict[str, float]] = field(
        default_factory=lambda: confusion_matrix(0.3)
    )
    identity_view_phrase_matrix: Dict[str, Dict[str, Dict[str, float]]] = field(
        default_factory=dict
    )
    templates: Tuple[str, ...] = field(default_factory=_default_templates)
    identities: Tuple[str, ...] = scenes.IDENTITIES
    view_word_separation: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        self.resolution = _int("resolution", self.resolution, 8, 128)
        self.texture_size = _int("texture_size", self.texture_size, 8, 1024)
        self.seed = _int("seed", self.seed, 0, 2**63 - 1)
        self.view_frequencies = _distribution("view_frequencies", self.view_frequencies)
        th = ViewThresholds()
        self.elevation_range_deg = _range(
            "elevation_range_deg", self.elevation_range_deg, -89.0, th.overhead
        )
        self.overhead_elevation_range_deg = _range(
            "overhead_elevation_range_deg", self.overhead_elevation_range_deg, th.overhead, 90.0
        )
        if self.overhead_elevation_range_deg[0] <= th.overhead:
            raise ValueError(
                f"overhead_elevation_range_deg: expected elevations above {th.overhead} degrees "
                f"(the overhead bucket), got {self.overhead_elevation_range_deg}"
            )
        self.camera_distance_range = _range(
            "camera_distance_range", self.camera_distance_range, 1.05, 100.0
        )
        self.fovy_deg = _float("fovy_deg", self.fovy_deg, 1.0, 170.0)
        self.background = _float("background", self.background, 0.0, 1.0)
        if not isinstance(self.shading, bool):
            raise ValueError(f"shading: expected true or false, got {self.shading!r}")
        self.texture_jitter = _float("texture_jitter", self.texture_jitter, 0.0, 1.0)
        self.view_phrase_prob = _float("view_phrase_prob", self.view_phrase_prob, 0.0, 1.0)
        self.view_word_separation = _float(
            "view_word_separation", self.view_word_separation, 0.0, 100.0
        )
        if not isinstance(self.view_phrase_matrix, Mapping):
            raise ValueError(
                f"view_phrase_matrix: expected a mapping true view -> {{written view: probability}}, "
                f"got {self.view_phrase_matrix!r}"
            )
        self.view_phrase_matrix = self._matrix("view_phrase_matrix", self.view_phrase_matrix)
        if not isinstance(self.identity_view_phrase_matrix, Mapping):
            raise ValueError(
                f"identity_view_phrase_matrix: expected a mapping identity -> view phrase "
                f"matrix, got {self.identity_view_phrase_matrix!r}"
            )
        per_identity = {}
        for ident, m in self.identity_view_phrase_matrix.items():
            if ident not in scenes.IDENTITIES:
                raise ValueError(
                    f"identity_view_phrase_matrix: unknown identity {ident!r}, expected one of "
                    f"{scenes.IDENTITIES}"
                )
            per_identity[ident] = self._matrix(f"identity_view_phrase_matrix.{ident}", m)
        self.identity_view_phrase_matrix = per_identity
        if isinstance(self.templates, str) or not self.templates:
            raise ValueError(
                f"templates: expected a non-empty list of strings, got {self.templates!r}"
            )
        self.templates = tuple(self.templates)
        for i, t in enumerate(self.templates):
            if not isinstance(t, str) or "{identity}" not in t or "{view}" not in t:
                raise ValueError(
                    f"templates[{i}]: expected a string containing '{{identity}}' and '{{view}}', got {t!r}"
                )
            try:
                t.format(identity="x", view="")
            except (KeyError, IndexError, ValueError):
                raise ValueError(
                    f"templates[{i}]: expected only the fields {{identity}} and {{view}}, got {t!r}"
                ) from None
        if isinstance(self.identities, str) or not self.identities:
            raise ValueError(
                f"identities: expected a non-empty list of words, got {self.identities!r}"
            )
        self.identities = tuple(self.identities)
        for ident in self.identities:
            if ident not in scenes.IDENTITIES:
                raise ValueError(
                    f"identities: unknown identity {ident!r}, expected a subset of {scenes.IDENTITIES}"
                )

    def _matrix(self, key: str, value: Any) -> Dict[str, Dict[str, float]]:
        """A checked true view -> written view distribution, with a row for every drawn view."""
        if not isinstance(value, Mapping):
            raise ValueError(
                f"{key}: expected a mapping true view -> {{written view: probability}}, "
                f"got {value!r}"
            )
        matrix = {}
        for true_view, row in value.items():
            _view_name(key, true_view)
            matrix[true_view] = _distribution(f"{key}.{true_view}", row, complete=False)
        for v, p in self.view_frequencies.items():
            if p > 0 and self.view_phrase_prob > 0 and v not in matrix:
                raise ValueError(
                    f"{key}: expected a row for true view {v!r} (drawn with "
                    f"probability {p}), got rows {sorted(matrix)}"
                )
        return matrix

    def phrase_matrix(self, identity: str) -> Dict[str, Dict[str, float]]:
        """The view phrase matrix used for captions of ``identity``."""
        return self.identity_view_phrase_matrix.get(identity, self.view_phrase_matrix)

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict (tuples as lists)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DatasetConfig:
        """Strict inverse of :meth:`to_dict`: an unknown key raises ``ValueError`` naming it."""
        if not isinstance(data, Mapping):
            raise ValueError(f"dataset config: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise ValueError(
                    f"dataset config: unknown key {key!r}, expected one of {sorted(known)}"
                )
        return cls(**dict(data))

    def base_prompt(self, identity: str) -> str:
        """The protocols' prompt for an identity: the first template without a view phrase."""
        return base_prompt(self, identity)


def _int(key: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{key}: expected an integer in [{lo}, {hi}], got {value!r}")
    return value


def _float(key: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key}: expected a number in [{lo}, {hi}], got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{key}: expected a number in [{lo}, {hi}], got {value!r}")
    return float(value)


def _range(key: str, value: Any, lo: float, hi: float) -> Tuple[float, float]:
    try:
        a, b = value
    except (TypeError, ValueError):
        raise ValueError(
            f"{key}: expected a pair [low, high] within [{lo}, {hi}], got {value!r}"
        ) from None
    a, b = _float(key, a, lo, hi), _float(key, b, lo, hi)
    if a > b:
        raise ValueError(f"{key}: expected low <= high, got {value!r}")
    return (a, b)


def _view_name(key: str, name: Any) -> str:
    if name not in VIEW_NAMES:
        raise ValueError(f"{key}: unknown view {name!r}, expected one of {VIEW_NAMES}")
    return str(name)


def _distribution(key: str, value: Any, complete: bool = True) -> Dict[str, float]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{key}: expected a mapping view -> probability, got {value!r}")
    out = {}
    for name, p in value.items():
        _view_name(key, name)
        out[str(name)] = _float(f"{key}.{name}", p, 0.0, 1.0)
    total = sum(out.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"{key}: expected probabilities summing to 1, got {total:.6g} from {out}")
    if complete:
        out = {v: out.get(v, 0.0) for v in VIEW_NAMES}
    return out


class Batch(NamedTuple):
    """A batch of captioned renders.

    Attributes:
        images: ``[n, 3, R, R]`` in [−1, 1] (the diffusion model's range).
        captions: the caption of each image.
        views: the true view of each image (``VIEW_NAMES``).
        written_views: the view its caption names, or None when it names none.
        identities: the identity word of each image.
        azimuth_deg: ``[n]`` camera azimuths (degrees, front = 0).
        elevation_deg: ``[n]`` camera elevations (degrees).
    """

    images: Tensor
    captions: List[str]
    views: List[str]
    written_views: List[Optional[str]]
    identities: List[str]
    azimuth_deg: Tensor
    elevation_deg: Tensor


def _choice(probs: Sequence[float], n: int, generator: torch.Generator) -> Tensor:
    return torch.multinomial(
        torch.tensor(probs, dtype=torch.float64), n, replacement=True, generator=generator
    )


def _inverse_cdf(row: Mapping[str, float], u: float) -> str:
    """The first name whose cumulative probability exceeds ``u`` in [0, 1) (zero-probability names never)."""
    total, last = 0.0, None
    for name, p in row.items():
        if p <= 0.0:
            continue
        total += p
        last = name
        if u < total:
            return name
    if last is None:
        raise ValueError(f"view phrase row: expected a positive probability, got {dict(row)}")
    return last  # u within rounding of 1


def _uniform(lo: float, hi: float, n: int, generator: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)


def sample_cameras(
    cfg: DatasetConfig, views: Sequence[str], generator: torch.Generator
) -> Tuple[Tensor, Tensor, Tensor]:
    """(azimuth, elevation, distance) ``[n]`` each for the given true views, uniform in bucket."""
    th = ViewThresholds()
    n = len(views)
    az = torch.zeros(n, dtype=torch.float64)
    el = _uniform(*cfg.elevation_range_deg, n, generator)
    el_over = _uniform(*cfg.overhead_elevation_range_deg, n, generator)
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).to(torch.float64)
    for i, v in enumerate(views):
        if v == "front":
            a = (2.0 * float(u[i]) - 1.0) * th.front
        elif v == "back":
            a = float(sign[i]) * (180.0 - th.back * float(u[i]))
        elif v == "side":
            a = float(sign[i]) * (th.front + (180.0 - th.back - th.front) * float(u[i]))
        else:  # overhead: any azimuth
            a = (2.0 * float(u[i]) - 1.0) * 180.0
            el[i] = el_over[i]
        az[i] = a
    dist = _uniform(*cfg.camera_distance_range, n, generator)
    return az.float(), el.float(), dist.float()


def view_prompt(prompt: str, view: Optional[str]) -> str:
    """``prompt`` with threestudio's view suffix (``"..., back view"``), or unchanged for None."""
    return prompt if view is None else prompt + VIEW_PHRASE.format(view=view)


def base_prompt(cfg: DatasetConfig, identity: str) -> str:
    """The protocols' prompt for ``identity``: the first template with an empty view phrase."""
    return cfg.templates[0].format(identity=identity, view="")


def sample_batch(cfg: DatasetConfig, n: int, generator: torch.Generator) -> Batch:
    """Draw ``n`` captioned renders; deterministic given the generator's state.

    Args:
        cfg: the dataset knobs.
        n: batch size (≥ 1).
        generator: a CPU ``torch.Generator``; seed it with ``cfg.seed`` for the training stream.
    """
    n = _int("n", n, 1, 1 << 20)
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    freq = [cfg.view_frequencies[v] for v in VIEW_NAMES]
    views = [VIEW_NAMES[int(i)] for i in _choice(freq, n, generator)]
    ids = [
        cfg.identities[int(i)]
        for i in torch.randint(len(cfg.identities), (n,), generator=generator)
    ]
    az, el, dist = sample_cameras(cfg, views, generator)
    has_phrase = torch.rand(n, generator=generator) < cfg.view_phrase_prob
    template_idx = torch.randint(len(cfg.templates), (n,), generator=generator)
    # One uniform per image, drawn whether or not it gets a phrase, picks the written view by
    # inverse CDF: the generator's consumption (hence every render) is then independent of the
    # caption knobs, so priors that differ only in their captions see the same renders.
    pick = torch.rand(n, generator=generator, dtype=torch.float64)
    written: List[Optional[str]] = []
    for i, v in enumerate(views):
        if not bool(has_phrase[i]):
            written.append(None)
            continue
        row = cfg.phrase_matrix(ids[i])[v]
        written.append(_inverse_cdf(row, float(pick[i])))
    captions = [
        cfg.templates[int(template_idx[i])].format(
            identity=ids[i], view="" if w is None else VIEW_PHRASE.format(view=w)
        )
        for i, w in enumerate(written)
    ]
    textures = scenes.identity_textures(
        ids, cfg.texture_size, jitter=cfg.texture_jitter, generator=generator
    )
    images = scenes.render(
        textures,
        az,
        el,
        camera_distance=dist,
        size=cfg.resolution,
        fovy_deg=cfg.fovy_deg,
        background=cfg.background,
        shading=cfg.shading,
    )
    return Batch(images * 2.0 - 1.0, captions, views, written, ids, az, el)


_WORD = re.compile(r"[a-z0-9]+")


def caption_words(cfg: DatasetConfig) -> List[str]:
    """Every word a caption (or a guidance view prompt) can contain, sorted, lower case.

    Punctuation is left out (captions use only ``","``). The view words of all four views and
    ``"view"`` are always included, so every prompt of :func:`threestudio_perpneg.core.text.view_prompts`
    with the default suffix templates, and the prefix templates ("backside view of ..."), tokenizes
    without unknown words.
    """
    words = set()
    for template in cfg.templates:
        for ident in cfg.identities:
            words.update(_WORD.findall(template.format(identity=ident, view="").lower()))
    words.update(VIEW_NAMES)
    words.update(("view", "of", "backside"))
    return sorted(words)
