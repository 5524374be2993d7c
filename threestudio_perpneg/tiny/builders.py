"""Builders of tiny, seeded, randomly initialised checkpoints: Stable Diffusion and CLIP.

The Stable Diffusion folder uses the standard diffusers layout, so it loads with
`StableDiffusionPipeline.from_pretrained` and with the per-component `from_pretrained` calls. The CLIP folder loads
with `CLIPModel.from_pretrained` and `CLIPProcessor.from_pretrained`. They are meant for tests and CPU smoke runs;
the weights are random.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Callable, Mapping, Sequence

__all__ = ["build_tiny_clip", "build_tiny_deepfloyd_if", "build_tiny_stable_diffusion"]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77

# A handful of BPE merges (CLIP style: the last symbol of a word carries the `</w>` suffix).
MERGES: tuple[tuple[str, str], ...] = (
    ("t", "h"),
    ("th", "e</w>"),
    ("i", "n"),
    ("o", "n"),
    ("e", "r"),
    ("a", "n"),
    ("c", "o"),
    ("r", "g"),
    ("co", "rg"),
    ("f", "r"),
    ("fr", "on"),
    ("fron", "t</w>"),
    ("v", "i"),
    ("vi", "e"),
    ("vie", "w</w>"),
)

UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
}

VAE_CONFIG: dict[str, Any] = {
    "sample_size": 512,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 8, 16, 16),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "latent_channels": 4,
    "scaling_factor": 0.18215,
}

TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": MODEL_MAX_LENGTH,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}

CLIP_TEXT_CONFIG: dict[str, Any] = TEXT_ENCODER_CONFIG

CLIP_VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_channels": 3,
    "image_size": 32,
    "patch_size": 8,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}

CLIP_PROJECTION_DIM = 32
CLIP_IMAGE_SIZE = 32

SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def _bytes_to_unicode() -> dict[int, str]:
    """Returns CLIP's (GPT-2's) reversible mapping from bytes to printable unicode characters."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _tokenizer_vocab() -> dict[str, int]:
    """Returns the vocab in CLIP's order: bytes, bytes + `</w>`, merged tokens, then the special tokens."""
    alphabet = list(_bytes_to_unicode().values())
    tokens = (
        alphabet
        + [f"{c}</w>" for c in alphabet]
        + ["".join(m) for m in MERGES]
        + [BOS_TOKEN, EOS_TOKEN]
    )
    if len(set(tokens)) != len(tokens):
        raise ValueError("Duplicate tokens in the tiny vocabulary.")
    return {token: i for i, token in enumerate(tokens)}


def _write_json(path: pathlib.Path, obj: dict[str, Any]) -> None:
    path.write_text(
        json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )


def write_tokenizer(
    folder: pathlib.Path,
    vocab: Mapping[str, int],
    merges: Sequence[tuple[str, str]] = MERGES,
    max_length: int = MODEL_MAX_LENGTH,
) -> None:
    """Slow ``CLIPTokenizer`` files only (no tokenizer.json): transformers 4.28 and 5.x read them."""
    folder.mkdir(parents=True)
    _write_json(folder / "vocab.json", dict(vocab))
    text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text(text, encoding="utf-8")
    special_tokens = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
    }
    _write_json(folder / "special_tokens_map.json", special_tokens)
    _write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": max_length,
            "do_lower_case": True,
            "errors": "replace",
            **special_tokens,
        },
    )


def _save(model: Any, folder: pathlib.Path) -> None:
    """Calls `save_pretrained`, asking for safetensors where the installed version has the option."""
    kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True
    model.save_pretrained(folder, **kwargs)


def _save_text_encoder(text_encoder: Any, folder: pathlib.Path) -> None:
    """Saves the CLIP text encoder with `text_model.`-prefixed weight names, readable by transformers 4.x and 5.x."""
    from safetensors.torch import load_file, save_file

    _save(text_encoder, folder)
    weights = folder / "model.safetensors"
    state_dict = load_file(weights)
    if not all(key.startswith("text_model.") for key in state_dict):
        # transformers 5 drops the `text_model.` prefix, which transformers 4.x cannot map back.
        state_dict = {
            key if key.startswith("text_model.") else f"text_model.{key}": v
            for key, v in state_dict.items()
        }
        save_file(state_dict, weights, metadata={"format": "pt"})


