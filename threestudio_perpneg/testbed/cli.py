"""``python -m threestudio_perpneg testbed``: train the Janus testbed's prior and classifier, measure its bias.

Subcommands:

* ``train --out DIR``: train the prior (diffusers folder + ``testbed.json``, ``metrics.json``,
  ``loss.png``); ``--dataset-config FILE`` reads the data knobs (a JSON object of
  :class:`~threestudio_perpneg.testbed.dataset.DatasetConfig` fields) over the shipped prior's knobs (``shipped_dataset_config``);
  ``--init-from DIR`` continues from a prior folder's weights.
* ``train-classifier --out DIR``: train the view/identity classifier.
* ``bias --out DIR``: the prior-bias cells (front fraction without view words, back / side
  success with plain CFG) with Wilson intervals: ``DIR/prior_bias.json`` and ``DIR/samples.png``.
* ``bench --out DIR [--quick]``: the benchmark (:mod:`.bench`): prior bias, the 2D table and the
  3D table printed, ``DIR/testbed.json`` and ``DIR/rings.png``.
* ``calibrate --out DIR``: the vanilla / no-view Janus rate per identity against its captions'
  view-phrase reliability (:mod:`.calibrate`): ``DIR/calibration.json`` and ``.png``.
* ``train-levels --out DIR [--levels ...] [--steps N] [--threads N]``: the view-knowledge
  sweep's prior family (:mod:`.levels`), one folder per level, each trained from scratch.
* ``sweep --out DIR [--quick] [--levels ...] [--first-seed N] [--priors DIR]``: Perp-Neg along
  the sweep (:mod:`.sweep`): ``DIR/sweep.json``, ``sweep.png``, ``sweep2d.png``, rings per level.
* ``sweep-merge --out DIR RUN [RUN ...]``: one sweep from runs measured apart with the same
  settings (:mod:`.sweep_merge`): other levels joined, the same level on disjoint seeds summed,
  hypothesis evaluated afresh.
* ``threestudio --out DIR [--method ...] [--seeds ...]``: the testbed through threestudio's own
  ``dreamfusion-system`` on CPU (:mod:`.ts_cli`, :mod:`.ts_dreamfusion`; needs
  ``THREESTUDIO_ROOT``): ``DIR/results.json`` and ``DIR/rings.png``.

Bad arguments exit with code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, List, Optional, Sequence

from ..commands.common import (
    CommandError,
    OneLineParser,
    finite_float,
    nonnegative_int,
    positive_int,
    run_command,
)

__all__ = ["build_parser", "main"]


class TestbedError(CommandError):
    """A user-facing error of ``testbed`` (exit code 2)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=2)


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=prog or "threestudio-perpneg testbed",
        description="Janus testbed: a small prior trained on procedural head renders.",
    )
    sub = parser.add_subparsers(
        dest="command",
        metavar="{train,train-classifier,bias,bench,calibrate,train-levels,sweep,sweep-merge,"
        "threestudio}",
    )
    sub.required = True

    train = sub.add_parser("train", help="train the testbed prior (diffusers folder)")
    train.add_argument("--out", required=True, type=Path, help="output folder")
    train.add_argument("--steps", type=positive_int, default=None, help="optimiser steps")
    train.add_argument("--batch-size", type=positive_int, default=None, help="images per step")
    train.add_argument(
        "--seed", type=nonnegative_int, default=None, help="training seed (default 0)"
    )
    train.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    train.add_argument(
        "--dataset-config",
        type=Path,
        default=None,
        help="JSON object of DatasetConfig knobs applied over the shipped prior's knobs",
    )
    train.add_argument(
        "--init-from",
        default=None,
        help="continue from this prior folder's weights (same data, architecture, vocabulary)",
    )
    train.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    train.add_argument("--quiet", action="store_true", help="no progress bars")

    clf = sub.add_parser("train-classifier", help="train the view/identity classifier")
    clf.add_argument("--out", required=True, type=Path, help="output folder")
    clf.add_argument("--seed", type=nonnegative_int, default=0, help="seed (default 0)")
    clf.add_argument(
        "--steps", type=positive_int, default=None, help="optimiser steps (default the recipe's)"
    )
    clf.add_argument("--quiet", action="store_true", help="no progress bar")

    bias = sub.add_parser("bias", help="prior bias: front fraction, back/side success with CFG")
    bias.add_argument("--out", required=True, type=Path, help="output folder")
    bias.add_argument("--prior", default=None, help="prior folder (default: the shipped one)")
    bias.add_argument(
        "--classifier", default=None, help="classifier folder (default: the shipped one)"
    )
    bias.add_argument("--n", type=positive_int, default=128, help="samples per cell (default 128)")
    bias.add_argument(
        "--guidance-scale",
        type=lambda v: finite_float(v, "a number"),
        default=3.0,
        help="CFG scale s, ε_u + s(ε_c − ε_u) (default 3: at 7.5 the 16 px prior oversaturates)",
    )
    bias.add_argument("--steps", type=positive_int, default=50, help="DDIM steps (default 50)")
    bias.add_argument("--seed", type=nonnegative_int, default=0, help="noise seed (default 0)")
    bias.add_argument(
        "--calibration-log",
        type=Path,
        default=None,
        help="JSON file to which this measurement is appended as a calibration attempt "
        "(the prior's dataset knobs and recipe -> the three rates)",
    )
    bias.add_argument("--note", default="", help="free text stored with the calibration attempt")
    bias.add_argument("--quiet", action="store_true", help="no progress bar")
    bench = sub.add_parser("bench", help="benchmark: prior bias, 2D and 3D tables, rings.png")
    calib = sub.add_parser("calibrate", help="vanilla Janus rate against view-phrase reliability")
    for p, seeds, steps3d, n2d in ((bench, 16, 400, 128), (calib, 16, 400, 128)):
        p.add_argument("--out", required=True, type=Path, help="output folder")
        p.add_argument("--prior", default=None, help="prior folder (default: the shipped one)")
        p.add_argument(
            "--classifier", default=None, help="classifier folder (default: the shipped one)"
        )
        p.add_argument(
            "--seeds",
            type=positive_int,
            default=None,
            help=f"3D objects per method (default {seeds})",
        )
        p.add_argument(
            "--steps3d",
            type=positive_int,
            default=None,
            help=f"SDS steps per object (default {steps3d})",
        )
        p.add_argument(
            "--n2d", type=positive_int, default=None, help=f"samples per 2D cell (default {n2d})"
        )
        p.add_argument("--quiet", action="store_true", help="no progress bars")
    bench.add_argument(
        "--quick",
        action="store_true",
        help="small sizes (4 seeds, 60 SDS steps, 16 samples per 2D cell, 10 DDIM steps)",
    )
    bench.add_argument(
        "--controls",
        action="store_true",
        help="add ours with each Perp-Neg control (one, t ranges, decaying λ) at batch 1 and 4",
    )
    bench.add_argument(
        "--identity", default=None, help="prompted identity (default: the calibrated one, troll)"
    )
    bench.add_argument(
        "--first-seed",
        type=nonnegative_int,
        default=0,
        help="first 3D seed: objects use seeds N .. N+seeds-1 (default 0)",
    )
    bench.add_argument(
        "--no-2d", action="store_true", help="skip the 2D measurements (bias, 2D table, curve)"
    )
    _add_sweep_parsers(sub)
    from .ts_cli import add_parser as add_threestudio_parser

    add_threestudio_parser(sub)
    from ..commands.quiet import VERBOSE_HELP, add_verbose_argument

    # --verbose before or after the subcommand, as every command takes it (its own dest at the
    # top: a subparser's default would overwrite a shared one).
    parser.add_argument("--verbose", dest="verbose_top", action="store_true", help=VERBOSE_HELP)
    for subparser in sub.choices.values():
        add_verbose_argument(subparser)
    return parser


