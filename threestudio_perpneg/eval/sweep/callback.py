"""Hydra callback of the sweep: one comparison report after a multirun (``-m``).

In multirun every Hydra job (shard) only runs its jobs; the driver process calls
:meth:`ReportCallback.on_multirun_end` once every job returned (the basic and joblib launchers
return when their jobs finished; the submitit launcher waits for the SLURM array), and the report
is built from all done-markers under ``out_dir``. Imported by Hydra only (hydra is a dependency here).
"""

from __future__ import annotations

import logging
from typing import Any, List, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def _swept_keys(config: DictConfig, keys: Sequence[str]) -> List[str]:
    """Which of ``keys`` the multirun sweeps (``-m out_dir=a,b``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        task = list(config.hydra.overrides.task)
        parsed = OverridesParser.create().parse_overrides(task)
    except Exception:  # pragma: no cover - no override information: assume none swept
        return []
    return sorted(
        {o.key_or_group for o in parsed if o.is_sweep_override() and o.key_or_group in keys}
    )


class ReportCallback(Callback):
    """Writes ``<out_dir>/report/report.md`` at the end of a multirun (not for dry runs)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from .app import PROG, SweepError, load_settings, write_report

        try:
            s = load_settings(config)
        except SweepError as err:  # the jobs reported it already
            log.error("%s: no report: %s", PROG, err)
            return
        if s.dry_run or not s.report["enabled"]:
            return
        swept = _swept_keys(config, ("out_dir", "sweep_name"))
        if swept:
            log.warning(
                "%s: %s swept: the jobs wrote to several folders; build each report with "
                "stage=report out_dir=<folder>",
                PROG,
                ", ".join(swept),
            )
            return
        path = write_report(s.out_dir, frames=s.report["frames"], thumb_size=s.report["thumb_size"])
        print(f"{PROG}: report written to {path}")
