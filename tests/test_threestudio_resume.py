"""Resuming a run (launch.py's ``resume=``) with our guidances inside real threestudio systems on CPU.

A run is trained for ``N_STEPS`` steps with a checkpoint at ``CKPT_STEP`` (Lightning's
``ModelCheckpoint``, as launch.py configures it); a second system is then built with
``resumed=True`` and trained with ``trainer.fit(..., ckpt_path=)``, as launch.py does. Step by step
after the checkpoint the two runs are compared: the guidance's state when it is called (generator
state, weight scale, timestep window), the negatives the ``one`` sampler kept, every UNet call
(inputs and outputs), the guidance outputs, and (VSD) the LoRA weights and the optimizer state.

threestudio itself does not restore its own randomness on resume: the camera batches and the
renderer's draws come from the global ``torch`` / ``random`` / ``numpy`` RNGs, which launch.py seeds
once per process (``pl.seed_everything``) and Lightning does not save in a checkpoint, so a resumed
run draws the first steps' cameras again. ``test_threestudio_alone_does_not_restore_its_rngs``
measures that with threestudio's own ``stable-diffusion-guidance``; the full comparison therefore
puts the global RNGs and the camera batch of each step in a state derived from the step number
(threestudio's own camera sampler, re-drawn under a per-step seed), so that any remaining difference
could only come from our guidance.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest
from threestudio_support.fixtures import require_threestudio

threestudio = require_threestudio()  # module-level skip with the reason when unavailable

import numpy as np  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402

from threestudio_perpneg.threestudio_cpu.system import (  # noqa: E402
    fit_steps,
    load_custom_extension,
    make_dreamfusion_system,
)

pytestmark = [pytest.mark.threestudio, pytest.mark.usefixtures("one_cpu_thread")]

REPO = Path(__file__).resolve().parents[1]
SHIM = REPO / "custom" / "threestudio-perpneg"
load_custom_extension(SHIM)

import threestudio_perpneg.engines.pixel as pixel_engine  # noqa: E402
import threestudio_perpneg.engines.sd as sd_engine  # noqa: E402
import threestudio_perpneg.engines.sdi as sdi_engine  # noqa: E402
import threestudio_perpneg.engines.vsd as vsd_engine  # noqa: E402
from threestudio_perpneg.adapters import (  # noqa: E402
    PerpNegDeepFloydGuidance,
    PerpNegStableDiffusionGuidance,
    PerpNegStableDiffusionSDIGuidance,
    PerpNegStableDiffusionVSDGuidance,
)

N_STEPS, CKPT_STEP = 4, 2
SMALL = ["data.width=32", "data.height=32", "system.renderer.num_samples_per_ray=16"]
NEGATIVES = [
    "system.prompt_processor.perp_neg_prompts=[blurry,ugly]",
    "system.prompt_processor.perp_neg_prompt_weights=[-0.5,-1.0]",
]
# Every step-dependent control moves between steps: λ, the timestep window (or SDI's annealed t).
CONTROLS = [
    "system.guidance.seed=5",
    "system.guidance.perp_neg_sampling=one",
    "system.guidance.perp_neg_eval_prob=0.5",
    f"system.guidance.perp_neg_weight_scale=[0,1.0,0.25,{N_STEPS}]",
    f"system.guidance.min_step_percent=[0,0.02,0.4,{N_STEPS}]",
]
CASES: Dict[str, Dict[str, Any]] = {
    "sd": {
        "config": "perpneg-dreamfusion.yaml",
        "model": "sd",
        "cls": PerpNegStableDiffusionGuidance,
        "overrides": CONTROLS,
    },
    "if": {
        "config": "perpneg-dreamfusion-if.yaml",
        "model": "if",
        "cls": PerpNegDeepFloydGuidance,
        "overrides": CONTROLS,
    },
    "vsd": {
        "config": "perpneg-prolificdreamer.yaml",
        "model": "sd",
        "cls": PerpNegStableDiffusionVSDGuidance,
        "overrides": CONTROLS,
    },
    "sdi": {
        "config": "perpneg-sdi.yaml",
        "model": "sd",
        "cls": PerpNegStableDiffusionSDIGuidance,
        # SDI anneals t over trainer_max_steps itself; min_step_percent is its floor.
        "overrides": [
            *CONTROLS[:4],
            "system.guidance.trainer_max_steps=6",
            "system.guidance.inversion_n_steps=2",
        ],
    },
}


@pytest.fixture(scope="module")
def tiny_if_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from threestudio_perpneg.tiny.builders import build_tiny_deepfloyd_if

    return build_tiny_deepfloyd_if(tmp_path_factory.mktemp("tiny-if") / "model", seed=0)


# ------------------------------------------------------------------------------ recording
def _tensors(obj: Any) -> List[torch.Tensor]:
    """Every tensor in a (nested) call argument or output, detached copies, in order."""
    if isinstance(obj, torch.Tensor):
        return [obj.detach().clone()]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


class StepRecorder(pl.Callback):
    """Per training step: the camera batch, the guidance's state and outputs, every UNet call, the
    negatives kept by the controls, and (VSD) the module's weights and the optimizer state.

    ``control_threestudio``: before each step, threestudio's randomness (the global RNGs and the
    camera batch, re-drawn by its own data set's ``collate``) is put in a state derived from the
    step number, identically in an uninterrupted and a resumed run.
    """

    def __init__(self, control_threestudio: bool) -> None:
        self.control = control_threestudio
        self.steps: Dict[int, Dict[str, Any]] = {}
        self.current: Dict[str, Any] = {}
        self._hooked: Optional[torch.nn.Module] = None

    # called by the spies below
    def on_guidance_call(self, guidance: Any) -> None:
        gen = guidance.generator
        self.current.setdefault("enter", []).append(
            {
                "generator": None if gen is None else gen.get_state().clone(),
                "weight_scale": guidance.perp_neg_controls.weight_scale,
                "t_range": guidance.perp_neg_controls.t_range,
                "sampling": guidance.perp_neg_controls.sampling,
                "min_step": guidance.min_step,
                "max_step": guidance.max_step,
                "grad_clip_val": guidance.grad_clip_val,
            }
        )

    def on_guidance_out(self, out: Dict[str, Any]) -> None:
        self.current.setdefault("out", []).append(
            {k: (_tensors(v) if isinstance(v, torch.Tensor) else v) for k, v in out.items()}
        )

    def on_controls(self, cond: Any) -> None:
        self.current.setdefault("negatives", []).append(
            _tensors([cond.negative, cond.negative_index, cond.negative_weight])
        )

    def _unet_hook(self, module: Any, args: Any, kwargs: Any, output: Any) -> None:
        self.current.setdefault("unet", []).append(_tensors([args, kwargs, output]))

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.control:
            _seed_everything(1000 + step)
            fresh = trainer.train_dataloader.dataset.collate(None)
            batch.clear()
            batch.update(fresh)
            _seed_everything(2000 + step)
        unet = getattr(pl_module.guidance, "engine", pl_module.guidance).unet
        if self._hooked is not unet:
            unet.register_forward_hook(self._unet_hook, with_kwargs=True)
            self._hooked = unet
        self.current = {
            "camera": _tensors([batch["elevation"], batch["azimuth"], batch["camera_distances"]])
        }

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step - 1
        self.current["loss"] = _tensors(outputs["loss"] if isinstance(outputs, dict) else outputs)
        self.current["geometry"] = _tensors(dict(pl_module.geometry.state_dict()))
        if isinstance(pl_module.guidance, torch.nn.Module):  # VSD: LoRA + camera embedding
            self.current["guidance_weights"] = _tensors(dict(pl_module.guidance.state_dict()))
            self.current["optimizer"] = _tensors(trainer.optimizers[0].state_dict()["state"])
        self.steps[step] = self.current


@pytest.fixture
def spies(monkeypatch: pytest.MonkeyPatch) -> List[StepRecorder]:
    """Observers (the real code runs) on the guidance classes and on the engines' controls."""
    active: List[StepRecorder] = []

    def wrap_call(cls: type, name: str) -> None:
        original = getattr(cls, name)

        def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
            for rec in active:
                rec.on_guidance_call(self)
            out = original(self, *args, **kwargs)
            for rec in active:
                rec.on_guidance_out(out)
            return out

        monkeypatch.setattr(cls, name, spy)

    for cls in (
        PerpNegStableDiffusionGuidance,
        PerpNegDeepFloydGuidance,
        PerpNegStableDiffusionSDIGuidance,
    ):
        wrap_call(cls, "__call__")
    wrap_call(PerpNegStableDiffusionVSDGuidance, "forward")

    for module in (sd_engine, pixel_engine, sdi_engine, vsd_engine):
        original: Callable[..., Any] = module.apply_controls

        def controls_spy(*args: Any, _original: Callable[..., Any] = original, **kwargs: Any):
            cond = _original(*args, **kwargs)
            for rec in active:
                rec.on_controls(cond)
            return cond

        monkeypatch.setattr(module, "apply_controls", controls_spy)
    return active