def _add_sweep_parsers(sub: Any) -> None:
    from .levels import LEVEL_NAMES

    levels_help = f"level names, some of {' '.join(LEVEL_NAMES)} (default all)"
    tl = sub.add_parser("train-levels", help="train the sweep's prior family (one per level)")
    tl.add_argument("--out", required=True, type=Path, help="output folder")
    tl.add_argument("--levels", nargs="+", default=None, metavar="LEVEL", help=levels_help)
    tl.add_argument(
        "--steps", type=positive_int, default=None, help="steps per level (default the recipe's)"
    )
    tl.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1)")
    tl.add_argument("--quiet", action="store_true", help="no progress bars")
    sw = sub.add_parser("sweep", help="Perp-Neg along a sweep of the prior's view knowledge")
    sw.add_argument("--out", required=True, type=Path, help="output folder")
    sw.add_argument("--quick", action="store_true", help="tiny sizes (a few minutes)")
    sw.add_argument("--levels", nargs="+", default=None, metavar="LEVEL", help=levels_help)
    sw.add_argument(
        "--first-seed", type=nonnegative_int, default=0, help="first seed of every cell (default 0)"
    )
    sw.add_argument(
        "--priors",
        default=None,
        help="folder with one prior per level (default: benchmarks/results/testbed-sweep/priors)",
    )
    sw.add_argument(
        "--classifier", default=None, help="classifier folder (default: the shipped one)"
    )
    for flag, key in (
        ("--seeds", "3D objects per batch-4 row (full 16)"),
        ("--seeds-middle", "objects per middle-level extra row (full 8)"),
        ("--steps3d", "SDS steps per 3D object (full 600)"),
        ("--n2d", "samples per 2D DDIM cell (full 64)"),
        ("--n-sds2d", "free images per 2D SDS cell (full 16)"),
        ("--sds2d-steps", "2D SDS steps (full 600)"),
    ):
        sw.add_argument(flag, type=positive_int, default=None, help=key)
    sw.add_argument(
        "--jobs",
        type=positive_int,
        default=1,
        help="levels measured at once, one process and one thread each (default 1)",
    )
    sw.add_argument("--quiet", action="store_true", help="no progress bars")
    sm = sub.add_parser(
        "sweep-merge",
        help="join sweep runs measured apart (other levels, or one level on disjoint --first-seed "
        "blocks) into one sweep.json",
    )
    sm.add_argument("--out", required=True, type=Path, help="output folder")
    sm.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="sweep output folders")


