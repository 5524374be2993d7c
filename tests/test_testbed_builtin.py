"""threestudio's built-in Perp-Neg reproduced (pairing bug #456 included): algebra and 3D protocol.

The reference below is written from threestudio's code, row by row, independently of
:mod:`threestudio_perpneg.testbed.builtin`: the prompt processor's text rows (each sample's two
negatives appended consecutively) against latents and timesteps repeated four times, and the
guidance's ``noise_pred_neg[i::2]`` read-out.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import pytest
import torch

pytest.importorskip("diffusers")

from threestudio_perpneg.core.conditioning import PromptBank, step_conditioning  # noqa: E402
from threestudio_perpneg.core.views import make_scheme  # noqa: E402
from threestudio_perpneg.testbed import builtin as B  # noqa: E402
from threestudio_perpneg.testbed import protocol3d as P3  # noqa: E402

L, D, C, S = 6, 32, 3, 16  # tokens, embedding width, channels, image side
SCALE = 7.5


@pytest.fixture(scope="module")
def engine(one_cpu_thread):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from threestudio_perpneg.engines.pixel import PerpNegIFEngine

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=S,
            in_channels=C,
            out_channels=C,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 32),
            layers_per_block=1,
            norm_num_groups=16,
            cross_attention_dim=D,
            attention_head_dim=8,
        ).eval()
    unet.requires_grad_(False)
    return PerpNegIFEngine(unet, DDPMScheduler(num_train_timesteps=1000))


@pytest.fixture(scope="module")
def bank() -> PromptBank:
    g = torch.Generator().manual_seed(1)
    return PromptBank(
        prompt=torch.randn(L, D, generator=g),
        views=torch.randn(4, L, D, generator=g),
        uncond=torch.randn(4, L, D, generator=g),  # one per view, so the bucket matters
        negatives=torch.zeros(0, L, D),
        negative_weights=torch.zeros(0),
    )


def _inputs(n: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, C, S, S, generator=g), torch.randint(20, 981, (n,), generator=g)


def _cond(bank: PromptBank, el: Sequence[float], az: Sequence[float]):
    return step_conditioning(
        bank, torch.tensor(el), torch.tensor(az), scheme=make_scheme("threestudio")
    )


# ---------------------------------------------------------------- the independent reference
def _decay(abc: Tuple[float, float, float], r: float) -> float:
    a, b, c = abc
    return a * math.exp(-b * r) + c


def _threestudio_rows(bank: PromptBank, el: Sequence[float], az: Sequence[float]):
    """(positives, unconds, negatives sample-major, weights [B][2]) as threestudio stacks them."""
    side, front, back, overhead = bank.views
    f_fs = f_sf = (4.0, 0.5, -2.426)
    f_sb, f_fsb = (1.0, 0.5, -0.606), (1.0, 0.5, 0.967)
    pos, unc, neg, w = [], [], [], []
    for e, a in zip(el, az):
        a = (a + 180.0) % 360.0 - 180.0
        idx = 3 if e > 60 else 2 if abs(a) > 135 else 1 if abs(a) < 45 else 0
        unc.append(bank.uncond[idx])
        if idx == 3:
            pos.append(overhead)
            neg += [bank.uncond[3], bank.uncond[3]]
            w.append([0.0, 0.0])
        elif abs(a) < 90:
            r = 1 - abs(a) / 90
            pos.append(r * front + (1 - r) * side)
            neg += [front, side]
            w.append([-_decay(f_fs, r), -_decay(f_sf, 1 - r)])
        else:
            r = 2.0 - abs(a) / 90
            pos.append(r * side + (1 - r) * back)
            neg += [side, front]
            w.append([-_decay(f_sb, r), -_decay(f_fsb, r)])
    return pos, unc, neg, w


def _perp(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x - (x * y).sum() / max(float((y * y).sum()), 1e-6) * y


def _reference(engine, bank, el, az, x, t) -> torch.Tensor:
    """threestudio's guided noise, one UNet row at a time with its latent/timestep pairing."""
    pos, unc, neg, w = _threestudio_rows(bank, el, az)
    b = len(pos)
    texts: List[torch.Tensor] = pos + unc + neg  # 4B text rows
    eps = []
    for j, emb in enumerate(texts):  # latents and t repeated 4x: row j sees sample j mod B
        k = j % b
        out = engine.unet(x[k : k + 1], t[k : k + 1].float(), encoder_hidden_states=emb[None])
        eps.append(out.sample[0])
    e_text, e_unc, e_neg = eps[:b], eps[b : 2 * b], eps[2 * b :]
    result = []
    for k in range(b):
        e_pos = e_text[k] - e_unc[k]
        acc = torch.zeros_like(e_pos)
        for i in range(2):
            acc = acc + w[k][i] * _perp(e_neg[2 * k + i] - e_unc[k], e_pos)  # [i::2] row k
        result.append(e_unc[k] + SCALE * (e_pos + acc))
    return torch.stack(result)


