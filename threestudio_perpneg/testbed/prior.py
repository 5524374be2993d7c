"""The Janus testbed prior: a tiny pixel-space text-to-image diffusion model in the diffusers layout.

The checkpoint folder is what our guidance classes load with ``from_pretrained``:

* ``unet/``: ``UNet2DConditionModel``, 3 → 3 channels (ε only, no learned variance), ``sample_size``
  = the dataset resolution (16-32 px), cross attention on the CLIP text states;
* ``text_encoder/`` + ``tokenizer/``: a small ``CLIPTextModel`` and a slow ``CLIPTokenizer``
  (vocab.json + merges.txt only, readable by transformers 4.28 and 5.x) whose vocabulary is built
  from the dataset's caption words plus the words of the guidance's view prompts, so every caption
  and every ``"<prompt>, back view"`` prompt is tokenised into whole words;
* ``scheduler/``: ``DDPMScheduler`` config (cosine betas, fixed small variance, ε prediction);
* ``model_index.json``; ``testbed.json`` (the dataset config and the training recipe).

``view_word_separation`` (a knob of :class:`~threestudio_perpneg.testbed.dataset.DatasetConfig`)
sets how far apart the token embeddings of the view words (front, side, back, overhead, backside)
start: the rows are ``m + s·(e_v − m)`` around their mean ``m`` with ``s`` the separation.
``s = 1`` gives independent random embeddings (as any other word); ``s → 0`` makes the view words
nearly indistinguishable at the start, so the prior learns the view conditioning more slowly;
``s > 1`` exaggerates the difference. By default the rows then train like every other word (the
prior learns as much view conditioning as the captions carry); with the recipe's
``freeze_view_words`` :func:`freeze_view_rows` keeps them at their start. Frozen rows stay at the
initial scale while the other words' rows grow, so a frozen prior barely reacts to view words
(measured on attempt 4: view prompts moved ε by 0.3 % of the prompt's effect).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple

import torch

from ..core.text import DEFAULT_TEMPLATES, FRONT_TEMPLATES
from ..core.views import VIEW_NAMES
from ..tiny.builders import (
    BOS_TOKEN,
    EOS_TOKEN,
    _bytes_to_unicode,
    _save,
    _save_text_encoder,
    _write_json,
    write_tokenizer,
)

__all__ = [
    "VIEW_WORDS",
    "PriorConfig",
    "prompt_words",
    "word_merges",
    "build_vocab",
    "write_tokenizer",
    "build_models",
    "view_token_ids",
    "apply_view_word_separation",
    "freeze_view_rows",
    "save_prior",
    "load_prior_path",
    "load_testbed_config",
]

#: Words that name a view in the guidance's view prompts (threestudio's suffixes and the
#: ``view_dependent_prompt_front`` prefixes, "backside" included).
VIEW_WORDS: Tuple[str, ...] = ("front", "side", "back", "overhead", "backside")

#: Where the shipped checkpoint lives inside the package.
ASSET_DIR = Path(__file__).resolve().parent / "assets" / "prior"

_WORD = re.compile(r"[a-z]+|[0-9]")


@dataclass(frozen=True)
class PriorConfig:
    """Architecture of the prior (saved in ``testbed.json`` next to the dataset config).

    Args:
        resolution: native side in pixels (``unet.config.sample_size``; default 16); must equal the
            dataset resolution.
        block_out_channels: UNet channels per level (default (32, 48, 64): 16 → 8 → 4 px).
        cross_attention_levels: how many of the lowest-resolution levels have cross attention on
            the text (default 1: the 4 px level and the mid block; cheaper on a CPU).
        layers_per_block: resnets per UNet level (default 1).
        attention_head_dim: diffusers' ``attention_head_dim`` of the cross-attention blocks
            (default 8).
        text_hidden_size: CLIP text width = UNet ``cross_attention_dim`` (default 64).
        text_layers: CLIP text transformer layers (default 2).
        text_heads: CLIP text attention heads (default 4).
        max_length: tokenizer ``model_max_length`` = text positions (default 32 tokens; the
            prompt processors pad to it).
    """

    resolution: int = 16
    block_out_channels: Tuple[int, ...] = (32, 48, 64)
    cross_attention_levels: int = 1
    layers_per_block: int = 1
    attention_head_dim: int = 8
    text_hidden_size: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_length: int = 32

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            values = value if isinstance(value, tuple) else (value,)
            if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
                raise ValueError(f"{f.name}: expected positive int(s), got {value!r}")
            if any(v <= 0 for v in values):
                raise ValueError(f"{f.name}: expected positive int(s), got {value!r}")
        down = 2 ** (len(self.block_out_channels) - 1)
        if self.resolution % down:
            raise ValueError(
                f"resolution: {self.resolution} px is not divisible by {down} (the UNet halves it "
                f"{len(self.block_out_channels) - 1} times)"
            )
        if any(c % 16 for c in self.block_out_channels):
            raise ValueError(
                f"block_out_channels: expected multiples of 16 (group norm), got "
                f"{self.block_out_channels}"
            )

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PriorConfig:
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise ValueError(f"prior.{key}: unknown key, expected one of {sorted(known)}")
        d = dict(data)
        if "block_out_channels" in d:
            d["block_out_channels"] = tuple(d["block_out_channels"])
        return cls(**d)


def prompt_words(
    templates: Iterable[Mapping[str, str]] = (DEFAULT_TEMPLATES, FRONT_TEMPLATES),
) -> List[str]:
    """Words of the guidance's view prompt templates (``"{prompt}, back view"`` → back, view)."""
    out: List[str] = []
    for table in templates:
        for name in VIEW_NAMES:
            out += _WORD.findall(table[name].replace("{prompt}", "").lower())
    return list(dict.fromkeys(out + list(VIEW_WORDS)))


