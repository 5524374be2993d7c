"""3D protocol of the Janus testbed: SDS on a learnable head texture, then a classified ring.

A texture with random initialisation on the fixed head sphere (:mod:`.scenes`) is optimised by
score distillation through our pixel-space engine (:class:`~threestudio_perpneg.engines.pixel.PerpNegIFEngine`,
the same code the registered ``perpneg-deep-floyd-guidance`` runs) from threestudio-style random
cameras. Afterwards a ring of views is rendered and classified by the testbed classifier, and the
object is scored with the Janus definitions of :mod:`threestudio_perpneg.eval.janus`:

* **Janus**: a front seen from a back camera, or two separate front runs on the ring;
* **front kept**: the camera at azimuth 0 still sees a front;
* **view accuracy**: per ground-truth bucket, the fraction of ring views classified as that view.

Methods (``method``): ``noview`` (the plain prompt, the control), ``vanilla`` (DreamFusion's
view-dependent prompts, plain CFG), ``ours`` (view-dependent Perp-Neg with ``scheme``
``threestudio`` or ``authors``), ``threestudio-builtin`` (threestudio's own Perp-Neg as its
``stable-diffusion-guidance`` computes it, reproduced by :mod:`.builtin`: ``4·B`` UNet rows a step
and, for ``B > 1``, each negative evaluated on another camera's image, threestudio issue #456;
``scheme`` must be ``threestudio``). All methods share the SDS weighting, the loss normalisation,
the guidance scale convention (``cfg``, which is threestudio's on its Perp-Neg path) and the draws.

Cameras follow threestudio's random-camera data module (``data/uncond.py``): elevation uniform in
degrees with probability 1/2 and uniform on the sphere otherwise, azimuth stratified over the
batch (``batch_uniform_azimuth``), distance and field of view uniform in their ranges. The
elevation range defaults to the prior's training range rather than threestudio's (−10°, 90°): the
prior never saw overhead views, so the protocol keeps to views it knows.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..core.conditioning import PromptBank, StepConditioning, step_conditioning
from ..core.controls import apply_controls
from ..core.text import text_embeddings, view_prompts
from ..core.views import make_scheme
from . import scenes

__all__ = [
    "METHODS",
    "PERP_NEG_METHODS",
    "Protocol3DConfig",
    "ObjectResult",
    "sample_cameras",
    "ring_azimuths",
    "score_ring",
    "classified_object",
    "prior_resolution",
    "run_object",
    "run_objects",
    "render_ring",
    "prompt_bank",
    "RING_DETAIL",
]

#: Ring renders for people are this many times finer than the prior's resolution (the classifier
#: reads the prior's): the same texture and cameras, so eyes of a 16 px face become visible.
RING_DETAIL = 4

METHODS: Tuple[str, ...] = ("noview", "vanilla", "ours", "threestudio-builtin")
#: Methods that build Perp-Neg negatives.
PERP_NEG_METHODS: Tuple[str, ...] = ("ours", "threestudio-builtin")
PathLike = Union[str, Path]


@dataclass
class Protocol3DConfig:
    """One 3D run's settings (every field saved with the results).

    Args:
        method: ``noview``, ``vanilla``, ``ours`` or ``threestudio-builtin`` (see the module
            docstring). Default vanilla.
        scheme: Perp-Neg weight scheme of ``ours``: ``threestudio`` or ``authors``
            (``threestudio-builtin`` needs ``threestudio``).
        batch_size: cameras per step (1 or 4 in the protocol). Default 4.
        steps: optimiser steps. Default 1500.
        lr: Adam learning rate of the texture logits. Default 0.05.
        guidance_scale: CFG scale s in the ``cfg`` convention (ε_u + s·(ε_c − ε_u)). Default 20.
        min_step_percent / max_step_percent: range of the SDS timestep as a fraction of the
            training timesteps (threestudio's defaults 0.02 / 0.98). ``max_step_percent`` may be
            a threestudio schedule ``[start_step, start, end, end_step]`` over the optimiser
            steps (as threestudio's ``C()``; e.g. ``[0, 0.98, 0.3, 300]``): high noise levels
            early lay out the head, low ones late draw its features.
        weighting_strategy: SDS w(t): ``sds`` (1 − ᾱ_t), ``uniform`` or ``fantasia3d``.
        texture_size: height of the learnable texture in texels (width twice that). Default 32.
        init_std: standard deviation of the random texture logits (texture = sigmoid). Default 1.
        elevation_range_deg: camera elevation range (degrees). Default (−10, 45).
        azimuth_range_deg: camera azimuth range (degrees, front = 0), stratified over the batch
            like threestudio's; default (−180, 180), the whole ring. The sanity check of a 3D
            protocol that can draw a face restricts it to (−30, 30).
        camera_distance_range: distance range (head radii); None uses the prior's training range.
        fovy_range_deg: field-of-view range (degrees); None uses the prior's training fov.
        batch_uniform_azimuth: stratify azimuths over the batch (threestudio default True).
        ring_views: views of the evaluation ring at elevation ``ring_elevation_deg``, azimuths
            ``k·360/n``; 12 keeps every view 15° from a bucket boundary. Default 12.
        ring_elevation_deg: elevation of the ring (degrees). Default 0.
        seed: seed of the texture initialisation, the cameras, the timesteps and the noise.
        perp_neg_weight_scale: λ on every negative weight of ``ours``, a number or a threestudio
            schedule ``[start_step, start, end, end_step]`` over the optimiser steps (default 1).
        perp_neg_t_range: ``[lo, hi]`` fractions of the training timesteps where ``ours``
            evaluates negatives (default [0, 1]).
        perp_neg_sampling: ``all`` or ``one`` (one importance-sampled negative per camera,
            drawn from the object's generator after its timesteps and noise). Default all.
        perp_neg_eval_prob: probability p in (0, 1] that a camera keeps its negatives, weights
            divided by p (drawn after ``one``'s draw). Default 1.
            The controls are those of :mod:`threestudio_perpneg.core.controls`; they apply
            to method ``ours`` only.
    """

    method: str = "vanilla"
    scheme: str = "threestudio"
    batch_size: int = 4
    steps: int = 1500
    lr: float = 0.05
    guidance_scale: float = 20.0
    min_step_percent: float = 0.02
    max_step_percent: Any = 0.98
    weighting_strategy: str = "sds"
    texture_size: int = 32
    init_std: float = 1.0
    elevation_range_deg: Tuple[float, float] = (-10.0, 45.0)
    azimuth_range_deg: Tuple[float, float] = (-180.0, 180.0)
    camera_distance_range: Optional[Tuple[float, float]] = None
    fovy_range_deg: Optional[Tuple[float, float]] = None
    batch_uniform_azimuth: bool = True
    ring_views: int = 12
    ring_elevation_deg: float = 0.0
    seed: int = 0
    perp_neg_weight_scale: Any = 1.0
    perp_neg_t_range: Tuple[float, float] = (0.0, 1.0)
    perp_neg_sampling: str = "all"
    perp_neg_eval_prob: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method: unknown method {self.method!r}, expected one of {METHODS}")
        make_scheme(self.scheme)  # validates the scheme name
        if self.method == "threestudio-builtin" and self.scheme != "threestudio":
            raise ValueError(
                f"scheme: method 'threestudio-builtin' needs scheme 'threestudio', got {self.scheme!r}"
            )
        for key, lo in (
            ("batch_size", 1),
            ("steps", 0),
            ("texture_size", 8),
            ("ring_views", 4),
            ("seed", 0),
        ):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{key}: expected an integer >= {lo}, got {v!r}")
        from ..core.controls import check_weight_scale

        self.max_step_percent = check_weight_scale(self.max_step_percent, "max_step_percent")
        tops = (
            [self.max_step_percent]
            if isinstance(self.max_step_percent, float)
            else self.max_step_percent[1:3]
        )
        if not all(0.0 <= self.min_step_percent <= top <= 1.0 for top in tops):
            raise ValueError(
                "min_step_percent/max_step_percent: expected 0 <= min <= max <= 1 (every value "
                f"of a schedule), got {self.min_step_percent} and {self.max_step_percent}"
            )
        for key in ("lr", "guidance_scale", "init_std"):
            v = getattr(self, key)
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not math.isfinite(v)
                or v < 0
            ):
                raise ValueError(f"{key}: expected a finite number >= 0, got {v!r}")
        el_lo, el_hi = (float(x) for x in self.elevation_range_deg)
        if not -90.0 <= el_lo <= el_hi <= 90.0:
            raise ValueError(
                f"elevation_range_deg: expected -90 <= low <= high <= 90, got {self.elevation_range_deg}"
            )
        self.elevation_range_deg = (el_lo, el_hi)
        az_lo, az_hi = (float(x) for x in self.azimuth_range_deg)
        if not -180.0 <= az_lo < az_hi <= 180.0:
            raise ValueError(
                f"azimuth_range_deg: expected -180 <= low < high <= 180, got {self.azimuth_range_deg}"
            )
        self.azimuth_range_deg = (az_lo, az_hi)
        for key in ("camera_distance_range", "fovy_range_deg"):
            v = getattr(self, key)
            if v is not None:
                a, b = (float(x) for x in v)
                if not 0.0 < a <= b:
                    raise ValueError(f"{key}: expected 0 < low <= high, got {v!r}")
                setattr(self, key, (a, b))

        from ..core.controls import (
            check_eval_prob,
            check_sampling,
            check_t_range,
            check_weight_scale,
        )

        self.perp_neg_weight_scale = check_weight_scale(self.perp_neg_weight_scale)
        self.perp_neg_t_range = check_t_range(self.perp_neg_t_range)
        check_sampling(self.perp_neg_sampling)
        self.perp_neg_eval_prob = check_eval_prob(self.perp_neg_eval_prob)
        if self.method != "ours" and self.has_controls:
            raise ValueError(
                f"perp_neg_weight_scale/perp_neg_t_range/perp_neg_sampling/perp_neg_eval_prob: "
                f"the controls apply "
                f"to method 'ours' only, got method {self.method!r}"
            )

    @classmethod
    def testbed_default(cls, steps: int, **overrides: Any) -> Protocol3DConfig:
        """The bench's and calibration's SDS settings: ``steps`` steps, the top timestep
        annealed linearly from 0.98 to 0.3 over the first three quarters of them.

        Chosen on the no-view and vanilla rows only: with the top fixed at 0.98, SDS on the
        16 px prior converges to a featureless head (also in 2D, on a free image); fixed at
        0.3 it draws eyes but keeps the random initial layout; annealed it does both.
        """
        schedule = [0, 0.98, 0.3, max(1, int(0.75 * steps))]
        return cls(**{"steps": steps, "max_step_percent": schedule, **overrides})

    @property
    def has_controls(self) -> bool:
        """Whether any Perp-Neg control differs from its default."""
        return (
            self.perp_neg_weight_scale != 1.0
            or tuple(self.perp_neg_t_range) != (0.0, 1.0)
            or self.perp_neg_sampling != "all"
            or self.perp_neg_eval_prob != 1.0
        )

    def controls_at(self, step: int) -> Any:
        """The step's :class:`~threestudio_perpneg.core.controls.PerpNegControls` (schedule resolved)."""
        from ..core.controls import PerpNegControls, resolve_schedule

        return PerpNegControls(
            weight_scale=resolve_schedule(self.perp_neg_weight_scale, 0, step),
            t_range=self.perp_neg_t_range,
            sampling=self.perp_neg_sampling,
            eval_prob=self.perp_neg_eval_prob,
        )

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


class ObjectResult(NamedTuple):
    """One optimised object and its ring scores.

    Attributes:
        janus: Janus by :func:`threestudio_perpneg.eval.janus.janus_flags` (front at a back
            camera, or two separate front runs).
        front_kept: the ring camera at azimuth 0 is classified front.
        view_accuracy: per ground-truth bucket (front/side/back), fraction of ring views
            classified as that bucket.
        ring_azimuths, ring_labels, ring_truth: the ring's cameras, predicted and true labels.
        flags: the full output of ``janus_flags``.
        unet_rows_per_step: UNet batch rows (branches) per optimisation step, averaged.
        losses: SDS loss per step (of the whole batch of objects optimised together).
        texture: the final texture ``[3, H, 2H]`` in [0, 1]; ring_images: ``[n, 3, R, R]``
            at the prior's resolution R (what the classifier read); ring_images_detail: the same
            ring at ``RING_DETAIL·R`` for pictures (None where not rendered).
        seconds: wall time of the optimisation (shared equally by objects optimised together).
        identity_agreement: fraction of ring views classified as the prompted identity (None
            when no identity was given or the classifier reports none).
    """

    janus: bool
    front_kept: bool
    view_accuracy: Dict[str, float]
    ring_azimuths: List[float]
    ring_labels: List[str]
    ring_truth: List[str]
    flags: Dict[str, Any]
    unet_rows_per_step: float
    losses: List[float]
    texture: Tensor
    ring_images: Tensor
    seconds: float
    identity_agreement: Optional[float] = None
    ring_images_detail: Optional[Tensor] = None


def sample_cameras(
    n: int,
    generator: torch.Generator,
    *,
    elevation_range_deg: Tuple[float, float],
    camera_distance_range: Tuple[float, float],
    fovy_range_deg: Tuple[float, float],
    batch_uniform_azimuth: bool = True,
    azimuth_range_deg: Tuple[float, float] = (-180.0, 180.0),
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """threestudio-style random cameras: (elevation, azimuth, distance, fovy), ``[n]`` each, degrees."""
    lo, hi = elevation_range_deg
    if float(torch.rand((), generator=generator)) < 0.5:
        el = lo + (hi - lo) * torch.rand(n, generator=generator)
    else:  # uniform on the sphere between the two elevations (inverse transform sampling)
        s_lo, s_hi = math.sin(math.radians(lo)), math.sin(math.radians(hi))
        el = torch.rad2deg(torch.asin(s_lo + (s_hi - s_lo) * torch.rand(n, generator=generator)))
    u = torch.rand(n, generator=generator)
    a_lo, a_hi = azimuth_range_deg
    az = ((u + torch.arange(n)) / n if batch_uniform_azimuth else u) * (a_hi - a_lo) + a_lo
    d_lo, d_hi = camera_distance_range
    dist = d_lo + (d_hi - d_lo) * torch.rand(n, generator=generator)
    f_lo, f_hi = fovy_range_deg
    fovy = f_lo + (f_hi - f_lo) * torch.rand(n, generator=generator)
    return el, az, dist, fovy


def ring_azimuths(n: int) -> List[float]:
    """``n`` azimuths ``k·360/n`` wrapped to (−180, 180], starting at the front."""
    out = [k * 360.0 / n for k in range(n)]
    return [a if a <= 180.0 else a - 360.0 for a in out]


def score_ring(
    azimuths: List[float], labels: List[str], elevation_deg: float = 0.0
) -> Tuple[bool, bool, Dict[str, float], List[str], Dict[str, Any]]:
    """(janus, front_kept, view accuracy per bucket, true labels, janus flags) of a classified ring.

    Labels other than view names (the testbed classifier's ``"none"``) count as not-front and as
    a miss in the view accuracy.
    """
    from ..eval.janus import janus_flags

    truth = scenes.view_label(
        torch.tensor(azimuths), torch.full((len(azimuths),), float(elevation_deg))
    )
    # The classifier's "none" (no head view) is not a front; janus_flags only tests for "front",
    # so any other view name stands in for it there.
    known = ("front", "side", "back", "overhead")
    flag_labels = [lab if lab in known else "side" for lab in labels]
    flags = janus_flags(azimuths, flag_labels, elevations=[elevation_deg] * len(azimuths))
    front_kept = any(abs(a) < 1e-6 and lab == "front" for a, lab in zip(azimuths, labels))
    acc: Dict[str, float] = {}
    for view in ("front", "side", "back"):
        idx = [i for i, t in enumerate(truth) if t == view]
        acc[view] = sum(labels[i] == view for i in idx) / len(idx) if idx else math.nan
    return bool(flags["janus"]), front_kept, acc, truth, flags


def classified_object(
    classifier: Any,
    ring: Tensor,
    azimuths: List[float],
    *,
    elevation_deg: float = 0.0,
    identity: Optional[str] = None,
    **fields: Any,
) -> ObjectResult:
    """An :class:`ObjectResult` from a ring at the prior's resolution: the classifier reads it,
    :func:`score_ring` scores it and the identity agreement is the fraction of views read as
    ``identity`` (None without one); ``fields`` are the object's other fields."""
    predicted = classifier.classify(ring)
    labels = list(predicted.views)
    janus, front_kept, acc, truth, flags = score_ring(azimuths, labels, elevation_deg)
    ring_ids = getattr(predicted, "identities", None)
    agreement = (
        sum(i == identity for i in ring_ids) / len(ring_ids) if identity and ring_ids else None
    )
    return ObjectResult(
        janus=janus,
        front_kept=front_kept,
        view_accuracy=acc,
        ring_azimuths=azimuths,
        ring_labels=labels,
        ring_truth=truth,
        flags=flags,
        ring_images=ring,
        identity_agreement=agreement,
        **fields,
    )


def prior_resolution(prior_path: PathLike) -> int:
    """The prior's image size in pixels (its UNet's ``sample_size``)."""
    unet_config = Path(prior_path) / "unet" / "config.json"
    if not unet_config.is_file():
        raise FileNotFoundError(
            f"prior_path: {prior_path} has no unet/config.json (expected a prior folder)"
        )
    return int(json.loads(unet_config.read_text(encoding="utf-8"))["sample_size"])


def _prior_camera_ranges(prior_path: PathLike) -> Tuple[Tuple[float, float], float, float]:
    """(distance range, fovy, background) of the prior's training data, from its testbed.json."""
    from .dataset import DatasetConfig

    meta = Path(prior_path) / "testbed.json"
    if not meta.is_file():
        d = DatasetConfig()
        return d.camera_distance_range, d.fovy_deg, d.background
    data = json.loads(meta.read_text(encoding="utf-8"))
    d = DatasetConfig.from_dict(data.get("dataset", data))
    return d.camera_distance_range, d.fovy_deg, d.background


def render_ring(texture: Tensor, cfg: Protocol3DConfig, prior_path: PathLike, size: int) -> Tensor:
    """The evaluation ring of ``cfg`` (``ring_views`` azimuths from 0) at ``size`` px: ``[n, 3, size, size]``."""
    dist_range, fovy, background = _prior_camera_ranges(prior_path)
    dist_range = cfg.camera_distance_range or dist_range
    fovy_range = cfg.fovy_range_deg or (fovy, fovy)
    azimuths = ring_azimuths(cfg.ring_views)
    return scenes.render(
        texture,
        torch.tensor(azimuths),
        torch.full((len(azimuths),), cfg.ring_elevation_deg),
        sum(dist_range) / 2.0,
        size=size,
        fovy_deg=sum(fovy_range) / 2.0,
        background=background,
    )


def run_object(
    cfg: Protocol3DConfig,
    prior_path: PathLike,
    classifier: Any,
    prompt: str,
    *,
    engine: Any = None,
    bank: Optional[PromptBank] = None,
    identity: Optional[str] = None,
    progress: bool = False,
) -> ObjectResult:
    """Optimise one texture by SDS and score its ring (:func:`run_objects` for one seed).

    Args:
        cfg: the run's settings.
        prior_path: the prior's diffusers folder (``unet/``, ``scheduler/``, ``text_encoder/``,
            ``tokenizer/``; ``testbed.json`` for the training cameras when present).
        classifier: a :class:`~.classifier.TestbedClassifier` (anything with ``classify``).
        prompt: the base prompt (no view words), e.g. ``"a cartoon clown head"``.
        engine: a ready :class:`~threestudio_perpneg.engines.pixel.PerpNegIFEngine` (loaded from
            ``prior_path`` if None; pass one to reuse it across seeds).
        bank: the prompt's :class:`PromptBank` (encoded with the prior's text encoder if None).
        identity: the identity word the prompt names, to score ``identity_agreement``.
        progress: show a tqdm bar.
    """
    return run_objects(
        cfg,
        [cfg.seed],
        prior_path,
        classifier,
        [prompt],
        engine=engine,
        banks=None if bank is None else [bank],
        identities=[identity],
        progress=progress,
    )[0]


def _concat(conds: Sequence[StepConditioning]) -> StepConditioning:
    """One conditioning for several objects' camera batches (negative indices offset)."""
    offsets, total = [], 0
    for c in conds:
        offsets.append(total)
        total += c.positive.shape[0]
    return StepConditioning(
        positive=torch.cat([c.positive for c in conds]),
        uncond=torch.cat([c.uncond for c in conds]),
        negative=torch.cat([c.negative for c in conds]),
        negative_index=torch.cat([c.negative_index + o for c, o in zip(conds, offsets)]),
        negative_weight=torch.cat([c.negative_weight for c in conds]),
        view=torch.cat([c.view for c in conds]),
        perp_neg=conds[0].perp_neg,
    )


def run_objects(
    cfg: Protocol3DConfig,
    seeds: Sequence[int],
    prior_path: PathLike,
    classifier: Any,
    prompts: Sequence[str],
    *,
    engine: Any = None,
    banks: Optional[Sequence[PromptBank]] = None,
    identities: Optional[Sequence[Optional[str]]] = None,
    progress: bool = False,
) -> List[ObjectResult]:
    """Optimise one texture per seed together, in one UNet call per step, and score the rings.

    Each object has its own generator (seeded with its seed) that draws, in order, its texture
    initialisation and per step its cameras, timesteps and noise, and its own Adam state (Adam
    is elementwise), and its loss is scaled so its gradient is the one it would get alone: the
    objects are the same as when run one by one (up to the UNet's batched arithmetic), only
    cheaper. ``cfg.seed`` is ignored; ``prompts[k]`` (and ``banks[k]``, ``identities[k]``) go
    with ``seeds[k]``.
    """
    from ..core.controls import resolve_schedule
    from ..engines.pixel import PerpNegIFEngine, if_sds_step, load_deepfloyd_if
    from ..engines.sd import GuidedNoise, SDSSettings
    from .builtin import threestudio_guided_noise

    n_obj = len(seeds)
    if n_obj == 0 or len(prompts) != n_obj:
        raise ValueError(
            f"prompts: expected one prompt per seed ({n_obj} seeds, at least one), got {len(prompts)}"
        )
    if engine is None:
        engine = PerpNegIFEngine(*load_deepfloyd_if(str(prior_path)))
    if banks is None:
        cache: Dict[str, PromptBank] = {}
        for p in prompts:
            if p not in cache:
                cache[p] = prompt_bank(str(prior_path), p)
        banks = [cache[p] for p in prompts]
    ids = list(identities) if identities is not None else [None] * n_obj
    dist_range, fovy, background = _prior_camera_ranges(prior_path)
    dist_range = cfg.camera_distance_range or dist_range
    fovy_range = cfg.fovy_range_deg or (fovy, fovy)
    scheme = make_scheme(cfg.scheme)
    settings = SDSSettings(
        guidance_scale=cfg.guidance_scale,
        scale_convention="cfg",
        weighting_strategy=cfg.weighting_strategy,
    )
    n_train = int(engine.scheduler.config.num_train_timesteps)
    min_step = int(n_train * cfg.min_step_percent)
    size, b = engine.resolution, cfg.batch_size
    builtin = cfg.method == "threestudio-builtin"

    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    shape = (3, cfg.texture_size, 2 * cfg.texture_size)
    logits = torch.stack([cfg.init_std * torch.randn(shape, generator=g) for g in gens])
    logits.requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=cfg.lr)
    owner = torch.arange(n_obj).repeat_interleave(b)  # object of each camera row
    rows = [0] * n_obj
    losses: List[float] = []
    t0 = time.time()
    steps: Any = range(cfg.steps)
    if progress:
        from tqdm.auto import tqdm

        desc = f"{cfg.method} b{b} {cfg.scheme if cfg.method in PERP_NEG_METHODS else ''} x{n_obj}"
        steps = tqdm(steps, desc=desc, unit="step", leave=False)
    n_train_t = int(engine.num_train_timesteps)
    for step in steps:
        controls = cfg.controls_at(step) if cfg.has_controls else None
        max_step = int(n_train * resolve_schedule(cfg.max_step_percent, 0, step))
        cams, ts, noises, conds = [], [], [], []
        for k, g in enumerate(gens):
            el, az, dist, fov = sample_cameras(
                b,
                g,
                elevation_range_deg=cfg.elevation_range_deg,
                camera_distance_range=dist_range,
                fovy_range_deg=fovy_range,
                batch_uniform_azimuth=cfg.batch_uniform_azimuth,
                azimuth_range_deg=cfg.azimuth_range_deg,
            )
            # threestudio's draw order inside the guidance: timesteps, then noise.
            ts.append(torch.randint(min_step, max_step + 1, [b], dtype=torch.long, generator=g))
            noises.append(torch.randn(b, 3, size, size, generator=g))
            cams.append((el, az, dist, fov))
            conds.append(
                step_conditioning(
                    banks[k],
                    el,
                    az,
                    scheme=scheme,
                    view_dependent=cfg.method != "noview",
                    perp_neg=cfg.method in PERP_NEG_METHODS,
                )
            )
            if controls is not None:  # after the object's timestep and noise draws
                conds[-1] = apply_controls(conds[-1], ts[-1], n_train_t, controls, g)
            # threestudio-builtin evaluates 4 rows per camera, negatives or not (overhead).
            rows[k] += 4 * b if builtin else conds[-1].branches
        el, az, dist, fov = (torch.cat([c[i] for c in cams]) for i in range(4))
        guided_noise: Optional[GuidedNoise] = None
        if builtin:  # each object's cameras are one threestudio batch: pairing within it
            guided_noise = functools.partial(
                threestudio_guided_noise, engine, azimuth=az, group_size=b
            )
        texture = torch.sigmoid(logits)[owner]
        rgb = scenes.render(texture, az, el, dist, size=size, fovy_deg=fov, background=background)
        out = if_sds_step(
            engine,
            rgb.permute(0, 2, 3, 1),
            _concat(conds),
            settings,
            min_step=min_step,
            max_step=max_step,
            elevation=el,
            azimuth=az,
            camera_distances=dist,
            t=torch.cat(ts),
            noise=torch.cat(noises),
            guided_noise=guided_noise,
        )
        opt.zero_grad()
        # loss_sds is averaged over all n_obj·b rows; each object alone averages over its b rows.
        (out["loss_sds"] * n_obj).backward()
        opt.step()
        losses.append(float(out["loss_sds"].detach()))
    seconds = (time.time() - t0) / n_obj

    azimuths = ring_azimuths(cfg.ring_views)
    results = []
    for k in range(n_obj):
        texture = torch.sigmoid(logits[k].detach())
        results.append(
            classified_object(
                classifier,
                render_ring(texture, cfg, prior_path, size),
                azimuths,
                elevation_deg=cfg.ring_elevation_deg,
                identity=ids[k],
                unet_rows_per_step=rows[k] / max(cfg.steps, 1),
                losses=losses,
                texture=texture,
                seconds=seconds,
                ring_images_detail=render_ring(texture, cfg, prior_path, RING_DETAIL * size),
            )
        )
    return results


def prompt_bank(prior_path: str, prompt: str) -> PromptBank:
    """The prompt's view prompts (threestudio's suffixes) and the empty unconditional prompt, encoded."""
    views = view_prompts(prompt)
    emb = text_embeddings(prior_path, [prompt, "", *views], None, use_cache=False)
    return PromptBank.from_embeddings(emb, prompt, "", views)
