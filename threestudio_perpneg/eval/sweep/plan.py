"""Planning of the sweep: the jobs (prompts x seeds x methods x schemes, or the 2D protocol), their
commands, fingerprints and shards."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .gpus import gpu_for_slot
from .settings import PromptItem, SchemeSetting, Settings

__all__ = ["Job", "fingerprint", "plan_jobs", "shard_of", "yaml_value"]


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


def yaml_value(text: str) -> str:
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


def fingerprint(data: Mapping[str, Any]) -> str:
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
        f"system.prompt_processor.prompt={yaml_value(item.prompt)}",
        f"seed={seed}",
        f"system.guidance.use_perp_neg={'true' if perpneg else 'false'}",
    ]
    if perpneg and sc is not None:
        overrides.append(f"system.prompt_processor.perp_neg_scheme={sc.scheme}")
    overrides += [
        f"trainer.max_steps={int(j['max_steps'])}",
        f"exp_root_dir={yaml_value(str(s.out_dir))}",
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
        "fingerprint": fingerprint(settings),
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
        "fingerprint": fingerprint(settings),
        "settings": settings,
    }
