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
``threestudio`` or ``authors``). threestudio's built-in Perp-Neg pairing comes in a later step.

Cameras follow threestudio's random-camera data module (``data/uncond.py``): elevation uniform in
degrees with probability 1/2 and uniform on the sphere otherwise, azimuth stratified over the
batch (``batch_uniform_azimuth``), distance and field of view uniform in their ranges. The
elevation range defaults to the prior's training range rather than threestudio's (−10°, 90°): the
prior never saw overhead views, so the protocol keeps to views it knows.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..core.conditioning import PromptBank, step_conditioning
from ..core.text import text_embeddings, view_prompts
from ..core.views import make_scheme
from . import scenes

__all__ = [
    "METHODS",
    "Protocol3DConfig",
    "ObjectResult",
    "sample_cameras",
    "ring_azimuths",
    "score_ring",
    "run_object",
    "prompt_bank",
    "MethodSpec",
    "PROTOCOL_METHODS",
    "run_table3d",
    "save_rings",
]

METHODS: Tuple[str, ...] = ("noview", "vanilla", "ours")
PathLike = Union[str, Path]


@dataclass
class Protocol3DConfig:
    """One 3D run's settings (every field saved with the results).

    Args:
        method: ``noview``, ``vanilla`` or ``ours`` (see the module docstring). Default vanilla.
        scheme: Perp-Neg weight scheme of ``ours``: ``threestudio`` or ``authors``.
        batch_size: cameras per step (1 or 4 in the protocol). Default 4.
        steps: optimiser steps. Default 1500.
        lr: Adam learning rate of the texture logits. Default 0.05.
        guidance_scale: CFG scale s in the ``cfg`` convention (ε_u + s·(ε_c − ε_u)). Default 20.
        min_step_percent / max_step_percent: range of the SDS timestep as a fraction of the
            training timesteps (threestudio's defaults 0.02 / 0.98).
        weighting_strategy: SDS w(t): ``sds`` (1 − ᾱ_t), ``uniform`` or ``fantasia3d``.
        texture_size: height of the learnable texture in texels (width twice that). Default 32.
        init_std: standard deviation of the random texture logits (texture = sigmoid). Default 1.
        elevation_range_deg: camera elevation range (degrees). Default (−10, 45).
        camera_distance_range: distance range (head radii); None uses the prior's training range.
        fovy_range_deg: field-of-view range (degrees); None uses the prior's training fov.
        batch_uniform_azimuth: stratify azimuths over the batch (threestudio default True).
        ring_views: views of the evaluation ring at elevation ``ring_elevation_deg``, azimuths
            ``k·360/n``; 12 keeps every view 15° from a bucket boundary. Default 12.
        ring_elevation_deg: elevation of the ring (degrees). Default 0.
        seed: seed of the texture initialisation, the cameras, the timesteps and the noise.
    """

    method: str = "vanilla"
    scheme: str = "threestudio"
    batch_size: int = 4
    steps: int = 1500
    lr: float = 0.05
    guidance_scale: float = 20.0
    min_step_percent: float = 0.02
    max_step_percent: float = 0.98
    weighting_strategy: str = "sds"
    texture_size: int = 32
    init_std: float = 1.0
    elevation_range_deg: Tuple[float, float] = (-10.0, 45.0)
    camera_distance_range: Optional[Tuple[float, float]] = None
    fovy_range_deg: Optional[Tuple[float, float]] = None
    batch_uniform_azimuth: bool = True
    ring_views: int = 12
    ring_elevation_deg: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method: unknown method {self.method!r}, expected one of {METHODS}")
        make_scheme(self.scheme)  # validates the scheme name
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
        if not 0.0 <= self.min_step_percent <= self.max_step_percent <= 1.0:
            raise ValueError(
                "min_step_percent/max_step_percent: expected 0 <= min <= max <= 1, got "
                f"{self.min_step_percent} and {self.max_step_percent}"
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
        for key in ("camera_distance_range", "fovy_range_deg"):
            v = getattr(self, key)
            if v is not None:
                a, b = (float(x) for x in v)
                if not 0.0 < a <= b:
                    raise ValueError(f"{key}: expected 0 < low <= high, got {v!r}")
                setattr(self, key, (a, b))

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
        losses: SDS loss per step.
        texture: the final texture ``[3, H, 2H]`` in [0, 1]; ring_images: ``[n, 3, R, R]``.
        seconds: wall time of the optimisation.
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


def sample_cameras(
    n: int,
    generator: torch.Generator,
    *,
    elevation_range_deg: Tuple[float, float],
    camera_distance_range: Tuple[float, float],
    fovy_range_deg: Tuple[float, float],
    batch_uniform_azimuth: bool = True,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """threestudio-style random cameras: (elevation, azimuth, distance, fovy), ``[n]`` each, degrees."""
    lo, hi = elevation_range_deg
    if float(torch.rand((), generator=generator)) < 0.5:
        el = lo + (hi - lo) * torch.rand(n, generator=generator)
    else:  # uniform on the sphere between the two elevations (inverse transform sampling)
        s_lo, s_hi = math.sin(math.radians(lo)), math.sin(math.radians(hi))
        el = torch.rad2deg(torch.asin(s_lo + (s_hi - s_lo) * torch.rand(n, generator=generator)))
    u = torch.rand(n, generator=generator)
    az = ((u + torch.arange(n)) / n if batch_uniform_azimuth else u) * 360.0 - 180.0
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
    """Optimise one texture by SDS and score its ring.

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
    from ..engines.pixel import PerpNegIFEngine, if_sds_step, load_deepfloyd_if
    from ..engines.sd import SDSSettings

    if engine is None:
        unet, scheduler = load_deepfloyd_if(str(prior_path))
        engine = PerpNegIFEngine(unet, scheduler)
    if bank is None:
        bank = prompt_bank(str(prior_path), prompt)
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
    min_step, max_step = int(n_train * cfg.min_step_percent), int(n_train * cfg.max_step_percent)

    g = torch.Generator().manual_seed(cfg.seed)
    logits = (
        cfg.init_std * torch.randn(3, cfg.texture_size, 2 * cfg.texture_size, generator=g)
    ).requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=cfg.lr)
    size = engine.resolution
    rows = 0
    losses: List[float] = []
    t0 = time.time()
    steps: Any = range(cfg.steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(
            steps, desc=f"{cfg.method} b{cfg.batch_size} seed {cfg.seed}", unit="step", leave=False
        )
    for _ in steps:
        el, az, dist, fov = sample_cameras(
            cfg.batch_size,
            g,
            elevation_range_deg=cfg.elevation_range_deg,
            camera_distance_range=dist_range,
            fovy_range_deg=fovy_range,
            batch_uniform_azimuth=cfg.batch_uniform_azimuth,
        )
        texture = torch.sigmoid(logits)
        rgb = scenes.render(texture, az, el, dist, size=size, fovy_deg=fov, background=background)
        cond = step_conditioning(
            bank,
            el,
            az,
            scheme=scheme,
            view_dependent=cfg.method != "noview",
            perp_neg=cfg.method == "ours",
        )
        out = if_sds_step(
            engine,
            rgb.permute(0, 2, 3, 1),
            cond,
            settings,
            min_step=min_step,
            max_step=max_step,
            elevation=el,
            azimuth=az,
            camera_distances=dist,
            generator=g,
        )
        opt.zero_grad()
        out["loss_sds"].backward()
        opt.step()
        rows += cond.branches
        losses.append(float(out["loss_sds"].detach()))
    seconds = time.time() - t0

    texture = torch.sigmoid(logits.detach())
    azimuths = ring_azimuths(cfg.ring_views)
    n = len(azimuths)
    ring = scenes.render(
        texture,
        torch.tensor(azimuths),
        torch.full((n,), cfg.ring_elevation_deg),
        sum(dist_range) / 2.0,
        size=size,
        fovy_deg=sum(fovy_range) / 2.0,
        background=background,
    )
    predicted = classifier.classify(ring)
    labels = list(predicted.views)
    janus, front_kept, acc, truth, flags = score_ring(azimuths, labels, cfg.ring_elevation_deg)
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
        unet_rows_per_step=rows / max(cfg.steps, 1),
        losses=losses,
        texture=texture,
        ring_images=ring,
        seconds=seconds,
        identity_agreement=agreement,
    )


def prompt_bank(prior_path: str, prompt: str) -> PromptBank:
    """The prompt's view prompts (threestudio's suffixes) and the empty unconditional prompt, encoded."""
    views = view_prompts(prompt)
    emb = text_embeddings(prior_path, [prompt, "", *views], None, use_cache=False)
    return PromptBank.from_embeddings(emb, prompt, "", views)


class MethodSpec(NamedTuple):
    """One row of the 3D table: method, cameras per step and Perp-Neg scheme (None if unused)."""

    method: str
    batch_size: int
    scheme: Optional[str] = None


#: The issue's rows available so far (threestudio's built-in pairing comes in a later step).
PROTOCOL_METHODS: Tuple[MethodSpec, ...] = (
    MethodSpec("noview", 4),
    MethodSpec("vanilla", 1),
    MethodSpec("vanilla", 4),
    MethodSpec("ours", 1, "threestudio"),
    MethodSpec("ours", 4, "threestudio"),
    MethodSpec("ours", 1, "authors"),
    MethodSpec("ours", 4, "authors"),
)


def run_table3d(
    prior_path: PathLike,
    classifier: Any,
    seeds: Sequence[int],
    *,
    methods: Sequence[MethodSpec] = PROTOCOL_METHODS,
    base: Optional[Protocol3DConfig] = None,
    identities: Optional[Sequence[str]] = None,
    progress: bool = True,
) -> Tuple[List[Dict[str, Any]], Dict[MethodSpec, List[ObjectResult]]]:
    """Every method on the same seeds; seed ``k`` prompts identity ``identities[k % n]``.

    Returns:
        (rows, results): one row per method with ``method, batch, scheme, seeds, janus``
        (count), ``front_kept`` (count), ``view_accuracy`` (mean per bucket over seeds),
        ``identity_agreement`` (mean), ``unet_rows_per_step`` (mean) and ``seconds``; and the
        objects themselves per method.
    """
    from ..engines.pixel import PerpNegIFEngine, load_deepfloyd_if
    from .dataset import DatasetConfig, base_prompt

    base = base or Protocol3DConfig()
    if not seeds:
        raise ValueError("seeds: expected at least one seed, got none")
    meta = Path(prior_path) / "testbed.json"
    data = json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else {}
    dataset = DatasetConfig.from_dict(data["dataset"]) if "dataset" in data else DatasetConfig()
    idents = tuple(identities or dataset.identities)
    engine = PerpNegIFEngine(*load_deepfloyd_if(str(prior_path)))
    banks = {i: prompt_bank(str(prior_path), base_prompt(dataset, i)) for i in idents}
    rows: List[Dict[str, Any]] = []
    results: Dict[MethodSpec, List[ObjectResult]] = {}
    for spec in methods:
        objects = []
        for seed in seeds:
            ident = idents[int(seed) % len(idents)]
            cfg = Protocol3DConfig(
                **{
                    **base.to_dict(),
                    "method": spec.method,
                    "batch_size": spec.batch_size,
                    "scheme": spec.scheme or base.scheme,
                    "seed": int(seed),
                }
            )
            objects.append(
                run_object(
                    cfg,
                    prior_path,
                    classifier,
                    base_prompt(dataset, ident),
                    engine=engine,
                    bank=banks[ident],
                    identity=ident,
                    progress=progress,
                )
            )
        results[spec] = objects
        acc = {v: _mean([o.view_accuracy[v] for o in objects]) for v in ("front", "side", "back")}
        agreement = [o.identity_agreement for o in objects if o.identity_agreement is not None]
        rows.append(
            {
                "method": spec.method,
                "batch": spec.batch_size,
                "scheme": spec.scheme,
                "seeds": len(objects),
                "janus": sum(o.janus for o in objects),
                "front_kept": sum(o.front_kept for o in objects),
                "view_accuracy": acc,
                "identity_agreement": _mean(agreement) if agreement else None,
                "unet_rows_per_step": _mean([o.unet_rows_per_step for o in objects]),
                "seconds": round(sum(o.seconds for o in objects), 1),
            }
        )
    return rows, results


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def save_rings(
    path: PathLike,
    results: Mapping[MethodSpec, Sequence[ObjectResult]],
    *,
    max_seeds: int = 3,
    zoom: int = 4,
) -> Path:
    """Draw per method the labelled rings of its first seeds into a PNG (written atomically).

    Each ring is one row of views (azimuth 0 first) with the classifier's label under each view
    (upper case where it disagrees with the camera's true bucket) and the Janus / front-kept
    verdict at the left.
    """
    from PIL import Image, ImageDraw

    from ..commands.common import atomic_write

    rows = [(spec, o) for spec, objs in results.items() for o in list(objs)[:max_seeds]]
    if not rows:
        raise ValueError("results: expected at least one object, got none")
    n = len(rows[0][1].ring_azimuths)
    cell = rows[0][1].ring_images.shape[-1] * zoom
    left, text_h = 150, 14
    width, height = left + n * cell, len(rows) * (cell + text_h) + text_h
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for k, a in enumerate(rows[0][1].ring_azimuths):
        draw.text((left + k * cell + 2, 0), f"{a:g}", fill="black")
    for r, (spec, obj) in enumerate(rows):
        y = text_h + r * (cell + text_h)
        name = spec.method + (f"/{spec.scheme}" if spec.scheme else "")
        verdict = ("JANUS" if obj.janus else "ok") + ("" if obj.front_kept else ", front lost")
        draw.text((2, y + 2), f"{name} b{spec.batch_size}", fill="black")
        draw.text((2, y + 16), verdict, fill="red" if obj.janus or not obj.front_kept else "green")
        imgs = (obj.ring_images.clamp(0, 1) * 255).round().to(torch.uint8)
        for k in range(n):
            tile = Image.fromarray(imgs[k].permute(1, 2, 0).numpy()).resize(
                (cell, cell), Image.NEAREST
            )
            canvas.paste(tile, (left + k * cell, y))
            lab, true = obj.ring_labels[k], obj.ring_truth[k]
            draw.text(
                (left + k * cell + 2, y + cell),
                lab if lab == true else lab.upper(),
                fill="black" if lab == true else "red",
            )
    out = Path(path)
    atomic_write(out, lambda tmp: canvas.save(tmp, format="PNG"))
    return out
