"""Blocks that feed a modular pipeline's negative prompts to :class:`PerpNegGuidance`.

A modular pipeline's denoise step hands its guider one (conditional, unconditional) pair per model
input (``prompt_embeds``/``negative_prompt_embeds``, ...). Perp-Neg needs a third kind of row, so:

* :class:`PerpNegTextEncoderStep` wraps the pipeline's own text-encoder block: it runs it once with
  no negative prompt (the pipeline's unconditional: the empty prompt, or zeros where the pipeline's
  ``force_zeros_for_empty_prompt`` says so, exactly what CFG uses; where the block writes no
  unconditional embeddings without a negative prompt, as SD3's does, it is run with ``""``) and
  once per negative, keeping the ``negative_*`` outputs of each run in ``perp_neg_negatives``;
* :class:`PerpNegPackStep`, placed right before each denoise loop (after the pipeline has repeated
  every embedding for ``num_images_per_prompt``, wherever it does so), repeats each negative the
  same way and packs it under the unconditional rows,
  ``negative_prompt_embeds = [uncond; neg_1; ...; neg_K]``, which the guider splits back per batch.
  Each negative row stays with its own sample.

:func:`add_perp_neg` puts both into a pipeline's blocks.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ._requires import require_guiders

require_guiders()

from diffusers.modular_pipelines.modular_pipeline import (  # noqa: E402
    LoopSequentialPipelineBlocks,
    ModularPipelineBlocks,
    PipelineState,
    SequentialPipelineBlocks,
)
from diffusers.modular_pipelines.modular_pipeline_utils import (  # noqa: E402
    InputParam,
    OutputParam,
)

__all__ = ["PerpNegPackStep", "PerpNegTextEncoderStep", "add_perp_neg"]

NEGATIVES_KEY = "perp_neg_negatives"
PROMPTS_KEY = "perp_neg_prompts"


def _guider_negatives(components: Any) -> Optional[int]:
    guider = getattr(components, "guider", None)
    return getattr(guider, "num_negatives", None)


def _broadcast(prompt: Any, negative: Any, key: str) -> Any:
    """A negative as the pipeline's encoder wants it: one string per prompt when prompts are a list."""
    if isinstance(negative, str):
        return [negative] * len(prompt) if isinstance(prompt, list) else negative
    if isinstance(negative, (list, tuple)) and all(isinstance(n, str) for n in negative):
        n_prompts = len(prompt) if isinstance(prompt, list) else 1
        if len(negative) != n_prompts:
            raise ValueError(
                f"{key}: expected a string or one string per prompt ({n_prompts}), got "
                f"{len(negative)} strings {list(negative)!r}"
            )
        return list(negative) if isinstance(prompt, list) else negative[0]
    raise ValueError(f"{key}: expected a string or a list of strings, got {negative!r}")


