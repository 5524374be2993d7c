"""DeepFloyd IF classes inside the real threestudio (skipped when threestudio is not importable).

Drop-in checks compare against threestudio's own ``deep-floyd-guidance`` on the same tiny IF.
"""

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

pytestmark = pytest.mark.threestudio

REPO = Path(__file__).resolve().parents[1]
SHIM = REPO / "custom" / "threestudio-perpneg"
IF_CONFIGS = [
    REPO / "configs" / n for n in ("perpneg-dreamfusion-if.yaml", "perpneg-magic3d-coarse-if.yaml")
]

load_custom_extension(SHIM)

from threestudio.models.prompt_processors.base import PromptProcessorOutput  # noqa: E402

from threestudio_perpneg.adapters import (  # noqa: E402
    PerpNegDeepFloydGuidance,
    PerpNegDeepFloydPromptProcessor,
    PerpNegPromptProcessorOutput,
)
from threestudio_perpneg.core.text import EmbeddingCache  # noqa: E402


@pytest.fixture(scope="module")
def tiny_if_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from threestudio_perpneg.tiny.builders import build_tiny_deepfloyd_if

    return build_tiny_deepfloyd_if(tmp_path_factory.mktemp("tiny-if") / "model", seed=0)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _processor(model: Path, **cfg):
    base = {"pretrained_model_name_or_path": str(model), "prompt": "a corgi", "spawn": False}
    return threestudio.find("perpneg-deepfloyd-prompt-processor")({**base, "cache_dir": "c", **cfg})


def _guidance(kind: str, model: Path, **cfg):
    base = {"pretrained_model_name_or_path": str(model), "half_precision_weights": False}
    return threestudio.find(kind)({**base, **cfg})


def _cameras(azimuths, elevations=None):
    az = torch.tensor(azimuths, dtype=torch.float32)
    el = torch.tensor(elevations or [0.0] * len(azimuths), dtype=torch.float32)
    return el, az, torch.full_like(az, 1.5)


def _call(guidance, prompt_utils, rgb, cams, seed, **kw):
    torch.manual_seed(seed)
    el, az, dist = cams
    return guidance(rgb, prompt_utils, el, az, dist, rgb_as_latents=False, **kw)


def test_registered_names_resolve_to_our_classes():
    assert threestudio.find("perpneg-deep-floyd-guidance") is PerpNegDeepFloydGuidance
    assert threestudio.find("perpneg-deepfloyd-prompt-processor") is PerpNegDeepFloydPromptProcessor


def test_processor_encodes_with_t5_and_caches(tiny_if_path, workdir):
    proc = _processor(tiny_if_path, perp_neg_prompts=["blurry"], perp_neg_prompt_weights=[-0.5])
    out = proc()
    assert isinstance(out, PerpNegPromptProcessorOutput) and isinstance(out, PromptProcessorOutput)
    assert out.prompts_vd[1] == "a corgi, front view"
    assert out.text_embeddings_vd.shape == (4, 77, 16)  # the tiny T5's d_model
    assert out.perp_neg_bank.negatives.shape == (1, 77, 16)
    files = sorted((workdir / "c").glob("*.safetensors"))
    assert len(files) == 7  # prompt, "", 4 views, 1 negative
    assert EmbeddingCache(workdir / "c", "t5").path(str(tiny_if_path), "a corgi") in files
    a, b = proc.get_text_embeddings("a corgi", "")
    torch.testing.assert_close(a[0], out.text_embeddings[0])


def test_guidance_instantiates_and_trains_rgb(tiny_if_path, workdir):
    prompt_utils = _processor(
        tiny_if_path, perp_neg_prompts=["blurry"], perp_neg_prompt_weights=[-0.5]
    )()
    g = _guidance("perpneg-deep-floyd-guidance", tiny_if_path, perp_neg_scheme="authors")
    assert g.cfg.guidance_scale == 20.0 and g.cfg.enable_channels_last_format
    rgb = torch.rand(2, 32, 32, 3, requires_grad=True)
    out = _call(g, prompt_utils, rgb, _cameras([0.0, 90.0]), seed=0)
    out["loss_sds"].backward()
    assert math.isfinite(float(out["loss_sds"])) and rgb.grad.abs().sum() > 0
    assert out["perp_neg_branches"] == 2 * 2 + 2 + 2  # one view + one user negative per sample
    with pytest.raises(ValueError, match="rgb_as_latents"):
        g(rgb, prompt_utils, *_cameras([0.0, 90.0]), rgb_as_latents=True)


def test_vanilla_path_equals_threestudio_deep_floyd_guidance(tiny_if_path, workdir):
    """Perp-Neg off: the same numbers as threestudio's IF guidance on the same processor output."""
    prompt_utils = _processor(tiny_if_path)()
    stock = _guidance("deep-floyd-guidance", tiny_if_path)
    ours = _guidance("perpneg-deep-floyd-guidance", tiny_if_path, use_perp_neg=False)
    rgb = torch.rand(3, 32, 32, 3)
    cams = _cameras([0.0, 100.0, -170.0], [5.0, 20.0, 70.0])
    a = _call(stock, prompt_utils, rgb, cams, seed=3)
    b = _call(ours, prompt_utils, rgb, cams, seed=3)
    assert float(b["loss_sds"]) == pytest.approx(float(a["loss_sds"]), rel=1e-4)
    assert float(b["grad_norm"]) == pytest.approx(float(a["grad_norm"]), rel=1e-4)
    assert b["perp_neg_branches"] == 6


