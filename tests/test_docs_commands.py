"""Every command the README and the docs show parses with the package's own parsers.

The commands are taken from the shell code blocks of ``README.md`` and ``docs/**/*.md``: each
``python -m threestudio_perpneg ...``, ``threestudio-perpneg ...`` and ``perpneg-2d ...`` (also
inside ``a && b`` chains and after ``.venv/bin/``), with ``\\`` continuations joined and ``#``
comments dropped. Nothing is run: commands that need files or a GPU are parsed only. An unknown
subcommand or flag, a missing required argument, a bad value or a ``...`` placeholder fails.

Also here: every field of every registered ``Config`` has the ``#:`` comment the generated
configuration reference shows.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path
from typing import List, Tuple

import pytest

from threestudio_perpneg import __main__ as entry
from threestudio_perpneg.commands.cli_reference import parse_command
from threestudio_perpneg.commands.config_reference import read_registered_configs

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
PROGRAMS = {"threestudio-perpneg": "threestudio-perpneg", "perpneg-2d": "perpneg-2d"}
SEPARATORS = {"&&", "||", ";", "|"}


def _blocks(text: str) -> List[str]:
    """The bodies of the fenced shell code blocks of a markdown text."""
    return [
        body
        for lang, body in re.findall(r"^```([\w-]*)[^\n]*\n(.*?)^```", text, re.S | re.M)
        if lang.lower() in SHELL_LANGS
    ]


def _commands(path: Path) -> List[Tuple[str, str, List[str]]]:
    """(where, program, argv after the program) of every package command in ``path``."""
    found = []
    for body in _blocks(path.read_text(encoding="utf-8")):
        for line in body.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            segments: List[List[str]] = [[]]
            for token in tokens:
                if token in SEPARATORS:
                    segments.append([])
                else:
                    segments[-1].append(token)
            for seg in segments:
                for i, token in enumerate(seg):
                    # a program by name or from a virtual environment's bin/ (not any path)
                    name = (
                        token.rsplit("/", 1)[-1] if re.search(r"(^|/)bin/[^/]+$", token) else token
                    )
                    if name in PROGRAMS:
                        found.append((f"{path.name}: {line.strip()}", PROGRAMS[name], seg[i + 1 :]))
                        break
                    if name in ("python", "python3") and seg[i + 1 : i + 3] == [
                        "-m",
                        "threestudio_perpneg",
                    ]:
                        found.append(
                            (
                                f"{path.name}: {line.strip()}",
                                PROGRAMS["threestudio-perpneg"],
                                seg[i + 3 :],
                            )
                        )
                        break
    return found


COMMANDS = [cmd for path in DOC_FILES for cmd in _commands(path)]


def _demo_is_known() -> bool:
    top = entry.build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return "demo" in entry.DELEGATED or "demo" in sub.choices


def _parse_demo_stand_in(argv: List[str]) -> None:
    """The agreed interface of ``demo`` while it is built elsewhere (the real parser wins once merged)."""
    parser = argparse.ArgumentParser(prog="threestudio-perpneg demo", exit_on_error=False)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--verbose", action="store_true")
    try:
        parser.parse_args(argv)
    except (argparse.ArgumentError, SystemExit) as err:
        raise ValueError(f"demo: {err}") from None


def test_the_docs_show_commands() -> None:
    """The extraction finds the README's set-up commands and the docs' examples (not nothing)."""
    readme = [argv for where, _, argv in COMMANDS if where.startswith("README.md")]
    assert ["demo", "--out", "demo_out"] in readme
    assert any(argv[:1] == ["eval3d"] for argv in readme)
    programs = {program for _, program, _ in COMMANDS}
    assert programs == {"threestudio-perpneg", "perpneg-2d"}
    subcommands = {argv[0] for _, program, argv in COMMANDS if program != "perpneg-2d" and argv}
    assert {"smoke", "link", "eval2d", "eval3d", "sweep", "testbed", "demo"} <= subcommands


@pytest.mark.parametrize("where,program,argv", COMMANDS, ids=[c[0][:90] for c in COMMANDS])
def test_documented_command_parses(where: str, program: str, argv: List[str]) -> None:
    placeholders = [a for a in argv if a.strip(".…") == "" and a]
    assert not placeholders, f"{where}: placeholder {placeholders[0]!r} instead of a value"
    rest = argv[1:] if argv[:1] == ["--verbose"] else argv
    if program != "perpneg-2d" and rest[:1] == ["demo"] and not _demo_is_known():
        _parse_demo_stand_in(rest[1:])
        return
    parse_command(argv, program=program)


@pytest.mark.parametrize(
    "argv,named",
    [
        (["eval3d", "RUN_DIR", "--classifier", "testbed"], "--out"),
        (["smoke", "--out", "x", "--bogus"], "--bogus"),
        (["testbed", "nope", "--out", "x"], "nope"),
        (["nope"], "nope"),
        (["sweep", "bogus=1"], "bogus"),
        (["sweep", "prompts=nope"], "prompts"),
    ],
)
def test_parse_command_refuses_what_the_package_refuses(argv: List[str], named: str) -> None:
    with pytest.raises(ValueError, match=re.escape(named)):
        parse_command(argv)


def test_every_config_field_is_documented() -> None:
    configs = read_registered_configs()
    assert {c.name for c in configs} == {
        "perpneg-stable-diffusion-guidance",
        "perpneg-stable-diffusion-sdi-guidance",
        "perpneg-stable-diffusion-vsd-guidance",
        "perpneg-deep-floyd-guidance",
        "perpneg-prompt-processor",
        "perpneg-deepfloyd-prompt-processor",
    }
    undocumented = [f"{c.name}.{f.name}" for c in configs for f in c.fields if not f.doc]
    assert undocumented == []
    sd = next(c for c in configs if c.name == "perpneg-stable-diffusion-guidance")
    defaults = {f.name: f.default for f in sd.fields}
    # Read from the source by hand: the defaults as the dataclass writes them.
    assert defaults["guidance_scale"] == "100.0"
    assert defaults["perp_neg_t_range"] == "[0.0, 1.0]"
    assert defaults["token_merging_params"] == "{}"
    vsd = next(c for c in configs if c.name == "perpneg-stable-diffusion-vsd-guidance")
    assert vsd.parent_name == "perpneg-stable-diffusion-guidance"
    assert {f.name: f.default for f in vsd.fields}["guidance_scale"] == "7.5"


def test_readme_is_one_screen_with_both_set_up_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 150
    chains = [line for body in _blocks(readme) for line in body.splitlines() if " && " in line]
    demo = [c for c in chains if "threestudio_perpneg demo" in c]
    tests = [c for c in chains if "pytest" in c]
    assert len(demo) == 1 and len(tests) == 1, chains
    # The test command is the one .ci/run runs (its install step is make_env there).
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    for part in (
        "pip install torch==2.13.0",
        'pip install -e ".[test]"',
        "python -m pytest -q -rs",
    ):
        assert part in tests[0]
    assert "torch==2.13.0" in ci and '-e ".[test]"' in ci and "-m pytest -q -rs" in ci


def test_user_pages_carry_no_internal_references() -> None:
    """No internal issue numbers or lab notes in the README and the user pages."""
    pattern = re.compile(
        r"\bissue \d+|\bissue #?\d+|threestudio #\d+|load average|no GPU was", re.I
    )
    hits = [
        f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
        for path in DOC_FILES
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert hits == []
