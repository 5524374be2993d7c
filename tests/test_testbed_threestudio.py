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
PRIOR = REPO / "threestudio_perpneg" / "testbed" / "assets" / "priors-6000" / "p35"


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


def _block(
    root: Path,
    level: str,
    row: str,
    block: str,
    *,
    method: str,
    seeds,
    janus,
    front,
    scheme=None,
    **settings,
) -> None:
    from threestudio_perpneg.common.io import write_json_atomic

    n = len(seeds)
    base = {
        "config": "c.yaml",
        "identity": "troll",
        "steps": 600,
        "cpu_frequencies": 6,
        "cpu_masking_steps": 0,
        "cpu_neurons": 64,
        "cpu_hidden_layers": 2,
        "cpu_lr": 0.05,
        "ring_views": 12,
        "prior": f"priors/{level}",
        "seeds": list(seeds),
    }
    row_ = {
        "method": method,
        "batch": 4,
        "scheme": scheme,
        "controls": {},
        "label": method,
        "seeds": n,
        "janus": janus,
        "front_kept": front,
        "view_accuracy": {"front": 1.0, "side": 0.0, "back": 0.0},
        "identity_agreement": 1.0,
        "unet_rows_per_step": 8.0,
        "seconds": 10.0,
        "seconds_per_step": 0.2,
    }
    write_json_atomic(
        root / level / row / block / "results.json",
        {"row": row_, "settings": {**base, **settings}, "objects": [], "command": ["x", block]},
    )


def test_table_joins_blocks_sums_counts_and_evaluates_the_declared_hypothesis(tmp_path) -> None:
    from threestudio_perpneg.testbed.ts_table import collect, format_table

    root = tmp_path / "t"
    _block(root, "p35", "vanilla", "s0-3", method="vanilla", seeds=[0, 1, 2, 3], janus=4, front=4)
    _block(root, "p35", "vanilla", "s4-7", method="vanilla", seeds=[4, 5, 6, 7], janus=3, front=4)
    _block(
        root,
        "p35",
        "ours",
        "s0-7",
        method="ours",
        scheme="threestudio",
        seeds=list(range(8)),
        janus=1,
        front=8,
    )
    _block(
        root, "p35", "sanity-front", "s0-3", method="noview", seeds=[0, 1, 2, 3], janus=0, front=4
    )
    rep = collect(root)
    (lv,) = rep["levels"]
    assert lv["name"] == "p35" and lv["prior"] == "priors/p35"
    rows = {r["row"]: r for r in lv["table3d"]}
    assert set(rows) == {"vanilla", "ours"}
    van = rows["vanilla"]
    assert (van["seeds"], van["janus"], van["front_kept"]) == (8, 7, 8)
    assert van["seed_list"] == list(range(8))
    # Wilson 95 % for 7/8 by hand: centre (7 + 1.92)/(8 + 3.84), half-width 1.96·√(...)/(...)
    z = 1.959964
    p, n = 7 / 8, 8
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    assert van["janus_ci95"] == pytest.approx([centre - half, centre + half], abs=1e-3)
    assert lv["sanity"]["sanity-front"]["front_kept"] == [4, 4]
    # vanilla 7/8 >= 0.5, ours 1/8 <= 7/8 - 0.3, front 8/8 >= 8/8 - 0.1: holds at p35.
    assert rep["hypothesis"]["holds"] and rep["hypothesis"]["levels"] == ["p35"]
    assert json.loads((root / "results.json").read_text())["levels"][0]["name"] == "p35"
    assert "hypothesis holds at p35" in format_table(rep)
    assert len(rep["commands"]) == 4

    _block(root, "p35", "vanilla", "again", method="vanilla", seeds=[7, 8], janus=1, front=1)
    with pytest.raises(ValueError, match="repeats seeds"):
        collect(root)
    (root / "p35" / "vanilla" / "again" / "results.json").unlink()
    _block(root, "p55", "vanilla", "s0", method="vanilla", seeds=[0], janus=0, front=1, steps=9)
    with pytest.raises(ValueError, match=r"differs from .* in \['steps'\]"):
        collect(root)
