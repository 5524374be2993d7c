"""The Perp-Neg paper's 2D view-success protocol: ``python -m threestudio_perpneg eval2d``.

For every prompt × requested view (default ``side``, ``back``) × seed, an image is generated with
:meth:`threestudio_perpneg.sampler.pipeline.PerpNegSampler.generate_view` in each mode (``sd``: plain
negative prompt, ``cebm``: composable diffusion, ``perpneg``: Perp-Neg), classified by the
zero-shot CLIP :class:`~threestudio_perpneg.eval.classifier.ViewClassifier` (object name = the
prompt), and counted a success when the predicted view equals the requested one. The report gives
the success rate per mode × view with its counts and a 95 % Wilson interval.

Outputs under ``--out``:

* ``eval2d.md`` and ``eval2d.csv``: the success table (plus an ``all`` row per mode);
* ``eval2d.png``: bar chart of the success rates with the intervals (needs matplotlib);
* ``eval2d.json``: every setting, library versions, every sampler call with the weights it used,
  and every image with its predicted label and per-label scores;
* ``images/p<NNN>_<prompt>_<view>_<mode>_seed<S>.png``: every image.

The paper reports, for Perp-Neg on Stable Diffusion, side 73.1 % and back 40.4 % success. Those
numbers need the real checkpoints (e.g. ``--model stabilityai/stable-diffusion-2-1-base --clip
openai/clip-vit-large-patch14``) on a GPU, with the paper's prompts and many seeds. Without
``--model`` / ``--clip`` tiny RANDOM models are built into ``<out>/tiny-sd`` / ``<out>/tiny-clip``
so the command runs on a CPU: its numbers are meaningless and only show that the pipeline works.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, Tuple

from ..commands.common import (
    TINY_DIR,
    TINY_SEED,
    CommandError,
    atomic_write,
    device_arg,
    finite_float,
    first_line,
    positive_int,
    run_command,
)
from .stats import wilson_interval

__all__ = [
    "CSV_NAME",
    "DEFAULT_MODES",
    "DEFAULT_VIEWS",
    "Eval2DError",
    "IMAGES_DIR",
    "JSON_NAME",
    "MD_NAME",
    "PAPER_PERPNEG",
    "PNG_NAME",
    "build_parser",
    "confusion",
    "image_name",
    "main",
    "plot_success",
    "run_cli",
    "run_eval2d",
    "success_table",
    "table_csv",
    "table_markdown",
    "wilson_interval",
    "write_reports",
]

PROG = "threestudio-perpneg eval2d"
FORMAT = "threestudio_perpneg.eval2d/1"
JSON_NAME = "eval2d.json"
CSV_NAME = "eval2d.csv"
MD_NAME = "eval2d.md"
PNG_NAME = "eval2d.png"
IMAGES_DIR = "images"
TINY_SD_DIR = TINY_DIR
TINY_CLIP_DIR = "tiny-clip"
#: Image size used with the tiny random Stable Diffusion when --height/--width are not given.
TINY_SIZE = 64
DEFAULT_VIEWS: Tuple[str, ...] = ("side", "back")
#: Table / chart order: the paper's (SD, CEBM, Perp-Neg).
DEFAULT_MODES: Tuple[str, ...] = ("sd", "cebm", "perpneg")
#: The paper's 2D success rates with Perp-Neg (real Stable Diffusion, real CLIP).
PAPER_PERPNEG: Dict[str, float] = {"side": 0.731, "back": 0.404}
ALL = "all"
TINY_NOTE = (
    "NOTE: no {what} given: using a tiny RANDOM {kind} ({path}). The success rates are "
    "MEANINGLESS (random generator and/or random classifier); they only show that the pipeline "
    "runs. The paper's numbers (Perp-Neg: side 73.1 %, back 40.4 %) need real checkpoints on a "
    "GPU, e.g. --model stabilityai/stable-diffusion-2-1-base --clip openai/clip-vit-large-patch14 "
    "--device cuda --fp16."
)


class Eval2DError(CommandError):
    """A user-facing error: one line naming the argument, and its exit code (2)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message, exit_code)


