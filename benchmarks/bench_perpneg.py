#!/usr/bin/env python
"""Cost of our Perp-Neg SDS step against vanilla SDS and threestudio's built-in Perp-Neg.

Two parts, both over threestudio's random-camera distribution (``random-camera-datamodule``):

(a) UNet branches per step, pure counting over many sampled camera batches: vanilla SDS evaluates
    2·B branches, threestudio's built-in Perp-Neg always 4·B (positive, unconditional and two view
    negatives per sample, overhead views included with zero-weight dummies), ours 2·B plus one per
    negative whose weight is non-zero, for both weight schemes (threestudio's and the authors').

(b) Wall time of one SDS step (conditioning + :func:`sds_step` + backward to the render), in the
    same run on the same UNet: vanilla SDS (our engine with ``perp_neg=False``), ours, and a
    threestudio-style step emulated with the same engine and a batch of 4·B UNet rows (the two
    view negatives of every sample are evaluated, zero weights included, as threestudio does).
    Warm-up, then several repeats over the same camera batches with the same timesteps and noise;
    median per-step times and their ratios are printed.

With ``--guidance if|vsd|all`` part (b) is repeated for DeepFloyd IF stage I SDS
(:func:`~threestudio_perpneg.engines.pixel.if_sds_step`, pixel space, tiny random IF from
:func:`~threestudio_perpneg.tiny.builders.build_tiny_deepfloyd_if` unless ``--if-model``) and for VSD
(:func:`~threestudio_perpneg.engines.vsd.vsd_step` with a :class:`~threestudio_perpneg.engines.vsd.LoRAUNet` on the
same SD UNet; the table adds the LoRA rows per step, 2·B guided + B training, which Perp-Neg leaves
alone). Part (a) is the same for every prior: it depends only on the cameras.

Camera sampling follows threestudio's ``RandomCameraIterableDataset.collate``: elevation is, per
batch with probability 1/2, uniform in degrees over ``elevation_range``, otherwise uniform on the
sphere (inverse-sine sampling); azimuth is uniform over ``azimuth_range`` and, with
``batch_uniform_azimuth`` (threestudio's default), stratified so a batch covers the whole range.
threestudio's datamodule defaults are ``elevation_range=(-10, 90)``, ``batch_size=1``;
``configs/dreamfusion-sd.yaml`` uses ``elevation_range: [-10, 45]``.

Examples::

    python benchmarks/bench_perpneg.py                      # tiny random SD, CPU, < 1 minute
    python benchmarks/bench_perpneg.py --guidance all       # SD, DeepFloyd IF and VSD, < 3 minutes
    python benchmarks/bench_perpneg.py --unet mid           # intermediate random UNet, CPU
    python benchmarks/bench_perpneg.py --unet full --device cuda --fp16 --batch-size 4
    python benchmarks/bench_perpneg.py --model stabilityai/stable-diffusion-2-1-base --fp16

With ``--controls`` both parts add the Perp-Neg controls of issue 12 (``perp_neg_sampling: one``,
two ``perp_neg_t_range`` windows, a decaying ``perp_neg_weight_scale``; see ``controls_variants.py``)
on the ``threestudio`` weights: rows per step over the camera and timestep distribution, and their
step time against vanilla and the threestudio-style 4·B step in the same run.

This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import sys

# The parts live in benchmarks/perpneg/ (cameras, models, counting, timing, report, cli); this
# script's folder is on sys.path when it runs, and bench_sdi.py imports sample_cameras from here.
from perpneg.cameras import sample_cameras
from perpneg.cli import main

__all__ = ["main", "sample_cameras"]

if __name__ == "__main__":
    sys.exit(main(description=__doc__))
