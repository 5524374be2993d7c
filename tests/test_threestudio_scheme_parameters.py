"""Weight-scheme config keys through the real threestudio classes (threestudio tier).

* ``perpneg-prompt-processor`` with every authors' key changed (``perp_neg_negative_w``, both decays,
  ``perp_neg_front_cutoff``): the negative weights our guidance builds per camera are the formula's.
* threestudio's ``stable-diffusion-prompt-processor`` with its four ``perp_neg_f_*`` triples changed:
  our guidance's weights equal the ones threestudio's own ``get_text_embeddings_perp_neg`` returns.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List

import pytest
from threestudio_support.fixtures import require_threestudio

threestudio = require_threestudio()  # module-level skip with the reason when unavailable

import torch  # noqa: E402

from threestudio_perpneg.threestudio_cpu.system import load_custom_extension  # noqa: E402

pytestmark = pytest.mark.threestudio

REPO = Path(__file__).resolve().parents[1]
load_custom_extension(REPO / "custom" / "threestudio-perpneg")

# front half and back half azimuths, on both sides of r = 0.45 and r = 0.55 (the custom cutoff)
AZIMUTHS = [5.0, 45.0, 52.0, 75.0, 95.0, 135.0, 142.0, 175.0]
AUTHORS = {"negative_w": -1.25, "front_decay_factor": 3.5, "side_decay_factor": 7.0}
CUTOFF = 0.45
TRIPLES = {
    "perp_neg_f_fs": [1.0, 2.0, 0.5],
    "perp_neg_f_sf": [2.0, 0.1, -1.0],
    "perp_neg_f_sb": [0.5, 1.0, 0.25],
    "perp_neg_f_fsb": [3.0, 0.2, -2.0],
}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # prompt processors write .threestudio_cache/ under cwd
    return tmp_path


def _authors_ref(az: float) -> Dict[str, float]:
    nw, fd, sd = AUTHORS["negative_w"], AUTHORS["front_decay_factor"], AUTHORS["side_decay_factor"]
    a = abs(az)
    if a >= 90:
        r = 2 - a / 90
        return {"front": nw, "side": nw * math.exp(-r * sd) / 2 if r <= CUTOFF else 0.0}
    r = 1 - a / 90
    return {
        "front": nw * math.exp(-r * fd) if r <= CUTOFF else 0.0,
        "side": nw * math.exp(-(1 - r) * sd) if r >= 1 - CUTOFF else 0.0,
    }


def _weights_by_view(cond, views: Dict[str, torch.Tensor], b: int) -> List[Dict[str, float]]:
    """Per sample, the weight of each view negative the conditioning evaluates (absent = 0)."""
    out: List[Dict[str, float]] = [{name: 0.0 for name in views} for _ in range(b)]
    for emb, i, w in zip(cond.negative, cond.negative_index, cond.negative_weight):
        names = [n for n, v in views.items() if torch.allclose(emb, v.to(emb))]
        assert len(names) == 1
        out[int(i)][names[0]] = float(w)
    return out


def _guidance(model: Path):
    return threestudio.find("perpneg-stable-diffusion-guidance")(
        {"pretrained_model_name_or_path": str(model), "half_precision_weights": False}
    )


def _cams():
    az = torch.tensor(AZIMUTHS)
    el = torch.zeros_like(az)
    return el, az, torch.full_like(az, 1.5)


def test_authors_keys_reach_the_guidance_weights(tiny_sd_path, workdir):
    prompt_utils = threestudio.find("perpneg-prompt-processor")(
        {
            "pretrained_model_name_or_path": str(tiny_sd_path),
            "prompt": "a corgi",
            "spawn": False,
            "perp_neg_scheme": "authors",
            **{f"perp_neg_{k}": v for k, v in AUTHORS.items()},
            "perp_neg_front_cutoff": CUTOFF,
        }
    )()
    cond = _guidance(tiny_sd_path).conditioning(prompt_utils, *_cams())
    bank = prompt_utils.perp_neg_bank
    from threestudio_perpneg.core.views import FRONT, SIDE

    got = _weights_by_view(cond, {"front": bank.views[FRONT], "side": bank.views[SIDE]}, 8)
    for az, w in zip(AZIMUTHS, got):
        ref = _authors_ref(az)
        assert w == pytest.approx(ref, abs=1e-6), (az, w, ref)


def test_stock_processor_triples_give_threestudios_own_weights(tiny_sd_path, workdir):
    prompt_utils = threestudio.find("stable-diffusion-prompt-processor")(
        {
            "pretrained_model_name_or_path": str(tiny_sd_path),
            "prompt": "a corgi",
            "spawn": False,
            "use_perp_neg": True,
            **TRIPLES,
        }
    )()
    el, az, dist = _cams()
    cond = _guidance(tiny_sd_path).conditioning(prompt_utils, el, az, dist)
    vd = prompt_utils.text_embeddings_vd
    idx = prompt_utils.direction2idx
    got = _weights_by_view(cond, {"front": vd[idx["front"]], "side": vd[idx["side"]]}, 8)
    # threestudio: weights [B, 2], (front, side) on the front half, (side, front) on the back half
    _, theirs = prompt_utils.get_text_embeddings_perp_neg(el, az, dist)
    for a, w, (w0, w1) in zip(AZIMUTHS, got, theirs.tolist()):
        ref = {"front": w0, "side": w1} if abs(a) < 90 else {"front": w1, "side": w0}
        assert w == pytest.approx(ref, abs=1e-6), (a, w, ref)
