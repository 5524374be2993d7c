"""Resumable random state of a seeded guidance: derived from the step, so no checkpoint holds it.

A guidance with ``seed`` set draws its timesteps, noise, VAE posterior samples, SDI's inversion
noise, VSD's LoRA draws and the ``perp_neg_sampling: one`` uniforms from a private
``torch.Generator``. threestudio cannot save that generator: ``dreamfusion-system`` builds the
guidance in ``on_fit_start`` (after Lightning has loaded the checkpoint, and a ``BaseObject``
guidance is not in the state dict anyway), and no system hook hands guidance state to the
checkpoint. A generator seeded once at construction would therefore replay the first step's draws
after a ``resume=``.

Instead the generator is re-seeded at every ``update_step`` (threestudio calls it before each
training batch, with the true ``global_step``, also after a resume and when loading ``weights=``)
from ``step_seed(seed, rank, global_step)``: the draws of step ``g`` depend on nothing but the
seed, the DDP rank and ``g``. A resumed run draws exactly what the uninterrupted run drew at the
same step, whatever happened before, and DDP ranks keep distinct streams. The other step state of
a guidance (weight scale, timestep window, gradient clip) is recomputed from ``global_step`` by
``update_step`` as well; the VSD LoRA and its optimizer state are ordinary module parameters and
optimizer state, saved and restored by Lightning when the guidance is built in the system's
``configure`` (``prolificdreamer-system``).

Draws within one step still advance the generator normally (several guidance calls in one step
get different noise). Without ``seed`` the guidance draws from the global RNGs, which threestudio
seeds once per process and Lightning does not restore on resume (see ``docs/reliability.md``).
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional

import torch

__all__ = ["make_generator", "reseed_for_step", "step_seed"]

_MASK63 = (1 << 63) - 1


def step_seed(seed: int, rank: int, global_step: int) -> int:
    """A 63-bit seed for step ``global_step`` of DDP rank ``rank`` of a run seeded with ``seed``.

    A keyed hash (BLAKE2b), stable across processes, Python versions and machines; distinct
    (seed, rank, step) triples give unrelated seeds (no ``seed + rank`` collisions between runs).
    """
    for key, value in (("seed", seed), ("rank", rank), ("global_step", global_step)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
    digest = hashlib.blake2b(
        f"{seed}:{rank}:{global_step}".encode(), digest_size=8, person=b"perpneg-step"
    ).digest()
    return int.from_bytes(digest, "little") & _MASK63


def make_generator(
    seed: Optional[int], rank: int, device: Any, global_step: int = 0
) -> Optional[torch.Generator]:
    """The private generator of a guidance in its state at the start of ``global_step``; ``None``
    without a seed (the guidance then draws from the global RNGs)."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an integer or null, got {seed!r}")
    generator = torch.Generator(device=device)
    generator.manual_seed(step_seed(seed, rank, global_step))
    return generator


def reseed_for_step(
    generator: Optional[torch.Generator], seed: Any, rank: int, global_step: int
) -> None:
    """Puts ``generator`` in its state at the start of ``global_step`` (no-op without a seed)."""
    if generator is None or seed is None:
        return
    generator.manual_seed(step_seed(int(seed), rank, int(global_step)))
