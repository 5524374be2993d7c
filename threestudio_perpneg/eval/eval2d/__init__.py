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

Modules: :mod:`.protocol` (:func:`run_eval2d`, input checks, image names), :mod:`.report` (success
table, confusion, CSV / markdown / JSON / chart writers), :mod:`.cli` (the ``eval2d`` command).
This package re-exports their public names.
"""

from __future__ import annotations

from ..stats import wilson_interval
from .cli import PROG, Eval2DError, build_parser, main, run_cli
from .protocol import DEFAULT_MODES, DEFAULT_VIEWS, FORMAT, image_name, run_eval2d
from .report import (
    CSV_NAME,
    IMAGES_DIR,
    JSON_NAME,
    MD_NAME,
    PAPER_PERPNEG,
    PNG_NAME,
    confusion,
    plot_success,
    success_table,
    table_csv,
    table_markdown,
    write_reports,
)

__all__ = [
    "CSV_NAME",
    "DEFAULT_MODES",
    "DEFAULT_VIEWS",
    "Eval2DError",
    "FORMAT",
    "IMAGES_DIR",
    "JSON_NAME",
    "MD_NAME",
    "PAPER_PERPNEG",
    "PNG_NAME",
    "PROG",
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
