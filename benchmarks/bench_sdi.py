#!/usr/bin/env python
"""Cost of our Perp-Neg SDI step against threestudio's ``stable-diffusion-sdi-guidance`` (Perp-Neg on).

Both guidances run in this process on the same checkpoint (a tiny random SD built on the fly unless
``--model``), the same stock ``stable-diffusion-prompt-processor`` with ``use_perp_neg: true``, and
the same renders, cameras and random draws (torch and Python ``random`` reseeded before each call):
one SDI step is ``inversion_n_steps``-grid DDIM inversion steps plus the final score, each a guided
prediction. Printed per method: UNet rows per step (every row of every UNet call, counted on the
UNet), median wall time of a step (forward + backward to the render), and the ratios ours /
threestudio's. Batch 1 only: threestudio's SDI inversion cannot take a batch of timesteps.

Cameras follow threestudio's ``random-camera-datamodule`` as in ``sdi.yaml`` (elevation
[-10, 45], azimuth [-180, 180], distance [1.5, 2.0]), via ``bench_perpneg.sample_cameras``.
Needs threestudio (``THREESTUDIO_ROOT``) and its pinned environment::

    THREESTUDIO_ROOT=/path/to/threestudio python benchmarks/bench_sdi.py --steps 12

This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests"), str(HERE)]

from bench_perpneg import sample_cameras  # noqa: E402


class RowCounter:
    """Stands in for a UNet and counts the rows (batch entries) of every call."""

    def __init__(self, unet: Any) -> None:
        self.unet = unet
        self.rows = 0

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.rows += int(x.shape[0])
        return self.unet(x, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.unet, name)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="diffusers SD folder (default: tiny random SD)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per method (default 8)")
    p.add_argument("--inversion-n-steps", type=int, default=10, help="SDI grid (default 10)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of cameras and draws (default 0)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from threestudio_perpneg.threestudio_cpu import import_threestudio
    from threestudio_perpneg.threestudio_cpu.system import load_custom_extension

    ts = import_threestudio(os.environ.get("THREESTUDIO_ROOT"))
    load_custom_extension(HERE.parent / "custom" / "threestudio-perpneg")
    work = tempfile.mkdtemp(prefix="bench-sdi-")
    model = args.model
    if model is None:
        from threestudio_perpneg.tiny.builders import build_tiny_stable_diffusion

        model = str(build_tiny_stable_diffusion(Path(work) / "model", seed=0))
    os.chdir(work)  # the stock processor writes .threestudio_cache/ here
    pu = ts.find("stable-diffusion-prompt-processor")(
        {
            "pretrained_model_name_or_path": model,
            "prompt": "a corgi",
            "spawn": False,
            "use_perp_neg": True,
        }
    )()
    common = {
        "pretrained_model_name_or_path": model,
        "half_precision_weights": False,
        "guidance_scale": 7.5,
        "inversion_n_steps": args.inversion_n_steps,
    }
    guidances = {
        "threestudio SDI": ts.find("stable-diffusion-sdi-guidance")(common),
        "ours": ts.find("perpneg-stable-diffusion-sdi-guidance")(common),
        # the paper authors' weights: one view negative at the front and back, two at the side
        "ours (authors)": ts.find("perpneg-stable-diffusion-sdi-guidance")(
            {**common, "perp_neg_scheme": "authors"}
        ),
    }
    counters = {"threestudio SDI": RowCounter(guidances["threestudio SDI"].unet)}
    guidances["threestudio SDI"].unet = counters["threestudio SDI"]
    for name in ("ours", "ours (authors)"):
        counters[name] = RowCounter(guidances[name].engine.unet)
        guidances[name].engine.unet = counters[name]

    gen = torch.Generator().manual_seed(args.seed)
    n = args.steps + 1  # the first step of each method is a warm-up
    elev, azim, dist = sample_cameras(
        n,
        1,
        (-10.0, 45.0),
        (-180.0, 180.0),
        (1.5, 2.0),
        batch_uniform_azimuth=True,
        generator=gen,
    )
    renders = [torch.rand(1, 64, 64, 3, generator=gen) for _ in range(n)]
    times: Dict[str, List[float]] = {k: [] for k in guidances}
    rows: Dict[str, List[int]] = {k: [] for k in guidances}
    for k in range(n):
        order = list(guidances) if k % 2 == 0 else list(reversed(guidances))
        for name in order:
            g, c = guidances[name], counters[name]
            x = renders[k].clone().requires_grad_(True)
            torch.manual_seed(args.seed + k)
            random.seed(args.seed + k)
            before = c.rows
            t0 = time.perf_counter()
            out = g(x, pu, elev[k], azim[k], dist[k], rgb_as_latents=False)
            out["loss_sdi"].backward()
            dt = time.perf_counter() - t0
            if k:
                times[name].append(dt)
                rows[name].append(c.rows - before)
    ref = "threestudio SDI"
    print(
        f"model: {args.model or 'tiny random SD'}; inversion_n_steps {args.inversion_n_steps}; "
        f"batch 1; {args.steps} steps; torch threads {args.threads}"
    )
    print(
        f"{'method':<16} {'rows/step':>10} {'median s/step':>14} {'rows ratio':>11} "
        f"{'time ratio':>11}"
    )
    for name in guidances:
        r = statistics.mean(rows[name])
        t = statistics.median(times[name])
        rr = r / statistics.mean(rows[ref])
        tr = t / statistics.median(times[ref])
        print(f"{name:<16} {r:>10.1f} {t:>14.3f} {rr:>11.3f} {tr:>11.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
