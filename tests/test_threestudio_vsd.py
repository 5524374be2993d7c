"""``perpneg-stable-diffusion-vsd-guidance`` inside the real threestudio (skipped when not importable)."""

from __future__ import annotations

import math
from pathlib import Path

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
VSD_CONFIGS = {
    "perpneg-prolificdreamer.yaml": "perpneg-stable-diffusion-vsd-guidance",
    "perpneg-prolificdreamer-geometry.yaml": "perpneg-stable-diffusion-guidance",
    "perpneg-prolificdreamer-texture.yaml": "perpneg-stable-diffusion-vsd-guidance",
}

load_custom_extension(SHIM)

from threestudio_perpneg.adapters import PerpNegStableDiffusionVSDGuidance  # noqa: E402
from threestudio_perpneg.engines.vsd import LoRAAttnProcessor  # noqa: E402

NAME = "perpneg-stable-diffusion-vsd-guidance"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # prompt processors write .threestudio_cache/ under cwd
    return tmp_path


def _guidance(model: Path, **cfg):
    base = {
        "pretrained_model_name_or_path": str(model),
        "pretrained_model_name_or_path_lora": str(model),
        "half_precision_weights": False,
    }
    return threestudio.find(NAME)({**base, **cfg})


def _batch(b: int):
    g = torch.Generator().manual_seed(0)
    el = torch.tensor([0.0, 20.0, 70.0][:b])
    az = torch.tensor([10.0, 100.0, -170.0][:b])
    return {
        "elevation": el,
        "azimuth": az,
        "camera_distances": torch.full_like(el, 1.5),
        "mvp_mtx": torch.randn(b, 4, 4, generator=g),
        "c2w": torch.randn(b, 4, 4, generator=g),
    }


def test_registered_name_resolves_to_our_class():
    assert threestudio.find(NAME) is PerpNegStableDiffusionVSDGuidance


@pytest.mark.parametrize(
    "processor", ["perpneg-prompt-processor", "stable-diffusion-prompt-processor"]
)
def test_guidance_runs_on_tiny_model(tiny_sd_path, workdir, processor):
    prompt_utils = threestudio.find(processor)(
        {"pretrained_model_name_or_path": str(tiny_sd_path), "prompt": "a corgi", "spawn": False}
    )()
    guidance = _guidance(tiny_sd_path, seed=0)
    assert guidance.single_model  # same path: one shared UNet, LoRA switched on per call
    params = list(guidance.parameters())
    assert params and all(p.requires_grad for p in params)
    n_unet = sum(1 for _ in guidance.engine.unet.parameters())
    assert len(params) < n_unet  # the frozen UNet/VAE are not part of the module
    assert all(
        isinstance(p, LoRAAttnProcessor) for p in guidance.engine.unet.attn_processors.values()
    )

    rgb = torch.rand(2, 32, 32, 3, requires_grad=True)
    out = guidance(rgb, prompt_utils, **_batch(2), rgb_as_latents=False)
    assert {"loss_vsd", "loss_lora", "grad_norm", "min_step", "max_step"} <= set(out)
    assert math.isfinite(float(out["loss_vsd"].detach()))
    (out["loss_vsd"] + out["loss_lora"]).backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)

    guidance.update_step(0, 6000)
    assert (guidance.min_step, guidance.max_step) == (20, 980)


@pytest.mark.parametrize(
    "cfg,key",
    [
        ({"camera_condition_type": "intrinsics"}, "camera_condition_type"),
        ({"lora_n_timestamp_samples": 0}, "lora_n_timestamp_samples"),
        ({"lora_rank": 0}, "lora_rank"),
        ({"use_sjc": True}, "use_sjc"),
        ({"guidance_scale_convention": "x"}, "guidance_scale_convention"),
        ({"perp_neg_min_weight": -1.0}, "perp_neg_min_weight"),
    ],
)
def test_bad_config_names_the_key(tiny_sd_path, cfg, key):
    with pytest.raises(ValueError, match=key):
        _guidance(tiny_sd_path, **cfg)


@pytest.mark.parametrize("config", sorted(VSD_CONFIGS))
def test_shipped_prolificdreamer_configs_load(config):
    from threestudio.utils.config import load_config, parse_structured

    cli = ["system.prompt_processor.prompt=a corgi"]
    if config != "perpneg-prolificdreamer.yaml":
        cli.append("system.geometry_convert_from=outputs/coarse/ckpts/last.ckpt")
    cfg = load_config(str(REPO / "configs" / config), cli_args=cli, n_gpus=1)
    assert cfg.system_type == "prolificdreamer-system"
    assert cfg.system.guidance_type == VSD_CONFIGS[config]
    assert cfg.system.prompt_processor_type == "perpneg-prompt-processor"
    guidance_cls = threestudio.find(cfg.system.guidance_type)
    g = parse_structured(guidance_cls.Config, cfg.system.guidance)
    assert g.use_perp_neg
    assert threestudio.find(cfg.system_type) is not None


def test_prolificdreamer_system_trains_one_step(tiny_sd_path, tmp_path):
    system, dm = make_dreamfusion_system(
        REPO / "configs" / "perpneg-prolificdreamer.yaml",
        tiny_sd_path,
        tmp_path,
        [
            f"system.guidance.pretrained_model_name_or_path_lora={tiny_sd_path}",
            "system.prompt_processor.perp_neg_prompts=[blurry]",
            "system.prompt_processor.perp_neg_prompt_weights=[-0.5]",
            "data.width=32",
            "data.height=32",
        ],
        extensions=[SHIM],
    )
    assert isinstance(system.guidance, PerpNegStableDiffusionVSDGuidance)
    lora_before = [p.detach().clone() for p in system.guidance.parameters()]
    losses = fit_steps(system, dm, 1)
    assert len(losses) == 1 and math.isfinite(losses[0])
    changed = [
        not torch.equal(a, b.detach()) for a, b in zip(lora_before, system.guidance.parameters())
    ]
    assert any(changed)  # the guidance entry of the optimizer trains the LoRA / camera embedding


def test_sample_and_sample_lora_images(tiny_sd_path, workdir):
    """The prolificdreamer system's ``visualize_samples`` images: [B, H, W, 3] in [0, 1]."""
    prompt_utils = threestudio.find("perpneg-prompt-processor")(
        {"pretrained_model_name_or_path": str(tiny_sd_path), "prompt": "a corgi", "spawn": False}
    )()
    guidance = _guidance(tiny_sd_path)
    batch = _batch(1)
    for img in (
        guidance.sample(prompt_utils, **batch, seed=0),
        guidance.sample_lora(prompt_utils, **batch, seed=0),
    ):
        assert img.dim() == 4 and img.shape[0] == 1 and img.shape[-1] == 3
        assert torch.isfinite(img).all() and img.min() >= 0 and img.max() <= 1