def _fail(arg: str, message: str) -> NoReturn:
    raise Eval2DError(f"argument {arg}: {message}")


def success_table(
    records: Sequence[Dict[str, Any]],
    modes: Sequence[str],
    views: Sequence[str],
    *,
    with_all: bool = True,
) -> List[Dict[str, Any]]:
    """Success counts per mode × requested view (rows in ``modes`` then ``views`` order).

    Each record needs ``mode``, ``view`` (requested) and ``success`` (bool). With ``with_all`` each
    mode gets an extra row with ``view == "all"`` pooling its views.

    Returns:
        rows ``{"mode", "view", "successes", "total", "rate", "ci_low", "ci_high"}``; ``rate`` is
        ``None`` for an empty cell.
    """
    rows: List[Dict[str, Any]] = []
    for mode in modes:
        cells = [
            (view, [r for r in records if r["mode"] == mode and r["view"] == view])
            for view in views
        ]
        if with_all:
            cells.append((ALL, [r for r in records if r["mode"] == mode and r["view"] in views]))
        for view, rs in cells:
            k, n = sum(1 for r in rs if r["success"]), len(rs)
            lo, hi = wilson_interval(k, n)
            rows.append(
                {
                    "mode": mode,
                    "view": view,
                    "successes": k,
                    "total": n,
                    "rate": (k / n) if n else None,
                    "ci_low": lo,
                    "ci_high": hi,
                }
            )
    return rows


def confusion(
    records: Sequence[Dict[str, Any]],
    modes: Sequence[str],
    views: Sequence[str],
    labels: Sequence[str],
) -> Dict[str, Dict[str, Dict[str, int]]]:
    """``{mode: {requested view: {predicted label: count}}}``."""
    return {
        m: {
            v: {
                lab: sum(
                    1
                    for r in records
                    if r["mode"] == m and r["view"] == v and r["predicted"] == lab
                )
                for lab in labels
            }
            for v in views
        }
        for m in modes
    }


# ------------------------------------------------------------------------------- validation
def _check_list(key: str, values: Any, allowed: Sequence[str]) -> List[str]:
    if isinstance(values, str):
        values = [p.strip() for p in re.split(r"[,\s]+", values) if p.strip()]
    try:
        items = list(values)
    except TypeError:
        raise ValueError(f"{key}: expected some of {list(allowed)}, got {values!r}") from None
    if not items:
        raise ValueError(f"{key}: expected at least one of {list(allowed)}, got none")
    for item in items:
        if item not in allowed:
            raise ValueError(f"{key}: unknown name {item!r}, expected some of {list(allowed)}")
    if len(set(items)) != len(items):
        raise ValueError(f"{key}: a name is repeated in {items}")
    return items


def _check_prompts(prompts: Any) -> List[str]:
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


def _check_seeds(seeds: Any) -> List[int]:
    if isinstance(seeds, str):
        from ..sampler.pipeline import parse_seeds

        seeds = parse_seeds(seeds)
    try:
        items = list(seeds)
    except TypeError:
        raise ValueError(f"seeds: expected a list of integers, got {seeds!r}") from None
    if not items:
        raise ValueError("seeds: expected at least one seed, got none")
    for s in items:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"seeds: expected non-negative integers, got {s!r}")
    if len(set(items)) != len(items):
        raise ValueError(f"seeds: a seed is repeated in {items}")
    return [int(s) for s in items]


def _slug(text: str, limit: int = 32) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return (s[:limit].rstrip("-")) or "prompt"


def image_name(prompt_index: int, prompt: str, view: str, mode: str, seed: int) -> str:
    """File stem of one image: ``p<NNN>_<prompt slug>_<view>_<mode>_seed<S>``."""
    return f"p{prompt_index:03d}_{_slug(prompt)}_{view}_{mode}_seed{seed}"


