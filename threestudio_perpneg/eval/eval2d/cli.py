"""The ``eval2d`` command (``python -m threestudio_perpneg eval2d``): arguments, model loading (or
the tiny random models), :func:`~.protocol.run_eval2d` and the one-line summary."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, Tuple

from ...commands.common import (
    TINY_DIR,
    TINY_SEED,
    TINY_SIZE,
    OneLineParser,
    UsageError,
    add_size_arguments,
    device_arg,
    finite_float,
    first_line,
    parse_and_run,
    positive_int,
)
from ...commands.quiet import add_verbose_argument
from ...common.checks import check_names, check_seeds
from ...common.io import output_folder, read_json
from .protocol import DEFAULT_MODES, DEFAULT_VIEWS, check_prompts, run_eval2d
from .report import ALL, CSV_NAME, IMAGES_DIR, JSON_NAME, MD_NAME, PNG_NAME, _pct

__all__ = ["PROG", "Eval2DError", "build_parser", "main", "run_cli"]

PROG = "threestudio-perpneg eval2d"
TINY_SD_DIR = TINY_DIR
TINY_CLIP_DIR = "tiny-clip"
TINY_NOTE = (
    "NOTE: no {what} given: using a tiny RANDOM {kind} ({path}). The success rates are "
    "MEANINGLESS (random generator and/or random classifier); they only show that the pipeline "
    "runs. The paper's numbers (Perp-Neg: side 73.1 %, back 40.4 %) need real checkpoints on a "
    "GPU, e.g. --model stabilityai/stable-diffusion-2-1-base --clip openai/clip-vit-large-patch14 "
    "--device cuda --fp16."
)


class Eval2DError(UsageError):
    """A user-facing error of ``eval2d``: one line naming the argument, exit code 2."""


def _fail(arg: str, message: str) -> NoReturn:
    raise Eval2DError.argument(arg, message)


def _names_arg(allowed: Sequence[str]) -> Callable[[str], List[str]]:
    def parse(value: str) -> List[str]:
        try:
            return check_names("names", value, allowed)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err).split(": ", 1)[1]) from None

    return parse


def _device_arg(value: str) -> str:
    return device_arg(value, auto=True, mps=True)


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``eval2d`` command's parser."""
    from ...core.views import SCHEMES
    from ...sampler.pipeline import MODES, SCHEDULERS
    from ..classifier import BACKENDS, CLASSIFIERS, VIEW_LABELS

    p = OneLineParser(
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
    add_size_arguments(m)
    m.add_argument(
        "--scheme",
        choices=sorted(SCHEMES),
        default="threestudio",
        help="view-negative weight scheme of generate_view (default: %(default)s)",
    )
    m.add_argument(
        "--fp16", action="store_true", help="half-precision Stable Diffusion weights (GPU)"
    )

    c = p.add_argument_group("classifier (CLIP, or the testbed's CNN)")
    c.add_argument(
        "--classifier",
        choices=CLASSIFIERS,
        default="clip",
        help="clip: zero-shot CLIP (--clip); testbed: the Janus testbed's view classifier "
        "(labels front, side, back, none; for testbed heads only) (default: %(default)s)",
    )
    c.add_argument(
        "--classifier-path",
        default=None,
        metavar="DIR",
        help="with --classifier testbed: a classifier folder written by 'testbed train-classifier' "
        "(default: the shipped one)",
    )
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
    "classifier": "--classifier-path",
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
        return check_prompts(items)
    except ValueError as err:
        _fail(arg, str(err).split(": ", 1)[-1])


def _read_templates(value: Optional[str]) -> Optional[Dict[str, Any]]:
    if value is None:
        return None
    try:
        data = read_json(value)
    except (FileNotFoundError, ValueError) as err:
        _fail("--templates", str(err))
    from ..classifier import check_templates

    try:
        check_templates(data)
    except ValueError as err:
        _fail("--templates", str(err))
    return dict(data)


TESTBED_PRIOR_NOTE = (
    "a testbed pixel-space prior: the eval2d sampler (PerpNegSampler) runs latent Stable "
    "Diffusion checkpoints only (it needs a vae); measure the testbed prior with "
    "threestudio_perpneg.testbed.table2d.measure_table2d"
)


def _check_classifier_args(args: argparse.Namespace) -> None:
    """The options of one classifier are not given with the other."""
    from ..classifier import VIEW_LABELS

    if args.classifier != "testbed":
        if args.classifier_path is not None:
            _fail(
                "--classifier-path",
                f"{args.classifier_path!r} is used only with --classifier testbed "
                "(name a CLIP model with --clip)",
            )
        return
    clip_only = [
        ("--clip", args.clip, args.clip is not None),
        ("--clip-backend", args.clip_backend, args.clip_backend != "transformers"),
        ("--templates", args.templates, args.templates is not None),
        ("--labels", ",".join(args.labels), list(args.labels) != list(VIEW_LABELS)),
    ]
    for name, value, given in clip_only:
        if given:
            _fail(
                name,
                f"{value!r} is a CLIP setting, expected none with --classifier testbed (its "
                "labels and weights are its own; a classifier folder goes to --classifier-path)",
            )


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
    from ..classifier import ViewClassifier, check_labels, load_view_classifier

    prompts = _read_prompts(args)
    try:
        seeds = check_seeds(str(args.seeds), "seeds", unique=True, text=True)
    except ValueError as err:
        _library_error(err, "--seeds")
    testbed = args.classifier == "testbed"
    _check_classifier_args(args)
    try:
        labels = check_labels(args.labels)
    except ValueError as err:
        _library_error(err, "--labels")
    if testbed:
        from ...core.views import REJECT

        labels = ("front", "side", "back", REJECT)
    missing = [v for v in args.views if v not in labels]
    if missing:
        where = "the testbed classifier's labels" if testbed else "--labels"
        _fail("--views", f"requested view(s) {missing} are not among {where} {list(labels)}")
    if args.model is not None and (Path(args.model).expanduser() / "testbed.json").is_file():
        _fail("--model", f"{args.model!r} is {TESTBED_PRIOR_NOTE}")
    if args.clip is None and args.clip_backend != "transformers":
        _fail(
            "--clip",
            "the tiny random CLIP needs --clip-backend transformers; name a model with --clip",
        )
    templates = _read_templates(args.templates)
    device = _resolve_device(args.device)
    if args.fp16 and device == "cpu":
        _fail("--fp16", "half precision needs a GPU (--device cuda)")
    try:
        out = output_folder("--out", args.out, create=False)
    except ValueError as err:
        _fail("--out", str(err).split(": ", 1)[1])

    import torch

    from ...sampler.pipeline import PerpNegSampler

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

    classifier: Any = None
    if testbed:
        try:
            classifier = load_view_classifier("testbed", args.classifier_path)
        except (ValueError, FileNotFoundError) as err:
            _fail("--classifier-path", first_line(err).split("classifier path: ", 1)[-1])
    try:
        # Load real models first: a missing folder fails before anything is written.
        sampler = load_sampler(args.model) if args.model is not None else None
        if args.clip is not None:
            classifier = load_classifier(args.clip)
    except (ValueError, FileNotFoundError) as err:
        _library_error(err, "--model")
    except ImportError as err:
        _fail("--clip-backend", str(err))
    try:
        output_folder("--out", out)
    except ValueError as err:
        _fail("--out", str(err).split(": ", 1)[1])
    model_name, clip_name = args.model, args.clip
    height, width = args.height, args.width
    if sampler is None:
        from ...tiny.builders import build_tiny_stable_diffusion

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
        from ...tiny.builders import build_tiny_clip

        clip_name, classifier = _tiny(
            out / TINY_CLIP_DIR, "config.json", build_tiny_clip, load_classifier
        )
        random_models.append("CLIP")
        print(TINY_NOTE.format(what="--clip", kind="CLIP", path=clip_name), file=sys.stderr)

    if testbed:
        clip_name = str(getattr(classifier, "name", "testbed"))
    settings = {
        "argv": list(getattr(args, "_argv", []) or []),
        "model": model_name,
        "classifier_kind": args.classifier,
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
    return parse_and_run(build_parser(prog), argv, run_cli, Eval2DError)


if __name__ == "__main__":
    sys.exit(main())
