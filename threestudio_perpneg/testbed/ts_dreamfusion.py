"""The Janus testbed through threestudio's own DreamFusion, on a CPU.

Where :mod:`.protocol3d` optimises a texture on a fixed head sphere with the project's own loop,
this runner trains what users run: threestudio's ``dreamfusion-system`` (an ``implicit-volume``
NeRF whose density and colour are both learned, the random-camera data module, material,
background, renderer and Lightning loop) with our ``perpneg-*`` classes chosen by config keys, on
the testbed prior. Only the CUDA-only parts are swapped (:mod:`threestudio_perpneg.threestudio_cpu`:
the hash grid becomes a frequency encoding, nerfacc's kernels torch code). The ring is rendered by
threestudio's own ``test_step`` (the data module's test split, ``n_test_views`` azimuths from 0°
to 360° inclusive, the last dropped), area-pooled to the prior's resolution, read by the testbed
classifier and scored with the testbed's Janus rules (:func:`.protocol3d.score_ring`).

Methods are config keys of ``perpneg-deep-floyd-guidance`` (:data:`METHODS`): ``noview`` (no view
words), ``vanilla`` (DreamFusion's view prompts, plain CFG) and ``ours`` (view-dependent Perp-Neg,
``scheme`` and the sampling controls). threestudio's built-in Perp-Neg (its own
``deep-floyd-guidance``) cannot load the testbed prior: its UNet call splits 6 output channels
(ε and the learned variance) and the prior predicts 3.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "METHODS",
    "ThreestudioRunConfig",
    "default_config_path",
    "method_overrides",
    "run_object",
    "run_objects",
]

PathLike = Union[str, Path]

METHODS: Tuple[str, ...] = ("noview", "vanilla", "ours")
#: What replaces the hash grid on CPU (see :class:`ThreestudioRunConfig`).
CPU_ENCODINGS: Tuple[str, ...] = ("grid", "frequency")


def default_config_path() -> Path:
    """The shipped ``configs/testbed-dreamfusion.yaml`` (beside the package in a clone)."""
    return Path(__file__).resolve().parents[2] / "configs" / "testbed-dreamfusion.yaml"


@dataclass
class ThreestudioRunConfig:
    """One threestudio testbed run's settings (every field saved with the results).

    Args:
        config: a threestudio YAML (default :func:`default_config_path`).
        prior: the testbed prior folder (the guidance and the prompt processor load it).
        method: ``noview``, ``vanilla`` or ``ours`` (see the module docstring). Default vanilla.
        scheme: Perp-Neg weight scheme of ``ours`` (``threestudio`` or ``authors``).
        sampling: ``perp_neg_sampling`` of ``ours`` (``all`` or ``one``).
        eval_prob: ``perp_neg_eval_prob`` of ``ours``: probability p that a camera's negatives
            are evaluated (weights divided by p). Default 1.
        identity: the head identity prompted (``"a cartoon <identity> head"``, the prior's base
            prompt); the classifier's identity agreement is measured against it. Default troll.
        steps: optimiser steps; None keeps the config's ``trainer.max_steps``.
        batch_size: cameras per step; None keeps the config's ``data.batch_size``.
        cpu_encoding: what replaces tcnn's hash grid on CPU: ``grid`` (default), the torch
            multiresolution grid of :mod:`threestudio_perpneg.threestudio_cpu.grid_encoding` (local
            features like the hash grid, threestudio's progressive levels), or ``frequency``,
            threestudio's ``ProgressiveBandFrequency`` into a global MLP (which learns a head
            that looks the same from every side).
        cpu_grid_levels / cpu_grid_log2_size: levels and log2 table size of the CPU grid
            (threestudio's base resolution 16 and level scale 1.447; the first half of the levels
            from the start, one more every 50 steps from step 200). Default 8 and 16.
        cpu_frequencies: frequencies of the ``frequency`` encoding. Default 6.
        cpu_masking_steps: steps over which the frequencies are unmasked coarse to fine (0: all
            from the start). Default 0.
        cpu_neurons / cpu_hidden_layers: the MLP that replaces tcnn's (torch ``VanillaMLP``).
            Default 64 neurons, 2 hidden layers.
        cpu_lr: Adam learning rate of the geometry on CPU (``system.optimizer.args.lr`` and
            ``...params.geometry.lr``); None (default) keeps the config's (threestudio's 0.01, for
            grid cells). The ``frequency`` encoding has no parameters, its MLP's weights carry
            the whole field: 0.05 drew a head there where 0.01 drew a hair-coloured ball.
        overrides: further threestudio dotlist overrides (``key=value``), applied last.
        ring_views: views of the evaluation ring (``n_test_views`` is set to one more). Default 12.
    """

    config: str = ""
    prior: str = ""
    method: str = "vanilla"
    scheme: str = "threestudio"
    sampling: str = "all"
    eval_prob: float = 1.0
    identity: str = "troll"
    steps: Optional[int] = None
    batch_size: Optional[int] = None
    cpu_encoding: str = "grid"
    cpu_grid_levels: int = 8
    cpu_grid_log2_size: int = 16
    cpu_frequencies: int = 6
    cpu_masking_steps: int = 0
    cpu_neurons: int = 64
    cpu_hidden_layers: int = 2
    cpu_lr: Optional[float] = None
    overrides: Tuple[str, ...] = field(default_factory=tuple)
    ring_views: int = 12

    def __post_init__(self) -> None:
        from ..common.checks import check_choice, check_float, check_int
        from ..core.controls import check_eval_prob, check_sampling
        from ..core.views import make_scheme

        check_choice("method", self.method, METHODS, what="method")
        make_scheme(self.scheme)
        check_sampling(self.sampling)
        self.eval_prob = check_eval_prob(self.eval_prob, "eval_prob")
        if self.method != "ours" and (self.sampling != "all" or self.eval_prob != 1.0):
            raise ValueError(
                f"sampling/eval_prob: apply to method 'ours' only, got {self.sampling!r} and "
                f"{self.eval_prob!r} with method {self.method!r}"
            )
        check_choice("cpu_encoding", self.cpu_encoding, CPU_ENCODINGS, what="value")
        for key, lo in (
            ("cpu_grid_levels", 1),
            ("cpu_grid_log2_size", 8),
            ("cpu_frequencies", 1),
            ("cpu_masking_steps", 0),
            ("cpu_neurons", 1),
            ("cpu_hidden_layers", 1),
            ("ring_views", 4),
        ):
            check_int(key, getattr(self, key), lo)
        if self.cpu_lr is not None:
            self.cpu_lr = check_float("cpu_lr", self.cpu_lr, 1e-12)
        for key in ("steps", "batch_size"):
            if getattr(self, key) is not None:
                check_int(key, getattr(self, key), 1)
        self.overrides = tuple(self.overrides)
        for item in self.overrides:
            if "=" not in item or not item.split("=", 1)[0]:
                raise ValueError(f"overrides: expected key=value items, got {item!r}")

    @property
    def label(self) -> str:
        """``method[/scheme][ one]`` as in the testbed's tables."""
        if self.method != "ours":
            return self.method
        extra = ("" if self.sampling == "all" else f" {self.sampling}") + (
            "" if self.eval_prob == 1.0 else f" p={self.eval_prob:g}"
        )
        return f"ours/{self.scheme}{extra}"

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def method_overrides(cfg: ThreestudioRunConfig) -> List[str]:
    """The config keys that select ``cfg.method`` (the one-key switches a user would set)."""
    g = "system.guidance"
    if cfg.method == "noview":
        return [f"{g}.use_perp_neg=false", f"{g}.view_dependent_prompting=false"]
    if cfg.method == "vanilla":
        return [f"{g}.use_perp_neg=false"]
    return [
        f"{g}.use_perp_neg=true",
        f"{g}.perp_neg_scheme={cfg.scheme}",
        f"{g}.perp_neg_sampling={cfg.sampling}",
        f"{g}.perp_neg_eval_prob={cfg.eval_prob}",
    ]