# ------------------------------------------------------------------------------- file output
def _write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    atomic_write(path, write)


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100.0 * x:.1f} %"


def _cell(row: Dict[str, Any]) -> str:
    if not row["total"]:
        return "n/a"
    return (
        f"{_pct(row['rate'])} ({row['successes']}/{row['total']}) "
        f"[{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}]"
    )


def table_csv(rows: Sequence[Dict[str, Any]]) -> str:
    """The success table as CSV text (rates and bounds as fractions with 6 decimals)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["mode", "view", "successes", "total", "success_rate", "ci95_low", "ci95_high"])
    for r in rows:
        rate = "" if r["rate"] is None else f"{r['rate']:.6f}"
        w.writerow(
            [
                r["mode"],
                r["view"],
                r["successes"],
                r["total"],
                rate,
                f"{r['ci_low']:.6f}",
                f"{r['ci_high']:.6f}",
            ]
        )
    return buf.getvalue()


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table_markdown(report: Dict[str, Any]) -> str:
    """The markdown report: notes, the success table, per-prompt counts, confusion, settings."""
    s = report["settings"]
    modes, views = s["modes"], s["views"]
    rows = {(r["mode"], r["view"]): r for r in report["table"]}
    cols = list(views) + ([ALL] if len(views) > 1 else [])
    lines = ["# Perp-Neg 2D view-success evaluation", ""]
    if s.get("random_models"):
        lines += [
            "> **Tiny random models** (" + ", ".join(s["random_models"]) + "): these numbers are "
            "meaningless; they only show that the pipeline runs. The paper's numbers need real "
            "checkpoints on a GPU.",
            "",
        ]
    n_per_cell = len(s["prompts"]) * len(s["seeds"])
    lines += [
        f"Success rate of the requested view: {len(s['prompts'])} prompt(s) × {len(s['seeds'])} "
        f"seed(s) = {n_per_cell} image(s) per cell, classified zero-shot by CLIP "
        f"`{s['clip']}` over the labels {', '.join(s['labels'])}. Cells: rate (successes/total) "
        "[95 % Wilson interval, %].",
        "",
        "| mode | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for m in modes:
        lines.append(f"| {m} | " + " | ".join(_cell(rows[(m, v)]) for v in cols) + " |")
    paper = ", ".join(f"{v} {100 * PAPER_PERPNEG[v]:.1f} %" for v in PAPER_PERPNEG)
    lines += ["", f"Paper (Perp-Neg, real Stable Diffusion and CLIP): {paper}.", ""]

    lines += [
        "## Per prompt",
        "",
        "| prompt | mode | " + " | ".join(views) + " |",
        "|---|---|" + "---|" * len(views),
    ]
    for i, p in enumerate(s["prompts"]):
        for m in modes:
            cells = []
            for v in views:
                rs = [
                    r
                    for r in report["images"]
                    if r["prompt_index"] == i and r["mode"] == m and r["view"] == v
                ]
                cells.append(f"{sum(r['success'] for r in rs)}/{len(rs)}")
            lines.append(f"| {_md_escape(p)} | {m} | " + " | ".join(cells) + " |")
    labels = s["labels"]
    lines += [
        "",
        "## Predicted labels (requested view → counts)",
        "",
        "| mode | requested | " + " | ".join(labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    for m in modes:
        for v in views:
            counts = report["confusion"][m][v]
            lines.append(f"| {m} | {v} | " + " | ".join(str(counts[lab]) for lab in labels) + " |")
    lines += ["", "## Settings", ""]
    for key in (
        "model",
        "clip",
        "clip_backend",
        "views",
        "modes",
        "seeds",
        "num_inference_steps",
        "guidance_scale",
        "height",
        "width",
        "scheme",
        "device",
        "dtype",
    ):
        if key in s:
            value = s[key]
            if isinstance(value, list):
                value = ", ".join(str(x) for x in value)
            lines.append(f"- {key}: `{value}`")
    lines.append(f"- images: `{IMAGES_DIR}/`, per-image labels and scores: `{JSON_NAME}`")
    return "\n".join(lines) + "\n"


def plot_success(report: Dict[str, Any], path: Path) -> None:
    """Grouped bar chart (groups = requested views, bars = modes) with Wilson error bars."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    s = report["settings"]
    modes, views = s["modes"], s["views"]
    rows = {(r["mode"], r["view"]): r for r in report["table"]}
    width = 0.8 / max(1, len(modes))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(views) + 1.5), 3.6), dpi=120)
    try:
        for i, m in enumerate(modes):
            xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(views))]
            cells = [rows[(m, v)] for v in views]
            ys = [100.0 * (c["rate"] or 0.0) for c in cells]
            err = [
                [max(0.0, y - 100.0 * c["ci_low"]) for y, c in zip(ys, cells)],
                [max(0.0, 100.0 * c["ci_high"] - y) for y, c in zip(ys, cells)],
            ]
            bars = ax.bar(xs, ys, width=width * 0.95, label=m, yerr=err, capsize=3)
            for bar, c in zip(bars, cells):
                ax.annotate(
                    f"{c['successes']}/{c['total']}",
                    (bar.get_x() + bar.get_width() / 2, 100.0 * c["ci_high"] + 1.5),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
        for j, v in enumerate(views):
            if v in PAPER_PERPNEG and "perpneg" in modes:
                ax.plot(
                    [j - 0.42, j + 0.42],
                    [100 * PAPER_PERPNEG[v]] * 2,
                    "k--",
                    linewidth=1,
                    label="paper (Perp-Neg)"
                    if j == min(k for k, w in enumerate(views) if w in PAPER_PERPNEG)
                    else None,
                )
        ax.set_xticks(range(len(views)))
        ax.set_xticklabels(views)
        ax.set_ylim(0, 118)
        ax.set_yticks(range(0, 101, 20))
        ax.set_ylabel("requested view predicted (%)")
        ax.set_xlabel("requested view")
        title = "2D view success rate (95 % Wilson intervals)"
        if s.get("random_models"):
            title += "\nTINY RANDOM MODELS: numbers are meaningless"
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="upper center", ncol=len(modes) + 1, frameon=False)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def write_reports(
    report: Dict[str, Any], out_dir: Path, *, chart: bool = True
) -> Dict[str, Optional[Path]]:
    """Writes ``eval2d.json``, ``eval2d.csv``, ``eval2d.md`` and (with matplotlib) ``eval2d.png``.

    Returns the paths; ``png`` is ``None`` when the chart was not drawn (``chart=False`` or no
    matplotlib, which is then reported on stderr and in the JSON under ``chart``).
    """
    out_dir = Path(out_dir)
    png: Optional[Path] = None
    if chart:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(
                f"warning: matplotlib is not installed; {PNG_NAME} not drawn (pip install matplotlib)",
                file=sys.stderr,
            )
            report["chart"] = None
        else:
            plot_success(report, out_dir / PNG_NAME)
            png = out_dir / PNG_NAME
            report["chart"] = PNG_NAME
    else:
        report["chart"] = None
    _write_text(out_dir / CSV_NAME, table_csv(report["table"]))
    _write_text(out_dir / MD_NAME, table_markdown(report))
    _write_text(out_dir / JSON_NAME, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return {
        "json": out_dir / JSON_NAME,
        "csv": out_dir / CSV_NAME,
        "md": out_dir / MD_NAME,
        "png": png,
    }


# ----------------------------------------------------------------------------------- protocol
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


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


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
    from ..sampler.pipeline import MODES

    labels = [str(x) for x in classifier.labels]
    prompt_list = _check_prompts(prompts)
    view_list = _check_list("views", views, ("front", "side", "back", "overhead"))
    missing = [v for v in view_list if v not in labels]
    if missing:
        raise ValueError(
            f"views: requested view(s) {missing} are not among the classifier's labels {labels}"
        )
    mode_list = _check_list("modes", modes, MODES)
    seed_list = _check_seeds(seeds)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")

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
                    "weights": _jsonable(getattr(result, "weights", None)),
                }
            )
            for seed, image, row in zip(chunk, images, scores.tolist()):
                name = image_name(pi, prompt, view, mode, seed)
                file = f"{IMAGES_DIR}/{name}.png"
                image.save(out / file, format="PNG")
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
        "settings": _jsonable(
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
            }
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


