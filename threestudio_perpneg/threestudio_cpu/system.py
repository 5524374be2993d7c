"""Build and train a real threestudio lift-3D system on CPU.

launch.py cannot run on CPU (it hard-codes `accelerator="gpu"`), so these helpers do its job:
load a threestudio YAML through `threestudio.utils.config.load_config`, make it CPU-friendly, build the
data module and the system with `threestudio.find`, and fit a few steps with a CPU `pl.Trainer`.

The prompt processor writes `.threestudio_cache/` relative to the working directory, so both helpers run
inside `workdir` (the `tmpdir` given to `make_dreamfusion_system`) and restore the caller's cwd afterwards.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import sys
import types
from collections.abc import Iterator, Sequence
from typing import Any

from .nerfacc_cpu import ensure_installed as ensure_nerfacc_cpu
from .stubs import import_threestudio, patch_get_device

__all__ = [
    "CPU_ENCODING",
    "CPU_MLP",
    "fit_steps",
    "load_custom_extension",
    "make_dreamfusion_system",
    "working_directory",
]

# CPU-friendly replacements for tcnn hash grids / spherical harmonics / fully fused MLPs.
CPU_ENCODING: dict[str, Any] = {
    "otype": "ProgressiveBandFrequency",
    "n_frequencies": 4,
    "n_masking_step": 0,
}
CPU_MLP: dict[str, Any] = {
    "otype": "VanillaMLP",
    "activation": "ReLU",
    "output_activation": "none",
    "n_neurons": 32,
    "n_hidden_layers": 1,
}
CPU_MLP_TYPES = ("VanillaMLP", "SphereInitVanillaMLP")
#: Encodings threestudio implements in torch (kept as configured).
CPU_ENCODINGS = ("ProgressiveBandFrequency",)

# Harness defaults, applied before the caller's overrides (which win). A `system.<part>.<field>` item is
# dropped when the configured class of that part has no such config field.
HARNESS_DEFAULTS: tuple[str, ...] = (
    "data.batch_size=1",
    "data.width=64",
    "data.height=64",
    "system.renderer.num_samples_per_ray=32",
)
DEFAULT_PROMPT = (
    "a hamburger"  # used when the YAML leaves `system.prompt_processor.prompt` missing (???)
)
# The proposal / importance estimators give NaN with the default near/far planes (0, 1e10).
ESTIMATOR_PLANES: tuple[str, ...] = (
    "system.renderer.near_plane=0.1",
    "system.renderer.far_plane=4.0",
)
_PARTS = ("geometry", "material", "background", "renderer", "guidance", "prompt_processor")


@contextlib.contextmanager
def working_directory(path: str | os.PathLike[str]) -> Iterator[None]:
    """chdir into `path` for the duration of the block."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def load_custom_extension(path: str | os.PathLike[str]) -> types.ModuleType:
    """
    Loads a threestudio custom extension (a folder with `__init__.py`, or a `.py` file) the way launch.py's
    `load_custom_module` does: module name = the folder / file stem. Idempotent (registering twice raises in
    threestudio). Re-applies the CPU `get_device` patch to whatever the extension imported.
    """
    path = pathlib.Path(path).absolute()
    name = path.stem if path.is_file() else path.name
    if name in sys.modules:
        return sys.modules[name]
    location = path if path.is_file() else path / "__init__.py"
    spec = importlib.util.spec_from_file_location(name, location)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load threestudio extension from {location}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    patch_get_device()
    return module


def _config_fields(threestudio: types.ModuleType, type_name: str | None) -> set[str]:
    if not type_name:
        return set()
    try:
        cls = threestudio.find(type_name)
    except KeyError:
        return set()
    return set(getattr(cls.Config, "__dataclass_fields__", {}))