def _build_into(folder: pathlib.Path, seed: int) -> None:
    import diffusers
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder.mkdir()
    folder.chmod(0o755)  # rwxr-xr-x whatever the umask

    vocab = _tokenizer_vocab()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**VAE_CONFIG)
        torch.manual_seed(seed + 2)
        text_config = CLIPTextConfig(
            vocab_size=len(vocab),
            bos_token_id=vocab[BOS_TOKEN],
            eos_token_id=vocab[EOS_TOKEN],
            pad_token_id=vocab[EOS_TOKEN],
            **TEXT_ENCODER_CONFIG,
        )
        text_encoder = CLIPTextModel(text_config)

    _save(unet, folder / "unet")
    _save(vae, folder / "vae")
    _save_text_encoder(text_encoder, folder / "text_encoder")
    write_tokenizer(folder / "tokenizer", vocab)
    scheduler: Any = DDIMScheduler(**SCHEDULER_CONFIG)
    scheduler.save_pretrained(folder / "scheduler")
    _write_json(
        folder / "model_index.json",
        {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )


def _is_occupied(path: pathlib.Path) -> bool:
    if path.is_symlink() or path.is_file():
        return True
    return path.is_dir() and any(path.iterdir())


def build_tiny_stable_diffusion(
    path: str | os.PathLike, seed: int = 0, *, overwrite: bool = False
) -> pathlib.Path:
    """
    Builds a tiny, randomly initialised Stable Diffusion checkpoint folder (diffusers layout).

    Args:
        path (`str` or `os.PathLike`):
            Target folder. It is built in a temporary sibling folder first and then renamed into place.
        seed (`int`, *optional*, defaults to 0):
            Seed of the weight initialisation; the same seed gives bit-identical weights with the same library
            versions. The caller's global torch RNG state is left untouched.
        overwrite (`bool`, *optional*, defaults to `False`):
            Whether to replace an existing non-empty `path`.

    Returns:
        `pathlib.Path`: The absolute path of the checkpoint folder.

    Raises:
        `FileExistsError`: If `path` exists, is non-empty and `overwrite` is `False`.
    """
    return _build_atomically(path, _build_into, seed, overwrite)


def _save_clip_model(model: Any, folder: pathlib.Path) -> None:
    """Saves a `CLIPModel` with `text_model.` / `vision_model.`-prefixed weight names (both stacks read them)."""
    from safetensors.torch import load_file, save_file

    _save(model, folder)
    weights = folder / "model.safetensors"
    state_dict = load_file(weights)
    towers = ("text_model.", "vision_model.", "text_projection.", "visual_projection.")
    if not all(key.startswith(towers) or key == "logit_scale" for key in state_dict):
        # Guard against a stack that drops the tower prefixes, as transformers 5 does for CLIPTextModel; a
        # CLIPModel keeps them in the versions tested, so this check is expected to pass.
        raise RuntimeError(
            f"unexpected CLIPModel weight names in {weights}: {sorted(state_dict)[:5]} ..."
        )
    # Drop the `position_ids` buffers transformers 4.x writes (5.x does not save them; both rebuild them as
    # arange at init), so both stacks write the same weight names.
    kept = {key: v for key, v in state_dict.items() if not key.endswith(".position_ids")}
    if len(kept) != len(state_dict):
        save_file(kept, weights, metadata={"format": "pt"})


def _build_clip_into(folder: pathlib.Path, seed: int) -> None:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    vocab = _tokenizer_vocab()
    # Slow-tokenizer files only (vocab.json, merges.txt, ...): `CLIPProcessor.save_pretrained` of transformers 5
    # writes a tokenizer.json (and no vocab.json / merges.txt) that transformers 4.28 cannot read.
    write_tokenizer(folder, vocab)
    text_config = {
        "vocab_size": len(vocab),
        "bos_token_id": vocab[BOS_TOKEN],
        "eos_token_id": vocab[EOS_TOKEN],
        "pad_token_id": vocab[EOS_TOKEN],
        **CLIP_TEXT_CONFIG,
    }
    config = CLIPConfig(
        text_config=text_config,
        vision_config=dict(CLIP_VISION_CONFIG),
        projection_dim=CLIP_PROJECTION_DIM,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    _save_clip_model(model, folder)
    size = CLIP_IMAGE_SIZE
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    image_processor.save_pretrained(folder)
    (folder / "tokenizer.json").unlink(missing_ok=True)


def _build_atomically(
    path: str | os.PathLike, build: Callable[[pathlib.Path, int], None], seed: int, overwrite: bool
) -> pathlib.Path:
    """Builds into a temporary sibling folder with `build(folder, seed)`, then renames it into place.

    `build` creates `folder` itself. Returns the absolute target path.
    """
    target = pathlib.Path(path).expanduser().absolute()
    occupied = f"{target} exists and is not empty; pass overwrite=True to replace it."
    if _is_occupied(target) and not overwrite:
        raise FileExistsError(occupied)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.rmdir()  # the builder creates the folder itself
        build(tmp, seed)
        if _is_occupied(target):
            if not overwrite:
                raise FileExistsError(occupied)
            old = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "old")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if target.is_dir():
                target.rmdir()
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp)
    return target


