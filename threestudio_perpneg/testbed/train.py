"""Training of the testbed prior: UNet + CLIP text encoder jointly, ε-prediction DDPM loss.

The data is a fixed pool of captioned renders drawn once from
:func:`~threestudio_perpneg.testbed.dataset.sample_batch` (seeded by the dataset config's ``seed``);
each step draws a minibatch from the pool, replaces a fraction of the captions by the empty
caption (classifier-free guidance dropout: the guidance's unconditional branch is the empty
prompt), noises the images at uniform timesteps and regresses ε. An exponential moving average of
the weights is what is saved. Seeded end to end; the caller's global RNG is left alone.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F

from .dataset import CAPTION_KEYS, DatasetConfig, sample_batch
from .prior import (
    PriorConfig,
    apply_view_word_separation,
    build_models,
    build_vocab,
    freeze_view_rows,
    prompt_words,
    save_prior,
    view_token_ids,
    word_merges,
)

__all__ = ["TrainConfig", "shipped_dataset_config", "train_prior", "plot_loss"]


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe (saved in ``testbed.json`` and ``metrics.json``).

    Args:
        steps: optimiser steps (default 9000: the shipped prior, 41 min on 1 thread).
        batch_size: images per step (default 32).
        lr: peak AdamW learning rate (default 1e-3), linear warm-up then cosine decay to 10 %.
        warmup_steps: warm-up steps (default 200).
        cfg_dropout: probability a caption is replaced by the empty caption (default 0.15).
        pool_size: captioned renders drawn once before training (default 16384).
        ema_decay: decay of the weight average that is saved (default 0.999; the average starts
            after warm-up).
        seed: seed of initialisation, minibatches, dropout, timesteps and noise (default 0; the
            data pool uses the dataset config's own ``seed``).
        threads: torch CPU threads (default 1, as the shipped prior was trained; on a shared
            2-core machine a second thread gains little and slows everything else).
        log_every: steps between loss-curve points (default 25).
        freeze_view_words: keep the view-word embedding rows at their initial values (default
            False). Frozen rows stay at the initial scale while every other word's row grows
            during training: attempt 4 (frozen) ended with view-word rows 5x closer together than
            identity words and view prompts moving the UNet's ε by 0.3 % of the prompt's effect,
            so view prompts, and any guidance built on them, did nothing. Unfrozen, the rows
            start at ``view_word_separation`` of their initial spread and the prior learns as much
            view conditioning as the captions carry.
    """

    steps: int = 9000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 200
    cfg_dropout: float = 0.15
    pool_size: int = 16384
    ema_decay: float = 0.999
    seed: int = 0
    threads: int = 1
    log_every: int = 25
    freeze_view_words: bool = False

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "pool_size", "threads", "log_every"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}: expected a positive integer, got {value!r}")
        if (
            isinstance(self.warmup_steps, bool)
            or not isinstance(self.warmup_steps, int)
            or (self.warmup_steps < 0)
        ):
            raise ValueError(f"warmup_steps: expected an integer >= 0, got {self.warmup_steps!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {self.seed!r}")
        if not isinstance(self.freeze_view_words, bool):
            raise ValueError(
                f"freeze_view_words: expected true or false, got {self.freeze_view_words!r}"
            )
        for key, lo, hi in (("lr", 0.0, 1.0), ("cfg_dropout", 0.0, 1.0), ("ema_decay", 0.0, 1.0)):
            value = getattr(self, key)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (lo <= float(value) <= hi)
            ):
                raise ValueError(f"{key}: expected a number in [{lo}, {hi}], got {value!r}")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise ValueError(f"train.{key}: unknown key, expected one of {sorted(known)}")
        return cls(**dict(data))


def shipped_dataset_config(**overrides: Any) -> DatasetConfig:
    """The shipped prior's data knobs (attempt 5, ``assets/prior``), with ``overrides`` on top.

    Not the generic defaults of :class:`DatasetConfig` (32 px, one phrase matrix for every
    identity): this is one recipe, named for what it is, and ``testbed train`` starts from it.
    The view-knowledge sweep's priors have their own knobs (:mod:`.levels`).

    70/20/10 front/side/back renders, a view phrase in 30 % of the captions, view words pulled
    together to half their initial spread in the text encoder, texture jitter 0.3. How often the
    phrase is right is the calibration knob and differs per identity, so that one training run
    holds the whole sweep: alien 90 %, robot 70 %, clown 50 %, troll 35 % (the rest uniform over
    the other two views; 33 % would carry no information). With 70 % fronts, even alien's
    "back view" captions show a back only 67 % of the time, troll's 11 %.
    """
    from .dataset import confusion_matrix

    knobs: Dict[str, Any] = {
        "resolution": 16,
        "view_phrase_prob": 0.3,
        "view_phrase_matrix": confusion_matrix(0.4),
        "identity_view_phrase_matrix": {
            "alien": confusion_matrix(0.1),
            "robot": confusion_matrix(0.3),
            "clown": confusion_matrix(0.5),
            "troll": confusion_matrix(0.65),
        },
        "texture_jitter": 0.3,
        "view_word_separation": 0.5,
    }
    knobs.update(overrides)
    return DatasetConfig.from_dict(knobs)  # strict: an unknown knob is named


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _draw_pool(dataset: DatasetConfig, size: int, progress: bool) -> Any:
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(dataset.seed)
    images: List[torch.Tensor] = []
    captions: List[str] = []
    chunk = 512
    with tqdm(
        total=size, desc="rendering", unit="img", disable=not progress, file=sys.stderr
    ) as bar:
        while len(captions) < size:
            n = min(chunk, size - len(captions))
            batch = sample_batch(dataset, n, gen)
            images.append(batch.images)
            captions += batch.captions
            bar.update(n)
    return torch.cat(images), captions