def _cpu_friendly(
    threestudio: types.ModuleType,
    cfg: Any,
    encoding: dict[str, Any] | None = None,
    mlp_config: dict[str, Any] | None = None,
) -> None:
    """Swaps tcnn encodings / networks in geometry, background, material and proposal network for
    CPU ones (``encoding`` / ``mlp_config``, default :data:`CPU_ENCODING` / :data:`CPU_MLP`).
    Encodings that already run on CPU (``ProgressiveBandFrequency``) and torch MLPs are kept."""
    from omegaconf import OmegaConf

    encoding = dict(encoding or CPU_ENCODING)
    mlp_config = dict(mlp_config or CPU_MLP)
    system = cfg.system
    for part in ("geometry", "background", "material"):
        fields = _config_fields(threestudio, OmegaConf.select(cfg, f"system.{part}_type"))
        replace: dict[str, Any] = {}
        for key in ("pos_encoding_config", "dir_encoding_config"):
            current = OmegaConf.select(cfg, f"system.{part}.{key}")
            if key in fields and (current is None or current.get("otype") not in CPU_ENCODINGS):
                replace[key] = dict(encoding)
        mlp = OmegaConf.select(cfg, f"system.{part}.mlp_network_config")
        if "mlp_network_config" in fields and (
            mlp is None or mlp.get("otype") not in CPU_MLP_TYPES
        ):
            replace["mlp_network_config"] = dict(mlp_config)
        if replace:
            if system.get(part) is None:
                system[part] = {}
            for key, value in replace.items():
                system[part][key] = value
    renderer = system.get("renderer")
    if renderer is not None and renderer.get("estimator") == "proposal":
        renderer["proposal_network_config"] = {
            "n_input_dims": 3,
            "n_output_dims": 1,
            "encoding_config": dict(encoding),
            "network_config": dict(mlp_config),
        }
        if renderer.get("prop_optimizer_config") is None:
            renderer["prop_optimizer_config"] = {
                "name": "Adam",
                "args": {"lr": 1.0e-2, "eps": 1.0e-15},
            }


