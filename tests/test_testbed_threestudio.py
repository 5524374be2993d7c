"""``testbed threestudio``: the testbed through threestudio's own dreamfusion-system on CPU.

The threestudio tier trains a few steps of the shipped config through the real system, renders the
ring with threestudio's test step and checks what the runner reports against what it rendered; the
other tests (always run) check the command's errors and the shipped config's GPU parts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from threestudio_perpneg.testbed.ts_dreamfusion import (
    ThreestudioRunConfig,
    default_config_path,
    method_overrides,
)

REPO = Path(__file__).resolve().parents[1]
PRIOR = REPO / "benchmarks" / "results" / "testbed-sweep-6000" / "priors" / "p35"


def _main(argv):
    from threestudio_perpneg.__main__ import main

    return main(["testbed", "threestudio", *argv])


def test_without_threestudio_root_the_command_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("THREESTUDIO_ROOT", raising=False)
    assert _main(["--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "THREESTUDIO_ROOT" in err and "\n" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "argv,needles",
    [
        (["--prior", "nowhere"], ["--prior", "nowhere", "testbed.json"]),
        (["--config", "missing.yaml"], ["--config", "missing.yaml"]),
        (["--seeds", "3-1"], ["--seeds"]),
        (["--method", "vanilla", "--sampling", "one"], ["sampling", "'ours'"]),
        (["--method", "ours", "--eval-prob", "0"], ["eval_prob", "0 < p <= 1"]),
        (["--set", "nokeyvalue"], ["overrides", "nokeyvalue"]),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    argv, needles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("THREESTUDIO_ROOT", str(tmp_path))  # checked before any import
    assert _main(["--out", str(tmp_path / "o"), "--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


def test_methods_are_the_one_key_switches_a_user_sets() -> None:
    g = "system.guidance"
    cfg = ThreestudioRunConfig(method="noview")
    assert method_overrides(cfg) == [
        f"{g}.use_perp_neg=false",
        f"{g}.view_dependent_prompting=false",
    ]
    assert method_overrides(ThreestudioRunConfig(method="vanilla")) == [f"{g}.use_perp_neg=false"]
    ours = ThreestudioRunConfig(method="ours", scheme="authors", sampling="one", eval_prob=0.5)
    assert method_overrides(ours) == [
        f"{g}.use_perp_neg=true",
        f"{g}.perp_neg_scheme=authors",
        f"{g}.perp_neg_sampling=one",
        f"{g}.perp_neg_eval_prob=0.5",
    ]
    assert ours.label == "ours/authors one p=0.5"


def test_the_shipped_config_is_a_gpu_threestudio_config() -> None:
    """The YAML keeps threestudio's CUDA parts (hash grid) for launch.py; only the CPU runner
    swaps them. Its cameras are the prior's training cameras."""
    cfg = yaml.safe_load(default_config_path().read_text())
    assert cfg["system_type"] == "dreamfusion-system"
    assert cfg["system"]["guidance_type"] == "perpneg-deep-floyd-guidance"
    assert cfg["system"]["prompt_processor_type"] == "perpneg-prompt-processor"
    assert cfg["system"]["geometry"]["pos_encoding_config"]["otype"] == "ProgressiveBandHashGrid"
    data = json.loads((PRIOR / "testbed.json").read_text())["dataset"]
    assert list(cfg["data"]["camera_distance_range"]) == data["camera_distance_range"]
    assert list(cfg["data"]["fovy_range"]) == [data["fovy_deg"]] * 2
    assert list(cfg["data"]["elevation_range"]) == data["elevation_range_deg"]
    assert cfg["system"]["background"]["color"] == [data["background"]] * 3
    # Renders at twice the prior's resolution: the guidance's bilinear 2x resize is an area mean.
    unet = json.loads((PRIOR / "unet" / "config.json").read_text())
    assert cfg["data"]["width"] == cfg["data"]["height"] == 2 * unet["sample_size"]
    assert cfg["data"]["n_test_views"] == 13  # 0..360 inclusive: 12 views and the repeat


@pytest.mark.threestudio
@pytest.mark.parametrize("method,rows", [("vanilla", 2), ("ours", None)])
def test_runner_trains_through_dreamfusion_system_and_scores_threestudios_ring(
    method: str, rows, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from threestudio_support.fixtures import require_threestudio

    require_threestudio(allow_module_level=False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    argv = ["--out", str(out), "--method", method, "--seeds", "0", "--steps", "3"]
    argv += ["--batch-size", "1", "--quiet", "--attempt-log", str(tmp_path / "attempts.json")]
    argv += ["--set", "system.renderer.num_samples_per_ray=16"]
    assert _main(argv) == 0, capsys.readouterr().err
    report = json.loads((out / "results.json").read_text())
    row, (obj,) = report["row"], report["objects"]
    assert (row["method"], row["batch"], row["seeds"]) == (method, 1, 1)
    assert report["settings"]["seeds"] == [0] and report["settings"]["steps"] == 3
    assert report["command"][:5] == [
        "python",
        "-m",
        "threestudio_perpneg",
        "testbed",
        "threestudio",
    ]
    assert len(obj["labels"]) == 12
    assert set(obj["labels"]) <= {"front", "side", "back", "none"}
    assert row["janus"] == int(obj["janus"]) and row["front_kept"] == int(obj["front_kept"])
    assert 0 <= row["janus_ci95"][0] <= row["janus_ci95"][1] <= 1
    # UNet rows: vanilla evaluates uncond + view prompt; Perp-Neg adds its negatives (>= 1).
    if rows is not None:
        assert obj["unet_rows_per_step"] == rows
    else:
        assert obj["unet_rows_per_step"] > 2
    # threestudio's own test step wrote the 13 ring PNGs the runner scored (the last repeats 0).
    saved = list(out.glob("objects/seed0/outputs/**/it3-test/*.png"))
    assert len(saved) == 13
    assert (out / "rings.png").stat().st_size > 0
    (attempt,) = json.loads((tmp_path / "attempts.json").read_text())["attempts"]
    assert attempt["row"]["label"] == row["label"] and attempt["labels"]["0"] == obj["labels"]
    assert os.environ.get("THREESTUDIO_ROOT")