def build_tiny_clip(
    path: str | os.PathLike, seed: int = 0, *, overwrite: bool = False
) -> pathlib.Path:
    """
    Builds a tiny, randomly initialised CLIP checkpoint folder (`CLIPModel` + `CLIPProcessor` files).

    Text tower: 2 layers, hidden size 32, the 529-token vocabulary of the tiny Stable Diffusion tokenizer. Vision
    tower: 2 layers, hidden size 32, 32x32 images in 8x8 patches. Projection dimension 32. The processor is a
    `CLIPImageProcessor` (resize + centre crop to 32) and a slow `CLIPTokenizer` (vocab.json + merges.txt, no
    tokenizer.json), so the folder loads with `CLIPModel.from_pretrained` and `CLIPProcessor.from_pretrained` in
    transformers 4.28 and 5.x alike.

    Args:
        path (`str` or `os.PathLike`):
            Target folder. It is built in a temporary sibling folder first and then renamed into place.
        seed (`int`, *optional*, defaults to 0):
            Seed of the weight initialisation; the caller's global torch RNG state is left untouched.
        overwrite (`bool`, *optional*, defaults to `False`):
            Whether to replace an existing non-empty `path`.

    Returns:
        `pathlib.Path`: The absolute path of the checkpoint folder.

    Raises:
        `FileExistsError`: If `path` exists, is non-empty and `overwrite` is `False`.
    """
    return _build_atomically(path, _build_clip_into, seed, overwrite)


# --------------------------------------------------------------------------------------------- DeepFloyd IF

#: Words of the tiny T5 vocabulary (SentencePiece style: `▁` marks the start of a word); any other text falls
#: back to single characters, so every prompt tokenizes to something distinct.
T5_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "on", "corgi", "dog", "cat", "hamburger", "photo", "DSLR", "zoomed",
    "out", "front", "side", "back", "backside", "overhead", "view", "blurry", "low", "quality",
)  # fmt: skip
T5_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.'\"-!?:;()"
T5_SPECIAL: tuple[str, ...] = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5

T5_ENCODER_CONFIG: dict[str, Any] = {
    "d_model": 16,
    "d_kv": 8,
    "d_ff": 32,
    "num_layers": 2,
    "num_heads": 2,
    "relative_attention_num_buckets": 8,
    "dropout_rate": 0.0,
    "feed_forward_proj": "gated-gelu",
    "is_encoder_decoder": False,
    "use_cache": False,
}

#: IF stage I's UNet layout, shrunk: 3 → 6 channels (ε and learned variance), text projection and pooling of
#: the T5 states (`encoder_hid_dim`, `addition_embed_type="text"`), scale-shift resnets, simple cross attention.
IF_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 3,
    "out_channels": 6,
    "down_block_types": ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    "up_block_types": ("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "encoder_hid_dim": T5_ENCODER_CONFIG["d_model"],
    "addition_embed_type": "text",
    "addition_embed_type_num_heads": 2,
    "resnet_time_scale_shift": "scale_shift",
    "resnet_skip_time_act": True,
    "resnet_out_scale_factor": 1.414,
    "act_fn": "gelu",
    "time_embedding_act_fn": "gelu",
}

#: DeepFloyd IF-I's scheduler: cosine betas, learned-range variance, 1000 steps.
IF_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "variance_type": "learned_range",
    "prediction_type": "epsilon",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "thresholding": True,
    "dynamic_thresholding_ratio": 0.95,
    "sample_max_value": 1.5,
}


def _t5_vocab() -> list[tuple[str, float]]:
    vocab: list[tuple[str, float]] = [(t, 0.0) for t in T5_SPECIAL] + [("\u2581", -2.0)]
    vocab += [(f"\u2581{w}", -5.0) for w in T5_WORDS]
    vocab += [(c, -8.0) for c in T5_CHARS]
    if len({t for t, _ in vocab}) != len(vocab):
        raise ValueError("Duplicate tokens in the tiny T5 vocabulary.")
    return vocab


