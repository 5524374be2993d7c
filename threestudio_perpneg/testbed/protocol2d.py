"""2D protocol of the Janus testbed: the prior's view bias under plain classifier-free guidance.

For every identity word the protocol samples the prior with the base prompt (no view words) and
with the guidance's view prompts ``"<prompt>, back view"`` / ``"<prompt>, side view"``
(threestudio's suffixes), classifies the samples with the testbed classifier and reports

* ``front_fraction_noview``: share of the no-view samples classified front (the canonical bias);
* ``back_success_cfg`` / ``side_success_cfg``: share of the back / side requests classified back /
  side (how well plain CFG can ask for a view);

each with n samples per cell (identities in turn), a Wilson 95 % interval and the fraction whose
identity was kept. Sampling is DDIM (η = 0) from seeded noise with
ε̂ = ε_u + s·(ε_c − ε_u) computed by :func:`~threestudio_perpneg.core.guidance.perp_neg_guidance`
(no negatives: plain CFG), s in the diffusers / paper convention (default 7.5, as eval2d).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..common.io import pil_nearest
from ..core.guidance import perp_neg_guidance
from ..eval.stats import wilson_interval

__all__ = ["CELLS", "BiasCell", "sample_cfg", "measure_prior_bias", "bias_summary"]

#: (cell key, requested view or None, the label that counts as success).
CELLS: Tuple[Tuple[str, Optional[str], str], ...] = (
    ("front_fraction_noview", None, "front"),
    ("back_success_cfg", "back", "back"),
    ("side_success_cfg", "side", "side"),
)


@dataclass
class BiasCell:
    """One cell of the prior-bias table.

    Args:
        key: ``front_fraction_noview``, ``back_success_cfg`` or ``side_success_cfg``.
        view: requested view (None: no view words).
        target: the classified view that counts as a success.
        n: samples.
        successes: samples classified ``target``.
        identity_kept: samples classified as the prompt's identity.
        view_counts: classified view -> count.
    """

    key: str
    view: Optional[str]
    target: str
    n: int
    successes: int
    identity_kept: int
    view_counts: Dict[str, int]

    @property
    def rate(self) -> float:
        return self.successes / self.n if self.n else 0.0

    def to_dict(self) -> Dict[str, Any]:
        lo, hi = wilson_interval(self.successes, self.n)
        return {
            "key": self.key,
            "view": self.view,
            "target": self.target,
            "n": self.n,
            "successes": self.successes,
            "rate": self.rate,
            "ci95": [lo, hi],
            "identity_kept": self.identity_kept,
            "view_counts": dict(self.view_counts),
        }


def _check_positive(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}: expected a positive integer, got {value!r}")
    return value


@torch.no_grad()
def sample_cfg(
    unet: Any,
    scheduler_config: Any,
    cond: Tensor,
    uncond: Tensor,
    guidance_scale: float,
    *,
    steps: int = 50,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """DDIM (η = 0) samples ``[B, 3, R, R]`` in [0, 1] with plain CFG, one UNet call per step.

    Args:
        unet: the prior's UNet (ε prediction, 3 channels, ``sample_size`` R).
        scheduler_config: the prior's scheduler config (a DDIM scheduler is built from it).
        cond: text embeddings ``[B, L, D]``.
        uncond: the empty prompt's embedding ``[L, D]`` (or ``[B, L, D]``).
        guidance_scale: s of ε_u + s·(ε_c − ε_u).
        steps: DDIM steps.
        generator: seeds the initial noise.
    """
    from diffusers import DDIMScheduler

    _check_positive("steps", steps)
    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps)
    b = cond.shape[0]
    size = int(unet.config.sample_size)
    x = torch.randn((b, 3, size, size), generator=generator)
    unc = uncond.expand(b, -1, -1) if uncond.dim() == 2 else uncond
    text = torch.cat([unc, cond])
    for t in sched.timesteps:
        eps = unet(torch.cat([x, x]), t, encoder_hidden_states=text).sample
        eps_u, eps_c = eps.chunk(2)
        eps_hat = perp_neg_guidance(eps_u, eps_c, None, None, float(guidance_scale))
        x = sched.step(eps_hat, t, x, eta=0.0).prev_sample
    return (x / 2 + 0.5).clamp(0, 1)


def measure_prior_bias(
    prior_path: str | os.PathLike,
    classifier: Any,
    *,
    n: int = 128,
    guidance_scale: float = 7.5,
    steps: int = 50,
    seed: int = 0,
    batch_size: int = 64,
    identities: Optional[Sequence[str]] = None,
    progress: bool = False,
) -> Tuple[List[BiasCell], Dict[str, Tensor]]:
    """The prior-bias cells of a testbed prior folder, and the samples per cell.

    Args:
        prior_path: a testbed prior folder (``testbed.json`` names its dataset config).
        classifier: an object with ``classify(images in [0, 1]) -> (views, view_probs,
            identities, identity_probs)`` (:func:`~threestudio_perpneg.testbed.classifier.load_classifier`).
        n: samples per cell (identities in turn; ≥ 128 for the reported table).
        guidance_scale: CFG scale s (diffusers convention).
        steps: DDIM steps.
        seed: seed of the initial noise; each cell uses the same noise (paired comparison).
        batch_size: samples per UNet batch (twice that many rows per call).
        identities: identity words (default: the dataset config's).
        progress: a tqdm bar over the batches.
    """
    from diffusers import UNet2DConditionModel
    from tqdm.auto import tqdm

    from ..core.text import encode_prompts, resolve_pretrained
    from .dataset import DatasetConfig, base_prompt, view_prompt
    from .prior import load_testbed_config

    _check_positive("n", n)
    _check_positive("batch_size", batch_size)
    path = resolve_pretrained(str(prior_path), key="prior")
    data = DatasetConfig.from_dict(load_testbed_config(path)["dataset"])
    names = list(identities or data.identities)
    unknown = [x for x in names if x not in data.identities]
    if unknown:
        raise ValueError(f"identities: {unknown} not in the prior's identities {data.identities}")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").eval()
    from diffusers import DDPMScheduler

    sched_cfg = DDPMScheduler.from_pretrained(path, subfolder="scheduler").config
    prompts = {
        (ident, view): view_prompt(base_prompt(data, ident), view)
        for ident in names
        for _, view, _ in CELLS
    }
    texts = list(dict.fromkeys(prompts.values()))
    emb = encode_prompts(path, [""] + texts)
    uncond, by_text = emb[0], dict(zip(texts, emb[1:]))

    cells: List[BiasCell] = []
    samples: Dict[str, Tensor] = {}
    batches = [(s, min(batch_size, n - s)) for s in range(0, n, batch_size)]
    bar = tqdm(total=len(CELLS) * len(batches), desc="prior bias", disable=not progress)
    for key, view, target in CELLS:
        idents = [names[i % len(names)] for i in range(n)]
        images = []
        for b, (start, size) in enumerate(batches):
            cond = torch.stack([by_text[prompts[(x, view)]] for x in idents[start : start + size]])
            gen = torch.Generator().manual_seed(seed * 100003 + b)
            images.append(
                sample_cfg(
                    unet, sched_cfg, cond, uncond, guidance_scale, steps=steps, generator=gen
                )
            )
            bar.update(1)
        x = torch.cat(images)
        pred = classifier.classify(x)
        views, ids = list(pred[0]), list(pred[2])
        counts: Dict[str, int] = {}
        for v in views:
            counts[v] = counts.get(v, 0) + 1
        cells.append(
            BiasCell(
                key=key,
                view=view,
                target=target,
                n=n,
                successes=sum(v == target for v in views),
                identity_kept=sum(a == b for a, b in zip(ids, idents)),
                view_counts=counts,
            )
        )
        samples[key] = x
    bar.close()
    return cells, samples


def bias_summary(cells: Sequence[BiasCell]) -> Dict[str, Any]:
    """``{front_fraction_noview, back_success_cfg, side_success_cfg}`` rates plus the cells."""
    out: Dict[str, Any] = {c.key: c.rate for c in cells}
    out["cells"] = [c.to_dict() for c in cells]
    return out


def save_sample_grid(samples: Dict[str, Tensor], path: Path, per_row: int = 16) -> None:
    """One row block per cell (the first ``per_row`` × 2 samples), 4× nearest upscaling, PNG."""
    import numpy as np
    from PIL import Image

    from ..commands.common import atomic_write

    rows = []
    for x in samples.values():
        k = min(len(x), 2 * per_row)
        x = x[:k]
        if k < 2 * per_row:
            x = torch.cat([x, torch.ones(2 * per_row - k, *x.shape[1:])])
        r = x.shape[-1]
        grid = x.view(2, per_row, 3, r, r).permute(0, 3, 1, 4, 2).reshape(2 * r, per_row * r, 3)
        rows.append(grid)
        rows.append(torch.zeros(2, per_row * r, 3))
    img = (torch.cat(rows).numpy() * 255).astype(np.uint8)
    pil = Image.fromarray(img)
    pil = pil.resize((pil.width * 4, pil.height * 4), pil_nearest())
    atomic_write(path, lambda tmp: pil.save(tmp, format="PNG"))
