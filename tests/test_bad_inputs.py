"""Every bad input of docs/bad-inputs.md, tried for real, and the answer it gets.

Each row of the table in ``docs/bad-inputs.md`` has an id (first column) and is backed here:

* ``CLI_ROWS``: a command line, run in-process through ``python -m threestudio_perpneg``'s
  ``main`` in a scratch folder. It must exit with the row's code and print exactly one line on
  stderr (no traceback) that names the argument; that line, with the scratch folder written
  ``<cwd>``, must be the one the table quotes.
* ``LIB_ROWS``: a library call; it must raise the row's exception with the message the table
  quotes.
* ``RECOVERY``: documented recoveries (a test here, or an existing test named in the table).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import pytest
import torch

from threestudio_perpneg.__main__ import main

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "bad-inputs.md"
TESTS = Path(__file__).resolve().parent


class Cli(NamedTuple):
    id: str
    argv: Tuple[str, ...]
    code: int
    needles: Tuple[str, ...]  # the argument and what was expected, at least


def _c(id: str, argv: Sequence[str], code: int, *needles: str) -> Cli:
    return Cli(id, tuple(argv), code, tuple(needles))


CLI_ROWS: List[Cli] = [
    # --------------------------------------------------------------------------- smoke
    _c("S1", ["smoke", "--azimuths", "999"], 2, "--azimuths", "999", "[-180, 360]"),
    _c("S2", ["smoke", "--azimuths", "nan"], 2, "--azimuths", "finite"),
    _c("S3", ["smoke", "--azimuths", "abc"], 2, "--azimuths", "'abc'"),
    _c("S4", ["smoke", "--azimuths"], 2, "--azimuths", "at least one"),
    _c("S5", ["smoke", "--steps", "0"], 2, "--steps", "positive integer"),
    _c("S6", ["smoke", "--size", "-3"], 2, "--size", "'-3'"),
    _c("S7", ["smoke", "--elevation", "100"], 2, "--elevation", "[-90, 90]"),
    _c("S8", ["smoke", "--lr", "0"], 2, "--lr", "positive"),
    _c("S9", ["smoke", "--scheme", "foo"], 2, "--scheme", "'foo'", "authors"),
    _c("S10", ["smoke", "--device", "gpu"], 2, "--device", "'gpu'", "cuda:N"),
    _c("S11", ["smoke", "--device", "cuda", "--out", "o"], 2, "--device", "CUDA"),
    _c("S12", ["smoke", "--perp-neg-prompt", "blurry:1"], 2, "--perp-neg-prompt", "<= 0"),
    _c("S13", ["smoke", "--perp-neg-prompt", "blurry"], 2, "--perp-neg-prompt", "TEXT:WEIGHT"),
    _c("S14", ["smoke", "--perp-neg-prompt", "blurry:nan"], 2, "--perp-neg-prompt", "finite"),
    _c("S15", ["smoke", "--guidance-scale", "inf"], 2, "--guidance-scale", "finite"),
    _c("S16", ["smoke", "--seed", "abc"], 2, "--seed", "'abc'"),
    _c("S17", ["smoke", "--prompt", "  "], 2, "--prompt", "non-empty"),
    _c("S18", ["smoke", "--model", "no/such/model"], 2, "--model", "no/such/model", "unet/"),
    _c("S19", ["smoke", "--model", "emptydir", "--out", "o"], 2, "--model", "emptydir"),
    _c("S20", ["smoke", "--model", "afile"], 2, "--model", "afile", "folder"),
    _c("S21", ["smoke", "--model", "nounet", "--out", "o"], 2, "--model", "nounet", "unet/"),
    _c("S22", ["smoke", "--out", "afile"], 2, "--out", "afile", "expected a folder"),
    _c("S23", ["smoke", "--out", "afile/sub"], 2, "--out", "afile/sub", "expected a folder"),
    _c("S24", ["smoke", "--out", "tinyfile"], 2, "--out", "tiny-sd", "is a file"),
    _c(
        "S25", ["smoke", "--out", "griddir"], 2, "--out", "grid.png", "is a folder, expected a file"
    ),
    _c("S26", ["smoke", "--out", "cachefile"], 2, "--out", "cache", "is a file"),
    _c("T1", ["nosuchcommand"], 2, "'nosuchcommand'", "smoke"),
    _c("T2", [], 2, "required", "smoke"),
    # ------------------------------------------------------------------------ generate
    _c("G1", ["generate", "a corgi", "--sweep", "--azimuths", "999"], 2, "--azimuths", "999"),
    _c("G2", ["generate", ""], 2, "prompt", "non-empty"),
    _c("G3", ["generate", "a | b", "--weights", "1"], 2, "--weights", "one per prompt"),
    _c("G4", ["generate", "a corgi", "--view", "top"], 2, "--view", "'top'", "front"),
    _c("G5", ["generate", "a corgi", "--seeds", "5-2"], 2, "--seeds", "5-2"),
    _c("G6", ["generate", "a corgi", "--negative", "x:1"], 2, "--negative", "<= 0"),
    _c("G7", ["generate", "a corgi", "--height", "63"], 2, "--height", "multiple of 8"),
    _c("G8", ["generate", "a corgi", "--model", "no/such/model"], 2, "--model", "no/such/model"),
    _c("G9", ["generate", "a corgi", "--model", "emptydir"], 2, "--model", "model_index.json"),
    _c("G10", ["generate", "a corgi", "--out", "afile"], 2, "--out", "afile", "expected a folder"),
    _c("G11", ["generate", "a corgi", "--out", "afile/sub"], 2, "--out", "afile", "a folder"),
    _c("G12", ["generate", "--replay", "afile"], 2, "--replay", "afile", "JSON"),
    _c(
        "G13",
        ["generate", "a", "--out", "imgfile", "--steps", "1", "--height", "64", "--width", "64"],
        2,
        "--out",
        "images",
        "expected a folder",
    ),
    _c("G14", ["generate", "a", "--out", "tinyfile"], 2, "--out", "tiny-sd", "expected a folder"),
    # -------------------------------------------------------------------------- eval2d
    _c("E1", ["eval2d", "--prompts", "|"], 2, "--prompts", "'|'"),
    _c("E2", ["eval2d", "--prompts", "a corgi", "--views", "up"], 2, "--views", "'up'", "front"),
    _c("E3", ["eval2d", "--prompts", "a corgi", "--seeds", "x"], 2, "--seeds", "'x'"),
    _c("E4", ["eval2d", "--prompts-file", "no/such.txt"], 2, "--prompts-file", "no/such.txt"),
    _c("E5", ["eval2d", "--prompts", "a corgi", "--out", "afile"], 2, "--out", "afile", "a folder"),
    _c("E6", ["eval2d", "--prompts", "a", "--out", "afile/sub"], 2, "--out", "afile", "a folder"),
    _c("E7", ["eval2d", "--prompts", "a", "--classifier", "testbed", "--clip", "c"], 2, "--clip"),
    _c("E8", ["eval2d", "--prompts", "a", "--classifier-path", "emptydir"], 2, "emptydir"),
    _c(
        "E9",
        ["eval2d", "--prompts", "a", "--classifier", "testbed", "--classifier-path", "emptydir"],
        2,
        "--classifier-path",
        "config.json",
    ),
    # -------------------------------------------------------------------------- eval3d
    _c("J1", ["eval3d", "no/such", "--out", "x"], 2, "no/such", "no such folder"),
    _c("J2", ["eval3d", "afile", "--out", "x"], 2, "afile", ".csv or .json"),
    _c("J3", ["eval3d", "emptydir", "--out", "x"], 2, "emptydir", "manifest"),
    _c("J4", ["eval3d", "man", "--out", "x"], 2, "--object", "man"),
    _c("J5", ["eval3d", "man", "--object", "a corgi"], 2, "--out", "required"),
    _c(
        "J6",
        ["eval3d", "man", "--object", "a corgi", "--out", "afile"],
        2,
        "--out",
        "afile",
        "a folder",
    ),
    _c(
        "J7",
        ["eval3d", "man", "--object", "a corgi", "--out", "afile/sub"],
        2,
        "--out",
        "afile",
        "a folder",
    ),
    _c(
        "J8",
        ["eval3d", "man", "--object", "a", "--out", "o", "--classifier", "testbed", "--clip", "c"],
        2,
        "--clip",
        "'c'",
    ),
    _c(
        "J9",
        ["eval3d", "man", "--object", "a", "--out", "o", "--classifier-path", "emptydir"],
        2,
        "--classifier-path",
        "'emptydir'",
    ),
    # ---------------------------------------------------------------------------- link
    _c("K1", ["link", "no/such"], 2, "no/such", "does not exist"),
    _c("K2", ["link", "afile"], 2, "afile", "not a folder", "launch.py"),
    _c("K3", ["link", "emptydir"], 2, "emptydir", "launch.py"),
    _c("K4", ["link"], 2, "THREESTUDIO_ROOT", "required"),
    # --------------------------------------------------------------------------- sweep
    _c("W1", ["sweep", "seeds=abc", "dry_run=true"], 2, "seeds", "'abc'", "range 'a-b'"),
    _c("W2", ["sweep", "dry_run=true", "bogus=1"], 2, "bogus", "expected one of", "seeds"),
    _c("W3", ["sweep", "dry_run=true", "out_dir=afile"], 2, "out_dir", "afile", "a folder"),
    _c("W5", ["sweep", "dry_run=true", "prompts=nope"], 2, "prompts", "'nope'", "paper3d"),
]

#: Rows whose input needs a package missing (the "not installed" answers name the extra).
MISSING_ROWS: Dict[str, Tuple[Tuple[str, ...], str, int, Tuple[str, ...]]] = {
    "W4": (
        ("sweep", "dry_run=true"),
        "hydra",
        2,
        ("hydra-core", 'pip install -e ".[sweep]"'),
    ),
}


def _lib_rows() -> List[Tuple[str, Callable[[], Any], type]]:
    from threestudio_perpneg.core.guidance import perp_neg_guidance
    from threestudio_perpneg.core.text import resolve_pretrained, view_prompts
    from threestudio_perpneg.core.views import ThreestudioScheme, ViewThresholds, make_scheme
    from threestudio_perpneg.engines.sd import SDSSettings

    u = torch.zeros(2, 4)
    return [
        ("L1", lambda: SDSSettings(scale_convention="diffusers"), ValueError),
        ("L2", lambda: SDSSettings(guidance_scale=math.nan), ValueError),
        ("L3", lambda: make_scheme("author"), ValueError),
        ("L4", lambda: make_scheme("threestudio", f_fs=(4.0, 0.5)), ValueError),
        ("L5", lambda: ThreestudioScheme(f_fs=(1.0, math.nan, 0.0)), ValueError),
        ("L6", lambda: make_scheme("authors", negative_w=0.5), ValueError),
        ("L7", lambda: ViewThresholds(front=100.0, back=90.0), ValueError),
        ("L8", lambda: view_prompts(""), ValueError),
        ("L9", lambda: perp_neg_guidance(u, u, torch.zeros(2, 3, 4), torch.zeros(2)), ValueError),
        ("L10", lambda: perp_neg_guidance(torch.zeros(4), torch.zeros(4)), ValueError),
        ("L11", lambda: resolve_pretrained("no/such/model"), FileNotFoundError),
    ]


LIB_IDS = [f"L{i}" for i in range(1, 12)]

#: Rows backed by an existing test elsewhere: id -> "file.py::test_name".
POINTERS = {
    "C1": "test_threestudio_adapters.py::test_bad_config_raises_naming_the_key",
    "C2": "test_threestudio_adapters.py::test_bad_config_raises_naming_the_key",
    "C3": "test_threestudio_adapters.py::test_bad_config_raises_naming_the_key",
    "C4": "test_eval_sweep.py::test_bad_inputs",
    "C5": "test_eval_sweep.py::test_bad_inputs",
    "R1": "test_sd.py::test_nonfinite_predictions_are_counted_and_dropped",
    "R2": "test_text.py::test_text_embeddings_recompute_bad_cache_files",
    "R3": "test_bad_inputs.py::test_unloadable_tiny_checkpoint_is_rebuilt",
}


# ------------------------------------------------------------------------------- the table
def _code_span(cell: str) -> Optional[str]:
    """The text of the cell's code span (``` `...` ``` or ``` `` ... `` ```), ``\\|`` unescaped."""
    m = re.search(r"(`+)\s?(.*?)\s?\1", cell)
    return m.group(2).replace("\\|", "|") if m else None


