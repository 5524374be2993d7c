"""``testbed sweep-merge``: one sweep from runs measured apart.

Two kinds of runs join: runs of different levels (say, as their priors finished training), and runs
of the same level on disjoint seeds (``--first-seed``), whose counts add up. The second lets a
sweep measured at small sizes grow to the full 16 seeds without measuring its first seeds again:
every count (3D Janus and front kept, 2D successes, identity kept, view counts) is summed, every
interval recomputed from the sums, and the means (view accuracy, identity agreement, UNet rows,
projection ratios) weighted by their sample counts, which is what one run over all the seeds
would have reported. Each level of a merged sweep lists the seed blocks it is made of in
``seed_runs`` (the sizes of each block), and ``settings.sweep`` keeps the shared settings only.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple, Union

__all__ = ["SIZE_KEYS", "merge_3d_row", "merge_sweeps", "merge_level"]

PathLike = Union[str, Path]

#: Sweep settings that only size a run (they may differ between merged runs); every other
#: setting must be equal.
SIZE_KEYS = ("seeds", "seeds_middle", "first_seed", "n2d", "n_sds2d", "n_projection")


def _seed_runs(level: Dict[str, Any], sweep_settings: Dict[str, Any], run: Path) -> List[Dict]:
    """The seed blocks of a level: its own ``seed_runs`` once merged, else its run's sizes."""
    if "seed_runs" in level:
        return [dict(r) for r in level["seed_runs"]]
    return [{"run": str(run), **{k: sweep_settings[k] for k in SIZE_KEYS}}]


def _block(seed_run: Dict[str, Any]) -> Tuple[int, int]:
    """[first, end) of the seeds a run used, one per 3D object and per 2D SDS image (the 2D
    DDIM cells and the projection draw one stream from the first seed, so other first seeds
    already give them independent noise)."""
    first = int(seed_run["first_seed"])
    size = max(int(seed_run[k]) for k in ("seeds", "seeds_middle", "n_sds2d"))
    return first, first + size


def _overlap(a: Tuple[int, int], b: Tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def _add_counts(a: Dict[str, int], b: Dict[str, int]) -> Dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in sorted(set(a) | set(b))}


def _weighted(a: float, na: int, b: float, nb: int) -> float:
    return (a * na + b * nb) / (na + nb) if na + nb else 0.0


def _match(rows_a: Sequence[Dict], rows_b: Sequence[Dict], key: Callable, what: str) -> List:
    """Pairs of rows with the same key, in ``rows_a``'s order; other row sets raise."""
    index = {key(r): r for r in rows_b}
    if sorted(map(str, index)) != sorted(str(key(r)) for r in rows_a):
        raise ValueError(f"runs: {what} rows differ between the runs of one level")
    return [(r, index[key(r)]) for r in rows_a]


def _merge_2d_cell(a: Dict[str, Any], b: Dict[str, Any], interval_key: str) -> Dict[str, Any]:
    from ..eval.stats import wilson_interval

    out = dict(a)
    for k in ("n", "successes", "identity_kept"):
        out[k] = a[k] + b[k]
    out["view_counts"] = _add_counts(a["view_counts"], b["view_counts"])
    out["rate"] = out["successes"] / out["n"] if out["n"] else 0.0
    out[interval_key] = list(wilson_interval(out["successes"], out["n"]))
    return out


def merge_3d_row(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, Any]:
    """Two 3D table rows of one method on disjoint seeds: counts summed, means weighted by seeds
    (intervals are not recomputed: see :func:`.bench.add_intervals`)."""
    na, nb = a["seeds"], b["seeds"]
    out = dict(a)
    for k in ("seeds", "janus", "front_kept"):
        out[k] = a[k] + b[k]
    out["view_accuracy"] = {
        v: _weighted(a["view_accuracy"][v], na, b["view_accuracy"][v], nb)
        for v in a["view_accuracy"]
    }
    for k in ("identity_agreement", "unet_rows_per_step"):
        out[k] = _weighted(a[k], na, b[k], nb)
    if "seconds_per_step" in a and "seconds_per_step" in b:  # rows of testbed threestudio
        out["seconds_per_step"] = round(
            _weighted(a["seconds_per_step"], na, b["seconds_per_step"], nb), 4
        )
    out["seconds"] = round(a["seconds"] + b["seconds"], 1)
    return out