def cpu_encoding_config(cfg: ThreestudioRunConfig) -> Dict[str, Any]:
    """The encoding config that replaces the hash grid on CPU (see :class:`ThreestudioRunConfig`)."""
    if cfg.cpu_encoding == "frequency":
        return {
            "otype": "ProgressiveBandFrequency",
            "n_frequencies": cfg.cpu_frequencies,
            "n_masking_step": cfg.cpu_masking_steps,
        }
    return {
        "otype": "ProgressiveBandHashGrid",
        "n_levels": cfg.cpu_grid_levels,
        "n_features_per_level": 2,
        "log2_hashmap_size": cfg.cpu_grid_log2_size,
        "base_resolution": 16,
        "per_level_scale": 1.447269237440378,
        "start_level": max(1, cfg.cpu_grid_levels // 2),
        "start_step": 200,
        "update_steps": 50,
    }


def _run_overrides(cfg: ThreestudioRunConfig, prompt: str) -> List[str]:
    items = [f"system.prompt_processor.prompt={prompt}", *method_overrides(cfg)]
    items.append(f"data.n_test_views={cfg.ring_views + 1}")
    if cfg.steps is not None:
        items.append(f"trainer.max_steps={cfg.steps}")
    if cfg.batch_size is not None:
        items.append(f"data.batch_size={cfg.batch_size}")
    if cfg.cpu_lr is not None:
        items += [
            f"system.optimizer.args.lr={cfg.cpu_lr}",
            f"system.optimizer.params.geometry.lr={cfg.cpu_lr}",
        ]
    return items + list(cfg.overrides)


def _step_callback(bar: Any, rows: List[int]) -> Any:
    """A Lightning callback that advances ``bar`` per training step and appends the batch rows of
    every UNet call to ``rows`` (the system builds its guidance in ``on_fit_start``, so the hook
    is attached when training starts)."""
    import pytorch_lightning as pl

    class StepCallback(pl.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.hook = pl_module.guidance.unet.register_forward_pre_hook(
                lambda module, args: rows.append(int(args[0].shape[0]))
            )

        def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
            bar.update(1)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.hook.remove()

    return StepCallback()


def run_object(
    cfg: ThreestudioRunConfig,
    seed: int,
    workdir: PathLike,
    classifier: Any,
    *,
    progress: bool = True,
    threestudio_root: Optional[PathLike] = None,
) -> Dict[str, Any]:
    """Train one object with threestudio's system on CPU and score its ring.

    Returns a dict with ``object`` (the :class:`.protocol3d.ObjectResult`) and ``log`` (seed,
    batch, verdicts, ring labels, seconds per step, UNet rows per step, final loss). Raises
    :class:`~threestudio_perpneg.threestudio_cpu.ThreestudioUnavailable` without a checkout.
    """
    import torch.nn.functional as F

    from ..threestudio_cpu.system import fit_steps, make_dreamfusion_system
    from .dataset import DatasetConfig, base_prompt
    from .protocol3d import classified_object, prior_resolution

    prior = Path(cfg.prior)
    meta = json.loads((prior / "testbed.json").read_text(encoding="utf-8"))
    dataset = DatasetConfig.from_dict(meta["dataset"])
    prompt = base_prompt(dataset, cfg.identity)
    extension = Path(__file__).resolve().parents[2] / "custom" / "threestudio-perpneg"
    system, dm = make_dreamfusion_system(
        cfg.config,
        prior,
        workdir,
        _run_overrides(cfg, prompt),
        extensions=[extension],
        threestudio_root=threestudio_root,
        seed=seed,
        harness_defaults=False,
        torch_grid=cfg.cpu_encoding == "grid",
        cpu_encoding=cpu_encoding_config(cfg),
        cpu_mlp={
            "otype": "VanillaMLP",
            "activation": "ReLU",
            "output_activation": "none",
            "n_neurons": cfg.cpu_neurons,
            "n_hidden_layers": cfg.cpu_hidden_layers,
        },
    )
    steps = int(system._harness_cfg.trainer.max_steps)
    rows: List[int] = []
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, desc=f"{cfg.label} seed {seed}", disable=not progress, leave=False)
    t0 = time.time()
    try:
        losses = fit_steps(system, dm, steps, callbacks=[_step_callback(bar, rows)])
    finally:
        bar.close()
    seconds = time.time() - t0

    ring, azimuths = _test_ring(system, dm)
    n = cfg.ring_views
    ring, azimuths = ring[:n], azimuths[:n]
    # Area pooling to the prior's size: what the guidance's resize does to the 2x renders.
    small = F.adaptive_avg_pool2d(ring, prior_resolution(prior))
    obj = classified_object(
        classifier,
        small,
        azimuths,
        identity=cfg.identity,
        unet_rows_per_step=sum(rows) / max(len(rows), 1),
        losses=losses,
        texture=torch.empty(0),
        seconds=seconds,
        ring_images_detail=ring,
    )
    log = {
        "seed": seed,
        "batch": int(system._harness_cfg.data.batch_size),
        "janus": obj.janus,
        "front_kept": obj.front_kept,
        "labels": obj.ring_labels,
        "identity_agreement": obj.identity_agreement,
        "seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(steps, 1), 4),
        "unet_rows_per_step": obj.unet_rows_per_step,
        "final_loss": losses[-1] if losses else math.nan,
    }
    return {"object": obj, "log": log}


def _test_ring(system: Any, datamodule: Any) -> Tuple[torch.Tensor, List[float]]:
    """The ring as threestudio's own ``test_step`` renders it: ``([n, 3, H, W]`` in [0, 1],
    azimuths wrapped to (−180°, 180°]); the test step still writes its PNGs."""
    from ..threestudio_cpu.system import working_directory

    images: List[torch.Tensor] = []
    azimuths: List[float] = []
    forward = system.forward

    def recording_forward(batch: Dict[str, Any]) -> Dict[str, Any]:
        out = forward(batch)
        if not system.training:
            images.append(out["comp_rgb"].detach()[0].permute(2, 0, 1).clamp(0, 1).cpu())
            a = float(batch["azimuth"][0])
            azimuths.append(a - 360.0 if a > 180.0 else a)
        return out

    system.forward = recording_forward
    # The fit's own trainer, as launch.py tests after fitting: the test step names its folder by
    # the trained step (it<steps>-test).
    trainer = system.trainer
    try:
        with working_directory(system._harness_workdir):
            system.on_test_epoch_end = lambda: None  # threestudio's writes an mp4 of the ring
            trainer.test(system, datamodule=datamodule, verbose=False)
    finally:
        del system.forward
    return torch.stack(images), azimuths


def run_objects(
    cfg: ThreestudioRunConfig,
    seeds: Sequence[int],
    out: PathLike,
    classifier: Any,
    *,
    progress: bool = True,
    echo: Callable[[str], Any] = print,
    threestudio_root: Optional[PathLike] = None,
    command: Optional[Sequence[str]] = None,
) -> Dict[str, Any]:
    """Every seed of one method: ``out/results.json`` (row, objects, settings, versions, and the
    ``command`` line when given) and
    ``out/rings.png`` (the clean head, then each seed's ring at 4x with the classifier's labels).

    Each object trains in ``out/objects/seed<k>`` (threestudio's trial folder with its test-step
    renders). Returns the results dict.
    """
    from ..commands.common import versions
    from ..common.io import output_folder, write_json_atomic
    from .bench import add_intervals
    from .table3d import MethodSpec, reference_ring, save_rings, table_row

    folder = output_folder("out", out)
    objects = []
    logs = []
    t0 = time.time()
    for seed in seeds:
        got = run_object(
            cfg,
            int(seed),
            folder / "objects" / f"seed{seed}",
            classifier,
            progress=progress,
            threestudio_root=threestudio_root,
        )
        objects.append(got["object"])
        logs.append(got["log"])
        log = got["log"]
        echo(
            f"{cfg.label} seed {seed}: {'JANUS' if log['janus'] else 'ok'}"
            f"{'' if log['front_kept'] else ', front lost'}  {' '.join(log['labels'])}  "
            f"({log['seconds']:.0f} s, {log['seconds_per_step']:.3f} s/step)"
        )
    spec = MethodSpec(
        cfg.method,
        logs[0]["batch"] if logs else 0,
        cfg.scheme if cfg.method == "ours" else None,
        tuple(
            (key, value)
            for key, value, default in (
                ("perp_neg_sampling", cfg.sampling, "all"),
                ("perp_neg_eval_prob", cfg.eval_prob, 1.0),
            )
            if value != default
        ),
    )
    row = table_row(spec, objects)
    add_intervals([row])
    row["seconds_per_step"] = round(
        sum(entry["seconds_per_step"] for entry in logs) / max(len(logs), 1), 4
    )
    report = {
        "row": row,
        "objects": logs,
        "settings": {**cfg.to_dict(), "seeds": [int(s) for s in seeds]},
        "seconds": round(time.time() - t0, 1),
        "versions": versions(),
    }
    if command is not None:
        report["command"] = list(command)
    write_json_atomic(folder / "results.json", report, allow_nan=True)
    reference = reference_ring(cfg.prior, cfg.identity)
    save_rings(folder / "rings.png", {spec: objects}, max_seeds=len(objects), reference=reference)
    return report
