"""The torch multiresolution grid that stands in for tcnn's hash grid on CPU.

Expected values are written out by hand here: trilinear interpolation of the corner entries, the
spatial hash of tcnn, threestudio's progressive-level rule.
"""

from __future__ import annotations

import pytest
import torch

from threestudio_perpneg.threestudio_cpu.grid_encoding import TorchGridEncoding

DENSE = {
    "n_levels": 2,
    "n_features_per_level": 2,
    "log2_hashmap_size": 12,  # 4096 entries: 5^3 and 9^3 corners fit, both levels dense
    "base_resolution": 4,
    "per_level_scale": 2.0,
}


def _random_tables(enc: TorchGridEncoding) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for table in enc.tables:
            table.copy_(torch.randn(table.shape, generator=g))


def test_dense_levels_interpolate_their_corners_trilinearly() -> None:
    enc = TorchGridEncoding(3, DENSE)
    assert enc.resolutions == [5, 9] and enc.hashed == [False, False]
    assert enc.n_output_dims == 4
    _random_tables(enc)
    res = 5
    table = enc.tables[0].detach()

    def entry(i: int, j: int, k: int) -> torch.Tensor:
        return table[i + j * res + k * res * res]

    # A grid corner reads its own entry.
    x = torch.tensor([[1 / 4, 2 / 4, 3 / 4]])
    torch.testing.assert_close(enc(x)[0, :2], entry(1, 2, 3))
    # A cell centre reads the mean of its 8 corners; a point at fractions (f, g, h) the
    # trilinear blend, written out corner by corner.
    f, g_, h = 0.25, 0.5, 0.9
    x = torch.tensor([[(1 + f) / 4, (2 + g_) / 4, (0 + h) / 4]])
    expected = torch.zeros(2)
    for di in (0, 1):
        for dj in (0, 1):
            for dk in (0, 1):
                w = (f if di else 1 - f) * (g_ if dj else 1 - g_) * (h if dk else 1 - h)
                expected += w * entry(1 + di, 2 + dj, 0 + dk)
    torch.testing.assert_close(enc(x)[0, :2], expected, rtol=1e-5, atol=1e-6)


def test_a_fine_level_is_hashed_with_tcnns_primes() -> None:
    cfg = {**DENSE, "log2_hashmap_size": 8, "n_levels": 1, "base_resolution": 16}
    enc = TorchGridEncoding(3, cfg)  # 17^3 corners > 256 entries
    assert enc.hashed == [True] and enc.tables[0].shape == (256, 2)
    _random_tables(enc)
    i, j, k = 3, 7, 11
    slot = (i * 1 ^ j * 2654435761 ^ k * 805459861) % 256
    x = torch.tensor([[i / 16, j / 16, k / 16]])
    torch.testing.assert_close(enc(x)[0], enc.tables[0].detach()[slot])


def test_gradients_stay_in_the_cells_a_point_touches() -> None:
    enc = TorchGridEncoding(3, DENSE)
    x = torch.tensor([[0.3, 0.6, 0.1]])
    enc(x).sum().backward()
    touched = [int((t.grad.abs().sum(dim=1) > 0).sum()) for t in enc.tables]
    assert touched == [8, 8]  # one cell per level: the hash grid's locality


def test_progressive_levels_follow_threestudios_rule() -> None:
    cfg = {**DENSE, "n_levels": 4, "start_level": 1, "start_step": 10, "update_steps": 5}
    cfg["log2_hashmap_size"] = 16
    enc = TorchGridEncoding(3, cfg)
    _random_tables(enc)
    x = torch.rand(5, 3, generator=torch.Generator().manual_seed(1))
    for step, level in ((0, 1), (10, 1), (14, 1), (15, 2), (20, 3), (99, 4)):
        enc.update_step(0, step)
        # min(start_level + max(step - start_step, 0) // update_steps, n_levels)
        assert enc.current_level == level
        out = enc(x)
        assert out[:, 2 * level :].abs().sum() == 0
        assert out[:, : 2 * level].abs().sum() > 0


@pytest.mark.parametrize(
    "cfg,key",
    [
        ({**DENSE, "n_levels": 0}, "n_levels"),
        ({**DENSE, "base_resolution": 2.5}, "base_resolution"),
    ],
)
def test_bad_configs_name_the_key(cfg, key) -> None:
    with pytest.raises(ValueError, match=key):
        TorchGridEncoding(3, cfg)
    with pytest.raises(ValueError, match="n_input_dims"):
        TorchGridEncoding(2, DENSE)
