"""``perpneg-stable-diffusion-sdi-guidance`` against threestudio's ``stable-diffusion-sdi-guidance``.

Both load the same tiny checkpoint and get the same random draws (torch and Python ``random``
reseeded before each call). At batch 1 (where threestudio's Perp-Neg pairing is right) the loss, the
gradient and the inverted noise must be threestudio's, Perp-Neg off and on. At batch 3 (front, side,
back) threestudio's SDI cannot run (its inversion schedule takes one t) and its guided prediction
pairs negatives with other cameras' latents; the reference for each sample is threestudio's own SDI
at batch 1 on that sample: every UNet row of ours must carry that sample's latent at that step and
one of that sample's embeddings, and the per-sample gradients must be threestudio's.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
from threestudio_support.fixtures import require_threestudio

threestudio = require_threestudio()  # module-level skip with the reason when unavailable

import torch  # noqa: E402

from threestudio_perpneg.threestudio_cpu.system import (  # noqa: E402
    fit_steps,
    load_custom_extension,
    make_dreamfusion_system,
)

pytestmark = [pytest.mark.threestudio, pytest.mark.usefixtures("one_cpu_thread")]

REPO = Path(__file__).resolve().parents[1]
SHIM = REPO / "custom" / "threestudio-perpneg"
load_custom_extension(SHIM)

from threestudio_perpneg.adapters import PerpNegStableDiffusionSDIGuidance  # noqa: E402
from threestudio_perpneg.engines.sdi import invert_noise  # noqa: E402

OURS = "perpneg-stable-diffusion-sdi-guidance"
THEIRS = "stable-diffusion-sdi-guidance"
N_STEPS = 4  # inversion grid of the tests (sdi.yaml: 10), to keep every call cheap
# front, side, back
ELEVATION = [5.0, 10.0, 0.0]
AZIMUTH = [20.0, 100.0, -160.0]


def _ts_root() -> Path:
    return Path(threestudio.__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def processors(tiny_sd_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Dict[bool, Any]:
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("sdi-cache"))  # .threestudio_cache/ goes here
    try:
        return {
            on: threestudio.find("stable-diffusion-prompt-processor")(
                {
                    "pretrained_model_name_or_path": str(tiny_sd_path),
                    "prompt": "a corgi",
                    "spawn": False,
                    "use_perp_neg": on,
                }
            )()
            for on in (False, True)
        }
    finally:
        os.chdir(cwd)


def _pair(model: Path, perp_neg: bool, **cfg: Any) -> Tuple[Any, Any]:
    common = {
        "pretrained_model_name_or_path": str(model),
        "half_precision_weights": False,
        "guidance_scale": 7.5,
        "inversion_n_steps": N_STEPS,
        **cfg,
    }
    # threestudio's SDI: ε_c + s(ε_c − ε_u) with Perp-Neg off, ε_u + s(…) with it on.
    convention = "cfg" if perp_neg else "threestudio"
    ours = threestudio.find(OURS)(
        {**common, "use_perp_neg": perp_neg, "guidance_scale_convention": convention}
    )
    return ours, threestudio.find(THEIRS)(common)


def _cams(idx: List[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    el = torch.tensor([ELEVATION[i] for i in idx])
    return el, torch.tensor([AZIMUTH[i] for i in idx]), torch.full_like(el, 1.5)


def _call(guidance: Any, pu: Any, lat: torch.Tensor, idx: List[int], seed: int, ours: bool):
    """One call on leaf latents ``[B, 4, 64, 64]``; adds ``grad`` (d loss_sdi / d latents).

    threestudio's SDI takes ``rgb_as_latents`` input as the latents themselves, ours as
    ``[B, H, W, 4]`` renders (as every other threestudio guidance): the same tensor either way."""
    x = lat.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    random.seed(seed)
    inp = x.permute(0, 2, 3, 1) if ours else x
    out = guidance(inp, pu, *_cams(idx), rgb_as_latents=True)
    out["grad"] = torch.autograd.grad(out["loss_sdi"], [x])[0]
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def test_registered_name_and_config_contract():
    assert threestudio.find(OURS) is PerpNegStableDiffusionSDIGuidance
    ours = {f.name: f for f in dataclasses.fields(PerpNegStableDiffusionSDIGuidance.Config)}
    for f in dataclasses.fields(threestudio.find(THEIRS).Config):
        assert f.name in ours, f.name
        mine = ours[f.name]
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            assert mine.default_factory() == f.default_factory(), f.name  # type: ignore[misc]
        else:
            assert mine.default == f.default, f.name


@pytest.mark.parametrize(
    "perp_neg,cam", [(False, 0), (True, 1), (True, 2)], ids=["off-front", "on-side", "on-back"]
)
def test_batch_1_equals_threestudio_sdi(tiny_sd_path, processors, perp_neg, cam):
    ours, theirs = _pair(tiny_sd_path, perp_neg)
    pu = processors[perp_neg]
    lat = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(cam))
    mine = _call(ours, pu, lat, [cam], seed=7, ours=True)
    ref = _call(theirs, pu, lat, [cam], seed=7, ours=False)
    assert float(ref["grad"].norm()) > 0
    assert float(mine["loss_sdi"].detach()) == pytest.approx(
        float(ref["loss_sdi"].detach()), rel=1e-5
    )
    assert float(mine["grad_norm"].detach()) == pytest.approx(
        float(ref["grad_norm"].detach()), rel=1e-5
    )
    assert _rel(mine["grad"], ref["grad"]) < 1e-4
    assert (mine["min_step"], mine["max_step"]) == (ref["min_step"], ref["max_step"])
    # threestudio runs 4 rows per guided prediction with Perp-Neg on; ours only the non-zero ones.
    assert mine["perp_neg_branches"] <= (4 if perp_neg else 2) * (N_STEPS + 1)

    # The inverted noise itself, for a given t.
    t = torch.tensor([600])
    cond = ours.conditioning(pu, *_cams([cam]))
    torch.manual_seed(3)
    random.seed(3)
    got = invert_noise(ours.engine, ours.inversion, lat, t, cond, ours.sdi_settings)
    torch.manual_seed(3)
    random.seed(3)
    want_x, want_noise = theirs.invert_noise(lat, t, pu, *_cams([cam]))
    assert _rel(got.latents_noisy, want_x) < 1e-4  # float32 noise: ~1e-5
    assert _rel(got.noise, want_noise) < 1e-4
    # ... and the check can fail: another δ and η noise give another noise.
    torch.manual_seed(4)
    random.seed(4)
    other = theirs.invert_noise(lat, t, pu, *_cams([cam]))[1]
    assert _rel(got.noise, other) > 1e-2


class _Recorder:
    """Stands in for a UNet: records (latents, timesteps, embeddings) of every call."""

    def __init__(self, unet: Any) -> None:
        self.unet = unet
        self.calls: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, x, t, encoder_hidden_states):
        t_rows = torch.as_tensor(t).reshape(-1).expand(x.shape[0])
        self.calls.append((x.clone(), t_rows.clone(), encoder_hidden_states.clone()))
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.unet, name)


def test_batch_3_rows_and_gradients_equal_per_sample_threestudio(tiny_sd_path, processors):
    """η = 0 and t_anneal (one t for the batch): each sample's trajectory is deterministic, so
    threestudio's SDI at batch 1 on that sample is its reference, row by row."""
    pu = processors[True]
    ours, theirs = _pair(tiny_sd_path, True, inversion_eta=0.0)
    for g in (ours, theirs):
        g.update_step(0, 4000)  # t_anneal: t = 1000·(0.02 + 0.96·0.6) for every sample
    assert ours.min_step == ours.max_step == theirs.min_step == theirs.max_step
    lat = torch.randn(3, 4, 64, 64, generator=torch.Generator().manual_seed(0))

    ours.engine.unet = rec = _Recorder(ours.engine.unet)
    mine = _call(ours, pu, lat, [0, 1, 2], seed=5, ours=True)
    refs, ref_calls, ref_weights = [], [], []
    their_unet = theirs.unet
    for b in range(3):
        theirs.unet = _Recorder(their_unet)
        refs.append(_call(theirs, pu, lat[b : b + 1], [b], seed=5, ours=False))
        ref_calls.append(theirs.unet.calls)
        ref_weights.append(pu.get_text_embeddings_perp_neg(*_cams([b]), True)[1][0])

    # Per-sample gradients: threestudio's mean / B normalisation makes ours B² smaller at B = 3.
    for b in range(3):
        assert _rel(mine["grad"][b] * 9, refs[b]["grad"][0]) < 1e-4, b
    assert len(rec.calls) == len(ref_calls[0])  # same schedule: inversion steps + the score
    for k, (x, t, emb) in enumerate(rec.calls):
        n_rows = 6
        for b in range(3):
            rx, rt, remb = ref_calls[b][k]  # threestudio's rows: pos, uncond, neg 1, neg 2
            for row, which in ((b, 0), (3 + b, 1)):
                torch.testing.assert_close(x[row], rx[0], rtol=1e-4, atol=1e-4)
                assert int(t[row]) == int(rt[0])
                torch.testing.assert_close(emb[row], remb[which], rtol=1e-6, atol=1e-6)
        # Negative rows: the latent of exactly one sample, one of that sample's weighted negatives.
        negatives = {
            b: [remb[2 + i] for i, w in enumerate(ref_weights[b]) if w != 0] for b in range(3)
        }
        seen = {b: 0 for b in range(3)}
        for row in range(6, x.shape[0]):
            owners = [
                b for b in range(3) if torch.allclose(x[row], ref_calls[b][k][0][0], atol=1e-4)
            ]
            assert len(owners) == 1, (k, row)
            b = owners[0]
            assert any(torch.allclose(emb[row], e, atol=1e-6) for e in negatives[b]), (k, row)
            seen[b] += 1
            n_rows += 1
        assert seen == {b: len(negatives[b]) for b in range(3)}, k
        assert x.shape[0] == n_rows
    assert sum(len(v) for v in negatives.values()) >= 3  # there were negatives to pair wrongly

    # threestudio's own guided prediction at batch 3 pairs negatives with other samples' latents.
    theirs.unet = _Recorder(their_unet)
    t = torch.full((3,), ours.min_step)
    theirs.predict_noise(lat, t, pu, *_cams([0, 1, 2]), guidance_scale=7.5)
    ((x, _, emb),) = theirs.unet.calls
    _, neg_w = pu.get_text_embeddings_perp_neg(*_cams([0, 1, 2]), True)
    wrong = 0
    for j in range(6):  # rows 6..11 hold sample j // 2's negative j % 2 ...
        owner, latent_of = j // 2, j % 3  # ... on the latent of sample j % 3
        assert torch.equal(x[6 + j], lat[latent_of])
        wrong += int(owner != latent_of and float(neg_w[owner, j % 2]) != 0)
    assert wrong > 0


def test_sdi_yaml_trains_with_our_guidance_by_one_key(tiny_sd_path, tmp_path):
    """threestudio's own configs/sdi.yaml, only system.guidance_type changed (the rest of the
    overrides are the CPU harness's: tiny model, 64 px renders, CPU encodings)."""
    system, dm = make_dreamfusion_system(
        _ts_root() / "configs" / "sdi.yaml",
        tiny_sd_path,
        tmp_path,
        [f"system.guidance_type={OURS}"],
        extensions=[SHIM],
    )
    seen: List[int] = []
    original = PerpNegStableDiffusionSDIGuidance.__call__

    def recording(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        seen.append(out["perp_neg_branches"])
        return out

    before = [p.detach().clone() for p in system.geometry.parameters()]
    PerpNegStableDiffusionSDIGuidance.__call__ = recording
    try:
        losses = fit_steps(system, dm, 2)
    finally:
        PerpNegStableDiffusionSDIGuidance.__call__ = original
    assert isinstance(system.guidance, PerpNegStableDiffusionSDIGuidance)
    assert system.guidance.cfg.inversion_n_steps == 10 and system.guidance.cfg.t_anneal
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, system.geometry.parameters()))
    assert len(seen) == 2 and all(s >= 2 for s in seen)
