"""The one check that the installed diffusers has the guiders and Modular Diffusers APIs."""

from __future__ import annotations

#: First diffusers release with ``diffusers.guiders`` and ``diffusers.modular_pipelines``.
MIN_DIFFUSERS = "0.35.0"


def require_guiders() -> None:
    """Raise one ImportError naming the diffusers version needed when the guiders API is missing."""
    import diffusers

    try:
        import diffusers.guiders.guider_utils  # noqa: F401
        import diffusers.modular_pipelines.modular_pipeline  # noqa: F401
    except ImportError:
        raise ImportError(
            f"threestudio_perpneg.guiders needs diffusers >= {MIN_DIFFUSERS} (diffusers.guiders and "
            f"modular pipelines), found diffusers {diffusers.__version__}; "
            "pip install -U diffusers"
        ) from None
