"""The sweep's done-markers and its comparison report.

:func:`write_report` builds ``<out_dir>/report/report.md`` (+ ``report.json``, ``strips/`` and
``grids/`` PNGs) from every done-marker under ``out_dir``, whichever invocation, shard or machine
wrote it:

* 3D: a Janus-rate table per variant (vanilla, perpneg (<scheme>)) with Wilson 95 % intervals and
  the mean view accuracy, a per-prompt Janus table, and per prompt a grid of test renders (rows:
  seeds, columns: variants) taken from each trial's latest ``save/it*-test`` folder;
* 2D: eval2d's success counts summed over all 2D jobs, per scheme, mode and requested view.

Only PIL (a dependency of the package) is needed; nothing here imports torch, hydra or threestudio.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import logging
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ...common import io as _io
from ..stats import wilson_interval

__all__ = [
    "write_json_atomic",
    "read_marker",
    "latest_test_dir",
    "ring_frames",
    "wilson_interval",
    "write_report",
]

log = logging.getLogger(__name__)

_IT_TEST_RE = re.compile(r"^it(\d+)-test$")


# --------------------------------------------------------------------------- files
def write_json_atomic(path: Path, data: Any) -> None:
    """``data`` as JSON (NaN allowed, unknown objects as text) written atomically: a reader (or a
    resumed sweep) never sees a half-written file."""
    _io.write_json_atomic(path, data, allow_nan=True, default=str)


def read_marker(path: Path) -> Optional[Dict[str, Any]]:
    """A done-marker's content, or None when it is missing or unusable (then the job runs)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        log.warning("ignoring unreadable done-marker %s (%s): the job runs again", path, err)
        return None
    if not isinstance(data, dict) or data.get("status") != "done":
        log.warning("ignoring done-marker %s without status 'done': the job runs again", path)
        return None
    return data


def latest_test_dir(trial: Path) -> Optional[Path]:
    """``<trial>/save/it<N>-test`` with the largest N that holds PNG frames (None if none)."""
    save = trial / "save"
    if not save.is_dir():
        return None
    best: Optional[Tuple[int, Path]] = None
    for d in save.iterdir():
        m = _IT_TEST_RE.match(d.name)
        if m and d.is_dir() and any(d.glob("*.png")):
            if best is None or int(m.group(1)) > best[0]:
                best = (int(m.group(1)), d)
    return best[1] if best else None


def ring_frames(folder: Path) -> List[Path]:
    """The PNG frames of a test folder in camera order (threestudio names them ``<index>.png``)."""

    def key(p: Path) -> Tuple[int, int, str]:
        return (0, int(p.stem), "") if p.stem.isdigit() else (1, 0, p.stem)

    return sorted(folder.glob("*.png"), key=key)


# --------------------------------------------------------------------------- statistics
def _fmt_rate(k: int, n: int) -> str:
    if n == 0:
        return "n/a"
    lo, hi = wilson_interval(k, n)
    return f"{100 * k / n:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]"


# --------------------------------------------------------------------------- images
def _strip(frames: Sequence[Path], n: int, size: int) -> Any:
    """``n`` frames evenly spaced around the ring, side by side, ``size`` px each."""
    from PIL import Image

    if not frames:
        return None
    idx = sorted({int(round(k * len(frames) / n)) % len(frames) for k in range(n)})
    strip = Image.new("RGB", (size * len(idx), size), "white")
    for pos, i in enumerate(idx):
        with Image.open(frames[i]) as im:
            strip.paste(im.convert("RGB").resize((size, size)), (pos * size, 0))
    return strip


