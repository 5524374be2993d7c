"""Options and ``main`` of ``benchmarks/bench_perpneg.py``."""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
from typing import Optional, Sequence

import torch

from threestudio_perpneg.core.views import ViewThresholds

from .cameras import sample_cameras
from .counting import count_branches
from .report import report, table
from .timing import GUIDANCES, time_guidance


def quiet_hf() -> None:
    """No download bars, and the commands' quiet default for diffusers/transformers/accelerate."""
    from threestudio_perpneg.commands.quiet import quiet_third_party

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    quiet_third_party()


def parse_args(
    argv: Optional[Sequence[str]] = None, description: Optional[str] = None
) -> argparse.Namespace:
    """The options; ``description`` is the ``--help`` text (bench_perpneg.py's docstring)."""
    p = argparse.ArgumentParser(
        prog="bench_perpneg.py",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--unet", choices=("tiny", "mid", "full"), default="tiny", help="random UNet size"
    )
    p.add_argument(
        "--model",
        default=None,
        help="diffusers folder or cached hub id (real weights; overrides --unet)",
    )
    p.add_argument("--prompt", default="a corgi", help="prompt for CLIP embeddings (tiny/--model)")
    p.add_argument(
        "--guidance",
        choices=tuple(GUIDANCES),
        default="sd",
        help="prior(s) of part (b): Stable Diffusion SDS, DeepFloyd IF SDS, VSD, or all three",
    )
    p.add_argument(
        "--if-model",
        default=None,
        help="DeepFloyd IF stage I folder or cached hub id (default: tiny random IF)",
    )
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--fp16", action="store_true", help="UNet/VAE in float16 (CUDA only)")
    p.add_argument("--steps", type=int, default=6, help="timed camera batches per repeat")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed passes over the camera batches per method"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--batch-size", type=int, default=1, help="cameras per step (threestudio default 1)"
    )
    p.add_argument(
        "--elevation-range",
        type=float,
        nargs=2,
        default=(-10.0, 90.0),
        metavar=("LO", "HI"),
        help="degrees; threestudio datamodule default -10 90 (dreamfusion-sd.yaml: -10 45)",
    )
    p.add_argument(
        "--azimuth-range", type=float, nargs=2, default=(-180.0, 180.0), metavar=("LO", "HI")
    )
    p.add_argument(
        "--camera-distance-range", type=float, nargs=2, default=(1.0, 1.5), metavar=("LO", "HI")
    )
    p.add_argument(
        "--no-batch-uniform-azimuth",
        action="store_true",
        help="i.i.d. azimuths instead of threestudio's default stratified batch",
    )
    p.add_argument("--count-batches", type=int, default=20000, help="camera batches for part (a)")
    p.add_argument("--with-vae", action="store_true", help="encode 512x512 renders with the VAE")
    p.add_argument(
        "--min-weight",
        type=float,
        default=0.0,
        help="ours: skip negatives with |w| <= this (perp_neg_min_weight, default 0)",
    )
    p.add_argument(
        "--controls",
        action="store_true",
        help="also count and time the Perp-Neg controls (sampling one, t windows, weight scale)",
    )
    p.add_argument("--guidance-scale", type=float, default=100.0)
    p.add_argument("--min-step-percent", type=float, default=0.02)
    p.add_argument("--max-step-percent", type=float, default=0.98)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: stable ratios on shared CPUs; 0 keeps torch's default)",
    )
    args = p.parse_args(argv)
    for key in ("steps", "repeats", "batch_size", "count_batches"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')}: expected at least 1, got {getattr(args, key)}")
    if args.warmup < 1:
        p.error(f"--warmup: expected at least 1, got {args.warmup}")
    if not math.isfinite(args.min_weight) or args.min_weight < 0:
        p.error(f"--min-weight: expected a finite number >= 0, got {args.min_weight}")
    lo, hi = args.elevation_range
    if not -90.0 <= lo <= hi <= 90.0:
        p.error(f"--elevation-range: expected -90 <= LO <= HI <= 90, got {lo} {hi}")
    return args


def main(argv: Optional[Sequence[str]] = None, description: Optional[str] = None) -> int:
    args = parse_args(argv, description)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.fp16 and device.type != "cuda":
        print("bench_perpneg: error: --fp16 needs a CUDA device", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = torch.float16 if args.fp16 else torch.float32
    thresholds = ViewThresholds()
    b = args.batch_size

    import diffusers

    quiet_hf()

    print("Perp-Neg benchmark (threestudio_perpneg)")
    print(
        f"  python {platform.python_version()}, torch {torch.__version__}, diffusers "
        f"{diffusers.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f", {torch.get_num_threads()} CPU threads"
    )
    print(
        f"  cameras: threestudio random-camera-datamodule sampler, batch_size {b}, elevation "
        f"{tuple(args.elevation_range)}, azimuth {tuple(args.azimuth_range)}, "
        f"batch_uniform_azimuth {not args.no_batch_uniform_azimuth}; view thresholds "
        f"front {thresholds.front}, back {thresholds.back}, overhead {thresholds.overhead}; "
        f"ours skips negatives with |w| <= {args.min_weight}"
    )

    # (a) counting
    rows, means = count_branches(args, thresholds)
    print()
    print(f"(a) UNet branches per step, mean over {args.count_batches} sampled camera batches")
    print(
        table(
            ["method", "mean", "min", "max", "vs threestudio 4B", "vs vanilla 2B"],
            rows,
        )
    )
    if args.controls:
        from controls_variants import count_rows

        gen = torch.Generator().manual_seed(args.seed + 1)
        elev, azim, _ = sample_cameras(
            args.count_batches,
            b,
            args.elevation_range,
            args.azimuth_range,
            args.camera_distance_range,
            batch_uniform_azimuth=not args.no_batch_uniform_azimuth,
            generator=gen,
        )
        lo, hi = int(1000 * args.min_step_percent), int(1000 * args.max_step_percent)
        print()
        print(
            f"(a, controls) UNet rows per step with the Perp-Neg controls, threestudio weights, "
            f"t ~ U{{{lo}..{hi}}} per sample, same camera batches"
        )
        print(
            table(
                ["variant", "mean", "min", "max", "vs threestudio 4B", "vs vanilla 2B"],
                count_rows(elev, azim, b, thresholds, lo, hi, args.min_weight, args.seed + 5),
            )
        )
    if args.guidance != "sd":
        print(
            "  (the same for every prior: SD, DeepFloyd IF and VSD's pretrained branch; the "
            "branches depend only on the cameras)"
        )

    for guidance in GUIDANCES[args.guidance]:
        if guidance == "vsd":
            print()
            print(
                "(a') VSD: the pretrained branch counts as above (Perp-Neg applies to it only); the "
                "LoRA model adds, per step, 2·B rows of its camera/zero-camera guided prediction "
                f"and B·n rows of its training loss (n = lora_n_timestamp_samples = 1): "
                f"{3 * b} LoRA rows, independent of the cameras and of Perp-Neg"
            )
        with tempfile.TemporaryDirectory(prefix="bench-perpneg-") as workdir:
            result = time_guidance(guidance, args, device, dtype, thresholds, workdir)
        report(guidance, args, result, means, dtype)
    return 0