# -------------------------------------------------------------------------------------- CLI
class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``PROG: error: argument --x: ...``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _names_arg(allowed: Sequence[str]) -> Callable[[str], List[str]]:
    def parse(value: str) -> List[str]:
        try:
            return _check_list("names", value, allowed)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err).split(": ", 1)[1]) from None

    return parse


def _size_arg(value: str) -> int:
    n = positive_int(value)
    if n % 8:
        raise argparse.ArgumentTypeError(f"expected a multiple of 8 pixels, got {value!r}")
    return n


def _device_arg(value: str) -> str:
    return device_arg(value, auto=True, mps=True)


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``eval2d`` command's parser."""
    from ..core.views import SCHEMES
    from ..sampler.pipeline import MODES, SCHEDULERS
    from .classifier import BACKENDS, VIEW_LABELS

    p = _Parser(
        prog=prog or PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The Perp-Neg paper's 2D protocol: generate prompts x requested views x seeds\n"
        "in each mode (sd, cebm, perpneg), classify each image's view with zero-shot CLIP and\n"
        "report the success rate of the requested view per mode (markdown + CSV table, bar\n"
        "chart, JSON with every image's label and scores).\n\n"
        "The paper's numbers (Perp-Neg: side 73.1 %, back 40.4 %) need real checkpoints on a GPU.\n"
        "Without --model/--clip tiny RANDOM models are used and the numbers are meaningless.",
        epilog="examples:\n"
        "  %(prog)s --model stabilityai/stable-diffusion-2-1-base --clip openai/clip-vit-large-patch14 \\\n"
        "      --prompts-file prompts.txt --seeds 0-9 --device cuda --fp16 --out eval2d_sd21\n"
        '  %(prog)s --prompts "a corgi|a lion" --seeds 0-1 --steps 5   # tiny random models, CPU',
    )
    g = p.add_argument_group("prompts and protocol")
    px = g.add_mutually_exclusive_group()
    px.add_argument(
        "--prompts",
        default=None,
        metavar='"A|B|..."',
        help="object prompts separated by '|', e.g. 'a corgi|a lion' (no view phrase: the view "
        "prompts are '<prompt>, <view> view')",
    )
    px.add_argument(
        "--prompts-file",
        default=None,
        metavar="FILE",
        help="one prompt per line (blank lines and lines starting with '#' are skipped)",
    )
    g.add_argument(
        "--views",
        type=_names_arg(VIEW_LABELS),
        default=list(DEFAULT_VIEWS),
        metavar="VIEW[,VIEW...]",
        help=f"requested views, some of {', '.join(VIEW_LABELS)} (default: side,back)",
    )
    g.add_argument(
        "--modes",
        type=_names_arg(MODES),
        default=list(DEFAULT_MODES),
        metavar="MODE[,MODE...]",
        help="sampler modes in table order (default: sd,cebm,perpneg)",
    )
    g.add_argument("--seeds", default="0-3", help="'0-3' (inclusive), '1,3,5' ... (default: 0-3)")
    g.add_argument(
        "--batch-size",
        type=positive_int,
        default=8,
        help="most seeds per sampler call (default: %(default)s)",
    )

    m = p.add_argument_group("generator (Stable Diffusion)")
    m.add_argument(
        "--model",
        default=None,
        metavar="ID_OR_PATH",
        help="Stable Diffusion hub id or local diffusers folder; default: a tiny RANDOM "
        f"checkpoint built into <out>/{TINY_SD_DIR} (meaningless numbers)",
    )
    m.add_argument(
        "--scheduler",
        choices=sorted(SCHEDULERS),
        default=None,
        help="replace the checkpoint's scheduler",
    )
    m.add_argument(
        "--steps", type=positive_int, default=50, help="denoising steps (default: %(default)s)"
    )
    m.add_argument(
        "--guidance-scale",
        type=finite_float,
        default=7.5,
        metavar="S",
        help="ε̂ = ε_u + s·(…) (default: %(default)s)",
    )
    m.add_argument(
        "--height",
        type=_size_arg,
        default=None,
        help=f"pixels (default: the model's; {TINY_SIZE} with the tiny random model)",
    )
    m.add_argument(
        "--width",
        type=_size_arg,
        default=None,
        help=f"pixels (default: the model's; {TINY_SIZE} with the tiny random model)",
    )
    m.add_argument(
        "--scheme",
        choices=sorted(SCHEMES),
        default="threestudio",
        help="view-negative weight scheme of generate_view (default: %(default)s)",
    )
    m.add_argument(
        "--fp16", action="store_true", help="half-precision Stable Diffusion weights (GPU)"
    )

    c = p.add_argument_group("classifier (CLIP)")
    c.add_argument(
        "--clip",
        default=None,
        metavar="ID_OR_PATH",
        help="CLIP hub id or local folder (CLIPModel + CLIPProcessor), or with --clip-backend "
        f"open_clip 'ARCH:PRETRAINED' / 'hf-hub:ORG/REPO'; default: a tiny RANDOM CLIP built into "
        f"<out>/{TINY_CLIP_DIR} (meaningless numbers)",
    )
    c.add_argument(
        "--clip-backend", choices=BACKENDS, default="transformers", help="(default: %(default)s)"
    )
    c.add_argument(
        "--labels",
        type=_names_arg(VIEW_LABELS),
        default=list(VIEW_LABELS),
        metavar="VIEW[,VIEW...]",
        help="the views the classifier chooses from (default: front,side,back,overhead)",
    )
    c.add_argument(
        "--templates",
        default=None,
        metavar="FILE.json",
        help='JSON {"side": ["a side view of {object}", ...], ...}: replaces the default '
        "templates of the views it names",
    )

    o = p.add_argument_group("run")
    o.add_argument(
        "--device",
        type=_device_arg,
        default="auto",
        help="auto (cuda when available), cpu, cuda, cuda:N (default: auto)",
    )
    o.add_argument(
        "--out", default="eval2d_out", metavar="DIR", help="output folder (default: %(default)s)"
    )
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    from ..commands.quiet import add_verbose_argument  # issue 9: quiet by default

    add_verbose_argument(o)
    return p


