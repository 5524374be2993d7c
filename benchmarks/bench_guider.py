"""Cost per denoising step of PerpNegGuidance against diffusers' ClassifierFreeGuidance.

Both guiders run on the same tiny random SDXL modular pipeline (CPU, one thread), in one run;
prints UNet rows per step and the time-per-step ratio. ``python benchmarks/bench_guider.py``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any, List


def _time_per_step(pipe: Any, steps: int, repeats: int, **kwargs: Any) -> tuple[float, float]:
    import torch

    rows: List[int] = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, a: rows.append(int(a[0].shape[0])))
    times = []
    for _ in range(repeats):
        rows.clear()
        start = time.perf_counter()
        pipe(
            num_inference_steps=steps,
            output="latents",
            generator=torch.Generator().manual_seed(0),
            **kwargs,
        )
        times.append((time.perf_counter() - start) / steps)
    hook.remove()
    return statistics.median(times), sum(rows) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--negatives", type=int, default=1, help="K perpendicular negatives")
    args = parser.parse_args()

    import torch
    from diffusers import ClassifierFreeGuidance
    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks

    from threestudio_perpneg.guiders import PerpNegGuidance, add_perp_neg
    from threestudio_perpneg.tiny.modular import build_tiny_sdxl_modular

    torch.set_num_threads(1)
    folder = tempfile.mkdtemp(prefix="bench-guider-")
    prompts = dict(prompt=["a cat", "a dog"], num_images_per_prompt=2)
    cfg_pipe = build_tiny_sdxl_modular(folder, blocks=StableDiffusionXLAutoBlocks())
    cfg_pipe.update_components(guider=ClassifierFreeGuidance(guidance_scale=7.5))
    pn_pipe = build_tiny_sdxl_modular(folder, blocks=add_perp_neg(StableDiffusionXLAutoBlocks()))
    k = args.negatives
    pn_pipe.update_components(
        guider=PerpNegGuidance(guidance_scale=7.5, negative_weights=[-1.0] * k)
    )
    negs = dict(negative_prompt="front view", perp_neg_prompts=["back view"] * (k - 1))
    _time_per_step(cfg_pipe, 1, 1, **prompts)  # warm-up
    _time_per_step(pn_pipe, 1, 1, **prompts, **negs)
    t_cfg, r_cfg = _time_per_step(cfg_pipe, args.steps, args.repeats, **prompts)
    t_pn, r_pn = _time_per_step(pn_pipe, args.steps, args.repeats, **prompts, **negs)
    print(
        f"tiny SDXL modular pipeline, 4 samples (2 prompts x 2), {args.steps} steps, median of {args.repeats}"
    )
    print(f"ClassifierFreeGuidance: {r_cfg:.0f} UNet rows/step, {1e3 * t_cfg:.1f} ms/step")
    print(f"PerpNegGuidance (K={k}): {r_pn:.0f} UNet rows/step, {1e3 * t_pn:.1f} ms/step")
    print(f"ratio PerpNeg/CFG: rows {r_pn / r_cfg:.2f}, time per step {t_pn / t_cfg:.2f}")


if __name__ == "__main__":
    main()
