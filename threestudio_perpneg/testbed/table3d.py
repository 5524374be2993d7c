"""The 3D table of the Janus testbed: every method on the same seeds, and the rings picture.

Rows have the keys of the benchmark's ``table3d`` (issue 11): ``method, batch, scheme, seeds,
janus, front_kept, view_accuracy, unet_rows_per_step`` (plus ``identity_agreement`` and
``seconds``). Objects of one method are optimised together (:func:`.protocol3d.run_objects`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from ..common.io import pil_nearest
from .protocol3d import ObjectResult, Protocol3DConfig, prompt_bank, run_objects

__all__ = [
    "MethodSpec",
    "PROTOCOL_METHODS",
    "bench_methods",
    "control_methods",
    "object_verdict",
    "run_table3d",
    "reference_ring",
    "save_rings",
    "table_row",
]

PathLike = Union[str, Path]


class MethodSpec(NamedTuple):
    """One row of the 3D table: method, cameras per step, Perp-Neg scheme (None if unused) and
    Perp-Neg controls of ``ours`` as ``((key, value), ...)`` pairs of
    :class:`.protocol3d.Protocol3DConfig` fields (empty: the defaults)."""

    method: str
    batch_size: int
    scheme: Optional[str] = None
    controls: Tuple[Tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        """``method[/scheme][ key=value ...]`` for tables and pictures."""
        name = self.method + (f"/{self.scheme}" if self.scheme else "")
        short = {
            "perp_neg_weight_scale": "λ",
            "perp_neg_t_range": "t",
            "perp_neg_sampling": "",
            "perp_neg_eval_prob": "p",
        }
        extra = " ".join(
            f"{short.get(k, k)}{'=' if short.get(k, k) else ''}{v}" for k, v in self.controls
        )
        return f"{name} {extra}".strip()


def control_methods(steps: int) -> Tuple[MethodSpec, ...]:
    """Issue 12's rows: ours (threestudio scheme) with each control, at batch 1 and 4.

    ``one`` sampled negative, t ranges [0, 0.5] and [0.5, 1], and λ decaying linearly from 1 to 0
    over the ``steps`` optimiser steps (threestudio schedule ``[0, 1, 0, steps]``).
    """
    variants: List[Tuple[Tuple[str, Any], ...]] = [
        (("perp_neg_sampling", "one"),),
        (("perp_neg_t_range", (0.0, 0.5)),),
        (("perp_neg_t_range", (0.5, 1.0)),),
        (("perp_neg_weight_scale", (0, 1.0, 0.0, int(steps))),),
    ]
    return tuple(MethodSpec("ours", b, "threestudio", v) for v in variants for b in (1, 4))


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


def bench_methods() -> Tuple[MethodSpec, ...]:
    """The benchmark's rows: the control, vanilla, threestudio's built-in pairing and ours.

    no view words and vanilla at batch 1 and 4, threestudio's built-in Perp-Neg (its ``[i::2]``
    pairing, 4 rows per camera) at batch 1 and 4, ours with both schemes at batch 1 and 4.
    """
    from .protocol3d import METHODS

    rows = [MethodSpec("noview", 1), MethodSpec("noview", 4)]
    rows += [m for m in PROTOCOL_METHODS if m.method == "vanilla"]
    if "threestudio-builtin" in METHODS:
        rows += [
            MethodSpec("threestudio-builtin", 1, "threestudio"),
            MethodSpec("threestudio-builtin", 4, "threestudio"),
        ]
    rows += [m for m in PROTOCOL_METHODS if m.method == "ours"]
    return tuple(rows)


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
        cfg = Protocol3DConfig(
            **{
                **base.to_dict(),
                "method": spec.method,
                "batch_size": spec.batch_size,
                "scheme": spec.scheme or base.scheme,
                **dict(spec.controls),
            }
        )
        seed_ids = [idents[int(seed) % len(idents)] for seed in seeds]
        objects = run_objects(
            cfg,
            [int(s) for s in seeds],
            prior_path,
            classifier,
            [base_prompt(dataset, i) for i in seed_ids],
            engine=engine,
            banks=[banks[i] for i in seed_ids],
            identities=seed_ids,
            progress=progress,
        )
        results[spec] = objects
        rows.append(table_row(spec, objects))
    return rows, results


def table_row(spec: MethodSpec, objects: Sequence[ObjectResult]) -> Dict[str, Any]:
    """One row of the 3D table from a method's objects: ``method, batch, scheme, controls, label,
    seeds, janus`` (count), ``front_kept`` (count), ``view_accuracy`` (mean per bucket),
    ``identity_agreement`` (mean), ``unet_rows_per_step`` (mean) and ``seconds`` (sum)."""
    acc = {v: _mean([o.view_accuracy[v] for o in objects]) for v in ("front", "side", "back")}
    agreement = [o.identity_agreement for o in objects if o.identity_agreement is not None]
    return {
        "method": spec.method,
        "batch": spec.batch_size,
        "scheme": spec.scheme,
        "controls": {k: v for k, v in spec.controls},
        "label": spec.label,
        "seeds": len(objects),
        "janus": sum(o.janus for o in objects),
        "front_kept": sum(o.front_kept for o in objects),
        "view_accuracy": acc,
        "identity_agreement": _mean(agreement) if agreement else None,
        "unet_rows_per_step": _mean([o.unet_rows_per_step for o in objects]),
        "seconds": round(sum(o.seconds for o in objects), 1),
    }


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def reference_ring(
    prior_path: PathLike, identity: str, base: Optional[Protocol3DConfig] = None
) -> Tuple[str, torch.Tensor]:
    """(label, images) of the identity's clean head on the evaluation ring, at the detail size
    of :func:`save_rings`: what a face, an ear and the hair look like from each camera."""
    from . import scenes
    from .protocol3d import RING_DETAIL, prior_resolution, render_ring

    cfg = base or Protocol3DConfig()
    size = prior_resolution(prior_path)
    ring = render_ring(scenes.identity_texture(identity), cfg, prior_path, RING_DETAIL * size)
    return f"clean {identity}", ring


def object_verdict(janus: bool, front_kept: bool) -> str:
    """An object's verdict as the rings picture writes it: ``JANUS`` or ``ok``, then
    ``, front lost`` when the camera at azimuth 0 sees no front."""
    return ("JANUS" if janus else "ok") + ("" if front_kept else ", front lost")


def save_rings(
    path: PathLike,
    results: Mapping[MethodSpec, Sequence[ObjectResult]],
    *,
    max_seeds: int = 3,
    zoom: int = 4,
    reference: Optional[Tuple[str, torch.Tensor]] = None,
    seeds: Optional[Sequence[int]] = None,
) -> Path:
    """Draw per method the labelled rings of its first seeds into a PNG (written atomically).

    Each ring is one row of views (azimuth 0 first) with the classifier's label under each view
    (upper case where it disagrees with the camera's true bucket) and the Janus / front-kept
    verdict at the left. Views are the detail renders (``ObjectResult.ring_images_detail``)
    where the objects have them, else the classifier's images enlarged ``zoom`` times; labels are
    always the classifier's reading of its own images. ``reference``, from
    :func:`reference_ring`, is drawn first, labelled with the true views. ``seeds``, the seeds
    of every method's objects in order, adds ``seed N`` to each row's name.
    """
    from PIL import Image, ImageDraw

    from ..commands.common import atomic_write

    rows = [(spec, o) for spec, objs in results.items() for o in list(objs)[:max_seeds]]
    names = [
        f"{spec.label} b{spec.batch_size}" + (f" seed {seeds[k]}" if seeds is not None else "")
        for spec, objs in results.items()
        for k in range(min(len(list(objs)), max_seeds))
    ]
    if not rows:
        raise ValueError("results: expected at least one object, got none")
    first = rows[0][1]
    n = len(first.ring_azimuths)
    details = [o.ring_images_detail for _, o in rows]
    detail = all(d is not None for d in details)
    shown: List[torch.Tensor] = [
        d if d is not None and detail else o.ring_images for d, (_, o) in zip(details, rows)
    ]
    cell = shown[0].shape[-1] * (1 if detail else zoom)
    left, text_h = 200, 14
    n_rows = len(rows) + (reference is not None)
    width, height = left + n * cell, n_rows * (cell + text_h) + text_h
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for k, a in enumerate(first.ring_azimuths):
        draw.text((left + k * cell + 2, 0), f"{a:g}", fill="black")

    def paste(y: int, images: torch.Tensor) -> None:
        imgs = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        for k in range(n):
            tile = Image.fromarray(imgs[k].permute(1, 2, 0).numpy())
            canvas.paste(tile.resize((cell, cell), pil_nearest()), (left + k * cell, y))

    y = text_h
    if reference is not None:
        label, images = reference
        draw.text((2, y + 2), label, fill="black")
        draw.text((2, y + 16), "(the prior's data)", fill="black")
        paste(y, images)
        for k, true in enumerate(first.ring_truth):
            draw.text((left + k * cell + 2, y + cell), true, fill="black")
        y += cell + text_h
    for (_, obj), name, images in zip(rows, names, shown):
        verdict = object_verdict(obj.janus, obj.front_kept)
        draw.text((2, y + 2), name, fill="black")
        draw.text((2, y + 16), verdict, fill="red" if obj.janus or not obj.front_kept else "green")
        paste(y, images)
        for k in range(n):
            lab, true = obj.ring_labels[k], obj.ring_truth[k]
            draw.text(
                (left + k * cell + 2, y + cell),
                lab if lab == true else lab.upper(),
                fill="black" if lab == true else "red",
            )
        y += cell + text_h
    out = Path(path)
    atomic_write(out, lambda tmp: canvas.save(tmp, format="PNG"))
    return out
