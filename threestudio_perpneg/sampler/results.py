"""What the 2D sampler returns (:class:`GenerationResult`), its branch plan and image strips."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from torch import Tensor

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = ["Branch", "GenerationResult", "Plan", "plan_branches", "round6", "strip"]


@dataclass
class GenerationResult:
    """Output of :meth:`PerpNegSampler.generate` / :meth:`PerpNegSampler.generate_view`.

    Args:
        images (`List[PIL.Image.Image]`): one RGB image per seed, in seed order.
        latents (`torch.Tensor`): final latents ``[N, C, h, w]`` before decoding, in the UNet dtype.
        seeds (`List[int]`): the seeds, in image order.
        mode (`str`): ``"perpneg"``, ``"cebm"`` or ``"sd"``.
        weights (`dict`): what was actually used, JSON-serialisable: ``positive`` and ``negative``
            (lists of ``[text, weight]``), ``uncond`` (the unconditional text), ``requested`` (the
            prompts and weights as given), ``view`` (``None``, or ``azimuth``, ``elevation``,
            ``view``, ``r``, ``positive_mix``, ``negative_weights``, ``scheme``) and, in ``sd``
            mode, ``note``.
        unet_calls (`int`): UNet forward calls made: one per timestep of the scheduler, i.e.
            ``num_inference_steps`` (PNDM / Heun-style schedulers have a few more timesteps).
        settings (`dict`): every sampling setting (JSON-serialisable) needed to regenerate the images.
        unet_rows (`int`): UNet batch rows actually run, summed over the calls and the images: a
            call runs ``1 + positives`` rows per image, plus one per negative at the steps where
            the negatives are evaluated (inside ``perp_neg_start`` / ``perp_neg_stop``, drawn with
            probability ``perp_neg_eval_prob``).
    """

    images: List[PILImage.Image]
    latents: Tensor
    seeds: List[int]
    mode: str
    weights: Dict[str, Any]
    unet_calls: int
    settings: Dict[str, Any] = field(default_factory=dict)
    unet_rows: int = 0


class Branch(NamedTuple):
    label: str
    embedding: Tensor  # [L, D]
    weight: float


class Plan(NamedTuple):
    uncond_label: str
    uncond: Tensor  # [L, D]
    positives: List[Branch]
    negatives: List[Branch]
    report: Dict[str, Any]


def round6(x: float) -> float:
    return float(f"{float(x):.6g}")


def strip(images: Sequence[PILImage.Image], labels: Sequence[str]) -> PILImage.Image:
    """Tiles side by side (width = Σ tile widths, height = the tallest), each labelled top-left."""
    from PIL import Image, ImageDraw

    width = sum(im.width for im in images)
    height = max(im.height for im in images)
    strip = Image.new("RGB", (width, height), (0, 0, 0))
    x = 0
    for im, label in zip(images, labels):
        tile = im.convert("RGB").copy()
        draw = ImageDraw.Draw(tile)
        try:
            box = draw.textbbox((2, 1), label)
        except UnicodeEncodeError:  # old bitmap font without the degree sign
            label = label.replace("\u00b0", "")
            box = draw.textbbox((2, 1), label)
        draw.rectangle((0, 0, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
        draw.text((2, 1), label, fill=(255, 255, 255))
        strip.paste(tile, (x, 0))
        x += im.width
    return strip


def plan_branches(
    encode: Callable[[str], Tensor],
    positive: Branch,
    extras: Sequence[str],
    weights: Sequence[float],
    mode: str,
    negative_prompt: str,
    *,
    view_negatives: Sequence[Tuple[str, float]] = (),
    sd_positive: Optional[Branch] = None,
) -> Plan:
    """Branches of one generation. ``positive`` carries the main weight; ``view_negatives`` are
    extra (text, weight) pairs from view conditioning; ``sd_positive`` replaces the positive in
    ``sd`` mode (the positive extras already folded in)."""
    pairs = [(t, w) for t, w in zip(extras, weights[1:])]
    requested = [[positive.label, round6(weights[0])]] + [[t, round6(w)] for t, w in pairs]
    all_pairs = list(view_negatives) + pairs
    if mode == "sd":
        pos = sd_positive if sd_positive is not None else positive
        neg_texts = [t for t, w in all_pairs if w < 0]
        uncond_text = ", ".join(neg_texts + ([negative_prompt] if negative_prompt else []))
        report: Dict[str, Any] = {
            "positive": [[pos.label, 1.0]],
            "negative": [],
            "uncond": uncond_text,
            "requested": requested,
            "note": "sd mode: plain negative prompt; only the signs of the weights are used "
            "(positive extras appended to the prompt, negative ones joined into the "
            "unconditional text), their magnitudes are ignored",
        }
        return Plan(uncond_text, encode(uncond_text), [pos._replace(weight=1.0)], [], report)

    branches = [Branch(t, encode(t), float(w)) for t, w in all_pairs if w != 0.0]
    if mode == "cebm":
        pos_list = [positive] + branches
        neg_list: List[Branch] = []
    else:
        pos_list = [positive] + [b for b in branches if b.weight > 0]
        neg_list = [b for b in branches if b.weight < 0]
    report = {
        "positive": [[b.label, round6(b.weight)] for b in pos_list],
        "negative": [[b.label, round6(b.weight)] for b in neg_list],
        "uncond": negative_prompt,
        "requested": requested,
    }
    return Plan(negative_prompt, encode(negative_prompt), pos_list, neg_list, report)
