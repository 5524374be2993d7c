#!/usr/bin/env python
"""Redraw a sweep's ``rings_<level>.png`` without measuring the rest of the sweep.

Runs the sweep's 3D rows (``testbed.sweep.run_level_table3d``: ``SWEEP_METHODS``, at the
middle levels also ``MIDDLE_METHODS``) with the sweep's settings on the seeds its rings picture
shows (the first three of the run: ``--first-seed`` .. ``--first-seed`` + 2) and writes the
picture the sweep writes (``testbed.sweep.write_rings``), so a picture of an older run can be redrawn with the current drawing code. The objects are the
sweep's own: each object has its own generator, so the same seed gives the same object whatever
else is optimised with it. Prints each object's verdict to compare with the run's picture::

    python benchmarks/testbed_rings.py --out rings --levels p55 p80

This is a picture script, not a test or a benchmark: it asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

from dataclasses import replace  # noqa: E402

from threestudio_perpneg.testbed import sweep as S  # noqa: E402
from threestudio_perpneg.testbed.classifier import load_classifier  # noqa: E402
from threestudio_perpneg.testbed.levels import parse_levels  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--levels", nargs="+", default=None, help="level names (default all)")
    ap.add_argument("--priors", default=None, help="level priors (default: the shipped ones)")
    ap.add_argument("--first-seed", type=int, default=0, help="first seed (default 0)")
    ap.add_argument("--steps3d", type=int, default=S.SweepConfig().steps3d, help="SDS steps")
    args = ap.parse_args(argv)
    try:
        levels = parse_levels(args.levels)
    except ValueError as e:
        ap.error(str(e))
    priors = Path(args.priors) if args.priors else S.default_priors_dir()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the sweep's settings, sized to the three seeds its rings picture shows
    cfg = replace(
        S.SweepConfig(), seeds=3, seeds_middle=3, first_seed=args.first_seed, steps3d=args.steps3d
    )
    classifier = load_classifier()
    for lv in levels:
        prior = str(S.level_prior(priors, lv))
        _, results = S.run_level_table3d(lv, prior, classifier, cfg)
        for spec, objs in results.items():
            verdicts = " ".join(
                ("J" if o.janus else "-") + ("f" if o.front_kept else "x") for o in objs
            )
            print(
                f"[{lv.name}] {spec.label} b{spec.batch_size}: {verdicts}  (J Janus, f front kept)"
            )
        print(f"[{lv.name}] wrote {S.write_rings(out, lv, prior, results, cfg)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
