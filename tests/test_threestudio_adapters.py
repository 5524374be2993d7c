"""Our registered classes inside the real threestudio (skipped when threestudio is not importable).

Drop-in checks compare against threestudio's own stock classes on the same tiny model, same seed.
"""

from __future__ import annotations

import math
import sys
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
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))

load_custom_extension(SHIM)

from threestudio.models.prompt_processors.base import PromptProcessorOutput  # noqa: E402

from threestudio_perpneg.adapters import (  # noqa: E402
    PerpNegPromptProcessor,
    PerpNegStableDiffusionGuidance,
)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # stock processors write .threestudio_cache/ under cwd
    return tmp_path


def _processor(kind: str, model: Path, **cfg):
    base = {"pretrained_model_name_or_path": str(model), "prompt": "a corgi", "spawn": False}
    return threestudio.find(kind)({**base, **cfg})


def _guidance(kind: str, model: Path, **cfg):
    base = {"pretrained_model_name_or_path": str(model), "half_precision_weights": False}
    return threestudio.find(kind)({**base, **cfg})


def _cameras(azimuths, elevations=None):
    az = torch.tensor(azimuths, dtype=torch.float32)
    el = torch.tensor(elevations or [0.0] * len(azimuths), dtype=torch.float32)
    return el, az, torch.full_like(az, 1.5)


def _call(guidance, prompt_utils, rgb, cams, seed):
    torch.manual_seed(seed)
    el, az, dist = cams
    return guidance(rgb, prompt_utils, el, az, dist, rgb_as_latents=False)


def test_registered_names_resolve_to_our_classes():
    assert threestudio.find("perpneg-prompt-processor") is PerpNegPromptProcessor
    assert threestudio.find("perpneg-stable-diffusion-guidance") is PerpNegStableDiffusionGuidance


def test_processor_output_keeps_threestudio_contract(tiny_sd_path, workdir):
    proc = _processor(
        "perpneg-prompt-processor",
        tiny_sd_path,
        perp_neg_prompts=["blurry"],
        perp_neg_prompt_weights=[-0.5],
        cache_dir=str(workdir / "cache"),
    )
    out = proc()
    assert isinstance(out, PromptProcessorOutput)
    assert out.prompts_vd == [
        "a corgi, side view",
        "a corgi, front view",
        "a corgi, back view",
        "a corgi, overhead view",
    ]
    assert [d.name for d in out.directions] == ["side", "front", "back", "overhead"]
    el, az, dist = _cameras([0.0, 90.0, 180.0, 10.0], [0.0, 0.0, 0.0, 75.0])
    emb = out.get_text_embeddings(el, az, dist, True)
    expected = out.text_embeddings_vd[torch.tensor([1, 0, 2, 3])]
    assert torch.equal(emb[:4], expected)
    assert len(list((workdir / "cache").glob("*.safetensors"))) == 7  # prompt, "", 4 views, 1 neg

    # A stock threestudio guidance runs on our processor's output, with and without Perp-Neg.
    stock = _guidance("stable-diffusion-guidance", tiny_sd_path)
    rgb = torch.rand(2, 32, 32, 3)
    for use in (False, True):
        out.use_perp_neg = use
        res = _call(stock, out, rgb, _cameras([30.0, 150.0]), seed=0)
        assert math.isfinite(float(res["loss_sds"]))


def test_vanilla_path_equals_threestudio_stable_diffusion_guidance(tiny_sd_path, workdir):
    """Perp-Neg off with the stock processor: the same numbers as threestudio's guidance."""
    prompt_utils = _processor("stable-diffusion-prompt-processor", tiny_sd_path)()
    stock = _guidance("stable-diffusion-guidance", tiny_sd_path)
    ours = _guidance("perpneg-stable-diffusion-guidance", tiny_sd_path, use_perp_neg=False)
    rgb = torch.rand(3, 32, 32, 3)
    cams = _cameras([0.0, 100.0, -170.0], [5.0, 20.0, 70.0])
    a = _call(stock, prompt_utils, rgb, cams, seed=3)
    b = _call(ours, prompt_utils, rgb, cams, seed=3)
    assert float(b["loss_sds"]) == pytest.approx(float(a["loss_sds"]), rel=1e-5)
    assert float(b["grad_norm"]) == pytest.approx(float(a["grad_norm"]), rel=1e-5)
    assert (b["min_step"], b["max_step"]) == (a["min_step"], a["max_step"])
    assert b["perp_neg_branches"] == 6


