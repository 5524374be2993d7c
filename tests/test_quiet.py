"""Quiet by default (``threestudio_perpneg.commands.quiet``): third-party warnings, info messages
and loading bars are hidden unless ``--verbose``; errors and our own messages always come through.

The hook acts on modules imported after it is installed, so these tests run in fresh processes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List

import pytest

from threestudio_perpneg.__main__ import main, perpneg_2d
from threestudio_perpneg.commands.quiet import wants_verbose

REPO = Path(__file__).resolve().parents[1]

#: A process that installs the quiet setting *before* importing the libraries, then makes each of
#: them speak: warnings and info through their loggers, their progress bars, a deprecation warning
#: of the pinned stack, an error record, and diffusers 0.19's plain-tqdm pipeline-loading bar.
SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    from threestudio_perpneg.commands.quiet import quiet_third_party
    quiet_third_party(verbose=sys.argv[1] == "verbose")
    import diffusers.utils.logging as dl
    import transformers.utils.logging as tl
    import diffusers.pipelines.pipeline_utils as pu
    dl.get_logger("diffusers.models.modeling_utils").warning("MARK-diffusers-warning")
    tl.get_logger("transformers.modeling_utils").warning("MARK-transformers-warning")
    tl.get_logger("transformers.modeling_utils").info("MARK-transformers-info")
    for _ in dl.tqdm(range(2), desc="MARK-diffusers-bar"):
        pass
    for _ in tl.tqdm(range(2), desc="MARK-transformers-bar"):
        pass
    for _ in pu.tqdm(range(2), desc="Loading pipeline components... MARK-pipeline-bar"):
        pass
    for _ in pu.tqdm(range(2), desc="MARK-denoising-bar"):
        pass
    warnings.warn("pkg_resources is deprecated as an API. MARK-pkg", UserWarning)
    dl.get_logger("diffusers.pipelines").error("MARK-diffusers-error")
    print("MARK-ours", file=sys.stderr)
    """
)
NOISE = [
    "MARK-diffusers-warning",
    "MARK-transformers-warning",
    "MARK-diffusers-bar",
    "MARK-transformers-bar",
    "MARK-pipeline-bar",
    "MARK-pkg",
]
ALWAYS = ["MARK-diffusers-error", "MARK-ours", "MARK-denoising-bar"]


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.pop("TRANSFORMERS_VERBOSITY", None)
    env.pop("DIFFUSERS_VERBOSITY", None)
    env["PYTHONWARNINGS"] = "default"
    return env


def _run(args: List[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("mode", ["quiet", "verbose"])
def test_libraries_quiet_unless_verbose(mode: str, tmp_path: Path) -> None:
    proc = _run(["-c", SCRIPT, mode], tmp_path)
    assert proc.returncode == 0, proc.stderr
    for mark in ALWAYS:
        assert mark in proc.stderr, (mark, proc.stderr)
    for mark in NOISE:
        assert (mark in proc.stderr) == (mode == "verbose"), (mark, proc.stderr)


def test_smoke_run_shows_only_our_messages(tmp_path: Path) -> None:
    """A first smoke run (tiny model built, loaded): no line of diffusers/transformers noise."""
    proc = _run(
        [
            "-m",
            "threestudio_perpneg",
            "smoke",
            "--out",
            "o",
            "--steps",
            "1",
            "--azimuths",
            "0",
            "--size",
            "8",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in re.split(r"[\r\n]+", proc.stderr) if ln.strip()]
    ours = ("building a tiny random", "NOTE: no --model given", "Perp-Neg SDS")
    assert [ln for ln in lines if not ln.startswith(ours)] == [], proc.stderr
    assert any(ln.startswith("NOTE: no --model given") for ln in lines)


def test_verbose_flag_placement(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the sweep's Hydra writes sweeps/ into the current folder
    assert wants_verbose(["a", "--verbose"]) and not wants_verbose(["--", "--verbose"])
    # Before the subcommand (given on to it) and after it; stripped from the sweep's overrides.
    assert main(["--verbose", "link", str(tmp_path / "absent")]) == 2
    assert main(["link", "--verbose", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("does not exist" in ln for ln in err), err
    assert main(["sweep", "--verbose", "seeds=abc", "dry_run=true"]) == 2
    assert "seeds: 'abc'" in capsys.readouterr().err
    for argv in (["smoke", "--verbose", "--steps", "0"], ["--verbose", "smoke", "--steps", "0"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        assert "argument --steps" in capsys.readouterr().err
    assert perpneg_2d(["a corgi", "--verbose", "--steps", "0"]) == 2  # the console script
    assert "argument --steps" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--verbose", "testbed", "train", "--out", "OUT"],
        ["testbed", "--verbose", "train", "--out", "OUT"],
        ["testbed", "train", "--out", "OUT", "--verbose"],
        ["--verbose", "testbed", "sweep-merge", "--out", "OUT", "run_a"],
        ["testbed", "sweep-merge", "--verbose", "--out", "OUT", "run_a"],
    ],
)
def test_testbed_takes_verbose_before_or_after(
    argv: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``testbed`` takes ``--verbose`` wherever every other command does (nothing is run here)."""
    from threestudio_perpneg.testbed import cli

    seen = []
    for name in ("_train", "_sweep_merge"):
        monkeypatch.setattr(cli, name, lambda ns: seen.append(ns.command) or 0)
    argv = [str(tmp_path / a) if a == "OUT" else a for a in argv]
    assert main(argv) == 0
    subcommand = [a for a in argv[argv.index("testbed") + 1 :] if not a.startswith("--")][0]
    assert seen == [subcommand]
