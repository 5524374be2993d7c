"""Tests for the tiny Stable Diffusion checkpoint builder."""

from __future__ import annotations

import json
import pathlib
import re

import pytest
import torch

from threestudio_perpneg.tiny.builders import build_tiny_stable_diffusion

WEIGHT_FILES = (
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
)
PROMPT = "a corgi, front view"


def _weights(path: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {
        f"{name}:{key}": value
        for name in WEIGHT_FILES
        for key, value in load_file(path / name).items()
    }


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny") / "sd", seed=0)


def test_layout(tiny_sd: pathlib.Path) -> None:
    for name in WEIGHT_FILES:
        assert (tiny_sd / name).is_file()
    tokenizer_files = sorted(p.name for p in (tiny_sd / "tokenizer").iterdir())
    assert tokenizer_files == [
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    model_index = json.loads((tiny_sd / "model_index.json").read_text())
    assert model_index["_class_name"] == "StableDiffusionPipeline"
    assert model_index["safety_checker"] == [None, None]
    assert model_index["feature_extractor"] == [None, None]
    assert not list(tiny_sd.parent.glob(".*"))  # no temporary folders left behind


def test_vae(tiny_sd: pathlib.Path) -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    assert vae.config.scaling_factor == 0.18215
    with torch.no_grad():
        latents = vae.encode(torch.rand(1, 3, 512, 512) * 2 - 1).latent_dist.sample()
    assert latents.shape == (1, 4, 64, 64)
    assert torch.isfinite(latents).all()


def test_unet(tiny_sd: pathlib.Path) -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    assert unet.config.in_channels == 4 and unet.config.cross_attention_dim == 32
    latents = torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        out = unet(
            latents,
            torch.tensor([999, 10]),
            encoder_hidden_states=torch.randn(2, 77, 32),
        ).sample
    assert out.shape == latents.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("tokenizer_cls", ["CLIPTokenizer", "AutoTokenizer"])
def test_tokenizer_and_text_encoder(tiny_sd: pathlib.Path, tokenizer_cls: str) -> None:
    import transformers
    from transformers import CLIPTextModel

    tokenizer = getattr(transformers, tokenizer_cls).from_pretrained(tiny_sd, subfolder="tokenizer")
    assert tokenizer.model_max_length == 77
    ids = tokenizer(
        PROMPT,
        padding="max_length",
        max_length=77,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    assert ids.shape == (1, 77)
    assert ids[0, 0].item() == tokenizer.bos_token_id and tokenizer.eos_token_id in ids[0].tolist()
    assert (
        tokenizer.unk_token_id
        not in ids[0, 1 : ids[0].tolist().index(tokenizer.eos_token_id)].tolist()
    )

    text_encoder = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")
    assert text_encoder.config.vocab_size == len(tokenizer)
    with torch.no_grad():
        hidden = text_encoder(ids).last_hidden_state
    assert hidden.shape == (1, 77, 32)


def test_scheduler(tiny_sd: pathlib.Path) -> None:
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_pretrained(tiny_sd, subfolder="scheduler")
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.steps_offset == 1
    assert not scheduler.config.clip_sample and not scheduler.config.set_alpha_to_one


@pytest.mark.parametrize("tokenizer_none", [False, True])
def test_pipeline_loads(tiny_sd: pathlib.Path, tokenizer_none: bool) -> None:
    from diffusers import StableDiffusionPipeline

    kwargs = {"tokenizer": None, "text_encoder": None} if tokenizer_none else {}
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_sd,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        torch_dtype=torch.float32,
        **kwargs,
    )
    assert pipe.unet is not None and pipe.vae is not None and pipe.scheduler is not None
    assert (pipe.tokenizer is None) == tokenizer_none


def test_seeding(tiny_sd: pathlib.Path, tmp_path: pathlib.Path) -> None:
    rng_state = torch.get_rng_state()
    same = build_tiny_stable_diffusion(tmp_path / "same", seed=0)
    other = build_tiny_stable_diffusion(tmp_path / "other", seed=1)
    assert torch.equal(rng_state, torch.get_rng_state())
    reference = _weights(tiny_sd)
    assert _same(reference, _weights(same))
    other_weights = _weights(other)
    assert reference.keys() == other_weights.keys()
    for name in WEIGHT_FILES:
        assert any(
            not torch.equal(v, other_weights[k])
            for k, v in reference.items()
            if k.startswith(f"{name}:")
        )


def test_existing_target(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "sd"
    target.mkdir()
    build_tiny_stable_diffusion(target)  # an empty folder is fine
    with pytest.raises(FileExistsError, match=re.escape(str(target))):
        build_tiny_stable_diffusion(target)
    (target / "marker").touch()
    build_tiny_stable_diffusion(target, seed=1, overwrite=True)
    assert not (target / "marker").exists()
    assert (target / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sd"]
