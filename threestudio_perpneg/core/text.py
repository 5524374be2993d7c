"""Text side: view prompts, CLIP (Stable Diffusion) or T5 (DeepFloyd IF) text embeddings, and their cache.

The cache stores one safetensors file per (model, prompt) pair, written atomically (temporary file
in the same folder, then ``os.replace``) and never unpickled. Under ``torch.distributed`` rank 0
computes what is missing and the other ranks wait at a barrier before reading, so each prompt is
encoded once per run. Independent processes sharing a folder may write the same file at once: each
write is a complete file, the last one stays. A folder that cannot be written (read-only, full)
costs one warning naming it; the embeddings are kept in memory for the run.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..common.io import atomic_write
from .views import VIEW_NAMES

__all__ = [
    "DEFAULT_TEMPLATES",
    "TEXT_ENCODERS",
    "FRONT_TEMPLATES",
    "EmbeddingCache",
    "view_prompts",
    "resolve_pretrained",
    "encode_prompts",
    "text_embeddings",
]

log = logging.getLogger(__name__)

#: Text encoders :func:`encode_prompts` knows: ``clip`` (Stable Diffusion) and ``t5`` (DeepFloyd IF).
TEXT_ENCODERS = ("clip", "t5")
#: Token length of the T5 embeddings, as threestudio's ``deep-floyd-prompt-processor`` uses.
T5_MAX_LENGTH = 77

#: threestudio's view suffixes ("{prompt}, front view"); ``view_dependent_prompt_front`` gives prefixes.
DEFAULT_TEMPLATES: Mapping[str, str] = {
    "side": "{prompt}, side view",
    "front": "{prompt}, front view",
    "back": "{prompt}, back view",
    "overhead": "{prompt}, overhead view",
}
FRONT_TEMPLATES: Mapping[str, str] = {
    "side": "side view of {prompt}",
    "front": "front view of {prompt}",
    "back": "backside view of {prompt}",
    "overhead": "overhead view of {prompt}",
}


def view_prompts(
    prompt: str,
    templates: Optional[Mapping[str, str]] = None,
    overrides: Optional[Mapping[str, Optional[str]]] = None,
) -> List[str]:
    """View prompts in ``side, front, back, overhead`` order; a non-empty override wins."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt: expected a non-empty string, got {prompt!r}")
    templates = dict(DEFAULT_TEMPLATES if templates is None else templates)
    unknown = sorted(set(templates) - set(VIEW_NAMES))
    if unknown:
        raise ValueError(f"view_templates: unknown view(s) {unknown}, expected keys {VIEW_NAMES}")
    out = []
    for name in VIEW_NAMES:
        override = (overrides or {}).get(name)
        if override:
            out.append(override)
            continue
        template = templates.get(name, DEFAULT_TEMPLATES[name])
        if not isinstance(template, str) or "{prompt}" not in template:
            raise ValueError(
                f"view_templates.{name}: expected a string containing '{{prompt}}', got {template!r}"
            )
        out.append(template.replace("{prompt}", prompt))
    return out


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else can only be a filesystem path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def resolve_pretrained(name_or_path: str, key: str = "pretrained_model_name_or_path") -> str:
    """A local folder (checked to exist) or a hub id, for ``from_pretrained``."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(f"{key}: expected a hub id or a local folder, got {name_or_path!r}")
    expanded = os.path.expanduser(name_or_path)
    if os.path.isdir(expanded):
        return expanded
    if os.path.exists(expanded):
        raise FileNotFoundError(
            f"{key}: {name_or_path!r} is a file, expected a diffusers model folder"
        )
    if _looks_like_path(name_or_path):
        raise FileNotFoundError(
            f"{key}: local folder {name_or_path!r} does not exist (expected a diffusers model "
            "folder with unet/, vae/, text_encoder/, tokenizer/ and scheduler/)"
        )
    return name_or_path


def _dist_rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _dist_rank_and_world()[1] > 1:
        torch.distributed.barrier()


class EmbeddingCache:
    """One safetensors file per (model, prompt), written atomically, read without unpickling.

    Args:
        folder: cache directory (created on first write).
        namespace: distinguishes encoders (e.g. ``"clip"``) sharing one folder.
    """

    def __init__(self, folder: str | os.PathLike, namespace: str = "clip") -> None:
        self.folder = Path(folder)
        self.namespace = namespace

    def path(self, model: str, prompt: str) -> Path:
        digest = hashlib.sha256(f"{self.namespace}\0{model}\0{prompt}".encode()).hexdigest()
        return self.folder / f"{digest}.safetensors"

    def load(self, model: str, prompt: str, device: torch.device | str = "cpu") -> Optional[Tensor]:
        """The cached embedding, or ``None`` when missing, partial, corrupt or for another key."""
        from safetensors import safe_open

        path = self.path(model, prompt)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("model") != model or meta.get("prompt") != prompt:
                    raise ValueError("metadata does not match the requested model/prompt")
                tensor = f.get_tensor("embedding")
        except Exception as err:  # any unreadable file is recomputed, never trusted
            log.warning("text embedding cache file %s is unreadable (%s); recomputing", path, err)
            return None
        return tensor.to(device)

    def save(self, model: str, prompt: str, embedding: Tensor) -> Path:
        """Write atomically: a reader sees the old file, the new file, or none."""
        from safetensors.torch import save_file

        path = self.path(model, prompt)
        tensors = {"embedding": embedding.detach().to("cpu", torch.float32).contiguous()}
        metadata = {"model": model, "prompt": prompt, "namespace": self.namespace}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
        return path


def _check_encoder(encoder: str) -> None:
    if encoder not in TEXT_ENCODERS:
        raise ValueError(
            f"encoder: unknown text encoder {encoder!r}, expected one of {TEXT_ENCODERS}"
        )


@torch.no_grad()
def encode_prompts(
    pretrained: str,
    prompts: Sequence[str],
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    *,
    encoder: str = "clip",
) -> Tensor:
    """Text embeddings ``[N, 77, D]`` of a checkpoint's ``text_encoder``/``tokenizer`` subfolders.

    ``encoder="clip"``: CLIP last hidden states (Stable Diffusion). ``encoder="t5"``: T5 encoder
    states with the attention mask (DeepFloyd IF, as threestudio's ``deep-floyd-prompt-processor``:
    77 tokens, padded, truncated, with the end-of-sequence token; fp16 weights on CUDA).
    """
    _check_encoder(encoder)
    path = resolve_pretrained(pretrained)
    if encoder == "t5":
        return _encode_t5(path, prompts, device, batch_size)
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    text_encoder: Any = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    text_encoder = text_encoder.to(device).eval()
    chunks = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(
            list(prompts[start : start + batch_size]),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        chunks.append(text_encoder(tokens.input_ids.to(device))[0].float())
    del text_encoder
    return torch.cat(chunks, dim=0)


def _encode_t5(
    path: str, prompts: Sequence[str], device: torch.device | str, batch_size: int
) -> Tensor:
    from transformers import AutoTokenizer, T5EncoderModel

    # AutoTokenizer reads a tokenizer.json or converts IF's spiece.model (needs sentencepiece).
    tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    text_encoder: Any = T5EncoderModel.from_pretrained(
        path, subfolder="text_encoder", torch_dtype=dtype
    )
    text_encoder = text_encoder.to(device).eval()
    chunks = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(
            list(prompts[start : start + batch_size]),
            padding="max_length",
            max_length=T5_MAX_LENGTH,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        out = text_encoder(
            tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device)
        )
        chunks.append(out[0].float())
    del text_encoder
    return torch.cat(chunks, dim=0)


def text_embeddings(
    pretrained: str,
    prompts: Sequence[str],
    cache_dir: Optional[str | os.PathLike],
    *,
    use_cache: bool = True,
    device: torch.device | str = "cpu",
    encode_device: torch.device | str | None = None,
    encoder: str = "clip",
) -> Dict[str, Tensor]:
    """Embeddings of ``prompts`` keyed by prompt, computed once (rank 0) and cached.

    Without a cache every rank encodes for itself. ``encode_device`` defaults to ``device``.
    ``encoder`` (``clip`` or ``t5``, see :func:`encode_prompts`) is also the cache namespace, so the
    two encoders never read each other's files.
    """
    _check_encoder(encoder)
    unique = list(dict.fromkeys(prompts))
    if not use_cache or cache_dir is None:
        emb = encode_prompts(pretrained, unique, encode_device or device, encoder=encoder)
        return {p: e.to(device) for p, e in zip(unique, emb)}
    cache = EmbeddingCache(cache_dir, namespace=encoder)
    rank, _ = _dist_rank_and_world()
    in_memory: Dict[str, Tensor] = {}
    if rank == 0:
        missing = [p for p in unique if cache.load(pretrained, p) is None]
        if missing:
            emb = encode_prompts(pretrained, missing, encode_device or device, encoder=encoder)
            in_memory = _save_or_keep(cache, pretrained, missing, emb)
    _barrier()
    out: Dict[str, Tensor] = {}
    for p in unique:
        e = in_memory[p].to(device) if p in in_memory else cache.load(pretrained, p, device)
        if e is not None:
            out[p] = e
    unread = [p for p in unique if p not in out]
    if unread:  # another rank, and rank 0 could not write them (or the folder is not shared)
        log.warning(
            "cache_dir: %d text embedding(s) missing from %s after rank 0 encoded them (read-only, "
            "or not a shared filesystem?); rank %d encodes them itself and keeps them in memory",
            len(unread),
            cache.folder,
            rank,
        )
        emb = encode_prompts(pretrained, unread, encode_device or device, encoder=encoder)
        out.update((p, e.to(device)) for p, e in zip(unread, emb))
    return {p: out[p] for p in unique}


def _save_or_keep(
    cache: EmbeddingCache, pretrained: str, prompts: Sequence[str], embeddings: Tensor
) -> Dict[str, Tensor]:
    """Writes each embedding to the cache; those that cannot be written (read-only folder, disk
    full, a file where the folder should be) are returned to be kept in memory, with one warning
    naming the folder. The run goes on: the cache only saves encoder time on the next run."""
    kept: Dict[str, Tensor] = {}
    error: Optional[OSError] = None
    for p, e in zip(prompts, embeddings):
        if error is None:
            try:
                cache.save(pretrained, p, e)
                continue
            except OSError as err:
                error = err
        kept[p] = e
    if error is not None:
        reason = " ".join(str(error.strerror or error).split())
        log.warning(
            "cache_dir: cannot write to %s (%s: %s); keeping %d text embedding(s) in memory for "
            "this run (nothing is lost, they are encoded again next run)",
            cache.folder,
            type(error).__name__,
            reason,
            len(kept),
        )
    return kept