def merge_level(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, Any]:
    """One level's measurements from two runs on disjoint seeds (counts summed, means weighted).

    Raises:
        `ValueError`: when the two are not the same level or their rows differ.
    """
    from .bench import add_intervals, rounded_interval

    for key in ("name", "error", "p_back_given_back_phrase", "p_side_given_side_phrase"):
        if a[key] != b[key]:
            raise ValueError(f"runs: level {key} differs ({a[key]!r} and {b[key]!r})")
    cells = [
        _merge_2d_cell(x, y, "ci95")
        for x, y in _match(a["bias"]["cells"], b["bias"]["cells"], lambda c: c["key"], "bias")
    ]
    bias: Dict[str, Any] = {c["key"]: c["rate"] for c in cells}
    bias["cells"] = cells
    sanity = {
        k: [a["sanity"][k][0] + b["sanity"][k][0], a["sanity"][k][1] + b["sanity"][k][1]]
        for k in a["sanity"]
    }
    views = {}
    for v, x in a["sds2d_views"].items():
        y = b["sds2d_views"][v]
        s, n = x["successes"] + y["successes"], x["n"] + y["n"]
        views[v] = {
            "successes": s,
            "n": n,
            "interval": rounded_interval(s, n),
            "view_counts": _add_counts(x["view_counts"], y["view_counts"]),
        }

    def cell_key(c: Dict[str, Any]) -> Tuple:
        return c["mode"], c["scheme"], c["view"]

    table2d = [
        _merge_2d_cell(x, y, "interval")
        for x, y in _match(a["table2d"], b["table2d"], cell_key, "table2d")
    ]
    table3d = [
        merge_3d_row(x, y)
        for x, y in _match(
            a["table3d"], b["table3d"], lambda r: (r["label"], r["batch"]), "table3d"
        )
    ]
    add_intervals(table3d)
    projection = []
    for x, y in _match(a["projection"], b["projection"], lambda r: r["t"], "projection"):
        row: Dict[str, Any] = {"t": x["t"], "n": x["n"] + y["n"]}
        for k in x:
            if k not in row:
                row[k] = round(_weighted(x[k], x["n"], y[k], y["n"]), 4)
        projection.append(row)
    seconds = {
        k: round(a["seconds"].get(k, 0.0) + b["seconds"].get(k, 0.0), 1) for k in a["seconds"]
    }
    return {
        **a,
        "bias": bias,
        "sanity": sanity,
        "sds2d_views": views,
        "table2d": table2d,
        "table3d": table3d,
        "projection": projection,
        "seconds": seconds,
        "seed_runs": a["seed_runs"] + b["seed_runs"],
    }


def _shared(sweep_settings: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in sweep_settings.items() if k not in SIZE_KEYS}


def merge_sweeps(
    out: PathLike, runs: Sequence[PathLike], *, echo: Callable[[str], Any] = print
) -> Dict[str, Any]:
    """One ``sweep.json`` (and pictures) from runs measured apart with the same settings.

    Levels from separate runs are joined in order of P(back | "back view"); a level measured by
    several runs on disjoint seed blocks is merged by :func:`merge_level`. Rings come from the
    run with a level's first seeds. The hypothesis is evaluated afresh on the merged levels.

    Raises:
        `ValueError`: naming the run whose settings (other than :data:`SIZE_KEYS`), protocol or
            classifier differ from the first run's, or that measured a level on seeds another
            run used.
    """
    from ..common.io import output_folder, read_json
    from .sweep import _write_report, evaluate_hypothesis

    if len(runs) < 1:
        raise ValueError("runs: expected at least one sweep folder, got none")
    reports = [(Path(r), read_json(Path(r) / "sweep.json")) for r in runs]
    first_dir, first = reports[0]
    by_name: Dict[str, Dict[str, Any]] = {}
    rings: Dict[str, Tuple[int, Path]] = {}
    for run_dir, rep in reports:
        if _shared(rep["settings"]["sweep"]) != _shared(first["settings"]["sweep"]):
            raise ValueError(
                f"runs: {run_dir} was measured with other sweep settings than {first_dir}"
            )
        if rep["settings"]["protocol3d"] != first["settings"]["protocol3d"]:
            raise ValueError(
                f"runs: {run_dir} was measured with other protocol3d settings than {first_dir}"
            )
        if rep["classifier"] != first["classifier"]:
            raise ValueError(f"runs: {run_dir} used another classifier than {first_dir}")
        for lv in rep["levels"]:
            lv = {**lv, "seed_runs": _seed_runs(lv, rep["settings"]["sweep"], run_dir)}
            name = lv["name"]
            if name in by_name:
                for new in lv["seed_runs"]:
                    for old in by_name[name]["seed_runs"]:
                        if _overlap(_block(new), _block(old)):
                            raise ValueError(
                                f"runs: level {name!r} is measured twice on the same seeds "
                                f"({run_dir}: first seed {new['first_seed']}, also "
                                f"{old['run']}: first seed {old['first_seed']})"
                            )
                by_name[name] = merge_level(by_name[name], lv)
            else:
                by_name[name] = lv
            start = min(int(r["first_seed"]) for r in lv["seed_runs"])
            pic = run_dir / f"rings_{name}.png"
            if pic.is_file() and (name not in rings or start < rings[name][0]):
                rings[name] = (start, pic)
    levels = sorted(by_name.values(), key=lambda lv: lv["p_back_given_back_phrase"])
    folder = output_folder("out", out)
    for _, pic in rings.values():
        if pic.resolve() != (folder / pic.name).resolve():
            shutil.copyfile(pic, folder / pic.name)
    settings = dict(first["settings"])
    settings["sweep"] = _shared(first["settings"]["sweep"])  # the sizes: each level's seed_runs
    settings["levels"] = [lv["name"] for lv in levels]
    settings["seconds"] = round(sum(rep["settings"]["seconds"] for _, rep in reports), 1)
    settings["merged_from"] = [str(r) for r, _ in reports]
    report = {
        "levels": levels,
        "classifier": first["classifier"],
        "hypothesis": evaluate_hypothesis(levels),
        "settings": settings,
    }
    _write_report(folder, report, echo)
    echo(f"wrote {folder / 'sweep.json'} from {len(reports)} runs")
    return report
