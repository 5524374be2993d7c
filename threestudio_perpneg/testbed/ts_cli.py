"""``testbed threestudio``: the Janus testbed through threestudio's own DreamFusion on a CPU.

Trains one method on a list of seeds with :mod:`.ts_dreamfusion` and writes ``OUT/results.json``
(the table row with Wilson intervals, each object's labels and timings, the settings, the exact
command line) and ``OUT/rings.png``; ``--attempt-log FILE`` appends the run (settings, row, note)
to an attempts file shared by runs, the record of how the settings were chosen.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..commands.common import finite_float, nonnegative_int, positive_int

__all__ = ["add_parser", "default_prior", "run"]


def add_parser(sub: Any) -> None:
    """The ``threestudio`` subparser of ``testbed``."""
    from .ts_dreamfusion import METHODS

    p = sub.add_parser(
        "threestudio",
        help="the testbed through threestudio's own dreamfusion-system on CPU (needs "
        "THREESTUDIO_ROOT)",
        description="Train a NeRF with threestudio's dreamfusion-system on the testbed prior "
        "(CUDA-only parts swapped for CPU ones), render the ring with threestudio's test step, "
        "score it with the testbed classifier: OUT/results.json and OUT/rings.png.",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument(
        "--config",
        default=None,
        help="threestudio YAML (default: configs/testbed-dreamfusion.yaml of the clone)",
    )
    p.add_argument(
        "--prior",
        default=None,
        help="testbed prior folder (default: the sharper family's p35, shipped in the package)",
    )
    p.add_argument("--method", choices=METHODS, default="vanilla", help="default vanilla")
    p.add_argument(
        "--scheme",
        choices=("threestudio", "authors"),
        default="threestudio",
        help="Perp-Neg weight scheme of --method ours (default threestudio)",
    )
    p.add_argument(
        "--sampling", choices=("all", "one"), default="all", help="perp_neg_sampling of ours"
    )
    p.add_argument(
        "--eval-prob",
        type=finite_float,
        default=1.0,
        help="perp_neg_eval_prob of ours: probability a camera's negatives are evaluated "
        "(default 1)",
    )
    p.add_argument("--identity", default="troll", help="head identity prompted (default troll)")
    p.add_argument("--seeds", default="0-3", help="seeds, e.g. 0-3 or 0,5,9 (default 0-3)")
    p.add_argument("--steps", type=positive_int, default=None, help="default: the config's")
    p.add_argument("--batch-size", type=positive_int, default=None, help="default: the config's")
    p.add_argument(
        "--cpu-encoding",
        choices=("grid", "frequency"),
        default="grid",
        help="what replaces the hash grid: a torch grid (default) or a frequency encoding",
    )
    p.add_argument(
        "--cpu-grid-levels", type=positive_int, default=8, help="levels of the CPU grid (default 8)"
    )
    p.add_argument(
        "--cpu-frequencies",
        type=positive_int,
        default=6,
        help="frequencies of --cpu-encoding frequency (default 6)",
    )
    p.add_argument(
        "--cpu-masking-steps",
        type=nonnegative_int,
        default=0,
        help="steps over which the frequencies are unmasked coarse to fine (default 0)",
    )
    p.add_argument(
        "--cpu-lr",
        type=finite_float,
        default=None,
        help="Adam learning rate of the geometry (default: the config's)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a threestudio config override (repeatable), e.g. system.loss.lambda_opaque=0.1",
    )
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1)")
    p.add_argument("--attempt-log", type=Path, default=None, help="attempts file to append to")
    p.add_argument("--note", default="", help="a note stored with the attempt")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(ns: argparse.Namespace, error: type) -> None:
    """Run ``testbed threestudio`` (errors as ``error``, a one-line :class:`CommandError`)."""
    import torch

    from ..common.checks import parse_seeds
    from ..common.io import append_attempt, read_attempts
    from ..threestudio_cpu import ThreestudioUnavailable
    from .classifier import load_classifier
    from .ts_dreamfusion import ThreestudioRunConfig, default_config_path, run_objects

    if not os.environ.get("THREESTUDIO_ROOT"):
        raise error(
            "THREESTUDIO_ROOT: unset; point it at a threestudio checkout (e.g. "
            "../shared/threestudio) to run threestudio's dreamfusion-system"
        )
    config = Path(ns.config) if ns.config else default_config_path()
    if not config.is_file():
        raise error(f"--config: {config} is not a file (expected a threestudio YAML)")
    prior = Path(ns.prior) if ns.prior else default_prior()
    if not (prior / "testbed.json").is_file():
        raise error(f"--prior: {prior} has no testbed.json (expected a testbed prior folder)")
    try:
        seeds = parse_seeds(ns.seeds, "--seeds")
        cfg = ThreestudioRunConfig(
            config=str(config),
            prior=str(prior),
            method=ns.method,
            scheme=ns.scheme,
            sampling=ns.sampling,
            eval_prob=ns.eval_prob,
            identity=ns.identity,
            steps=ns.steps,
            batch_size=ns.batch_size,
            cpu_encoding=ns.cpu_encoding,
            cpu_grid_levels=ns.cpu_grid_levels,
            cpu_frequencies=ns.cpu_frequencies,
            cpu_masking_steps=ns.cpu_masking_steps,
            cpu_lr=ns.cpu_lr,
            overrides=tuple(ns.overrides),
        )
    except ValueError as err:
        raise error(str(err)) from None
    if ns.attempt_log is not None:
        try:  # refuse a bad log before hours of training
            read_attempts(ns.attempt_log, "--attempt-log")
        except ValueError as err:
            raise error(str(err)) from None
    torch.set_num_threads(ns.threads)
    argv = getattr(ns, "argv", None) or sys.argv[2:]
    try:
        report = run_objects(
            cfg,
            seeds,
            ns.out,
            load_classifier(),
            progress=not ns.quiet,
            command=["python", "-m", "threestudio_perpneg", "testbed", *argv],
        )
    except ThreestudioUnavailable as err:
        raise error(f"THREESTUDIO_ROOT: {err.reason}") from None
    except (FileNotFoundError, ValueError) as err:
        raise error(str(err)) from None
    row = report["row"]
    print(
        f"{row['label']} b{row['batch']}: Janus {row['janus']}/{row['seeds']} "
        f"{row['janus_ci95']}, front kept {row['front_kept']}/{row['seeds']} "
        f"{row['front_kept_ci95']}, view acc f/s/b "
        + "/".join(f"{row['view_accuracy'][v]:.2f}" for v in ("front", "side", "back"))
        + f", {row['unet_rows_per_step']:.2f} UNet rows/step, {row['seconds_per_step']:.3f} s/step"
    )
    if ns.attempt_log is not None:
        append_attempt(
            ns.attempt_log,
            {
                "note": ns.note,
                "out": str(ns.out),
                "settings": report["settings"],
                "row": row,
                "labels": {str(o["seed"]): o["labels"] for o in report["objects"]},
            },
            "--attempt-log",
            allow_nan=True,
        )


def default_prior() -> Path:
    """The sharper (6000-step) family's p35, shipped inside the package."""
    from .levels import SHIPPED_SHARP_LEVEL, SHIPPED_SHARP_PRIORS

    return SHIPPED_SHARP_PRIORS / SHIPPED_SHARP_LEVEL
