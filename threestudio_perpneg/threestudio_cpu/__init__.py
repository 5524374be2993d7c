"""Run the real threestudio on a CPU-only machine: what the testbed's threestudio runner and the
threestudio test tier use.

threestudio needs CUDA for its hash grids (tinycudann), rasteriser (nvdiffrast) and nerfacc's ray
marching kernels, and launch.py hard-codes a GPU trainer. This package swaps only those parts:

* :mod:`.stubs`: ``import_threestudio(root)`` imports threestudio from a checkout
  (``THREESTUDIO_ROOT``) with stand-ins for the CUDA-only packages (any use of one raises) and
  ``get_device`` patched to the CPU;
* :mod:`.nerfacc_cpu`: pure-torch doubles of the few nerfacc 0.5.x kernels the NeRF renderer calls;
* :mod:`.system`: ``make_dreamfusion_system`` builds a threestudio system and data module from a
  threestudio YAML with CPU encodings in place of the hash grid, and ``fit_steps`` trains it with a
  CPU Lightning trainer (launch.py's job).

Importing this package is cheap (no torch); the heavy modules are imported on use. Nothing here is
needed on a GPU, where threestudio's own ``launch.py`` runs the shipped configs unchanged.
"""

from .stubs import StandInUsedError, ThreestudioUnavailable, import_threestudio, patch_get_device

__all__ = ["StandInUsedError", "ThreestudioUnavailable", "import_threestudio", "patch_get_device"]