def word_merges(words: Iterable[str]) -> List[Tuple[str, str]]:
    """CLIP-style BPE merges learned on ``words`` until each word is a single token.

    Byte-pair encoding trained on the word list (each word counted once; ties broken by the pair's
    text, so the result is deterministic): encoding replays the training merges, so every word of
    the list tokenises to exactly one ``word</w>`` token.
    """
    vocab_words: List[List[str]] = []
    for word in dict.fromkeys(words):
        if not word or not word.isalnum() or word != word.lower():
            raise ValueError(f"words: expected lower-case alphanumeric words, got {word!r}")
        vocab_words.append(list(word[:-1]) + [word[-1] + "</w>"])
    merges: List[Tuple[str, str]] = []
    while True:
        counts: Dict[Tuple[str, str], int] = {}
        for symbols in vocab_words:
            for pair in zip(symbols, symbols[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for i, symbols in enumerate(vocab_words):
            out: List[str] = []
            j = 0
            while j < len(symbols):
                if j + 1 < len(symbols) and (symbols[j], symbols[j + 1]) == best:
                    out.append(symbols[j] + symbols[j + 1])
                    j += 2
                else:
                    out.append(symbols[j])
                    j += 1
            vocab_words[i] = out


def build_vocab(merges: Sequence[Tuple[str, str]]) -> Dict[str, int]:
    """CLIP's vocab order: bytes, bytes + ``</w>``, merge results, then the special tokens."""
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [f"{c}</w>" for c in alphabet]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            tokens.append(a + b)
            seen.add(a + b)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}


def unet_config(cfg: PriorConfig) -> Dict[str, Any]:
    """``UNet2DConditionModel`` kwargs: 3 → 3 channels, cross attention on the lowest levels."""
    levels = len(cfg.block_out_channels)
    attn = min(cfg.cross_attention_levels, levels - 1)
    plain = levels - attn
    return {
        "sample_size": cfg.resolution,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * attn,
        "up_block_types": ("CrossAttnUpBlock2D",) * attn + ("UpBlock2D",) * plain,
        "block_out_channels": tuple(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "norm_num_groups": 16,
        "cross_attention_dim": cfg.text_hidden_size,
        "attention_head_dim": cfg.attention_head_dim,
    }


#: DDPM with cosine betas (pixel space, as DeepFloyd IF) and a fixed variance: the UNet predicts ε.
SCHEDULER_CONFIG: Dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "variance_type": "fixed_small",
    "prediction_type": "epsilon",
    "clip_sample": True,
    "clip_sample_range": 1.0,
}


def build_models(cfg: PriorConfig, vocab: Mapping[str, int], seed: int) -> Tuple[Any, Any, Any]:
    """Freshly initialised (unet, text_encoder, scheduler), seeded; the global RNG is untouched."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config(cfg))
        torch.manual_seed(seed + 1)
        text_config = CLIPTextConfig(
            vocab_size=len(vocab),
            bos_token_id=vocab[BOS_TOKEN],
            eos_token_id=vocab[EOS_TOKEN],
            pad_token_id=vocab[EOS_TOKEN],
            hidden_size=cfg.text_hidden_size,
            intermediate_size=2 * cfg.text_hidden_size,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            max_position_embeddings=cfg.max_length,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        )
        text_encoder = CLIPTextModel(text_config)
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    return unet, text_encoder, scheduler


def view_token_ids(tokenizer: Any) -> List[int]:
    """Token ids of the view words, one each (the vocabulary has every view word as one token).

    Raises:
        ValueError: a view word is split into several tokens (a vocabulary not built by
            :func:`word_merges` from :func:`prompt_words`).
    """
    ids: List[int] = []
    for word in VIEW_WORDS:
        pieces = tokenizer(word, add_special_tokens=False).input_ids
        if len(pieces) != 1:
            raise ValueError(
                f"tokenizer: view word {word!r} is split into {len(pieces)} tokens, expected one"
            )
        ids.append(int(pieces[0]))
    return ids


def _token_embedding(text_encoder: Any) -> torch.nn.Embedding:
    return text_encoder.get_input_embeddings()


@torch.no_grad()
def apply_view_word_separation(text_encoder: Any, ids: Sequence[int], separation: float) -> None:
    """Rows ``m + s·(e_v − m)`` for the view-word tokens ``ids`` (``m`` their mean, ``s`` = separation).

    ``s = 1`` leaves the rows as initialised, ``s < 1`` pulls the view words together, ``s > 1``
    pushes them apart.
    """
    if (
        isinstance(separation, bool)
        or not isinstance(separation, (int, float))
        or not (0.0 <= float(separation) < float("inf"))
    ):
        raise ValueError(f"view_word_separation: expected a finite number >= 0, got {separation!r}")
    weight = _token_embedding(text_encoder).weight
    idx = torch.tensor(list(ids), dtype=torch.long)
    rows = weight[idx]
    mean = rows.mean(dim=0, keepdim=True)
    weight[idx] = mean + float(separation) * (rows - mean)


def freeze_view_rows(text_encoder: Any, ids: Sequence[int]) -> Any:
    """Zero the gradient of the view-word embedding rows (their separation stays as set).

    Returns the hook handle. Use an optimiser without weight decay on the embedding.
    """
    weight = _token_embedding(text_encoder).weight
    mask = torch.ones(weight.shape[0], 1)
    mask[torch.tensor(list(ids), dtype=torch.long)] = 0.0

    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad * mask.to(grad)

    return weight.register_hook(hook)


def save_prior(
    folder: Path,
    unet: Any,
    text_encoder: Any,
    scheduler: Any,
    vocab: Mapping[str, int],
    merges: Sequence[Tuple[str, str]],
    prior_cfg: PriorConfig,
    testbed: Mapping[str, Any],
) -> None:
    """Write the diffusers folder into ``folder`` (created; must not exist)."""
    import diffusers

    folder = Path(folder)
    folder.mkdir(parents=True)
    _save(unet, folder / "unet")
    _save_text_encoder(text_encoder, folder / "text_encoder")
    write_tokenizer(folder / "tokenizer", vocab, merges, prior_cfg.max_length)
    scheduler.save_pretrained(folder / "scheduler")
    _write_json(
        folder / "model_index.json",
        {
            "_class_name": "DiffusionPipeline",
            "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", "DDPMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
        },
    )
    _write_json(folder / "testbed.json", dict(testbed))


def load_prior_path() -> str:
    """Folder of the shipped testbed prior (pass it as ``pretrained_model_name_or_path``).

    Raises:
        FileNotFoundError: when the package was installed without its assets.
    """
    if not (ASSET_DIR / "unet").is_dir() or not (ASSET_DIR / "model_index.json").is_file():
        raise FileNotFoundError(
            f"testbed prior: no checkpoint in {ASSET_DIR} (the package was installed without its "
            "assets; train one with 'python -m threestudio_perpneg testbed train --out DIR')"
        )
    return str(ASSET_DIR)


def load_testbed_config(path: str | os.PathLike) -> Dict[str, Any]:
    """The ``testbed.json`` of a prior folder (dataset config, prior config, recipe)."""
    file = Path(path) / "testbed.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"prior: {file} does not exist (not a testbed prior folder)"
        ) from None
    except json.JSONDecodeError as err:
        raise ValueError(f"prior: {file} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or "dataset" not in data:
        raise ValueError(f"prior: {file} has no 'dataset' entry")
    return data
