"""``PerpNegGuidance``: Perp-Neg as a diffusers guider for every modular pipeline."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..common.checks import check_bool, check_float, check_sequence
from ..core.controls import step_in_window
from ..core.guidance import perp_neg_guidance
from ._requires import require_guiders

require_guiders()

from diffusers.configuration_utils import register_to_config  # noqa: E402
from diffusers.guiders.guider_utils import (  # noqa: E402
    BaseGuidance,
    GuiderOutput,
    rescale_noise_cfg,
)

if TYPE_CHECKING:
    from diffusers.modular_pipelines.modular_pipeline import BlockState

__all__ = ["PerpNegGuidance", "negative_name"]

_OPTIONS = (
    "guidance_scale",
    "negative_weights",
    "perp_neg_weight_scale",
    "guidance_rescale",
    "use_original_formulation",
    "start",
    "stop",
    "enabled",
)


def negative_name(i: int) -> str:
    """Identifier of negative ``i``'s batch (``pred_neg_0``, ...), the keyword ``forward`` takes."""
    return f"pred_neg_{i}"


def _rows(value: Any) -> Optional[int]:
    return int(value.shape[0]) if isinstance(value, torch.Tensor) and value.dim() > 0 else None


class PerpNegGuidance(BaseGuidance):
    r"""Perp-Neg guidance (Armandpour et al. 2023, https://arxiv.org/abs/2304.04968) as a guider.

    Each negative's direction is projected perpendicular to its own sample's positive direction, so
    a negative prompt removes a concept without erasing what it shares with the prompt:

    ```
    Δ_pos = x_cond − x_uncond,   Δ_i = x_neg_i − x_uncond,   ⊥(a, b) = a − (⟨a, b⟩ / ‖b‖²) b
    x_pred = x_uncond + guidance_scale · (Δ_pos + Σ_i λ·w_i · ⊥(Δ_i, Δ_pos))   (diffusers-native)
    x_pred = x_cond   + guidance_scale · (Δ_pos + Σ_i λ·w_i · ⊥(Δ_i, Δ_pos))   (original formulation)
    ```

    with the inner products per sample over all non-batch dimensions (never over the batch). The
    arithmetic is :func:`threestudio_perpneg.core.guidance.perp_neg_guidance`. Per step the denoiser
    runs ``2 + K`` batches (conditional, unconditional, one per negative with a non-zero weight)
    inside ``[start, stop)`` and only the conditional batch outside it. With every weight zero it is
    :class:`diffusers.ClassifierFreeGuidance` exactly (same rows, same result).

    The negatives reach the guider packed in the unconditional slot of the denoiser's inputs
    (``negative_prompt_embeds`` with ``(1 + K)·B`` rows: the unconditional rows, then negative 1's,
    ...); :func:`threestudio_perpneg.guiders.add_perp_neg` adds the blocks that do this to a
    pipeline, from its ordinary ``negative_prompt`` and the ``perp_neg_prompts`` input.

    Args:
        guidance_scale (`float`, defaults to `7.5`):
            The CFG scale s (diffusers-native convention: 1 is the conditional prediction).
        negative_weights (`list[float]`, defaults to `[-1.0]`):
            w_i ≤ 0, one per negative prompt (the paper's w_i; the official 2D code uses -1 for one
            negative). ``[]`` is plain classifier-free guidance.
        perp_neg_weight_scale (`float`, defaults to `1.0`):
            λ ≥ 0 multiplying every w_i (as threestudio-perpneg's ``perp_neg_weight_scale``); 0 turns
            Perp-Neg off and skips the negative batches.
        guidance_rescale (`float`, defaults to `0.0`):
            Rescale factor of https://huggingface.co/papers/2305.08891 (as in CFG), in [0, 1].
        use_original_formulation (`bool`, defaults to `False`):
            Start from x_cond instead of x_uncond, as diffusers' CFG option of that name.
        start (`float`, defaults to `0.0`):
            Fraction of the denoising steps after which guidance starts.
        stop (`float`, defaults to `1.0`):
            Fraction of the denoising steps after which guidance stops.
        enabled (`bool`, defaults to `True`):
            Whether guidance is applied at all (otherwise the conditional prediction only).
    """

    _input_predictions = ["pred_cond", "pred_uncond"]  # type: ignore[assignment]

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        negative_weights: Sequence[float] = (-1.0,),
        perp_neg_weight_scale: float = 1.0,
        guidance_rescale: float = 0.0,
        use_original_formulation: bool = False,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
        **unknown: Any,
    ):
        for key, value in unknown.items():
            if not key.startswith("_"):  # ConfigMixin passes private keys such as _class_name
                raise ValueError(
                    f"PerpNegGuidance: unknown option {key}={value!r}, expected one of "
                    f"{', '.join(_OPTIONS)}"
                )
        weights = [
            check_float(f"negative_weights[{i}]", w, hi=0.0)
            for i, w in enumerate(check_sequence("negative_weights", negative_weights, "numbers"))
        ]
        start = check_float("start", start, 0.0, 1.0)
        stop = check_float("stop", stop, 0.0, 1.0)
        if not start < 1.0 or stop < start:
            raise ValueError(
                f"start/stop: expected 0 <= start < 1 and start <= stop <= 1, got {start}/{stop}"
            )
        self._input_predictions = ["pred_cond", "pred_uncond"] + [
            negative_name(i) for i in range(len(weights))
        ]
        super().__init__(start, stop, check_bool("enabled", enabled))
        self.guidance_scale = check_float("guidance_scale", guidance_scale)
        self.negative_weights = weights
        self.perp_neg_weight_scale = check_float(
            "perp_neg_weight_scale", perp_neg_weight_scale, lo=0.0
        )
        self.guidance_rescale = check_float("guidance_rescale", guidance_rescale, 0.0, 1.0)
        self.use_original_formulation = check_bool(
            "use_original_formulation", use_original_formulation
        )

    def register_to_config(self, **kwargs: Any) -> None:  # type: ignore[override]
        # ``**unknown`` only exists to turn a misspelt option into a ValueError; keep it out of
        # the saved config.
        kwargs.pop("unknown", None)
        defaults = kwargs.get("_use_default_values")
        if isinstance(defaults, list):
            kwargs["_use_default_values"] = [k for k in defaults if k != "unknown"]
        super().register_to_config(**kwargs)

    # ------------------------------------------------------------------ which batches run
    @property
    def num_negatives(self) -> int:
        """K, the number of negatives the packed inputs must hold (zero-weight ones included)."""
        return len(self.negative_weights)

    def active_negatives(self) -> List[int]:
        """Indices of the negatives evaluated this step (non-zero λ·w_i, guidance on)."""
        if not self._is_guidance_enabled():
            return []
        return [
            i for i, w in enumerate(self.negative_weights) if self.perp_neg_weight_scale * w != 0.0
        ]

    def _in_window(self) -> bool:
        if self._num_inference_steps is None:
            return True
        return step_in_window(self._step, self._num_inference_steps, self._start, self._stop)

    def _is_guidance_enabled(self) -> bool:
        if not self._enabled or not self._in_window():
            return False
        neutral = 0.0 if self.use_original_formulation else 1.0
        # CFG switches itself off at the neutral scale; with live negatives Perp-Neg still acts there.
        has_negatives = any(self.perp_neg_weight_scale * w != 0.0 for w in self.negative_weights)
        return has_negatives or not math.isclose(self.guidance_scale, neutral)

    @property
    def num_conditions(self) -> int:
        if not self._is_guidance_enabled():
            return 1
        return 2 + len(self.active_negatives())

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared == 1

    # ------------------------------------------------------------------ inputs
    def _split(self, data: Dict[str, Any]) -> Dict[str, Tuple[Any, ...]]:
        """{field: (cond, uncond, neg_0, ..., neg_{K-1})} from {field: (cond, packed) or shared}."""
        k = self.num_negatives
        pairs = {key: v for key, v in data.items() if isinstance(v, tuple)}
        rows = {n for n in (_rows(v[0]) for v in pairs.values()) if n is not None}
        if len(rows) > 1:
            raise ValueError(
                f"PerpNegGuidance: conditional inputs must share one batch size, got {sorted(rows)}"
            )
        batch = rows.pop() if rows else None
        out: Dict[str, Tuple[Any, ...]] = {}
        packed = 0
        for key, value in data.items():
            if not isinstance(value, tuple):
                out[key] = (value,) * (2 + k)
                continue
            cond, second = value[0], value[1]
            n = _rows(second)
            if n is None or batch is None or n == batch or k == 0:
                # no negative packed here: this field (e.g. SDXL's time ids) is shared by all
                out[key] = (cond,) + (second,) * (1 + k)
            elif n == (1 + k) * batch:
                out[key] = (cond, *second.split(batch, dim=0))
                packed += 1
            else:
                raise ValueError(
                    f"PerpNegGuidance: input {key!r} has {n} unconditional rows, expected {batch} or "
                    f"(1 + {k} negatives) x {batch} = {(1 + k) * batch} (packed by add_perp_neg)"
                )
        if self.active_negatives() and not packed:
            raise ValueError(
                f"negative_prompt: PerpNegGuidance(negative_weights={self.negative_weights}) expects "
                f"{k} negative prompt(s) packed with the unconditional inputs, got none (build the "
                "pipeline with add_perp_neg(blocks) and pass negative_prompt / perp_neg_prompts)"
            )
        return out

    def _batches(self, split: Dict[str, Tuple[Any, ...]]) -> List[BlockState]:
        slots = [(0, "pred_cond")]
        if self._is_guidance_enabled():
            slots.append((1, "pred_uncond"))
            slots += [(2 + i, negative_name(i)) for i in self.active_negatives()]
        return [self._prepare_batch(split, index, name) for index, name in slots]  # type: ignore[arg-type]

    def prepare_inputs(self, data: Dict[str, Any]) -> List[BlockState]:  # type: ignore[override]
        return self._batches(self._split(data))

    def prepare_inputs_from_block_state(
        self, data: BlockState, input_fields: Dict[str, Any]
    ) -> List[BlockState]:
        values: Dict[str, Any] = {}
        for key, names in input_fields.items():
            if isinstance(names, str):
                values[key] = getattr(data, names, None)
            elif isinstance(names, tuple):
                values[key] = tuple(getattr(data, n, None) if n else None for n in names[:2])
        return self._batches(self._split(values))

    # ------------------------------------------------------------------ the step
    def forward(
        self,
        pred_cond: torch.Tensor,
        pred_uncond: Optional[torch.Tensor] = None,
        **negatives: torch.Tensor,
    ) -> GuiderOutput:
        if not self._is_guidance_enabled() or pred_uncond is None:
            pred = pred_cond
        else:
            active = self.active_negatives()
            missing = [negative_name(i) for i in active if negative_name(i) not in negatives]
            if missing:
                raise ValueError(f"PerpNegGuidance.forward: missing predictions {missing}")
            eps_neg = weights = None
            if active:
                eps_neg = torch.stack([negatives[negative_name(i)] for i in active], dim=1)
                weights = torch.tensor(
                    [self.perp_neg_weight_scale * self.negative_weights[i] for i in active],
                    device=pred_cond.device,
                )
            pred = perp_neg_guidance(pred_uncond, pred_cond, eps_neg, weights, self.guidance_scale)
            if self.use_original_formulation:
                pred = pred + (pred_cond - pred_uncond)
        if self.guidance_rescale > 0.0:
            pred = rescale_noise_cfg(pred, pred_cond, self.guidance_rescale)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)
