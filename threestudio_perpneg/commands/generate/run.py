"""Running ``generate`` (and ``--replay``): device and model, the recorded sampler calls, the
outputs and the sidecar; :func:`main` is the command (and the ``perpneg-2d`` console script)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ...common.io import output_folder, read_json, save_image_atomic, to_jsonable
from ..common import (
    TINY_DIR,
    TINY_SEED,
    TINY_SIZE,
    TINY_STEPS,
    build_tiny,
    first_line,
    output_file_slots,
    parse_and_run,
    tiny_path,
    versions,
    write_json,
)
from .args import (
    DEFAULT_STEPS,
    FORMAT,
    GRID_NAME,
    IMAGES_DIR,
    PROG,
    REPLAY_SIDECAR_NAME,
    SIDECAR_NAME,
    TINY_NOTE,
    GenerateError,
    build_parser,
)
from .outputs import grid_image, image_meta, save_png
from .plan import Plan, fail, library_error, make_plan, strip_key

__all__ = ["main", "run_generate"]


def _resolve_device(requested: Optional[str], fp16: bool) -> Tuple[str, Any]:
    import torch

    name = requested or "auto"
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            fail("--device", f"{name}: CUDA is not available on this machine (use --device cpu)")
        index = torch.device(name).index
        if index is not None and index >= torch.cuda.device_count():
            fail("--device", f"{name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif fp16:
        print(
            "warning: --fp16 on the CPU is slow and some operations may not support it",
            file=sys.stderr,
        )
    return name, torch.float16 if fp16 else torch.float32


def _load_sampler(model: str, scheduler: Optional[str], dtype: Any, device: str) -> Any:
    from ...sampler.pipeline import PerpNegSampler

    try:
        return PerpNegSampler.from_pretrained(
            model, scheduler=scheduler, torch_dtype=dtype, device=device
        )
    except FileNotFoundError as err:
        msg = strip_key(strip_key(first_line(err), "--model"), "model (pretrained path)")
        fail("--model", msg)
    except Exception as err:  # any loading failure is one line, not a traceback
        raise GenerateError(
            f"argument --model: cannot load {model!r}: {first_line(err)} (hub ids need "
            "internet access or a local copy in the Hugging Face cache)",
            1,
        ) from err


def _prepare_model(model: Optional[str], out: Path) -> Tuple[str, str]:
    """(model path or hub id, source); builds the tiny random checkpoint when ``model`` is None."""
    from ...core.text import resolve_pretrained

    if model is not None:
        try:
            return resolve_pretrained(model, key="--model"), "--model"
        except (FileNotFoundError, ValueError) as err:
            fail("--model", strip_key(first_line(err), "--model"))
    tiny = tiny_path(out)
    if (tiny / "model_index.json").is_file():
        return str(tiny), "tiny (reused)"
    return build_tiny(tiny), "tiny (built)"


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc="perpneg-2d",
        unit="batch",
        dynamic_ncols=True,
        disable=not enabled or total <= 1,
    )


def _call(sampler: Any, batch_call: str, kwargs: Dict[str, Any], progress: bool) -> List[Any]:
    """Run one recorded sampler call; returns its GenerationResults as a list."""
    fn = getattr(sampler, batch_call)
    kw = dict(kwargs)
    if batch_call == "generate_view":
        # exactly one of view / azimuth is passed (the other is recorded as None)
        if kw.get("view") is None:
            kw.pop("view", None)
        if kw.get("azimuth") is None:
            kw.pop("azimuth", None)
    if kw.get("view_weights") is None:
        kw.pop("view_weights", None)
    try:
        if batch_call == "view_sweep":
            _strip, results = fn(**kw, progress=progress)
            return list(results)
        return [fn(**kw, progress=progress)]
    except ValueError as err:
        library_error(err, "prompt")


# --------------------------------------------------------------------------------------- runs
def _execute(
    sampler: Any,
    batches: List[Dict[str, Any]],
    out: Path,
    progress: bool,
    only: Optional[str] = None,
) -> Tuple[List[Dict[str, Any]], Dict[Tuple[int, int], Any]]:
    """Run the batches, write their PNGs; returns the image records and the grid tiles."""
    records: List[Dict[str, Any]] = []
    tiles: Dict[Tuple[int, int], Any] = {}
    bar = _progress(len(batches), progress)
    try:
        for bi, batch in enumerate(batches):
            results = _call(sampler, batch["call"], batch["kwargs"], progress)
            batch["weights"] = to_jsonable(results[0].weights) if len(results) == 1 else None
            batch["unet_calls"] = [int(getattr(r, "unet_calls", 0)) for r in results]
            batch["unet_rows"] = [int(getattr(r, "unet_rows", 0)) for r in results]
            batch["sampler_settings"] = to_jsonable(getattr(results[0], "settings", None))
            for cell in batch["cells"]:
                res = results[cell["result"]]
                image = res.images[cell["image"]]
                if only is not None and cell["name"] != only:
                    continue
                path = out / IMAGES_DIR / f"{cell['name']}.png"
                sha = save_png(image, path, image_meta(batch, cell))
                tiles[(cell["row"], cell["column"])] = image
                records.append(
                    {
                        "name": cell["name"],
                        "file": f"{IMAGES_DIR}/{cell['name']}.png",
                        "batch": bi,
                        "mode": batch["mode"],
                        "seed": cell["seed"],
                        "view": cell["view"],
                        "azimuth": cell["azimuth"],
                        "row": cell["row"],
                        "column": cell["column"],
                        "size": list(image.size),
                        "weights": to_jsonable(res.weights),
                        "sha256": sha,
                    }
                )
            bar.update(1)
    finally:
        bar.close()
    return records, tiles


def _batch_dicts(plan: Plan) -> List[Dict[str, Any]]:
    return [
        {
            "call": b.call,
            "mode": b.mode,
            "condition": b.condition,
            "kwargs": to_jsonable(b.kwargs),
            "cells": b.cells,
        }
        for b in plan.batches
    ]


def _out_folder(path: Any, create: bool = True) -> Path:
    """``--out`` checked (not a file, nor inside one) and, with ``create``, made."""
    try:
        return output_folder("--out", path, create=create)
    except ValueError as err:
        fail("--out", str(err).split(": ", 1)[1])


def _check_slots(out: Path, files: Tuple[str, ...], folders: Tuple[str, ...]) -> None:
    """The files and folders a run writes under ``--out`` are not in the way of each other
    (checked before sampling, so a long run does not fail at its first write)."""
    try:
        output_file_slots(out, files, "--out", folders=folders)
    except ValueError as err:
        raise GenerateError(f"argument {err}", 2) from None


def _apply_step_and_size_defaults(args: argparse.Namespace) -> Optional[str]:
    """``--steps`` / ``--height`` / ``--width`` not given: 50 steps at the model's size, or with
    the tiny random model (no ``--model``) its small size and few steps; returns the note that
    says so (None when nothing was chosen for the user)."""
    if args.model is not None:
        args.steps = DEFAULT_STEPS if args.steps is None else args.steps
        return None
    chosen = []
    if args.steps is None:
        args.steps = TINY_STEPS
        chosen.append(f"--steps {TINY_STEPS}")
    for key in ("height", "width"):
        if getattr(args, key) is None:
            setattr(args, key, TINY_SIZE)
            chosen.append(f"--{key} {TINY_SIZE}")
    if not chosen:
        return None
    return (
        f"no --model: the tiny random model runs with {' '.join(chosen)} (its images are noise; "
        "pass these options to change them)"
    )


def _generate(args: argparse.Namespace) -> Dict[str, Any]:
    t0 = time.perf_counter()
    defaults_note = _apply_step_and_size_defaults(args)
    plan = make_plan(args)
    device, dtype = _resolve_device(args.device, bool(args.fp16))
    out = _out_folder(args.out or "perpneg_out", create=False)
    _check_slots(
        out, (GRID_NAME, SIDECAR_NAME), (IMAGES_DIR,) + (() if args.model else (TINY_DIR,))
    )
    if args.model is not None:
        _prepare_model(args.model, out)  # a missing --model folder fails before anything is written
    _out_folder(out)
    model, source = _prepare_model(args.model, out)
    tiny = source.startswith("tiny")
    if tiny:
        print(TINY_NOTE.format(path=model), file=sys.stderr)
    if defaults_note:
        print(defaults_note, file=sys.stderr)
    try:
        sampler = _load_sampler(model, args.scheduler, dtype, device)
    except GenerateError:
        if source != "tiny (reused)":
            raise
        # an unloadable leftover tiny checkpoint is rebuilt, never trusted
        print(f"{model} does not load; rebuilding it", file=sys.stderr)
        build_tiny(model, announce=False)
        source = "tiny (rebuilt)"
        sampler = _load_sampler(model, args.scheduler, dtype, device)
    t_loaded = time.perf_counter()

    batches = _batch_dicts(plan)
    records, tiles = _execute(sampler, batches, out, not args.no_progress)
    grid, geo = grid_image(tiles, plan.row_labels, plan.column_labels)
    save_image_atomic(out / GRID_NAME, grid)
    t_done = time.perf_counter()

    pipe = getattr(sampler, "pipe", None)
    sidecar: Dict[str, Any] = {
        "format": FORMAT,
        "argv": list(getattr(args, "_argv", []) or []),
        "settings": {
            **plan.settings,
            "model": model,
            "model_source": source,
            "tiny_seed": TINY_SEED if tiny else None,
            "random_model": tiny,
            "device": device,
            "dtype": "float16" if args.fp16 else "float32",
            "scheduler_class": type(getattr(pipe, "scheduler", None)).__name__
            if pipe is not None
            else None,
        },
        "load": {"scheduler": args.scheduler, "dtype": "float16" if args.fp16 else "float32"},
        "versions": versions(),
        "batches": batches,
        "images": records,
        "grid": {
            "file": GRID_NAME,
            "row_labels": plan.row_labels,
            "column_labels": plan.column_labels,
            **geo,
        },
        "timings_s": {
            "load": round(t_loaded - t0, 3),
            "generate": round(t_done - t_loaded, 3),
        },
    }
    sidecar = to_jsonable(sidecar)
    write_json(out / SIDECAR_NAME, sidecar)
    _summary(out, sidecar, tiny)
    return sidecar


def _summary(out: Path, sidecar: Dict[str, Any], tiny: bool) -> None:
    g = sidecar["grid"]
    rows = f"{g['rows']} row" + ("s" if g["rows"] != 1 else "")
    columns = f"{g['columns']} column" + ("s" if g["columns"] != 1 else "")
    print(
        f"wrote {out / GRID_NAME} ({rows} x {columns}: "
        f"{', '.join(g['row_labels'])}), {len(sidecar['images'])} images in "
        f"{out / IMAGES_DIR} and {out / SIDECAR_NAME}"
    )
    if tiny:
        print("(random tiny model: the images are noise; see --model)")


def _load_sidecar(path: str) -> Dict[str, Any]:
    try:
        data = read_json(path)
    except FileNotFoundError as err:
        fail("--replay", f"{err} (expected a {SIDECAR_NAME} sidecar)")
    except ValueError as err:
        fail("--replay", str(err))
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        fail("--replay", f"{path!r} is not a {SIDECAR_NAME} sidecar (format {FORMAT})")
    return data


def _replay(args: argparse.Namespace) -> Dict[str, Any]:
    if args.prompt is not None:
        fail("prompt", "not allowed with --replay (the sidecar holds the prompts)")
    src = _load_sidecar(args.replay)
    src_dir = Path(args.replay).parent
    settings = src["settings"]
    batches: List[Dict[str, Any]] = src["batches"]
    only: Optional[str] = None
    chosen = list(range(len(batches)))
    if args.replay_image is not None:
        only = args.replay_image[:-4] if args.replay_image.endswith(".png") else args.replay_image
        only = Path(only).name
        hits = [im for im in src["images"] if im["name"] == only]
        if not hits:
            names = ", ".join(im["name"] for im in src["images"][:6])
            fail("--replay-image", f"no image {only!r} in {args.replay} (e.g. {names})")
        chosen = [int(hits[0]["batch"])]

    out = _out_folder(args.out if args.out else src_dir / "replay")
    rebuilds = args.model is None and bool(settings.get("random_model"))
    _check_slots(
        out, (GRID_NAME, REPLAY_SIDECAR_NAME), (IMAGES_DIR,) + ((TINY_DIR,) if rebuilds else ())
    )
    fp16 = settings.get("dtype") == "float16"
    device, dtype = _resolve_device(args.device or settings.get("device"), fp16)
    model = args.model
    if model is None:
        model = settings["model"]
        if settings.get("random_model") and not (Path(model) / "model_index.json").is_file():
            # The tiny checkpoint is seeded: rebuilding it gives the same weights.
            from ..tiny.builders import build_tiny_stable_diffusion

            model = str(tiny_path(out))
            print(f"rebuilding the tiny random checkpoint into {model} ...", file=sys.stderr)
            build_tiny_stable_diffusion(model, seed=int(settings.get("tiny_seed") or 0))
    model, _ = _prepare_model(model, out)
    if args.model is not None and args.model != settings["model"]:
        print(
            f"warning: --model {args.model!r} replaces the recorded {settings['model']!r}; the "
            "images will differ",
            file=sys.stderr,
        )
    if device != settings.get("device"):
        print(
            f"warning: replaying on {device}, recorded on {settings.get('device')}: the images "
            "may differ in the last bits",
            file=sys.stderr,
        )
    current_versions = versions()
    changed = {
        k: (src["versions"].get(k), v)
        for k, v in current_versions.items()
        if k != "python" and src["versions"].get(k) != v
    }
    if changed:
        print(f"warning: library versions differ from the sidecar's: {changed}", file=sys.stderr)
    sampler = _load_sampler(model, src["load"].get("scheduler"), dtype, device)

    run = [dict(batches[i]) for i in chosen]
    for i, b in zip(chosen, run):
        b["source_batch"] = i
    records, tiles = _execute(sampler, run, out, not args.no_progress, only=only)
    for rec in records:
        rec["batch"] = run[rec["batch"]]["source_batch"]
    original = {im["name"]: im["sha256"] for im in src["images"]}
    identical = {rec["name"]: rec["sha256"] == original.get(rec["name"]) for rec in records}
    result: Dict[str, Any] = {
        "format": FORMAT,
        "replay": {
            "source": str(Path(args.replay).absolute()),
            "image": only,
            "batches": chosen,
            "identical": identical,
            "all_identical": all(identical.values()),
            "versions_changed": changed,
        },
        "argv": list(getattr(args, "_argv", []) or []),
        "settings": {**settings, "model": model, "device": device},
        "load": src["load"],
        "versions": current_versions,
        "batches": [batches[i] for i in chosen],
        "images": records,
    }
    if only is None:
        grid, geo = grid_image(tiles, src["grid"]["row_labels"], src["grid"]["column_labels"])
        save_image_atomic(out / GRID_NAME, grid)
        result["grid"] = {**src["grid"], **geo}
    result = to_jsonable(result)
    write_json(out / REPLAY_SIDECAR_NAME, result)
    same = sum(identical.values())
    print(
        f"replayed {len(records)} image(s) into {out / IMAGES_DIR}: {same}/{len(records)} "
        f"byte-identical to {args.replay}"
    )
    for name, ok in identical.items():
        if not ok:
            print(f"  {name}: differs", file=sys.stderr)
    return result


def run_generate(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the command for a namespace from :func:`build_parser`; returns the sidecar dict.

    Raises :class:`GenerateError` (exit code 2 for a bad argument, 1 for a model that does not
    load) with a one-line message naming the argument.
    """
    if args.replay is not None:
        return _replay(args)
    return _generate(args)


def _default_prog() -> str:
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return "perpneg-2d" if name.startswith("perpneg-2d") else PROG


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Console entry point (``perpneg-2d`` and ``threestudio-perpneg generate``); the exit code."""
    return parse_and_run(build_parser(prog or _default_prog()), argv, run_generate, GenerateError)


if __name__ == "__main__":
    sys.exit(main())