@pytest.mark.parametrize("azimuth,elevation", [(20.0, 0.0), (-120.0, 10.0), (60.0, 80.0)])
def test_batch_of_one_equals_threestudio_perp_neg(tiny_sd_path, workdir, azimuth, elevation):
    """threestudio's built-in Perp-Neg is right for B = 1; ours (cfg convention) must agree."""
    prompt_utils = _processor(
        "stable-diffusion-prompt-processor", tiny_sd_path, use_perp_neg=True
    )()
    stock = _guidance("stable-diffusion-guidance", tiny_sd_path)
    ours = _guidance(
        "perpneg-stable-diffusion-guidance", tiny_sd_path, guidance_scale_convention="cfg"
    )
    rgb = torch.rand(1, 32, 32, 3)
    cams = _cameras([azimuth], [elevation])
    a = _call(stock, prompt_utils, rgb, cams, seed=5)
    b = _call(ours, prompt_utils, rgb, cams, seed=5)
    assert float(b["loss_sds"]) == pytest.approx(float(a["loss_sds"]), rel=1e-4)
    # Overhead views evaluate no negatives; threestudio runs 4 branches regardless.
    assert b["perp_neg_branches"] == (2 if elevation > 60 else 4)


def test_threestudio_convention_keeps_scale_meaning(tiny_sd_path, workdir):
    """Default convention: guidance_scale s behaves as threestudio's vanilla s, Perp-Neg or not."""
    prompt_utils = _processor("perpneg-prompt-processor", tiny_sd_path, cache_dir="c")()
    ours_ts = _guidance("perpneg-stable-diffusion-guidance", tiny_sd_path, guidance_scale=7.0)
    ours_cfg = _guidance(
        "perpneg-stable-diffusion-guidance",
        tiny_sd_path,
        guidance_scale=8.0,
        guidance_scale_convention="cfg",
    )
    rgb = torch.rand(2, 32, 32, 3)
    cams = _cameras([45.0, 135.0])
    a = _call(ours_ts, prompt_utils, rgb, cams, seed=1)
    b = _call(ours_cfg, prompt_utils, rgb, cams, seed=1)
    assert float(a["loss_sds"]) == pytest.approx(float(b["loss_sds"]), rel=1e-5)


def test_user_negatives_are_projected_and_change_the_result(tiny_sd_path, workdir):
    rgb = torch.rand(2, 32, 32, 3)
    cams = _cameras([0.0, 90.0])
    guidance = _guidance(
        "perpneg-stable-diffusion-guidance", tiny_sd_path, perp_neg_scheme="authors"
    )
    plain = _processor("perpneg-prompt-processor", tiny_sd_path, cache_dir="c")()
    with_neg = _processor(
        "perpneg-prompt-processor",
        tiny_sd_path,
        cache_dir="c",
        perp_neg_prompts=["blurry", "low quality"],
        perp_neg_prompt_weights=[-1.0, -0.5],
    )()
    a = _call(guidance, plain, rgb, cams, seed=2)
    b = _call(guidance, with_neg, rgb, cams, seed=2)
    # authors' scheme: one view negative per sample at 0 and 90 degrees, plus 2 user negatives each.
    assert a["perp_neg_branches"] == 2 * 2 + 2
    assert b["perp_neg_branches"] == 2 * 2 + 2 + 4
    assert float(a["loss_sds"]) != pytest.approx(float(b["loss_sds"]), rel=1e-6)


def test_guidance_eval_images_for_a_batch(tiny_sd_path, workdir):
    prompt_utils = _processor("perpneg-prompt-processor", tiny_sd_path, cache_dir="c")()
    guidance = _guidance(
        "perpneg-stable-diffusion-guidance",
        tiny_sd_path,
        max_items_eval=2,
        min_step_percent=0.02,
        max_step_percent=0.03,
    )
    el, az, dist = _cameras([0.0, 180.0])
    guidance.update_step(0, 0)  # applies min/max_step_percent: t in [20, 30]
    torch.manual_seed(0)
    out = guidance(torch.rand(2, 32, 32, 3), prompt_utils, el, az, dist, guidance_eval=True)
    ev = out["eval"]
    assert ev["bs"] == 2 and len(ev["texts"]) == 2
    for key in ("imgs_noisy", "imgs_1step", "imgs_1orig", "imgs_final"):
        assert ev[key].shape == (2, 512, 512, 3)
        assert torch.isfinite(ev[key]).all()
    # Each caption is its own sample's camera (per-sample conditioning: test_guidance_eval_batch).
    assert [c.split("\n")[1:] for c in ev["texts"]] == [
        ["e0.0", "a0.0", "c1.50"],
        ["e0.0", "a180.0", "c1.50"],
    ]
    assert all(0 < n <= 0.03 for n in ev["noise_levels"])


