"""``python -m threestudio_perpneg`` / ``threestudio-perpneg``: the package's command line.

Subcommands:

* ``demo``: what Perp-Neg does, in about two minutes on a CPU: vanilla SDS and Perp-Neg on the
  same seeds with the Janus testbed's 3D protocol, on the tiny prior shipped in the package
  (:mod:`threestudio_perpneg.commands.demo`, which parses its own arguments).
* ``smoke``: CPU smoke run / 2D Perp-Neg SDS playground (:mod:`threestudio_perpneg.commands.smoke`).
* ``link``: install the plugin shim and configs into a threestudio checkout
  (:mod:`threestudio_perpneg.commands.link`, which parses its own arguments).
* ``generate``: 2D Perp-Neg sampler (:mod:`threestudio_perpneg.commands.generate`, which parses its own
  arguments; also the ``perpneg-2d`` console script).
* ``eval2d``: the paper's 2D view-success protocol, sd vs cebm vs perpneg
  (:mod:`threestudio_perpneg.eval.eval2d`).
* ``eval3d``: Janus rate and view accuracy of threestudio runs (:mod:`threestudio_perpneg.eval.janus`).
* ``testbed``: the Janus testbed (:mod:`threestudio_perpneg.testbed.cli`: ``train``,
  ``train-classifier``, ``bias``).
* ``sweep``: the Hydra reproduction sweep (:mod:`threestudio_perpneg.eval.sweep`; Hydra overrides
  follow, e.g. ``sweep dry_run=true``).

Every command is quiet by default (:mod:`threestudio_perpneg.commands.quiet`: diffusers',
transformers' and accelerate's warnings and loading bars hidden); ``--verbose``, before or after the
subcommand, shows them.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence

PROG = "threestudio-perpneg"

#: Subcommands implemented in their own modules: name -> (module, help).
DELEGATED = {
    "demo": (
        ".commands.demo",
        "what Perp-Neg does, on a CPU in minutes: vanilla vs Perp-Neg SDS on a testbed head",
    ),
    "link": (
        ".commands.link",
        "install the plugin shim and perpneg-*.yaml configs into a threestudio checkout",
    ),
    "generate": (
        ".commands.generate",
        "2D Perp-Neg sampler: images from weighted prompts / views, perpneg vs cebm vs sd",
    ),
    "eval2d": (".eval.eval2d", "2D view-success protocol (paper table): sd vs cebm vs perpneg"),
    "eval3d": (".eval.janus", "Janus rate and view accuracy of threestudio trial folders"),
    "sweep": (
        ".eval.sweep.app",
        "paper-reproduction sweep (Hydra app): prompts x seeds x vanilla/perpneg",
    ),
    "testbed": (
        ".testbed.cli",
        "Janus testbed: train the small prior / classifier, measure the prior's view bias",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """Top-level parser (its ``--help`` lists the subcommands)."""
    from . import __version__
    from .commands.common import OneLineParser
    from .commands.quiet import VERBOSE_HELP
    from .commands.smoke import add_arguments

    parser = OneLineParser(
        prog=PROG,
        description="Perp-Neg guidance (arXiv 2304.04968) for threestudio.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # Its own dest: a subparser's default would overwrite a shared one.
    parser.add_argument("--verbose", dest="verbose_top", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(["smoke", *DELEGATED]) + "}")
    sub.required = True
    smoke = sub.add_parser(
        "smoke",
        help="CPU smoke run / 2D playground: Perp-Neg SDS on one image per azimuth",
        description="Optimise one image per azimuth with batched Perp-Neg SDS and write "
        "<out>/grid.png and <out>/smoke.json. Without --model a tiny random Stable Diffusion "
        "checkpoint is built into <out>/tiny-sd.",
    )
    add_arguments(smoke)
    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=f"{help_text} (see '{name} --help')", add_help=False)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point; returns the exit code."""
    from .commands.quiet import quiet_third_party, wants_verbose

    args: List[str] = list(sys.argv[1:] if argv is None else argv)
    verbose = False
    if args[:1] == ["--verbose"] and args[1:2] and args[1] in DELEGATED:
        verbose, args = True, args[1:]  # top-level --verbose before a delegated subcommand
    if args and args[0] in DELEGATED:
        # These subcommands parse their own options (including --help).
        import importlib

        name, rest = args[0], args[1:]
        if name == "sweep":  # Hydra takes overrides, not options: --verbose is ours
            verbose = verbose or "--verbose" in rest
            rest = [a for a in rest if a != "--verbose"]
        elif verbose:
            rest = ["--verbose", *rest]
        quiet_third_party(verbose or wants_verbose(rest))
        module = importlib.import_module(DELEGATED[name][0], __package__)
        if name == "link":
            return int(module.main(rest) or 0)
        return int(module.main(rest, prog=f"{PROG} {name}"))

    parser = build_parser()
    ns = parser.parse_args(args)
    ns.verbose = bool(ns.verbose_top or getattr(ns, "verbose", False))
    quiet_third_party(ns.verbose)
    if ns.command == "smoke":
        from .commands.common import run_command
        from .commands.smoke import SmokeError, run_smoke

        return run_command(f"{PROG} smoke", lambda: run_smoke(ns), SmokeError)
    parser.error(f"unknown command {ns.command!r}")  # unreachable: argparse checks choices
    return 2


def perpneg_2d(argv: Optional[Sequence[str]] = None) -> int:
    """The ``perpneg-2d`` console script: ``generate``, quiet by default like every command."""
    from .commands.generate import main as generate_main
    from .commands.quiet import quiet_third_party, wants_verbose

    args = list(sys.argv[1:] if argv is None else argv)
    quiet_third_party(wants_verbose(args))
    return int(generate_main(args))


if __name__ == "__main__":
    sys.exit(main())
