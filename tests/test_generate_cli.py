"""Tests of the 2D sampler's command line (``python -m threestudio_perpneg generate`` / ``perpneg-2d``).

Everything runs on the session's tiny seeded random checkpoint (``tiny_sd_path``) at 64×64 with
3 denoising steps; one test builds the default tiny checkpoint itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from PIL import Image

from threestudio_perpneg import __main__ as package_main
from threestudio_perpneg.commands.generate import (
    GRID_NAME,
    IMAGES_DIR,
    SIDECAR_NAME,
    build_parser,
    main,
    run_generate,
)
from threestudio_perpneg.core.views import VIEW_NAMES, ViewThresholds, make_scheme, view_weights

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--height", "64", "--width", "64", "--steps", "3", "--no-progress"]
MODES = ["perpneg", "cebm", "sd"]
SEEDS = [0, 1]
#: The azimuth each view name stands for (front at 0, threestudio's convention).
VIEW_AZIMUTH = {"front": 0.0, "side": 90.0, "back": 180.0}


def _args(model: Path, out: Path, *extra: str) -> List[str]:
    return [*extra, "--model", str(model), "--out", str(out), *SMALL]


def _load(out: Path) -> Dict[str, Any]:
    return json.loads((out / SIDECAR_NAME).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def modes_run(tiny_sd_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    """Three modes × two seeds, a '|'-prompt with --weights plus a --negative."""
    out = tmp_path_factory.mktemp("gen-modes")
    argv = _args(
        tiny_sd_path,
        out,
        "a corgi | a hat",
        "--weights",
        "1 | -1.5",
        "--negative",
        "blurry:-0.5",
        "--modes",
        ",".join(MODES),
        "--seeds",
        "0-1",
    )
    result = run_generate(build_parser().parse_args(argv))
    return {"out": out, "result": result}


@pytest.fixture(scope="module")
def view_run(tiny_sd_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    out = tmp_path_factory.mktemp("gen-view")
    argv = _args(
        tiny_sd_path,
        out,
        "a corgi",
        "--view",
        "side,back",
        "--scheme",
        "authors",
        "--modes",
        "perpneg,sd",
    )
    assert main(argv) == 0
    return {"out": out, "result": _load(out)}


@pytest.fixture(scope="module")
def sweep_run(tiny_sd_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    out = tmp_path_factory.mktemp("gen-sweep")
    argv = _args(tiny_sd_path, out, "a corgi", "--sweep", "--azimuths", "45,135", "--seeds", "3")
    assert main(argv) == 0
    return {"out": out, "result": _load(out)}


# ------------------------------------------------------------------------------------ outputs
def test_writes_grid_images_and_sidecar(modes_run: Dict[str, Any]) -> None:
    from PIL import Image

    out: Path = modes_run["out"]
    result = modes_run["result"]
    assert _load(out) == result  # run_generate returns exactly the sidecar it wrote
    assert not [p.name for p in out.rglob("*.tmp")]

    names = sorted(p.name for p in (out / IMAGES_DIR).iterdir())
    assert names == sorted(f"{m}_seed{s}.png" for m in MODES for s in SEEDS)
    for rec in result["images"]:
        path = out / rec["file"]
        with Image.open(path) as img:
            assert img.size == (64, 64)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == rec["sha256"]

    g = result["grid"]
    assert (g["rows"], g["columns"]) == (len(MODES), len(SEEDS))
    assert g["tile_width"] == g["tile_height"] == 128  # 64 px upscaled ×2
    with Image.open(out / GRID_NAME) as grid:
        assert grid.size == (g["width"], g["height"])
        expected_w = g["label_width"] + len(SEEDS) * 128 + (len(SEEDS) - 1) * g["gap"]
        expected_h = g["label_height"] + len(MODES) * 128 + (len(MODES) - 1) * g["gap"]
        assert grid.size == (expected_w, expected_h)
        grid = grid.convert("RGB")
        # every tile is its image, upscaled, at (row, column)
        for rec in result["images"]:
            x = g["label_width"] + rec["column"] * (128 + g["gap"])
            y = g["label_height"] + rec["row"] * (128 + g["gap"])
            with Image.open(out / rec["file"]) as img:
                want = img.convert("RGB").resize((128, 128), Image.NEAREST)
            assert grid.crop((x, y, x + 128, y + 128)).tobytes() == want.tobytes()


def test_sidecar_records_settings_weights_and_versions(modes_run: Dict[str, Any]) -> None:
    result = modes_run["result"]
    s = result["settings"]
    assert s["main"] == "a corgi"
    assert s["extra_prompts"] == ["a hat", "blurry"]
    assert s["weights"] == [1.0, -1.5, -0.5]
    assert s["seeds"] == SEEDS and s["modes"] == MODES
    assert (s["steps"], s["guidance_scale"], s["height"], s["width"]) == (3, 7.5, 64, 64)
    assert s["device"] == "cpu" and s["dtype"] == "float32"
    assert {"torch", "diffusers", "transformers", "threestudio_perpneg"} <= set(result["versions"])
    assert result["versions"]["torch"] == torch.__version__
    by_mode = {b["mode"]: b for b in result["batches"]}
    perp = by_mode["perpneg"]["weights"]
    assert perp["positive"] == [["a corgi", 1.0]]
    assert perp["negative"] == [["a hat", -1.5], ["blurry", -0.5]]
    cebm = by_mode["cebm"]["weights"]
    assert cebm["negative"] == [] and len(cebm["positive"]) == 3
    sd = by_mode["sd"]["weights"]
    assert sd["uncond"] == "a hat, blurry" and "note" in sd
    for b in result["batches"]:
        assert b["unet_calls"] == [3]
    for rec in result["images"]:
        assert rec["weights"] == by_mode[rec["mode"]]["weights"]


def test_modes_give_one_row_each(modes_run: Dict[str, Any]) -> None:
    result = modes_run["result"]
    assert result["grid"]["row_labels"] == MODES
    assert result["grid"]["column_labels"] == [f"seed {s}" for s in SEEDS]
    for rec in result["images"]:
        assert rec["row"] == MODES.index(rec["mode"])
        assert rec["column"] == SEEDS.index(rec["seed"])
    out: Path = modes_run["out"]
    images = out / IMAGES_DIR
    assert (images / "perpneg_seed0.png").read_bytes() != (images / "sd_seed0.png").read_bytes()


# ------------------------------------------------------------------------------------- replay
def test_replay_regenerates_identical_pngs(modes_run: Dict[str, Any], tmp_path: Path) -> None:
    src: Path = modes_run["out"]
    out = tmp_path / "replay"
    assert main(["--replay", str(src / SIDECAR_NAME), "--out", str(out), "--no-progress"]) == 0
    for rec in modes_run["result"]["images"]:
        assert (out / rec["file"]).read_bytes() == (src / rec["file"]).read_bytes(), rec["name"]
    report = json.loads((out / "replay.json").read_text(encoding="utf-8"))
    assert report["replay"]["all_identical"] is True

    one = tmp_path / "one"
    argv = ["--replay", str(src / SIDECAR_NAME), "--replay-image", "cebm_seed1.png"]
    assert main([*argv, "--out", str(one), "--no-progress"]) == 0
    assert [p.name for p in (one / IMAGES_DIR).iterdir()] == ["cebm_seed1.png"]
    name = "cebm_seed1.png"
    assert (one / IMAGES_DIR / name).read_bytes() == (src / IMAGES_DIR / name).read_bytes()


# ---------------------------------------------------------------------------------------- views
def _check_view_record(
    weights: Dict[str, Any], prompt: str, scheme: str, az: float, mode: str = "perpneg"
) -> None:
    """The recorded view conditioning equals views.view_weights recomputed here."""
    vw = view_weights(
        torch.tensor([0.0], dtype=torch.float64),
        torch.tensor([az], dtype=torch.float64),
        make_scheme(scheme),
        ViewThresholds(),
    )
    rec = weights["view"]
    assert rec["azimuth"] == pytest.approx(az)
    assert rec["elevation"] == 0.0
    assert rec["view"] == VIEW_NAMES[int(vw.view[0])]
    assert rec["r"] == pytest.approx(float(vw.r[0]), abs=1e-5)
    for i, name in enumerate(VIEW_NAMES):
        assert rec["positive_mix"][name] == pytest.approx(float(vw.positive_mix[0, i]), abs=1e-5)
        assert rec["negative_weights"][name] == pytest.approx(
            float(vw.negative_weights[0, i]), abs=1e-5
        )
    expected_neg = {
        f"{prompt}, {name} view": pytest.approx(float(vw.negative_weights[0, i]), abs=1e-5)
        for i, name in enumerate(VIEW_NAMES)
        if float(vw.negative_weights[0, i]) != 0.0
    }
    if mode == "sd":  # the view negatives become the unconditional text, weights dropped
        assert weights["negative"] == []
        assert weights["uncond"] == ", ".join(expected_neg)
    else:
        assert dict((t, w) for t, w in weights["negative"]) == expected_neg


def test_view_mode_records_view_weights(view_run: Dict[str, Any]) -> None:
    result = view_run["result"]
    assert result["settings"]["view"] == ["side", "back"]
    assert result["settings"]["scheme"] == "authors"
    # rows: views × modes (the modes of one view are neighbours), one column (seed 0)
    rows = ["perpneg side", "sd side", "perpneg back", "sd back"]
    assert result["grid"]["row_labels"] == rows
    names = [f"{m}_{v}_seed0" for v in ("side", "back") for m in ("perpneg", "sd")]
    assert sorted(rec["name"] for rec in result["images"]) == sorted(names)
    for rec in result["images"]:
        assert rec["row"] == rows.index(f"{rec['mode']} {rec['view']}")
        assert rec["weights"]["view"]["scheme"] == "authors"
        az = VIEW_AZIMUTH[rec["view"]]
        _check_view_record(rec["weights"], "a corgi", "authors", az, rec["mode"])
        assert rec["weights"]["view"]["view"] == rec["view"]


def test_sweep_strip_records_each_azimuth(sweep_run: Dict[str, Any]) -> None:
    from PIL import Image

    out: Path = sweep_run["out"]
    result = sweep_run["result"]
    g = result["grid"]
    assert (g["rows"], g["columns"]) == (1, 2)
    assert g["column_labels"] == ["az 45", "az 135"]
    with Image.open(out / GRID_NAME) as grid:
        assert grid.size == (g["label_width"] + 2 * 128 + g["gap"], g["label_height"] + 128)
    assert sorted(rec["name"] for rec in result["images"]) == [
        "perpneg_az135_seed3",
        "perpneg_az45_seed3",
    ]
    for rec in result["images"]:
        assert rec["seed"] == 3
        _check_view_record(rec["weights"], "a corgi", "threestudio", rec["azimuth"])


# ------------------------------------------------------------------------------- default model
def test_default_tiny_model_via_package_main(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "out"
    argv = ["generate", "a corgi", "--out", str(out), "--seeds", "0", *SMALL]
    assert package_main.main(argv) == 0
    err = capsys.readouterr().err
    assert "RANDOM" in err and "noise" in err
    assert (out / "tiny-sd" / "model_index.json").is_file()
    result = _load(out)
    assert result["settings"]["random_model"] is True
    assert (out / IMAGES_DIR / "perpneg_seed0.png").is_file()


def test_tiny_model_runs_small_and_few_steps_unless_told(
    tiny_sd_path: Path, tmp_path: Path, capsys: Any
) -> None:
    out = tmp_path / "out"
    shutil.copytree(tiny_sd_path, out / "tiny-sd")  # reused as the tiny model: no build here
    assert main(["a corgi", "--out", str(out), "--seeds", "0", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "--steps 4 --height 64 --width 64" in err, err  # says what it chose
    s = _load(out)["settings"]
    assert (s["steps"], s["height"], s["width"]) == (4, 64, 64)
    with Image.open(out / IMAGES_DIR / "perpneg_seed0.png") as im:
        assert im.size == (64, 64)
    # told otherwise: the given values win and nothing is said about them
    out2 = tmp_path / "out2"
    shutil.copytree(tiny_sd_path, out2 / "tiny-sd")
    argv = ["a corgi", "--out", str(out2), "--seeds", "0", "--steps", "2", "--no-progress"]
    assert main([*argv, "--height", "32", "--width", "48"]) == 0
    assert "--steps" not in capsys.readouterr().err
    s = _load(out2)["settings"]
    assert (s["steps"], s["height"], s["width"]) == (2, 32, 48)


def test_help_shows_the_step_defaults() -> None:
    text = build_parser("perpneg-2d").format_help()
    assert "default: 50; 4 with the tiny random model" in " ".join(text.split())


@pytest.mark.parametrize("inside", [False, True], ids=["out-is-a-file", "out-inside-a-file"])
def test_out_that_is_or_is_inside_a_file_exits_2(inside: bool, tmp_path: Path, capsys: Any) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder", encoding="utf-8")
    out = blocker / "out" if inside else blocker
    assert main(["a corgi", "--out", str(out), *SMALL]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "argument --out:" in err and "is a file" in err, err
    assert blocker.read_text(encoding="utf-8") == "not a folder"


# ------------------------------------------------------------------------------------- errors
ERRORS = [
    (["a corgi | a hat", "--weights", "1 | -1 | -2"], "--weights"),
    (["a corgi", "--weights", "1 | -1"], "--weights"),
    (["a corgi", "--view", "left"], "--view"),
    (["a corgi", "--azimuth", "400"], "--azimuth"),
    (["a corgi", "--azimuth", "-181"], "--azimuth"),
    (["a corgi", "--sweep", "--azimuths", "0,720"], "--azimuths"),
    (["   "], "prompt"),
    (["a corgi | "], "prompt"),
    ([], "prompt"),
    (["a corgi", "--seeds", "7-0"], "--seeds"),
    (["a corgi", "--seeds", "a-b"], "--seeds"),
    (["a corgi", "--seeds=-3"], "--seeds"),
    (["a corgi", "--seeds", ""], "--seeds"),
    (["a corgi", "--negative", "a hat"], "--negative"),
    (["a corgi", "--negative", "a hat:0.5"], "--negative"),
    (["a corgi", "--negative", "a hat:lots"], "--negative"),
    (["a corgi", "--positive", "a hat:-1"], "--positive"),
    (["a corgi", "--view", "side", "--view-weights", "left=-1"], "--view-weights"),
    (["a corgi", "--view-weights", "front=-1"], "--view-weights"),
    (["a corgi", "--modes", "perpneg,foo"], "--modes"),
    (["a corgi", "--height", "65"], "--height"),
    (["--replay-image", "x"], "--replay-image"),
]


@pytest.mark.parametrize("argv,arg", ERRORS, ids=[" ".join(a) or "no-prompt" for a, _ in ERRORS])
def test_bad_input_exits_2_naming_the_argument(
    argv: List[str], arg: str, tmp_path: Path, capsys: Any
) -> None:
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"argument {arg}:" in err, err
    assert "Traceback" not in err
    assert not out.exists()  # nothing is written for bad input


def test_missing_model_folder_exits_2(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "out"
    missing = tmp_path / "no-such-model"
    assert main(["a corgi", "--model", str(missing), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "argument --model:" in err and str(missing) in err
    assert not out.exists()


def test_help_subprocess() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "threestudio_perpneg", "generate", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(REPO),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: threestudio-perpneg generate")
    for option in ("--weights", "--negative", "--view", "--modes", "--seeds", "--replay"):
        assert option in proc.stdout


def test_package_help_lists_generate(capsys: Any) -> None:
    with pytest.raises(SystemExit) as info:
        package_main.main(["--help"])
    assert info.value.code == 0
    assert "generate" in capsys.readouterr().out
