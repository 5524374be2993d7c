"""The ``eval3d`` command (``python -m threestudio_perpneg eval3d``): load the trials, score them
with zero-shot CLIP (or the testbed's classifier), aggregate and write the reports."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

from ...commands.common import OneLineParser
from ...commands.quiet import add_verbose_argument
from ...common.checks import check_float, check_int
from ...common.io import output_folder
from .flags import JanusConfig
from .metrics import aggregate, evaluate_object
from .report import write_reports
from .trials import TrialFrames, load_trial

__all__ = ["TINY_CLIP_NOTE", "build_parser", "main", "run"]


TINY_CLIP_NOTE = (
    "no --clip given: the classifier is a tiny RANDOM CLIP built for smoke tests; its labels, "
    "accuracies and Janus flags are meaningless"
)


def build_parser(prog: str = "threestudio-perpneg eval3d") -> argparse.ArgumentParser:
    """Parser of the ``eval3d`` command (usage errors are one line, as in every command)."""
    p = OneLineParser(
        prog=prog,
        description="Janus evaluator: classify the test renders of threestudio trials (or image "
        "folders with an azimuth manifest) into front/side/back with zero-shot CLIP, score them "
        "against the cameras, flag Janus objects, and aggregate over objects x seeds. Writes "
        "janus_report.json, objects.csv, frames.csv, aggregate.csv and PNG plots to --out.",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="TRIAL_OR_FOLDER",
        help="threestudio trial folder (configs/parsed.yaml + save/it*-test/), image folder "
        "with manifest.csv/manifest.json (file, azimuth[, elevation]), or a manifest file",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (required; created)")
    p.add_argument(
        "--clip",
        metavar="MODEL",
        help="CLIP hub id or local folder (default: a tiny random CLIP; meaningless numbers)",
    )
    p.add_argument(
        "--classifier",
        choices=("clip", "testbed"),
        default="clip",
        help="clip: zero-shot CLIP (--clip); testbed: the Janus testbed's view classifier "
        "(labels front, side, back, none; testbed heads only) (default: %(default)s)",
    )
    p.add_argument(
        "--classifier-path",
        metavar="DIR",
        help="with --classifier testbed: a testbed classifier folder (default: the shipped one)",
    )
    p.add_argument(
        "--backend",
        choices=("transformers", "open_clip"),
        default="transformers",
        help="CLIP implementation (default: %(default)s)",
    )
    p.add_argument(
        "--object",
        metavar="TEXT",
        help='object name in the view prompts, e.g. "a corgi" (default: each trial\'s '
        "system.prompt_processor.prompt, or a JSON manifest's object)",
    )
    p.add_argument(
        "--iteration", type=int, help="use save/it<N>-test/ (default: the latest iteration)"
    )
    p.add_argument(
        "--device", default="cpu", help="torch device of the classifier (default: %(default)s)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="images per classifier call (default: %(default)s)",
    )
    g = p.add_argument_group("thresholds (reported in the output)")
    g.add_argument(
        "--front-threshold",
        type=float,
        default=45.0,
        help="front camera: |az| < T degrees (default: %(default)s)",
    )
    g.add_argument(
        "--back-threshold",
        type=float,
        default=45.0,
        help="back camera: |az| > 180-T degrees (default: %(default)s)",
    )
    g.add_argument(
        "--overhead-threshold",
        type=float,
        default=60.0,
        help="overhead camera: elevation > T degrees (default: %(default)s)",
    )
    g.add_argument(
        "--include-overhead",
        action="store_true",
        help="score 'overhead' as a view (default: off: predictions among front/side/back only "
        "and overhead cameras excluded from the accuracy)",
    )
    g.add_argument(
        "--back-front-min",
        type=int,
        default=1,
        help="front predictions at back cameras that flag Janus (default: %(default)s)",
    )
    g.add_argument(
        "--min-segment",
        type=int,
        default=1,
        help="frames a run of front predictions needs to count as a segment (default: %(default)s)",
    )
    g.add_argument(
        "--score-margin",
        type=float,
        default=0.0,
        help="front must beat the next label's score by this much to count for Janus "
        "(default: %(default)s)",
    )
    a = p.add_argument_group("aggregation")
    a.add_argument("--confidence", type=float, default=0.95, help="CI level (default: %(default)s)")
    a.add_argument(
        "--bootstrap", type=int, default=10000, help="bootstrap resamples (default: %(default)s)"
    )
    a.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: %(default)s)")
    o = p.add_argument_group("output")
    o.add_argument(
        "--no-plots", action="store_true", help="skip the PNG plots (default: off: plots drawn)"
    )
    o.add_argument(
        "--thumbnails", type=int, default=8, help="thumbnails per plot (default: %(default)s)"
    )
    o.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (default: off: progress bars on stderr)",
    )
    add_verbose_argument(o)
    return p


def _check_classifier_args(ns: argparse.Namespace) -> None:
    """The options of one classifier are not given with the other (before anything is loaded)."""
    if ns.classifier != "testbed":
        if ns.classifier_path is not None:
            raise ValueError(
                f"--classifier-path: {ns.classifier_path!r} is used only with --classifier "
                "testbed (name a CLIP model with --clip)"
            )
        return
    for name, value, given in (
        ("--clip", ns.clip, ns.clip is not None),
        ("--backend", ns.backend, ns.backend != "transformers"),
    ):
        if given:
            raise ValueError(
                f"{name}: {value!r} is a CLIP setting, expected none with --classifier testbed "
                "(a classifier folder goes to --classifier-path)"
            )


def _build_classifier(ns: argparse.Namespace, out: Path) -> Tuple[Any, Dict[str, Any]]:
    from ..classifier import ViewClassifier, load_view_classifier

    if ns.classifier == "testbed":
        try:
            clf = load_view_classifier("testbed", ns.classifier_path)
        except (ValueError, FileNotFoundError) as err:
            msg = str(err).splitlines()[0].split("classifier path: ", 1)[-1]
            raise FileNotFoundError(f"--classifier-path: {msg}") from None
        return clf, {"model": clf.name, "backend": "testbed", "tiny_random": False}
    if ns.clip:
        clf = ViewClassifier.from_pretrained(ns.clip, device=ns.device, backend=ns.backend)
        return clf, {"model": ns.clip, "backend": ns.backend, "tiny_random": False}
    from ...tiny.builders import build_tiny_clip

    target = (out / "tiny-clip").absolute()
    print(f"eval3d: building a tiny random CLIP in {target} ...", file=sys.stderr)
    path = build_tiny_clip(target, seed=0, overwrite=True)
    clf = ViewClassifier.from_pretrained(str(path), device=ns.device)
    info = {"model": str(path), "backend": "transformers", "tiny_random": True}
    return clf, dict(info, note=TINY_CLIP_NOTE)


def run(ns: argparse.Namespace) -> Dict[str, Any]:
    """Run the ``eval3d`` command from parsed arguments; returns the written paths."""
    config = JanusConfig(
        front_threshold=ns.front_threshold,
        back_threshold=ns.back_threshold,
        overhead_threshold=ns.overhead_threshold,
        include_overhead=ns.include_overhead,
        back_front_min=ns.back_front_min,
        min_segment=ns.min_segment,
        score_margin=ns.score_margin,
    )
    check_int("batch_size", ns.batch_size, 1)
    _check_classifier_args(ns)
    check_int("thumbnails", ns.thumbnails, 0)
    check_float("confidence", ns.confidence, 0.5, 0.9999)
    check_int("bootstrap", ns.bootstrap, 1)
    output_folder("--out", ns.out, create=False)  # before the (slow) loading
    trials = [load_trial(p, iteration=ns.iteration) for p in ns.inputs]
    for t in trials:
        if ns.object is None and not t.object_name:
            raise ValueError(
                f'object: {t.source} records no prompt/object name; pass --object "a corgi"'
            )
    out = output_folder("--out", ns.out)
    classifier, info = _build_classifier(ns, out)
    if info.get("tiny_random"):
        print(f"eval3d: warning: {TINY_CLIP_NOTE}", file=sys.stderr)
    progress = not ns.no_progress
    reports = []
    if progress:
        from tqdm.auto import tqdm

        iterator: Iterable[TrialFrames] = tqdm(trials, desc="eval3d", unit="object")
    else:
        iterator = trials
    for t in iterator:
        reports.append(
            evaluate_object(
                t, classifier, ns.object, config, batch_size=ns.batch_size, progress=progress
            )
        )
    agg = aggregate(reports, confidence=ns.confidence, n_boot=ns.bootstrap, seed=ns.seed)
    paths = write_reports(
        reports,
        agg,
        out,
        plots=not ns.no_plots,
        thumbnails=ns.thumbnails,
        extra={"classifier": info, "inputs": [str(p) for p in ns.inputs]},
    )
    overall = agg["overall"]
    rate, (lo, hi) = overall["janus_rate"], overall["janus_rate_ci"]
    line = f"eval3d: {overall['n']} object(s): Janus rate {rate:.3f} [{lo:.3f}, {hi:.3f}]"
    if overall["mean_view_accuracy"] is not None:
        line += f", mean view accuracy {overall['mean_view_accuracy']:.3f}"
        if overall["mean_view_accuracy_ci"] is not None:
            alo, ahi = overall["mean_view_accuracy_ci"]
            line += f" [{alo:.3f}, {ahi:.3f}]"
    print(line + f" ({int(agg['confidence'] * 100)}% CI) -> {paths['json']}")
    if info.get("tiny_random"):
        print("eval3d: (tiny random CLIP: these numbers are meaningless)")
    return paths


def main(argv: Optional[Sequence[str]] = None, prog: str = "threestudio-perpneg eval3d") -> int:
    """``eval3d`` entry point; returns the exit code (2 for bad inputs)."""
    parser = build_parser(prog)
    ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        run(ns)
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
