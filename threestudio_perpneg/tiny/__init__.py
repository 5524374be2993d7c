"""Tiny seeded model builders (Stable Diffusion, CLIP, DeepFloyd IF) for tests, smoke runs and demos."""

from .builders import (
    SCHEDULER_CONFIG,
    VAE_CONFIG,
    build_tiny_clip,
    build_tiny_deepfloyd_if,
    build_tiny_stable_diffusion,
)

__all__ = [
    "SCHEDULER_CONFIG",
    "VAE_CONFIG",
    "build_tiny_clip",
    "build_tiny_deepfloyd_if",
    "build_tiny_stable_diffusion",
]
