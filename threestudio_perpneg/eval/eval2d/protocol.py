"""The 2D protocol itself (:func:`run_eval2d`): prompts x requested views x modes x seeds through
the sampler's ``generate_view``, each image classified by the view classifier."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ...common.checks import check_int, check_names, check_seeds, slug
from ...common.io import save_image_atomic, to_jsonable
from .report import IMAGES_DIR, PAPER_PERPNEG, confusion, success_table, write_reports

__all__ = ["DEFAULT_MODES", "DEFAULT_VIEWS", "FORMAT", "check_prompts", "image_name", "run_eval2d"]

FORMAT = "threestudio_perpneg.eval2d/1"
DEFAULT_VIEWS: Tuple[str, ...] = ("side", "back")
#: Table / chart order: the paper's (SD, CEBM, Perp-Neg).
DEFAULT_MODES: Tuple[str, ...] = ("sd", "cebm", "perpneg")


def check_prompts(prompts: Any) -> List[str]:
    if isinstance(prompts, str):
        raise ValueError(f"prompts: expected a list of prompts, got the single string {prompts!r}")
    try:
        items = list(prompts)
    except TypeError:
        raise ValueError(f"prompts: expected a list of prompts, got {prompts!r}") from None
    if not items:
        raise ValueError("prompts: expected at least one prompt, got none")
    out = []
    for i, p in enumerate(items):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompts: prompt {i} is empty or not a string: {p!r}")
        out.append(p.strip())
    if len(set(out)) != len(out):
        dup = next(p for p in out if out.count(p) > 1)
        raise ValueError(f"prompts: the prompt {dup!r} is repeated")
    return out


def image_name(prompt_index: int, prompt: str, view: str, mode: str, seed: int) -> str:
    """File stem of one image: ``p<NNN>_<prompt slug>_<view>_<mode>_seed<S>``."""
    return f"p{prompt_index:03d}_{slug(prompt, sep='-', limit=32, fallback='prompt')}_{view}_{mode}_seed{seed}"


def _versions() -> Dict[str, Optional[str]]:
    import importlib.metadata as md
    import platform

    out: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "open_clip_torch", "matplotlib"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def run_eval2d(
    sampler: Any,
    classifier: Any,
    prompts: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    views: Sequence[str] = DEFAULT_VIEWS,
    modes: Sequence[str] = DEFAULT_MODES,
    seeds: Sequence[int] | str = (0,),
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    height: Optional[int] = None,
    width: Optional[int] = None,
    scheme: str = "threestudio",
    batch_size: int = 8,
    progress: bool = True,
    chart: bool = True,
    settings: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Runs the 2D protocol and writes the reports; returns the report (the JSON's content).

    Args:
        sampler: a :class:`~threestudio_perpneg.sampler.pipeline.PerpNegSampler` (anything with its
            ``generate_view(prompt, view=, mode=, seeds=, num_inference_steps=, guidance_scale=,
            height=, width=, scheme=, progress=)`` returning an object with ``images`` and
            ``weights``).
        classifier: a :class:`~threestudio_perpneg.eval.classifier.ViewClassifier` (anything with
            ``labels`` and ``scores(images, object_name) -> [N, len(labels)]``).
        prompts: object prompts (e.g. ``["a corgi", "a lion"]``); each is also the classifier's
            object name.
        out_dir: output folder (created).
        views: requested views, each one of the classifier's labels (default ``side``, ``back``).
        modes: sampler modes, in table order (default ``sd``, ``cebm``, ``perpneg``).
        seeds: seeds (or text such as ``"0-3"``); each prompt × view × mode gets one image per seed.
        num_inference_steps, guidance_scale, height, width, scheme: passed to ``generate_view``.
        batch_size: most seeds per sampler call.
        progress: show a progress bar (one step per sampler call) on stderr.
        chart: draw ``eval2d.png`` (needs matplotlib).
        settings: extra JSON-serialisable settings recorded in the report (model names ...).

    Raises:
        `ValueError`: naming ``prompts``, ``views``, ``modes``, ``seeds``, ``batch_size``, or what
            the sampler rejects (``scheme``, ``num_inference_steps``, ``height`` ...).
    """
    from ...sampler.pipeline import MODES

    labels = [str(x) for x in classifier.labels]
    prompt_list = check_prompts(prompts)
    view_list = check_names("views", views, ("front", "side", "back", "overhead"))
    missing = [v for v in view_list if v not in labels]
    if missing:
        raise ValueError(
            f"views: requested view(s) {missing} are not among the classifier's labels {labels}"
        )
    mode_list = check_names("modes", modes, MODES)
    seed_list = check_seeds(seeds, "seeds", unique=True, text=True)
    batch_size = check_int("batch_size", batch_size, 1)

    out = Path(out_dir)
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    chunks = [seed_list[i : i + batch_size] for i in range(0, len(seed_list), batch_size)]
    jobs = [
        (pi, p, v, m, c)
        for pi, p in enumerate(prompt_list)
        for v in view_list
        for m in mode_list
        for c in chunks
    ]

    from tqdm.auto import tqdm

    records: List[Dict[str, Any]] = []
    calls: List[Dict[str, Any]] = []
    t0 = time.perf_counter()
    t_generate = t_classify = 0.0
    bar = tqdm(
        total=len(jobs), desc="eval2d", unit="call", disable=not progress, dynamic_ncols=True
    )
    try:
        for pi, prompt, view, mode, chunk in jobs:
            t = time.perf_counter()
            result = sampler.generate_view(
                prompt,
                view=view,
                mode=mode,
                seeds=list(chunk),
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                height=height,
                width=width,
                scheme=scheme,
                progress=False,
            )
            images = list(result.images)
            if len(images) != len(chunk):
                raise RuntimeError(
                    f"the sampler returned {len(images)} image(s) for {len(chunk)} seed(s)"
                )
            t_generate += time.perf_counter() - t
            t = time.perf_counter()
            scores = classifier.scores(images, prompt)
            t_classify += time.perf_counter() - t
            if tuple(scores.shape) != (len(images), len(labels)):
                raise RuntimeError(
                    f"the classifier returned scores of shape {tuple(scores.shape)}, expected "
                    f"({len(images)}, {len(labels)})"
                )
            calls.append(
                {
                    "prompt": prompt,
                    "prompt_index": pi,
                    "view": view,
                    "mode": mode,
                    "seeds": list(chunk),
                    "weights": to_jsonable(getattr(result, "weights", None), nonfinite="str"),
                }
            )
            for seed, image, row in zip(chunk, images, scores.tolist()):
                name = image_name(pi, prompt, view, mode, seed)
                file = f"{IMAGES_DIR}/{name}.png"
                save_image_atomic(out / file, image)
                best = max(range(len(labels)), key=lambda k: row[k])
                predicted = labels[best]
                records.append(
                    {
                        "file": file,
                        "prompt": prompt,
                        "prompt_index": pi,
                        "view": view,
                        "mode": mode,
                        "seed": int(seed),
                        "predicted": predicted,
                        "success": predicted == view,
                        "scores": {lab: round(float(x), 6) for lab, x in zip(labels, row)},
                    }
                )
            ok = sum(r["success"] for r in records)
            bar.set_postfix_str(f"success {ok}/{len(records)}", refresh=False)
            bar.update(1)
    finally:
        bar.close()

    describe = getattr(classifier, "describe", None)
    report: Dict[str, Any] = {
        "format": FORMAT,
        "settings": to_jsonable(  # non-finite numbers as text
            {
                **(settings or {}),
                "prompts": prompt_list,
                "views": view_list,
                "modes": mode_list,
                "seeds": seed_list,
                "num_inference_steps": num_inference_steps,
                "guidance_scale": guidance_scale,
                "height": height,
                "width": width,
                "scheme": scheme,
                "batch_size": batch_size,
                "labels": labels,
                "classifier": describe() if callable(describe) else {"labels": labels},
                "success": "predicted label == requested view",
                "interval": "95 % Wilson score interval",
            },
            nonfinite="str",
        ),
        "versions": _versions(),
        "paper_perpneg": PAPER_PERPNEG,
        "table": success_table(records, mode_list, view_list),
        "confusion": confusion(records, mode_list, view_list, labels),
        "calls": calls,
        "images": records,
        "timings_s": {
            "generate": round(t_generate, 3),
            "classify": round(t_classify, 3),
            "total": round(time.perf_counter() - t0, 3),
        },
    }
    report["settings"].setdefault("random_models", [])
    report["settings"].setdefault(
        "clip", str(getattr(classifier, "name", "") or type(classifier).__name__)
    )
    report["settings"].setdefault("model", None)
    write_reports(report, out, chart=chart)
    return report
