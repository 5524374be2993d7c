"""Scheduler and dtype names of the 2D sampler and its pipeline loading (diffusers is imported
when a scheduler or a pipeline is built)."""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Union

import torch

__all__ = ["SCHEDULERS", "accepts", "load_pipeline", "make_scheduler", "parse_dtype"]

#: ``scheduler=`` names of :meth:`PerpNegSampler.from_pretrained` → diffusers class names.
SCHEDULERS: Mapping[str, str] = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
}


def make_scheduler(name: str, config: Any) -> Any:
    """A diffusers scheduler by short name (:data:`SCHEDULERS`) built ``from_config(config)``."""
    if name not in SCHEDULERS:
        raise ValueError(
            f"scheduler: unknown scheduler {name!r}, expected one of {list(SCHEDULERS)}"
        )
    import diffusers

    return getattr(diffusers, SCHEDULERS[name]).from_config(config)


def accepts(fn: Any, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def parse_dtype(value: Union[torch.dtype, str]) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}  # fmt: skip
    if value not in names:
        raise ValueError(
            f"torch_dtype: expected a torch.dtype or one of {sorted(names)}, got {value!r}"
        )
    return names[value]


def load_pipeline(
    name_or_path: str, torch_dtype: Union[torch.dtype, str], device: Union[torch.device, str]
) -> Any:
    """A ``StableDiffusionPipeline`` (no safety checker) from a hub id or a local folder.

    Raises:
        `FileNotFoundError`: naming ``model`` when the checkpoint cannot be loaded.
        `ValueError`: naming ``torch_dtype`` for an unknown dtype name.
    """
    from ..core.text import resolve_pretrained

    dtype = parse_dtype(torch_dtype)
    path = resolve_pretrained(name_or_path, key="model (pretrained path)")
    import diffusers.utils
    from diffusers import StableDiffusionPipeline

    # Newer diffusers renamed ``torch_dtype`` to ``dtype`` (the old name warns).
    renamed = hasattr(getattr(diffusers.utils, "deprecation_utils", None), "_resolve_dtype")
    dtype_kwarg = {"dtype" if renamed else "torch_dtype": dtype}
    try:
        pipe: Any = StableDiffusionPipeline.from_pretrained(
            path,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **dtype_kwarg,
        )
    except OSError as err:
        raise FileNotFoundError(
            f"model (pretrained path): could not load {name_or_path!r} as a diffusers Stable "
            "Diffusion checkpoint (a local folder with model_index.json, unet/, vae/, "
            f"text_encoder/, tokenizer/, scheduler/, or a hub id in the local cache): {err}"
        ) from err
    pipe = pipe.to(device)
    return pipe