def _tokenize(tokenizer: Any, captions: List[str]) -> torch.Tensor:
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def plot_loss(steps: List[int], losses: List[float], path: Path, title: str) -> None:
    """The loss curve as a PNG (matplotlib's Agg backend), written atomically.

    Raises:
        ImportError: matplotlib is missing (in the clone: ``pip install -e '.[eval]'``).
    """
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "loss.png: matplotlib is needed for the loss curve (in the clone: "
            "pip install -e '.[eval]')"
        ) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..commands.common import atomic_write

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    ax.plot(steps, losses, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("ε MSE (running mean)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def train_prior(
    out: str | os.PathLike,
    dataset: Optional[DatasetConfig] = None,
    prior: Optional[PriorConfig] = None,
    recipe: Optional[TrainConfig] = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    init_from: Optional[str | os.PathLike] = None,
) -> Dict[str, Any]:
    """Train a prior and write its diffusers folder, ``metrics.json`` and ``loss.png`` to ``out``.

    Args:
        out: target folder (written atomically: built in a temporary sibling, then renamed).
        dataset: data knobs (default :func:`shipped_dataset_config`, the shipped prior's).
        prior: architecture (default :class:`PriorConfig` at the dataset's resolution).
        recipe: training recipe (default :class:`TrainConfig`).
        overwrite: replace a non-empty ``out``.
        progress: tqdm progress bars on stderr.
        init_from: continue from the weights of this prior folder (same vocabulary, architecture
            and dataset; its view-word rows are kept as they are). Its ``testbed.json`` recipe is
            recorded as ``train.init_from`` so the chain of runs stays reproducible.

    Returns:
        The metrics dict written to ``metrics.json``.

    Raises:
        FileExistsError: ``out`` is not empty and ``overwrite`` is false.
        ValueError: the prior's resolution differs from the dataset's.
        ImportError: matplotlib (for ``loss.png``) is missing.
    """
    from ..tiny.builders import _is_occupied

    dataset = dataset or shipped_dataset_config()
    prior = prior or PriorConfig(resolution=dataset.resolution)
    recipe = recipe or TrainConfig()
    if prior.resolution != dataset.resolution:
        raise ValueError(
            f"prior.resolution: {prior.resolution} px differs from dataset.resolution "
            f"{dataset.resolution} px"
        )
    try:  # fail before training, not after it, when the loss curve cannot be drawn
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(
            "loss.png: matplotlib is needed for the loss curve (in the clone: "
            "pip install -e '.[eval]')"
        ) from None
    target = Path(out).expanduser().absolute()
    if _is_occupied(target) and not overwrite:
        raise FileExistsError(
            f"out: {target} exists and is not empty; pass --overwrite to replace it"
        )

    threads_before = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    t_start = time.time()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            metrics = _train(
                target, dataset, prior, recipe, progress, overwrite, t_start, init_from
            )
    finally:
        torch.set_num_threads(threads_before)
    return metrics


def _load_init(
    path: str | os.PathLike, dataset: DatasetConfig, prior: PriorConfig, vocab: Dict[str, int]
) -> Any:
    """(unet, text_encoder, its testbed.json train entry) of a prior folder to continue from."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from .prior import load_testbed_config

    meta = load_testbed_config(path)
    # The caption knobs may differ (a caption variant fine-tuned from a shared base: the renders
    # are the same whatever the captions, see dataset.sample_batch); every other knob must match.
    saved = {k: v for k, v in dict(meta.get("dataset") or {}).items() if k not in CAPTION_KEYS}
    mine_data = {k: v for k, v in dataset.to_dict().items() if k not in CAPTION_KEYS}
    for key, theirs, mine in (
        ("dataset", saved, mine_data),
        ("prior", meta.get("prior"), prior.to_dict()),
    ):
        if theirs != mine:
            raise ValueError(f"init_from: {path} was trained with another {key} config")
    saved_vocab = json.loads((Path(path) / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    if saved_vocab != vocab:
        raise ValueError(f"init_from: {path} has another vocabulary")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    return unet, text_encoder, meta.get("train")


def _train(
    target: Path,
    dataset: DatasetConfig,
    prior: PriorConfig,
    recipe: TrainConfig,
    progress: bool,
    overwrite: bool,
    t_start: float,
    init_from: Optional[str | os.PathLike] = None,
) -> Dict[str, Any]:
    import tempfile

    from tqdm.auto import tqdm
    from transformers import CLIPTokenizer

    from ..commands.common import versions, write_json
    from ..tiny.builders import _build_atomically
    from .dataset import caption_words
    from .prior import write_tokenizer

    words = list(dict.fromkeys(caption_words(dataset) + prompt_words()))
    merges = word_merges(words)
    vocab = build_vocab(merges)
    unet, text_encoder, scheduler = build_models(prior, vocab, recipe.seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp) / "tok", vocab, merges, prior.max_length)
        tokenizer = CLIPTokenizer.from_pretrained(str(Path(tmp) / "tok"))
    view_ids = view_token_ids(tokenizer)
    previous: Optional[Dict[str, Any]] = None
    if init_from is None:
        apply_view_word_separation(text_encoder, view_ids, dataset.view_word_separation)
    else:
        unet, text_encoder, previous = _load_init(init_from, dataset, prior, vocab)
    hook = freeze_view_rows(text_encoder, view_ids) if recipe.freeze_view_words else None

    images, captions = _draw_pool(dataset, recipe.pool_size, progress)
    t_pool = time.time() - t_start
    tokens = _tokenize(tokenizer, captions)
    empty = _tokenize(tokenizer, [""])[0]

    unet.train()
    text_encoder.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    # No weight decay: the frozen view-word rows must not shrink (that would change their spread).
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    ema_unet = copy.deepcopy(unet).eval().requires_grad_(False)
    ema_text = copy.deepcopy(text_encoder).eval().requires_grad_(False)
    ema_pairs = list(zip(list(ema_unet.parameters()) + list(ema_text.parameters()), params))
    alphas = scheduler.alphas_cumprod
    gen = torch.Generator().manual_seed(recipe.seed + 7)

    log_steps: List[int] = []
    log_loss: List[float] = []
    running = None
    t_train = time.time()
    bar = tqdm(
        range(recipe.steps), desc="training", unit="step", disable=not progress, file=sys.stderr
    )
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = recipe.lr * _lr_factor(step, recipe)
        idx = torch.randint(len(captions), (recipe.batch_size,), generator=gen)
        x0 = images[idx]
        ids = tokens[idx].clone()
        drop = torch.rand(recipe.batch_size, generator=gen) < recipe.cfg_dropout
        ids[drop] = empty
        t = torch.randint(
            0, scheduler.config.num_train_timesteps, (recipe.batch_size,), generator=gen
        )
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        emb = text_encoder(ids)[0]
        pred = unet(x_t, t, emb).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = 0.0 if step < recipe.warmup_steps else recipe.ema_decay
        with torch.no_grad():
            for e, p in ema_pairs:
                e.mul_(decay).add_(p.detach(), alpha=1.0 - decay)
        value = float(loss.detach())
        running = value if running is None else 0.98 * running + 0.02 * value
        if (step + 1) % recipe.log_every == 0 or step + 1 == recipe.steps:
            log_steps.append(step + 1)
            log_loss.append(running)
            bar.set_postfix(loss=f"{running:.4f}")
    if hook is not None:
        hook.remove()
    train_seconds = time.time() - t_train

    metrics: Dict[str, Any] = {
        "final_loss": log_loss[-1],
        "loss_steps": log_steps,
        "loss": log_loss,
        "pool_seconds": round(t_pool, 1),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "steps_per_second": round(recipe.steps / train_seconds, 3),
        "threads": recipe.threads,
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "machine": platform.machine(),
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "text_encoder_parameters": sum(p.numel() for p in text_encoder.parameters()),
        "vocab_size": len(vocab),
        "view_token_ids": view_ids,
        "versions": versions(),
    }
    testbed = {
        "dataset": dataset.to_dict(),
        "prior": prior.to_dict(),
        "train": {**recipe.to_dict(), "init_from": previous},
        "words": words,
    }

    def build(folder: Path, _seed: int) -> None:
        save_prior(folder, ema_unet, ema_text, scheduler, vocab, merges, prior, testbed)
        write_json(folder / "metrics.json", metrics)
        plot_loss(
            log_steps,
            log_loss,
            folder / "loss.png",
            f"testbed prior: {recipe.steps} steps x {recipe.batch_size}, "
            f"{train_seconds / 60:.1f} min on {recipe.threads} threads",
        )

    _build_atomically(target, build, recipe.seed, overwrite)
    return metrics