def _grid(rows: List[Tuple[str, List[Any]]], headers: List[str], size: int, n: int) -> Any:
    """Labelled grid: one row per seed, one column (a strip) per variant."""
    from PIL import Image, ImageDraw

    label_w, head_h, pad = 90, 20, 6
    cell_w = size * n
    img = Image.new(
        "RGB", (label_w + len(headers) * (cell_w + pad), head_h + len(rows) * (size + pad)), "white"
    )
    draw = ImageDraw.Draw(img)
    for c, h in enumerate(headers):
        draw.text((label_w + c * (cell_w + pad) + 4, 4), h, fill="black")
    for r, (label, cells) in enumerate(rows):
        y = head_h + r * (size + pad)
        draw.text((4, y + size // 2 - 6), label, fill="black")
        for c, cell in enumerate(cells):
            if cell is not None:
                img.paste(cell, (label_w + c * (cell_w + pad), y))
    return img


def _save_png(img: Any, path: Path) -> None:
    _io.save_image_atomic(path, img)


# --------------------------------------------------------------------------- report
def _variant_label(variant: str) -> str:
    return f"perpneg ({variant[8:]})" if variant.startswith("perpneg_") else variant


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _eval_of(marker: Dict[str, Any]) -> Dict[str, Any]:
    ev = marker.get("eval")
    return ev if isinstance(ev, dict) else {}


def _janus_flags(evals: Sequence[Dict[str, Any]]) -> List[bool]:
    return [
        bool(e["janus"])
        for e in evals
        if e.get("status") == "ok" and isinstance(e.get("janus"), bool)
    ]


def _accuracies(evals: Sequence[Dict[str, Any]]) -> List[float]:
    out = []
    for e in evals:
        v = e.get("view_accuracy")
        if e.get("status") == "ok" and isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(float(v))
    return out


def load_markers(out_dir: Path) -> List[Dict[str, Any]]:
    """Every usable done-marker under ``<out_dir>/done``."""
    out = []
    for p in sorted((out_dir / "done").glob("*.json")):
        m = read_marker(p)
        if m is not None and isinstance(m.get("job"), dict):
            out.append(m)
    return out


def write_report(out_dir: Path, *, frames: int = 8, thumb_size: int = 128) -> Path:
    """Build the comparison report of the sweep in ``out_dir``; returns ``report/report.md``."""
    out_dir = Path(out_dir)
    rep = out_dir / "report"
    rep.mkdir(parents=True, exist_ok=True)
    markers = load_markers(out_dir)
    failed = sorted((out_dir / "failed").glob("*.json"))
    m3 = [m for m in markers if m["job"].get("kind") == "3d"]
    m2 = [m for m in markers if m["job"].get("kind") == "2d"]
    now = _dt.datetime.now().isoformat(timespec="seconds")
    lines = [
        f"# Perp-Neg sweep report: {out_dir.name}",
        "",
        f"Generated {now} from {len(markers)} done-markers in `{out_dir}`"
        + (f"; {len(failed)} failed job(s) listed at the end." if failed else "."),
        "",
    ]
    data: Dict[str, Any] = {"generated": now, "out_dir": str(out_dir), "variants": {}}
    if m3:
        lines += _report_3d(m3, data, rep, frames, thumb_size)
    if m2:
        lines += _report_2d(m2, data)
    if failed:
        lines += ["## Failed jobs", "", "They run again on the next invocation.", ""]
        for f in failed:
            try:
                lines.append(
                    f"- `{f.stem}`: {json.loads(f.read_text(encoding='utf-8')).get('error')}"
                )
            except (OSError, ValueError):
                lines.append(f"- `{f.stem}`: (unreadable record {f})")
        lines.append("")
    if not markers:
        lines += ["No finished jobs yet.", ""]
    lines += [
        "---",
        "These numbers come from the runs in this folder. The paper's figures need the full-size "
        "checkpoints (Stable Diffusion, CLIP) and full-length runs on a GPU.",
        "",
    ]
    path = rep / "report.md"
    _io.write_text_atomic(path, "\n".join(lines))
    write_json_atomic(rep / "report.json", data)
    return path


def _report_3d(
    m3: List[Dict[str, Any]], data: Dict[str, Any], rep: Path, frames: int, thumb_size: int
) -> List[str]:
    variants = sorted({str(m["job"]["variant"]) for m in m3}, key=lambda v: (v != "vanilla", v))
    prompts: List[str] = []
    for m in m3:
        if m["job"]["prompt"] not in prompts:
            prompts.append(m["job"]["prompt"])
    lines = [
        "## Janus rate (3D)",
        "",
        "A trial is Janus when the view classifier sees a front where the camera looks at the "
        "back, or two separate front segments around the test ring (eval3d; its thresholds are in "
        "each trial's eval/<job id>/janus_report.json). Rates over prompts x seeds with Wilson "
        "95 % intervals; view accuracy = fraction of test frames whose predicted view matches the "
        "camera's bucket.",
        "",
        "| variant | trials | evaluated | Janus | Janus rate [95 % CI] | mean view accuracy |",
        "|---|---|---|---|---|---|",
    ]
    n_eval = 0
    for v in variants:
        evals = [_eval_of(m) for m in m3 if m["job"]["variant"] == v]
        flags, accs = _janus_flags(evals), _accuracies(evals)
        k, n = sum(flags), len(flags)
        n_eval += n
        acc = f"{sum(accs) / len(accs):.3f}" if accs else "n/a"
        lines.append(
            f"| {_variant_label(v)} | {len(evals)} | {n} | {k} | {_fmt_rate(k, n)} | {acc} |"
        )
        data["variants"][v] = {
            "trials": len(evals),
            "evaluated": n,
            "janus": k,
            "janus_rate": (k / n) if n else None,
            "janus_rate_ci95": list(wilson_interval(k, n)) if n else None,
            "mean_view_accuracy": (sum(accs) / len(accs)) if accs else None,
        }
    if n_eval == 0:
        lines += [
            "",
            "No trial has an evaluation yet (job.eval.enabled=false, or eval3d failed: see each "
            "done-marker's `eval`). Run the sweep again with evaluation on: finished runs are "
            "evaluated, not trained again.",
        ]
    lines += [
        "",
        "### Janus by prompt (Janus trials / evaluated trials)",
        "",
        "| prompt | " + " | ".join(_variant_label(v) for v in variants) + " |",
        "|---|" + "---|" * len(variants),
    ]
    data["prompts"] = {}
    for p in prompts:
        cells = []
        data["prompts"][p] = {}
        for v in variants:
            evals = [
                _eval_of(m) for m in m3 if m["job"]["prompt"] == p and m["job"]["variant"] == v
            ]
            flags = _janus_flags(evals)
            cells.append(f"{sum(flags)}/{len(flags)}" if evals else "-")
            data["prompts"][p][v] = {
                "janus": sum(flags),
                "evaluated": len(flags),
                "trials": len(evals),
            }
        lines.append(f"| {_md(p)} | " + " | ".join(cells) + " |")

    lines += [
        "",
        "## Test renders",
        "",
        f"Per prompt: rows are seeds, columns variants; each cell shows {frames} of the trial's "
        "test frames (the latest save/it*-test) evenly spaced around the camera ring, from the "
        "ring's first frame on. Full rings: runs/<job id>/save/.",
        "",
    ]
    for p in prompts:
        ms = [m for m in m3 if m["job"]["prompt"] == p]
        by = {(int(m["job"]["seed"]), str(m["job"]["variant"])): m for m in ms}
        grid_rows: List[Tuple[str, List[Any]]] = []
        table = [
            "| seed | " + " | ".join(_variant_label(v) for v in variants) + " |",
            "|---|" + "---|" * len(variants),
        ]
        for seed in sorted({int(m["job"]["seed"]) for m in ms}):
            cells_md: List[str] = []
            cells_img: List[Any] = []
            for v in variants:
                mk = by.get((seed, v))
                if mk is None:
                    cells_md.append("-")
                    cells_img.append(None)
                    continue
                m = mk
                test_dir = latest_test_dir(Path(m["job"]["run_dir"]))
                strip = _strip(ring_frames(test_dir), frames, thumb_size) if test_dir else None
                cells_img.append(strip)
                ev = _eval_of(m)
                tag = ""
                if ev.get("status") == "ok" and isinstance(ev.get("janus"), bool):
                    tag = " **Janus**" if ev["janus"] else " no Janus"
                    if isinstance(ev.get("view_accuracy"), (int, float)):
                        tag += f", view acc. {ev['view_accuracy']:.2f}"
                if strip is None:
                    cells_md.append(f"(no test renders){tag}")
                    continue
                rel = Path("strips") / f"{m['job']['id']}.png"
                _save_png(strip, rep / rel)
                cells_md.append(f"![{m['job']['id']}]({rel.as_posix()}){tag}")
            table.append(f"| {seed} | " + " | ".join(cells_md) + " |")
            grid_rows.append((f"seed {seed}", cells_img))
        lines += [f"### {_md(p)}", ""]
        if any(c is not None for _, cells in grid_rows for c in cells):
            slug = str(ms[0]["job"].get("slug") or re.sub(r"[^a-z0-9]+", "_", p.lower()))
            grid_rel = Path("grids") / f"{slug}.png"
            headers = [_variant_label(v) for v in variants]
            _save_png(_grid(grid_rows, headers, thumb_size, frames), rep / grid_rel)
            lines += [f"![{_md(p)}]({grid_rel.as_posix()})", ""]
        lines += table + [""]
    return lines


def _int_or_none(text: Any) -> Optional[int]:
    try:
        return int(str(text).strip())
    except ValueError:
        return None


def _report_2d(markers: List[Dict[str, Any]], data: Dict[str, Any]) -> List[str]:
    """eval2d's success counts (``eval2d.csv`` rows mode, view, successes, total) summed over
    all 2D jobs per scheme, with Wilson intervals; plus the list of each job's own table."""
    lines = ["## 2D view success (eval2d)", ""]
    agg: Dict[Tuple[str, str, str], List[int]] = {}
    order: Dict[str, int] = {}  # first appearance of each mode / view: eval2d's table order
    links: List[str] = []
    for m in sorted(markers, key=lambda m: str(m["job"]["id"])):
        run: Dict[str, Any] = m["run"] if isinstance(m.get("run"), dict) else {}
        scheme = str(m["job"].get("scheme") or "-")
        for c in run.get("csv") or []:
            path = Path(c)
            links.append(f"- `{m['job']['id']}`: {path.as_posix()}")
            try:
                with open(path, newline="", encoding="utf-8") as fh:
                    rows = list(csv.DictReader(fh))
            except OSError:
                continue
            for row in rows:
                k, n = _int_or_none(row.get("successes")), _int_or_none(row.get("total"))
                mode, view = row.get("mode"), row.get("view")
                if k is None or n is None or not mode or not view or view == "all":
                    continue
                order.setdefault(mode, len(order))
                order.setdefault(view, len(order))
                for key in ((scheme, mode, view), (scheme, mode, "all")):
                    cell = agg.setdefault(key, [0, 0])
                    cell[0] += k
                    cell[1] += n
    if agg:
        lines += [
            "Success = the classifier's view equals the requested view, summed over the prompts "
            "and seeds of the finished 2D jobs; Wilson 95 % intervals. (The paper reports side "
            "73.1 % and back 40.4 % with Perp-Neg, on its own prompts and real checkpoints.)",
            "",
            "| scheme | mode | view | images | success rate [95 % CI] |",
            "|---|---|---|---|---|",
        ]
        data["2d"] = {}

        def sort_key(item: Tuple[Tuple[str, str, str], List[int]]) -> Tuple[str, int, bool, int]:
            (scheme, mode, view), _ = item
            return (scheme, order[mode], view == "all", order.get(view, 0))

        for (scheme, mode, view), (k, n) in sorted(agg.items(), key=sort_key):
            lines.append(f"| {scheme} | {mode} | {view} | {n} | {_fmt_rate(k, n)} |")
            data["2d"][f"{scheme}/{mode}/{view}"] = {"successes": k, "total": n}
        lines.append("")
    lines += [f"{len(markers)} finished 2D jobs; their own tables:", "", *links, ""]
    return lines
