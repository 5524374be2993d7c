"""Running the sweep: each job (threestudio ``launch.py`` + eval3d, or eval2d) with done-markers
for resuming, and the report at the end (:func:`run_sweep`)."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from .gpus import pin_process_gpu
from .plan import Job, plan_jobs, yaml_value
from .report import latest_test_dir, read_marker, ring_frames, write_json_atomic, write_report
from .settings import MARKER_VERSION, PROG, Settings, SweepError, load_settings

__all__ = ["Runner", "run_sweep", "summarize_eval"]

log = logging.getLogger(__name__)

#: (``subprocess.run``'s signature; tests inject a fake).
Runner = Callable[..., Any]


def _marker_state(job: Job, marker: Optional[Dict[str, Any]], s: Settings) -> str:
    """``pending``, ``done``, or ``eval`` (run finished, evaluation to (re)do)."""
    if marker is None:
        return "pending"
    if marker.get("fingerprint") != job.fingerprint:
        raise SweepError(
            f"{job.marker}: done-marker of job {job.id} was written with other settings "
            f"({marker.get('job', {}).get('settings')} != {job.settings}); use another "
            "sweep_name/out_dir for a sweep with different settings (or delete the marker)"
        )
    if job.kind == "3d" and job.eval_argv is not None:
        ev = marker.get("eval") or {}
        if s.force_eval or ev.get("status") != "ok":
            return "eval"
    return "done"


# --------------------------------------------------------------------------- running
def _check_root(s: Settings) -> Path:
    root = s.threestudio_root
    if root is None:
        raise SweepError(
            "threestudio_root: not set; 3D jobs run threestudio's launch.py. Give "
            "threestudio_root=/path/to/threestudio (a checkout where `threestudio-perpneg link "
            "<checkout>` was run), or dry_run=true to only list the jobs"
        )
    if not (root / "launch.py").is_file():
        raise SweepError(
            f"threestudio_root: {str(root)!r} has no launch.py (not a threestudio checkout)"
        )
    cfg = root / str(s.job["config"])
    if not cfg.is_file():
        raise SweepError(
            f"job.config: {str(cfg)!r} does not exist; run `threestudio-perpneg link {root}` to "
            "install the perpneg-*.yaml configs"
        )
    return root


def _run_3d(job: Job, s: Settings, runner: Runner) -> Dict[str, Any]:
    run_dir = Path(job.run_dir)
    command = list(job.command)
    ckpt = run_dir / "ckpts" / "last.ckpt"
    resumed = None
    if s.job.get("resume_partial", True) and ckpt.is_file():
        resumed = str(ckpt)
        command.append(f"resume={yaml_value(resumed)}")
    env = dict(os.environ)
    if job.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = job.gpu
    log_path = Path(job.log)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log_path, "ab") as fh:
        fh.write(f"\n# {_dt.datetime.now().isoformat(timespec='seconds')} {job.shell()}\n".encode())
        fh.flush()
        proc = runner(command, cwd=job.cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    result: Dict[str, Any] = {
        "returncode": int(proc.returncode),
        "seconds": round(time.time() - t0, 1),
        "log": str(log_path),
        "resumed_from": resumed,
        "command": command,
    }
    if proc.returncode != 0:
        raise _JobFailed(f"launch.py exited with code {proc.returncode} (log: {log_path})", result)
    test_dir = latest_test_dir(run_dir)
    if test_dir is None:
        raise _JobFailed(
            f"launch.py exited 0 but wrote no test renders under {run_dir}/save/it*-test "
            f"(log: {log_path})",
            result,
        )
    result["test_dir"] = str(test_dir)
    result["frames"] = len(ring_frames(test_dir))
    return result


class _JobFailed(Exception):
    def __init__(self, message: str, result: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(message)
        self.result = result or {}


def _call_main(func: Callable[[List[str]], Any], argv: List[str]) -> int:
    try:
        rc = func(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return int(rc or 0)


def _find_key(obj: Any, names: Sequence[str], number: bool) -> Any:
    """First value under one of ``names`` (depth-first): a number when ``number``, else a bool."""
    if isinstance(obj, Mapping):
        for n in names:
            v = obj.get(n)
            if isinstance(v, bool) != number and (not number or isinstance(v, (int, float))):
                return v
        for v in obj.values():
            r = _find_key(v, names, number)
            if r is not None:
                return r
    elif isinstance(obj, list):
        for v in obj:
            r = _find_key(v, names, number)
            if r is not None:
                return r
    return None


def summarize_eval(eval_dir: Path) -> Dict[str, Any]:
    """Janus flag and view accuracy of one trial, read from eval3d's JSON output (first
    ``janus`` boolean and ``view_accuracy`` number found)."""
    janus: Optional[bool] = None
    acc: Optional[float] = None
    files = sorted(eval_dir.rglob("*.json")) if eval_dir.is_dir() else []
    for f in files:
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        objects = data.get("objects") if isinstance(data, dict) else None
        if isinstance(objects, list) and objects and isinstance(objects[0], dict):
            data = objects[0]  # janus_report.json: one object per trial
        if janus is None:
            janus = _find_key(data, ("janus",), number=False)
        if acc is None:
            v = _find_key(data, ("view_accuracy",), number=True)
            acc = float(v) if v is not None else None
    return {"janus": janus, "view_accuracy": acc, "files": [str(f) for f in files]}


def _eval_3d(job: Job) -> Dict[str, Any]:
    assert job.eval_argv is not None and job.eval_dir is not None
    t0 = time.time()
    try:
        from threestudio_perpneg.eval import janus
    except ImportError as err:
        return {"status": "error", "error": f"eval3d unavailable: {err}"}
    pin_process_gpu(job)
    try:
        rc = _call_main(janus.main, list(job.eval_argv))
    except Exception as err:  # the evaluator's own errors are recorded, not fatal to the sweep
        log.exception("eval3d failed for %s", job.id)
        return {"status": "error", "error": f"{type(err).__name__}: {err}"}
    out: Dict[str, Any] = {
        "status": "ok" if rc == 0 else "error",
        "exit_code": rc,
        "seconds": round(time.time() - t0, 1),
        "out": job.eval_dir,
        "argv": list(job.eval_argv),
    }
    if rc != 0:
        out["error"] = f"eval3d exited with code {rc}"
    out.update(summarize_eval(Path(job.eval_dir)))
    return out


def _run_2d(job: Job) -> Dict[str, Any]:
    t0 = time.time()
    try:
        from threestudio_perpneg.eval import eval2d
    except ImportError as err:
        raise _JobFailed(f"eval2d unavailable: {err}") from err
    pin_process_gpu(job)
    rc = _call_main(eval2d.main, list(job.command))
    result = {"exit_code": rc, "seconds": round(time.time() - t0, 1), "out": job.run_dir}
    if rc != 0:
        raise _JobFailed(f"eval2d exited with code {rc}", result)
    result["csv"] = [str(p) for p in sorted(Path(job.run_dir).rglob("*.csv"))]
    return result


def _execute(
    job: Job, state: str, s: Settings, runner: Runner, marker: Optional[Dict[str, Any]]
) -> str:
    """Run (or re-evaluate) one job; writes its done-marker or failure record."""
    failed_path = s.out_dir / "failed" / f"{job.id}.json"
    record: Dict[str, Any] = {
        "version": MARKER_VERSION,
        "status": "done",
        "job": job.to_dict(),
        "fingerprint": job.fingerprint,
    }
    try:
        if job.kind == "3d":
            if state == "eval" and marker is not None:
                record["run"] = marker.get("run", {})
            else:
                record["run"] = _run_3d(job, s, runner)
            if job.eval_argv is not None:
                record["eval"] = _eval_3d(job)
                if record["eval"]["status"] != "ok":
                    log.warning(
                        "job %s: evaluation failed: %s", job.id, record["eval"].get("error")
                    )
        else:
            record["run"] = _run_2d(job)
    except _JobFailed as err:
        write_json_atomic(
            failed_path,
            {
                "version": MARKER_VERSION,
                "status": "failed",
                "error": str(err),
                "result": err.result,
                "job": job.to_dict(),
                "at": _dt.datetime.now().isoformat(timespec="seconds"),
            },
        )
        log.error("job %s failed: %s", job.id, err)
        if s.fail_fast:
            raise SweepError(f"job {job.id} failed: {err} (fail_fast=true)") from err
        return "failed"
    record["finished_at"] = _dt.datetime.now().isoformat(timespec="seconds")
    write_json_atomic(Path(job.marker), record)
    if failed_path.exists():
        failed_path.unlink()
    return "done"


def _plan_path(s: Settings, hydra_job: Optional[int]) -> Path:
    if hydra_job is not None:
        return s.out_dir / f"jobs-{hydra_job}.json"
    if s.num_shards > 1:
        return s.out_dir / f"jobs-shard{s.shard}.json"
    return s.out_dir / "jobs.json"


def run_sweep(
    cfg: Any,
    *,
    runner: Optional[Runner] = None,
    slot: Optional[int] = None,
    hydra_job: Optional[int] = None,
    write_final_report: bool = True,
    base: Optional[Path] = None,
    echo: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """Plan, then (unless ``dry_run``) run this shard's pending jobs and write the report.

    ``runner`` replaces ``subprocess.run`` for launch.py; ``slot`` is the GPU slot (Hydra's job
    number in multirun, default ``shard``); ``hydra_job`` names the plan file in multirun.
    Returns a summary: ``jobs`` (this shard's, as dicts, each with ``state``), counts, paths."""
    s = load_settings(cfg, base=base)
    if s.stage == "report":
        path = write_report(s.out_dir, frames=s.report["frames"], thumb_size=s.report["thumb_size"])
        echo(f"{PROG}: report written to {path}")
        return {"report": str(path), "jobs": []}

    all_jobs = plan_jobs(s, slot=slot)
    mine = [j for j in all_jobs if j.shard == s.shard]
    states: Dict[str, str] = {}
    markers: Dict[str, Optional[Dict[str, Any]]] = {}
    for j in mine:
        markers[j.id] = read_marker(Path(j.marker))
        states[j.id] = _marker_state(j, markers[j.id], s)

    plan_path = _plan_path(s, hydra_job)
    plan = {
        "sweep_name": s.sweep_name,
        "out_dir": str(s.out_dir),
        "prompt_list": s.prompt_list,
        "kind": s.kind,
        "shard": s.shard,
        "num_shards": s.num_shards,
        "total_jobs": len(all_jobs),
        "dry_run": s.dry_run,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "jobs": [dict(j.to_dict(), state=states[j.id]) for j in mine],
    }
    write_json_atomic(plan_path, plan)

    n_todo = sum(1 for j in mine if states[j.id] != "done")
    shard_txt = f" (shard {s.shard}/{s.num_shards} of {len(all_jobs)})" if s.num_shards > 1 else ""
    if s.dry_run:
        for k, j in enumerate(mine, 1):
            echo(f"[{k}/{len(mine)}] {j.id} [{states[j.id]}] {j.shell()}")
        if s.kind == "3d" and s.threestudio_root is not None:
            try:
                _check_root(s)
            except SweepError as err:
                echo(f"{PROG}: warning: {err}")
        echo(
            f"{PROG}: dry run: {len(mine)} jobs{shard_txt}, {n_todo} to run; nothing was run. "
            f"Job list: {plan_path}"
        )
        return {"plan": str(plan_path), "jobs": plan["jobs"], "to_run": n_todo, "dry_run": True}

    if s.kind == "3d" and any(states[j.id] == "pending" for j in mine):
        _check_root(s)
    run = runner if runner is not None else _default_runner
    counts = {"done": 0, "skipped": 0, "failed": 0}
    for k, j in enumerate(mine, 1):
        st = states[j.id]
        if st == "done":
            counts["skipped"] += 1
            log.info("[%d/%d] %s: done-marker found, skipped", k, len(mine), j.id)
            continue
        log.info("[%d/%d] %s: %s", k, len(mine), j.id, "evaluating" if st == "eval" else "running")
        outcome = _execute(j, st, s, run, markers[j.id])
        counts[outcome] += 1
        states[j.id] = "done" if outcome == "done" else "failed"
    summary: Dict[str, Any] = {
        "plan": str(plan_path),
        "jobs": [dict(j.to_dict(), state=states[j.id]) for j in mine],
        **counts,
    }
    if write_final_report and s.report["enabled"]:
        summary["report"] = str(
            write_report(s.out_dir, frames=s.report["frames"], thumb_size=s.report["thumb_size"])
        )
    echo(
        f"{PROG}: {counts['done']} run, {counts['skipped']} skipped (done), {counts['failed']} "
        f"failed{shard_txt}" + (f"; report: {summary['report']}" if "report" in summary else "")
    )
    return summary


def _default_runner(command: Sequence[str], **kwargs: Any) -> Any:
    return subprocess.run(list(command), check=False, **kwargs)
