"""The Perp-Neg reproduction sweep (Hydra app, ``threestudio_perpneg.eval.sweep``).

Config composition (Hydra compose API), the job list (cartesian product, threestudio commands,
dry run), resumability with done-markers, launcher configs (joblib / submitit, when installed), the
Hydra app end to end with a stand-in ``launch.py`` in a temporary "threestudio checkout", the
report, and bad inputs. threestudio itself is never run: 3D jobs use either a fake of
``subprocess.run`` or a small ``launch.py`` script that writes a trial folder the way threestudio
lays it out (configs/parsed.yaml, save/it<N>-test/<i>.png).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

pytest.importorskip("hydra", reason="hydra-core is not installed (pip install hydra-core)")

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.errors import ConfigCompositionException, MissingConfigException  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from threestudio_perpneg.eval.sweep import app, gpus, settings  # noqa: E402
from threestudio_perpneg.eval.sweep.app import (  # noqa: E402
    CONF_DIR,
    SweepError,
    gpu_for_slot,
    load_settings,
    parse_seeds,
    plan_jobs,
    run_sweep,
)

N_VIEWS = 8
PY = sys.executable


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def compose_cfg(*overrides: str, hydra_cfg: bool = False) -> Any:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="test"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_cfg)


def small(tmp_path: Path, *extra: str) -> List[str]:
    """Overrides of a small sweep writing under tmp_path (2 prompts x 2 seeds)."""
    return [
        f"out_dir={tmp_path / 'sweep'}",
        "seeds=[0,1]",
        "prompts.list=[a corgi,a lion bust]",
        "job.eval.enabled=false",
        *extra,
    ]


def fake_root(tmp_path: Path) -> Path:
    """A folder that passes the checkout checks (launch.py + the linked config)."""
    root = tmp_path / "threestudio"
    (root / "configs").mkdir(parents=True)
    (root / "configs" / "perpneg-dreamfusion.yaml").write_text("name: x\n")
    (root / "launch.py").write_text("raise SystemExit('replaced in tests')\n")
    return root


def parse_overrides(command: List[str]) -> Dict[str, Any]:
    """``key=value`` arguments as threestudio's launch.py reads them (OmegaConf.from_cli)."""
    cli = OmegaConf.from_dotlist([a for a in command if "=" in a and not a.startswith("-")])
    return OmegaConf.to_container(cli)  # type: ignore[return-value]


