"""The threestudio testbed table: blocks of ``testbed threestudio`` runs joined into one results file.

The table is measured in blocks that each fit a working session, laid out as
``ROOT/<level>/<row>/<block>/results.json`` (one ``testbed threestudio`` run: one method, one
level's prior, a seed block). :func:`collect` joins the blocks of a row (seeds must not overlap;
counts summed, means weighted, Wilson intervals recomputed), takes rows named ``sanity-*`` as the
level's sanity checks, evaluates the pre-declared hypothesis of :mod:`.sweep` on the batch-4 rows
and writes ``ROOT/results.json``: ``levels`` (each with ``name``, ``p_back_given_back_phrase``,
``prior``, ``sanity``, ``table3d`` rows shaped as in ``sweep.json``), ``settings``, ``attempts``
(``ROOT/attempts.json``, the record of how the settings were chosen) and ``hypothesis``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

__all__ = ["collect", "format_table", "SHARED_SETTINGS"]

PathLike = Union[str, Path]

#: Settings every block of a table must share (the methods, seeds and sanity cameras may differ).
SHARED_SETTINGS = (
    "config",
    "identity",
    "steps",
    "cpu_encoding",
    "cpu_grid_levels",
    "cpu_grid_log2_size",
    "cpu_frequencies",
    "cpu_masking_steps",
    "cpu_neurons",
    "cpu_hidden_layers",
    "cpu_lr",
    "ring_views",
)


def _blocks(root: Path) -> List[Tuple[str, str, Path, Dict[str, Any]]]:
    from ..common.io import read_json

    found = []
    for path in sorted(root.glob("*/*/*/results.json")):
        level, row = path.parts[-4], path.parts[-3]
        found.append((level, row, path.parent, read_json(path)))
    return found


def collect(root: PathLike) -> Dict[str, Any]:
    """Join the blocks under ``root`` into the table (see the module docstring) and write
    ``root/results.json``. Raises ``ValueError`` naming the block whose shared settings differ
    from the first block's or whose seeds overlap another block of its row."""
    from ..common.io import read_json, write_json_atomic
    from .bench import add_intervals, rounded_interval
    from .levels import parse_levels
    from .sweep import evaluate_hypothesis
    from .sweep_merge import merge_3d_row

    root = Path(root)
    blocks = _blocks(root)
    if not blocks:
        raise ValueError(f"root: {root} holds no <level>/<row>/<block>/results.json")
    first_dir, first = blocks[0][2], blocks[0][3]
    shared = {k: first["settings"].get(k) for k in SHARED_SETTINGS}
    rows: Dict[Tuple[str, str], Dict[str, Any]] = {}
    seeds: Dict[Tuple[str, str], List[int]] = {}
    priors: Dict[str, str] = {}
    commands: List[List[str]] = []
    for level, name, folder, rep in blocks:
        got = {k: rep["settings"].get(k) for k in SHARED_SETTINGS}
        if got != shared:
            diff = sorted(k for k in SHARED_SETTINGS if got[k] != shared[k])
            raise ValueError(f"root: block {folder} differs from {first_dir} in {diff}")
        key = (level, name)
        mine = list(rep["settings"]["seeds"])
        if set(mine) & set(seeds.get(key, [])):
            raise ValueError(f"root: block {folder} repeats seeds of another block of {name}")
        seeds[key] = seeds.get(key, []) + mine
        rows[key] = merge_3d_row(rows[key], rep["row"]) if key in rows else dict(rep["row"])
        priors.setdefault(level, rep["settings"]["prior"])
        if "command" in rep:
            commands.append(rep["command"])
    levels = []
    for lv in sorted(parse_levels(sorted(priors)), key=lambda lv: lv.p_back()):
        entry: Dict[str, Any] = {
            "name": lv.name,
            "p_back_given_back_phrase": round(lv.p_back(), 4),
            "prior": priors[lv.name],
            "sanity": {},
            "table3d": [],
        }
        for (level, name), row in rows.items():
            if level != lv.name:
                continue
            row = {**row, "row": name, "seed_list": sorted(seeds[(level, name)])}
            add_intervals([row])
            if name.startswith("sanity"):
                entry["sanity"][name] = {
                    "front_kept": [row["front_kept"], row["seeds"]],
                    "interval": rounded_interval(row["front_kept"], row["seeds"]),
                    "row": row,
                }
            else:
                entry["table3d"].append(row)
        levels.append(entry)
    attempts_file = root / "attempts.json"
    attempts = read_json(attempts_file)["attempts"] if attempts_file.is_file() else []
    report = {
        "levels": levels,
        "settings": shared,
        "attempts": attempts,
        "hypothesis": evaluate_hypothesis(levels),
        "commands": commands,
    }
    write_json_atomic(root / "results.json", report, allow_nan=True)
    return report


def format_table(report: Dict[str, Any]) -> str:
    """The table as text: one block per level (sanity, then the rows with intervals)."""
    from .bench import format_table3d

    lines = []
    for lv in report["levels"]:
        lines.append(f"level {lv['name']} (P(back | back view) = {lv['p_back_given_back_phrase']})")
        for name, s in lv["sanity"].items():
            k, n = s["front_kept"]
            lines.append(f"  {name}: front kept {k}/{n} {s['interval']}")
        if lv["table3d"]:
            lines.append(format_table3d(lv["table3d"]))
    h = report["hypothesis"]
    where = f" at {', '.join(h['levels'])}" if h["holds"] else ""
    lines.append(f"hypothesis {'holds' if h['holds'] else 'does not hold'}{where}: {h['text']}")
    return "\n".join(lines)