def _train_levels(ns: argparse.Namespace) -> None:
    from .levels import LEVEL_STEPS, parse_levels, train_level

    try:
        chosen = parse_levels(ns.levels)
        for lv in chosen:
            m = train_level(
                ns.out / lv.name,
                lv,
                steps=ns.steps or LEVEL_STEPS,
                threads=ns.threads,
                progress=not ns.quiet,
            )
            print(
                f"level {lv.name} (P(back | back view) = {lv.p_back():.3f}) written to "
                f"{ns.out / lv.name}: final loss {m['final_loss']:.4f}"
            )
    except (FileExistsError, FileNotFoundError, ImportError, ValueError) as err:
        raise TestbedError(str(err)) from None


def _sweep_merge(ns: argparse.Namespace) -> None:
    from .sweep_merge import merge_sweeps

    try:
        merge_sweeps(ns.out, ns.runs)
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise TestbedError(str(err)) from None


def _sweep(ns: argparse.Namespace) -> None:
    from .sweep import SweepConfig, run_sweep

    sizes = {
        k: getattr(ns, k)
        for k in ("seeds", "seeds_middle", "steps3d", "n2d", "n_sds2d", "sds2d_steps")
        if getattr(ns, k) is not None
    }
    config = (SweepConfig.quick if ns.quick else SweepConfig)(first_seed=ns.first_seed, **sizes)
    try:
        run_sweep(
            ns.out,
            config,
            levels=ns.levels,
            priors=ns.priors,
            classifier_path=ns.classifier,
            progress=not ns.quiet,
            jobs=ns.jobs,
        )
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise TestbedError(str(err)) from None


def _bench(ns: argparse.Namespace) -> None:
    from .bench import BenchConfig, run_bench

    sizes = {
        k: v
        for k, v in (("seeds", ns.seeds), ("steps3d", ns.steps3d), ("n2d", ns.n2d))
        if v is not None
    }
    if ns.identity is not None:
        sizes["identity"] = ns.identity
    sizes["controls"] = ns.controls
    sizes["first_seed"] = ns.first_seed
    sizes["no_2d"] = ns.no_2d
    config = BenchConfig.quick(**sizes) if ns.quick else BenchConfig(**sizes)
    try:
        run_bench(
            ns.out,
            config,
            prior_path=ns.prior,
            classifier_path=ns.classifier,
            progress=not ns.quiet,
        )
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise TestbedError(str(err)) from None


def _calibrate(ns: argparse.Namespace) -> None:
    from .calibrate import run_calibration

    sizes = {
        k: v
        for k, v in (("seeds", ns.seeds), ("steps3d", ns.steps3d), ("n2d", ns.n2d))
        if v is not None
    }
    try:
        run_calibration(
            ns.out,
            prior_path=ns.prior,
            classifier_path=ns.classifier,
            progress=not ns.quiet,
            **sizes,
        )
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise TestbedError(str(err)) from None


