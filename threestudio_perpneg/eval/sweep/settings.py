"""Settings of the sweep: the config keys checked (one line naming the key on bad input) and
normalised into :class:`Settings` (prompts, seeds, methods, weight schemes, job kind)."""

from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ...common.checks import (
    MAX_SEEDS,
    check_bool,
    check_int,
    check_name,
    slug,
)
from ...common.checks import parse_seeds as _parse_seeds
from ...common.io import output_folder

__all__ = [
    "BUILTIN_SCHEMES",
    "CONF_DIR",
    "KINDS",
    "MARKER_VERSION",
    "MAX_SEED",
    "METHODS",
    "PROG",
    "STAGES",
    "PromptItem",
    "SchemeSetting",
    "Settings",
    "SweepError",
    "load_settings",
    "object_name",
    "parse_seeds",
]

PROG = "perpneg-sweep"
METHODS: Tuple[str, ...] = ("vanilla", "perpneg")
KINDS: Tuple[str, ...] = ("3d", "2d")
STAGES: Tuple[str, ...] = ("all", "report")
BUILTIN_SCHEMES: Tuple[str, ...] = ("threestudio", "authors")
#: The Hydra config tree shipped with the package (package data).
CONF_DIR = Path(__file__).resolve().parent / "conf"
MARKER_VERSION = 1
MAX_SEED = 2**32 - 1  # pytorch-lightning's seed_everything range
_SLUG_LEN = 48
_OBJECT_PREFIX_RE = re.compile(
    r"^(?:an?\s+)?(?:zoomed[\s-]+out\s+)?(?:DSLR\s+|high[\s-]+quality\s+)?"
    r"(?:photo|picture|image|render|rendering)\s+of\s+",
    re.IGNORECASE,
)

#: ``runner(command, cwd=..., env=..., stdout=..., stderr=...)`` -> object with ``returncode``


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
    return check_bool(key, value, error=SweepError)


def _check_int(key: str, value: Any, lo: int, hi: Optional[int] = None) -> int:
    return check_int(key, value, lo, hi, error=SweepError)


def _check_name(key: str, value: Any) -> str:
    return check_name(key, value, error=SweepError)


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


#: The sweep's seeds (``seeds=[0,1,2]``, ``seeds=5`` or ``seeds=0-2``): the one parser of
#: :func:`threestudio_perpneg.common.checks.parse_seeds` with the sweep's settings: integers, lists or
#: range strings, each seed in ``[0, 2**32)``, no seed twice, :class:`SweepError`.
parse_seeds = functools.partial(
    _parse_seeds, forms="any", max_seed=MAX_SEED, max_count=MAX_SEEDS, unique=True, error=SweepError
)


def object_name(prompt: str) -> str:
    """The object the view classifier is asked about: ``prompt`` without a leading
    ``a (zoomed out) DSLR photo of`` (``"a DSLR photo of a corgi"`` -> ``"a corgi"``)."""
    stripped = _OBJECT_PREFIX_RE.sub("", prompt.strip(), count=1).strip()
    return stripped or prompt.strip()


def _slug(text: str) -> str:
    return slug(text, limit=_SLUG_LEN, fallback="prompt")


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


def _folder(key: str, value: Any, base: Path) -> Path:
    """A folder path (``~`` expanded, relative to ``base``)."""
    if not isinstance(value, str) or not value.strip():
        raise SweepError(f"{key}: expected a folder path, got {value!r}")
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


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


#: The sweep's top-level config keys (``conf/config.yaml``; ``prompts`` comes from a prompt group).
TOP_KEYS: Tuple[str, ...] = (
    "sweep_name", "out_dir", "threestudio_root", "seeds", "methods", "schemes",
    "scheme_settings", "prompts", "prompts_file", "max_prompts", "gpus", "shard", "num_shards",
    "stage", "dry_run", "force_eval", "fail_fast", "report", "job",
)  # fmt: skip


def load_settings(cfg: Any, *, base: Optional[Path] = None) -> Settings:
    """Validate the composed config. ``base``: where relative paths start (default: the
    directory the command was started in)."""
    raw = _plain(cfg)
    for key in raw:  # a mistyped ``+key=value`` override would otherwise be ignored
        if key not in TOP_KEYS:
            raise SweepError(f"{key}: unknown config key, expected one of {sorted(TOP_KEYS)}")
    base = Path(base) if base is not None else _original_cwd()

    job = raw.get("job")
    if not isinstance(job, Mapping) or job.get("kind") not in KINDS:
        kind = job.get("kind") if isinstance(job, Mapping) else job
        raise SweepError(f"job: expected job=3d or job=2d, got kind {kind!r}")
    job = dict(job)

    sweep_name = _check_name("sweep_name", raw.get("sweep_name"))
    out_dir = _folder("out_dir", raw.get("out_dir"), base)
    output_folder("out_dir", out_dir, create=False, error=SweepError)  # not a file, nor in one
    root_raw = raw.get("threestudio_root")
    root = None if root_raw is None else _folder("threestudio_root", root_raw, base)

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