class PerpNegTextEncoderStep(ModularPipelineBlocks):
    """The pipeline's text-encoder block, run for the unconditional branch and for each negative.

    Inputs are the wrapped block's, plus ``perp_neg_prompts`` (a list of negatives after the
    pipeline's ``negative_prompt``; each a string for every prompt or one string per prompt).
    Negative k of the guider's ``negative_weights`` is ``[negative_prompt, *perp_neg_prompts][k]``.
    The prompt is encoded once per run (1 + K runs, once per generation, not per step).
    """

    def __init__(self, inner: ModularPipelineBlocks):
        super().__init__()
        self.inner = inner  # not a sub-block: the pipeline sees this block's inputs and outputs
        self._negative_inputs = [
            p.name for p in inner.inputs if p.name and p.name.startswith("negative_prompt")
        ]

    @property
    def model_name(self) -> Optional[str]:  # type: ignore[override]
        return self.inner.model_name

    @property
    def description(self) -> str:
        return f"Perp-Neg: {type(self.inner).__name__} run for the unconditional and each negative"

    @property
    def expected_components(self) -> list:
        return self.inner.expected_components

    @property
    def expected_configs(self) -> list:
        return self.inner.expected_configs

    @property
    def inputs(self) -> List[InputParam]:
        extra = InputParam(
            PROMPTS_KEY,
            type_hint=list,
            description="Perp-Neg negatives after negative_prompt (str or one str per prompt each)",
        )
        return [*self.inner.inputs, extra]

    @property
    def intermediate_outputs(self) -> List[OutputParam]:
        extra = OutputParam(NEGATIVES_KEY, type_hint=dict, description="Perp-Neg negatives")
        return [*self.inner.intermediate_outputs, extra]

    def _negatives(self, state: PipelineState) -> List[Dict[str, Any]]:
        prompt = state.get("prompt")
        given = {name: state.get(name) for name in self._negative_inputs}
        out: List[Dict[str, Any]] = []
        if given.get("negative_prompt") is not None:
            out.append(
                {
                    name: _broadcast(prompt, v, name) if v is not None else None
                    for name, v in given.items()
                }
            )
        extra = state.get(PROMPTS_KEY)
        if extra is not None:
            if isinstance(extra, str) or not isinstance(extra, (list, tuple)):
                raise ValueError(
                    f"{PROMPTS_KEY}: expected a list of negative prompts, got {extra!r}"
                )
            for i, neg in enumerate(extra):
                run = {name: None for name in given}
                run["negative_prompt"] = _broadcast(prompt, neg, f"{PROMPTS_KEY}[{i}]")
                out.append(run)
        return out

    @torch.no_grad()
    def __call__(self, components: Any, state: PipelineState) -> Tuple[Any, PipelineState]:
        negatives = self._negatives(state)
        expected = _guider_negatives(components)
        if expected is not None and expected != len(negatives):
            raise ValueError(
                f"negative_prompt/{PROMPTS_KEY}: PerpNegGuidance has {expected} negative weight(s), "
                f"got {len(negatives)} negative prompt(s) (negative_prompt, then perp_neg_prompts)"
            )
        given = {name: state.get(name) for name in self._negative_inputs}
        out_names = [p.name for p in self.inner.intermediate_outputs if p.name]
        neg_names = [n for n in out_names if n.startswith("negative_")]

        def encode(run: Dict[str, Any]) -> Dict[str, Any]:
            nonlocal components, state
            for name, value in run.items():
                state.set(name, value)
            components, state = self.inner(components, state)  # type: ignore[operator]
            return {name: state.get(name) for name in neg_names}

        runs = [encode({name: None for name in given})]
        if negatives and not any(isinstance(v, torch.Tensor) for v in runs[0].values()):
            # This encoder writes no unconditional embeddings without a negative prompt (SD3's in
            # diffusers 0.42, whose denoise step then runs no CFG at all); the unconditional is
            # then the empty prompt encoded, as in diffusers' standard SD3 pipeline.
            empty = {name: None for name in given}
            empty["negative_prompt"] = _broadcast(state.get("prompt"), "", "negative_prompt")
            runs = [encode(empty)]
        runs += [encode(run) for run in negatives]
        # the pipeline continues with the unconditional run's outputs and the user's inputs
        for name in neg_names:
            state.set(name, runs[0][name])
        for name, value in given.items():
            state.set(name, value)
        packed = None
        if negatives and any(isinstance(v, torch.Tensor) for v in runs[0].values()):
            positive = {n[len("negative_") :]: state.get(n[len("negative_") :]) for n in neg_names}
            packed = {"uncond": runs[0], "negatives": runs[1:], "positive": positive}
        state.set(NEGATIVES_KEY, packed)
        return components, state


class PerpNegPackStep(ModularPipelineBlocks):
    """Packs the negatives under the unconditional rows right before the denoise loop.

    The pipeline has repeated every embedding for ``num_images_per_prompt`` by then, and not
    always the same way for every field (diffusers 0.42's SDXL input step repeats
    ``prompt_embeds`` per prompt, ``[p1, p1, p2, p2]``, but tiles ``pooled_prompt_embeds``,
    ``[p1, p2, p1, p2]``). So each field's row order is read off its positive counterpart
    (``prompt_embeds`` for ``negative_prompt_embeds``): row r of negative k is negative k's
    encoding for the prompt whose positive sits in row r. The pipeline's unconditional rows are
    checked against the same order; a field whose rows cannot be traced fails with one line.
    """

    @property
    def description(self) -> str:
        return "Perp-Neg: packs the negatives under the unconditional rows for PerpNegGuidance"

    @property
    def inputs(self) -> List[InputParam]:
        return [InputParam(NEGATIVES_KEY, type_hint=dict)]

    @torch.no_grad()
    def __call__(self, components: Any, state: PipelineState) -> Tuple[Any, PipelineState]:
        stored = state.get(NEGATIVES_KEY)
        if not stored:
            return components, state
        for name, uncond in stored["uncond"].items():
            now = state.get(name)
            if not isinstance(uncond, torch.Tensor) or not isinstance(now, torch.Tensor):
                continue
            positive = name[len("negative_") :]
            index = _row_map(
                stored["positive"].get(positive), state.get(positive), now, uncond, name
            )
            rows = [now] + [neg[name].to(now).index_select(0, index) for neg in stored["negatives"]]
            state.set(name, torch.cat(rows, dim=0))
        return components, state