CAMERAS_3 = [
    ([0.0, 10.0, 5.0], [20.0, 100.0, -160.0]),  # front, side (back half), back
    ([0.0, 75.0, 5.0], [-60.0, 30.0, 170.0]),  # side (front half), overhead, back
]


@pytest.mark.parametrize("el, az", CAMERAS_3)
def test_builtin_equals_an_independent_threestudio_reference_at_batch_3(engine, bank, el, az):
    x, t = _inputs(3, seed=2)
    cond = _cond(bank, el, az)
    rows = B.threestudio_text_batch(cond, torch.tensor(az))
    pos, unc, neg, w = _threestudio_rows(bank, el, az)
    assert torch.allclose(rows.embeddings, torch.stack(pos + unc + neg), atol=1e-6)
    assert torch.allclose(rows.weights, torch.tensor(w), atol=1e-6)

    before = engine.unet_branches
    got = B.threestudio_guided_noise(engine, x, t, cond, SCALE, azimuth=torch.tensor(az))
    assert engine.unet_branches - before == 12  # 4B rows, overhead included
    want = _reference(engine, bank, el, az, x, t)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()


@pytest.mark.parametrize(
    "el, az", [(0.0, 20.0), (0.0, -70.0), (10.0, 120.0), (5.0, 180.0), (75.0, 40.0)]
)
def test_batch_of_one_equals_our_perp_neg(engine, bank, el, az):
    x, t = _inputs(1, seed=3)
    cond = _cond(bank, [el], [az])
    got = B.threestudio_guided_noise(engine, x, t, cond, SCALE, azimuth=torch.tensor([az]))
    ours = engine.guided_noise(x, t, cond, SCALE)
    assert torch.allclose(got, ours, rtol=1e-5, atol=1e-5), (got - ours).abs().max()


def test_batch_above_one_differs_from_ours_only_through_the_pairing(engine, bank):
    el, az = CAMERAS_3[0]
    cond = _cond(bank, el, az)
    azt = torch.tensor(az)
    x, t = _inputs(3, seed=4)
    got = B.threestudio_guided_noise(engine, x, t, cond, SCALE, azimuth=azt)
    ours = engine.guided_noise(x, t, cond, SCALE)
    # Sample 0's negatives are rows 0 and 1 of the negative block: latents 0 and 1, one wrong.
    for k in range(3):
        assert (got[k] - ours[k]).abs().max() > 1e-3, k
    # Every sample on the same latent and timestep: the pairing is harmless, both agree.
    same_x, same_t = x[:1].expand(3, -1, -1, -1).contiguous(), t[:1].expand(3).contiguous()
    got = B.threestudio_guided_noise(engine, same_x, same_t, cond, SCALE, azimuth=azt)
    ours = engine.guided_noise(same_x, same_t, cond, SCALE)
    assert torch.allclose(got, ours, rtol=1e-5, atol=1e-5), (got - ours).abs().max()


def test_groups_are_separate_threestudio_batches_in_one_call(engine, bank):
    el, az = [0.0, 5.0, 10.0, 0.0], [30.0, 110.0, -170.0, -50.0]
    x, t = _inputs(4, seed=5)
    cond = _cond(bank, el, az)
    calls = engine.unet_calls
    got = B.threestudio_guided_noise(
        engine, x, t, cond, SCALE, azimuth=torch.tensor(az), group_size=2
    )
    assert engine.unet_calls == calls + 1
    for s in (0, 2):
        part = _cond(bank, el[s : s + 2], az[s : s + 2])
        alone = B.threestudio_guided_noise(
            engine, x[s : s + 2], t[s : s + 2], part, SCALE, azimuth=torch.tensor(az[s : s + 2])
        )
        assert torch.allclose(got[s : s + 2], alone, rtol=1e-4, atol=1e-4)  # batched arithmetic
    whole = B.threestudio_guided_noise(engine, x, t, cond, SCALE, azimuth=torch.tensor(az))
    assert not torch.allclose(got, whole, atol=1e-3)  # the pairing spans the group


