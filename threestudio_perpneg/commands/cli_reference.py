"""Every command's parser in one place: the CLI reference page and checks of documented commands.

``python -m threestudio_perpneg`` parses ``smoke`` itself and hands the other subcommands
(``DELEGATED`` of :mod:`threestudio_perpneg.__main__`) to their modules, each with its own
``build_parser(prog)``; ``sweep`` is a Hydra app and takes ``key=value`` overrides of its
``conf/config.yaml``. :func:`parse_command` checks a command line against those parsers without
running it; :func:`cli_reference_markdown` renders each parser's ``--help`` (``docs/hooks.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

__all__ = [
    "cli_reference_markdown",
    "command_parsers",
    "parse_command",
    "sweep_override_problem",
]

#: The sweep's Hydra configuration folder.
SWEEP_CONF = Path(__file__).resolve().parents[1] / "eval" / "sweep" / "conf"
#: Hydra's own command-line flags that the sweep passes through.
HYDRA_FLAGS = ("-m", "--multirun", "--cfg", "--info", "--help", "--hydra-help", "--verbose")


def _delegated_parser(name: str) -> Optional[argparse.ArgumentParser]:
    from .. import __main__ as entry

    module = importlib.import_module(entry.DELEGATED[name][0], "threestudio_perpneg")
    builder = getattr(module, "build_parser", None)
    return builder(prog=f"{entry.PROG} {name}") if builder is not None else None


def command_parsers() -> Dict[str, argparse.ArgumentParser]:
    """``""`` (the top level, with ``smoke``), then every delegated subcommand with a parser."""
    from .. import __main__ as entry

    parsers = {"": entry.build_parser()}
    for name in entry.DELEGATED:
        parser = _delegated_parser(name)
        if parser is not None:
            parsers[name] = parser
    return parsers


def sweep_override_problem(arg: str) -> Optional[str]:
    """What is wrong with one ``sweep`` argument (a Hydra flag or override), or None.

    Checks the key against the sweep's ``conf/config.yaml`` and its groups (``prompts``, ``job``,
    ``hydra/launcher``); the values are checked when the sweep runs.
    """
    import yaml

    if arg in HYDRA_FLAGS:
        return None
    key, sep, value = arg.partition("=")
    if not sep:
        return f"{arg!r}: expected a key=value override or a Hydra flag"
    key = key.lstrip("+~")
    config = yaml.safe_load((SWEEP_CONF / "config.yaml").read_text(encoding="utf-8"))
    groups = {p.name: p for p in SWEEP_CONF.iterdir() if p.is_dir()}
    if key == "hydra/launcher":
        options = sorted(p.stem for p in (SWEEP_CONF / "hydra" / "launcher").glob("*.yaml"))
        return None if value in options else f"hydra/launcher: {value!r} is not one of {options}"
    if key in groups and key != "hydra" and "." not in key:
        options = sorted(p.stem for p in groups[key].glob("*.yaml"))
        return None if value in options else f"{key}: {value!r} is not one of {options}"
    top = key.split(".")[0]
    if top in config or top in groups:
        return None
    known = sorted({*config, *groups} - {"defaults", "hydra"})
    return f"{key}: unknown key, expected one of {', '.join(known)}"


def parse_command(argv: Sequence[str], program: str = "threestudio-perpneg") -> None:
    """Parse a command line as the package would, without running it.

    Args:
        argv: the arguments after the program.
        program: ``threestudio-perpneg`` (or ``python -m threestudio_perpneg``) or ``perpneg-2d``.

    Raises:
        ValueError: the parser's one-line error (an unknown flag or subcommand, a bad value).
    """
    from .. import __main__ as entry

    args = list(argv)
    if program == "perpneg-2d":
        args = ["generate", *args]
    if args[:1] == ["--verbose"] and args[1:2] and args[1] in entry.DELEGATED:
        args = args[1:]
    name = args[0] if args else ""
    if name == "sweep":
        problems = [p for p in map(sweep_override_problem, args[1:]) if p]
        if problems:
            raise ValueError(f"sweep: {problems[0]}")
        return
    parser = entry.build_parser()
    if name in entry.DELEGATED:
        delegated = _delegated_parser(name)
        if delegated is None:
            raise ValueError(f"{name}: has no parser to check the command with")
        parser, args = delegated, args[1:]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(args)
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise ValueError(err.getvalue().strip() or f"exit code {exc.code}") from None


def _help(parser: argparse.ArgumentParser) -> str:
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # the same wrapping wherever the page is built
    try:
        return parser.format_help().rstrip()
    finally:
        if saved is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved


def _subparsers(parser: argparse.ArgumentParser) -> Dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _sweep_keys() -> List[str]:
    """Markdown table rows of the sweep's top-level keys: key, default, the comment above it."""
    lines = (SWEEP_CONF / "config.yaml").read_text(encoding="utf-8").splitlines()
    rows, comment = [], []  # type: List[str], List[str]
    for line in lines:
        if line.startswith("#"):
            comment.append(line.lstrip("# ").strip())
        elif line and not line[0].isspace() and ":" in line and not line.startswith("-"):
            key, _, value = line.partition(":")
            value = value.split("#")[0].strip()
            if key not in ("defaults", "hydra") and (value or comment):
                text = " ".join(comment).replace("|", "\\|")
                default = f"`{value}`" if value else "(a group, see the file)"
                rows.append(f"| `{key}` | {default} | {text} |")
            comment = []
        elif not line.strip():
            comment = []
    return rows


def cli_reference_markdown(heading: str = "##") -> str:
    """Markdown: the ``--help`` of every command and subcommand, and the sweep's keys."""
    from .. import __main__ as entry

    out: List[str] = []

    def section(title: str, parser: argparse.ArgumentParser) -> None:
        out.extend([f"{heading} `{title}`", "", "```text", _help(parser), "```", ""])

    top = entry.build_parser()
    section(entry.PROG, top)
    smoke = _subparsers(top).get("smoke")
    if smoke is not None:
        section(f"{entry.PROG} smoke", smoke)
    for name in entry.DELEGATED:
        if name == "sweep":
            out.extend(
                [
                    f"{heading} `{entry.PROG} sweep`",
                    "",
                    "A Hydra app: `key=value` overrides of "
                    "`threestudio_perpneg/eval/sweep/conf/config.yaml` (and its groups `prompts`, "
                    "`job`, `hydra/launcher`), `-m` for a multirun. Its top-level keys:",
                    "",
                    "| key | default | meaning |",
                    "|---|---|---|",
                    *_sweep_keys(),
                    "",
                ]
            )
            continue
        parser = _delegated_parser(name)
        if parser is None:
            out.extend([f"{heading} `{entry.PROG} {name}`", "", "See its `--help`.", ""])
            continue
        section(f"{entry.PROG} {name}", parser)
        for sub_name, sub in _subparsers(parser).items():
            section(f"{entry.PROG} {name} {sub_name}", sub)
    out.extend(
        [
            f"{heading} `perpneg-2d`",
            "",
            f"The console script for `{entry.PROG} generate` (same options).",
            "",
        ]
    )
    return "\n".join(out)
