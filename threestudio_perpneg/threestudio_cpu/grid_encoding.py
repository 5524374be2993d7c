"""A multiresolution grid encoding in torch: the CPU stand-in for tinycudann's ``HashGrid``.

threestudio's NeRF geometry encodes positions with tcnn's hash grid: per level, a table of
learned feature vectors at the corners of a grid cell, trilinearly interpolated. Its features are
local: a camera's gradient moves the cells it sees. A frequency encoding (the only encoding
threestudio implements in torch) feeds a global MLP instead, whose weights every camera moves at
once: under score distillation from random azimuths it learns the azimuthal mean (a head that
looks the same from every side). This module keeps the grid's locality on a CPU:

* :class:`TorchGridEncoding`: levels ``l = 0..L-1`` of resolution ``ceil(base·s^l) + 1`` corners
  per axis; a level whose corners fit ``2^log2_hashmap_size`` entries is dense, a finer one is
  hashed with tcnn's spatial hash (coordinates times 1, 2654435761, 805459861, XORed); tables
  start uniform in ±1e-4 as tcnn's. With ``start_level`` / ``start_step`` / ``update_steps`` it is
  threestudio's ``ProgressiveBandHashGrid`` (finer levels unmasked as training goes on).
* :func:`install`: threestudio builds encodings with ``get_encoding(n_input_dims, config)``,
  imported by name into its geometry modules; ``install`` wraps it there so that ``HashGrid``,
  ``Grid`` and ``ProgressiveBandHashGrid`` configs get a :class:`TorchGridEncoding` (other
  encodings are threestudio's own), wrapped in threestudio's ``CompositeEncoding`` as usual.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Dict, List

import torch
from torch import Tensor, nn

__all__ = ["GRID_OTYPES", "TorchGridEncoding", "install", "installed"]

#: Encoding types that are tcnn grids (replaced by :class:`TorchGridEncoding`).
GRID_OTYPES = ("HashGrid", "Grid", "DenseGrid", "ProgressiveBandHashGrid")
_PRIMES = (1, 2654435761, 805459861)
#: The 8 corners of a grid cell as (dx, dy, dz) offsets.
_CORNERS = torch.tensor([[dx, dy, dz] for dx in (0, 1) for dy in (0, 1) for dz in (0, 1)])


class TorchGridEncoding(nn.Module):
    """tcnn's multiresolution (hash) grid in torch; see the module docstring.

    Args:
        n_input_dims: 3 (positions in [0, 1]³, as threestudio normalises them).
        config: tcnn's encoding config: ``n_levels``, ``n_features_per_level``,
            ``log2_hashmap_size``, ``base_resolution``, ``per_level_scale``; optional
            ``start_level``, ``start_step``, ``update_steps`` (progressive levels).
    """

    def __init__(self, n_input_dims: int, config: Dict[str, Any]) -> None:
        super().__init__()
        if n_input_dims != 3:
            raise ValueError(f"n_input_dims: expected 3 (positions), got {n_input_dims!r}")
        for key in ("n_levels", "n_features_per_level", "base_resolution"):
            v = config.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{key}: expected an integer >= 1, got {v!r}")
        self.n_input_dims = n_input_dims
        self.n_levels = int(config["n_levels"])
        self.n_features = int(config["n_features_per_level"])
        self.n_output_dims = self.n_levels * self.n_features
        size = 2 ** int(config.get("log2_hashmap_size", 19))
        scale = float(config.get("per_level_scale", 2.0))
        base = int(config["base_resolution"])
        self.resolutions: List[int] = []
        self.hashed: List[bool] = []
        self.tables = nn.ParameterList()
        for level in range(self.n_levels):
            res = int(math.ceil(base * scale**level)) + 1
            dense = res**3 <= size
            self.resolutions.append(res)
            self.hashed.append(not dense)
            table = torch.empty(res**3 if dense else size, self.n_features)
            nn.init.uniform_(table, -1e-4, 1e-4)
            self.tables.append(nn.Parameter(table))
        self.start_level = int(config.get("start_level", self.n_levels))
        self.start_step = int(config.get("start_step", 0))
        self.update_steps = max(int(config.get("update_steps", 1)), 1)
        self.progressive = "start_level" in config
        self.current_level = self.start_level if self.progressive else self.n_levels

    def _index(self, corner: Tensor, level: int) -> Tensor:
        res = self.resolutions[level]
        if not self.hashed[level]:
            return corner[:, 0] + corner[:, 1] * res + corner[:, 2] * res * res
        h = corner[:, 0] * _PRIMES[0]
        h = torch.bitwise_xor(h, corner[:, 1] * _PRIMES[1])
        h = torch.bitwise_xor(h, corner[:, 2] * _PRIMES[2])
        return torch.remainder(h, self.tables[level].shape[0])

    def forward(self, x: Tensor) -> Tensor:
        """Features ``[N, n_levels·n_features]`` of positions ``x`` ``[N, 3]`` in [0, 1]."""
        x = x.reshape(-1, 3).clamp(0.0, 1.0)
        out = []
        for level in range(self.n_levels):
            if level >= self.current_level:  # masked (not yet unlocked) levels are zeros
                out.append(x.new_zeros(x.shape[0], self.n_features))
                continue
            res = self.resolutions[level]
            pos = x * (res - 1)
            lo = pos.detach().floor().clamp(0, res - 2).long()
            frac = pos - lo.to(pos.dtype)
            corners = lo[:, None, :] + _CORNERS.to(x.device)[None]  # [N, 8, 3]
            idx = self._index(corners.reshape(-1, 3), level).reshape(-1, 8)
            # Trilinear weights: prod over axes of frac (corner bit 1) or 1 - frac (bit 0).
            bits = _CORNERS.to(x.device, x.dtype)[None]  # [1, 8, 3]
            w = (bits * frac[:, None, :] + (1 - bits) * (1 - frac[:, None, :])).prod(dim=-1)
            feats = (w[..., None] * self.tables[level][idx].to(x.dtype)).sum(dim=1)
            out.append(feats)
        return torch.cat(out, dim=-1)

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        """Unlock finer levels as threestudio's ``ProgressiveBandHashGrid`` does."""
        if self.progressive:
            self.current_level = min(
                self.start_level + max(global_step - self.start_step, 0) // self.update_steps,
                self.n_levels,
            )