def test_combine_reads_negatives_with_a_stride_of_two() -> None:
    # Hand-made ε rows: positive direction along e0, each negative row a distinct multiple of e1.
    b = 2
    e0, e1 = torch.zeros(1, 2, 1, 1), torch.zeros(1, 2, 1, 1)
    e0[0, 0], e1[0, 1] = 1.0, 1.0
    eps = torch.cat([e0, e0, 0 * e0, 0 * e0] + [(j + 1) * e1 for j in range(2 * b)])
    w = torch.tensor([[1.0, 10.0], [100.0, 1000.0]])
    out = B.threestudio_combine(eps, w, 1.0)
    # sample 0: rows 0 (x1) and 1 (x2): 1 + 20; sample 1: rows 2 (x3) and 3 (x4): 300 + 4000
    assert out[:, 1].flatten().tolist() == [21.0, 4300.0]
    assert out[:, 0].flatten().tolist() == [1.0, 1.0]


def test_bad_conditioning_is_refused(bank):
    az = torch.tensor([20.0])
    lone = step_conditioning(
        bank, torch.zeros(1), az, scheme=make_scheme("threestudio"), min_weight=0.5
    )
    assert lone.negative.shape[0] == 1  # the front weight (-0.28) was dropped
    with pytest.raises(ValueError, match="sample 0 has 1 negatives"):
        B.threestudio_text_batch(lone, az)
    plain = step_conditioning(
        bank, torch.zeros(1), az, scheme=make_scheme("threestudio"), perp_neg=False
    )
    with pytest.raises(ValueError, match="Perp-Neg conditioning"):
        B.threestudio_text_batch(plain, az)


# ------------------------------------------------------------------------------ 3D protocol
class _Truth:
    """A classifier stand-in that returns the ground-truth view of each ring azimuth."""

    def classify(self, images):
        az = P3.ring_azimuths(images.shape[0])
        views = ["front" if abs(a) < 45 else "back" if abs(a) > 135 else "side" for a in az]
        return type("C", (), {"views": views})()


@pytest.fixture(scope="module")
def shipped(one_cpu_thread):
    from threestudio_perpneg.engines.pixel import PerpNegIFEngine, load_deepfloyd_if
    from threestudio_perpneg.testbed.prior import load_prior_path

    path = load_prior_path()
    return path, PerpNegIFEngine(*load_deepfloyd_if(path))


@pytest.mark.parametrize("batch", [1, 4])
def test_run_objects_with_threestudio_builtin_on_the_shipped_prior(shipped, batch):
    path, eng = shipped
    cfg = P3.Protocol3DConfig(
        method="threestudio-builtin", batch_size=batch, steps=2, texture_size=8, ring_views=8
    )
    seeds = [0, 1]
    res = P3.run_objects(cfg, seeds, path, _Truth(), ["a cartoon clown head"] * 2, engine=eng)
    for seed, obj in zip(seeds, res):
        init = torch.sigmoid(torch.randn(3, 8, 16, generator=torch.Generator().manual_seed(seed)))
        assert (obj.texture - init).abs().max() > 1e-4  # the SDS gradient reached the texture
        assert len(obj.losses) == 2 and all(math.isfinite(v) for v in obj.losses)
        # The same definition as the other methods: UNet rows per step for the object's batch.
        assert obj.unet_rows_per_step == 4 * batch
    if batch == 4:  # ours on the same draws differs: the pairing moved the negatives
        ours = P3.run_objects(
            P3.Protocol3DConfig(**{**cfg.to_dict(), "method": "ours"}),
            seeds,
            path,
            _Truth(),
            ["a cartoon clown head"] * 2,
            engine=eng,
        )[0]
        # Same cameras, t and noise at step 0: only the guided noise (the pairing) differs.
        assert ours.losses[0] != pytest.approx(res[0].losses[0], rel=1e-4)


def test_builtin_method_needs_the_threestudio_scheme():
    with pytest.raises(ValueError, match="^scheme: method 'threestudio-builtin' needs scheme"):
        P3.Protocol3DConfig(method="threestudio-builtin", scheme="authors")
    assert "threestudio-builtin" in P3.METHODS
