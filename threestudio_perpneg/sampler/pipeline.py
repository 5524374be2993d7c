"""2D Perp-Neg sampling over any diffusers Stable Diffusion pipeline (1.x / 2.x).

Perp-Neg (Armandpour et al. 2023, https://arxiv.org/abs/2304.04968) combines a main prompt with
any number of weighted extra prompts. Positive-weight prompts add concepts; negative-weight prompts
remove concepts, but only through the part of their guidance direction that is perpendicular to the
positive direction, so a negative prompt cannot undo the main prompt:

    Δ_k = ε(x_t, c_k) − ε(x_t, c_u)
    Δ_P = Σ_{j∈P} w_j Δ_j                                  (main prompt + positive extras)
    ε̂   = ε_u + s · (Δ_P + Σ_{i∈N} w_i ⊥(Δ_i, Δ_P)),       ⊥(a, b) = a − (⟨a, b⟩ / ‖b‖²) b

with the inner product taken per image. The combination is :func:`threestudio_perpneg.core.guidance.
perp_neg_guidance`, the same function the 3D guidance uses. The guidance-scale convention is the
diffusers / paper one (ε̂ = ε_u + s·(…), default s = 7.5).

Every denoising step evaluates the unconditional branch and every prompt with a non-zero weight,
for all images, in ONE batched UNet call (``N_images × (1 + prompts)`` rows). The pipeline's own
scheduler drives the loop (``set_timesteps``, ``init_noise_sigma``, ``scale_model_input``,
``step`` with ``eta`` / ``generator`` where its signature accepts them), so DDIM, Euler, Euler
ancestral, DPM-Solver, PNDM and LMS all work. Each image has its own ``torch.Generator``: image ``i``
of a run with seeds ``[a, b]`` is the image of a run with seed ``[b]``.

Modes (``mode=``), so figures compare like with like on the same UNet and seeds:

* ``"perpneg"``: the formula above.
* ``"cebm"``: composable diffusion (Liu et al. 2022), no projection: ε̂ = ε_u + s·Σ_k w_k Δ_k.
* ``"sd"``: plain Stable Diffusion negative prompt: the positive extras are appended to the main
  prompt with ``", "``, the negative extras (and ``negative_prompt``) form the unconditional text,
  ε̂ = ε_neg + s·(ε_pos − ε_neg). Only the signs of the weights matter.

:meth:`PerpNegSampler.generate_view` adds view conditioning: the positive is the view embedding
interpolated at the requested azimuth (``"{prompt}, side view"`` …), the other views are negatives
with the weights of the 3D prompt processor's schemes (:mod:`threestudio_perpneg.core.views`).

This module imports torch only; diffusers and PIL are imported when first needed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..common.checks import SEED_MAX_64, check_int, check_text
from ..common.io import to_jsonable
from ..core.controls import draw_uniforms, step_in_window
from ..core.guidance import perp_neg_guidance
from ..core.text import view_prompts
from ..core.views import VIEW_NAMES
from .checks import (
    MODES,
    VIEW_AZIMUTHS,
    camera_view_weights,
    check_azimuths,
    check_extras,
    check_mode,
    check_sampling,
    check_view_request,
    check_weights,
)
from .prompts import MAX_SEEDS, PromptSpec, parse_prompts, parse_seeds
from .results import Branch as _Branch
from .results import GenerationResult, plan_branches, strip
from .results import Plan as _Plan
from .results import round6 as _round
from .schedulers import SCHEDULERS, load_pipeline, make_scheduler
from .schedulers import accepts as _accepts

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "MAX_SEEDS",
    "MODES",
    "SCHEDULERS",
    "VIEW_AZIMUTHS",
    "PromptSpec",
    "GenerationResult",
    "PerpNegSampler",
    "parse_prompts",
    "parse_seeds",
    "make_scheduler",
]

log = logging.getLogger(__name__)

_EMBEDDING_CACHE_SIZE = 128


class PerpNegSampler:
    """Batched Perp-Neg / composable / negative-prompt sampling over a Stable Diffusion pipeline.

    The sampler reads ``pipe.unet``, ``pipe.vae``, ``pipe.text_encoder``, ``pipe.tokenizer`` and
    ``pipe.scheduler`` at call time, so swapping ``pipe.scheduler`` (or calling
    :meth:`set_scheduler`) takes effect on the next call. Text embeddings are cached per prompt.

    Args:
        pipe (`StableDiffusionPipeline`): any diffusers Stable Diffusion 1.x/2.x pipeline (or an
            object with the same five components).

    Example::

        sampler = PerpNegSampler.from_pretrained("stabilityai/stable-diffusion-2-1-base",
                                                 torch_dtype=torch.float16, device="cuda")
        out = sampler.generate("a peacock, back view", ["a peacock, front view"], [1.0, -3.5],
                               seeds=[30])
        out.images[0].save("peacock.png")
    """

    def __init__(self, pipe: Any) -> None:
        for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            if getattr(pipe, name, None) is None:
                raise ValueError(
                    f"pipe: expected a Stable Diffusion pipeline with a {name}, got {pipe!r}"
                )
        self.pipe = pipe
        self._cache: Dict[str, Tensor] = {}
        self._cache_owner: Tuple[int, int] = (0, 0)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        scheduler: Optional[str] = None,
        torch_dtype: Union[torch.dtype, str] = torch.float32,
        device: Union[torch.device, str] = "cpu",
    ) -> PerpNegSampler:
        """Loads a ``StableDiffusionPipeline`` from a hub id or a local diffusers folder.

        Args:
            name_or_path (`str`): hub id (e.g. ``"runwayml/stable-diffusion-v1-5"``) or folder.
            scheduler (`str`, *optional*): ``None`` keeps the checkpoint's scheduler; otherwise one
                of :data:`SCHEDULERS` (``ddim``, ``euler``, ``euler_a``, ``dpm``, ``pndm``, ``lms``),
                built from the checkpoint's scheduler config.
            torch_dtype (`torch.dtype` or `str`, defaults to `torch.float32`): ``torch.float16`` on
                a GPU halves memory; guidance is still combined in float32.
            device (`str` or `torch.device`, defaults to ``"cpu"``): where the pipeline runs.

        Raises:
            `FileNotFoundError`: naming ``model`` when a local folder is missing or the checkpoint
                cannot be loaded (e.g. a hub id absent from the local cache while offline).
            `ValueError`: naming ``scheduler`` / ``torch_dtype`` for unknown values.
        """
        if scheduler is not None and scheduler not in SCHEDULERS:
            raise ValueError(
                f"scheduler: unknown scheduler {scheduler!r}, expected one of {list(SCHEDULERS)}"
            )
        pipe = load_pipeline(name_or_path, torch_dtype, device)
        sampler = cls(pipe)
        if scheduler is not None:
            sampler.set_scheduler(scheduler)
        return sampler

    def set_scheduler(self, name: str) -> Any:
        """Replaces ``pipe.scheduler`` by the :data:`SCHEDULERS` entry ``name``; returns it."""
        self.pipe.scheduler = make_scheduler(name, self.pipe.scheduler.config)
        return self.pipe.scheduler

    # ---------------------------------------------------------------- components
    @property
    def unet(self) -> Any:
        return self.pipe.unet

    @property
    def vae(self) -> Any:
        return self.pipe.vae

    @property
    def scheduler(self) -> Any:
        return self.pipe.scheduler

    @property
    def device(self) -> torch.device:
        return next(self.pipe.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.pipe.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return int(2 ** (len(self.pipe.vae.config.block_out_channels) - 1))

    def default_size(self) -> Tuple[int, int]:
        """(height, width) the UNet was trained at: ``sample_size × vae_scale_factor``."""
        size = self.pipe.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return int(h) * self.vae_scale_factor, int(w) * self.vae_scale_factor

    # -------------------------------------------------------------------- text
    @torch.no_grad()
    def encode(self, text: str) -> Tensor:
        """CLIP embedding ``[L, D]`` of one prompt, as the diffusers pipeline computes it.

        Each prompt is encoded on its own (batch 1), so the result does not depend on which other
        prompts were encoded before; results are cached per prompt.
        """
        tokenizer, encoder = self.pipe.tokenizer, self.pipe.text_encoder
        owner = (id(tokenizer), id(encoder))
        if owner != self._cache_owner:
            self._cache, self._cache_owner = {}, owner
        if text in self._cache:
            return self._cache[text]
        tokens = tokenizer(
            [text],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        full = tokenizer([text], padding="longest", return_tensors="pt").input_ids
        if full.shape[-1] > tokens.input_ids.shape[-1]:
            log.warning(
                "prompt %r is longer than the text encoder's %d tokens and was truncated",
                text,
                tokenizer.model_max_length,
            )
        device = next(encoder.parameters()).device
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(device)
        emb = encoder(tokens.input_ids.to(device), attention_mask=mask)[0][0]
        emb = emb.to(device=self.device, dtype=encoder.dtype)
        if len(self._cache) >= _EMBEDDING_CACHE_SIZE:
            self._cache.pop(next(iter(self._cache)))
        self._cache[text] = emb
        return emb

    # ---------------------------------------------------------------- planning
    def _plan(self, positive: _Branch, *args: Any, **kwargs: Any) -> _Plan:
        """Branches of one generation (:func:`~.results.plan_branches` with this encoder)."""
        return plan_branches(self.encode, positive, *args, **kwargs)

    # --------------------------------------------------------------- generation
    def generate(
        self,
        prompt: str,
        extra_prompts: Sequence[str] = (),
        weights: Optional[Sequence[float]] = None,
        *,
        mode: str = "perpneg",
        negative_prompt: str = "",
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        height: Optional[int] = None,
        width: Optional[int] = None,
        seeds: Sequence[int] = (0,),
        eta: float = 0.0,
        progress: bool = True,
        perp_neg_start: float = 0.0,
        perp_neg_stop: float = 1.0,
        perp_neg_eval_prob: float = 1.0,
    ) -> GenerationResult:
        r"""Generates one image per seed from a main prompt and weighted extra prompts.

        ``mode="perpneg"`` computes ε̂ = ε_u + s·(Σ_{j∈P} w_j Δ_j + Σ_{i∈N} w_i ⊥(Δ_i, Σ_{j∈P} w_j Δ_j))
        (paper: https://arxiv.org/abs/2304.04968) with P = main prompt + positive-weight extras,
        N = negative-weight extras; all-zero extra weights give plain classifier-free guidance.
        ``"cebm"`` drops the projection, ``"sd"`` uses the negative extras as a negative prompt.

        Args:
            prompt (`str`): the main prompt.
            extra_prompts (`Sequence[str]`, defaults to ``()``): extra prompts.
            weights (`Sequence[float]`, *optional*): ``1 + len(extra_prompts)`` weights, the main
                prompt's first (> 0), as in :class:`PromptSpec`. ``None``: main 1.0, extras −1.0.
                Negative weights remove a concept, positive ones add one, zero ones are skipped
                (never evaluated).
            mode (`str`, defaults to ``"perpneg"``): one of :data:`MODES`.
            negative_prompt (`str`, defaults to ``""``): the unconditional branch's text (in ``sd``
                mode appended to the negative extras).
            num_inference_steps (`int`, defaults to 50): scheduler steps.
            guidance_scale (`float`, defaults to 7.5): s in ε̂ = ε_u + s·(…).
            height (`int`, *optional*), width (`int`, *optional*): image size, multiples of 8;
                defaults to the UNet's training size.
            seeds (`Sequence[int]`, defaults to ``(0,)``): one image per seed, each with its own
                ``torch.Generator`` on the pipeline's device.
            eta (`float`, defaults to 0.0): DDIM η, passed only to schedulers that accept it.
            progress (`bool`, defaults to `True`): show a tqdm progress bar on stderr.
            perp_neg_start (`float`, defaults to 0.0), perp_neg_stop (`float`, defaults to 1.0):
                fractions of the denoising steps where ``perpneg`` negatives are evaluated, as
                diffusers' guiders count them (step i of N is in when int(start·N) <= i <
                int(stop·N)); the other steps are plain guidance on the positives and run no
                negative rows. ``cebm`` and ``sd`` modes have no negative rows and ignore them.
            perp_neg_eval_prob (`float`, defaults to 1.0): probability p ∈ (0, 1] that a step
                inside the window evaluates the ``perpneg`` negatives, their weights divided by p
                (an unbiased estimate of the full guidance: E[ε̂] is unchanged); otherwise the step
                is plain guidance on the positives and runs no negative rows, as outside the
                window. One draw per step for all images of the call: u = ``torch.rand(1,
                dtype=torch.float64, generator=g)`` with ``g = torch.Generator("cpu").manual_seed(
                seeds[0])`` made for the call (the images' own generators are not touched), and the
                negatives are evaluated when u < p. p = 1 draws nothing and evaluates them at every
                step in the window. ``cebm`` and ``sd`` modes ignore it.

        Returns:
            [`GenerationResult`].

        Raises:
            `ValueError`: naming the argument: empty ``prompt`` / ``extra_prompts[i]``, ``weights``
                count or values, unknown ``mode``, ``height`` / ``width`` not multiples of 8,
                empty ``seeds``, ``num_inference_steps`` < 1, non-finite ``guidance_scale`` / ``eta``,
                ``perp_neg_start`` / ``perp_neg_stop`` outside [0, 1] or start > stop,
                ``perp_neg_eval_prob`` not a number with 0 < p <= 1.
        """
        prompt = check_text("prompt", prompt)
        extras = check_extras(extra_prompts)
        w = check_weights(weights, len(extras))
        mode = check_mode(mode)
        if not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt: expected a string, got {negative_prompt!r}")
        sampling = self._check_sampling(
            num_inference_steps,
            guidance_scale,
            height,
            width,
            seeds,
            eta,
            perp_neg_start,
            perp_neg_stop,
            perp_neg_eval_prob,
        )
        main = _Branch(prompt, self.encode(prompt), w[0])
        sd_positive = None
        if mode == "sd":
            text = ", ".join([prompt] + [t for t, x in zip(extras, w[1:]) if x > 0])
            sd_positive = _Branch(text, self.encode(text), 1.0)
        plan = self._plan(main, extras, w, mode, negative_prompt.strip(), sd_positive=sd_positive)
        plan.report["view"] = None
        settings = {"prompt": prompt, "extra_prompts": extras, "weights": w, "view": None}
        return self._sample(plan, mode, sampling, settings, negative_prompt.strip(), progress)

    def generate_view(
        self,
        prompt: str,
        *,
        view: Optional[str] = None,
        azimuth: Optional[float] = None,
        elevation: float = 0.0,
        scheme: str = "threestudio",
        view_weights: Optional[Mapping[str, float]] = None,
        extra_prompts: Sequence[str] = (),
        weights: Optional[Sequence[float]] = None,
        mode: str = "perpneg",
        **generate_kwargs: Any,
    ) -> GenerationResult:
        r"""Generates an object seen from a view name or azimuth, with view negatives.

        The view prompts are threestudio's (``"{prompt}, side view"``, ``front``, ``back``,
        ``overhead``). With r the interpolation factor of :func:`threestudio_perpneg.core.views.
        view_weights` (front half: r = 1 − |a|/90, back half: r = 2 − |a|/90), the positive is the
        interpolated embedding r·e_front + (1 − r)·e_side (front half) or r·e_side + (1 − r)·e_back
        (back half), the overhead prompt above the overhead threshold (60°). The other views become
        negative prompts with the weights of ``scheme`` (``"threestudio"`` or ``"authors"``, as in
        the 3D prompt processor), or with ``view_weights`` given by the user. Extra prompts work as
        in :meth:`generate`, and ``weights[0]`` weights the view positive.

        Args:
            prompt (`str`): the object prompt (without a view phrase).
            view (`str`, *optional*): ``"front"``, ``"side"``, ``"back"`` or ``"overhead"``
                (azimuth 0, 90, 180; overhead forces the overhead bucket).
            azimuth (`float`, *optional*): degrees in [−180, 360], front at 0. Exactly one of
                ``view`` / ``azimuth`` must be given.
            elevation (`float`, defaults to 0.0): degrees in [−90, 90]; above 60 the overhead view
                is used.
            scheme (`str`, defaults to ``"threestudio"``): view-negative weight scheme.
            view_weights (`Mapping[str, float]`, *optional*): e.g. ``{"front": -2.0, "side": -0.5}``
                replaces the scheme's view negatives (views not named get weight 0).
            extra_prompts (`Sequence[str]`, *optional*): as in :meth:`generate`.
            weights (`Sequence[float]`, *optional*): as in :meth:`generate`.
            mode (`str`, defaults to ``"perpneg"``): as in :meth:`generate`.
            **generate_kwargs: ``negative_prompt``, ``num_inference_steps``, ``guidance_scale``,
                ``height``, ``width``, ``seeds``, ``eta``, ``progress``, ``perp_neg_start``,
                ``perp_neg_stop``, ``perp_neg_eval_prob`` as in :meth:`generate`.

        Raises:
            `ValueError`: naming ``view`` / ``azimuth`` (both or neither given, unknown view,
                azimuth out of range), ``elevation``, ``scheme``, ``view_weights``, and everything
                :meth:`generate` checks.
        """
        prompt = check_text("prompt", prompt)
        az, elev, forced, user = check_view_request(view, azimuth, elevation, scheme, view_weights)
        extras = check_extras(extra_prompts)
        w = check_weights(weights, len(extras))
        mode = check_mode(mode)
        negative_prompt = generate_kwargs.pop("negative_prompt", "")
        if not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt: expected a string, got {negative_prompt!r}")
        progress = bool(generate_kwargs.pop("progress", True))
        sampling = self._check_sampling(**generate_kwargs)

        vw = camera_view_weights(az, elev, scheme, view=forced)
        bucket = int(vw.view[0])
        mix = [float(x) for x in vw.positive_mix[0]]
        neg_w = [float(x) for x in vw.negative_weights[0]]
        if user is not None:
            neg_w = [user.get(name, 0.0) for name in VIEW_NAMES]

        def interpolated(base: str) -> _Branch:
            texts = view_prompts(base)
            used = [(m, t) for m, t in zip(mix, texts) if m != 0.0]
            if len(used) == 1:
                return _Branch(used[0][1], self.encode(used[0][1]), w[0])
            emb = sum(m * self.encode(t).float() for m, t in used)
            assert isinstance(emb, Tensor)
            label = " + ".join(f"{m:.4g}*[{t}]" for m, t in used)
            return _Branch(label, emb.to(self.encode(texts[0]).dtype), w[0])

        positive = interpolated(prompt)
        sd_positive = None
        if mode == "sd":
            pos_extras = [t for t, x in zip(extras, w[1:]) if x > 0]
            sd_positive = interpolated(", ".join([prompt] + pos_extras))
        texts = view_prompts(prompt)
        view_neg = [(texts[i], neg_w[i]) for i in range(4) if neg_w[i] != 0.0]
        plan = self._plan(
            positive,
            extras,
            w,
            mode,
            negative_prompt.strip(),
            view_negatives=view_neg,
            sd_positive=sd_positive,
        )
        plan.report["view"] = {
            "azimuth": _round(az),
            "elevation": _round(elev),
            "view": VIEW_NAMES[bucket],
            "r": _round(float(vw.r[0])),
            "positive_mix": {name: _round(m) for name, m in zip(VIEW_NAMES, mix)},
            "negative_weights": {name: _round(x) for name, x in zip(VIEW_NAMES, neg_w)},
            "scheme": "user" if user is not None else scheme,
        }
        settings = {
            "prompt": prompt,
            "extra_prompts": extras,
            "weights": w,
            "view": {
                "view": view,
                "azimuth": None if azimuth is None else float(az),
                "elevation": elev,
                "scheme": scheme,
                "view_weights": user,
            },
        }
        return self._sample(plan, mode, sampling, settings, negative_prompt.strip(), progress)

    def view_sweep(
        self,
        prompt: str,
        azimuths: Sequence[float] = (0, 45, 90, 135, 180),
        seed: int = 0,
        **kwargs: Any,
    ) -> Tuple[PILImage.Image, List[GenerationResult]]:
        """Renders one seed across azimuths into one horizontal strip of labelled tiles.

        Args:
            prompt (`str`): the object prompt.
            azimuths (`Sequence[float]`, defaults to ``(0, 45, 90, 135, 180)``): degrees, one tile each.
            seed (`int`, defaults to 0): the seed of every tile.
            **kwargs: everything :meth:`generate_view` takes except ``view``, ``azimuth``, ``seeds``.

        Returns:
            ``(strip, results)``: the strip is ``len(azimuths) × width`` by ``height`` pixels, each
            tile labelled with its azimuth and view bucket; one [`GenerationResult`] per azimuth.
        """
        for key in ("view", "azimuth", "seeds"):
            if key in kwargs:
                raise ValueError(f"{key}: view_sweep sets it itself (use azimuths= / seed=)")
        az_list = check_azimuths(azimuths)
        seed = check_int("seed", seed, 0, SEED_MAX_64)
        results = [self.generate_view(prompt, azimuth=a, seeds=[seed], **kwargs) for a in az_list]
        labels = [
            f"{float(a):g}\u00b0 {r.weights['view']['view']}" for a, r in zip(az_list, results)
        ]
        return strip([r.images[0] for r in results], labels), results

    # ------------------------------------------------------------------ the loop
    def _check_sampling(self, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        """:func:`~.checks.check_sampling` at this UNet's default size and VAE factor."""
        return check_sampling(self.default_size(), self.vae_scale_factor, *args, **kwargs)

    @torch.no_grad()
    def _sample(
        self,
        plan: _Plan,
        mode: str,
        sampling: Dict[str, Any],
        settings: Dict[str, Any],
        negative_prompt: str,
        progress: bool,
    ) -> GenerationResult:
        unet, scheduler = self.pipe.unet, self.pipe.scheduler
        device, dtype = self.device, self.dtype
        seeds: List[int] = sampling["seeds"]
        n = len(seeds)
        steps: int = sampling["num_inference_steps"]
        scale: float = sampling["guidance_scale"]

        # Rows, branch-major: [uncond × n, positive_1 × n, …, negative_1 × n, …] — with one
        # positive this is exactly the diffusers pipeline's [uncond; cond] layout.
        branches = [plan.uncond] + [b.embedding for b in plan.positives + plan.negatives]
        n_branches = len(branches)
        emb = torch.stack(branches).to(device=device, dtype=dtype)
        emb = emb.repeat_interleave(n, dim=0)
        n_pos, n_neg = len(plan.positives), len(plan.negatives)
        pos_w = torch.tensor([b.weight for b in plan.positives], dtype=torch.float32, device=device)
        neg_w = torch.tensor([b.weight for b in plan.negatives], dtype=torch.float32, device=device)

        try:
            if _accepts(scheduler.set_timesteps, "device"):
                scheduler.set_timesteps(steps, device=device)
            else:
                scheduler.set_timesteps(steps)
        except ValueError as err:  # e.g. PNDM with PRK warm-up steps and very few steps
            raise ValueError(
                f"num_inference_steps: {type(scheduler).__name__} cannot run {steps} steps: {err}"
            ) from err
        timesteps = scheduler.timesteps

        generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        shape = (
            1,
            int(unet.config.in_channels),
            sampling["height"] // self.vae_scale_factor,
            sampling["width"] // self.vae_scale_factor,
        )
        latents = torch.cat(
            [torch.randn(shape, generator=g, device=device, dtype=dtype) for g in generators]
        )
        latents = latents * scheduler.init_noise_sigma

        extra: Dict[str, Any] = {}
        if _accepts(scheduler.step, "eta"):
            extra["eta"] = sampling["eta"]
        if _accepts(scheduler.step, "generator"):
            extra["generator"] = generators

        calls = rows_run = 0
        window = (sampling["perp_neg_start"], sampling["perp_neg_stop"])
        eval_prob: float = sampling["perp_neg_eval_prob"]
        # p < 1: one draw per step in the window for the whole batch, from a generator of its own
        # (the images' generators keep their streams); evaluated negatives are weighted w / p.
        coin: Optional[torch.Generator] = None
        neg_w_eval = neg_w
        if n_neg > 0 and eval_prob < 1.0:
            coin = torch.Generator(device="cpu").manual_seed(seeds[0])
            neg_w_eval = neg_w / eval_prob
        iterator: Any = timesteps
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(timesteps, desc=f"{mode} ({n} image(s), {n_branches * n} rows)")
        for i, t in enumerate(iterator):
            # Outside [start, stop) the negatives' rows (the last ones) are not run at all.
            with_neg = n_neg > 0 and step_in_window(i, len(timesteps), *window)
            if with_neg and coin is not None:
                with_neg = bool(draw_uniforms(1, coin)[0] < eval_prob)
            rows = n_branches if with_neg else 1 + n_pos
            rows_run += rows * n
            model_input = torch.cat([latents] * rows)
            model_input = scheduler.scale_model_input(model_input, t)
            out = unet(model_input, t, encoder_hidden_states=emb[: rows * n], return_dict=False)[0]
            calls += 1
            out = out.reshape(rows, n, *out.shape[1:])
            eps_u = out[0]
            eps_pos = out[1 : 1 + n_pos].transpose(0, 1)  # [n, P, C, h, w]
            eps_neg = out[1 + n_pos :].transpose(0, 1) if with_neg else None  # [n, K, C, h, w]
            noise = perp_neg_guidance(
                eps_u,
                eps_pos,
                eps_neg,
                neg_w_eval if with_neg else None,
                scale,
                pos_weights=pos_w,
            )
            latents = scheduler.step(noise, t, latents, **extra, return_dict=False)[0]

        images = self.decode(latents)
        settings = dict(settings)
        settings.update(
            {
                "mode": mode,
                "negative_prompt": negative_prompt,
                **{k: v for k, v in sampling.items()},
                "scheduler": type(scheduler).__name__,
                "scheduler_config": to_jsonable(dict(scheduler.config), nonfinite="keep"),
                "dtype": str(dtype).replace("torch.", ""),
                "device": str(device),
            }
        )
        return GenerationResult(
            images=images,
            latents=latents,
            seeds=list(seeds),
            mode=mode,
            weights=plan.report,
            unet_calls=calls,
            settings=settings,
            unet_rows=rows_run,
        )

    @torch.no_grad()
    def decode(self, latents: Tensor) -> List[PILImage.Image]:
        """Latents ``[N, C, h, w]`` → RGB images, as the diffusers pipeline post-processes them."""
        from PIL import Image

        vae = self.pipe.vae
        vae_dtype = next(vae.parameters()).dtype
        z = latents.to(vae_dtype) / vae.config.scaling_factor
        image = vae.decode(z, return_dict=False)[0]
        image = (image / 2 + 0.5).clamp(0, 1)
        array = image.cpu().permute(0, 2, 3, 1).float().numpy()
        array = (array * 255).round().astype("uint8")
        return [Image.fromarray(a) for a in array]
