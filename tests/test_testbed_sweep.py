"""testbed sweep: plumbing at tiny sizes, the pre-declared hypothesis, 2D SDS and the projection.

Effect sizes belong to the sweep's output, never to a test: these check that every key the issue
names is written, that counts add up, that the hypothesis is evaluated exactly as declared, and
that the 2D SDS and projection pieces compute what they say.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("matplotlib")

from threestudio_perpneg.testbed import sweep as S  # noqa: E402
from threestudio_perpneg.testbed import sweep_merge as M  # noqa: E402
from threestudio_perpneg.testbed.prior import load_prior_path  # noqa: E402

TINY = S.SweepConfig(
    seeds=1,
    seeds_middle=1,
    steps3d=1,
    n2d=2,
    ddim_steps=2,
    n_sds2d=1,
    sds2d_steps=1,
    n_projection=2,
)


def _row(method, batch, scheme, janus, front, seeds=16, controls=None):
    return {
        "method": method,
        "batch": batch,
        "scheme": scheme,
        "controls": controls or {},
        "seeds": seeds,
        "janus": janus,
        "front_kept": front,
    }


def test_hypothesis_is_evaluated_as_declared() -> None:
    level = {
        "name": "a",
        "table3d": [
            _row("vanilla", 4, None, 10, 14),  # 0.625 Janus, 0.875 front
            _row("ours", 4, "threestudio", 5, 13),  # -0.3125 Janus, front -0.0625: holds
            _row("ours", 4, "authors", 2, 9),  # front -0.3125: fails
            _row("ours", 4, "threestudio", 0, 16, controls={"perp_neg_sampling": "one"}),
        ],
    }
    weak = {
        "name": "b",
        "table3d": [_row("vanilla", 4, None, 7, 16), _row("ours", 4, "threestudio", 0, 16)],
    }
    small = {
        "name": "c",
        "table3d": [_row("vanilla", 4, None, 10, 16), _row("ours", 4, "authors", 6, 16)],
    }
    out = S.evaluate_hypothesis([level, weak, small])
    assert out["holds"] is True and out["levels"] == ["a"]
    by = {(d["level"], d["scheme"]): d["holds"] for d in out["detail"]}
    assert by == {
        ("a", "threestudio"): True,
        ("a", "authors"): False,
        ("b", "threestudio"): False,  # vanilla Janus 7/16 < 0.5
        ("c", "authors"): False,  # lowered by 0.25 only
    }
    assert S.evaluate_hypothesis([weak, small])["holds"] is False


def _priors(tmp_path: Path, names) -> Path:
    folder = tmp_path / "priors"
    folder.mkdir()
    for name in names:
        (folder / name).symlink_to(load_prior_path(), target_is_directory=True)
    return folder


def test_sweep_writes_every_key_the_issue_names(tmp_path: Path) -> None:
    priors = _priors(tmp_path, ["p15", "p35"])
    lines: list = []
    S.run_sweep(
        tmp_path / "s",
        TINY,
        levels=["p15", "p35"],
        priors=priors,
        progress=False,
        echo=lines.append,
    )
    data = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert [lv["name"] for lv in data["levels"]] == ["p15", "p35"]
    for lv in data["levels"]:
        assert {
            "name",
            "p_back_given_back_phrase",
            "p_side_given_side_phrase",
            "prior",
            "bias",
            "sanity",
            "table2d",
            "table3d",
            "projection",
        } <= set(lv)
        assert 0 < lv["p_back_given_back_phrase"] < lv["p_side_given_side_phrase"] < 1
        for key in ("sds2d_front", "front_cameras_3d"):
            ok, n = lv["sanity"][key]
            assert 0 <= ok <= n == 1
        assert {r["t"] for r in lv["projection"]} == {200, 500, 800}
        assert all(r["perp_over_pos"] >= 0 for r in lv["projection"])
        labels = [r["label"] for r in lv["table3d"]]
        assert labels[:5] == [m.label for m in S.SWEEP_METHODS]
        for row in lv["table3d"]:
            lo, hi = row["janus_ci95"]
            assert 0.0 <= lo <= row["janus"] / row["seeds"] <= hi <= 1.0
        assert (tmp_path / "s" / f"rings_{lv['name']}.png").stat().st_size > 0
    # The family's middle levels (p35 of p15..p80) also have the built-in and batch-1 rows; its
    # ends (p15) have the five sweep rows only.
    end, middle = data["levels"]
    assert len(end["table3d"]) == len(S.SWEEP_METHODS)
    assert {r["method"] for r in middle["table3d"][len(S.SWEEP_METHODS) :]} == {
        "threestudio-builtin",
        "vanilla",
        "ours",
    }
    assert {r["batch"] for r in middle["table3d"][len(S.SWEEP_METHODS) :]} >= {1}
    assert {"holds", "levels", "text"} <= set(data["hypothesis"])
    assert {"clean_view_accuracy", "hard_negative_none_rate", "n_clean", "n_hard"} <= set(
        data["classifier"]
    )
    assert data["settings"]["sweep"]["seeds"] == 1
    for pic in ("sweep.png", "sweep2d.png"):
        assert (tmp_path / "s" / pic).stat().st_size > 0
    assert any("hypothesis" in line for line in lines)

    # Measured apart, then merged: one run per level gives back the same sweep.
    runs = []
    for k, lv in enumerate(reversed(data["levels"])):
        run = tmp_path / f"run{k}"
        run.mkdir()
        (run / "sweep.json").write_text(json.dumps({**data, "levels": [lv]}))
        (run / f"rings_{lv['name']}.png").write_bytes(b"png of " + lv["name"].encode())
        runs.append(run)
    merged = M.merge_sweeps(tmp_path / "m", runs, echo=lines.append)
    assert [lv["name"] for lv in merged["levels"]] == ["p15", "p35"]  # ordered by P(back | ..)
    for lv, orig in zip(merged["levels"], data["levels"]):
        (block,) = lv.pop("seed_runs")
        assert block["first_seed"] == 0 and block["seeds"] == 1
        assert lv == orig
    assert "seeds" not in merged["settings"]["sweep"]  # sizes live in each level's seed_runs
    assert merged["hypothesis"] == data["hypothesis"]
    assert merged["settings"]["merged_from"] == [str(r) for r in runs]
    assert (tmp_path / "m" / "rings_p15.png").read_bytes() == b"png of p15"
    for pic in ("sweep.png", "sweep2d.png"):
        assert (tmp_path / "m" / pic).stat().st_size > 0
    with pytest.raises(ValueError, match="level 'p15' is measured twice on the same seeds"):
        M.merge_sweeps(tmp_path / "m2", [runs[1], runs[1]])
    other = tmp_path / "other"
    other.mkdir()
    changed = {
        **data,
        "settings": {**data["settings"], "sweep": {**data["settings"]["sweep"], "steps3d": 9}},
    }
    (other / "sweep.json").write_text(json.dumps(changed))
    with pytest.raises(ValueError, match="other sweep settings"):
        M.merge_sweeps(tmp_path / "m3", [runs[0], other])


def test_one_level_on_disjoint_seeds_merges_to_the_run_over_all_seeds(tmp_path: Path) -> None:
    """Seeds 0-1 measured as [0] + [1] give the 3D rows one run over [0, 1] gives; 2D counts add."""
    from dataclasses import replace

    from threestudio_perpneg.eval.stats import wilson_interval

    priors = _priors(tmp_path, ["p15"])
    two = replace(TINY, seeds=2, seeds_middle=2, n_sds2d=2)
    whole = S.run_sweep(
        tmp_path / "whole", two, levels=["p15"], priors=priors, progress=False, echo=print
    )["levels"][0]
    for k in (0, 1):
        S.run_sweep(
            tmp_path / f"part{k}",
            replace(TINY, first_seed=k),
            levels=["p15"],
            priors=priors,
            progress=False,
            echo=print,
        )
    lines: list = []
    runs = [tmp_path / "part1", tmp_path / "part0"]
    merged = M.merge_sweeps(tmp_path / "m", runs, echo=lines.append)["levels"][0]
    parts = [json.loads((r / "sweep.json").read_text())["levels"][0] for r in runs]
    assert [b["first_seed"] for b in merged["seed_runs"]] == [1, 0]
    assert merged["sanity"]["front_cameras_3d"] == whole["sanity"]["front_cameras_3d"]
    assert [r["label"] for r in merged["table3d"]] == [r["label"] for r in whole["table3d"]]
    for got, ref in zip(merged["table3d"], whole["table3d"]):
        for key in ("seeds", "janus", "front_kept", "janus_ci95", "front_kept_ci95"):
            assert got[key] == ref[key], (got["label"], key)
        for key in ("identity_agreement", "unet_rows_per_step"):
            assert got[key] == pytest.approx(ref[key], abs=1e-9)
        assert got["view_accuracy"] == pytest.approx(ref["view_accuracy"], abs=1e-9)
    for got, a, b in zip(merged["table2d"], parts[0]["table2d"], parts[1]["table2d"]):
        assert got["n"] == a["n"] + b["n"] == 2 * TINY.n2d
        assert got["successes"] == a["successes"] + b["successes"]
        assert sum(got["view_counts"].values()) == got["n"]
        assert got["interval"] == list(wilson_interval(got["successes"], got["n"]))
    for got, a, b in zip(merged["projection"], parts[0]["projection"], parts[1]["projection"]):
        assert got["n"] == 2 * TINY.n_projection
        assert got["perp_over_pos"] == pytest.approx(
            (a["perp_over_pos"] + b["perp_over_pos"]) / 2, abs=1e-4
        )
    assert merged["sanity"]["sds2d_front"][1] == 2
    assert (tmp_path / "m" / "rings_p15.png").read_bytes() == (
        tmp_path / "part0" / "rings_p15.png"
    ).read_bytes()  # the rings of the first seeds
    # Merged again with a third block: blocks may not overlap the ones already merged.
    with pytest.raises(ValueError, match="measured twice on the same seeds"):
        M.merge_sweeps(tmp_path / "m2", [tmp_path / "m", tmp_path / "whole"])


def test_missing_level_prior_is_one_line(tmp_path: Path, capsys) -> None:
    from threestudio_perpneg.testbed.cli import main

    priors = _priors(tmp_path, ["p15"])
    code = main(
        ["sweep", "--out", str(tmp_path / "o"), "--priors", str(priors), "--levels", "p15", "p80"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "--priors: no prior for level 'p80'" in err[0] and "train-levels" in err[0]
    assert not (tmp_path / "o").exists()  # fails before measuring anything
    code = main(["sweep", "--out", str(tmp_path / "o"), "--levels", "p99"])
    assert code == 2 and "unknown level 'p99'" in capsys.readouterr().err


class _Reads:
    """A stand-in classifier that reads every image as the given view (used only for counting)."""

    def __init__(self, view: str) -> None:
        self.view = view

    def classify(self, images):
        n = images.shape[0]
        return type("C", (), {"views": [self.view] * n, "identities": ["troll"] * n})()


def test_sds2d_moves_the_free_image_towards_the_prior_and_counts(tmp_path: Path) -> None:
    from threestudio_perpneg.core.text import text_embeddings
    from threestudio_perpneg.engines.pixel import PerpNegIFEngine, load_deepfloyd_if
    from threestudio_perpneg.testbed.sds2d import SDS2DConfig, run_sds2d, sds2d_success

    prior = load_prior_path()
    engine = PerpNegIFEngine(*load_deepfloyd_if(prior))
    emb = text_embeddings(prior, ["a cartoon troll head", ""], None, use_cache=False)
    cfg = SDS2DConfig(steps=3)
    a = run_sds2d(engine, emb["a cartoon troll head"], emb[""], [0, 1], _Reads("front"), cfg)
    assert a.images.shape == (2, 3, 16, 16) and bool(((a.images >= 0) & (a.images <= 1)).all())
    assert not torch.allclose(a.images, torch.full_like(a.images, 0.5))  # moved from grey
    alone = run_sds2d(engine, emb["a cartoon troll head"], emb[""], [1], _Reads("front"), cfg)
    assert torch.allclose(alone.images[0], a.images[1], atol=1e-4)  # seeds independent
    assert sds2d_success(a, "front", "troll") == [2, 2]
    assert sds2d_success(a, "back") == [0, 2]
    with pytest.raises(ValueError, match="min_step_percent/max_step_percent"):
        SDS2DConfig(min_step_percent=0.7, max_step_percent=0.6)


def test_projection_parts_agree_with_each_other() -> None:
    """‖⊥(a, b)‖ / ‖b‖ = ‖a‖ / ‖b‖ · sin∠(a, b) for one image (the parts are computed apart)."""
    from threestudio_perpneg.testbed.projection import projection_ratios

    rows = projection_ratios(load_prior_path(), "troll", timesteps=(500,), n=1)
    assert len(rows) == 1 and rows[0]["t"] == 500 and rows[0]["n"] == 1
    r = rows[0]
    expected = r["front_over_pos"] * (1 - r["cos_front_pos"] ** 2) ** 0.5
    assert r["perp_over_pos"] == pytest.approx(expected, abs=0.005)


def test_sweep_title_names_the_seeds_of_each_level_when_they_differ() -> None:
    from threestudio_perpneg.testbed.sweep_plots import _seeds_title

    def level(name: str, seeds: int) -> dict:
        return {"name": name, "table3d": [_row("noview", 4, None, 0, 0, seeds=seeds)]}

    assert _seeds_title([level("p15", 16), level("p55", 16)]) == "16 seeds per point"
    assert _seeds_title([level("p15", 4), level("p55", 16)]) == "seeds per point: p15 4, p55 16"
