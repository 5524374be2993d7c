"""Testbed benchmark and calibration commands: plumbing on the shipped prior at tiny sizes.

The size of any method's effect belongs to the benchmark's output, never to a test: these check
that every key the issue names is written, that counts add up, and that bad input is one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("matplotlib")

from threestudio_perpneg.testbed.bench import BenchConfig, run_bench  # noqa: E402
from threestudio_perpneg.testbed.protocol3d import Protocol3DConfig  # noqa: E402
from threestudio_perpneg.testbed.table3d import MethodSpec, bench_methods  # noqa: E402

TINY = BenchConfig(seeds=2, steps3d=1, n2d=2, ddim_steps=2, n_curve=2, identity="troll")
BASE = Protocol3DConfig(steps=1, texture_size=8, ring_views=8)


def test_bench_writes_every_key_the_issue_names(tmp_path: Path) -> None:
    methods = [MethodSpec("vanilla", 1), MethodSpec("ours", 1, "authors")]
    lines: list = []
    report = run_bench(
        tmp_path / "b", TINY, methods=methods, base=BASE, progress=False, echo=lines.append
    )
    data = json.loads((tmp_path / "b" / "testbed.json").read_text())
    assert (
        data["prior_bias"]["front_fraction_noview"] == report["prior_bias"]["front_fraction_noview"]
    )
    for key in ("front_fraction_noview", "back_success_cfg", "side_success_cfg"):
        assert 0.0 <= data["prior_bias"][key] <= 1.0
    assert data["table2d"], "no 2D rows"
    for row in data["table2d"]:
        assert {"mode", "scheme", "view", "n", "successes", "identity_kept"} <= set(row)
        assert row["view"] in ("side", "back") and row["n"] == 2
        assert 0 <= row["successes"] <= row["n"] and 0 <= row["identity_kept"] <= row["n"]
    assert [(r["method"], r["batch"], r["scheme"]) for r in data["table3d"]] == [
        ("vanilla", 1, None),
        ("ours", 1, "authors"),
    ]
    for row in data["table3d"]:
        assert {
            "method",
            "batch",
            "scheme",
            "seeds",
            "janus",
            "front_kept",
            "view_accuracy",
            "unet_rows_per_step",
        } <= set(row)
        assert row["seeds"] == 2 and 0 <= row["janus"] <= 2 and 0 <= row["front_kept"] <= 2
        lo, hi = row["janus_ci95"]
        assert 0.0 <= lo <= row["janus"] / 2 <= hi <= 1.0
    assert (tmp_path / "b" / "rings.png").stat().st_size > 0
    assert (tmp_path / "b" / "curve2d.png").stat().st_size > 0
    weights = sorted({r["weight"] for r in data["curve2d"]})
    assert weights[-1] == 0.0 and weights[0] < 0 and all(r["n"] == 2 for r in data["curve2d"])
    text = "\n".join(lines)
    assert "prior bias" in text and "2D view success" in text and "3D" in text


def test_bench_methods_cover_the_issue_rows() -> None:
    rows = {(m.method, m.batch_size, m.scheme) for m in bench_methods()}
    for batch in (1, 4):
        assert ("vanilla", batch, None) in rows
        assert ("ours", batch, "threestudio") in rows and ("ours", batch, "authors") in rows
    assert any(m.method == "noview" for m in bench_methods())


def test_quick_config_is_smaller_everywhere() -> None:
    full, quick = BenchConfig(), BenchConfig.quick()
    assert full.seeds >= 16 and full.n2d >= 128
    for key in ("seeds", "steps3d", "n2d", "ddim_steps", "n_curve"):
        assert getattr(quick, key) < getattr(full, key)


def test_calibration_writes_points_from_problem_rows_only(tmp_path: Path) -> None:
    from threestudio_perpneg.testbed.calibrate import run_calibration

    report = run_calibration(
        tmp_path / "c",
        seeds=1,
        steps3d=1,
        n2d=2,
        ddim_steps=2,
        identities=["troll", "alien"],
        base=BASE,
        progress=False,
        echo=lambda s: None,
    )
    data = json.loads((tmp_path / "c" / "calibration.json").read_text())
    assert [p["identity"] for p in data["points"]] == ["troll", "alien"]
    for p in report["points"]:
        assert set(k for k in p if k.endswith("_janus")) == {"noview_janus", "vanilla_janus"}
        assert not any("ours" in k or "perpneg" in k for k in p)
    # alien's captions are the most reliable in the shipped knobs, troll's the least.
    rel = {p["identity"]: p["back_phrase_reliability"] for p in data["points"]}
    assert rel["alien"] > rel["troll"]
    assert (tmp_path / "c" / "calibration.png").stat().st_size > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--out", "FILE"], "is a file, expected a folder"),
        (["bench", "--out", "DIR", "--identity", "dog"], "identities: ['dog'] not in the prior's"),
        (["bench", "--out", "DIR", "--seeds", "0"], "--seeds"),
    ],
)
def test_bench_bad_input_is_one_line(tmp_path: Path, capsys, argv, message) -> None:
    from threestudio_perpneg.testbed.cli import main

    (tmp_path / "f").write_text("x")
    argv = [
        str(tmp_path / "f") if a == "FILE" else str(tmp_path / "d") if a == "DIR" else a
        for a in argv
    ]
    with pytest.raises(SystemExit) as exc:
        code = main(argv + ["--quiet", "--quick"])
        raise SystemExit(code)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