def _read_knobs(path: Optional[Path]) -> dict:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise TestbedError(f"--dataset-config: cannot read {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise TestbedError(f"--dataset-config: {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise TestbedError(f"--dataset-config: expected a JSON object, got {type(data).__name__}")
    return data


def _train(ns: argparse.Namespace) -> None:
    from .train import TrainConfig, shipped_dataset_config, train_prior

    knobs = _read_knobs(ns.dataset_config)
    overrides: dict[str, Any] = {
        k: v
        for k, v in (
            ("steps", ns.steps),
            ("batch_size", ns.batch_size),
            ("seed", ns.seed),
            ("threads", ns.threads),
        )
        if v is not None
    }
    try:
        dataset = shipped_dataset_config(**knobs)
        recipe = TrainConfig(**overrides)
    except (TypeError, ValueError) as err:
        raise TestbedError(f"--dataset-config: {err}") from None
    try:
        metrics = train_prior(
            ns.out,
            dataset,
            recipe=recipe,
            overwrite=ns.overwrite,
            progress=not ns.quiet,
            init_from=ns.init_from,
        )
    except (FileExistsError, FileNotFoundError, ImportError, ValueError) as err:
        raise TestbedError(str(err)) from None
    print(
        f"prior written to {ns.out}: final loss {metrics['final_loss']:.4f}, "
        f"{metrics['train_seconds'] / 60:.1f} min training on {recipe.threads} thread(s)"
    )


def _train_classifier(ns: argparse.Namespace) -> None:
    from .classifier import train_classifier

    try:
        metrics = train_classifier(ns.out, seed=ns.seed, steps=ns.steps, progress=not ns.quiet)
    except ValueError as err:
        raise TestbedError(str(err)) from None
    summary = metrics["held_out_summary"]
    print(
        f"classifier written to {ns.out}: clean view accuracy {summary['clean_view_accuracy']:.3f} "
        f"(n = {summary['n_clean']}), hard negatives read none {summary['hard_negative_none_rate']:.3f} "
        f"(n = {summary['n_hard']})"
    )


def _bias(ns: argparse.Namespace) -> None:
    from ..commands.common import versions, write_json
    from .bench import format_bias
    from .classifier import load_classifier
    from .prior import load_prior_path
    from .protocol2d import bias_summary, measure_prior_bias, save_sample_grid

    try:
        prior = ns.prior or load_prior_path()
        classifier = load_classifier(ns.classifier)
        cells, samples = measure_prior_bias(
            prior,
            classifier,
            n=ns.n,
            guidance_scale=ns.guidance_scale,
            steps=ns.steps,
            seed=ns.seed,
            progress=not ns.quiet,
        )
    except (FileNotFoundError, ValueError) as err:
        raise TestbedError(str(err)) from None
    report = bias_summary(cells)
    report.update(
        prior=str(prior),
        classifier=_classifier_id(ns.classifier),
        guidance_scale=ns.guidance_scale,
        steps=ns.steps,
        seed=ns.seed,
        versions=versions(),
    )
    ns.out.mkdir(parents=True, exist_ok=True)
    write_json(ns.out / "prior_bias.json", report)
    save_sample_grid(samples, ns.out / "samples.png")
    if ns.calibration_log is not None:
        _append_attempt(ns.calibration_log, prior, report, ns.note)
    print(format_bias(report, views=True))


def _classifier_id(path: Optional[str]) -> dict:
    """Which classifier judged the samples: its folder and the sha256 of its weights."""
    import hashlib

    from .classifier import classifier_path

    folder = Path(path) if path is not None else classifier_path()
    weights = folder / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None
    return {"path": str(folder), "weights_sha256": digest}


def _append_attempt(log: Path, prior: str, report: dict, note: str) -> None:
    """Append {knobs, recipe, rates, cells} to the calibration log (a JSON object with attempts)."""
    from ..common.io import append_attempt
    from .prior import load_testbed_config
    from .protocol2d import CELLS

    meta = load_testbed_config(prior)
    entry = {
        "note": note,
        "dataset": meta["dataset"],
        "train": meta.get("train"),
        "guidance_scale": report["guidance_scale"],
        "steps": report["steps"],
        "seed": report["seed"],
        "classifier": report["classifier"],
        **{key: report[key] for key, _, _ in CELLS},
        "cells": report["cells"],
    }
    try:
        append_attempt(log, entry, "--calibration-log")
    except ValueError as err:
        raise TestbedError(str(err)) from None


def _threestudio(ns: argparse.Namespace) -> None:
    from .ts_cli import run

    run(ns, TestbedError)


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Entry point of ``testbed``; returns the exit code."""
    parser = build_parser(prog)
    args: List[str] = list(sys.argv[1:] if argv is None else argv)
    ns = parser.parse_args(args)
    run = {
        "train": _train,
        "train-classifier": _train_classifier,
        "bias": _bias,
        "bench": _bench,
        "calibrate": _calibrate,
        "train-levels": _train_levels,
        "sweep": _sweep,
        "sweep-merge": _sweep_merge,
        "threestudio": _threestudio,
    }[ns.command]
    ns.argv = args
    return run_command(parser.prog, lambda: run(ns), TestbedError)


if __name__ == "__main__":
    sys.exit(main())