def _doc_rows() -> Dict[str, List[str]]:
    rows: Dict[str, List[str]] = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if not line.startswith("| "):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if cells and re.fullmatch(r"[A-Z]+\d+", cells[0]):
            assert cells[0] not in rows, f"row id {cells[0]} twice in {DOC.name}"
            rows[cells[0]] = cells
    return rows


@pytest.fixture(scope="module")
def doc_rows() -> Dict[str, List[str]]:
    return _doc_rows()


def test_table_lists_every_row_and_each_is_backed(doc_rows: Dict[str, List[str]]) -> None:
    ids = {r.id for r in CLI_ROWS} | set(MISSING_ROWS) | set(LIB_IDS) | set(POINTERS)
    assert set(doc_rows) == ids
    assert len(doc_rows) >= 30
    for id, cells in doc_rows.items():
        assert len(cells) == 5, f"{id}: expected 5 columns (id, input, where, answer, test)"
        test = cells[4].strip("` ")
        if id in POINTERS:
            assert test == POINTERS[id], f"{id}: the table names {test!r}"
            path, name = POINTERS[id].split("::")
            assert re.search(rf"^def {name}\(", (TESTS / path).read_text(), re.M), POINTERS[id]
        else:
            assert test.startswith("test_bad_inputs.py::"), f"{id}: {test!r}"
            assert f"[{id}]" in test, f"{id}: {test!r}"