def _run(
    config: Path,
    model: Path,
    workdir: Path,
    overrides: List[str],
    recorder: StepRecorder,
    *,
    resume_from: Optional[Path] = None,
) -> Any:
    """Builds the system and fits it to N_STEPS (from ``resume_from`` when given), recording."""
    system, dm = make_dreamfusion_system(
        config,
        model,
        workdir,
        overrides,
        extensions=[SHIM],
        resumed=resume_from is not None,
    )
    callbacks: List[Any] = [recorder]
    if resume_from is None:  # the checkpoint launch.py's `checkpoint.every_n_train_steps` writes
        callbacks.append(
            ModelCheckpoint(
                dirpath=str(workdir / "ckpts"),
                every_n_train_steps=CKPT_STEP,
                save_top_k=-1,
                filename="{step}",
            )
        )
    fit_steps(
        system,
        dm,
        N_STEPS,
        ckpt_path=resume_from,
        enable_checkpointing=resume_from is None,
        callbacks=callbacks,
    )
    return system


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def _differences(full: Dict[str, Any], resumed: Dict[str, Any]) -> List[str]:
    return [
        key
        for key in sorted(set(full) | set(resumed))
        if not _same(full.get(key), resumed.get(key))
    ]


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("case", sorted(CASES))
def test_resumed_run_matches_the_uninterrupted_run_step_by_step(
    case: str, tiny_sd_path: Path, tiny_if_path: Path, tmp_path: Path, spies: List[StepRecorder]
) -> None:
    spec = CASES[case]
    config = REPO / "configs" / spec["config"]
    model = tiny_if_path if spec["model"] == "if" else tiny_sd_path
    overrides = [*SMALL, *NEGATIVES, *spec["overrides"]]
    if case == "vsd":
        overrides.append(f"system.guidance.pretrained_model_name_or_path_lora={model}")

    full = StepRecorder(control_threestudio=True)
    spies[:] = [full]
    system = _run(config, model, tmp_path / "full", overrides, full)
    assert isinstance(system.guidance, spec["cls"])
    ckpt = tmp_path / "full" / "ckpts" / f"step={CKPT_STEP}.ckpt"
    assert ckpt.is_file(), sorted((tmp_path / "full" / "ckpts").iterdir())
    assert sorted(full.steps) == list(range(N_STEPS))

    resumed = StepRecorder(control_threestudio=True)
    spies[:] = [resumed]
    _run(config, model, tmp_path / "resumed", overrides, resumed, resume_from=ckpt)
    assert sorted(resumed.steps) == list(range(CKPT_STEP, N_STEPS))

    for step in range(CKPT_STEP, N_STEPS):
        diff = _differences(full.steps[step], resumed.steps[step])
        assert not diff, f"step {step}: the resumed run differs in {diff}"

    # The comparison can fail: the state and draws move from step to step (a generator seeded once
    # at construction would replay step 0's draws after the resume), and `one` keeps one negative
    # per sample out of several.
    first, later = full.steps[0], full.steps[CKPT_STEP]
    enter0, enter_k = first["enter"][0], later["enter"][0]
    assert not torch.equal(enter0["generator"], enter_k["generator"])
    assert enter0["weight_scale"] == 1.0 and enter_k["weight_scale"] == 0.625  # [0, 1, 0.25, 4]
    if case != "sdi":  # min_step_percent [0, 0.02, 0.4, 4]: 0.02 at step 0, 0.21 at step 2
        assert (enter0["min_step"], enter_k["min_step"]) == (20, 210)
    if case == "sdi":
        assert first["enter"][0]["max_step"] > later["enter"][0]["max_step"]
    assert not _same(first["unet"], later["unet"])
    batch = len(later["camera"][0])
    for step in range(N_STEPS):
        kept = full.steps[step]["negatives"]
        assert kept and all(len(neg_index) <= batch for _, neg_index, _ in kept), step
    if case == "vsd":
        assert not _same(first["guidance_weights"], later["guidance_weights"])  # the LoRA trains


