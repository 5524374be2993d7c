"""Loading the frames of one 3D run: a threestudio trial folder (cameras rebuilt from its
``configs/parsed.yaml``) or a folder of images with an azimuth manifest."""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from ...common.checks import check_int
from .flags import threestudio_test_azimuths

__all__ = [
    "IMAGE_SUFFIXES",
    "MANIFEST_NAMES",
    "RING_DATAMODULES",
    "THREESTUDIO_CAMERA_DEFAULTS",
    "Frame",
    "TrialFrames",
    "load_trial",
]

PathLike = Union[str, Path]

IMAGE_SUFFIXES: Tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MANIFEST_NAMES: Tuple[str, ...] = ("manifest.json", "manifest.csv")

# threestudio's RandomCameraDataModuleConfig defaults (threestudio/data/uncond.py) for the keys the
# test camera ring uses; parsed.yaml only holds what a run set explicitly.
THREESTUDIO_CAMERA_DEFAULTS: Dict[str, Any] = {
    "n_test_views": 120,
    "eval_elevation_deg": 15.0,
    "eval_camera_distance": 1.5,
    "eval_height": 512,
    "eval_width": 512,
}
# data_type -> where its test-camera keys live inside ``data`` (None: ``data`` itself).
RING_DATAMODULES: Dict[str, Optional[str]] = {
    "random-camera-datamodule": None,
    "eff-random-camera-datamodule": None,
    "single-image-datamodule": "random_camera",
}
_TEST_DIR = re.compile(r"^it(\d+)-test$")


@dataclass(frozen=True)
class Frame:
    """One image and its camera (degrees, front at azimuth 0)."""

    path: Path
    azimuth: float
    elevation: float
    index: Optional[int] = None
    crop_width: Optional[int] = None  # keep only the first panel this wide (threestudio grids)

    def load(self) -> Any:
        """The (cropped) image as an RGB ``PIL.Image``."""
        from PIL import Image

        with Image.open(self.path) as im:
            image = im.convert("RGB")
        if self.crop_width is not None and image.width > self.crop_width:
            image = image.crop((0, 0, self.crop_width, image.height))
        return image


@dataclass
class TrialFrames:
    """Frames of one object (one run), with where their cameras came from."""

    source: Path
    kind: str  # "threestudio" or "manifest"
    frames: List[Frame]
    name: str
    object_name: Optional[str] = None
    seed: Optional[int] = None
    experiment: Optional[str] = None
    iteration: Optional[int] = None
    camera: Dict[str, Any] = field(default_factory=dict)


def _recorded(obj: Any, seed: Any, experiment: Any) -> Dict[str, Any]:
    """The object name, seed and experiment a trial records (None where absent or malformed)."""
    return {
        "object_name": str(obj) if obj else None,
        "seed": seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
        "experiment": str(experiment) if experiment is not None else None,
    }