def write_trial(exp_root: str, name: str, tag: str, kv: Dict[str, Any], marker: str = "") -> Path:
    """What threestudio leaves in a trial folder after ``launch.py --train``."""
    from PIL import Image

    trial = Path(exp_root) / name / tag
    (trial / "configs").mkdir(parents=True, exist_ok=True)
    parsed = {
        "name": name,
        "tag": tag,
        "seed": kv["seed"],
        "data_type": "random-camera-datamodule",
        "data": {"n_test_views": N_VIEWS, "eval_elevation_deg": 15.0},
        "system": {"prompt_processor": {"prompt": kv["system"]["prompt_processor"]["prompt"]}},
    }
    (trial / "configs" / "parsed.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(parsed)))
    test = trial / "save" / f"it{kv['trainer']['max_steps']}-test"
    test.mkdir(parents=True, exist_ok=True)
    for i in range(N_VIEWS):
        Image.new("RGB", (16, 16), (20 * i, 90, 200)).save(test / f"{i}.png")
    if marker:
        (trial / "gpu.txt").write_text(marker)
    return trial


class FakeLaunch:
    """Stands in for ``subprocess.run`` of launch.py: records the call, writes the trial."""

    def __init__(self, fail: Optional[set] = None) -> None:
        self.calls: List[Dict[str, Any]] = []
        self.fail = fail or set()

    def __call__(self, command: List[str], **kw: Any) -> subprocess.CompletedProcess:
        assert command[1] == "launch.py", command
        kv = parse_overrides(command)
        self.calls.append(
            {"command": command, "cwd": kw.get("cwd"), "env": kw.get("env"), "kv": kv}
        )
        if kv["tag"] in self.fail:
            return subprocess.CompletedProcess(command, 1)
        write_trial(kv["exp_root_dir"], kv["name"], kv["tag"], kv)
        return subprocess.CompletedProcess(command, 0)


@pytest.fixture
def no_subprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("a dry run started a process")

    monkeypatch.setattr(subprocess, "run", boom)
    monkeypatch.setattr(subprocess, "Popen", boom)


@pytest.fixture(autouse=True)
def _no_inherited_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    # setenv first so that teardown restores the original state even when the sweep sets it
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(gpus, "_inherited_cvd", gpus._UNSET)


# --------------------------------------------------------------------------- composition
def test_default_config_composes() -> None:
    cfg = compose_cfg()
    assert cfg.job.kind == "3d"
    assert cfg.job.config == "configs/perpneg-dreamfusion.yaml"
    assert cfg.prompts.name == "paper3d"
    items = [i if isinstance(i, str) else i["prompt"] for i in cfg.prompts.list]
    for p in ("a corgi", "a lion bust", "a tiger cub", "a shiba dog wearing sunglasses"):
        assert p in items
    assert list(cfg.methods) == ["vanilla", "perpneg"]
    assert cfg.threestudio_root is None and cfg.dry_run is False


def test_prompt_lists_ship_and_switch_with_job() -> None:
    large = compose_cfg("prompts=large").prompts
    assert large.name == "large" and len(large.list) >= 30
    assert len(set(large.list)) == len(large.list)
    assert compose_cfg("job=2d").prompts.name == "paper2d"  # job=2d's own default
    assert compose_cfg("job=2d", "prompts=paper3d").prompts.name == "paper3d"  # CLI wins
    s = load_settings(compose_cfg("prompts=large"))
    assert "a corgi" in [p.object for p in s.prompts]  # "a DSLR photo of" stripped for CLIP


def test_unknown_prompt_list_is_a_clear_error() -> None:
    with pytest.raises((MissingConfigException, ConfigCompositionException)) as info:
        compose_cfg("prompts=nope")
    msg = str(info.value)
    assert "prompts/nope" in msg and "paper3d" in msg


def test_sweeper_params_shard_over_num_shards() -> None:
    cfg = compose_cfg("num_shards=4", hydra_cfg=True)
    assert cfg.hydra.sweeper.params.shard == "range(4)"
    assert cfg.hydra.callbacks.sweep_report._target_.endswith("callback.ReportCallback")


@pytest.mark.skipif(
    not _has("hydra_plugins.hydra_joblib_launcher"), reason="hydra-joblib-launcher not installed"
)
def test_joblib_launcher_configs_compose() -> None:
    cfg = compose_cfg("hydra/launcher=joblib", "hydra.launcher.n_jobs=3", hydra_cfg=True)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 3
    cfg = compose_cfg("hydra/launcher=local_gpus", "gpus=4", hydra_cfg=True)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 4


@pytest.mark.skipif(
    not _has("hydra_plugins.hydra_submitit_launcher"),
    reason="hydra-submitit-launcher not installed",
)
def test_submitit_launcher_configs_compose() -> None:
    cfg = compose_cfg(
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.gpus_per_node=1",
        "hydra.launcher.timeout_min=720",
        hydra_cfg=True,
    )
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert (cfg.hydra.launcher.partition, cfg.hydra.launcher.timeout_min) == ("gpu", 720)
    cfg = compose_cfg("hydra/launcher=slurm_gpu", "hydra.launcher.partition=a100", hydra_cfg=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("a100", 1, 240)


# --------------------------------------------------------------------------- job list
def test_dry_run_lists_the_cartesian_product(tmp_path: Path, no_subprocess: None) -> None:
    lines: List[str] = []
    cfg = compose_cfg(*small(tmp_path, "schemes=[authors,threestudio]", "dry_run=true"))
    summary = run_sweep(cfg, echo=lines.append)
    jobs = summary["jobs"]
    # 2 prompts x 2 seeds x (vanilla + perpneg x 2 schemes); vanilla ignores the scheme
    assert len(jobs) == 12
    ids = {j["id"] for j in jobs}
    assert ids == {
        f"{p}-s{s}-{v}"
        for p in ("a_corgi", "a_lion_bust")
        for s in (0, 1)
        for v in ("vanilla", "perpneg_authors", "perpneg_threestudio")
    }
    assert [j["index"] for j in jobs] == list(range(12))
    assert all(j["state"] == "pending" for j in jobs)
    # one printed line per job, with its full command, then a summary line
    assert len(lines) == 13 and "nothing was run" in lines[-1]
    for line, job in zip(lines, jobs):
        assert job["id"] in line and "launch.py --config configs/perpneg-dreamfusion.yaml" in line
        assert f"tag={job['id']}" in line and "eval3d" not in line  # evaluation off here
    plan = json.loads((tmp_path / "sweep" / "jobs.json").read_text())
    assert plan["dry_run"] is True and plan["total_jobs"] == 12
    assert [j["id"] for j in plan["jobs"]] == [j["id"] for j in jobs]
    assert not (tmp_path / "sweep" / "runs").exists() and not (tmp_path / "sweep" / "done").exists()


def test_commands_are_threestudio_overrides(tmp_path: Path, no_subprocess: None) -> None:
    root = fake_root(tmp_path)
    cfg = compose_cfg(
        f"out_dir={tmp_path / 'sweep'}",
        f"threestudio_root={root}",
        "seeds=[7]",
        "job.max_steps=1200",
        "dry_run=true",
    )
    jobs = {j["id"]: j for j in run_sweep(cfg, echo=lambda _: None)["jobs"]}
    assert len(jobs) == 5 * 2  # paper3d: 5 prompts x 1 seed x {vanilla, perpneg (authors)}
    out = str(tmp_path / "sweep")
    van = jobs["a_corgi-s7-vanilla"]
    assert van["cwd"] == str(root)
    assert van["command"] == [
        PY, "launch.py", "--config", "configs/perpneg-dreamfusion.yaml", "--train", "--gpu", "0",
        "system.prompt_processor.prompt=a corgi", "seed=7", "system.guidance.use_perp_neg=false",
        "trainer.max_steps=1200", f"exp_root_dir={out}", "name=runs",
        "tag=a_corgi-s7-vanilla", "use_timestamp=false",
    ]  # fmt: skip
    assert van["run_dir"] == str(Path(out) / "runs" / "a_corgi-s7-vanilla")  # known in advance
    pn = jobs["a_corgi-s7-perpneg_authors"]
    kv = parse_overrides(pn["command"])
    assert kv["system"]["guidance"]["use_perp_neg"] is True
    assert kv["system"]["prompt_processor"]["perp_neg_scheme"] == "authors"
    assert (kv["exp_root_dir"], kv["name"], kv["tag"], kv["use_timestamp"]) == (
        out, "runs", "a_corgi-s7-perpneg_authors", False,
    )  # fmt: skip
    # evaluation on by default: eval3d on the trial folder, object = the prompt
    assert pn["eval_argv"][:5] == [
        pn["run_dir"],
        "--clip",
        "openai/clip-vit-large-patch14",
        "--object",
        "a corgi",
    ]
    # the authors' stronger negative weight for the shiba, perpneg runs only
    w3 = "system.prompt_processor.perp_neg_negative_w=-3.0"
    assert w3 in jobs["a_shiba_dog_wearing_sunglasses-s7-perpneg_authors"]["command"]
    assert w3 not in jobs["a_shiba_dog_wearing_sunglasses-s7-vanilla"]["command"]


@pytest.mark.parametrize(
    "prompt", ["yes", "a corgi: cute", "1e5", "[a, b]", "null", " # x", "it's"]
)
def test_prompts_survive_threestudio_cli_parsing(tmp_path: Path, prompt: str) -> None:
    cfg = compose_cfg(*small(tmp_path), "seeds=[0]", "methods=[vanilla]")
    s = load_settings(cfg)
    s.prompts = [settings._prompt_item(prompt, "test")]
    (job,) = plan_jobs(s)
    kv = parse_overrides(job.command)
    assert kv["system"]["prompt_processor"]["prompt"] == prompt.strip()


def test_gpu_per_hydra_job_number() -> None:
    assert gpu_for_slot(4, 5, env={}) == "1"
    assert gpu_for_slot(1, 3, env={}) == "0"
    assert gpu_for_slot(None, 3, env={}) is None  # leave CUDA_VISIBLE_DEVICES alone
    assert gpu_for_slot(2, 3, env={"CUDA_VISIBLE_DEVICES": "4,6"}) == "6"  # SLURM / shared box
    assert gpu_for_slot(1, 0, env={"CUDA_VISIBLE_DEVICES": "3"}) == "3"
    with pytest.raises(SweepError, match="gpus"):
        gpu_for_slot(4, 0, env={"CUDA_VISIBLE_DEVICES": "0,1"})


def test_in_process_gpu_pinning_keeps_the_inherited_list(tmp_path: Path) -> None:
    """eval2d/eval3d run in-process and get the job's GPU through CUDA_VISIBLE_DEVICES; a later
    Hydra job in the same process (basic launcher, reused joblib worker) still picks its GPU from
    the list the process started with."""
    (job,) = plan_jobs(
        load_settings(
            compose_cfg(
                *small(
                    tmp_path, "seeds=[0]", "methods=[vanilla]", "prompts.list=[a corgi]", "gpus=2"
                )
            )
        ),
        slot=1,
    )
    assert job.gpu == "1"
    gpus.pin_process_gpu(job)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    assert gpu_for_slot(2, 0) == "0" and gpu_for_slot(2, 3) == "1"


def test_shards_partition_the_jobs(tmp_path: Path) -> None:
    base = small(tmp_path, "schemes=[authors,threestudio]", "num_shards=3")
    every = plan_jobs(load_settings(compose_cfg(*base)))
    seen: List[str] = []
    for k in range(3):
        s = load_settings(compose_cfg(*base, f"shard={k}"))
        mine = [j for j in plan_jobs(s) if j.shard == k]
        assert {j.variant for j in mine} == {"vanilla", "perpneg_authors", "perpneg_threestudio"}
        seen += [j.id for j in mine]
    assert sorted(seen) == sorted(j.id for j in every)  # disjoint, complete


# --------------------------------------------------------------------------- running, resuming
def test_run_resume_and_fake_done_markers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = fake_root(tmp_path)
    overrides = small(tmp_path, f"threestudio_root={root}", "gpus=2", "shard=1", "num_shards=1")
    # shard must be < num_shards
    with pytest.raises(SweepError, match="shard"):
        run_sweep(compose_cfg(*overrides), echo=lambda _: None)
    overrides = small(tmp_path, f"threestudio_root={root}", "gpus=2")
    cfg = compose_cfg(*overrides)
    s = load_settings(cfg)
    jobs = plan_jobs(s)
    assert len(jobs) == 8
    # a done-marker written beforehand (e.g. by another machine) makes its job skip
    pre = jobs[3]
    Path(pre.marker).parent.mkdir(parents=True)
    Path(pre.marker).write_text(
        json.dumps({"status": "done", "fingerprint": pre.fingerprint, "job": pre.to_dict()})
    )
    fake = FakeLaunch()
    monkeypatch.setattr(subprocess, "run", fake)
    summary = run_sweep(cfg, echo=lambda _: None)
    assert (summary["done"], summary["skipped"], summary["failed"]) == (7, 1, 0)
    assert pre.id not in {c["kv"]["tag"] for c in fake.calls}
    for call in fake.calls:
        assert call["cwd"] == str(root)
        assert call["env"]["CUDA_VISIBLE_DEVICES"] == "0"  # shard 0 of a run without -m
    for j in jobs:
        marker = json.loads(Path(j.marker).read_text())
        assert marker["status"] == "done" and marker["fingerprint"] == j.fingerprint
        if j.id != pre.id:
            assert marker["run"]["returncode"] == 0 and marker["run"]["frames"] == N_VIEWS
            assert Path(marker["run"]["test_dir"]).name == "it10000-test"
    assert not list((tmp_path / "sweep" / "done").glob(".*tmp"))  # atomic writes left nothing

    # second invocation: everything is done
    fake.calls.clear()
    summary = run_sweep(cfg, echo=lambda _: None)
    assert (summary["done"], summary["skipped"]) == (0, 8) and fake.calls == []
    # a job whose marker is gone runs again, alone
    Path(jobs[5].marker).unlink()
    summary = run_sweep(cfg, echo=lambda _: None)
    assert [c["kv"]["tag"] for c in fake.calls] == [jobs[5].id]

    # the report: Janus table (no evaluations here) and render strips per trial
    report = Path(summary["report"]).read_text()
    assert "| vanilla | 4 | 0 | 0 | n/a | n/a |" in report
    assert "### a corgi" in report and "### a lion bust" in report
    strips = sorted((tmp_path / "sweep" / "report" / "strips").glob("*.png"))
    assert len(strips) == 7  # the pre-made marker's job has no trial folder
    from PIL import Image

    with Image.open(strips[0]) as im:
        assert im.size == (128 * 8, 128)
    assert len(list((tmp_path / "sweep" / "report" / "grids").glob("*.png"))) == 2

    # other settings in the same folder: an error, not a silent mix
    with pytest.raises(SweepError, match="other settings"):
        run_sweep(compose_cfg(*overrides, "job.max_steps=5"), echo=lambda _: None)


def test_failed_jobs_are_recorded_and_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = fake_root(tmp_path)
    cfg = compose_cfg(*small(tmp_path, f"threestudio_root={root}", "seeds=[0]"))
    fake = FakeLaunch(fail={"a_corgi-s0-perpneg_authors"})
    monkeypatch.setattr(subprocess, "run", fake)
    summary = run_sweep(cfg, echo=lambda _: None)
    assert (summary["done"], summary["failed"]) == (3, 1)
    failed = tmp_path / "sweep" / "failed" / "a_corgi-s0-perpneg_authors.json"
    assert "exited with code 1" in json.loads(failed.read_text())["error"]
    assert not (tmp_path / "sweep" / "done" / "a_corgi-s0-perpneg_authors.json").exists()
    assert "Failed jobs" in Path(summary["report"]).read_text()
    # the failed run left a checkpoint: the retry continues from it (job.resume_partial)
    ckpt = tmp_path / "sweep" / "runs" / "a_corgi-s0-perpneg_authors" / "ckpts" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    fake.fail.clear()
    fake.calls.clear()
    summary = run_sweep(cfg, echo=lambda _: None)
    assert [c["kv"]["tag"] for c in fake.calls] == ["a_corgi-s0-perpneg_authors"]
    assert fake.calls[0]["kv"]["resume"] == str(ckpt)
    assert not failed.exists()
    # the app exits with 1 when a job failed
    fake.fail.add("a_lion_bust-s0-vanilla")
    (tmp_path / "sweep" / "done" / "a_lion_bust-s0-vanilla.json").unlink()
    assert app.main(small(tmp_path, f"threestudio_root={root}", "seeds=[0]")) == 1
    # fail_fast stops at the first failure
    with pytest.raises(SweepError, match="fail_fast"):
        run_sweep(
            compose_cfg(
                *small(tmp_path, f"threestudio_root={root}", "seeds=[0]", "fail_fast=true")
            ),
            echo=lambda _: None,
        )


def test_missing_threestudio_root_names_the_key(tmp_path: Path, no_subprocess: None) -> None:
    with pytest.raises(SweepError, match="threestudio_root"):
        run_sweep(compose_cfg(*small(tmp_path)), echo=lambda _: None)
    run_sweep(compose_cfg(*small(tmp_path, "dry_run=true")), echo=lambda _: None)  # fine
    lines: List[str] = []
    run_sweep(
        compose_cfg(*small(tmp_path, "dry_run=true", f"threestudio_root={tmp_path}")),
        echo=lines.append,
    )
    assert "warning: threestudio_root" in lines[-2] and "no launch.py" in lines[-2]
    with pytest.raises(SweepError, match="no launch.py"):
        run_sweep(
            compose_cfg(*small(tmp_path, f"threestudio_root={tmp_path}")), echo=lambda _: None
        )
    root = fake_root(tmp_path)
    (root / "configs" / "perpneg-dreamfusion.yaml").unlink()
    with pytest.raises(SweepError, match="threestudio-perpneg link"):
        run_sweep(compose_cfg(*small(tmp_path, f"threestudio_root={root}")), echo=lambda _: None)


@pytest.mark.parametrize(
    "value", ["3-1", "a", "0-", "", "-1", [0, 0], [], [1.5], 2**32, True, "0,0", [-2]]
)
def test_bad_seeds(value: Any) -> None:
    with pytest.raises(SweepError, match="seeds"):
        parse_seeds(value)


def test_seed_forms() -> None:
    assert parse_seeds("0-3,7") == [0, 1, 2, 3, 7]
    assert parse_seeds(5) == [5]
    assert parse_seeds([2, 0]) == [2, 0]


@pytest.mark.parametrize(
    "override, key",
    [
        ("seeds=3-1", "seeds"),
        ("methods=[vanilla,bogus]", "methods"),
        ("schemes=[nope]", "schemes"),
        ("+scheme_settings.x={scheme: other}", "scheme_settings.x.scheme"),
        ("num_shards=0", "num_shards"),
        ("gpus=0", "gpus"),
        ("stage=train", "stage"),
        ("prompts.list=[]", "prompts"),
        ("prompts.list=['a corgi','A corgi!']", "prompts"),
        ("prompts_file=/nonexistent/prompts.txt", "prompts_file"),
        ("sweep_name=a/b", "sweep_name"),
        ("job.max_steps=0", "job.max_steps"),
        ("job.overrides=[no_equals_sign]", "job.overrides"),
        ("+bogus=1", "bogus: unknown config key"),
    ],
)
def test_bad_inputs(tmp_path: Path, override: str, key: str) -> None:
    cfg = compose_cfg(
        *small(tmp_path),
        "schemes=[authors,x]" if "scheme_settings.x" in override else "schemes=[authors]",
        override,
    )
    with pytest.raises(SweepError, match=key.replace(".", r"\.")):
        load_settings(cfg)


def test_top_keys_are_the_composed_configs(tmp_path: Path) -> None:
    """settings.TOP_KEYS (the unknown-key check) lists exactly the keys of the composed config."""
    cfg = compose_cfg(*small(tmp_path))
    assert sorted(k for k in cfg if k != "hydra") == sorted(settings.TOP_KEYS)


def test_prompts_file_is_appended(tmp_path: Path) -> None:
    f = tmp_path / "more.txt"
    f.write_text("# extra prompts\na DSLR photo of an owl\n\na tiger cub\n")
    s = load_settings(compose_cfg(*small(tmp_path), f"prompts_file={f}", "max_prompts=3"))
    assert [p.prompt for p in s.prompts] == ["a corgi", "a lion bust", "a DSLR photo of an owl"]
    assert s.prompts[2].object == "an owl"


# --------------------------------------------------------------------------- the Hydra app
def test_hydra_app_multirun_writes_one_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m threestudio_perpneg.eval.sweep -m num_shards=2`` with the basic launcher:
    one Hydra job per shard, GPU = Hydra job number % gpus, then the callback's report."""
    root = fake_root(tmp_path)
    fake = FakeLaunch()
    monkeypatch.setattr(subprocess, "run", fake)
    app.main(["-m", *small(tmp_path, f"threestudio_root={root}", "num_shards=2", "gpus=2")])
    out = tmp_path / "sweep"
    assert sorted(p.name for p in out.glob("jobs-*.json")) == ["jobs-0.json", "jobs-1.json"]
    assert len(fake.calls) == 8 and len(list((out / "done").glob("*.json"))) == 8
    gpu = {c["kv"]["tag"]: c["env"]["CUDA_VISIBLE_DEVICES"] for c in fake.calls}
    for k in (0, 1):
        for j in json.loads((out / f"jobs-{k}.json").read_text())["jobs"]:
            assert gpu[j["id"]] == str(k)
    assert "Janus rate (3D)" in (out / "report" / "report.md").read_text()


def test_hydra_app_dry_run_and_errors(
    tmp_path: Path, no_subprocess: None, capsys: pytest.CaptureFixture
) -> None:
    assert app.main([*small(tmp_path), "dry_run=true", "seeds=0-2"]) == 0
    out = capsys.readouterr().out
    assert out.count("launch.py") == 12 and "dry run: 12 jobs" in out
    # a 3D job would run: threestudio_root is required
    assert app.main(small(tmp_path), prog="threestudio-perpneg sweep") == 2
    assert "threestudio_root" in capsys.readouterr().err
    assert app.main([*small(tmp_path), "seeds=[0,0]"]) == 2
    assert "seeds: seed 0 given twice" in capsys.readouterr().err


def standin_launch_py(tmp_path: Path) -> Path:
    """A temporary "checkout" whose launch.py writes a trial folder (and the GPU it was given)."""
    root = fake_root(tmp_path)
    (root / "launch.py").write_text(
        "import os, sys\n"
        "from pathlib import Path\n"
        "from typing import Any, Dict\n"
        "from omegaconf import OmegaConf\n"
        f"N_VIEWS = {N_VIEWS}\n\n"
        + inspect.getsource(write_trial)
        + "\nkv = OmegaConf.to_container(OmegaConf.from_dotlist([a for a in sys.argv[1:] if '=' in a]))\n"
        "write_trial(kv['exp_root_dir'], kv['name'], kv['tag'], kv, os.environ['CUDA_VISIBLE_DEVICES'])\n"
    )
    return root


def run_app(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(repo))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [PY, "-m", "threestudio_perpneg.eval.sweep", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_module_entry_point_takes_verbose_out_of_the_overrides(tmp_path: Path) -> None:
    """``python -m ...eval.sweep`` is quiet unless ``--verbose``, which Hydra never sees (it would
    reject it as an override)."""
    proc = run_app(tmp_path, *small(tmp_path), "dry_run=true", "--verbose")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dry run: 8 jobs" in proc.stdout


@pytest.mark.skipif(
    not _has("hydra_plugins.hydra_joblib_launcher"), reason="hydra-joblib-launcher not installed"
)
def test_joblib_across_gpus_with_a_stand_in_launch_py(tmp_path: Path) -> None:
    """Real processes: joblib workers run the stand-in launch.py, Hydra job k on GPU k % gpus."""
    root = standin_launch_py(tmp_path)
    args = small(
        tmp_path, f"threestudio_root={root}", "gpus=2", "num_shards=2", "prompts.list=[a corgi]"
    )
    proc = run_app(tmp_path, "-m", "hydra/launcher=local_gpus", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "sweep"
    for k in (0, 1):
        for j in json.loads((out / f"jobs-{k}.json").read_text())["jobs"]:
            assert (Path(j["run_dir"]) / "gpu.txt").read_text() == str(k)
    assert len(list((out / "done").glob("*.json"))) == 4
    assert "report written" in proc.stdout


@pytest.mark.skipif(
    not _has("hydra_plugins.hydra_submitit_launcher"),
    reason="hydra-submitit-launcher not installed",
)
def test_submitit_local_runs_the_shards(tmp_path: Path) -> None:
    """The submitit launcher path (pickled task, job processes, driver waits, then the report),
    with submitit's local executor standing in for SLURM."""
    root = standin_launch_py(tmp_path)
    args = small(
        tmp_path, f"threestudio_root={root}", "num_shards=2", "seeds=[0]", "prompts.list=[a corgi]"
    )
    proc = run_app(
        tmp_path, "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", *args
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "sweep"
    assert sorted(p.name for p in (out / "done").glob("*.json")) == [
        "a_corgi-s0-perpneg_authors.json",
        "a_corgi-s0-vanilla.json",
    ]
    assert "Janus rate (3D)" in (out / "report" / "report.md").read_text()


# --------------------------------------------------------------------------- with the evaluator
def test_evaluation_fills_the_janus_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real eval3d (tiny random CLIP: meaningless numbers) on stand-in trials; evaluation is
    re-run on finished runs without training them again."""
    pytest.importorskip("threestudio_perpneg.eval.janus")
    tiny = pytest.importorskip("threestudio_perpneg.tiny.builders")
    if not hasattr(tiny, "build_tiny_clip"):
        pytest.skip("threestudio_perpneg.tiny.builders.build_tiny_clip not available")
    clip = tiny.build_tiny_clip(tmp_path / "tiny-clip", seed=0)
    root = fake_root(tmp_path)
    fake = FakeLaunch()
    monkeypatch.setattr(subprocess, "run", fake)
    base = small(tmp_path, f"threestudio_root={root}", "seeds=[0]", "prompts.list=[a corgi]")
    run_sweep(compose_cfg(*base), echo=lambda _: None)  # evaluation off
    assert len(fake.calls) == 2
    ev = [
        f"job.eval.clip={clip}",
        "job.eval.enabled=true",
        "job.eval.args=[--no-progress,--bootstrap,50,--no-plots]",
    ]
    summary = run_sweep(compose_cfg(*base, *ev), echo=lambda _: None)
    assert len(fake.calls) == 2  # not trained again
    for j in summary["jobs"]:
        marker = json.loads(Path(j["marker"]).read_text())
        assert marker["eval"]["status"] == "ok", marker["eval"]
        assert isinstance(marker["eval"]["janus"], bool)
        assert 0.0 <= marker["eval"]["view_accuracy"] <= 1.0
        assert (Path(j["eval_dir"]) / "janus_report.json").is_file()
    report = Path(summary["report"]).read_text()
    assert "| vanilla | 1 | 1 |" in report and "| perpneg (authors) | 1 | 1 |" in report


# --------------------------------------------------------------------------- against threestudio
@pytest.mark.threestudio
@pytest.mark.parametrize("prompt", ["a corgi", "a DSLR photo of a lion: 1e5 views, yes"])
def test_threestudio_reads_the_commands_as_planned(tmp_path: Path, prompt: str) -> None:
    """threestudio's own load_config (launch.py's parser of the overrides) on a planned command:
    the trial folder is the planned one, and the method / scheme / seed / steps / prompt arrive."""
    from threestudio_support.fixtures import require_threestudio

    require_threestudio(allow_module_level=False)
    from threestudio.utils.config import load_config

    repo = Path(__file__).resolve().parent.parent
    s = load_settings(compose_cfg(*small(tmp_path, "seeds=[3]", "job.max_steps=77")))
    s.prompts = [settings._prompt_item(prompt, "test")]
    for job in plan_jobs(s):
        assert job.command[1:3] == ["launch.py", "--config"]
        overrides = [a for a in job.command if "=" in a and not a.startswith("-")]
        cfg = load_config(str(repo / job.command[3]), cli_args=overrides, n_gpus=1)
        assert Path(cfg.trial_dir) == Path(job.run_dir) and Path(job.run_dir).is_dir()
        assert cfg.system.prompt_processor.prompt == prompt and cfg.seed == 3
        assert cfg.trainer.max_steps == 77
        assert cfg.system.guidance.use_perp_neg is (job.method == "perpneg")
        if job.method == "perpneg":
            assert cfg.system.prompt_processor.perp_neg_scheme == "authors"


def test_out_dir_inside_a_file_exits_2(
    tmp_path: Path, no_subprocess: None, capsys: pytest.CaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x", encoding="utf-8")
    argv = [f"out_dir={blocker / 'sweep'}", "seeds=[0]", "prompts.list=[a corgi]", "dry_run=true"]
    assert app.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "out_dir:" in err and "is a file" in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    "override, needles",
    [
        ("job.bogus=1", ["job.bogus", "'job.bogus=1'", "max_steps"]),
        ("job=nope", ["job:", "'nope'", "2d, 3d"]),
        ("seeds=[", ["'seeds=['", "KEY=VALUE"]),
    ],
)
def test_hydra_override_errors_are_one_line_exit_2(
    tmp_path: Path,
    no_subprocess: None,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    override: str,
    needles: List[str],
) -> None:
    """Hydra's own errors (unknown key or group option, unparsable override) come out as one
    line naming the key and what was expected, exit code 2; HYDRA_FULL_ERROR, which the entry
    point sets to catch them, is unset again afterwards."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    assert app.main([*small(tmp_path), "dry_run=true", override]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("perpneg-sweep: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    assert "HYDRA_FULL_ERROR" not in os.environ


def test_hydra_full_error_set_by_the_user_gets_hydras_exception(
    tmp_path: Path, no_subprocess: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigCompositionException, match="job.bogus"):
        app.main([*small(tmp_path), "dry_run=true", "job.bogus=1"])
    assert os.environ["HYDRA_FULL_ERROR"] == "1"