_KEY_TO_ARG = {
    "prompts": "--prompts",
    "prompt": "--prompts",
    "views": "--views",
    "view": "--views",
    "modes": "--modes",
    "mode": "--modes",
    "seeds": "--seeds",
    "batch_size": "--batch-size",
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance-scale",
    "height": "--height",
    "width": "--width",
    "scheme": "--scheme",
    "scheduler": "--scheduler",
    "model": "--model",
    "clip": "--clip",
    "backend": "--clip-backend",
    "labels": "--labels",
    "templates": "--templates",
    "torch_dtype": "--fp16",
}


def _library_error(err: Exception, default_arg: str) -> NoReturn:
    """Maps ``"key: message"`` (or ``"key (...): message"``, ``"key[...]: ..."``) onto an argument."""
    msg = first_line(err)
    head, sep, rest = msg.partition(":")
    key = re.split(r"[\s\[(]", head.strip(), maxsplit=1)[0] if sep else ""
    if key in _KEY_TO_ARG:
        _fail(_KEY_TO_ARG[key], rest.strip() or msg)
    _fail(default_arg, msg)


def _read_prompts(args: argparse.Namespace) -> List[str]:
    if args.prompts is not None:
        items = [x.strip() for x in args.prompts.split("|")]
        if not any(items):
            _fail("--prompts", f"expected prompts like 'a corgi|a lion', got {args.prompts!r}")
        if not all(items):
            _fail("--prompts", f"an empty prompt in {args.prompts!r}")
        arg = "--prompts"
    elif args.prompts_file is not None:
        path = Path(args.prompts_file).expanduser()
        if not path.is_file():
            _fail("--prompts-file", f"{args.prompts_file!r} is not a file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            _fail("--prompts-file", f"cannot read {args.prompts_file!r}: {err}")
        items = [
            ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")
        ]
        if not items:
            _fail("--prompts-file", f"{args.prompts_file!r} holds no prompt")
        arg = "--prompts-file"
    else:
        _fail("--prompts", "give --prompts 'a corgi|a lion' or --prompts-file FILE")
    try:
        return _check_prompts(items)
    except ValueError as err:
        _fail(arg, str(err).split(": ", 1)[-1])


def _read_templates(value: Optional[str]) -> Optional[Dict[str, Any]]:
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        _fail("--templates", f"{value!r} is not a file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        _fail("--templates", f"{value!r} is not readable JSON: {str(err).splitlines()[0]}")
    from .classifier import check_templates

    try:
        check_templates(data)
    except ValueError as err:
        _fail("--templates", str(err))
    return dict(data)


def _resolve_device(value: str) -> str:
    import torch

    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if value.startswith("cuda") and not torch.cuda.is_available():
        _fail("--device", f"{value!r} requested but CUDA is not available")
    return value


def _tiny(
    folder: Path, marker: str, build: Callable[..., Path], load: Callable[[str], Any]
) -> Tuple[str, Any]:
    """Loads the tiny checkpoint in ``folder`` (building or rebuilding it when needed)."""
    if not (folder / marker).is_file():
        build(folder, seed=TINY_SEED, overwrite=True)
        return str(folder), load(str(folder))
    try:
        return str(folder), load(str(folder))
    except Exception:  # a leftover that does not load is rebuilt, never trusted
        build(folder, seed=TINY_SEED, overwrite=True)
        return str(folder), load(str(folder))


def run_cli(args: argparse.Namespace) -> Dict[str, Any]:
    """Runs the command for a namespace of :func:`build_parser`; returns the report.

    Raises:
        `Eval2DError`: a one-line message naming the argument (exit code 2).
    """
    from .classifier import ViewClassifier, check_labels

    prompts = _read_prompts(args)
    try:
        from ..sampler.pipeline import parse_seeds

        seeds = parse_seeds(str(args.seeds))
        seeds = _check_seeds(seeds)
    except ValueError as err:
        _library_error(err, "--seeds")
    try:
        labels = check_labels(args.labels)
    except ValueError as err:
        _library_error(err, "--labels")
    missing = [v for v in args.views if v not in labels]
    if missing:
        _fail("--views", f"requested view(s) {missing} are not among --labels {list(labels)}")
    if args.clip is None and args.clip_backend != "transformers":
        _fail(
            "--clip",
            "the tiny random CLIP needs --clip-backend transformers; name a model with --clip",
        )
    templates = _read_templates(args.templates)
    device = _resolve_device(args.device)
    if args.fp16 and device == "cpu":
        _fail("--fp16", "half precision needs a GPU (--device cuda)")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        _fail("--out", f"{str(out)!r} exists and is not a folder")

    import torch

    from ..sampler.pipeline import PerpNegSampler

    dtype = torch.float16 if args.fp16 else torch.float32
    random_models: List[str] = []

    def load_sampler(path: str) -> Any:
        return PerpNegSampler.from_pretrained(
            path, scheduler=args.scheduler, torch_dtype=dtype, device=device
        )

    def load_classifier(path: str) -> Any:
        return ViewClassifier.from_pretrained(
            path, device=device, templates=templates, labels=labels, backend=args.clip_backend
        )

    try:
        # Load real models first: a missing folder fails before anything is written.
        sampler = load_sampler(args.model) if args.model is not None else None
        classifier = load_classifier(args.clip) if args.clip is not None else None
    except (ValueError, FileNotFoundError) as err:
        _library_error(err, "--model")
    except ImportError as err:
        _fail("--clip-backend", str(err))
    out.mkdir(parents=True, exist_ok=True)
    model_name, clip_name = args.model, args.clip
    height, width = args.height, args.width
    if sampler is None:
        from ..tiny.builders import build_tiny_stable_diffusion

        model_name, sampler = _tiny(
            out / TINY_SD_DIR, "model_index.json", build_tiny_stable_diffusion, load_sampler
        )
        random_models.append("Stable Diffusion")
        print(
            TINY_NOTE.format(what="--model", kind="Stable Diffusion", path=model_name),
            file=sys.stderr,
        )
        height = height or TINY_SIZE
        width = width or TINY_SIZE
    if classifier is None:
        from ..tiny.builders import build_tiny_clip

        clip_name, classifier = _tiny(
            out / TINY_CLIP_DIR, "config.json", build_tiny_clip, load_classifier
        )
        random_models.append("CLIP")
        print(TINY_NOTE.format(what="--clip", kind="CLIP", path=clip_name), file=sys.stderr)

    settings = {
        "argv": list(getattr(args, "_argv", []) or []),
        "model": model_name,
        "clip": clip_name,
        "clip_backend": args.clip_backend,
        "random_models": random_models,
        "tiny_seed": TINY_SEED if random_models else None,
        "scheduler": args.scheduler,
        "scheduler_class": type(
            getattr(getattr(sampler, "pipe", None), "scheduler", None)
        ).__name__,
        "device": device,
        "dtype": "float16" if args.fp16 else "float32",
        "templates_file": args.templates,
    }
    try:
        report = run_eval2d(
            sampler,
            classifier,
            prompts,
            out,
            views=args.views,
            modes=args.modes,
            seeds=seeds,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            height=height,
            width=width,
            scheme=args.scheme,
            batch_size=args.batch_size,
            progress=not args.no_progress,
            settings=settings,
        )
    except ValueError as err:
        _library_error(err, "--prompts")
    _summary(out, report)
    return report


def _summary(out: Path, report: Dict[str, Any]) -> None:
    s = report["settings"]
    parts = []
    for r in report["table"]:
        if r["view"] == ALL and len(s["views"]) > 1:
            continue
        parts.append(f"{r['mode']}/{r['view']} {_pct(r['rate'])} ({r['successes']}/{r['total']})")
    print("view success: " + ", ".join(parts))
    chart = f", {out / PNG_NAME}" if report.get("chart") else ""
    print(
        f"wrote {out / MD_NAME}, {out / CSV_NAME}{chart}, {out / JSON_NAME} and {len(report['images'])} images in {out / IMAGES_DIR}"
    )
    if s.get("random_models"):
        print("(tiny random models: the numbers are meaningless; see --model / --clip)")


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Console entry point (``threestudio-perpneg eval2d``); returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    try:
        ns = parser.parse_args(args_list)
    except SystemExit as exit_:  # --help (0) or a usage error (2, already printed)
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    ns._argv = args_list
    return run_command(parser.prog, lambda: run_cli(ns), Eval2DError)


if __name__ == "__main__":
    sys.exit(main())