def _row_map(
    pos_encoded: Any, pos_now: Any, now: torch.Tensor, uncond: torch.Tensor, name: str
) -> torch.Tensor:
    """For each row of ``now``, the encoded prompt it belongs to (traced through the positive)."""
    rows, prompts = now.shape[0], uncond.shape[0]
    copies = rows // prompts if prompts and rows % prompts == 0 else 0
    default = [r // copies for r in range(rows)] if copies else None
    traceable = (
        isinstance(pos_encoded, torch.Tensor)
        and isinstance(pos_now, torch.Tensor)
        and pos_now.shape[0] == rows
        and pos_encoded.shape[1:] == pos_now.shape[1:]
    )
    if traceable:
        enc = pos_encoded.to(pos_now)
        index: List[int] = []
        for r in range(rows):
            hits = [b for b in range(enc.shape[0]) if torch.equal(enc[b], pos_now[r])]
            if not hits:
                index = []
                break
            index.append(default[r] if default and default[r] in hits else hits[0])
    else:
        index = list(default or [])
    result = torch.tensor(index, dtype=torch.long, device=now.device)
    if len(index) != rows or not torch.equal(uncond.to(now).index_select(0, result), now):
        raise ValueError(
            f"{name}: cannot trace the pipeline's {rows} rows back to the {prompts} encoded "
            "prompts; PerpNegPackStep cannot pair the negatives with their samples here"
        )
    return result


def _has_loop(block: ModularPipelineBlocks) -> bool:
    if isinstance(block, LoopSequentialPipelineBlocks):
        return True
    return any(_has_loop(child) for child in block.sub_blocks.values())


def _insert_pack(block: ModularPipelineBlocks) -> bool:
    """Put the pack step right before every denoise loop under ``block``; False if there is none.

    Right before the loop, because the steps that repeat the embeddings for
    ``num_images_per_prompt`` may sit anywhere above it (SDXL: before its conditional denoise
    block; SD3: inside each branch of it). In a sequential block the step is inserted before the
    loop; a loop that is a branch of a conditional block becomes a two-block sequence.
    """
    inserted = False
    for name, child in list(block.sub_blocks.items()):
        if isinstance(child, LoopSequentialPipelineBlocks):
            if isinstance(block, SequentialPipelineBlocks):
                block.sub_blocks.insert(
                    f"perp_neg_pack_{name}", PerpNegPackStep(), list(block.sub_blocks).index(name)
                )
            else:
                block.sub_blocks[name] = SequentialPipelineBlocks.from_blocks_dict(
                    {"perp_neg_pack": PerpNegPackStep(), name: child}
                )
            inserted = True
        elif _has_loop(child):
            inserted = _insert_pack(child) or inserted
    return inserted


def _replace_encoder(block: ModularPipelineBlocks) -> bool:
    for name, child in list(block.sub_blocks.items()):
        if isinstance(child, PerpNegTextEncoderStep):
            return True
        outs = {p.name for p in child.intermediate_outputs}
        ins = {p.name for p in child.inputs}
        if not child.sub_blocks and "negative_prompt_embeds" in outs and "negative_prompt" in ins:
            block.sub_blocks[name] = PerpNegTextEncoderStep(child)
            return True
        if _replace_encoder(child):
            return True
    return False


def add_perp_neg(blocks: ModularPipelineBlocks) -> ModularPipelineBlocks:
    """Make a modular pipeline's blocks feed :class:`PerpNegGuidance` (in place; returns them).

    The pipeline's text-encoder block (the block reading ``negative_prompt`` and writing
    ``negative_prompt_embeds``) is wrapped in :class:`PerpNegTextEncoderStep`, and
    :class:`PerpNegPackStep` is inserted right before the denoise loop. Then
    ``pipe(prompt=..., negative_prompt=..., perp_neg_prompts=[...])`` with
    ``pipe.update_components(guider=PerpNegGuidance(...))``.
    """
    if not isinstance(blocks, ModularPipelineBlocks):
        raise ValueError(
            f"blocks: expected diffusers ModularPipelineBlocks, got {type(blocks).__name__}"
        )
    if not _replace_encoder(blocks):
        raise ValueError(
            f"blocks: expected a text-encoder block reading negative_prompt and writing "
            f"negative_prompt_embeds in {type(blocks).__name__}, found none"
        )
    if not any(isinstance(b, PerpNegPackStep) for b in _walk(blocks)) and not _insert_pack(blocks):
        raise ValueError(
            f"blocks: expected a sequential pipeline with a denoise loop in {type(blocks).__name__}, "
            "found none"
        )
    return blocks


def _walk(block: ModularPipelineBlocks) -> Sequence[ModularPipelineBlocks]:
    out = [block]
    for child in block.sub_blocks.values():
        out.extend(_walk(child))
    return out