def _write_t5_tokenizer(folder: pathlib.Path, vocab: list[tuple[str, float]]) -> None:
    """A Unigram `tokenizer.json` (tokenizers 0.13 format, read by 0.13 and 0.2x) + T5 tokenizer config.

    No SentencePiece model and no download: `T5TokenizerFast` / `AutoTokenizer` load it in transformers 4.28
    and 5.x alike.
    """
    folder.mkdir(parents=True)
    eos = {"SpecialToken": {"id": "</s>", "type_id": 0}}
    seq = {"Sequence": {"id": "A", "type_id": 0}}
    seq_b = {"Sequence": {"id": "B", "type_id": 0}}
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": t,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, t in enumerate(T5_SPECIAL)
        ],
        "normalizer": {
            "type": "Sequence",
            "normalizers": [{"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}],
        },
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": True},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [seq, eos],
            "pair": [seq, eos, seq_b, eos],
            "special_tokens": {"</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}},
        },
        "decoder": {"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": True},
        "model": {"type": "Unigram", "unk_id": 2, "vocab": [list(v) for v in vocab]},
    }
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "T5Tokenizer",
            "model_max_length": MODEL_MAX_LENGTH,
            "extra_ids": 0,
            "additional_special_tokens": [],
            **special,
        },
    )


def _build_deepfloyd_into(folder: pathlib.Path, seed: int) -> None:
    import diffusers
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    vocab = _t5_vocab()
    folder.mkdir(parents=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**IF_UNET_CONFIG)
        torch.manual_seed(seed + 2)
        special: dict[str, Any] = {
            "pad_token_id": 0,
            "eos_token_id": 1,
            "decoder_start_token_id": 0,
        }
        text_config = T5Config(vocab_size=len(vocab), **special, **T5_ENCODER_CONFIG)
        text_encoder = T5EncoderModel(text_config)
    _save(unet, folder / "unet")
    _save(text_encoder, folder / "text_encoder")
    _write_t5_tokenizer(folder / "tokenizer", vocab)
    scheduler: Any = DDPMScheduler(**IF_SCHEDULER_CONFIG)
    scheduler.save_pretrained(folder / "scheduler")
    _write_json(
        folder / "model_index.json",
        {
            "_class_name": "IFPipeline",
            "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "watermarker": [None, None],
            "scheduler": ["diffusers", "DDPMScheduler"],
            "text_encoder": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "T5TokenizerFast"],
            "unet": ["diffusers", "UNet2DConditionModel"],
        },
    )


def build_tiny_deepfloyd_if(
    path: str | os.PathLike, seed: int = 0, *, overwrite: bool = False
) -> pathlib.Path:
    """
    Builds a tiny, randomly initialised DeepFloyd IF stage I checkpoint folder (diffusers layout).

    `unet/` is a `UNet2DConditionModel` with IF-I's layout (3 input channels, 6 output channels: ε and the
    learned variance, 64x64 samples, `encoder_hid_dim` projecting the T5 states to `cross_attention_dim` 32),
    `text_encoder/` a 2-layer `T5EncoderModel` (d_model 16), `tokenizer/` a T5 tokenizer built locally (a
    Unigram `tokenizer.json`, no SentencePiece needed), `scheduler/` a `DDPMScheduler` with IF's config
    (squaredcos_cap_v2, learned_range, 1000 steps). Loads with the per-component `from_pretrained` calls in
    diffusers 0.19 / transformers 4.28 and diffusers 0.4x / transformers 5.x.

    Args:
        path (`str` or `os.PathLike`):
            Target folder. It is built in a temporary sibling folder first and then renamed into place.
        seed (`int`, *optional*, defaults to 0):
            Seed of the weight initialisation; the caller's global torch RNG state is left untouched.
        overwrite (`bool`, *optional*, defaults to `False`):
            Whether to replace an existing non-empty `path`.

    Returns:
        `pathlib.Path`: The absolute path of the checkpoint folder.

    Raises:
        `FileExistsError`: If `path` exists, is non-empty and `overwrite` is `False`.
    """
    target = pathlib.Path(path).expanduser().absolute()
    return _build_atomically(target, _build_deepfloyd_into, seed, overwrite)
