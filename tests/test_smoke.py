"""Tests of the smoke command / 2D Perp-Neg SDS playground (``python -m threestudio_perpneg smoke``)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

from threestudio_perpneg.__main__ import main
from threestudio_perpneg.commands.smoke import (
    LABEL_HEIGHT,
    MIN_TILE,
    SmokeError,
    build_parser,
    run_smoke,
)
from threestudio_perpneg.core.views import ViewThresholds, make_scheme, view_weights

REPO = Path(__file__).resolve().parents[1]
AZIMUTHS = [0.0, 90.0, 180.0]
EXPECTED_VIEWS = {0.0: "front", 90.0: "side", 180.0: "back"}
USER_NEGATIVES = ["a hat:-1.5", "blurry:0"]  # the zero-weight one is never evaluated
NOISE_NOTE = "the tiles are noise because the model is random"


def _run(tmp: Path, **overrides: Any) -> Dict[str, Any]:
    opts: Dict[str, Any] = {"steps": 2, "azimuths": AZIMUTHS, "out": str(tmp)}
    opts.update(overrides)
    return run_smoke(**opts)


def _losses(result: Dict[str, Any]) -> List[Any]:
    return [s["loss"] for s in result["steps"]] + [a["losses"] for a in result["azimuths"]]


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def _expected_branches(
    azimuths: List[float], elevation: float, n_user_nonzero: int, scheme: str = "threestudio"
) -> List[int]:
    """2 + non-zero view negatives (from view_weights) + non-zero user negatives, per sample."""
    az = torch.tensor(azimuths)
    vw = view_weights(torch.full_like(az, elevation), az, make_scheme(scheme), ViewThresholds())
    return [2 + int((row != 0).sum()) + n_user_nonzero for row in vw.negative_weights]


@pytest.fixture(scope="module")
def smoke_run(tiny_sd_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    out = tmp_path_factory.mktemp("smoke")
    return _run(out, model=str(tiny_sd_path), perp_neg_prompt=USER_NEGATIVES)


def test_outputs_written(smoke_run: Dict[str, Any], tiny_sd_path: Path) -> None:
    from PIL import Image

    out = Path(smoke_run["settings"]["args"]["out"])
    grid = out / "grid.png"
    assert grid.is_file()
    with Image.open(grid) as img:
        size = img.size
    tile = smoke_run["grid"]["tile"]
    assert tile >= MIN_TILE and tile % 64 == 0
    assert size == (len(AZIMUTHS) * tile, tile + LABEL_HEIGHT) == (384, 128 + LABEL_HEIGHT)
    on_disk = json.loads((out / "smoke.json").read_text(encoding="utf-8"))
    assert on_disk == smoke_run
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert list((out / "cache").glob("*.safetensors"))  # embeddings went through the cache
    versions = smoke_run["settings"]["versions"]
    assert {"torch", "diffusers", "transformers"} <= set(versions)
    assert smoke_run["settings"]["model"] == str(tiny_sd_path)
    assert smoke_run["settings"]["model_source"] == "--model"


def test_views_mix_and_weights(smoke_run: Dict[str, Any]) -> None:
    reports = smoke_run["azimuths"]
    assert [r["azimuth"] for r in reports] == AZIMUTHS
    assert [r["view"] for r in reports] == [EXPECTED_VIEWS[a] for a in AZIMUTHS]
    az = torch.tensor(AZIMUTHS)
    vw = view_weights(torch.zeros_like(az), az, make_scheme("threestudio"))
    for i, rep in enumerate(reports):
        assert set(rep["positive_mix"]) == {"side", "front", "back", "overhead"}
        assert math.isclose(sum(rep["positive_mix"].values()), 1.0, abs_tol=1e-6)
        assert rep["r"] == pytest.approx(float(vw.r[i]))
        assert list(rep["negative_weights"]["views"].values()) == pytest.approx(
            vw.negative_weights[i].tolist()
        )
        assert rep["negative_weights"]["user"] == [
            {"prompt": "a hat", "weight": -1.5},
            {"prompt": "blurry", "weight": 0.0},
        ]
    assert reports[0]["positive_mix"]["front"] == pytest.approx(1.0)
    assert reports[1]["positive_mix"]["side"] == pytest.approx(1.0)
    assert reports[2]["positive_mix"]["back"] == pytest.approx(1.0)


def test_branch_counts(smoke_run: Dict[str, Any]) -> None:
    expected = _expected_branches(AZIMUTHS, 0.0, n_user_nonzero=1)
    assert [r["unet_branches"] for r in smoke_run["azimuths"]] == expected
    for rep in smoke_run["azimuths"]:
        assert "blurry" not in rep["negatives_evaluated"]
        assert rep["unet_branches"] == 2 + len(rep["negatives_evaluated"])
    assert len(smoke_run["steps"]) == 2
    for step in smoke_run["steps"]:
        assert step["unet_branches"] == step["unet_branches_evaluated"] == sum(expected)
    assert smoke_run["unet_calls"] == 2  # one batched UNet call per step


def test_losses_finite_and_consistent(smoke_run: Dict[str, Any]) -> None:
    for i, step in enumerate(smoke_run["steps"]):
        assert isinstance(step["loss"], float) and math.isfinite(step["loss"])
        per_azimuth = [a["losses"][i] for a in smoke_run["azimuths"]]
        assert all(isinstance(x, float) and math.isfinite(x) for x in per_azimuth)
        # sds_step's loss is the batch mean of the per-sample losses.
        assert step["loss"] == pytest.approx(sum(per_azimuth) / len(per_azimuth), rel=1e-4)
    for rep in smoke_run["azimuths"]:
        assert rep["final_loss"] == rep["losses"][-1]
        assert all(20 <= t <= 980 for t in rep["timesteps"])


def test_same_seed_same_losses(
    smoke_run: Dict[str, Any], tiny_sd_path: Path, tmp_path: Path
) -> None:
    again = _run(tmp_path, model=str(tiny_sd_path), perp_neg_prompt=USER_NEGATIVES)
    assert _losses(again) == _losses(smoke_run)
    on_disk = json.loads((tmp_path / "smoke.json").read_text(encoding="utf-8"))
    assert _losses(on_disk) == _losses(smoke_run)


def test_overhead_has_no_view_negatives(tiny_sd_path: Path, tmp_path: Path) -> None:
    result = _run(tmp_path, model=str(tiny_sd_path), azimuths=[0.0, 180.0], elevation=75.0)
    assert _expected_branches([0.0, 180.0], 75.0, n_user_nonzero=0) == [2, 2]
    for rep in result["azimuths"]:
        assert rep["view"] == "overhead"
        assert rep["unet_branches"] == 2
        assert rep["positive_mix"]["overhead"] == 1.0
        assert set(rep["negative_weights"]["views"].values()) == {0.0}
        assert rep["negatives_evaluated"] == []
    assert [s["unet_branches"] for s in result["steps"]] == [4, 4]


def test_no_perp_neg_is_plain_cfg(
    tiny_sd_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = _run(
        tmp_path, model=str(tiny_sd_path), steps=1, no_perp_neg=True, perp_neg_prompt=["hat:-1"]
    )
    # A --model run is not the random tiny model: no noise note.
    assert NOISE_NOTE not in capsys.readouterr().err
    assert result["settings"]["random_model"] is False
    assert [r["unet_branches"] for r in result["azimuths"]] == [2, 2, 2]
    assert result["steps"][0]["unet_branches"] == 6
    assert [max(r["positive_mix"], key=r["positive_mix"].get) for r in result["azimuths"]] == [
        EXPECTED_VIEWS[a] for a in AZIMUTHS
    ]


def test_builds_and_reuses_tiny_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = _run(tmp_path)
    assert first["settings"]["model_source"] == "tiny (built)"
    captured = capsys.readouterr()
    assert NOISE_NOTE in captured.err and str(tmp_path / "tiny-sd") in captured.err
    assert "the tiles are noise" in captured.out  # repeated under the summary
    assert first["settings"]["random_model"] is True
    assert first["settings"]["model"] == str((tmp_path / "tiny-sd").absolute())
    assert (tmp_path / "tiny-sd" / "unet").is_dir()
    assert [r["view"] for r in first["azimuths"]] == [EXPECTED_VIEWS[a] for a in AZIMUTHS]
    assert all(math.isfinite(s["loss"]) for s in first["steps"])
    assert (tmp_path / "grid.png").is_file()

    # Second run reuses the checkpoint; each azimuth has its own generator, so the front view's
    # first step does not depend on which other azimuths share the batch.
    second = _run(tmp_path, azimuths=[0.0], steps=1)
    assert second["settings"]["model_source"] == "tiny (reused)"
    assert NOISE_NOTE in capsys.readouterr().err  # said on every run, also when reused
    assert second["azimuths"][0]["timesteps"][0] == first["azimuths"][0]["timesteps"][0]
    assert second["azimuths"][0]["losses"][0] == pytest.approx(
        first["azimuths"][0]["losses"][0], rel=1e-4
    )


def test_missing_model_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no" / "such-model"
    code = main(["smoke", "--model", str(missing), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0
    assert "--model" in err and str(missing) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SmokeError, match="--model"):
        run_smoke(model=str(missing), out=str(tmp_path / "out"))


def test_missing_model_path_subprocess(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    proc = subprocess.run(
        [sys.executable, "-m", "threestudio_perpneg", "smoke", "--model", str(missing)],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "--model" in proc.stderr and str(missing) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "smoke_out" / "tiny-sd").exists()


def test_help_lists_subcommands() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "threestudio_perpneg", "--help"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "smoke" in proc.stdout and "link" in proc.stdout


def test_parser_and_overrides() -> None:
    ns = build_parser().parse_args(["--perp-neg-prompt", "a:b:-1", "c:0", "--azimuths", "-30"])
    assert ns.perp_neg_prompt == [("a:b", -1.0), ("c", 0.0)]
    assert ns.azimuths == [-30.0]
    for bad in (["--perp-neg-prompt", "hat:1"], ["--perp-neg-prompt", "hat"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(bad)
    with pytest.raises(TypeError, match="unknown option"):
        run_smoke(stepz=3)
    with pytest.raises(SmokeError, match="--perp-neg-prompt"):
        run_smoke(perp_neg_prompt=[("hat", 2.0)])
    with pytest.raises(SmokeError, match="--elevation"):
        run_smoke(elevation=120.0)
