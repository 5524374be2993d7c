"""Perp-Neg paper-reproduction sweep: a Hydra app (``python -m threestudio_perpneg.eval.sweep``).

Jobs are prompts x seeds x methods (``vanilla``, ``perpneg``) x weight-scheme settings (perpneg runs
only). A 3D job runs threestudio's ``launch.py`` in a given checkout (subprocess, cwd = the checkout)
with ``exp_root_dir=<out_dir> name=runs tag=<job id> use_timestamp=false``, so its trial folder
``<out_dir>/runs/<job id>`` is known in advance, then the Janus evaluator
(:func:`threestudio_perpneg.eval.janus.main`) on that trial. A 2D job runs the paper's 2D protocol
(:func:`threestudio_perpneg.eval.eval2d.main`). Both evaluators are imported only when a job needs
them, so planning and ``dry_run=true`` work without them.

Layout of ``out_dir``::

    jobs.json / jobs-<k>.json   the plan of the last invocation (multirun: of Hydra job k)
    runs/<job id>/              threestudio trial folder (3D) or eval2d output (2D)
    eval/<job id>/              eval3d output of a 3D job
    logs/<job id>.log           launch.py's stdout + stderr
    done/<job id>.json          done-marker: job, fingerprint, run and evaluation results
    failed/<job id>.json        last failure of a job that has no done-marker
    report/report.md            comparison report (+ report.json, strips/, grids/)

Resumability: a done-marker is written atomically (temporary file, then ``os.replace``) after the
run (and its evaluation) finished; a job with a done-marker is skipped. A marker whose run finished
but whose evaluation failed or was disabled gets only the evaluation re-run when evaluation is on.
A marker written for different settings (its fingerprint differs: e.g. another ``max_steps``) is an
error: use another ``sweep_name`` / ``out_dir``.

Hydra is imported lazily (only :func:`main` and the callback module need it): the rest of the
sweep takes any mapping (an OmegaConf ``DictConfig`` or a plain ``dict``).

Modules: :mod:`.settings` (config keys checked into :class:`Settings`), :mod:`.plan` (the jobs),
:mod:`.gpus` (GPU per slot), :mod:`.run` (running jobs, markers, :func:`run_sweep`),
:mod:`.report` (the comparison report); this module is the Hydra entry point and re-exports
their public names.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, Optional, Sequence, Tuple

from ...common.io import output_folder
from .gpus import gpu_for_slot
from .plan import Job, plan_jobs, shard_of
from .report import write_report
from .run import Runner, run_sweep, summarize_eval
from .settings import (
    CONF_DIR,
    KINDS,
    METHODS,
    PROG,
    STAGES,
    PromptItem,
    Settings,
    SweepError,
    load_settings,
    object_name,
    parse_seeds,
)

__all__ = [
    "PROG",
    "METHODS",
    "KINDS",
    "STAGES",
    "CONF_DIR",
    "SweepError",
    "PromptItem",
    "Runner",
    "Settings",
    "Job",
    "parse_seeds",
    "object_name",
    "load_settings",
    "plan_jobs",
    "gpu_for_slot",
    "run_sweep",
    "shard_of",
    "summarize_eval",
    "write_report",
    "main",
]


# --------------------------------------------------------------------------- Hydra entry
def _hydra_context() -> Tuple[Optional[int], bool]:
    """(Hydra job number in multirun or None, whether Hydra is running us)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:  # pragma: no cover
        return None, False
    if not HydraConfig.initialized():
        return None, False
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        return int(hc.job.num), True
    return None, True


def _task(cfg: Any) -> Optional[Dict[str, Any]]:
    job_num, _ = _hydra_context()
    try:
        summary = run_sweep(
            cfg,
            slot=job_num,
            hydra_job=job_num,
            # in multirun the callback writes one report after every Hydra job returned
            write_final_report=job_num is None,
        )
    except SweepError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        sys.exit(2)
    if job_num is None and summary.get("failed"):
        sys.exit(1)
    return summary


def _out_dir_problem(overrides: Sequence[str]) -> Optional[str]:
    """Why the ``out_dir`` of the command line (default ``sweeps/...``) cannot be a folder (it or
    a parent is a file), or None. Interpolations (``${...}``) are checked up to their start."""
    given = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("out_dir=")]
    path = given[-1] if given else "sweeps"
    path = path.split("${", 1)[0] or "."
    try:
        output_folder("out_dir", path, create=False, error=SweepError)
    except SweepError as err:
        return str(err)
    return None


def _one_line(text: str) -> str:
    """Hydra's multi-line message as one line (its config search path left out)."""
    lines = [ln.strip() for ln in text.split("Config search path:", 1)[0].splitlines()]
    return "; ".join(ln for ln in lines if ln)


def _hydra_error(err: Exception, overrides: Sequence[str]) -> str:
    """One line for an error of Hydra's composition of the config (an unknown key or config
    group option, an override that does not parse): it names the key, the value and what was
    expected."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options:
        group, _, option = err.missing_cfg_file.rpartition("/")
        return f"{group}: unknown option {option!r}, expected one of {', '.join(err.options)}"
    if isinstance(err, OverrideParseException):
        reason = err.message.strip().splitlines()[0] if err.message.strip() else "bad syntax"
        return f"{err.override!r}: {reason} (expected a Hydra override KEY=VALUE)"
    cause = err.__cause__
    key = getattr(cause, "full_key", None)
    parent = getattr(cause, "parent_node", None)
    if key and parent is not None and "not in struct" in str(cause):
        given = [o for o in overrides if o.split("=", 1)[0] == key]
        known = ", ".join(str(k) for k in parent.keys() if k != "hydra")
        value = f" in {given[-1]!r}" if given else ""
        # ``+key=...`` adds a key inside a group (job, report, ...); a new top-level key is
        # refused by load_settings, so it is not suggested there.
        hint = f" (+{key}=... adds a new key)" if "." in str(key) else ""
        return f"{key}: unknown key{value}, expected one of {known}{hint}"
    key = getattr(err, "full_key", None)
    if key:  # an OmegaConf error (e.g. an interpolation): its first line and the key
        return f"{str(err).strip().splitlines()[0]} (in {key})"
    return _one_line(str(err))


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Hydra entry point: ``python -m threestudio_perpneg.eval.sweep [overrides] [-m]``.

    ``argv`` (without the program name) replaces ``sys.argv[1:]`` for this call; ``prog`` names
    the program in Hydra's messages. Returns the exit code: 0, 1 when a job failed (single run),
    2 for a configuration error (the message names the key)."""
    try:
        import hydra
    except ImportError:
        print(
            f"{PROG}: error: the sweep needs hydra-core and its launchers, which are not "
            'installed (in the clone: pip install -e ".[sweep]")',
            file=sys.stderr,
        )
        return 2
    saved = sys.argv
    args = list(saved[1:] if argv is None else argv)
    problem = _out_dir_problem(args)
    if problem:  # Hydra would create <out_dir>/hydra/... first and fail with a traceback
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 2
    # An absolute config_path: Hydra reads conf/ as files (a module path would need conf/ to be
    # an importable package).
    entry = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(_task)
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    sys.argv = [prog or (saved[0] if saved else PROG), *args]
    # Hydra prints its own errors over several lines and exits 1; with HYDRA_FULL_ERROR it
    # raises them instead, so a bad override gets our one line and exit code 2. A user who set
    # HYDRA_FULL_ERROR gets Hydra's full error, as Hydra documents.
    full_error = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        entry()
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except (HydraException, OmegaConfBaseException) as err:
        if full_error:
            raise
        print(f"{PROG}: error: {_hydra_error(err, args)}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_error
    return 0
