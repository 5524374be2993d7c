"""Test-only harness that runs the real threestudio on a CPU-only machine.

- `stubs.import_threestudio(root)`: import threestudio with stand-ins for CUDA-only packages and
  `get_device` -> cpu.
- `nerfacc_cpu`: pure-torch doubles of nerfacc 0.5.x's CUDA kernels (`install()`, `installed()`).
- `system.make_dreamfusion_system(...)` / `system.fit_steps(...)`: build and train a lift-3D system on CPU.
- `fixtures`: pytest fixtures (import them from `tests/conftest.py`).

Importing this package is cheap (no torch); the heavy modules are imported on use.
"""

from .stubs import StandInUsedError, ThreestudioUnavailable, import_threestudio, patch_get_device

__all__ = ["StandInUsedError", "ThreestudioUnavailable", "import_threestudio", "patch_get_device"]