# --------------------------------------------------------------------------------- running
@pytest.fixture
def scratch(tmp_path: Path, tiny_sd_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder with the paths the rows name: a file, an empty folder, a model folder
    without unet/, --out folders whose tiny-sd, cache or images is a file or whose grid.png is a
    folder, and an image folder with a manifest."""
    from PIL import Image

    (tmp_path / "afile").write_text("not a folder\n")
    (tmp_path / "emptydir").mkdir()
    shutil.copytree(tiny_sd_path, tmp_path / "nounet")
    shutil.rmtree(tmp_path / "nounet" / "unet")
    (tmp_path / "tinyfile").mkdir()
    (tmp_path / "tinyfile" / "tiny-sd").write_text("not a checkpoint\n")
    (tmp_path / "griddir" / "grid.png").mkdir(parents=True)
    (tmp_path / "cachefile").mkdir()
    (tmp_path / "cachefile" / "cache").write_text("not a folder\n")
    (tmp_path / "imgfile").mkdir()
    (tmp_path / "imgfile" / "images").write_text("not a folder\n")
    man = tmp_path / "man"
    man.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(man / f"{i}.png")
    (man / "manifest.csv").write_text("file,azimuth\n0.png,0\n1.png,90\n2.png,180\n")
    monkeypatch.chdir(tmp_path)
    # S11 asks for CUDA: the answer is the one of a machine without it.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return tmp_path


def _normalise(text: str, folder: Path) -> str:
    for p in {str(folder.resolve()), str(folder), os.getcwd()}:
        text = text.replace(p, "<cwd>")
    return text


def _run_main(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> Tuple[int, str]:
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


def _check_answer(
    id: str,
    code: int,
    err: str,
    expected_code: int,
    needles: Sequence[str],
    doc_rows: Dict[str, List[str]],
    scratch: Path,
) -> None:
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"{id}: expected one line on stderr, got:\n{err}"
    assert code == expected_code, f"{id}: exit code {code}, stderr {err!r}"
    for needle in needles:
        assert needle in lines[0], f"{id}: {needle!r} not in {lines[0]!r}"
    answer = doc_rows[id][3]
    assert answer.startswith(f"exit {expected_code}"), f"{id}: table says {answer!r}"
    assert _code_span(answer) == _normalise(lines[0], scratch), id


@pytest.mark.parametrize("row", CLI_ROWS, ids=[r.id for r in CLI_ROWS])
def test_cli(
    row: Cli, scratch: Path, doc_rows: Dict[str, List[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _run_main(row.argv, capsys)
    _check_answer(row.id, code, err, row.code, row.needles, doc_rows, scratch)


@pytest.mark.parametrize("id", sorted(MISSING_ROWS))
def test_missing_package(
    id: str,
    scratch: Path,
    doc_rows: Dict[str, List[str]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    argv, module, expected, needles = MISSING_ROWS[id]
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    code, err = _run_main(argv, capsys)
    _check_answer(id, code, err, expected, needles, doc_rows, scratch)


@pytest.mark.parametrize("id", LIB_IDS)
def test_library(id: str, doc_rows: Dict[str, List[str]]) -> None:
    fn, exc = {r[0]: r[1:] for r in _lib_rows()}[id]
    with pytest.raises(exc) as info:  # type: ignore[call-overload]
        fn()
    msg = str(info.value)
    if isinstance(info.value, KeyError):
        msg = str(info.value.args[0])
    assert "\n" not in msg.strip(), msg
    assert _code_span(doc_rows[id][3]) == f"{exc.__name__}: {msg}"


def test_unloadable_tiny_checkpoint_is_rebuilt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """R3: a tiny-sd/ left in --out that does not load is rebuilt, and the run says so."""
    from threestudio_perpneg.commands.smoke import run_smoke

    out = tmp_path / "out"
    (out / "tiny-sd" / "unet").mkdir(parents=True)
    (out / "tiny-sd" / "unet" / "config.json").write_text("{ not json")
    result = run_smoke(out=str(out), steps=1, azimuths=[0.0], size=8)
    err = capsys.readouterr().err
    assert "does not load" in err and "rebuilding it" in err, err
    assert result["settings"]["model_source"] == "tiny (built)"
    assert (out / "tiny-sd" / "model_index.json").is_file()
    assert "the tiles are noise because the model is random" in err