def _images_in(folder: Path) -> List[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _load_yaml(path: Path) -> Dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as fp:
            data = yaml.safe_load(fp)
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _first_panel_width(size: Tuple[int, int], eval_w: int, eval_h: int) -> Optional[int]:
    """Width of the RGB panel of a threestudio test grid of the given (width, height)."""
    w, h = size
    if h == eval_h and w % eval_w == 0 and w > eval_w:
        return eval_w
    if h > 0 and w % h == 0 and w > h:  # square panels of another size
        return h
    return None


def _load_threestudio(folder: Path, iteration: Optional[int]) -> TrialFrames:
    cfg_path = folder / "configs" / "parsed.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{cfg_path}: not found; a threestudio trial folder needs its configs/parsed.yaml for "
            "the test cameras (or give a folder of images with a manifest.csv/manifest.json)"
        )
    cfg = _load_yaml(cfg_path)
    save = folder / "save"
    tests = {}
    if save.is_dir():
        for p in save.iterdir():
            m = _TEST_DIR.match(p.name)
            if m and p.is_dir():
                tests[int(m.group(1))] = p
    if not tests:
        raise ValueError(
            f"no frames: {folder} has no save/it*-test/ folder (run threestudio --test)"
        )
    if iteration is None:
        iteration = max(tests)
    elif iteration not in tests:
        raise ValueError(
            f"iteration: {folder} has no save/it{iteration}-test/; available: {sorted(tests)}"
        )
    test_dir = tests[iteration]

    data_type = cfg.get("data_type")
    data = cfg.get("data") or {}
    if data_type not in RING_DATAMODULES:
        raise ValueError(
            f"{cfg_path}: data_type {data_type!r} has no known test camera ring (known: "
            f"{sorted(RING_DATAMODULES)}); write a manifest.csv (file, azimuth[, elevation]) for "
            "its frames instead"
        )
    sub = RING_DATAMODULES[data_type]
    if data_type == "single-image-datamodule" and data.get("use_random_camera") is False:
        raise ValueError(
            f"{cfg_path}: data.use_random_camera is false, so the test frames have no camera "
            "ring; write a manifest.csv (file, azimuth[, elevation]) for them instead"
        )
    ring_cfg = (data.get(sub) or {}) if sub else data
    if not isinstance(ring_cfg, dict):
        raise ValueError(f"{cfg_path}: data{'.' + sub if sub else ''} is not a mapping")
    prefix = f"data.{sub}." if sub else "data."
    camera: Dict[str, Any] = {"data_type": data_type, "config": str(cfg_path), "defaulted": []}
    for key, default in THREESTUDIO_CAMERA_DEFAULTS.items():
        if key in ring_cfg and ring_cfg[key] is not None:
            camera[key] = ring_cfg[key]
        else:
            camera[key] = default
            camera["defaulted"].append(prefix + key)
    n = camera["n_test_views"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{cfg_path}: {prefix}n_test_views must be an integer >= 1, got {n!r}")
    elevation = camera["eval_elevation_deg"]
    if isinstance(elevation, bool) or not isinstance(elevation, (int, float)):
        raise ValueError(f"{cfg_path}: {prefix}eval_elevation_deg must be a number")
    azimuths = threestudio_test_azimuths(n)
    camera["azimuth_convention"] = "linspace(0, 360, n_test_views), endpoint included"

    frames: List[Frame] = []
    ignored: List[str] = []
    crop: Optional[int] = None
    for path in _images_in(test_dir):
        if not path.stem.isdigit():
            ignored.append(path.name)
            continue
        index = int(path.stem)
        if index >= n:
            raise ValueError(
                f"{path}: frame index {index} is outside the test ring of {prefix}n_test_views={n}"
            )
        if crop is None:
            from PIL import Image

            with Image.open(path) as im:
                crop = _first_panel_width(
                    im.size, int(camera["eval_width"]), int(camera["eval_height"])
                )
            crop = crop or 0
        frames.append(Frame(path, azimuths[index], float(elevation), index, crop or None))
    if not frames:
        raise ValueError(f"no frames: {test_dir} holds no <index>.png test frames")
    frames.sort(key=lambda f: f.index if f.index is not None else -1)
    present = {f.index for f in frames}
    camera["missing_indices"] = [i for i in range(n) if i not in present]
    camera["ignored_files"] = ignored
    camera["first_panel_width"] = crop or None

    prompt = ((cfg.get("system") or {}).get("prompt_processor") or {}).get("prompt")
    return TrialFrames(
        source=folder,
        kind="threestudio",
        frames=frames,
        name=f"{folder.parent.name}/{folder.name}" if folder.parent.name else folder.name,
        **_recorded(prompt, cfg.get("seed"), cfg.get("name")),
        iteration=iteration,
        camera=camera,
    )


def _number(manifest: Path, where: str, key: str, value: Any) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"manifest {manifest}: {where}: {key} {value!r} is not a number") from None
    if not math.isfinite(x):
        raise ValueError(f"manifest {manifest}: {where}: {key} {value!r} is not finite")
    return x


