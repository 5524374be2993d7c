"""Our VSD guidance against threestudio's own ``stable-diffusion-vsd-guidance`` (threestudio tier).

Both guidances load the same tiny checkpoints (the pretrained model and a copy of it as the LoRA model,
with an ε or a v-prediction scheduler), get the same LoRA and camera-embedding weights (ours copied into
threestudio's ``LoRAAttnProcessor`` layers) and the same random draws (the global torch and ``random``
RNGs reseeded before each call: both draw t, noise, then the LoRA loss's t, noise and camera dropout,
in that order). With Perp-Neg off, d loss_vsd / d latents and loss_lora must be threestudio's. With
Perp-Neg on, the pretrained branch must be our SD guidance's Perp-Neg ε̂: the VSD gradient moves
from threestudio's (Perp-Neg off) exactly as our SD guidance's gradient moves when Perp-Neg is
switched on, since grad_VSD = w·(ε̂_pretrained − ε̂_lora) and grad_SDS = w·(ε̂ − noise).

threestudio hard-codes a 1280-wide camera embedding, so the tiny UNet here has ``time_embedding_dim``
1280 (the rest is the tiny checkpoint's UNet).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Dict, Tuple

import pytest
from threestudio_support.fixtures import require_threestudio

threestudio = require_threestudio()  # module-level skip with the reason when unavailable

import torch  # noqa: E402

from threestudio_perpneg.threestudio_cpu.system import load_custom_extension  # noqa: E402

pytestmark = [pytest.mark.threestudio, pytest.mark.usefixtures("one_cpu_thread")]

REPO = Path(__file__).resolve().parents[1]
load_custom_extension(REPO / "custom" / "threestudio-perpneg")

OURS = "perpneg-stable-diffusion-vsd-guidance"
THEIRS = "stable-diffusion-vsd-guidance"
STOCK_PROCESSOR = "stable-diffusion-prompt-processor"
# side, front, back cameras (different view buckets, so per-sample prompts differ)
ELEVATION = [10.0, 20.0, 5.0]
AZIMUTH = [100.0, 10.0, -170.0]


@pytest.fixture(scope="module")
def checkpoints(tiny_sd_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """``pre`` (the pretrained model), ``eps`` and ``v``: copies of it as LoRA models with an ε and a
    v-prediction scheduler. Same weights in all three."""
    from diffusers import UNet2DConditionModel

    from threestudio_perpneg.tiny.builders import UNET_CONFIG

    root = tmp_path_factory.mktemp("vsd-ref")
    pre = root / "pre"
    shutil.copytree(tiny_sd_path, pre)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        unet = UNet2DConditionModel(**UNET_CONFIG, time_embedding_dim=1280)
    shutil.rmtree(pre / "unet")
    unet.save_pretrained(str(pre / "unet"))
    out = {"pre": pre}
    for name, kind in (("eps", "epsilon"), ("v", "v_prediction")):
        shutil.copytree(pre, root / name)
        path = root / name / "scheduler" / "scheduler_config.json"
        cfg = json.loads(path.read_text())
        cfg["prediction_type"] = kind
        path.write_text(json.dumps(cfg))
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def prompt_utils(tiny_sd_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("vsd-ref-cache"))  # .threestudio_cache/ goes here
    try:
        return threestudio.find(STOCK_PROCESSOR)(
            {
                "pretrained_model_name_or_path": str(tiny_sd_path),
                "prompt": "a corgi",
                "spawn": False,
            }
        )()
    finally:
        os.chdir(cwd)


def _cameras(b: int) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    el = torch.tensor(ELEVATION[:b])
    return {
        "elevation": el,
        "azimuth": torch.tensor(AZIMUTH[:b]),
        "camera_distances": torch.full_like(el, 1.5),
        "mvp_mtx": torch.randn(b, 4, 4, generator=g),
        "c2w": torch.randn(b, 4, 4, generator=g),
    }


def _pair(pre: Path, lora: Path, lora_scale: float = 1.5, **ours_cfg: Any) -> Tuple[Any, Any]:
    """(ours, threestudio's) VSD guidance, ours with non-trivial LoRA weights copied into theirs."""
    common = {
        "pretrained_model_name_or_path": str(pre),
        "pretrained_model_name_or_path_lora": str(lora),
        "half_precision_weights": False,
        "guidance_scale": 7.5,
        "guidance_scale_lora": lora_scale,  # 1.5: the zero-camera branch matters too
    }
    ours = threestudio.find(OURS)({**common, "use_perp_neg": False, **ours_cfg})
    theirs = threestudio.find(THEIRS)(common)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in ours.lora.lora_layers.named_parameters():
            if name.endswith("up.weight"):  # zero at init: the LoRA would be the identity
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    their_procs = theirs.unet_lora.attn_processors
    assert len(their_procs) == len(ours.lora.lora_layers)
    for name, proc in their_procs.items():
        proc.load_state_dict(ours.lora.lora_layers[name.replace(".", "_")].state_dict())
    theirs.camera_embedding.module.load_state_dict(
        ours.lora.camera_embedding.embedding.state_dict()
    )
    return ours, theirs


def _run(
    guidance: Any, prompt_utils: Any, latents: torch.Tensor, b: int, seed: int
) -> Dict[str, Any]:
    """One call on leaf latents (``rgb_as_latents``) with the RNGs at ``seed``; adds ``grad``."""
    x = latents.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    random.seed(seed)
    out = guidance(x, prompt_utils, **_cameras(b), rgb_as_latents=True)
    (grad,) = torch.autograd.grad(out["loss_vsd"], [x])
    out["grad"] = grad
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("lora_kind", ["eps", "v"])
@pytest.mark.parametrize("b", [1, 3])
def test_vsd_equals_threestudio_with_perp_neg_off(checkpoints, prompt_utils, b, lora_kind):
    ours, theirs = _pair(checkpoints["pre"], checkpoints[lora_kind])
    assert (
        ours.lora_scheduler.config.prediction_type == theirs.scheduler_lora.config.prediction_type
    )
    latents = torch.randn(b, 64, 64, 4, generator=torch.Generator().manual_seed(b))
    mine = _run(ours, prompt_utils, latents, b, seed=17)
    ref = _run(theirs, prompt_utils, latents, b, seed=17)
    assert float(ref["grad"].norm()) > 0 and float(ref["loss_lora"].detach()) > 0
    assert _rel(mine["grad"], ref["grad"]) < 1e-4  # float32 noise: ~1e-5
    assert float(mine["loss_lora"].detach()) == pytest.approx(
        float(ref["loss_lora"].detach()), rel=1e-4
    )
    assert float(mine["loss_vsd"].detach()) == pytest.approx(
        float(ref["loss_vsd"].detach()), rel=1e-4
    )
    # The check can fail: another seed draws other timesteps and noise.
    other = _run(theirs, prompt_utils, latents, b, seed=18)
    assert _rel(mine["grad"], other["grad"]) > 1e-2


def test_vsd_equals_threestudio_with_one_shared_unet(checkpoints, prompt_utils):
    """Same path for both models: one UNet, LoRA switched off for the pretrained branch."""
    ours, theirs = _pair(checkpoints["pre"], checkpoints["pre"])
    assert ours.single_model and theirs.single_model
    latents = torch.randn(3, 64, 64, 4, generator=torch.Generator().manual_seed(0))
    mine = _run(ours, prompt_utils, latents, 3, seed=4)
    ref = _run(theirs, prompt_utils, latents, 3, seed=4)
    assert _rel(mine["grad"], ref["grad"]) < 1e-4  # float32 noise: ~1e-5
    assert float(mine["loss_lora"].detach()) == pytest.approx(
        float(ref["loss_lora"].detach()), rel=1e-4
    )


def test_perp_neg_pretrained_branch_is_the_sd_guidance_prediction(checkpoints, prompt_utils):
    """B = 1, Perp-Neg on: VSD_on − VSD_off(threestudio) = SD_on − SD_off (ours, same t and noise),
    i.e. the VSD pretrained branch is our SD guidance's Perp-Neg ε̂."""
    pre = checkpoints["pre"]
    ours_on, theirs = _pair(pre, checkpoints["eps"], use_perp_neg=True)
    sd = {
        "pretrained_model_name_or_path": str(pre),
        "half_precision_weights": False,
        "guidance_scale": 7.5,
        "guidance_scale_convention": "cfg",  # threestudio's VSD convention
    }
    sd_on = threestudio.find("perpneg-stable-diffusion-guidance")({**sd, "use_perp_neg": True})
    sd_off = threestudio.find("perpneg-stable-diffusion-guidance")({**sd, "use_perp_neg": False})
    latents = torch.randn(1, 64, 64, 4, generator=torch.Generator().manual_seed(9))
    cams = _cameras(1)
    del cams["mvp_mtx"], cams["c2w"]

    def sds_grad(guidance: Any) -> torch.Tensor:
        x = latents.detach().clone().requires_grad_(True)
        torch.manual_seed(21)  # t then noise: the same first two draws as the VSD step
        out = guidance(x, prompt_utils, **cams, rgb_as_latents=True)
        return torch.autograd.grad(out["loss_sds"], [x])[0]

    vsd_on = _run(ours_on, prompt_utils, latents, 1, seed=21)["grad"]
    vsd_off = _run(theirs, prompt_utils, latents, 1, seed=21)["grad"]
    delta_sd = sds_grad(sd_on) - sds_grad(sd_off)
    assert float(delta_sd.norm()) > 1e-3 * float(vsd_off.norm())  # Perp-Neg does change ε̂
    assert _rel(vsd_on - vsd_off, delta_sd) < 1e-4


def test_sample_and_sample_lora_equal_threestudio(checkpoints, prompt_utils):
    """The prolificdreamer system's sample images: 25 DPM-Solver steps from the same seed.

    guidance_scale_lora is 1 here: threestudio's ``sample_lora`` pairs the zero camera with the
    unconditional text while its VSD gradient (and ours, everywhere) uses the prompt for both; at
    scale 1 only the camera branch counts, so the two must agree."""
    ours, theirs = _pair(checkpoints["pre"], checkpoints["eps"], lora_scale=1.0)
    cams = _cameras(2)
    for name in ("sample", "sample_lora"):
        mine = getattr(ours, name)(prompt_utils, **cams, seed=3)
        ref = getattr(theirs, name)(prompt_utils, **cams, seed=3)
        assert mine.shape == ref.shape and ref.shape[0] == 2
        assert float(ref.std()) > 0
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-4, msg=name)
