"""What a ``generate`` run writes besides the sidecar: PNGs with their settings embedded (SHA-256
recorded) and the labelled ``grid.png``."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Dict, Sequence, Tuple

from ...common.io import pil_nearest, save_image_atomic
from .args import CHAR_WIDTH, GAP, LABEL_HEIGHT, MIN_TILE, SIDECAR_NAME

__all__ = ["grid_geometry", "grid_image", "image_meta", "save_png"]


def _png_bytes_info(meta: Dict[str, Any]) -> Any:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("perpneg", json.dumps(meta, sort_keys=True, separators=(",", ":")))
    return info


def save_png(image: Any, path: Path, meta: Dict[str, Any]) -> str:
    """Save atomically; returns the SHA-256 of the written bytes."""
    save_image_atomic(path, image, pnginfo=_png_bytes_info(meta))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def grid_geometry(
    rows: int, columns: int, image_size: Tuple[int, int], row_labels: Sequence[str]
) -> Dict[str, int]:
    """Layout of ``grid.png``: a label band on top and on the left, ``rows × columns`` tiles."""
    w, h = image_size
    factor = max(1, math.ceil(MIN_TILE / max(1, min(w, h))))
    label_width = 8 + CHAR_WIDTH * max([len(s) for s in row_labels] + [4])
    return {
        "rows": rows,
        "columns": columns,
        "factor": factor,
        "tile_width": w * factor,
        "tile_height": h * factor,
        "label_width": label_width,
        "label_height": LABEL_HEIGHT,
        "gap": GAP,
        "width": label_width + columns * w * factor + (columns - 1) * GAP,
        "height": LABEL_HEIGHT + rows * h * factor + (rows - 1) * GAP,
    }


def grid_image(
    tiles: Dict[Tuple[int, int], Any], row_labels: Sequence[str], column_labels: Sequence[str]
) -> Tuple[Any, Dict[str, int]]:
    from PIL import Image, ImageDraw

    size = (max(t.size[0] for t in tiles.values()), max(t.size[1] for t in tiles.values()))
    geo = grid_geometry(len(row_labels), len(column_labels), size, row_labels)
    tw, th, lw, lh = geo["tile_width"], geo["tile_height"], geo["label_width"], geo["label_height"]
    sx, sy = tw + GAP, th + GAP  # tile pitch
    grid = Image.new("RGB", (geo["width"], geo["height"]), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    nearest = pil_nearest()
    for c, text in enumerate(column_labels):
        draw.text((lw + c * sx + 3, 3), text, fill=(0, 0, 0))
    for r, text in enumerate(row_labels):
        draw.text((4, lh + r * sy + th // 2 - 5), text, fill=(0, 0, 0))
    for (r, c), img in tiles.items():
        tile = img.convert("RGB").resize((tw, th), nearest) if geo["factor"] > 1 else img
        grid.paste(tile.convert("RGB"), (lw + c * sx, lh + r * sy))
    return grid, geo


def image_meta(batch: Dict[str, Any], cell: Dict[str, Any]) -> Dict[str, Any]:
    kw = batch["kwargs"]
    meta = {
        "prompt": kw["prompt"],
        "extra_prompts": kw.get("extra_prompts", []),
        "weights": kw.get("weights"),
        "uncond": kw.get("negative_prompt", ""),
        "mode": batch["mode"],
        "seed": cell["seed"],
        "view": cell["view"],
        "azimuth": cell["azimuth"],
        "steps": kw.get("num_inference_steps"),
        "guidance_scale": kw.get("guidance_scale"),
        "perp_neg_window": [kw.get("perp_neg_start", 0.0), kw.get("perp_neg_stop", 1.0)],
        "sidecar": SIDECAR_NAME,
    }
    # Only where the call recorded it: a replayed older sidecar keeps its PNG bytes.
    if "perp_neg_eval_prob" in kw:
        meta["perp_neg_eval_prob"] = kw["perp_neg_eval_prob"]
    return meta
