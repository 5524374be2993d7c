"""Paper-reproduction sweep (Hydra app): ``python -m threestudio_perpneg.eval.sweep``.

See :mod:`threestudio_perpneg.eval.sweep.app`; the Hydra config tree is ``conf/`` beside this file.
Importing this package does not import hydra (only :func:`main` and the Hydra callback do).
"""

from __future__ import annotations

from .app import (
    CONF_DIR,
    Job,
    Settings,
    SweepError,
    load_settings,
    main,
    parse_seeds,
    plan_jobs,
    run_sweep,
    write_report,
)

__all__ = [
    "CONF_DIR",
    "Job",
    "Settings",
    "SweepError",
    "load_settings",
    "main",
    "parse_seeds",
    "plan_jobs",
    "run_sweep",
    "write_report",
]
