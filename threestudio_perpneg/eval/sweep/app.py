"""Perp-Neg paper-reproduction sweep: a Hydra app (``python -m threestudio_perpneg.eval.sweep``).

Jobs are prompts x seeds x methods (``vanilla``, ``perpneg``) x weight-scheme settings (perpneg runs
only). A 3D job runs threestudio's ``launch.py`` in a given checkout (subprocess, cwd = the checkout)
with ``exp_root_dir=<out_dir> name=runs tag=<job id> use_timestamp=false``, so its trial folder
``<out_dir>/runs/<job id>`` is known in advance, then the Janus evaluator
(:func:`threestudio_perpneg.eval.janus.main`) on that trial. A 2D job runs the paper's 2D protocol
(:func:`threestudio_perpneg.eval.eval2d.main`). Both evaluators are imported only when a job needs
them, so planning and ``dry_run=true`` work without them.

Layout of ``out_dir``::

    jobs.json / jobs-<k>.json   the plan of the last invocation (multirun: of Hydra job k)
    runs/<job id>/              threestudio trial folder (3D) or eval2d output (2D)
    eval/<job id>/              eval3d output of a 3D job
    logs/<job id>.log           launch.py's stdout + stderr
    done/<job id>.json          done-marker: job, fingerprint, run and evaluation results
    failed/<job id>.json        last failure of a job that has no done-marker
    report/report.md            comparison report (+ report.json, strips/, grids/)

Resumability: a done-marker is written atomically (temporary file, then ``os.replace``) after the
run (and its evaluation) finished; a job with a done-marker is skipped. A marker whose run finished
but whose evaluation failed or was disabled gets only the evaluation re-run when evaluation is on.
A marker written for different settings (its fingerprint differs: e.g. another ``max_steps``) is an
error: use another ``sweep_name`` / ``out_dir``.

Hydra is imported lazily (only :func:`main` and the callback module need it): the rest of this
module takes any mapping (an OmegaConf ``DictConfig`` or a plain ``dict``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .report import latest_test_dir, read_marker, ring_frames, write_json_atomic, write_report

__all__ = [
    "PROG",
    "METHODS",
    "KINDS",
    "STAGES",
    "CONF_DIR",
    "SweepError",
    "PromptItem",
    "Settings",
    "Job",
    "parse_seeds",
    "object_name",
    "load_settings",
    "plan_jobs",
    "gpu_for_slot",
    "run_sweep",
    "shard_of",
    "summarize_eval",
    "write_report",
    "main",
]

log = logging.getLogger(__name__)

PROG = "perpneg-sweep"
METHODS: Tuple[str, ...] = ("vanilla", "perpneg")
KINDS: Tuple[str, ...] = ("3d", "2d")
STAGES: Tuple[str, ...] = ("all", "report")
BUILTIN_SCHEMES: Tuple[str, ...] = ("threestudio", "authors")
#: The Hydra config tree shipped with the package (package data).
CONF_DIR = Path(__file__).resolve().parent / "conf"
MARKER_VERSION = 1
MAX_SEED = 2**32 - 1  # pytorch-lightning's seed_everything range
MAX_SEEDS = 10_000
_SLUG_LEN = 48
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_OBJECT_PREFIX_RE = re.compile(
    r"^(?:an?\s+)?(?:zoomed[\s-]+out\s+)?(?:DSLR\s+|high[\s-]+quality\s+)?"
    r"(?:photo|picture|image|render|rendering)\s+of\s+",
    re.IGNORECASE,
)

#: ``runner(command, cwd=..., env=..., stdout=..., stderr=...)`` -> object with ``returncode``
#: (``subprocess.run``'s signature; tests inject a fake).
Runner = Callable[..., Any]


class SweepError(ValueError):
    """A configuration or input error, with a message that names the offending key."""


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class PromptItem:
    prompt: str
    object: str
    overrides: Tuple[str, ...] = ()
    perpneg_overrides: Tuple[str, ...] = ()
    slug: str = ""


@dataclass(frozen=True)
class SchemeSetting:
    label: str
    scheme: str
    overrides: Tuple[str, ...] = ()


@dataclass
class Settings:
    sweep_name: str
    out_dir: Path
    threestudio_root: Optional[Path]
    prompts: List[PromptItem]
    prompt_list: str
    seeds: List[int]
    methods: List[str]
    schemes: List[SchemeSetting]
    gpus: Optional[int]
    shard: int
    num_shards: int
    stage: str
    dry_run: bool
    force_eval: bool
    fail_fast: bool
    job: Dict[str, Any]
    report: Dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.job["kind"])


def _plain(cfg: Any) -> Dict[str, Any]:
    """The sweep keys of ``cfg`` (DictConfig or mapping) as plain resolved Python objects."""
    if isinstance(cfg, Mapping) and not hasattr(cfg, "_get_node"):
        return {k: v for k, v in cfg.items() if k != "hydra"}
    from omegaconf import OmegaConf

    out: Dict[str, Any] = {}
    for key in cfg:
        if key == "hydra":
            continue
        node = cfg[key]
        out[str(key)] = (
            OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        )
    return out


def _check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SweepError(f"{key}: expected true or false, got {value!r}")
    return value


def _check_int(key: str, value: Any, lo: int, hi: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SweepError(f"{key}: expected an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise SweepError(f"{key}: expected an integer {bound}, got {value}")
    return value


def _check_name(key: str, value: Any) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise SweepError(
            f"{key}: expected a name of letters, digits, '_', '.', '-' (starting with a letter or "
            f"digit), got {value!r}"
        )
    return value


def _str_list(key: str, value: Any) -> Tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise SweepError(f"{key}: expected a list of strings, got {value!r}")
    for v in value:
        if "=" not in v:
            raise SweepError(f"{key}: threestudio override {v!r} is not of the form key=value")
    return tuple(value)


def parse_seeds(value: Any, key: str = "seeds") -> List[int]:
    """Seeds from a list of integers, one integer, or a string of ranges (``"0-3,7"``).

    Each seed is in ``[0, 2**32)``; duplicates, empty lists and reversed ranges are errors."""
    seeds: List[int] = []
    if isinstance(value, bool) or value is None:
        raise SweepError(
            f"{key}: expected integers, a list or a range string like '0-3', got {value!r}"
        )
    if isinstance(value, int):
        seeds = [value]
    elif isinstance(value, str):
        text = value.strip()
        if not text:
            raise SweepError(f"{key}: empty seed string")
        for part in text.split(","):
            part = part.strip()
            m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
            if not m:
                raise SweepError(
                    f"{key}: bad seed or range {part!r} in {value!r} (expected e.g. '0-3,7')"
                )
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if hi < lo:
                raise SweepError(f"{key}: reversed range {part!r} in {value!r}")
            if hi - lo + 1 + len(seeds) > MAX_SEEDS:
                raise SweepError(f"{key}: more than {MAX_SEEDS} seeds in {value!r}")
            seeds.extend(range(lo, hi + 1))
    elif isinstance(value, (list, tuple)):
        for v in value:
            if isinstance(v, bool) or not isinstance(v, int):
                raise SweepError(f"{key}: expected integers, got {v!r} in {list(value)!r}")
            seeds.append(v)
    else:
        raise SweepError(f"{key}: expected integers, a list or a range string, got {value!r}")
    if not seeds:
        raise SweepError(f"{key}: no seeds given")
    seen = set()
    for s in seeds:
        if s < 0 or s > MAX_SEED:
            raise SweepError(f"{key}: seed {s} outside [0, {MAX_SEED}]")
        if s in seen:
            raise SweepError(f"{key}: seed {s} given twice")
        seen.add(s)
    return seeds


def object_name(prompt: str) -> str:
    """The object the view classifier is asked about: ``prompt`` without a leading
    ``a (zoomed out) DSLR photo of`` (``"a DSLR photo of a corgi"`` -> ``"a corgi"``)."""
    stripped = _OBJECT_PREFIX_RE.sub("", prompt.strip(), count=1).strip()
    return stripped or prompt.strip()


def _slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return s[:_SLUG_LEN].rstrip("_") or "prompt"


def _prompt_item(entry: Any, where: str) -> PromptItem:
    prompt: Any
    obj: Any
    if isinstance(entry, str):
        prompt, obj, ov, pov = entry, None, None, None
    elif isinstance(entry, Mapping):
        unknown = sorted(set(entry) - {"prompt", "object", "overrides", "perpneg_overrides"})
        if unknown:
            raise SweepError(
                f"{where}: unknown key(s) {unknown} (expected prompt, object, overrides, "
                "perpneg_overrides)"
            )
        prompt, obj = entry.get("prompt"), entry.get("object")
        ov, pov = entry.get("overrides"), entry.get("perpneg_overrides")
    else:
        raise SweepError(f"{where}: expected a prompt string or a mapping, got {entry!r}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise SweepError(f"{where}: expected a non-empty prompt, got {prompt!r}")
    prompt = " ".join(prompt.split())
    if "${" in prompt:
        raise SweepError(f"{where}: prompt {prompt!r} contains '${{' (an OmegaConf interpolation)")
    if obj is not None and (not isinstance(obj, str) or not obj.strip()):
        raise SweepError(f"{where}: object must be a non-empty string, got {obj!r}")
    return PromptItem(
        prompt=prompt,
        object=obj.strip() if obj else object_name(prompt),
        overrides=_str_list(f"{where}.overrides", ov),
        perpneg_overrides=_str_list(f"{where}.perpneg_overrides", pov),
        slug=_slug(prompt),
    )


def _load_prompts(raw: Dict[str, Any], base: Path) -> Tuple[List[PromptItem], str]:
    spec = raw.get("prompts")
    if not isinstance(spec, Mapping) or "list" not in spec:
        raise SweepError(
            "prompts: expected a prompt list (prompts=paper3d|large|paper2d, or "
            "prompts.list=[...]), got " + repr(spec)
        )
    items = spec.get("list")
    if items is None:
        items = []
    if not isinstance(items, (list, tuple)):
        raise SweepError(f"prompts.list: expected a list of prompts, got {items!r}")
    out = [_prompt_item(e, f"prompts.list[{i}]") for i, e in enumerate(items)]
    name = str(spec.get("name") or "custom")
    pf = raw.get("prompts_file")
    if pf is not None:
        path = Path(str(pf)).expanduser()
        if not path.is_absolute():
            path = base / path
        if not path.is_file():
            raise SweepError(f"prompts_file: no such file {str(path)!r}")
        lines = path.read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines, 1):
            text = line.strip()
            if text and not text.startswith("#"):
                out.append(_prompt_item(text, f"prompts_file {path.name}:{n}"))
        name = f"{name}+{path.name}"
    mp = raw.get("max_prompts")
    if mp is not None:
        out = out[: _check_int("max_prompts", mp, 1)]
    if not out:
        raise SweepError("prompts: the prompt list is empty (prompts.list / prompts_file)")
    seen: Dict[str, str] = {}
    for item in out:
        if item.slug in seen:
            what = "given twice" if seen[item.slug] == item.prompt else f"and {seen[item.slug]!r}"
            raise SweepError(
                f"prompts: {item.prompt!r} {what} map to the same job id {item.slug!r}"
            )
        seen[item.slug] = item.prompt
    return out, name


def _load_schemes(raw: Dict[str, Any], methods: Sequence[str]) -> List[SchemeSetting]:
    names = raw.get("schemes")
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise SweepError(f"schemes: expected a list of scheme-setting names, got {names!r}")
    table = raw.get("scheme_settings") or {}
    if not isinstance(table, Mapping):
        raise SweepError(f"scheme_settings: expected a mapping, got {table!r}")
    if "perpneg" in methods and not names:
        raise SweepError("schemes: empty, but methods has perpneg (give e.g. schemes=[authors])")
    out: List[SchemeSetting] = []
    for label in names:
        _check_name("schemes", label)
        if label in table:
            entry = table[label]
            if not isinstance(entry, Mapping):
                raise SweepError(f"scheme_settings.{label}: expected a mapping, got {entry!r}")
            scheme = entry.get("scheme", label)
            ov = _str_list(f"scheme_settings.{label}.overrides", entry.get("overrides"))
        elif label in BUILTIN_SCHEMES:
            scheme, ov = label, ()
        else:
            known = sorted(set(table) | set(BUILTIN_SCHEMES))
            raise SweepError(f"schemes: unknown scheme setting {label!r}, expected one of {known}")
        if scheme not in BUILTIN_SCHEMES:
            raise SweepError(
                f"scheme_settings.{label}.scheme: unknown scheme {scheme!r}, expected one of "
                f"{list(BUILTIN_SCHEMES)}"
            )
        if any(s.label == label for s in out):
            raise SweepError(f"schemes: {label!r} given twice")
        out.append(SchemeSetting(label=label, scheme=scheme, overrides=ov))
    return out


def _original_cwd() -> Path:
    """The directory the command was started in (Hydra's runtime.cwd when Hydra runs us)."""
    if "hydra" in sys.modules:
        try:
            from hydra.core.hydra_config import HydraConfig

            if HydraConfig.initialized():
                return Path(HydraConfig.get().runtime.cwd)
        except Exception:  # pragma: no cover - defensive: fall back to the process cwd
            pass
    return Path.cwd()


def load_settings(cfg: Any, *, base: Optional[Path] = None) -> Settings:
    """Validate the composed config. ``base``: where relative paths start (default: the
    directory the command was started in)."""
    raw = _plain(cfg)
    base = Path(base) if base is not None else _original_cwd()

    job = raw.get("job")
    if not isinstance(job, Mapping) or job.get("kind") not in KINDS:
        kind = job.get("kind") if isinstance(job, Mapping) else job
        raise SweepError(f"job: expected job=3d or job=2d, got kind {kind!r}")
    job = dict(job)

    sweep_name = _check_name("sweep_name", raw.get("sweep_name"))
    out_dir_raw = raw.get("out_dir")
    if not isinstance(out_dir_raw, str) or not out_dir_raw.strip():
        raise SweepError(f"out_dir: expected a folder path, got {out_dir_raw!r}")
    out_dir = Path(out_dir_raw).expanduser()
    if not out_dir.is_absolute():
        out_dir = base / out_dir

    root_raw = raw.get("threestudio_root")
    root: Optional[Path] = None
    if root_raw is not None:
        if not isinstance(root_raw, str) or not root_raw.strip():
            raise SweepError(f"threestudio_root: expected a folder path, got {root_raw!r}")
        root = Path(root_raw).expanduser()
        if not root.is_absolute():
            root = base / root

    methods_raw = raw.get("methods")
    if isinstance(methods_raw, str):
        methods_raw = [methods_raw]
    if not isinstance(methods_raw, (list, tuple)) or not methods_raw:
        raise SweepError(
            f"methods: expected a non-empty list of {list(METHODS)}, got {methods_raw!r}"
        )
    methods: List[str] = []
    for m in methods_raw:
        if m not in METHODS:
            raise SweepError(f"methods: unknown method {m!r}, expected one of {list(METHODS)}")
        if m in methods:
            raise SweepError(f"methods: {m!r} given twice")
        methods.append(m)

    prompts, prompt_list = _load_prompts(raw, base)
    seeds = parse_seeds(raw.get("seeds"))
    # 2D jobs always take a scheme (eval2d --scheme); 3D only for perpneg runs
    schemes = _load_schemes(raw, methods if job["kind"] == "3d" else ["perpneg"])

    gpus = raw.get("gpus")
    if gpus is not None:
        gpus = _check_int("gpus", gpus, 1)
    num_shards = _check_int("num_shards", raw.get("num_shards", 1), 1)
    shard = _check_int("shard", raw.get("shard", 0), 0)
    if shard >= num_shards:
        raise SweepError(f"shard: {shard} is not below num_shards={num_shards}")
    stage = raw.get("stage", "all")
    if stage not in STAGES:
        raise SweepError(f"stage: unknown stage {stage!r}, expected one of {list(STAGES)}")

    if job["kind"] == "3d":
        if not isinstance(job.get("config"), str) or not job["config"]:
            raise SweepError(
                f"job.config: expected a threestudio config path, got {job.get('config')!r}"
            )
        _check_int("job.max_steps", job.get("max_steps"), 1)
        job["overrides"] = list(_str_list("job.overrides", job.get("overrides")))
        _check_bool("job.resume_partial", job.get("resume_partial", True))
        ev = job.get("eval") or {}
        if not isinstance(ev, Mapping):
            raise SweepError(f"job.eval: expected a mapping, got {ev!r}")
        job["eval"] = {
            "enabled": _check_bool("job.eval.enabled", ev.get("enabled", True)),
            "clip": ev.get("clip"),
            "args": [str(a) for a in (ev.get("args") or [])],
        }
        if job["eval"]["enabled"] and not (isinstance(ev.get("clip"), str) and ev["clip"]):
            raise SweepError("job.eval.clip: expected a CLIP checkpoint (hub id or folder)")
    else:
        for key in ("model", "clip", "views", "modes"):
            if not isinstance(job.get(key), str) or not job[key].strip():
                raise SweepError(f"job.{key}: expected a non-empty string, got {job.get(key)!r}")
        job["args"] = [str(a) for a in (job.get("args") or [])]
        for item in prompts:
            if "|" in item.prompt:
                raise SweepError(
                    f"prompts: {item.prompt!r} contains '|', which separates prompts in eval2d"
                )

    report = raw.get("report") or {}
    if not isinstance(report, Mapping):
        raise SweepError(f"report: expected a mapping, got {report!r}")
    report = {
        "enabled": _check_bool("report.enabled", report.get("enabled", True)),
        "frames": _check_int("report.frames", report.get("frames", 8), 1, 64),
        "thumb_size": _check_int("report.thumb_size", report.get("thumb_size", 128), 16, 1024),
    }
    return Settings(
        sweep_name=sweep_name,
        out_dir=out_dir,
        threestudio_root=root,
        prompts=prompts,
        prompt_list=prompt_list,
        seeds=seeds,
        methods=methods,
        schemes=schemes,
        gpus=gpus,
        shard=shard,
        num_shards=num_shards,
        stage=stage,
        dry_run=_check_bool("dry_run", raw.get("dry_run", False)),
        force_eval=_check_bool("force_eval", raw.get("force_eval", False)),
        fail_fast=_check_bool("fail_fast", raw.get("fail_fast", False)),
        job=job,
        report=report,
    )


# --------------------------------------------------------------------------- jobs
@dataclass
class Job:
    """One unit of the sweep. ``command`` is what runs (3D: launch.py in ``cwd``; 2D: eval2d's
    argv after ``python -m threestudio_perpneg eval2d``); ``eval_argv`` is eval3d's argv (3D)."""

    index: int
    id: str
    kind: str
    slug: str
    prompt: str
    object: str
    seed: int
    method: str
    scheme: Optional[str]
    variant: str
    shard: int
    gpu: Optional[str]
    run_dir: str
    eval_dir: Optional[str]
    marker: str
    log: str
    cwd: Optional[str]
    command: List[str]
    eval_argv: Optional[List[str]]
    fingerprint: str
    settings: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def shell(self) -> str:
        """The job's full command as one shell line (what ``dry_run`` prints)."""
        env = f"CUDA_VISIBLE_DEVICES={self.gpu} " if self.gpu is not None else ""
        if self.kind == "3d":
            line = (
                f"cd {shlex.quote(self.cwd or '<threestudio_root>')} && {env}{_join(self.command)}"
            )
            if self.eval_argv is not None:
                line += f" && {env}{_join([sys.executable, '-m', 'threestudio_perpneg', 'eval3d', *self.eval_argv])}"
            return line
        return (
            f"{env}{_join([sys.executable, '-m', 'threestudio_perpneg', 'eval2d', *self.command])}"
        )


def _join(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def _yaml_value(text: str) -> str:
    """``text`` as a value for threestudio's ``key=value`` overrides (OmegaConf.from_cli parses
    values as YAML): plain when YAML reads it back unchanged, else a double-quoted YAML scalar."""
    import yaml

    try:  # the loader OmegaConf.from_cli uses (it reads e.g. 1e5 as a float, PyYAML does not)
        from omegaconf._utils import get_yaml_loader

        loader: Any = get_yaml_loader()
    except ImportError:  # pragma: no cover - other omegaconf versions: be conservative
        loader = None
    try:
        plain_ok = (
            text == text.strip()
            and not text.startswith(("'", '"'))
            and (loader is not None or re.fullmatch(r"[A-Za-z][A-Za-z ,.'_-]*", text) is not None)
            and yaml.load(text, Loader=loader or yaml.SafeLoader) == text
        )
    except yaml.YAMLError:
        plain_ok = False
    return text if plain_ok else json.dumps(text)


def gpu_for_slot(
    gpus: Optional[int], slot: int, env: Optional[Mapping[str, str]] = None
) -> Optional[str]:
    """``CUDA_VISIBLE_DEVICES`` for Hydra job / shard ``slot``: entry ``slot % gpus`` of the
    inherited ``CUDA_VISIBLE_DEVICES`` when set (SLURM, a shared machine), else ``slot % gpus``;
    None when ``gpus`` is None (leave the environment alone)."""
    if gpus is None:
        return None
    if env is None:
        visible = _inherited_visible_devices()
    else:
        visible = env.get("CUDA_VISIBLE_DEVICES", "")
    inherited = [g.strip() for g in visible.split(",") if g.strip()]
    if inherited:
        if gpus > len(inherited):
            raise SweepError(
                f"gpus: {gpus} GPUs asked for, but CUDA_VISIBLE_DEVICES={visible!r} lists "
                f"{len(inherited)}"
            )
        return inherited[slot % gpus]
    return str(slot % gpus)


#: CUDA_VISIBLE_DEVICES as it was before :func:`_pin_process_gpu` changed it in this process
#: (the basic launcher runs every Hydra job in one process, joblib reuses its workers).
_UNSET = "\0unset"
_inherited_cvd = _UNSET


def _inherited_visible_devices() -> str:
    if _inherited_cvd != _UNSET:
        return _inherited_cvd
    return os.environ.get("CUDA_VISIBLE_DEVICES", "")


def _fingerprint(data: Mapping[str, Any]) -> str:
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def _variants(s: Settings) -> List[Tuple[str, Optional[SchemeSetting], str]]:
    """(method, scheme setting, variant label) in sweep order."""
    out: List[Tuple[str, Optional[SchemeSetting], str]] = []
    if s.kind == "2d":
        return [("2d", sc, f"2d_{sc.label}") for sc in s.schemes]
    for m in s.methods:
        if m == "vanilla":
            out.append(("vanilla", None, "vanilla"))
        else:
            out.extend(("perpneg", sc, f"perpneg_{sc.label}") for sc in s.schemes)
    return out


def shard_of(index: int, num_shards: int) -> int:
    """Shard of job ``index``: round-robin, rotated by one each round, so that consecutive
    variants of one (prompt, seed) (vanilla, perpneg, ...) spread over the shards instead of one
    shard getting every vanilla run."""
    return (index + index // num_shards) % num_shards


def plan_jobs(s: Settings, *, slot: Optional[int] = None) -> List[Job]:
    """Every job of the sweep (all shards), in order prompt, seed, variant. ``slot`` picks the
    GPU (see :func:`gpu_for_slot`); default: ``s.shard``."""
    gpu = gpu_for_slot(s.gpus, s.shard if slot is None else slot)
    out = s.out_dir
    jobs: List[Job] = []
    for item in s.prompts:
        for seed in s.seeds:
            for method, sc, variant in _variants(s):
                index = len(jobs)
                jid = f"{item.slug}-s{seed}-{variant}"
                run_dir = out / "runs" / jid
                if s.kind == "3d":
                    job = _plan_3d(s, item, seed, method, sc, variant, jid, run_dir)
                else:
                    job = _plan_2d(s, item, seed, sc, variant, jid, run_dir)
                job.update(
                    index=index,
                    id=jid,
                    kind=s.kind,
                    slug=item.slug,
                    prompt=item.prompt,
                    object=item.object,
                    seed=seed,
                    variant=variant,
                    shard=shard_of(index, s.num_shards),
                    gpu=gpu,
                    run_dir=str(run_dir),
                    marker=str(out / "done" / f"{jid}.json"),
                    log=str(out / "logs" / f"{jid}.log"),
                )
                jobs.append(Job(**job))
    return jobs


def _plan_3d(
    s: Settings,
    item: PromptItem,
    seed: int,
    method: str,
    sc: Optional[SchemeSetting],
    variant: str,
    jid: str,
    run_dir: Path,
) -> Dict[str, Any]:
    j = s.job
    perpneg = method == "perpneg"
    overrides = [
        f"system.prompt_processor.prompt={_yaml_value(item.prompt)}",
        f"seed={seed}",
        f"system.guidance.use_perp_neg={'true' if perpneg else 'false'}",
    ]
    if perpneg and sc is not None:
        overrides.append(f"system.prompt_processor.perp_neg_scheme={sc.scheme}")
    overrides += [
        f"trainer.max_steps={int(j['max_steps'])}",
        f"exp_root_dir={_yaml_value(str(s.out_dir))}",
        "name=runs",
        f"tag={jid}",
        "use_timestamp=false",
    ]
    extra = list(item.overrides)
    if perpneg:
        extra += list(item.perpneg_overrides)
        if sc is not None:
            extra += list(sc.overrides)
    extra += list(j["overrides"])
    python = j.get("python") or sys.executable
    command = [str(python), "launch.py", "--config", str(j["config"]), "--train", "--gpu", "0"]
    command += overrides + extra
    eval_dir = s.out_dir / "eval" / jid
    ev = j["eval"]
    eval_argv = None
    if ev["enabled"]:
        eval_argv = [str(run_dir), "--clip", str(ev["clip"]), "--object", item.object]
        eval_argv += ["--out", str(eval_dir), *ev["args"]]
    settings = {
        "kind": "3d",
        "prompt": item.prompt,
        "seed": seed,
        "method": method,
        "scheme": sc.scheme if (perpneg and sc) else None,
        "config": str(j["config"]),
        "max_steps": int(j["max_steps"]),
        "overrides": extra,
    }
    return {
        "method": method,
        "scheme": sc.label if (perpneg and sc) else None,
        "eval_dir": str(eval_dir) if ev["enabled"] else None,
        "cwd": str(s.threestudio_root) if s.threestudio_root is not None else None,
        "command": command,
        "eval_argv": eval_argv,
        "fingerprint": _fingerprint(settings),
        "settings": settings,
    }


def _plan_2d(
    s: Settings,
    item: PromptItem,
    seed: int,
    sc: Optional[SchemeSetting],
    variant: str,
    jid: str,
    run_dir: Path,
) -> Dict[str, Any]:
    j = s.job
    command = ["--model", j["model"], "--clip", j["clip"], "--prompts", item.prompt]
    command += ["--views", j["views"], "--modes", j["modes"], "--seeds", str(seed)]
    if sc is not None:
        command += ["--scheme", sc.scheme]
    command += ["--out", str(run_dir), *j["args"]]
    settings = {
        "kind": "2d",
        "prompt": item.prompt,
        "seed": seed,
        "scheme": sc.scheme if sc else None,
        "model": j["model"],
        "clip": j["clip"],
        "views": j["views"],
        "modes": j["modes"],
        "args": list(j["args"]),
    }
    return {
        "method": "2d",
        "scheme": sc.label if sc else None,
        "eval_dir": None,
        "cwd": None,
        "command": command,
        "eval_argv": None,
        "fingerprint": _fingerprint(settings),
        "settings": settings,
    }


# --------------------------------------------------------------------------- markers
def _marker_state(job: Job, marker: Optional[Dict[str, Any]], s: Settings) -> str:
    """``pending``, ``done``, or ``eval`` (run finished, evaluation to (re)do)."""
    if marker is None:
        return "pending"
    if marker.get("fingerprint") != job.fingerprint:
        raise SweepError(
            f"{job.marker}: done-marker of job {job.id} was written with other settings "
            f"({marker.get('job', {}).get('settings')} != {job.settings}); use another "
            "sweep_name/out_dir for a sweep with different settings (or delete the marker)"
        )
    if job.kind == "3d" and job.eval_argv is not None:
        ev = marker.get("eval") or {}
        if s.force_eval or ev.get("status") != "ok":
            return "eval"
    return "done"


# --------------------------------------------------------------------------- running
def _check_root(s: Settings) -> Path:
    root = s.threestudio_root
    if root is None:
        raise SweepError(
            "threestudio_root: not set; 3D jobs run threestudio's launch.py. Give "
            "threestudio_root=/path/to/threestudio (a checkout where `threestudio-perpneg link "
            "<checkout>` was run), or dry_run=true to only list the jobs"
        )
    if not (root / "launch.py").is_file():
        raise SweepError(
            f"threestudio_root: {str(root)!r} has no launch.py (not a threestudio checkout)"
        )
    cfg = root / str(s.job["config"])
    if not cfg.is_file():
        raise SweepError(
            f"job.config: {str(cfg)!r} does not exist; run `threestudio-perpneg link {root}` to "
            "install the perpneg-*.yaml configs"
        )
    return root


def _run_3d(job: Job, s: Settings, runner: Runner) -> Dict[str, Any]:
    run_dir = Path(job.run_dir)
    command = list(job.command)
    ckpt = run_dir / "ckpts" / "last.ckpt"
    resumed = None
    if s.job.get("resume_partial", True) and ckpt.is_file():
        resumed = str(ckpt)
        command.append(f"resume={_yaml_value(resumed)}")
    env = dict(os.environ)
    if job.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = job.gpu
    log_path = Path(job.log)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log_path, "ab") as fh:
        fh.write(f"\n# {_dt.datetime.now().isoformat(timespec='seconds')} {job.shell()}\n".encode())
        fh.flush()
        proc = runner(command, cwd=job.cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    result: Dict[str, Any] = {
        "returncode": int(proc.returncode),
        "seconds": round(time.time() - t0, 1),
        "log": str(log_path),
        "resumed_from": resumed,
        "command": command,
    }
    if proc.returncode != 0:
        raise _JobFailed(f"launch.py exited with code {proc.returncode} (log: {log_path})", result)
    test_dir = latest_test_dir(run_dir)
    if test_dir is None:
        raise _JobFailed(
            f"launch.py exited 0 but wrote no test renders under {run_dir}/save/it*-test "
            f"(log: {log_path})",
            result,
        )
    result["test_dir"] = str(test_dir)
    result["frames"] = len(ring_frames(test_dir))
    return result


class _JobFailed(Exception):
    def __init__(self, message: str, result: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(message)
        self.result = result or {}


def _call_main(func: Callable[[List[str]], Any], argv: List[str]) -> int:
    try:
        rc = func(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return int(rc or 0)


def _find_key(obj: Any, names: Sequence[str], number: bool) -> Any:
    """First value under one of ``names`` (depth-first): a number when ``number``, else a bool."""
    if isinstance(obj, Mapping):
        for n in names:
            v = obj.get(n)
            if isinstance(v, bool) != number and (not number or isinstance(v, (int, float))):
                return v
        for v in obj.values():
            r = _find_key(v, names, number)
            if r is not None:
                return r
    elif isinstance(obj, list):
        for v in obj:
            r = _find_key(v, names, number)
            if r is not None:
                return r
    return None


def summarize_eval(eval_dir: Path) -> Dict[str, Any]:
    """Janus flag and view accuracy of one trial, read from eval3d's JSON output (first
    ``janus`` boolean and ``view_accuracy`` number found)."""
    janus: Optional[bool] = None
    acc: Optional[float] = None
    files = sorted(eval_dir.rglob("*.json")) if eval_dir.is_dir() else []
    for f in files:
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        objects = data.get("objects") if isinstance(data, dict) else None
        if isinstance(objects, list) and objects and isinstance(objects[0], dict):
            data = objects[0]  # janus_report.json: one object per trial
        if janus is None:
            janus = _find_key(data, ("janus",), number=False)
        if acc is None:
            v = _find_key(data, ("view_accuracy",), number=True)
            acc = float(v) if v is not None else None
    return {"janus": janus, "view_accuracy": acc, "files": [str(f) for f in files]}


def _eval_3d(job: Job) -> Dict[str, Any]:
    assert job.eval_argv is not None and job.eval_dir is not None
    t0 = time.time()
    try:
        from threestudio_perpneg.eval import janus
    except ImportError as err:
        return {"status": "error", "error": f"eval3d unavailable: {err}"}
    _pin_process_gpu(job)
    try:
        rc = _call_main(janus.main, list(job.eval_argv))
    except Exception as err:  # the evaluator's own errors are recorded, not fatal to the sweep
        log.exception("eval3d failed for %s", job.id)
        return {"status": "error", "error": f"{type(err).__name__}: {err}"}
    out: Dict[str, Any] = {
        "status": "ok" if rc == 0 else "error",
        "exit_code": rc,
        "seconds": round(time.time() - t0, 1),
        "out": job.eval_dir,
        "argv": list(job.eval_argv),
    }
    if rc != 0:
        out["error"] = f"eval3d exited with code {rc}"
    out.update(summarize_eval(Path(job.eval_dir)))
    return out


def _run_2d(job: Job) -> Dict[str, Any]:
    t0 = time.time()
    try:
        from threestudio_perpneg.eval import eval2d
    except ImportError as err:
        raise _JobFailed(f"eval2d unavailable: {err}") from err
    _pin_process_gpu(job)
    rc = _call_main(eval2d.main, list(job.command))
    result = {"exit_code": rc, "seconds": round(time.time() - t0, 1), "out": job.run_dir}
    if rc != 0:
        raise _JobFailed(f"eval2d exited with code {rc}", result)
    result["csv"] = [str(p) for p in sorted(Path(job.run_dir).rglob("*.csv"))]
    return result


def _pin_process_gpu(job: Job) -> None:
    """In-process evaluators (eval2d, eval3d) use the job's GPU: set CUDA_VISIBLE_DEVICES in this
    process while CUDA is not initialised yet (later calls keep the first GPU)."""
    global _inherited_cvd
    if job.gpu is None:
        return
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            return
    except Exception:  # pragma: no cover - an odd torch build: leave the environment alone
        return
    if _inherited_cvd == _UNSET:
        _inherited_cvd = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    os.environ["CUDA_VISIBLE_DEVICES"] = job.gpu


def _execute(
    job: Job, state: str, s: Settings, runner: Runner, marker: Optional[Dict[str, Any]]
) -> str:
    """Run (or re-evaluate) one job; writes its done-marker or failure record."""
    failed_path = s.out_dir / "failed" / f"{job.id}.json"
    record: Dict[str, Any] = {
        "version": MARKER_VERSION,
        "status": "done",
        "job": job.to_dict(),
        "fingerprint": job.fingerprint,
    }
    try:
        if job.kind == "3d":
            if state == "eval" and marker is not None:
                record["run"] = marker.get("run", {})
            else:
                record["run"] = _run_3d(job, s, runner)
            if job.eval_argv is not None:
                record["eval"] = _eval_3d(job)
                if record["eval"]["status"] != "ok":
                    log.warning(
                        "job %s: evaluation failed: %s", job.id, record["eval"].get("error")
                    )
        else:
            record["run"] = _run_2d(job)
    except _JobFailed as err:
        write_json_atomic(
            failed_path,
            {
                "version": MARKER_VERSION,
                "status": "failed",
                "error": str(err),
                "result": err.result,
                "job": job.to_dict(),
                "at": _dt.datetime.now().isoformat(timespec="seconds"),
            },
        )
        log.error("job %s failed: %s", job.id, err)
        if s.fail_fast:
            raise SweepError(f"job {job.id} failed: {err} (fail_fast=true)") from err
        return "failed"
    record["finished_at"] = _dt.datetime.now().isoformat(timespec="seconds")
    write_json_atomic(Path(job.marker), record)
    if failed_path.exists():
        failed_path.unlink()
    return "done"


def _plan_path(s: Settings, hydra_job: Optional[int]) -> Path:
    if hydra_job is not None:
        return s.out_dir / f"jobs-{hydra_job}.json"
    if s.num_shards > 1:
        return s.out_dir / f"jobs-shard{s.shard}.json"
    return s.out_dir / "jobs.json"


def run_sweep(
    cfg: Any,
    *,
    runner: Optional[Runner] = None,
    slot: Optional[int] = None,
    hydra_job: Optional[int] = None,
    write_final_report: bool = True,
    base: Optional[Path] = None,
    echo: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """Plan, then (unless ``dry_run``) run this shard's pending jobs and write the report.

    ``runner`` replaces ``subprocess.run`` for launch.py; ``slot`` is the GPU slot (Hydra's job
    number in multirun, default ``shard``); ``hydra_job`` names the plan file in multirun.
    Returns a summary: ``jobs`` (this shard's, as dicts, each with ``state``), counts, paths."""
    s = load_settings(cfg, base=base)
    if s.stage == "report":
        path = write_report(s.out_dir, frames=s.report["frames"], thumb_size=s.report["thumb_size"])
        echo(f"{PROG}: report written to {path}")
        return {"report": str(path), "jobs": []}

    all_jobs = plan_jobs(s, slot=slot)
    mine = [j for j in all_jobs if j.shard == s.shard]
    states: Dict[str, str] = {}
    markers: Dict[str, Optional[Dict[str, Any]]] = {}
    for j in mine:
        markers[j.id] = read_marker(Path(j.marker))
        states[j.id] = _marker_state(j, markers[j.id], s)

    plan_path = _plan_path(s, hydra_job)
    plan = {
        "sweep_name": s.sweep_name,
        "out_dir": str(s.out_dir),
        "prompt_list": s.prompt_list,
        "kind": s.kind,
        "shard": s.shard,
        "num_shards": s.num_shards,
        "total_jobs": len(all_jobs),
        "dry_run": s.dry_run,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "jobs": [dict(j.to_dict(), state=states[j.id]) for j in mine],
    }
    write_json_atomic(plan_path, plan)

    n_todo = sum(1 for j in mine if states[j.id] != "done")
    shard_txt = f" (shard {s.shard}/{s.num_shards} of {len(all_jobs)})" if s.num_shards > 1 else ""
    if s.dry_run:
        for k, j in enumerate(mine, 1):
            echo(f"[{k}/{len(mine)}] {j.id} [{states[j.id]}] {j.shell()}")
        if s.kind == "3d" and s.threestudio_root is not None:
            try:
                _check_root(s)
            except SweepError as err:
                echo(f"{PROG}: warning: {err}")
        echo(
            f"{PROG}: dry run: {len(mine)} jobs{shard_txt}, {n_todo} to run; nothing was run. "
            f"Job list: {plan_path}"
        )
        return {"plan": str(plan_path), "jobs": plan["jobs"], "to_run": n_todo, "dry_run": True}

    if s.kind == "3d" and any(states[j.id] == "pending" for j in mine):
        _check_root(s)
    run = runner if runner is not None else _default_runner
    counts = {"done": 0, "skipped": 0, "failed": 0}
    for k, j in enumerate(mine, 1):
        st = states[j.id]
        if st == "done":
            counts["skipped"] += 1
            log.info("[%d/%d] %s: done-marker found, skipped", k, len(mine), j.id)
            continue
        log.info("[%d/%d] %s: %s", k, len(mine), j.id, "evaluating" if st == "eval" else "running")
        outcome = _execute(j, st, s, run, markers[j.id])
        counts[outcome] += 1
        states[j.id] = "done" if outcome == "done" else "failed"
    summary: Dict[str, Any] = {
        "plan": str(plan_path),
        "jobs": [dict(j.to_dict(), state=states[j.id]) for j in mine],
        **counts,
    }
    if write_final_report and s.report["enabled"]:
        summary["report"] = str(
            write_report(s.out_dir, frames=s.report["frames"], thumb_size=s.report["thumb_size"])
        )
    echo(
        f"{PROG}: {counts['done']} run, {counts['skipped']} skipped (done), {counts['failed']} "
        f"failed{shard_txt}" + (f"; report: {summary['report']}" if "report" in summary else "")
    )
    return summary


def _default_runner(command: Sequence[str], **kwargs: Any) -> Any:
    return subprocess.run(list(command), check=False, **kwargs)


# --------------------------------------------------------------------------- Hydra entry
def _hydra_context() -> Tuple[Optional[int], bool]:
    """(Hydra job number in multirun or None, whether Hydra is running us)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:  # pragma: no cover
        return None, False
    if not HydraConfig.initialized():
        return None, False
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        return int(hc.job.num), True
    return None, True


def _task(cfg: Any) -> Optional[Dict[str, Any]]:
    job_num, _ = _hydra_context()
    try:
        summary = run_sweep(
            cfg,
            slot=job_num,
            hydra_job=job_num,
            # in multirun the callback writes one report after every Hydra job returned
            write_final_report=job_num is None,
        )
    except SweepError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        sys.exit(2)
    if job_num is None and summary.get("failed"):
        sys.exit(1)
    return summary


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Hydra entry point: ``python -m threestudio_perpneg.eval.sweep [overrides] [-m]``.

    ``argv`` (without the program name) replaces ``sys.argv[1:]`` for this call; ``prog`` names
    the program in Hydra's messages. Returns the exit code: 0, 1 when a job failed (single run),
    2 for a configuration error (the message names the key)."""
    try:
        import hydra
    except ImportError:
        print(
            f"{PROG}: error: the sweep needs hydra-core (pip install hydra-core; for parallel "
            "runs also hydra-joblib-launcher or hydra-submitit-launcher)",
            file=sys.stderr,
        )
        return 2
    # An absolute config_path: Hydra reads conf/ as files (a module path would need conf/ to be
    # an importable package).
    entry = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(_task)
    saved = sys.argv
    args = list(saved[1:] if argv is None else argv)
    sys.argv = [prog or (saved[0] if saved else PROG), *args]
    try:
        entry()
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved
    return 0
