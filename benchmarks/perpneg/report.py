"""The printed tables of part (b): step times, their ratios, the loss check and the cost model."""

from __future__ import annotations

import argparse
import statistics
from typing import Any, Dict, Sequence

import torch

from .cameras import SCHEME_NAMES

GUIDANCE_TITLES = {
    "sd": "SDS",
    "if": "DeepFloyd IF SDS",
    "vsd": "VSD",
}


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = str(cells[0]).ljust(widths[0])
        rest = [str(c).rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join([first, *rest])

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def report(
    guidance: str,
    args: argparse.Namespace,
    res: Dict[str, Any],
    means: Dict[str, float],
    dtype: torch.dtype,
) -> None:
    """Prints part (b) of one guidance."""
    b = args.batch_size
    methods, times, branches = res["methods"], res["times"], res["branches"]
    min_step, max_step = res["min_step"], res["max_step"]
    med = {m: statistics.median(times[m]) for m in methods}
    title = GUIDANCE_TITLES[guidance]
    if guidance == "sd":
        labels = {
            "vanilla": "vanilla SDS (ours, perp_neg=False)",
            "ours-threestudio": "ours Perp-Neg, threestudio weights",
            "ours-authors": "ours Perp-Neg, authors weights",
            "threestudio-4B": "threestudio-style Perp-Neg (4B rows)",
        }
        head = "(b)"
    else:
        labels = {
            "vanilla": f"vanilla {title} (ours, perp_neg=False)",
            "ours-threestudio": "ours Perp-Neg, threestudio weights",
            "ours-authors": "ours Perp-Neg, authors weights",
            "threestudio-4B": "threestudio-style Perp-Neg (4B rows)",
        }
        head = f"(b, {guidance})"
    if args.controls:
        from controls_variants import VARIANTS

        labels.update({name: label for name, (label, _ctl) in VARIANTS.items()})
    step_name = "VSD" if guidance == "vsd" else "SDS"
    print()
    print(
        f"{head} wall time per {step_name} step{'' if guidance in ('sd', 'vsd') else f' ({title})'}: "
        f"{args.steps} camera batches x {args.repeats} repeats after "
        f"{args.warmup} warm-up pass(es), median of repeats"
    )
    print(
        f"  UNet: {res['what']}; {res['params']:.1f}M parameters, "
        f"{str(dtype).replace('torch.', '')}"
        + (f"; LoRA {res['lora_params'] * 1e3:.1f}K parameters" if res["lora_params"] else "")
    )
    if guidance == "sd":
        print(
            f"  step = conditioning + sds_step ({'VAE encode of 512x512 renders' if args.with_vae else 'rgb_as_latents=True, no VAE'}) "
            f"+ backward; guidance_scale {args.guidance_scale}, t in [{min_step}, {max_step}]; "
            f"models built in {res['build_s']:.1f} s"
        )
    elif guidance == "if":
        print(
            "  step = conditioning + if_sds_step (64x64 RGB renders, pixel space, 6-channel UNet) "
            f"+ backward; guidance_scale {res['guidance_scale']}, t in [{min_step}, {max_step}]; "
            f"models built in {res['build_s']:.1f} s"
        )
    else:
        print(
            f"  step = conditioning + vsd_step ({'VAE encode of 512x512 renders' if args.with_vae else 'rgb_as_latents=True, no VAE'}; "
            "pretrained branch + LoRA guided prediction + LoRA loss) + backward of "
            f"loss_vsd + loss_lora; guidance_scale {res['guidance_scale']} (cfg, threestudio's VSD "
            f"default), t in [{min_step}, {max_step}]; models built in {res['build_s']:.1f} s"
        )
    rows_b = []
    for m in methods:
        spread = f"{min(times[m]) * 1e3:.1f}-{max(times[m]) * 1e3:.1f}"
        row = [labels[m], f"{branches[m]:.2f}"]
        if res["lora_rows"] is not None:
            row.append(f"{res['lora_rows'][m]:.2f}")
        row += [
            f"{med[m] * 1e3:.2f}",
            spread,
            f"{med[m] / med['vanilla']:.3f}",
            f"{med[m] / med['threestudio-4B']:.3f}",
        ]
        rows_b.append(row)
    header = ["method", "branches/step"]
    if res["lora_rows"] is not None:
        header.append("LoRA rows/step")
    header += ["median ms", "range ms", "vs vanilla", "vs 4B"]
    print(table(header, rows_b))

    # Equivalence: zero-weight negatives contribute nothing, so ours and the 4B emulation agree.
    losses = res["losses"]
    a_, b_ = losses["ours-threestudio"], losses["threestudio-4B"]
    rel = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a_, b_))
    loss_name = "loss_vsd" if guidance == "vsd" else "loss_sds"
    print()
    print(
        f"check: {loss_name} of ours (threestudio weights) vs the 4B emulation over {len(a_)} steps, "
        f"max relative difference {rel:.2e} (same t and noise; expected ~0 up to float rounding)"
    )
    # Cost model: linear in UNet rows between the vanilla (2B) and 4B measurements.
    t2, t4 = med["vanilla"], med["threestudio-4B"]

    def linear(rows: float) -> float:
        return t2 + (t4 - t2) * (rows - 2 * b) / (2 * b)

    for name in SCHEME_NAMES:
        m = f"ours-{name}"
        print(
            f"{m}: timed batches average {branches[m]:.2f} branches/step (distribution mean "
            f"{means[m]:.2f}); linear-in-rows model predicts {linear(branches[m]) * 1e3:.2f} ms, "
            f"measured {med[m] * 1e3:.2f} ms; at the distribution mean: "
            f"{linear(means[m]) / t2:.3f}x vanilla, {linear(means[m]) / t4:.3f}x the 4B step"
        )
