"""GPUs of the sweep's jobs: which GPU a Hydra job slot gets and pinning in-process evaluators to
it (``CUDA_VISIBLE_DEVICES``)."""

from __future__ import annotations

import os
import sys
from typing import Any, Mapping, Optional

from .settings import SweepError

__all__ = ["gpu_for_slot", "pin_process_gpu"]


def gpu_for_slot(
    gpus: Optional[int], slot: int, env: Optional[Mapping[str, str]] = None
) -> Optional[str]:
    """``CUDA_VISIBLE_DEVICES`` for Hydra job / shard ``slot``: entry ``slot % gpus`` of the
    inherited ``CUDA_VISIBLE_DEVICES`` when set (SLURM, a shared machine), else ``slot % gpus``;
    None when ``gpus`` is None (leave the environment alone)."""
    if gpus is None:
        return None
    if env is None:
        visible = _inherited_visible_devices()
    else:
        visible = env.get("CUDA_VISIBLE_DEVICES", "")
    inherited = [g.strip() for g in visible.split(",") if g.strip()]
    if inherited:
        if gpus > len(inherited):
            raise SweepError(
                f"gpus: {gpus} GPUs asked for, but CUDA_VISIBLE_DEVICES={visible!r} lists "
                f"{len(inherited)}"
            )
        return inherited[slot % gpus]
    return str(slot % gpus)


#: CUDA_VISIBLE_DEVICES as it was before :func:`pin_process_gpu` changed it in this process
#: (the basic launcher runs every Hydra job in one process, joblib reuses its workers).
_UNSET = "\0unset"
_inherited_cvd = _UNSET


def _inherited_visible_devices() -> str:
    if _inherited_cvd != _UNSET:
        return _inherited_cvd
    return os.environ.get("CUDA_VISIBLE_DEVICES", "")


def pin_process_gpu(job: Any) -> None:
    """In-process evaluators (eval2d, eval3d) use the job's GPU: set CUDA_VISIBLE_DEVICES in this
    process while CUDA is not initialised yet (later calls keep the first GPU)."""
    global _inherited_cvd
    if job.gpu is None:
        return
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            return
    except Exception:  # pragma: no cover - an odd torch build: leave the environment alone
        return
    if _inherited_cvd == _UNSET:
        _inherited_cvd = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    os.environ["CUDA_VISIBLE_DEVICES"] = job.gpu