def installed() -> bool:
    """Whether :func:`install` has wrapped threestudio's ``get_encoding``."""
    networks = sys.modules.get("threestudio.models.networks")
    return bool(networks is not None and getattr(networks.get_encoding, "_torch_grid", False))


def install() -> int:
    """Route threestudio's grid encodings to :class:`TorchGridEncoding` (idempotent); returns the
    number of modules whose ``get_encoding`` was replaced. threestudio must be imported."""
    from threestudio.models import networks
    from threestudio.utils.config import config_to_primitive

    original = networks.get_encoding
    if getattr(original, "_torch_grid", False):
        return 0

    from threestudio.utils.base import Updateable

    # An Updateable, so that threestudio's update_step reaches the progressive levels.
    grid_class = type("TorchGridEncoding", (TorchGridEncoding, Updateable), {})

    def get_encoding(n_input_dims: int, config: Any) -> nn.Module:
        if config.otype not in GRID_OTYPES:
            return original(n_input_dims, config)
        encoding = grid_class(n_input_dims, config_to_primitive(config))
        # threestudio's CompositeEncoding wraps every encoding (include_xyz, update_step).
        return networks.CompositeEncoding(
            encoding,
            include_xyz=config.get("include_xyz", False),
            xyz_scale=2.0,
            xyz_offset=-1.0,
        )

    get_encoding._torch_grid = True  # type: ignore[attr-defined]
    replaced = 0
    for name, module in list(sys.modules.items()):
        if name.startswith("threestudio") and getattr(module, "get_encoding", None) is original:
            module.get_encoding = get_encoding  # type: ignore[attr-defined]
            replaced += 1
    return replaced