@pytest.mark.parametrize(
    "guidance,seed",
    [
        ("stable-diffusion-guidance", None),
        ("perpneg-stable-diffusion-guidance", None),
        ("perpneg-stable-diffusion-guidance", 5),
    ],
)
def test_threestudio_alone_does_not_restore_its_rngs(
    guidance: str, seed: Optional[int], tiny_sd_path: Path, tmp_path: Path
) -> None:
    """Without any control of threestudio's randomness: its camera batches are not resumed (the
    resumed run draws step 0's cameras again at the checkpoint's step), nor are the timesteps of
    a guidance drawing from the global RNG (threestudio's, or ours without ``seed``); our guidance
    with ``seed`` draws the uninterrupted run's timesteps."""
    config = Path(threestudio.__file__).resolve().parents[1] / "configs" / "dreamfusion-sd.yaml"
    overrides = [*SMALL, f"system.guidance_type={guidance}"]
    if seed is not None:
        overrides.append(f"system.guidance.seed={seed}")

    full = StepRecorder(control_threestudio=False)
    _run(config, tiny_sd_path, tmp_path / "full", overrides, full)
    resumed = StepRecorder(control_threestudio=False)
    ckpt = tmp_path / "full" / "ckpts" / f"step={CKPT_STEP}.ckpt"
    _run(config, tiny_sd_path, tmp_path / "resumed", overrides, resumed, resume_from=ckpt)

    def timesteps(rec: StepRecorder, step: int) -> torch.Tensor:
        return rec.steps[step]["unet"][0][1]  # the first UNet call's second argument: t

    k = CKPT_STEP
    # threestudio: the checkpoint's step gets the cameras of step 0, not those of step k.
    assert _same(resumed.steps[k]["camera"], full.steps[0]["camera"])
    assert not _same(resumed.steps[k]["camera"], full.steps[k]["camera"])
    if seed is not None:
        for step in range(k, N_STEPS):
            assert torch.equal(timesteps(resumed, step), timesteps(full, step)), step
    else:
        assert not torch.equal(timesteps(resumed, k), timesteps(full, k))


