"""Tests of ``python -m threestudio_perpneg demo`` (vanilla vs Perp-Neg on the shipped p35 prior).

The demo runs here at a reduced size (one seed, a few SDS steps): these tests check its plumbing
(files, keys, picture layout, printed table, flags), never its effect size or its speed.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest

from threestudio_perpneg.__main__ import main
from threestudio_perpneg.commands.common import UsageError
from threestudio_perpneg.commands.demo import format_demo, resolve_seeds, seed_agreement

REPO = Path(__file__).resolve().parents[1]
PRIOR = REPO / "threestudio_perpneg/testbed/assets/priors-6000/p35"
#: demo.json's documented keys (the module docstring and REPORT_KEYS).
KEYS = {"seeds", "settings", "objects", "counts", "agreement", "seconds", "versions"}
METHODS = ["vanilla b4", "ours/threestudio b4"]
VERDICTS = {"JANUS", "ok", "JANUS, front lost", "ok, front lost"}
#: The rings picture's geometry: 12 ring views of 16 px x 4 (detail renders) after a 200 px name
#: column; a 14 px band under each row and one above the first (azimuths).
RING_VIEWS, CELL, LEFT, BAND = 12, 16 * 4, 200, 14


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    out = tmp_path_factory.mktemp("demo")
    from contextlib import redirect_stdout
    from io import StringIO

    buf = StringIO()
    with redirect_stdout(buf):
        code = main(
            [
                "demo",
                "--out",
                str(out),
                "--seeds",
                "1",
                "--first-seed",
                "3",
                "--steps",
                "2",
                "--quiet",
            ]
        )
    return {"code": code, "out": out, "stdout": buf.getvalue()}


def test_demo_writes_its_files(demo_run: Dict[str, Any]) -> None:
    assert demo_run["code"] == 0
    out: Path = demo_run["out"]
    assert sorted(p.name for p in out.iterdir()) == ["demo.json", "demo.png"]  # no temp files
    report = json.loads((out / "demo.json").read_text())
    assert set(report) == KEYS
    assert report["seeds"] == [3]
    assert [c["method"] for c in report["counts"]] == METHODS
    assert [(o["method"], o["seed"]) for o in report["objects"]] == [(m, 3) for m in METHODS]
    for obj in report["objects"]:
        assert len(obj["labels"]) == len(obj["truth"]) == len(obj["azimuths"]) == RING_VIEWS
        assert obj["azimuths"][0] == 0.0
        assert obj["verdict"] in VERDICTS
        assert obj["verdict"].startswith("JANUS" if obj["janus"] else "ok")
        assert obj["verdict"].endswith("front lost") != obj["front_kept"]
    for count in report["counts"]:
        mine = [o for o in report["objects"] if o["method"] == count["method"]]
        assert count["n"] == 1
        assert count["janus"] == sum(o["janus"] for o in mine)
        assert count["front_kept"] == sum(o["front_kept"] for o in mine)
        assert count["seconds"] >= 0
    agreement = report["agreement"]
    assert sorted(agreement["agree"] + agreement["differ"]) == [3]
    settings = report["settings"]
    assert settings["prior"] == str(PRIOR)
    assert settings["identity"] == "troll"
    assert [(m["method"], m["scheme"]) for m in settings["methods"]] == [
        ("vanilla", None),
        ("ours", "threestudio"),
    ]
    proto = settings["protocol3d"]
    assert proto["steps"] == 2 and proto["batch_size"] == 4
    assert (proto["perp_neg_weight_scale"], proto["perp_neg_sampling"]) == (1.0, "all")
    assert 5 < settings["prior_mb"] < 8  # the documented 6.2 MB
    assert {"load", "methods", "picture", "total"} <= set(report["seconds"])
    assert {"torch", "diffusers", "transformers", "threestudio_perpneg"} <= set(report["versions"])


def test_demo_picture_layout(demo_run: Dict[str, Any]) -> None:
    from PIL import Image

    with Image.open(demo_run["out"] / "demo.png") as im:
        rows = 1 + len(METHODS)  # the clean head, then one ring per method for the one seed
        assert im.size == (LEFT + RING_VIEWS * CELL, rows * (CELL + BAND) + BAND)


def test_demo_prints_its_table(demo_run: Dict[str, Any]) -> None:
    lines = demo_run["stdout"].splitlines()
    header = lines[0].split()
    assert header[0] == "method" and "Janus" in header and "seconds" in header
    report = json.loads((demo_run["out"] / "demo.json").read_text())
    for count, line in zip(report["counts"], lines[1:3]):
        assert line.startswith(count["method"])
        assert f"{count['janus']}/1" in line and f"{count['front_kept']}/1" in line
    seed_line = next(line for line in lines if line.startswith("seed 3:"))
    assert all(m in seed_line for m in METHODS)
    assert seed_line.endswith("(agree)") or seed_line.endswith("(differ)")


def _objects(verdicts: Dict[int, List[bool]]) -> List[Dict[str, Any]]:
    """Objects of two methods per seed from ``{seed: [vanilla janus, ours janus]}``."""
    return [
        {"seed": s, "method": m, "janus": j, "front_kept": True, "verdict": "JANUS" if j else "ok"}
        for s, js in verdicts.items()
        for m, j in zip(METHODS, js)
    ]


def test_seed_agreement_and_table() -> None:
    objects = _objects({0: [True, False], 1: [True, True], 2: [False, False]})
    agreement = seed_agreement(objects, [0, 1, 2])
    assert agreement == {"agree": [1, 2], "differ": [0]}
    counts = [
        {"method": m, "janus": j, "front_kept": 3, "n": 3, "seconds": 1.5}
        for m, j in zip(METHODS, (2, 1))
    ]
    text = format_demo(
        {"seeds": [0, 1, 2], "objects": objects, "counts": counts, "agreement": agreement}
    )
    lines = text.splitlines()
    assert lines[1].split() == ["vanilla", "b4", "2/3", "3/3", "1.5"]
    assert lines[2].split() == ["ours/threestudio", "b4", "1/3", "3/3", "1.5"]
    assert lines[3] == "seed 0: vanilla b4 JANUS, ours/threestudio b4 ok (differ)"
    assert lines[4] == "seed 1: vanilla b4 JANUS, ours/threestudio b4 JANUS (agree)"
    assert lines[-1] == "the methods agree on seed(s) 1,2 and differ on 0"


def test_front_lost_alone_makes_seeds_differ() -> None:
    objects = _objects({5: [False, False]})
    objects[1]["front_kept"] = False
    assert seed_agreement(objects, [5]) == {"agree": [], "differ": [5]}


def test_resolve_seeds() -> None:
    assert resolve_seeds(3, None) == [0, 1, 2]
    assert resolve_seeds(2, 10) == [10, 11]
    assert resolve_seeds([7, 1], None) == [7, 1]
    default = resolve_seeds(None, None)
    assert len(default) >= 3 and default[0] == 0
    assert resolve_seeds(None, 100) == list(range(100, 100 + len(default)))
    with pytest.raises(UsageError, match="argument --first-seed"):
        resolve_seeds([1, 2], 4)


@pytest.mark.parametrize(
    "args, flag, value",
    [
        (["--seeds", "0"], "--seeds", "'0'"),
        (["--seeds", "3-1"], "--seeds", "'3-1'"),
        (["--seeds", "two"], "--seeds", "'two'"),
        (["--seeds", "1,1"], "--seeds", "given twice"),
        (["--first-seed", "-1"], "--first-seed", "'-1'"),
        (["--first-seed", "2", "--seeds", "0-3"], "--first-seed", "got 2"),
        (["--steps", "0"], "--steps", "'0'"),
        (["--bogus"], "--bogus", "--bogus"),
    ],
)
def test_bad_flags_exit_2_with_one_line(
    args: List[str], flag: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["demo", "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("threestudio-perpneg demo: error:")
    assert flag in err and value in err
    assert not (tmp_path / "o" / "demo.json").exists()


def test_out_that_is_a_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["demo", "--out", str(blocker), "--seeds", "1", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "argument --out" in err and str(blocker) in err and "expected a folder" in err


def test_missing_out_exits_2_through_python_m() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "threestudio_perpneg", "demo", "--seeds", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "--out" in proc.stderr and "required" in proc.stderr
    assert proc.stdout == ""


def _package_data() -> Dict[str, List[str]]:
    """setup.py's package_data literal (read, not run)."""
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "package_data":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no package_data")


def test_shipped_prior_is_package_data() -> None:
    """Every file of the demo's prior matches a package_data pattern (a wheel ships it)."""
    patterns = _package_data()["threestudio_perpneg.testbed"]
    package = REPO / "threestudio_perpneg/testbed"
    files = [p for p in PRIOR.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert {"model_index.json", "testbed.json"} <= {p.name for p in files}
    for path in files:
        parts = path.relative_to(package).parts
        assert any(
            len(pat.split("/")) == len(parts)
            and all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts, pat.split("/")))
            for pat in patterns
        ), path