def _read_manifest(manifest: Path) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    meta: Dict[str, Any] = {}
    if manifest.suffix.lower() == ".json":
        try:
            with open(manifest, encoding="utf-8") as fp:
                data = json.load(fp)
        except json.JSONDecodeError as err:
            raise ValueError(f"manifest {manifest}: not valid JSON ({err})") from None
        if isinstance(data, dict):
            meta = {k: v for k, v in data.items() if k != "frames"}
            data = data.get("frames")
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ValueError(
                f"manifest {manifest}: expected a list of {{file, azimuth[, elevation]}} objects "
                "or {'frames': [...]}"
            )
        rows = [{str(k).strip().lower(): v for k, v in r.items()} for r in data]
    elif manifest.suffix.lower() == ".csv":
        with open(manifest, newline="", encoding="utf-8") as fp:
            reader = csv.DictReader(fp)
            fields = [str(f).strip().lower() for f in (reader.fieldnames or [])]
            for need in ("file", "azimuth"):
                if need not in fields:
                    raise ValueError(
                        f"manifest {manifest}: no {need!r} column (header must name file, "
                        f"azimuth[, elevation]; got {fields})"
                    )
            rows = [
                {str(k).strip().lower(): v for k, v in r.items() if k is not None} for r in reader
            ]
    else:
        raise ValueError(f"manifest {manifest}: expected a .csv or .json file")
    return rows, meta


def _load_manifest(manifest: Path) -> TrialFrames:
    rows, meta = _read_manifest(manifest)
    base = manifest.parent
    frames: List[Frame] = []
    listed: Dict[Path, int] = {}
    for n, row in enumerate(rows, start=1):
        where = f"entry {n}"
        name = row.get("file")
        if not name or not str(name).strip():
            raise ValueError(f"manifest {manifest}: {where} has no file")
        path = (base / str(name).strip()).resolve()
        if path in listed:
            raise ValueError(f"manifest {manifest}: file {name!r} is listed twice")
        if not path.is_file():
            raise ValueError(f"manifest {manifest}: file {name!r} is listed but missing ({path})")
        listed[path] = n
        if "azimuth" not in row or row["azimuth"] in (None, ""):
            raise ValueError(f"manifest {manifest}: {where} ({name}) has no azimuth")
        az = _number(manifest, f"{where} ({name})", "azimuth", row["azimuth"])
        el_raw = row.get("elevation")
        el = 0.0 if el_raw in (None, "") else _number(manifest, where, "elevation", el_raw)
        frames.append(Frame(path, az, el, None, None))
    if not frames:
        raise ValueError(f"no frames: manifest {manifest} lists no frames")
    unlisted: List[str] = []
    for folder in sorted({p.parent for p in listed} | {base.resolve()}):
        unlisted += [str(p) for p in _images_in(folder) if p.resolve() not in listed]
    if unlisted:
        shown = ", ".join(unlisted[:5]) + (" ..." if len(unlisted) > 5 else "")
        raise ValueError(
            f"manifest {manifest}: {len(unlisted)} image(s) without manifest entries: {shown}"
        )
    return TrialFrames(
        source=base,
        kind="manifest",
        frames=frames,
        name=base.name or str(base),
        **_recorded(meta.get("object"), meta.get("seed"), meta.get("experiment")),
        camera={"manifest": str(manifest), "elevation_default": 0.0},
    )


def load_trial(path: PathLike, *, iteration: Optional[int] = None) -> TrialFrames:
    """Frames and cameras of a threestudio trial folder, an image folder with a manifest, or a
    manifest file.

    Raises:
        FileNotFoundError: ``path`` (or a trial's ``configs/parsed.yaml``) does not exist, or a
            folder is neither a trial nor holds a manifest.
        ValueError: no frames, an unknown ``iteration``, a manifest that does not match its folder,
            or a config without a known test camera ring.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such folder")
    if iteration is not None:
        check_int("iteration", iteration, 0)
    if p.is_file():
        if iteration is not None:
            raise ValueError(f"iteration: only applies to threestudio trial folders, not {p}")
        return _load_manifest(p)
    if (p / "configs" / "parsed.yaml").exists() or (p / "save").is_dir():
        return _load_threestudio(p, iteration)
    manifests = [p / m for m in MANIFEST_NAMES if (p / m).is_file()]
    if len(manifests) > 1:
        raise ValueError(f"{p}: holds both manifest.json and manifest.csv; keep one")
    if manifests:
        if iteration is not None:
            raise ValueError(f"iteration: only applies to threestudio trial folders, not {p}")
        return _load_manifest(manifests[0])
    raise FileNotFoundError(
        f"{p}: neither a threestudio trial (configs/parsed.yaml, save/it*-test/) nor a folder "
        "with a manifest.csv or manifest.json (file, azimuth[, elevation])"
    )
