"""guidance_eval with a batch (SD and IF): every sample is denoised with its own conditioning.

Cameras sit in three different view buckets (front, back, side) at anchor azimuths, so each sample's
positive, unconditional and negative embeddings are known by hand (authors' scheme, negative_w −2):

* azimuth 0 (front, r = 1): positive front; negative side (−2; front is cut off above r = 0.8)
* azimuth 180 (back, r = 0): positive back; negatives front (−2) and side (−2·e⁰/2 = −1)
* azimuth 90 (side, r = 1 on the back half): positive side; negative front (−2)

and each sample starts at its own timestep, so its denoising chain has its own length and its own
timesteps (those of the 50-step DDIM/DDPM grid below the step nearest at or below its t). Every UNet
call of the eval loop is recorded: its rows must be exactly one sample's embeddings, the chains must come
in sample order with the expected lengths and timesteps.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest
import torch
from torch import Tensor

from threestudio_perpneg.core.conditioning import PromptBank, step_conditioning
from threestudio_perpneg.core.views import BACK, FRONT, SIDE, AuthorsScheme
from threestudio_perpneg.engines.pixel import PerpNegIFEngine, if_sds_step, load_deepfloyd_if
from threestudio_perpneg.engines.sd import (
    PerpNegSDSEngine,
    SDSSettings,
    load_stable_diffusion,
    sds_step,
)

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

ELEVATION = torch.tensor([0.0, 10.0, 20.0])
AZIMUTH = torch.tensor([0.0, 180.0, 90.0])
T = torch.tensor([60, 150, 110])  # different chain lengths per sample
# per sample: (positive view, [(negative view, weight), ...]); uncond is the positive's view
EXPECTED = [
    (FRONT, [(SIDE, -2.0)]),
    (BACK, [(FRONT, -2.0), (SIDE, -1.0)]),
    (SIDE, [(FRONT, -2.0)]),
]


def _bank(views: Tensor, uncond: Tensor) -> PromptBank:
    ld = views.shape[1:]
    return PromptBank(
        prompt=views[FRONT].clone(),
        views=views,
        uncond=uncond,
        negatives=views.new_zeros((0, *ld)),
        negative_weights=views.new_zeros(0),
    )


@contextlib.contextmanager
def recorded(unet: Any) -> Iterator[List[Tuple[Tensor, Tensor]]]:
    """(timesteps, encoder_hidden_states) of every UNet forward."""
    calls: List[Tuple[Tensor, Tensor]] = []

    def hook(module: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        sample = args[0] if args else kwargs["sample"]
        ts = args[1] if len(args) > 1 else kwargs["timestep"]
        ehs = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
        ts = torch.as_tensor(ts).reshape(-1).expand(sample.shape[0])
        calls.append((ts.detach().clone(), ehs.detach().clone()))

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def expected_rows(bank: PromptBank, i: int) -> List[Tensor]:
    view, negatives = EXPECTED[i]
    return [bank.views[view], bank.uncond[view], *(bank.views[v] for v, _ in negatives)]


def expected_chain(scheduler_config: Any, cls: Any, t: int) -> List[int]:
    """Timesteps of the 50-step grid strictly below the grid step nearest at or below ``t``."""
    sched = cls.from_config(scheduler_config)
    sched.set_timesteps(50)
    grid = [int(x) for x in sched.timesteps]
    start = max(x for x in grid if x <= t)
    return [x for x in grid if x < start]


def check_calls(calls: List[Tuple[Tensor, Tensor]], bank: PromptBank, config: Any, cls: Any):
    pos = 0
    for i in range(3):
        chain = expected_chain(config, cls, int(T[i]))
        assert len(chain) > 0
        rows = expected_rows(bank, i)
        for ts_expected in chain:
            assert pos < len(calls), f"sample {i}: chain ends early"
            ts, emb = calls[pos]
            pos += 1
            assert torch.all(ts.round().long() == ts_expected), (i, ts, ts_expected)
            assert emb.shape[0] == len(rows), (i, emb.shape)
            # Each row is one of the sample's embeddings, each embedding is used once.
            unused = list(range(len(rows)))
            for row in emb:
                match = [k for k in unused if torch.allclose(row.to(rows[k]), rows[k])]
                assert match, f"sample {i}: a UNet row is not one of its embeddings"
                unused.remove(match[0])
    assert pos == len(calls)


# ------------------------------------------------------------------------------------------ SD
@pytest.fixture(scope="module")
def sd(tiny_sd_path: Path) -> PerpNegSDSEngine:
    return PerpNegSDSEngine(*load_stable_diffusion(str(tiny_sd_path)))


def test_sd_guidance_eval_denoises_each_sample_with_its_own_conditioning(sd) -> None:
    from diffusers import DDIMScheduler

    g = torch.Generator().manual_seed(0)
    bank = _bank(torch.randn(4, 8, 32, generator=g), torch.randn(4, 8, 32, generator=g))
    cond = step_conditioning(bank, ELEVATION, AZIMUTH, scheme=AuthorsScheme())
    rgb = torch.randn(3, 64, 64, 4, generator=g)
    with recorded(sd.unet) as calls:
        out = sds_step(
            sd,
            rgb,
            cond,
            SDSSettings(guidance_scale=7.5),
            min_step=20,
            max_step=980,
            elevation=ELEVATION,
            azimuth=AZIMUTH,
            camera_distances=torch.full((3,), 1.5),
            rgb_as_latents=True,
            guidance_eval=True,
            max_items_eval=3,
            generator=torch.Generator().manual_seed(1),
            t=T,
        )
    assert out["eval"]["bs"] == 3
    # calls[0] is the training step's batched call; the rest is the eval's denoising.
    assert calls[0][1].shape[0] == sum(2 + len(n) for _, n in EXPECTED)
    check_calls(calls[1:], bank, sd.scheduler.config, DDIMScheduler)


# ------------------------------------------------------------------------------------------ IF
@pytest.fixture(scope="module")
def deepfloyd(tmp_path_factory: pytest.TempPathFactory) -> Tuple[PerpNegIFEngine, PromptBank]:
    from threestudio_perpneg.core.text import text_embeddings
    from threestudio_perpneg.tiny.builders import build_tiny_deepfloyd_if

    path = build_tiny_deepfloyd_if(tmp_path_factory.mktemp("tiny-if-eval") / "model", seed=0)
    engine = PerpNegIFEngine(*load_deepfloyd_if(str(path)))
    words = ["a side corgi", "a front corgi", "a back corgi", "a top corgi"]
    emb = text_embeddings(str(path), words + ["", "blurry", "ugly", "dark"], None, encoder="t5")
    views = torch.stack([emb[w] for w in words])
    uncond = torch.stack([emb[w] for w in ["", "blurry", "ugly", "dark"]])
    return engine, _bank(views, uncond)


def test_if_guidance_eval_denoises_each_sample_with_its_own_conditioning(deepfloyd) -> None:
    engine, bank = deepfloyd
    cond = step_conditioning(bank, ELEVATION, AZIMUTH, scheme=AuthorsScheme())
    rgb = torch.rand(3, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    with recorded(engine.unet) as calls:
        out = if_sds_step(
            engine,
            rgb,
            cond,
            SDSSettings(guidance_scale=20.0),
            min_step=20,
            max_step=980,
            elevation=ELEVATION,
            azimuth=AZIMUTH,
            camera_distances=torch.full((3,), 1.5),
            guidance_eval=True,
            max_items_eval=3,
            generator=torch.Generator().manual_seed(1),
            t=T,
        )
    assert out["eval"]["bs"] == 3
    check_calls(calls[1:], bank, engine.scheduler.config, type(engine.scheduler))