def test_batch_of_one_equals_threestudio_perp_neg(tiny_if_path, workdir):
    """threestudio's IF Perp-Neg is right for B = 1 (without guidance_eval); cfg convention agrees."""
    prompt_utils = _processor(tiny_if_path, use_perp_neg=True)()
    stock = _guidance("deep-floyd-guidance", tiny_if_path)
    ours = _guidance("perpneg-deep-floyd-guidance", tiny_if_path, guidance_scale_convention="cfg")
    rgb = torch.rand(1, 32, 32, 3)
    cams = _cameras([20.0])
    a = _call(stock, prompt_utils, rgb, cams, seed=5)
    b = _call(ours, prompt_utils, rgb, cams, seed=5)
    assert float(b["loss_sds"]) == pytest.approx(float(a["loss_sds"]), rel=1e-4)


def test_guidance_eval_with_perp_neg_for_a_batch(tiny_if_path, workdir):
    prompt_utils = _processor(tiny_if_path, use_perp_neg=True)()
    g = _guidance(
        "perpneg-deep-floyd-guidance",
        tiny_if_path,
        max_items_eval=2,
        min_step_percent=0.02,
        max_step_percent=0.03,
    )
    g.update_step(0, 0)  # apply the step percents: t near 25, one or two denoising steps
    out = _call(
        g, prompt_utils, torch.rand(2, 32, 32, 3), _cameras([0.0, 180.0]), 0, guidance_eval=True
    )
    ev = out["eval"]
    assert ev["bs"] == 2 and len(ev["texts"]) == 2
    for key in ("imgs_noisy", "imgs_1step", "imgs_1orig", "imgs_final"):
        assert ev[key].shape == (2, 64, 64, 3) and torch.isfinite(ev[key]).all()


@pytest.mark.parametrize(
    "kind,cfg,words",
    [
        ("p", {"perp_neg_scheme": "nope"}, ["perp_neg_scheme", "nope"]),
        ("p", {"perp_neg_prompts": ["x"]}, ["perp_neg_prompt_weights"]),
        ("g", {"perp_neg_scheme": "nope"}, ["perp_neg_scheme", "nope"]),
        ("g", {"weighting_strategy": "nope"}, ["weighting_strategy", "nope"]),
        ("g", {"guidance_scale_convention": "x"}, ["guidance_scale_convention"]),
        ("g", {"perp_neg_min_weight": -1.0}, ["perp_neg_min_weight", "-1"]),
        ("g", {"use_sjc": True}, ["use_sjc"]),
        ("g", {"use_img_loss": True}, ["use_img_loss"]),
    ],
)
def test_bad_config_raises_naming_the_key(tiny_if_path, workdir, kind, cfg, words):
    with pytest.raises(ValueError) as info:
        if kind == "p":
            _processor(tiny_if_path, **cfg)
        else:
            _guidance("perpneg-deep-floyd-guidance", tiny_if_path, **cfg)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("kind", ["p", "g"])
def test_missing_model_path(workdir, kind):
    with pytest.raises(FileNotFoundError) as info:
        if kind == "p":
            _processor(workdir / "no" / "model")
        else:
            _guidance("perpneg-deep-floyd-guidance", workdir / "no" / "model")
    assert "pretrained_model_name_or_path" in str(info.value)
    assert "no/model" in str(info.value)


@pytest.mark.parametrize("config", IF_CONFIGS, ids=[c.name for c in IF_CONFIGS])
def test_if_config_loads_in_threestudio(config):
    from threestudio.utils.config import load_config, parse_structured

    cfg = load_config(str(config), cli_args=["system.prompt_processor.prompt=a corgi"], n_gpus=1)
    assert cfg.system.guidance_type == "perpneg-deep-floyd-guidance"
    assert cfg.system.prompt_processor_type == "perpneg-deepfloyd-prompt-processor"
    g = parse_structured(PerpNegDeepFloydGuidance.Config, cfg.system.guidance)
    p = parse_structured(PerpNegDeepFloydPromptProcessor.Config, cfg.system.prompt_processor)
    assert g.use_perp_neg and g.guidance_scale == 20.0
    assert (
        g.pretrained_model_name_or_path
        == p.pretrained_model_name_or_path
        == "DeepFloyd/IF-I-XL-v1.0"
    )
    assert (
        p.prompt == "a corgi" and p.perp_neg_scheme == "authors" and p.perp_neg_negative_w == -2.0
    )
    assert threestudio.find(cfg.system_type) is not None
    assert threestudio.find(cfg.data_type) is not None


def test_dreamfusion_system_trains_with_the_if_config(tiny_if_path, tmp_path):
    system, dm = make_dreamfusion_system(
        REPO / "configs" / "perpneg-dreamfusion-if.yaml",
        tiny_if_path,
        tmp_path,
        ["data.batch_size=2"],
        extensions=[SHIM],
    )
    seen = []
    original = PerpNegDeepFloydGuidance.__call__

    def recording(self, rgb, prompt_utils, *args, **kwargs):
        out = original(self, rgb, prompt_utils, *args, **kwargs)
        seen.append((rgb.shape[0], out["perp_neg_branches"]))
        return out

    before = [p.detach().clone() for p in system.geometry.parameters()]
    PerpNegDeepFloydGuidance.__call__ = recording
    try:
        losses = fit_steps(system, dm, 1)
    finally:
        PerpNegDeepFloydGuidance.__call__ = original
    assert isinstance(system.guidance, PerpNegDeepFloydGuidance)  # built in on_fit_start
    assert isinstance(system.prompt_processor, PerpNegDeepFloydPromptProcessor)
    assert len(losses) == 1 and math.isfinite(losses[0])
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, system.geometry.parameters()))
    assert len(seen) == 1 and seen[0][0] == 2 and 4 <= seen[0][1] <= 4 + 4