def test_update_step_puts_the_generator_in_the_state_of_its_step(
    tiny_sd_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The generator's state depends on (seed, rank, global step) only, not on earlier draws."""
    cfg = {"pretrained_model_name_or_path": str(tiny_sd_path), "half_precision_weights": False}
    cls = threestudio.find("perpneg-stable-diffusion-guidance")
    monkeypatch.setenv("RANK", "0")
    guidance = cls({**cfg, "seed": 5})

    def draw(g: Any) -> torch.Tensor:
        return torch.rand(8, generator=g.generator)

    guidance.update_step(0, 7)
    at7 = draw(guidance)
    draw(guidance)
    guidance.update_step(0, 3)
    at3 = draw(guidance)
    guidance.update_step(1, 7, on_load_weights=True)  # threestudio's `weights=` path: the same
    assert torch.equal(draw(guidance), at7)
    assert not torch.equal(at3, at7)
    assert torch.equal(draw(cls({**cfg, "seed": 5})), draw(cls({**cfg, "seed": 5})))
    assert not torch.equal(draw(cls({**cfg, "seed": 6})), draw(cls({**cfg, "seed": 5})))

    monkeypatch.setenv("RANK", "1")  # DDP ranks keep distinct streams
    other_rank = cls({**cfg, "seed": 5})
    other_rank.update_step(0, 7)
    assert not torch.equal(draw(other_rank), at7)

    unseeded = cls(cfg)  # no seed: no generator, and update_step leaves the global RNG alone
    assert unseeded.generator is None
    state = torch.get_rng_state()
    unseeded.update_step(0, 7)
    assert torch.equal(torch.get_rng_state(), state)


def test_vsd_in_dreamfusion_system_cannot_be_resumed(tiny_sd_path: Path, tmp_path: Path) -> None:
    """threestudio's ``dreamfusion-system`` builds its guidance in ``on_fit_start``, after Lightning
    loads a checkpoint: a module guidance (VSD's LoRA) is saved in the checkpoint but the resumed
    system has no such submodule yet, and the strict load fails. The LoRA is not in that system's
    optimizer either. VSD belongs in ``prolificdreamer-system`` (resumed fine, above)."""
    overrides = [
        *SMALL,
        "system.guidance_type=perpneg-stable-diffusion-vsd-guidance",
        f"system.guidance.pretrained_model_name_or_path_lora={tiny_sd_path}",
        "system.guidance.guidance_scale_convention=cfg",
        "system.loss.lambda_vsd=1.0",
        "system.loss.lambda_lora=1.0",
    ]
    config = REPO / "configs" / "perpneg-dreamfusion.yaml"
    recorder = StepRecorder(control_threestudio=False)
    system = _run(config, tiny_sd_path, tmp_path / "full", overrides, recorder)
    in_optimizer = {id(p) for g in system.trainer.optimizers[0].param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for p in system.guidance.parameters())
    ckpt = tmp_path / "full" / "ckpts" / f"step={CKPT_STEP}.ckpt"
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"guidance\.lora"):
        _run(config, tiny_sd_path, tmp_path / "resumed", overrides, recorder, resume_from=ckpt)
