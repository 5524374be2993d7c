#!/usr/bin/env python
"""Print a sweep's tables as the README shows them (markdown), read from its ``sweep.json``.

One table per part of the protocol: per level the view knowledge, sanity checks and the batch-4 3D
rows (Janus k/n, front kept in brackets, Wilson 95 % interval of the Janus rate); the view accuracy
of each 3D row; the middle levels' extra rows; the 2D table. Every number is copied from the file::

    python benchmarks/testbed_sweep_table.py benchmarks/results/testbed-sweep/sweep.json

This is a report script, not a test or a benchmark: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

B4_ROWS = ("noview", "vanilla", "ours/threestudio", "ours/authors", "ours/threestudio one")


def _ci(interval: List[float]) -> str:
    return f"[{interval[0]:.2f}, {interval[1]:.2f}]"


def _rows(level: Dict[str, Any], batch: int) -> Dict[str, Dict[str, Any]]:
    return {r["label"]: r for r in level["table3d"] if r["batch"] == batch}


def _levels_table(levels: List[Dict[str, Any]]) -> List[str]:
    head = (
        '| level | P(back \\| "back view") | ‖⊥‖/‖Δ_pos‖ t=200/500/800 | DDIM back / side (CFG 3) '
        "| 2D SDS back / side | sanity 2D front / 3D front cams | " + " | ".join(B4_ROWS) + " |"
    )
    out = [head, "|" + "---|" * (6 + len(B4_ROWS))]
    for lv in levels:
        proj = " / ".join(f"{p['perp_over_pos']:.3f}" for p in lv["projection"])
        cells = {c["key"]: c for c in lv["bias"]["cells"]}
        back, side = cells["back_success_cfg"], cells["side_success_cfg"]
        sds = lv["sds2d_views"]
        s2, s3 = lv["sanity"]["sds2d_front"], lv["sanity"]["front_cameras_3d"]
        rows = _rows(lv, 4)
        three = []
        for label in B4_ROWS:
            r = rows.get(label)
            three.append(
                "-"
                if r is None
                else f"{r['janus']}/{r['seeds']} ({r['front_kept']}/{r['seeds']}) "
                + _ci(r["janus_ci95"])
            )
        out.append(
            f"| {lv['name']} | {lv['p_back_given_back_phrase']:.3f} | {proj} "
            f"| {back['successes']}/{back['n']} / {side['successes']}/{side['n']} "
            f"| {sds['back']['successes']}/{sds['back']['n']} / "
            f"{sds['side']['successes']}/{sds['side']['n']} "
            f"| {s2[0]}/{s2[1]} / {s3[0]}/{s3[1]} | " + " | ".join(three) + " |"
        )
    return out


def _accuracy_table(levels: List[Dict[str, Any]]) -> List[str]:
    out = [
        "| level | " + " | ".join(B4_ROWS) + " |",
        "|" + "---|" * (1 + len(B4_ROWS)),
    ]
    for lv in levels:
        rows = _rows(lv, 4)
        cells = []
        for label in B4_ROWS:
            r = rows.get(label)
            acc = r["view_accuracy"] if r else None
            cells.append(
                "-" if acc is None else f"{acc['front']:.2f}/{acc['side']:.2f}/{acc['back']:.2f}"
            )
        out.append(f"| {lv['name']} | " + " | ".join(cells) + " |")
    return out


def _middle_table(levels: List[Dict[str, Any]]) -> List[str]:
    out = [
        "| level | row | batch | Janus [95 % CI] | front kept | identity agreement | UNet rows / step |",
        "|---|---|---|---|---|---|---|",
    ]
    for lv in levels:
        for r in lv["table3d"]:
            if r["label"] in B4_ROWS and r["batch"] == 4:
                continue
            out.append(
                f"| {lv['name']} | {r['label']} | {r['batch']} | {r['janus']}/{r['seeds']} "
                f"{_ci(r['janus_ci95'])} | {r['front_kept']}/{r['seeds']} "
                f"| {r['identity_agreement']:.2f} | {r['unet_rows_per_step']:g} |"
            )
    return out


def _table2d(levels: List[Dict[str, Any]]) -> List[str]:
    modes = [("sd", None), ("cebm", "threestudio"), ("cebm", "authors")]
    modes += [("perpneg", "threestudio"), ("perpneg", "authors")]
    names = [m if s is None else f"{m}/{s}" for m, s in modes]
    out = ["| level | view | " + " | ".join(names) + " |", "|" + "---|" * (2 + len(modes))]
    for lv in levels:
        for view in ("side", "back"):
            cells = []
            for mode, scheme in modes:
                c = next(
                    r
                    for r in lv["table2d"]
                    if r["mode"] == mode and r["scheme"] == scheme and r["view"] == view
                )
                cells.append(
                    f"{c['successes']}/{c['n']} (id {c['identity_kept']})"
                    if c["identity_kept"] < c["n"]
                    else f"{c['successes']}/{c['n']}"
                )
            out.append(f"| {lv['name']} | {view} | " + " | ".join(cells) + " |")
    return out


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_json", help="a sweep.json written by `testbed sweep` or `sweep-merge`")
    args = ap.parse_args(argv)
    path = Path(args.sweep_json)
    try:
        report = json.loads(path.read_text())
        levels = report["levels"]
    except (OSError, ValueError, KeyError) as e:
        print(f"sweep_json: cannot read {path}: {e}", file=sys.stderr)
        return 2
    for title, lines in (
        ("levels (3D rows at batch 4: Janus k/n, front kept)", _levels_table(levels)),
        ("view accuracy front/side/back, batch 4", _accuracy_table(levels)),
        ("middle levels' extra rows", _middle_table(levels)),
        ("2D DDIM success (identity kept where below n)", _table2d(levels)),
    ):
        print(f"\n{title}\n")
        print("\n".join(lines))
    hyp = report.get("hypothesis", {})
    print(f"\nhypothesis holds: {hyp.get('holds')} at {hyp.get('levels')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
