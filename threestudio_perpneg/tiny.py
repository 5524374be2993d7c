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
from typing import Any

__all__ = ["build_tiny_clip", "build_tiny_stable_diffusion"]

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


def _write_tokenizer(folder: pathlib.Path, vocab: dict[str, int]) -> None:
    """Writes slow-tokenizer files only (no `tokenizer.json`), readable by transformers 4.x and 5.x."""
    folder.mkdir(parents=True)
    _write_json(folder / "vocab.json", vocab)
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES)
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
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
            "model_max_length": MODEL_MAX_LENGTH,
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
    _write_tokenizer(folder / "tokenizer", vocab)
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
    target = pathlib.Path(path).expanduser().absolute()
    if _is_occupied(target) and not overwrite:
        raise FileExistsError(
            f"{target} exists and is not empty; pass overwrite=True to replace it."
        )
    target.parent.mkdir(parents=True, exist_ok=True)

    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)
        _build_into(tmp, seed)
        if _is_occupied(target):
            if not overwrite:
                raise FileExistsError(
                    f"{target} exists and is not empty; pass overwrite=True to replace it."
                )
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
    _write_tokenizer(folder, vocab)
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


def _build_atomically(target: pathlib.Path, build: Any, seed: int, overwrite: bool) -> pathlib.Path:
    """Builds into a temporary sibling folder with `build(folder, seed)`, then renames it into place."""
    if _is_occupied(target) and not overwrite:
        raise FileExistsError(
            f"{target} exists and is not empty; pass overwrite=True to replace it."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.rmdir()  # the builder creates the folder itself (with the default mode)
        build(tmp, seed)
        if _is_occupied(target):
            if not overwrite:
                raise FileExistsError(
                    f"{target} exists and is not empty; pass overwrite=True to replace it."
                )
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
    target = pathlib.Path(path).expanduser().absolute()
    return _build_atomically(target, _build_clip_into, seed, overwrite)