def test_update_step_schedules_and_sqrt_anneal(tiny_sd_path, workdir):
    g = _guidance(
        "perpneg-stable-diffusion-guidance",
        tiny_sd_path,
        min_step_percent=[0, 0.5, 0.02, 100],
        max_step_percent=0.98,
        grad_clip=[0, 1.0, 3.0, 100],
    )
    g.update_step(0, 0)
    assert (g.min_step, g.max_step, g.grad_clip_val) == (500, 980, 1.0)
    g.update_step(0, 100)
    assert (g.min_step, g.max_step, g.grad_clip_val) == (20, 980, 3.0)
    s = _guidance(
        "perpneg-stable-diffusion-guidance", tiny_sd_path, sqrt_anneal=True, trainer_max_steps=100
    )
    s.update_step(0, 25)  # progress sqrt(0.25) = 0.5: halfway between 0.98 and 0.02
    assert s.min_step == s.max_step == int(1000 * 0.5)


@pytest.mark.parametrize(
    "kind,cfg,exc,words",
    [
        ("p", {"perp_neg_scheme": "nope"}, ValueError, ["perp_neg_scheme", "nope"]),
        ("p", {"perp_neg_f_fs": [4.0, 0.5]}, ValueError, ["perp_neg_f_fs", "[4.0, 0.5]"]),
        ("p", {"front_threshold": 200.0}, ValueError, ["front_threshold", "200"]),
        ("p", {"overhead_threshold": 95.0}, ValueError, ["overhead_threshold", "95"]),
        ("p", {"prompt": "  "}, ValueError, ["prompt"]),
        ("p", {"perp_neg_prompts": ["x"]}, ValueError, ["perp_neg_prompt_weights"]),
        ("p", {"perp_neg_prompts": ["x"], "perp_neg_prompt_weights": [0.5]}, ValueError, ["0.5"]),
        ("p", {"view_templates": {"front": "front"}}, ValueError, ["view_templates.front"]),
        ("g", {"perp_neg_scheme": "nope"}, ValueError, ["perp_neg_scheme", "nope"]),
        ("g", {"weighting_strategy": "nope"}, ValueError, ["weighting_strategy", "nope"]),
        ("g", {"guidance_scale_convention": "x"}, ValueError, ["guidance_scale_convention"]),
        ("g", {"perp_neg_min_weight": -1.0}, ValueError, ["perp_neg_min_weight", "-1"]),
    ],
)
def test_bad_config_raises_naming_the_key(tiny_sd_path, workdir, kind, cfg, exc, words):
    with pytest.raises(exc) as info:
        if kind == "p":
            _processor("perpneg-prompt-processor", tiny_sd_path, cache_dir="c", **cfg)
        else:
            _guidance("perpneg-stable-diffusion-guidance", tiny_sd_path, **cfg)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("kind", ["perpneg-prompt-processor", "perpneg-stable-diffusion-guidance"])
def test_missing_model_path(workdir, kind):
    with pytest.raises(FileNotFoundError) as info:
        if kind.endswith("processor"):
            _processor(kind, workdir / "no" / "model", cache_dir="c")
        else:
            _guidance(kind, workdir / "no" / "model")
    assert "pretrained_model_name_or_path" in str(info.value)
    assert "no/model" in str(info.value)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_shipped_config_loads_in_threestudio(config):
    from threestudio.utils.config import load_config, parse_structured

    cli = ["system.prompt_processor.prompt=a corgi"]
    if "refine" in config.name:
        cli.append("system.geometry_convert_from=outputs/coarse/ckpts/last.ckpt")
    if config.name.startswith("testbed-"):  # the prior folder is a required key (???)
        prior = REPO / "threestudio_perpneg" / "testbed" / "assets" / "priors-6000" / "p35"
        cli += [
            f"system.guidance.pretrained_model_name_or_path={prior}",
            f"system.prompt_processor.pretrained_model_name_or_path={prior}",
        ]
    cfg = load_config(str(config), cli_args=cli, n_gpus=1)
    # Every shipped config uses one of our guidances and prompt processors (SDS, VSD, DeepFloyd IF).
    assert cfg.system.guidance_type.startswith("perpneg-")
    assert cfg.system.prompt_processor_type.startswith("perpneg-")
    g = parse_structured(threestudio.find(cfg.system.guidance_type).Config, cfg.system.guidance)
    p = parse_structured(
        threestudio.find(cfg.system.prompt_processor_type).Config, cfg.system.prompt_processor
    )
    assert g.use_perp_neg and p.prompt == "a corgi"
    assert threestudio.find(cfg.system_type) is not None
    assert threestudio.find(cfg.data_type) is not None


