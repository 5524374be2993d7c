"""``--help`` of every command shows every default (issue 9: a newcomer reads defaults there)."""

from __future__ import annotations

import argparse
import importlib
from typing import List

import pytest

BUILDERS = {
    "smoke": "threestudio_perpneg.commands.smoke",
    "generate": "threestudio_perpneg.commands.generate",
    "eval2d": "threestudio_perpneg.eval.eval2d",
    "eval3d": "threestudio_perpneg.eval.janus",
}


def _missing_defaults(parser: argparse.ArgumentParser) -> List[str]:
    """Options with a default worth stating (not None / False / empty) whose help does not say it."""
    if issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter):
        return []  # argparse appends "(default: ...)" to every help
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        if action.default in (None, False, argparse.SUPPRESS) or action.default == []:
            continue
        if "default" not in (action.help or "").lower():
            missing.append(f"{'/'.join(action.option_strings) or action.dest}={action.default!r}")
    return missing


@pytest.mark.parametrize("command", sorted(BUILDERS))
def test_help_shows_every_default(command: str) -> None:
    parser = importlib.import_module(BUILDERS[command]).build_parser()
    assert _missing_defaults(parser) == []
    parser.format_help()  # every %(default)s expands