def make_dreamfusion_system(
    config_path: str | os.PathLike[str],
    model_path: str | os.PathLike[str],
    tmpdir: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    *,
    extensions: Sequence[str | os.PathLike[str]] = (),
    threestudio_root: str | os.PathLike[str] | None = None,
    seed: int | None = None,
    harness_defaults: bool = True,
    cpu_encoding: dict[str, Any] | None = None,
    cpu_mlp: dict[str, Any] | None = None,
    resumed: bool = False,
    torch_grid: bool = False,
) -> tuple[Any, Any]:
    """
    Builds `(system, datamodule)` from a threestudio YAML, ready for `fit_steps` on CPU.

    Args:
        config_path: a threestudio experiment YAML (e.g. `configs/dreamfusion-sd.yaml`).
        model_path: diffusers folder used as `pretrained_model_name_or_path` of guidance and prompt processor.
        tmpdir: working directory for outputs (`exp_root_dir`) and `.threestudio_cache/`.
        overrides: OmegaConf dotlist overrides (`"data.batch_size=2"`), applied last.
        extensions: custom extension folders / files to load first (e.g. `custom/threestudio-perpneg`).
        threestudio_root: checkout root; None reads `THREESTUDIO_ROOT`.
        seed: passed to `pl.seed_everything`; None uses the config's `seed`.
        harness_defaults: apply `HARNESS_DEFAULTS` (64 px, batch 1, 32 samples per ray); false keeps
            the YAML's sizes (the testbed runner's configs are already CPU-sized).
        cpu_encoding / cpu_mlp: what replaces a tcnn encoding / network (default `CPU_ENCODING` /
            `CPU_MLP`).
        torch_grid: route threestudio's grid encodings to the torch grid of
            `grid_encoding.TorchGridEncoding` (`cpu_encoding` may then be a grid config).
        resumed: passed to the system as launch.py does for `resume=` (then `fit_steps(..., ckpt_path=)`).

    The harness forces fp32 guidance weights, in-process prompt embedding (`spawn: false`),
    `exp_root_dir` under `tmpdir`, and CPU encodings (`CPU_ENCODING` / `CPU_MLP`); it defaults to 64x64
    renders, batch size 1, 32 samples per ray, the prompt `DEFAULT_PROMPT` where the YAML has none, and
    near/far planes 0.1/4.0 for the proposal and importance estimators (`overrides` win over defaults).
    It also installs the nerfacc CPU double for the rest of the process (`nerfacc_cpu.ensure_installed`).
    """
    from omegaconf import OmegaConf

    threestudio = import_threestudio(threestudio_root)
    for extension in extensions:
        load_custom_extension(extension)
    ensure_nerfacc_cpu()
    if torch_grid:
        from .grid_encoding import install as install_torch_grid

        install_torch_grid()

    import pytorch_lightning as pl
    from threestudio.utils.config import load_config

    workdir = pathlib.Path(tmpdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    model = str(pathlib.Path(model_path).absolute())
    raw = OmegaConf.load(str(config_path))
    preview = OmegaConf.merge(raw, OmegaConf.from_dotlist(list(overrides)))
    fields = {
        part: _config_fields(threestudio, OmegaConf.select(preview, f"system.{part}_type"))
        for part in _PARTS
    }

    def supported(item: str) -> bool:
        key = item.split("=", 1)[0].split(".")
        return not (len(key) == 3 and key[0] == "system" and key[1] in fields) or (
            key[2] in fields[key[1]]
        )

    def unset(key: str) -> bool:
        user_keys = {item.split("=", 1)[0] for item in overrides}
        return key not in user_keys and OmegaConf.select(raw, key, throw_on_missing=False) is None

    harness = [
        *(HARNESS_DEFAULTS if harness_defaults else ()),
        f"system.guidance.pretrained_model_name_or_path={model}",
        f"system.prompt_processor.pretrained_model_name_or_path={model}",
        "system.guidance.half_precision_weights=false",
        "system.prompt_processor.spawn=false",
        f"exp_root_dir={workdir / 'outputs'}",
        "use_timestamp=false",
    ]
    if unset("system.prompt_processor.prompt"):
        harness.append(f"system.prompt_processor.prompt={DEFAULT_PROMPT}")
    if OmegaConf.select(preview, "system.renderer.estimator") in ("proposal", "importance"):
        harness += [item for item in ESTIMATOR_PLANES if unset(item.split("=", 1)[0])]
    cli_args = [item for item in harness if supported(item)] + list(overrides)

    # Whole sub-configs (encodings, networks) are replaced in a copy of the YAML; values go via cli_args.
    preview = OmegaConf.merge(raw, OmegaConf.from_dotlist(cli_args))
    _cpu_friendly(threestudio, preview, cpu_encoding, cpu_mlp)
    for part in ("geometry", "background", "material", "renderer"):
        if OmegaConf.select(preview, f"system.{part}") is not None:
            raw.system[part] = preview.system[part]
    cpu_yaml = workdir / f"{pathlib.Path(config_path).stem}.cpu.yaml"
    OmegaConf.save(raw, cpu_yaml, resolve=False)

    with working_directory(workdir):
        cfg = load_config(str(cpu_yaml), cli_args=cli_args, n_gpus=1)
        pl.seed_everything(cfg.seed if seed is None else seed, workers=True)
        datamodule = threestudio.find(cfg.data_type)(cfg.data)
        system = threestudio.find(cfg.system_type)(cfg.system, resumed=resumed)
    system.set_save_dir(os.path.join(cfg.trial_dir, "save"))
    system._harness_workdir = str(workdir)
    system._harness_cfg = cfg
    return system, datamodule


def fit_steps(
    system: Any,
    datamodule: Any,
    n_steps: int,
    *,
    ckpt_path: str | os.PathLike[str] | None = None,
    **trainer_kwargs: Any,
) -> list[float]:
    """
    Trains `system` until global step `n_steps` on CPU and returns the per-step training losses.

    `ckpt_path` resumes from a Lightning checkpoint as launch.py's `resume=` does
    (`trainer.fit(..., ckpt_path=)`; build the system with `resumed=True`): training continues from
    the checkpoint's global step up to `n_steps`.

    Runs inside the system's working directory (see `make_dreamfusion_system`). `trainer_kwargs` override
    the CPU defaults of `pl.Trainer` (`callbacks` are added to the loss recorder); the trainer stays reachable as `system.trainer`.
    """
    import pytorch_lightning as pl

    losses: list[float] = []

    class _RecordLoss(pl.Callback):
        def on_train_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            losses.append(float(loss.detach()))

    workdir = getattr(system, "_harness_workdir", os.getcwd())
    kwargs: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": n_steps,
        "inference_mode": False,
        "precision": 32,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "log_every_n_steps": 1,
        "default_root_dir": workdir,
        "callbacks": [_RecordLoss()],
    }
    extra_callbacks = list(trainer_kwargs.pop("callbacks", None) or [])
    kwargs.update(trainer_kwargs)
    kwargs["callbacks"] = [*kwargs["callbacks"], *extra_callbacks]
    trainer = pl.Trainer(**kwargs)
    with working_directory(workdir):
        system.train()  # pytorch-lightning >= 2.2 no longer does this before fit; the estimators need it
        trainer.fit(
            system, datamodule=datamodule, ckpt_path=None if ckpt_path is None else str(ckpt_path)
        )
    return losses