def test_dreamfusion_system_trains_with_our_config(tiny_sd_path, tmp_path):
    system, dm = make_dreamfusion_system(
        REPO / "configs" / "perpneg-dreamfusion.yaml",
        tiny_sd_path,
        tmp_path,
        [
            "data.batch_size=2",
            "system.prompt_processor.perp_neg_prompts=[blurry]",
            "system.prompt_processor.perp_neg_prompt_weights=[-0.5]",
        ],
        extensions=[SHIM],
    )
    seen = []
    original = PerpNegStableDiffusionGuidance.__call__

    def recording(self, rgb, prompt_utils, *args, **kwargs):
        out = original(self, rgb, prompt_utils, *args, **kwargs)
        seen.append((rgb.shape[0], out["perp_neg_branches"], type(prompt_utils).__name__))
        return out

    before = [p.detach().clone() for p in system.geometry.parameters()]
    PerpNegStableDiffusionGuidance.__call__ = recording
    try:
        losses = fit_steps(system, dm, 2)
    finally:
        PerpNegStableDiffusionGuidance.__call__ = original
    assert isinstance(system.guidance, PerpNegStableDiffusionGuidance)
    assert isinstance(system.prompt_processor, PerpNegPromptProcessor)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, system.geometry.parameters()))
    assert len(seen) == 2
    for batch, branches, kind in seen:
        assert batch == 2 and kind == "PerpNegPromptProcessorOutput"
        # 2 per sample + user negative per sample + at most 2 view negatives per sample
        assert 2 * 2 + 2 <= branches <= 2 * 2 + 2 + 4


def test_link_then_launch_py_loads_the_shim_and_config(tmp_path, monkeypatch, capsys):
    """`threestudio-perpneg link` + launch.py's own custom-module loader + load_config."""
    import importlib.util

    from threestudio.utils.config import load_config

    from threestudio_perpneg.commands.link import link_into

    real = Path(threestudio.__file__).resolve().parents[1]
    root = tmp_path / "threestudio"
    root.mkdir()
    (root / "threestudio").symlink_to(real / "threestudio", target_is_directory=True)
    (root / "launch.py").symlink_to(real / "launch.py")
    (root / "configs").mkdir()
    (root / "custom").mkdir()
    written = link_into(root)
    assert (root / "custom" / "threestudio-perpneg" / "__init__.py") in written

    spec = importlib.util.spec_from_file_location("ts_launch", root / "launch.py")
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    monkeypatch.chdir(root)
    monkeypatch.delitem(sys.modules, "threestudio-perpneg", raising=False)
    launch.load_custom_modules()  # prints "IMPORT FAILED" instead of raising
    assert "IMPORT FAILED" not in capsys.readouterr().out
    shim = sys.modules["threestudio-perpneg"]
    assert Path(shim.__file__).resolve() == (
        root / "custom" / "threestudio-perpneg" / "__init__.py"
    )
    cfg = load_config(
        "configs/perpneg-dreamfusion.yaml",
        cli_args=['system.prompt_processor.prompt="a corgi"'],
        n_gpus=1,
    )
    assert cfg.system.prompt_processor.prompt == "a corgi"
    assert threestudio.find(cfg.system.guidance_type) is PerpNegStableDiffusionGuidance
    assert threestudio.find(cfg.system.prompt_processor_type) is PerpNegPromptProcessor


def test_seeded_guidance_reproduces_and_differs_per_rank(tiny_sd_path, workdir, monkeypatch):
    prompt_utils = _processor("perpneg-prompt-processor", tiny_sd_path, cache_dir="c")()
    rgb = torch.rand(2, 32, 32, 3)
    cams = _cameras([30.0, -100.0])
    losses = []
    for rank in ("0", "0", "1"):
        monkeypatch.setenv("RANK", rank)
        g = _guidance("perpneg-stable-diffusion-guidance", tiny_sd_path, seed=7)
        # Different global seeds: only the private generator may matter.
        losses.append(float(_call(g, prompt_utils, rgb, cams, seed=len(losses))["loss_sds"]))
    assert losses[0] == losses[1]
    assert losses[2] != losses[0]
